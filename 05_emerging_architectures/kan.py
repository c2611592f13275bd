"""Kolmogorov–Arnold Networks: learnable 1-D functions (B-splines) on the edges instead of fixed activations on nodes.

A KAN layer maps x (in) -> y (out) with y_j = Σ_i φ_ij(x_i), φ_ij(x) = w_b·SiLU(x) + w_s·Σ_m c_ijm B_m(x).
Efficient formulation (efficient-kan): evaluate the G+k B-spline bases of every input once, (batch, in, G+k), and
contract them with all coefficients in one matmul — no (batch, in, out) tensor of edge activations is ever built.
Grid update re-places the knots at the data's quantiles and refits the coefficients by least squares so the function
is unchanged; grid extension refits onto a finer grid (more parameters, lower error).

    python 05_emerging_architectures/kan.py       # KAN vs equal-parameter MLP on exp(sin(πx)+y²) + KAN-FFN cost

References: Liu et al. 2024 (KAN); Blealtan/efficient-kan; de Boor 1978 (B-spline recursion).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ch01.model import GPT, GPTConfig


class KANLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        grid_size: int = 5,
        spline_order: int = 3,
        grid_range: tuple[float, float] = (-1.0, 1.0),
        grid_eps: float = 0.02,
        noise_scale: float = 0.1,
    ):
        super().__init__()
        if grid_size < 1 or spline_order < 0:
            raise ValueError(f"need grid_size >= 1 and spline_order >= 0, got {grid_size}, {spline_order}")
        self.in_features, self.out_features = in_features, out_features
        self.grid_size, self.spline_order, self.grid_eps = grid_size, spline_order, grid_eps
        h = (grid_range[1] - grid_range[0]) / grid_size  # k extra knots each side so every point sees k+1 bases
        knots = torch.arange(-spline_order, grid_size + spline_order + 1, dtype=torch.float32) * h + grid_range[0]
        self.register_buffer("grid", knots.expand(in_features, -1).contiguous())  # (in, G + 2k + 1)
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features))
        self.spline_weight = nn.Parameter(
            torch.randn(out_features, in_features, grid_size + spline_order) * noise_scale / grid_size
        )  # (out, in, G + k)
        self.spline_scaler = nn.Parameter(torch.ones(out_features, in_features))
        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5))

    def b_splines(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in) -> B-spline bases (B, in, G + k) by the Cox–de Boor recursion on each input's knot vector."""
        g, x = self.grid, x.unsqueeze(-1)  # (in, G+2k+1), (B, in, 1)
        bases = ((x >= g[:, :-1]) & (x < g[:, 1:])).to(x.dtype)  # (B, in, G+2k) order 0: indicator of a knot span
        for k in range(1, self.spline_order + 1):
            left = (x - g[:, : -(k + 1)]) / (g[:, k:-1] - g[:, : -(k + 1)]) * bases[..., :-1]
            right = (g[:, k + 1 :] - x) / (g[:, k + 1 :] - g[:, 1:-k]) * bases[..., 1:]
            bases = left + right  # (B, in, G+2k-k)
        return bases

    @property
    def scaled_spline_weight(self) -> torch.Tensor:
        return self.spline_weight * self.spline_scaler.unsqueeze(-1)  # (out, in, G+k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)  # (B, in)
        base = F.linear(F.silu(x), self.base_weight)  # (B, out)
        spline = F.linear(self.b_splines(x).flatten(1), self.scaled_spline_weight.flatten(1))  # one matmul (B, out)
        return (base + spline).view(*shape[:-1], self.out_features)

    def spline_edges(self, x: torch.Tensor) -> torch.Tensor:
        """Each edge's spline value, x (B, in) -> (B, in, out) (for refitting; the forward never builds this)."""
        return torch.einsum("bim,oim->bio", self.b_splines(x), self.scaled_spline_weight)

    def curve_to_coeff(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Least-squares coefficients (out, in, G+k) whose splines pass through y (B, in, out) at x (B, in)."""
        A = self.b_splines(x).transpose(0, 1)  # (in, B, G+k)
        sol = torch.linalg.lstsq(A, y.transpose(0, 1)).solution  # (in, G+k, out)
        return sol.permute(2, 0, 1).contiguous()

    @torch.no_grad()
    def update_grid(self, x: torch.Tensor, margin: float = 0.01) -> None:
        """Move knots to the data (mix of quantiles and uniform, weight grid_eps) keeping each φ_ij unchanged."""
        x = x.reshape(-1, self.in_features)
        y = self.spline_edges(x)  # (B, in, out) current functions, to be reproduced on the new grid
        self.grid.copy_(self._adaptive_grid(x, margin))
        self.spline_weight.copy_(self.curve_to_coeff(x, y) / self.spline_scaler.unsqueeze(-1))

    def _adaptive_grid(self, x: torch.Tensor, margin: float) -> torch.Tensor:
        G, k = self.grid_size, self.spline_order
        xs = x.sort(dim=0).values  # (B, in)
        idx = torch.linspace(0, x.shape[0] - 1, G + 1).long()
        adaptive = xs[idx]  # (G+1, in) quantile knots
        step = (xs[-1] - xs[0] + 2 * margin) / G  # (in,)
        uniform = torch.arange(G + 1, dtype=x.dtype)[:, None] * step + xs[0] - margin  # (G+1, in)
        inner = self.grid_eps * uniform + (1 - self.grid_eps) * adaptive
        ends = torch.arange(1, k + 1, dtype=x.dtype)[:, None] * step
        return torch.cat([inner[:1] - ends.flip(0), inner, inner[-1:] + ends]).t().contiguous()  # (in, G+2k+1)

    @torch.no_grad()
    def extend_grid(self, grid_size: int, x: torch.Tensor) -> KANLinear:
        """A new layer with a finer grid fitted (least squares at x) to this layer's functions."""
        x = x.reshape(-1, self.in_features)
        new = KANLinear(self.in_features, self.out_features, grid_size, self.spline_order, grid_eps=self.grid_eps)
        new.grid.copy_(new._adaptive_grid(x, 0.01))
        new.base_weight.copy_(self.base_weight)
        new.spline_weight.copy_(new.curve_to_coeff(x, self.spline_edges(x)))
        return new


class KAN(nn.Sequential):
    """KAN([2, 5, 1]): stacked KAN layers (no extra nonlinearity: the edges are the nonlinearity)."""

    def __init__(self, widths: list[int], grid_size: int = 5, spline_order: int = 3, **kw):
        super().__init__(*(KANLinear(a, b, grid_size, spline_order, **kw) for a, b in zip(widths, widths[1:])))

    @torch.no_grad()
    def extend_grid(self, grid_size: int, x: torch.Tensor) -> KAN:
        layers = []
        for layer in self:
            layers.append(layer.extend_grid(grid_size, x))
            x = layer(x)
        new = KAN.__new__(KAN)
        nn.Sequential.__init__(new, *layers)
        return new


class KANFFN(nn.Module):
    """Feed-forward block C -> hidden -> C made of two KAN layers (replaces ch01's SwiGLU MLP)."""

    def __init__(self, n_embd: int, hidden: int, grid_size: int = 5, spline_order: int = 3):
        super().__init__()
        self.up = KANLinear(n_embd, hidden, grid_size, spline_order, grid_range=(-2.0, 2.0))
        self.down = KANLinear(hidden, n_embd, grid_size, spline_order, grid_range=(-2.0, 2.0))

    def forward(self, x):
        return self.down(self.up(x))


def kan_hidden_for(cfg: GPTConfig, grid_size: int = 5, spline_order: int = 3) -> int:
    """Hidden width giving a KAN FFN the parameters of the dense SwiGLU MLP: 2·C·h·(G+k+2) = 3·C·H."""
    return max(1, round(3 * cfg.ffn_hidden / (2 * (grid_size + spline_order + 2))))


class KANGPT(GPT):
    """ch01's GPT with each block's MLP replaced by a parameter-matched ``KANFFN``."""

    def __init__(self, cfg: GPTConfig, grid_size: int = 5, spline_order: int = 3):
        super().__init__(cfg)
        hidden = kan_hidden_for(cfg, grid_size, spline_order)
        for block in self.blocks:
            block.mlp = KANFFN(cfg.n_embd, hidden, grid_size, spline_order)


# ------------------------------------------------------------------------------------------------------------ demo
def target_fn(X: torch.Tensor) -> torch.Tensor:
    """The KAN paper's symbolic example exp(sin(πx) + y²): X (B, 2) -> (B, 1)."""
    return torch.exp(torch.sin(math.pi * X[:, 0]) + X[:, 1] ** 2)[:, None]


def equal_param_mlp(n_params: int) -> nn.Sequential:
    """2 -> h -> h -> 1 SiLU MLP with h chosen so its parameter count (h² + 5h + 1) is closest to n_params."""
    h = max(1, round((-5 + math.sqrt(25 - 4 * (1 - n_params))) / 2))
    return nn.Sequential(nn.Linear(2, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, 1))


def fit(model: nn.Module, steps: int = 1000, n_train: int = 512, lr: float = 1e-2, seed: int = 0) -> float:
    """Full-batch Adam (cosine LR) on uniform points in [-1, 1]²; returns test RMSE on 1000 fresh points."""
    g = torch.Generator().manual_seed(seed)
    X, X_test = torch.rand(n_train, 2, generator=g) * 2 - 1, torch.rand(1000, 2, generator=g) * 2 - 1
    y = target_fn(X)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for it in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * it / steps))
        loss = F.mse_loss(model(X), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return F.mse_loss(model(X_test), target_fn(X_test)).sqrt().item()


def saved_activation_bytes(fn) -> int:
    """Bytes of tensors autograd keeps for the backward pass while running fn() (exact, unlike sampled RSS)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def ffn_cost(cfg: GPTConfig, n_tokens: int) -> list[dict]:
    """SwiGLU MLP vs parameter-matched KAN FFN on one layer: params, fwd+bwd time, activation memory."""
    from ch01.model import MLP
    from common.bench import timeit

    x = torch.randn(n_tokens, cfg.n_embd, requires_grad=True)
    rows = []
    for name, ffn in (("SwiGLU MLP (ch01)", MLP(cfg)), ("KAN FFN", KANFFN(cfg.n_embd, kan_hidden_for(cfg)))):
        t = timeit(lambda ffn=ffn: ffn(x).sum().backward(), warmup=2, repeats=10)
        rows.append(
            {
                "FFN": name,
                "params": sum(p.numel() for p in ffn.parameters()),
                "fwd+bwd (ms)": t.median * 1e3,
                "saved activations (MiB)": saved_activation_bytes(lambda ffn=ffn: ffn(x)) / 2**20,
            }
        )
    for r in rows:
        r["time ×"] = r["fwd+bwd (ms)"] / rows[0]["fwd+bwd (ms)"]
        r["memory ×"] = r["saved activations (MiB)"] / rows[0]["saved activations (MiB)"]
    return rows


def main(argv=None) -> dict:
    from common.bench import hardware_info, markdown_table
    from common.cli import base_parser

    p = base_parser(__doc__, seed=True)
    p.add_argument("--steps", type=int, default=1000, help="Adam steps for each fitted model")
    p.add_argument("--grid", type=int, default=5)
    p.add_argument("--extend-to", type=int, default=10, help="grid size for the grid-extension row (0: skip)")
    p.add_argument("--tokens", type=int, default=768, help="tokens per FFN call for the cost table (12 × 64)")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    kan = KAN([2, 5, 1], grid_size=args.grid)
    n_kan = sum(p.numel() for p in kan.parameters())
    mlp = equal_param_mlp(n_kan)
    rows = [
        {"model": f"KAN [2,5,1], G={args.grid}", "params": n_kan, "test RMSE": fit(kan, args.steps, seed=args.seed)},
        {
            "model": f"MLP [2,{mlp[0].out_features},{mlp[0].out_features},1] SiLU",
            "params": sum(p.numel() for p in mlp.parameters()),
            "test RMSE": fit(mlp, args.steps, seed=args.seed),
        },
    ]
    if args.extend_to:
        X = torch.rand(512, 2, generator=torch.Generator().manual_seed(args.seed)) * 2 - 1
        finer = kan.extend_grid(args.extend_to, X)  # start from the coarse fit, then keep training
        rows.append(
            {
                "model": f"KAN [2,5,1], grid extended {args.grid}->{args.extend_to}",
                "params": sum(p.numel() for p in finer.parameters()),
                "test RMSE": fit(finer, args.steps, lr=3e-3, seed=args.seed),
            }
        )
    print(f"\n{hardware_info()}\n\nFitting exp(sin(πx)+y²) on [-1,1]² ({args.steps} full-batch Adam steps):")
    print(markdown_table(rows, floatfmt=".4f"))
    cfg = GPTConfig.preset("small")
    cost = ffn_cost(cfg, args.tokens)
    print(f"\nFeed-forward cost, one layer, C={cfg.n_embd}, {args.tokens} tokens (machine shared: times are noisy):")
    print(markdown_table(cost, floatfmt=".2f"))
    return {"fit": rows, "ffn_cost": cost}


if __name__ == "__main__":
    main()
