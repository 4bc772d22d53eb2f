"""Run untrusted Python (model completions) in a sandboxed child process, and a test-passing reward.

Any reward that executes model output runs it here (arXiv 2604.15149 and agentic RL reports: policies in agentic RL have tried
network access and mining from training sandboxes). :func:`run_code` stacks independent layers, each
enabled when the platform offers it, and reports the active ones in ``SandboxResult.layers``:

- always: a separate ``python -I -S`` process (isolated mode: no env vars, no user site, no
  site-packages) in a fresh temporary directory, deleted afterwards; environment scrubbed to ``PATH``,
  ``LANG``, ``HOME`` and ``TMPDIR`` (the last two = that directory); its own session and process group;
  a wall-time limit; output read incrementally, the program killed once stdout + stderr exceed
  ``max_output_bytes``; stdin from a file.
- ``rlimits``: ``RLIMIT_AS`` and ``RLIMIT_DATA`` (memory), ``RLIMIT_CPU``, ``RLIMIT_FSIZE`` (largest file),
  ``RLIMIT_NOFILE``, ``RLIMIT_CORE`` = 0, ``RLIMIT_NPROC`` (processes + threads of the uid).
- ``setuid``: when run as root, drop to uid/gid 65534 (nobody) without supplementary groups. Root is
  exempt from ``RLIMIT_NPROC``, nobody is not: this is what stops fork bombs. If nobody cannot read the
  interpreter (e.g. under ``/root/.pyenv``), the child keeps one capability, ``CAP_DAC_READ_SEARCH``
  (read any file), and ``landlock_fs`` decides what it may actually read; without ``landlock_fs`` that
  case stays root and ``setuid`` is inactive.
- ``pidns``: a new PID namespace whose init is the program: when it exits or is killed, the kernel kills
  everything it left behind, and :func:`run_code` returns only after that teardown.
- ``netns``: a new network namespace with only a loopback that is down: every connect fails, 127.0.0.1
  included (abstract unix sockets are per namespace too).
- ``mountns``: a new mount namespace whose working directory is a fresh tmpfs of ``max_disk_mb``: the
  program's files never reach the real disk.
- ``landlock_fs`` (Landlock, Linux >= 5.13): writes only inside the working directory; reads only of the
  interpreter, system libraries (``/usr``, ``/lib*``, ``/bin``) and that directory.
- ``landlock_net`` (Landlock ABI >= 4): TCP bind and connect denied.
- ``landlock_scope`` (Landlock ABI >= 6): no signals to processes outside the sandbox, no abstract unix
  sockets outside it.
- ``audit_hook``: the fallback when neither ``netns`` nor ``landlock_net`` exists: a ``-c`` bootstrap
  installs ``sys.addaudithook`` denying ``socket.*``, ``ctypes`` and process spawning. A speed bump, not
  a boundary (C extensions and ``_posixsubprocess`` bypass it).

The kernel layers are set up in ``preexec_fn``, between fork and exec, as root when we are root; any
failure there is fatal for the run (``killed_reason="sandbox_setup_failed"``): a requested layer is never
silently skipped after :func:`available_layers` said it works. :func:`available_layers` probes the
machine once (in a throwaway child process) and caches the answer.

Known gaps: pathname unix sockets writable by nobody stay reachable (Landlock cannot yet restrict
connecting to them); without ``pidns`` a program that calls ``setsid()`` and forks can outlive the
run; worst-case memory is ``max_processes * memory_mb``.

>>> r = run_code("print(input()[::-1])", stdin="abc")
>>> r.ok, r.stdout
(True, 'cba\\n')
>>> run_code("while True: pass", timeout_s=0.5).killed_reason in {"timeout", "cpu_limit"}
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import re
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

from leantune.tasks import completion_text

try:  # POSIX only; run_code refuses to run without it
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

SANDBOX_UID = 65534
"""uid and gid (nobody) the program runs as when we are root."""

OPTIONAL_LAYERS = (
    "rlimits",
    "setuid",
    "pidns",
    "netns",
    "mountns",
    "landlock_fs",
    "landlock_net",
    "landlock_scope",
    "audit_hook",
)

_SAFE_ENV_PATH = "/usr/local/bin:/usr/bin:/bin"
_NOFILE = 256

# Linux constants (include/uapi/linux/{sched,mount,prctl,capability,landlock}.h).
_CLONE_NEWNS, _CLONE_NEWPID, _CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
_MS_REC, _MS_PRIVATE, _MS_NOSUID, _MS_NODEV = 0x4000, 1 << 18, 0x2, 0x4
_PR_SET_PDEATHSIG, _PR_SET_KEEPCAPS, _PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT = 1, 8, 38, 47
_PR_CAP_AMBIENT_RAISE = 2
_CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_LL_EXECUTE, _LL_WRITE_FILE, _LL_READ_FILE, _LL_READ_DIR = 1, 2, 4, 8
_LL_TRUNCATE = 1 << 14
_LL_FILE_ONLY = _LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | _LL_TRUNCATE | (1 << 15)  # + IOCTL_DEV


def _landlock_fs_rights(abi: int) -> int:
    """Every filesystem right Landlock ABI ``abi`` knows: 13 in v1, +REFER v2, +TRUNCATE v3, +IOCTL_DEV v5."""
    bits = 13 + (abi >= 2) + (abi >= 3) + (abi >= 5)
    return (1 << bits) - 1


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@functools.lru_cache(maxsize=1)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


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
    """

    ok: bool
    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    killed_reason: str | None
    layers: tuple[str, ...] = field(default=())
    wall_s: float = 0.0


# --------------------------------------------------------------------------------------------
# What this machine supports


def _interpreter_paths() -> list[str]:
    paths = {os.path.realpath(sys.executable), sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    return sorted(os.path.realpath(p) for p in paths if p)


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
    abi = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
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
            [sys.executable, "-I", "-S", "-c", _NAMESPACE_PROBE, str(flags), "1" if tmpfs else "0"],
            capture_output=True,
            check=False,
            timeout=30,
            env={"PATH": _SAFE_ENV_PATH},
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


@functools.lru_cache(maxsize=1)
def available_layers() -> tuple[str, ...]:
    """The isolation layers :func:`run_code` uses by default on this machine (probed once, cached).

    ``audit_hook`` appears only when there is no kernel network isolation.
    """
    if resource is None:
        return ()
    layers = ["rlimits"]
    linux = _libc() is not None
    abi = _landlock_abi() if linux else 0
    if abi >= 1:
        layers.append("landlock_fs")
    if abi >= 4:
        layers.append("landlock_net")
    if abi >= 6:
        layers.append("landlock_scope")
    if linux and os.geteuid() == 0:
        interpreter_readable = all(_others_can_read(p) for p in _interpreter_paths())
        if interpreter_readable or "landlock_fs" in layers:
            layers.append("setuid")
    if linux and os.geteuid() == 0:  # namespaces need CAP_SYS_ADMIN
        if _probe_unshare(_CLONE_NEWPID):
            layers.append("pidns")
        if _probe_unshare(_CLONE_NEWNET):
            layers.append("netns")
        if _probe_unshare(_CLONE_NEWNS, tmpfs=True):
            layers.append("mountns")
    if "netns" not in layers and "landlock_net" not in layers:
        layers.append("audit_hook")
    return tuple(name for name in OPTIONAL_LAYERS if name in layers)


# --------------------------------------------------------------------------------------------
# The child side: runs in preexec_fn, between fork and exec


@dataclass(frozen=True)
class _Plan:
    layers: frozenset[str]
    workdir: str
    program: bytes
    memory_bytes: int
    cpu_s: int
    max_file_bytes: int
    max_processes: int
    max_disk_mb: int
    keep_read_cap: bool
    read_paths: tuple[str, ...]


def _report_setup_error(fd: int, exc: BaseException) -> None:
    try:
        os.write(fd, f"{type(exc).__name__}: {exc}".encode()[:4000])
    except OSError:
        pass


def _mirror_exit(status: int) -> None:
    """End this process the way the child with wait status ``status`` ended (same code or signal)."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
            os.kill(os.getpid(), sig)
        finally:
            os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 125)


def _wait_and_mirror(child: int) -> None:
    """Body of the waiter process outside the PID namespace; never returns."""
    try:
        # Drop every inherited fd above stderr, among them subprocess's exec-status pipe, so that
        # Popen() returns when the program execs instead of when the waiter exits.
        os.closerange(3, _max_fd())
        while True:
            try:
                _, status = os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
        _mirror_exit(status)
    finally:
        os._exit(125)


def _max_fd() -> int:
    try:
        return int(os.sysconf("SC_OPEN_MAX"))
    except (ValueError, OSError):
        return 65536


def _landlock_ruleset(plan: _Plan, abi: int) -> int:
    libc = _libc()
    attr = _RulesetAttr()
    fs_rights = _landlock_fs_rights(abi) if "landlock_fs" in plan.layers else 0
    attr.handled_access_fs = fs_rights
    attr.handled_access_net = 3 if "landlock_net" in plan.layers else 0  # BIND_TCP | CONNECT_TCP: no rule allows them
    attr.scoped = 3 if "landlock_scope" in plan.layers else 0  # ABSTRACT_UNIX_SOCKET | SIGNAL
    fd = _check(
        libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0)),
        "landlock_create_ruleset",
    )
    if fs_rights:
        read = _LL_EXECUTE | _LL_READ_FILE | _LL_READ_DIR
        rules = [(p, read) for p in plan.read_paths] + [(plan.workdir, fs_rights)]
        rules += [("/dev/null", _LL_READ_FILE | _LL_WRITE_FILE | _LL_TRUNCATE)]
        for path, rights in rules:
            try:
                pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                if not stat.S_ISDIR(os.fstat(pfd).st_mode):
                    rights &= _LL_FILE_ONLY
                rule = _PathBeneathAttr(allowed_access=rights & fs_rights, parent_fd=pfd)
                _check(
                    libc.syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(fd), ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0)),
                    f"landlock_add_rule({path})",
                )
            finally:
                os.close(pfd)
    return fd


def _drop_to_nobody(keep_read_cap: bool) -> None:
    libc = _libc()
    if keep_read_cap:
        _check(libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setresgid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
    os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
    if keep_read_cap:
        # Only CAP_DAC_READ_SEARCH, made ambient so it survives exec (Landlock then decides what is readable).
        header = _CapHeader(version=_LINUX_CAPABILITY_VERSION_3, pid=0)
        data = (_CapData * 2)()
        bit = 1 << _CAP_DAC_READ_SEARCH
        data[0].effective = data[0].permitted = data[0].inheritable = bit
        _check(libc.capset(ctypes.byref(header), data), "capset")
        _check(libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, _CAP_DAC_READ_SEARCH, 0, 0), "prctl(PR_CAP_AMBIENT)")


def _setup_child(plan: _Plan, landlock_abi: int, error_fd: int) -> None:
    """preexec_fn: build the sandbox around the process that is about to exec the program.

    A failure is written to ``error_fd`` and re-raised, which makes Popen raise in the parent.
    """
    try:
        libc = _libc()
        layers = plan.layers
        flags = (_CLONE_NEWPID if "pidns" in layers else 0) | (_CLONE_NEWNET if "netns" in layers else 0)
        flags |= _CLONE_NEWNS if "mountns" in layers else 0
        if flags:
            _check(libc.unshare(flags), "unshare")
        if "pidns" in layers:
            # unshare(CLONE_NEWPID) moves only our future children into the namespace: fork once, the child
            # becomes the namespace's init and runs the program; we stay behind as a waiter that mirrors
            # its exit status, so Popen sees the program's own return code.
            child = os.fork()
            if child:
                _wait_and_mirror(child)
        if "mountns" in layers:
            _check(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "mount(/, private)")
            uid = SANDBOX_UID if "setuid" in layers else os.getuid()
            opts = f"size={plan.max_disk_mb}m,nr_inodes=4096,mode=0700,uid={uid},gid={uid}".encode()
            _check(libc.mount(b"tmpfs", plan.workdir.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, opts), "mount(tmpfs)")
            os.chdir(plan.workdir)  # the old cwd is the directory underneath the new mount
            with open("main.py", "wb") as f:
                f.write(plan.program)
            os.chown("main.py", uid, uid)
        ruleset = _landlock_ruleset(plan, landlock_abi) if layers & {"landlock_fs", "landlock_net", "landlock_scope"} else -1
        if "setuid" in layers:
            _drop_to_nobody(plan.keep_read_cap)
        if "rlimits" in layers:
            rl = resource
            rl.setrlimit(rl.RLIMIT_CORE, (0, 0))
            rl.setrlimit(rl.RLIMIT_CPU, (plan.cpu_s, plan.cpu_s))  # soft == hard: SIGKILL at the limit
            rl.setrlimit(rl.RLIMIT_FSIZE, (plan.max_file_bytes, plan.max_file_bytes))
            rl.setrlimit(rl.RLIMIT_NOFILE, (_NOFILE, _NOFILE))
            rl.setrlimit(rl.RLIMIT_NPROC, (plan.max_processes, plan.max_processes))
        if libc is not None:
            _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        if ruleset >= 0:
            _check(libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)), "landlock_restrict_self")
            os.close(ruleset)
        if libc is not None and "pidns" in layers:
            # Set after the uid change (which clears it): if the waiter dies, so does the namespace.
            _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
        if "rlimits" in layers:
            # Last: until exec this is still a copy of the (possibly large) parent's address space.
            resource.setrlimit(resource.RLIMIT_DATA, (plan.memory_bytes, plan.memory_bytes))
            resource.setrlimit(resource.RLIMIT_AS, (plan.memory_bytes, plan.memory_bytes))
        os.close(error_fd)
    except BaseException as exc:
        _report_setup_error(error_fd, exc)
        raise


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
    """Kill the program and everything it started; return once the waiter (if any) has exited."""
    if pidns:
        # Kill the namespace's init; the kernel then kills the rest and the waiter exits after the
        # teardown, so its exit means no sandboxed process is left.
        for pid in _sandbox_children(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and not _exited_unreaped(proc.pid):
            time.sleep(0.01)
    try:
        # The process group still exists (the waiter or program is not yet reaped), so its id cannot
        # have been reused: this reaches only processes we started.
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

    ``timeout_s``: wall-clock limit in seconds. ``memory_mb``: address-space limit per process (MiB).
    ``max_output_bytes``: limit on stdout + stderr together; the program is killed when it is exceeded.
    ``cpu_s``: CPU-time limit per process in seconds (default: ``timeout_s`` rounded up); reaching it
    kills the process with SIGKILL. ``max_processes``: processes plus threads the sandbox uid may have,
    counted over all of that uid's processes (not enforced for root, hence ``setuid``).
    ``max_file_bytes``: largest file the program may write. ``max_disk_mb``: size of the tmpfs working
    directory (``mountns``). ``layers``: optional layers to use (default :func:`available_layers`); a
    requested layer this machine lacks raises ``ValueError``.

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
    have = available_layers()
    if layers is None:
        active = frozenset(have)
    else:
        active = frozenset(layers)
        unknown = active - set(OPTIONAL_LAYERS)
        missing = active - set(have) - {"audit_hook"}
        if unknown or missing:
            raise ValueError(
                f"run_code: layers {sorted(unknown | missing)} are unknown or unavailable here; "
                f"known: {list(OPTIONAL_LAYERS)}, available: {list(have)}"
            )
    keep_read_cap = "setuid" in active and not all(_others_can_read(p) for p in _interpreter_paths())
    if keep_read_cap and "landlock_fs" not in active:
        active -= {"setuid"}  # nobody cannot reach the interpreter and nothing would limit a read capability
        keep_read_cap = False

    uid = SANDBOX_UID if "setuid" in active else os.getuid()
    program = code.encode("utf-8", errors="surrogateescape")
    workdir = tempfile.mkdtemp(prefix="leantune-sandbox-")
    start = time.monotonic()
    try:
        with open(os.path.join(workdir, "main.py"), "wb") as f:
            f.write(program)
        if uid != os.getuid():
            os.chown(workdir, uid, uid)
            os.chown(os.path.join(workdir, "main.py"), uid, uid)
        plan = _Plan(
            layers=active,
            workdir=workdir,
            program=program,
            memory_bytes=int(memory_mb) * 2**20,
            cpu_s=max(1, math.ceil(cpu_s if cpu_s is not None else timeout_s)),
            max_file_bytes=int(max_file_bytes),
            max_processes=int(max_processes),
            max_disk_mb=int(max_disk_mb),
            keep_read_cap=keep_read_cap,
            read_paths=tuple(_interpreter_paths())
            + ("/usr", "/lib", "/lib32", "/lib64", "/bin", "/etc/ld.so.cache", "/etc/localtime", "/dev/urandom"),
        )
        argv = [sys.executable, "-I", "-S"]
        argv += ["-c", _AUDIT_BOOTSTRAP, "main.py"] if "audit_hook" in active else ["main.py"]
        env = {"PATH": _SAFE_ENV_PATH, "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        result = _run(argv, env, plan, stdin, timeout_s, max_output_bytes, _landlock_abi())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return SandboxResult(**result, layers=tuple(n for n in OPTIONAL_LAYERS if n in active), wall_s=time.monotonic() - start)


def _run(argv, env, plan: _Plan, stdin: str, timeout_s: float, max_output_bytes: int, landlock_abi: int) -> dict:
    deadline = time.monotonic() + timeout_s
    error_r, error_w = os.pipe()
    try:
        with tempfile.TemporaryFile() as stdin_file:
            stdin_file.write(stdin.encode("utf-8", errors="surrogateescape"))
            stdin_file.seek(0)
            proc = subprocess.Popen(
                argv,
                stdin=stdin_file,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=plan.workdir,
                env=env,
                start_new_session=True,
                pass_fds=(error_w,),
                # preexec_fn despite threads in the parent: the child takes no lock another thread could
                # hold (no imports, no logging; ctypes and libc are loaded beforehand) and only makes syscalls.
                preexec_fn=functools.partial(_setup_child, plan, landlock_abi, error_w),  # noqa: PLW1509
            )
    except (OSError, subprocess.SubprocessError) as exc:
        os.close(error_w)
        error_w = -1
        with os.fdopen(error_r, "rb") as f:
            detail = f.read().decode(errors="replace")
        return {
            "ok": False,
            "stdout": "",
            "stderr": f"leantune sandbox setup failed: {detail or exc}",
            "returncode": None,
            "timed_out": False,
            "killed_reason": "sandbox_setup_failed",
        }
    finally:
        if error_w >= 0:
            os.close(error_w)
    os.close(error_r)
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
    _kill_tree(proc, "pidns" in plan.layers)  # also sweeps processes the program left behind
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    stderr = err.decode("utf-8", errors="replace")
    returncode = proc.returncode
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
    to the code (e.g. ``"assert add(2, 3) == 5"``) that passes when the program exits with status 0.

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
                result = run_code(code + "\n\n" + test + "\n", timeout_s=timeout_s, memory_mb=memory_mb)
                good = result.ok
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
