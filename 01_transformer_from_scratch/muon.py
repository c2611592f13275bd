"""Muon: momentum SGD whose update for each 2-D hidden weight matrix is orthogonalised by a Newton–Schulz iteration;
embeddings, the output head, norms' gains (and any other non-matrix) keep AdamW. One optimizer object holds both, so
the training loop's schedule, clipping and bit-exact checkpoints treat it like AdamW (``TrainConfig(optimizer="muon")``).

    from ch01.muon import Muon, muon_param_groups
    opt = Muon(muon_param_groups(model, weight_decay=0.1), lr=1e-3)

Why: the momentum of a weight matrix is dominated by a few directions (low stable rank). Replacing M = U S V^T by
U V^T makes every direction move by the same amount, so rare directions learn as fast as common ones. The iteration
X <- a X + b (X X^T) X + c (X X^T)^2 X, started from M / ||M||_F, pushes every singular value towards ~1 using matmuls
only; Keller Jordan's coefficients (3.4445, -4.7750, 2.0315) trade exact convergence for speed: after 5 steps the
singular values lie in roughly [0.7, 1.2] (the test checks that against an SVD). ``adjust_lr="match_rms_adamw"``
(Moonlight) scales the update to AdamW's typical RMS (0.2·sqrt(max(A, B))) so Muon can share AdamW's learning rate and
weight decay; ``muon_lr_scale`` multiplies it further.
torch >= 2.9 ships ``torch.optim.Muon`` (matrices only); a test checks this Muon gives the same update.
Run ``python 01_transformer_from_scratch/bench_optimizers.py`` for AdamW vs Muon at equal steps and equal wall-clock.
References: Jordan et al. 2024 (Muon, modded-nanogpt); Liu et al. 2025 (Muon is Scalable for LLM Training, Moonlight);
Bernstein & Newhouse 2024 (modular duality / steepest descent under the spectral norm).
"""

from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    g: torch.Tensor, steps: int = 5, coefficients=NS_COEFFICIENTS, eps: float = 1e-7, dtype=torch.bfloat16
) -> torch.Tensor:
    """Approximately orthogonalise the (A, B) matrix ``g``: ~U V^T of its SVD, computed in ``dtype`` (bf16 as on
    GPUs; float32 is faster on most CPUs). Returns ``g``'s shape, in ``dtype``."""
    if g.dim() != 2:
        raise ValueError(f"Newton-Schulz orthogonalises matrices; got a tensor of shape {tuple(g.shape)}")
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.shape[0] > g.shape[1]
    if tall:  # iterate on the wide side: X X^T is then the smaller Gram matrix
        x = x.T  # (min, max)
    x = x / x.norm().clamp(min=eps)  # Frobenius >= spectral norm: every singular value now <= 1
    for _ in range(steps):
        gram = x @ x.T  # (min, min)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b·G + c·G²
        x = torch.addmm(x, poly, x, beta=a)  # a·X + (b·G + c·G²)·X
    return x.T if tall else x


def muon_param_groups(model: torch.nn.Module, weight_decay: float = 0.1, muon_lr_scale: float = 1.0) -> list[dict]:
    """Muon for the hidden 2-D matrices of the blocks; AdamW (decay on matrices only, as nanoGPT) for embeddings, the
    output head and every vector. Tied weights appear once (``named_parameters`` de-duplicates)."""
    muon, adam_decay, adam_plain = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() == 2 and not name.startswith(("tok_emb", "pos_emb", "lm_head")):
            muon.append(p)
        else:
            (adam_decay if p.dim() >= 2 else adam_plain).append(p)
    return [
        {"params": muon, "use_muon": True, "weight_decay": weight_decay, "lr_scale": muon_lr_scale},
        {"params": adam_decay, "use_muon": False, "weight_decay": weight_decay},
        {"params": adam_plain, "use_muon": False, "weight_decay": 0.0},
    ]


class Muon(torch.optim.Optimizer):
    """Groups with ``use_muon=True`` take Muon steps (Nesterov momentum -> Newton–Schulz -> scaled update, decoupled
    weight decay), the others AdamW steps; every group follows the one ``lr`` the schedule writes."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr: str = "match_rms_adamw",
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        ns_dtype: torch.dtype | None = None,
    ):
        if adjust_lr not in ("original", "match_rms_adamw"):
            raise ValueError(f"adjust_lr={adjust_lr!r}; choose 'original' or 'match_rms_adamw'")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            adjust_lr=adjust_lr,
            betas=betas,
            eps=eps,
            use_muon=False,
            lr_scale=1.0,
        )
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            bad = [tuple(p.shape) for p in group["params"] if group["use_muon"] and p.dim() != 2]
            if bad:
                raise ValueError(f"Muon groups take 2-D matrices only; got shapes {bad} (give them to AdamW)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    (self._muon if group["use_muon"] else self._adamw)(p, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict) -> None:
        state, grad = self.state[p], p.grad
        buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
        buf.lerp_(grad, 1 - group["momentum"])  # EMA of gradients
        update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf  # Nesterov look-ahead
        dtype = self.ns_dtype or (torch.bfloat16 if p.is_cuda else torch.float32)
        ortho = newton_schulz(update, group["ns_steps"], dtype=dtype)  # (A, B) ~ U V^T
        A, B = p.shape
        ratio = math.sqrt(max(1.0, A / B)) if group["adjust_lr"] == "original" else 0.2 * math.sqrt(max(A, B))
        lr = group["lr"] * group["lr_scale"]
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(ortho.to(p.dtype), alpha=-lr * ratio)

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        state, grad = self.state[p], p.grad
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = float(state["step"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**t))
