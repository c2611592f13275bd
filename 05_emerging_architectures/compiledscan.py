"""The chunked parallel scan with its per-chunk loops fused by ``torch.compile`` (inductor's C++ codegen on CPU).

Blelloch's "scan with p processors" in three phases, each over all L/T chunks of T = 16 steps at once:

1. chunk ends: scan every chunk from a zero state, keep only its last state and Π a over the chunk;
2. carry: h_start(j+1) = (Π a)_j · h_start(j) + end_j — L/T small (E, N) steps, the only sequential part;
3. outputs: scan every chunk again from its true start state, reading out y_t = Σ_n C_t h_t on the way.

Phases 1 and 3 are written as plain loops over the T steps of a chunk (``h = a_t * h + b_t``). Run eagerly they would be
T small PyTorch calls each; compiled, the loop is unrolled into one C++ kernel that walks the chunks and keeps the
chunk's state in registers — a hardware-aware scan in the sense of Mamba's CUDA kernel, generated instead of written.
Unlike logscan.py nothing is divided by a decay (no exp(+x) factors), so there is no chunk-length bound and no fallback.
The discretisation a = exp(ΔA) is computed once per (t, e, n) (as exp2, the cheap form) and read by both phases.

The backward pass is the same three phases run backwards in time on g_t = ∂L/∂h_t = a_{t+1} g_{t+1} + C_t dy_t,
fused with the analytic gradients of a_t = exp(Δ_t A) and b_t = Δ_t u_t B_t (needs a and the states h, stored by the
forward pass). Only float32 on CPU takes this path; anything else, or a machine where compiling fails (no C++
compiler), uses logscan.py — same result.

Compile cost: the first call per (E, N) compiles four small graphs (≈ 20–60 s on a 2-core machine, less with the
on-disk inductor cache of an earlier run); the chunk count is a dynamic dimension, so other lengths reuse them.

Reference: Blelloch 1990 (prefix sums); Gu & Dao 2023 (Mamba, §3.3 hardware-aware scan); PyTorch 2 (Ansel et al. 2024).
"""

from __future__ import annotations

import warnings

import torch
from torch.autograd.function import once_differentiable

from ch05.logscan import LOG2E, _workspace, logspace_selective_scan

T = 16  # steps per chunk: unrolled in the compiled kernels (longer = fewer carry steps, longer compile)


def _discretize(delta, A2, a):
    """a = exp(ΔA) (n, T, E, N), the one exp per (t, e, n), written into ``a`` (a reused buffer, or one kept for
    backward). delta (n, T, E); A2 = A·log2(e) (E, N). A graph of its own: fused into the loops below, inductor would
    recompute the exp there instead of reading it back."""
    a.copy_(torch.exp2(delta.unsqueeze(-1) * A2))


def _ends(a, du, B):
    """Phase 1. a (n, T, E, N); du = Δ·u (n, T, E); B (n, T, N). Returns each chunk's end state from a zero start and
    its total decay Π a, both (n, E, N)."""
    h, prod = du[:, 0, :, None] * B[:, 0, None, :], a[:, 0]
    for t in range(1, T):
        h = a[:, t] * h + du[:, t, :, None] * B[:, t, None, :]
        prod = prod * a[:, t]
    return h, prod


def _outputs(a, du, B, C, h):
    """Phase 3 for inference. h (n, E, N): each chunk's start state. Returns y (n, T, E) without the D·u skip."""
    ys = []
    for t in range(T):
        h = a[:, t] * h + du[:, t, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))  # (n, E)
    return torch.stack(ys, 1)


def _states(a, du, B, h):
    """Phase 3 for training: the states (n, T, E, N), which the backward pass needs; y is read out from them by
    ``_readout``. (Returning states and y from one loop made inductor split it into slower pieces: 11 vs 8 ms.)"""
    hs = []
    for t in range(T):
        h = a[:, t] * h + du[:, t, :, None] * B[:, t, None, :]
        hs.append(h)
    return torch.stack(hs, 1)


def _readout(H, C):
    return (H * C.unsqueeze(2)).sum(-1)  # (n, T, E) Σ_n C_t h_t


def _grad_ends(a, dy, C):
    """Backward phase 1: the reverse scan of g inside each chunk from zero; returns a_0·g_0 (n, E, N), what the chunk
    passes on to the state before it."""
    g = dy[:, T - 1, :, None] * C[:, T - 1, None, :]
    for t in range(T - 2, -1, -1):
        g = a[:, t + 1] * g + dy[:, t, :, None] * C[:, t, None, :]
    return a[:, 0] * g


def _grads(a, H, h0, g_in, dy, delta, B, C, A):
    """Backward phase 3. g_in (n, E, N): ∂L/∂(last state) flowing in from later chunks; h0: the chunk start states.
    Returns g_t = ∂L/∂h_t (n, T, E, N), Σ_n g·B and Σ_n q·A (n, T, E), and dA (E, N), where q = g_t·h_{t-1}·a_t is
    ∂L/∂(Δ_t A). Sums over e (dB, dC) are left to ``_sum_over_e``: inside this loop inductor would redo the chain for each t."""
    g, dA = g_in, None
    G, gB, qA = [], [], []
    for t in range(T - 1, -1, -1):
        g = g + dy[:, t, :, None] * C[:, t, None, :]  # g_t
        q = g * (H[:, t - 1] if t else h0) * a[:, t]
        G.append(g)
        gB.append((g * B[:, t, None, :]).sum(-1))
        qA.append((q * A).sum(-1))
        dA = q * delta[:, t, :, None] if dA is None else dA + q * delta[:, t, :, None]
        g = a[:, t] * g  # a_t g_t: what step t passes to step t−1
    return *(torch.stack(x[::-1], 1) for x in (G, gB, qA)), dA.sum(0)


def _sum_over_e(G, du, H, dy):
    """dB = Σ_e g·Δu and dC = Σ_e h·dy, (n, T, N) each (as einsum these become tiny batched matmuls: 30× slower)."""
    return (G * du.unsqueeze(-1)).sum(2), (H * dy.unsqueeze(-1)).sum(2)


_COMPILED: dict = {}
_BROKEN: list = []  # set once compiling failed: every later call takes the eager path


def _kernel(fn):
    """``torch.compile`` once per function; the chunk count (dim 0) stays dynamic so new lengths do not recompile."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    compiled = _COMPILED[fn]

    def call(*args, **kw):
        for x in args:
            if isinstance(x, torch.Tensor) and x.dim() >= 3:
                torch._dynamo.maybe_mark_dynamic(x, 0)
        return compiled(*args, **kw)

    return call


def _carry(ends, prod, h0, reverse=False):
    """Phase 2: ends, prod (Bsz, nc, E, N) -> state entering each chunk (Bsz, nc, E, N) (reverse: the gradient
    entering each chunk's last state from the right). nc dependent steps of one addcmul on (Bsz, E, N)."""
    out = torch.empty_like(ends)
    out_, ends_, prod_ = out.unbind(1), ends.unbind(1), prod.unbind(1)
    order = range(ends.shape[1])[:: -1 if reverse else 1]
    out_[order[0]].copy_(h0)
    for j, k in zip(order, order[1:]):
        torch.addcmul(ends_[j], prod_[j], out_[j], out=out_[k])
    return out


def _chunked(x, Bsz):
    """(Bsz, L, C) -> (Bsz·nc, T, C), zero-padded: Δ = 0 and u = 0 make the padded steps identities (a = 1, b = 0)."""
    if x.shape[1] % T:  # (pad copies even when there is nothing to add)
        x = torch.nn.functional.pad(x, (0, 0, 0, (-x.shape[1]) % T))
    return x.reshape(Bsz * (x.shape[1] // T), T, x.shape[-1])


class CompiledSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, train):
        Bsz, L, E = u.shape
        uc, dc, Bc, Cc = (_chunked(x, Bsz) for x in (u, delta, B, C))
        du = dc * uc  # (n, T, E)
        shape = (*dc.shape, A.shape[1])  # (n, T, E, N)
        a = u.new_empty(shape) if train else _workspace("a", shape, u)  # kept for backward / reused scratch
        _kernel(_discretize)(dc, A * LOG2E, a)
        ends, prod = _kernel(_ends)(a, du, Bc)
        nc = dc.shape[0] // Bsz
        starts = _carry(ends.view(Bsz, nc, *A.shape), prod.view(Bsz, nc, *A.shape), u.new_zeros(Bsz, *A.shape))
        h0 = starts.view(-1, *A.shape)
        if train:
            H = _kernel(_states)(a, du, Bc, h0)
            y = _kernel(_readout)(H, Cc)
            ctx.save_for_backward(u, delta, A, B, C, D, a, H, h0, prod)
        else:
            y = _kernel(_outputs)(a, du, Bc, Cc, h0)
        return y.view(Bsz, -1, E)[:, :L] + D * u

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        u, delta, A, B, C, D, a, H, h0, prod = ctx.saved_tensors
        Bsz, L, E = u.shape
        uc, dc, Bc, Cc, dyc = (_chunked(x, Bsz) for x in (u, delta, B, C, dy))
        nc = dc.shape[0] // Bsz
        passed = _kernel(_grad_ends)(a, dyc, Cc).view(Bsz, nc, *A.shape)
        # gradient entering chunk j's last state: g_in(j−1) = passed_j + (Π a)_j · g_in(j), from the last chunk back
        g_in = _carry(passed, prod.view(Bsz, nc, *A.shape), u.new_zeros(Bsz, *A.shape), reverse=True)
        G, gB, qA, dA = _kernel(_grads)(a, H, h0, g_in.view(-1, *A.shape), dyc, dc, Bc, Cc, A)
        dB, dC = _kernel(_sum_over_e)(G, dc * uc, H, dyc)
        unchunk = lambda x: x.reshape(Bsz, -1, x.shape[-1])[:, :L]  # noqa: E731
        gB, qA, dB, dC = (unchunk(x) for x in (gB, qA, dB, dC))
        return gB * delta + dy * D, qA + gB * u, dA, dB, dC, (dy * u).sum((0, 1)), None


def compiled_selective_scan(u, delta, A, B, C, D):
    """``selective_scan`` (scan.py) through the compiled chunked scan; same arguments and result. Falls back to
    logscan.py for non-float32 or non-CPU tensors, and where torch.compile cannot build the kernels."""
    ok = not _BROKEN and u.dtype == torch.float32 and u.device.type == "cpu"
    if ok:
        try:
            train = torch.is_grad_enabled() and any(x.requires_grad for x in (u, delta, A, B, C, D))
            return CompiledSelectiveScan.apply(u, delta, A, B, C, D, train)
        except Exception as err:  # no C++ compiler, unsupported platform, …: say so once, then stay eager
            _BROKEN.append(err)
            warnings.warn(
                f"torch.compile failed ({type(err).__name__}: {err}); using the eager log-space scan", stacklevel=2
            )
    return logspace_selective_scan(u, delta, A, B, C, D)
