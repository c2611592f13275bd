"""A sandbox for model-generated Python: the only place PAL / STaR programs are ever executed.

    from ch09.sandbox import run_program
    r = run_program("x = 3 * 4\\nanswer = x + 1")
    r.ok, r.answer, r.stdout, r.error          # True, 13, '', None

Layers (each one alone should stop an attack; together they are defence in depth):
1. An AST allow-list, checked in the caller before anything runs: arithmetic, comparisons, assignments, if/for/while,
   lists/tuples/subscripts and calls to a dozen harmless builtins. No imports, no attribute access at all (so no
   ``().__class__.__base__.__subclasses__()``), no names starting with ``_``, no def/lambda/class/with/try, no
   references to any other builtin (``open``, ``exec``, ``eval``, ``getattr``, ``globals`` ...), no shadowing the
   allowed ones, and a cap on source length and AST size.
2. A separate process: ``python -I -S`` running a tiny trusted runner, in its own session (the whole process group is
   killed on a wall-clock timeout), in an empty temporary working directory, with an empty environment, optionally in a
   fresh network namespace (``unshare -n``) so there is no network even if code got out.
3. Inside the runner, before the untrusted code runs: ``setrlimit`` on CPU seconds, address space (RLIMIT_AS), file
   size, open files, core dumps and processes (RLIMIT_NPROC = 0: no fork); when started as root it drops to ``nobody``
   (root ignores RLIMIT_NPROC). The code runs with a restricted ``__builtins__`` (the same dozen names; ``print`` writes
   to a capped buffer), so even code that skipped layer 1 has no ``__import__`` and no ``open``.
4. Output is capped: the captured prints, the answer's size, and the bytes the caller reads back.

The result is a :class:`SandboxResult` (ok, answer, stdout, error); nothing the program does raises in the caller.
Reference idea: Gao et al. 2023, "PAL: Program-aided Language Models" (they ran programs with a plain ``exec``).
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache

ALLOWED_CALLS = frozenset(
    {
        "abs",
        "min",
        "max",
        "round",
        "int",
        "float",
        "range",
        "len",
        "sum",
        "print",
        "str",
        "bool",
        "divmod",
        "sorted",
        "list",
    }
)
ALLOWED_NODES = (
    ast.Module,
    ast.Expr,
    ast.Assign,
    ast.AugAssign,
    ast.Name,
    ast.Load,
    ast.Store,
    ast.Constant,
    ast.BinOp,
    ast.UnaryOp,
    ast.BoolOp,
    ast.Compare,
    ast.IfExp,
    ast.If,
    ast.For,
    ast.While,
    ast.Break,
    ast.Continue,
    ast.Pass,
    ast.Call,
    ast.List,
    ast.Tuple,
    ast.Subscript,
    ast.Slice,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.FloorDiv,
    ast.Mod,
    ast.Pow,
    ast.USub,
    ast.UAdd,
    ast.Not,
    ast.And,
    ast.Or,
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
)
BUILTIN_NAMES = frozenset(dir(builtins))
MAX_SOURCE_CHARS = 4000
MAX_AST_NODES = 1500


class SandboxViolation(ValueError):
    """The program was refused before running; the message says why."""


@dataclass
class SandboxResult:
    ok: bool  # ran to the end without error and within every limit
    answer: object = None  # value of the global ``answer`` (int/float/str/bool/None), if it was set
    stdout: str = ""  # what it printed (capped)
    error: str | None = (
        None  # why it failed: "refused: ...", "timeout ...", "memory limit ...", "ZeroDivisionError: ..."
    )


def check_program(source: str) -> ast.Module:
    """Parse and vet ``source`` against the allow-list; raise :class:`SandboxViolation` with the reason."""
    if not isinstance(source, str):
        raise SandboxViolation(f"program must be a str, got {type(source).__name__}")
    if len(source) > MAX_SOURCE_CHARS:
        raise SandboxViolation(f"program is {len(source)} characters (limit {MAX_SOURCE_CHARS})")
    try:
        tree = ast.parse(source, mode="exec")
    except SyntaxError as e:
        raise SandboxViolation(f"syntax error: {e.msg} (line {e.lineno})") from None
    except (RecursionError, MemoryError, ValueError) as e:  # absurd nesting, NUL bytes
        raise SandboxViolation(f"unparsable program: {type(e).__name__}") from None
    nodes = list(ast.walk(tree))  # iterative: deep trees cannot blow the caller's stack here
    if len(nodes) > MAX_AST_NODES:
        raise SandboxViolation(f"program has {len(nodes)} AST nodes (limit {MAX_AST_NODES})")
    # the most telling reasons first: imports/attributes, then names, then "call to ... not allowed"
    nodes.sort(
        key=lambda n: (
            0 if isinstance(n, (ast.Import, ast.ImportFrom, ast.Attribute)) else 1 if isinstance(n, ast.Name) else 2
        )
    )
    for node in nodes:
        line = getattr(node, "lineno", "?")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            raise SandboxViolation(f"imports are not allowed (line {line})")
        if isinstance(node, ast.Attribute):
            kind = "dunder attribute" if node.attr.startswith("_") else "attribute access"
            raise SandboxViolation(f"{kind} '.{node.attr}' is not allowed (line {line})")
        if not isinstance(node, ALLOWED_NODES):
            raise SandboxViolation(f"{type(node).__name__} is not allowed (line {line})")
        if isinstance(node, ast.Name):
            _check_name(node, line)
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in ALLOWED_CALLS):
                what = node.func.id if isinstance(node.func, ast.Name) else type(node.func).__name__
                raise SandboxViolation(
                    f"call to '{what}' is not allowed (line {line}); allowed: {', '.join(sorted(ALLOWED_CALLS))}"
                )
            if any(isinstance(a, ast.Starred) for a in node.args) or node.keywords:
                raise SandboxViolation(f"*args / keyword arguments are not allowed (line {line})")
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, str, bool, type(None))):
            raise SandboxViolation(f"constant of type {type(node.value).__name__} is not allowed (line {line})")
    return tree


def _check_name(node: ast.Name, line) -> None:
    if node.id.startswith("_"):
        raise SandboxViolation(f"names starting with '_' are not allowed: '{node.id}' (line {line})")
    if isinstance(node.ctx, ast.Store) and node.id in ALLOWED_CALLS:
        raise SandboxViolation(f"assigning to the builtin '{node.id}' is not allowed (line {line})")
    if (
        isinstance(node.ctx, ast.Load)
        and node.id in BUILTIN_NAMES
        and node.id not in ALLOWED_CALLS | {"True", "False", "None"}
    ):
        raise SandboxViolation(f"builtin '{node.id}' is not allowed (line {line})")


# The trusted runner, executed by ``python -I -S -c``. It reads {"source", limits} as JSON on stdin, limits itself, then
# runs the code with a restricted __builtins__ and prints one JSON line. Keep it short: it is part of the boundary.
RUNNER = r"""
import json, os, resource, sys
cfg = json.loads(sys.stdin.read())
sys.stdin.close()
def lim(which, value, hard=None):
    try:
        resource.setrlimit(which, (value, value if hard is None else hard))
    except (ValueError, OSError):
        pass
if os.getuid() == 0 and cfg["drop_root"]:
    try:
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
    except OSError:
        pass  # root inside a user namespace only: not really root, nothing to drop
lim(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)  # SIGXCPU at soft, SIGKILL at hard
lim(resource.RLIMIT_AS, cfg["mem_bytes"])
lim(resource.RLIMIT_FSIZE, cfg["fsize"])
lim(resource.RLIMIT_CORE, 0)
lim(resource.RLIMIT_NPROC, 0)
lim(resource.RLIMIT_NOFILE, 16)
out, size, cap = [], [0], cfg["max_output"]
class OutputLimit(Exception):
    pass
def capped_print(*args, sep=" ", end="\n"):
    text = str(sep).join(str(a) for a in args) + str(end)
    size[0] += len(text)
    if size[0] > cap:
        raise OutputLimit(f"output exceeded {cap} characters")
    out.append(text)
import builtins as b
safe = {n: getattr(b, n) for n in cfg["allowed"] if n != "print"}
safe["print"] = capped_print
g = {"__builtins__": safe}
res = {"ok": True, "answer": None, "error": None}
try:
    exec(compile(cfg["source"], "<program>", "exec"), g)
    a = g.get("answer")
    if isinstance(a, int) and not isinstance(a, bool) and a.bit_length() > 200:
        raise OverflowError("answer is an integer of more than 200 bits")
    if not isinstance(a, (int, float, str, bool, type(None))):
        raise TypeError(f"answer has unsupported type {type(a).__name__}")
    res["answer"] = a[:cap] if isinstance(a, str) else a
except MemoryError:
    res.update(ok=False, error="memory limit exceeded (MemoryError)")
except RecursionError:
    res.update(ok=False, error="recursion limit exceeded")
except BaseException as e:
    res.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
res["stdout"] = "".join(out)[:cap]
sys.stdout.write(json.dumps(res))
sys.stdout.flush()
"""


@lru_cache(maxsize=1)
def network_isolation_prefix() -> tuple[str, ...]:
    """``("unshare", "-n")`` (or ``-rn`` unprivileged) when this machine allows a private network namespace, else ()."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return ()
    for flags in (("-n",), ("-r", "-n")):
        try:
            if subprocess.run([exe, *flags, "true"], capture_output=True, timeout=5).returncode == 0:
                return (exe, *flags)
        except (OSError, subprocess.SubprocessError):
            pass
    return ()


def run_program(
    source: str,
    *,
    timeout_s: float = 3.0,
    cpu_s: int = 2,
    memory_mb: int = 256,
    max_output: int = 10_000,
    isolate_network: bool = True,
    check_ast: bool = True,
) -> SandboxResult:
    """Vet then run ``source`` in a limited child process; return its ``answer``. Never raises for bad programs.

    ``check_ast=False`` skips layer 1 — only for tests that show the other layers still contain an attack.
    """
    if check_ast:
        try:
            check_program(source)
        except SandboxViolation as e:
            return SandboxResult(ok=False, error=f"refused: {e}")
    if not isinstance(source, str) or len(source) > MAX_SOURCE_CHARS:
        return SandboxResult(ok=False, error="refused: program must be a str of at most MAX_SOURCE_CHARS characters")
    cfg = {
        "source": source,
        "cpu_s": int(cpu_s),
        "mem_bytes": int(memory_mb) << 20,
        "fsize": 4 * max_output + 65536,
        "max_output": int(max_output),
        "allowed": sorted(ALLOWED_CALLS),
        "drop_root": True,
    }
    prefix = list(network_isolation_prefix()) if isolate_network else []
    cmd = [*prefix, sys.executable, "-I", "-S", "-c", RUNNER]
    with tempfile.TemporaryDirectory(prefix="sandbox_") as workdir, tempfile.TemporaryFile() as out_f:
        os.chmod(workdir, 0o777)  # the runner may drop to nobody; the folder is empty and deleted afterwards
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=out_f,
                stderr=subprocess.DEVNULL,
                cwd=workdir,
                env={"LC_ALL": "C.UTF-8"},
                start_new_session=True,
                close_fds=True,
            )
        except OSError as e:
            return SandboxResult(ok=False, error=f"could not start the sandbox process: {e}")
        try:
            proc.stdin.write(json.dumps(cfg).encode())
            proc.stdin.close()
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return SandboxResult(ok=False, error=f"timeout: still running after {timeout_s:g} s wall clock (killed)")
        except BrokenPipeError:
            proc.wait(timeout=timeout_s)
        finally:
            _kill_group(proc)  # nothing it started may outlive it
        out_f.seek(0)
        raw = out_f.read(4 * max_output + 65536)
    return _decode(proc.returncode, raw, cpu_s)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _decode(returncode: int, raw: bytes, cpu_s: int) -> SandboxResult:
    if returncode is not None and returncode < 0:
        try:
            sig = signal.Signals(-returncode).name
        except ValueError:
            sig = f"signal {-returncode}"
        reason = {
            "SIGXCPU": f"CPU time limit of {cpu_s} s exceeded",
            "SIGXFSZ": "output limit exceeded",
            "SIGKILL": "killed (memory or time limit)",
            "SIGSEGV": "crashed (segmentation fault)",
        }.get(sig, "")
        return SandboxResult(ok=False, error=f"killed by {sig}" + (f": {reason}" if reason else ""))
    try:
        res = json.loads(raw.decode("utf-8", errors="replace"))
    except ValueError:
        return SandboxResult(ok=False, error=f"runner exited with code {returncode} without a result")
    if not isinstance(res, dict):
        return SandboxResult(ok=False, error="runner returned a malformed result")
    return SandboxResult(
        ok=bool(res.get("ok")), answer=res.get("answer"), stdout=str(res.get("stdout", "")), error=res.get("error")
    )


def run_many(sources: list[str], workers: int = 4, **limits) -> list[SandboxResult]:
    """``run_program`` over many programs, a few child processes at a time (each still its own sandbox)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda s: run_program(s, **limits), sources))
