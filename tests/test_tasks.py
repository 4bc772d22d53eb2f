"""The bundled verifiable tasks: deterministic generation, disjoint splits, a strict verifier."""

from __future__ import annotations

import json
import re

import pytest

from leantune.tasks import UnknownTaskError, available_tasks, get_task
from leantune.tasks import arithmetic as ar


def _key(p: dict) -> str:
    return p["prompt"]


# --------------------------------------------------------------------------------------------
# Registry


def test_get_task_returns_module():
    task = get_task("arithmetic")
    assert task is ar
    for attr in ("generate", "extract_answer", "verify", "reward", "write_jsonl"):
        assert callable(getattr(task, attr))
    assert get_task(" Arithmetic ") is ar


def test_unknown_task_lists_available():
    with pytest.raises(UnknownTaskError) as e:
        get_task("no-such-task")
    msg = str(e.value)
    assert "no-such-task" in msg and "arithmetic" in msg
    assert isinstance(e.value, ValueError)
    assert {"addition", "arithmetic"} <= set(available_tasks()) and "addition" in msg


# --------------------------------------------------------------------------------------------
# Generation


@pytest.mark.parametrize("split", ["train", "test"])
def test_deterministic(split):
    a = ar.generate(200, seed=3, split=split)
    b = ar.generate(200, seed=3, split=split)
    assert a == b
    assert ar.generate(200, seed=4, split=split) != a


def test_prefix_stable_in_n():
    assert ar.generate(50, seed=1) == ar.generate(100, seed=1)[:50]


def test_default_mixes_both_operators():
    prompts = [p["prompt"] for p in ar.generate(100, seed=0)]
    assert any(" + " in p for p in prompts) and any(" - " in p for p in prompts)


def test_distinct_within_call():
    probs = ar.generate(1000, seed=0)
    assert len({_key(p) for p in probs}) == 1000


@pytest.mark.parametrize("digits,ops", [(2, ("+", "-")), (2, ("+",)), (3, ("+", "-")), (1, ("-",))])
def test_train_test_disjoint(digits, ops):
    n_train, n_test = (500, 300) if digits > 1 else (30, 5)
    train = {_key(p) for s in range(3) for p in ar.generate(n_train, seed=s, split="train", digits=digits, ops=ops)}
    test = {_key(p) for s in range(3) for p in ar.generate(n_test, seed=s, split="test", digits=digits, ops=ops)}
    assert train and test and not (train & test)


def test_split_assignment_is_by_problem_and_roughly_balanced():
    every = [(a, op, b) for a in range(10, 100) for b in range(10, 100) for op in ar.OPS]
    test_share = sum(ar.split_of(*k) == "test" for k in every) / len(every)
    assert abs(test_share - ar.TEST_PERCENT / 100) < 0.02
    for p in ar.generate(100, seed=0, split="test", ops=ar.OPS):
        a, op, b = re.match(r"What is (\d+) ([+-]) (\d+)\?", p["prompt"]).groups()
        assert ar.split_of(int(a), op, int(b)) == "test"


@pytest.mark.parametrize("digits,ops", [(1, ("+", "-")), (2, ("+", "-")), (3, ("+", "-")), (4, ("+",))])
def test_problem_shape_and_operands(digits, ops):
    for p in ar.generate(200 if digits > 1 else 50, seed=7, digits=digits, ops=ops):
        assert set(p) == {"prompt", "completion", "answer"}
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", p["prompt"]).groups()
        a, b = int(a), int(b)
        assert op in ops
        if digits > 1:
            assert len(str(a)) == len(str(b)) == digits
        assert int(p["answer"]) == (a + b if op == "+" else a - b) >= 0
        assert p["completion"].startswith(f"<think>{a} {op} {b}: ")
        assert p["completion"].count("<think>") == p["completion"].count("</think>") == 1


@pytest.mark.parametrize("digits", [1, 2, 3, 4])
def test_every_completion_verifies_against_its_own_answer(digits):
    probs = ar.generate(300 if digits > 1 else 40, seed=11, split="train", digits=digits, ops=ar.OPS)
    probs += ar.generate(100 if digits > 1 else 10, seed=11, split="test", digits=digits, ops=ar.OPS)
    for p in probs:
        assert ar.verify(p["completion"], p["answer"]), p
        assert ar.extract_answer(p["completion"]) == p["answer"]


def test_worked_steps_are_correct_arithmetic():
    """Every 'x + y (+ c) = s' / 'x - c - y = s' step in every thinking span is true."""
    for p in ar.generate(400, seed=2, digits=3, ops=ar.OPS):
        think = p["completion"].split("<think>")[1].split("</think>")[0]
        _, steps = think.split(": ", 1)
        for step in steps.split("; "):
            expr, rest = step.split(" = ")
            value = int(rest.split(",")[0])
            assert eval(expr) == value, (p, step)  # noqa: S307 -- digits and +/- only


def test_worked_solution_examples():
    assert ar.worked_solution(47, "+", 38) == "<think>47 + 38: 7 + 8 = 15, carry 1; 4 + 3 + 1 = 8</think> 85"
    assert ar.worked_solution(83, "-", 47) == "<think>83 - 47: 13 - 7 = 6, borrow 1; 8 - 1 - 4 = 3</think> 36"
    assert ar.worked_solution(99, "+", 99) == "<think>99 + 99: 9 + 9 = 18, carry 1; 9 + 9 + 1 = 19</think> 198"
    assert ar.worked_solution(100, "-", 1).endswith("</think> 99")
    with pytest.raises(ValueError):
        ar.worked_solution(3, "-", 5)
    with pytest.raises(ValueError):
        ar.worked_solution(3, "*", 5)


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        ar.generate(1, split="validation")
    with pytest.raises(ValueError, match="ops"):
        ar.generate(1, ops=["*"])
    with pytest.raises(ValueError, match="distinct"):
        ar.generate(1000, digits=1, split="test")  # far fewer 1-digit test problems exist


# --------------------------------------------------------------------------------------------
# Answers and verification


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("<think>47 + 38: 7 + 8 = 15, carry 1; 4 + 3 + 1 = 8</think> 85", "85"),
        ("<think>...</think>85", "85"),
        ("<think>...</think>\n\n  The answer is 85.", "85"),
        ("<think>...</think> **85**!", "85"),
        ("<think>...</think> 085", "85"),
        ("<think>...</think> 1,234", "1234"),
        ("<think>...</think> -7", "-7"),
        ("<think>a</think> 12 <think>b</think> 13", "13"),  # the last closing tag counts
        ("47 + 38 = 85", "85"),  # no thinking span: last integer
        ("The answer is 85.", "85"),
        ("  85  ", "85"),
        ("<think>47 + 38: 7 + 8 = 15, carry 1", None),  # cut off while thinking
        ("<think>...</think>", None),
        ("<think>...</think> eighty-five", None),
        ("", None),
        ("no number", None),
    ],
)
def test_extract_answer(completion, expected):
    assert ar.extract_answer(completion) == expected


def test_extract_answer_non_string():
    assert ar.extract_answer(None) is None  # type: ignore[arg-type]


def test_verify_right_wrong_malformed():
    p = ar.make_problem(47, "+", 38)
    assert ar.verify(p["completion"], "85")
    assert ar.verify(p["completion"], 85)
    assert ar.verify("<think>x</think> 85.", " 85 ")
    assert not ar.verify("<think>47 + 38: 7 + 8 = 15, carry 1; 4 + 3 + 1 = 8</think> 84", "85")
    assert not ar.verify("<think>the answer is 85", "85")  # unclosed thinking span
    assert not ar.verify("<think>85</think> I am not sure", "85")  # answer only inside thinking
    assert not ar.verify("", "85")
    assert not ar.verify("85", "not a number")


def test_reward():
    probs = ar.generate(4, seed=0, split="test")
    prompts = [p["prompt"] for p in probs]
    answers = [p["answer"] for p in probs]
    good = [p["completion"] for p in probs]
    assert ar.reward(prompts, good, answers) == [1.0] * 4
    bad = [c.rsplit(" ", 1)[0] + " -1" for c in good]
    assert ar.reward(prompts, bad, answers) == [0.0] * 4
    chat = [[{"role": "assistant", "content": c}] for c in good]
    assert ar.reward(prompts, chat, answer=answers, extra_column=[1, 2, 3, 4]) == [1.0] * 4
    with pytest.raises(ValueError):
        ar.reward(prompts, good, answers[:2])


# --------------------------------------------------------------------------------------------
# Files


def test_write_jsonl(tmp_path):
    probs = ar.generate(10, seed=0)
    path = ar.write_jsonl(probs, tmp_path / "d" / "train.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"prompt": p["prompt"], "completion": p["completion"]} for p in probs]
    path2 = ar.write_jsonl(probs, tmp_path / "all.jsonl", fields=("prompt", "completion", "answer"))
    assert json.loads(path2.read_text().splitlines()[0]) == probs[0]
    with pytest.raises(KeyError):
        ar.write_jsonl([{"prompt": "x"}], tmp_path / "bad.jsonl")


def test_addition_task_is_addition_only_and_disjoint():
    from leantune.tasks import addition

    train, test = addition.generate(200, seed=0), addition.generate(50, seed=0, split="test")
    assert all(" + " in p["prompt"] and " - " not in p["prompt"] for p in train + test)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
    assert all(addition.verify(p["completion"], p["answer"]) for p in train)
