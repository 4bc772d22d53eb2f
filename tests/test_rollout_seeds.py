"""Per-prompt sampling seeds: counter-based per-row streams (splitmix64), and group completions that do not
depend on the rest of the batch."""

from __future__ import annotations

import random

import pytest
import torch

from leantune.models.tiny import tiny_model, tiny_tokenizer
from leantune.rl.rollout import (
    prompt_seeds,
    row_keys,
    row_uniforms,
    sample_categorical,
    sample_groups,
    splitmix64,
)


def _splitmix64_reference(x: int) -> int:
    """The C reference on Python ints mod 2^64."""
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_splitmix64_matches_the_reference_on_uint64_bits():
    rng = random.Random(0)
    xs = [0, 1, 2**63 - 1, 2**63, 2**64 - 1] + [rng.getrandbits(64) for _ in range(200)]
    signed = torch.tensor([x - 2**64 if x >= 2**63 else x for x in xs], dtype=torch.long)
    got = [int(v) % 2**64 for v in splitmix64(signed)]
    assert got == [_splitmix64_reference(x) for x in xs]


def _chi2(counts: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


def test_row_uniforms_are_uniform_and_independent_across_rows_and_steps():
    keys = row_keys(range(50), group_size=8)  # 400 rows
    assert keys.unique().numel() == 400
    u = torch.stack([row_uniforms(keys, t) for t in range(100)])  # (T=100, N=400)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # marginal: 20 bins, 40000 draws; chi2 with 19 dof has 99.9% quantile ~43.8
    counts = torch.bincount((u * 20).long().flatten(), minlength=20).double()
    assert _chi2(counts, torch.full((20,), u.numel() / 20.0, dtype=torch.float64)) < 43.8
    # pairs: (step t, step t+1) of a row and (row i, row i+1) at a step, on a 10x10 grid (99 dof: 99.9% ~148)
    for a, b in [(u[:-1], u[1:]), (u[:, :-1], u[:, 1:])]:
        cell = ((a * 10).long() * 10 + (b * 10).long()).flatten()
        counts = torch.bincount(cell, minlength=100).double()
        assert _chi2(counts, torch.full((100,), cell.numel() / 100.0, dtype=torch.float64)) < 148.0
    # neighbouring seeds and neighbouring completions are not correlated
    assert abs(float(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1])) < 0.03


def test_sample_categorical_with_row_uniforms_follows_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.3, 1.0])  # unnormalized, one zero
    keys = row_keys(range(4000), group_size=1)
    draws = torch.cat([sample_categorical(probs.expand(4000, 5), uniforms=row_uniforms(keys, t)) for t in range(3)])
    counts = torch.bincount(draws, minlength=5).double()
    assert counts[1] == 0
    expected = probs[[0, 2, 3, 4]].double() / probs.sum() * draws.numel()
    assert _chi2(counts[[0, 2, 3, 4]], expected) < 16.3  # 3 dof, 99.9%


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    tok = tiny_tokenizer(chat_template=True)
    return tiny_model(vocab_size=len(tok)), tok


def _group(ro, i):
    g = ro.group_size
    sl = slice(i * g, (i + 1) * g)
    return ro.completion_ids[sl], ro.logprobs[sl], ro.truncated[sl]


def test_seeds_make_a_group_independent_of_the_rest_of_the_batch(policy):
    """Prompt A alone, A with a longer B (A left-padded), and B before A: the same completions for A."""
    model, tok = policy
    a, b = "What is 2 + 3?", "a much longer prompt than the first one, to force left padding"
    kw = dict(group_size=4, max_new_tokens=12, temperature=1.0, top_p=0.95)
    alone = sample_groups(model, tok, [a], seeds=[11], **kw)
    with_b = sample_groups(model, tok, [a, b], seeds=[11, 12], **kw)
    b_first = sample_groups(model, tok, [b, a], seeds=[12, 11], **kw)
    ids, lps, trunc = _group(alone, 0)
    assert len({tuple(c) for c in ids}) > 1  # the G completions of a group differ from each other
    for other, i in [(with_b, 0), (b_first, 1)]:
        ids2, lps2, trunc2 = _group(other, i)
        assert ids2 == ids and trunc2 == trunc
        for x, y in zip(lps, lps2):
            torch.testing.assert_close(torch.tensor(y), torch.tensor(x), atol=1e-6, rtol=0)
    assert _group(with_b, 1)[0] == _group(b_first, 0)[0]  # and B's group too
    other_seed = sample_groups(model, tok, [a], seeds=[99], **kw)
    assert other_seed.completion_ids != alone.completion_ids


def test_seeds_ignore_the_generator_and_must_match_the_prompts(policy):
    model, tok = policy
    kw = dict(group_size=2, max_new_tokens=6)
    x = sample_groups(model, tok, ["x", "y"], seeds=[3, 4], generator=torch.Generator().manual_seed(0), **kw)
    y = sample_groups(model, tok, ["x", "y"], seeds=[3, 4], generator=torch.Generator().manual_seed(1), **kw)
    assert x.completion_ids == y.completion_ids
    with pytest.raises(ValueError, match="one per prompt"):
        sample_groups(model, tok, ["x", "y"], seeds=[3], **kw)


def test_prompt_seeds_differ_by_step_round_and_index():
    s = {tuple(prompt_seeds(0, step, rnd, 4)) for step in range(5) for rnd in range(3)}
    assert len(s) == 15 and all(len(set(x)) == 4 for x in s)
    assert prompt_seeds(1, 0, 0, 4) != prompt_seeds(0, 0, 0, 4)
    assert prompt_seeds(0, 2, 1, 6)[:4] == prompt_seeds(0, 2, 1, 4)
