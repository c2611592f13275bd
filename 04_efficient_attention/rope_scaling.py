"""RoPE scaling: run a model trained at context L on sequences s·L long — linear position interpolation, NTK-aware
scaling and YaRN (with its attention temperature).

What it shows: RoPE rotates dimension pair i of q and k by angle p·θ_i with θ_i = base^(-2i/D). Past the trained
context the low-frequency pairs reach angles never seen in training and the loss blows up. Three fixes change θ_i:
- linear (position interpolation, Chen et al. 2023): θ_i / s — every position is squeezed into the trained range, but
  neighbouring tokens become s times harder to tell apart (high frequencies lose resolution);
- NTK-aware (bloc97 2023): base · s^(D/(D-2)) — the highest frequency is untouched, the lowest is divided by s;
- YaRN (Peng et al. 2023): per frequency, keep θ_i where a wavelength fits ≥ beta_fast times into L (extrapolate),
  divide by s where it fits < beta_slow times (interpolate), ramp linearly between; and multiply cos/sin by
  0.1·ln(s) + 1, which sharpens the softmax that longer contexts flatten (the "attention temperature").
The ch01 model uses these when ``GPTConfig.rope_scaling`` is set (ch01 imports this module on first use); the tables
are checked against transformers' ``ROPE_INIT_FUNCTIONS`` in tests/test_04_attention_variants.py.

The experiment trains once at block 64, then evaluates the same weights on 128/256/512-token windows with each method
(zero-shot: no fine-tuning at the longer length) and plots loss by position.

Run:  python 04_efficient_attention/rope_scaling.py             (about a minute on a CPU)
      python 04_efficient_attention/rope_scaling.py --train-iters 1000 --lengths 128 256 512 1024
References: Su et al. 2021 (RoPE); Chen et al. 2023 (position interpolation); bloc97 2023 (NTK-aware scaled RoPE);
Peng et al. 2023 (YaRN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ch01.model import GPT, GPTConfig
from common.bench import hardware_info, markdown_table
from common.cli import base_parser
from common.plot import assets_dir, line_plot
from common.seed import seed_everything

METHODS = ("none", "linear", "ntk", "yarn")


def _base_inv_freq(dim: int, base: float, device=None) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))  # (dim/2,)


def yarn_inv_freq(
    dim: int, base: float, factor: float, original: int, beta_fast: float = 32.0, beta_slow: float = 1.0, device=None
) -> torch.Tensor:
    """YaRN's "NTK-by-parts": interpolate the frequencies whose wavelength is long against ``original``, keep the rest."""

    def dim_of(n_rotations: float) -> float:  # the pair index i whose frequency turns n_rotations times in `original`
        return dim * math.log(original / (n_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), dim - 1)
    high = high + 0.001 if low == high else high  # a one-step ramp instead of a division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)  # (dim/2,)
    inv_freq = _base_inv_freq(dim, base, device)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)  # ramp 0: extrapolate (keep), 1: interpolate (÷ s)


def scaled_inv_freq(
    dim: int, base: float, kind: str, factor: float, original: int, device=None
) -> tuple[torch.Tensor, float]:
    """(inv_freq (dim/2,), attention factor that multiplies cos and sin) for a scaling ``kind`` of METHODS."""
    if kind == "none" or factor == 1.0:
        return _base_inv_freq(dim, base, device), 1.0
    if kind == "linear":
        return _base_inv_freq(dim, base, device) / factor, 1.0
    if kind == "ntk":
        return _base_inv_freq(dim, base * factor ** (dim / (dim - 2)), device), 1.0
    if kind == "yarn":
        return yarn_inv_freq(dim, base, factor, original, device=device), 0.1 * math.log(factor) + 1.0
    raise ValueError(f"unknown RoPE scaling {kind!r}; choose one of {', '.join(METHODS)}")


def extended(model: GPT, length: int, kind: str) -> GPT:
    """The same weights, run at ``length`` tokens with RoPE scaling ``kind`` (factor = length / trained length)."""
    cfg = model.config
    trained = cfg.original_block if cfg.rope_scaling != "none" else cfg.block_size
    new_cfg = GPTConfig.from_dict(
        {
            **cfg.to_dict(),
            "block_size": length,
            "rope_scaling": kind,
            "rope_factor": max(1.0, length / trained),
            "rope_original_block": trained,
        }
    )
    out = GPT(new_cfg).to(next(model.parameters()).device)
    out.load_state_dict(model.state_dict())
    return out.eval()


@torch.no_grad()
def loss_by_position(model: GPT, data: torch.Tensor, length: int, n_windows: int = 16, seed: int = 0) -> torch.Tensor:
    """Mean next-token loss at each position 0 … length-1 over ``n_windows`` random windows of ``data``. (length,)"""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - length - 1, (n_windows,), generator=gen)
    window = torch.stack([data[s : s + length + 1] for s in starts.tolist()])  # (N, length + 1)
    device = next(model.parameters()).device
    x, y = window[:, :-1].to(device), window[:, 1:].to(device)
    logits = model(x)  # (N, length, V)
    return F.cross_entropy(logits.transpose(1, 2).float(), y, reduction="none").mean(0).cpu()  # (length,)


def _train(preset: str, block: int, iters: int, seed: int, device: str):
    from ch01.train import TrainConfig, prepare_data, train

    tok, train_ids, val_ids = prepare_data("char")
    cfg = GPTConfig.preset(preset, vocab_size=tok.vocab_size, block_size=block)
    tc = TrainConfig(
        max_iters=iters,
        batch_size=12,
        warmup_iters=max(1, iters // 10),
        eval_interval=10**9,
        eval_iters=0,
        seed=seed,
        device=device,
        progress=False,
        out_dir=None,
    )
    return train(cfg, tc, train_ids, val_ids)["model"].eval(), val_ids


def _bucket_means(curve: torch.Tensor, edges: list[int]) -> list[float]:
    return [float(curve[a:b].mean()) for a, b in zip(edges[:-1], edges[1:]) if a < len(curve)]


def main(argv=None) -> dict:
    p = base_parser(__doc__, device=True, seed=True)
    p.add_argument("--preset", default="tiny", help="ch01 GPTConfig preset to train")
    p.add_argument("--block", type=int, default=64, help="training context")
    p.add_argument("--train-iters", type=int, default=300)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512], help="evaluation contexts")
    p.add_argument("--windows", type=int, default=16, help="validation windows per length")
    p.add_argument("--no-plot", action="store_true", help="skip writing the PNG")
    args = p.parse_args(argv)
    from common.device import pick_device

    device = str(pick_device(args.device))
    seed_everything(args.seed)
    model, val_ids = _train(args.preset, args.block, args.train_iters, args.seed, device)
    rows, curves = [], {}
    edges = [0, args.block, 2 * args.block] + [L for L in sorted(args.lengths) if L > 2 * args.block]
    for L in args.lengths:
        for kind in METHODS:
            curve = loss_by_position(extended(model, L, kind), val_ids, L, args.windows, args.seed)
            curves[(L, kind)] = curve
            buckets = _bucket_means(curve, edges)
            row = {"length": L, "scaling": kind, "factor": L / args.block, "mean loss": float(curve.mean())}
            row |= {f"pos {a}-{b - 1}": v for a, b, v in zip(edges[:-1], edges[1:], buckets)}
            rows.append(row)
    print(f"{hardware_info(device)}\n{args.preset} trained {args.train_iters} iters at block {args.block}; zero-shot")
    print(markdown_table(rows, columns=list(dict.fromkeys(k for r in rows for k in r)), floatfmt=".3f"))
    result = {"rows": rows, "curves": {f"{L}/{k}": c.tolist() for (L, k), c in curves.items()}}
    if args.no_plot:
        return result
    L = max(args.lengths)
    smooth = 8  # average 8 neighbouring positions so the lines are readable
    series = {
        kind: (range(0, L, smooth), curves[(L, kind)][: L // smooth * smooth].view(-1, smooth).mean(1).tolist())
        for kind in METHODS
    }
    line_plot(
        series,
        assets_dir(__file__) / "rope_scaling_loss_by_position.png",
        title=f"Trained at {args.block} tokens, evaluated at {L} (val loss by position)",
        xlabel="position",
        ylabel="loss (nats)",
        legend_outside=True,  # inside, the legend sits on the curves at positions 0-100
    )
    return result


if __name__ == "__main__":
    main()
