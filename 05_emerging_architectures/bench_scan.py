"""Parallel scans vs the sequential loop for Mamba's selective scan, over sequence lengths L = 256 … 4096.

Times the whole ``selective_scan`` (discretisation, scan, readout C·h) for one sequence, forward only (inference /
prefill) and forward + backward (training), for the sequential loop, the chunked scan fused by torch.compile
(compiledscan.py, ``scan="compiled"``), the log-space chunked scan (logscan.py, the default eager "parallel" path) and
the generic associative chunked scan on (a, b) (scan.py). The compiled path's one-time compile (plus first call) is
timed separately and printed; the timed calls are warm.
Reports wall-clock medians and, because the machine may be shared, also CPU time per call (``time.process_time``),
which other jobs disturb much less (with --threads > 1, CPU time adds up over threads: read wall time).

    python 05_emerging_architectures/bench_scan.py                              # L = 256 … 4096, E=128, N=16
    python 05_emerging_architectures/bench_scan.py --lengths 2048 --threads 2 --no-plot

Reference: Blelloch 1990 (prefix sums); Gu & Dao 2023 (Mamba, hardware-aware scan); alxndrTL/mamba.py (pscan).
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import torch

from ch05.logscan import choose_chunk
from ch05.scan import parallel_scan, selective_scan, sequential_scan
from common.bench import hardware_info, markdown_table
from common.cli import base_parser
from common.plot import assets_dir

COMPILED = "parallel (compiled chunks)"
PARALLEL = "parallel (log-space chunks)"
VARIANTS = {
    "sequential": sequential_scan,
    COMPILED: "compiled",
    PARALLEL: "parallel",
    "associative (chunked, stepped)": partial(parallel_scan, inner="stepped"),
}


def _time(fn, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds) over ``repeats`` calls after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def inputs(L: int, E: int, N: int, seed: int = 0, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    u, B, C = torch.randn(1, L, E, generator=g), torch.randn(1, L, N, generator=g), torch.randn(1, L, N, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(1, L, E, generator=g) - 3)  # Δ ≈ 0.05, as at Mamba's init
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)  # S4D-real init
    D = torch.ones(E)
    return [t.requires_grad_(requires_grad) for t in (u, delta, A, B, C, D)]


def run_case(L: int, E: int, N: int, variant: str, backward: bool, repeats: int) -> tuple[float, float]:
    args = inputs(L, E, N, requires_grad=backward)
    scan = VARIANTS[variant]

    def fn():
        if backward:
            selective_scan(*args, scan=scan).sum().backward()
        else:
            with torch.no_grad():
                selective_scan(*args, scan=scan)

    return _time(fn, repeats)


def plot_scan(rows: list[dict], path, title: str):
    """Forward and forward+backward side by side (same log y axis), one colour per variant, legend below the panels."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    for ax, mode in zip(axes, ("forward", "fwd+bwd")):
        for i, v in enumerate(VARIANTS):
            pts = [(r["L"], r[f"{v} CPU ms"]) for r in rows if r["pass"] == mode and f"{v} CPU ms" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=v)
        ax.set(yscale="log", title=mode, xlabel="sequence length L")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("CPU ms per call (median, log scale)")
    fig.suptitle(title)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    p = base_parser(__doc__, seed=True)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--d-inner", type=int, default=128, help="E: channels (expand · d_model)")
    p.add_argument("--d-state", type=int, default=16, help="N: state size per channel")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-seq-backward", type=int, default=2048, help="skip the sequential fwd+bwd beyond this L")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the README's main table: 1)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    check = inputs(300, args.d_inner, args.d_state)  # the variants must agree before they are timed (same E, N)
    ref = selective_scan(*check, scan=sequential_scan)
    for variant, scan in VARIANTS.items():
        start = time.perf_counter()
        err = ((selective_scan(*check, scan=scan) - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()
        if variant == COMPILED:  # the first call compiles (or loads inductor's on-disk cache)
            compile_s = time.perf_counter() - start
        if err > 1e-5:
            raise RuntimeError(f"{variant} disagrees with the sequential scan by {err:.2e}")
    rows = []
    for mode, backward in (("forward", False), ("fwd+bwd", True)):
        for L in args.lengths:
            row = {"pass": mode, "L": L}
            times = {}
            for variant in VARIANTS:
                if backward and variant == "sequential" and L > args.max_seq_backward:
                    continue
                times[variant] = run_case(L, args.d_inner, args.d_state, variant, backward, args.repeats)
                row[f"{variant} ms"] = times[variant][0] * 1e3
                row[f"{variant} CPU ms"] = times[variant][1] * 1e3
            seq = times.get("sequential")
            for name, variant in (("compiled", COMPILED), ("log-space", PARALLEL)):
                par = times[variant]
                row[f"speed-up {name} (wall)"] = seq[0] / par[0] if seq else float("nan")
                row[f"speed-up {name} (CPU time)"] = seq[1] / par[1] if seq else float("nan")
            rows.append(row)
            print(f"{mode} L={L}: {row}", flush=True)
    chunks = {L: choose_chunk(*inputs(L, args.d_inner, args.d_state)[1:3]) for L in args.lengths}
    print(
        f"\n{hardware_info()}\nselective scan, batch 1, E={args.d_inner}, N={args.d_state}, float32, "
        f"{torch.get_num_threads()} thread(s); medians of {args.repeats}; log-space chunk length by L: {chunks}; "
        f"compiled path: first call (compile or cache load) {compile_s:.1f} s\n"
        f"{markdown_table(rows, floatfmt='.2f')}"
    )
    plot = None
    if not args.no_plot:
        title = f"selective scan (E={args.d_inner}, N={args.d_state}, 1 sequence, {torch.get_num_threads()} thread)"
        plot = plot_scan(rows, assets_dir(__file__) / "bench_scan.png", title)
        print(f"plot: {plot}")
    return {"rows": rows, "plot": str(plot) if plot else None, "compile_s": compile_s}


if __name__ == "__main__":
    main()
