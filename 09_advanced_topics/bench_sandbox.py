"""Sandbox throughput: runs/s of a trivial program (``answer = 1``), one at a time and through ``run_many``.

With ``--baseline FILE`` an older ``sandbox.py`` (a self-contained one, e.g. from git) is loaded into this same process
and timed in alternation with the current sandbox, so both see the same machine load; the table reports medians over
``--reps`` rounds and the ratio to the baseline.

    python 09_advanced_topics/bench_sandbox.py
    git show <commit>:09_advanced_topics/sandbox.py > /tmp/sandbox_before.py
    python 09_advanced_topics/bench_sandbox.py --baseline /tmp/sandbox_before.py

Writes a markdown table to stdout and a bar plot to assets/ (or ``--out``).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time

import ch09.sandbox as current
from ch09.paths import plot_dir
from common.bench import hardware_info, markdown_table
from common.cli import base_parser
from common.plot import bar_plot


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("sandbox_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sandbox_baseline"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def throughput(sandbox, runs: int, par_runs: int, workers: int) -> tuple[float, float]:
    """(runs/s one at a time, runs/s through run_many) for ``answer = 1``; every run must succeed."""
    assert sandbox.run_program("answer = 1").answer == 1  # warm up
    t = time.perf_counter()
    for _ in range(runs):
        assert sandbox.run_program("answer = 1").answer == 1
    one = runs / (time.perf_counter() - t)
    t = time.perf_counter()
    assert [r.answer for r in sandbox.run_many(["answer = 1"] * par_runs, workers=workers)] == [1] * par_runs
    return one, par_runs / (time.perf_counter() - t)


def main(argv=None) -> dict:
    p = base_parser(__doc__, out=True)
    p.add_argument("--baseline", help="an older sandbox.py to time in the same process")
    p.add_argument("--runs", type=int, default=60, help="sequential runs per round")
    p.add_argument("--par-runs", type=int, default=120, help="runs through run_many per round")
    p.add_argument("--workers", type=int, default=4, help="run_many workers")
    p.add_argument("--reps", type=int, default=3, help="rounds (medians are reported)")
    args = p.parse_args(argv)
    if min(args.runs, args.par_runs, args.workers, args.reps) < 1:
        p.error("--runs, --par-runs, --workers and --reps must be at least 1")
    sandboxes = {"baseline": load_baseline(args.baseline)} if args.baseline else {}
    sandboxes["current"] = current
    print(f"{hardware_info()}; euid {os.geteuid()}; load {os.getloadavg()[0]:.1f}")
    samples = {name: [] for name in sandboxes}
    for _ in range(args.reps):
        for name, sandbox in sandboxes.items():
            samples[name].append(throughput(sandbox, args.runs, args.par_runs, args.workers))
    rows = []
    for name, s in samples.items():
        one, many = (statistics.median(x[i] for x in s) for i in (0, 1))
        rows.append({"sandbox": name, "runs/s one at a time": one, f"runs/s run_many({args.workers})": many})
    if args.baseline:
        for row in rows:
            keys = [k for k in row if k.startswith("runs/s")]
            row["ratio to baseline"] = " / ".join(f"{row[k] / rows[0][k]:.2f}" for k in keys)
    print(markdown_table(rows, floatfmt=".1f"))
    plot = bar_plot(
        {f"{r['sandbox']}\n{k.split(' ', 1)[1]}": r[k] for r in rows for k in r if k.startswith("runs/s")},
        plot_dir(args.out, __file__) / "sandbox_throughput.png",
        title="ch09 sandbox: trivial program",
        ylabel="runs / s",
    )
    print(f"plot: {plot}")
    return {"rows": rows, "samples": samples}


if __name__ == "__main__":
    main()
