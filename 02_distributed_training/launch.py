"""Start N ranks on one machine, run a worker function on each, and collect their results — the one launcher every
script in this chapter uses, so each runs both ways:

    torchrun --standalone --nproc_per_node=2 02_distributed_training/ddp.py      # torchrun starts the ranks
    python 02_distributed_training/ddp.py --nproc 2                             # we spawn them ourselves

Under torchrun (``RANK``/``WORLD_SIZE`` in the environment) :func:`launch` just initialises the process group from the
environment and calls the worker once, in this process. Otherwise it spawns ``nproc`` fresh interpreters with
``torch.multiprocessing`` (start method "spawn": forking a process that already runs torch's thread pools can deadlock),
and each rank joins a process group through a rendezvous *file* in a fresh temp directory (no TCP port to pick, so no
"address already in use" race with other jobs on the machine). Backend: NCCL when every rank has its own CUDA GPU,
gloo otherwise (CPU).

Teardown and the gloo exit race
-------------------------------
Each rank ends with ``barrier()``, drops its references to models/optimizers/DTensors, then ``destroy_process_group()``.
Even so, gloo sometimes aborts while the interpreter exits (``terminate called without an active exception``: a gloo
background thread is still joinable when its C++ destructor runs). The results are already computed by then, so the
launcher makes that abort harmless: every rank writes its result to ``<tmp>/rank<r>.pt`` (``torch.save``; read back with
``weights_only=True``, never unpickling code) *before* teardown, and the parent judges the results, not the exit codes.
A rank that died before writing its result — a real failure — raises :class:`WorkerError` with that rank's traceback.
A rank that wrote its result and then exited non-zero is reported on stderr and otherwise ignored.

References: PyTorch "Writing distributed applications" tutorial; torchrun (torch.distributed.run) docs.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class WorkerError(RuntimeError):
    """A rank failed (raised, hung, or was killed) before it reported a result."""


def under_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS)


def pick_backend(device: str = "auto") -> str:
    """ "nccl" when each local rank can have its own GPU, else "gloo" (CPU)."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return "nccl"
    return "gloo"


def rank_device(backend: str) -> torch.device:
    """The device this rank computes on: its own GPU under NCCL (LOCAL_RANK picks it), else the CPU."""
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def teardown(*objects) -> None:
    """Barrier, drop the caller's references, destroy the process group — the clean-exit recipe for every rank."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            for obj in objects:  # the caller should also `del` its own names; this empties containers it passed
                if isinstance(obj, (list, dict)):
                    obj.clear()
            import gc

            gc.collect()  # DTensors/process-group handles must die before the group does
            dist.destroy_process_group()


def _die_with_parent() -> None:
    """Linux: get SIGTERM if the launching process dies (e.g. a killed test run), instead of lingering as an orphan."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except OSError:
            pass


def _rank_entry(rank: int, world: int, rdzv_dir: str, backend: str, fn: Callable, args: tuple, threads: int) -> None:
    """Body of one spawned rank: set the torchrun-style environment, join the group, run, report, tear down."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        OMP_NUM_THREADS=str(threads),
    )  # read by accelerate & friends
    torch.set_num_threads(threads)  # 2 ranks on 2 cores: one thread each, or they fight over the cores
    _die_with_parent()
    out = Path(rdzv_dir)
    try:
        dist.init_process_group(
            backend,
            init_method=f"file://{out / 'rendezvous'}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=120),
        )
        result = fn(rank, world, *args)
        tmp = out / f"rank{rank}.pt.tmp"
        torch.save(result, tmp)
        os.replace(tmp, out / f"rank{rank}.pt")  # atomic: the parent sees a whole result or none
    except BaseException:
        # no barrier here: the other ranks may be stuck in a collective; the parent sees .err and stops them
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    teardown()


def launch(
    fn: Callable[..., Any],
    nproc: int = 2,
    args: tuple = (),
    backend: str | None = None,
    timeout_s: float = 300.0,
    threads_per_rank: int | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``nproc`` ranks; return the list of per-rank results (rank order).

    ``fn`` must be a module-level function (spawned ranks import it by name) returning tensors, numbers, strings,
    lists or dicts of those. Under torchrun the list holds only this rank's result and ``nproc`` is ignored.
    """
    backend = backend or pick_backend()
    if under_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend)  # env:// — torchrun set MASTER_ADDR/PORT, RANK, WORLD_SIZE
        try:
            return [fn(rank, world, *args)]
        finally:
            teardown()
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if backend == "nccl" and torch.cuda.device_count() < nproc:
        raise ValueError(f"NCCL needs one GPU per rank: {nproc} ranks but {torch.cuda.device_count()} GPUs")
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // nproc)
    with tempfile.TemporaryDirectory(prefix="ch02-launch-") as tmp:
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=_rank_entry, args=(r, nproc, tmp, backend, fn, args, threads), daemon=True)
            for r in range(nproc)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        while (alive := [p for p in procs if p.is_alive()]) and time.monotonic() < deadline:
            if any(Path(tmp, f"rank{r}.err").exists() for r in range(nproc)):
                procs[0].join(2.0)  # a rank failed: give the others a moment, then stop them (they'd wait forever)
                break
            alive[0].join(0.05)  # (one snapshot of the living ranks: one may exit between two is_alive() calls)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        return _collect(Path(tmp), procs, hung, timeout_s)


def _collect(tmp: Path, procs, hung: list[int], timeout_s: float) -> list[Any]:
    results, errors = [], []
    for r, p in enumerate(procs):
        res_path, err_path = tmp / f"rank{r}.pt", tmp / f"rank{r}.err"
        if res_path.exists():
            if p.exitcode != 0:  # the gloo exit race (see module docstring): the result is complete, keep it
                print(
                    f"[launch] rank {r} exited with code {p.exitcode} after reporting its result (gloo teardown "
                    "abort at interpreter exit); result kept",
                    file=sys.stderr,
                )
            results.append(torch.load(res_path, weights_only=True))
        elif err_path.exists():
            errors.append(f"rank {r} raised:\n{err_path.read_text()}")
        elif r in hung:
            errors.append(f"rank {r} still running after {timeout_s:.0f} s (killed)")
        else:
            errors.append(f"rank {r} exited with code {p.exitcode} without a result")
    if errors:
        raise WorkerError("\n".join(errors))
    return results


def add_launch_args(parser) -> None:
    parser.add_argument("--nproc", type=int, default=2, help="ranks to spawn when not started by torchrun")
    parser.add_argument("--backend", default=None, choices=["gloo", "nccl"], help="default: nccl with GPUs, else gloo")


def backend_for(backend: str | None, device: str = "auto") -> str:
    """--backend if given, else from --device: nccl for cuda/auto-with-GPUs, gloo for cpu."""
    if backend == "nccl" and not torch.cuda.is_available():
        raise SystemExit("--backend nccl needs CUDA GPUs; this machine has none (use gloo)")
    return backend or pick_backend(device)


def is_main_process() -> bool:
    """True in the process that prints results: rank 0 under torchrun, the parent when we spawn."""
    return int(os.environ.get("RANK", "0")) == 0
