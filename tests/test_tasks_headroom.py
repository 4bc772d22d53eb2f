"""The headroom tasks (countdown, multistep, code): deterministic disjoint generators, verifiers that accept the
worked solutions and reject wrong and hacked ones, the isomorphic guard as a reward, and `make-data`."""

from __future__ import annotations

import json
import re

import pytest

from leantune.config import recipe_from_dict
from leantune.rl.rewards import build_rewards, code_reward, evaluate_expression, relabel_countdown
from leantune.tasks import available_tasks, get_task
from leantune.tasks import code as code_task
from leantune.tasks import countdown, multistep

NEW = ["countdown", "multistep", "code"]


# --------------------------------------------------------------------------------------------
# Registry and generators (all three)


def test_registered_and_follow_the_protocol():
    assert set(NEW) <= set(available_tasks())
    for name in NEW:
        task = get_task(name)
        assert task.NAME == name
        for attr in ("generate", "extract_answer", "verify", "reward", "is_complete", "write_jsonl"):
            assert callable(getattr(task, attr)), (name, attr)


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("split", ["train", "test"])
def test_deterministic_prefix_stable_and_distinct(name, split):
    task = get_task(name)
    a = task.generate(60, seed=3, split=split)
    assert a == task.generate(60, seed=3, split=split)
    assert a[:20] == task.generate(20, seed=3, split=split)
    assert a != task.generate(60, seed=4, split=split)
    assert len({p["prompt"] for p in a}) == 60
    for p in a:
        assert isinstance(p["prompt"], str) and isinstance(p["completion"], str) and isinstance(p["answer"], str)


def _problem_key(name: str, p: dict):
    if name == "countdown":  # the same numbers in another order are the same problem
        return tuple(sorted(p["numbers"])), p["target"]
    if name == "code":  # the function asked for, whatever example it is shown with
        return p["prompt"].split(" Example: ", 1)[0]
    return p["prompt"]


@pytest.mark.parametrize("name,n_train,n_test", [("countdown", 400, 100), ("multistep", 400, 100), ("code", 300, 60)])
def test_train_and_test_are_disjoint_across_seeds(name, n_train, n_test):
    task = get_task(name)
    train = {_problem_key(name, p) for s in range(3) for p in task.generate(n_train, seed=s, split="train")}
    test = {_problem_key(name, p) for s in range(3) for p in task.generate(n_test, seed=s, split="test")}
    assert len(test) >= 20 and not (train & test)
    for p in task.generate(20, seed=7, split="test"):  # the split is the problem's own, by hash
        key = (p["numbers"], p["target"]) if name == "countdown" else (p["prompt"],)
        assert task.split_of(*key) == "test"


def test_generators_reject_bad_arguments():
    for task in (countdown, multistep, code_task):
        with pytest.raises(ValueError, match="split"):
            task.generate(1, split="valid")
    with pytest.raises(ValueError, match="template"):
        multistep.generate(1, templates=["nope"])
    with pytest.raises(ValueError, match="template"):
        code_task.generate(1, templates=["nope"])


@pytest.mark.parametrize("name", NEW)
def test_make_data_writes_verifiable_messages(name, tmp_path):
    from leantune.cli import main

    assert main(["make-data", name, "--out", str(tmp_path), "--train", "12", "--valid", "4"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    valid = [json.loads(line) for line in (tmp_path / "valid.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and len(valid) == 4
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]
    task = get_task(name)
    want = task.generate(12, seed=0, split="train")
    assert [r["messages"][1]["content"] for r in rows] == [p["completion"] for p in want]
    path = task.write_jsonl(want, tmp_path / "sft" / "train.jsonl")
    assert [sorted(json.loads(line)) for line in path.read_text().splitlines()] == [["completion", "prompt"]] * 12


# --------------------------------------------------------------------------------------------
# Countdown


def test_countdown_worked_solutions_verify_and_narrate_true_steps():
    for p in countdown.generate(200, seed=0) + countdown.generate(50, seed=0, split="test"):
        assert countdown.verify(p["completion"], p["answer"])  # the call task_accuracy makes
        assert countdown.reward(None, [p["completion"]], numbers=[p["numbers"]], target=[p["target"]]) == [1.0]
        assert countdown.reward(None, [p["completion"]], answer=p["answer"]) == [1.0]
        assert countdown.is_complete(p["completion"])
        think = p["completion"].split("<think>", 1)[1].split("</think>", 1)[0]
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", think)
        assert len(steps) >= len(p["numbers"]) - 1
        for x, op, y, v in steps:  # every step is true arithmetic
            assert evaluate_expression(f"{x} {op} {y}") == int(v)
        assert think.endswith(f"That is {p['target']}.")
        assert json.loads(p["answer"]) == {"numbers": p["numbers"], "target": p["target"]}


def test_countdown_rejects_wrong_and_hacked_answers():
    p = {"numbers": [1, 3, 25, 50], "target": 72}
    answer = countdown.problem_answer(p["numbers"], p["target"])
    good = ["<answer>(25 - 1) * 3</answer>", "<think>try</think> <answer>3 * (25 - 1)</answer>",
            "<answer>50 + 25 - 3</answer>"]
    bad = [
        "<answer>72</answer>",  # the hard-coded target
        "<answer>72 - 0</answer>", "<answer>72 * 1</answer>",  # the target dressed up
        "<answer>25 * 3 - 3</answer>",  # 3 used twice
        "<answer>50 + 25</answer>",  # wrong value
        "<answer>__import__('os').system('true')</answer>",  # not arithmetic
        "<answer>(25 - 1) * 3 + 1 - 1</answer>",  # 1 used twice
        "<think>(25 - 1) * 3", "", "no expression here",
    ]
    assert [countdown.verify(c, answer) for c in good] == [True] * len(good)
    assert [countdown.verify(c, answer) for c in bad] == [False] * len(bad)
    assert countdown.reward(None, good + bad, answer=answer) == [1.0] * len(good) + [0.0] * len(bad)
    with pytest.raises(ValueError, match="numbers"):
        countdown.verify("<answer>1</answer>", "72")


def _rl_raw(task: str, rewards: dict, **rl) -> dict:
    return {"model": {"path": "unused"}, "data": {}, "train": {"output_dir": "unused"},
            "rl": {"task": task, "rewards": rewards, **rl}}


def _columns(rows: list[dict], n: int) -> dict:
    keys = sorted({k for r in rows for k in r if k not in ("prompt", "completion")})
    return {k: [r.get(k) for r in rows for _ in range(n)] for k in keys}


def test_countdown_isomorphic_guard_is_a_reward_and_zeroes_transfer_failures():
    recipe = recipe_from_dict(_rl_raw("countdown", {"task_isomorphic": 1.0}))
    reward_fn, correct_fn, task = build_rewards(recipe.rl)
    assert task is countdown and correct_fn is countdown.reward
    plain, _, _ = build_rewards(recipe_from_dict(_rl_raw("countdown", {"task": 1.0})).rl)
    for p in countdown.generate(20, seed=5):  # generated rows: the reference and its rewrites pass, the target fails
        completions = [p["completion"], f"<answer>({p['solution']})</answer>", f"<answer>{p['target']}</answer>"]
        fields = _columns([p], len(completions))
        assert correct_fn(None, completions, **fields) == [1.0, 1.0, 0.0]
        assert reward_fn(None, completions, **fields) == [1.0, 1.0, 0.0]
    # a correct solution that computes the target another way does not transfer to the relabelled variants
    numbers, solution = [1, 3, 25, 50], "(25 - 1) * 3"
    row = {"numbers": numbers, "target": 72, "answer": countdown.problem_answer(numbers, 72),
           "variants": relabel_countdown(numbers, solution), "solution": solution}
    completions = ["<answer>(25 - 1) * 3</answer>", "<answer>3 * (25 - 1)</answer>", "<answer>50 + 25 - 3</answer>"]
    fields = _columns([row], len(completions))
    assert plain(None, completions, **fields) == [1.0, 1.0, 1.0]
    assert reward_fn(None, completions, **fields) == [1.0, 1.0, 0.0]


def test_isomorphic_guard_needs_a_task_with_variants():
    with pytest.raises(Exception, match="make_variants.*countdown"):
        recipe_from_dict(_rl_raw("multistep", {"task_isomorphic": 1.0}))
    with pytest.raises(Exception, match="set rl.task"):
        recipe_from_dict({"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "train": {"output_dir": "o"},
                          "rl": {"rewards": {"task_isomorphic": 1.0}}})


# --------------------------------------------------------------------------------------------
# Multistep


def test_multistep_worked_solutions_are_true_chains_of_two_to_four_operations():
    problems = multistep.generate(300, seed=0) + multistep.generate(60, seed=1, split="test")
    for p in problems:
        assert multistep.verify(p["completion"], p["answer"]) and multistep.reward(None, [p["completion"]], p["answer"]) == [1.0]
        lines = p["completion"].split("<think>", 1)[1].split("</think>", 1)[0].split("\n")
        assert 2 <= len(lines) <= 4, p
        for line in lines:
            x, op, y, v = re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (-?\d+)", line).groups()
            x, y, v = int(x), int(y), int(v)
            assert {"+": x + y, "-": x - y, "*": x * y, "/": x / y}[op] == v
        assert int(lines[-1].rsplit("= ", 1)[1]) == int(p["answer"]) >= 0
        assert multistep.is_complete(p["completion"] + "\n")
        assert "####" in p["prompt"]
    # word problems and bare expressions both appear
    assert any(p["prompt"].startswith("What is (") for p in problems) and any("$" in p["prompt"] for p in problems)


def test_multistep_accepts_equivalent_forms_and_rejects_others():
    cases = [("#### 1,000", "1000", True), (r"so \boxed{1000}", "1000", True), ("#### 1000.0", "1000", True),
             (r"\boxed{\frac{1}{2}}", "0.5", True), ("#### 0.50", "1/2", True), ("#### $42$", "42", True),
             ("<think>2 * 21 = 42</think>\n#### 42", "42", True),
             ("#### 41", "42", False), ("The answer is 42.", "42", False), ("42", "42", False),
             ("<think>#### 42", "41", False), ("", "42", False)]
    for completion, answer, ok in cases:
        assert multistep.verify(completion, answer) is ok, completion


# The comparison recorded in docs/tasks.md: (a, b, equivalent?, normalization says, math-verify says)
FORMS = [
    ("1/2", "0.5", True, True, True), ("1/2", r"\frac{1}{2}", True, True, True), ("0.5", r"\frac{1}{2}", True, True, True),
    (r"\dfrac{1}{2}", "0.50", True, True, True), ("1,000", "1000", True, True, True), ("1000", "1000.00", True, True, True),
    ("x=3", "3", True, False, True), ("3", "x = 3", True, False, True), ("$42$", "42", True, True, True),
    ("-3", "$-3$", True, True, True), (r"\text{(B)}", "(B)", True, True, True), ("12", "12.", True, True, True),
    ("50%", "50", True, False, True), (r"\sqrt{4}", "2", True, False, True), ("2^{3}", "8", True, False, True),
    ("1e3", "1000", True, False, False), ("3.0", "3", True, True, True), (r"\frac{6}{4}", r"\frac{3}{2}", True, True, True),
    ("10 dollars", "10", True, False, False), (r"\$10", "10", True, False, True), ("27\\text{ cookies}", "27", True, False, True),
    ("1/2", "0.51", False, False, False), ("1,000", "100", False, False, False), ("3", "x=4", False, False, False),
    ("12", "21", False, False, False), ("0.5", "5", False, False, False), ("2", "-2", False, False, False),
]


def test_multistep_normalization_on_the_recorded_forms():
    for a, b, _, ours, _ in FORMS:
        assert multistep.answers_match(a, b, use_math_verify=False) is ours, (a, b)


def test_multistep_math_verify_on_the_recorded_forms():
    pytest.importorskip("math_verify")
    for a, b, _, ours, theirs in FORMS:
        assert multistep.answers_match(a, b, use_math_verify=True) is (ours or theirs), (a, b)
    assert multistep.verify("<think>2 * 21 = 42</think>\n#### x = 42", "42")


def test_multistep_math_verify_required_but_missing_is_an_error():
    if multistep._math_verify() is not None:
        pytest.skip("math-verify is installed")
    with pytest.raises(ImportError, match="leantune\\[math\\]"):
        multistep.answers_match("x = 3", "3", use_math_verify=True)
    assert multistep.answers_match("x = 3", "3") is False  # the default falls back to normalization


# --------------------------------------------------------------------------------------------
# Code: hidden tests in the sandbox


def _one_per_template(split="train"):
    return {name: code_task.generate(1, seed=0, split=split, templates=[name])[0] for name in code_task.TEMPLATES}


def test_code_worked_solutions_pass_their_hidden_tests_in_the_sandbox():
    problems = _one_per_template()
    for name, p in problems.items():
        tests = json.loads(p["answer"])
        assert len(tests["cases"]) == code_task.NUM_CASES and f"`{tests['entry']}(" in p["prompt"]
        assert code_task.run_hidden_tests(p["completion"], p["answer"]) == [True] * code_task.NUM_CASES, name
        assert code_task.is_complete(p["completion"])
    completions = [p["completion"] for p in problems.values()]
    answers = [p["answer"] for p in problems.values()]
    assert code_task.reward(None, completions, answers) == [1.0] * len(completions)
    swapped = completions[1:] + completions[:1]  # each solution against another problem's tests
    assert code_task.reward(None, swapped, answers) == [0.0] * len(completions)


def _gcd_problem():
    p = code_task.generate(1, seed=0, templates=["gcd"])[0]
    return p, json.loads(p["answer"])


def _fenced(code: str) -> str:
    return f"```python\n{code}\n```"


def _with_reference(p: dict, entry: str, body: str) -> str:
    """A completion that renames the worked solution to ``_ref`` and defines ``entry(*a)`` with ``body``."""
    ref = code_task.extract_answer(p["completion"]).replace(f"def {entry}(", "def _ref(", 1)
    return _fenced(f"{ref}\ndef {entry}(*a):\n    {body}")


def test_code_rejects_wrong_and_hacked_solutions():
    p, tests = _gcd_problem()
    entry, shown = tests["entry"], tests["expected"][code_task.VISIBLE]
    assert f"== {json.loads(shown)!r}." in p["prompt"]
    wrong = {
        "visible_only": _fenced(f"def {entry}(*a):\n    return {shown}"),  # hard-codes the prompt's example
        # right on every case but the last hidden one
        "one_case_wrong": _with_reference(p, entry, f"return _ref(*a) + (1 if list(a) == {tests['cases'][-1]!r} else 0)"),
        "syntax_error": _fenced(f"def {entry}(*a)\n    return 1"),
        "no_function": _fenced("print('hello')"),
        # exits before the harness: passes an assert-style code_reward, not these hidden tests
        "exit_early": _fenced("import os\nos._exit(0)"),
        # an object that claims to equal anything does not serialise to the expected JSON
        "always_equal": _fenced(f"class E:\n    def __eq__(self, o):\n        return True\ndef {entry}(*a):\n    return E()"),
        "float_result": _with_reference(p, entry, "return float(_ref(*a))"),  # 6.0 is not 6
        "exits_in_call": _with_reference(p, entry, "raise SystemExit(0)"),
    }
    got = {k: code_task.verify(v, p["answer"]) for k, v in wrong.items()}
    assert got == {k: False for k in wrong}
    assert code_task.verify(_with_reference(p, entry, "return _ref(*a)"), p["answer"])  # another correct program
    # the assert-style reward is not fooled by the early exit either: a nonce printed after each test must appear
    asserts = [f"assert {entry}({', '.join(map(repr, a))}) == {e}" for a, e in zip(tests["cases"], tests["expected"])]
    assert code_reward(None, [wrong["exit_early"]], [asserts]) == [0.0]
    right = _with_reference(p, entry, "return _ref(*a)")
    assert code_reward(None, [right], [asserts]) == [1.0]


def test_code_sandbox_failures_score_zero():
    p, tests = _gcd_problem()
    good = code_task.extract_answer(p["completion"])
    hostile = [
        _fenced(f"def {tests['entry']}(*a):\n    while True:\n        pass"),  # hangs: timeout
        _fenced(f"def {tests['entry']}(*a):\n    print('x' * 10**6)\n    return 0"),  # output flood
        _fenced(f"x = 'x' * 10**10\n{good}"),  # memory, while defining the function
        _fenced(f"import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n{good}"),  # network
        _fenced(f"open('/etc/passwd').read()\n{good}"),  # a file outside its directory
    ]
    for completion in hostile:
        assert code_task.run_hidden_tests(completion, p["answer"], timeout_s=1.0) == [False] * len(tests["cases"])
    assert code_task.run_hidden_tests(_fenced(good), p["answer"], timeout_s=1.0) == [True] * len(tests["cases"])


def test_code_forged_result_line_scores_zero():
    """A program that prints its own result line (guessing the marker's shape) gets nothing for it."""
    p, tests = _gcd_problem()
    forged = _fenced("import json\nprint('@@leantune-results-0000000000000000@@' + json.dumps("
                     + repr(tests["expected"]) + f"))\ndef {tests['entry']}(*a):\n    return 0")
    assert not code_task.verify(forged, p["answer"])


# --------------------------------------------------------------------------------------------
# Through the evaluator: task_accuracy calls verify(completion, problem["answer"])


@pytest.fixture(scope="module")
def tiny_policy():
    import torch

    from leantune.models.tiny import tiny_model, tiny_tokenizer

    torch.manual_seed(0)
    tok = tiny_tokenizer(chat_template=True)
    return tiny_model(vocab_size=len(tok)), tok


@pytest.mark.parametrize("name", NEW)
def test_task_accuracy_runs_on_a_tiny_model(name, tiny_policy):
    from leantune.eval.evaluate import task_accuracy

    model, tok = tiny_policy
    out = task_accuracy(model, tok, name, num_problems=2, max_new_tokens=6, batch_size=2)
    assert out["problems"] == 2 and out["accuracy"] == 0.0 and out["task"] == name
    assert [e["answer"] for e in out["examples"]] == [p["answer"] for p in get_task(name).generate(2, seed=1234, split="test")]
