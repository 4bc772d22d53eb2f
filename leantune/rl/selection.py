"""Which prompts to roll out, and which rollout groups to train on: the rollout economics of RL.

- `PromptSelector` (HIVE, arXiv 2603.25184: useful prompts sit at a moving "learning edge",
  pre-filtered by their reward history): a prompt whose last `window` groups were all solved (pass rate 1) or all failed
  (pass rate 0) gives zero advantage and would likely do so again next step, so it sits out for
  `cooldown_steps` and is then re-admitted (the policy has moved). Its state is plain data, saved in
  checkpoints.
- `informative_groups` (DAPO dynamic sampling, arXiv 2503.14476): a group whose rewards are all equal has
  zero advantage for every member and is dropped before the update.
- `prompt_entropy_keep` (HIVE's second filter): among candidate prompts, keep those whose prompt entropy
  under the current policy is highest; low entropy marks a prompt the policy has gone stale on.
- `PromptStream`: a seeded, resumable walk over the prompt pool, epoch after epoch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def informative_groups(rewards: Sequence[float], group_size: int | Sequence[int]) -> list[bool]:
    """One flag per group: does it carry any learning signal (rewards not all equal)? ``group_size``: one
    size for all groups, or one per group (routed groups, each > 0), group-contiguous.

    >>> informative_groups([1, 0, 1, 1, 1, 1], 3)
    [True, False]
    >>> informative_groups([0.5, 0.5], 1)  # a single-sample group can never be compared
    [False, False]
    >>> informative_groups([1, 0, 1, 1, 1, 0], [2, 3, 1])
    [True, False, False]
    """
    if isinstance(group_size, int):
        if len(rewards) % group_size:
            raise ValueError(f"{len(rewards)} rewards is not a multiple of group_size={group_size}")
        group_size = [group_size] * (len(rewards) // group_size)
    if sum(group_size) != len(rewards) or min(group_size, default=1) < 1:
        raise ValueError(f"group sizes {list(group_size)} (each >= 1) do not cover {len(rewards)} rewards")
    starts = [sum(group_size[:i]) for i in range(len(group_size))]
    return [max(rewards[a : a + n]) != min(rewards[a : a + n]) for a, n in zip(starts, group_size)]


class PromptSelector:
    """Skip prompts whose recent pass rates are all 0 or all 1; re-admit them after a cooldown.

    >>> s = PromptSelector(window=2, cooldown_steps=3)
    >>> s.observe(7, 1.0, step=0); s.admits(7, step=1)   # one solved group is not yet a pattern
    True
    >>> s.observe(7, 1.0, step=1); s.admits(7, step=2)   # two in a row: sit out steps 2..4
    False
    >>> s.admits(7, step=5)                               # re-admitted
    True
    """

    def __init__(self, window: int = 1, cooldown_steps: int = 8, enabled: bool = True):
        if window < 1 or cooldown_steps < 1:
            raise ValueError("window and cooldown_steps must be >= 1")
        self.window, self.cooldown_steps, self.enabled = window, cooldown_steps, enabled
        self.history: dict[int, list[float]] = {}  # prompt -> recent pass rates (newest last)
        self.skip_until: dict[int, int] = {}  # prompt -> first step it is admitted again
        self.skipped = 0  # times a prompt was passed over (each one saves a group of rollouts)

    def observe(self, prompt: int, pass_rate: float, step: int) -> None:
        """Record a group's pass rate for ``prompt`` at ``step``."""
        h = self.history.setdefault(prompt, [])
        h.append(float(pass_rate))
        del h[: -self.window]
        if self.enabled and len(h) == self.window and (all(r == 0.0 for r in h) or all(r == 1.0 for r in h)):
            self.skip_until[prompt] = step + 1 + self.cooldown_steps
            h.clear()  # after the cooldown it must show the pattern again to be skipped again

    def admits(self, prompt: int, step: int) -> bool:
        if not self.enabled:
            return True
        until = self.skip_until.get(prompt)
        if until is None or step >= until:
            self.skip_until.pop(prompt, None)
            return True
        return False

    def skipping(self, step: int) -> int:
        """How many prompts are sitting out at ``step``."""
        return sum(1 for u in self.skip_until.values() if step < u)

    def state_dict(self) -> dict:
        return {"history": {str(k): v for k, v in self.history.items()},
                "skip_until": {str(k): v for k, v in self.skip_until.items()}, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.history = {int(k): list(v) for k, v in state["history"].items()}
        self.skip_until = {int(k): int(v) for k, v in state["skip_until"].items()}
        self.skipped = int(state["skipped"])


class PromptStream:
    """Prompt indices in a seeded shuffled order, reshuffled each epoch; resumable from (epoch, cursor).

    >>> s = PromptStream(4, seed=0); [s.next() for _ in range(6)]
    [2, 3, 1, 0, 3, 2]
    """

    def __init__(self, size: int, seed: int = 0):
        if size < 1:
            raise ValueError("the prompt pool is empty")
        self.size, self.seed, self.epoch, self.cursor = size, seed, 0, 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next(self) -> int:
        if self.cursor == self.size:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._shuffle(self.epoch)
        i = self._order[self.cursor]
        self.cursor += 1
        return i

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._shuffle(self.epoch)


def prompt_entropy_keep(entropies: Sequence[float], fraction: float) -> list[int]:
    """Indices of the ``fraction`` of prompts with the highest policy entropy (at least one), in input order.

    >>> prompt_entropy_keep([0.1, 2.0, 0.5, 1.5], 0.5)
    [1, 3]
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = max(1, round(len(entropies) * fraction))
    best = sorted(range(len(entropies)), key=lambda i: -entropies[i])[:k]
    return sorted(best)
