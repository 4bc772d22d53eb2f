"""Multi-step arithmetic word problems (2-4 operations), GSM8K-style: worked steps, then ``#### answer``.

Harder than the demo's addition: each problem chains two to four operations (+, -, x, exact /) through a
small word-problem template (shopping, baking, saving, travel, ...) or a bare expression, so a model has to
keep intermediate results. Every problem is a dict with

* ``prompt``: the question, ending with the format instruction (``End with '#### <answer>'.``);
* ``completion``: the worked solution for SFT: one line per operation in a thinking span, then
  ``#### answer``: ``"<think>3 * 12 = 36\\n36 - 5 = 31</think>\\n#### 31"``;
* ``answer``: the exact result as a string (an integer; every division is exact).

The verifier reads the last ``\\boxed{...}`` or the text after the last ``####``
(:func:`leantune.rl.rewards.extract_math_answer`) and compares with :func:`answers_match`:
:func:`leantune.rl.rewards.normalize_math_answer` (``"1,000"`` == ``"1000"``, ``"\\frac{1}{2}"`` == ``"0.5"``),
then the ``math-verify`` package when installed (it won on a tested set of equivalent forms, recorded in
``docs/tasks.md``); a bare number without either marker does not count.

Train and test problems are disjoint by construction: a problem's split is fixed by a hash of its prompt.

>>> p = generate(1, seed=0)[0]
>>> verify(p["completion"], p["answer"]), verify("so \\\\boxed{" + p["answer"] + "}", p["answer"])
(True, True)
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from leantune.rl.rewards import extract_math_answer, normalize_math_answer
from leantune.tasks import completion_text, distinct_problems

NAME = "multistep"
SPLITS = ("train", "test")
TEST_PERCENT = 20
"""Share (in percent) of all problems that belong to the test split."""

THINK_START, THINK_END = "<think>", "</think>"
FORMAT = "Show your steps, then end with '#### <answer>'."


# --------------------------------------------------------------------------------------------
# Templates: each draws its numbers, and returns (question, steps, answer); steps are (x, op, y, value).

Step = tuple[int, str, int, int]


def _op(x: int, op: str, y: int) -> Step:
    value = {"+": x + y, "-": x - y, "*": x * y, "/": x // y}[op]
    return (x, op, y, value)


def _shopping(rng: random.Random):
    item = rng.choice(["notebooks", "pens", "apples", "tickets", "candles", "stamps"])
    n, price = rng.randint(3, 12), rng.randint(2, 15)
    s1 = _op(n, "*", price)
    paid = rng.choice([50, 100, 200])
    while paid <= s1[3]:
        paid *= 2
    s2 = _op(paid, "-", s1[3])
    q = (f"Mia buys {n} {item} at ${price} each and pays with a ${paid} bill. "
         f"How many dollars of change does she get?")
    return q, [s1, s2], s2[3]


def _baking(rng: random.Random):
    trays, per_tray, eaten, boxes = rng.randint(2, 9), rng.randint(6, 24), rng.randint(1, 10), rng.randint(2, 6)
    s1 = _op(trays, "*", per_tray)
    s2 = _op(s1[3], "-", eaten)
    if s2[3] % boxes:  # make the split exact: eat a few more
        eaten += s2[3] % boxes
        s2 = _op(s1[3], "-", eaten)
    s3 = _op(s2[3], "/", boxes)
    q = (f"A baker makes {trays} trays of {per_tray} cookies. {eaten} cookies break, and the rest are packed "
         f"equally into {boxes} boxes. How many cookies go in each box?")
    return q, [s1, s2, s3], s3[3]


def _saving(rng: random.Random):
    start, weekly, weeks, spent = rng.randint(10, 90), rng.randint(5, 40), rng.randint(2, 10), rng.randint(5, 60)
    s1 = _op(weekly, "*", weeks)
    s2 = _op(start, "+", s1[3])
    s3 = _op(s2[3], "-", spent)
    q = (f"Leo has ${start}. He saves ${weekly} a week for {weeks} weeks, then spends ${spent} on a game. "
         f"How many dollars does he have now?")
    return q, [s1, s2, s3], s3[3]


def _travel(rng: random.Random):
    speed, hours, speed2, hours2, legs = rng.randint(30, 90), rng.randint(2, 6), rng.randint(20, 70), rng.randint(1, 4), 2
    s1 = _op(speed, "*", hours)
    s2 = _op(speed2, "*", hours2)
    s3 = _op(s1[3], "+", s2[3])
    steps = [s1, s2, s3]
    if rng.random() < 0.5:
        s4 = _op(s3[3], "*", legs)
        steps.append(s4)
        q = (f"A bus drives {hours} hours at {speed} km/h, then {hours2} hours at {speed2} km/h, and comes back "
             f"the same way. How many kilometres does it drive in total?")
    else:
        q = (f"A bus drives {hours} hours at {speed} km/h, then {hours2} hours at {speed2} km/h. "
             f"How many kilometres does it drive?")
    return q, steps, steps[-1][3]


def _garden(rng: random.Random):
    rows, per_row, dead, extra = rng.randint(3, 15), rng.randint(4, 20), rng.randint(1, 12), rng.randint(2, 30)
    s1 = _op(rows, "*", per_row)
    s2 = _op(s1[3], "-", dead)
    s3 = _op(s2[3], "+", extra)
    q = (f"A garden has {rows} rows of {per_row} tulips. {dead} tulips wilt and {extra} new ones are planted. "
         f"How many tulips are there now?")
    return q, [s1, s2, s3], s3[3]


def _sharing(rng: random.Random):
    friends, each, bags = rng.randint(2, 8), rng.randint(3, 12), rng.randint(2, 5)
    total = friends * each * bags
    s1 = _op(total, "/", bags)
    s2 = _op(s1[3], "/", friends)
    q = (f"{total} marbles are split equally into {bags} bags, and each bag is shared equally by {friends} "
         f"friends. How many marbles does each friend get?")
    return q, [s1, s2], s2[3]


def _expression(rng: random.Random):
    """A bare chain ``((a op b) op c) op d`` of 2-4 operations, every intermediate a non-negative integer."""
    k = rng.randint(2, 4)
    value = rng.randint(2, 40)
    text, steps = str(value), []
    for _ in range(k):
        op = rng.choice(["+", "-", "*", "/"])
        if op == "/":
            divisors = [d for d in range(2, 10) if value % d == 0]
            if not divisors:
                op = "+"
        if op == "-" and value < 2:
            op = "+"
        y = {"+": rng.randint(2, 60), "-": rng.randint(1, max(1, value)), "*": rng.randint(2, 12)}.get(op)
        if op == "/":
            y = rng.choice(divisors)
        step = _op(value, op, y)
        steps.append(step)
        text = f"({text} {op} {y})" if len(steps) < k else f"{text} {op} {y}"
        value = step[3]
    return f"What is {text}?", steps, value


TEMPLATES: dict[str, Callable[[random.Random], tuple[str, list[Step], int]]] = {
    "shopping": _shopping, "baking": _baking, "saving": _saving, "travel": _travel, "garden": _garden,
    "sharing": _sharing, "expression": _expression,
}


# --------------------------------------------------------------------------------------------
# Problems


def split_of(prompt: str) -> str:
    """The split of a problem, fixed by a hash of its prompt.

    >>> split_of("What is (3 + 4) * 5?") in SPLITS
    True
    """
    digest = hashlib.sha256(f"{NAME}:{prompt}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT else "train"


def worked_solution(steps: Sequence[Step], answer: int) -> str:
    """One line per operation in a thinking span, then ``#### answer``.

    >>> worked_solution([(3, "*", 12, 36), (36, "-", 5, 31)], 31)
    '<think>3 * 12 = 36\\n36 - 5 = 31</think>\\n#### 31'
    """
    lines = "\n".join(f"{x} {op} {y} = {v}" for x, op, y, v in steps)
    return f"{THINK_START}{lines}{THINK_END}\n#### {answer}"


def generate(n: int, seed: int = 0, split: str = "train", *, templates: Sequence[str] | None = None) -> list[dict]:
    """``n`` distinct problems of ``split`` (train/test disjoint by prompt hash), deterministic in the arguments.

    ``templates``: a subset of :data:`TEMPLATES` (default all). Raises ``ValueError`` if the split holds
    fewer than ``n`` distinct problems.

    >>> generate(2, seed=1) == generate(2, seed=1) and generate(3, seed=1)[:2] == generate(2, seed=1)
    True
    """
    def make(template_output) -> dict:
        question, steps, answer = template_output
        return {"prompt": f"{question} {FORMAT}", "completion": worked_solution(steps, answer), "answer": str(answer)}

    return distinct_problems(NAME, n, seed, split, SPLITS, TEMPLATES, templates, make, split_of)


# --------------------------------------------------------------------------------------------
# Answers, verification and reward


def extract_answer(completion) -> str | None:
    """The final answer: the last ``\\boxed{...}``, else the rest of the line after the last ``####``.

    >>> extract_answer("<think>3 * 12 = 36</think>\\n#### 36"), extract_answer("the answer is 36") is None
    ('36', True)
    """
    return extract_math_answer(completion_text(completion))


MATH_VERIFY_MAX_CHARS = 64
"""Longest extracted answer handed to ``math-verify`` (longer ones are compared by normalization only)."""


def _math_verify():
    try:
        import math_verify
    except ImportError:
        return None
    return math_verify


def _dollars(text: str) -> str:
    """``text`` as inline math for math-verify's parser (already ``$...$``: unchanged)."""
    return text if len(text) > 1 and text.startswith("$") and text.endswith("$") else f"${text}$"


def answers_match(got: str, want: str, *, use_math_verify: bool | None = None) -> bool:
    """Whether an extracted answer equals the reference: :func:`normalize_math_answer` equality first (exact
    fractions: ``1,000`` == ``1000``, ``0.5`` == ``\\frac{1}{2}``); failing that, the ``math-verify`` package
    (``pip install 'leantune[math]'``), which also accepts ``x = 3`` for ``3``, ``\\text{}`` units, ``\\$10``.

    ``use_math_verify``: ``None`` (default) uses it when it is installed, the answer has at most
    :data:`MATH_VERIFY_MAX_CHARS` characters, and this is the main thread (its timeouts use ``signal.alarm``;
    an expensive expression such as ``9^{9^{9^{9}}}`` costs its 5 s timeout); ``False`` never; ``True``
    requires it (``ImportError`` without it). ``docs/tasks.md`` records the comparison behind this choice.

    >>> answers_match("1,000", "1000"), answers_match("0.5", r"\\frac{1}{2}"), answers_match("41", "42")
    (True, True, False)
    >>> answers_match("x = 3", "3", use_math_verify=False)
    False
    """
    if normalize_math_answer(got) == normalize_math_answer(want):
        return True
    if use_math_verify is False:
        return False
    mv = _math_verify()
    if mv is None:
        if use_math_verify:
            raise ImportError("math-verify is not installed: pip install 'leantune[math]' (or math-verify)")
        return False
    if use_math_verify is None and (len(got) > MATH_VERIFY_MAX_CHARS or threading.current_thread() is not threading.main_thread()):
        return False
    try:
        return bool(mv.verify(mv.parse(_dollars(want)), mv.parse(_dollars(got))))
    except Exception:  # noqa: BLE001 - a parser failure on model output is a wrong answer, not a crash
        return False


def verify(completion, answer) -> bool:
    """Whether the completion's ``####`` / ``\\boxed{}`` answer equals ``answer`` (:func:`answers_match`).

    >>> verify("#### 1,000", "1000"), verify("\\\\boxed{1000.0}", "1000"), verify("1000", "1000")
    (True, True, False)
    """
    got = extract_answer(completion)
    return got is not None and answers_match(got, str(answer))


def reward(prompts, completions, answer, **kw) -> list[float]:
    """1.0 for a correct final answer (:func:`verify`), else 0.0 (TRL reward signature).

    >>> reward(None, ["#### 31", "#### 30", "31"], answer="31")
    [1.0, 0.0, 0.0]
    """
    answers = [answer] * len(completions) if isinstance(answer, (str, int)) else list(answer)
    if len(answers) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(answers)} answers")
    return [1.0 if verify(c, a) else 0.0 for c, a in zip(completions, answers)]


def is_complete(text: str) -> bool:
    """The answer is closed: a line ``#### value`` ended by a newline, or a closed ``\\boxed{...}``.

    >>> is_complete("<think>1 + 2 = 3</think>\\n#### 3"), is_complete("<think>1 + 2 = 3</think>\\n#### 3\\n")
    (False, True)
    >>> is_complete("so \\\\boxed{3}")
    True
    """
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        return "\n" in tail.lstrip(" ") and tail.strip() != ""
    return "\\boxed{" in text and extract_math_answer(text) is not None


# --------------------------------------------------------------------------------------------
# Files


def write_jsonl(problems: Iterable[dict], path: str | Path, fields: Sequence[str] = ("prompt", "completion")) -> Path:
    """Write problems as JSONL with only ``fields`` (default ``{prompt, completion}``, the SFT format)."""
    from leantune.tasks.arithmetic import write_jsonl as _write

    return _write(problems, path, fields)
