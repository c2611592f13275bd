"""The small functional pieces the mini-GPT is made of, written out so a reader can call (and test) each one.

Each matches its torch counterpart (tests/test_01_functional.py): ``linear`` ~ F.linear, ``softmax`` ~ torch.softmax,
``rmsnorm`` ~ nn.RMSNorm, ``scaled_dot_product_attention`` ~ F.scaled_dot_product_attention, ``rope`` ~ Hugging Face
Llama's rotary embedding (rotate-half layout), ``cross_entropy`` ~ F.cross_entropy, ``AdamW`` ~ torch.optim.AdamW, ...
References: Vaswani et al. 2017; Zhang & Sennrich 2019 (RMSNorm); Shazeer 2020 (GLU variants); Su et al. 2021 (RoPE);
Loshchilov & Hutter 2019 (AdamW).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from common.checkpoint import load_checkpoint as _load_ckpt
from common.checkpoint import save_checkpoint as _save_ckpt
from common.data import get_batch  # noqa: F401  (re-exported: the loop's batching lives in common)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Wᵀ (+ b); weight is (out, in) like nn.Linear."""
    y = x @ weight.transpose(-1, -2)  # (..., out)
    return y if bias is None else y + bias


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Row lookup: (...,) int ids -> (..., C)."""
    return weight[ids]


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Stable softmax: subtracting the max changes nothing mathematically but keeps exp() from overflowing."""
    z = x - x.amax(dim=dim, keepdim=True)
    e = torch.exp(z)
    return e / e.sum(dim=dim, keepdim=True)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) * g, computed in float32 for stability like Llama."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) — Shazeer 2020; w1 = gate, w3 = up, w2 = down (Llama's names)."""
    return linear(silu(linear(x, w1)) * linear(x, w3), w2)


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v for any leading batch dims; ``mask`` is boolean, True = may attend."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (..., Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return softmax(scores, dim=-1) @ v  # (..., Tq, D)


def rope_cache(
    head_dim: int,
    positions: torch.Tensor,
    theta: float = 10000.0,
    inv_freq: torch.Tensor | None = None,
    attention_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (T, head_dim) for the rotate-half layout used by Hugging Face Llama. ``inv_freq`` (head_dim/2,)
    replaces the frequencies θ^(-2i/D) (chapter 04's RoPE scaling) and ``attention_factor`` multiplies cos and sin
    (YaRN's attention temperature, applied as Hugging Face does: q·k logits scale by its square)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    if inv_freq is None:
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
        inv_freq = 1.0 / (theta**exponents)  # (D/2,)
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]  # (T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, D)
    if attention_factor != 1.0:
        return emb.cos() * attention_factor, emb.sin() * attention_factor
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of x (..., T, D) by angle position·θ_i."""
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of x (..., T, D) at integer ``positions`` (T,)."""
    cos, sin = rope_cache(x.shape[-1], positions, theta)
    return apply_rope(x, cos, sin)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean of -log softmax(logits)[target] over (N, V) / (N,), via log-sum-exp for stability."""
    logits = logits.reshape(-1, logits.shape[-1]).float()  # (N, V)
    targets = targets.reshape(-1)  # (N,)
    keep = targets != ignore_index
    logits, targets = logits[keep], targets[keep]
    m = logits.amax(-1, keepdim=True)
    logz = (logits - m).exp().sum(-1).log() + m.squeeze(-1)  # (N,)
    return (logz - logits.gather(-1, targets[:, None]).squeeze(-1)).mean()


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """Scale all grads together so their global L2 norm is at most ``max_norm``; returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    scale = torch.clamp(max_norm / (total + eps), max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return total


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019): Adam moments + weight decay applied to the weights, not the gradient."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ):
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW hyper-parameters lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                p.mul_(1 - lr * wd)
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                step_size = lr / (1 - b1**t)
                denom = (v.sqrt() / (1 - b2**t) ** 0.5).add_(eps)
                p.addcdiv_(m, denom, value=-step_size)
        return loss


def cosine_lr(it: int, max_lr: float, min_lr: float, warmup_iters: int, cosine_cycle_iters: int) -> float:
    """Linear warm-up from 0 to ``max_lr``, cosine decay to ``min_lr`` at ``cosine_cycle_iters``, then flat."""
    if it < warmup_iters:
        return max_lr * it / warmup_iters
    if it >= cosine_cycle_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, cosine_cycle_iters - warmup_iters)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def save_checkpoint(model: torch.nn.Module, optimizer, iteration: int, path) -> None:
    """Model + optimizer + iteration (+ RNG states) in one safetensors file, written atomically."""
    _save_ckpt(path, model, optimizer, step=iteration)


def load_checkpoint(path, model: torch.nn.Module, optimizer=None) -> int:
    """Restore model (and optimizer) from ``path``; returns the saved iteration."""
    return _load_ckpt(path, model, optimizer)["step"]
