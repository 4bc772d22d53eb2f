"""Multi-digit addition and subtraction: a deterministic, verifiable task with worked solutions.

Every problem is a dict with

* ``prompt``: the question shown to the model, e.g. ``"What is 47 + 38?"``;
* ``completion``: a short worked solution, column by column from the ones digit, inside a thinking
  span, followed by the final answer: ``"<think>47 + 38: 7 + 8 = 15, carry 1; 4 + 3 + 1 = 8</think> 85"``;
* ``answer``: the exact result as a string (``"85"``).

Train and test problems are disjoint by construction: a problem's split is fixed by a hash of its
operator and operands (about :data:`TEST_PERCENT` percent of all problems are test problems), so no
seed, ``n`` or ``digits`` setting can leak a test problem into training data. Within one call the
problems are distinct.

>>> p = generate(3, seed=0)[0]
>>> sorted(p)
['answer', 'completion', 'prompt']
>>> verify(p["completion"], p["answer"])
True
>>> worked_solution(47, "+", 38)
'<think>47 + 38: 7 + 8 = 15, carry 1; 4 + 3 + 1 = 8</think> 85'
>>> worked_solution(83, "-", 47)
'<think>83 - 47: 13 - 7 = 6, borrow 1; 8 - 1 - 4 = 3</think> 36'
>>> extract_answer("<think>7 + 8 = 15 ...</think> The answer is 85.")
'85'
>>> extract_answer("47 + 38 = 85")  # no thinking span: the last integer
'85'
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from leantune.tasks import completion_text

NAME = "arithmetic"
THINK_START = "<think>"
THINK_END = "</think>"
OPS = ("+", "-")
TEST_PERCENT = 20
"""Share (in percent) of all possible problems that belong to the test split."""

SPLITS = ("train", "test")

_INT = re.compile(r"[-\u2212]?\d{1,3}(?:,\d{3})+(?!\d)|[-\u2212]?\d+")


# --------------------------------------------------------------------------------------------
# Problems


def split_of(a: int, op: str, b: int) -> str:
    """The split (``"train"`` or ``"test"``) a problem belongs to, fixed by a hash of the problem.

    >>> split_of(47, "+", 38) in SPLITS
    True
    >>> split_of(47, "+", 38) == split_of(47, "+", 38)
    True
    """
    digest = hashlib.sha256(f"{NAME}:{a}{op}{b}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT else "train"


def worked_solution(a: int, op: str, b: int) -> str:
    """The completion for ``a op b``: column-by-column steps in a thinking span, then the answer.

    Subtraction requires ``a >= b`` (the generator orders operands so results are never negative).

    >>> worked_solution(52, "-", 48)
    '<think>52 - 48: 12 - 8 = 4, borrow 1; 5 - 1 - 4 = 0</think> 4'
    >>> worked_solution(5, "+", 123)
    '<think>5 + 123: 5 + 3 = 8; 0 + 2 = 2; 0 + 1 = 1</think> 128'
    """
    if op not in OPS:
        raise ValueError(f"unknown operator {op!r}; expected one of {OPS}")
    if a < 0 or b < 0:
        raise ValueError("operands must be non-negative")
    if op == "-" and a < b:
        raise ValueError(f"subtraction needs a >= b, got {a} - {b}")
    xs, ys = str(a)[::-1], str(b)[::-1]
    width = max(len(xs), len(ys))
    steps = []
    carry = 0  # carry (addition) or borrow (subtraction) into the current column
    for i in range(width):
        x = int(xs[i]) if i < len(xs) else 0
        y = int(ys[i]) if i < len(ys) else 0
        last = i == width - 1
        if op == "+":
            s = x + y + carry
            terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
            carry = s // 10 if not last else 0
            step = f"{terms} = {s}" + (", carry 1" if carry else "")
        else:
            borrow_out = 1 if x - carry < y else 0
            top = x + 10 * borrow_out
            s = top - carry - y
            terms = f"{top}" + (f" - {carry}" if carry else "") + f" - {y}"
            carry = borrow_out
            step = f"{terms} = {s}" + (", borrow 1" if borrow_out else "")
        steps.append(step)
    result = a + b if op == "+" else a - b
    return f"{THINK_START}{a} {op} {b}: {'; '.join(steps)}{THINK_END} {result}"


def make_problem(a: int, op: str, b: int) -> dict:
    """One problem dict for ``a op b``.

    >>> make_problem(47, "+", 38)["prompt"]
    'What is 47 + 38?'
    """
    result = a + b if op == "+" else a - b
    return {"prompt": f"What is {a} {op} {b}?", "completion": worked_solution(a, op, b), "answer": str(result)}


def generate(
    n: int,
    seed: int = 0,
    split: str = "train",
    *,
    digits: int = 2,
    ops: Sequence[str] = OPS,
) -> list[dict]:
    """``n`` distinct problems of the given split, deterministic in (``n``, ``seed``, ``split``, ``digits``, ``ops``).

    Operands have exactly ``digits`` digits (1-digit: 0-9); ``ops`` is any non-empty subset of
    :data:`OPS`; for subtraction the larger operand comes first, so results are never negative.
    (The demo uses addition only, :mod:`leantune.tasks.addition`: SmolLM2-135M learns it far faster
    than mixed +/-, whose borrow steps it picks up slowly.)
    Raises ``ValueError`` if the split holds fewer than ``n`` distinct problems.

    >>> [p["prompt"] for p in generate(2, seed=1)] == [p["prompt"] for p in generate(2, seed=1)]
    True
    >>> len(generate(5, seed=0, split="test", digits=3, ops=["+", "-"]))
    5
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if n < 0:
        raise ValueError("n must be >= 0")
    if digits < 1:
        raise ValueError("digits must be >= 1")
    ops = tuple(ops)
    bad = [op for op in ops if op not in OPS]
    if not ops or bad:
        raise ValueError(f"ops must be a non-empty subset of {OPS}, got {list(ops)}")
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    rng = random.Random(f"{NAME}|{seed}|{split}|{digits}|{''.join(ops)}")
    seen: set[tuple[int, str, int]] = set()
    out: list[dict] = []
    tries, max_tries = 0, 200 * n + 10_000
    while len(out) < n:
        tries += 1
        if tries > max_tries:
            raise ValueError(
                f"only {len(out)} distinct {split} problems found for digits={digits}, ops={list(ops)}; asked for {n}"
            )
        op = rng.choice(ops)
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if op == "-" and a < b:
            a, b = b, a
        key = (a, op, b)
        if key in seen or split_of(a, op, b) != split:
            continue
        seen.add(key)
        out.append(make_problem(a, op, b))
    return out


# --------------------------------------------------------------------------------------------
# Answers, verification and reward


def _normalize_int(text: str) -> str | None:
    text = text.replace("\u2212", "-").replace(",", "").strip()
    try:
        return str(int(text))
    except ValueError:
        return None


def extract_answer(completion: str) -> str | None:
    """The final answer in a completion, normalized (``"085"`` -> ``"85"``, ``"1,234"`` -> ``"1234"``).

    With a closed thinking span, the first integer after the last ``</think>``; with an unclosed
    span (e.g. generation cut off while thinking), ``None``; without any thinking span, the last
    integer in the text. ``None`` when there is no integer where one is expected.

    >>> extract_answer("<think>47 + 38: ...</think> 85")
    '85'
    >>> extract_answer("<think>...</think>\\n  **85**.")
    '85'
    >>> extract_answer("The sum of 47 and 38 is 85.")
    '85'
    >>> extract_answer("<think>47 + 38: 7 + 8 = 15") is None
    True
    >>> extract_answer("<think>...</think> I don't know") is None
    True
    >>> extract_answer("no digits here") is None
    True
    """
    if not isinstance(completion, str):
        return None
    if THINK_END in completion:
        found = _INT.search(completion.rsplit(THINK_END, 1)[1])
        return _normalize_int(found.group(0)) if found else None
    if THINK_START in completion:
        return None
    matches = _INT.findall(completion)
    return _normalize_int(matches[-1]) if matches else None


def verify(completion: str, answer: str | int) -> bool:
    """Whether the completion's final answer equals ``answer``.

    >>> verify("<think>47 + 38: 7 + 8 = 15, carry 1; 4 + 3 + 1 = 8</think> 85", "85")
    True
    >>> verify("<think>...</think> 84", "85")
    False
    >>> verify("", "85")
    False
    """
    got = extract_answer(completion)
    want = _normalize_int(str(answer))
    return got is not None and got == want


_CLOSED = re.compile(re.escape(THINK_END) + r"\s*\D{0,40}?[-\u2212]?\d[\d,]*(?![\d,])[^\d,]")


def is_complete(completion: str) -> bool:
    """Whether the final answer is already closed: a number after ``</think>`` followed by a non-digit.

    Rollouts stop here instead of spending tokens on text after the answer.

    >>> is_complete("<think>4 + 3 = 7</think> 7"), is_complete("<think>4 + 3 = 7</think> 7\\n")
    (False, True)
    >>> is_complete("<think>8 + 5 = 13, carry 1; 4 + 1 = 5</think> 1")  # 1 could become 15...
    False
    """
    return bool(_CLOSED.search(completion))


_completion_text = completion_text  # one definition, in leantune.tasks


def reward(prompts, completions, answer, **kw) -> list[float]:
    """Verifiable reward: 1.0 for a correct final answer, else 0.0 (TRL reward-function signature).

    ``answer`` is the per-completion list of reference answers (a dataset column); completions
    may be strings or lists of chat messages.

    >>> reward(["What is 2 + 3?"] * 3, ["<think>2 + 3 = 5</think> 5", "<think>2 + 3 = 6</think> 6", "<think>2 + 3"], ["5"] * 3)
    [1.0, 0.0, 0.0]
    >>> reward(None, [[{"role": "assistant", "content": "<think>...</think> 85"}]], ["85"])
    [1.0]
    """
    if isinstance(answer, (str, int)):
        answer = [answer] * len(completions)
    if len(answer) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(answer)} answers")
    return [1.0 if verify(_completion_text(c), a) else 0.0 for c, a in zip(completions, answer)]


# --------------------------------------------------------------------------------------------
# Files


def write_jsonl(problems: Iterable[dict], path: str | Path, fields: Sequence[str] = ("prompt", "completion")) -> Path:
    """Write problems as JSONL with only ``fields`` (default ``{prompt, completion}``, the SFT format).

    Parent directories are created. Returns the path.

    >>> import tempfile, os
    >>> path = write_jsonl(generate(2), os.path.join(tempfile.mkdtemp(), "sub", "train.jsonl"))
    >>> [sorted(json.loads(line)) for line in path.read_text().splitlines()]
    [['completion', 'prompt'], ['completion', 'prompt']]
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in problems:
            missing = [k for k in fields if k not in p]
            if missing:
                raise KeyError(f"problem is missing field(s) {missing}: {p}")
            f.write(json.dumps({k: p[k] for k in fields}, ensure_ascii=False) + "\n")
    return path
