"""ch09 sandbox, layer 3: start the runner inside bubblewrap's namespaces, or refuse (SandboxUnavailable).

One run = ``bwrap [namespaces, read-only view] -- python -I -S -B -c <sandbox_runner.py>`` with four memfds: the config on
stdin, the program's stdout and stderr, and the result record (fd number passed in the config; the runner closes it in
the program's process). A root caller cannot let bwrap map uid 1000 to itself (that would be host root), so it takes a
free host uid (``ROOT_UID_BASE`` + slot) and writes the uid map itself while bwrap waits (``--userns-block-fd``); a
non-root caller gets bwrap's own mapping of 1000 to its uid, in a user namespace of its own.
"""

from __future__ import annotations

import contextlib
import json
import marshal
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path

from ch09.sandbox_runner import SANDBOX_UID

BWRAP = shutil.which("bwrap")  # bubblewrap; None means: refuse to run anything
ROOT_UID_BASE = 2_000_000_000  # root callers: program uid = base + SLOTS * (pid % 1e6) + slot, one per concurrent run
SLOTS = 64
TMP_BYTES = 0  # 0: /tmp is empty and read-only. > 0: a writable tmpfs of that size, but its inodes are not limited:
#               each empty file pins ~1 KiB of kernel memory until the run ends (~370k files per CPU second here)
STARTUP_GRACE_S = 5.0  # the caller's own deadline is timeout_s + this (the runner enforces timeout_s itself)
RECORD_CAP = 1 << 22


class SandboxUnavailable(RuntimeError):
    """The isolation the sandbox requires cannot be set up on this machine; nothing was run."""


@lru_cache(maxsize=1)
def runner_source() -> str:
    """sandbox_runner.py plus the call of its ``main`` (the module itself has no ``__main__`` block: not a script)."""
    return Path(__file__).with_name("sandbox_runner.py").read_text() + "\nmain()\n"


class _UidSlots:
    """Distinct host uids for concurrent runs of a root caller (sibling programs never share a uid)."""

    def __init__(self, n: int):
        self.cond, self.free = threading.Condition(), list(range(n))

    @contextlib.contextmanager
    def take(self):
        with self.cond:
            self.cond.wait_for(lambda: self.free)
            slot = self.free.pop(0)
        try:
            yield ROOT_UID_BASE + SLOTS * (os.getpid() % 1_000_000) + slot
        finally:
            with self.cond:
                self.free.append(slot)
                self.cond.notify()


_SLOTS = _UidSlots(SLOTS)


def _read_only_view() -> list[str]:
    """bwrap arguments for what the interpreter needs, read-only: /usr, the /lib* and /bin links, Python's prefix."""
    args = ["--ro-bind", "/usr", "/usr"]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    if os.path.isfile("/etc/ld.so.cache"):
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    exe_dir = os.path.dirname(os.path.realpath(sys.executable))
    prefixes = sorted({sys.base_prefix, sys.base_exec_prefix, exe_dir})
    for p in [p for p in prefixes if not any((p + "/").startswith(q + "/") for q in prefixes if q != p)]:
        if not (p + "/").startswith("/usr/"):  # e.g. pyenv's ~/.pyenv/versions/3.11.7: its parents made traversable
            parents = [str(a) for a in reversed(Path(p).parents) if str(a) != "/"]
            args += [x for a in parents for x in ("--perms", "0755", "--dir", a)] + ["--ro-bind", p, p]
    return args


def bwrap_argv(as_root: bool, info_fd: int = -1, block_fd: int = -1) -> list[str]:
    if BWRAP is None or not os.access(BWRAP, os.X_OK):
        raise SandboxUnavailable(
            "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap); "
            "the sandbox never runs a program with less isolation than it was built for"
        )
    argv = [BWRAP, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    argv += ["--as-pid-1"]  # no bwrap reaper: the runner is PID 1, non-dumpable, and nothing else shares the namespace
    argv += ["--clearenv", "--setenv", "LC_ALL", "C.UTF-8", "--hostname", "sandbox", *_read_only_view()]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    argv += ["--perms", "1777", "--size", str(TMP_BYTES), "--tmpfs", "/tmp"] if TMP_BYTES > 0 else ["--dir", "/tmp"]
    argv += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp"]
    if as_root:  # we write the uid map ourselves: 0 -> 0 for bwrap's setup, 1000 -> this run's own host uid
        argv += ["--userns-block-fd", str(block_fd), "--info-fd", str(info_fd)]
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_KILL"]  # runner: drop, kill
    else:  # bwrap maps 1000 -> our own uid
        argv += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    return [*argv, "--", os.path.realpath(sys.executable), "-I", "-S", "-B", "-c", runner_source()]


def _map_user_namespace(info_r: int, block_w: int, host_uid: int, deadline: float) -> str | None:
    """Root callers: read bwrap's child pid, write its uid/gid maps, let it go on. An error message, or None."""
    import select

    poller = select.poll()  # not select(): the caller may hold more than 1024 fds
    poller.register(info_r, select.POLLIN)
    info = b""
    while b"}" not in info and len(info) < 65536:
        if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
            return "bwrap did not report its namespace in time"
        chunk = os.read(info_r, 65536)
        if not chunk:
            return "bwrap exited before creating the namespaces"
        info += chunk
    try:
        pid = int(json.loads(info[: info.index(b"}") + 1])["child-pid"])
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(f"0 0 1\n{SANDBOX_UID} {host_uid} 1\n")
    except (OSError, ValueError, KeyError) as e:
        return f"could not map uid {SANDBOX_UID} to host uid {host_uid}: {e}"
    os.write(block_w, b"1")
    return None


def _start_and_wait(fds: dict, host_uid: int | None, timeout_s: float) -> bool:
    """Run bwrap + runner; True when the caller's own deadline killed it. Raises SandboxUnavailable."""
    as_root = host_uid is not None
    pipes = (*os.pipe(), *os.pipe()) if as_root else (-1, -1, -1, -1)
    info_r, info_w, block_r, block_w = pipes
    deadline = time.monotonic() + timeout_s + STARTUP_GRACE_S
    try:
        argv = bwrap_argv(as_root, info_w, block_r)
        proc = subprocess.Popen(
            argv,
            stdin=fds["config"],
            stdout=fds["stdout"],
            stderr=fds["stderr"],
            pass_fds=[fd for fd in (fds["result"], info_w, block_r) if fd >= 0],
            cwd="/",
            env={},
            start_new_session=True,
        )
    except OSError as e:
        _close(pipes)
        raise SandboxUnavailable(f"could not start bubblewrap: {e}") from None
    except SandboxUnavailable:
        _close(pipes)
        raise
    try:
        if as_root:
            _close((info_w, block_r))
            problem = _map_user_namespace(info_r, block_w, host_uid, deadline)
            if problem:
                _close((block_w,))  # bwrap goes on without a map, fails, and says why on stderr
                block_w = -1
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=1)
                why = os.pread(fds["stderr"], 4000, 0).decode("utf-8", "replace").strip() or "no message"
                raise SandboxUnavailable(f"{problem}: {why}")
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        return False
    except subprocess.TimeoutExpired:
        return True
    finally:
        _kill_group(proc)
        _close((info_r, block_w))


def _close(fds) -> None:
    for fd in (fd for fd in fds if fd >= 0):
        with contextlib.suppress(OSError):
            os.close(fd)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL bwrap; --die-with-parent then kills the sandbox's PID 1, which takes its whole PID namespace along."""
    if proc.poll() is None:  # never signal a reaped pid: the number may belong to someone else by now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def launch(cfg: dict, timeout_s: float, out_cap: int) -> tuple[bytes, bytes, bytes, bool]:
    """Run the runner on ``cfg`` in a fresh sandbox: (result record, stdout, stderr, killed at the caller's deadline)."""
    as_root = os.geteuid() == 0
    fds = {name: os.memfd_create(f"ch09-{name}", os.MFD_CLOEXEC) for name in ("config", "stdout", "stderr", "result")}
    try:
        cfg = {**cfg, "result_fd": fds["result"], "drop_to_uid": SANDBOX_UID if as_root else None}
        os.write(fds["config"], marshal.dumps(cfg))
        os.lseek(fds["config"], 0, os.SEEK_SET)
        with _SLOTS.take() if as_root else contextlib.nullcontext() as host_uid:
            timed_out = _start_and_wait(fds, host_uid, timeout_s)
        return (
            os.pread(fds["result"], RECORD_CAP, 0),
            os.pread(fds["stdout"], out_cap, 0),
            os.pread(fds["stderr"], out_cap, 0),
            timed_out,
        )
    finally:
        _close(fds.values())
