"""``leantune train --nproc N``: re-run the same command under torchrun on this node."""

from __future__ import annotations

import os
import subprocess
import sys


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (the flag that asked for the relaunch).

    >>> strip_nproc(["train", "r.yaml", "--nproc", "2", "train.steps=3"])
    ['train', 'r.yaml', 'train.steps=3']
    >>> strip_nproc(["train", "--nproc=4", "r.yaml"])
    ['train', 'r.yaml']
    """
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            if i + 1 >= len(argv):
                raise ValueError("--nproc needs a number of processes")
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The command line `launch_torchrun` runs: this interpreter, torchrun standalone, ``-m leantune``.

    >>> torchrun_command(2, ["train", "r.yaml", "--nproc", "2"])[1:]
    ['-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2', '-m', 'leantune', 'train', 'r.yaml']
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "leantune", *strip_nproc(argv)]


def worker_env(nproc: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The workers' environment: ``OMP_NUM_THREADS`` = this machine's cores / nproc unless already set
    (torchrun would otherwise set 1, leaving a CPU run on one thread per process)."""
    env = dict(os.environ if base is None else base)
    if "OMP_NUM_THREADS" not in env:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    return env


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``python -m torch.distributed.run --standalone --nproc-per-node nproc -m leantune ARGV``
    (``argv`` without ``--nproc``) and return its exit code. Blocks until every worker has exited."""
    return subprocess.run(torchrun_command(nproc, argv), env=worker_env(nproc), check=False).returncode
