"""Round-to-nearest (RTN) weight-only quantization of the mini-GPT: int8 symmetric per output channel, and 2–4 bit
asymmetric groupwise codes bit-packed several to a byte (two int4 values per byte), held by ``QuantLinear`` modules that
dequantize on the fly.

    python 06_quantization/quantize.py                      # int8 / int4 g32,g128 / int3 on the cached small model
    python 06_quantization/quantize.py --bits 4 --group-size 64

    from ch06.quantize import quantize_model
    qmodel = quantize_model(model, method="rtn", bits=4, group_size=32)   # a deep copy; model is untouched

Number formats: int8 symmetric stores w ≈ s·q, q ∈ [-127, 127], one fp32 scale per output row (the LLM.int8 "vector-wise"
scale, Dettmers 2022). The low-bit format stores w ≈ s·(q − z), q ∈ [0, 2^b − 1], with one (scale, zero-point) pair per
``group_size`` consecutive input columns, as in GPTQ/AWQ checkpoints (Frantar 2022). RTN rounds each weight on its own;
gptq.py shows what is gained by letting later columns absorb each rounding error.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------- int8 per channel


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> (q int8 (out, in), scale fp32 (out, 1)) with w ≈ scale · q, symmetric, |q| ≤ 127."""
    scale = w.abs().amax(dim=1, keepdim=True).float() / 127.0  # (out, 1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row stays zero
    q = torch.round(w.float() / scale).clamp(-127, 127).to(torch.int8)  # (out, in)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale  # (out, in)


# -------------------------------------------------------------------------------------- low-bit groupwise (asym.)


def group_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max parameters for each row of w (rows, n): scale (rows, 1) and integer zero-point (rows, 1).

    The range always includes 0 so that an exact zero weight (e.g. after pruning) stays exactly representable.
    """
    qmax = 2**bits - 1
    wmin = w.amin(dim=1, keepdim=True).clamp(max=0).float()
    wmax = w.amax(dim=1, keepdim=True).clamp(min=0).float()
    scale = (wmax - wmin) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.round(-wmin / scale).clamp(0, qmax)
    return scale, zero


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes q = clamp(round(w / s) + z, 0, 2^b − 1) (broadcast over w)."""
    return (torch.round(w.float() / scale) + zero).clamp(0, 2**bits - 1)


def quantize_groupwise(w: torch.Tensor, bits: int, group_size: int | None):
    """w (out, in) -> (codes uint8 (out, in), scale (out, G), zero (out, G)); group_size None = one group per row."""
    out_f, in_f = w.shape
    gs = min(group_size or in_f, in_f)
    n_groups = -(-in_f // gs)  # a ragged last group is allowed (e.g. 352 columns in groups of 128)
    # zero padding changes no group's parameters: the quantization range always contains 0
    wp = F.pad(w.float(), (0, n_groups * gs - in_f))  # (out, G·gs)
    wg = wp.reshape(out_f * n_groups, gs)  # (out·G, gs): one row per group
    scale, zero = group_params(wg, bits)  # (out·G, 1)
    q = quantize_with(wg, scale, zero, bits).to(torch.uint8).reshape(out_f, n_groups * gs)[:, :in_f]
    return q, scale.reshape(out_f, n_groups), zero.reshape(out_f, n_groups)


def dequantize_groupwise(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int | None = None,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """codes (out, in), scale/zero (out, G) -> w (out, in); g_idx (in,) maps columns to groups (default contiguous)."""
    out_f, in_f = q.shape
    if g_idx is None:
        g_idx = torch.arange(in_f, device=q.device) // min(group_size or in_f, in_f)
    return (q.float() - zero[:, g_idx]) * scale[:, g_idx]  # (out, in)


# ---------------------------------------------------------------------------------------------------- bit packing


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes in [0, 2^bits) densely: every 8 codes -> ``bits`` bytes, little-endian (code 0 in the lowest bits).

    For bits=4 this is the usual two-per-byte layout: byte j = q[2j] | q[2j+1] << 4.
    """
    if q.numel() % 8:
        raise ValueError(f"pack_bits needs a multiple of 8 values, got {q.numel()}")
    if q.numel() and int(q.max()) >= 2**bits:
        raise ValueError(f"code {int(q.max())} does not fit in {bits} bits")
    groups = q.reshape(-1, 8).to(torch.int64)  # (N, 8)
    shifts = torch.arange(8, device=q.device) * bits
    word = (groups << shifts).sum(dim=1, keepdim=True)  # (N, 1): 8·bits significant bits
    out = (word >> (torch.arange(bits, device=q.device) * 8)) & 0xFF  # (N, bits)
    return out.to(torch.uint8).reshape(-1)


def unpack_bits(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``pack_bits``: uint8 bytes -> uint8 codes of ``shape``."""
    chunks = packed.reshape(-1, bits).to(torch.int64)  # (N, bits)
    word = (chunks << (torch.arange(bits, device=packed.device) * 8)).sum(dim=1, keepdim=True)  # (N, 1)
    codes = (word >> (torch.arange(8, device=packed.device) * bits)) & (2**bits - 1)  # (N, 8)
    return codes.to(torch.uint8).reshape(shape)


# ---------------------------------------------------------------------------------------------------- QuantLinear


class QuantLinear(nn.Module):
    """A bias-free linear layer whose weight is stored quantized and dequantized on every forward.

    Symmetric (``zero`` None; RTN int8): ``qweight`` int8, ``scale`` (out, 1).
    Asymmetric groupwise (any bits, e.g. RTN int4 or GPTQ): packed uint8 bytes, ``scale``/``zero`` (out, G), optional
    ``g_idx``.
    The dequantize-then-matmul path is what a CPU reference does; fused kernels (ch07 / bitsandbytes / llama.cpp)
    skip materialising the fp32 weight.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None):
        super().__init__()
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"bits={bits} not supported; choose 2, 3, 4 or 8")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.register_buffer("g_idx", None)  # column -> group map, only for act-order GPTQ
        self.symmetric = False

    @classmethod
    def from_codes(cls, q, scale, zero, bits, group_size, g_idx=None) -> QuantLinear:
        """Build from integer codes (out, in) and their parameters (used by RTN and GPTQ alike)."""
        out_f, in_f = q.shape
        m = cls(in_f, out_f, bits, group_size)
        if zero is None:
            if bits != 8:
                raise ValueError("symmetric (zero-point-free) codes are supported for bits=8 only")
            m.symmetric = True
            m.register_buffer("qweight", q.to(torch.int8))
            m.register_buffer("scale", scale.float())
        else:
            m.register_buffer("qweight", pack_bits(q.to(torch.uint8), bits))
            m.register_buffer("scale", scale.float())
            m.register_buffer("zero", zero.to(torch.uint8))  # zero-points are integers in [0, 2^b)
            if g_idx is not None:
                m.register_buffer("g_idx", g_idx.to(torch.int32))
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = None) -> QuantLinear:
        if linear.bias is not None:
            raise ValueError("QuantLinear handles bias-free layers only (the mini-GPT has no biases)")
        w = linear.weight.detach()
        if bits == 8:
            q, scale = quantize_int8_per_channel(w)
            return cls.from_codes(q, scale, None, 8, None)
        q, scale, zero = quantize_groupwise(w, bits, group_size)
        return cls.from_codes(q, scale, zero, bits, group_size)

    def dequantized_weight(self) -> torch.Tensor:
        if self.symmetric:
            return dequantize_int8(self.qweight, self.scale)
        q = unpack_bits(self.qweight, self.bits, (self.out_features, self.in_features))
        g_idx = None if self.g_idx is None else self.g_idx.long()
        return dequantize_groupwise(q, self.scale, self.zero.float(), self.group_size, g_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


# ------------------------------------------------------------------------------------------------ whole model


def quantizable_linears(model: nn.Module, include_lm_head: bool = False) -> dict[str, nn.Linear]:
    """The transformer blocks' linear layers (q/k/v/o, gate/up/down); embeddings and norms stay fp32 as is usual."""
    out = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("blocks.")}
    if include_lm_head and not model.config.tie_weights:
        out["lm_head"] = model.lm_head
    return out


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(
    model: nn.Module,
    method: str = "rtn",
    bits: int = 8,
    group_size: int | None = None,
    include_lm_head: bool = False,
    **gptq_kwargs,
) -> nn.Module:
    """A quantized deep copy of ``model``. method "rtn" (round to nearest) or "gptq" (needs ``calib_ids`` (N, T))."""
    if method == "gptq":
        from ch06.gptq import gptq_quantize_model

        return gptq_quantize_model(
            model, bits=bits, group_size=group_size, include_lm_head=include_lm_head, **gptq_kwargs
        )
    if method != "rtn":
        raise ValueError(f"unknown method {method!r}; choose rtn or gptq")
    qmodel = copy.deepcopy(model)
    for name, linear in quantizable_linears(qmodel, include_lm_head).items():
        set_module(qmodel, name, QuantLinear.from_linear(linear, bits, group_size))
    return qmodel


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer as stored (packed codes count at their packed size)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:  # tied weights count once
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------------------------- the chapter's scripts


def script_parser(doc: str, **flags):
    """``common.cli.base_parser`` plus the model every script of this chapter measures: ch01's cached char model."""
    from common.cli import base_parser

    p = base_parser(doc.split("\n\n")[0], **flags)
    p.add_argument("--preset", default="small", help="ch01 preset of the cached pretrained char model")
    p.add_argument("--iters", type=int, default=2000, help="training iterations of the cached model")
    return p


def pretrained(args):
    """(model, tokenizer, (train_ids, val_ids)): ch01's char model of ``--preset``, trained ``--iters`` (cached)."""
    from ch01.pretrained import pretrained_char_model

    return pretrained_char_model(args.preset, max_iters=args.iters)


def quant_row(method: str, bits: int, group, model, val_ids) -> dict:
    """A table row: how ``model`` was quantized, its stored size (MB) and its val loss (``ch01.evaluate_loss``)."""
    from ch01.evaluate import evaluate_loss

    mb = model_size_bytes(model) / 1e6
    return {
        "method": method,
        "bits": bits,
        "group": group or "row",
        "MB": mb,
        "val_loss": evaluate_loss(model, val_ids),
    }


def print_loss_table(rows: list[dict], base: float) -> list[dict]:
    """Adds each row's val-loss change over ``base`` (``delta_%``), prints the rows as a markdown table, returns them."""
    from common.bench import markdown_table

    for r in rows:
        r["delta_%"] = 100 * (r["val_loss"] / base - 1)
    print(markdown_table(rows))
    return rows


def main(argv=None):
    from common.seed import seed_everything

    p = script_parser(__doc__, seed=True)
    p.add_argument("--bits", type=int, nargs="*", default=None, help="only these bit widths (default: 8 4 3)")
    p.add_argument("--group-size", type=int, default=None, help="only this group size for low-bit RTN")
    args = p.parse_args(argv)
    seed_everything(args.seed)
    model, _, (_, val_ids) = pretrained(args)
    rows = [quant_row("fp32", 32, "-", model, val_ids)]
    configs = [(8, None), (4, 32), (4, 128), (4, None), (3, 32)]
    if args.bits:
        configs = [c for c in configs if c[0] in args.bits]
    if args.group_size:
        configs = [(b, None if b == 8 else args.group_size) for b in sorted({b for b, _ in configs}, reverse=True)]
    for bits, gs in configs:
        rows.append(quant_row("rtn", bits, gs, quantize_model(model, "rtn", bits, gs), val_ids))
    return print_loss_table(rows, rows[0]["val_loss"])


if __name__ == "__main__":
    main()
