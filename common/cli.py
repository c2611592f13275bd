"""The arguments scripts share, so each ``--help`` looks alike — and a script offers only the flags it honours.

p = base_parser(__doc__, device=True, seed=True)      # opt in to exactly what main() reads
"""

from __future__ import annotations

import argparse

from common.device import CHOICES, pick_device


def _device_arg(value: str) -> str:
    """Reject a device this machine lacks at parse time: one clear sentence from argparse, not a traceback."""
    if value in CHOICES:
        try:
            pick_device(value)
        except RuntimeError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return value


def base_parser(
    description: str | None,
    *,
    device: bool = False,
    seed: bool = False,
    dtype: bool = False,
    out: bool = False,
    out_default: str | None = None,
) -> argparse.ArgumentParser:
    """An ArgumentParser with the docstring as help and the shared flags a script asks for: ``--device``,
    ``--seed``, ``--dtype`` (compute dtype), ``--out`` (where results are written)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if device:
        p.add_argument(
            "--device", default="auto", choices=CHOICES, type=_device_arg, help="where to run (auto: cuda > mps > cpu)"
        )
    if seed:
        p.add_argument("--seed", type=int, default=1337, help="random seed")
    if dtype:
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype")
    if out:
        p.add_argument("--out", default=out_default, help="output directory or file for results")
    return p
