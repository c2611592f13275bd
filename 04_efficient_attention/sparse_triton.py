"""Block-sparse attention as a Triton kernel: the FlashAttention forward loop, visiting only the layout's key blocks.

What it shows: with a tile-based kernel, sparsity is nearly free to exploit — the loop over key blocks reads one byte of
the block layout and skips the block (no K/V loads, no math). Patterns come from sparse_attention.py (sliding window,
BigBird); the kernel is exact: equal to dense attention with the pattern's token mask. Forward only (inference).

Run:  python 04_efficient_attention/sparse_triton.py     (no GPU: Triton's interpreter on small shapes)
References: Child et al. 2019; Zaheer et al. 2020 (BigBird); Beltagy et al. 2020 (Longformer); Dao 2023.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ch04.sparse_attention import SparsePattern, bigbird_pattern, dense_masked_attention, sliding_window_pattern
from ch04.triton_kernels import (  # importing it sets TRITON_INTERPRET=1 first when there is no GPU
    INTERPRET,
    LOG2E,
    load_rows,
    online_softmax_update,
    store_rows,
    tile_dot,
)
from common.bench import markdown_table
from common.cli import base_parser
from common.device import pick_device
from common.seed import seed_everything


@triton.jit
def block_sparse_fwd_kernel(
    Q,
    K,
    V,
    Out,
    LAYOUT,
    qk_scale,
    N,
    HEAD_DIM,
    N_BLOCKS,
    WINDOW,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    # FlashAttention's forward loop (triton_kernels.py), but it visits only key blocks whose LAYOUT[query block, key
    # block] is nonzero. A skipped block costs one scalar load: no K/V traffic and no math. Inside visited blocks the
    # causal and sliding-window rules mask single tokens, so a row can see no key in a block (online_softmax_update
    # keeps such a row empty).
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    base = bh * N * HEAD_DIM
    q = load_rows(Q + base, offs_m, N, offs_d, HEAD_DIM)  # (M, D)
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    for kb in range(0, N_BLOCKS):
        if tl.load(LAYOUT + pid_m * N_BLOCKS + kb) != 0:
            offs_k = kb * BLOCK + tl.arange(0, BLOCK)
            k = load_rows(K + base, offs_k, N, offs_d, HEAD_DIM)  # (N, D)
            v = load_rows(V + base, offs_k, N, offs_d, HEAD_DIM)  # (N, D)
            s = tile_dot(q, tl.trans(k), FP32_DOT) * qk_scale  # (M, N)
            keep = (offs_k[None, :] < N) & (offs_m[:, None] >= 0)
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_k[None, :])
            if HAS_WINDOW:
                dist = offs_m[:, None] - offs_k[None, :]
                keep = keep & (dist < WINDOW) & (dist > -WINDOW)
            s = tl.where(keep, s, float("-inf"))
            acc, l_i, m_i = online_softmax_update(acc, l_i, m_i, s, v, FP32_DOT)  # guarded: a row may see no key
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    store_rows(Out + base, offs_m, N, offs_d, HEAD_DIM, acc)


def block_sparse_attention_triton(q, k, v, pattern: SparsePattern) -> torch.Tensor:
    """Exact attention under ``pattern`` for q, k, v (B, H, N, D); pattern.block must be a power of two >= 16."""
    B, H, N, D = q.shape
    if k.shape != q.shape or v.shape != q.shape or N != pattern.n:
        raise ValueError(f"need q, k, v of one shape (B, H, {pattern.n}, D); got {tuple(q.shape)}, {tuple(k.shape)}")
    if pattern.block < 16 or pattern.block & (pattern.block - 1):
        raise ValueError(f"the Triton kernel needs a power-of-two block >= 16; got {pattern.block}")
    if not 16 <= D <= 128:
        raise ValueError(f"head dim must be in [16, 128]; got {D}")
    if q.is_cuda == INTERPRET:
        raise ValueError(
            f"Triton is {'interpreting (CPU tensors)' if INTERPRET else 'compiled (CUDA tensors)'}; "
            f"got tensors on {q.device}"
        )
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    layout = pattern.layout.to(device=q.device, dtype=torch.int32).contiguous()  # (n_blocks, n_blocks)
    out = torch.empty_like(q)
    n_blocks = layout.shape[0]
    block_sparse_fwd_kernel[(n_blocks, B * H)](
        q,
        k,
        v,
        out,
        layout,
        D**-0.5 * LOG2E,
        N,
        D,
        n_blocks,
        pattern.window or 0,
        BLOCK=pattern.block,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        CAUSAL=pattern.causal,
        HAS_WINDOW=pattern.window is not None,
        FP32_DOT=INTERPRET,
    )
    return out


def main(argv=None) -> dict:
    p = base_parser(__doc__, device=True, seed=True)
    p.add_argument("--seq-len", type=int, default=100)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    if INTERPRET:
        print("No CUDA GPU found: running the Triton kernel in Triton's CPU interpreter (TRITON_INTERPRET=1).")
    seed_everything(args.seed)
    n = args.seq_len
    patterns = {
        "window 24, causal": sliding_window_pattern(n, 24, 16),
        "window 24, both sides": sliding_window_pattern(n, 24, 16, causal=False),
        "bigbird l1 g1 r1, causal": bigbird_pattern(n, 16, 1, 1, 1),
    }
    q, k, v = (torch.randn(1, 2, n, 32, device=device) for _ in range(3))
    rows = []
    for name, pat in patterns.items():
        err = (block_sparse_attention_triton(q, k, v, pat) - dense_masked_attention(q, k, v, pat)).abs().max().item()
        rows.append(
            {
                "pattern": name,
                "density": pat.density(),
                "blocks computed": int(pat.layout.sum()),
                "of": pat.layout.numel(),
                "max_err": err,
            }
        )
    print(markdown_table(rows, floatfmt=".3g"))
    return {"rows": rows}


if __name__ == "__main__":
    main()
