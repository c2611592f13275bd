"""Gated DeltaNet: a linear-time token mixer that plugs into ch01's GPT as a layer letter (``layer_pattern="DDDA"``:
three Gated DeltaNet layers, then one attention layer, repeated), with constant-memory decoding through ch01's generate.

Each head keeps a (Dk, Dv) fast-weight memory S instead of a growing KV cache. Per token (alpha = exp(g) in (0, 1]
forgets, beta in (0, 1) is a write strength, k and q unit-norm):

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T          o_t = S_t^T q_t

i.e. decay the memory, then move the value it stores under key k_t towards v_t (the delta rule: S <- S + beta k
(v - S^T k)^T is one SGD step on ||S^T k - v||^2). ``gated_delta_recurrent`` runs that loop: O(1) work and memory per
token, how decoding runs. ``gated_delta_chunked`` is the parallel training form (Yang et al. 2024): inside a chunk of C
tokens the corrections u_i = beta_i (v_i - alpha_i S_{i-1}^T k_i) satisfy a unit lower-triangular system
(I + L) U = beta V - (beta b K) S_0 with L_ij = beta_i (b_i / b_j) k_i.k_j (b = cumulative decay), solved for all chunks
at once (the WY / UT transform); then outputs are O = (b Q) S_0 + (Q K^T * decay) U and only the state crosses
chunks. A test checks chunked == recurrent (values and gradients), and cached decoding == the full forward.

    from ch01.model import GPT, GPTConfig
    model = GPT(GPTConfig.preset("small", vocab_size=65, layer_pattern="DDDA"))   # resolved lazily from ch05

References: Yang, Kautz & Hatamizadeh 2024 (Gated Delta Networks, ICLR 2025); Yang et al. 2024 (Parallelizing Linear
Transformers with the Delta Rule over Sequence Length); Schlag et al. 2021 (linear transformers are fast weight
programmers); Dao & Gu 2024 (Mamba-2, the decay gate); Qwen3-Next (3 Gated DeltaNet : 1 attention hybrid).
Run ``python 05_emerging_architectures/hybrid.py`` for the val-loss and decode-memory comparison.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ch01.model import RMSNorm, register_mixer


def gated_delta_recurrent(q, k, v, g, beta, state=None):
    """The definition, one token at a time. q, k: (B, H, T, Dk); v: (B, H, T, Dv); g (log alpha, <= 0), beta:
    (B, H, T); state: (B, H, Dk, Dv) or None (zeros). Returns (o (B, H, T, Dv), final state)."""
    B, H, T, Dk = k.shape
    S = q.new_zeros(B, H, Dk, v.shape[-1]) if state is None else state
    outs = []
    for t in range(T):
        S = S * g[:, :, t, None, None].exp()  # forget: alpha_t S
        kt = k[:, :, t]  # (B, H, Dk)
        u = beta[:, :, t, None] * (v[:, :, t] - torch.einsum("bhk,bhkv->bhv", kt, S))  # (B, H, Dv): delta-rule error
        S = S + kt[..., :, None] * u[..., None, :]  # rank-1 write k u^T
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))  # (B, H, Dv)
    return torch.stack(outs, dim=2), S


def gated_delta_chunked(q, k, v, g, beta, state=None, chunk: int = 16):
    """Same result as ``gated_delta_recurrent``, parallel inside chunks of ``chunk`` tokens (see the module docstring);
    a sequential loop runs over T / chunk chunk boundaries only."""
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    pad = (-T) % chunk
    if pad:  # padded tokens: alpha = 1, beta = 0, k = 0 -> they leave the state unchanged
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    n = (T + pad) // chunk
    q, k, v = (t.reshape(B, H, n, chunk, -1) for t in (q, k, v))  # (B, H, n, C, D)
    g, beta = g.reshape(B, H, n, chunk), beta.reshape(B, H, n, chunk)
    logb = g.cumsum(-1)  # (B, H, n, C): log of the decay since the chunk started, b_i
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()  # (C, C) j <= i
    decay = (logb[..., :, None] - logb[..., None, :]).masked_fill(~causal, -math.inf).exp()  # (.., C, C) b_i / b_j
    strict = (k @ k.transpose(-1, -2) * decay).tril(-1) * beta[..., None]  # (.., C, C) L_ij, j < i
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    rhs = torch.cat([beta[..., None] * v, (beta * logb.exp())[..., None] * k], dim=-1)  # (.., C, Dv + Dk)
    solved = torch.linalg.solve_triangular(strict + eye, rhs, upper=False, unitriangular=True)
    w, kc = solved.split([Dv, Dk], dim=-1)  # U = w - kc S_0
    qk = q @ k.transpose(-1, -2) * decay  # (.., C, C) (q_i . k_j) b_i / b_j, j <= i
    q_decayed = q * logb.exp()[..., None]  # (.., C, Dk)
    k_to_end = k * (logb[..., -1:] - logb).exp()[..., None]  # (.., C, Dk): k_j b_C / b_j
    S = q.new_zeros(B, H, Dk, Dv) if state is None else state
    outs = []
    for c in range(n):
        u = w[:, :, c] - kc[:, :, c] @ S  # (B, H, C, Dv)
        outs.append(q_decayed[:, :, c] @ S + qk[:, :, c] @ u)  # (B, H, C, Dv)
        S = S * logb[:, :, c, -1, None, None].exp() + k_to_end[:, :, c].transpose(-1, -2) @ u  # (B, H, Dk, Dv)
    return torch.stack(outs, dim=2).reshape(B, H, n * chunk, Dv)[:, :, :T], S


@register_mixer("D")
class GatedDeltaNet(nn.Module):
    """A GPT layer's token mixer with ch01 ``Attention``'s forward signature: projections -> short causal depthwise
    conv + SiLU on q, k, v -> L2-normalised q, k -> gated delta rule -> per-head RMSNorm x SiLU output gate -> wo.
    With a cache, the layer's state (memory S and the conv's last inputs) lives in it (``cache.get_state/set_state``)."""

    conv_size = 4

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx, self.n_head, self.head_dim = layer_idx, cfg.n_head, cfg.head_dim
        C, inner = cfg.n_embd, cfg.n_head * cfg.head_dim
        self.wq, self.wk, self.wv = (nn.Linear(C, inner, bias=False) for _ in range(3))
        self.wa = nn.Linear(C, cfg.n_head, bias=False)  # decay gate (per head)
        self.wb = nn.Linear(C, cfg.n_head, bias=False)  # write strength beta (per head)
        self.wg = nn.Linear(C, inner, bias=False)  # output gate
        self.wo = nn.Linear(inner, C, bias=False)
        self.conv = nn.Conv1d(3 * inner, 3 * inner, self.conv_size, groups=3 * inner, bias=False)
        self.A_log = nn.Parameter(torch.empty(cfg.n_head).uniform_(1, 16).log())  # Mamba-2's decay rates
        dt = torch.exp(torch.rand(cfg.n_head) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt in [1e-3, 0.1]
        self.o_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def _conv(self, x, cache_conv):
        """Causal depthwise conv over time; x (B, T, 3·inner), cache_conv: the previous K-1 inputs or None."""
        B, T, Ch = x.shape
        prev = x.new_zeros(B, self.conv_size - 1, Ch) if cache_conv is None else cache_conv
        xp = torch.cat([prev, x], dim=1)  # (B, K-1+T, Ch)
        y = F.conv1d(xp.transpose(1, 2), self.conv.weight, groups=Ch).transpose(1, 2)  # (B, T, Ch)
        return F.silu(y), xp[:, -(self.conv_size - 1) :]

    def forward(self, x, rope_cs, cache, positions, mask):
        B, T, _ = x.shape
        H, D = self.n_head, self.head_dim
        state = _read_state(cache, self.layer_idx, positions, mask)
        qkv, conv_state = self._conv(torch.cat([self.wq(x), self.wk(x), self.wv(x)], -1), state and state["conv"])
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # 3 x (B, H, T, D)
        q, k = F.normalize(q, dim=-1) / math.sqrt(D), F.normalize(k, dim=-1)
        g = -self.A_log.exp() * F.softplus(self.wa(x) + self.dt_bias)  # (B, T, H) log alpha <= 0
        beta = torch.sigmoid(self.wb(x))  # (B, T, H)
        g, beta = g.transpose(1, 2).float(), beta.transpose(1, 2).float()  # (B, H, T)
        S = state and state["S"]
        run = gated_delta_recurrent if T == 1 else gated_delta_chunked
        o, S = run(q.float(), k.float(), v.float(), g, beta, S)  # (B, H, T, D), (B, H, D, D)
        if cache is not None:
            end = int(positions[0, -1]) + 1
            cache.set_state(self.layer_idx, {"S": S, "conv": conv_state, "end": end}, end)
        o = self.o_norm(o.to(x.dtype)).transpose(1, 2).reshape(B, T, H * D)  # (B, T, C)
        return self.wo(o * F.silu(self.wg(x)))


def _read_state(cache, layer: int, positions, mask):
    """This layer's recurrent state from the cache (None: start from zeros), after checking the call is one the
    recurrence can serve: every row continuing from where its state stopped (no ragged rows, no roll-back, no masks)."""
    if cache is None:
        if mask.mask is not None:
            raise ValueError("Gated DeltaNet layers are causal by construction and cannot take an attn_mask")
        return None
    if not hasattr(cache, "set_state"):
        raise ValueError(f"{type(cache).__name__} has no get_state/set_state: recurrent layers need ch01's KVCache")
    state = cache.get_state(layer)
    start = int(positions[0, 0])
    expected = 0 if state is None else state["end"]
    T = positions.shape[1]
    if bool((positions != torch.arange(start, start + T, device=positions.device)).any()) or start != expected:
        raise ValueError(
            f"Gated DeltaNet layers continue their state token by token: every row must sit at positions "
            f"{expected}..{expected + T - 1} (ragged batches and cache roll-back need attention-only models)"
        )
    return state
