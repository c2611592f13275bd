"""The trusted half of ch09's sandbox: the code that runs *inside* the namespaces, and the wire formats both sides share.

sandbox_bwrap.py starts ``bwrap ... python -I -S -B -c "<this file's text>; main()"``; sandbox.py imports it for the
decoders. Inside the sandbox (its own user, mount, PID, network, IPC and UTS namespaces) there are two processes:

    1  runner = main() below (bwrap --as-pid-1: no other process shares the namespace): holds the result fd; never runs
       untrusted code; not dumpable (no /proc/1/fd, /proc/1/mem or ptrace for the program); uid 0 of the namespace
       when the caller is root (then it also holds CAP_SETUID/SETGID/KILL there), else uid 1000 like the program
    2  program = _program(): fork of the runner; becomes uid 1000 (a host uid of its own when the caller is root),
       keeps only fds 0/1/2 + two pipes, sets rlimits, no_new_privs and a seccomp filter, checks all of that (refusing
       to go on if anything is missing), says "ready", then exec()s the untrusted source with restricted builtins and
       writes its ``answer`` on the answer pipe.

The runner reads that pipe as untrusted bytes (size-capped, one tagged scalar, parsed without recursion), waits for the
program with a wall-clock deadline, and writes one result record to the result fd, which the program never had open.
Stdout/stderr go to the caller's memfds, capped by RLIMIT_FSIZE.
"""

from __future__ import annotations

import os
import struct
import sys

MARKER = b"CH09/1\n"  # written first on the result fd: the runner started, so the namespaces exist
SANDBOX_UID = 1000  # the program's uid inside its user namespace
MAX_INT_BITS = 200
MAX_ERROR_CHARS = 300

# ---------------------------------------------------------------------------------------------------- wire formats


def encode_value(value, max_chars: int) -> bytes:
    """One scalar as a tagged message: N, T, F, I<decimal>, D<8-byte IEEE double>, S<UTF-8>. TypeError otherwise."""
    if value is None or value is True or value is False:
        return {None: b"N", True: b"T", False: b"F"}[value]
    if type(value) is int:
        if value.bit_length() > MAX_INT_BITS:
            raise OverflowError(f"answer is an integer of more than {MAX_INT_BITS} bits")
        return b"I" + str(value).encode()
    if type(value) is float:
        return b"D" + struct.pack("!d", value)
    if type(value) is str:
        if len(value) > max_chars:
            raise ValueError(f"answer is a str of {len(value)} characters (limit {max_chars})")
        return b"S" + value.encode("utf-8", "surrogatepass")
    raise TypeError(f"answer has unsupported type {type(value).__name__} (allowed: int, float, str, bool, None)")


def decode_value(msg: bytes, max_chars: int):
    """Inverse of :func:`encode_value`, strict: anything else raises ValueError. Never recursive, never big."""
    tag, body = msg[:1], msg[1:]
    if tag in (b"N", b"T", b"F") and not body:
        return {b"N": None, b"T": True, b"F": False}[tag]
    if tag == b"I":
        digits = body[1:] if body[:1] == b"-" else body
        if not (digits.isdigit() and len(digits) <= 61 and (digits == b"0" or digits[:1] != b"0")) or body == b"-0":
            raise ValueError("malformed integer")
        value = int(body)
        if value.bit_length() > MAX_INT_BITS:
            raise ValueError(f"integer of more than {MAX_INT_BITS} bits")
        return value
    if tag == b"D" and len(body) == 8:
        return struct.unpack("!d", body)[0]
    if tag == b"S" and len(body) <= 4 * max_chars:
        text = body.decode("utf-8", "surrogatepass")  # UnicodeDecodeError is a ValueError
        if len(text) > max_chars:
            raise ValueError(f"str of {len(text)} characters (limit {max_chars})")
        return text
    raise ValueError(f"malformed value message (tag {tag!r}, {len(body)} bytes)")


def netstrings(*parts: bytes) -> bytes:
    return b"".join(b"%d:%s," % (len(p), p) for p in parts)


def parse_netstrings(buf: bytes, count: int, max_len: int) -> list[bytes]:
    """Exactly ``count`` netstrings of at most ``max_len`` bytes each and nothing after them, else ValueError."""
    out, i = [], 0
    for _ in range(count):
        colon = buf.find(b":", i, i + 11)
        digits = buf[i:colon]
        if colon < 0 or not digits.isdigit() or int(digits) > max_len:
            raise ValueError("malformed record")
        end = colon + 1 + int(digits)
        if buf[end : end + 1] != b",":
            raise ValueError("malformed record")
        out.append(buf[colon + 1 : end])
        i = end + 1
    if i != len(buf):
        raise ValueError("trailing bytes after the record")
    return out


# ------------------------------------------------------------------------------------------------ seccomp filter
# Denied with EPERM (ENOSYS for clone3, so libc falls back to clone, which is denied too). Everything else is allowed:
# the program is a fork of an already running interpreter, so it needs no loader, no exec and no threads.
DENIED_SYSCALLS = (
    "execve execveat fork vfork clone clone3 "  # no new programs (so no setuid binaries, no shell), no processes
    "socket socketpair connect accept accept4 bind listen "  # no sockets of any family (TCP, UDP, DNS, Unix)
    "ptrace process_vm_readv process_vm_writev process_madvise process_mrelease kcmp pidfd_open pidfd_getfd "
    "pidfd_send_signal unshare setns mount umount2 pivot_root chroot move_mount open_tree fsopen fsconfig fsmount "
    "fspick mount_setattr bpf perf_event_open userfaultfd io_uring_setup io_uring_enter io_uring_register keyctl "
    "add_key request_key kexec_load kexec_file_load init_module finit_module delete_module iopl ioperm modify_ldt "
    "swapon swapoff reboot acct syslog settimeofday clock_settime clock_adjtime adjtimex quotactl lookup_dcookie "
    "open_by_handle_at name_to_handle_at personality uselib vhangup nfsservctl fanotify_init memfd_secret mbind "
    "set_mempolicy migrate_pages move_pages sethostname setdomainname "
    "shmget shmat shmctl shmdt msgget msgsnd msgrcv msgctl semget semop semctl semtimedop "  # SysV IPC: memory
    "sched_setparam sched_setscheduler sched_setaffinity sched_setattr setpriority ioprio_set"  # others' scheduling
).split()
SELF_ONLY_SYSCALLS = ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")  # signals: own pid only
SELF_OR_ZERO_SYSCALLS = ("prlimit64",)  # limits: its own (pid 0 or its pid), never the runner's
# name x86_64 aarch64 ("-": no such call); checked against the kernel headers by a test when they are installed
_NR = """execve 59 221 execveat 322 281 fork 57 - vfork 58 - clone 56 220 clone3 435 435 socket 41 198 socketpair 53 199
connect 42 203 accept 43 202 accept4 288 242 bind 49 200 listen 50 201 ptrace 101 117 process_vm_readv 310 270
process_vm_writev 311 271 process_madvise 440 440 process_mrelease 448 448 kcmp 312 272 pidfd_open 434 434
pidfd_getfd 438 438 pidfd_send_signal 424 424 unshare 272 97 setns 308 268 mount 165 40 umount2 166 39
pivot_root 155 41 chroot 161 51 move_mount 429 429 open_tree 428 428 fsopen 430 430 fsconfig 431 431 fsmount 432 432
fspick 433 433 mount_setattr 442 442 bpf 321 280 perf_event_open 298 241 userfaultfd 323 282 io_uring_setup 425 425
io_uring_enter 426 426 io_uring_register 427 427 keyctl 250 219 add_key 248 217 request_key 249 218 kexec_load 246 104
kexec_file_load 320 294 init_module 175 105 finit_module 313 273 delete_module 176 106 iopl 172 - ioperm 173 -
modify_ldt 154 - swapon 167 224 swapoff 168 225 reboot 169 142 acct 163 89 syslog 103 116 settimeofday 164 170
clock_settime 227 112 clock_adjtime 305 266 adjtimex 159 171 quotactl 179 60 lookup_dcookie 212 18
open_by_handle_at 304 265 name_to_handle_at 303 264 personality 135 92 uselib 134 - vhangup 153 58 nfsservctl 180 42
fanotify_init 300 262 memfd_secret 447 447 mbind 237 235 set_mempolicy 238 237 migrate_pages 256 238
move_pages 279 239 sethostname 170 161 setdomainname 171 162 shmget 29 194 shmat 30 196 shmctl 31 195 shmdt 67 197
msgget 68 186 msgsnd 69 189 msgrcv 70 188 msgctl 71 187 semget 64 190 semop 65 193 semctl 66 191 semtimedop 220 192
sched_setparam 142 118 sched_setscheduler 144 119 sched_setaffinity 203 122 sched_setattr 314 274
setpriority 141 140 ioprio_set 251 30 kill 62 129 tkill 200 130 tgkill 234 131 rt_sigqueueinfo 129 138
rt_tgsigqueueinfo 297 240 prlimit64 302 261""".split()
SYSCALL_NUMBERS = {
    arch: {n: int(v) for n, v in zip(_NR[::3], _NR[1 + col :: 3]) if v != "-"}
    for col, arch in enumerate(("x86_64", "aarch64"))
}
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_LD, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
_KILL, _ALLOW, _ERRNO = 0x80000000, 0x7FFF0000, 0x00050000  # SECCOMP_RET_KILL_PROCESS / ALLOW / ERRNO
EPERM, ENOSYS = 1, 38


def seccomp_filter(arch: str, own_pid: int) -> bytes:
    """A classic-BPF seccomp program (``struct sock_filter[]``): kill other ABIs, EPERM the denied calls, allow
    signals only to ``own_pid`` and prlimit only on itself, allow the rest. KeyError for an unknown architecture."""
    nrs = SYSCALL_NUMBERS[arch]
    prog = [(_LD, 0, 0, 4), (_JEQ, 1, 0, AUDIT_ARCH[arch]), (_RET, 0, 0, _KILL), (_LD, 0, 0, 0)]  # A = arch, nr
    if arch == "x86_64":
        prog += [(_JGE, "deny", 0, 0x40000000)]  # the x32 ABI
    for name in DENIED_SYSCALLS:
        if name in nrs:
            prog += [(_JEQ, "enosys" if name == "clone3" else "deny", 0, nrs[name])]
    prog += [(_JEQ, "own_pid", 0, nrs[n]) for n in SELF_ONLY_SYSCALLS]
    prog += [(_JEQ, "own_pid_or_0", 0, nrs[n]) for n in SELF_OR_ZERO_SYSCALLS]
    prog += [(_RET, 0, 0, _ALLOW), "own_pid_or_0", (_LD, 0, 0, 16), (_JEQ, "allow", 0, 0)]  # A = low half of arg 0
    prog += ["own_pid", (_LD, 0, 0, 16), (_JEQ, "allow", "deny", own_pid)]
    prog += [
        "allow",
        (_RET, 0, 0, _ALLOW),
        "deny",
        (_RET, 0, 0, _ERRNO | EPERM),
        "enosys",
        (_RET, 0, 0, _ERRNO | ENOSYS),
    ]
    labels, code = {}, []
    for item in prog:
        if isinstance(item, str):
            labels[item] = len(code)
        else:
            code.append(item)
    jump = lambda target, at: target if isinstance(target, int) else labels[target] - at - 1  # noqa: E731
    return b"".join(struct.pack("=HBBI", op, jump(jt, i), jump(jf, i), k) for i, (op, jt, jf, k) in enumerate(code))


def _prctl(libc, option: int, *args) -> None:
    import ctypes

    args = [ctypes.c_ulong(a) if isinstance(a, int) else a for a in (*args, 0, 0, 0, 0)[:4]]
    if libc.prctl(ctypes.c_int(option), *args) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def install_seccomp(own_pid: int) -> None:
    """no_new_privs, then the filter; raises if either cannot be set (the caller refuses to run the program)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    _prctl(libc, 38, 1)  # PR_SET_NO_NEW_PRIVS
    prog = seccomp_filter(os.uname().machine, own_pid)
    buf = ctypes.create_string_buffer(prog, len(prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog) // 8, ctypes.addressof(buf))
    _prctl(libc, 22, 2, ctypes.pointer(fprog))  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


# ---------------------------------------------------------------------------------------------------------- runner
SIGNAL_REASONS = {
    "SIGXCPU": "CPU time limit of {cpu_s} s exceeded",
    "SIGKILL": "memory or time limit",
    "SIGSEGV": "crashed (segmentation fault)",
    "SIGSYS": "forbidden system call",
    "SIGXFSZ": "output limit exceeded",
}


SIGKILL = 9


def _signal_name(number: int) -> str:
    import _signal  # the C module: ``signal`` would import enum (5 ms)

    names = {getattr(_signal, n): n for n in dir(_signal) if n.startswith("SIG") and not n.startswith("SIG_")}
    return names.get(number, f"signal {number}")


def main() -> None:
    """Runner: start the program, supervise it, write one result record. The only code here that touches the result fd."""
    import ctypes
    import marshal  # the config comes from the caller (trusted); marshal is built in, json would cost 10 ms of imports

    _prctl(ctypes.CDLL(None, use_errno=True), 4, 0)  # PR_SET_DUMPABLE = 0: no /proc/<runner>/fd, mem or ptrace
    cfg = marshal.loads(sys.stdin.buffer.read())
    os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
    result_fd = cfg["result_fd"]
    os.write(result_fd, MARKER)
    ready_r, ready_w = os.pipe()
    answer_r, answer_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(answer_r)
        os.close(result_fd)
        _program(cfg, ready_w, answer_w)  # never returns
    for fd in (ready_w, answer_w):
        os.close(fd)
    status, answer, error = _supervise(cfg, pid, ready_r, answer_r)
    os.write(result_fd, netstrings(status, answer, error[: 4 * MAX_ERROR_CHARS].encode("utf-8", "replace")))
    os.close(result_fd)


def _readable(fd: int, deadline: float) -> bool:
    """Wait until ``fd`` is readable (data, EOF or an exited pidfd); False at the deadline."""
    import select
    import time

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0.0, deadline - time.monotonic()) * 1000))


def _read(fd: int, cap: int, deadline: float) -> tuple[bytes, str | None]:
    """Bytes until EOF; stops early with "timeout" or "too large"."""
    data = b""
    while True:
        if not _readable(fd, deadline):
            return data, "timeout"
        chunk = os.read(fd, 65536)
        if not chunk:
            return data, None
        data += chunk
        if len(data) > cap:
            return data, "too large"


def _wait(pid: int, deadline: float) -> int | None:
    """Wait status, or None after killing the program at the deadline."""
    import time

    try:
        fd = os.pidfd_open(pid)  # Linux >= 5.3; else poll
    except (AttributeError, OSError):
        fd = None
    try:
        while time.monotonic() < deadline:
            if fd is not None and _readable(fd, deadline):
                return os.waitpid(pid, 0)[1]
            if fd is None:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    return status
                time.sleep(0.002)
    finally:
        if fd is not None:
            os.close(fd)
    os.kill(pid, SIGKILL)
    os.waitpid(pid, 0)
    return None


def _supervise(cfg: dict, pid: int, ready_r: int, answer_r: int) -> tuple[bytes, bytes, str]:
    """(status, validated answer message, error) with status b"ok", b"error" or b"setup" (isolation missing)."""
    import time

    deadline = time.monotonic() + cfg["timeout_s"]
    ready, _ = _read(ready_r, 4096, deadline)  # written before any untrusted code ran: trusted
    if ready != b"ready":
        _wait(pid, 0)
        return b"setup", b"", ready.decode("utf-8", "replace") or "the program process died while being confined"
    message, problem = _read(answer_r, 4 * cfg["max_output"] + 64, deadline)
    if problem == "too large":
        os.kill(pid, SIGKILL)
    status = _wait(pid, deadline)
    if status is None or problem == "timeout":
        if status is None or time.monotonic() >= deadline:
            return b"error", b"", f"timeout: still running after {cfg['timeout_s']:g} s wall clock (killed)"
    if problem == "too large":
        return b"error", b"", f"answer message over {4 * cfg['max_output'] + 64} bytes"
    if os.WIFSIGNALED(status):
        sig = _signal_name(os.WTERMSIG(status))
        reason = SIGNAL_REASONS.get(sig, "").format(cpu_s=cfg["cpu_s"])
        return b"error", b"", f"killed by {sig}" + (f": {reason}" if reason else "")
    if os.WEXITSTATUS(status) != 0 or not message:
        return b"error", b"", f"program exited with code {os.WEXITSTATUS(status)} without an answer"
    if message[:1] == b"E":
        return b"error", b"", message[1:].decode("utf-8", "replace")[:MAX_ERROR_CHARS]
    try:
        decode_value(message, cfg["max_output"])
    except ValueError as e:
        return b"error", b"", f"malformed answer: {e}"
    return b"ok", message, ""


# --------------------------------------------------------------------------------------------------------- program
ANSWER_FD, READY_FD = 3, 4


def _program(cfg: dict, ready_w: int, answer_w: int) -> None:
    """Fork of the runner: confine itself (or report why not), then run the untrusted source. Always exits."""
    try:
        try:
            _confine(cfg, ready_w, answer_w)
        except BaseException as e:  # noqa: BLE001 - any failure means: do not run the program
            report = f"sandbox setup failed: {type(e).__name__}: {e}".encode("utf-8", "replace")[:4000]
            os.write(READY_FD if os.path.exists(f"/proc/self/fd/{READY_FD}") else ready_w, report)
            return
        os.write(READY_FD, b"ready")
        os.close(READY_FD)
        _run_untrusted(cfg)
    finally:
        os._exit(71)


def _status_fields() -> dict:
    with open("/proc/self/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _confine(cfg: dict, ready_w: int, answer_w: int) -> None:
    import fcntl
    import resource

    os.setsid()
    os.environ.pop("PWD", None)  # bwrap sets it; the program sees LC_ALL only
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in (answer_w, ready_w)]
    os.dup2(high[0], ANSWER_FD)
    os.dup2(high[1], READY_FD)
    os.closerange(READY_FD + 1, 2**31 - 1)  # the result fd, the config, anything inherited: gone
    open_fds = set(os.listdir("/proc/self/fd"))  # includes the fd that lists the directory
    if not {"0", "1", "2", "3", "4"} <= open_fds or len(open_fds) != 6:
        raise OSError(f"unexpected open file descriptors {sorted(open_fds)}")
    if cfg["drop_to_uid"] is not None:  # caller was root: the runner is uid 0 of this namespace, the program is not
        os.setgroups([])
        os.setresgid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
        os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
        if os.getgroups():
            raise OSError("supplementary groups remain")
    if os.getresuid() != (SANDBOX_UID,) * 3 or os.getresgid() != (SANDBOX_UID,) * 3:
        raise OSError(f"uid/gid are {os.getresuid()}/{os.getresgid()}, expected {SANDBOX_UID}")
    with open("/proc/self/net/dev") as f:
        interfaces = {line.split(":")[0].strip() for line in f.readlines()[2:]}
    if interfaces != {"lo"}:
        raise OSError(f"network interfaces {sorted(interfaces)} are visible")
    limits = {
        resource.RLIMIT_CPU: (cfg["cpu_s"], cfg["cpu_s"] + 1),  # SIGXCPU at soft, SIGKILL at hard
        resource.RLIMIT_AS: cfg["mem_bytes"],
        resource.RLIMIT_FSIZE: cfg["fsize"],
        resource.RLIMIT_NOFILE: 16,
        resource.RLIMIT_NPROC: 0,
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_MEMLOCK: 0,
        resource.RLIMIT_MSGQUEUE: 0,
    }
    import ctypes  # noqa: F401 - loaded before RLIMIT_AS, used by install_seccomp

    for which, value in limits.items():
        resource.setrlimit(which, value if isinstance(value, tuple) else (value, value))
    install_seccomp(os.getpid())
    status = _status_fields()
    caps = [int(status[k], 16) for k in ("CapEff", "CapPrm", "CapAmb")]
    if any(caps) or status.get("NoNewPrivs") != "1" or status.get("Seccomp") != "2":
        raise OSError(f"capabilities {caps}, NoNewPrivs {status.get('NoNewPrivs')}, Seccomp {status.get('Seccomp')}")


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _run_untrusted(cfg: dict) -> None:
    """exec() the source with restricted builtins; write its answer (or error) on the answer pipe; exit."""
    import builtins

    cap, printed = cfg["max_output"], [0]

    class OutputLimit(Exception):
        pass

    def capped_print(*args, sep=" ", end="\n"):
        sep, end = " " if sep is None else str(sep), "\n" if end is None else str(end)
        text = sep.join(str(a) for a in args) + end
        room = cap - printed[0]
        printed[0] += len(text)
        _write_all(1, text[: max(room, 0)].encode("utf-8", "surrogatepass"))
        if printed[0] > cap:
            raise OutputLimit(f"output exceeded {cap} characters")

    safe = {n: getattr(builtins, n) for n in cfg["allowed"] if n != "print"}
    safe["print"] = capped_print
    scope = {"__builtins__": safe}
    try:
        exec(compile(cfg["source"], "<program>", "exec"), scope)
        message = encode_value(scope.get("answer"), cap)
    except MemoryError:
        message = b"Ememory limit exceeded (MemoryError)"
    except RecursionError:
        message = b"Erecursion limit exceeded"
    except BaseException as e:  # noqa: BLE001 - the program's failure is its result
        try:
            message = b"E" + f"{type(e).__name__}: {str(e)[:MAX_ERROR_CHARS]}".encode("utf-8", "replace")
        except BaseException:  # noqa: BLE001 - an exception whose str() fails
            message = b"Eerror (unprintable exception)"
    scope.clear()
    try:
        _write_all(ANSWER_FD, message)
    finally:
        os._exit(0)
