"""Processes: torchrun's rank and world size, collectives, and the context every trainer runs in.

(interim: the process-group context the run session needs; DDP/FSDP2 wrapping lands beside it)
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "cpu", *, timeout_s: int = 300) -> DistContext:
    """The context of this process: single-process outside torchrun; under torchrun (WORLD_SIZE > 1) the
    process group is initialized (gloo on the CPU, nccl on CUDA) and CUDA processes take cuda:LOCAL_RANK."""
    from leantune.models.precision import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank=local if world > 1 else None)
    if world == 1:
        return DistContext(0, 1, 0, None, dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank, world, local, backend, dev)


def destroy(ctx: DistContext) -> None:
    if ctx.is_distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        torch.distributed.barrier()


def _reduce(value, ctx: DistContext, op):
    if not ctx.is_distributed:
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=ctx.device)
    torch.distributed.all_reduce(t, op=op)
    return type(value)(t.item()) if isinstance(value, int) else t.item()


def all_reduce_sum(value, ctx: DistContext):
    """Sum of ``value`` (a number) over ranks; unchanged in one process."""
    return _reduce(value, ctx, torch.distributed.ReduceOp.SUM if torch.distributed.is_available() else None)


def all_reduce_max(value, ctx: DistContext):
    return _reduce(value, ctx, torch.distributed.ReduceOp.MAX if torch.distributed.is_available() else None)


def rank_micro_steps(step: int, grad_accum: int, world_size: int, rank: int) -> list[int]:
    """Global micro-batch indices rank ``rank`` processes at optimizer step ``step``: the global batch is
    micro_batch x grad_accum x world_size, and one process with grad_accum x world_size micro-batches per step
    processes exactly the union, so W processes equal 1 at the same global batch.

    >>> rank_micro_steps(1, 2, 2, 0), rank_micro_steps(1, 2, 2, 1), rank_micro_steps(1, 4, 1, 0)
    ([4, 5], [6, 7], [4, 5, 6, 7])
    """
    base = step * grad_accum * world_size + rank * grad_accum
    return list(range(base, base + grad_accum))


def wrap_for_training(module: torch.nn.Module, ctx: DistContext, parallel: str) -> torch.nn.Module:
    """``module`` (whose forward is the whole loss) wrapped for ``ctx``'s processes: DDP (gradients of the
    trainable parameters all-reduced, averaged over ranks)."""
    from torch.nn.parallel import DistributedDataParallel

    if parallel != "ddp":
        raise NotImplementedError(f"train.parallel: {parallel}")
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def sync_gradients(wrapped: torch.nn.Module, enabled: bool):
    """A context in which backward all-reduces gradients (``enabled``) or only accumulates them locally."""
    import contextlib

    if enabled or not hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext()
    return wrapped.no_sync()


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``leantune <argv>`` on ``nproc`` processes of this machine with torchrun (``--standalone``); returns
    its exit code. A process that dies takes the job down (torchrun's elastic agent stops the others)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "leantune", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)
