"""Mamba: a selective state-space language model, trained on tiny-shakespeare with the chapter's shared loop.

A Mamba block: in-projection to (x, z); causal depthwise conv1d over time on x; SiLU; input-dependent Δ, B, C from x;
the selective scan h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t, y_t = C_t h_t + D x_t (scan.py); gate y · SiLU(z);
out-projection. Training runs the scan over the whole sequence (parallel); generation carries a fixed-size state
(conv window + h) and costs O(1) per token, whatever the context length — the selling point against a KV cache.

    python 05_emerging_architectures/mamba.py                    # train a small Mamba LM (~1-2 min CPU), sample
    python 05_emerging_architectures/mamba.py --max-iters 2000

References: Gu & Dao 2023 (Mamba); Gu et al. 2021 (S4); alxndrTL/mamba.py and johnma2006/mamba-minimal (pure PyTorch).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ch01.generate import sample_next
from ch01.model import RMSNorm
from ch05.scan import selective_scan


@dataclass
class MambaConfig:
    vocab_size: int = 65
    block_size: int = 64  # training window (the model itself has no length limit)
    n_layer: int = 4
    d_model: int = 128
    d_state: int = 16  # N
    d_conv: int = 4
    expand: int = 2  # E = expand · d_model
    dt_rank: int | None = None  # None: ceil(d_model / 16)
    dt_min: float = 1e-3
    dt_max: float = 0.1
    norm_eps: float = 1e-5
    init_std: float = 0.02
    scan: str = "parallel"  # "parallel" (eager log-space) | "compiled" (torch.compile, fastest on CPU) | "sequential"

    def __post_init__(self):
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model


class MambaBlock(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        E, N, R = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.in_proj = nn.Linear(cfg.d_model, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, cfg.d_conv, groups=E, padding=cfg.d_conv - 1)  # causal after trimming
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)  # -> Δ (low rank), B, C: the "selective" part
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))  # S4D-real
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, cfg.d_model, bias=False)
        with torch.no_grad():  # Δ starts log-uniform in [dt_min, dt_max] (softplus inverse on the bias), as in Mamba
            dt = torch.exp(torch.rand(E) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _ssm_inputs(self, x):
        """x (..., E) after conv+SiLU -> Δ (..., E), B (..., N), C (..., N)."""
        R, N = self.cfg.dt_rank, self.cfg.d_state
        dt_low, B, C = self.x_proj(x).split([R, N, N], dim=-1)
        return F.softplus(self.dt_proj(dt_low)), B, C

    def forward(self, u: torch.Tensor, return_state: bool = False):
        """u (B, L, d_model) -> (B, L, d_model) [, state for ``step`` continuing after position L-1]."""
        L = u.shape[1]
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, L, E) each
        x_conv_in = x.transpose(1, 2)  # (B, E, L)
        x = F.silu(self.conv1d(x_conv_in)[..., :L].transpose(1, 2))  # (B, L, E) causal conv
        delta, B, C = self._ssm_inputs(x)
        A = -torch.exp(self.A_log)  # (E, N) negative: a decaying, stable state
        if return_state:
            dA = torch.exp(delta.unsqueeze(-1) * A)  # (B, L, E, N)
            h = torch.zeros(u.shape[0], *A.shape, device=u.device)
            for t in range(L):  # cheap way to get the final state; used once per prompt
                h = dA[:, t] * h + (delta[:, t] * x[:, t]).unsqueeze(-1) * B[:, t].unsqueeze(1)
        y = selective_scan(x, delta, A, B, C, self.D, scan=self.cfg.scan)  # (B, L, E)
        out = self.out_proj(y * F.silu(z))  # (B, L, d_model)
        if not return_state:
            return out
        K = self.cfg.d_conv - 1
        conv_state = F.pad(x_conv_in, (max(0, K - L), 0))[..., -K:]  # (B, E, d_conv-1) last inputs to the conv
        return out, (conv_state, h)

    def init_state(self, batch_size: int, device=None):
        E, N, K = self.cfg.d_inner, self.cfg.d_state, self.cfg.d_conv - 1
        return torch.zeros(batch_size, E, K, device=device), torch.zeros(batch_size, E, N, device=device)

    def step(self, u_t: torch.Tensor, state):
        """One token: u_t (B, d_model), state (conv (B, E, d_conv-1), h (B, E, N)) -> (B, d_model), new state."""
        conv_state, h = state
        x, z = self.in_proj(u_t).chunk(2, dim=-1)  # (B, E)
        window = torch.cat([conv_state, x.unsqueeze(-1)], dim=-1)  # (B, E, d_conv)
        x = F.silu((window * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)  # (B, E)
        delta, B, C = self._ssm_inputs(x)  # (B, E), (B, N), (B, N)
        A = -torch.exp(self.A_log)  # (E, N)
        h = torch.exp(delta.unsqueeze(-1) * A) * h + (delta * x).unsqueeze(-1) * B.unsqueeze(1)  # (B, E, N)
        y = (h @ C.unsqueeze(-1)).squeeze(-1) + self.D * x  # (B, E)
        return self.out_proj(y * F.silu(z)), (window[..., 1:], h)


class ResidualBlock(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = MambaBlock(cfg)

    def forward(self, x, return_state=False):
        if return_state:
            y, state = self.mixer(self.norm(x), return_state=True)
            return x + y, state
        return x + self.mixer(self.norm(x))

    def step(self, x_t, state):
        y, state = self.mixer.step(self.norm(x_t), state)
        return x_t + y, state


class MambaLM(nn.Module):
    """Embedding -> n_layer × (x + Mamba(RMSNorm(x))) -> RMSNorm -> lm_head. Same interface as ch01's GPT where the
    chapter's loop needs it (``config.block_size``, ``loss``, ``num_params``)."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(ResidualBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for name, p in self.named_parameters():  # ch01's init for matrices; out_proj scaled like GPT-2's residual
            if name.endswith(("proj.weight", "tok_emb.weight", "lm_head.weight")) and "dt_proj" not in name:
                std = cfg.init_std / math.sqrt(2 * cfg.n_layer) if "out_proj" in name else cfg.init_std
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, return_state: bool = False):
        """idx (B, L) -> logits (B, L, V) [, per-layer states to continue with ``step``]."""
        x = self.tok_emb(idx)  # (B, L, C)
        states = []
        for block in self.blocks:
            if return_state:
                x, s = block(x, return_state=True)
                states.append(s)
            else:
                x = block(x)
        logits = self.lm_head(self.norm(x))
        return (logits, states) if return_state else logits

    def step(self, token: torch.Tensor, states):
        """token (B,) -> logits (B, V), new states: O(1) work and memory per generated token."""
        x = self.tok_emb(token)  # (B, C)
        new_states = []
        for block, s in zip(self.blocks, states):
            x, s = block.step(x, s)
            new_states.append(s)
        return self.lm_head(self.norm(x)), new_states

    def init_state(self, batch_size: int, device=None):
        return [b.mixer.init_state(batch_size, device) for b in self.blocks]

    def loss(self, idx, targets):
        return F.cross_entropy(self(idx).flatten(0, 1).float(), targets.flatten())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(
        self,
        idx,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ):
        """(B, T0) prompt -> (B, T0 + max_new_tokens): the prompt through the parallel forward (returning its final
        state), then one recurrent step per token, drawn by ch01's ``sample_next`` (temperature 0 = greedy).

        Not ``ch01.generate``: that loop keeps a KV cache indexed by position and, past ``block_size``, re-reads a
        sliding window; a recurrent model keeps a fixed-size state instead and has no length limit at all."""
        logits, states = self(idx, return_state=True)
        logits = logits[:, -1]  # (B, V)
        out = [idx]
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            out.append(nxt[:, None])
            if i < max_new_tokens - 1:
                logits, states = self.step(nxt, states)
        return torch.cat(out, dim=1)


def main(argv=None) -> dict:
    from ch01.train import prepare_data, train
    from ch05.lm_train import arch_config
    from common.bench import markdown_table
    from common.cli import base_parser
    from common.seed import seed_everything

    p = base_parser(__doc__, device=True, seed=True)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=96)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--max-iters", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)
    seed_everything(args.seed)
    tok, train_ids, val_ids = prepare_data("char")
    cfg = MambaConfig(vocab_size=tok.vocab_size, block_size=args.block_size, n_layer=args.n_layer, d_model=args.d_model)
    model = MambaLM(cfg)
    tc = arch_config(
        max_iters=args.max_iters,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr=args.lr / 10,
        warmup_iters=args.max_iters // 10,
        eval_interval=max(1, args.max_iters // 4),
        eval_iters=20,
        seed=args.seed,
        device=args.device,
    )
    res = train(model, tc, train_ids, val_ids)
    device = next(model.parameters()).device
    prompt = torch.tensor([tok.encode("\n")], device=device)
    sample = tok.decode(
        model.generate(
            prompt, 300, temperature=0.8, top_k=50, generator=torch.Generator(device).manual_seed(args.seed)
        )[0].tolist()
    )
    val_loss = res["val"][-1][2]  # rows are [iter, train, val]
    row = {
        "model": f"Mamba {args.n_layer}×{args.d_model}",
        "params": f"{model.num_params():,}",
        "iters": args.max_iters,
        "val loss": val_loss,
        "train tokens/s": f"{res['tokens_per_s']:,.0f}",
    }
    print(f"\n{markdown_table([row], floatfmt='.4f')}\n\nconfig: {asdict(cfg)}\nsample:\n{sample}")
    return {**res, "sample": sample, "val_loss": val_loss}


if __name__ == "__main__":
    main()
