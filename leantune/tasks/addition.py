"""Two-digit addition with a worked, column-by-column thinking span: the demo's task.

The same problems, verifier and reward as :mod:`leantune.tasks.arithmetic`, restricted to ``+``.
SmolLM2-135M-Instruct solves ~2% of these greedily out of the box and learns the worked format in a
few minutes of LoRA on 2 CPU cores (measured numbers in the README).

>>> p = generate(1, seed=0)[0]
>>> "+" in p["prompt"] and verify(p["completion"], p["answer"])
True
"""

from __future__ import annotations

from leantune.tasks import arithmetic
from leantune.tasks.arithmetic import (  # noqa: F401
    extract_answer,
    is_complete,
    reward,
    verify,
    write_jsonl,
)

NAME = "addition"


def generate(n: int, seed: int = 0, split: str = "train", *, digits: int = 2) -> list[dict]:
    """``n`` distinct addition problems of ``split`` (train/test disjoint by problem hash)."""
    return arithmetic.generate(n, seed=seed, split=split, digits=digits, ops=("+",))
