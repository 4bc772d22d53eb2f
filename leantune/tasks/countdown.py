"""Countdown (the task of arXiv 2512.07611): reach a target with + - * / over given numbers.

Problems come with a reference solution and isomorphic variants (relabelled numbers, for the guard of
arXiv 2604.15149, :func:`leantune.rl.rewards.with_isomorphic_variants`); the verifier is
:func:`leantune.rl.rewards.countdown_check` (an ``ast`` evaluator, never ``eval``).

>>> p = generate(1, seed=0)[0]
>>> verify("<answer>" + p["solution"] + "</answer>", p)
True
"""

from __future__ import annotations

import ast
import random

from leantune.rl.rewards import (
    countdown_check,
    countdown_reward,
    evaluate_expression,
    extract_expression,
    relabel_countdown,
)

NAME = "countdown"


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


def countdown_problems(
    n: int, seed: int = 0, *, count: int = 4, max_number: int = 99, max_target: int = 999, variants: int = 2
) -> list[dict]:
    """``n`` solvable Countdown problems, deterministic in ``seed`` (the first ``n`` of a longer call are the same).

    Each problem: ``prompt``; ``numbers`` (``count`` integers in 1..``max_number``); ``target`` (an integer
    in 1..``max_target`` that is not itself one of the numbers); ``solution`` (a reference expression using
    every number once, all intermediate results positive integers); ``variants`` (:func:`relabel_countdown`,
    for :func:`with_isomorphic_variants`).

    >>> p = countdown_problems(1, seed=0)[0]
    >>> sorted(p)
    ['numbers', 'prompt', 'solution', 'target', 'variants']
    >>> from leantune.rl.rewards import countdown_check
    >>> countdown_check(p["solution"], p["numbers"], p["target"], use_all=True)
    True
    >>> countdown_problems(3, seed=5)[:2] == countdown_problems(2, seed=5)
    True
    """
    if n < 0 or count < 1 or max_number < 1 or max_target < 1:
        raise ValueError(f"need n >= 0 and count, max_number, max_target >= 1; got n={n}, count={count}, max_number={max_number}, max_target={max_target}")
    rng = random.Random(f"countdown|{seed}|{count}|{max_number}|{max_target}")
    out: list[dict] = []
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
        out.append(
            {
                "prompt": (
                    f"Using the numbers {numbers}, create an expression that equals {target}. You may use "
                    "+, -, *, / and parentheses, and each number at most once. Think in <think> </think> "
                    "and give the final expression in <answer> </answer>, e.g. <answer>(1 + 2) * 3</answer>."
                ),
                "numbers": numbers,
                "target": target,
                "solution": solution,
                "variants": relabel_countdown(numbers, solution, variants, seed=rng.randrange(2**32), max_number=max_number),
            }
        )
    return out


def generate(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``n`` problems of ``split``: train and test draw from differently seeded streams, and a test problem
    whose numbers and target also occur in the train stream's first 10,000 is skipped."""
    if split == "train":
        return countdown_problems(n, seed=seed)
    seen = {(tuple(p["numbers"]), p["target"]) for p in countdown_problems(10_000, seed=seed)}
    out = [p for p in countdown_problems(2 * n + 10, seed=seed + 1_000_003) if (tuple(p["numbers"]), p["target"]) not in seen]
    return out[:n]


def extract_answer(text: str) -> str | None:
    """The completion's final expression (``<answer>...</answer>``, else the last line)."""
    return extract_expression(text)


def verify(completion: str, problem: dict) -> bool:
    """Whether ``completion`` solves ``problem`` (each number at most once, exact arithmetic)."""
    return countdown_check(extract_expression(completion), problem["numbers"], problem["target"])


def is_complete(text: str) -> bool:
    """Generation can stop once the answer span is closed."""
    return "</answer>" in text


reward = countdown_reward
