"""Losses: small pure functions of (hidden | logits, labels, weights) -> scalar or per-token values."""

from leantune.losses.linear_cross_entropy import LinearCrossEntropyFunction, linear_cross_entropy
from leantune.losses.token_logprobs import linear_token_logprobs
from leantune.losses.vocab_subset import (
    CANDIDATE_SOURCES,
    build_candidates,
    embedding_neighbour_candidates,
    softmax_mass,
    token_counts,
    top_token_candidates,
    vocab_subset,
    vocab_subset_cross_entropy,
)

__all__ = [
    "CANDIDATE_SOURCES",
    "LinearCrossEntropyFunction",
    "build_candidates",
    "embedding_neighbour_candidates",
    "linear_cross_entropy",
    "linear_token_logprobs",
    "softmax_mass",
    "token_counts",
    "top_token_candidates",
    "vocab_subset",
    "vocab_subset_cross_entropy",
]
