"""Measure, don't guess: wall time (warm-up, repeats, median and spread), peak memory, side-by-side ratios, tables."""

from __future__ import annotations

import functools
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from common.device import synchronize


@dataclass
class Timing:
    median: float  # seconds
    p10: float
    p90: float
    min: float
    repeats: int

    def __str__(self) -> str:
        return f"{self.median * 1e3:.3f} ms (p10 {self.p10 * 1e3:.3f}, p90 {self.p90 * 1e3:.3f}, n={self.repeats})"


def timeit(
    fn: Callable[[], object],
    warmup: int = 2,
    repeats: int = 10,
    device: str | torch.device = "cpu",
    min_time: float = 0.0,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then at least ``repeats`` timed calls (and at least ``min_time`` s)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_time:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return Timing(median=statistics.median(times), p10=q[0], p90=q[-1], min=times[0], repeats=len(times))


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``) so the next RSS growth shows real allocations.

    Without this an allocation can reuse pages that an earlier, bigger call freed but the allocator kept: RSS does not
    grow and a small working set reads as 0 MiB. No-op where glibc is not available."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn: Callable[[], object], device: str | torch.device = "cpu", interval: float = 2e-4) -> int:
    """Peak extra memory (bytes) while ``fn()`` runs: CUDA max-allocated, else sampled process RSS above the start."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not os.path.exists("/proc/self/statm"):
        import tracemalloc  # fallback off Linux: counts Python-level allocations only

        tracemalloc.start()
        fn()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak
    release_free_memory()
    base = _rss_bytes()
    peak = base
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(interval)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    peak = max(peak, _rss_bytes())
    return peak - base


def compare(fns: Mapping[str, Callable[[], object]], baseline: str | None = None, **timeit_kwargs) -> list[dict]:
    """Time several implementations of the same thing; each row gets ``speedup`` = baseline time / its time."""
    timings = {name: timeit(fn, **timeit_kwargs) for name, fn in fns.items()}
    base = timings[baseline or next(iter(fns))].median
    return [
        {
            "name": name,
            "median_ms": t.median * 1e3,
            "p10_ms": t.p10 * 1e3,
            "p90_ms": t.p90 * 1e3,
            "speedup": base / t.median,
        }
        for name, t in timings.items()
    ]


def markdown_table(
    rows: Sequence[Mapping[str, object]],
    columns: Sequence[str] | None = None,
    floatfmt: str = ".3f",
    formats: Mapping[str, str] | None = None,
) -> str:
    """Rows of dicts → a GitHub markdown table. Floats use ``floatfmt``; ``formats`` gives a column its own format spec
    for its numbers (``{"|Δ|": ".1e", "bytes": ","}``). No rows: the header alone if ``columns`` are given, else ""."""
    if not rows and not columns:
        return ""
    columns = list(columns or rows[0].keys())
    formats = formats or {}

    def fmt(column, v):
        if column in formats and isinstance(v, (int, float)) and not isinstance(v, bool):
            return format(v, formats[column])
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(c, r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def read_bandwidth_gbs(mib: int = 512, repeats: int = 3) -> float:
    """Calibration: GB/s at which this process reads float32 memory (``torch.sum`` over ``mib`` MiB, median)."""
    x = torch.ones(mib * 2**18)
    return x.numel() * 4 / timeit(lambda: x.sum(), warmup=1, repeats=repeats).median / 1e9


def sgemm_gflops(n: int = 512, repeats: int = 5) -> float:
    """Calibration: float32 GFLOP/s of one n×n @ n×n matmul (median) — what compute-bound code can expect here."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / timeit(lambda: a @ b, warmup=2, repeats=repeats).median / 1e9


@functools.cache
def calibration(threads: int) -> str:
    """The line "sgemm X GFLOP/s, memory read Y GB/s" at ``threads`` threads, measured once per process (~0.3 s): machines
    differ several-fold, so absolute timings are printed beside it (ratios in one run are what compare)."""
    return f"sgemm {sgemm_gflops():.0f} GFLOP/s, memory read {read_bandwidth_gbs(256):.1f} GB/s"


def hardware_info(device: str | torch.device = "cpu", calibrate: bool = True) -> str:
    """One line naming the machine, for the header of every benchmark table; on a CPU it ends with a calibration
    (``calibration()``: sgemm GFLOP/s and memory read GB/s at the current thread count)."""
    device = torch.device(device)
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        hw = f"{cpu}, {os.cpu_count()} cores"
    line = f"{hw}; torch {torch.__version__}; {torch.get_num_threads()} threads; Python {platform.python_version()}"
    if calibrate and device.type == "cpu":
        line += f"; {calibration(torch.get_num_threads())}"
    return line
