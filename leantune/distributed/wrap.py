"""Data parallelism for leantune's loss: DDP (replicated model, LoRA) or FSDP2 (sharded, full fine-tuning).

leantune never asks the model for logits: the loss runs the decoder and then a chunked custom-autograd
``linear_cross_entropy`` that reads ``lm_head.weight`` itself. DDP and FSDP2 act through the forward of
the module they wrap, so they must wrap a module whose forward *is* the whole loss: `LossModule`.

Gradient reduction SUMS over ranks, for both wrappers (DDP through a comm hook, FSDP2 through its
gradient divide factor of 1). The rule of the loop is then the one-process rule: each rank divides its
loss sum by the step's total loss weight over *all* ranks (``all_reduce_sum`` of the local normalizer),
and the summed gradients are exactly the gradient of the global token-mean loss.

FSDP2 and the lm_head: `wrap_for_training` shards each decoder layer as its own group and leaves
everything else (embeddings, final norm, lm_head) in the root group, which is the `LossModule`. The root
group is all-gathered before the root's forward runs and stays unsharded after it
(``reshard_after_forward=False`` on the root), so when ``linear_cross_entropy`` reads
``lm_head.weight`` it gets the full, unsharded parameter and may save it for backward; its gradient is
accumulated on that unsharded parameter and reduce-scattered in FSDP2's final backward callback. Do
not ``fully_shard`` the embeddings or lm_head separately: their forward hooks would not run for a
direct read of the weight (tested in tests/test_distributed.py against one process).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Literal

import torch
import torch.distributed as dist
from torch import nn

from leantune.distributed.context import DistContext


class LossModule(nn.Module):
    """``forward(batch, **kw) = loss_fn(model, batch, **kw)``: the whole loss as one module's forward.

    ``loss_fn(model, batch, **kw) -> Tensor`` (a 0-d loss), e.g.
    ``functools.partial(leantune.train.sft.lm_loss_sum, chunk_size=512)``; ``kw`` carries per-call
    extras such as ``candidates``. The wrapped model is ``.model`` (its parameter names gain a
    ``model.`` prefix here; `unwrap` and the state-dict functions give the model's own names).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch, **kwargs) -> torch.Tensor:
        return self.loss_fn(self.model, batch, **kwargs)


def unwrap(module: nn.Module) -> nn.Module:
    """The user's model inside DDP and/or a `LossModule` (FSDP2 keeps the module object itself)."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    if isinstance(module, LossModule):
        module = module.model
    return module


def _sum_allreduce_hook(group, bucket):
    """DDP comm hook: Σ over ranks, without DDP's default division by the world size.
    (No annotations: DDP checks them and this module's are strings under ``from __future__``.)"""
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def default_layers(module: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers model (its ``GradientCheckpointingLayer`` modules)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]


def wrap_for_training(module: nn.Module, ctx: DistContext, parallel: Literal["ddp", "fsdp"], *,
                      layers: list[nn.Module] | None = None) -> nn.Module:
    """Make ``module`` (normally a `LossModule`) data-parallel over the job; identity for one process.

    ddp: every rank holds the whole model; only parameters that require grad are bucketed, broadcast
    from rank 0 at construction and all-reduced (a frozen LoRA base is neither broadcast nor synced:
    every rank loads the same weights). Buffers are broadcast once, not at every forward. Gradients are
    SUMMED over ranks (comm hook).
    fsdp: FSDP2 ``fully_shard`` on each of ``layers`` (default: the transformers decoder layers) and then
    on ``module`` itself; parameters become DTensor shards, so build the optimizer from the returned
    module's parameters AFTER this call. Gradients are SUMMED over ranks (divide factor 1).
    Both: move the model to ``ctx.device`` first; call the result as ``wrapped(batch, **kw)``; see
    `sync_gradients` for accumulation. Every forward whose backward must be reduced, and under FSDP2
    every forward at all (evaluation too, on every rank: the layers all-gather inside it), goes
    through ``wrapped``, not the inner model.
    """
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")
    if not ctx.is_distributed:
        return module
    if parallel == "ddp":
        frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
        # DDP's own (underscore) static method to leave named parameters out of its initial broadcast and
        # bucketing; torch uses it internally and it touches only this module's attributes.
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
        ddp = nn.parallel.DistributedDataParallel(
            module,
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            forward_sync_buffers=False,  # buffers (rotary tables) are constants: synced at init only
        )
        ddp.register_comm_hook(dist.group.WORLD, _sum_allreduce_hook)
        return ddp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = default_layers(module) if layers is None else layers
    if not layers:
        raise ValueError("wrap_for_training(parallel='fsdp'): no decoder layers found; pass layers=[...]")
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    # the root (embeddings, norm, lm_head) stays gathered from its forward to its backward: the loss
    # saves lm_head.weight for backward itself (FSDP2's default for a root; said here, not assumed)
    fully_shard(module, mesh=mesh, reshard_after_forward=False)
    for m in module.modules():
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(1.0)  # Σ over ranks, as DDP's comm hook
            # a divide factor is a PREMUL_SUM reduction, which gloo lacks; a plain SUM then scales by 1
            m.set_force_sum_reduction_for_comms(True)
    return module


@contextlib.contextmanager
def sync_gradients(wrapped: nn.Module, enabled: bool):
    """Context for one micro-batch's forward AND backward: ``enabled=False`` keeps the gradient local
    (accumulated on this rank, no communication), ``True`` reduces it over ranks. Use False for every
    micro-batch of an optimizer step but the last. Plain modules: no-op.
    """
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        with contextlib.nullcontext() if enabled else wrapped.no_sync():
            yield
        return
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2 module
        wrapped.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
        return
    yield


def clip_grad_norm(wrapped: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm of the trainable parameters to ``max_norm`` (inf: measure only);
    return the norm before clipping. Works on DDP (replicated grads) and FSDP2 (DTensor shards: the
    norm is reduced over ranks)."""
    params = [p for p in wrapped.parameters() if p.requires_grad and p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # DTensor
        norm = norm.full_tensor()
    return float(norm)
