"""The code sandbox against hostile completions: each scores 0, ends within seconds, and leaves this
process and the machine as they were (no stray processes, no leaked fds, no files outside its directory).

The fork-bomb test runs a bounded fork loop first and goes on to the unbounded bomb only if the
process limit held. Which isolation layers were active is printed by ``test_report_layers`` (``-s``).
Run as root, ``test_red_team_as_nobody`` runs this whole file again as uid 65534 (a normal user).
Set ``LEANTUNE_SANDBOX_TABLE=path`` to append one JSON line per red-team case (docs/sandbox.md's table).
"""

from __future__ import annotations

import ast
import ctypes
import glob
import os
import signal
import socket
import sys
import time
import uuid

import pytest

pytest.importorskip("resource", reason="the sandbox needs a POSIX system")

from leantune.rl import _sandbox_launcher as launcher
from leantune.rl.sandbox import (
    SANDBOX_UID,
    available_layers,
    code_reward,
    extract_code,
    isolation_report,
    run_code,
)

LAYERS = available_layers()
LINUX = sys.platform.startswith("linux")
# Root is exempt from RLIMIT_NPROC: fork bombs are contained only once the sandbox drops to nobody.
NPROC_ENFORCED = os.geteuid() != 0 or "setuid" in LAYERS
# The red team must fail to get out by some layer: a pid namespace hides and kills, Landlock confines files.
CONFINED_FS = bool({"bwrap", "landlock_fs"} & set(LAYERS))
SECONDS = 10.0  # "within a few seconds", with slack for a loaded 2-core machine


def _children() -> set[int]:
    kids = set()
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        try:
            with open(path) as f:
                kids.update(int(x) for x in f.read().split())
        except OSError:
            continue
    return kids


def _set_child_subreaper(on: bool) -> bool:
    """Make this process adopt orphaned descendants (prctl PR_SET_CHILD_SUBREAPER), so that anything a
    sandboxed program leaves running shows up as our child instead of vanishing under init."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(36, int(on), 0, 0, 0) == 0


def _fd_targets(fds) -> dict[str, str]:
    """What each of this process's file descriptors ``fds`` points at (a pipe, a socket, a path)."""
    out = {}
    for fd in sorted(fds, key=int):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as exc:
            out[fd] = f"? ({exc.strerror})"
    return out


@pytest.fixture
def unharmed():
    """Check that this process and the machine are as before: same fds, no descendant left running
    (orphans are adopted by this process while the test runs), and the sandbox still runs a normal program."""
    fds = sorted(os.listdir("/proc/self/fd")) if LINUX else None
    kids = _children() if LINUX else set()
    adopting = LINUX and _set_child_subreaper(True)
    try:
        yield
        if LINUX:
            deadline = time.monotonic() + 3.0
            while True:
                stray = _children() - kids
                for pid in list(stray):  # adopted orphans that already exited are zombies: reap them
                    try:
                        if os.waitpid(pid, os.WNOHANG)[0] == pid:
                            stray.discard(pid)
                    except ChildProcessError:
                        stray.discard(pid)
                if not stray or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            for pid in stray:  # ours by adoption: do not leave them running if the test fails
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            assert not stray, f"processes left behind: {sorted(stray)}"
            # Other tests' daemon threads (memory samplers, trackers' writers, Ray's and gloo's clients) open
            # files and sockets at any moment. run_code itself opens pipes (status, stdout, stderr) and
            # unnamed temporary files: one of those still open after a short grace period is a leak.
            leaked = set(os.listdir("/proc/self/fd")) - set(fds)
            for _ in range(20):
                if not leaked:
                    break
                time.sleep(0.05)
                leaked &= set(os.listdir("/proc/self/fd"))
            ours = {fd: t for fd, t in _fd_targets(leaked).items() if t.startswith("pipe:") or t.endswith("(deleted)")}
            assert not ours, f"file descriptors leaked: {ours}"
    finally:
        if adopting:
            _set_child_subreaper(False)
    after = run_code("print(6 * 7)")
    assert after.ok and after.stdout == "42\n", after


def _score(code: str, expected_stdout: str, stdin: str = "", timeout_s: float = 2.0) -> tuple[float, float]:
    """code_reward of a completion whose test expects what the program would print if it escaped."""
    completion = f"Here is my solution.\n```python\n{code}\n```\n"
    start = time.monotonic()
    score = code_reward(None, [completion], [[{"input": stdin, "output": expected_stdout}]], timeout_s=timeout_s)[0]
    return score, time.monotonic() - start


def _record(case: str, outcome: str) -> None:
    """Append the measured outcome of a red-team case (for docs/sandbox.md) when asked to."""
    path = os.environ.get("LEANTUNE_SANDBOX_TABLE")
    if path:
        import json

        with open(path, "a") as f:
            f.write(json.dumps({"case": case, "euid": os.geteuid(), "layers": list(LAYERS), "outcome": outcome}) + "\n")


def _outcome(r) -> str:
    last = (r.stderr.strip().splitlines() or [""])[-1][:90]
    return f"ok={r.ok} killed_reason={r.killed_reason} rc={r.returncode} wall={r.wall_s:.2f}s stdout={r.stdout[:40]!r} stderr_tail={last!r}"


def test_report_layers():
    print(f"\nsandbox layers active here: {', '.join(LAYERS)} (euid {os.geteuid()})")
    r = run_code("print('hi')")
    assert r.ok and r.layers == LAYERS


def test_correct_program_passes(unharmed):
    completion = "```python\nimport sys\nnums = list(map(int, sys.stdin.read().split()))\nprint(sum(nums))\n```"
    suite = [{"input": "1 2 3\n", "output": "6\n"}, {"input": "10\n-4\n", "output": "6"}]
    assert code_reward(None, [completion], [suite]) == [1.0]
    assert code_reward(None, [completion], {"inputs": ["5 5"], "outputs": ["11"]}) == [0.0]  # shared suite, wrong
    assert code_reward(None, ["def f(x):\n    return 2 * x\n"], [["assert f(2) == 4", "assert f(3) == 7"]]) == [0.5]


def test_infinite_loop(unharmed):
    score, took = _score("while True:\n    pass", "done", timeout_s=1.5)
    assert score == 0.0 and took < SECONDS
    r = run_code("while True:\n    pass", timeout_s=1.5)
    assert not r.ok and r.killed_reason in {"timeout", "cpu_limit"}
    _record("infinite loop (timeout_s=1.5)", _outcome(r))
    r = run_code("import time\ntime.sleep(60)", timeout_s=1.0)  # no CPU used: the wall clock must stop it
    _record("sleep past the timeout (timeout_s=1)", _outcome(r))
    assert r.timed_out and r.killed_reason == "timeout" and r.wall_s < SECONDS


def _assert_bounded_forks_are_limited() -> None:
    """50 forks whose children sleep: the process limit must stop them before 8 processes exist."""
    code = (
        "import os, time\nmade = 0\nfor i in range(50):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
        "    made += 1\nprint(made)\n"
    )
    r = run_code(code, timeout_s=5.0, max_processes=8)
    assert r.ok, r
    assert int(r.stdout) < 8, f"the process limit did not hold: {r.stdout.strip()} children"


@pytest.mark.skipif(not NPROC_ENFORCED, reason="running as root without the setuid layer: RLIMIT_NPROC is not enforced")
def test_process_limit_holds_for_bounded_forks(unharmed):
    _assert_bounded_forks_are_limited()


@pytest.mark.skipif(not NPROC_ENFORCED, reason="running as root without the setuid layer: RLIMIT_NPROC is not enforced")
def test_fork_bomb(unharmed):
    _assert_bounded_forks_are_limited()  # containment first; the unbounded bomb runs only if it held
    bomb = "import os\nwhile True:\n    os.fork()"
    score, took = _score(bomb, "", timeout_s=2.0)
    assert score == 0.0 and took < SECONDS
    # A bomb that survives failed forks keeps trying until the wall clock kills the whole tree.
    stubborn = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    r = run_code(stubborn, timeout_s=2.0)
    _record("fork bomb (forks forever, ignores failures; timeout_s=2)", _outcome(r))
    assert not r.ok and r.killed_reason is not None and r.wall_s < SECONDS


def test_huge_allocation(unharmed):
    score, took = _score("b = bytearray(50 * 2**30)\nprint('allocated')", "allocated")
    assert score == 0.0 and took < SECONDS
    r = run_code("b = bytearray(50 * 2**30)")
    _record("allocate 50 GB", _outcome(r))
    assert r.killed_reason == "memory_limit" and "MemoryError" in r.stderr


def test_socket_to_localhost_fails(unharmed):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        code = (
            f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "s.sendall(b'hello')\nprint('connected')"
        )
        score, took = _score(code, "connected")
        udp = f"import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {port}))\nprint('sent')"
        udp_score, _ = _score(udp, "sent")
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert score == 0.0 and udp_score == 0.0 and took < SECONDS


def test_audit_hook_fallback_blocks_sockets(unharmed):
    # The layer used where no kernel network isolation exists, exercised on its own here.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        r = run_code(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')",
                     layers=("rlimits", "audit_hook"))
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert not r.ok and "PermissionError" in r.stderr and r.stdout == ""
    assert r.layers == ("rlimits", "audit_hook")


@pytest.mark.skipif(not CONFINED_FS, reason="neither bwrap nor Landlock: the sandbox cannot confine writes to its directory")
def test_writing_outside_fails(unharmed, tmp_path):
    targets = [f"/tmp/leantune_escape_{uuid.uuid4().hex}", str(tmp_path / "escape.txt"), os.path.join(os.getcwd(), "escape.txt")]
    code = (
        f"targets = {targets!r}\nwrote = []\nfor t in targets:\n    try:\n        open(t, 'w').write('x')\n"
        "        wrote.append(t)\n    except OSError:\n        pass\nprint('wrote' if wrote else 'blocked')"
    )
    score, took = _score(code, "wrote")
    r = run_code(code)
    assert score == 0.0 and took < SECONDS
    assert r.stdout == "blocked\n"
    assert not any(os.path.exists(t) for t in targets)


@pytest.mark.skipif(not CONFINED_FS, reason="neither bwrap nor Landlock: the sandbox cannot confine reads")
def test_reading_outside_fails(unharmed, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    secret.chmod(0o644)
    tmp_path.chmod(0o755)
    r = run_code(f"print(open({str(secret)!r}).read())")
    assert not r.ok and "s3cret" not in r.stdout and ("PermissionError" in r.stderr or "FileNotFoundError" in r.stderr)


def test_printing_a_gigabyte(unharmed):
    score, took = _score("print('x' * 2**30)", "x" * 10)
    assert score == 0.0 and took < SECONDS
    _record("print 1 GB", _outcome(run_code("print('x' * 2**30)")))
    score, took = _score("while True:\n    print('x' * 4096)", "x")
    assert score == 0.0 and took < SECONDS
    r = run_code("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", max_output_bytes=10_000)
    assert r.killed_reason == "output_limit" and len(r.stdout) + len(r.stderr) <= 10_000


@pytest.mark.skipif(not {"setuid", "pidns", "landlock_scope"} & set(LAYERS), reason="no layer separates the sandbox from this process")
def test_cannot_signal_the_parent(unharmed):
    r = run_code(f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)\nprint('sent')")
    assert not r.ok and r.stdout == ""


def test_environment_and_workdir(unharmed):
    os.environ["LEANTUNE_SANDBOX_SECRET"] = "leak"
    try:
        r = run_code("import os\nprint(sorted(os.environ))\nprint(os.getcwd())\nopen('scratch.txt', 'w').write('ok')")
    finally:
        del os.environ["LEANTUNE_SANDBOX_SECRET"]
    assert r.ok, r
    names, cwd = r.stdout.splitlines()
    assert set(ast.literal_eval(names)) <= {"PATH", "LANG", "HOME", "TMPDIR", "LC_CTYPE", "PWD"}
    assert not os.path.exists(cwd), "the working directory must be deleted afterwards"
    if "setuid" in LAYERS and "bwrap" not in LAYERS:  # under bwrap the uid seen inside is the user namespace's
        assert run_code("import os; print(os.getuid(), os.getgid())").stdout == f"{SANDBOX_UID} {SANDBOX_UID}\n"
    assert r.uid == (SANDBOX_UID if "setuid" in LAYERS else os.getuid())


def test_file_size_limit(unharmed):
    r = run_code("open('big', 'wb').write(b'y' * 2**22)\nprint('done')", max_file_bytes=2**20)
    _record("write a 4 MiB file (max_file_bytes=1 MiB)", _outcome(r))
    assert not r.ok and r.stdout == ""


def test_unknown_layer_is_an_error():
    with pytest.raises(ValueError, match="unknown or unavailable"):
        run_code("print(1)", layers=("rlimits", "no_such_layer"))


def test_extract_code():
    assert extract_code("a\n```python\nx = 1\n```\nb\n```\ny = 2\n```") == "y = 2\n"
    assert extract_code("print(1)") == "print(1)"


# --------------------------------------------------------------------------------------------
# The red team: one hostile program per case; each must score 0 (or fail) and leave us unharmed.


def test_red_team_dns_lookup(unharmed):
    code = "import socket\nprint(socket.getaddrinfo('example.com', 80)[0][4][0])"
    score, took = _score(code, "93.184.215.14")
    r = run_code(code)
    _record("DNS lookup getaddrinfo('example.com')", _outcome(r))
    assert score == 0.0 and took < SECONDS and not r.ok and r.stdout == ""


@pytest.mark.skipif(not ({"bwrap", "netns", "landlock_net", "seccomp"} & set(LAYERS)), reason="no kernel network isolation here")
def test_red_team_tcp_and_udp(unharmed):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        tcp = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'x')\nprint('connected')"
        udp = f"import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {port}))\nprint('sent')"
        r_tcp, r_udp = run_code(tcp), run_code(udp)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    _record("TCP connect to 127.0.0.1 (a listening host port)", _outcome(r_tcp))
    _record("UDP sendto 127.0.0.1", _outcome(r_udp))
    assert not r_tcp.ok and not r_udp.ok and r_tcp.stdout == r_udp.stdout == ""


@pytest.mark.skipif(not CONFINED_FS, reason="neither bwrap nor Landlock: the sandbox cannot confine files")
def test_red_team_files_outside(unharmed, tmp_path):
    pwned = f"/tmp/pwned_{uuid.uuid4().hex}"
    bashrc = os.path.expanduser("~/.bashrc")
    before = open(bashrc, "rb").read() if os.path.exists(bashrc) else None
    write = (
        f"wrote = []\nfor t in [{pwned!r}, {bashrc!r}]:\n    try:\n        open(t, 'a').write('pwned')\n"
        "        wrote.append(t)\n    except OSError:\n        pass\nprint(wrote)"
    )
    r_write = run_code(write)
    _record("write /tmp/pwned and ~/.bashrc", _outcome(r_write))
    assert not os.path.exists(pwned)
    assert (open(bashrc, "rb").read() if os.path.exists(bashrc) else None) == before
    reads = {}
    for name, path in (("/etc/shadow", "/etc/shadow"), ("the test's own file", os.path.abspath(__file__))):
        r = run_code(f"print(len(open({path!r}).read()))")
        reads[name] = r
        _record(f"read {name}", _outcome(r))
    assert r_write.stdout in ("[]\n", ""), r_write
    assert all(not r.ok and r.stdout == "" for r in reads.values())


def test_red_team_kill_the_parent(unharmed):
    me = os.getpid()
    for case, code in (
        ("os.kill(os.getppid(), 9)", "import os\nos.kill(os.getppid(), 9)\nprint('sent')"),
        ("os.kill(trainer_pid, 9)", f"import os\nos.kill({me}, 9)\nprint('sent')"),
    ):
        r = run_code(code)
        _record(case, _outcome(r))
        # We are alive (we are running this line); the run itself must not have delivered the signal.
        assert "sent" not in r.stdout or "pidns" in LAYERS  # in a pid namespace pid 1 ignores SIGKILL from inside
    assert os.getpid() == me


def test_red_team_ptrace_the_parent(unharmed):
    code = (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        f"targets = [os.getppid(), {os.getpid()}]\n"
        "res = [(libc.ptrace(16, t, None, None), ctypes.get_errno()) for t in targets]\n"  # PTRACE_ATTACH
        "print(res)\nassert all(rc == -1 for rc, _ in res)\n"
    )
    r = run_code(code)
    _record("ptrace(PTRACE_ATTACH, parent) via ctypes", _outcome(r))
    if "audit_hook" in LAYERS:
        assert not r.ok and "PermissionError" in r.stderr
    else:
        assert r.ok, r  # every attach returned -1
    with open(f"/proc/{os.getpid()}/status") as f:
        assert "TracerPid:\t0" in f.read()


def test_red_team_detached_grandchild(unharmed, tmp_path):
    token = f"leantune-escape-{uuid.uuid4().hex}"
    marker = tmp_path / "grandchild_was_here"
    tmp_path.chmod(0o777)
    inner = f"import time\ntime.sleep(2)\nopen({str(marker)!r}, 'w').write('alive')"
    code = (
        "import os, sys\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', {inner!r}, {token!r}])\n    os._exit(0)\n"
        "print('spawned')"
    )
    r = run_code(code, timeout_s=5.0)
    left = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if token.encode() in f.read():
                        left.append(int(pid))
            except OSError:
                continue
    for pid in left:  # do not leave it running if the test fails
        os.kill(pid, signal.SIGKILL)
    time.sleep(2.5)
    _record("detached grandchild (double fork + setsid, writes a file after 2 s)", _outcome(r) + f" survivors={len(left)} file_written={marker.exists()}")
    assert r.stdout == "spawned\n" or "audit_hook" in LAYERS
    assert not left, f"the grandchild outlived run_code: {left}"
    assert not marker.exists()


@pytest.mark.skipif(launcher.seccomp_filter() is None, reason="the seccomp filter is x86_64 only")
def test_seccomp_filter_alone():
    """The BPF denylist on its own (no bwrap, no namespaces): what it denies fails, the rest still works."""
    if "seccomp" not in available_layers() and "seccomp" not in __import__("leantune.rl.sandbox", fromlist=["x"])._direct_layers():
        pytest.skip("seccomp cannot be loaded here")
    code = (
        "import ctypes, errno, os, socket, threading\nlibc = ctypes.CDLL(None, use_errno=True)\nout = {}\n"
        "try:\n    socket.socket(socket.AF_INET)\nexcept OSError as e:\n    out['inet'] = e.errno\n"
        "try:\n    socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\nexcept OSError as e:\n    out['inet6'] = e.errno\n"
        "a, b = socket.socketpair()\nout['unix'] = 'ok'\n"
        "out['ptrace'] = (libc.ptrace(16, os.getppid(), None, None), ctypes.get_errno())\n"
        "out['unshare'] = (libc.unshare(0x10000000), ctypes.get_errno())\n"
        "out['bpf'] = (libc.syscall(321, 0, None, 0), ctypes.get_errno())\n"
        "t = threading.Thread(target=lambda: out.__setitem__('thread', 'ok'))\nt.start()\nt.join()\n"
        "pid = os.fork()\nif pid == 0:\n    os._exit(7)\nout['fork'] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])\n"
        "print(sorted(out.items()))\n"
    )
    r = run_code(code, layers=("rlimits", "seccomp"))
    assert r.ok, r
    got = dict(ast.literal_eval(r.stdout))
    assert got["inet"] == got["inet6"] == 97  # EAFNOSUPPORT
    assert got["ptrace"] == got["unshare"] == got["bpf"] == (-1, 1)  # EPERM
    assert got["unix"] == got["thread"] == "ok" and got["fork"] == 7


def test_isolation_report():
    rep = isolation_report()
    print(f"\nisolation here (euid {os.geteuid()}): {rep}")
    assert rep["layers"] == list(LAYERS) and rep["rlimits"] is True
    assert rep["bwrap"] == ("bwrap" in LAYERS) and rep["seccomp"] == ("seccomp" in LAYERS)
    assert rep["uid"] == (SANDBOX_UID if "setuid" in LAYERS else os.getuid())
    if rep["bwrap"]:
        assert rep["netns"] and rep["pidns"] and rep["mountns"]
        # bwrap's own view of the filesystem (without Landlock, which would also deny listing /)
        own = [n for n in LAYERS if n in {"rlimits", "setuid", "bwrap", "pidns", "netns", "mountns", "seccomp"}]
        r = run_code("import os\nprint(sorted(os.listdir('/')))", layers=own)
        assert r.ok, r
        assert set(ast.literal_eval(r.stdout)) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "root", "sandbox", "sbin", "usr"}
        assert run_code("import os\nprint(os.path.exists('/etc/passwd'), os.path.exists('/tmp'))", layers=own).stdout == "False False\n"


def test_no_preexec_fn_anywhere():
    import leantune.rl.sandbox as sandbox

    for module in (sandbox, launcher):
        with open(module.__file__) as f:
            assert "preexec_fn=" not in f.read()


@pytest.mark.skipif(not LINUX or os.geteuid() != 0 or os.environ.get("LEANTUNE_SANDBOX_AS_NOBODY"), reason="needs root to drop to nobody (and not already the nobody run)")
def test_red_team_as_nobody():
    """This whole file again as uid 65534 in a subprocess: the sandbox must hold for a normal user too."""
    import pathlib
    import shutil
    import subprocess
    import tempfile

    python = os.path.realpath(sys.executable)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    home = pathlib.Path(tempfile.mkdtemp(prefix="leantune-nobody-"))  # pytest's own tmp dirs are 0700 root
    os.chown(home, SANDBOX_UID, SANDBOX_UID)
    home.chmod(0o755)
    setup = (
        "import os, sys\nfrom leantune.rl import _sandbox_launcher as L\n"
        f"L.expose_for_others(L._libc(), {sorted({python, os.path.realpath(sys.base_prefix)})!r})\n"
        f"L.drop_to({SANDBOX_UID})\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "PYTHONPATH": repo,
        "PYTHONDONTWRITEBYTECODE": "1",
        "HF_HUB_OFFLINE": "1",
        "LEANTUNE_SANDBOX_AS_NOBODY": "1",
    }
    if os.environ.get("LEANTUNE_SANDBOX_TABLE"):
        env["LEANTUNE_SANDBOX_TABLE"] = os.environ["LEANTUNE_SANDBOX_TABLE"]
    cmd = [sys.executable, "-c", setup, sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           "-o", "addopts=", "-m", "not slow", "--basetemp", str(home / "pytest"), os.path.abspath(__file__), "-rs"]
    try:
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=240, close_fds=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(done.stdout[-3000:], done.stderr[-2000:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
