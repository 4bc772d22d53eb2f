"""The vocabulary-subset loss's set-up: the candidate set, built once before SFT, and the ledger's note.

See ``leantune.losses.vocab_subset`` for the loss itself (arXiv 2606.19528, an APPROXIMATE loss).
"""

from __future__ import annotations

import random

import torch

from leantune.adapters.lora import causal_lm
from leantune.config import Recipe, SpanWeights
from leantune.data.sft import SPAN_PROMPT, Example, collate
from leantune.losses.vocab_subset import build_candidates, softmax_mass, token_counts
from leantune.quant.weight_only import dense_head_weight


def sft_candidates(recipe: Recipe, model, train_examples: list[Example], pad_id: int) -> torch.Tensor | None:
    """Candidate token ids of the approximate vocabulary-subset loss (sorted int64), or None (exact loss).

    Built once from the training data: token counts over every token and over completion tokens, and for
    the "probability" source the model's summed softmax at the loss positions of a seeded sample of
    ``loss.vocab_subset_calibration`` examples (forward only, no gradients).
    """
    k = recipe.loss.vocab_subset
    if k is None:
        return None
    head = causal_lm(model).get_output_embeddings()
    vocab = head.out_features
    weight = dense_head_weight(head) if recipe.loss.vocab_subset_source == "embedding" else None  # (V, H)
    all_counts = token_counts((e.input_ids for e in train_examples), vocab)
    target_counts = token_counts(
        ([t for t, s in zip(e.input_ids, e.spans) if s != SPAN_PROMPT] for e in train_examples), vocab
    )
    mass = None
    if recipe.loss.vocab_subset_source == "probability":
        n = min(recipe.loss.vocab_subset_calibration, len(train_examples))
        sample = [train_examples[i] for i in sorted(random.Random(recipe.train.seed).sample(range(len(train_examples)), n))]
        mass = calibration_softmax_mass(model, sample, pad_id, recipe.loss.weights_at(0),
                                        recipe.train.micro_batch_size, recipe.loss.chunk_size)
    return build_candidates(recipe.loss.vocab_subset_source, k, weight=weight, all_counts=all_counts,
                            target_counts=target_counts, probability_mass=mass)


@torch.no_grad()
def calibration_softmax_mass(model, examples: list[Example], pad_id: int, weights: SpanWeights, batch_size: int,
                             chunk_size: int) -> torch.Tensor:
    """(V,) Σ softmax over the loss-carrying positions of ``examples``: where the model puts its probability."""
    was_training = model.training
    model.eval()
    lm = causal_lm(model)
    weight = dense_head_weight(lm.get_output_embeddings())  # (V, H); a quantized head: a transient copy
    mass = torch.zeros(weight.shape[0], dtype=torch.float64)
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(weight.device) for k, v in collate(examples[i : i + batch_size], pad_id, weights).items()}
        hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False).last_hidden_state[:, :-1]  # (B, T-1, H)
        keep = batch["labels"][:, 1:] != -100
        mass += softmax_mass(hidden[keep], weight, chunk_size=chunk_size).to(mass.device)  # (V,)
    model.train(was_training)
    return mass


def loss_note(recipe: Recipe, candidates: torch.Tensor | None, subset_rows: list[int]) -> dict:
    """The ledger's account of which loss was trained: exact, or the approximate vocabulary subset."""
    if candidates is None:
        return {"kind": "exact cross-entropy (chunked linear_cross_entropy, logits masking)"}
    return {
        "kind": "APPROXIMATE vocabulary-subset cross-entropy (arXiv 2606.19528)",
        "vocab_subset": recipe.loss.vocab_subset,
        "vocab_subset_source": recipe.loss.vocab_subset_source,
        "vocab_subset_calibration": recipe.loss.vocab_subset_calibration
        if recipe.loss.vocab_subset_source == "probability" else None,
        "candidates": candidates.numel(),
        "subset_size_mean": sum(subset_rows) / len(subset_rows) if subset_rows else None,
        "subset_size_max": max(subset_rows, default=None),
        "note": "softmax over candidates + each step's targets only; the logged training loss is a lower "
                "bound of the exact loss; eval_loss is the exact loss",
    }


