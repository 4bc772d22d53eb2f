"""Which micro-batches each rank trains on: W processes at accumulation A equal 1 process at A x W.

The global batch of one optimizer step is ``micro_batch_size x grad_accum x world_size`` examples.
Global micro-batch indices are counted as in one process (``leantune.data.sft.batch_at`` turns an
index into examples), and step ``s`` covers ``s*A*W .. (s+1)*A*W - 1``: rank ``r`` takes the ``A``
consecutive ones starting at ``s*A*W + r*A``. So a resumed or re-sized run (same ``A x W``) visits the
same examples in the same optimizer steps.
"""

from __future__ import annotations


def rank_micro_steps(step: int, grad_accum: int, world_size: int, rank: int) -> list[int]:
    """Global micro-batch indices rank ``rank`` processes at optimizer step ``step`` (0-based).

    >>> rank_micro_steps(0, grad_accum=2, world_size=2, rank=0)
    [0, 1]
    >>> rank_micro_steps(0, grad_accum=2, world_size=2, rank=1)
    [2, 3]
    >>> rank_micro_steps(3, grad_accum=2, world_size=2, rank=1)
    [14, 15]

    One process with accumulation A x W takes the same micro-batches in the same step:

    >>> rank_micro_steps(3, grad_accum=4, world_size=1, rank=0)
    [12, 13, 14, 15]
    """
    if step < 0 or grad_accum <= 0 or world_size <= 0:
        raise ValueError(f"rank_micro_steps: need step >= 0, grad_accum > 0, world_size > 0; "
                         f"got step={step}, grad_accum={grad_accum}, world_size={world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank_micro_steps: rank {rank} is outside [0, world_size={world_size})")
    first = step * grad_accum * world_size + rank * grad_accum
    return list(range(first, first + grad_accum))


def micro_steps_done(step: int, grad_accum: int, world_size: int) -> int:
    """Global micro-batches consumed by all ranks before optimizer step ``step`` (a checkpoint's
    ``micro_step``; world-size independent for a fixed global batch).

    >>> micro_steps_done(3, grad_accum=2, world_size=2) == micro_steps_done(3, grad_accum=4, world_size=1)
    True
    """
    return step * grad_accum * world_size
