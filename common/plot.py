"""Matplotlib (Agg, no screen needed) helpers that save PNGs into a chapter's ``assets/``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


def assets_dir(chapter_dir: str | Path) -> Path:
    """``<chapter>/assets`` (created); ``chapter_dir`` may be a folder name or any file inside the chapter."""
    p = Path(chapter_dir)
    if p.suffix == ".py":
        p = p.resolve().parent
    if not p.is_absolute():
        p = REPO_ROOT / p
    out = p / "assets"
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_fig(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    logx: bool = False,
    logy: bool = False,
    marker: str = "o",
    legend_outside: bool = False,
    integer_x: bool = False,
) -> Path:
    """One line per ``name -> (xs, ys)``; saved to ``path``. ``legend_outside``: beside the axes (many lines);
    ``integer_x``: only whole-number ticks on x (rounds, epochs)."""
    fig, ax = plt.subplots(figsize=(9.0, 4.2) if legend_outside else (6.4, 4.2))
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker=marker if len(xs) < 40 else None, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    if integer_x:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if len(series) > 1 and legend_outside:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    elif len(series) > 1:
        ax.legend()
    return save_fig(fig, path)


def bar_plot(values: Mapping[str, float], path: str | Path, *, title: str = "", ylabel: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.bar(list(values), list(values.values()))
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)
    return save_fig(fig, path)
