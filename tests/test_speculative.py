"""Exact speculative rollouts (`leantune.rl.speculative`): the sampled distribution is the policy's (a chi-square
test that also rejects wrong acceptance rules), the recorded log-probs are the policy's, greedy is unchanged."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from leantune.models.tiny import tiny_model, tiny_tokenizer
from leantune.rl.rollout import completion_logprobs, sample_categorical, sample_groups
from leantune.rl.speculative import PromptLookup, sample_speculative, verify_point_drafts


@pytest.fixture(scope="module")
def policy():
    tok = tiny_tokenizer()
    return tiny_model(vocab_size=len(tok)), tok


# A random tiny model's logits are near zero (near-uniform over 512 tokens); at temperature 0.02 it is peaked
# enough that 1000 completions of 6 tokens fall into a few dozen frequent sequences (the chi-square cells), and
# flat enough that drafted tokens often have probabilities between 0.2 and 0.8, where wrong rules show.
PROMPT, TEMPERATURE, TOKENS, SAMPLES = "The quick brown fox", 0.02, 6, 600


class GreedyPathDraft:
    """A point-mass drafter for the test's power: proposes the tokens of a fixed completion (the policy's greedy
    one) at the current completion index, whatever was sampled -- many drafts, accepted or rejected at
    moderate probabilities. Same interface as `PromptLookup`."""

    def __init__(self, path, ids, start=None):
        self.path, self.ids = list(path), list(ids)
        self.start = len(self.ids) if start is None else start

    def extend(self, tokens):
        self.ids += list(tokens)

    def propose(self, k):
        t = len(self.ids) - self.start
        return self.path[t:t + k]

    def fork(self):
        return GreedyPathDraft(self.path, self.ids, self.start)


def _rule_textbook(weights, draft, u):
    """Leviathan et al.'s rule for q = point mass, written out: accept x iff u < p(x), else draw from
    norm(max(p - 1_x, 0)) with u rescaled to [0, 1). Correct; a second, independent implementation."""
    p = weights / weights.sum(-1, keepdim=True)
    has = draft >= 0
    px = torch.where(has, p.gather(1, draft.clamp(min=0)[:, None]).squeeze(1), torch.zeros_like(u))
    residual = weights.scatter(1, draft.clamp(min=0)[:, None], 0.0)
    residual = torch.where(has[:, None], residual, weights)
    u2 = ((u - px) / (1 - px)).clamp(0, 1 - 2**-24)
    return torch.where(has & (u < px), draft, sample_categorical(residual, uniforms=u2))


def _rule_resample_from_p(weights, draft, u):
    """WRONG: on rejection draws from p itself instead of the residual (the drafted token is over-weighted)."""
    p = weights / weights.sum(-1, keepdim=True)
    has = draft >= 0
    px = torch.where(has, p.gather(1, draft.clamp(min=0)[:, None]).squeeze(1), torch.zeros_like(u))
    u2 = ((u - px) / (1 - px)).clamp(0, 1 - 2**-24)
    return torch.where(has & (u < px), draft, sample_categorical(weights, uniforms=u2))


def _rule_accept_likely(weights, draft, u):
    """WRONG: accepts a draft whenever the policy gives it at least 5% (a 'good enough' heuristic)."""
    p = weights / weights.sum(-1, keepdim=True)
    px = p.gather(1, draft.clamp(min=0)[:, None]).squeeze(1)
    return torch.where((draft >= 0) & (px > 0.05), draft, sample_categorical(weights, uniforms=u))


def _chi2_pvalue(a: Counter, b: Counter, min_count: int = 10) -> tuple[float, int]:
    """Two-sample chi-square test of homogeneity; categories with fewer than ``min_count`` draws in both
    samples together are pooled into one. Returns (p-value, degrees of freedom)."""
    cats = [c for c in a.keys() | b.keys() if a[c] + b[c] >= min_count]
    rare = (sum(a.values()) - sum(a[c] for c in cats), sum(b.values()) - sum(b[c] for c in cats))
    table = torch.tensor([[a[c], b[c]] for c in cats] + ([list(rare)] if sum(rare) else []), dtype=torch.float64)
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    dof = table.shape[0] - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0))), dof


def _completions(model, tok, seeds, rule=None, drafter=None, prompt=PROMPT, tokens=TOKENS):
    kw = dict(group_size=SAMPLES // len(seeds), max_new_tokens=tokens, temperature=TEMPERATURE, seeds=seeds)
    if rule is None:
        ro = sample_groups(model, tok, [prompt] * len(seeds), **kw)
    else:
        ro = sample_speculative(model, tok, [prompt] * len(seeds), max_draft=4, verify=rule, drafter=drafter, **kw)
    return ro, Counter(tuple(c) for c in ro.completion_ids)


def test_speculative_distribution_matches_plain_sampling_and_the_test_rejects_wrong_rules(policy):
    """Whole completions from plain sampling (seeds 0..9) vs speculative sampling with other seeds (100..109),
    600 each, chi-square test of homogeneity: p > 0.001 for the shipped rule and for the written-out textbook
    rule; the same test rejects two wrong rules at p < 1e-6. The greedy-path drafter drafts at every step (the
    test's power against wrong rules); prompt lookup is checked on a prompt it drafts from. Fixed seeds: the
    p-values are deterministic, not flaky."""
    model, tok = policy
    spec_seeds = list(range(100, 110))
    # prompt lookup on a repetitive prompt, 10 tokens
    _, plain = _completions(model, tok, list(range(10)), prompt="abc abc abc ab", tokens=10)
    ro, spec = _completions(model, tok, spec_seeds, verify_point_drafts, prompt="abc abc abc ab", tokens=10)
    assert ro.accepted_tokens > 60 and ro.draft_tokens - ro.accepted_tokens > 60, "needs accepts and rejects"
    pval, dof = _chi2_pvalue(plain, spec)
    assert dof >= 8 and pval > 1e-3, ("prompt lookup", pval, dof)
    # the greedy-path drafter, 6 tokens
    _, plain = _completions(model, tok, list(range(10)))
    greedy = sample_groups(model, tok, [PROMPT], group_size=1, max_new_tokens=TOKENS, top_p=1e-6, seeds=[0])
    path = lambda ids: GreedyPathDraft(greedy.completion_ids[0], ids)  # noqa: E731
    for rule in (verify_point_drafts, _rule_textbook):
        ro, spec = _completions(model, tok, spec_seeds, rule, path)
        assert ro.accepted_tokens > 300 and ro.draft_tokens - ro.accepted_tokens > 300, "needs accepts and rejects"
        pval, dof = _chi2_pvalue(plain, spec)
        assert dof >= 8 and pval > 1e-3, (rule.__name__, pval, dof)
    for wrong in (_rule_resample_from_p, _rule_accept_likely):
        _, spec = _completions(model, tok, spec_seeds, wrong, path)
        pval, _ = _chi2_pvalue(plain, spec)
        assert pval < 1e-6, (wrong.__name__, pval)


def test_with_the_same_seeds_speculative_rollouts_are_the_plain_ones(policy):
    """The shipped rule couples to plain sampling's uniforms: same seeds -> same tokens and log-probs, in fewer
    policy forwards; stop strings, the task's stop rule and the budget cut rows at the same token."""
    model, tok = policy
    prompts = [PROMPT, "12 + 30 = 42", "abc abc ab"]
    kw = dict(group_size=4, max_new_tokens=24, temperature=0.02, top_p=0.95, seeds=[5, 6, 7], stop=["fox"],
              is_complete=lambda text: text.count("7") >= 2)
    plain = sample_groups(model, tok, prompts, **kw)
    spec = sample_groups(model, tok, prompts, speculative="prompt_lookup", speculative_tokens=3, **kw)
    assert spec.completion_ids == plain.completion_ids and spec.truncated == plain.truncated
    assert any(plain.truncated) and not all(plain.truncated)
    for a, b in zip(spec.logprobs, plain.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    assert plain.row_steps == plain.tokens_generated and plain.tokens_per_forward == 1.0
    assert spec.accepted_tokens > 0 and spec.row_steps == spec.tokens_generated - spec.accepted_tokens
    assert spec.tokens_per_forward > 1.0


def assert_recorded_logprobs_are_the_policys(model, tok, ro, temperature: float) -> None:
    """The log-probs recorded while sampling == a teacher-forced recompute of log softmax(logits / T) on the
    sampled tokens (the quantity the loss's importance ratio uses)."""
    with torch.no_grad():
        lp, _, mask = completion_logprobs(model, ro.prompt_ids, ro.completion_ids, pad_id=tok.pad_token_id,
                                          temperature=temperature)
    recorded = torch.zeros_like(lp)
    for i, row in enumerate(ro.logprobs):
        recorded[i, : len(row)] = torch.tensor(row)
    torch.testing.assert_close(recorded * mask, lp * mask, atol=2e-4, rtol=0)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_recorded_logprobs_are_the_policys(policy, top_p):
    """The log-probs recorded while sampling speculatively == a teacher-forced recompute of the policy's
    log softmax(logits / T) on the sampled tokens (the quantity the loss's importance ratio uses)."""
    model, tok = policy
    ro = sample_groups(model, tok, [PROMPT, "abc abc ab"], group_size=3, max_new_tokens=16, temperature=0.05,
                       top_p=top_p, generator=torch.Generator().manual_seed(0), speculative="prompt_lookup")
    assert ro.accepted_tokens > 0
    assert_recorded_logprobs_are_the_policys(model, tok, ro, temperature=0.05)


def test_greedy_speculative_equals_plain_greedy(policy):
    """top_p -> 0 keeps only the most likely token: speculative and plain greedy decode agree exactly, with
    generator-drawn uniforms (no seeds) too."""
    model, tok = policy
    prompts = [PROMPT, "12 + 30 = 42", "What is 7 + 7? 7 + 7"]
    kw = dict(group_size=2, max_new_tokens=20, temperature=1.0, top_p=1e-6)
    plain = sample_groups(model, tok, prompts, generator=torch.Generator().manual_seed(0), **kw)
    spec = sample_groups(model, tok, prompts, generator=torch.Generator().manual_seed(1), speculative="prompt_lookup",
                         **kw)
    assert spec.completion_ids == plain.completion_ids
    assert spec.accepted_tokens > 0 and spec.decode_steps < plain.decode_steps


def test_prompt_lookup_proposes_the_latest_continuation_of_the_longest_suffix():
    pl = PromptLookup([1, 2, 3, 9, 2, 3, 4, 5, 3], max_ngram=2)
    assert pl.propose(2) == [4, 5]  # 1-gram [3]: latest occurrence with a continuation is at index 5
    pl.extend([4])
    assert pl.propose(3) == [5, 3, 4]  # 2-gram [3, 4] at index 5..6
    pl.extend([7])
    assert pl.propose(3) == []  # 7 never occurred before
    fork = pl.fork()
    fork.extend([1])
    assert fork.propose(2) == [2, 3] and pl.propose(2) == []
    assert PromptLookup([1, 2], max_ngram=3).propose(0) == []


def test_compacting_the_cache_holes_changes_nothing_the_attention_sees(policy):
    """Rejected drafts leave masked columns in the KV cache; `compact_holes` squeezes them out. The next
    forward's hidden states are the same with and without compaction."""
    from transformers import DynamicCache

    from leantune.rl.speculative import compact_holes

    model, _ = policy
    dec = model.model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (3, 23), generator=g)  # (n, L)
    attn = (torch.rand(3, 23, generator=g) > 0.4).long()  # holes anywhere
    attn[:, 0] = attn[:, -1] = 1
    pos = (attn.cumsum(1) - 1).clamp(min=0)  # positions count kept tokens only, as in speculative rollouts
    caches = [DynamicCache(), DynamicCache()]
    with torch.no_grad():
        for c in caches:
            dec(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, cache=c)
        squeezed = compact_holes(caches[1], attn.clone(), slack=0.0, min_holes=1)
        assert squeezed.shape[1] == int(attn.sum(1).max()) < attn.shape[1]
        assert squeezed.sum(1).tolist() == attn.sum(1).tolist()
        assert caches[1].get_seq_length() == squeezed.shape[1]
        nxt, nxt_pos = torch.randint(5, 300, (3, 2), generator=g), pos[:, -1:] + 1 + torch.arange(2)
        outs = [dec(input_ids=nxt, attention_mask=torch.cat([m, torch.ones(3, 2, dtype=torch.long)], 1),
                    position_ids=nxt_pos, use_cache=True, cache=c).last_hidden_state
                for m, c in zip((attn, squeezed), caches)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_rl_speculative_reaches_the_sampler_the_metrics_and_the_ledger(policy):
    """`rl.speculative` through `Sampler` and `collect_batch`: the same batch as plain sampling (per-prompt seeds,
    fp32), its drafts counted in `SamplingStats`, the step's metrics row, the run totals and the ledger's
    summary; `merge_rollouts` (the Ray pool's and torchrun's gather) adds the counts up."""
    from leantune.config import RLConfig
    from leantune.ledger import summarize_ledger
    from leantune.rl.bill import RLTotals, ledger_totals
    from leantune.rl.workers import merge_rollouts
    from leantune.rl.selection import PromptSelector, PromptStream
    from leantune.train.rl import Sampler, UpdateStats, collect_batch, step_metrics

    model, tok = policy
    pool = [{"prompt": p} for p in (PROMPT, "abc abc abc ab", "12 + 30 = 42")]
    reward = lambda prompts, texts, **_: [float(len(t) % 3) for t in texts]  # noqa: E731
    batches = {}
    for mode in ("off", "prompt_lookup"):
        rl = RLConfig(group_size=4, prompts_per_step=3, temperature=0.02, max_new_tokens=16, dynamic_sampling=False,
                      speculative=mode, speculative_tokens=3)
        assert Sampler(model, tok, rl, None, seed=0)._kwargs()["speculative"] == mode
        batches[mode] = collect_batch(Sampler(model, tok, rl, None, seed=0), pool, PromptStream(len(pool), seed=0),
                                      PromptSelector(enabled=False), reward, reward, rl, step=0)
    plain, spec = batches["off"], batches["prompt_lookup"]
    assert spec.completion_ids == plain.completion_ids
    s = spec.stats
    assert s.draft_tokens > s.accepted_tokens > 0 and s.row_forwards == s.tokens_generated - s.accepted_tokens
    assert plain.stats.draft_tokens == 0 and plain.stats.tokens_per_forward == 1.0
    row = step_metrics(0, s, UpdateStats(), rl, 1e-4, 1.0)
    assert row["spec_acceptance"] == s.accepted_tokens / s.draft_tokens and row["tokens_per_forward"] > 1.0
    totals = RLTotals()
    totals.add(s, UpdateStats(), rl, 1.0)
    rollouts = ledger_totals(1, totals)["rollouts"]
    assert rollouts["acceptance_rate"] == row["spec_acceptance"] and rollouts["tokens_per_forward"] == row["tokens_per_forward"]
    summary = summarize_ledger({"totals": ledger_totals(1, totals)})
    assert f"{s.accepted_tokens} of {s.draft_tokens} drafted tokens accepted" in summary
    ro = sample_groups(model, tok, [PROMPT], group_size=2, max_new_tokens=12, temperature=0.02, seeds=[3],
                       speculative="prompt_lookup")
    merged = merge_rollouts([ro, ro], 2)
    assert (merged.draft_tokens, merged.accepted_tokens, merged.row_steps) == (2 * ro.draft_tokens,
                                                                               2 * ro.accepted_tokens, 2 * ro.row_steps)


# ------------------------------------------------------------------------------------------------
# rl.speculative: draft -- a draft model samples the drafts from its own q; the general rule min(1, p/q)


def _rule_draft_resample_from_p(weights, q, draft, u_accept, u_resample):
    """WRONG: accepts with probability min(1, p/q) but on rejection draws from p instead of norm(max(p - q, 0))."""
    p = weights / weights.sum(-1, keepdim=True)
    x = draft.clamp(min=0)[:, None]
    accept = (draft >= 0) & (u_accept * q.gather(1, x).squeeze(1) < p.gather(1, x).squeeze(1))
    return torch.where(accept, draft, sample_categorical(p, uniforms=u_resample))


def _rule_draft_inverted_ratio(weights, q, draft, u_accept, u_resample):
    """WRONG: accepts with probability min(1, q/p) (the ratio upside down), residual right."""
    p = weights / weights.sum(-1, keepdim=True)
    has, x = draft >= 0, draft.clamp(min=0)[:, None]
    accept = has & (u_accept * p.gather(1, x).squeeze(1) < q.gather(1, x).squeeze(1))
    residual = (p - q).clamp(min=0)
    residual = torch.where((~has | (residual.sum(-1) <= 0))[:, None], p, residual)
    return torch.where(accept, draft, sample_categorical(residual, uniforms=u_resample))


def _draft_completions(model, tok, seeds, draft, rule=None, tokens=TOKENS):
    from leantune.rl.speculative import draft_model_for

    ro = sample_speculative(model, tok, [PROMPT] * len(seeds), group_size=SAMPLES // len(seeds), max_new_tokens=tokens,
                            temperature=TEMPERATURE, seeds=seeds, max_draft=4, verify=rule,
                            draft_model=draft_model_for(model, draft))
    return ro, Counter(tuple(c) for c in ro.completion_ids)


def test_draft_model_distribution_matches_plain_sampling_and_the_test_rejects_wrong_rules(policy):
    """Whole completions from plain sampling (seeds 0..9) vs draft-model speculative sampling (seeds 100..109),
    600 each, chi-square test of homogeneity. The test's draft is the policy with its LM head x3 (q = the policy at
    a third of the temperature: sharper than p, so drafts are accepted ~70% and rejected often): p > 0.001 with the
    shipped rule, p < 1e-6 for two wrong rules. The self-draft `layers:1` (first of the two layers) passes too.
    Fixed seeds: deterministic (measured p: 0.29 sharpened, 0.29 layers:1; wrong rules 5e-16 and 0)."""
    from leantune.rl.speculative import DraftModel

    model, tok = policy
    _, plain = _completions(model, tok, list(range(10)))
    sharp = DraftModel(model.model, model.lm_head.weight.detach() * 3.0, "head x3")
    spec_seeds = list(range(100, 110))
    for draft in (sharp, "layers:1"):
        ro, spec = _draft_completions(model, tok, spec_seeds, draft)
        assert ro.accepted_tokens > 300 and ro.draft_tokens - ro.accepted_tokens > 300, "needs accepts and rejects"
        pval, dof = _chi2_pvalue(plain, spec)
        assert dof >= 8 and pval > 1e-3, (draft, pval, dof)
    for wrong in (_rule_draft_resample_from_p, _rule_draft_inverted_ratio):
        _, spec = _draft_completions(model, tok, spec_seeds, sharp, wrong)
        pval, _ = _chi2_pvalue(plain, spec)
        assert pval < 1e-6, (wrong.__name__, pval)


def test_verify_sampled_drafts_emits_exactly_p_in_expectation():
    """The rule on explicit distributions, summed exactly over draws: sum_x q(x) [min(1, p/q)(x) 1_{y=x} +
    (1 - min(1, p/q)(x)) residual(y)] == p(y) (arXiv 2211.17192, Theorem 1), via a fine grid of uniforms."""
    from leantune.rl.speculative import verify_sampled_drafts

    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(7, generator=g) * 2, 0)
    q = torch.softmax(torch.randn(7, generator=g) * 2, 0)
    m = 400  # uniforms on a midpoint grid, both coordinates
    grid = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    ua, ur = torch.meshgrid(grid, grid, indexing="ij")
    ua, ur = ua.reshape(-1).float(), ur.reshape(-1).float()
    out = torch.zeros(7, dtype=torch.float64)
    for x in range(7):
        s = verify_sampled_drafts((p * 5)[None].expand(len(ua), 7), q[None].expand(len(ua), 7),
                                  torch.full((len(ua),), x), ua, ur)
        out += q[x].double() * torch.bincount(s, minlength=7).double() / len(ua)
    torch.testing.assert_close(out, p.double(), atol=3e-3, rtol=0)
    bonus = verify_sampled_drafts(p[None].expand(len(ur), 7), torch.zeros(len(ur), 7), torch.full((len(ur),), -1), ua, ur)
    torch.testing.assert_close(torch.bincount(bonus, minlength=7).double() / len(ur), p.double(), atol=3e-3, rtol=0)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A separate 1-layer tiny model (another seed) with the policy's tokenizer, saved as safetensors."""
    from leantune.models.tiny import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("draft"), seed=7, layers=1))


@pytest.mark.parametrize("draft", ["layers:1", "path"])
def test_draft_mode_records_the_policys_logprobs_and_counts_its_forwards(policy, draft_dir, draft):
    """Draft mode (self-draft and a draft model loaded from a directory): the recorded log-probs == a
    teacher-forced recompute of the policy; stops like plain sampling; draft forwards and tokens counted."""
    model, tok = policy
    spec = draft_dir if draft == "path" else draft
    ro = sample_groups(model, tok, [PROMPT, "abc abc ab"], group_size=3, max_new_tokens=16, temperature=0.05,
                       top_p=0.9, seeds=[1, 2], speculative="draft", speculative_draft=spec, stop=["fox"])
    assert ro.accepted_tokens > 0 and ro.draft_tokens > ro.accepted_tokens
    assert ro.row_steps == ro.tokens_generated - ro.accepted_tokens  # one token per row forward + each accepted draft
    assert ro.draft_row_steps > 0 and ro.extra["draft_forwards"] > 0
    assert all(len(c) == 16 or "fox" in t or c[-1] == tok.eos_token_id for c, t in zip(ro.completion_ids, ro.texts))
    assert_recorded_logprobs_are_the_policys(model, tok, ro, temperature=0.05)


def test_draft_mode_greedy_equals_plain_greedy_and_a_full_self_draft_is_always_accepted(policy):
    """top_p -> 0: p and q are point masses, the rule keeps the policy's argmax: the same tokens as plain greedy.
    A self-draft with all the policy's layers is the policy: every draft accepted, k + 1 tokens per forward."""
    model, tok = policy
    prompts = [PROMPT, "12 + 30 = 42"]
    kw = dict(group_size=2, max_new_tokens=20, temperature=1.0, top_p=1e-6)
    plain = sample_groups(model, tok, prompts, generator=torch.Generator().manual_seed(0), **kw)
    spec = sample_groups(model, tok, prompts, generator=torch.Generator().manual_seed(1), speculative="draft",
                         speculative_draft="layers:1", **kw)
    assert spec.completion_ids == plain.completion_ids and spec.draft_tokens > 0
    full = sample_groups(model, tok, prompts, group_size=2, max_new_tokens=21, temperature=0.5, seeds=[0, 1],
                         speculative="draft", speculative_draft="layers:2", speculative_tokens=4)
    assert full.accepted_tokens == full.draft_tokens > 0
    assert full.tokens_per_forward == 21 / 5  # prefill: 1 token, then 4 forwards of 4 drafts + 1 bonus


def test_draft_model_errors_name_the_setting(policy):
    from pydantic import ValidationError

    from leantune.config import RLConfig
    from leantune.models.tiny import tiny_model
    from leantune.rl.speculative import DraftModel, draft_model_for

    model, tok = policy
    with pytest.raises(ValueError, match="layers:3, but the policy has 2 decoder layers"):
        draft_model_for(model, "layers:3")
    other = tiny_model(vocab_size=256)
    with pytest.raises(ValueError, match="vocabulary of 256 tokens, the policy"):
        draft_model_for(model, DraftModel(other.model, other.lm_head.weight, "small vocab"))
    with pytest.raises(ValidationError, match="needs rl.speculative_draft"):
        RLConfig(speculative="draft")
    with pytest.raises(ValidationError, match="layers:N with N a positive integer"):
        RLConfig(speculative="draft", speculative_draft="layers:x")
    assert RLConfig(speculative="draft", speculative_draft="layers:8").speculative_draft == "layers:8"


def test_self_draft_shares_the_policys_weights_and_runs_its_first_layers(policy):
    """`layers:N` is a view: no parameter copied, and its hidden state == the policy decoder's after N layers
    followed by the final norm."""
    from leantune.rl.speculative import self_draft

    model, _ = policy
    draft = self_draft(model, 1)
    assert {id(p) for p in draft.decoder.parameters()} <= {id(p) for p in model.parameters()}
    assert draft.head_w.data_ptr() == model.lm_head.weight.data_ptr()
    assert model.model.config.num_hidden_layers == 2  # the policy's own config untouched
    ids = torch.tensor([[5, 17, 99, 3]])
    with torch.no_grad():
        mid = model.model(input_ids=ids, output_hidden_states=True).hidden_states[1]  # after layer 0
        torch.testing.assert_close(draft.decoder(input_ids=ids).last_hidden_state, model.model.norm(mid))


def test_rl_speculative_draft_reaches_the_sampler_the_metrics_and_the_ledger(policy, draft_dir, monkeypatch):
    """`rl.speculative: draft` through `Sampler` and `collect_batch` (a relative draft path made absolute for Ray
    workers): drafts and draft-model forwards counted in `SamplingStats`, the metrics row, the run totals, the
    ledger's summary and `merge_rollouts`."""
    import os

    from leantune.config import RLConfig
    from leantune.ledger import summarize_ledger
    from leantune.rl.bill import RLTotals, ledger_totals
    from leantune.rl.selection import PromptSelector, PromptStream
    from leantune.rl.workers import merge_rollouts
    from leantune.train.rl import Sampler, UpdateStats, collect_batch, step_metrics

    model, tok = policy
    monkeypatch.chdir(os.path.dirname(draft_dir))
    pool = [{"prompt": p} for p in (PROMPT, "abc abc abc ab")]
    reward = lambda prompts, texts, **_: [float(len(t) % 3) for t in texts]  # noqa: E731
    rl = RLConfig(group_size=3, prompts_per_step=2, temperature=0.05, max_new_tokens=12, dynamic_sampling=False,
                  speculative="draft", speculative_draft=os.path.basename(draft_dir), speculative_tokens=3)
    sampler = Sampler(model, tok, rl, None, seed=0)
    assert sampler._kwargs()["speculative_draft"] == draft_dir  # absolute
    batch = collect_batch(sampler, pool, PromptStream(len(pool), seed=0), PromptSelector(enabled=False), reward,
                          reward, rl, step=0)
    s = batch.stats
    assert s.draft_tokens > s.accepted_tokens > 0 and s.draft_row_forwards > 0
    row = step_metrics(0, s, UpdateStats(), rl, 1e-4, 1.0)
    assert row["draft_row_forwards"] == s.draft_row_forwards and row["tokens_per_forward"] > 1.0
    totals = RLTotals()
    totals.add(s, UpdateStats(), rl, 1.0)
    rollouts = ledger_totals(1, totals)["rollouts"]
    assert rollouts["draft_row_forwards"] == s.draft_row_forwards
    assert f"{s.draft_row_forwards:,} draft-model row forwards" in summarize_ledger({"totals": ledger_totals(1, totals)})
    ro = sample_groups(model, tok, [PROMPT], group_size=2, max_new_tokens=8, temperature=0.05, seeds=[3],
                       speculative="draft", speculative_draft="layers:1")
    assert merge_rollouts([ro, ro], 2).draft_row_steps == 2 * ro.draft_row_steps > 0
