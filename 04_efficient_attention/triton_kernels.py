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
def load_rows(PTR, rows, n_rows, offs_d, HEAD_DIM):
    """Tile (rows, BLOCK_D) of the contiguous (n_rows, HEAD_DIM) matrix at PTR; zeros past either edge."""
    mask = (rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(PTR + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def store_rows(PTR, rows, n_rows, offs_d, HEAD_DIM, x):
    """Write tile ``x`` (rows, BLOCK_D) where ``load_rows`` reads it, in PTR's dtype; nothing past either edge."""
    mask = (rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    tl.store(PTR + rows[:, None] * HEAD_DIM + offs_d[None, :], x.to(PTR.dtype.element_ty), mask=mask)


@triton.jit
def online_softmax_update(acc, l_i, m_i, s, v, FP32_DOT: tl.constexpr):
    """Fold one key block into the running (acc, l_i, m_i): scores s (M, N) in log2 units (-inf = hidden), values v.

    A row that has seen no visible key yet (max still -inf) stays empty instead of producing NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])  # (M, N) unnormalised probabilities
    alpha = tl.math.exp2(m_i - m_safe)  # rescales what was accumulated under the old max
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, FP32_DOT)
    return acc, l_i, m_new


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    K,
    V,
    offs_m,
    offs_d,
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
    """Online-softmax update of (acc, l_i, m_i) with key blocks [lo, hi) of K, V (this head's (N_K, HEAD_DIM) rows);
    MASKED adds the causal/ragged masks."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_k = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(K, offs_k, N_K, offs_d, HEAD_DIM)  # (N, D)
        v = load_rows(V, offs_k, N_K, offs_d, HEAD_DIM)  # (N, D)
        s = tile_dot(q, tl.trans(k), FP32_DOT) * qk_scale  # (M, N) scores in log2 units
        if MASKED:
            keep = offs_k[None, :] < N_K  # ragged tail: keys past N_K do not exist
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_k[None, :])
            s = tl.where(keep, s, float("-inf"))
        acc, l_i, m_i = online_softmax_update(acc, l_i, m_i, s, v, FP32_DOT)
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
    offs_d = tl.arange(0, BLOCK_D)  # BLOCK_D = next power of two >= HEAD_DIM; the extra columns are masked
    q_base, kv_base = bh * N_Q * HEAD_DIM, bh * N_K * HEAD_DIM
    q = load_rows(Q + q_base, offs_m, N_Q, offs_d, HEAD_DIM)  # (M, D)
    K, V = K + kv_base, V + kv_base  # this (batch, head)'s keys and values

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running softmax denominator, relative to m_i
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running numerator @ V, relative to m_i
    # Two phases: key blocks every query of this block sees completely (no score masking at all), then the blocks that
    # need masking (the causal diagonal, or the ragged last block). Causal: blocks right of the diagonal are never read.
    if CAUSAL:
        full_hi = (pid_m * BLOCK_M // BLOCK_N) * BLOCK_N  # keys < first query of the block: all visible
        hi = tl.minimum((pid_m + 1) * BLOCK_M, N_K)
    else:
        full_hi = (N_K // BLOCK_N) * BLOCK_N
        hi = N_K
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K, V, offs_m, offs_d, qk_scale, N_K, HEAD_DIM, 0, full_hi, BLOCK_N, False, CAUSAL, FP32_DOT
    )
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K, V, offs_m, offs_d, qk_scale, N_K, HEAD_DIM, full_hi, hi, BLOCK_N, True, CAUSAL, FP32_DOT
    )
    store_rows(Out + q_base, offs_m, N_Q, offs_d, HEAD_DIM, acc / l_i[:, None])
    tl.store(LSE + bh * N_Q + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < N_Q)  # log2-sum-exp2 per row


@triton.jit
def flash_bwd_preprocess(Out, DO, DELTA, N_Q, HEAD_DIM, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij: the row term of the softmax backward."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_rows(Out + bh * N_Q * HEAD_DIM, offs_m, N_Q, offs_d, HEAD_DIM).to(tl.float32)
    do = load_rows(DO + bh * N_Q * HEAD_DIM, offs_m, N_Q, offs_d, HEAD_DIM).to(tl.float32)
    tl.store(DELTA + bh * N_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < N_Q)


@triton.jit
def load_query_rows(Q, DO, LSE, DELTA, offs_m, N_Q, offs_d, HEAD_DIM):
    """What both backward kernels read for query rows ``offs_m``: q, dO (M, D) and the row terms lse, delta (M,)."""
    q = load_rows(Q, offs_m, N_Q, offs_d, HEAD_DIM)  # (M, D)
    do = load_rows(DO, offs_m, N_Q, offs_d, HEAD_DIM)  # (M, D)
    lse = tl.load(LSE + offs_m, mask=offs_m < N_Q, other=0.0)  # (M,)
    delta = tl.load(DELTA + offs_m, mask=offs_m < N_Q, other=0.0)  # (M,)
    return q, do, lse, delta


@triton.jit
def probs_and_dscores(
    q, k, v, do, lse, delta, offs_m, offs_k, N_Q, N_K, qk_scale, CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr
):
    """A (query block, key block) tile's exact probabilities P (M, N), recomputed from the forward's lse, and the
    score gradient dS = P * (dO V^T - delta): what both the dK/dV and the dQ kernel need."""
    s = tile_dot(q, tl.trans(k), FP32_DOT) * qk_scale  # (M, N)
    keep = (offs_m[:, None] < N_Q) & (offs_k[None, :] < N_K)
    if CAUSAL:
        keep = keep & (offs_m[:, None] >= offs_k[None, :])
    p = tl.where(keep, tl.math.exp2(s - lse[:, None]), 0.0)  # (M, N) exact probabilities, recomputed
    dp = tile_dot(do, tl.trans(v), FP32_DOT)  # (M, N) dP = dO V^T
    ds = p * (dp - delta[:, None])  # softmax backward: dS = P * (dP - rowsum(P * dP))
    return p, ds


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
    offs_d = tl.arange(0, BLOCK_D)
    q_base, kv_base = bh * N_Q * HEAD_DIM, bh * N_K * HEAD_DIM
    k = load_rows(K + kv_base, offs_k, N_K, offs_d, HEAD_DIM)  # (N, D)
    v = load_rows(V + kv_base, offs_k, N_K, offs_d, HEAD_DIM)  # (N, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:  # queries above the diagonal never see these keys
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for start_m in range(lo, N_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, do, lse, delta = load_query_rows(
            Q + q_base, DO + q_base, LSE + bh * N_Q, DELTA + bh * N_Q, offs_m, N_Q, offs_d, HEAD_DIM
        )
        p, ds = probs_and_dscores(q, k, v, do, lse, delta, offs_m, offs_k, N_Q, N_K, qk_scale, CAUSAL, FP32_DOT)
        dv += tile_dot(tl.trans(p.to(do.dtype)), do, FP32_DOT)  # dV = P^T dO
        dk += tile_dot(tl.trans(ds.to(q.dtype)), q, FP32_DOT)  # dK = dS^T Q (times the scale, below)
    store_rows(DK + kv_base, offs_k, N_K, offs_d, HEAD_DIM, dk * sm_scale)
    store_rows(DV + kv_base, offs_k, N_K, offs_d, HEAD_DIM, dv)


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
    offs_d = tl.arange(0, BLOCK_D)
    q_base, kv_base = bh * N_Q * HEAD_DIM, bh * N_K * HEAD_DIM
    q, do, lse, delta = load_query_rows(
        Q + q_base, DO + q_base, LSE + bh * N_Q, DELTA + bh * N_Q, offs_m, N_Q, offs_d, HEAD_DIM
    )
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = N_K
    if CAUSAL:
        hi = tl.minimum((pid_m + 1) * BLOCK_M, N_K)
    for start_n in range(0, hi, BLOCK_N):
        offs_k = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(K + kv_base, offs_k, N_K, offs_d, HEAD_DIM)  # (N, D)
        v = load_rows(V + kv_base, offs_k, N_K, offs_d, HEAD_DIM)  # (N, D)
        _, ds = probs_and_dscores(q, k, v, do, lse, delta, offs_m, offs_k, N_Q, N_K, qk_scale, CAUSAL, FP32_DOT)
        dq += tile_dot(ds.to(k.dtype), k, FP32_DOT)  # dQ = dS K (times the scale, below)
    store_rows(DQ + q_base, offs_m, N_Q, offs_d, HEAD_DIM, dq * sm_scale)
