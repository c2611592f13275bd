"""ch01.attention_numpy: hand-written NumPy backward passes vs torch autograd (float64) and finite differences."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ch01 import attention_numpy as an

TOL = 1e-6


def _torch_rmsnorm(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _torch_mha(x, wq, wk, wv, wo, n_heads):
    B, T, C = x.shape
    q, k, v = ((x @ w).view(B, T, n_heads, C // n_heads).transpose(1, 2) for w in (wq, wk, wv))  # (B, H, T, hs)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hs)
    return y.transpose(1, 2).reshape(B, T, C) @ wo


def _torch_attention(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


TORCH_REFS = {
    "softmax": lambda x: torch.softmax(x, dim=-1),
    "attention": _torch_attention,
    "mha (causal)": _torch_mha,
    "rmsnorm": _torch_rmsnorm,
    "swiglu": lambda x, w1, w2, w3: (F.silu(x @ w1) * (x @ w3)) @ w2,
    "cross_entropy": lambda logits, targets: F.cross_entropy(logits, targets),
}


def _cases(seed=0):
    return an.check_cases(np.random.default_rng(seed))


@pytest.mark.parametrize("op", list(TORCH_REFS))
def test_forward_and_backward_match_torch_autograd(op):
    fwd, bwd, inputs = _cases()[op]
    rng = np.random.default_rng(1)
    out, cache = fwd(**inputs)
    seed_grad = rng.standard_normal(np.shape(out))
    ours = bwd(seed_grad if np.ndim(out) else float(seed_grad), cache)
    ours = ours if isinstance(ours, tuple) else (ours,)

    t_inputs, float_names = {}, []
    for name, v in inputs.items():
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            t_inputs[name] = torch.tensor(v, dtype=torch.float64, requires_grad=True)
            float_names.append(name)
        else:
            t_inputs[name] = torch.as_tensor(v) if isinstance(v, np.ndarray) else v
    t_out = TORCH_REFS[op](**t_inputs)
    assert an.rel_error(out, t_out.detach().numpy()) < TOL
    (t_out * torch.as_tensor(seed_grad)).sum().backward()
    assert len(ours) == len(float_names)
    for name, g in zip(float_names, ours):
        err = an.rel_error(g, t_inputs[name].grad.numpy())
        assert err < TOL, f"{op}: d/d{name} rel. error {err:.2e}"


@pytest.mark.parametrize("op", list(TORCH_REFS))
def test_backward_matches_finite_differences(op):
    fwd, bwd, inputs = _cases(seed=3)[op]
    errors = an.grad_check(fwd, bwd, inputs, np.random.default_rng(4))
    assert errors and max(errors.values()) < 1e-6, errors


def test_grad_check_catches_a_wrong_backward():
    fwd, _, inputs = _cases()["rmsnorm"]

    def wrong_backward(dy, cache):  # forgets the normalisation's dependence on x
        xhat, inv_rms, weight = cache
        return dy * weight * inv_rms, np.sum(dy * xhat, axis=(0, 1))

    errors = an.grad_check(fwd, wrong_backward, inputs, np.random.default_rng(0))
    assert errors["x"] > 1e-2 and errors["weight"] < 1e-6


def test_masked_keys_get_no_weight_and_no_gradient():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 3, 4)), rng.standard_normal((1, 5, 4)), rng.standard_normal((1, 5, 2))
    mask = np.ones((3, 5), dtype=bool)
    mask[:, 3:] = False  # keys 3 and 4 are hidden from every query
    out, cache = an.attention_forward(q, k, v, mask)
    out_visible, _ = an.attention_forward(q, k[:, :3], v[:, :3])
    np.testing.assert_allclose(out, out_visible, rtol=1e-12)
    _, dk, dv = an.attention_backward(np.ones_like(out), cache)
    assert np.all(dk[:, 3:] == 0) and np.all(dv[:, 3:] == 0)


def test_softmax_and_cross_entropy_are_stable_for_huge_logits():
    x = np.array([[1000.0, 0.0, -1000.0]])
    y, _ = an.softmax_forward(x)
    assert np.all(np.isfinite(y)) and abs(y.sum() - 1) < 1e-12
    loss, _ = an.cross_entropy_forward(x, np.array([2]))
    assert np.isclose(loss, F.cross_entropy(torch.tensor(x), torch.tensor([2])).item())


def test_main_reports_every_gradient_small():
    rows = an.main([])
    assert len(rows) == 16
    assert max(r["max rel. error vs finite diff."] for r in rows) < 1e-6
