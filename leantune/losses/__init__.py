"""Losses: small pure functions of (hidden | logits, labels, weights) -> scalar."""

from leantune.losses.linear_cross_entropy import LinearCrossEntropyFunction, linear_cross_entropy

__all__ = ["LinearCrossEntropyFunction", "linear_cross_entropy"]
