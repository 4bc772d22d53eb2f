"""dpo.active (arXiv 2511.04286): the Laplace / Bradley–Terry math against plain references, the dueling
Thompson selector on a synthetic pool whose informative pairs are known, the pool rows and labellers, and the
loop end to end on the tiny model (labels spent == budget, in the ledger and the metrics)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import torch
import yaml

from conftest import write_jsonl
from leantune.active.laplace import (
    bt_accuracy,
    bt_objective,
    dueling_scores,
    dueling_thompson_select,
    feature_scale,
    laplace_posterior,
    preference_spread,
    sample_heads,
)
from leantune.active.pool import (
    HiddenColumn,
    LabelLedger,
    PoolRow,
    answer_pool,
    check_pool_row,
    label_with_retries,
    verifier_labeler,
)
from leantune.active.rounds import ActivePairs, round_starts
from leantune.cli import main
from leantune.config import ActiveConfig, ModelConfig, RecipeError, recipe_from_dict
from leantune.data.preference import PairRecord, answer_pairs, tokenize_pairs
from leantune.data.records import DataError
from leantune.models.loading import load_model_and_tokenizer
from leantune.rl.rewards import exact_match_reward
from leantune.tasks.addition import generate
from leantune.train.dpo import train_dpo

# ----------------------------------------------------------------------------------------------
# Math vs references


def _problem(n: int, d: int, seed: int) -> torch.Tensor:
    """Winner-minus-loser differences (n, d), float64, labels drawn from a BT model with a random head."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_true = torch.randn(d, generator=g, dtype=torch.float64)
    flip = torch.rand(n, generator=g, dtype=torch.float64) > torch.sigmoid(x @ w_true)
    return torch.where(flip[:, None], -x, x)


def _reference_map(x: torch.Tensor, lam: float) -> torch.Tensor:
    """MAP by plain gradient descent on the autograd objective (no Newton, no closed-form derivatives)."""
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = bt_objective(w, x, lam)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return w.detach()


@pytest.mark.parametrize("n,d,lam", [(0, 3, 1.0), (7, 5, 0.3), (37, 11, 1.0), (3, 17, 2.5), (123, 2, 0.05)])
def test_laplace_map_and_hessian_match_autograd_reference(n, d, lam):
    x = _problem(n, d, seed=n * 31 + d)
    post = laplace_posterior(x, lam)
    ref = _reference_map(x, lam)
    torch.testing.assert_close(post.mean, ref, atol=1e-6, rtol=1e-6)
    w = post.mean.clone().requires_grad_()
    (grad,) = torch.autograd.grad(bt_objective(w, x, lam), w)
    assert float(grad.abs().max()) < 1e-9  # a stationary point of the autograd objective
    hess = torch.autograd.functional.hessian(lambda w: bt_objective(w, x, lam), post.mean)  # (d, d)
    torch.testing.assert_close(post.precision, hess, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(post.covariance @ hess, torch.eye(d, dtype=torch.float64), atol=1e-8, rtol=0)
    v = torch.randn(d, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(post.solve(v), torch.linalg.solve(hess, v), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(post.quad(v.T), torch.einsum("id,de,ie->i", v.T, torch.linalg.inv(hess), v.T),
                               atol=1e-9, rtol=1e-9)
    if n == 0:  # no labels: the prior
        assert torch.equal(post.mean, torch.zeros(d, dtype=torch.float64))
        torch.testing.assert_close(post.precision, lam * torch.eye(d, dtype=torch.float64))


def test_posterior_samples_have_the_posterior_moments():
    x = _problem(20, 4, seed=3)
    post = laplace_posterior(x, 0.7)
    draws = sample_heads(post, 200_000, torch.Generator().manual_seed(0))  # (k, 4)
    torch.testing.assert_close(draws.mean(0), post.mean, atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(draws.T), post.covariance, atol=0.01, rtol=0.02)


def test_dueling_scores_and_spread_by_hand():
    g = torch.Generator().manual_seed(1)
    d, w1, w2 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((9, 5), (3, 5), (3, 5)))
    post = laplace_posterior(_problem(11, 5, seed=4), 1.3)
    spread = preference_spread(post, d)
    for i in range(9):
        p = torch.sigmoid(d[i] @ post.mean)
        want = p * (1 - p) * torch.sqrt(d[i] @ post.covariance @ d[i])
        assert float(spread[i]) == pytest.approx(float(want), rel=1e-9)
    scores = dueling_scores(d, w1, w2, spread, alpha=0.25)  # (9, 3)
    for i in range(9):
        for j in range(3):
            dis = abs(float(torch.sigmoid(d[i] @ w1[j]) - torch.sigmoid(d[i] @ w2[j])))
            assert float(scores[i, j]) == pytest.approx(0.25 * dis + 0.75 * float(spread[i]), rel=1e-9)
    pure = dueling_scores(d, w1, w2)
    assert torch.equal(pure, (torch.sigmoid(d @ w1.T) - torch.sigmoid(d @ w2.T)).abs())


def test_feature_scale_and_accuracy():
    f = torch.tensor([[[1.0, 10.0], [3.0, 30.0]], [[5.0, 50.0], [7.0, 70.0]]])  # (2 pairs, 2 responses, 2)
    torch.testing.assert_close(feature_scale(f, eps=0), torch.tensor([5 ** 0.5, 10 * 5 ** 0.5], dtype=torch.float64))
    w = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert bt_accuracy(w, torch.tensor([[1.0, 0.0], [-1.0, 5.0], [2.0, -1.0]])) == pytest.approx(2 / 3)


def _synthetic_pool(seed: int):
    """A head that knows direction e1 (400 labelled pairs along it) and nothing about e2. Pool: 40 pairs along
    e1 (outcome already known), 40 nearly identical pairs (d ~ 0), 40 along e2 (the informative ones)."""
    g = torch.Generator().manual_seed(seed)
    e1, e2 = torch.eye(2, dtype=torch.float64)
    lab = e1 * (0.5 + torch.rand(400, 1, generator=g, dtype=torch.float64))  # winner-minus-loser, w1* > 0
    known = 3.0 * e1 * torch.sign(torch.randn(40, 1, generator=g, dtype=torch.float64))
    null = 1e-3 * torch.randn(40, 2, generator=g, dtype=torch.float64)
    informative = e2 * torch.sign(torch.randn(40, 1, generator=g, dtype=torch.float64))
    return laplace_posterior(lab, 1.0), torch.cat([known, null, informative])


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_selector_picks_the_informative_pairs(alpha):
    post, pool = _synthetic_pool(seed=0)
    picked = dueling_thompson_select(post, pool, 10, alpha=alpha, generator=torch.Generator().manual_seed(0))
    assert len(set(picked)) == 10
    informative = sum(80 <= i < 120 for i in picked)
    assert informative >= 9, picked  # random picking would take ~3.3 of 10
    with pytest.raises(ValueError, match="cannot pick"):
        dueling_thompson_select(post, pool, 121)


def test_active_beats_random_on_a_linear_problem():
    """On a linear BT problem with a pool of mixed informativeness, 30 labels picked by dueling TS fit the head
    better than 30 random ones (held-out accuracy, mean over 6 seeds)."""
    def run(select: str, seed: int) -> float:
        g = torch.Generator().manual_seed(seed)
        d = 8
        w_true = torch.randn(d, generator=g, dtype=torch.float64)
        scales = torch.where(torch.rand(600, 1, generator=g, dtype=torch.float64) < 0.7, 0.05, 1.0)
        pool = torch.randn(600, d, generator=g, dtype=torch.float64) * scales  # 70% near-ties, little to learn
        truth = (pool @ w_true > 0)
        test = torch.randn(2000, d, generator=g, dtype=torch.float64)
        test = torch.where((test @ w_true > 0)[:, None], test, -test)
        labelled: list[int] = []
        for r in range(6):
            x = torch.where(truth[labelled][:, None], pool[labelled], -pool[labelled])
            post = laplace_posterior(x, 1.0)
            taken = set(labelled)
            rest = [i for i in range(600) if i not in taken]
            if select == "random":
                picks = torch.randperm(len(rest), generator=g)[:5].tolist()
            else:
                picks = dueling_thompson_select(post, pool[rest], 5, generator=g)
            labelled += [rest[j] for j in picks]
        x = torch.where(truth[labelled][:, None], pool[labelled], -pool[labelled])
        return bt_accuracy(laplace_posterior(x, 1.0).mean, test)

    active = sum(run("thompson", s) for s in range(6)) / 6
    rand = sum(run("random", s) for s in range(6)) / 6
    assert active > rand + 0.03, (active, rand)


# ----------------------------------------------------------------------------------------------
# Pool rows and labellers


def test_pool_rows_and_their_errors():
    row, label = check_pool_row({"prompt": "2+2?", "responses": ["4", "5"], "answer": "4", "preferred": 0}, "p:1",
                                "preferred")
    assert row.responses == ("4", "5") and row.fields == {"answer": "4"} and label == 0
    cases = [({"responses": ["a", "b"]}, "missing field 'prompt'"),
             ({"prompt": "x", "responses": ["a"]}, "'responses' must be a list of two"),
             ({"prompt": "x", "responses": ["a", "a"]}, "identical"),
             ({"prompt": "x", "responses": ["a", " "]}, r"'responses\[1\]' is empty"),
             ({"prompt": "x", "responses": ["a", "b"], "preferred": 2}, "must be 0"),
             ({"prompt": "x", "responses": ["a", "b"], "preferred": True}, "must be 0"),
             ({"prompt": "x", "responses": ["a", "b"]}, "must be 0")]
    for data, msg in cases:
        with pytest.raises(DataError, match=f"p:7: .*{msg}"):
            check_pool_row(data, "p:7", "preferred")
    row, label = check_pool_row({"prompt": "x", "responses": ["a", "b"]}, "p:1", None)  # verifier: no column
    assert label is None


def test_answer_pool_and_verifier_labeler_agree_with_the_label_column():
    rows = answer_pool(generate(30, seed=0), seed=0)
    assert {r["preferred"] for r in rows} == {0, 1}
    pool = [check_pool_row(r, f"x:{i}", None)[0] for i, r in enumerate(rows)]
    label = verifier_labeler(pool, exact_match_reward)
    assert [label(i) for i in range(30)] == [r["preferred"] for r in rows]
    tie = verifier_labeler([PoolRow("q", ("<think></think> 3", "<think></think> 5"), {"answer": "4"}, "x:1")],
                           exact_match_reward)
    assert tie(0) is None


def test_a_raising_labeler_is_retried_then_counted_as_a_failure():
    calls = []

    def flaky(i):
        calls.append(i)
        if len(calls) < 2:
            raise TimeoutError("judge busy")
        return 1

    out = label_with_retries(flaky, 4, retries=1)
    assert out.label == 1 and out.tries == 2 and not out.failed
    dead = label_with_retries(lambda i: 1 / 0, 5, retries=2)
    assert dead.failed and dead.tries == 3 and "ZeroDivisionError" in dead.error
    led = LabelLedger(budget=3)
    led.record(4, out)
    led.record(5, dead)
    led.record(6, label_with_retries(lambda i: None, 6, 0))
    assert (led.spent, led.failures, led.ties, led.calls, led.labelled, led.excluded) == (2, 1, 1, 6, [4], [5, 6])


class CountingColumn(Sequence):
    """A label column that records every index read."""

    def __init__(self, values):
        self.values, self.reads = values, []

    def __len__(self):
        return len(self.values)

    def __getitem__(self, i):
        self.reads.append(i)
        return self.values[i]


def test_labels_are_read_only_for_selected_pairs(tiny_model_dir):
    model, tok, _ = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    rows = answer_pool([{**p, "completion": f"The answer is {p['answer']}"} for p in generate(20, seed=0)])
    records = [PairRecord(r["prompt"][0]["content"], *r["responses"], f"x:{i}") for i, r in enumerate(rows)]
    from leantune.config import DataConfig

    pairs, _ = tokenize_pairs(records, tok, DataConfig(train="x", max_length=64))
    counting = CountingColumn([r["preferred"] for r in rows])
    column = HiddenColumn(counting, "preferred")
    cfg = ActiveConfig(enabled=True, label_budget=6, batch=3, labeler="column")
    active = ActivePairs(pairs, column.reveal, cfg, steps=4, seed=0)
    assert counting.reads == []  # building the pool reads no label
    active.run_round(model, pad_id=tok.pad_token_id or 0, batch_size=8)
    assert len(counting.reads) == 3 == len(set(counting.reads)) and counting.reads == column.revealed
    assert sorted(counting.reads) == sorted(active.ledger.labelled)
    assert all(p.chosen_ids == pairs[i].chosen_ids if counting.values[i] == 0 else p.chosen_ids == pairs[i].rejected_ids
               for p, i in zip(active.train_pairs(), active.ledger.labelled))  # chosen = the revealed winner
    active.run_round(model, pad_id=tok.pad_token_id or 0, batch_size=8)
    assert len(counting.reads) == 6 == len(set(counting.reads)) and active.ledger.spent == 6
    assert not active.due(3)  # budget spent


def test_round_starts_spread_over_steps():
    assert round_starts(64, 8, 64) == [0, 8, 16, 24, 32, 40, 48, 56]
    assert round_starts(5, 8, 3) == [0]
    assert round_starts(9, 3, 3) == [0, 1, 2]


# ----------------------------------------------------------------------------------------------
# The loop


@pytest.fixture(scope="module")
def pool_file(tmp_path_factory):
    rows = answer_pool([{**p, "completion": f"<think>sum</think> {p['answer']}"} for p in generate(24, seed=0)], seed=0)
    return write_jsonl(tmp_path_factory.mktemp("pool") / "pool.jsonl", rows)


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    rows = answer_pairs([{**p, "completion": f"The answer is {p['answer']}"} for p in generate(6, seed=1, split="test")])
    return write_jsonl(tmp_path_factory.mktemp("pool") / "eval.jsonl", rows)


def _recipe(model_dir, pool, out, **active) -> dict:
    return {"model": {"path": str(model_dir)}, "data": {"train": str(pool), "max_length": 64},
            "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
            "loss": {"chunk_size": 16}, "optim": {"lr": 1e-2, "scheduler": "constant"},
            "train": {"steps": 4, "micro_batch_size": 4, "seed": 0, "output_dir": str(out), "progress": False},
            "dpo": {"beta": 0.5, "active": {"enabled": True, "label_budget": 10, "batch": 4, **active}}}


@pytest.mark.parametrize("labeler", ["column", "verifier"])
def test_cli_active_run_spends_the_budget_and_the_ledger_shows_it(tmp_path, tiny_model_dir, pool_file, eval_file,
                                                                   labeler):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(tiny_model_dir, pool_file, tmp_path / "run", labeler=labeler)))
    assert main(["dpo", str(path), f"data.eval={eval_file}", "train.eval_every=2"]) == 0
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    labels = ledger["totals"]["labels"]
    assert labels["spent"] == labels["budget"] == 10 and labels["rounds"] == 3  # 4 + 4 + 2
    assert labels["preferences"] == 10 and labels["ties"] == labels["failures"] == 0
    assert labels["labeler"] == labeler and labels["feature_tokens"] > 0 and ledger["flops"]["active_features"] > 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in rows if isinstance(m.get("step"), int) and "labels_spent" in m]
    assert [m["labels_spent"] for m in steps] == [4, 8, 10, 10]  # rounds before steps 1, 2 and 3 (0-based 0, 1, 2)
    assert [m["labelled_pairs"] for m in steps] == [4, 8, 10, 10]
    assert all(0 <= m["active/bt_eval_accuracy"] <= 1 for m in steps if "active/round" in m)
    # batch_at over the labelled set so far: micro-step 0 of 4 pairs (4), 1 of 8 (4), 2 of 10 (the epoch's short
    # last batch, 2), 3 of 10 (a new epoch, 4)
    assert ledger["totals"]["preference"]["pairs"] == 4 + 4 + 2 + 4


def test_random_select_and_a_failing_judge(tmp_path, tiny_model_dir, pool_file, monkeypatch):
    """A judge from your own module (``package.module:function``) that raises on every third call: with
    ``retries: 0`` each raise is a failure, counted, and another pair is labelled in its place."""
    (tmp_path / "my_judges.py").write_text(
        "calls = []\n"
        "def judge(prompt, a, b, answer, **kw):\n"
        "    calls.append(a)\n"
        "    if len(calls) % 3 == 0:\n"
        "        raise RuntimeError('judge timed out')\n"
        "    return 0 if a.endswith(answer) else 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = _recipe(tiny_model_dir, pool_file, tmp_path / "run", labeler="my_judges:judge", select="random",
                  retries=0)
    result = train_dpo(recipe_from_dict(raw), quiet=True)
    labels = result.ledger["totals"]["labels"]
    assert labels["spent"] == 10 and labels["failures"] >= 1 and labels["calls"] == labels["spent"] + labels["failures"]
    assert "judge timed out" in labels["last_errors"][-1]


def test_active_recipe_rules(tmp_path):
    base = _recipe("m", "pool.jsonl", tmp_path / "r")
    for change, msg in [({"label_budget": 40, "batch": 4}, "more than train.steps"),
                        ({"labeler": "oracle"}, "not 'column', 'verifier'"),
                        ({"labeler": "verifier", "verifier": "format"}, "not a reward with a verifier")]:
        raw = json.loads(json.dumps(base))
        raw["dpo"]["active"].update(change)
        with pytest.raises((RecipeError, ValueError), match=msg):
            recipe_from_dict(raw).require_for("dpo")
    raw = json.loads(json.dumps(base))
    raw["dpo"]["precompute_reference"] = True
    with pytest.raises((RecipeError, ValueError), match="labelled set grows"):
        recipe_from_dict(raw).require_for("dpo")


def test_resume_asks_no_label_twice_and_equals_uninterrupted(tmp_path, tiny_model_dir, pool_file, monkeypatch):
    """A run killed inside its second round (the judge raises KeyboardInterrupt) and resumed from its step-2
    checkpoint asks for the same labels an uninterrupted run asks for, and ends with the same adapter."""
    (tmp_path / "resume_judges.py").write_text(
        "asked = []\n"
        "kill_at = [5]\n"
        "def judge(prompt, a, b, answer, **kw):\n"
        "    if kill_at and len(asked) + 1 == kill_at[0]:\n"
        "        kill_at.pop()\n"
        "        raise KeyboardInterrupt\n"
        "    asked.append(a)\n"
        "    return 0 if a.endswith(answer) else 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    common = {"label_budget": 12, "batch": 4}

    def recipe(out):
        raw = _recipe(tiny_model_dir, pool_file, tmp_path / out, labeler="resume_judges:judge", **common)
        raw["train"].update({"steps": 6, "save_every": 2})
        return recipe_from_dict(raw)

    import resume_judges

    resume_judges.kill_at.clear()
    straight = train_dpo(recipe("a"), quiet=True)
    asked_straight = list(resume_judges.asked)
    resume_judges.asked.clear()
    resume_judges.kill_at.append(5)
    with pytest.raises(KeyboardInterrupt):
        train_dpo(recipe("b"), quiet=True)
    assert len(resume_judges.asked) == 4  # round 0 only; the step-2 checkpoint holds it
    resumed = train_dpo(recipe("b"), resume=True, quiet=True)
    assert resume_judges.asked == asked_straight and len(asked_straight) == 12  # no label asked twice
    assert resumed.ledger["totals"]["labels"]["spent"] == straight.ledger["totals"]["labels"]["spent"] == 12
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, msg=n)
