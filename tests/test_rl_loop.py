"""leantune rl / rft on a tiny model: token log-probs, rollouts, the batch economics, the loop, resume."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import assert_same_adapter, observe_lora_a, sigkill_mid_run, write_jsonl

from leantune.config import recipe_from_dict
from leantune.losses import linear_token_logprobs
from leantune.models.tiny import tiny_model, tiny_tokenizer
from leantune.rl.rollout import completion_logprobs, sample_categorical, sample_groups, top_p_filter
from leantune.rl.selection import PromptSelector, PromptStream
from leantune.train.rl import Sampler, build_rewards, collect_batch, train_rl

# ----------------------------------------------------------------------------------------------
# Token log-probs through the LM head


@pytest.mark.parametrize("frozen_head", [False, True], ids=["trainable_head", "frozen_head"])
@pytest.mark.parametrize("k,h,v,chunk,tau", [(7, 5, 13, 3, 1.0), (1, 9, 31, 4, 0.6), (17, 6, 11, 17, 1.7)])
def test_token_logprobs_match_autograd(k, h, v, chunk, tau, frozen_head):
    """Both backward strategies: recompute (trainable head) and the forward Jacobian (frozen head, LoRA)."""
    g = torch.Generator().manual_seed(k)
    hidden = torch.randn(k, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=not frozen_head)
    targets = torch.randint(0, v, (k,), generator=g)
    upstream = torch.randn(k, generator=g, dtype=torch.float64)

    logps, ent = linear_token_logprobs(hidden, weight, targets, chunk_size=chunk, temperature=tau)
    (logps * upstream).sum().backward()
    gh = hidden.grad.clone()
    gw = None if frozen_head else weight.grad.clone()
    hidden.grad = weight.grad = None

    ref_all = torch.log_softmax(hidden @ weight.T / tau, -1)
    ref = ref_all.gather(1, targets[:, None]).squeeze(1)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(logps, ref)
    torch.testing.assert_close(ent, -(ref_all.exp() * ref_all).sum(-1).detach())
    torch.testing.assert_close(gh, hidden.grad)
    if not frozen_head:
        torch.testing.assert_close(gw, weight.grad)
    else:
        assert weight.grad is None


def test_token_logprobs_frozen_head_in_bf16_and_without_grad():
    """The Jacobian path returns the hidden state's dtype; under no_grad nothing is kept for backward."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 8, generator=g).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(19, 8, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, 19, (5,), generator=g)
    logps, _ = linear_token_logprobs(hidden, weight, targets, chunk_size=2, temperature=0.8)
    logps.sum().backward()
    h32 = hidden.detach().float().requires_grad_()
    torch.log_softmax(h32 @ weight.float().T / 0.8, -1).gather(1, targets[:, None]).sum().backward()
    assert hidden.grad.dtype == torch.bfloat16
    torch.testing.assert_close(hidden.grad.float(), h32.grad, atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        lp, _ = linear_token_logprobs(hidden, weight, targets)
    assert lp.grad_fn is None


def test_token_logprobs_empty_and_bad_input():
    h = torch.zeros(0, 4, requires_grad=True)
    lp, ent = linear_token_logprobs(h, torch.randn(6, 4), torch.zeros(0, dtype=torch.long))
    assert lp.shape == ent.shape == (0,)
    lp.sum().backward()
    with pytest.raises(ValueError, match="temperature"):
        linear_token_logprobs(torch.randn(2, 4), torch.randn(6, 4), torch.zeros(2, dtype=torch.long), temperature=0)


def test_top_p_filter_matches_reference():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(5, 37, generator=g), -1)
    out = top_p_filter(probs, 0.8)
    for row, ref_row in zip(out, probs):
        order = ref_row.argsort(descending=True)
        keep, mass = [], 0.0
        for i in order.tolist():  # the smallest prefix of the sorted tokens reaching 0.8
            keep.append(i)
            mass += float(ref_row[i])
            if mass >= 0.8:
                break
        assert sorted(row.nonzero().squeeze(1).tolist()) == sorted(keep)


# ----------------------------------------------------------------------------------------------
# Rollouts


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    tok = tiny_tokenizer(chat_template=True)
    return tiny_model(vocab_size=len(tok)), tok


def test_rollout_logprobs_equal_a_training_forward(policy):
    model, tok = policy
    ro = sample_groups(model, tok, ["What is 2 + 3?", "hi"], group_size=3, max_new_tokens=10,
                       temperature=0.8, generator=torch.Generator().manual_seed(1))
    assert len(ro) == 6 and ro.prompt_ids[0] == ro.prompt_ids[2] != ro.prompt_ids[3]
    logps, ent, mask = completion_logprobs(model, ro.prompt_ids, ro.completion_ids, pad_id=tok.pad_token_id,
                                           temperature=0.8, chunk_size=4)
    for i in range(len(ro)):
        n = len(ro.completion_ids[i])
        assert mask[i].sum() == n
        torch.testing.assert_close(logps[i, :n].detach(), torch.tensor(ro.logprobs[i]), atol=2e-5, rtol=0)
        torch.testing.assert_close(ent[i, :n], torch.tensor(ro.entropy[i]), atol=2e-5, rtol=0)


def _grads(model, fn):
    model.zero_grad(set_to_none=True)
    out = fn()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_prompt_shared_forward_equals_one_forward_per_sequence(policy, checkpointing):
    """Each distinct prompt runs once and its KV cache is shared by its completions: same logprobs, entropy,
    mask and parameter gradients as a joint prompt + completion forward per sequence. Odd shapes: prompts
    of different lengths repeated 1-3 times, not contiguous, completions of length 0, 1 and more."""
    from leantune.train.session import set_activation_checkpointing

    model, tok = policy
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 60, (n,), generator=g).tolist() for n in (5, 2, 9)]
    prompt_ids = [prompts[i] for i in (0, 1, 0, 2, 1, 0, 2)]
    completion_ids = [torch.randint(3, 60, (n,), generator=g).tolist() for n in (4, 1, 7, 0, 3, 6, 2)]
    weights = torch.randn(7, 7, generator=g)
    model.train()
    if checkpointing:
        set_activation_checkpointing(model, "all")
    try:
        def run(share):
            lp, ent, mask = completion_logprobs(model, prompt_ids, completion_ids, pad_id=tok.pad_token_id,
                                                temperature=0.9, chunk_size=5, share_prompts=share)
            (lp * weights).sum().backward()
            return lp.detach(), ent, mask

        calls = []
        handle = model.model.register_forward_pre_hook(lambda *_: calls.append(1))
        (lp_s, ent_s, mask_s), grads_s = _grads(model, lambda: run(True))
        shared_calls = len(calls)
        (lp_j, ent_j, mask_j), grads_j = _grads(model, lambda: run(False))
        # shared: the distinct prompts, then the completions on their cache; checkpointing drops the cache
        # inside each layer, so the joint forward is used instead
        assert (shared_calls, len(calls) - shared_calls) == ((1, 1) if checkpointing else (2, 1))
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
        if checkpointing:
            causal = model.model
            for layer in causal.layers:
                layer.gradient_checkpointing = False
    assert mask_s.tolist() == mask_j.tolist() and mask_s.sum() == sum(len(c) for c in completion_ids)
    torch.testing.assert_close(lp_s, lp_j, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_s, ent_j, atol=1e-5, rtol=0)
    assert grads_s.keys() == grads_j.keys() and len(grads_s) > 0
    for name in grads_j:
        torch.testing.assert_close(grads_s[name], grads_j[name], atol=1e-5, rtol=1e-4, msg=name)


def test_rollouts_stop_early_and_finished_rows_cost_nothing(policy):
    model, tok = policy
    ro = sample_groups(model, tok, ["a", "bb", "c"], group_size=4, max_new_tokens=24, stop=["1"],
                       is_complete=lambda text: "2" in text, generator=torch.Generator().manual_seed(3))
    for text, ids, cut in zip(ro.texts, ro.completion_ids, ro.truncated):
        if cut:
            assert len(ids) == 24 and "1" not in text and "2" not in text
        else:  # stopped at the first token that completed a stop string / closed the answer, or at eos
            prefix = tok.decode(ids[:-1], skip_special_tokens=True)
            assert "1" not in prefix and "2" not in prefix
            assert "1" in text or "2" in text or ids[-1] == tok.eos_token_id
    assert not all(ro.truncated)
    # each decode step feeds only the rows still running: tokens generated == row-steps computed
    assert ro.row_steps == ro.tokens_generated < 12 * 24


def test_sample_categorical_matches_the_distribution():
    """Inverse-CDF draws follow the (unnormalized) row weights; zero-weight entries are never drawn."""
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(3, 37, generator=g) * (torch.rand(3, 37, generator=g) > 0.4)  # odd V, some zeros
    weights[2] = 0.0
    weights[2, 36] = 5.0  # all the mass on the last entry
    n = 40000
    draws = torch.stack([sample_categorical(weights, g) for _ in range(n)])  # (n, 3)
    for row in range(3):
        freq = torch.bincount(draws[:, row], minlength=37).double() / n
        p = (weights[row] / weights[row].sum()).double()
        assert freq[p == 0].sum() == 0
        # within 5 standard errors of the binomial proportion, entry by entry
        assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all()


def test_sampling_builds_no_autograd_graph(policy):
    """Rollouts run without autograd: a graph over every decode step would cost memory and time."""
    model, tok = policy
    assert any(p.requires_grad for p in model.parameters())
    seen = []
    handle = model.model.register_forward_pre_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    try:
        sample_groups(model, tok, ["a", "b"], group_size=2, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert len(seen) >= 2 and not any(seen)


def test_sampled_accuracy_counts_the_seeded_samples(policy, monkeypatch):
    """pass@1 / pass@k equal a count over the same seeded rollouts (chunks of 2 prompts), verified by the task."""
    from leantune.eval.evaluate import sampled_accuracy
    from leantune.tasks import get_task

    model, tok = policy
    task = get_task("addition")
    # a random tiny model never answers right: a stub verdict that both outcomes can reach
    monkeypatch.setattr(task, "verify", lambda completion, answer: completion.count("1") % 2 == 0)
    got = sampled_accuracy(model, tok, "addition", num_problems=5, samples=3, seed=3, max_new_tokens=6,
                           prompts_per_batch=2)
    problems = task.generate(5, seed=3, split="test")
    g = torch.Generator().manual_seed(3)
    ok = []
    for i in range(0, 5, 2):
        ro = sample_groups(model, tok, [p["prompt"] for p in problems[i : i + 2]], group_size=3, max_new_tokens=6,
                           is_complete=getattr(task, "is_complete", None), generator=g)
        ok += [t.count("1") % 2 == 0 for t in ro.texts]
    assert len(ok) == 15 and 0 < sum(ok) < 15
    assert got["pass@1"] == sum(ok) / 15
    assert got["pass@3"] == sum(any(ok[3 * j : 3 * j + 3]) for j in range(5)) / 5


def test_sampling_is_seeded(policy):
    model, tok = policy
    a = sample_groups(model, tok, ["x"], group_size=3, max_new_tokens=6, generator=torch.Generator().manual_seed(5))
    b = sample_groups(model, tok, ["x"], group_size=3, max_new_tokens=6, generator=torch.Generator().manual_seed(5))
    assert a.completion_ids == b.completion_ids


# ----------------------------------------------------------------------------------------------
# Batch economics


def _rl_recipe(model_dir, out_dir, prompts_file=None, **rl):
    raw = {
        "model": {"path": str(model_dir)},
        "data": {"train": str(prompts_file)} if prompts_file else {},
        "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "loss": {"chunk_size": 16},
        "optim": {"lr": 1e-2},
        "train": {"steps": 3, "micro_batch_size": 4, "seed": 0, "output_dir": str(out_dir), "progress": False},
        "rl": {"rewards": {"rl_helpers:has_digit": 1.0}, "group_size": 4, "prompts_per_step": 2,
               "max_new_tokens": 8, "overlong_filter": False, **rl},
    }
    return raw


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    rows = [{"prompt": f"Say something about {w}.", "answer": str(i)} for i, w in enumerate(
        ["cats", "dogs", "rain", "sun", "tea", "maps", "keys", "wind", "salt", "ink", "snow", "moss"])]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)


def _collect(policy, recipe, step=0, selector=None, stream=None):
    model, tok = policy
    from leantune.data.records import read_prompt_rows

    pool = read_prompt_rows(recipe.data.train)
    reward_fn, correct_fn, task = build_rewards(recipe.rl)
    stream = stream or PromptStream(len(pool), seed=0)
    selector = selector or PromptSelector(enabled=False)
    sampler = Sampler(model, tok, recipe.rl, task, seed=0)
    return collect_batch(sampler, pool, stream, selector, reward_fn, correct_fn, recipe.rl, step)


def test_dynamic_sampling_fills_the_batch_with_informative_groups(policy, prompts_file, tmp_path):
    recipe = recipe_from_dict(_rl_recipe(tmp_path, tmp_path / "r", prompts_file, prompts_per_step=3,
                                         max_sampling_rounds=6))
    batch = _collect(policy, recipe)
    g = recipe.rl.group_size
    assert len(batch.rewards) == 3 * g
    for i in range(0, len(batch.rewards), g):
        assert len(set(batch.rewards[i : i + g])) > 1, "a zero-variance group was kept"
    s = batch.stats
    assert s.rollouts == s.groups * g and s.groups == 3 + s.zero_variance_groups


def test_dynamic_sampling_stops_at_the_cap(policy, prompts_file, tmp_path):
    raw = _rl_recipe(tmp_path, tmp_path / "r", prompts_file, max_sampling_rounds=2)
    raw["rl"]["rewards"] = {"rl_helpers:constant": 1.0}
    batch = _collect(policy, recipe_from_dict(raw))
    assert batch.rewards == [] and batch.stats.rounds == 2 and batch.stats.zero_variance_groups == 4
    raw["rl"]["dynamic_sampling"] = False  # off: one round, every group kept (and trained on at zero advantage)
    batch = _collect(policy, recipe_from_dict(raw))
    assert len(batch.rewards) == 8 and batch.stats.rounds == 1


def test_dropped_groups_are_billed_for_their_prompt_tokens(tiny_chat_model_dir, prompts_file, tmp_path):
    # Regression: the ledger counted prompt tokens of kept groups only, so rollouts that dynamic sampling
    # dropped were billed for their generated tokens but not for the prompts they prefilled.
    from leantune.rl.rollout import _tokenize_prompts

    raw = _rl_recipe(tiny_chat_model_dir, tmp_path / "bill", prompts_file, max_sampling_rounds=2)
    raw["rl"]["rewards"] = {"rl_helpers:constant": 1.0}  # every group is dropped
    raw["train"]["steps"] = 1
    result = train_rl(recipe_from_dict(raw), quiet=True)
    roll = result.ledger["totals"]["rollouts"]
    assert roll["rollouts_generated"] == 16 and roll["rollouts_used"] == 0  # 2 rounds x 2 prompts x G=4
    from leantune.data.records import read_prompt_rows

    pool = read_prompt_rows(prompts_file)
    stream = PromptStream(len(pool), seed=0)
    sampled = [pool[stream.next()]["prompt"] for _ in range(4)]
    tok = tiny_tokenizer(chat_template=True)
    want = 4 * sum(len(ids) for ids in _tokenize_prompts(tok, sampled))
    assert roll["prompt_tokens"] == want
    assert roll["prefill_tokens"] == want // 4  # each distinct prompt prefilled once for its G=4 completions
    assert result.ledger["totals"]["tokens_processed"] == roll["tokens_generated"] + want


def test_update_bills_each_distinct_prompt_once_per_micro_batch(policy):
    """The ledger's update tokens are what ran: a micro-batch's distinct prompts once, plus every completion."""
    from leantune.config import RLConfig
    from leantune.train.rl import Batch, policy_update

    model, tok = policy
    p0, p1 = [5, 6, 7, 8, 9], [10, 11]
    comps = [[3, 4], [5], [6, 7, 8], [9, 10]]
    batch = Batch([p0, p0, p1, p1], comps, [1.0, 0.0, 1.0, 0.0], [True, False, True, False], [False] * 4,
                  [""] * 4)
    rl = RLConfig(group_size=2, prompts_per_step=2)
    optimizer = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    one = policy_update(model, optimizer, scheduler, batch, rl, pad_id=tok.pad_token_id, micro_batch=4,
                        chunk_size=8, max_grad_norm=None)
    two = policy_update(model, optimizer, scheduler, batch, rl, pad_id=tok.pad_token_id, micro_batch=1,
                        chunk_size=8, max_grad_norm=None)
    assert one.tokens_trained == two.tokens_trained == 8
    assert one.update_tokens == len(p0) + len(p1) + 8  # one micro-batch: each prompt once
    assert two.update_tokens == 2 * len(p0) + 2 * len(p1) + 8  # a micro-batch per sequence


def test_prompt_selection_skips_then_readmits(policy, prompts_file, tmp_path):
    raw = _rl_recipe(tmp_path, tmp_path / "r", prompts_file, prompts_per_step=12, max_sampling_rounds=1)
    raw["rl"]["rewards"] = {"rl_helpers:constant": 1.0}  # pass rate 1 for every prompt
    recipe = recipe_from_dict(raw)
    selector, stream = PromptSelector(window=1, cooldown_steps=2), PromptStream(12, seed=0)
    first = _collect(policy, recipe, step=0, selector=selector, stream=stream)
    assert first.stats.groups == 12 and selector.skipping(1) == 12
    second = _collect(policy, recipe, step=1, selector=selector, stream=stream)
    assert second.stats.groups == 0 and second.stats.prompts_skipped == 12  # nothing sampled
    third = _collect(policy, recipe, step=3, selector=selector, stream=stream)  # cooldown over
    assert third.stats.groups == 12 and third.stats.prompts_skipped == 0


# ----------------------------------------------------------------------------------------------
# The loop


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("loss", ["grpo", "dapo", "dr_grpo"])
def test_rl_run_changes_every_trainable_parameter_and_logs_metrics(tiny_chat_model_dir, prompts_file, tmp_path, loss):
    recipe = recipe_from_dict(_rl_recipe(tiny_chat_model_dir, tmp_path / loss, prompts_file, loss=loss,
                                         max_sampling_rounds=4))
    from leantune.train.session import setup_model

    init, _, _, _, _ = setup_model(recipe)
    before = _trainable(init)
    result = train_rl(recipe, quiet=True)
    after = _trainable(result.model)
    assert before.keys() == after.keys() and len(after) > 0
    unchanged = [n for n in after if torch.equal(before[n], after[n])]
    assert unchanged == []
    rows = [json.loads(line) for line in (tmp_path / loss / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward_mean", "reward_std", "pass@1", "pass@4", "completion_len", "entropy_mean",
                "high_entropy_frac", "zero_variance_frac", "clip_fraction"):
        assert all(isinstance(r[key], float) for r in rows), key
    roll = result.ledger["totals"]["rollouts"]
    assert roll["rollouts_used"] <= roll["rollouts_generated"] and roll["tokens_generated"] > 0
    assert roll["rollouts_generated"] == sum(r["rollouts"] for r in rows)
    assert (tmp_path / loss / "adapter" / "adapter_model.safetensors").exists()


def test_kl_uses_the_base_with_the_adapter_disabled(tiny_chat_model_dir, prompts_file, tmp_path):
    raw = _rl_recipe(tiny_chat_model_dir, tmp_path / "kl", prompts_file, beta=0.1, updates_per_batch=2,
                     max_sampling_rounds=4)
    raw["train"]["steps"] = 2
    result = train_rl(recipe_from_dict(raw), quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()]
    # step 1 starts at the base (LoRA B = 0): KL 0 on the first pass, > 0 after the first update
    assert all("kl" in r for r in rows) and rows[-1]["kl"] > 0
    # the reference really is the base: disabling the adapter gives the untouched model's logits
    from peft import PeftModel

    assert isinstance(result.model, PeftModel)
    x = torch.tensor([[5, 6, 7, 8]])
    from leantune.models.loading import load_model_and_tokenizer

    base, _, _ = load_model_and_tokenizer(recipe_from_dict(raw).model)
    with result.model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(result.model(input_ids=x).logits, base(input_ids=x).logits)


def test_rl_bad_reward_name_is_a_clear_error(tiny_chat_model_dir, prompts_file, tmp_path):
    from leantune.cli import main

    recipe = tmp_path / "r.yaml"
    raw = _rl_recipe(tiny_chat_model_dir, tmp_path / "x", prompts_file)
    raw["rl"]["rewards"] = {"tsk": 1.0}
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["rl", str(recipe)]) == 2
    assert not (tmp_path / "x").exists()


def test_rl_sigkill_then_resume_equals_uninterrupted(tiny_chat_model_dir, prompts_file, tmp_path):
    steps = 12

    def raw(name):
        r = _rl_recipe(tiny_chat_model_dir, tmp_path / name, prompts_file, max_sampling_rounds=3,
                       prompt_selection={"window": 1, "cooldown_steps": 2})
        r["train"].update(steps=steps, save_every=1)
        r["adapter"]["dropout"] = 0.1
        return r

    sigkill_mid_run("rl", raw("killed"), tmp_path / "killed", at_step=4)
    resumed = train_rl(recipe_from_dict(raw("killed")), resume=True, quiet=True)
    straight = train_rl(recipe_from_dict(raw("straight")), quiet=True)
    assert_same_adapter(tmp_path / "killed", tmp_path / "straight")
    assert resumed.ledger["totals"]["rollouts"] == straight.ledger["totals"]["rollouts"] | {
        "rollout_s": resumed.ledger["totals"]["rollouts"]["rollout_s"]}
    steps_logged = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 1))


# ----------------------------------------------------------------------------------------------
# Expert iteration


def test_rft_round_keeps_only_verified_and_trains_on_them(tiny_chat_model_dir, prompts_file, tmp_path):
    from leantune.train.rft import train_rft

    raw = _rl_recipe(tiny_chat_model_dir, tmp_path / "rft", prompts_file)
    raw["rft"] = {"rounds": 2, "samples_per_prompt": 3, "steps_per_round": 2}
    result = train_rft(recipe_from_dict(raw), quiet=True)
    info = result.ledger["totals"]["rft"]
    assert info["rounds"] == 2 and info["samples_per_round"] == 12 * 3
    accepted = [json.loads(line) for line in (tmp_path / "rft" / "round-2" / "accepted.jsonl").read_text().splitlines()]
    assert accepted, "a random tiny model writes a digit in some of 36 samples"
    for row in accepted:  # only verified completions (the rl_helpers:has_digit verifier) are kept
        assert any(ch.isdigit() for ch in row["messages"][1]["content"])
    per_round = info["per_round"]
    assert per_round[1]["accepted_total"] >= per_round[0]["accepted_total"]  # the union grows
    assert 0 < info["accepted_fraction"][0] <= 1 / 3 + 1e-9  # at most one (the shortest) per prompt
    assert (tmp_path / "rft" / "round-1" / "sft" / "ledger.json").exists()
    assert (tmp_path / "rft" / "adapter" / "adapter_model.safetensors").exists()


def test_entropy_filter_samples_only_the_highest_entropy_prompts(policy, prompts_file, tmp_path):
    from leantune.rl.rollout import prompt_entropy

    raw = _rl_recipe(tmp_path, tmp_path / "r", prompts_file, prompts_per_step=3, max_sampling_rounds=1,
                     entropy_filter=0.5, dynamic_sampling=False)
    batch = _collect(policy, recipe_from_dict(raw))
    # 3 prompts wanted -> 6 candidates scored by prompt entropy -> the 3 highest are rolled out
    assert batch.stats.entropy_filtered == 3 and batch.stats.groups == 3
    model, tok = policy
    from leantune.data.records import read_prompt_rows

    pool = read_prompt_rows(prompts_file)
    stream = PromptStream(len(pool), seed=0)
    cands = [stream.next() for _ in range(6)]
    ent = prompt_entropy(model, tok, [pool[i]["prompt"] for i in cands])
    top = sorted(sorted(range(6), key=lambda j: -ent[j])[:3])
    rendered = {tuple(p) for p in batch.prompt_ids}
    from leantune.rl.rollout import _tokenize_prompts

    want = {tuple(ids) for ids in _tokenize_prompts(tok, [pool[cands[j]]["prompt"] for j in top])}
    assert rendered == want


def test_rl_refuses_early_over_a_memory_budget(tiny_chat_model_dir, prompts_file, tmp_path):
    from leantune.cli import main

    raw = _rl_recipe(tiny_chat_model_dir, tmp_path / "over", prompts_file)
    raw["memory"] = {"budget": "1MB"}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["rl", str(recipe)]) == 2
    assert not (tmp_path / "over").exists()


def test_mezo_rl_raises_the_reward_itself_without_gradients(tiny_chat_model_dir, prompts_file, tmp_path):
    """optim.name: mezo in `leantune rl`: the objective is the (non-differentiable) reward of completions
    re-sampled at theta +- eps*z; no parameter ever gets a .grad and every extra rollout is billed."""
    raw = _rl_recipe(tiny_chat_model_dir, tmp_path / "zo", prompts_file, max_sampling_rounds=4,
                     rewards={"rl_helpers:digit_share": 1.0})
    raw["optim"] = {"name": "mezo", "lr": 0.5, "zo_eps": 0.5, "scheduler": "constant"}
    recipe = recipe_from_dict(raw)
    from leantune.train.session import setup_model

    init, _, _, _, _ = setup_model(recipe)
    before = _trainable(init)
    result = train_rl(recipe, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "zo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # a large eps moves the samples: at least one step saw different rewards at theta+ and theta-
    assert any(r["zo_reward_plus"] != r["zo_reward_minus"] for r in rows)
    after = _trainable(result.model)
    assert [n for n in after if torch.equal(before[n], after[n])] == []
    assert all(p.grad is None for p in result.model.parameters())
    roll = result.ledger["totals"]["rollouts"]
    # two re-samplings (theta+, theta-) of every kept rollout, per step
    assert roll["zo_rollouts"] == sum(r["zo_rollouts"] for r in rows) == 2 * sum(r["rollouts_used"] for r in rows)
    assert roll["tokens_generated"] > 0 and result.ledger["flops"]["update"] == 0


def test_mezo_rl_replays_the_same_samples_at_both_perturbations(tiny_chat_model_dir, prompts_file, tmp_path):
    """Common random numbers: with a negligible eps both evaluations draw the very same completions, so the
    estimate is exactly zero and nothing moves (without the replay, sampling noise alone would move it)."""
    raw = _rl_recipe(tiny_chat_model_dir, tmp_path / "crn", prompts_file, max_sampling_rounds=4,
                     rewards={"rl_helpers:digit_share": 1.0})
    raw["optim"] = {"name": "mezo", "lr": 0.5, "zo_eps": 1e-9, "scheduler": "constant"}
    raw["train"]["steps"] = 2
    recipe = recipe_from_dict(raw)
    from leantune.train.session import setup_model

    init, _, _, _, _ = setup_model(recipe)
    before = _trainable(init)
    result = train_rl(recipe, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "crn" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["zo_rollouts"] > 0 and r["zo_reward_plus"] == r["zo_reward_minus"] for r in rows)
    after = _trainable(result.model)
    assert all(torch.equal(before[n], after[n]) for n in after)


def test_mezo_rl_rejects_gradient_only_settings(tiny_chat_model_dir, prompts_file, tmp_path):
    from leantune.config import RecipeError

    raw = _rl_recipe(tiny_chat_model_dir, tmp_path / "bad", prompts_file, beta=0.1)
    raw["optim"] = {"name": "mezo", "lr": 0.1}
    with pytest.raises(RecipeError, match="rl.beta"):
        train_rl(recipe_from_dict(raw), quiet=True)


def test_rl_refuses_a_prompt_longer_than_data_max_length(tiny_chat_model_dir, prompts_file, tmp_path):
    """data.max_length bounds RL prompts (the planner sizes rollouts with it): a longer one is a clear error,
    and the longest prompt that passed goes to the ledger."""
    from leantune.config import RecipeError

    raw = _rl_recipe(tiny_chat_model_dir, tmp_path / "short", prompts_file)
    raw["data"]["max_length"] = 4
    with pytest.raises(RecipeError, match=r"prompt 1 renders to \d+ tokens, more than data.max_length=4"):
        train_rl(recipe_from_dict(raw), quiet=True)
    assert not (tmp_path / "short" / "adapter").exists()
    raw = _rl_recipe(tiny_chat_model_dir, tmp_path / "ok", prompts_file)
    raw["train"]["steps"] = 1
    result = train_rl(recipe_from_dict(raw), quiet=True)
    longest = result.ledger["extra"]["longest_prompt_tokens"]
    assert 4 < longest <= recipe_from_dict(raw).data.max_length


def test_bf16_lora_matmuls_in_the_policy_update(tiny_chat_model_dir, prompts_file, tmp_path, monkeypatch):
    """adapter.compute_dtype auto over a bf16 base: the update's LoRA matmuls run in bf16 (autocast, PEFT's input
    cast off through backward), as in `leantune dpo`, recorded in the ledger; the run trains like PEFT's
    fp32-adapter path up to bf16 rounding. adapter.compute_dtype: float32 keeps PEFT's casts."""
    from leantune.train import rl as rl_mod

    seen = []  # (setting, input dtype, output dtype) of every lora_A call with gradient (the update's forwards)
    setting = ["auto"]
    observe_lora_a(monkeypatch, rl_mod, "completion_logprobs", seen, setting)

    def run(compute):
        setting[0] = compute
        raw = _rl_recipe(tiny_chat_model_dir, tmp_path / compute, prompts_file, max_sampling_rounds=4,
                         updates_per_batch=2)
        raw["model"]["dtype"] = "bfloat16"
        raw["adapter"]["compute_dtype"] = compute
        result = train_rl(recipe_from_dict(raw), quiet=True)
        return result, [json.loads(line) for line in (tmp_path / compute / "metrics.jsonl").read_text().splitlines()]

    fast, rows_fast = run("auto")
    slow, rows_slow = run("float32")
    assert fast.ledger["extra"]["auto_choices"]["adapter.compute_dtype"].startswith("bfloat16")
    assert "adapter.compute_dtype" not in slow.ledger["extra"].get("auto_choices", {})
    assert {(i, o) for c, i, o in seen if c == "auto"} == {(torch.bfloat16, torch.bfloat16)}
    assert {(i, o) for c, i, o in seen if c == "float32"} == {(torch.float32, torch.float32)}
    assert rows_fast[0]["reward_mean"] == rows_slow[0]["reward_mean"]  # the same first batch (sampling is unchanged)
    assert rows_fast[0]["loss"] == pytest.approx(rows_slow[0]["loss"], abs=0.02)
