"""Where the chapter's scripts write their plots: ``--out DIR`` if given (tests use a temporary folder), else assets/."""

from __future__ import annotations

from pathlib import Path

from common.plot import assets_dir


def plot_dir(out: str | None, script_file: str) -> Path:
    if out:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return assets_dir(script_file)
