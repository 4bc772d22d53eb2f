"""The RL loop's filters end to end on a tiny model: DAPO overlong filtering (arXiv 2503.14476) masks completions
cut at max_new_tokens out of the loss, and the Kimi k1.5 length-aware reward (arXiv 2501.12599) is a weighted
term added to the task's verifier."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl

from leantune.config import RLConfig, recipe_from_dict
from leantune.models.tiny import tiny_model, tiny_tokenizer
from leantune.rl.selection import PromptSelector, PromptStream
from leantune.tasks import arithmetic
from leantune.train.rl import Batch, Sampler, build_rewards, collect_batch, policy_update, train_rl


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    rows = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in
            [(1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (4, 4), (6, 3), (8, 1)]]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)


def _raw(model_dir, out_dir, prompts_file, **rl):
    return {
        "model": {"path": str(model_dir)},
        "data": {"train": str(prompts_file)},
        "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "loss": {"chunk_size": 16},
        "optim": {"lr": 1e-2},
        "train": {"steps": 1, "micro_batch_size": 4, "seed": 0, "output_dir": str(out_dir), "progress": False},
        "rl": {"rewards": {"rl_helpers:has_digit": 1.0}, "group_size": 4, "prompts_per_step": 2,
               "max_new_tokens": 6, "max_sampling_rounds": 4, **rl},
    }


def _adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------
# DAPO overlong filtering


def _update(batch: Batch, overlong_filter: bool) -> tuple[dict[str, torch.Tensor], object]:
    """One SGD(lr=1) policy update of a fresh tiny model on ``batch``; returns (parameter change, stats)."""
    torch.manual_seed(0)
    tok = tiny_tokenizer(chat_template=True)
    model = tiny_model(vocab_size=len(tok))
    before = _adapter(model)
    rl = RLConfig(group_size=2, prompts_per_step=2, loss="dapo", overlong_filter=overlong_filter, max_new_tokens=4)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    stats = policy_update(model, optimizer, scheduler, batch, rl, pad_id=tok.pad_token_id, micro_batch=4,
                          chunk_size=8, max_grad_norm=None)
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}, stats


def _batch(truncated_tokens: list[list[int]]) -> Batch:
    """Two groups of two; the second completion of each group was cut at max_new_tokens (4 tokens)."""
    p0, p1 = [5, 6, 7, 8, 9], [10, 11, 12]
    comps = [[3, 4], truncated_tokens[0], [6, 7, 8], truncated_tokens[1]]
    return Batch([p0, p0, p1, p1], comps, [1.0, 0.0, 0.0, 1.0], [True, False, False, True], [False, True, False, True],
                 [""] * 4)


def test_overlong_completions_carry_no_gradient():
    """With the filter on, what a truncated completion says cannot move the policy (its tokens are out of the loss);
    with it off, it does."""
    a, b = _batch([[20, 21, 22, 23], [30, 31, 32, 33]]), _batch([[40, 41, 42, 43], [50, 51, 52, 53]])
    delta_a, stats = _update(a, overlong_filter=True)
    delta_b, _ = _update(b, overlong_filter=True)
    assert stats.overlong_masked == 2 and stats.sequences_trained == 2
    assert any(d.abs().sum() > 0 for d in delta_a.values())  # the two kept completions do train
    assert all(torch.equal(delta_a[n], delta_b[n]) for n in delta_a)
    off_a, off_stats = _update(a, overlong_filter=False)
    off_b, _ = _update(b, overlong_filter=False)
    assert off_stats.overlong_masked == 0 and off_stats.sequences_trained == 4
    assert not all(torch.equal(off_a[n], off_b[n]) for n in off_a)


def test_overlong_filter_end_to_end_in_the_ledger(tiny_chat_model_dir, prompts, tmp_path):
    """A tiny run whose completions mostly hit max_new_tokens (a few end early at the stop string): the ledger
    counts the masked ones, and exactly those drop out of the sequences trained."""
    results = {}
    for on in (True, False):
        raw = _raw(tiny_chat_model_dir, tmp_path / f"filter_{on}", prompts, overlong_filter=on, stop=["e"])
        results[on] = train_rl(recipe_from_dict(raw), quiet=True).ledger["totals"]["rollouts"]
    on, off = results[True], results[False]
    assert on["rollouts_generated"] == off["rollouts_generated"]  # step 1 samples the same rollouts either way
    assert on["overlong_rollouts_masked"] > 0 and off["overlong_rollouts_masked"] == 0
    assert 0 < on["rollouts_used"] < off["rollouts_used"]  # a mix: some ended early, some were cut
    # has_digit is binary, so every completion of a kept (mixed) group has a non-zero advantage: masking is the
    # only reason a kept completion is not trained on
    assert off["rollouts_used"] - on["rollouts_used"] == on["overlong_rollouts_masked"]
    rows = [json.loads(line) for line in (tmp_path / "filter_True" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["truncated_frac"] > 0 and rows[0]["rollouts_used"] == on["rollouts_used"]


# ----------------------------------------------------------------------------------------------
# The length-aware reward as a weighted term in a loop run


def _kimi(correct: list[bool], lengths: list[int], g: int) -> list[float]:
    """Kimi k1.5's length reward written out (arXiv 2501.12599, section 2.3.3), the reference for the test."""
    out = []
    for i in range(0, len(lengths), g):
        lo, hi = min(lengths[i : i + g]), max(lengths[i : i + g])
        for ok, n in zip(correct[i : i + g], lengths[i : i + g]):
            lam = 0.0 if hi == lo else 0.5 - (n - lo) / (hi - lo)
            out.append(lam if ok else min(0.0, lam))
    return out


def test_length_aware_is_added_to_the_task_reward_in_a_loop_run(tiny_chat_model_dir, prompts, tmp_path):
    from leantune.config import RLConfig as _RL

    assert "added" in _RL.model_fields["rewards"].description.split("length_aware", 1)[1][:80]
    raw = _raw(tiny_chat_model_dir, tmp_path / "len", prompts, task="arithmetic",
               rewards={"task": 1.0, "length_aware": 0.5}, stop=["e", "a"], max_new_tokens=8)
    recipe = recipe_from_dict(raw)
    reward_fn, correct_fn, task = build_rewards(recipe.rl)
    assert task is arithmetic and correct_fn is arithmetic.reward
    torch.manual_seed(0)
    tok = tiny_tokenizer(chat_template=True)
    model = tiny_model(vocab_size=len(tok))
    from leantune.data.records import read_prompt_rows

    pool = read_prompt_rows(recipe.data.train)
    batch = collect_batch(Sampler(model, tok, recipe.rl, task, seed=0), pool, PromptStream(len(pool), seed=0),
                          PromptSelector(enabled=False), reward_fn, correct_fn, recipe.rl, 0)
    g = recipe.rl.group_size
    assert len(batch.rewards) == recipe.rl.prompts_per_step * g  # groups with length variation are informative
    answers = [row["answer"] for row in batch.rows for _ in range(g)]
    correct = [arithmetic.verify(t, a) for t, a in zip(batch.texts, answers)]
    lengths = [len(c) for c in batch.completion_ids]
    assert len(set(lengths)) > 1
    want = [float(c) + 0.5 * k for c, k in zip(correct, _kimi(correct, lengths, g))]
    assert batch.rewards == pytest.approx(want)
    assert any(k != 0 for k in _kimi(correct, lengths, g))  # the term really contributes

    raw["train"]["steps"] = 2
    result = train_rl(recipe_from_dict(raw), quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "len" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and result.ledger["totals"]["rollouts"]["rollouts_used"] > 0
    # every kept reward is task (0 or 1) + 0.5 * lam, lam in [-0.5, 0.5]
    assert all(-0.25 - 1e-9 <= r["reward_mean"] <= 1.25 + 1e-9 for r in rows)


# ----------------------------------------------------------------------------------------------
# The headroom tasks drive the loop: prompts and reward columns from the task generator


@pytest.mark.parametrize("task,rewards", [("countdown", {"task_isomorphic": 1.0}), ("multistep", {"task": 1.0}),
                                          ("code", {"task": 1.0, "length_aware": 0.5})])
def test_rl_runs_on_each_headroom_task(tiny_chat_model_dir, tmp_path, task, rewards):
    raw = _raw(tiny_chat_model_dir, tmp_path / task, None, task=task, rewards=rewards, num_prompts=8,
               group_size=2, prompts_per_step=2, max_sampling_rounds=1, max_new_tokens=4, dynamic_sampling=False)
    raw["data"] = {"max_length": 1024}  # the tiny tokenizer splits these prompts finely
    result = train_rl(recipe_from_dict(raw), quiet=True)
    roll = result.ledger["totals"]["rollouts"]
    assert roll["rollouts_generated"] == 4 and roll["tokens_generated"] > 0
    rows = [json.loads(line) for line in (tmp_path / task / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["pass@1"] == 0.0  # a random tiny model solves nothing; the verifier ran on every rollout
