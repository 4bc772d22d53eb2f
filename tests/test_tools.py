"""rl.tools: tool calls inside rollouts (`leantune.rl.tools`).

A scripted row gets the calculator's exact answer appended; answers are context (loss mask 0, no log-prob);
the log-probs recorded while sampling equal one forward over prompt + completion; max_calls and the token
budget hold; a bad expression or a sandbox timeout is an error *result*; the same seeds give the same
rollouts alone, in a batch, and in Ray workers; the policy loss ignores tool tokens; `leantune rl` with
tools logs the tool metrics.

The tiny random model never writes ``<calc>``: the model tests use one-character markers ("9" opens, "2"
closes) that its digit-heavy babble hits, so calls (mostly with junk bodies: error answers) really happen.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_recipe, write_jsonl
from leantune.config import RecipeError, ToolsConfig, recipe_from_dict
from leantune.models.tiny import tiny_model, tiny_tokenizer
from leantune.rl.rollout import completion_logprobs, sample_groups
from leantune.rl.tools import Toolbox, ToolCall, _Row, calculator, tool_step

PROMPTS = ["What is 2 + 3?", "hi", "a longer prompt, left padded in a batch"]
SEEDS = [11, 12, 13]
BABBLE = ToolsConfig(enabled=True, calculator_tags=("9", "2"), result_tags=("[", "]"), max_result_tokens=12)
KW = dict(group_size=4, max_new_tokens=40, temperature=0.9, top_p=0.95)


@pytest.fixture(scope="module")
def policy():
    return tiny_model(seed=0), tiny_tokenizer()


def _tokens_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------
# The tools themselves


def test_calculator_is_exact_and_refuses_what_is_not_arithmetic():
    assert calculator("(25 - 1) * 3") == "72" and calculator("1 / 3 + 1 / 6") == "1/2"
    for bad in ["", "2 ** 10", "__import__('os').system('ls')", "1 / 0", "2 +", "x", "9" * 300]:
        with pytest.raises(ValueError):
            calculator(bad)


def test_a_scripted_call_gets_the_exact_answer_appended_as_context(policy):
    _, tok = policy
    tb = Toolbox.from_config(ToolsConfig(enabled=True))
    row = _Row()
    for t in _tokens_of(tok, "First <calc>(25 - 1) * 3</calc>"):  # the "policy" writes this, token by token
        row.add_sampled(t, -1.0, 0.5)
        answer, spent = tool_step(row, tok, tb, budget=200)
    assert not spent and row.calls == 1 and row.errors == 0
    assert tok.decode(answer) == "<result>72</result>"
    assert row.tokens[-len(answer):] == answer
    assert row.mask == [1] * (len(row.tokens) - len(answer)) + [0] * len(answer)
    assert row.logps[-len(answer):] == [0.0] * len(answer) and row.ents[-len(answer):] == [0.0] * len(answer)
    # the call is answered once: more tokens after the answer do not call again until a new call closes
    row.add_sampled(_tokens_of(tok, " so")[0], -1.0, 0.5)
    assert tool_step(row, tok, tb, budget=200) == ([], False) and row.calls == 1


def test_max_calls_and_the_token_budget_hold(policy):
    _, tok = policy
    tb = Toolbox.from_config(ToolsConfig(enabled=True, max_calls=2))
    row = _Row()
    for expr in ["1 + 1", "2 + 2", "3 + 3"]:
        for t in _tokens_of(tok, f" <calc>{expr}</calc>"):
            row.add_sampled(t, -1.0, 0.5)
            tool_step(row, tok, tb, budget=500)
    assert row.calls == 2 and "<result>4</result>" in tok.decode(row.tokens) and "<result>6</result>" not in tok.decode(row.tokens)
    short = _Row()
    for t in _tokens_of(tok, "<calc>6 * 7</calc>"):
        short.add_sampled(t, -1.0, 0.5)
    answer, spent = tool_step(short, tok, tb, budget=len(short.tokens) + 2)  # room for 2 answer tokens only
    assert spent and len(answer) == 2 and len(short.tokens) == len(short.mask) == len(short.logps)


def test_tool_failures_are_error_results_not_crashes():
    tb = Toolbox.from_config(ToolsConfig(enabled=True, python=True, python_timeout_s=0.5, python_memory_mb=128))
    bad = tb.run(ToolCall("calculator", "2 ** 99999"))
    assert bad.error and bad.text.startswith("error:")
    ok = tb.run(ToolCall("python", "print(sum(range(10)))"))
    assert (ok.text, ok.error) == ("45", False)
    slow = tb.run(ToolCall("python", "while True: pass"))
    assert slow.error and slow.text.startswith("error:") and ("timeout" in slow.text or "limit" in slow.text or "signal" in slow.text)
    crash = tb.run(ToolCall("python", "raise ValueError('boom')"))
    assert crash.error and "boom" in crash.text


def test_find_call_takes_the_earliest_closed_call_of_any_tool():
    tb = Toolbox.from_config(ToolsConfig(enabled=True, python=True))
    assert tb.find_call("<python>print(1)</python> <calc>1+1</calc>") == ToolCall("python", "print(1)")
    assert tb.find_call("</calc> <calc>2*3</calc>") == ToolCall("calculator", "2*3")  # a stray close is text
    assert tb.find_call("<calc>2*3</python>") is None


# ----------------------------------------------------------------------------------------------
# Rollouts with a real (tiny) policy


@pytest.fixture(scope="module")
def tool_rollouts(policy):
    model, tok = policy
    return sample_groups(model, tok, PROMPTS, seeds=SEEDS, tools=BABBLE, **KW)


def test_rollouts_call_tools_and_every_answer_is_the_tools(policy, tool_rollouts):
    _, tok = policy
    ro, tb = tool_rollouts, Toolbox.from_config(BABBLE)
    assert sum(ro.tool_calls) >= 3 and ro.tool_tokens > 0  # the markers are hit: the test is not vacuous
    for ids, mask, calls, errors in zip(ro.completion_ids, ro.loss_mask, ro.tool_calls, ro.tool_errors):
        assert len(ids) == len(mask) <= KW["max_new_tokens"] and calls <= BABBLE.max_calls
        replay = _Row()  # replay the sampled tokens through the tool step: the same answers, where they are
        for t, m in zip(ids, mask):
            if m:
                replay.add_sampled(t, 0.0, 0.0)
                tool_step(replay, tok, tb, budget=KW["max_new_tokens"])
        assert replay.tokens == ids and replay.mask == mask and (replay.calls, replay.errors) == (calls, errors)


def test_recorded_logprobs_are_one_forward_over_the_full_sequence(policy, tool_rollouts):
    model, tok = policy
    ro = tool_rollouts
    logps, _, mask = completion_logprobs(model, ro.prompt_ids, ro.completion_ids, pad_id=tok.pad_token_id,
                                         temperature=KW["temperature"])  # (B, T)
    loss_mask = torch.zeros_like(mask)
    recorded = torch.zeros_like(logps)
    for i, (m, lp) in enumerate(zip(ro.loss_mask, ro.logprobs)):
        loss_mask[i, : len(m)] = torch.tensor(m, dtype=mask.dtype)
        recorded[i, : len(lp)] = torch.tensor(lp)
    assert 0 < loss_mask.sum() < mask.sum()  # some tokens are tool answers
    torch.testing.assert_close(recorded * loss_mask, logps.detach() * loss_mask, atol=2e-5, rtol=0)
    assert (recorded[(mask > 0) & (loss_mask == 0)] == 0).all()  # no log-prob bookkeeping on tool answers
    assert ro.tokens_generated == int(loss_mask.sum()) and ro.tool_tokens == int((mask - loss_mask).sum())


def test_tools_whose_markers_never_occur_sample_exactly_the_plain_rollouts(policy):
    model, tok = policy
    never = ToolsConfig(enabled=True, calculator_tags=("@@@@", "$$$$"))
    plain = sample_groups(model, tok, PROMPTS, seeds=SEEDS, **KW)
    tools = sample_groups(model, tok, PROMPTS, seeds=SEEDS, tools=never, **KW)
    assert tools.completion_ids == plain.completion_ids and tools.truncated == plain.truncated
    assert tools.logprobs == plain.logprobs and sum(tools.tool_calls) == 0


def test_a_groups_rollouts_do_not_depend_on_the_batch(policy, tool_rollouts):
    """Other rows' tool answers leave masked holes in the shared cache; a prompt sampled alone is the same."""
    model, tok = policy
    g = KW["group_size"]
    for i in range(len(PROMPTS)):
        alone = sample_groups(model, tok, [PROMPTS[i]], seeds=[SEEDS[i]], tools=BABBLE, **KW)
        assert alone.completion_ids == tool_rollouts.completion_ids[i * g:(i + 1) * g]
        assert alone.loss_mask == tool_rollouts.loss_mask[i * g:(i + 1) * g]
        for a, b in zip(alone.logprobs, tool_rollouts.logprobs[i * g:(i + 1) * g]):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=2e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# The update ignores tool tokens


def test_the_policy_loss_has_no_term_on_tool_tokens(policy, tool_rollouts):
    """policy_update's SGD step (lr 1) == the gradient of sum_i A_i sum_t mask_it log pi_it / N, with
    mask = the loss mask (tool answers 0) and N = sampled tokens: DAPO's token mean over sampled tokens only."""
    from leantune.config import RLConfig
    from leantune.rl.advantages import group_advantages
    from leantune.rl.batch import Batch
    from leantune.train.rl import policy_update

    _, tok = policy
    ro = tool_rollouts
    n = len(ro)
    rewards = [float(i % 3 == 0) + 0.1 * (i % 2) for i in range(n)]
    batch = Batch(prompt_ids=ro.prompt_ids, completion_ids=ro.completion_ids, rewards=rewards, correct=[False] * n,
                  truncated=[False] * n, texts=ro.texts, logprobs=ro.logprobs, loss_mask=ro.loss_mask,
                  group_sizes=[KW["group_size"]] * len(PROMPTS))
    rl = RLConfig(loss="dapo", group_size=KW["group_size"], temperature=KW["temperature"], max_new_tokens=KW["max_new_tokens"])

    model = tiny_model(seed=0)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    ref_model = tiny_model(seed=0)
    adv = group_advantages(torch.tensor(rewards), KW["group_size"])  # (N,)
    logps, _, mask = completion_logprobs(ref_model, ro.prompt_ids, ro.completion_ids, pad_id=tok.pad_token_id,
                                         temperature=KW["temperature"])
    loss_mask = torch.zeros_like(mask)
    for i, m in enumerate(ro.loss_mask):
        loss_mask[i, : len(m)] = torch.tensor(m, dtype=mask.dtype)
    (-(adv[:, None] * logps * loss_mask).sum() / loss_mask.sum()).backward()

    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stats = policy_update(model, opt, sched, batch, rl, pad_id=tok.pad_token_id, micro_batch=5, chunk_size=16,
                          max_grad_norm=None)
    assert stats.tokens_trained == sum(sum(ro.loss_mask[i]) for i in range(n) if adv[i] != 0)
    for name, p in model.named_parameters():
        ref_grad = dict(ref_model.named_parameters())[name].grad
        torch.testing.assert_close(before[name] - p.detach(), ref_grad, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Config, Ray workers, the CLI run


def _rl_recipe(model_dir, prompts, out, **rl):
    raw = tiny_recipe(model_dir, prompts, out, train={"steps": 2, "micro_batch_size": 4, "seed": 0},
                      optim={"lr": 5e-2, "scheduler": "constant"})
    raw["rl"] = {"rewards": {"rl_helpers:digit_share": 1.0}, "group_size": 4, "prompts_per_step": 2,
                 "max_new_tokens": 24, "overlong_filter": False,
                 "tools": {"enabled": True, "calculator_tags": ["9", "2"], "result_tags": ["[", "]"]}, **rl}
    return raw


@pytest.mark.parametrize("rl, msg", [
    ({"speculative": "prompt_lookup"}, "rl.speculative: off"),
    ({"router": {"enabled": True}}, "rl.router.enabled: false"),
    ({"stop": ["2"]}, "occurs in the rl.tools marker"),
    ({"tools": {"enabled": True, "calculator_tags": ["<r>", "</r>"], "result_tags": ["<r>", "</x>"]}}, "distinct"),
    ({"tools": {"enabled": True, "calculator": False}}, "neither calculator nor python"),
])
def test_unsupported_combinations_are_refused_with_the_fix(tmp_path, rl, msg):
    raw = _rl_recipe("unused-model-dir", tmp_path / "p.jsonl", tmp_path / "out", **rl)
    with pytest.raises(RecipeError, match=msg.replace(".", r"\.")):
        recipe_from_dict(raw)


def test_leantune_rl_with_tools_logs_the_tool_metrics(tiny_model_dir, tmp_path):
    from leantune.train.rl import train_rl

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)}
                                                 for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]])
    run = train_rl(recipe_from_dict(_rl_recipe(tiny_model_dir, prompts, tmp_path / "run")), quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for key in ("tool_calls_per_completion", "tool_errors", "tool_error_frac", "tool_tokens"):
        assert all(key in r for r in rows), key
    assert sum(r["tool_calls_per_completion"] * r["rollouts"] for r in rows) > 0
    tools = run.ledger["extra"]["tools"]
    totals = run.ledger["totals"]["rollouts"]
    assert tools["calls"] == totals["tool_calls"] > 0 and totals["tool_tokens"] == sum(r["tool_tokens"] for r in rows)
    assert tools["errors"] == sum(r["tool_errors"] for r in rows) <= tools["calls"]


def test_ray_workers_sample_the_in_process_tool_rollouts(tmp_path):
    ray = pytest.importorskip("ray")
    from leantune.config import Recipe
    from leantune.models.tiny import save_tiny_model
    from leantune.rl.workers import RolloutPool
    from leantune.train.session import setup_model

    model_dir = save_tiny_model(tmp_path / "tiny", seed=0, chat_template=True)
    raw = {"model": {"path": str(model_dir)}, "data": {"max_length": 64},
           "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
           "train": {"seed": 0, "output_dir": str(tmp_path / "out"), "progress": False}}
    model, tok, *_ = setup_model(Recipe.model_validate(raw))
    from leantune.adapters.lora import trainable_state

    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    state = {k: v.clone() for k, v in trainable_state(model).items()}
    kw = dict(KW, stop=[], fold_adapter=True)
    ref = sample_groups(model, tok, PROMPTS, seeds=SEEDS, tools=BABBLE, **kw)
    assert sum(ref.tool_calls) > 0
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        with RolloutPool(raw, num_workers=2) as pool:
            ro = pool.sample_groups(state, PROMPTS, seeds=SEEDS, tools=BABBLE, **kw)
    finally:
        if started:
            ray.shutdown()
    assert ro.completion_ids == ref.completion_ids and ro.loss_mask == ref.loss_mask
    assert ro.tool_calls == ref.tool_calls and ro.tool_errors == ref.tool_errors and ro.texts == ref.texts
    for a, b in zip(ro.logprobs, ref.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=2e-5, rtol=0)


def test_calls_closed_in_one_step_run_at_once_and_answer_in_order(monkeypatch):
    """run_calls: the sandboxed calls of one decode step overlap (up to PARALLEL_CALLS), answers keep the calls'
    order, and a failing call is an error result like any other."""
    import threading
    import time

    from leantune.rl import tools as tools_mod

    monkeypatch.setattr(tools_mod, "PARALLEL_CALLS", 3)
    lock, active, peak = threading.Lock(), [0], [0]

    def slow(body: str) -> tools_mod.ToolResult:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        return tools_mod.ToolResult(f"ran {body}", body == "bad")

    tb = Toolbox(tags={"python": ("<python>", "</python>")}, result_tags=("<result>", "</result>"),
                 runners={"python": slow})
    calls = [ToolCall("python", b) for b in ("a", "b", "bad", "d", "e")]
    results = tools_mod.run_calls(tb, calls)
    assert [r.text for r in results] == ["ran a", "ran b", "ran bad", "ran d", "ran e"]
    assert [r.error for r in results] == [False, False, True, False, False]
    assert peak[0] == 3  # three at a time, never more
    peak[0] = 0
    assert tools_mod.run_calls(tb, calls[:1])[0].text == "ran a" and peak[0] == 1
