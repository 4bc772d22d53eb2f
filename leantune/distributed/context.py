"""The process group: who this process is, collectives, and a dead peer turned into one clear error.

Everything here is plain ``torch.distributed`` started by ``torchrun`` (env:// rendezvous): gloo on CPU,
NCCL on CUDA. A single process (``WORLD_SIZE`` unset or 1) gets a context with ``backend=None`` and
every collective is the identity, so the training loop is written once.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0

# What a collective says when the other end is gone (gloo) or never answers (gloo, NCCL).
_PEER_LOST_MARKERS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "timed out",
    "collective operation timeout",
    "remote worker crashing",
    "nccl communicator was aborted",
    "socket closed",
)


class PeerLostError(RuntimeError):
    """Another rank of the job died or stopped answering; this rank cannot go on."""


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the job.

    rank: global rank in [0, world_size); local_rank: rank on this node (the CUDA device index);
    backend: "gloo" | "nccl" | None (single process, nothing initialized); device: where the model lives.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None and self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def peer_lost_message(rank: int, detail: str) -> str:
    return f"rank {rank} lost its peers ({detail}); resume with --resume"


_peer_lost_raised = False  # one PeerLostError per process: a SIGTERM during its unwinding is ignored


def _on_sigterm(rank: int):
    def handler(signum, frame):
        global _peer_lost_raised
        if _peer_lost_raised:
            return
        _peer_lost_raised = True
        # torchrun's agent sends SIGTERM to every surviving worker of a node once one worker has died
        # (its summary names the root cause); raising lets `finally` blocks run and says what to do.
        raise PeerLostError(peer_lost_message(
            rank, "the launcher stopped this worker with SIGTERM, usually because another rank died; "
                  "the launcher's 'Root Cause' names it"))

    return handler


_previous_sigterm = None


def init_distributed(device: torch.device | str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the job torchrun started, or describe a single process.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and, through env://, ``MASTER_ADDR``/``MASTER_PORT``).
    With ``WORLD_SIZE > 1``: initializes the default process group, gloo for a CPU ``device`` and NCCL for
    CUDA (the device becomes ``cuda:LOCAL_RANK``), with ``timeout_s`` seconds for every collective; a
    SIGTERM from the launcher then raises `PeerLostError`. Otherwise nothing is initialized and the
    context has ``backend=None``. Call `destroy` at the end.
    """
    global _previous_sigterm
    device = torch.device(device)
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world_size <= 1:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # so cuda:N's memory statistics are the ones the ledger reads
        return DistContext(rank=0, world_size=1, local_rank=0, backend=None, device=device)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing and not dist.is_initialized():
        raise ValueError(f"WORLD_SIZE={world_size} but {', '.join(missing)} unset: launch with "
                         f"`torchrun --nproc-per-node N -m leantune ...` (see docs/scale.md)")
    if device.type == "cuda":
        backend = "nccl"
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"distributed training supports cpu (gloo) and cuda (nccl) devices, not {device.type!r}")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if backend == "nccl" else None,
        )
    else:
        backend = dist.get_backend()
    ctx = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                      backend=backend, device=device)
    try:
        _previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm(ctx.rank))
    except ValueError:  # not the main thread: leave signals alone
        _previous_sigterm = None
    return ctx


def destroy(ctx: DistContext) -> None:
    """Tear the process group down (no-op for a single process) and restore the SIGTERM handler."""
    global _previous_sigterm
    if not ctx.is_distributed:
        return
    if _previous_sigterm is not None:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, _previous_sigterm)
        _previous_sigterm = None
    if dist.is_initialized():
        dist.destroy_process_group()


def is_peer_lost(err: BaseException) -> bool:
    """Whether ``err`` (raised by a collective, DDP's backward or a state-dict gather) means a peer is gone."""
    if isinstance(err, PeerLostError) or isinstance(err, dist.DistError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _PEER_LOST_MARKERS)


@contextlib.contextmanager
def peer_guard(ctx: DistContext):
    """Run a block that talks to other ranks; a dead or silent peer becomes `PeerLostError`.

    Wrap each optimizer step (forward, backward, all-reduces, step) and each checkpoint in it:
    ``with peer_guard(ctx): ...``. Other errors pass through unchanged. A no-op for one process.
    """
    if not ctx.is_distributed:
        yield
        return
    try:
        yield
    except PeerLostError:
        raise
    except RuntimeError as err:
        if not is_peer_lost(err):
            raise
        global _peer_lost_raised
        _peer_lost_raised = True
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PeerLostError(peer_lost_message(ctx.rank, detail[:300])) from err


# ----------------------------------------------------------------------------------------------
# Collectives (identity for one process)


def all_reduce_sum(value: float | torch.Tensor, ctx: DistContext) -> float | torch.Tensor:
    """Σ over ranks. A float comes back a float (reduced in fp64); a tensor comes back a new tensor
    on its own device (the input is left untouched). One process: ``value`` itself."""
    if not ctx.is_distributed:
        return value
    comm_device = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    with peer_guard(ctx):
        if isinstance(value, torch.Tensor):
            t = value.detach().to(comm_device, copy=True)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t.to(value.device)
        t = torch.tensor([float(value)], dtype=torch.float64, device=comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())


def broadcast_object(obj, ctx: DistContext, src: int = 0):
    """``obj`` of rank ``src`` on every rank (picklable objects; other ranks may pass None)."""
    if not ctx.is_distributed:
        return obj
    box = [obj if ctx.rank == src else None]
    with peer_guard(ctx):
        dist.broadcast_object_list(box, src=src, device=ctx.device if ctx.backend == "nccl" else None)
    return box[0]


def gather_objects(obj, ctx: DistContext, dst: int = 0) -> list | None:
    """Every rank's ``obj`` as a list indexed by rank, on rank ``dst``; None on the others.
    One process: ``[obj]``."""
    if not ctx.is_distributed:
        return [obj]
    # all_gather_object (not gather_object): it works on every backend, and the objects are small.
    out = [None] * ctx.world_size
    with peer_guard(ctx):
        dist.all_gather_object(out, obj)
    return out if ctx.rank == dst else None


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op for one process)."""
    if not ctx.is_distributed:
        return
    with peer_guard(ctx):
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.local_rank])
        else:
            dist.barrier()



def all_reduce_max(value: float, ctx: DistContext) -> float:
    """The largest ``value`` over ranks (a number; e.g. peak memory). One process: ``value`` itself."""
    if not ctx.is_distributed:
        return value
    comm_device = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    t = torch.tensor([float(value)], dtype=torch.float64, device=comm_device)
    with peer_guard(ctx):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return type(value)(t.item()) if isinstance(value, int) else float(t.item())


def all_reduce_gradients(params: list[torch.Tensor], ctx: DistContext) -> None:
    """Σ of ``params``' gradients over ranks, in place, as one flat buffer (small LoRA gradients: one
    collective). For a loop whose forward cannot run inside a DDP wrapper (RL's update)."""
    if not ctx.is_distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm = flat if ctx.backend == "nccl" else flat.cpu()
    with peer_guard(ctx):
        dist.all_reduce(comm, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = comm[offset:offset + n].view_as(g).to(g.device)
        offset += n


def all_gather_objects(obj, ctx: DistContext) -> list:
    """Every rank's ``obj`` (picklable) as a list indexed by rank, on every rank. One process: ``[obj]``."""
    if not ctx.is_distributed:
        return [obj]
    out = [None] * ctx.world_size
    with peer_guard(ctx):
        dist.all_gather_object(out, obj)
    return out
