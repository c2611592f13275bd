"""Pick a torch device for ``--device auto`` and say why; which dtypes each device handles well."""

from __future__ import annotations

import torch

CHOICES = ("auto", "cpu", "cuda", "mps")


def pick_device(requested: str = "auto", verbose: bool = False) -> torch.device:
    """Return the device to use: ``cuda`` > ``mps`` > ``cpu`` for ``auto``; an explicit choice must exist."""
    if requested not in CHOICES:
        raise ValueError(f"unknown device {requested!r}; choose one of {', '.join(CHOICES)}")
    cuda_ok = torch.cuda.is_available()
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        if cuda_ok:
            device, why = torch.device("cuda"), f"CUDA available ({torch.cuda.get_device_name(0)})"
        elif mps_ok:
            device, why = torch.device("mps"), "Apple MPS available"
        else:
            device, why = torch.device("cpu"), "no CUDA or MPS found"
    else:
        if requested == "cuda" and not cuda_ok:
            raise RuntimeError("--device cuda was requested but torch sees no CUDA GPU; use --device auto or cpu")
        if requested == "mps" and not mps_ok:
            raise RuntimeError("--device mps was requested but MPS is not available; use --device auto or cpu")
        device, why = torch.device(requested), "requested explicitly"
    if verbose:
        print(f"device: {device} ({why})")
    return device


def supports_dtype(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether matmuls in ``dtype`` are supported (and sensible) on ``device``."""
    device = torch.device(device)
    if dtype == torch.float32:
        return True
    if device.type == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    if device.type == "mps":
        return dtype in (torch.float16, torch.bfloat16)
    return dtype == torch.bfloat16  # CPU: bf16 autocast works; fp16 matmuls are slow or missing


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """Mixed-precision dtype for training on ``device``; None means plain float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None  # on CPU, bf16 autocast is slower than fp32 for small models


def parse_dtype(name: str) -> torch.dtype:
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(table)}")
    return table[name]


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
