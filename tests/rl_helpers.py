"""Rewards for tests on a tiny random model, importable as ``rl_helpers:NAME`` in a recipe's rl.rewards."""

from __future__ import annotations


def has_digit(prompts, completions, **kw) -> list[float]:
    """1.0 when the completion contains a digit: a random tiny model hits it about half the time."""
    return [1.0 if any(ch.isdigit() for ch in c) else 0.0 for c in completions]


def constant(prompts, completions, **kw) -> list[float]:
    """The same reward for everything: every group has zero variance."""
    return [0.5 for _ in completions]


def digit_share(prompts, completions, **kw) -> list[float]:
    """The share of a completion's characters that are digits: graded, so any change of the text shows."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]
