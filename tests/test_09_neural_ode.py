"""ch09 Neural ODE: RK4 against the closed form (and its 4th-order convergence), Dormand–Prince against the closed form,
adjoint gradients against backprop-through-the-solver and against torchdiffeq."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ch09.neural_ode import Counter, ODEFunc, odeint, odeint_adjoint


class Linear(nn.Module):
    def __init__(self, A):
        super().__init__()
        self.A = nn.Parameter(A)

    def forward(self, t, y):
        return y @ self.A.T


def _linear_problem():
    g = torch.Generator().manual_seed(0)
    A = 0.5 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    y0 = torch.randn(3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    exact = torch.stack([torch.linalg.matrix_exp(A * ti) @ y0 for ti in t])  # y(t) = exp(A t) y0
    return Linear(A), y0, t, exact


def test_rk4_matches_closed_form_with_fourth_order_convergence():
    f, y0, t, exact = _linear_problem()
    errs = [(odeint(f, y0, t, method="rk4", steps=n) - exact).abs().max().item() for n in (4, 8, 16)]
    assert errs[-1] < 1e-8
    for coarse, fine in zip(errs, errs[1:]):  # halving h divides the error by ~2^4
        assert 10 < coarse / fine < 24, errs


def test_dopri5_matches_closed_form_and_adapts():
    f, y0, t, exact = _linear_problem()
    counted = Counter(f)
    ys = odeint(counted, y0, t, method="dopri5", rtol=1e-10, atol=1e-12)
    assert torch.allclose(ys, exact, atol=1e-9, rtol=0)
    tight = counted.nfe
    counted.nfe = 0
    loose = odeint(counted, y0, t, method="dopri5", rtol=1e-4, atol=1e-6)
    assert counted.nfe < tight  # looser tolerance -> fewer function evaluations
    assert torch.allclose(loose, exact, atol=1e-3)


def _grads(solve, f, y0, t, **opts):
    f.zero_grad()
    y0 = y0.detach().clone().requires_grad_(True)
    ys = solve(f, y0, t, **opts)
    (ys.sin() * torch.arange(1, ys.numel() + 1, dtype=ys.dtype).view_as(ys)).sum().backward()
    return ys.detach(), [y0.grad.clone()] + [p.grad.clone() for p in f.parameters()]


@pytest.mark.parametrize("opts", [dict(method="dopri5", rtol=1e-10, atol=1e-12), dict(method="rk4", steps=20)])
def test_adjoint_gradients_equal_backprop_through_solver(opts):
    torch.manual_seed(0)
    f = ODEFunc(hidden=16).double()
    y0 = torch.tensor([[2.0, 0.0], [0.5, -1.0]], dtype=torch.float64)
    t = torch.linspace(0.0, 1.0, 4, dtype=torch.float64)
    ys_bp, g_bp = _grads(odeint, f, y0, t, **opts)
    ys_adj, g_adj = _grads(odeint_adjoint, f, y0, t, **opts)
    assert torch.equal(ys_bp, ys_adj)
    for a, b in zip(g_bp, g_adj):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8), (a - b).abs().max()


def test_matches_torchdiffeq_values_and_adjoint_gradients():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    torch.manual_seed(1)
    f = ODEFunc(hidden=16).double()
    y0 = torch.tensor([[1.5, 0.3]], dtype=torch.float64)
    t = torch.linspace(0.0, 2.0, 5, dtype=torch.float64)
    opts = dict(method="dopri5", rtol=1e-10, atol=1e-12)
    ys, g = _grads(odeint_adjoint, f, y0, t, **opts)
    ys_ref, g_ref = _grads(torchdiffeq.odeint_adjoint, f, y0, t, **opts)
    assert torch.allclose(ys, ys_ref, atol=1e-8)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)


def test_bad_arguments_raise_clear_errors():
    f, y0, t, _ = _linear_problem()
    with pytest.raises(ValueError, match="rk4 needs"):
        odeint(f, y0, t, method="rk4")
    with pytest.raises(ValueError, match="method must be"):
        odeint(f, y0, t, method="euler")
    with pytest.raises(ValueError, match="1-D tensor"):
        odeint(f, y0, t[:1])
