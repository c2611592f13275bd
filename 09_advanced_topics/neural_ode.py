"""Neural ODEs from scratch: fixed-step RK4, adaptive Dormand–Prince 5(4), and the adjoint method for gradients.

    from ch09.neural_ode import odeint, odeint_adjoint
    ys = odeint(func, y0, t, method="dopri5", rtol=1e-6, atol=1e-8)        # (len(t), *y0.shape), differentiable
    ys = odeint_adjoint(func, y0, t, method="dopri5")                       # same values, O(1)-memory gradients

``func(t, y)`` is an nn.Module (its parameters get gradients). ``odeint`` backpropagates through every solver step
(memory grows with the number of steps); ``odeint_adjoint`` stores only the outputs and, on the backward pass, solves
the augmented ODE [y, a, a_theta]' = [f, -a·df/dy, -a·df/dtheta] backwards in time (Chen et al. 2018, Algorithm 1).
Demo (this script): fit the 2-D spiral dy/dt = (y**3) @ A of Chen et al.'s example with an MLP vector field.

    python 09_advanced_topics/neural_ode.py                     # spiral fit, ~1 min on 2 idle CPU cores
    python 09_advanced_topics/neural_ode.py --method rk4 --adjoint

References: Chen, Rubanova, Bettencourt, Duvenaud 2018 "Neural Ordinary Differential Equations" (NeurIPS);
Dormand & Prince 1980; Hairer, Nørsett, Wanner, "Solving ODEs I" (step-size control); torchdiffeq.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from ch09.paths import plot_dir
from common.bench import markdown_table
from common.cli import base_parser
from common.plot import save_fig
from common.seed import seed_everything

# Dormand–Prince 5(4) tableau; the 7th stage is evaluated at the new point (FSAL: first-same-as-last)
DP_C = [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0]
DP_A = [
    [],
    [1 / 5],
    [3 / 40, 9 / 40],
    [44 / 45, -56 / 15, 32 / 9],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
    [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
]
DP_B5 = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0]
DP_B4 = [5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40]


class Counter(nn.Module):
    """Wraps a vector field and counts its evaluations (NFE), the cost measure of an ODE solve."""

    def __init__(self, func: nn.Module):
        super().__init__()
        self.func, self.nfe = func, 0

    def forward(self, t, y):
        self.nfe += 1
        return self.func(t, y)


def rk4_step(f, t, y, h):
    k1 = f(t, y)
    k2 = f(t + h / 2, y + h / 2 * k1)
    k3 = f(t + h / 2, y + h / 2 * k2)
    k4 = f(t + h, y + h * k3)
    return y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def _rk4_interval(f, y, t0: float, t1: float, step_size: float | None, steps: int | None):
    n = steps if steps is not None else max(1, round(abs(t1 - t0) / step_size))
    h = (t1 - t0) / n
    for i in range(n):
        y = rk4_step(f, t0 + i * h, y, h)
    return y


def _rms(x):
    return x.pow(2).mean().sqrt()


def _dopri5_interval(f, y, t0: float, t1: float, rtol: float, atol: float, state: dict):
    """Integrate from t0 to t1 (either direction) with error control; ``state`` carries h and the FSAL derivative."""
    direction = 1.0 if t1 >= t0 else -1.0
    t, k1 = t0, state.get("k1")
    if k1 is None:
        k1 = f(t, y)
    h = state.get("h")
    if h is None:  # Hairer's starting step: a small step scaled by how fast y changes
        scale = atol + rtol * y.abs()
        d0, d1 = _rms(y / scale).item(), _rms(k1 / scale).item()
        h = 0.01 * d0 / d1 if d0 > 1e-5 and d1 > 1e-5 else 1e-6
    h = min(abs(h), abs(t1 - t0))
    while direction * (t1 - t) > 1e-12 * max(1.0, abs(t1)):
        h = min(h, abs(t1 - t))
        hs = direction * h
        ks = [k1]
        for i in range(1, 7):
            yi = y + hs * sum(a * k for a, k in zip(DP_A[i], ks) if a != 0.0)
            ks.append(f(t + DP_C[i] * hs, yi))
        y_new = y + hs * sum(b * k for b, k in zip(DP_B5, ks) if b != 0.0)
        err = hs * sum((b5 - b4) * k for b5, b4, k in zip(DP_B5, DP_B4, ks) if b5 != b4)
        scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        err_norm = _rms(err / scale).item()
        if err_norm <= 1.0:  # accept
            t, y, k1 = t + hs, y_new, ks[6]
        factor = 10.0 if err_norm == 0 else min(10.0, max(0.2, 0.9 * err_norm**-0.2))
        h = h * factor
        if h < 1e-12:
            raise RuntimeError(f"dopri5: step size underflow at t={t:.6g} (stiff or diverging dynamics)")
    state.update(h=h, k1=k1)
    return y


def odeint(
    func,
    y0: torch.Tensor,
    t: torch.Tensor,
    method: str = "dopri5",
    rtol: float = 1e-6,
    atol: float = 1e-8,
    step_size: float | None = None,
    steps: int | None = None,
) -> torch.Tensor:
    """Solve y' = func(t, y) from y(t[0]) = y0; returns (len(t), *y0.shape). Differentiable by backprop."""
    if t.dim() != 1 or len(t) < 2:
        raise ValueError("t must be a 1-D tensor of at least two times")
    if method not in ("rk4", "dopri5"):
        raise ValueError(f"method must be 'rk4' or 'dopri5', got {method!r}")
    if method == "rk4" and step_size is None and steps is None:
        raise ValueError("rk4 needs step_size= or steps= (steps per output interval)")
    ts = t.tolist()
    ys, y, state = [y0], y0, {}
    for t0, t1 in zip(ts[:-1], ts[1:]):
        if method == "rk4":
            y = _rk4_interval(func, y, t0, t1, step_size, steps)
        else:
            y = _dopri5_interval(func, y, t0, t1, rtol, atol, state)
        ys.append(y)
    return torch.stack(ys)  # (len(t), *y0.shape)


class _OdeintAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y0, t, func, options, *params):
        with torch.no_grad():
            ys = odeint(func, y0, t, **options)
        ctx.func, ctx.options, ctx.shape = func, options, y0.shape
        ctx.save_for_backward(t, ys, *params)
        return ys

    @staticmethod
    def backward(ctx, grad_ys):
        t, ys, *params = ctx.saved_tensors
        func, n = ctx.func, ys[0].numel()
        sizes = [p.numel() for p in params]

        def augmented(s, aug):  # aug = [y, a, a_theta] flattened
            y, a = aug[:n].view(ctx.shape), aug[n : 2 * n].view(ctx.shape)
            with torch.enable_grad():
                y = y.detach().requires_grad_(True)
                fy = func(s, y)
                grads = torch.autograd.grad(fy, (y, *params), -a, allow_unused=True)
            grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, (y, *params))]
            return torch.cat([fy.reshape(-1)] + [g.reshape(-1) for g in grads])

        a_theta = torch.zeros(sum(sizes), dtype=ys.dtype, device=ys.device)
        aug = torch.cat([ys[-1].reshape(-1), grad_ys[-1].reshape(-1), a_theta])
        for i in range(len(t) - 1, 0, -1):  # backwards over output intervals, adding each output's gradient
            aug = odeint(augmented, aug, t[i - 1 : i + 1].flip(0), **ctx.options)[-1]
            aug = torch.cat(
                [
                    ys[i - 1].reshape(-1),  # restart y from the stored forward value (less drift)
                    aug[n : 2 * n] + grad_ys[i - 1].reshape(-1),
                    aug[2 * n :],
                ]
            )
        grad_y0 = aug[n : 2 * n].view(ctx.shape)
        grad_params = list(torch.split(aug[2 * n :], sizes))
        return (grad_y0, None, None, None, *[g.view_as(p) for g, p in zip(grad_params, params)])


def odeint_adjoint(func: nn.Module, y0: torch.Tensor, t: torch.Tensor, **options) -> torch.Tensor:
    """Same as :func:`odeint`, gradients by the adjoint ODE (memory independent of the number of steps)."""
    params = tuple(p for p in func.parameters() if p.requires_grad)
    return _OdeintAdjoint.apply(y0, t, func, options, *params)


# ------------------------------------------------------------------------------------------------------ spiral demo
class SpiralTruth(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("A", torch.tensor([[-0.1, 2.0], [-2.0, -0.1]]))

    def forward(self, t, y):
        return (y**3) @ self.A  # (..., 2)


class ODEFunc(nn.Module):
    """The learned vector field: an MLP on y**3 (Chen et al.'s spiral example)."""

    def __init__(self, hidden: int = 50):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, t, y):
        return self.net(y**3)


def main(argv=None) -> dict:
    p = base_parser(__doc__, seed=True, out=True)
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--method", default="dopri5", choices=["rk4", "dopri5"])
    p.add_argument("--adjoint", action="store_true", help="gradients by the adjoint method instead of backprop")
    p.add_argument("--batch-time", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=20)
    args = p.parse_args(argv)
    if min(args.iters, args.batch_size) < 1 or args.batch_time < 2:
        p.error("--iters and --batch-size must be at least 1 and --batch-time at least 2")
    seed_everything(args.seed)
    t = torch.linspace(0.0, 25.0, 1000)
    y0 = torch.tensor([2.0, 0.0])
    with torch.no_grad():
        true_y = odeint(SpiralTruth(), y0, t, method="dopri5", rtol=1e-7, atol=1e-9)  # (1000, 2)
    func = Counter(ODEFunc())
    opt = torch.optim.Adam(func.func.parameters(), lr=1e-3)
    solve = odeint_adjoint if args.adjoint else odeint
    opts = dict(method=args.method, rtol=1e-5, atol=1e-6) if args.method == "dopri5" else dict(method="rk4", steps=1)
    gen = torch.Generator().manual_seed(args.seed)
    t0, nfe, nfe_bwd, history = time.perf_counter(), [], [], []
    for it in range(args.iters):
        s = torch.randint(0, len(t) - args.batch_time, (args.batch_size,), generator=gen)
        batch_y0 = true_y[s]  # (B, 2)
        batch_t = t[: args.batch_time]  # (T,)
        batch_y = torch.stack([true_y[s + i] for i in range(args.batch_time)])  # (T, B, 2)
        func.nfe = 0
        pred = solve(func, batch_y0, batch_t, **opts)  # (T, B, 2)
        nfe.append(func.nfe)
        loss = (pred - batch_y).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        nfe_bwd.append(func.nfe - nfe[-1])
        if (it + 1) % max(1, args.iters // 5) == 0:
            with torch.no_grad():
                full = odeint(func.func, y0, t, method="dopri5", rtol=1e-5, atol=1e-6)
            history.append((it + 1, (full - true_y).abs().mean().item()))
            print(f"iter {it + 1}: batch loss {loss.item():.4f}, full-trajectory L1 {history[-1][1]:.4f}")
    elapsed = time.perf_counter() - t0
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 5.8))
    ax.plot(true_y[:, 0], true_y[:, 1], label="true spiral y(t)")
    ax.plot(full[:, 0], full[:, 1], "--", label="neural ODE (learned field)")
    ax.plot(true_y[0, 0], true_y[0, 1], "ko", label="y(0)")
    ax.set_title(f"spiral fit after {args.iters} steps ({args.method}, {'adjoint' if args.adjoint else 'backprop'})")
    ax.set_xlabel("y₁ (first state component)")
    ax.set_ylabel("y₂ (second state component)")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(alpha=0.3)
    # below the axes: inside, the legend would cover the outer turn of the spiral
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize="small")
    mode = "adjoint" if args.adjoint else "backprop"
    plot = save_fig(fig, plot_dir(args.out, __file__) / f"spiral_{args.method}_{mode}.png")
    row = {
        "solver": args.method,
        "gradients": mode,
        "iters": args.iters,
        "final trajectory L1": f"{history[-1][1]:.4f}",
        "NFE / iter forward": f"{sum(nfe) / len(nfe):.1f}",
        "NFE / iter backward": f"{sum(nfe_bwd) / len(nfe_bwd):.1f}",
        "time (s)": f"{elapsed:.1f}",
    }
    print(f"\n{markdown_table([row])}\nplot: {plot}")
    return {"history": history, "final_l1": history[-1][1], "nfe": nfe, "nfe_backward": nfe_bwd, "time_s": elapsed}


if __name__ == "__main__":
    main()
