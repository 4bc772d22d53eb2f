"""How much of its training data a model reproduces: k-extractable memorization and the train/held-out loss gap.

k-extractable (Carlini et al., arXiv 2202.07646, "Quantifying Memorization Across Neural Language Models"):
a training example is extractable when greedy decoding from ``prefix`` of its tokens reproduces the next
``suffix`` tokens exactly. The rate is over a seeded sample of the training examples long enough to hold
both windows; the same is measured on held-out examples as the control (a rate there is what the task
itself makes predictable, not memorization). Repeated examples are the ones extracted (arXiv 2202.07646),
which is what deduplication (:mod:`leantune.data.dedup`) and Memorization Sinks (arXiv 2507.09937) address.

Window alignment: ``start`` takes the prefix from the example's first token (the paper's definition);
``completion`` ends the prefix where the completion starts, so the suffix is the first completion tokens,
the part SFT trains on by default (prompt weight 0).

Loss gap: mean cross-entropy per loss-carrying token (the run's span weights) on held-out examples minus
that on the training sample. Positive: the model fits its training data better than new data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from leantune.config import SpanWeights
from leantune.data.sft import SPAN_PROMPT, Example

Align = Literal["start", "completion"]


@dataclass(frozen=True)
class Window:
    """``prefix`` then ``suffix`` token ids, consecutive in the example at ``source``."""

    prefix: list[int]
    suffix: list[int]
    source: str


def windows(examples: list[Example], prefix: int, suffix: int, align: Align = "start") -> list[Window]:
    """The (prefix, suffix) window of each example that is long enough; shorter ones are left out.

    >>> ex = [Example([1, 2, 3, 4, 5], [0, 0, 2, 2, 2], "f:1"), Example([7, 8], [0, 2], "f:2")]
    >>> windows(ex, 2, 2)
    [Window(prefix=[1, 2], suffix=[3, 4], source='f:1')]
    >>> windows(ex, 2, 3, align="completion")
    [Window(prefix=[1, 2], suffix=[3, 4, 5], source='f:1')]
    """
    if prefix < 1 or suffix < 1:
        raise ValueError(f"windows: prefix and suffix must be >= 1 tokens, got {prefix}, {suffix}")
    out = []
    for e in examples:
        if align == "start":
            start = 0
        else:
            completion = next((t for t, s in enumerate(e.spans) if s != SPAN_PROMPT), len(e.spans))
            start = completion - prefix
        if start >= 0 and start + prefix + suffix <= len(e.input_ids):
            ids = e.input_ids
            out.append(Window(ids[start : start + prefix], ids[start + prefix : start + prefix + suffix], e.source))
    return out


def sample_indices(n: int, samples: int, seed: int) -> list[int]:
    """``min(n, samples)`` distinct indices of ``range(n)``, ascending, drawn with a seeded stable RNG.

    >>> sample_indices(5, 10, seed=0)
    [0, 1, 2, 3, 4]
    >>> len(sample_indices(100, 7, seed=0)), sample_indices(100, 7, seed=0) == sample_indices(100, 7, seed=0)
    (7, True)
    """
    if samples >= n:
        return list(range(n))
    return sorted(random.Random(f"leantune-memorization:{seed}").sample(range(n), samples))


def exact_match(generated: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) bool: row i of ``generated`` equals row i of ``targets`` at every position. Both (N, k) long.

    >>> exact_match(torch.tensor([[1, 2], [1, 3]]), torch.tensor([[1, 2], [1, 2]])).tolist()
    [True, False]
    """
    if generated.shape != targets.shape:
        raise ValueError(f"exact_match: shapes differ, {tuple(generated.shape)} vs {tuple(targets.shape)}")
    return (generated == targets).all(dim=1)


@torch.no_grad()
def greedy_continuations(model, prefixes: torch.Tensor, steps: int, batch_size: int = 16) -> torch.Tensor:
    """(N, steps) argmax tokens after each (N, P) prefix, with the KV cache. Every prefix has the same
    length, so there is no padding; nothing stops at eos (the target may contain it)."""
    from transformers import DynamicCache

    from leantune.adapters.lora import causal_lm
    from leantune.rl.rollout import _cache_kwarg

    lm = causal_lm(model)  # a PEFT model's base runs its adapter layers too
    cache_kw = _cache_kwarg(lm)  # `cache` in newer transformers, `past_key_values` before
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    try:
        for i in range(0, prefixes.shape[0], batch_size):
            ids = prefixes[i : i + batch_size].to(dev)  # (B, P)
            cache = DynamicCache()
            nxt = lm(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kw: cache}).logits[:, -1].argmax(-1)  # (B,)
            gen = [nxt]
            for _ in range(steps - 1):
                nxt = lm(input_ids=nxt[:, None], use_cache=True, **{cache_kw: cache}).logits[:, -1].argmax(-1)
                gen.append(nxt)
            out.append(torch.stack(gen, dim=1).cpu())  # (B, steps)
            del cache
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, steps, dtype=torch.long)


def extractable(model, wins: list[Window], batch_size: int = 16) -> dict:
    """k-extractable rate of ``wins``: ``{"windows", "extractable", "rate", "extracted": [sources]}``."""
    if not wins:
        return {"windows": 0, "extractable": 0, "rate": None, "extracted": []}
    prefixes = torch.tensor([w.prefix for w in wins], dtype=torch.long)  # (N, P)
    targets = torch.tensor([w.suffix for w in wins], dtype=torch.long)  # (N, k)
    hit = exact_match(greedy_continuations(model, prefixes, targets.shape[1], batch_size), targets)
    return {"windows": len(wins), "extractable": int(hit.sum()), "rate": float(hit.float().mean()),
            "extracted": [w.source for w, h in zip(wins, hit.tolist()) if h]}


def memorization(model, tokenizer, train_examples: list[Example], heldout_examples: list[Example] | None = None, *,
                 prefix: int = 32, suffix: int = 32, samples: int = 100, seed: int = 0, align: Align = "start",
                 weights: SpanWeights | None = None, batch_size: int = 16, chunk_size: int = 1024) -> dict:
    """Extractable rate on a seeded sample of ``samples`` training examples (and, as a control, of held-out
    ones), and the mean-loss gap held-out minus train over the same samples (``weights``: the run's span
    weights). Examples shorter than ``prefix + suffix`` tokens are not sampled (``eligible`` counts them)."""
    from leantune.train.sft import evaluate_loss

    weights = weights or SpanWeights()
    out: dict = {"prefix": prefix, "suffix": suffix, "align": align, "seed": seed}
    losses = {}
    for name, examples in (("train", train_examples), ("heldout", heldout_examples)):
        if examples is None:
            continue
        wins = windows(examples, prefix, suffix, align)
        chosen = [wins[i] for i in sample_indices(len(wins), samples, seed)]
        out[name] = {"examples": len(examples), "eligible": len(wins), **extractable(model, chosen, batch_size)}
        by_source = {e.source: e for e in examples}
        sampled = [by_source[w.source] for w in chosen] or [examples[i] for i in sample_indices(len(examples), samples, seed)]
        losses[name] = evaluate_loss(model, sampled, tokenizer.pad_token_id, weights, batch_size, chunk_size)["eval_loss"]
        out[name]["mean_loss"] = losses[name]
    out["loss_gap"] = losses["heldout"] - losses["train"] if "heldout" in losses else None
    return out


def evaluate_memorization(target: str, *, heldout: str | None = None, prefix: int = 32, suffix: int = 32,
                          samples: int = 100, seed: int = 0, align: Align = "start", batch_size: int = 16,
                          dtype: str | None = None) -> dict:
    """:func:`memorization` of a run directory's model on its own training data (``data.train``, read as the run
    read it, ``data.dedup`` included) against ``heldout`` (default: the run's ``data.eval``; neither: no gap)."""
    from leantune.data.sft import load_sft_examples
    from leantune.eval.evaluate import _run_recipe, load_for_eval

    recipe = _run_recipe(Path(target)) if Path(target).is_dir() else None
    if recipe is None or not recipe.data.train:
        raise FileNotFoundError(f"{target}: --memorization needs a leantune run directory (recipe.yaml with data.train) "
                                "to know the training data")
    model, tok = load_for_eval(target, dtype)
    train_examples, _ = load_sft_examples(recipe.data.train, tok, recipe.data)
    held_cfg = recipe.data.model_copy(update={"eval": heldout, "eval_split": None}) if heldout else recipe.data
    held = load_sft_examples(held_cfg.eval, tok, held_cfg, role="eval")[0] if held_cfg.eval else None
    out = memorization(model, tok, list(train_examples), None if held is None else list(held), prefix=prefix,
                       suffix=suffix, samples=samples, seed=seed, align=align, weights=recipe.loss.weights_at(max(0, recipe.train.steps - 1)),
                       batch_size=batch_size)
    return {"run": target, "train_data": recipe.data.train, "heldout_data": held_cfg.eval, **out}
