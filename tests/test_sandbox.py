"""The code sandbox against hostile completions: each scores 0, ends within seconds, and leaves this
process and the machine as they were (no stray processes, no leaked fds, no files outside its directory).

The fork-bomb test runs a bounded fork loop first and goes on to the unbounded bomb only if the
process limit held. Which isolation layers were active is printed by ``test_report_layers`` (``-s``).
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

from leantune.rl.sandbox import (
    SANDBOX_UID,
    available_layers,
    code_reward,
    extract_code,
    run_code,
)

LAYERS = available_layers()
LINUX = sys.platform.startswith("linux")
# Root is exempt from RLIMIT_NPROC: fork bombs are contained only once the sandbox drops to nobody.
NPROC_ENFORCED = os.geteuid() != 0 or "setuid" in LAYERS
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
            # Other tests' daemon threads (memory samplers) open and close /proc files at any moment:
            # an fd counts as leaked only if it is still open after a short grace period.
            leaked = set(os.listdir("/proc/self/fd")) - set(fds)
            for _ in range(20):
                if not leaked:
                    break
                time.sleep(0.05)
                leaked &= set(os.listdir("/proc/self/fd"))
            assert not leaked, f"file descriptors leaked: {sorted(leaked)}"
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
    r = run_code("import time\ntime.sleep(60)", timeout_s=1.0)  # no CPU used: the wall clock must stop it
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
    assert not r.ok and r.killed_reason is not None and r.wall_s < SECONDS


def test_huge_allocation(unharmed):
    score, took = _score("b = bytearray(50 * 2**30)\nprint('allocated')", "allocated")
    assert score == 0.0 and took < SECONDS
    r = run_code("b = bytearray(50 * 2**30)")
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


@pytest.mark.skipif("landlock_fs" not in LAYERS, reason="no Landlock: the sandbox cannot confine writes to its directory")
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


@pytest.mark.skipif("landlock_fs" not in LAYERS, reason="no Landlock: the sandbox cannot confine reads")
def test_reading_outside_fails(unharmed, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    secret.chmod(0o644)
    r = run_code(f"print(open({str(secret)!r}).read())")
    assert not r.ok and "s3cret" not in r.stdout and "PermissionError" in r.stderr


def test_printing_a_gigabyte(unharmed):
    score, took = _score("print('x' * 2**30)", "x" * 10)
    assert score == 0.0 and took < SECONDS
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
    assert set(ast.literal_eval(names)) <= {"PATH", "LANG", "HOME", "TMPDIR", "LC_CTYPE"}
    assert not os.path.exists(cwd), "the working directory must be deleted afterwards"
    if "setuid" in LAYERS:
        assert run_code("import os; print(os.getuid(), os.getgid())").stdout == f"{SANDBOX_UID} {SANDBOX_UID}\n"


def test_file_size_limit(unharmed):
    r = run_code("open('big', 'wb').write(b'y' * 2**22)\nprint('done')", max_file_bytes=2**20)
    assert not r.ok and r.stdout == ""


def test_unknown_layer_is_an_error():
    with pytest.raises(ValueError, match="unknown or unavailable"):
        run_code("print(1)", layers=("rlimits", "seccomp"))


def test_extract_code():
    assert extract_code("a\n```python\nx = 1\n```\nb\n```\ny = 2\n```") == "y = 2\n"
    assert extract_code("print(1)") == "print(1)"
