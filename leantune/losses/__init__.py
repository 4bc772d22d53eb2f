"""Losses: small pure functions of (hidden | logits, labels, weights) -> scalar."""

from leantune.losses.linear_cross_entropy import (
    LinearCrossEntropyFunction,
    linear_cross_entropy,
)
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
    "softmax_mass",
    "token_counts",
    "top_token_candidates",
    "vocab_subset",
    "vocab_subset_cross_entropy",
]
