"""Countdown (the task of arXiv 2512.07611): reach a target with + - * / over given numbers.

Every problem is a dict with

* ``prompt``: the numbers, the target and the rules;
* ``completion``: a worked solution for SFT: a short search narrative in a thinking span (sometimes a
  false start, then the reference computation step by step), then ``<answer>expression</answer>``;
* ``answer``: the problem as a JSON string, ``'{"numbers": [...], "target": t}'``, so ``verify(completion,
  answer)`` works wherever only the ``answer`` column travels (``leantune.eval.evaluate.task_accuracy``);
* ``numbers``, ``target``: the same, as columns for :func:`reward`;
* ``solution``: a reference expression using every number once, all intermediate results positive integers;
* ``variants``: relabelled copies of the problem (:func:`leantune.rl.rewards.relabel_countdown`) for the
  isomorphic-variant guard of arXiv 2604.15149 (:data:`make_variants`, the ``task_isomorphic`` reward).

The verifier is :func:`leantune.rl.rewards.countdown_check`, an ``ast`` evaluator (never ``eval``): only
integer literals that are among the given numbers, each at most once, + - * / and parentheses, exact
rational arithmetic. A hard-coded target (``<answer>72</answer>``, ``72 - 0``) fails it.

Train and test problems are disjoint by construction: a problem's split is fixed by a hash of its sorted
numbers and its target (:func:`split_of`), as in :mod:`leantune.tasks.arithmetic`.

>>> p = generate(1, seed=0)[0]
>>> verify(p["completion"], p["answer"]), verify("<answer>" + p["solution"] + "</answer>", p)
(True, True)
>>> verify(f"<answer>{p['target']}</answer>", p["answer"])  # the hard-coded target
False
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from leantune.rl.rewards import (
    _per_sample,
    countdown_check,
    countdown_reward,
    countdown_variants,
    evaluate_expression,
    extract_expression,
    relabel_countdown,
)
from leantune.tasks import completion_text

NAME = "countdown"
SPLITS = ("train", "test")
TEST_PERCENT = 20
"""Share (in percent) of all problems that belong to the test split."""

THINK_START, THINK_END = "<think>", "</think>"
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


# --------------------------------------------------------------------------------------------
# Problems


def split_of(numbers: Sequence[int], target: int) -> str:
    """The split of a problem, fixed by a hash of its sorted numbers and its target (order-free).

    >>> split_of([1, 3, 25, 50], 72) == split_of([50, 25, 3, 1], 72)
    True
    """
    key = f"{NAME}:{sorted(int(n) for n in numbers)}:{int(target)}"
    digest = hashlib.sha256(key.encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT else "train"


def _random_solution(rng: random.Random, numbers: list[int]) -> ast.expr:
    """Combine all ``numbers`` in random order with random operations, keeping every intermediate result a
    positive integer (the classic Countdown rule), so the reference solution reads naturally."""
    items = [(ast.Constant(n), n) for n in numbers]
    rng.shuffle(items)
    while len(items) > 1:
        (a, x), (b, y) = items.pop(), items.pop()
        if x < y:
            (a, x), (b, y) = (b, y), (a, x)
        ops = [ast.Add, ast.Mult] + ([ast.Sub] if x > y else []) + ([ast.Div] if y > 1 and x % y == 0 else [])
        op = rng.choice(ops)
        value = {ast.Add: x + y, ast.Mult: x * y, ast.Sub: x - y, ast.Div: x // y if y else 0}[op]
        items.insert(rng.randrange(len(items) + 1), (ast.BinOp(left=a, op=op(), right=b), value))
    return items[0][0]


def solution_steps(solution: str) -> list[str]:
    """The reference computation as steps ``"x op y = v"``, innermost first (post-order over the ``ast``).

    >>> solution_steps("(25 - 1) * 3 + 50")
    ['25 - 1 = 24', '24 * 3 = 72', '72 + 50 = 122']
    """
    steps: list[str] = []

    def walk(node) -> int:
        if isinstance(node, ast.Constant):
            return node.value
        left, right = walk(node.left), walk(node.right)
        value = int(evaluate_expression(f"{left} {_OPS[type(node.op)]} {right}"))
        steps.append(f"{left} {_OPS[type(node.op)]} {right} = {value}")
        return value

    walk(ast.parse(solution, mode="eval").body)
    return steps


def _false_start(rng: random.Random, numbers: list[int], target: int) -> str | None:
    """One pair of numbers combined into a value that is not the target: ``"50 * 3 = 150"``, or ``None``."""
    for _ in range(10):
        x, y = rng.sample(numbers, 2)
        x, y = max(x, y), min(x, y)
        op = rng.choice(["+", "*"] + (["-"] if x > y else []))
        value = int(evaluate_expression(f"{x} {op} {y}"))
        if value != target:
            return f"{x} {op} {y} = {value}"
    return None


def worked_solution(numbers: list[int], target: int, solution: str, rng: random.Random) -> str:
    """The SFT completion: a short search in a thinking span (half the time a false start first), the
    reference computation step by step, then ``<answer>solution</answer>``.

    >>> worked_solution([1, 3, 25, 50], 122, "(25 - 1) * 3 + 50", random.Random(1))
    '<think>Target 122 from 1, 3, 25, 50. Try 3 + 1 = 4: not it, back up. 25 - 1 = 24, 24 * 3 = 72, 72 + 50 = 122. That is 122.</think> <answer>(25 - 1) * 3 + 50</answer>'
    """
    opening = f"Target {target} from {', '.join(map(str, numbers))}."
    false = _false_start(rng, numbers, target) if rng.random() < 0.5 else None
    search = f" Try {false}: not it, back up." if false else ""
    return (f"{THINK_START}{opening}{search} {', '.join(solution_steps(solution))}. That is {target}.{THINK_END} "
            f"<answer>{solution}</answer>")


def problem_answer(numbers: Sequence[int], target) -> str:
    """The ``answer`` column: the problem as a JSON string.

    >>> problem_answer([1, 3, 25, 50], 72)
    '{"numbers": [1, 3, 25, 50], "target": 72}'
    """
    return json.dumps({"numbers": [int(n) for n in numbers], "target": target})


def countdown_problems(
    n: int, seed: int = 0, *, count: int = 4, max_number: int = 99, max_target: int = 999, variants: int = 2,
    split: str | None = None,
) -> list[dict]:
    """``n`` solvable Countdown problems, deterministic in ``seed`` (the first ``n`` of a longer call are the same).

    Each problem: ``prompt``; ``numbers`` (``count`` integers in 1..``max_number``); ``target`` (an integer
    in 1..``max_target`` that is not itself one of the numbers); ``solution`` (a reference expression using
    every number once, all intermediate results positive integers); ``variants`` (:func:`relabel_countdown`,
    for :func:`with_isomorphic_variants`); ``completion`` (:func:`worked_solution`) and ``answer``
    (:func:`problem_answer`). ``split``: keep only problems of that split (:func:`split_of`), each problem
    once; ``None`` keeps every problem drawn.

    >>> p = countdown_problems(1, seed=0)[0]
    >>> sorted(p)
    ['answer', 'completion', 'numbers', 'prompt', 'solution', 'target', 'variants']
    >>> countdown_check(p["solution"], p["numbers"], p["target"], use_all=True)
    True
    >>> countdown_problems(3, seed=5)[:2] == countdown_problems(2, seed=5)
    True
    """
    if n < 0 or count < 2 or max_number < 1 or max_target < 1:
        raise ValueError(f"need n >= 0, count >= 2 and max_number, max_target >= 1; got n={n}, count={count}, "
                         f"max_number={max_number}, max_target={max_target}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = random.Random(f"countdown|{seed}|{count}|{max_number}|{max_target}")
    out: list[dict] = []
    seen: set[tuple] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * (n + 10):
            raise ValueError(f"could not generate {n} problems with count={count}, max_number={max_number}, max_target={max_target}")
        numbers = [rng.randint(1, max_number) for _ in range(count)]
        solution = ast.unparse(_random_solution(rng, numbers))
        value = evaluate_expression(solution)
        if value.denominator != 1 or not 1 <= value <= max_target or value in numbers:
            continue
        target = int(value)
        if split is not None:
            key = (tuple(sorted(numbers)), target)
            if key in seen or split_of(numbers, target) != split:
                continue
            seen.add(key)
        out.append(
            {
                "prompt": (
                    f"Using the numbers {numbers}, create an expression that equals {target}. You may use "
                    "+, -, *, / and parentheses, and each number at most once. Think in <think> </think> "
                    "and give the final expression in <answer> </answer>, e.g. <answer>(1 + 2) * 3</answer>."
                ),
                "completion": worked_solution(numbers, target, solution, rng),
                "answer": problem_answer(numbers, target),
                "numbers": numbers,
                "target": target,
                "solution": solution,
                "variants": relabel_countdown(numbers, solution, variants, seed=rng.randrange(2**32), max_number=max_number),
            }
        )
    return out


def generate(n: int, seed: int = 0, split: str = "train", *, count: int = 4) -> list[dict]:
    """``n`` distinct problems of ``split`` (train/test disjoint by problem hash), deterministic in the arguments.

    >>> [p["prompt"] for p in generate(3, seed=2, split="test")] == [p["prompt"] for p in generate(3, seed=2, split="test")]
    True
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return countdown_problems(n, seed=seed, count=count, split=split)


# --------------------------------------------------------------------------------------------
# Answers, verification and reward


def extract_answer(text: str) -> str | None:
    """The completion's final expression (``<answer>...</answer>``, else the last line after ``</think>``).

    >>> extract_answer("<think>25 - 1 = 24</think> <answer>(25 - 1) * 3</answer>")
    '(25 - 1) * 3'
    """
    return extract_expression(completion_text(text))


def _problem(answer) -> tuple[list[int], object]:
    """(numbers, target) from an ``answer`` JSON string or a problem dict."""
    if isinstance(answer, str):
        try:
            answer = json.loads(answer)
        except json.JSONDecodeError:
            raise ValueError(f"countdown answer must be a JSON object with numbers and target, got {answer!r}") from None
    if not isinstance(answer, dict) or "numbers" not in answer or "target" not in answer:
        raise ValueError(f"countdown answer must hold 'numbers' and 'target', got {answer!r}")
    return [int(x) for x in answer["numbers"]], answer["target"]


def verify(completion, answer) -> bool:
    """Whether ``completion`` solves the problem: ``answer`` is the problem's ``answer`` JSON string (or the
    problem dict); each number at most once, exact arithmetic.

    >>> verify("<answer>(25 - 1) * 3</answer>", '{"numbers": [1, 3, 25, 50], "target": 72}')
    True
    >>> verify("<answer>25 * 3 - 3</answer>", {"numbers": [1, 3, 25, 50], "target": 72})  # 3 used twice
    False
    """
    numbers, target = _problem(answer)
    return countdown_check(extract_answer(completion), numbers, target)


def reward(prompts, completions, numbers=None, target=None, answer=None, **kw) -> list[float]:
    """1.0 if a completion solves its problem, else 0.0 (TRL reward signature). The problem comes from the
    ``numbers`` and ``target`` columns when given (the isomorphic guard's variants override them), else from
    the ``answer`` column.

    >>> reward(None, ["<answer>(25 - 1) * 3</answer>", "<answer>72</answer>"], answer='{"numbers": [1, 3, 25, 50], "target": 72}')
    [1.0, 0.0]
    """
    if numbers is None or target is None:
        if answer is None:
            raise ValueError("countdown reward needs the numbers and target columns, or the answer column")
        problems = [_problem(a) for a in _per_sample(answer, len(completions), "answer", is_single=lambda v: isinstance(v, (str, dict)))]
        numbers, target = [p[0] for p in problems], [p[1] for p in problems]
    return countdown_reward(prompts, completions, numbers, target)


make_variants = countdown_variants
"""The isomorphic-variant builder for :func:`leantune.rl.rewards.with_isomorphic_variants` (the
``task_isomorphic`` reward): the completion's expression re-instantiated on each declared variant."""


def is_complete(text: str) -> bool:
    """Generation can stop once the answer span is closed.

    >>> is_complete("<think>...</think> <answer>1 + 2</answer>"), is_complete("<answer>1 + ")
    (True, False)
    """
    return "</answer>" in text


# --------------------------------------------------------------------------------------------
# Files


def write_jsonl(problems: Iterable[dict], path: str | Path, fields: Sequence[str] = ("prompt", "completion")) -> Path:
    """Write problems as JSONL with only ``fields`` (default ``{prompt, completion}``, the SFT format)."""
    from leantune.tasks.arithmetic import write_jsonl as _write

    return _write(problems, path, fields)
