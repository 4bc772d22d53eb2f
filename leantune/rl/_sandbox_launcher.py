"""The child side of :mod:`leantune.rl.sandbox`: a fresh, single-threaded interpreter that builds the
sandbox around itself and then execs the untrusted program (or ``bwrap``, which execs it).

Standard library only, no ``leantune`` imports: the parent runs this file's source with
``python -I -S -c SOURCE STAGE PLAN_JSON``, so it needs no readable checkout and no ``sys.path``, and it
never runs between fork and exec of a threaded trainer (no ``preexec_fn``). Stages:

- ``outer``: started by :func:`leantune.rl.sandbox.run_code` in a new session. With the ``bwrap`` layer:
  as root, makes the interpreter reachable for uid 65534 (a private mount namespace, a tmpfs over any
  ancestor directory others cannot enter, the interpreter bound back read-only), drops to 65534, sets
  ``PR_SET_PDEATHSIG`` and execs ``bwrap``, whose command is this file again in the ``inner`` stage.
  Without ``bwrap``: unshares the namespaces root may create (``pidns``: forks once and stays behind as
  a waiter mirroring the program's exit status), mounts the tmpfs working directory, then does what
  ``inner`` does.
- ``inner`` (inside ``bwrap``, or the tail of ``outer``): Landlock, the uid drop when not under
  ``bwrap``, rlimits, ``PR_SET_NO_NEW_PRIVS``, the seccomp filter when not already loaded by ``bwrap``,
  then writes ``ready`` to the status fd (close-on-exec) and execs ``python -I -S main.py``. Any failure
  is written to the status fd as ``error: ...``, so the parent reports ``sandbox_setup_failed``.

The seccomp filter (:func:`seccomp_filter`) is a hand-assembled classic-BPF denylist for x86_64; the
same bytes feed ``bwrap --seccomp FD`` and ``prctl(PR_SET_SECCOMP)``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import resource
import signal
import stat
import struct
import sys

SANDBOX_UID = 65534
SYSTEM_READ_PATHS = ("/usr", "/lib", "/lib32", "/lib64", "/bin", "/etc/ld.so.cache", "/etc/localtime", "/dev/urandom")
NOFILE = 256

# include/uapi/linux/{sched,mount,prctl,capability,landlock,seccomp,audit}.h
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 0x4000, 1 << 18
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 8, 22, 38, 47
SECCOMP_MODE_FILTER = 2
CAP_DAC_READ_SEARCH = 2
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR, LL_TRUNCATE = 1, 2, 4, 8, 1 << 14
LL_FILE_ONLY = LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | LL_TRUNCATE | (1 << 15)

# ---------------------------------------------------------------------------------------------
# seccomp: a classic-BPF denylist (struct sock_filter: u16 code, u8 jt, u8 jf, u32 k)

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
RET_ALLOW, RET_KILL_PROCESS, RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
EPERM, ENOSYS, EAFNOSUPPORT = 1, 38, 97
AF_UNIX = 1
_LD_ABS_W, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
NAMESPACE_FLAGS = CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET

DENIED_SYSCALLS_X86_64 = {  # arch/x86/entry/syscalls/syscall_64.tbl: answered with EPERM
    "ptrace": 101, "syslog": 103, "uselib": 134, "personality": 135, "ustat": 136, "sysfs": 139,
    "vhangup": 153, "modify_ldt": 154, "pivot_root": 155, "_sysctl": 156, "adjtimex": 159, "chroot": 161,
    "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168,
    "reboot": 169, "iopl": 172, "ioperm": 173, "create_module": 174, "init_module": 175,
    "delete_module": 176, "get_kernel_syms": 177, "query_module": 178, "quotactl": 179, "nfsservctl": 180,
    "lookup_dcookie": 212, "clock_settime": 227, "kexec_load": 246, "add_key": 248, "request_key": 249,
    "keyctl": 250, "unshare": 272, "perf_event_open": 298, "fanotify_init": 300, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310,
    "process_vm_writev": 311, "kcmp": 312, "finit_module": 313, "kexec_file_load": 320, "bpf": 321,
    "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "pidfd_getfd": 438, "mount_setattr": 442,
}
NR_SOCKET, NR_CLONE, NR_CLONE3 = 41, 56, 435


def seccomp_filter(machine: str | None = None) -> bytes | None:
    """The sandbox's seccomp program (raw ``struct sock_filter`` array), or ``None`` off x86_64.

    Other architectures and x32 calls: killed / EPERM. ``DENIED_SYSCALLS_X86_64``: EPERM. ``socket``: only
    ``AF_UNIX``, else EAFNOSUPPORT (no TCP, UDP, raw, netlink, packet). ``clone`` with a namespace flag:
    EPERM. ``clone3``: ENOSYS (its flags sit in memory BPF cannot read; glibc falls back to ``clone``).
    Everything else: allowed.
    """
    if (machine or os.uname().machine) != "x86_64":
        return None
    prog: list[tuple[int, int, int, int]] = []  # (code, jt, jf, k); jt/jf may be labels, resolved below
    labels: dict[str, int] = {}

    def emit(code, k, jt=0, jf=0):
        prog.append((code, jt, jf, k))

    emit(_LD_ABS_W, 4)  # seccomp_data.arch
    emit(_JEQ_K, AUDIT_ARCH_X86_64, 1, 0)
    emit(_RET_K, RET_KILL_PROCESS)
    emit(_LD_ABS_W, 0)  # seccomp_data.nr
    emit(_JGE_K, X32_SYSCALL_BIT, "eperm", 0)
    for nr in sorted(DENIED_SYSCALLS_X86_64.values()):
        emit(_JEQ_K, nr, "eperm", 0)
    emit(_JEQ_K, NR_CLONE3, "enosys", 0)
    emit(_JEQ_K, NR_SOCKET, "socket", 0)
    emit(_JEQ_K, NR_CLONE, "clone", 0)
    emit(_RET_K, RET_ALLOW)
    labels["socket"] = len(prog)
    emit(_LD_ABS_W, 16)  # args[0] (low 32 bits, little endian): the address family
    emit(_JEQ_K, AF_UNIX, 0, 1)
    emit(_RET_K, RET_ALLOW)
    emit(_RET_K, RET_ERRNO | EAFNOSUPPORT)
    labels["clone"] = len(prog)
    emit(_LD_ABS_W, 16)  # args[0]: the clone flags
    emit(_JSET_K, NAMESPACE_FLAGS, "eperm", 0)
    emit(_RET_K, RET_ALLOW)
    labels["eperm"] = len(prog)
    emit(_RET_K, RET_ERRNO | EPERM)
    labels["enosys"] = len(prog)
    emit(_RET_K, RET_ERRNO | ENOSYS)

    def offset(target, at: int) -> int:
        if isinstance(target, int):
            return target
        jump = labels[target] - at - 1
        assert 0 <= jump < 256, f"BPF jump to {target} out of range: {jump}"
        return jump

    return b"".join(struct.pack("<HBBI", code, offset(jt, i), offset(jf, i), k) for i, (code, jt, jf, k) in enumerate(prog))


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_seccomp(program: bytes) -> None:
    """Install ``program`` on this thread (needs ``PR_SET_NO_NEW_PRIVS`` first); inherited by exec and fork."""
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _check(_libc().prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "prctl(PR_SET_SECCOMP)")


# ---------------------------------------------------------------------------------------------
# libc helpers


def _libc():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    return libc


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _mount(libc, source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount({source} -> {target})")


def _others_can_enter(path: str) -> bool:
    return bool(os.stat(path).st_mode & stat.S_IXOTH)


def expose_for_others(libc, paths: list[str]) -> None:
    """Root only: make ``paths`` reachable for an unrelated uid in a new private mount namespace.

    Each ancestor directory others cannot enter (e.g. ``/root`` 0700 above a pyenv interpreter) gets an
    empty tmpfs (0755) over it, into which each needed path is bound back read-only: the rest of that
    directory stays hidden. Files keep their own permissions.
    """
    blocked: dict[str, list[str]] = {}
    roots = [p for p in paths if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths)]
    for path in roots:
        parts = path.split(os.sep)
        for i in range(2, len(parts) + 1):
            parent = os.sep.join(parts[:i])
            if os.path.isdir(parent) and not _others_can_enter(parent):
                blocked.setdefault(parent, []).append(path)
                break
    if not blocked:
        return
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(libc, "none", "/", None, MS_REC | MS_PRIVATE)
    for top, inside in blocked.items():
        fds = {p: os.open(p, os.O_PATH | os.O_CLOEXEC) for p in inside}
        _mount(libc, "tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        for p, fd in fds.items():
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                os.makedirs(p, mode=0o755, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(p), mode=0o755, exist_ok=True)
                os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
            _mount(libc, f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
            _mount(libc, "none", p, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
            os.close(fd)


def drop_to(uid: int) -> None:
    """Become ``uid``/``uid`` without supplementary groups (root only)."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def _keep_read_cap_as_nobody(libc) -> None:
    """Drop to nobody but keep CAP_DAC_READ_SEARCH as an ambient capability (Landlock limits its reach)."""
    _check(libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    drop_to(SANDBOX_UID)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    data = (Data * 2)()
    bit = 1 << CAP_DAC_READ_SEARCH
    data[0].effective = data[0].permitted = data[0].inheritable = bit
    _check(libc.capset(ctypes.byref(Header(0x20080522, 0)), data), "capset")
    _check(libc.prctl(PR_CAP_AMBIENT, 2, CAP_DAC_READ_SEARCH, 0, 0), "prctl(PR_CAP_AMBIENT_RAISE)")


# ---------------------------------------------------------------------------------------------
# Landlock


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _landlock_fs_rights(abi: int) -> int:
    """Every filesystem right Landlock ABI ``abi`` knows: 13 in v1, +REFER v2, +TRUNCATE v3, +IOCTL_DEV v5."""
    return (1 << (13 + (abi >= 2) + (abi >= 3) + (abi >= 5))) - 1


def _landlock_ruleset(libc, layers: set, abi: int, read_paths: list[str], write_paths: list[str]) -> int:
    attr = _RulesetAttr()
    fs_rights = _landlock_fs_rights(abi) if "landlock_fs" in layers else 0
    attr.handled_access_fs = fs_rights
    attr.handled_access_net = 3 if "landlock_net" in layers else 0  # BIND_TCP | CONNECT_TCP: no rule allows them
    attr.scoped = 3 if "landlock_scope" in layers else 0  # ABSTRACT_UNIX_SOCKET | SIGNAL
    size = ctypes.sizeof(attr) if abi >= 6 else (16 if abi >= 4 else 8)
    fd = _check(libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)), "landlock_create_ruleset")
    if fs_rights:
        read = LL_EXECUTE | LL_READ_FILE | LL_READ_DIR
        rules = [(p, read) for p in read_paths] + [(p, fs_rights) for p in write_paths]
        rules.append(("/dev/null", LL_READ_FILE | LL_WRITE_FILE | LL_TRUNCATE))
        for path, rights in rules:
            try:
                pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                if not stat.S_ISDIR(os.fstat(pfd).st_mode):
                    rights &= LL_FILE_ONLY
                rule = _PathBeneathAttr(allowed_access=rights & fs_rights, parent_fd=pfd)
                _check(libc.syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(fd), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0)), f"landlock_add_rule({path})")
            finally:
                os.close(pfd)
    return fd


# ---------------------------------------------------------------------------------------------
# Stages


def _tasks_of(uid: int) -> int:
    """Processes + threads ``uid`` owns now (what RLIMIT_NPROC counts outside a user namespace)."""
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    n += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                continue
    return n


def _bwrap_argv(plan: dict, seccomp_fd: int | None) -> list[str]:
    argv = [plan["bwrap"], "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session"]
    argv += ["--hostname", "sandbox", "--clearenv"]
    for key, value in plan["env"].items():
        argv += ["--setenv", key, value]
    argv += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    for path in plan["read_paths"]:
        if not path.startswith("/usr/") and os.path.exists(path):
            argv += ["--ro-bind", path, path]
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--ro-bind-try", "/etc/localtime", "/etc/localtime"]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    disk = str(plan["max_disk_mb"] * 2**20)
    argv += ["--size", disk, "--tmpfs", plan["workdir"]]  # the only writable place (also TMPDIR)
    argv += ["--file", str(plan["program_fd"]), plan["workdir"] + "/main.py", "--chdir", plan["workdir"]]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return argv


def outer(plan: dict) -> None:
    libc = _libc()
    layers = set(plan["layers"])
    if "bwrap" in layers:
        if "setuid" in layers:
            expose_for_others(libc, plan["read_paths"])
            drop_to(SANDBOX_UID)
        # Set after the uid change (which clears it): if run_code's process dies, bwrap dies, and
        # --die-with-parent takes the namespace down with it.
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != plan["parent_pid"]:
            raise RuntimeError("the parent exited during setup")
        seccomp_fd = None
        if "seccomp" in layers:
            seccomp_fd = os.memfd_create("leantune-seccomp", 0)
            os.write(seccomp_fd, seccomp_filter())
            os.lseek(seccomp_fd, 0, os.SEEK_SET)
        inner_plan = dict(plan, seccomp_loaded=seccomp_fd is not None)
        argv = _bwrap_argv(plan, seccomp_fd) + ["--", plan["python"], "-I", "-S", "-c", plan["source"], "inner", json.dumps(inner_plan)]
        os.execv(plan["bwrap"], argv)
    flags = (CLONE_NEWPID if "pidns" in layers else 0) | (CLONE_NEWNET if "netns" in layers else 0)
    flags |= CLONE_NEWNS if "mountns" in layers else 0
    if flags:
        _check(libc.unshare(flags), "unshare")
    if "pidns" in layers:
        # Only our future children enter the PID namespace: fork once; the child is its init and runs the
        # program, we stay behind mirroring its exit status so run_code sees the program's own code.
        child = os.fork()
        if child:
            _wait_and_mirror(child, plan["status_fd"])
    if "mountns" in layers:
        _mount(libc, "none", "/", None, MS_REC | MS_PRIVATE)
        uid = SANDBOX_UID if "setuid" in layers else os.getuid()
        opts = f"size={plan['max_disk_mb']}m,nr_inodes=4096,mode=0700,uid={uid},gid={uid}"
        _mount(libc, "tmpfs", plan["workdir"], "tmpfs", MS_NOSUID | MS_NODEV, opts)
        os.chdir(plan["workdir"])  # the old cwd is the directory underneath the new mount
        with open("main.py", "wb") as f, os.fdopen(plan["program_fd"], "rb", closefd=False) as src:
            f.write(src.read())
        os.chown("main.py", uid, uid)
    inner(plan)


def _wait_and_mirror(child: int, status_fd: int) -> None:
    """Body of the waiter outside the PID namespace; never returns."""
    try:
        os.close(status_fd)
        while True:
            try:
                _, status = os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
            os._exit(128 + sig)
        os._exit(os.waitstatus_to_exitcode(status))
    finally:
        os._exit(125)


def inner(plan: dict) -> None:
    libc = _libc()
    layers = set(plan["layers"])
    status_fd = plan["status_fd"]
    under_bwrap = "bwrap" in layers
    ruleset = -1
    if layers & {"landlock_fs", "landlock_net", "landlock_scope"}:
        writable = [plan["workdir"]]
        readable = plan["read_paths"] + list(SYSTEM_READ_PATHS)
        ruleset = _landlock_ruleset(libc, layers, plan["landlock_abi"], readable, writable)
    if "setuid" in layers and not under_bwrap:
        if plan["keep_read_cap"]:
            _keep_read_cap_as_nobody(libc)
        else:
            drop_to(SANDBOX_UID)
    if "rlimits" in layers:
        rl = resource
        nproc = plan["max_processes"]
        if under_bwrap:
            nproc += 1  # bwrap's init (PID 1) counts in the namespace's uid too
        elif os.getuid() != 0 and "setuid" not in layers:
            nproc += _tasks_of(os.getuid())  # counted over the whole uid here: leave the others room
        rl.setrlimit(rl.RLIMIT_CORE, (0, 0))
        rl.setrlimit(rl.RLIMIT_CPU, (plan["cpu_s"], plan["cpu_s"]))  # soft == hard: SIGKILL at the limit
        rl.setrlimit(rl.RLIMIT_FSIZE, (plan["max_file_bytes"], plan["max_file_bytes"]))
        rl.setrlimit(rl.RLIMIT_NOFILE, (NOFILE, NOFILE))
        rl.setrlimit(rl.RLIMIT_NPROC, (nproc, nproc))
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if ruleset >= 0:
        _check(libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)), "landlock_restrict_self")
        os.close(ruleset)
    if "pidns" in layers and not under_bwrap:
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if "rlimits" in layers:
        resource.setrlimit(resource.RLIMIT_DATA, (plan["memory_bytes"], plan["memory_bytes"]))
        resource.setrlimit(resource.RLIMIT_AS, (plan["memory_bytes"], plan["memory_bytes"]))
    keep = {status_fd}
    os.closerange(3, min(keep))
    os.closerange(max(keep) + 1, 65536)
    os.set_inheritable(status_fd, False)
    if "seccomp" in layers and not plan.get("seccomp_loaded"):
        load_seccomp(seccomp_filter())  # last: it forbids mount, unshare, ...
    os.write(status_fd, b"ready\n")
    os.execv(plan["python"], plan["argv"])


def main(argv: list[str]) -> None:
    stage, plan = argv[1], json.loads(argv[2])
    try:
        {"outer": outer, "inner": inner}[stage](plan)
        raise RuntimeError(f"stage {stage} returned instead of exec'ing the program")
    except BaseException as exc:  # noqa: BLE001 - everything goes to the parent, then exit
        message = f"error: {stage}: {type(exc).__name__}: {exc}\n".encode()[:4000]
        for fd in (plan["status_fd"], 2):  # stderr too: the parent stops reading the status after "ready"
            try:
                os.write(fd, b"leantune sandbox setup failed: " + message if fd == 2 else message)
            except OSError:
                pass
        os._exit(125)


if __name__ == "__main__":
    main(sys.argv)
