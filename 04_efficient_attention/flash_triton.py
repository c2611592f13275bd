"""FlashAttention-2 in Triton: forward and backward kernels with explicit pointer arithmetic.

What it shows: exact attention computed tile by tile in on-chip memory. The forward kernel streams key/value blocks past a
block of queries with an online softmax and saves only the log-sum-exp (LSE) of each row; the backward pass recomputes
the probabilities from that LSE instead of storing the (N, N) matrix (one kernel for dK/dV, one for dQ).

Run:  python 04_efficient_attention/flash_triton.py            (no GPU: checks vs SDPA in Triton's CPU interpreter)
      python 04_efficient_attention/flash_triton.py --bench    (CUDA GPU: also TFLOP/s vs SDPA and naive, N=512..16k)

Without a CUDA GPU this module sets ``TRITON_INTERPRET=1`` before any kernel is defined, so the same kernels run on
CPU tensors through Triton's interpreter (slow; small shapes only). On a CUDA machine it is left alone and the kernels are
compiled. Set ``TRITON_INTERPRET`` yourself before importing this module to force either choice.

References: Dao et al. 2022 (FlashAttention); Dao 2023 (FlashAttention-2); Milakov & Gimelshein 2018 (online softmax);
the Triton fused-attention tutorial (06-fused-attention.py).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must happen before @triton.jit runs: it picks JIT or interpreter at definition time
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ch01.model import register_attention, sdpa_attention  # noqa: E402
from common.bench import markdown_table  # noqa: E402
from common.cli import base_parser  # noqa: E402
from common.device import parse_dtype, pick_device  # noqa: E402
from common.seed import seed_everything  # noqa: E402

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)); exp2 is the cheap instruction on GPUs


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr):
    # The interpreter multiplies bf16 wrongly in tl.dot, so on that path both operands go to float32 first.
    # On a GPU, fp32 inputs use "ieee" (true fp32, no TF32 rounding); fp16/bf16 use tensor cores (option ignored).
    if FP32_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
    qk_scale,
    H,
    N_Q,
    N_K,
    HEAD_DIM,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """One program = one block of BLOCK_M queries of one (batch, head). Tensors are contiguous (B, H, N, D)."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this block
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)  # BLOCK_D = next power of two >= HEAD_DIM; the extra columns are masked
    d_ok = offs_d < HEAD_DIM
    q_base, kv_base = bh * N_Q * HEAD_DIM, bh * N_K * HEAD_DIM
    q_mask = (offs_m[:, None] < N_Q) & d_ok[None, :]
    q = tl.load(Q + q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=q_mask, other=0.0)  # (M, D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running softmax denominator, relative to m_i
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running numerator @ V, relative to m_i
    hi = N_K
    if CAUSAL:  # key blocks entirely right of the diagonal contribute nothing: never load them
        hi = tl.minimum((pid_m + 1) * BLOCK_M, N_K)
    for start_n in range(0, hi, BLOCK_N):
        offs_k = start_n + offs_n
        kv_mask = (offs_k[:, None] < N_K) & d_ok[None, :]
        k = tl.load(K + kv_base + offs_k[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)  # (N, D)
        v = tl.load(V + kv_base + offs_k[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)  # (N, D)
        s = _dot(q, tl.trans(k), FP32_DOT) * qk_scale  # (M, N) scores in log2 units
        keep = offs_k[None, :] < N_K  # ragged tail: keys past N_K do not exist
        if CAUSAL:
            keep = keep & (offs_m[:, None] >= offs_k[None, :])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key 0 is always visible to every row
        p = tl.math.exp2(s - m_new[:, None])  # (M, N) unnormalised probabilities
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP32_DOT)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(Out + q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], acc.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(LSE + bh * N_Q + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < N_Q)  # log2-sum-exp2 per row


@triton.jit
def _bwd_preprocess(Out, DO, DELTA, N_Q, HEAD_DIM, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij: the row term of the softmax backward."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_DIM)
    ptrs = bh * N_Q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(Out + ptrs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * N_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < N_Q)


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    qk_scale,
    sm_scale,
    H,
    N_Q,
    N_K,
    HEAD_DIM,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """One program = one block of BLOCK_N keys; it walks over query blocks and owns dK, dV for its keys (no atomics)."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_base, kv_base = bh * N_Q * HEAD_DIM, bh * N_K * HEAD_DIM
    kv_mask = (offs_k[:, None] < N_K) & d_ok[None, :]
    kv_offs = kv_base + offs_k[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)  # (N, D)
    v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)  # (N, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:  # queries above the diagonal never see these keys
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for start_m in range(lo, N_Q, BLOCK_M):
        offs_m = start_m + offs_m0
        q_mask = (offs_m[:, None] < N_Q) & d_ok[None, :]
        q_offs = q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        q = tl.load(Q + q_offs, mask=q_mask, other=0.0)  # (M, D)
        do = tl.load(DO + q_offs, mask=q_mask, other=0.0)  # (M, D)
        lse = tl.load(LSE + bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)  # (M,)
        delta = tl.load(DELTA + bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)  # (M,)
        s = _dot(q, tl.trans(k), FP32_DOT) * qk_scale  # (M, N)
        keep = (offs_m[:, None] < N_Q) & (offs_k[None, :] < N_K)
        if CAUSAL:
            keep = keep & (offs_m[:, None] >= offs_k[None, :])
        p = tl.where(keep, tl.math.exp2(s - lse[:, None]), 0.0)  # (M, N) exact probabilities, recomputed
        dv += _dot(tl.trans(p.to(do.dtype)), do, FP32_DOT)  # dV = P^T dO
        dp = _dot(do, tl.trans(v), FP32_DOT)  # (M, N) dP = dO V^T
        ds = p * (dp - delta[:, None])  # softmax backward: dS = P * (dP - rowsum(P * dP))
        dk += _dot(tl.trans(ds.to(q.dtype)), q, FP32_DOT)  # dK = dS^T Q (times the scale, below)
    tl.store(DK + kv_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    qk_scale,
    sm_scale,
    H,
    N_Q,
    N_K,
    HEAD_DIM,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """One program = one block of BLOCK_M queries; it walks over key blocks like the forward pass and owns dQ."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_base, kv_base = bh * N_Q * HEAD_DIM, bh * N_K * HEAD_DIM
    q_mask = (offs_m[:, None] < N_Q) & d_ok[None, :]
    q_offs = q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_offs, mask=q_mask, other=0.0)  # (M, D)
    do = tl.load(DO + q_offs, mask=q_mask, other=0.0)  # (M, D)
    lse = tl.load(LSE + bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
    delta = tl.load(DELTA + bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = N_K
    if CAUSAL:
        hi = tl.minimum((pid_m + 1) * BLOCK_M, N_K)
    for start_n in range(0, hi, BLOCK_N):
        offs_k = start_n + offs_n
        kv_mask = (offs_k[:, None] < N_K) & d_ok[None, :]
        k = tl.load(K + kv_base + offs_k[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)  # (N, D)
        v = tl.load(V + kv_base + offs_k[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)  # (N, D)
        s = _dot(q, tl.trans(k), FP32_DOT) * qk_scale  # (M, N)
        keep = (offs_m[:, None] < N_Q) & (offs_k[None, :] < N_K)
        if CAUSAL:
            keep = keep & (offs_m[:, None] >= offs_k[None, :])
        p = tl.where(keep, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), FP32_DOT)  # (M, N)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, FP32_DOT)  # dQ = dS K (times the scale, below)
    tl.store(DQ + q_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


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
        _fwd_kernel[grid](
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
        _bwd_preprocess[(triton.cdiv(N_Q, BM), B * H)](o, do, delta, N_Q, D, BLOCK_M=BM, BLOCK_D=BD)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        meta = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, CAUSAL=ctx.causal, FP32_DOT=INTERPRET, num_warps=warps)
        scale = (ctx.sm_scale * LOG2E, ctx.sm_scale, H, N_Q, N_K, D)
        _bwd_dkdv_kernel[(triton.cdiv(N_K, BN), B * H)](q, k, v, do, lse, delta, dk, dv, *scale, **meta)
        _bwd_dq_kernel[(triton.cdiv(N_Q, BM), B * H)](q, k, v, do, lse, delta, dq, *scale, **meta)
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
    p = base_parser(__doc__)
    p.add_argument("--bench", action="store_true", help="CUDA only: TFLOP/s vs SDPA and naive for N=512..16k")
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
    if args.bench:
        if device.type != "cuda":
            print("--bench needs a CUDA GPU; skipped.")
        else:
            from ch04.bench_attention import gpu_flash_benchmark

            result["bench"] = gpu_flash_benchmark(flash_attention, dtype=torch.float16)
    return result


if __name__ == "__main__":
    main()
