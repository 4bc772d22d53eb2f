"""Full (unsharded) state dicts for saving and resuming, keyed by the model's own parameter names.

``torch.distributed.checkpoint.state_dict`` does the work: it gathers FSDP2 shards (DTensor) into full
tensors, offloads them to CPU on rank 0, and keys optimizer state by parameter name rather than by
position, so a checkpoint written by W ranks loads into any world size and into one process. The same
calls run without a process group, so one process and W processes write the same format.
"""

from __future__ import annotations

import torch
from torch import nn

from leantune.distributed.context import DistContext, peer_guard
from leantune.distributed.wrap import unwrap

# torch.distributed.checkpoint is imported where used: it costs ~1 s of start-up that a run which never
# checkpoints (or a CLI command that only validates) should not pay.


def _gather_options(ctx: DistContext, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=ctx.is_distributed, **kw)


def _load_options(ctx: DistContext, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, broadcast_from_rank0=ctx.is_distributed, **kw)


def _to_cpu(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to_cpu(v) for v in tree]
    return tree


def full_state_dict(wrapped_or_model: nn.Module, ctx: DistContext, trainable_only: bool) -> dict[str, torch.Tensor] | None:
    """Name -> full CPU tensor on rank 0, None on other ranks. A collective: call it on every rank.

    ``trainable_only``: only parameters with ``requires_grad`` (a LoRA adapter; the same names as
    ``leantune.adapters.lora.trainable_state``); else the whole ``state_dict`` (buffers included).
    Names are the model's own (no ``module.``/``model.`` prefix from DDP or `LossModule`).
    """
    from torch.distributed.checkpoint import state_dict as dcp

    model = unwrap(wrapped_or_model)
    with peer_guard(ctx):
        sd = dcp.get_model_state_dict(model, options=_gather_options(ctx, ignore_frozen_params=trainable_only))
    if not ctx.is_main:
        return None
    return _to_cpu(sd)


def load_full_state_dict(wrapped_or_model: nn.Module, state: dict[str, torch.Tensor] | None, ctx: DistContext,
                         trainable_only: bool) -> None:
    """Load a `full_state_dict` result: ``state`` is needed on rank 0 only (others may pass None); rank 0
    broadcasts it and each rank keeps its shard (FSDP2) or a full copy (DDP). A collective.

    ``trainable_only``: ``state`` holds exactly the trainable parameters (missing or unknown names
    raise); else it must match the whole state dict.
    """
    from torch.distributed.checkpoint import state_dict as dcp

    model = unwrap(wrapped_or_model)
    if ctx.is_main:
        if state is None:
            raise ValueError("load_full_state_dict: rank 0 needs the state dict")
        # remove_duplicate=False: a tied lm_head is in the state dict under both of its names
        names = ({n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad} if trainable_only
                 else set(model.state_dict()))
        missing, unknown = sorted(names - set(state)), sorted(set(state) - names)
        if missing or unknown:
            raise ValueError(f"state dict does not match the model: missing {missing[:3]}, unexpected {unknown[:3]}")
    with peer_guard(ctx):
        # a shallow copy: set_model_state_dict adds the missing (frozen) names to the dict it is given
        dcp.set_model_state_dict(model, dict(state) if ctx.is_main else {},
                             options=_load_options(ctx, strict=not trainable_only))


def optimizer_state_dict(wrapped_or_model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict | None:
    """The optimizer's full state keyed by parameter name (CPU tensors) on rank 0, None elsewhere.
    A collective. The optimizer must have been built on the wrapped module's parameters."""
    from torch.distributed.checkpoint import state_dict as dcp

    model = unwrap(wrapped_or_model)
    with peer_guard(ctx):
        osd = dcp.get_optimizer_state_dict(model, optimizer, options=_gather_options(ctx))
    if not ctx.is_main:
        return None
    return _to_cpu(osd)


def load_optimizer_state_dict(wrapped_or_model: nn.Module, optimizer: torch.optim.Optimizer, state: dict | None,
                              ctx: DistContext) -> None:
    """Load an `optimizer_state_dict` result (needed on rank 0 only; broadcast from there). A collective.

    Call it on a fresh optimizer before the first backward (resume). The optimizer may keep ``state``'s
    tensors rather than copies (one process), so do not reuse ``state`` afterwards.
    """
    from torch.distributed.checkpoint import state_dict as dcp

    model = unwrap(wrapped_or_model)
    if ctx.is_main and state is None:
        raise ValueError("load_optimizer_state_dict: rank 0 needs the optimizer state")
    if not optimizer.state and any(p.grad is not None for g in optimizer.param_groups for p in g["params"]):
        # torch.distributed.checkpoint initializes an empty optimizer's state with a zero-gradient
        # step, and skips it when gradients exist: the state would then silently stay empty
        raise ValueError("load_optimizer_state_dict: the optimizer has gradients but no state; load the "
                         "optimizer state before the first backward (or zero_grad(set_to_none=True) first)")
    with peer_guard(ctx):
        dcp.set_optimizer_state_dict(model, optimizer, state if ctx.is_main else {}, options=_load_options(ctx))
