"""FlashAttention-2 in Triton: forward and backward kernels with explicit pointer arithmetic.

What it shows: exact attention computed tile by tile in on-chip memory. The forward kernel streams key/value blocks past a
block of queries with an online softmax and saves only the log-sum-exp (LSE) of each row; the backward pass recomputes
the probabilities from that LSE instead of storing the (N, N) matrix (one kernel for dK/dV, one for dQ).

Run:  python 04_efficient_attention/flash_triton.py            (no GPU: checks vs SDPA in Triton's CPU interpreter)
      On a CUDA GPU the same command also benchmarks TFLOP/s vs SDPA and naive for N=512..16k (--no-bench to skip)
      and plots them to assets/flash_triton_gpu_tflops.png.

The kernels are in triton_kernels.py. Without a CUDA GPU, importing it sets ``TRITON_INTERPRET=1`` before any kernel is
defined, so the same kernels run on CPU tensors through Triton's interpreter (slow; small shapes only). On a CUDA machine
it is left alone and the kernels are compiled. Set ``TRITON_INTERPRET`` yourself before importing to force either choice.
Importing this module registers ``flash_triton`` as a ch01 attention implementation.

References: Dao et al. 2022 (FlashAttention); Dao 2023 (FlashAttention-2); Milakov & Gimelshein 2018 (online softmax);
the Triton fused-attention tutorial (06-fused-attention.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from ch01.model import register_attention, sdpa_attention
from ch04.triton_kernels import (
    INTERPRET,
    LOG2E,
    flash_bwd_dkdv_kernel,
    flash_bwd_dq_kernel,
    flash_bwd_preprocess,
    flash_fwd_kernel,
)
from common.bench import markdown_table
from common.cli import base_parser
from common.device import parse_dtype, pick_device
from common.seed import seed_everything


def _blocks(head_dim: int, dtype: torch.dtype, blocks: tuple[int, int] | None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). The interpreter's cost is per program and per loop step, so there a few larger
    tiles beat many small ones; on a GPU the tiles are sized to fit shared memory (fp32 and D > 64 need more of it)."""
    if blocks is not None:
        if any(b < 16 or b & (b - 1) for b in blocks):
            raise ValueError(f"block sizes must be powers of two >= 16; got {blocks}")
        return blocks[0], blocks[1], 4
    if INTERPRET:
        return 32, 32, 1
    big = head_dim > 64 or dtype == torch.float32
    return (64, 32, 4) if big else (64, 64, 4)


def _check(q, k, v, causal):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"flash_attention expects q, k, v of shape (B, H, N, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not 16 <= q.shape[-1] <= 128:
        raise ValueError(f"head dim must be in [16, 128] (tl.dot needs >= 16); got {q.shape[-1]}")
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError("causal flash_attention needs equal query and key lengths")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one of float32/float16/bfloat16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.is_cuda == INTERPRET:
        where = "CPU tensors (Triton interpreter is on)" if INTERPRET else "CUDA tensors (compiled Triton)"
        raise ValueError(f"flash_attention here needs {where}; got tensors on {q.device}")


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, sm_scale: float, blocks: tuple[int, int] | None):
        _check(q, k, v, causal)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # the kernels index contiguous (B, H, N, D)
        B, H, N_Q, D = q.shape
        N_K = k.shape[2]
        BM, BN, warps = _blocks(D, q.dtype, blocks)
        BD = max(16, triton.next_power_of_2(D))
        o = torch.empty_like(q)  # (B, H, N_Q, D)
        lse = torch.empty(B, H, N_Q, device=q.device, dtype=torch.float32)  # only O(N) extra memory is saved
        grid = (triton.cdiv(N_Q, BM), B * H)
        flash_fwd_kernel[grid](
            q,
            k,
            v,
            o,
            lse,
            sm_scale * LOG2E,
            H,
            N_Q,
            N_K,
            D,
            BLOCK_M=BM,
            BLOCK_N=BN,
            BLOCK_D=BD,
            CAUSAL=causal,
            FP32_DOT=INTERPRET,
            num_warps=warps,
        )
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.sm_scale, ctx.blocks = causal, sm_scale, blocks
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = do.contiguous()
        B, H, N_Q, D = q.shape
        N_K = k.shape[2]
        BM, BN, warps = _blocks(D, q.dtype, ctx.blocks)
        BD = max(16, triton.next_power_of_2(D))
        delta = torch.empty_like(lse)  # (B, H, N_Q)
        flash_bwd_preprocess[(triton.cdiv(N_Q, BM), B * H)](o, do, delta, N_Q, D, BLOCK_M=BM, BLOCK_D=BD)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        meta = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, CAUSAL=ctx.causal, FP32_DOT=INTERPRET, num_warps=warps)
        scale = (ctx.sm_scale * LOG2E, ctx.sm_scale, H, N_Q, N_K, D)
        flash_bwd_dkdv_kernel[(triton.cdiv(N_K, BN), B * H)](q, k, v, do, lse, delta, dk, dv, *scale, **meta)
        flash_bwd_dq_kernel[(triton.cdiv(N_Q, BM), B * H)](q, k, v, do, lse, delta, dq, *scale, **meta)
        return dq, dk, dv, None, None, None


def flash_attention(
    q, k, v, causal: bool = False, sm_scale: float | None = None, blocks: tuple[int, int] | None = None
) -> torch.Tensor:
    """softmax(q k^T * sm_scale [+ causal mask]) v for q (B, H, N_Q, D), k/v (B, H, N_K, D); differentiable.
    ``blocks`` = (BLOCK_M, BLOCK_N) overrides the tile sizes (powers of two >= 16)."""
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    return FlashAttention.apply(q, k, v, causal, scale, blocks)


@register_attention("flash_triton")
def flash_triton_attention(q, k, v, *, causal: bool, attn_mask=None, dropout_p: float = 0.0):
    """ch01 plug point. An explicit ``attn_mask`` (KV-cache offsets, padding) or dropout falls back to SDPA for that call:
    the kernel only knows "no mask" and "causal"."""
    if attn_mask is not None or dropout_p > 0.0:
        return sdpa_attention(q, k, v, causal=causal, attn_mask=attn_mask, dropout_p=dropout_p)
    return flash_attention(q, k, v, causal=causal)


def check_against_sdpa(
    N: int,
    D: int,
    causal: bool,
    dtype: torch.dtype,
    device,
    B: int = 1,
    H: int = 2,
    blocks: tuple[int, int] | None = None,
) -> dict:
    """Max |error| of the output and dq/dk/dv vs SDPA computed in float64 on the same inputs."""
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    out = flash_attention(q, k, v, causal, blocks=blocks)  # (B, H, N, D)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, is_causal=causal)  # (B, H, N, D), float64
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double())
    err = {
        name: (a.double() - b).abs().max().item()
        for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads))
    }
    return {"N": N, "D": D, "causal": causal, "dtype": str(dtype).replace("torch.", ""), **err}


def main(argv=None) -> dict:
    p = base_parser(__doc__, device=True, seed=True, dtype=True)
    p.add_argument("--no-bench", action="store_true", help="on a GPU, skip the TFLOP/s benchmark")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    if INTERPRET:
        print("No CUDA GPU found: running the Triton kernels in Triton's CPU interpreter (TRITON_INTERPRET=1).")
    elif device.type != "cuda":
        print("Compiled Triton needs CUDA tensors: use --device cuda, or set TRITON_INTERPRET=1 to run on the CPU.")
        return {"rows": []}
    seed_everything(args.seed)
    dtype = parse_dtype(args.dtype)
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 5e-2}[dtype]
    # 77 and 40 leave ragged tails; 48 is not a power of two (the extra head-dim columns are masked)
    cases = [(64, 16, False), (64, 16, True), (77, 32, False), (77, 32, True), (40, 48, True)]
    if device.type == "cuda":
        cases += [(1000, 64, True), (1000, 128, False)]
    rows = [check_against_sdpa(N, D, causal, dtype, device) for N, D, causal in cases]
    for r in rows:
        r["ok"] = max(r["out"], r["dq"], r["dk"], r["dv"]) <= tol
    print(markdown_table(rows, floatfmt=".2e"))
    print(
        f"max error over all cases: {max(max(r['out'], r['dq'], r['dk'], r['dv']) for r in rows):.2e} "
        f"(tolerance {tol:.0e} for {args.dtype}); all ok: {all(r['ok'] for r in rows)}"
    )
    result = {"rows": rows, "interpreted": INTERPRET}
    if device.type == "cuda" and not args.no_bench:
        from ch04.bench_attention import gpu_flash_benchmark

        result["bench"] = gpu_flash_benchmark(flash_attention, dtype=torch.float16)
    return result


if __name__ == "__main__":
    main()
