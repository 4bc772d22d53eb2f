"""Which malloc serves the process, and how the ``leantune`` command switches to a caching one.

Why. A CPU training step allocates and frees the same activation-sized buffers (MBs each) hundreds of
times. glibc serves them either from fresh mmaps, returned on free (leantune's
``train.malloc_mmap_threshold``: peak RSS stays at the working set, but every buffer is zero-filled
page by page again -- measured 7.4 million minor page faults and 25 s of kernel time per SmolLM2 step,
seq 1024, batch 4), or from its heap, which keeps the pages but fragments (peak 3.05 -> 5.8 GiB). A
size-class allocator has neither problem. Measured on that run (benchmarks/sft_memory.py, 2-core
EPYC, same session, every 2nd layer checkpointed):

==============================  ===========  ==========
malloc                          peak RSS     tokens/s
==============================  ===========  ==========
glibc, mmap threshold 128 KiB   3.05 GiB     84.1
tbbmalloc (pip ``tbb``)         3.17 GiB     117.7
jemalloc, no decay              3.33 GiB     149.1
==============================  ===========  ==========

How. A malloc is chosen when a process starts (``LD_PRELOAD``), so ``leantune train|rl|rft|demo``
re-executes itself once with the library preloaded, the way torch's own CPU launcher does
(``python -m torch.backends.xeon.run_cpu --enable-jemalloc``). Nothing inside Python is patched.
``train.allocator`` picks it: ``auto`` (jemalloc if the system has it, else tbbmalloc from the ``tbb``
wheel that leantune depends on for Linux x86-64, else the system's), ``jemalloc``, ``tbbmalloc`` or
``system``. The Python API (``leantune.train.sft.train``) cannot switch the running process; it runs
on whatever malloc it has, and every ledger records which one that was (``ledger["malloc"]``). To run
a child process under a chosen malloc, pass ``preload_env(choice)`` as its environment.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

CHOICES = ("auto", "system", "jemalloc", "tbbmalloc")
REEXEC_GUARD = "LEANTUNE_ALLOCATOR_REEXEC"
"""Set in the re-executed process: never re-execute twice, even if the preload did not take."""
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
"""Keep freed pages for reuse (jemalloc's default hands them back after 10 s: measured 96.7 vs 149.1 tokens/s
on the run above, 3.10 vs 3.33 GiB). A ``MALLOC_CONF`` already in the environment wins."""


class AllocatorError(ValueError):
    """An allocator was asked for by name and its library is not on this machine."""


@dataclass(frozen=True)
class Preload:
    name: str  # "jemalloc" | "tbbmalloc"
    libs: tuple[str, ...]  # absolute paths, in LD_PRELOAD order
    env: dict[str, str] = field(default_factory=dict)  # set unless already in the environment


def _lib_dirs() -> list[str]:
    """Where shared libraries live: this Python's prefix (pip wheels put their ``data/lib`` there), then the
    system's directories."""
    arch = os.uname().machine if hasattr(os, "uname") else ""
    dirs = [os.path.join(sys.prefix, "lib"), os.path.join(sys.base_prefix, "lib"), "/usr/local/lib",
            f"/usr/lib/{arch}-linux-gnu", f"/lib/{arch}-linux-gnu", "/usr/lib64", "/usr/lib", "/lib64", "/lib"]
    return list(dict.fromkeys(dirs))


def _find(names: Sequence[str], dirs: Sequence[str] | None = None) -> str | None:
    for d in dirs if dirs is not None else _lib_dirs():
        for name in names:
            hits = sorted(glob.glob(os.path.join(d, name)))
            if hits:
                return os.path.realpath(hits[0])
    return None


def find_jemalloc(dirs: Sequence[str] | None = None) -> Preload | None:
    """jemalloc (Debian/Ubuntu: ``apt install libjemalloc2``), or None."""
    lib = _find(["libjemalloc.so.2", "libjemalloc.so"], dirs)
    return Preload("jemalloc", (lib,), {"MALLOC_CONF": JEMALLOC_CONF}) if lib else None


def find_tbbmalloc(dirs: Sequence[str] | None = None) -> Preload | None:
    """Intel's tbbmalloc and its malloc-replacing proxy (the ``tbb`` wheel on PyPI), or None.

    Both are preloaded, the library first: the proxy links against it by soname, which the dynamic linker
    then finds already loaded, whatever ``LD_LIBRARY_PATH`` says.
    """
    lib = _find(["libtbbmalloc.so.2"], dirs)
    proxy = _find(["libtbbmalloc_proxy.so.2"], dirs)
    return Preload("tbbmalloc", (lib, proxy)) if lib and proxy else None


def preload_for(choice: str, dirs: Sequence[str] | None = None) -> Preload | None:
    """The library to preload for ``train.allocator`` = ``choice``; None means the system's malloc.

    >>> preload_for("system") is None
    True
    >>> preload_for("auto", dirs=[]) is None  # nothing installed: the system's malloc
    True
    """
    if choice not in CHOICES:
        raise AllocatorError(f"train.allocator: {choice!r} is not one of {', '.join(CHOICES)}")
    if choice == "system" or not sys.platform.startswith("linux"):
        return None
    if choice == "jemalloc":
        found = find_jemalloc(dirs)
        if found is None:
            raise AllocatorError("train.allocator: jemalloc is not installed (no libjemalloc.so.2 in "
                                 f"{', '.join(_lib_dirs() if dirs is None else dirs) or 'any library directory'}); "
                                 "install it (Debian/Ubuntu: apt install libjemalloc2) or set train.allocator=auto")
        return found
    if choice == "tbbmalloc":
        found = find_tbbmalloc(dirs)
        if found is None:
            raise AllocatorError("train.allocator: tbbmalloc is not installed (no libtbbmalloc_proxy.so.2); "
                                 "pip install tbb, or set train.allocator=auto")
        return found
    return find_jemalloc(dirs) or find_tbbmalloc(dirs)


def active() -> str:
    """The malloc this process runs on: ``jemalloc``, ``tbbmalloc`` (its proxy loaded) or ``system``."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "system"
    if "libjemalloc" in maps:
        return "jemalloc"
    if "libtbbmalloc_proxy" in maps:
        return "tbbmalloc"
    return "system"


def preload_env(choice: str, base: dict[str, str] | None = None, dirs: Sequence[str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with ``choice``'s library added to ``LD_PRELOAD``: the
    environment to start a process on that malloc. Unchanged for ``system`` or when nothing is found (auto)."""
    env = dict(os.environ if base is None else base)
    pre = preload_for(choice, dirs)
    if pre is None:
        return env
    current = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p]
    env["LD_PRELOAD"] = " ".join([*pre.libs, *[p for p in current if p not in pre.libs]])
    for k, v in pre.env.items():
        env.setdefault(k, v)
    return env


def reexec_with(choice: str, argv: Sequence[str]) -> None:
    """Replace this process with ``python -m leantune *argv`` on ``choice``'s malloc, if it is not on it
    already; return (doing nothing) when no switch is needed or possible. Called by the CLI before any
    work starts, so nothing is lost; once per command (``REEXEC_GUARD``)."""
    if os.environ.get(REEXEC_GUARD):
        return
    pre = preload_for(choice)
    if pre is None or active() == pre.name:
        return
    env = preload_env(choice)
    env[REEXEC_GUARD] = pre.name
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "leantune", *argv], env)


JEMALLOC_ARENAS_ALL = 4096  # MALLCTL_ARENAS_ALL (jemalloc >= 4.5): every arena at once
TBBMALLOC_CLEAN_ALL_BUFFERS = 0  # scalable_allocation_command's "give everything cached back"


def release_free_memory() -> str | None:
    """Hand the memory this process has freed but its malloc still holds back to the OS, now; returns what
    was asked (``"jemalloc purge"``, ``"tbbmalloc clean"``, ``"glibc trim"``) or None when nothing could be.

    Why. Loading a model frees a lot at once: a GGUF file is dequantized through temporaries, and a
    quantized base frees every full-precision weight it replaced. jemalloc as leantune runs it keeps freed
    pages for reuse forever (``JEMALLOC_CONF``: no decay), so without this the whole load stayed resident
    through training: measured on the demo recipe with an INT4 base, 1.52 GiB per step under jemalloc vs
    0.71 GiB under glibc. The training loop's own buffers are still reused (they are allocated after this).
    """
    import ctypes

    kind = active()
    try:
        lib = ctypes.CDLL(None)  # the preloaded malloc's symbols are global
        if kind == "jemalloc":
            flush = lib.mallctl("thread.tcache.flush".encode(), None, None, None, ctypes.c_size_t(0))
            purge = lib.mallctl(f"arena.{JEMALLOC_ARENAS_ALL}.purge".encode(), None, None, None, ctypes.c_size_t(0))
            return "jemalloc purge" if flush == 0 and purge == 0 else None
        if kind == "tbbmalloc":
            done = lib.scalable_allocation_command(ctypes.c_int(TBBMALLOC_CLEAN_ALL_BUFFERS), None)
            return "tbbmalloc clean" if done == 0 else None
    except (OSError, AttributeError):
        return None
    return "glibc trim" if malloc_trim() or kind == "system" else None


# --------------------------------------------------------------------------------------------
# glibc malloc tuning (when glibc's malloc is the one in use)


def _glibc_function(name: str):
    """A malloc-tuning function of glibc when glibc's malloc serves this process, else None: off Linux (macOS,
    musl, Windows) and under a preloaded malloc (``leantune.allocator``), which glibc's knobs do not reach."""
    import ctypes
    import ctypes.util

    if sys.platform != "linux" or active() != "system":
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def _mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt(param, value)``; False, and nothing changed, off glibc."""
    import ctypes

    mallopt = _glibc_function("mallopt")
    return bool(mallopt(ctypes.c_int(param), ctypes.c_int(int(value)))) if mallopt else False


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def set_malloc_mmap_threshold(nbytes: int) -> bool:
    """Ask glibc to serve allocations of ``nbytes`` or more with mmap, returned to the OS on free.

    glibc's default threshold adapts upward as large blocks are freed, so activation-sized buffers end up
    on the heap, where freed memory stays mapped: peak RSS grows with every step's high-water mark.
    Measured on benchmarks/sft_memory.py (fp32, seq 1024): 131072 bytes cut leantune's peak 2.7x.
    Returns False, and changes nothing, off glibc (macOS, musl, Windows).

    >>> isinstance(set_malloc_mmap_threshold(131072), bool)
    True
    """
    return _mallopt(M_MMAP_THRESHOLD, nbytes)


def set_malloc_trim_threshold(nbytes: int) -> bool:
    """Let up to ``nbytes`` of free memory stay at the top of glibc's heap before it is handed back.

    Once the mmap threshold is set, glibc's trim threshold stays at its 128 KiB default: every free that
    leaves more than that at the top of the heap returns it to the OS, and the next allocation faults the
    same pages back in, zero-filled.
    """
    return _mallopt(M_TRIM_THRESHOLD, nbytes)


HEAP_MMAP_THRESHOLD = 32 * 2**20
"""glibc's own upper bound for its adaptive mmap threshold (64-bit): what ``heap_allocator`` sets."""
HEAP_TRIM_THRESHOLD = 1 << 30
"""Free heap ``heap_allocator`` keeps for reuse (1 GiB, a cap: the heap holds only what the phase used)."""
GLIBC_TRIM_THRESHOLD = 128 * 1024
"""glibc's default trim threshold, restored after ``heap_allocator``."""


@contextlib.contextmanager
def heap_allocator(training_threshold: int | None):
    """Serve mid-size buffers from a heap that keeps its pages, then restore ``training_threshold``.

    For phases that allocate the same few-MB buffers over and over: decoding (``(rows, vocab)``
    probabilities, KV-cache growth, every token) and RL's policy update on short sequences. With a low
    mmap threshold each buffer is a fresh mmap, zero-filled page by page; with glibc's default trim
    threshold the heap hands its top back after every free and faults it in again. Measured on 32
    SmolLM2 rollouts (2-core CPU): the mmap threshold alone took 20.7 s to 13.0 s, keeping the heap's
    pages took ~11.9 s to ~9.5 s (page faults per rollout ~140k to ~0), RSS +0.07 GiB there; a whole
    RL run's peak grew more (benchmarks/rl_vs_trl.py, 4 x 8 rollouts per update: 1.89 to 2.17 GiB for
    the process), as glibc's heap keeps holes. SFT on long sequences keeps its low threshold: there the
    activation buffers are large and short-lived, and the heap would fragment (measured 5.8 vs 3.05 GiB).

    On exit the training mmap threshold and glibc's default trim threshold come back and the free heap is
    handed back (``malloc_trim``). No-op when ``training_threshold`` is None (glibc left alone) or off glibc.
    """
    if training_threshold is None:
        yield
        return
    set_malloc_mmap_threshold(HEAP_MMAP_THRESHOLD)
    set_malloc_trim_threshold(HEAP_TRIM_THRESHOLD)
    try:
        yield
    finally:
        set_malloc_mmap_threshold(training_threshold)
        set_malloc_trim_threshold(GLIBC_TRIM_THRESHOLD)
        malloc_trim()


def malloc_trim() -> bool:
    """Hand glibc's free heap memory back to the OS now (``malloc_trim(0)``); False off glibc."""
    import ctypes

    trim = _glibc_function("malloc_trim")
    return bool(trim(ctypes.c_size_t(0))) if trim else False
