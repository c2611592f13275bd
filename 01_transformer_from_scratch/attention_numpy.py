"""Backpropagation by hand: the transformer's pieces in pure NumPy, each with a forward and a backward pass.

Every op is a pair ``*_forward(...) -> (out, cache)`` and ``*_backward(dout, cache) -> grads``: the forward keeps what the
backward needs (the "cache"), the backward applies the chain rule to turn dL/dout into dL/dinput. Covered: softmax, scaled
dot-product attention with a boolean mask, causal multi-head self-attention (Wq, Wk, Wv, Wo), RMSNorm, SwiGLU and
cross-entropy. ``grad_check`` compares each backward with central finite differences; the tests also compare with torch
autograd in float64.

Weights use the math convention ``y = x @ W`` with ``W`` of shape (in, out) (torch's ``nn.Linear`` stores ``W.T``).

Run:  python 01_transformer_from_scratch/attention_numpy.py        (prints the max relative error of every gradient)
Refs: Vaswani et al. 2017 (attention); Zhang & Sennrich 2019 (RMSNorm); Shazeer 2020 (GLU variants, SwiGLU).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from common.bench import markdown_table
from common.cli import base_parser

# ----------------------------------------------------------------------------------------------------------- softmax


def softmax_forward(x: np.ndarray, axis: int = -1):
    shifted = x - np.max(x, axis=axis, keepdims=True)  # subtracting the max changes nothing but avoids exp overflow
    e = np.exp(shifted)
    y = e / np.sum(e, axis=axis, keepdims=True)
    return y, (y, axis)


def softmax_backward(dy: np.ndarray, cache):
    # dx_i = y_i * (dy_i - sum_j dy_j y_j): the Jacobian diag(y) - y y^T applied without building it
    y, axis = cache
    return y * (dy - np.sum(dy * y, axis=axis, keepdims=True))


# ------------------------------------------------------------------------------------ scaled dot-product attention


def attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None):
    """softmax(q k^T / sqrt(d)) v. q (..., Tq, d), k (..., Tk, d), v (..., Tk, dv); mask True = may attend.

    A row whose mask is all False has no defined softmax and comes out NaN, as in torch.
    """
    scale = 1.0 / np.sqrt(q.shape[-1])
    scores = (q @ np.swapaxes(k, -1, -2)) * scale  # (..., Tq, Tk)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    probs, sm_cache = softmax_forward(scores)  # (..., Tq, Tk)
    out = probs @ v  # (..., Tq, dv)
    return out, (q, k, v, probs, sm_cache, scale)


def attention_backward(dout: np.ndarray, cache):
    q, k, v, probs, sm_cache, scale = cache
    dv = np.swapaxes(probs, -1, -2) @ dout  # (..., Tk, dv)
    dprobs = dout @ np.swapaxes(v, -1, -2)  # (..., Tq, Tk)
    dscores = softmax_backward(dprobs, sm_cache) * scale  # masked entries have probs 0, so their gradient is 0
    dq = dscores @ k  # (..., Tq, d)
    dk = np.swapaxes(dscores, -1, -2) @ q  # (..., Tk, d)
    return dq, dk, dv


# ------------------------------------------------------------------------------- causal multi-head self-attention


def mha_forward(x: np.ndarray, wq: np.ndarray, wk: np.ndarray, wv: np.ndarray, wo: np.ndarray, n_heads: int):
    """Causal self-attention: x (B, T, C), all weights (C, C), heads of size C // n_heads."""
    B, T, C = x.shape
    if C % n_heads:
        raise ValueError(f"model width {C} is not divisible by n_heads={n_heads}")
    hs = C // n_heads

    def split(t):  # (B, T, C) -> (B, H, T, hs)
        return t.reshape(B, T, n_heads, hs).transpose(0, 2, 1, 3)

    q, k, v = split(x @ wq), split(x @ wk), split(x @ wv)  # (B, H, T, hs) each
    causal = np.tril(np.ones((T, T), dtype=bool))  # (T, T): position t sees positions <= t
    heads, att_cache = attention_forward(q, k, v, causal)  # (B, H, T, hs)
    merged = heads.transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, T, C)
    out = merged @ wo  # (B, T, C)
    return out, (x, wq, wk, wv, wo, n_heads, att_cache, merged)


def mha_backward(dout: np.ndarray, cache):
    x, wq, wk, wv, wo, n_heads, att_cache, merged = cache
    B, T, C = x.shape
    hs = C // n_heads
    x2 = x.reshape(-1, C)  # (B*T, C)
    dwo = merged.reshape(-1, C).T @ dout.reshape(-1, C)  # (C, C)
    dmerged = dout @ wo.T  # (B, T, C)
    dheads = dmerged.reshape(B, T, n_heads, hs).transpose(0, 2, 1, 3)  # (B, H, T, hs)
    dq, dk, dv = attention_backward(dheads, att_cache)  # (B, H, T, hs) each

    def merge(t):  # (B, H, T, hs) -> (B*T, C)
        return t.transpose(0, 2, 1, 3).reshape(-1, C)

    dq, dk, dv = merge(dq), merge(dk), merge(dv)
    dx = (dq @ wq.T + dk @ wk.T + dv @ wv.T).reshape(B, T, C)  # x feeds all three projections: gradients add
    return dx, x2.T @ dq, x2.T @ dk, x2.T @ dv, dwo


# --------------------------------------------------------------------------------------------------------- RMSNorm


def rmsnorm_forward(x: np.ndarray, weight: np.ndarray, eps: float = 1e-6):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis."""
    inv_rms = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)  # (..., 1)
    xhat = x * inv_rms  # (..., C)
    return xhat * weight, (xhat, inv_rms, weight)


def rmsnorm_backward(dy: np.ndarray, cache):
    xhat, inv_rms, weight = cache
    dweight = np.sum(dy * xhat, axis=tuple(range(dy.ndim - 1)))  # (C,)
    dxhat = dy * weight  # (..., C)
    # xhat = x * r(x); differentiating r gives the projection term: dx = r * (dxhat - xhat * mean(dxhat * xhat))
    dx = inv_rms * (dxhat - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))
    return dx, dweight


# ---------------------------------------------------------------------------------------------------------- SwiGLU


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # the tanh form never overflows


def swiglu_forward(x: np.ndarray, w1: np.ndarray, w2: np.ndarray, w3: np.ndarray):
    """(silu(x @ w1) * (x @ w3)) @ w2; w1, w3 (C, H), w2 (H, C)."""
    a = x @ w1  # (..., H) gate pre-activation
    b = x @ w3  # (..., H) value
    sig = _sigmoid(a)
    silu = a * sig
    g = silu * b  # (..., H)
    return g @ w2, (x, w1, w2, w3, a, b, sig, silu, g)


def swiglu_backward(dout: np.ndarray, cache):
    x, w1, w2, w3, a, b, sig, silu, g = cache
    C, H = w1.shape
    dw2 = g.reshape(-1, H).T @ dout.reshape(-1, C)  # (H, C)
    dg = dout @ w2.T  # (..., H)
    db = dg * silu
    da = dg * b * sig * (1.0 + a * (1.0 - sig))  # d silu / da = sig + a sig (1 - sig)
    x2 = x.reshape(-1, C)
    dx = da @ w1.T + db @ w3.T  # (..., C)
    return dx, x2.T @ da.reshape(-1, H), dw2, x2.T @ db.reshape(-1, H)


# --------------------------------------------------------------------------------------------------- cross-entropy


def cross_entropy_forward(logits: np.ndarray, targets: np.ndarray):
    """Mean over rows of -log softmax(logits)[target]; logits (N, V), targets (N,) ints."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))  # (N, V) log-sum-exp, stable
    n = logits.shape[0]
    loss = -log_probs[np.arange(n), targets].mean()
    return loss, (log_probs, targets)


def cross_entropy_backward(dloss: float, cache):
    log_probs, targets = cache
    n = log_probs.shape[0]
    dlogits = np.exp(log_probs)  # softmax minus one-hot, averaged over rows
    dlogits[np.arange(n), targets] -= 1.0
    return dlogits * (dloss / n)


# ------------------------------------------------------------------------------------------------ gradient checking


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max(|a|, |b|): scale-free, and not fooled by entries that are near zero."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    denom = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0), 1e-300)
    return float(np.abs(a - b).max(initial=0.0) / denom)


def numerical_grad(f: Callable[[], float], x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences (f(x + h) - f(x - h)) / 2h for every entry of ``x``, perturbed in place."""
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        fp = f()
        x[i] = old - h
        fm = f()
        x[i] = old
        grad[i] = (fp - fm) / (2 * h)
    return grad


def grad_check(
    forward: Callable, backward: Callable, inputs: dict[str, np.ndarray], rng: np.random.Generator, h: float = 1e-6
) -> dict[str, float]:
    """Check ``backward`` against finite differences of L = sum(forward(**inputs) * G) with a fixed random G.

    Returns {input name: max relative error}. Non-float inputs (masks, targets, head counts) are passed through.
    """
    out, cache = forward(**inputs)
    seed_grad = rng.standard_normal(np.shape(out))
    analytic = backward(seed_grad if np.ndim(out) else float(seed_grad), cache)
    analytic = analytic if isinstance(analytic, tuple) else (analytic,)
    float_names = [n for n, v in inputs.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"]

    def loss():
        return float(np.sum(forward(**inputs)[0] * seed_grad))

    return {name: rel_error(g, numerical_grad(loss, inputs[name], h)) for name, g in zip(float_names, analytic)}


def check_cases(rng: np.random.Generator) -> dict[str, tuple[Callable, Callable, dict[str, np.ndarray]]]:
    """Small float64 inputs for every op: name -> (forward, backward, inputs)."""
    B, T, C, H, V, nh = 2, 5, 8, 12, 7, 2
    r = rng.standard_normal
    mask = rng.random((B, 3, 4)) < 0.7
    mask[..., 0] = True  # every query sees at least one key
    return {
        "softmax": (softmax_forward, softmax_backward, {"x": r((B, T, V))}),
        "attention": (
            attention_forward,
            attention_backward,
            {"q": r((B, 3, 6)), "k": r((B, 4, 6)), "v": r((B, 4, 5)), "mask": mask},
        ),
        "mha (causal)": (
            mha_forward,
            mha_backward,
            {
                "x": r((B, T, C)),
                "wq": r((C, C)) * 0.3,
                "wk": r((C, C)) * 0.3,
                "wv": r((C, C)) * 0.3,
                "wo": r((C, C)) * 0.3,
                "n_heads": nh,
            },
        ),
        "rmsnorm": (rmsnorm_forward, rmsnorm_backward, {"x": r((B, T, C)), "weight": 1.0 + 0.1 * r(C)}),
        "swiglu": (
            swiglu_forward,
            swiglu_backward,
            {"x": r((B, T, C)), "w1": r((C, H)) * 0.3, "w2": r((H, C)) * 0.3, "w3": r((C, H)) * 0.3},
        ),
        "cross_entropy": (
            cross_entropy_forward,
            cross_entropy_backward,
            {"logits": r((B * T, V)), "targets": rng.integers(0, V, B * T)},
        ),
    }


def main(argv=None) -> list[dict]:
    p = base_parser(__doc__.splitlines()[0], seed=True)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    rows = []
    for op, (fwd, bwd, inputs) in check_cases(rng).items():
        for name, err in grad_check(fwd, bwd, inputs, rng).items():
            rows.append({"op": op, "gradient of": name, "max rel. error vs finite diff.": err})
    print(markdown_table(rows, floatfmt=".2e"))
    worst = max(r["max rel. error vs finite diff."] for r in rows)
    print(
        f"\nworst: {worst:.2e} (float64, central differences with h=1e-6; ~1e-8 or below means the backward is right)"
    )
    return rows


if __name__ == "__main__":
    main()
