"""Selective activation checkpointing (``train.activation_checkpointing: selective``).

Full checkpointing keeps each decoder layer's input and replays the whole layer in backward: one more
forward of every matmul. Selective checkpointing keeps the outputs of the expensive ops -- every matmul
that contracts over a full width (the layer's linears, LoRA's A product) and the fused attention kernel --
and recomputes only the cheap ops between them: RMSNorm, SiLU, rotary embedding, residual adds, casts,
dropout, ``repeat_kv``, and LoRA's B product, which contracts over the rank r only (r/in of the base
matmul's work) while its output is as large as the base's: keeping it would cost more memory than
``off`` keeps for a fully adapted layer. In backward the replayed layer takes the saved matmul and
attention outputs from a cache instead of computing them again. Memory lies between ``off`` and ``all``;
the recompute is the memory-bound elementwise part of a layer and the rank-r products.

This is PyTorch's selective activation checkpoint API (``torch.utils.checkpoint``,
``create_selective_checkpoint_contexts``), the op-level policy torchtitan ships as its "selective op"
activation checkpointing, without torchtitan's every-other-matmul rule. It is enabled through
transformers' own checkpointing switch: ``activation_checkpointing_enable(activation_checkpointing_kwargs=
{"use_reentrant": False, "context_fn": selective_context_fn(model)})`` hands these keyword arguments to
``torch.utils.checkpoint.checkpoint`` for every decoder layer (``transformers.modeling_utils``
``_activation_checkpointing_enable``: ``functools.partial(checkpoint, **kwargs)``); no model code is
patched. ``leantune.plan.memory.selective_layer_saved_bytes`` is the planner's account of what it keeps.

Related: Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
(arXiv 2205.05198), which introduced selective recomputation (there: recompute the attention core, keep
the rest); here the attention kernel's output is kept, because on CPU the fused SDPA kernel is itself an
expensive op and its output (N x n_heads x head_dim) is small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

aten = torch.ops.aten


def _ops(*names: str) -> frozenset:
    """The ``.default`` overloads of the named aten ops that this torch build registers."""
    return frozenset(getattr(aten, name).default for name in names if hasattr(aten, name))


# nn.Linear reaches the dispatcher as mm / addmm (aten.linear is decomposed above it; listed for safety),
# batched matmuls as bmm / baddbmm. The position of the left operand in each op's arguments.
MATMUL_OPS = {op: i for names, i in ((("mm", "bmm", "linear"), 0), (("addmm", "baddbmm"), 1))
              for op in _ops(*names)}
# Every fused scaled-dot-product-attention kernel: the CPU flash kernel; CUDA's flash, memory-efficient, cuDNN.
ATTENTION_OPS = _ops("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                     "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")


@dataclass(frozen=True)
class SelectivePolicy:
    """What a selectively checkpointed layer keeps: the outputs of ``ATTENTION_OPS``, and of ``MATMUL_OPS``
    that contract over more than ``low_rank`` columns (LoRA's B contracts over its rank r: recomputed)."""

    low_rank: int = 0

    def __call__(self, ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if op in ATTENTION_OPS:
            return CheckpointPolicy.MUST_SAVE
        left = MATMUL_OPS.get(op)
        if left is not None and args[left].shape[-1] > self.low_rank:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    def context_fn(self):
        """``context_fn`` for non-reentrant ``torch.utils.checkpoint.checkpoint``: a fresh pair of (forward,
        recompute) contexts per checkpointed call, caching what this policy keeps."""
        return create_selective_checkpoint_contexts(self)


def lora_rank(model) -> int:
    """The largest LoRA rank in ``model`` (PEFT keeps ``r`` per adapter name on each LoRA layer); 0 without."""
    return max((r for m in model.modules() if isinstance(getattr(m, "r", None), dict) for r in m.r.values()), default=0)


def selective_context_fn(model):
    """The ``context_fn`` that checkpoints ``model``'s layers selectively (``SelectivePolicy``)."""
    return SelectivePolicy(low_rank=lora_rank(model)).context_fn
