"""Difficulty routing (rl.router): the probe's fit, the allocation rule, ragged groups through advantages,
routed sampling, and a tiny RL run with the router on."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_same_adapter, sigkill_mid_run, write_jsonl

from leantune.config import RouterConfig, recipe_from_dict
from leantune.models.tiny import tiny_model, tiny_tokenizer
from leantune.rl.advantages import ADVANTAGES, ragged_advantages
from leantune.rl.rollout import _tokenize_prompts, sample_groups
from leantune.rl.router import DifficultyRouter, allocate_group_sizes, brier_score, fit_logistic
from leantune.rl.selection import informative_groups
from leantune.train.rl import train_rl

# ----------------------------------------------------------------------------------------------
# The probe


def _reference_fit(x, k, n, l2):
    """The same objective written per completion (one Bernoulli row per sample), minimised by LBFGS."""
    rows, ys = [], []
    for xi, ki, ni in zip(x.double(), k.tolist(), n.tolist()):
        rows += [xi] * int(ni)
        ys += [1.0] * int(ki) + [0.0] * int(ni - ki)
    xr, yr = torch.stack(rows), torch.tensor(ys, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xr @ w + b, yr) + l2 / 2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return torch.cat([w.detach(), b.detach()[None]])


@pytest.mark.parametrize("d,l2", [(3, 0.01), (7, 0.01), (7, 1.0)])
def test_probe_fit_matches_a_per_completion_reference_on_separable_features(d, l2):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(23, d, generator=g)
    truth = torch.randn(d, generator=g)
    n = torch.randint(1, 9, (23,), generator=g)
    k = torch.where(x @ truth > 0, n, torch.zeros_like(n))  # separable: all solved or all failed
    w = fit_logistic(x, k, n, l2=l2)
    ref = _reference_fit(x, k, n, l2)
    assert torch.allclose(w, ref, atol=1e-6), (w, ref)
    # nearly unpenalised on separable data with equal trials: the fit separates every point
    w = fit_logistic(x, torch.where(x @ truth > 0, 4, 0), torch.full((23,), 4), l2=1e-5, steps=100)
    p = torch.sigmoid(x.double() @ w[:-1] + w[-1])
    assert ((p > 0.5) == (x @ truth > 0)).all()


def test_router_learns_and_brier_is_scored_before_the_refit():
    cfg = RouterConfig(enabled=True, warmup_prompts=8, l2=0.01, explore=0.0)
    r = DifficultyRouter(cfg, group_size=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g)
    k = torch.where(x[:, 0] > 0, 4, 0)
    assert r.predict(x[:2]) == [0.5, 0.5] and not r.active
    b_sum, b_n = r.observe(x[:40], k[:40].tolist(), [4] * 40)
    assert b_n == 160 and b_sum == pytest.approx(0.25 * 160)  # scored with the untrained 0.5, then fitted
    assert r.active
    p = r.predict(x[40:])
    assert brier_score(p, k[40:].tolist(), [4] * 20) < 0.1  # held out: learned the sign of feature 0
    sizes = r.route(x[40:], seeds=list(range(20)))
    confident = sum(q >= cfg.skip_solved or q <= cfg.skip_hopeless for q in p)
    assert confident >= 5 and sizes.count(0) == confident  # confident prompts are skipped, no exploring
    assert sum(sizes) == 4 * (20 - confident)
    state = json.loads(json.dumps(r.state_dict()))
    r2 = DifficultyRouter(cfg, group_size=4)
    r2.load_state_dict(state)
    assert r2.predict(x[40:]) == pytest.approx(p, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# The allocation rule


def test_allocation_skips_the_ends_and_keeps_the_budget_of_the_rest():
    p = [0.97, 0.5, 0.3, 0.02, 0.15, 0.5]
    sizes = allocate_group_sizes(p, group_size=4, min_size=2, max_size=8, skip_solved=0.95, skip_hopeless=0.05)
    assert sizes[0] == sizes[3] == 0
    live = [1, 2, 4, 5]
    assert sum(sizes[i] for i in live) == 4 * len(live)
    assert all(2 <= sizes[i] <= 8 for i in live)
    assert sizes[1] == sizes[5] >= sizes[2] >= sizes[4]  # more samples where p (1 - p) is larger
    # the continuous solution: x_i = lam * p_i (1 - p_i), sum 16 -> lam = 16 / 0.8875
    lam = 16 / sum(q * (1 - q) for q in (0.5, 0.3, 0.15, 0.5))
    for i in live:
        assert abs(sizes[i] - lam * p[i] * (1 - p[i])) < 1.0


def test_allocation_respects_the_bounds_and_explores():
    sizes = allocate_group_sizes([0.5, 0.11, 0.12, 0.99], group_size=4, min_size=2, max_size=6,
                                 skip_solved=0.95, skip_hopeless=0.1, explore=[False, False, False, True])
    assert sizes[0] == 6 and sizes[3] == 2  # capped at max; the skipped one explored at min
    assert sum(sizes[:3]) == 12
    assert allocate_group_sizes([0.5] * 3, group_size=4, min_size=2, max_size=8, skip_solved=0.9,
                                skip_hopeless=0.1) == [4, 4, 4]
    with pytest.raises(ValueError, match="min_size"):
        allocate_group_sizes([0.5], group_size=4, min_size=5, max_size=8, skip_solved=0.9, skip_hopeless=0.1)


# ----------------------------------------------------------------------------------------------
# Ragged groups


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_ragged_advantages_equal_per_group_calls(name):
    fn = ADVANTAGES[name]
    sizes = [3, 1, 5, 2, 2]
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.0, 1.0])
    got = ragged_advantages(fn, r, sizes)
    want, a = [], 0
    for n in sizes:
        want.append(fn(r[a : a + n], n))
        a += n
    assert torch.equal(got, torch.cat(want))
    assert got[3] == 0 and got[9] == got[10] == 0  # single and flat groups carry nothing
    assert torch.equal(ragged_advantages(fn, r[:12], [3] * 4), fn(r[:12], 3))
    assert informative_groups(r.tolist(), sizes) == [True, False, True, False, True]
    with pytest.raises(ValueError, match="do not cover"):
        ragged_advantages(fn, r, [3, 3])


# ----------------------------------------------------------------------------------------------
# Routed sampling and the loop


def test_routed_sampling_gives_each_prompt_its_size_from_one_prefill():
    tok = tiny_tokenizer(chat_template=True)
    model = tiny_model(vocab_size=len(tok))
    seen = []

    def route(feats):
        seen.append(feats.shape)
        return [3, 0, 1]

    prompts = ["one two", "three", "four five six"]
    ro = sample_groups(model, tok, prompts, group_size=2, max_new_tokens=4, seeds=[1, 2, 3], route=route)
    assert seen == [(3, model.config.hidden_size)] and ro.features.shape == (3, model.config.hidden_size)
    assert ro.group_sizes == [3, 0, 1] and len(ro) == 4
    assert ro.extra["prefill_tokens"] == sum(len(ids) for ids in _tokenize_prompts(tok, prompts))  # each once
    # completion j of a prompt is the same whatever the other prompts' sizes (its own key stream)
    fixed = sample_groups(model, tok, prompts, group_size=3, max_new_tokens=4, seeds=[1, 2, 3])
    assert ro.completion_ids[:3] == fixed.completion_ids[:3]
    assert ro.completion_ids[3] == fixed.completion_ids[6]
    assert ro.prompt_ids[3] == fixed.prompt_ids[6]


def _recipe(model_dir, out_dir, prompts_file, **rl):
    return recipe_from_dict({
        "model": {"path": str(model_dir)},
        "data": {"train": str(prompts_file)},
        "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "loss": {"chunk_size": 16},
        "optim": {"lr": 1e-2},
        "train": {"steps": 4, "micro_batch_size": 8, "seed": 0, "output_dir": str(out_dir), "progress": False},
        "rl": {"rewards": {"rl_helpers:has_digit": 1.0}, "group_size": 4, "prompts_per_step": 3,
               "max_new_tokens": 2, "overlong_filter": False, "max_sampling_rounds": 2, **rl},
    })


def test_rl_run_with_router_varies_group_sizes_and_counts_rollouts(tiny_chat_model_dir, tmp_path):
    rows = [{"prompt": f"Say something about {w}.", "answer": str(i)} for i, w in enumerate(
        ["cats", "dogs", "rain", "sun", "tea", "maps", "keys", "wind", "salt", "ink", "snow", "moss"])]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    # a weak penalty (confident, spread-out predictions) and far skip thresholds: sizes spread over [2, 8]
    router = {"enabled": True, "warmup_prompts": 3, "min_group_size": 2, "max_group_size": 8, "l2": 1e-3,
              "skip_solved": 0.999, "skip_hopeless": 0.001, "explore": 0.0}
    recipe = _recipe(tiny_chat_model_dir, tmp_path / "run", prompts, router=router,
                     prompt_selection={"enabled": False})
    result = train_rl(recipe, quiet=True)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    routed = sum(m["router_prompts"] for m in metrics)
    assert routed > 0
    sizes = [(m["router_group_size_min"], m["router_group_size_max"]) for m in metrics if m["router_prompts"]]
    assert min(a for a, _ in sizes) < max(b for _, b in sizes), sizes  # group sizes vary
    for m in metrics:  # rollouts of a step = the fixed size of every prompt sampled, less what the router saved
        fixed_prompts = m["rollouts"] + m["router_rollouts_saved"]
        assert fixed_prompts % 4 == 0
    tot = result.ledger["totals"]["rollouts"]
    assert tot["rollouts_generated"] == sum(m["rollouts"] for m in metrics)
    # every routed prompt got group_size - (saved share) rollouts: the ledger adds up
    assert tot["router_rollouts_saved"] == sum(m["router_rollouts_saved"] for m in metrics)
    assert tot["router_prompts_routed"] == routed
    ex = result.ledger["extra"]["router"] if "extra" in result.ledger else result.ledger["router"]
    assert ex["prompts_routed"] == routed and ex["fixed_group_size"] == 4


def test_router_config_is_checked():
    with pytest.raises(ValueError, match="min_group_size"):
        recipe_from_dict({"model": {"path": "x"}, "data": {}, "rl": {"group_size": 4, "router": {
            "enabled": True, "min_group_size": 6, "max_group_size": 8}}})
    with pytest.raises(ValueError, match="skip_hopeless"):
        RouterConfig(skip_hopeless=0.6, skip_solved=0.5)


@pytest.mark.slow  # a subprocess run killed mid-way, then two more runs
def test_rl_router_sigkill_then_resume_equals_uninterrupted(tiny_chat_model_dir, tmp_path):
    rows = [{"prompt": f"Say something about {w}.", "answer": str(i)} for i, w in enumerate(
        ["cats", "dogs", "rain", "sun", "tea", "maps", "keys", "wind", "salt", "ink", "snow", "moss"])]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    router = {"enabled": True, "warmup_prompts": 3, "max_group_size": 8, "l2": 1e-3, "skip_solved": 0.95,
              "skip_hopeless": 0.05, "explore": 0.3}

    def raw(name):
        r = _recipe(tiny_chat_model_dir, tmp_path / name, prompts, router=router).model_dump(mode="json")
        r["train"].update(steps=6, save_every=1)
        return r

    sigkill_mid_run("rl", raw("killed"), tmp_path / "killed", at_step=3)
    resumed = train_rl(recipe_from_dict(raw("killed")), resume=True, quiet=True)
    straight = train_rl(recipe_from_dict(raw("straight")), quiet=True)
    assert_same_adapter(tmp_path / "killed", tmp_path / "straight")
    ra, rb = resumed.ledger["totals"]["rollouts"], straight.ledger["totals"]["rollouts"]
    assert ra == rb | {"rollout_s": ra["rollout_s"]}
    assert rb["router_prompts_routed"] > 0
