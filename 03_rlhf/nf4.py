"""QLoRA from scratch: the frozen base stored as 4-bit NormalFloat (NF4) with double-quantized scales, LoRA on top.

Dettmers et al. 2023 (QLoRA), section 3:
* **NF4.** Pretrained weights are roughly N(0, σ²) inside a block, so after dividing a block of 64 by its absmax the
  values follow a (truncated) normal on [-1, 1]. The 16 levels that use 4 bits best are the normal's quantiles: 8
  levels from quantiles of the positive half, 7 of the negative half, and an exact 0 (so zero padding and zeros stay
  exact), with the outermost quantile at δ = ½(1/30 + 1/32) from the tail instead of the infinite one, and everything
  rescaled to [-1, 1]. Each weight stores the index of its nearest level.
* **Double quantization.** One fp32 absmax per 64 weights costs 32/64 = 0.5 bit per parameter; QLoRA quantizes those
  scales again, to 8 bits in blocks of 256 (after subtracting their mean), leaving 8/64 + 32/(64·256) ≈ 0.127 bits.
  The 8-bit code is bitsandbytes' "dynamic" data type (Dettmers 2016): a sign, a decade 10⁻⁶…10⁰ and a linear
  fraction whose resolution grows with the decade.
* **QLoRA** = ``NF4Linear`` (dequantize on the fly, compute in float) under ch03's ``LoRALinear``: gradients flow
  through the frozen 4-bit weights into the float A and B only.

    python 03_rlhf/nf4.py                     # tiny GPT: error of NF4 vs int4, and full FT vs LoRA vs QLoRA bytes
    python 03_rlhf/nf4.py --model smollm2     # the same table for SmolLM2-135M-Instruct

tests/test_03_lora.py checks the codebook, the packed bytes and the dequantized weights against bitsandbytes.
(Chapter 06 uses bitsandbytes' NF4 through transformers; this file is the format itself.)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ch03.lora import apply_lora, base_fingerprint, match_targets, set_module, trainable_parameters
from common.cli import base_parser

NF4_OFFSET = 1 - 0.5 * (1 / 30 + 1 / 32)  # = 0.9677083: the outermost quantile QLoRA uses instead of 1


@functools.cache
def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 levels (sorted, in [-1, 1]): 8 quantiles of the positive half of N(0, 1), 7 of the negative
    half, and an exact 0 — asymmetric, so that 0 is a level and all 16 codes are used."""
    q = torch.special.ndtri  # inverse normal CDF
    pos = q(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])  # 8 positive levels
    neg = -q(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])  # 7 negative levels
    levels = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values  # (16,)
    return (levels / levels.max()).float()


@functools.cache
def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic data type (256 sorted values in [-1, 1]): for decade i = 0…6, 2^i evenly
    spaced fractions (interval midpoints in [0.1, 1]) times 10^(i-6), with both signs, plus 0 and 1."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10 ** (i - 6)).tolist()
        values += mids + [-m for m in mids]
    return torch.tensor(sorted(values), dtype=torch.float32)  # (256,)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten, split into blocks (the last one zero-padded), scale each by its absmax and store the index of the
    nearest ``code`` value: -> (indices (n_blocks·blocksize,) uint8, absmax (n_blocks,) float32)."""
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % blocksize
    blocks = F.pad(flat, (0, pad)).view(-1, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)  # in [-1, 1]; × 1/absmax, as bnb
    midpoints = (code[:-1] + code[1:]) / 2  # nearest level = bucket between midpoints (code is sorted)
    return torch.bucketize(scaled.view(-1), midpoints).to(torch.uint8), absmax


def dequantize_blockwise(idx: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, n: int):
    idx = F.pad(idx.long(), (0, absmax.numel() * blocksize - idx.numel()))  # whole blocks again
    blocks = code[idx].view(-1, blocksize) * absmax[:, None]  # (n_blocks, blocksize)
    return blocks.view(-1)[:n]


@dataclass
class NF4Tensor:
    """A weight in QLoRA's storage: two 4-bit indices per byte, and the block scales (fp32, or 8-bit + second level)."""

    packed: torch.Tensor  # (ceil(n/2),) uint8: first index in the high nibble (bitsandbytes' order)
    absmax: torch.Tensor  # (n_blocks,) fp32, or uint8 indices into dynamic_code() with double quantization
    shape: tuple[int, ...]
    blocksize: int = 64
    absmax2: torch.Tensor | None = None  # (n_blocks / 256,) fp32 scales of the quantized absmax
    offset: float = 0.0  # mean absmax, subtracted before the second quantization
    dq_blocksize: int = 256

    def scales(self) -> torch.Tensor:
        if self.absmax2 is None:
            return self.absmax
        return (
            dequantize_blockwise(self.absmax, self.absmax2, dynamic_code(), self.dq_blocksize, self.absmax.numel())
            + self.offset
        )

    def nbytes(self) -> int:
        extra = 0 if self.absmax2 is None else self.absmax2.numel() * 4 + 4
        return self.packed.numel() + self.absmax.numel() * self.absmax.element_size() + extra


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256) -> NF4Tensor:
    if blocksize % 2:
        raise ValueError(f"NF4 packs two indices per byte: blocksize must be even, got {blocksize}")
    idx, absmax = quantize_blockwise(w, nf4_codebook(), blocksize)  # (n_pad,), (n_blocks,)
    n = w.numel()
    idx = idx[: n + n % 2]  # bitsandbytes keeps exactly ceil(n/2) bytes
    packed = (idx[0::2] << 4) | idx[1::2]  # (ceil(n/2),)
    q = NF4Tensor(packed, absmax, tuple(w.shape), blocksize, dq_blocksize=dq_blocksize)
    if double_quant:
        q.offset = absmax.mean().item()
        q.absmax, q.absmax2 = quantize_blockwise(absmax - q.offset, dynamic_code(), dq_blocksize)
        q.absmax = q.absmax[: absmax.numel()]
    return q


def dequantize_nf4(q: NF4Tensor) -> torch.Tensor:
    n = int(torch.tensor(q.shape).prod())
    idx = torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).view(-1)[:n]  # (n,) unpacked in storage order
    return dequantize_blockwise(idx, q.scales(), nf4_codebook(), q.blocksize, n).view(q.shape)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight lives as NF4 (buffers, no parameters); dequantized for every matmul."""

    is_quantized_linear = True  # lets ch03.lora wrap it

    def __init__(self, q: NF4Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.meta = {k: getattr(q, k) for k in ("shape", "blocksize", "offset", "dq_blocksize")}
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("absmax2", q.absmax2)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> NF4Linear:
        return cls(quantize_nf4(linear.weight, **kwargs), linear.bias)

    def nf4(self) -> NF4Tensor:
        return NF4Tensor(self.packed, self.absmax, absmax2=self.absmax2, **self.meta)

    def dequantize(self) -> torch.Tensor:
        return dequantize_nf4(self.nf4())  # (out, in) float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def apply_qlora(model: nn.Module, targets: list[str], rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, **nf4):
    """QLoRA in place: the targeted linear layers become frozen NF4 layers, each under a float LoRA adapter. The
    adapter records the fingerprint of the float base, so it also loads onto the unquantized model."""
    fingerprint = base_fingerprint(model)
    for name in match_targets(model, targets):
        set_module(model, name, NF4Linear.from_linear(model.get_submodule(name), **nf4))
    return apply_lora(model, targets, rank, alpha, dropout, fingerprint=fingerprint)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters + buffers (a tied tensor counted once)."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    return sum(seen.values())


def footprint_table(make_model, targets: list[str], rank: int, alpha: float) -> list[dict]:
    """Trainable parameters and bytes of weights for full fine-tuning, LoRA and QLoRA (each on a fresh model)."""
    rows = []
    for method in ("full fine-tuning", "LoRA", "QLoRA (NF4 + double quant)"):
        model = make_model()
        if method == "LoRA":
            apply_lora(model, targets, rank, alpha)
        elif method.startswith("QLoRA"):
            apply_qlora(model, targets, rank, alpha)
        rows.append({"method": method, "trainable": trainable_parameters(model), "bytes": weight_bytes(model)})
    return rows


def _make_model(name: str, seed: int):
    from ch01.model import GPT, GPTConfig

    if name == "smollm2":
        from ch01.pretrained import load_pretrained

        return load_pretrained("smollm2-135m-instruct")[0]
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset(name, vocab_size=256))


def main(argv=None) -> dict:
    p = base_parser(__doc__, seed=True)
    p.add_argument("--model", default="tiny", help="a ch01 preset (random init, vocab 256) or 'smollm2'")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", nargs="+", default=["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    w = torch.randn(256, 1024) * 0.02  # normally distributed, as pretrained weights roughly are
    nf4_err = (dequantize_nf4(quantize_nf4(w)) - w).pow(2).mean().sqrt().item()
    int4 = torch.linspace(-1, 1, 15)  # a uniform symmetric 4-bit grid with the same block absmax, for contrast
    idx, am = quantize_blockwise(w, int4, 64)
    int4_err = (dequantize_blockwise(idx, am, int4, 64, w.numel()).view_as(w) - w).pow(2).mean().sqrt().item()
    print(f"RMS error on N(0, 0.02²) weights, blocks of 64: NF4 {nf4_err:.2e}, uniform int4 {int4_err:.2e}\n")
    rows = footprint_table(lambda: _make_model(args.model, args.seed), args.targets, args.rank, args.alpha)
    print(f"model {args.model}, rank {args.rank} on {', '.join(args.targets)}\n")
    print("| method | trainable parameters | weight bytes (MB) | vs full | + grads & AdamW state (MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        state = 12 * r["trainable"] / 1e6  # fp32 gradient + two AdamW moments per trainable parameter
        ratio = r["bytes"] / rows[0]["bytes"]
        print(f"| {r['method']} | {r['trainable']:,} | {r['bytes'] / 1e6:.2f} | {ratio:.2f}× | {state:.2f} |")
    return {"nf4_rmse": nf4_err, "int4_rmse": int4_err, "rows": rows}


if __name__ == "__main__":
    main()
