"""A sandbox for model-generated Python: the only place PAL / STaR programs are ever executed.

    from ch09.sandbox import run_program
    r = run_program("x = 3 * 4\\nanswer = x + 1")
    r.ok, r.answer, r.stdout, r.error          # True, 13, '', None

Layers, outermost last; the README's table says which attack each one stops, and what none of them stops:
1. An AST allow-list, checked in the caller: arithmetic, comparisons, assignments, if/for/while, lists/tuples/subscripts
   and calls to a dozen harmless builtins. No imports, no attribute access, no names starting with ``_``, no other
   builtin, no def/lambda/class/with/try, capped source length and AST size. A filter, not a wall.
2. Restricted ``__builtins__`` in the program's interpreter (the same dozen names; ``print`` is capped).
3. OS isolation by bubblewrap (sandbox_bwrap.py), fail closed: new user, mount, PID, network, IPC and UTS namespaces;
   a read-only view of the interpreter only (no /etc, /home, /root, /tmp, /run of the host), a private empty read-only
   ``/tmp`` (``sandbox_bwrap.TMP_BYTES > 0``: a writable tmpfs of that size), read-only ``/dev`` (so ``/dev/shm``
   too), ``/proc`` of its own PID namespace, no network but ``lo``, an empty environment.
4. Inside, a trusted runner (sandbox_runner.py) forks the program, which closes every fd but stdin/stdout/stderr and two
   pipes, becomes uid 1000 of the namespace (a host uid of its own per concurrent run when the caller is root), sets
   rlimits (CPU, address space, file size, open files, processes = 0, core = 0), no_new_privs and a seccomp filter
   (no exec, fork, sockets, ptrace, namespaces, mounts, bpf, io_uring, keyring...; signals only to itself), checks
   that every one of those holds, and only then runs the source. If any part of the isolation cannot be set up,
   :class:`SandboxUnavailable` is raised and nothing runs.
5. A result channel the program never holds: the runner writes one record (netstrings, strictly parsed, typed scalar
   answer) to a memfd that the program's process closes before the source runs; stdout/stderr are separate memfds capped by RLIMIT_FSIZE. The
   parent checks type and size again; nothing the program does raises in the caller. Wall-clock timeout on both sides.

Reference idea: Gao et al. 2023, "PAL: Program-aided Language Models" (they ran programs with a plain ``exec``).
"""

from __future__ import annotations

import ast
import builtins
from dataclasses import dataclass
from functools import lru_cache

from ch09.sandbox_bwrap import RECORD_CAP, SandboxUnavailable, launch
from ch09.sandbox_runner import MARKER, decode_value, parse_netstrings

__all__ = [
    "SandboxResult",
    "SandboxUnavailable",
    "SandboxViolation",
    "check_program",
    "run_many",
    "run_program",
    "unavailable_reason",
]

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
# every builtin the sandbox's ``python -I -S`` has (``site`` adds the interactive helpers, absent there)
FULL_PYTHON_BUILTINS = BUILTIN_NAMES - {"copyright", "credits", "exit", "help", "license", "quit", "_"}
MAX_FULL_PYTHON_CHARS = 32_000  # ``full_python=True`` programs (HumanEval: prompt + completion + tests)


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
    stderr: str = ""  # what it wrote to fd 2 directly (capped); empty for programs that pass the AST check


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


def run_program(
    source: str,
    *,
    timeout_s: float = 3.0,
    cpu_s: int = 2,
    memory_mb: int = 256,
    max_output: int = 10_000,
    check_ast: bool = True,
    full_python: bool = False,
) -> SandboxResult:
    """Vet then run ``source`` in the sandbox; return its ``answer``. Never raises because of the program.

    Raises :class:`SandboxUnavailable` (and runs nothing) when this machine cannot provide the isolation.
    ``check_ast=False`` skips layer 1 — only for tests that show the other layers still contain an attack.
    ``full_python=True`` drops layers 1 and 2 (any Python: def, class, imports, every builtin; sources up to
    ``MAX_FULL_PYTHON_CHARS``) for code benchmarks such as HumanEval; only the OS layers 3-5 contain the program then.
    """
    if full_python:
        if not isinstance(source, str) or len(source) > MAX_FULL_PYTHON_CHARS:
            return SandboxResult(ok=False, error="refused: program must be a str of at most MAX_FULL_PYTHON_CHARS")
    elif check_ast:
        try:
            check_program(source)
        except SandboxViolation as e:
            return SandboxResult(ok=False, error=f"refused: {e}")
    elif not isinstance(source, str) or len(source) > MAX_SOURCE_CHARS:
        return SandboxResult(ok=False, error="refused: program must be a str of at most MAX_SOURCE_CHARS characters")
    max_output = int(max_output)
    cfg = {
        "source": source,
        "timeout_s": float(timeout_s),
        "cpu_s": int(cpu_s),
        "mem_bytes": int(memory_mb) << 20,
        "fsize": 4 * max_output + 65536,
        "max_output": max_output,
        "allowed": sorted(FULL_PYTHON_BUILTINS if full_python else ALLOWED_CALLS),
    }
    record, out, err, timed_out = launch(cfg, timeout_s, cfg["fsize"])
    stdout, stderr = (b.decode("utf-8", "replace")[:max_output] for b in (out, err))
    return _decode(record, stdout, stderr, timed_out, cfg)


def _decode(record: bytes, stdout: str, stderr: str, timed_out: bool, cfg: dict) -> SandboxResult:
    if not record.startswith(MARKER):  # the runner never started: bwrap failed (or the machine is hopelessly slow)
        if timed_out:
            return SandboxResult(ok=False, stdout=stdout, error="timeout: the sandbox did not start in time (killed)")
        raise SandboxUnavailable(f"the sandbox could not be set up: {stderr.strip()[-1000:] or 'no message'}")
    if record == MARKER:
        why = f"timeout: still running after {cfg['timeout_s']:g} s wall clock (killed)" if timed_out else None
        return SandboxResult(ok=False, stdout=stdout, stderr=stderr, error=why or "the sandbox runner died")
    try:
        status, answer, error = parse_netstrings(record[len(MARKER) :], 3, RECORD_CAP)
        if status == b"setup":
            raise SandboxUnavailable(error.decode("utf-8", "replace"))
        if status not in (b"ok", b"error"):
            raise ValueError(f"unknown status {status[:20]!r}")
        value = decode_value(answer, cfg["max_output"]) if status == b"ok" else None
    except ValueError as e:
        return SandboxResult(ok=False, stdout=stdout, stderr=stderr, error=f"malformed result record: {e}")
    err = error.decode("utf-8", "replace") or None
    return SandboxResult(ok=status == b"ok", answer=value, stdout=stdout, stderr=stderr, error=err)


@lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None when this machine can run the sandbox, else why not (one probe run, cached). For tests that skip."""
    try:
        r = run_program("answer = 1")
    except SandboxUnavailable as e:
        return str(e)
    return None if r.ok and r.answer == 1 else f"probe program failed: {r.error}"


def run_many(sources: list[str], workers: int = 4, **limits) -> list[SandboxResult]:
    """``run_program`` over many programs, ``workers`` sandboxes at a time (each its own namespaces and uid)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda s: run_program(s, **limits), sources))
