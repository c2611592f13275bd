"""bitsandbytes on our model: export it as a Hugging Face Llama, reload with ``BitsAndBytesConfig`` as LLM.int8()
(8-bit, Dettmers et al. 2022) and as NF4 with double quantization (QLoRA's 4-bit format, Dettmers et al. 2023), and
compare memory footprint and val loss with fp32. bitsandbytes ≥ 0.47 ships CPU kernels, so this runs without a GPU.

    python 06_quantization/bnb.py                 # small model: fp32 vs int8 vs nf4 vs fp4
    python 06_quantization/bnb.py --preset tiny --iters 200

LLM.int8() keeps the few activation columns with outliers (|x| > 6) in fp16 and multiplies the rest with int8
weights (per-row absmax) and int8 activations (per-token absmax). NF4 stores weights in blocks of 64 as indices into
16 levels placed at the quantiles of a normal distribution (information-theoretically optimal for normally distributed
weights); double quantization also quantizes the per-block fp32 absmax constants to 8 bits (0.37 bits/param saved).
"""

from __future__ import annotations

import logging
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from ch01.hf_interop import save_hf
from ch01.model import GPT


class _DropCastWarning(logging.Filter):
    """bitsandbytes logs 'inputs will be cast from float32 to float16' on every 8-bit matmul; it is expected here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will be cast from" not in record.getMessage()


def silence_bnb_cast_warning() -> None:
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastWarning) for f in log.filters):
        log.addFilter(_DropCastWarning())


def bnb_config(mode: str):
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if mode in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=mode,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    raise ValueError(f"unknown bitsandbytes mode {mode!r}; choose int8, nf4 or fp4")


def load_bnb(model: GPT, mode: str, hf_dir: str | None = None):
    """Our model -> HF directory (ch01.hf_interop.save_hf) -> ``from_pretrained`` with a BitsAndBytesConfig on CPU."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            f"bitsandbytes is not installed ({e}); pip install 'bitsandbytes>=0.47' for CPU kernels"
        ) from None
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    silence_bnb_cast_warning()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        directory = hf_dir or tmp
        save_hf(model, directory)
        hf = AutoModelForCausalLM.from_pretrained(directory, quantization_config=bnb_config(mode), device_map="cpu")
    for m in hf.modules():
        # bitsandbytes 0.50's AVX512-bf16 CPU repacking assumes in_features is a multiple of the 4-bit block size
        # (64) and crashes otherwise (our small model's down_proj has 352 inputs); such layers take the generic path
        if type(m).__name__ == "Linear4bit" and m.in_features % m.weight.quant_state.blocksize:
            m.support_avx512bf16_for_cpu = False
    return hf.eval()


class HFCausalLM(nn.Module):
    """Gives a Hugging Face causal LM our model's ``loss`` / ``config.block_size`` so ch01's ``val_loss`` applies."""

    def __init__(self, hf, config):
        super().__init__()
        self.hf, self.config = hf, config

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=idx).logits.float()  # (B, T, V)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(idx)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def bnb_linear_types(hf) -> set[str]:
    return {type(m).__name__ for name, m in hf.named_modules() if name.endswith("q_proj")}


def main(argv=None):
    from ch01.evaluate import evaluate_loss
    from ch06.quantize import pretrained, print_loss_table, script_parser

    p = script_parser(__doc__, device=True)
    p.add_argument("--modes", nargs="*", default=["int8", "nf4", "fp4"])
    p.add_argument("--max-batches", type=int, default=20, help="val batches of 32 windows")
    args = p.parse_args(argv)
    if args.device not in ("auto", "cpu"):
        print("bnb.py runs the bitsandbytes CPU kernels; ignoring --device", args.device)
    model, _, (_, val_ids) = pretrained(args)
    from ch01.hf_interop import to_hf

    fp32 = to_hf(model)
    base = evaluate_loss(model, val_ids, max_batches=args.max_batches)
    rows = [
        {
            "mode": "fp32 (HF)",
            "linear": "Linear",
            "MB": fp32.get_memory_footprint() / 1e6,
            "val_loss": evaluate_loss(HFCausalLM(fp32, model.config), val_ids, max_batches=args.max_batches),
        }
    ]
    for mode in args.modes:
        hf = load_bnb(model, mode)
        rows.append(
            {
                "mode": mode,
                "linear": ",".join(sorted(bnb_linear_types(hf))),
                "MB": hf.get_memory_footprint() / 1e6,
                "val_loss": evaluate_loss(HFCausalLM(hf, model.config), val_ids, max_batches=args.max_batches),
            }
        )
    return print_loss_table(rows, base)


if __name__ == "__main__":
    main()
