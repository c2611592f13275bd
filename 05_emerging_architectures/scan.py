"""Scans for the selective state-space model (Mamba): the recurrence h_t = a_t ⊙ h_{t-1} + b_t, written two ways.

* ``sequential_scan``: the obvious loop over time — the reference, O(L) dependent steps.
* ``parallel_scan``: a chunked parallel scan. The pair (a, b) composes associatively,
  (a1, b1) then (a2, b2) = (a1·a2, a2·b1 + b2), so the sequence can be cut into chunks that are all scanned at once
  (from a zero state), then the L/chunk chunk-end states are scanned (recursively, same algorithm) and added back:
  h = h_local + (Π a within the chunk) · h_chunk_start  (Blelloch 1990, "scan with p processors").
  Inside a chunk either ``chunk`` vectorised steps (work O(L), ≈ 2√L dependent steps in all: the CPU choice) or
  log2(chunk) Hillis–Steele doubling steps (work O(L log chunk): the GPU-style log-depth choice).
  Its backward pass is the same scan run backwards in time, so nothing but (a, h) is stored:
  g_t = ∂L/∂h_t + a_{t+1} · g_{t+1},  ∂L/∂b_t = g_t,  ∂L/∂a_t = g_t · h_{t-1}   (as in mamba.py's PScan).

``selective_scan(u, delta, A, B, C, D, scan=...)`` is the S6 layer of Gu & Dao 2023 built on either scan, or
(scan="parallel", the default) on logscan.py, which uses Mamba's structure a_t = exp(Δ_t A) to replace the cumulative
products by cumulative sums of Δ — several times faster on CPU than both scans here — or (scan="compiled") on
compiledscan.py, the chunked scan with its per-chunk loops fused into C++ by torch.compile (faster still, after a
one-time compile).
"""

from __future__ import annotations

import torch


def sequential_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b (B, L, ...) -> h (B, L, ...) with h_t = a_t·h_{t-1} + b_t, h_{-1} = 0 (autograd through the loop)."""
    h = torch.zeros_like(b[:, 0])
    hs = []
    for a_t, b_t in zip(a.unbind(1), b.unbind(1)):  # unbind, not a[:, t]: its backward is one stack, not L scatters
        h = a_t * h + b_t
        hs.append(h)
    return torch.stack(hs, dim=1)


def _hillis_steele_(a: torch.Tensor, b: torch.Tensor) -> None:
    """In place along dim 1: a -> running product, b -> running state (from zero). log2(L) steps, O(L log L) work."""
    L, off = a.shape[1], 1
    while off < L:
        b[:, off:] += a[:, off:] * b[:, :-off]  # right side is evaluated before the write
        a[:, off:] = a[:, off:] * a[:, :-off]
        off *= 2


def _stepped(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Plain loop along dim 1 without autograd (used inside a chunk, where every step covers all chunks at once)."""
    h = torch.empty_like(b)
    h[:, 0] = b[:, 0]
    for t in range(1, b.shape[1]):
        h[:, t] = torch.addcmul(b[:, t], a[:, t], h[:, t - 1])
    return h


@torch.no_grad()
def chunked_scan(a: torch.Tensor, b: torch.Tensor, chunk: int | None = None, inner: str = "stepped") -> torch.Tensor:
    """No-autograd parallel scan along dim 1 (see module docstring). a, b (B, L, ...) -> h (B, L, ...).

    chunk: positions per chunk (default ≈ √L, which balances the within-chunk and across-chunk step counts).
    inner: "stepped" (chunk vectorised steps, O(L) work: best on CPU) or "hillis-steele" (log2(chunk) steps,
    O(L log chunk) work: the GPU-style log-depth variant).
    """
    Bsz, L, rest = a.shape[0], a.shape[1], a.shape[2:]
    chunk = chunk or max(2, round(L**0.5))
    if L <= chunk:
        if inner == "stepped":
            return _stepped(a, b)
        a, b = a.clone(), b.clone()
        _hillis_steele_(a, b)
        return b
    pad = (-L) % chunk
    if pad:  # identity elements (a=1, b=0) fill the last chunk
        a = torch.cat([a, a.new_ones(Bsz, pad, *rest)], dim=1)
        b = torch.cat([b, b.new_zeros(Bsz, pad, *rest)], dim=1)
    n_chunks = (L + pad) // chunk
    a = a.reshape(Bsz * n_chunks, chunk, *rest)  # (B·nc, chunk, ...): all chunks side by side
    b = b.reshape(Bsz * n_chunks, chunk, *rest)
    if inner == "stepped":
        h, prod = _stepped(a, b), torch.cumprod(a, dim=1)  # local states (from zero), Π a inside the chunk
    elif inner == "hillis-steele":
        prod, h = a.clone(), b.clone()
        _hillis_steele_(prod, h)
    else:
        raise ValueError(f"unknown inner scan {inner!r}; choose stepped or hillis-steele")
    prod = prod.view(Bsz, n_chunks, chunk, *rest)
    h = h.view(Bsz, n_chunks, chunk, *rest)
    ends = chunked_scan(prod[:, :, -1], h[:, :, -1], None, inner)  # (B, nc, ...) true state at each chunk's end
    start = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=1)  # (B, nc, ...) state entering chunk
    h.addcmul_(prod, start.unsqueeze(2))  # h = h_local + (Π a) · h_start
    return h.view(Bsz, n_chunks * chunk, *rest)[:, :L]


class ParallelScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, chunk, inner):
        h = chunked_scan(a, b, chunk, inner)
        ctx.save_for_backward(a, h)
        ctx.chunk, ctx.inner = chunk, inner
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h = ctx.saved_tensors
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)  # a_{t+1}; nothing after the last step
        g = chunked_scan(a_next.flip(1), grad_h.flip(1), ctx.chunk, ctx.inner).flip(1)  # reverse-time scan
        h_prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        return g * h_prev, g, None, None


def parallel_scan(a: torch.Tensor, b: torch.Tensor, chunk: int | None = None, inner: str = "stepped") -> torch.Tensor:
    """Same result as ``sequential_scan`` (float32: within ~1e-6), with a scan-based backward."""
    return ParallelScan.apply(a, b, chunk, inner)


SCANS = {"sequential": sequential_scan, "associative": parallel_scan}


def selective_scan(u, delta, A, B, C, D, scan="parallel") -> torch.Tensor:
    """S6 (Gu & Dao 2023, Alg. 2) with zero-order-hold Ā = exp(ΔA) and the simplified B̄ = ΔB.

    u, delta (Bsz, L, E); A (E, N) negative; B, C (Bsz, L, N) input-dependent; D (E,) -> y (Bsz, L, E).
    scan: "parallel" (logscan.py: chunked cumulative sums, the eager fast path), "compiled" (compiledscan.py: the
    chunked scan fused by torch.compile, fastest on CPU), "associative" (the generic chunked scan above on (a, b)),
    "sequential", or any function (a, b) -> h.
    """
    if scan == "parallel":
        from ch05.logscan import logspace_selective_scan  # imported here: logscan falls back to this module

        return logspace_selective_scan(u, delta, A, B, C, D)
    if scan == "compiled":
        from ch05.compiledscan import compiled_selective_scan

        return compiled_selective_scan(u, delta, A, B, C, D)
    if isinstance(scan, str) and scan not in SCANS:
        raise ValueError(f"unknown scan {scan!r}; choose parallel, compiled or one of {', '.join(SCANS)}")
    scan_fn = SCANS[scan] if isinstance(scan, str) else scan
    dA = torch.exp2(
        delta.unsqueeze(-1) * (A * 1.4426950408889634)
    )  # (Bsz, L, E, N) exp(ΔA) as 2^(ΔA·log2 e): 3× faster
    dBu = (delta * u).unsqueeze(-1) * B.unsqueeze(2)  # (Bsz, L, E, N)
    h = scan_fn(dA, dBu)  # (Bsz, L, E, N)
    return torch.einsum("blen,bln->ble", h, C) + D * u  # (Bsz, L, E) Σ_n C_t h_t (einsum: ~3× faster than h @ C)
