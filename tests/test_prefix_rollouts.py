"""Tree-OPO prefix rollouts (rl.prefix_rollouts, arXiv 2509.09284): the tree advantage against a by-hand
reference on ragged trees, rollouts conditioned on a prefix, prefix tokens kept out of the loss, a tiny RL run,
and the recipe checks."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from conftest import assert_same_adapter, sigkill_mid_run, write_jsonl

from leantune.config import RecipeError, recipe_from_dict
from leantune.models.tiny import tiny_model, tiny_tokenizer
from leantune.rl.advantages import group_advantages
from leantune.rl.rollout import _tokenize_prompts, completion_logprobs, sample_groups
from leantune.rl.tree_opo import PrefixTree, cut_points, load_traces, tree_advantages
from leantune.train.rl import train_rl

# ----------------------------------------------------------------------------------------------
# The advantage


def _by_hand(rewards: list[float], trees: list[list[int]], alpha: float, scale: str, eps: float = 1e-4) -> list[float]:
    """The documented formula, one tree and one node at a time in plain Python."""
    out, i = [], 0
    for tree in trees:
        a = []
        for m in tree:
            node = rewards[i : i + m]
            i += m
            v = sum(node) / m
            a += [r - alpha * v for r in node]
        if len(a) < 2 or max(a) == min(a):
            out += [0.0] * len(a)
            continue
        mu = sum(a) / len(a)
        sd = statistics.stdev(a) if scale == "std" else None
        out += [(x - mu) / (sd + eps) if sd is not None else x - mu for x in a]
    return out


RAGGED = [[3, 1, 2], [2], [1, 4, 2, 2], [5], [1]]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 1.7])
@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("graded", [False, True])
def test_tree_advantage_matches_the_by_hand_formula_on_ragged_trees(alpha, scale, graded):
    g = torch.Generator().manual_seed(int(alpha * 10) + graded)
    n = sum(map(sum, RAGGED))
    r = torch.rand(n, generator=g, dtype=torch.float64)
    rewards = r if graded else (r > 0.5).double()
    got = tree_advantages(rewards, RAGGED, alpha=alpha, scale=scale)
    want = torch.tensor(_by_hand(rewards.tolist(), RAGGED, alpha, scale), dtype=torch.float64)
    assert got.shape == (n,)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (got[-1] == 0).all()  # the one-completion tree has no signal


def test_tree_advantage_reduces_to_grpo_for_one_node_and_zeroes_flat_trees():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    for alpha in (0.0, 1.0):  # one node per tree: r - alpha V is a shift, centring removes it
        torch.testing.assert_close(tree_advantages(r, [[4], [4]], alpha=alpha), group_advantages(r, 4))
        torch.testing.assert_close(tree_advantages(r, [[4], [4]], alpha=alpha, scale="none"),
                                   group_advantages(r, 4, scale="none"))
    # alpha = 0: the whole tree is one group
    torch.testing.assert_close(tree_advantages(r, [[2, 3, 3]], alpha=0.0), group_advantages(r, 8))
    # every node flat (the bare prompt fails, the deep prefix always succeeds): with alpha = 1 nothing to learn
    flat = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    assert tree_advantages(flat, [[3, 3]], alpha=1.0).eq(0).all()
    assert tree_advantages(flat, [[3, 3]], alpha=0.0).ne(0).all()  # alpha = 0 would push toward the deep prefix's
    assert tree_advantages(torch.full((5,), 0.3), [[2, 3]], alpha=0.5).eq(0).all()
    with pytest.raises(ValueError, match="do not cover"):
        tree_advantages(r, [[4, 3]])
    with pytest.raises(ValueError, match=">= 1"):
        tree_advantages(r, [[4, 0, 4]])


def test_cut_points_and_ragged_trees():
    assert cut_points(12, [0.0, 1 / 3, 2 / 3]) == [0, 4, 8]
    assert cut_points(1, [0.0, 0.5, 0.9]) == [0]  # a one-token trace: every cut collapses to the bare prompt
    assert cut_points(3, [0.1, 0.5]) == [0, 1]
    tok = tiny_tokenizer(chat_template=True)
    tree = PrefixTree({"a b": "one two three four five six", "c": "x"}, tok, [0.0, 0.5])
    nodes = tree.nodes(["a b", "no trace", "c"])
    ids = tok("one two three four five six", add_special_tokens=False)["input_ids"]
    assert nodes.per_prompt == [2, 1, 1]
    assert nodes.prefixes == [[], ids[: len(ids) // 2], [], []]
    assert nodes.depths == [0.0, 0.5, 0.0, 0.0]


# ----------------------------------------------------------------------------------------------
# Sampling from a prefix, and the loss over the generated part only


def test_rollouts_continue_the_prefix_in_context():
    tok = tiny_tokenizer(chat_template=True)
    model = tiny_model(vocab_size=len(tok))
    prompts = ["one two", "one two"]
    prefix = tok("three four five", add_special_tokens=False)["input_ids"]
    ro = sample_groups(model, tok, prompts, group_size=3, max_new_tokens=5, seeds=[7, 7], prefixes=[[], prefix])
    base = _tokenize_prompts(tok, ["one two"])[0]
    assert ro.prompt_ids[:3] == [base] * 3 and ro.prompt_ids[3:] == [base + prefix] * 3
    assert ro.extra["prefill_tokens"] == 2 * len(base) + len(prefix)
    # the recorded log-probs are those of the completion given prompt + prefix (a fresh forward says so) ...
    lp, _, mask = completion_logprobs(model, ro.prompt_ids, ro.completion_ids, pad_id=tok.pad_token_id)
    for i, c in enumerate(ro.completion_ids):
        torch.testing.assert_close(lp[i, : len(c)], torch.tensor(ro.logprobs[i]), rtol=1e-4, atol=1e-4)
    # ... and not those given the bare prompt: the prefix is really in the context
    bare, _, _ = completion_logprobs(model, [base] * 3, ro.completion_ids[3:], pad_id=tok.pad_token_id)
    assert not torch.allclose(bare[0, : len(ro.completion_ids[3])], lp[3, : len(ro.completion_ids[3])], atol=1e-3)
    # same seed, same stream: the bare and prefixed nodes draw with the same uniforms yet differ in context only
    assert ro.texts[3] == tok.decode(prefix + ro.completion_ids[3], skip_special_tokens=True)
    assert ro.texts[0] == tok.decode(ro.completion_ids[0], skip_special_tokens=True)
    with pytest.raises(ValueError, match="one token list per prompt"):
        sample_groups(model, tok, prompts, group_size=2, max_new_tokens=2, prefixes=[[]])


def test_prefix_tokens_carry_no_loss():
    """completion_logprobs on (prompt + prefix, completion) == a plain causal-LM loss whose labels mask the prompt
    and the prefix (-100) -- values and every gradient."""
    tok = tiny_tokenizer(chat_template=True)
    torch.manual_seed(0)
    model = tiny_model(vocab_size=len(tok))
    prompt = _tokenize_prompts(tok, ["seven eight"])[0]
    prefixes = [tok("nine ten eleven", add_special_tokens=False)["input_ids"], tok("nine", add_special_tokens=False)["input_ids"]]
    completions = [[5, 9, 11, 4], [6, 7]]
    ctx = [prompt + p for p in prefixes]
    lp, _, mask = completion_logprobs(model, ctx, completions, pad_id=tok.pad_token_id)
    assert mask.sum(1).tolist() == [4, 2]  # generated tokens only
    ours = -(lp * mask).sum()
    ours.backward()
    g_ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ref = 0.0
    for c_ids, c in zip(ctx, completions):
        ids = torch.tensor([c_ids + c])
        labels = torch.tensor([[-100] * len(c_ids) + c])
        ref = ref + model(input_ids=ids, labels=labels).loss * len(c)  # mean over labelled tokens -> sum
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g_ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------------------------
# A tiny run, the traces, the recipe checks


def _rows():
    words = ["cats", "dogs", "rain", "sun", "tea", "maps", "keys", "wind"]
    return [{"prompt": f"Say something about {w}.", "completion": f"{i} {w} are nice, {w} are better",
             "answer": str(i)} for i, w in enumerate(words)]


def _recipe(model_dir, out_dir, data, **pr):
    return recipe_from_dict({
        "model": {"path": str(model_dir)}, "data": {"train": str(data), "max_length": 128},
        "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "loss": {"chunk_size": 16}, "optim": {"lr": 1e-2},
        "train": {"steps": 2, "micro_batch_size": 8, "seed": 0, "output_dir": str(out_dir), "progress": False},
        "rl": {"rewards": {"rl_helpers:has_digit": 1.0}, "group_size": 2, "prompts_per_step": 2,
               "max_new_tokens": 3, "overlong_filter": False, "dynamic_sampling": False,
               "prompt_selection": {"enabled": False}, "prefix_rollouts": {"enabled": True, **pr}},
    })


def test_rl_run_with_prefix_rollouts_writes_metrics_and_ledger(tiny_chat_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", _rows())
    result = train_rl(_recipe(tiny_chat_model_dir, tmp_path / "run", data, depths=[0.0, 0.5], alpha=0.5), quiet=True)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["rollouts"] == 2 * 2 * 2  # prompts x nodes x group_size
        assert m["prefix_tokens"] > 0 and {"prefix_reward@0.00", "prefix_reward@0.50"} <= set(m)
        # the half-trace prefix holds the digit and has_digit scores prefix + completion: every deep node scores 1
        assert m["prefix_reward@0.50"] == 1.0 > m["prefix_reward@0.00"]
    ex = result.ledger.get("extra", result.ledger)["prefix_rollouts"]
    assert ex["depths"] == [0.0, 0.5] and ex["alpha"] == 0.5 and ex["prompts_with_trace"] == 8
    assert ex["rollouts_by_depth"] == {"0.00": 8, "0.50": 8}
    assert result.ledger["totals"]["rollouts"]["rollouts_generated"] == 16


def test_traces_from_a_jsonl_of_messages_or_prompt_completion(tiny_chat_model_dir, tmp_path):
    acc = write_jsonl(tmp_path / "accepted.jsonl", [
        {"messages": [{"role": "user", "content": "Say something about cats."}, {"role": "assistant", "content": "first"}]},
        {"messages": [{"role": "user", "content": "Say something about cats."}, {"role": "assistant", "content": "second"}]},
        {"prompt": "Say something about dogs.", "completion": "woof"}])
    data = write_jsonl(tmp_path / "p.jsonl", [{k: r[k] for k in ("prompt", "answer")} for r in _rows()])
    traces = load_traces(_recipe(tiny_chat_model_dir, tmp_path / "r", data, traces=str(acc)))
    assert traces == {"Say something about cats.": "first", "Say something about dogs.": "woof"}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}])
    with pytest.raises(Exception, match=r"bad.jsonl:1: a reference trace row needs"):
        load_traces(_recipe(tiny_chat_model_dir, tmp_path / "r", data, traces=str(bad)))
    # data.train without completions and traces: task -> nothing to cut: refused before any sampling
    with pytest.raises(RecipeError, match="no reference trace for any of the 8 prompts"):
        train_rl(_recipe(tiny_chat_model_dir, tmp_path / "r2", data), quiet=True)


def test_prefix_longer_than_max_length_is_refused(tiny_chat_model_dir, tmp_path):
    rows = [{"prompt": "hi", "completion": " ".join(["word"] * 300)}]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(RecipeError, match="deepest prefix is .* more than data.max_length=128"):
        train_rl(_recipe(tiny_chat_model_dir, tmp_path / "r", data, depths=[0.0, 0.9]), quiet=True)


@pytest.mark.parametrize("rl,match", [
    ({"router": {"enabled": True}}, "set rl.router.enabled: false"),
    ({"speculative": "prompt_lookup"}, "set rl.speculative: off"),
    ({"rollout_workers": 2}, "set rl.rollout_workers: 0"),
    ({"advantage": "rloo"}, "its own tree advantage"),
    ({"tools": {"enabled": True}}, "set rl.tools.enabled: false"),
    ({"prefix_rollouts": {"enabled": True, "depths": []}}, "at least one cut point"),
    ({"prefix_rollouts": {"enabled": True, "depths": [0.0, 1.0]}}, r"in \[0, 1\)"),
    ({"prefix_rollouts": {"enabled": True, "depths": [0.5, 0.2]}}, "increase strictly"),
    ({"prefix_rollouts": {"enabled": True, "alpha": -1}}, "greater than or equal to 0"),
    ({"prefix_rollouts": {"enabled": True, "cut": 3}}, "cut"),
])
def test_recipe_checks(rl, match):
    base = {"task": "countdown", "prefix_rollouts": {"enabled": True}}
    with pytest.raises(ValueError, match=match):
        recipe_from_dict({"model": {"path": "x"}, "data": {}, "rl": {**base, **rl}})


def test_mezo_is_refused_with_prefix_rollouts():
    with pytest.raises(ValueError, match="optim.name: mezo re-samples from bare prompts"):
        recipe_from_dict({"model": {"path": "x"}, "data": {}, "optim": {"name": "mezo"},
                          "rl": {"task": "countdown", "prefix_rollouts": {"enabled": True}}})
    recipe_from_dict({"model": {"path": "x"}, "data": {}, "rl": {"task": "countdown", "prefix_rollouts": {"enabled": True}}})


def test_the_docs_example_runs(tiny_chat_model_dir, tmp_path, monkeypatch, capsys):
    """docs/tree_opo.md's Python example in a scratch directory, as written except that the tiny model is the
    session's (building one takes half a minute on a busy 2-core machine)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "tree_opo.md").read_text()
    block = text.split("test_the_docs_example_runs -->\n```python\n", 1)[1].split("```", 1)[0]
    made = 'save_tiny_model("tiny-model", chat_template=True)'
    assert made in block
    block = block.replace(made, repr(str(tiny_chat_model_dir)))
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/tree_opo.md", "exec"), {})
    out = capsys.readouterr().out
    assert "prefix_reward@0.50" in out and "reward_by_depth" in out


def test_the_memory_plan_counts_every_node_of_a_tree(tiny_chat_model_dir):
    from leantune.plan.memory import plan_memory
    from leantune.plan.model_shape import model_shape

    def kv(pr):
        recipe = recipe_from_dict({"model": {"path": str(tiny_chat_model_dir)}, "data": {"max_length": 64},
                                   "rl": {"task": "countdown", "group_size": 4, "prefix_rollouts": pr}})
        return plan_memory(recipe, model_shape(recipe.model), mode="rl").phases["rollout"]["kv_cache"][0]

    assert kv({"enabled": True, "depths": [0.0, 0.5, 0.75]}) == 3 * kv({"enabled": False})


@pytest.mark.parametrize("task", ["countdown", "multistep"])
def test_task_traces_are_the_generators_worked_solutions(task):
    from leantune.rl.batch import load_prompt_pool
    from leantune.tasks import get_task

    recipe = recipe_from_dict({"model": {"path": "x"}, "data": {}, "train": {"seed": 3},
                               "rl": {"task": task, "num_prompts": 6, "prefix_rollouts": {"enabled": True}}})
    pool = load_prompt_pool(recipe)
    traces = load_traces(recipe)
    problems = get_task(task).generate(6, seed=3, split="train")
    assert [traces[r["prompt"]] for r in pool] == [p["completion"] for p in problems]
    tok = tiny_tokenizer(chat_template=True)
    nodes = PrefixTree(traces, tok, [0.0, 1 / 3, 2 / 3]).nodes([pool[0]["prompt"]])
    assert nodes.per_prompt == [3] and nodes.prefixes[0] == []
    text = tok.decode(nodes.prefixes[2], skip_special_tokens=False)
    assert text and problems[0]["completion"].replace(" ", "").startswith(text.replace(" ", ""))
    assert get_task(task).verify(text, problems[0]["answer"]) is False  # two thirds of the way: no answer yet


@pytest.mark.slow  # a subprocess run killed mid-way, then two more runs
def test_prefix_rollouts_sigkill_then_resume_equals_uninterrupted(tiny_chat_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", _rows())

    def raw(name):
        r = _recipe(tiny_chat_model_dir, tmp_path / name, data, depths=[0.0, 0.5]).model_dump(mode="json")
        r["train"].update(steps=5, save_every=1)
        return r

    sigkill_mid_run("rl", raw("killed"), tmp_path / "killed", at_step=2)
    resumed = train_rl(recipe_from_dict(raw("killed")), resume=True, quiet=True)
    straight = train_rl(recipe_from_dict(raw("straight")), quiet=True)
    assert_same_adapter(tmp_path / "killed", tmp_path / "straight")
    ra, rb = resumed.ledger["totals"]["rollouts"], straight.ledger["totals"]["rollouts"]
    assert ra == rb | {"rollout_s": ra["rollout_s"]}
    pa, pb = (r.ledger.get("extra", r.ledger)["prefix_rollouts"] for r in (resumed, straight))
    assert pa["rollouts_by_depth"] == pb["rollouts_by_depth"] == {"0.00": 20, "0.50": 20}
    assert pa["reward_by_depth"] == pb["reward_by_depth"]
