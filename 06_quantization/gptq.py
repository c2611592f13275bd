"""GPTQ (Frantar et al. 2022): quantize a layer's weights one input column at a time and push each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction loss.

    python 06_quantization/gptq.py                        # RTN vs GPTQ at 4 and 3 bits, group 32, small model
    python 06_quantization/gptq.py --bits 3 --group-size 64 --act-order

For one linear layer y = W x, minimise ‖W X − Ŵ X‖² over quantized Ŵ. Row by row this is a quadratic with Hessian
H = 2 X Xᵀ (collected from calibration inputs with forward hooks). Quantizing column q of a row w to Q(w_q) and
re-optimising the remaining free columns F gives the Optimal Brain Surgeon update (README derives it):
    δ_F = −(w_q − Q(w_q)) / [H_F⁻¹]_qq · (H_F⁻¹)_{:,q}
GPTQ's three tricks make it fast and stable: the same column order for every row (so H⁻¹ is shared by all rows), the
rows of the upper Cholesky factor of H⁻¹ as the sequence of "remaining-columns" inverses (no re-inversion), and lazy
batched updates in blocks of 128 columns. Dampening H + λ·mean(diag H)·I keeps it positive definite; act-order
quantizes columns with the largest H_qq (most-used inputs) first.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ch06.quantize import QuantLinear, group_params, quantizable_linears, quantize_with, set_module


@torch.no_grad()
def gptq_quantize_weight(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
):
    """W (out, in), H (in, in) -> (codes uint8 (out, in), scale (out, G), zero (out, G), g_idx (in,) | None).

    Codes/scales use the asymmetric groupwise format of ``quantize.py`` so a ``QuantLinear`` can hold the result.
    """
    W = W.detach().clone().float()  # (out, in)
    H = H.detach().clone().float()  # (in, in)
    n_out, n_in = W.shape
    gs = min(group_size or n_in, n_in)
    block_size = max(block_size // gs, 1) * gs if group_size else block_size  # groups never straddle blocks

    dead = torch.diag(H) == 0  # inputs that were always zero: their weights don't matter
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n_in)
    W, H = W[:, perm], H[perm][:, perm]

    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(n_in)
    # Hinv = upper Cholesky factor of H⁻¹: row i holds the inverse Hessian of columns i.. after eliminating < i
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # (in, in)

    Q = torch.zeros_like(W, dtype=torch.uint8)  # integer codes, permuted column order
    n_groups = -(-n_in // gs)
    scales = torch.zeros(n_out, n_groups)
    zeros = torch.zeros(n_out, n_groups)
    if group_size is None:  # one range per row, fitted once on the original weights (as the GPTQ code does)
        s, z = group_params(W, bits)  # (out, 1) each
        scales[:, 0], zeros[:, 0] = s[:, 0], z[:, 0]
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = W[:, i1:i2].clone()  # (out, b): updated in place as errors arrive
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group_size and col % gs == 0:  # new group: fit its range on the error-updated weights
                g = col // gs
                s, z = group_params(W1[:, i : i + gs], bits)  # (out, 1) each
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            w = W1[:, i]  # (out,)
            q = quantize_with(w[:, None], s, z, bits)[:, 0]  # (out,) integer codes
            Q[:, col] = q.to(torch.uint8)
            err = (w - (q - z[:, 0]) * s[:, 0]) / Hinv1[i, i]  # (out,)
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # OBS update of this block's remaining columns
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of all later blocks

    inv = torch.argsort(perm)
    g_idx = None
    if act_order:  # group g = permuted columns [g·gs, (g+1)·gs): record each original column's group
        g_idx = (torch.arange(n_in) // gs)[inv]
    return Q[:, inv], scales, zeros, g_idx


class HessianHook:
    """Accumulates H = 2/N Σ x xᵀ over every input row a linear layer sees (running mean, as in the GPTQ code)."""

    def __init__(self, n_in: int):
        self.H = torch.zeros(n_in, n_in)
        self.n = 0

    def __call__(self, module, inputs, output):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()  # (N, in)
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = (2 / self.n) ** 0.5 * x
        self.H += x.T @ x


def _sequential_groups(model: nn.Module, include_lm_head: bool) -> list[list[str]]:
    """Layers quantized together, in forward order; each group sees inputs from already-quantized earlier groups
    ("true sequential" in the GPTQ code)."""
    groups = []
    for i in range(model.config.n_layer):
        p = f"blocks.{i}."
        groups += [
            [p + "attn.wq", p + "attn.wk", p + "attn.wv"],
            [p + "attn.wo"],
            [p + "mlp.w1", p + "mlp.w3"],
            [p + "mlp.w2"],
        ]
    if include_lm_head:
        groups.append(["lm_head"])
    return groups


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module,
    calib_ids: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    include_lm_head: bool = False,
    act_order: bool = False,
    percdamp: float = 0.01,
    block_size: int = 128,
    batch_size: int = 32,
) -> nn.Module:
    """A GPTQ-quantized deep copy of ``model``. calib_ids: (N, T) token windows from the training split."""
    qmodel = copy.deepcopy(model).eval()
    linears = quantizable_linears(qmodel, include_lm_head)
    for group in _sequential_groups(qmodel, include_lm_head):
        hooks = {name: HessianHook(linears[name].in_features) for name in group}
        handles = [linears[name].register_forward_hook(hooks[name]) for name in group]
        for b in range(0, len(calib_ids), batch_size):
            qmodel(calib_ids[b : b + batch_size])  # (B, T, V) logits unused: we only want the layer inputs
        for h in handles:
            h.remove()
        for name in group:
            q, s, z, g_idx = gptq_quantize_weight(
                linears[name].weight,
                hooks[name].H,
                bits,
                group_size,
                block_size=block_size,
                percdamp=percdamp,
                act_order=act_order,
            )
            set_module(qmodel, name, QuantLinear.from_codes(q, s, z, bits, group_size, g_idx))
    return qmodel


def calibration_windows(train_ids: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """(n_samples, seq_len) random windows of the training split (GPTQ used 128 × 2048 tokens of C4)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train_ids) - seq_len, (n_samples,), generator=g)
    return train_ids[starts[:, None] + torch.arange(seq_len)]  # (N, T)


def main(argv=None):
    from ch06.quantize import pretrained, print_loss_table, quant_row, quantize_model, script_parser
    from common.seed import seed_everything

    p = script_parser(__doc__, seed=True)
    p.add_argument("--bits", type=int, nargs="*", default=[4, 3])
    p.add_argument("--group-size", type=int, default=32, help="0 = one group per row")
    p.add_argument("--n-calib", type=int, default=128, help="calibration windows of block_size tokens")
    p.add_argument("--act-order", action="store_true")
    args = p.parse_args(argv)
    seed_everything(args.seed)
    model, _, (train_ids, val_ids) = pretrained(args)
    calib = calibration_windows(train_ids, args.n_calib, model.config.block_size, args.seed)
    gs = args.group_size or None
    rows = [quant_row("fp32", 32, "-", model, val_ids)]
    for bits in args.bits:
        for method in ("rtn", "gptq"):
            kw = {"calib_ids": calib, "act_order": args.act_order} if method == "gptq" else {}
            rows.append(quant_row(method, bits, gs, quantize_model(model, method, bits, gs, **kw), val_ids))
    return print_loss_table(rows, rows[0]["val_loss"])


if __name__ == "__main__":
    main()
