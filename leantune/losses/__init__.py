"""Losses: small pure functions of (hidden | logits, labels, weights) -> scalar or per-token values."""

from leantune.losses.linear_cross_entropy import (
    LinearCrossEntropyFunction,
    linear_cross_entropy,
)
from leantune.losses.token_logprobs import linear_token_logprobs

__all__ = ["LinearCrossEntropyFunction", "linear_cross_entropy", "linear_token_logprobs"]
