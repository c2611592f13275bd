"""FlashAttention's algorithm in plain PyTorch: tiles, online softmax, and a backward pass that recomputes.

What it shows, step by step:
1. ``online_softmax`` — softmax of a long row in ONE pass over its chunks, keeping a running max m and a running sum l_i
   that is rescaled by exp(m_old - m_new) whenever the max grows (Milakov & Gimelshein 2018).
2. ``tiled_attention_forward`` — the same trick with V folded in: for each block of queries, stream blocks of keys/values,
   keep (m, l_i, acc) per row, and never hold more than a (block_q, block_k) tile of scores. It returns the output and the
   per-row log-sum-exp (LSE), the only O(N) thing the backward pass needs.
3. ``tiled_attention_backward`` — rebuilds each probability tile as exp(S - LSE) and accumulates dQ, dK, dV tile by tile.
4. ``flash_attention_pytorch`` — both wrapped in a ``torch.autograd.Function``; registered as ch01's ``flash_pytorch``.
The Triton kernels in flash_triton.py are this file, with one tile per GPU program and the loops fused in SRAM.

Run:  python 04_efficient_attention/flash_pytorch.py   (errors vs SDPA and time/memory vs naive attention; seconds)
References: Milakov & Gimelshein 2018 (online softmax); Dao et al. 2022 (FlashAttention); Dao 2023 (FlashAttention-2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ch01.model import naive_attention, register_attention, sdpa_attention
from common.bench import markdown_table, peak_memory, timeit
from common.cli import base_parser
from common.device import parse_dtype, pick_device
from common.seed import seed_everything


def online_softmax(x: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """softmax over the last dim, reading x in chunks once for the statistics (the max and sum are built online)."""
    m = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)  # running max
    l_i = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)  # running sum of exp(x - m)
    for start in range(0, x.shape[-1], chunk):
        xc = x[..., start : start + chunk]  # (..., chunk)
        m_new = torch.maximum(m, xc.amax(-1))
        l_i = l_i * torch.exp(m - m_new) + torch.exp(xc - m_new[..., None]).sum(-1)  # old terms rescaled to the new max
        m = m_new
    return torch.exp(x - m[..., None]) / l_i[..., None]


def _check(q, k, v, causal):
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"expected q (B, H, Nq, D) and k, v (B, H, Nk, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError("causal tiled attention needs equal query and key lengths")


def _causal_tile_mask(q0: int, q1: int, k0: int, k1: int, device) -> torch.Tensor | None:
    """Boolean (q1-q0, k1-k0) mask for a tile that straddles the diagonal, None if the tile is fully visible."""
    if k1 - 1 <= q0:
        return None
    rows = torch.arange(q0, q1, device=device)[:, None]
    cols = torch.arange(k0, k1, device=device)[None, :]
    return cols <= rows


def tiled_attention_forward(q, k, v, causal: bool = False, block_q: int = 128, block_k: int = 128, scale=None):
    """Exact attention by tiles. Returns (out (B, H, Nq, D), lse (B, H, Nq) in float32, or float64 for fp64 inputs)."""
    _check(q, k, v, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    N_q, N_k = q.shape[-2], k.shape[-2]
    acc_t = torch.promote_types(q.dtype, torch.float32)  # accumulate in fp32 (fp64 stays fp64), like the GPU kernels
    out = torch.empty_like(q)  # (B, H, Nq, D)
    lse = torch.empty(q.shape[:-1], dtype=acc_t, device=q.device)  # (B, H, Nq)
    for q0 in range(0, N_q, block_q):
        q1 = min(q0 + block_q, N_q)
        qi = q[..., q0:q1, :].to(acc_t) * scale  # (B, H, bq, D); fold the scale into q once
        m = torch.full(qi.shape[:-1], float("-inf"), dtype=acc_t, device=q.device)  # (B, H, bq) running row max
        l_i = torch.zeros_like(m)  # (B, H, bq) running denominator
        acc = torch.zeros_like(qi)  # (B, H, bq, D) running numerator
        k_end = q1 if causal else N_k  # causal: key blocks right of the diagonal are skipped, not masked
        for k0 in range(0, k_end, block_k):
            k1 = min(k0 + block_k, k_end)
            s = qi @ k[..., k0:k1, :].to(acc_t).transpose(-1, -2)  # (B, H, bq, bk) one tile of scores
            if causal and (mask := _causal_tile_mask(q0, q1, k0, k1, q.device)) is not None:
                s = s.masked_fill(~mask, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))  # finite: every row sees key 0
            p = torch.exp(s - m_new[..., None])  # (B, H, bq, bk)
            alpha = torch.exp(m - m_new)  # < 1 when the max grew: shrinks what was summed so far
            l_i = l_i * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ v[..., k0:k1, :].to(acc_t)
            m = m_new
        out[..., q0:q1, :] = (acc / l_i[..., None]).to(q.dtype)
        lse[..., q0:q1] = m + torch.log(l_i)
    return out, lse


def tiled_attention_backward(q, k, v, out, lse, grad_out, causal=False, block_q=128, block_k=128, scale=None):
    """dQ, dK, dV without storing P: each tile's P = exp(S - LSE) is recomputed from the saved log-sum-exp."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    N_q, N_k = q.shape[-2], k.shape[-2]
    acc_t = torch.promote_types(q.dtype, torch.float32)
    dq = torch.zeros(q.shape, dtype=acc_t, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc_t, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc_t, device=q.device)
    delta = (grad_out.to(acc_t) * out.to(acc_t)).sum(-1)  # (B, H, Nq) = rowsum(P * dP), the softmax-backward row term
    for q0 in range(0, N_q, block_q):
        q1 = min(q0 + block_q, N_q)
        qi, doi = q[..., q0:q1, :].to(acc_t), grad_out[..., q0:q1, :].to(acc_t)  # (B, H, bq, D)
        k_end = q1 if causal else N_k
        for k0 in range(0, k_end, block_k):
            k1 = min(k0 + block_k, k_end)
            kj, vj = k[..., k0:k1, :].to(acc_t), v[..., k0:k1, :].to(acc_t)  # (B, H, bk, D)
            s = (qi @ kj.transpose(-1, -2)) * scale  # (B, H, bq, bk)
            if causal and (mask := _causal_tile_mask(q0, q1, k0, k1, q.device)) is not None:
                s = s.masked_fill(~mask, float("-inf"))
            p = torch.exp(s - lse[..., q0:q1, None])  # (B, H, bq, bk) exact probabilities
            dv[..., k0:k1, :] += p.transpose(-1, -2) @ doi  # dV = P^T dO
            dp = doi @ vj.transpose(-1, -2)  # (B, H, bq, bk) dP = dO V^T
            ds = p * (dp - delta[..., q0:q1, None]) * scale  # dS, with the score scale folded in
            dq[..., q0:q1, :] += ds @ kj  # dQ = dS K
            dk[..., k0:k1, :] += ds.transpose(-1, -2) @ qi  # dK = dS^T Q
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, block_q, block_k):
        out, lse = tiled_attention_forward(q, k, v, causal, block_q, block_k)
        ctx.save_for_backward(q, k, v, out, lse)  # O(N) beyond the inputs: no (N, N) tensor is kept
        ctx.cfg = (causal, block_q, block_k)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        causal, block_q, block_k = ctx.cfg
        return (*tiled_attention_backward(q, k, v, out, lse, grad_out, causal, block_q, block_k), None, None, None)


def flash_attention_pytorch(q, k, v, causal: bool = False, block_q: int = 128, block_k: int = 128) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v, tiled; differentiable with a memory-light backward. q (B, H, Nq, D)."""
    return TiledAttention.apply(q, k, v, causal, block_q, block_k)


@register_attention("flash_pytorch")
def flash_pytorch_attention(q, k, v, *, causal: bool, attn_mask=None, dropout_p: float = 0.0):
    """ch01 plug point; an explicit ``attn_mask`` or dropout falls back to SDPA for that call (tiles know only causal)."""
    if attn_mask is not None or dropout_p > 0.0:
        return sdpa_attention(q, k, v, causal=causal, attn_mask=attn_mask, dropout_p=dropout_p)
    return flash_attention_pytorch(q, k, v, causal)


def main(argv=None) -> dict:
    from common.bench import release_free_memory

    p = base_parser(__doc__, device=True, seed=True, dtype=True)
    p.add_argument("--seq-len", type=int, default=1024, help="N for the time/memory comparison")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=128, help="tile size for queries and keys")
    args = p.parse_args(argv)
    device, dtype = pick_device(args.device), parse_dtype(args.dtype)
    seed_everything(args.seed)
    x = torch.randn(3, 50, device=device)
    print(f"online softmax vs torch.softmax: max error {(online_softmax(x) - torch.softmax(x, -1)).abs().max():.2e}")
    rows = []
    for N, causal in [(100, False), (100, True), (257, True)]:  # 100, 257: not multiples of the block
        q, k, v = (torch.randn(2, 3, N, 32, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        out = flash_attention_pytorch(q, k, v, causal, block_q=32, block_k=48)
        g = torch.randn_like(out)
        ours = (out, *torch.autograd.grad(out, (q, k, v), g))
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        refs = (ref, *torch.autograd.grad(ref, (q, k, v), g))
        err = {n: (a.float() - b.float()).abs().max().item() for n, a, b in zip(("out", "dq", "dk", "dv"), ours, refs)}
        rows.append({"N": N, "causal": causal, **err})
    print(markdown_table(rows, floatfmt=".2e"))
    N, D = args.seq_len, args.head_dim
    q, k, v = (torch.randn(1, 4, N, D, device=device, dtype=dtype) for _ in range(3))
    perf = []
    for name, fn in [
        ("naive", lambda: naive_attention(q, k, v, causal=True)),
        ("tiled (this file)", lambda: flash_attention_pytorch(q, k, v, True, args.block, args.block)),
        ("torch SDPA", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
    ]:
        t = timeit(fn, warmup=1, repeats=3, device=device)
        release_free_memory()
        mem = peak_memory(fn, device=device)
        perf.append({"impl": name, "ms": t.median * 1e3, "peak_MiB": mem / 2**20})
    print(
        f"\nforward, causal, B=1 H=4 N={N} D={D} {args.dtype} on {device} (score matrix alone: "
        f"{4 * N * N * q.element_size() / 2**20:.0f} MiB)"
    )
    print(markdown_table(perf, floatfmt=".1f"))
    return {"errors": rows, "perf": perf, "score_matrix_MiB": 4 * N * N * q.element_size() / 2**20}


if __name__ == "__main__":
    main()
