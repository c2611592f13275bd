"""Sparse Mixture-of-Experts feed-forward layer, plugged into the ch01 mini-GPT in place of each block's MLP.

Each token is sent by a learned router to k of N expert MLPs (k = 1: Switch Transformer; k = 2: Mixtral), so the
parameter count grows with N while the compute per token stays that of k experts. Pieces:
  * router: a bias-free linear layer, softmax in float32 (bf16 logits make routing flip between experts);
  * top-k with renormalisation of the k gates (k >= 2, Mixtral); with k = 1 the gate is the raw probability (Switch),
    otherwise it would be constant 1 and the router would get no gradient from the loss;
  * load-balancing loss N · Σ_i f_i · P_i (Fedus 2021): f_i = share of token→expert assignments that went to i,
    P_i = mean router probability of i; equals 1 when routing is uniform, N when it collapses onto one expert;
  * router z-loss mean(logsumexp(logits)²) (Zoph 2022): keeps router logits small and the softmax stable;
  * capacity factor: each expert takes at most ceil(cf · S · k / N) assignments per batch; overflow is dropped (the token
    then passes through the block on its residual only). ``capacity_factor=None`` is dropless (MegaBlocks-style).
  * dispatch: sort the S·k assignments by expert, run each expert once on its contiguous slice, scatter-add back.
    ``naive_dispatch`` loops token by token — same numbers, measured in ``main``.

    python 05_emerging_architectures/moe.py              # dispatch timing + expert utilisation with / without balancing

References: Shazeer et al. 2017 (sparsely-gated MoE); Fedus et al. 2021 (Switch Transformer); Zoph et al. 2022 (ST-MoE,
router z-loss); Jiang et al. 2024 (Mixtral); Gale et al. 2022 (MegaBlocks, dropless MoE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ch01.model import GPT, MLP, GPTConfig


@dataclass
class MoEConfig:
    n_experts: int = 4
    top_k: int = 2
    expert_hidden: int | None = None  # None: the dense model's ffn_hidden
    capacity_factor: float | None = None  # None: dropless
    lb_coef: float = 1e-2  # Switch uses 1e-2
    z_coef: float = 1e-3  # ST-MoE uses 1e-3

    def __post_init__(self):
        if self.n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {self.n_experts}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {self.capacity_factor}")


def load_balancing_loss(probs: torch.Tensor, expert_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """N · Σ_i f_i · P_i. probs (S, N) router probabilities; expert_idx (S, k) chosen experts (before dropping)."""
    f = torch.bincount(expert_idx.flatten(), minlength=n_experts).float() / expert_idx.numel()  # (N,) no grad
    P = probs.mean(0)  # (N,) differentiable
    return n_experts * (f * P).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


class MoE(nn.Module):
    """Drop-in replacement for ``ch01.model.MLP``: (B, T, C) -> (B, T, C); experts are ch01 MLPs."""

    def __init__(self, cfg: GPTConfig, moe: MoEConfig):
        super().__init__()
        self.moe = moe
        expert_cfg = replace(cfg, ffn_hidden=moe.expert_hidden or cfg.ffn_hidden)
        self.router = nn.Linear(cfg.n_embd, moe.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(expert_cfg) for _ in range(moe.n_experts))
        self.dispatch = "sorted"  # or "naive"
        self.last_aux = torch.zeros(())
        self.last_counts = torch.zeros(moe.n_experts)  # assignments per expert in the last forward (after dropping)
        self.last_dropped = 0.0  # fraction of assignments dropped in the last forward

    def route(self, x: torch.Tensor):
        """x (S, C) -> probs (S, N) fp32, gates (S, k), expert_idx (S, k), logits (S, N)."""
        logits = self.router(x).float()  # (S, N) fp32 routing
        probs = logits.softmax(-1)  # (S, N)
        gates, expert_idx = probs.topk(self.moe.top_k, dim=-1)  # (S, k)
        if self.moe.top_k > 1:
            gates = gates / gates.sum(-1, keepdim=True)
        return probs, gates, expert_idx, logits

    def capacity(self, n_tokens: int) -> int | None:
        cf = self.moe.capacity_factor
        return None if cf is None else math.ceil(cf * n_tokens * self.moe.top_k / self.moe.n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (S, C)
        probs, gates, expert_idx, logits = self.route(flat)
        if self.training or torch.is_grad_enabled():
            self.last_aux = self.moe.lb_coef * load_balancing_loss(
                probs, expert_idx, self.moe.n_experts
            ) + self.moe.z_coef * router_z_loss(logits)
        keep = self._keep_mask(expert_idx)  # (S, k) False = over capacity
        gates = gates * keep
        self.last_counts = torch.bincount(expert_idx[keep], minlength=self.moe.n_experts).detach().cpu()
        self.last_dropped = 1.0 - keep.float().mean().item()
        fn = self._sorted_dispatch if self.dispatch == "sorted" else self._naive_dispatch
        return fn(flat, gates.to(x.dtype), expert_idx, keep).view(B, T, C)

    def _keep_mask(self, expert_idx: torch.Tensor) -> torch.Tensor:
        """True for assignments within their expert's capacity; priority = token order (Switch), choice 1 before 2."""
        cap = self.capacity(expert_idx.shape[0])
        if cap is None:
            return torch.ones_like(expert_idx, dtype=torch.bool)
        # column-major flattening: every token's first choice is served before any second choice
        flat_e = expert_idx.t().reshape(-1)  # (k·S,)
        one_hot = F.one_hot(flat_e, self.moe.n_experts)  # (k·S, N)
        position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # (k·S,) slot index inside its expert
        return (position < cap).view(self.moe.top_k, -1).t()  # (S, k)

    def _sorted_dispatch(self, flat, gates, expert_idx, keep):
        S, k = expert_idx.shape
        token_of = torch.arange(S, device=flat.device).repeat_interleave(k)  # (S·k,) assignment -> token
        e_flat, g_flat = expert_idx.reshape(-1), gates.reshape(-1)  # (S·k,)
        kept = keep.reshape(-1)
        token_of, e_flat, g_flat = token_of[kept], e_flat[kept], g_flat[kept]
        order = torch.argsort(e_flat, stable=True)  # group assignments by expert
        counts = torch.bincount(e_flat, minlength=self.moe.n_experts).tolist()
        x_sorted = flat[token_of[order]]  # (A, C) contiguous per expert
        out_sorted = torch.empty_like(x_sorted)
        start = 0
        for e, n in enumerate(counts):
            if n:
                out_sorted[start : start + n] = self.experts[e](x_sorted[start : start + n])
            start += n
        weighted = out_sorted * g_flat[order, None]  # (A, C)
        return torch.zeros_like(flat).index_add_(0, token_of[order], weighted)  # (S, C); dropped tokens stay 0

    def _naive_dispatch(self, flat, gates, expert_idx, keep):
        rows = []
        for s in range(flat.shape[0]):  # one token at a time: k small matmuls each
            y = torch.zeros_like(flat[s])
            for j in range(expert_idx.shape[1]):
                if keep[s, j]:
                    y = y + gates[s, j] * self.experts[int(expert_idx[s, j])](flat[s : s + 1])[0]
            rows.append(y)
        return torch.stack(rows)  # (S, C)


class MoEGPT(GPT):
    """The ch01 GPT with every block's ``mlp`` replaced by an ``MoE`` (everything else — attention, RoPE, KV cache,
    generate, save — is inherited). ``aux_loss()`` sums the layers' balancing + z losses of the last forward."""

    def __init__(self, cfg: GPTConfig, moe: MoEConfig | None = None):
        super().__init__(cfg)
        self.moe_config = moe or MoEConfig()
        for block in self.blocks:
            block.mlp = MoE(cfg, self.moe_config)
        for name, p in self.named_parameters():  # ch01's init, applied to the new modules (w2 scaled as in GPT-2)
            if ".mlp." in name:
                std = cfg.init_std / math.sqrt(2 * cfg.n_layer) if name.endswith("w2.weight") else cfg.init_std
                nn.init.normal_(p, mean=0.0, std=std)

    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.blocks]

    def aux_loss(self) -> torch.Tensor:
        return sum(m.last_aux for m in self.moe_layers())

    def num_active_params(self) -> int:
        """Parameters one token touches: everything except the (N - k) experts it is not routed to."""
        expert = sum(p.numel() for p in self.moe_layers()[0].experts[0].parameters())
        unused = self.moe_config.n_experts - self.moe_config.top_k
        return self.num_params() - unused * expert * len(self.blocks)


# ------------------------------------------------------------------------------------------------------------ demo
def _utilisation_run(cfg, moe_cfg, tc, train_ids, val_ids):
    from ch01.train import train
    from common.seed import seed_everything

    seed_everything(tc.seed)
    model = MoEGPT(cfg, moe_cfg)
    shares = []  # per step: (n_layer, N) share of assignments

    def record(state):
        counts = [layer.last_counts.float() for layer in state.model.moe_layers()]
        shares.append(torch.stack([c / c.sum() for c in counts]))

    res = train(model, tc, train_ids, val_ids, callbacks=[record])
    return model, torch.stack(shares), res  # shares (steps, n_layer, N)


def _dispatch_timing(n_tokens: int, cfg: GPTConfig, moe_cfg: MoEConfig) -> dict:
    from common.bench import timeit

    layer = MoE(cfg, moe_cfg).eval()
    x = torch.randn(1, n_tokens, cfg.n_embd)
    with torch.no_grad():
        layer.dispatch = "naive"
        ref = layer(x)
        t_naive = timeit(lambda: layer(x), warmup=1, repeats=3)
        layer.dispatch = "sorted"
        out = layer(x)
        t_sorted = timeit(lambda: layer(x), warmup=2, repeats=10)
    return {
        "tokens": n_tokens,
        "naive loop (ms)": t_naive.median * 1e3,
        "sorted (ms)": t_sorted.median * 1e3,
        "speed-up": t_naive.median / t_sorted.median,
        "max |diff|": (out - ref).abs().max().item(),
    }


def main(argv=None) -> dict:
    from ch01.train import prepare_data
    from ch05.lm_train import arch_config
    from common.bench import hardware_info, markdown_table
    from common.cli import base_parser
    from common.device import pick_device
    from common.plot import assets_dir, plt, save_fig

    p = base_parser(__doc__, device=True, seed=True, out=True)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--iters", type=int, default=150)
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 512], help="token counts for the dispatch timing")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    tok, train_ids, val_ids = prepare_data("char")
    cfg = GPTConfig.preset(args.preset, vocab_size=tok.vocab_size)
    moe_cfg = MoEConfig(n_experts=args.experts, top_k=args.top_k)
    timing = [_dispatch_timing(n, cfg, moe_cfg) for n in args.tokens]
    print(f"\n{hardware_info(device)}\n\nDispatch (one MoE layer, C={cfg.n_embd}, N={args.experts}, k={args.top_k}):")
    print(markdown_table(timing))

    tc = arch_config(
        max_iters=args.iters,
        batch_size=16,
        lr=3e-3,
        warmup_iters=args.iters // 10,
        eval_interval=args.iters,
        eval_iters=20,
        seed=args.seed,
        device=args.device,
        progress=False,
    )
    rows, runs = [], {}
    for name, lb in (("with balancing loss", 1e-2), ("without (lb_coef=0)", 0.0)):
        model, shares, res = _utilisation_run(cfg, replace(moe_cfg, lb_coef=lb), tc, train_ids, val_ids)
        runs[name] = shares
        last = shares[-20:].mean(0)  # (n_layer, N) average over the last 20 steps
        cv = (last.std(-1) / last.mean(-1)).mean().item()
        drops = _drop_rate(model, train_ids, device, capacity_factor=1.0)
        rows.append(
            {
                "run": name,
                "max expert share": last.max().item(),
                "min expert share": last.min().item(),
                "coef. of variation": cv,
                "dropped @ cf=1.0": drops,
                "val loss": res["val"][-1][2],  # rows are [iter, train, val]
            }
        )
    print(f"\nExpert utilisation after {args.iters} steps ({args.preset}, uniform share = {1 / args.experts:.3f}):")
    print(markdown_table(rows))

    fig, axes = plt.subplots(1, len(runs), figsize=(11, 3.8), sharey=True)
    for ax, (name, shares) in zip(axes, runs.items()):
        ax.stackplot(
            range(1, len(shares) + 1), shares[:, 0].T.numpy(), labels=[f"expert {i}" for i in range(args.experts)]
        )
        ax.set_title(f"layer 0, {name}")
        ax.set_xlabel("training step")
    axes[0].set_ylabel("share of token assignments")
    axes[-1].legend(fontsize=7, loc="upper right")
    plot_dir = Path(args.out) if args.out else assets_dir(__file__)  # --out: keep the README's plot untouched
    plot = save_fig(fig, plot_dir / "moe_utilisation.png")
    print(f"\nplot: {plot}")
    return {"timing": timing, "utilisation": rows, "plot": str(plot)}


@torch.no_grad()
def _drop_rate(model: MoEGPT, data: torch.Tensor, device, capacity_factor: float) -> float:
    from common.data import get_batch

    x, _ = get_batch(data, 16, model.config.block_size, device, generator=torch.Generator().manual_seed(0))
    old = model.moe_config.capacity_factor
    model.moe_config.capacity_factor = capacity_factor  # the layers share this config object
    model(x)
    model.moe_config.capacity_factor = old
    return sum(m.last_dropped for m in model.moe_layers()) / len(model.blocks)


if __name__ == "__main__":
    main()
