"""The Triton kernels of FlashAttention-2: forward, and backward = preprocess + dK/dV kernel + dQ kernel.

Explicit pointer arithmetic on contiguous (B, H, N, D) tensors: element (b, h, n, d) lives at ((b*H + h)*N + n)*D + d.
No ``tl.make_block_ptr`` / ``tl.advance``. Tails are handled with masks, so any N and any head dim 16..128 work
(BLOCK_D is the next power of two and the padding columns are masked).

Importing this module without a CUDA GPU sets ``TRITON_INTERPRET=1`` first: ``@triton.jit`` decides between compiling
and interpreting when each function is *defined*, and that includes triton.language's own helpers (``tl.zeros``,
``tl.sum``, ``tl.max``), which are defined when ``triton`` is first imported. So the variable belongs in the environment
before anything imports triton. If something imported triton earlier (bitsandbytes does), this module re-creates those
helpers in interpreter mode (``_interpretable_stdlib``). On a CUDA machine nothing is changed; set the variable
yourself to force either mode.
The autograd wrapper and the ch01 registration are in flash_triton.py; a block-sparse variant is in sparse_triton.py.
References: Dao 2023 (FlashAttention-2); the Triton fused-attention tutorial.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must happen before @triton.jit runs: it picks JIT or interpreter at definition time
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def _interpretable_stdlib() -> None:
    """Make tl.zeros / tl.sum / tl.max / ... interpreter functions if triton was imported before TRITON_INTERPRET=1.

    Re-running triton.language.standard (same module object, so tl.standard and the tensor methods it attaches are
    updated) re-decorates its helpers with the interpreter; the names re-exported into ``triton.language`` are rebound.
    """
    import importlib

    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(tl.zeros, InterpretedFunction):
        return
    standard = importlib.reload(importlib.import_module("triton.language.standard"))
    for name, obj in vars(standard).items():
        if isinstance(obj, InterpretedFunction) and hasattr(tl, name):
            setattr(tl, name, obj)


if INTERPRET:
    _interpretable_stdlib()

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)); exp2 is the cheap instruction on GPUs


@triton.jit
def tile_dot(a, b, FP32_DOT: tl.constexpr):
    # The interpreter multiplies bf16 wrongly in tl.dot, so on that path both operands go to float32 first.
    # On a GPU, fp32 inputs use "ieee" (true fp32, no TF32 rounding); fp16/bf16 use tensor cores (option ignored).
    if FP32_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    K,
    V,
    kv_base,
    offs_m,
    offs_n,
    offs_d,
    d_ok,
    qk_scale,
    N_K,
    HEAD_DIM,
    lo,
    hi,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) with key blocks [lo, hi); MASKED adds the causal/ragged masks."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_k = start_n + offs_n
        kv_mask = (offs_k[:, None] < N_K) & d_ok[None, :] if MASKED else d_ok[None, :]
        k = tl.load(K + kv_base + offs_k[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)  # (N, D)
        v = tl.load(V + kv_base + offs_k[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)  # (N, D)
        s = tile_dot(q, tl.trans(k), FP32_DOT) * qk_scale  # (M, N) scores in log2 units
        if MASKED:
            keep = offs_k[None, :] < N_K  # ragged tail: keys past N_K do not exist
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_k[None, :])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: the first block visited always shows key 0 to every row
        p = tl.math.exp2(s - m_new[:, None])  # (M, N) unnormalised probabilities
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, FP32_DOT)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def flash_fwd_kernel(
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
    # Two phases: key blocks every query of this block sees completely (no mask work at all), then the blocks that
    # need masking (the causal diagonal, or the ragged last block). Causal: blocks right of the diagonal are never read.
    if CAUSAL:
        full_hi = (pid_m * BLOCK_M // BLOCK_N) * BLOCK_N  # keys < first query of the block: all visible
        hi = tl.minimum((pid_m + 1) * BLOCK_M, N_K)
    else:
        full_hi = (N_K // BLOCK_N) * BLOCK_N
        hi = N_K
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        K,
        V,
        kv_base,
        offs_m,
        offs_n,
        offs_d,
        d_ok,
        qk_scale,
        N_K,
        HEAD_DIM,
        0,
        full_hi,
        BLOCK_N,
        False,
        CAUSAL,
        FP32_DOT,
    )
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        K,
        V,
        kv_base,
        offs_m,
        offs_n,
        offs_d,
        d_ok,
        qk_scale,
        N_K,
        HEAD_DIM,
        full_hi,
        hi,
        BLOCK_N,
        True,
        CAUSAL,
        FP32_DOT,
    )
    acc = acc / l_i[:, None]
    tl.store(Out + q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], acc.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(LSE + bh * N_Q + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < N_Q)  # log2-sum-exp2 per row


@triton.jit
def flash_bwd_preprocess(Out, DO, DELTA, N_Q, HEAD_DIM, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
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
def flash_bwd_dkdv_kernel(
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
        s = tile_dot(q, tl.trans(k), FP32_DOT) * qk_scale  # (M, N)
        keep = (offs_m[:, None] < N_Q) & (offs_k[None, :] < N_K)
        if CAUSAL:
            keep = keep & (offs_m[:, None] >= offs_k[None, :])
        p = tl.where(keep, tl.math.exp2(s - lse[:, None]), 0.0)  # (M, N) exact probabilities, recomputed
        dv += tile_dot(tl.trans(p.to(do.dtype)), do, FP32_DOT)  # dV = P^T dO
        dp = tile_dot(do, tl.trans(v), FP32_DOT)  # (M, N) dP = dO V^T
        ds = p * (dp - delta[:, None])  # softmax backward: dS = P * (dP - rowsum(P * dP))
        dk += tile_dot(tl.trans(ds.to(q.dtype)), q, FP32_DOT)  # dK = dS^T Q (times the scale, below)
    tl.store(DK + kv_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def flash_bwd_dq_kernel(
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
        s = tile_dot(q, tl.trans(k), FP32_DOT) * qk_scale  # (M, N)
        keep = (offs_m[:, None] < N_Q) & (offs_k[None, :] < N_K)
        if CAUSAL:
            keep = keep & (offs_m[:, None] >= offs_k[None, :])
        p = tl.where(keep, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tile_dot(do, tl.trans(v), FP32_DOT)  # (M, N)
        ds = p * (dp - delta[:, None])
        dq += tile_dot(ds.to(k.dtype), k, FP32_DOT)  # dQ = dS K (times the scale, below)
    tl.store(DQ + q_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)
