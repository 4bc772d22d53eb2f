"""Run untrusted Python (model completions) in a sandboxed child process, and a test-passing reward.

Any reward that executes model output runs it here (arXiv 2604.15149 and agentic RL reports: policies in agentic RL have tried
network access and mining from training sandboxes). :func:`run_code` stacks independent layers, each
enabled when the machine offers it, and reports the active ones in ``SandboxResult.layers`` (and
:func:`isolation_report` for the run ledger). ``docs/sandbox.md`` lists the red-team cases and their
measured outcomes.

- always: the program runs in a child started from a fresh, single-threaded launcher interpreter
  (:mod:`leantune.rl._sandbox_launcher`, ``python -I -S``, ``close_fds``, a new session), never from
  ``preexec_fn`` in the (threaded) trainer. The program itself runs under ``python -I -S`` (no env vars,
  no user site, no site-packages) in a fresh working directory; environment ``PATH``, ``LANG``, ``HOME``,
  ``TMPDIR``; a wall-time limit; output read incrementally, the program killed once stdout + stderr
  exceed ``max_output_bytes``; stdin from a file.
- ``rlimits``: ``RLIMIT_AS`` and ``RLIMIT_DATA`` (memory), ``RLIMIT_CPU``, ``RLIMIT_FSIZE`` (largest file),
  ``RLIMIT_NOFILE``, ``RLIMIT_CORE`` = 0, ``RLIMIT_NPROC`` (processes + threads).
- ``setuid``: when run as root, the program runs as uid/gid 65534 (nobody), no supplementary groups.
  Root is exempt from ``RLIMIT_NPROC``; nobody is not.
- ``bwrap`` (bubblewrap on ``PATH``): ``bwrap --unshare-all --disable-userns --die-with-parent
  --new-session --clearenv``: new user, PID, network (loopback only), IPC, UTS and cgroup namespaces; a
  root filesystem holding only read-only ``/usr`` (+ the ``/lib*``, ``/bin`` links), the interpreter, a
  fresh ``/proc``, a minimal ``/dev`` and a size-capped tmpfs ``/sandbox`` (the working directory,
  also ``TMPDIR``; no ``/tmp``): nothing else of the host (``/etc``, ``/home``, ``/root``, ``/work``) exists inside. Its
  ``RLIMIT_NPROC`` is set inside the new user namespace, so it counts the sandbox's own processes only
  (works for any uid). As root the launcher first drops to 65534; directories above the interpreter
  that nobody cannot enter (``/root`` 0700 over pyenv) are covered by a tmpfs in a private mount
  namespace with just the interpreter bound back.
- ``pidns``, ``netns``, ``mountns``: a PID namespace whose teardown kills everything the program left
  behind (:func:`run_code` returns only after it); a network namespace (no route to any host
  interface, 127.0.0.1 is the sandbox's own); a tmpfs working directory of ``max_disk_mb``. Made by
  ``bwrap``, or by the launcher itself when root and ``bwrap`` is missing.
- ``seccomp`` (x86_64): a classic-BPF denylist (:func:`leantune.rl._sandbox_launcher.seccomp_filter`):
  ``socket`` only for ``AF_UNIX``; ``ptrace``, ``process_vm_*``, ``keyctl``, ``bpf``, ``mount``,
  ``unshare``/``setns``/namespace ``clone``, ``perf_event_open``, ``io_uring_*``, module and kexec calls
  and the like fail with EPERM. Loaded by ``bwrap --seccomp FD`` or by ``prctl`` in the launcher.
- ``landlock_fs`` (Landlock, Linux >= 5.13): writes only inside the working directory; reads only of the
  interpreter, system libraries and that directory. ``landlock_net`` (ABI >= 4): TCP bind and connect
  denied. ``landlock_scope`` (ABI >= 6): no signals to processes outside the sandbox, no abstract unix
  sockets outside it.
- ``audit_hook``: the fallback when neither ``netns``, ``landlock_net`` nor ``seccomp`` exists: a
  ``sys.addaudithook`` denying ``socket.*``, ``ctypes`` and process spawning. A speed bump, not a boundary.

Any failure while building a requested layer is fatal for the run (``killed_reason="sandbox_setup_failed"``):
a layer is never silently skipped after :func:`available_layers` said it works. :func:`available_layers`
probes the machine once (by running a tiny program through the full stack) and caches the answer.

Known gaps: without ``bwrap`` and ``pidns`` a program that calls ``setsid()`` and forks can outlive the
run; worst-case memory is ``max_processes * memory_mb``; under ``bwrap`` a signal exit N and
``sys.exit(128 + N)`` look the same.

>>> r = run_code("print(input()[::-1])", stdin="abc")
>>> r.ok, r.stdout
(True, 'cba\\n')
>>> run_code("while True: pass", timeout_s=0.5).killed_reason in {"timeout", "cpu_limit", "killed_by_signal_9"}
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import math
import os
import secrets
import re
import select
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass, field

from leantune.rl import _sandbox_launcher as launcher
from leantune.tasks import completion_text

try:  # POSIX only; run_code refuses to run without it
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

SANDBOX_UID = launcher.SANDBOX_UID
"""uid and gid (nobody) the program runs as when we are root."""

OPTIONAL_LAYERS = (
    "rlimits",
    "setuid",
    "bwrap",
    "pidns",
    "netns",
    "mountns",
    "seccomp",
    "landlock_fs",
    "landlock_net",
    "landlock_scope",
    "audit_hook",
)

_SAFE_ENV_PATH = "/usr/local/bin:/usr/bin:/bin"
_BWRAP_WORKDIR = "/sandbox"
_SETUP_TIMEOUT_S = 20.0  # launcher + bwrap + interpreter start, before the program's own wall clock
_CLONE_NEWNS, _CLONE_NEWPID, _CLONE_NEWNET = launcher.CLONE_NEWNS, launcher.CLONE_NEWPID, launcher.CLONE_NEWNET
_NAMESPACE_LAYERS = frozenset({"pidns", "netns", "mountns"})


@functools.lru_cache(maxsize=1)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


@functools.lru_cache(maxsize=1)
def _launcher_source() -> str:
    with open(launcher.__file__, encoding="utf-8") as f:
        return f.read()


# The audit hook bootstrap (fallback network layer). Runs the program as __main__ after installing the hook.
_AUDIT_BOOTSTRAP = """\
import sys
def _deny(event, args):
    if event.startswith(("socket.", "ctypes.")) or event in (
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile", "pty.spawn"
    ):
        raise PermissionError("leantune sandbox: " + event + " is blocked")
sys.addaudithook(_deny)
del _deny
import runpy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one :func:`run_code` call.

    ``ok``: exit status 0 and no limit hit. ``returncode``: the exit status, negative for death by a signal
    (``-9``: killed). ``killed_reason``: ``None``, ``"timeout"``, ``"output_limit"``, ``"cpu_limit"``,
    ``"memory_limit"`` (the program died of ``MemoryError``), ``"killed_by_signal_N"`` (``_9`` is how the
    CPU-time limit ends a process; ``cpu_limit`` is SIGXCPU) or ``"sandbox_setup_failed"``. ``stdout``/``stderr`` are decoded as UTF-8 (invalid bytes replaced) and
    hold at most ``max_output_bytes`` bytes between them. ``layers``: the isolation layers that were active.
    ``uid``: the uid (outside any user namespace) the program ran as.
    """

    ok: bool
    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    killed_reason: str | None
    layers: tuple[str, ...] = field(default=())
    wall_s: float = 0.0
    uid: int | None = None


# --------------------------------------------------------------------------------------------
# What this machine supports


def _interpreter() -> str:
    """The real interpreter binary (not a venv link): runs the launcher and, under ``-I -S``, the program."""
    return os.path.realpath(sys.executable)


def _interpreter_paths() -> list[str]:
    """What the interpreter needs to start under ``-I -S``: its binary and its installation prefix."""
    paths = {_interpreter(), sys.base_prefix, sys.base_exec_prefix}
    return sorted({os.path.realpath(p) for p in paths if p})


def _others_can_read(path: str) -> bool:
    """Whether a process with an unrelated uid can reach and read ``path`` (world x on every parent dir)."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(1, len(parts)):
        parent = os.sep.join(parts[:i]) or os.sep
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IROTH)


def _landlock_abi() -> int:
    libc = _libc()
    if libc is None:
        return 0
    abi = libc.syscall(launcher.SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(abi), 0)


_NAMESPACE_PROBE = """\
import ctypes, ctypes.util, os, sys, tempfile
libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
flags, tmpfs = int(sys.argv[1]), sys.argv[2] == "1"
if libc.unshare(flags) != 0:
    sys.exit(1)
if tmpfs:
    d = tempfile.mkdtemp()
    try:
        ok = libc.mount(b"none", b"/", None, 0x4000 | (1 << 18), None) == 0 and \
             libc.mount(b"tmpfs", d.encode(), b"tmpfs", 0, b"size=1m") == 0
    finally:
        libc.umount2(d.encode(), 2)
        os.rmdir(d)
    sys.exit(0 if ok else 2)
"""


def _probe_unshare(flags: int, tmpfs: bool = False) -> bool:
    try:
        done = subprocess.run(
            [_interpreter(), "-I", "-S", "-c", _NAMESPACE_PROBE, str(flags), "1" if tmpfs else "0"],
            capture_output=True,
            check=False,
            timeout=30,
            env={"PATH": _SAFE_ENV_PATH},
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _probe(layers: Collection[str]) -> bool:
    """Whether a tiny program runs through the full stack of ``layers``."""
    r = _execute("print(6 * 7)", frozenset(layers), timeout_s=15.0)
    return r["ok"] and r["stdout"] == "42\n"


def _ordered(layers: Collection[str]) -> tuple[str, ...]:
    return tuple(name for name in OPTIONAL_LAYERS if name in layers)


@functools.lru_cache(maxsize=1)
def _direct_layers() -> tuple[str, ...]:
    """The layers the launcher can build by itself (no bwrap), probed once."""
    if resource is None:
        return ()
    layers = ["rlimits"]
    linux = _libc() is not None
    abi = _landlock_abi() if linux else 0
    layers += ["landlock_fs"] * (abi >= 1) + ["landlock_net"] * (abi >= 4) + ["landlock_scope"] * (abi >= 6)
    if linux and os.geteuid() == 0:  # namespaces and the uid change need root
        if all(_others_can_read(p) for p in _interpreter_paths()) or "landlock_fs" in layers:
            layers.append("setuid")
        if _probe_unshare(_CLONE_NEWPID):
            layers.append("pidns")
        if _probe_unshare(_CLONE_NEWNET):
            layers.append("netns")
        if _probe_unshare(_CLONE_NEWNS, tmpfs=True):
            layers.append("mountns")
    if linux and launcher.seccomp_filter() is not None and _probe([*layers, "seccomp"]):
        layers.append("seccomp")
    if not {"netns", "landlock_net", "seccomp"} & set(layers):
        layers.append("audit_hook")
    return _ordered(layers)


@functools.lru_cache(maxsize=1)
def _bwrap_layers() -> tuple[str, ...]:
    """The layers with bubblewrap, or ``()`` when ``bwrap`` is missing or cannot start here."""
    if resource is None or _libc() is None or shutil.which("bwrap") is None:
        return ()
    abi = _landlock_abi()
    layers = ["rlimits", "bwrap", *_NAMESPACE_LAYERS]
    layers += ["landlock_fs"] * (abi >= 1) + ["landlock_net"] * (abi >= 4) + ["landlock_scope"] * (abi >= 6)
    if os.geteuid() == 0:
        layers.append("setuid")
    with_seccomp = [*layers, "seccomp"] if launcher.seccomp_filter() is not None else None
    for candidate in (with_seccomp, layers):
        if candidate and _probe(candidate):
            return _ordered(candidate)
    return ()


def available_layers() -> tuple[str, ...]:
    """The isolation layers :func:`run_code` uses by default on this machine (probed once, cached).

    With a working ``bwrap`` its stack; otherwise what the launcher builds by itself (namespaces only as
    root). ``audit_hook`` appears only when there is no kernel network isolation at all.
    """
    return _bwrap_layers() or _direct_layers()


def isolation_report() -> dict:
    """Which isolation :func:`run_code` runs by default here, for the run ledger and logs.

    >>> rep = isolation_report()
    >>> rep["rlimits"], rep["layers"] == list(available_layers())
    (True, True)
    """
    layers = available_layers()
    bwrap = shutil.which("bwrap")
    return {
        "bwrap": "bwrap" in layers,
        "bwrap_path": bwrap,
        "seccomp": "seccomp" in layers,
        "netns": "netns" in layers,
        "pidns": "pidns" in layers,
        "mountns": "mountns" in layers,
        "landlock": [name for name in layers if name.startswith("landlock")],
        "landlock_abi": _landlock_abi(),
        "rlimits": "rlimits" in layers,
        "setuid": "setuid" in layers,
        "audit_hook": "audit_hook" in layers,
        "uid": _program_uid(frozenset(layers)),
        "euid": os.geteuid(),
        "launcher": "fresh interpreter (python -I -S), no preexec_fn",
        "layers": list(layers),
    }


def _program_uid(active: frozenset[str]) -> int:
    return SANDBOX_UID if "setuid" in active else os.getuid()


# --------------------------------------------------------------------------------------------
# The parent side


def _sandbox_children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def _exited_unreaped(pid: int) -> bool:
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _kill_tree(proc: subprocess.Popen, pidns: bool) -> None:
    """Kill the program and everything it started; return once the launcher's process has exited."""
    if pidns:
        # Kill the namespace's init (the launcher's or bwrap's child); the kernel then kills the rest, and
        # the launcher (waiter or bwrap) exits after the teardown: its exit means nothing is left inside.
        for pid in _sandbox_children(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and not _exited_unreaped(proc.pid):
            time.sleep(0.01)
    try:
        # The process group still exists (its leader is not yet reaped), so its id cannot have been
        # reused: this reaches only processes we started.
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _classify(returncode: int | None, stderr: str) -> str | None:
    if returncode is None or returncode >= 0:
        if returncode and stderr.rstrip().endswith("MemoryError"):
            return "memory_limit"
        return None
    sig = -returncode
    if sig == signal.SIGXCPU:
        return "cpu_limit"
    return f"killed_by_signal_{sig}"


def _check_layers(layers: Collection[str] | None) -> frozenset[str]:
    if layers is None:
        return frozenset(available_layers())
    active = frozenset(layers)
    have = set(_bwrap_layers() if "bwrap" in active else _direct_layers())
    unknown = active - set(OPTIONAL_LAYERS)
    missing = active - have - {"audit_hook"}
    if unknown or missing:
        raise ValueError(
            f"run_code: layers {sorted(unknown | missing)} are unknown or unavailable here; "
            f"known: {list(OPTIONAL_LAYERS)}, available with bwrap: {list(_bwrap_layers())}, "
            f"without: {list(_direct_layers())}"
        )
    return active


def run_code(
    code: str,
    *,
    stdin: str = "",
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_output_bytes: int = 64_000,
    cpu_s: float | None = None,
    max_processes: int = 8,
    max_file_bytes: int = 16 * 2**20,
    max_disk_mb: int = 64,
    layers: Collection[str] | None = None,
) -> SandboxResult:
    """Run the Python program ``code`` in a sandbox (see the module docstring) and collect its output.

    ``timeout_s``: wall-clock limit in seconds (from the program's start; setting the sandbox up is not
    counted). ``memory_mb``: address-space limit per process (MiB). ``max_output_bytes``: limit on stdout
    + stderr together; the program is killed when it is exceeded. ``cpu_s``: CPU-time limit per process in
    seconds (default: ``timeout_s`` rounded up); reaching it kills the process with SIGKILL.
    ``max_processes``: processes plus threads the program may have (under ``bwrap`` counted in its own
    user namespace; otherwise over the whole sandbox uid). ``max_file_bytes``: largest file the program
    may write. ``max_disk_mb``: size of the tmpfs working directory (and ``/tmp`` under ``bwrap``).
    ``layers``: optional layers to use (default :func:`available_layers`); a requested layer this machine
    lacks raises ``ValueError``.

    Never raises for anything the program does; every failure is a ``SandboxResult`` with ``ok=False``.

    >>> r = run_code("import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)")
    >>> r.ok, r.returncode, r.stdout, r.stderr
    (False, 3, 'out\\n', 'err\\n')
    """
    if resource is None:
        raise RuntimeError("leantune sandbox needs a POSIX system (the resource module); it refuses to run code unsandboxed")
    if timeout_s <= 0 or memory_mb <= 0 or max_output_bytes < 0 or max_processes < 1:
        raise ValueError(
            f"run_code: timeout_s, memory_mb and max_processes must be positive and max_output_bytes >= 0; "
            f"got timeout_s={timeout_s}, memory_mb={memory_mb}, max_processes={max_processes}, max_output_bytes={max_output_bytes}"
        )
    active = _check_layers(layers)
    start = time.monotonic()
    result = _execute(
        code,
        active,
        stdin=stdin,
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        max_output_bytes=max_output_bytes,
        cpu_s=cpu_s,
        max_processes=max_processes,
        max_file_bytes=max_file_bytes,
        max_disk_mb=max_disk_mb,
    )
    return SandboxResult(**result, layers=_ordered(active), wall_s=time.monotonic() - start, uid=_program_uid(active))


def _execute(
    code: str,
    active: frozenset[str],
    *,
    stdin: str = "",
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_output_bytes: int = 64_000,
    cpu_s: float | None = None,
    max_processes: int = 8,
    max_file_bytes: int = 16 * 2**20,
    max_disk_mb: int = 64,
) -> dict:
    """Start the launcher for ``active`` layers and collect the program's output (the dict behind SandboxResult)."""
    under_bwrap = "bwrap" in active
    keep_read_cap = "setuid" in active and not under_bwrap and not all(_others_can_read(p) for p in _interpreter_paths())
    if keep_read_cap and "landlock_fs" not in active:
        active -= {"setuid"}  # nobody cannot reach the interpreter and nothing would limit a read capability
        keep_read_cap = False
    uid = _program_uid(active)
    program = code.encode("utf-8", errors="surrogateescape")
    workdir = _BWRAP_WORKDIR if under_bwrap else tempfile.mkdtemp(prefix="leantune-sandbox-")
    env = {"PATH": _SAFE_ENV_PATH, "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    argv = [_interpreter(), "-I", "-S"]
    argv += ["-c", _AUDIT_BOOTSTRAP, "main.py"] if "audit_hook" in active else ["main.py"]
    try:
        if not under_bwrap:
            with open(os.path.join(workdir, "main.py"), "wb") as f:
                f.write(program)
            if uid != os.getuid():
                os.chown(workdir, uid, uid)
                os.chown(os.path.join(workdir, "main.py"), uid, uid)
        with tempfile.TemporaryFile() as stdin_file, tempfile.TemporaryFile() as program_file:
            stdin_file.write(stdin.encode("utf-8", errors="surrogateescape"))
            stdin_file.seek(0)
            program_file.write(program)
            program_file.seek(0)
            status_r, status_w = os.pipe()
            plan = {
                "layers": sorted(active),
                "workdir": workdir,
                "env": env,
                "python": _interpreter(),
                "argv": argv,
                "bwrap": shutil.which("bwrap") if under_bwrap else None,
                "source": _launcher_source() if under_bwrap else "",
                "read_paths": _interpreter_paths(),
                "memory_bytes": int(memory_mb) * 2**20,
                "cpu_s": max(1, math.ceil(cpu_s if cpu_s is not None else timeout_s)),
                "max_file_bytes": int(max_file_bytes),
                "max_processes": int(max_processes),
                "max_disk_mb": int(max_disk_mb),
                "keep_read_cap": keep_read_cap,
                "landlock_abi": _landlock_abi(),
                "status_fd": status_w,
                "program_fd": program_file.fileno(),
                "parent_pid": os.getpid(),
            }
            try:
                proc = subprocess.Popen(
                    [_interpreter(), "-I", "-S", "-c", _launcher_source(), "outer", json.dumps(plan)],
                    stdin=stdin_file,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=workdir if not under_bwrap else "/",
                    env=env,
                    close_fds=True,
                    pass_fds=(status_w, program_file.fileno()),
                    start_new_session=True,
                )
            except OSError as exc:
                os.close(status_r)
                return _setup_failed(str(exc))
            finally:
                os.close(status_w)
        return _collect(proc, status_r, active, timeout_s, max_output_bytes)
    finally:
        if not under_bwrap:
            shutil.rmtree(workdir, ignore_errors=True)


def _setup_failed(detail: str) -> dict:
    return {
        "ok": False,
        "stdout": "",
        "stderr": f"leantune sandbox setup failed: {detail}",
        "returncode": None,
        "timed_out": False,
        "killed_reason": "sandbox_setup_failed",
    }


def _read_status(status_r: int, deadline: float) -> str:
    """The launcher's last word before exec: ``ready``, ``error: ...``, or ``""`` (it died or timed out)."""
    data = b""
    with os.fdopen(status_r, "rb", buffering=0) as f:
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([f], [], [], remaining)[0]:
                break
            chunk = f.read(4096)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace").strip()


def _collect(proc: subprocess.Popen, status_r: int, active: frozenset[str], timeout_s: float, max_output_bytes: int) -> dict:
    pidns = "pidns" in active
    status = _read_status(status_r, time.monotonic() + max(_SETUP_TIMEOUT_S, timeout_s))
    if status != "ready":
        _kill_tree(proc, pidns)
        proc.wait()
        err = proc.stderr.read(4000).decode(errors="replace")
        proc.stdout.close()
        proc.stderr.close()
        return _setup_failed((status or f"the launcher exited with {proc.returncode} before the program started") + (f"; {err}" if err else ""))
    deadline = time.monotonic() + timeout_s
    out, err = bytearray(), bytearray()
    reason = None
    with selectors.DefaultSelector() as sel:
        for stream, buf in ((proc.stdout, out), (proc.stderr, err)):
            os.set_blocking(stream.fileno(), False)
            sel.register(stream, selectors.EVENT_READ, buf)
        while sel.get_map() and reason is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                reason = "timeout"
                break
            for key, _ in sel.select(min(remaining, 0.25)):
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                room = max_output_bytes - len(out) - len(err)
                key.data.extend(chunk[: max(room, 0)])
                if len(chunk) > room:
                    reason = "output_limit"
                    break
    while reason is None and not _exited_unreaped(proc.pid):  # not proc.wait(): keep the pid until the sweep
        if time.monotonic() >= deadline:
            reason = "timeout"
        time.sleep(0.005)
    _kill_tree(proc, pidns)  # also sweeps processes the program left behind
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    stderr = err.decode("utf-8", errors="replace")
    returncode = proc.returncode
    if "bwrap" in active and returncode is not None and returncode > 128:
        returncode = -(returncode - 128)  # bwrap reports a signal death N as exit status 128 + N
    if reason is None:
        reason = _classify(returncode, stderr)
    return {
        "ok": reason is None and returncode == 0,
        "stdout": out.decode("utf-8", errors="replace"),
        "stderr": stderr,
        "returncode": returncode,
        "timed_out": reason == "timeout",
        "killed_reason": reason,
    }


# --------------------------------------------------------------------------------------------
# Reward: fraction of tests passed

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str:
    """The last fenced code block (```python, ```py or bare ```), or the whole text if there is none.

    >>> extract_code("Here:\\n```python\\nprint(1)\\n```\\nand finally\\n```py\\nprint(2)\\n```")
    'print(2)\\n'
    >>> extract_code("print(3)")
    'print(3)'
    """
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def _same_output(got: str, want: str) -> bool:
    def norm(s: str) -> list[str]:
        lines = [line.rstrip() for line in s.replace("\r\n", "\n").split("\n")]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    return norm(got) == norm(want)


def _suite(tests) -> list:
    if isinstance(tests, dict):  # APPS / CodeContests style: {"inputs": [...], "outputs": [...]}
        inputs, outputs = tests.get("inputs"), tests.get("outputs")
        if inputs is None or outputs is None or len(inputs) != len(outputs):
            raise ValueError(f"a test dict needs equally long 'inputs' and 'outputs' lists; got keys {sorted(tests)}")
        return [{"input": i, "output": o} for i, o in zip(inputs, outputs)]
    if isinstance(tests, str):
        return [tests]
    return list(tests)


def code_reward(prompts, completions, tests, *, timeout_s: float = 5.0, memory_mb: int = 512, **kw) -> list[float]:
    """Fraction of a completion's tests its code passes, run in :func:`run_code` (TRL reward signature).

    The code is the completion's last fenced block (:func:`extract_code`). ``tests`` holds one suite per
    completion (a dataset column); a suite is a list of tests or an ``{"inputs": [...], "outputs": [...]}``
    dict, and a single dict applies to every completion. A test is either ``{"input": stdin, "output":
    expected stdout}`` (compared line by line, trailing whitespace ignored) or a string of Python appended
    to the code (e.g. ``"assert add(2, 3) == 5"``) that passes when the program runs past it and exits with
    status 0 (a nonce printed after the test must be the last line: exiting early does not pass).

    A sandbox limit (timeout, output flood, CPU, memory, setup failure) scores the whole completion 0 and
    skips its remaining tests; an ordinary failure (wrong output, exception) fails only that test.

    >>> suite = [{"input": "2 3\\n", "output": "5"}, {"input": "10 -4\\n", "output": "6"}]
    >>> code_reward(None, ["```python\\na, b = map(int, input().split())\\nprint(a + b)\\n```",
    ...                    "```python\\nprint(5)\\n```"], [suite, suite])
    [1.0, 0.5]
    >>> code_reward(None, ["def add(a, b):\\n    return a + b"], [["assert add(2, 3) == 5", "assert add(0, 0) == 1"]])
    [0.5]
    """
    n = len(completions)
    suites = [tests] * n if isinstance(tests, dict) else list(tests)
    if len(suites) != n:
        raise ValueError(f"code_reward: got {n} completions but {len(suites)} test suites (one per completion)")
    scores = []
    for completion, suite in zip(completions, suites):
        suite = _suite(suite)
        code = extract_code(_text(completion))
        passed = 0
        for test in suite:
            if isinstance(test, str):
                # the test passes only if the program runs past it: a fresh nonce printed after the test, so an
                # early exit with status 0 (os._exit(0), sys.exit()) before the assertion does not pass
                nonce = secrets.token_hex(16)
                result = run_code(f"{code}\n\n{test}\nprint({nonce!r})\n", timeout_s=timeout_s, memory_mb=memory_mb)
                good = result.ok and result.stdout.rstrip().splitlines()[-1:] == [nonce]
            else:
                result = run_code(code, stdin=str(test.get("input", "")), timeout_s=timeout_s, memory_mb=memory_mb)
                good = result.ok and _same_output(result.stdout, str(test.get("output", "")))
            if result.killed_reason is not None:
                passed = 0
                break
            passed += good
        scores.append(passed / len(suite) if suite else 0.0)
    return scores


_text = completion_text  # one definition, in leantune.tasks
