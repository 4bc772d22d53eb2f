"""Data-parallel training over several processes with ``torch.distributed`` (gloo on CPU, NCCL on CUDA).

Launched by torchrun (``torchrun --nproc-per-node N -m leantune train RECIPE``; docs/scale.md). The
loop's contract, the same for one process and W processes:

- `init_distributed` -> `DistContext` (rank, world size, device); `destroy` at the end.
- Step ``s`` of rank ``r`` trains on global micro-batches `rank_micro_steps` ``(s, A, W, r)``; the global
  batch is micro_batch x A x W, equal to one process with accumulation A x W.
- The normalizer is ``all_reduce_sum(local loss weight)``; each micro-batch's loss sum is divided by it.
- The model is wrapped in `LossModule` and `wrap_for_training` ("ddp" or "fsdp"); gradients are SUMMED
  over ranks, so no rescaling by the world size. `sync_gradients(wrapped, last_micro_batch)` around each
  micro-batch's forward and backward; `clip_grad_norm` before the optimizer step.
- `full_state_dict` / `optimizer_state_dict` (rank 0 gets them) and their loaders for checkpoints.
- `peer_guard(ctx)` around a step turns a dead peer into `PeerLostError` ("rank N lost its peers ...;
  resume with --resume").
"""

from leantune.distributed.batches import micro_steps_done, rank_micro_steps
from leantune.distributed.context import (
    DEFAULT_TIMEOUT_S,
    DistContext,
    PeerLostError,
    all_gather_objects,
    all_reduce_gradients,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_object,
    destroy,
    gather_objects,
    init_distributed,
    is_peer_lost,
    peer_guard,
)
from leantune.distributed.launch import launch_torchrun, strip_nproc, torchrun_command
from leantune.distributed.state import (
    full_state_dict,
    load_full_state_dict,
    load_optimizer_state_dict,
    optimizer_state_dict,
)
from leantune.distributed.wrap import LossModule, clip_grad_norm, sync_gradients, unwrap, wrap_for_training

__all__ = [
    "DEFAULT_TIMEOUT_S", "DistContext", "LossModule", "PeerLostError", "all_gather_objects", "all_reduce_gradients", "all_reduce_max",
    "all_reduce_sum", "barrier",
    "broadcast_object", "clip_grad_norm", "destroy", "full_state_dict", "gather_objects", "init_distributed",
    "is_peer_lost", "launch_torchrun", "load_full_state_dict", "load_optimizer_state_dict", "micro_steps_done",
    "optimizer_state_dict", "peer_guard", "rank_micro_steps", "strip_nproc", "sync_gradients",
    "torchrun_command", "unwrap", "wrap_for_training",
]
