"""Pruning the mini-GPT's linear layers: unstructured magnitude, Wanda (|W|·‖X‖, Sun et al. 2023), and 2:4
semi-structured sparsity (two of every four consecutive weights are zero — the pattern NVIDIA sparse tensor cores run
at 2× speed), with the sparsity checked by counting zeros.

    python 06_quantization/prune.py                          # magnitude vs Wanda at 25/50/70% and 2:4, small model
    python 06_quantization/prune.py --sparsity 0.5

Criteria. Magnitude drops the smallest |W_ij| in the whole layer. Wanda scores S_ij = |W_ij| · ‖X_j‖₂ (the norm of
input feature j over calibration tokens) and drops the lowest scores within each output row: a small weight on a
large-activation feature still matters (LLMs have a few huge-activation features, Dettmers 2022). SparseGPT (Frantar &
Alistarh 2023) goes further and updates the surviving weights with the same inverse-Hessian machinery as gptq.py.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ch06.gptq import _sequential_groups
from ch06.quantize import quantizable_linears


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask (True = keep) removing the ``sparsity`` fraction of smallest |w| over the whole matrix."""
    k = int(w.numel() * sparsity)
    if k == 0:
        return torch.ones_like(w, dtype=torch.bool)
    threshold = w.abs().flatten().kthvalue(k).values
    mask = w.abs() > threshold
    # ties at the threshold: drop exactly k weights so the sparsity is exact
    n_extra = int(mask.numel() - mask.sum()) - k
    if n_extra > 0:
        tied = ((w.abs() == threshold) & ~mask).flatten().nonzero()[:n_extra, 0]
        mask.view(-1)[tied] = True
    return mask


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing the ``sparsity`` fraction of lowest scores in every row (Wanda's per-output comparison)."""
    k = int(score.shape[1] * sparsity)
    mask = torch.ones_like(score, dtype=torch.bool)
    if k:
        drop = score.topk(k, dim=1, largest=False).indices  # (out, k)
        mask.scatter_(1, drop, False)
    return mask


def n_m_mask(score: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M keep-mask: in every group of m consecutive inputs keep the n highest scores (2:4 = 50%)."""
    out_f, in_f = score.shape
    if in_f % m:
        raise ValueError(f"in_features={in_f} is not a multiple of m={m}")
    groups = score.reshape(out_f, in_f // m, m)  # (out, G, m)
    keep = groups.topk(n, dim=-1).indices  # (out, G, n)
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out_f, in_f)


class FeatureNormHook:
    """Accumulates Σ_t x_tj² per input feature j (Wanda's ‖X_j‖₂²)."""

    def __init__(self, n_in: int):
        self.sq = torch.zeros(n_in)

    def __call__(self, module, inputs, output):
        self.sq += inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float().pow(2).sum(0)


@torch.no_grad()
def prune_model(
    model: nn.Module,
    method: str = "magnitude",
    sparsity: float = 0.5,
    pattern: str = "unstructured",
    calib_ids: torch.Tensor | None = None,
    batch_size: int = 32,
) -> nn.Module:
    """A pruned deep copy. method: magnitude | wanda; pattern: unstructured | 2:4. Wanda needs ``calib_ids`` (N, T);
    its activation norms come from inputs that already flow through the pruned earlier layers (as in the Wanda code)."""
    if method not in ("magnitude", "wanda"):
        raise ValueError(f"unknown pruning method {method!r}; choose magnitude or wanda")
    if pattern not in ("unstructured", "2:4"):
        raise ValueError(f"unknown pattern {pattern!r}; choose unstructured or 2:4")
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if method == "wanda" and calib_ids is None:
        raise ValueError("Wanda needs calibration inputs: pass calib_ids (N, T)")
    pruned = copy.deepcopy(model).eval()
    linears = quantizable_linears(pruned)
    for group in _sequential_groups(pruned, include_lm_head=False):
        norms = {}
        if method == "wanda":
            hooks = {name: FeatureNormHook(linears[name].in_features) for name in group}
            handles = [linears[name].register_forward_hook(hooks[name]) for name in group]
            for b in range(0, len(calib_ids), batch_size):
                pruned(calib_ids[b : b + batch_size])
            for h in handles:
                h.remove()
            norms = {name: hooks[name].sq.sqrt() for name in group}
        for name in group:
            w = linears[name].weight
            score = w.abs() * norms[name][None, :] if method == "wanda" else w.abs()  # (out, in)
            if pattern == "2:4":
                mask = n_m_mask(score, 2, 4)
            elif method == "wanda":
                mask = row_mask(score, sparsity)
            else:
                mask = magnitude_mask(w, sparsity)
            w.mul_(mask)
    return pruned


def sparsity_of(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over the prunable linear layers (counted, not assumed)."""
    ws = [m.weight for m in quantizable_linears(model).values()]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def is_n_m_sparse(w: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of m consecutive inputs has at most n nonzeros."""
    return bool(((w.reshape(w.shape[0], -1, m) != 0).sum(-1) <= n).all())


def main(argv=None):
    from ch01.evaluate import evaluate_loss
    from ch06.gptq import calibration_windows
    from ch06.quantize import pretrained, print_loss_table, script_parser
    from common.seed import seed_everything

    p = script_parser(__doc__, seed=True)
    p.add_argument("--sparsity", type=float, nargs="*", default=[0.25, 0.5, 0.7])
    p.add_argument("--n-calib", type=int, default=128)
    args = p.parse_args(argv)
    seed_everything(args.seed)
    model, _, (train_ids, val_ids) = pretrained(args)
    calib = calibration_windows(train_ids, args.n_calib, model.config.block_size, args.seed)
    base = evaluate_loss(model, val_ids)
    rows = [{"method": "dense", "pattern": "-", "sparsity": sparsity_of(model), "val_loss": base}]
    for pattern, levels in (("unstructured", args.sparsity), ("2:4", [0.5])):
        for s in levels:
            for method in ("magnitude", "wanda"):
                pm = prune_model(model, method, s, pattern, calib_ids=calib)
                rows.append(
                    {
                        "method": method,
                        "pattern": pattern,
                        "sparsity": sparsity_of(pm),
                        "val_loss": evaluate_loss(pm, val_ids),
                    }
                )
    return print_loss_table(rows, base)


if __name__ == "__main__":
    main()
