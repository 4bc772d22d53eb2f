"""Vocabulary-subset cross-entropy: an APPROXIMATE loss whose softmax runs over a subset of the vocabulary.

From "Peak-memory reduction for LoRA on edge devices" (arXiv 2606.19528): instead of
normalizing over all V tokens, the softmax runs over S = (a fixed candidate set) ∪ (the batch's target
tokens). The LM-head work and memory per loss-carrying token drop from V to |S| columns (the paper uses
|S| ≈ 1000; SmolLM2 has V = 49152), and for a bf16 LM head only an (|S|, H) fp32 copy is made instead
of a (V, H) one.

What it computes, per kept token i (kept: label != ignore_index and weight != 0):

    l_i = logsumexp_{v ∈ S} (h_i · w_v) - h_i · w_{y_i}        (nats)

Because a log-sum-exp over a subset is at most the one over the whole vocabulary, l_i <= the exact
cross-entropy, with equality iff S is the whole vocabulary (then this *is* `linear_cross_entropy`, bit
for bit). The gap is log(1 / P_model(S | h_i)): the probability mass the model puts outside S. The
gradient pushes down only the logits of tokens in S; mass on tokens outside S is not penalized, so a
model trained this way can drift probability onto them (measured on the demo task after 40 steps with
k=1024 "frequency": ~0.2% of the mass outside S, vs ~0.02% for the model trained with the exact loss).
The measured gap on real data and the training comparison are in README.md ("Vocabulary subset: an
approximate loss") and benchmarks/README.md.

The paper's own rule for choosing its ~1000 tokens is not reproduced here; leantune offers three,
built once, before training, from the training data (`build_candidates`):

- "probability": the k tokens on which the model itself puts the most probability (`softmax_mass`) at
  the loss positions of a sample of training examples -- measured best by far (README: 0.026 nats mean
  gap at k=1024 on the demo task vs 0.14 for "frequency");
- "frequency": the k most frequent tokens of the training data (`token_counts`, `top_token_candidates`;
  ties, including never-seen tokens, go to the lower id: BPE vocabularies number merges roughly by
  corpus frequency);
- "embedding": the completion tokens of the training data and the tokens whose output embeddings are
  closest (cosine) to theirs (`embedding_neighbour_candidates`). Measured worst: the mass a model puts
  outside the targets is mostly on tokens that are not near them in embedding space.

Memory: never builds [N, V] logits. The loss is `linear_cross_entropy` on the rows `S` of the LM-head
weight with labels renumbered into S, so chunking, logits masking, per-token weights and the
recomputing backward are the exact loss's own; the largest vocabulary-sized tensor is a
(chunk_size, |S|) chunk of logits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from leantune.losses.linear_cross_entropy import linear_cross_entropy

if TYPE_CHECKING:
    from leantune.quant.weight_only import QuantizedWeight

CANDIDATE_SOURCES = ("probability", "frequency", "embedding")


def token_counts(sequences: Iterable[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """(V,) int64: how often each token id occurs across ``sequences`` (lists of token ids).

    >>> token_counts([[1, 2, 2], [2, 4]], vocab_size=5).tolist()
    [0, 1, 3, 0, 1]
    """
    flat = [t for seq in sequences for t in seq]
    ids = torch.tensor(flat, dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"token_counts: token ids must lie in [0, {vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
    return torch.bincount(ids, minlength=vocab_size)


def top_token_candidates(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(min(k, V),) sorted int64 ids of the k highest ``scores`` (V,) -- counts or probability mass; ties
    (zero scores included) go to the lower id.

    >>> top_token_candidates(torch.tensor([0, 5, 1, 5, 0, 2]), k=4).tolist()
    [1, 2, 3, 5]
    >>> top_token_candidates(torch.tensor([0, 0, 0, 7]), k=2).tolist()  # filled with the lowest ids
    [0, 3]
    """
    if k <= 0:
        raise ValueError(f"top_token_candidates: k must be positive, got {k}")
    order = torch.sort(-scores.double(), stable=True).indices  # score descending, id ascending on ties
    return order[:k].sort().values


def softmax_mass(hidden: torch.Tensor, weight: torch.Tensor, *, chunk_size: int = 1024) -> torch.Tensor:
    """(V,) float64 on the CPU: Σ_i softmax(h_i · Wᵀ) over the rows of ``hidden`` (N, H) -- where the model
    puts its probability at those positions. No gradient; peak extra memory chunk_size x V fp32 plus an fp32
    copy of ``weight`` (V, H) when it is not fp32, on their device (a GPU's chunk sums come back as V floats).

    >>> w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # (V=3, H=2)
    >>> softmax_mass(torch.tensor([[9.0, 0.0], [0.0, 9.0]]), w).round(decimals=2).tolist()
    [1.0, 1.0, 0.0]
    """
    with torch.no_grad():
        w = weight.detach().float()  # (V, H)
        mass = torch.zeros(w.shape[0], dtype=torch.float64)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size].detach().float()  # (C, H)
            mass += torch.softmax(h @ w.T, dim=-1).sum(0).cpu().double()  # (C, V) -> (V,); no float64 on MPS
    return mass


def embedding_neighbour_candidates(weight: torch.Tensor, seeds: torch.Tensor, k: int, *, chunk_size: int = 8192) -> torch.Tensor:
    """(min(k, V),) sorted int64 ids on the CPU: the seeds first, then the tokens whose output-embedding rows
    have the highest cosine similarity to their nearest seed (computed on ``weight``'s device).

    weight: (V, H) LM-head weight; seeds: (S0,) int64 token ids (S0 <= k keeps them all).
    Peak extra memory: chunk_size x S0 similarities plus an fp32 (V, H) normalized copy of ``weight``.

    >>> w = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])  # (V=4, H=2)
    >>> embedding_neighbour_candidates(w, torch.tensor([0]), k=2).tolist()
    [0, 1]
    """
    if k <= 0:
        raise ValueError(f"embedding_neighbour_candidates: k must be positive, got {k}")
    vocab = weight.shape[0]
    seeds = seeds.long().unique()
    if seeds.numel() == 0:
        raise ValueError("embedding_neighbour_candidates: need at least one seed token")
    with torch.no_grad():
        unit = F.normalize(weight.detach().float(), dim=1)  # (V, H)
        seeds = seeds.to(unit.device)
        anchors = unit.index_select(0, seeds)  # (S0, H)
        score = torch.empty(vocab, device=unit.device)  # (V,) cosine to the nearest seed
        for start in range(0, vocab, chunk_size):
            score[start : start + chunk_size] = (unit[start : start + chunk_size] @ anchors.T).amax(dim=1)
        score[seeds] = float("inf")  # seeds always win, even against duplicate embeddings
        # Stable sort on -score: among equal scores the lower id comes first, so the result is deterministic.
        order = torch.sort(-score, stable=True).indices
    return order[: min(k, vocab)].sort().values.cpu()


def build_candidates(source: str, k: int, *, weight: torch.Tensor | None, all_counts: torch.Tensor,
                     target_counts: torch.Tensor, probability_mass: torch.Tensor | None = None) -> torch.Tensor:
    """The candidate set of ``source``, sorted int64 ids, at most k of them:

    - "probability": the k tokens with the most ``probability_mass`` (``softmax_mass`` of the model at
      the loss positions of some training examples): the model's own view of the relevant vocabulary;
    - "frequency": the k most frequent tokens of the training data (``all_counts``, prompts included);
    - "embedding": the (up to k) most frequent loss-carrying tokens (``target_counts``) and their nearest
      neighbours in the output embedding ``weight`` (V, H).
    """
    if source == "probability":
        if probability_mass is None:
            raise ValueError("build_candidates: source 'probability' needs probability_mass (see softmax_mass)")
        return top_token_candidates(probability_mass, k)
    if source == "frequency":
        return top_token_candidates(all_counts, k)
    if source == "embedding":
        seen = int((target_counts > 0).sum())
        if seen == 0:
            raise ValueError("build_candidates: no loss-carrying token in the training data to seed 'embedding'")
        if weight is None:
            raise ValueError("build_candidates: source 'embedding' needs the LM-head weight")
        seeds = top_token_candidates(target_counts, min(k, seen))
        return embedding_neighbour_candidates(weight, seeds, k)
    raise ValueError(f"build_candidates: source must be one of {CANDIDATE_SOURCES}, got {source!r}")


def vocab_subset(candidates: torch.Tensor, labels: torch.Tensor | Sequence[torch.Tensor], *,
                 ignore_index: int = -100) -> torch.Tensor:
    """(S,) sorted unique int64: ``candidates`` ∪ every label != ignore_index (one tensor or several), on the
    labels' device (candidates built on the CPU join a GPU batch's labels there).

    Passing all micro-batches of an optimizer step gives every micro-batch the same subset, so gradient
    accumulation still equals one large batch.

    >>> vocab_subset(torch.tensor([7, 2]), torch.tensor([[3, -100], [2, 9]])).tolist()
    [2, 3, 7, 9]
    """
    labels = [labels] if isinstance(labels, torch.Tensor) else list(labels)
    device = labels[0].device if labels else candidates.device
    parts = [candidates.reshape(-1).long().to(device)]
    for lab in labels:
        lab = lab.reshape(-1).long().to(device)
        parts.append(lab[lab != ignore_index])
    return torch.cat(parts).unique(sorted=True)


def vocab_subset_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor | QuantizedWeight,
    labels: torch.Tensor,
    candidates: torch.Tensor,
    *,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """APPROXIMATE cross-entropy of ``hidden @ weight.T``: softmax over S = candidates ∪ {kept labels} only.

    Per kept token: l_i = logsumexp_{v ∈ S}(h_i·w_v) - h_i·w_{y_i} <= the exact loss (see module doc);
    equal to ``linear_cross_entropy`` (value and gradients) when S covers the vocabulary. Masking,
    ``weights``, ``reduction`` and the returned dtype are those of ``linear_cross_entropy``.

    Args:
        hidden: (..., H) float final hidden states; weight: (V, H) LM-head weight, or a frozen quantized
            head (``leantune.quant.QuantizedWeight``, ``quant.embedding_bits``): then only the subset's rows
            are dequantized, to ``hidden``'s dtype, and no gradient reaches the head;
        labels: (...) integer targets, already shifted; candidates: (C,) int64 token ids in [0, V)
            (any order, duplicates allowed; empty = the batch's targets only).
        chunk_size, ignore_index (must be negative), weights, reduction: as in ``linear_cross_entropy``.

    >>> g = torch.Generator().manual_seed(0)
    >>> hidden, weight = torch.randn(2, 5, 8, generator=g), torch.randn(11, 8, generator=g)  # (B, T, H), (V, H)
    >>> labels = torch.tensor([[1, 2, -100, 4, 5], [-100, -100, 7, 8, 10]])
    >>> exact = linear_cross_entropy(hidden, weight, labels)
    >>> bool(vocab_subset_cross_entropy(hidden, weight, labels, torch.arange(11)) == exact)
    True
    >>> bool(vocab_subset_cross_entropy(hidden, weight, labels, torch.tensor([0, 3])) < exact)
    True
    """
    if ignore_index >= 0:
        raise ValueError(f"vocab_subset_cross_entropy: ignore_index must be negative, got {ignore_index}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"vocab_subset_cross_entropy: labels must be an integer tensor, got {labels.dtype}")
    if candidates.dtype.is_floating_point or candidates.dtype == torch.bool or candidates.dim() != 1:
        raise ValueError(
            f"vocab_subset_cross_entropy: candidates must be a 1-D integer tensor of token ids, got "
            f"{candidates.dtype} of shape {tuple(candidates.shape)}"
        )
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(
            f"vocab_subset_cross_entropy: weights shape {tuple(weights.shape)} must equal labels shape {tuple(labels.shape)}"
        )
    quantized = not isinstance(weight, torch.Tensor)
    vocab = weight.shape[0]
    labels_1d = labels.reshape(-1).long()  # (N,)
    keep = labels_1d != ignore_index
    if weights is not None:
        keep &= weights.detach().reshape(-1) != 0
    kept = labels_1d[keep]  # (K,)
    for name, ids in (("label", kept), ("candidate", candidates)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ValueError(f"vocab_subset_cross_entropy: {name} {bad} is outside [0, {vocab})")

    subset = vocab_subset(candidates, kept)  # (S,) sorted
    if quantized:  # (S, H): only the subset's codes are read
        head = weight.rows(subset, hidden.dtype)
    elif subset.numel() == vocab:
        head = weight  # the whole vocabulary: exactly linear_cross_entropy, no copy
    else:
        head = weight.index_select(0, subset)  # (S, H); gradients flow back to the selected rows
    sub_labels = torch.full_like(labels_1d, ignore_index)  # (N,) renumbered into [0, S)
    sub_labels[keep] = torch.searchsorted(subset, kept)
    return linear_cross_entropy(
        hidden, head, sub_labels.reshape(labels.shape),
        chunk_size=chunk_size, ignore_index=ignore_index, weights=weights, reduction=reduction,
    )
