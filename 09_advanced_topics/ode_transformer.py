"""A continuous-depth transformer: one weight-tied ch01 ``Block`` used as the vector field of an ODE in depth.

A pre-norm residual block computes x + f(x) with f(x) = attn(norm(x)) + mlp(norm(x + attn(norm(x)))). Stacking L
copies is Euler's method with step 1 on dx/dt = f_t(x); tying the weights makes f independent of t, and then we may
integrate it with a better solver (RK4, Dormand–Prince) instead. All models here share the embedding / final norm /
head of a ch01 ``GPT``; they differ in how they go from embeddings to the final hidden state:

  1 block        x + f(x)                        (1 block of parameters, NFE 1)
  tied x L       L Euler steps of the same f      (1 block, NFE L)   = ALBERT-style weight sharing
  ODE rk4        RK4 over depth [0, L]            (1 block, NFE 4 x steps)
  untied x L     the usual L distinct blocks      (L blocks; the reference with L times the block parameters)

Trained on tiny-shakespeare (characters) with the same steps and batches; we report val loss (ch01's deterministic
``evaluate_loss``), NFE per forward, parameters and time.

    python 09_advanced_topics/ode_transformer.py                  # ~3 min on 2 idle CPU cores
    python 09_advanced_topics/ode_transformer.py --iters 1000 --depth 6 --rk4-steps 3

References: Chen et al. 2018 (Neural ODEs); Lu et al. 2018 / Haber & Ruthotto 2017 (ResNets as ODE discretisations);
Lan et al. 2020 (ALBERT weight sharing); Dehghani et al. 2019 (Universal Transformers).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ch01.evaluate import evaluate_loss
from ch01.functional import rope_cache
from ch01.model import GPT, GPTConfig, attention_mask
from ch01.train import TrainConfig, prepare_data, train
from ch09.neural_ode import Counter, odeint, odeint_adjoint
from ch09.paths import plot_dir
from common.bench import markdown_table
from common.cli import base_parser
from common.plot import line_plot
from common.seed import seed_everything


class BlockField(nn.Module):
    """f(t, x) = Block(x) - x, computed as the block's two residual branches (exactly, without the subtraction).
    ``rope_cs`` / ``mask``: the RoPE tables and attention mask of the current input, set by ``DepthGPT.forward``."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block, self.rope_cs, self.mask = block, None, None

    def forward(self, t, x):
        b = self.block
        a = b.attn(b.attn_norm(x), self.rope_cs, None, None, self.mask)  # (B, T, C)
        return a + b.mlp(b.mlp_norm(x + a))  # (B, T, C)


class DepthGPT(nn.Module):
    """ch01 GPT embeddings/head around a depth integrator ("euler" = tied stack, "rk4"/"dopri5" = ODE solvers)."""

    def __init__(
        self,
        cfg: GPTConfig,
        method: str = "rk4",
        depth: float = 4.0,
        steps: int = 1,
        adjoint: bool = False,
        rtol: float = 1e-3,
        atol: float = 1e-4,
    ):
        super().__init__()
        self.config = cfg
        self.gpt = GPT(GPTConfig.from_dict({**cfg.to_dict(), "n_layer": 1}))
        self.field = Counter(BlockField(self.gpt.blocks[0]))
        self.method, self.depth, self.steps, self.adjoint, self.rtol, self.atol = (
            method,
            depth,
            steps,
            adjoint,
            rtol,
            atol,
        )

    def forward(self, idx):
        cfg = self.config
        x = self.gpt.tok_emb(idx)  # (B, T, C)
        pos = torch.arange(idx.shape[1], device=idx.device)  # (T,)
        field = self.field.func  # ch01's Attention applies RoPE from these tables, as in GPT.forward
        field.rope_cs = rope_cache(cfg.head_dim, pos, cfg.rope_theta)
        field.mask = attention_mask(pos, idx.shape[1], None, None)  # plain causal
        if self.method == "euler":  # weight-tied discrete stack: x <- x + f(x), ``steps`` times
            for _ in range(self.steps):
                x = x + self.field(0.0, x)
        else:
            t = torch.tensor([0.0, self.depth])
            opts = dict(method=self.method, steps=self.steps, rtol=self.rtol, atol=self.atol)
            x = (odeint_adjoint if self.adjoint else odeint)(self.field, x, t, **opts)[-1]  # (B, T, C)
        return self.gpt.lm_head(self.gpt.norm(x))  # (B, T, V)

    def loss(self, idx, targets):
        return F.cross_entropy(self(idx).flatten(0, 1), targets.flatten())


class PlainGPT(GPT):
    """The untied reference, with the same NFE counter interface (NFE = n_layer)."""

    @property
    def nfe_per_forward(self):
        return self.config.n_layer


def train_one(model, train_ids, val_ids, iters: int, batch_size: int, lr: float, seed: int) -> dict:
    """ch01's training loop (AdamW, warm-up + cosine to lr/10, clip 1.0; batches drawn from a generator seeded with
    ``seed``: the same batches for every model), then val loss and the NFE of one forward."""
    tc = TrainConfig(
        max_iters=iters,
        batch_size=batch_size,
        lr=lr,
        min_lr=lr / 10,
        warmup_iters=max(1, iters // 10),
        weight_decay=0.1,
        grad_clip=1.0,
        eval_iters=0,  # no evaluation during training
        seed=seed,
        batch_seed=seed,
        device="cpu",
        out_dir=None,
        progress=False,
    )
    res = train(model, tc, train_ids, val_ids)
    if isinstance(model, DepthGPT):
        model.field.nfe = 0
    vl = evaluate_loss(model, val_ids, batch_size=32, max_batches=10)
    nfe = model.field.nfe / 10 if isinstance(model, DepthGPT) else model.nfe_per_forward
    return {
        "val_loss": vl,
        "nfe": nfe,
        "train_s": res["train_time_s"],
        "curve": res["train_losses"],
        "params": sum(p.numel() for p in model.parameters()),
    }


def main(argv=None) -> dict:
    p = base_parser(__doc__, seed=True, out=True)
    p.add_argument("--iters", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--depth", type=int, default=4, help="L: tied/untied layers and the ODE's depth interval [0, L]")
    p.add_argument("--rk4-steps", type=int, default=2)
    p.add_argument("--dopri5", action="store_true", help="also train an adaptive Dormand–Prince model (slow)")
    p.add_argument("--adjoint", action="store_true", help="ODE gradients by the adjoint method")
    args = p.parse_args(argv)
    if min(args.iters, args.depth, args.rk4_steps, args.batch_size) < 1:
        p.error("--iters, --depth, --rk4-steps and --batch-size must be at least 1")
    tok, train_ids, val_ids = prepare_data("char")
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=args.block_size, n_layer=1, n_head=4, n_embd=args.n_embd)
    L = args.depth
    variants = {
        "1 block": lambda: PlainGPT(cfg),
        f"tied x{L} (Euler)": lambda: DepthGPT(cfg, "euler", steps=L),
        f"ODE rk4 [0,{L}], {args.rk4_steps} steps": lambda: DepthGPT(cfg, "rk4", L, args.rk4_steps, args.adjoint),
        f"untied x{L} (reference)": lambda: PlainGPT(GPTConfig.from_dict({**cfg.to_dict(), "n_layer": L})),
    }
    if args.dopri5:
        variants[f"ODE dopri5 [0,{L}]"] = lambda: DepthGPT(cfg, "dopri5", L, adjoint=args.adjoint)
    results = {}
    for name, build in variants.items():
        seed_everything(args.seed)
        results[name] = train_one(build(), train_ids, val_ids, args.iters, args.batch_size, args.lr, args.seed)
        r = results[name]
        print(f"{name}: val {r['val_loss']:.4f}, NFE {r['nfe']:.1f}, {r['train_s']:.0f} s")
    print(f"\ntiny-shakespeare chars, C={args.n_embd}, T={args.block_size}, {args.iters} steps x {args.batch_size}")
    rows = [
        {
            "model": name,
            "params": f"{r['params']:,}",
            "val loss": f"{r['val_loss']:.4f}",
            "NFE / forward": f"{r['nfe']:.1f}",
            "train time (s)": f"{r['train_s']:.0f}",
        }
        for name, r in results.items()
    ]
    print(markdown_table(rows))
    smooth = {
        n: (range(len(r["curve"]))[9:], [sum(r["curve"][i - 9 : i + 1]) / 10 for i in range(9, len(r["curve"]))])
        for n, r in results.items()
    }
    plot = line_plot(
        smooth,
        plot_dir(args.out, __file__) / "ode_transformer.png",
        title="train loss (10-step mean)",
        xlabel="step",
        ylabel="cross-entropy",
        marker="",
    )
    print(f"plot: {plot}")
    return results


if __name__ == "__main__":
    main()
