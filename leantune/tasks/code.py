"""Write a small Python function, checked by hidden unit tests run in the sandbox (:mod:`leantune.rl.sandbox`).

Templates (rotate or reverse a list, sum/count of multiples, fizzbuzz-like, gcd/lcm, palindromes, digit sums,
clamping, word lengths, Fibonacci modulo m, ...) each take parameters, so there are several hundred distinct
problems. Every problem is a dict with

* ``prompt``: the function's signature, what it must return, and one example (a random case);
* ``completion``: the worked solution for SFT: a one-line plan in a thinking span, then the function in a
  fenced ```python block;
* ``answer``: a JSON string ``{"entry": name, "cases": [[args...], ...], "expected": [json, ...]}``: the
  hidden tests (7 argument lists: a fixed example, two edge cases, four random ones including the prompt's
  example; and the JSON of each expected result), so
  ``verify(completion, answer)`` works wherever only the ``answer`` column travels.

The verifier runs the completion's last fenced block (:func:`leantune.rl.sandbox.extract_code`) followed by
a small harness in :func:`leantune.rl.sandbox.run_code` (no network, rlimits, a throwaway directory, the
layers this machine offers). The harness calls the function on each hidden case and prints, after a random
per-call marker, the JSON of each result; the expected results never enter the sandbox, and the comparison
is of JSON text (``True`` is not ``1``, ``1.0`` is not ``1``; an object that claims to equal anything does not
serialise). Correct means every hidden case matches; any sandbox failure (timeout, memory, output flood, a
non-zero exit, no result line) scores 0. One ``run_code`` per completion.

Why not :func:`leantune.rl.sandbox.code_reward` with ``assert`` tests: an assert-style test passes when the
program exits with status 0, so ``import os; os._exit(0)`` before the tests scores 1.0 there; here it
prints no result line and scores 0 (tested).

Train and test problems are disjoint by construction: a problem's split is fixed by a hash of the function it
asks for (:func:`split_of`); the same function may recur within a split with other examples and hidden cases.

>>> p = generate(1, seed=0)[0]
>>> sorted(p)
['answer', 'completion', 'prompt']
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from leantune.rl.sandbox import extract_code, run_code
from leantune.tasks import completion_text, distinct_problems

NAME = "code"
SPLITS = ("train", "test")
TEST_PERCENT = 20
"""Share (in percent) of all problems that belong to the test split."""

THINK_START, THINK_END = "<think>", "</think>"
NUM_CASES = 7
PARALLEL_RUNS = max(1, min(8, os.cpu_count() or 1))
"""Sandboxed runs at a time in :func:`reward`."""
TIMEOUT_S = 5.0
MEMORY_MB = 256


# --------------------------------------------------------------------------------------------
# Templates: each returns a Spec (signature, description, reference source, plan, case generator)


VISIBLE = 3
"""Index of the case shown in the prompt: the first random one (cases 0-2 are a fixed example and two edge cases)."""


class Spec:
    """One problem: ``entry`` (the function name), ``signature``, ``description`` (what it returns),
    ``source`` (the reference implementation), ``plan`` (the one-line approach), ``cases`` (argument lists:
    a fixed example, two edge cases, then random ones; ``cases[VISIBLE]`` is shown in the prompt)."""

    def __init__(self, entry: str, signature: str, description: str, source: str, plan: str, cases: list[list]):
        self.entry, self.signature, self.description = entry, signature, description
        self.source, self.plan, self.cases = source, plan, cases


def _ints(rng: random.Random, lo: int, hi: int, n_max: int = 8) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(1, n_max))]


def _word(rng: random.Random, lo: int = 1, hi: int = 8) -> str:
    return "".join(rng.choice("abcdefghijklmnoprstuvwy") for _ in range(rng.randint(lo, hi)))


def _rotate(rng):
    k, left = rng.randint(1, 9), rng.random() < 0.5
    way = "left" if left else "right"
    body = "    if not xs:\n        return []\n    k = {k} % len(xs)\n    return xs[k:] + xs[:k]" if left else \
        "    if not xs:\n        return []\n    k = {k} % len(xs)\n    return xs[len(xs) - k:] + xs[:len(xs) - k]"
    cases = [[[1, 2, 3, 4, 5]], [[]], [[7]]] + [[_ints(rng, -9, 99, 12)] for _ in range(NUM_CASES - 3)]
    return Spec(f"rotate_{way}", f"rotate_{way}(xs: list[int]) -> list[int]",
                f"a new list: xs rotated {way} by {k} positions (k taken modulo len(xs); [] for [])",
                f"def rotate_{way}(xs):\n" + body.format(k=k), f"reduce {k} modulo the length, then join two slices", cases)


def _reverse(rng):
    mode = rng.choice(["list", "words", "each_word"])
    if mode == "list":
        cases = [[[1, 2, 3]], [[]], [[5]]] + [[_ints(rng, -50, 50, 10)] for _ in range(NUM_CASES - 3)]
        return Spec("reversed_list", "reversed_list(xs: list[int]) -> list[int]", "a new list with the elements of xs in reverse order",
                    "def reversed_list(xs):\n    return xs[::-1]", "a slice with step -1", cases)
    texts = [["hello big world"], [""], ["one"]] + [[" ".join(_word(rng) for _ in range(rng.randint(1, 6)))] for _ in range(NUM_CASES - 3)]
    if mode == "words":
        return Spec("reverse_words", "reverse_words(s: str) -> str", "the words of s (split on whitespace) in reverse order, joined by single spaces",
                    "def reverse_words(s):\n    return ' '.join(s.split()[::-1])", "split, reverse the list, join with spaces", texts)
    return Spec("reverse_each_word", "reverse_each_word(s: str) -> str", "s with each word (split on whitespace) spelled backwards, joined by single spaces, word order kept",
                "def reverse_each_word(s):\n    return ' '.join(w[::-1] for w in s.split())", "split, reverse each word, join with spaces", texts)


def _multiples(rng):
    k, mode = rng.randint(2, 9), rng.choice(["sum", "count", "max"])
    cases = [[[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]], [[]], [[1]]] + [[_ints(rng, -30, 100, 12)] for _ in range(NUM_CASES - 3)]
    if mode == "sum":
        what, src, plan = f"the sum of the elements of xs divisible by {k} (0 if none)", f"    return sum(x for x in xs if x % {k} == 0)", "filter by the remainder, then sum"
    elif mode == "count":
        what, src, plan = f"how many elements of xs are divisible by {k}", f"    return sum(1 for x in xs if x % {k} == 0)", "count the elements with remainder 0"
    else:
        what, src, plan = f"the largest element of xs divisible by {k}, or None if there is none", \
            f"    found = [x for x in xs if x % {k} == 0]\n    return max(found) if found else None", "filter by the remainder, max or None"
    name = f"{mode}_multiples_of_{k}"
    return Spec(name, f"{name}(xs: list[int]) -> int" + (" | None" if mode == "max" else ""), what,
                f"def {name}(xs):\n{src}", plan, cases)


_WORDS = [("Fizz", "Buzz"), ("Ping", "Pong"), ("Foo", "Bar"), ("Tick", "Tock"), ("Zig", "Zag")]


def _fizzbuzz(rng):
    a, b = rng.sample(range(2, 10), 2)
    wa, wb = rng.choice(_WORDS)
    cases = [[15], [0], [1], [rng.randint(5, 16)]] + [[rng.randint(2, 40)] for _ in range(NUM_CASES - 4)]
    src = (f"def fizzbuzz(n):\n    out = []\n    for i in range(1, n + 1):\n        s = ''\n"
           f"        if i % {a} == 0:\n            s += '{wa}'\n        if i % {b} == 0:\n            s += '{wb}'\n"
           f"        out.append(s or str(i))\n    return out")
    return Spec("fizzbuzz", "fizzbuzz(n: int) -> list[str]",
                f"for i = 1..n: '{wa}' if i is a multiple of {a}, '{wb}' if a multiple of {b}, '{wa}{wb}' if both, "
                "else str(i) ([] for n = 0)", src, f"loop 1..n, append '{wa}' for {a}, '{wb}' for {b}, else the number", cases)


def _gcd(rng):
    mode = rng.choice(["gcd", "lcm", "gcd_list"])
    if mode == "gcd_list":
        cases = [[[12, 18, 30]], [[7]], [[0, 5]]] + [[[rng.randint(1, 40) * rng.randint(1, 6) for _ in range(rng.randint(2, 5))]] for _ in range(NUM_CASES - 3)]
        return Spec("gcd_all", "gcd_all(xs: list[int]) -> int", "the greatest common divisor of the non-negative integers in xs (non-empty)",
                    "def gcd_all(xs):\n    g = 0\n    for x in xs:\n        while x:\n            g, x = x, g % x\n    return g",
                    "fold Euclid's algorithm over the list", cases)
    cases = [[12, 18], [0, 7], [7, 7]] + [[rng.randint(1, 60) * rng.randint(1, 5), rng.randint(1, 60)] for _ in range(NUM_CASES - 3)]
    if mode == "gcd":
        return Spec("gcd", "gcd(a: int, b: int) -> int", "the greatest common divisor of the non-negative integers a and b (gcd(0, b) = b)",
                    "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a", "Euclid: replace (a, b) by (b, a % b) until b is 0", cases)
    return Spec("lcm", "lcm(a: int, b: int) -> int", "the least common multiple of the non-negative integers a and b (0 if either is 0)",
                "def lcm(a, b):\n    if a == 0 or b == 0:\n        return 0\n    x, y = a, b\n    while y:\n        x, y = y, x % y\n    return a // x * b",
                "a * b divided by their gcd (Euclid), 0 if either is 0", cases)


def _palindrome(rng):
    loose = rng.random() < 0.5
    pals = ["racecar", "abba", "Never odd or even", "A man, a plan, a canal: Panama"]
    cases = [["level"], [""], ["ab"]] + [[rng.choice([_word(rng), rng.choice(pals)])] for _ in range(NUM_CASES - 3)]
    if loose:
        return Spec("is_loose_palindrome", "is_loose_palindrome(s: str) -> bool",
                    "True if s reads the same backwards when only its letters and digits count, case ignored",
                    "def is_loose_palindrome(s):\n    t = [c.lower() for c in s if c.isalnum()]\n    return t == t[::-1]",
                    "keep alphanumerics in lower case, compare with the reverse", cases)
    return Spec("is_palindrome", "is_palindrome(s: str) -> bool", "True if s is exactly the same string backwards",
                "def is_palindrome(s):\n    return s == s[::-1]", "compare the string with its reverse", cases)


def _digits(rng):
    base = rng.randint(2, 10)
    cases = [[10], [0], [base - 1]] + [[rng.randint(1, 10**6)] for _ in range(NUM_CASES - 3)]
    return Spec(f"digit_sum_base{base}", f"digit_sum_base{base}(n: int) -> int", f"the sum of the digits of the non-negative integer n written in base {base}",
                f"def digit_sum_base{base}(n):\n    total = 0\n    while n:\n        total += n % {base}\n        n //= {base}\n    return total",
                f"repeatedly take n % {base} and divide by {base}", cases)


def _clamp(rng):
    lo = rng.randint(-10, 10)
    hi = lo + rng.randint(3, 40)
    cases = [[[lo - 5, lo, hi, hi + 5]], [[]], [[lo + 1]]] + [[_ints(rng, lo - 20, hi + 20, 10)] for _ in range(NUM_CASES - 3)]
    return Spec("clamp_all", "clamp_all(xs: list[int]) -> list[int]", f"a new list: each element of xs limited to the range [{lo}, {hi}]",
                f"def clamp_all(xs):\n    return [min(max(x, {lo}), {hi}) for x in xs]", f"min(max(x, {lo}), {hi}) for each element", cases)


def _long_words(rng):
    k = rng.randint(2, 7)
    cases = [["the quick brown fox jumps"], [""], ["a"]] + [[" ".join(_word(rng, 1, 10) for _ in range(rng.randint(1, 8)))] for _ in range(NUM_CASES - 3)]
    return Spec(f"count_longer_than_{k}", f"count_longer_than_{k}(s: str) -> int", f"how many words of s (split on whitespace) have more than {k} characters",
                f"def count_longer_than_{k}(s):\n    return sum(1 for w in s.split() if len(w) > {k})", f"split and count words with len > {k}", cases)


def _fibonacci(rng):
    m = rng.randint(7, 1000)
    cases = [[10], [0], [1]] + [[rng.randint(2, 300)] for _ in range(NUM_CASES - 3)]
    return Spec("fib_mod", "fib_mod(n: int) -> int", f"the n-th Fibonacci number modulo {m} (F(0) = 0, F(1) = 1)",
                f"def fib_mod(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, (a + b) % {m}\n    return a",
                f"iterate the pair (a, b) n times, reducing modulo {m}", cases)


def _running(rng):
    mode = rng.choice(["max", "sum"])
    cases = [[[3, 1, 4, 1, 5]], [[]], [[-2]]] + [[_ints(rng, -20, 20, 10)] for _ in range(NUM_CASES - 3)]
    if mode == "max":
        return Spec("running_max", "running_max(xs: list[int]) -> list[int]", "a list whose i-th element is the maximum of xs[0..i]",
                    "def running_max(xs):\n    out = []\n    for x in xs:\n        out.append(x if not out else max(out[-1], x))\n    return out",
                    "carry the maximum so far", cases)
    return Spec("running_sum", "running_sum(xs: list[int]) -> list[int]", "a list whose i-th element is the sum of xs[0..i]",
                "def running_sum(xs):\n    out, total = [], 0\n    for x in xs:\n        total += x\n        out.append(total)\n    return out",
                "carry the sum so far", cases)


TEMPLATES: dict[str, Callable[[random.Random], Spec]] = {
    "rotate": _rotate, "reverse": _reverse, "multiples": _multiples, "fizzbuzz": _fizzbuzz, "gcd": _gcd,
    "palindrome": _palindrome, "digits": _digits, "clamp": _clamp, "long_words": _long_words,
    "fibonacci": _fibonacci, "running": _running,
}


# --------------------------------------------------------------------------------------------
# Problems


def _task_text(spec: Spec) -> str:
    return f"Write a Python function `{spec.signature}` that returns {spec.description}."


def split_of(prompt: str) -> str:
    """The split of a problem, fixed by a hash of the function it asks for (the prompt up to its example),
    so the same function never appears in both splits, whatever example it is shown with.

    >>> split_of("Write ... `gcd(a: int, b: int) -> int` ... Example: gcd(4, 6) == 2.") == split_of("Write ... `gcd(a: int, b: int) -> int` ... Example: gcd(9, 3) == 3.")
    True
    """
    digest = hashlib.sha256(f"{NAME}:{prompt.split(' Example: ', 1)[0]}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT else "train"


def _reference(spec: Spec) -> Callable:
    """The reference function (our own template source, never model output)."""
    namespace: dict = {}
    exec(compile(spec.source, f"<{NAME}:{spec.entry}>", "exec"), namespace)  # noqa: S102 - trusted template code
    return namespace[spec.entry]


def _call_text(entry: str, args: list) -> str:
    return f"{entry}({', '.join(repr(a) for a in args)})"


def make_problem(spec: Spec) -> dict:
    """The problem dict for one template instance: prompt with one visible example, worked solution, hidden tests."""
    fn = _reference(spec)
    expected = [json.dumps(fn(*json.loads(json.dumps(args)))) for args in spec.cases]
    example = spec.cases[VISIBLE]
    prompt = (f"{_task_text(spec)} Example: {_call_text(spec.entry, example)} == {fn(*example)!r}. "
              "Think briefly in <think> </think>, then give only the function in a ```python block.")
    completion = f"{THINK_START}{spec.plan[0].upper() + spec.plan[1:]}.{THINK_END}\n```python\n{spec.source}\n```"
    answer = json.dumps({"entry": spec.entry, "cases": spec.cases, "expected": expected})
    return {"prompt": prompt, "completion": completion, "answer": answer}


def generate(n: int, seed: int = 0, split: str = "train", *, templates: Sequence[str] | None = None) -> list[dict]:
    """``n`` distinct problems of ``split`` (train/test disjoint by prompt hash), deterministic in the arguments.

    >>> generate(3, seed=1, split="test") == generate(3, seed=1, split="test")
    True
    """
    return distinct_problems(NAME, n, seed, split, SPLITS, TEMPLATES, templates, make_problem, split_of)


# --------------------------------------------------------------------------------------------
# Answers, verification and reward

_HARNESS = """

# ---- hidden tests (leantune.tasks.code) ----
import json as _lt_json
def _lt_run(_cases):
    _out = []
    for _args in _cases:
        try:
            _out.append(_lt_json.dumps({entry}(*_args)))
        except BaseException as _err:
            _out.append("error: " + type(_err).__name__)
    print({marker!r} + _lt_json.dumps(_out))
_lt_run(_lt_json.loads({cases!r}))
"""


def extract_answer(completion) -> str:
    """The completion's code: the last fenced block, else the text after ``</think>`` (else the whole text).

    >>> extract_answer("<think>slice</think>\\n```python\\ndef f(xs):\\n    return xs[::-1]\\n```")
    'def f(xs):\\n    return xs[::-1]\\n'
    """
    text = completion_text(completion)
    code = extract_code(text)
    if code is text and THINK_END in text:
        code = text.rsplit(THINK_END, 1)[1]
    return code


def _tests(answer) -> dict:
    tests = json.loads(answer) if isinstance(answer, str) else answer
    if not isinstance(tests, dict) or not {"entry", "cases", "expected"} <= set(tests):
        raise ValueError(f"code answer must hold 'entry', 'cases' and 'expected', got {answer!r}")
    if len(tests["cases"]) != len(tests["expected"]):
        raise ValueError("code answer: as many expected results as cases are needed")
    return tests


def run_hidden_tests(completion, answer, *, timeout_s: float = TIMEOUT_S, memory_mb: int = MEMORY_MB) -> list[bool]:
    """Per hidden case, whether the completion's function returned the expected result; all ``False`` when
    the sandbox run failed (limit hit, non-zero exit, no result line). One :func:`run_code` call."""
    tests = _tests(answer)
    n = len(tests["cases"])
    marker = f"@@leantune-results-{secrets.token_hex(8)}@@"
    program = extract_answer(completion) + _HARNESS.format(entry=tests["entry"], marker=marker,
                                                           cases=json.dumps(tests["cases"]))
    result = run_code(program, timeout_s=timeout_s, memory_mb=memory_mb)
    if not result.ok or result.killed_reason is not None:
        return [False] * n
    lines = [line for line in result.stdout.splitlines() if line.startswith(marker)]
    if len(lines) != 1:
        return [False] * n
    try:
        got = json.loads(lines[0][len(marker):])
    except json.JSONDecodeError:
        return [False] * n
    if not isinstance(got, list) or len(got) != n:
        return [False] * n
    return [isinstance(g, str) and g == want for g, want in zip(got, tests["expected"])]


def verify(completion, answer) -> bool:
    """Whether the completion's function passes every hidden case of ``answer`` (the problem's JSON).

    >>> ans = json.dumps({"entry": "f", "cases": [[2], [5]], "expected": ["4", "25"]})
    >>> verify("```python\\ndef f(x):\\n    return x * x\\n```", ans), verify("def f(x):\\n    return 4", ans)
    (True, False)
    """
    return all(run_hidden_tests(completion, answer))


def reward(prompts, completions, answer, **kw) -> list[float]:
    """1.0 if the completion passes every hidden case, else 0.0 (also on any sandbox failure). The sandboxed
    runs go :data:`PARALLEL_RUNS` at a time (threads waiting on child processes)."""
    answers = [answer] * len(completions) if isinstance(answer, (str, dict)) else list(answer)
    if len(answers) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(answers)} answers")
    with ThreadPoolExecutor(max_workers=max(1, min(PARALLEL_RUNS, len(completions)))) as pool:
        return [1.0 if ok else 0.0 for ok in pool.map(verify, completions, answers)]


def is_complete(text: str) -> bool:
    """The function is closed: a complete fenced block after the thinking span.

    >>> is_complete("<think>x</think>\\n```python\\ndef f():\\n    pass\\n```"), is_complete("<think>x</think>\\n```python\\ndef f():")
    (True, False)
    """
    if THINK_END in text:
        text = text.rsplit(THINK_END, 1)[1]
    elif THINK_START in text:
        return False
    return text.count("```") >= 2


# --------------------------------------------------------------------------------------------
# Files


def write_jsonl(problems: Iterable[dict], path: str | Path, fields: Sequence[str] = ("prompt", "completion")) -> Path:
    """Write problems as JSONL with only ``fields`` (default ``{prompt, completion}``, the SFT format)."""
    from leantune.tasks.arithmetic import write_jsonl as _write

    return _write(problems, path, fields)
