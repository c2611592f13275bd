"""The arguments every script shares, so each ``--help`` looks alike."""

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


def base_parser(description: str | None, out: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with ``--device``, ``--seed``, ``--dtype`` and ``--out`` (where results are written)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=CHOICES, type=_device_arg, help="where to run (auto: cuda > mps > cpu)")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype")
    p.add_argument("--out", default=out, help="output directory or file for results")
    return p
