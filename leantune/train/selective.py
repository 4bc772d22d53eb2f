"""Selective activation checkpointing (``train.activation_checkpointing: selective``).

Full checkpointing keeps each decoder layer's input and replays the whole layer in backward: one more
forward of every matmul. Selective checkpointing keeps the outputs of the expensive ops -- every matmul
(the layer's linears and their LoRA A/B products) and the fused attention kernel -- and recomputes only
the cheap ops between them: RMSNorm, SiLU, rotary embedding, residual adds, casts, dropout, ``repeat_kv``.
In backward the replayed layer takes the saved matmul and attention outputs from a cache instead of
computing them again. Memory lies between ``off`` and ``all``; the recompute is the memory-bound
elementwise part of a layer only.

This is PyTorch's selective activation checkpoint API (``torch.utils.checkpoint``,
``create_selective_checkpoint_contexts``), the op-level policy torchtitan ships as its "selective op"
activation checkpointing, without torchtitan's every-other-matmul rule. It is enabled through
transformers' own checkpointing switch: ``activation_checkpointing_enable(activation_checkpointing_kwargs=
{"use_reentrant": False, "context_fn": selective_context_fn})`` hands these keyword arguments to
``torch.utils.checkpoint.checkpoint`` for every decoder layer (``transformers.modeling_utils``
``_activation_checkpointing_enable``: ``functools.partial(checkpoint, **kwargs)``); no model code is
patched. ``leantune.plan.memory.selective_layer_saved_bytes`` is the planner's account of what it keeps.

Related: Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
(arXiv 2205.05198), which introduced selective recomputation (there: recompute the attention core, keep
the rest); here the attention kernel's output is kept, because on CPU the fused SDPA kernel is itself an
expensive op and its output (N x n_heads x head_dim) is small.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

aten = torch.ops.aten


def _ops(*names: str) -> frozenset:
    """The ``.default`` overloads of the named aten ops that this torch build registers."""
    return frozenset(getattr(aten, name).default for name in names if hasattr(aten, name))


# Matmuls (nn.Linear reaches the dispatcher as mm / addmm; batched matmuls as bmm) and every fused
# scaled-dot-product-attention kernel (the CPU flash kernel; CUDA's flash, memory-efficient, cuDNN).
SAVED_OPS = _ops("mm", "addmm", "bmm", "baddbmm", "linear",
                 "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")


def save_matmuls_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """The selective policy: keep the outputs of ``SAVED_OPS``, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context_fn():
    """``context_fn`` for non-reentrant ``torch.utils.checkpoint.checkpoint``: a fresh pair of (forward,
    recompute) contexts per checkpointed call, caching what ``save_matmuls_and_attention`` keeps."""
    return create_selective_checkpoint_contexts(save_matmuls_and_attention)
