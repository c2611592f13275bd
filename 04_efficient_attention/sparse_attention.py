"""Sparse attention: sliding windows and BigBird-style block-sparse layouts, computed by skipping empty blocks.

What it shows: if each query only looks at some keys, whole (block x block) tiles of the score matrix are empty, and an
implementation that never computes them does work proportional to the density instead of N^2. Two patterns:
- sliding window (Longformer's local attention; Mistral): query i sees keys (i - window, i];
- block-sparse (BigBird / Sparse Transformer): each query block sees its neighbouring blocks (local), a few global blocks
  (which also see everything) and a few random blocks.
``block_sparse_attention`` computes only the blocks a pattern's layout marks, and is exactly equal to dense attention with
the pattern's token mask (``dense_masked_attention``). ``main`` measures FLOPs/time vs density and trains the tiny model
with several window sizes to show what the restriction costs in validation loss.

Run:  python 04_efficient_attention/sparse_attention.py                  (about a minute on a CPU)
      python 04_efficient_attention/sparse_attention.py --train-iters 0  (skip the training run)
References: Child et al. 2019 (Sparse Transformers); Beltagy et al. 2020 (Longformer); Zaheer et al. 2020 (BigBird).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ch01.model import register_attention
from common.bench import hardware_info, markdown_table, timeit
from common.cli import base_parser
from common.device import pick_device
from common.plot import assets_dir, line_plot
from common.seed import seed_everything


@dataclass
class SparsePattern:
    """Which keys each query may see: a block layout (what is computed) refined by a token-level rule inside blocks."""

    layout: torch.Tensor  # (n_blocks, n_blocks) bool: key block kb is computed for query block qb
    block: int
    n: int  # sequence length
    causal: bool = True
    window: int | None = None  # token-level sliding window, None = whole blocks

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(len(q_pos), len(k_pos)) bool for absolute positions; the single source of truth for both implementations."""
        ok = self.layout[q_pos // self.block][:, k_pos // self.block]
        if self.causal:
            ok = ok & (k_pos[None, :] <= q_pos[:, None])
        if self.window is not None:  # causal: the window looks back only; otherwise both ways
            ok = ok & ((q_pos[:, None] - k_pos[None, :]).abs() < self.window)
        return ok

    def token_mask(self) -> torch.Tensor:
        pos = torch.arange(self.n, device=self.layout.device)
        return self.allowed(pos, pos)  # (N, N)

    def density(self) -> float:
        """Fraction of the N x N score matrix inside computed blocks (what block skipping pays for)."""
        sizes = torch.tensor([min(self.block, self.n - s) for s in range(0, self.n, self.block)], dtype=torch.float64)
        return float((self.layout.double() * sizes[:, None] * sizes[None, :]).sum()) / self.n**2


def _n_blocks(n: int, block: int) -> int:
    if n < 1 or block < 1:
        raise ValueError(f"sequence length and block must be positive; got n={n}, block={block}")
    return math.ceil(n / block)


def sliding_window_pattern(n: int, window: int, block: int = 64, causal: bool = True) -> SparsePattern:
    """Query i sees keys i-window+1 .. i (and, if not causal, up to i+window-1). Layout: blocks touching that band."""
    if window < 1:
        raise ValueError(f"window must be >= 1; got {window}")
    nb = _n_blocks(n, block)
    qb, kb = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    q_lo, q_hi = qb * block, torch.clamp((qb + 1) * block, max=n) - 1  # first/last query of each block
    k_lo, k_hi = kb * block, torch.clamp((kb + 1) * block, max=n) - 1
    right = q_hi if causal else q_hi + window - 1
    layout = (k_hi >= q_lo - window + 1) & (k_lo <= right)  # block intersects the band of some query in the block
    return SparsePattern(layout, block, n, causal, window)


def bigbird_pattern(
    n: int, block: int = 64, local: int = 1, n_global: int = 1, n_random: int = 1, causal: bool = True, seed: int = 0
) -> SparsePattern:
    """BigBird's block layout: `local` blocks either side, `n_global` leading global blocks, `n_random` random blocks."""
    nb = _n_blocks(n, block)
    qb, kb = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    layout = (qb - kb).abs() <= local
    layout[:, :n_global] = True  # everyone reads the global blocks ...
    layout[:n_global, :] = True  # ... and the global blocks read everyone
    gen = torch.Generator().manual_seed(seed)
    for row in range(nb):
        allowed = (~layout[row]) & ((kb[0] <= row) if causal else torch.ones(nb, dtype=torch.bool))
        candidates = allowed.nonzero().flatten()
        pick = candidates[torch.randperm(len(candidates), generator=gen)[:n_random]]
        layout[row, pick] = True
    if causal:
        layout &= kb <= qb
    return SparsePattern(layout, block, n, causal)


def dense_masked_attention(q, k, v, pattern: SparsePattern) -> torch.Tensor:
    """Reference: full N x N attention with the pattern's token mask (all the work, most of it thrown away)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=pattern.token_mask().to(q.device))


def block_sparse_attention(q, k, v, pattern: SparsePattern) -> torch.Tensor:
    """Attention that computes only the layout's blocks. q, k, v (B, H, N, D); differentiable through autograd."""
    N = q.shape[-2]
    if N != pattern.n or k.shape[-2] != N:
        raise ValueError(f"pattern was built for N={pattern.n}, got q/k lengths {q.shape[-2]}/{k.shape[-2]}")
    out = torch.empty_like(q)  # (B, H, N, D)
    pos = torch.arange(N, device=q.device)
    layout = pattern.layout.to(q.device)
    for qb in range(layout.shape[0]):
        q0, q1 = qb * pattern.block, min((qb + 1) * pattern.block, N)
        key_blocks = layout[qb].nonzero().flatten()  # the skipped blocks are never touched
        k_pos = (key_blocks[:, None] * pattern.block + torch.arange(pattern.block, device=q.device)).flatten()
        k_pos = k_pos[k_pos < N]  # ragged last block
        s = q[..., q0:q1, :] @ k[..., k_pos, :].transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, bq, n_sel)
        s = s.masked_fill(~pattern.allowed(pos[q0:q1], k_pos), float("-inf"))
        out[..., q0:q1, :] = torch.softmax(s, dim=-1) @ v[..., k_pos, :]  # every query sees itself: no empty rows
    return out


def register_lazy(name: str) -> None:
    """ch01's lazy registry asks for ``window<N>`` by name (a config saved with it, loaded in a fresh process)."""
    register_window_attention(int(name.removeprefix("window")))


def register_window_attention(window: int, block: int = 16) -> str:
    """Register a causal sliding-window attention for the ch01 model as ``window{window}``; returns the name."""
    name = f"window{window}"

    @register_attention(name)
    def window_attention(q, k, v, *, causal: bool, attn_mask=None, dropout_p: float = 0.0):
        Tq, Tk = q.shape[-2], k.shape[-2]
        if attn_mask is None and causal and Tq == Tk:  # training / prompt: block skipping
            return block_sparse_attention(q, k, v, sliding_window_pattern(Tq, window, block))
        q_pos = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]  # cached decoding: queries are the last Tq
        band = (torch.arange(Tk, device=q.device)[None, :] <= q_pos) & (
            q_pos - torch.arange(Tk, device=q.device) < window
        )
        mask = band if attn_mask is None else attn_mask & band
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    return name


def density_sweep(n: int, block: int, windows, device, d: int = 64, heads: int = 4) -> list[dict]:
    q, k, v = (torch.randn(1, heads, n, d, device=device) for _ in range(3))
    patterns = [(f"window {w}", sliding_window_pattern(n, w, block)) for w in windows]
    patterns += [(f"bigbird l1 g1 r{r}", bigbird_pattern(n, block, 1, 1, r)) for r in (1, 3)]
    dense_ms = timeit(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), warmup=1, repeats=3).median
    rows = []
    for name, pat in patterns:
        err = (block_sparse_attention(q, k, v, pat) - dense_masked_attention(q, k, v, pat)).abs().max().item()
        ms = timeit(lambda pat=pat: block_sparse_attention(q, k, v, pat), warmup=1, repeats=3).median
        masked_ms = timeit(lambda pat=pat: dense_masked_attention(q, k, v, pat), warmup=1, repeats=3).median
        rows.append(
            {
                "pattern": name,
                "density": pat.density(),
                "GFLOP": 4 * heads * n * n * d * pat.density() / 1e9,
                "sparse_ms": ms * 1e3,
                "dense_masked_ms": masked_ms * 1e3,
                "dense_causal_ms": dense_ms * 1e3,
                "max_err": err,
            }
        )
    return rows


def window_training(windows, iters: int, preset: str = "tiny", device: str = "cpu", seed: int = 1337) -> list[dict]:
    """Train the ch01 model from scratch once per window size (same seed/data); report the deterministic val loss."""
    from ch01.evaluate import evaluate_loss
    from ch01.model import GPTConfig
    from ch01.train import TrainConfig, prepare_data, train
    from common.data import cache_dir

    tok, train_ids, val_ids = prepare_data("char")
    rows = []
    for w in windows:
        name = register_window_attention(w)
        cfg = GPTConfig.preset(preset, vocab_size=tok.vocab_size, attn_impl=name)
        tc = TrainConfig(
            max_iters=iters,
            batch_size=16,
            warmup_iters=max(1, iters // 10),
            eval_interval=10**9,
            eval_iters=5,
            ckpt_interval=10**9,
            seed=seed,
            device=device,
            progress=False,
            out_dir=str(cache_dir("runs", "ch04", f"window{w}")),
        )
        res = train(cfg, tc, train_ids, val_ids)
        rows.append(
            {
                "window": w,
                "val_loss": evaluate_loss(res["model"], val_ids, max_batches=10),
                "tokens/s": round(res["tokens_per_s"]),
            }
        )
        print(f"window {w}: val loss {rows[-1]['val_loss']:.4f}", flush=True)
    return rows


def main(argv=None) -> dict:
    p = base_parser(__doc__, device=True, seed=True)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--train-iters", type=int, default=150, help="iterations per window size (0 = skip training)")
    p.add_argument("--preset", default="tiny")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    seed_everything(args.seed)
    windows = [w for w in (64, 128, 256, 512) if w < args.seq_len]
    rows = density_sweep(args.seq_len, args.block, windows, device)
    print(f"{hardware_info(device)}\nforward, B=1 H=4 N={args.seq_len} D=64 block {args.block}, causal")
    print(markdown_table(rows, floatfmt=".3g"))
    result = {"sweep": rows}
    if args.train_iters > 0:
        train_rows = window_training([4, 8, 16, 64], args.train_iters, args.preset, str(device), args.seed)
        print(
            f"\n{args.preset} model, {args.train_iters} iterations, block_size 64 (window 64 = full causal attention)"
        )
        print(markdown_table(train_rows, floatfmt=".4f"))
        result["training"] = train_rows
        line_plot(
            {"val loss": ([r["window"] for r in train_rows], [r["val_loss"] for r in train_rows])},
            assets_dir(__file__) / "sparse_window_val_loss.png",
            title="Val loss vs attention window",
            xlabel="window (tokens)",
            ylabel="val loss",
            logx=True,
        )
    # one line per pattern family, sorted by density: mixing windows and BigBird in one line zig-zags
    series = {}
    for family in ("window", "bigbird"):
        fam = sorted((r for r in rows if r["pattern"].startswith(family)), key=lambda r: r["density"])
        if fam:
            series[f"{family}: block-sparse"] = ([r["density"] for r in fam], [r["sparse_ms"] for r in fam])
            series[f"{family}: dense + mask"] = ([r["density"] for r in fam], [r["dense_masked_ms"] for r in fam])
    dens = [r["density"] for r in rows]
    series["torch SDPA causal (fused)"] = ([min(dens), max(dens)], [rows[0]["dense_causal_ms"]] * 2)
    line_plot(
        series,
        assets_dir(__file__) / "sparse_time_vs_density.png",
        title=f"Sparse attention forward, N={args.seq_len} (CPU)",
        xlabel="density (fraction of the N × N matrix computed)",
        ylabel="time (ms, median)",
        legend_outside=True,
    )
    return result


if __name__ == "__main__":
    main()
