"""Reward functions for RL post-training: plain callables ``(prompts, completions, **task_fields) -> list[float]``.

This is TRL's reward-function signature: ``completions`` are strings or chat-message lists, and every
dataset column arrives as a keyword argument holding one value per completion (``answer=[...]``,
``numbers=[[...], ...]``). A single value instead of a list is used for every completion.

- Verifiable answers: :func:`exact_match_reward`, :func:`math_answer_reward` (``\\boxed{}`` / ``####``),
  :func:`countdown_reward` (safe ``ast`` evaluation, each number at most once) (problems: :mod:`leantune.tasks.countdown`),
  :func:`code_reward` (tests run in :mod:`leantune.rl.sandbox`).
- Shape: :func:`format_reward` (a regex factory).
- Length: :func:`length_aware_reward` (Kimi k1.5, arXiv 2501.12599) and
  :func:`soft_overlong_penalty` (DAPO, arXiv 2503.14476) as pure functions of lengths, and
  :func:`length_aware` / :func:`overlong_penalty` wrapping them into reward callables.
- Composition: :func:`combine_rewards` (weighted sum) and :func:`with_isomorphic_variants`
  (arXiv 2604.15149: reward only if the completion also passes relabelled variants of its task),
  with :func:`countdown_variants` for Countdown.

>>> reward = combine_rewards([(math_answer_reward, 1.0), (format_reward(), 0.1)])
>>> reward(None, ["<think>2 + 2</think> \\\\boxed{4}", "\\\\boxed{5}"], answer=["4", "4"])
[1.1, 0.0]
"""

from __future__ import annotations

import ast
import copy
import operator
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction

from leantune.rl.sandbox import code_reward, extract_code
from leantune.tasks import completion_text  # noqa: F401  (re-exported)

__all__ = [
    "arithmetic_reward",
    "code_reward",
    "combine_rewards",
    "completion_text",
    "countdown_reward",
    "countdown_variants",
    "evaluate_expression",
    "exact_match_reward",
    "extract_code",
    "extract_expression",
    "extract_math_answer",
    "format_reward",
    "length_aware",
    "length_aware_reward",
    "math_answer_reward",
    "normalize_math_answer",
    "overlong_penalty",
    "relabel_countdown",
    "soft_overlong_penalty",
    "with_isomorphic_variants",
]

RewardFn = Callable[..., list[float]]
THINK_START, THINK_END = "<think>", "</think>"


# --------------------------------------------------------------------------------------------
# Shared helpers




def final_text(text: str) -> str | None:
    """The part of a completion after its reasoning: text after the last ``</think>``; ``None`` if a
    ``<think>`` span was opened but never closed (generation cut off while thinking); else the whole text.

    >>> final_text("<think>hm</think> 42"), final_text("<think>hm"), final_text("42")
    (' 42', None, '42')
    """
    if THINK_END in text:
        return text.rsplit(THINK_END, 1)[1]
    if THINK_START in text:
        return None
    return text


def _per_sample(value, n: int, name: str, *, is_single: Callable[[object], bool]) -> list:
    """A dataset column for ``n`` completions: a list of ``n`` values, or one value used for all."""
    if is_single(value):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"got {n} completions but {len(values)} values of {name!r} (give one per completion, or a single value)")
    return values


def _scalar(v) -> bool:
    return isinstance(v, (str, int, float, Fraction))


# --------------------------------------------------------------------------------------------
# Exact and math answers


def exact_match_reward(prompts, completions, answer, **kw) -> list[float]:
    """1.0 if the completion's final text (after ``</think>``, whitespace stripped) equals ``answer``, else 0.0.

    >>> exact_match_reward(None, ["<think>...</think> Paris", "paris", "<think>Paris"], answer="Paris")
    [1.0, 0.0, 0.0]
    """
    answers = _per_sample(answer, len(completions), "answer", is_single=_scalar)
    out = []
    for c, a in zip(completions, answers):
        text = final_text(completion_text(c))
        out.append(1.0 if text is not None and text.strip() == str(a).strip() else 0.0)
    return out


def _braced(text: str, start: int) -> str | None:
    """The contents of the ``{...}`` group opening at ``text[start]``, nested braces matched."""
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def extract_math_answer(text: str) -> str | None:
    """The final answer of a math completion: the last ``\\boxed{...}`` (or ``\\fbox{...}``, nested braces
    allowed), else the rest of the line after the last ``####`` (GSM8K style), else ``None``.

    >>> extract_math_answer(r"so \\boxed{\\frac{1}{2}} and finally \\boxed{\\frac{3}{\\sqrt{4}}}")
    '\\\\frac{3}{\\\\sqrt{4}}'
    >>> extract_math_answer("48 / 2 = 24 eggs\\n#### 1,000\\n")
    '1,000'
    >>> extract_math_answer(r"\\boxed 7"), extract_math_answer("no answer") is None
    ('7', True)
    """
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\b\s*", text):
        if m.end() < len(text) and text[m.end()] == "{":
            got = _braced(text, m.end())
        else:  # \boxed 7
            tok = re.match(r"[^\s$]+", text[m.end() :])
            got = tok.group(0) if tok else None
        if got is not None:
            best = got
    if best is not None:
        return best.strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
    return None


_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(,\d{3})+(\.\d+)?$")
_FRAC = re.compile(r"^\\frac\{([^{}]+)\}\{([^{}]+)\}$")


def _to_fraction(s: str) -> Fraction | None:
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    m = _FRAC.match(s)
    if m:
        num, den = _to_fraction(m.group(1)), _to_fraction(m.group(2))
        return num / den if num is not None and den else None
    if not re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)(/\d+)?", s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def normalize_math_answer(answer: str) -> str:
    """A canonical form for comparing math answers: numbers become exact fractions
    (``"1,000"`` == ``"1000"``, ``"0.50"`` == ``"0.5"`` == ``"\\frac{1}{2}"`` == ``"1/2"``); other answers
    lose ``$``, ``\\left``/``\\right``, ``\\text{}``, spacing commands, spaces and a trailing period.

    >>> [normalize_math_answer(a) for a in ["1,000", "1000.00", "0.50", r"\\dfrac{1}{2}", "$-3$", r"\\text{(B)}"]]
    ['1000', '1000', '1/2', '1/2', '-3', '(B)']
    """
    s = str(answer).strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(left|right|displaystyle)\b", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\[,;:! ]", "", s)
    s = s.replace("$", "").replace("\u2212", "-").strip().rstrip(".")
    s = re.sub(r"\s+", "", s)
    value = _to_fraction(s)
    return str(value) if value is not None else s


def math_answer_reward(prompts, completions, answer, **kw) -> list[float]:
    """1.0 if :func:`extract_math_answer` of the completion equals ``answer`` after
    :func:`normalize_math_answer`, else 0.0 (also 0.0 when there is no ``\\boxed{}`` or ``####`` answer).

    >>> math_answer_reward(None, [r"\\boxed{1,000}", "#### 0.50", r"\\boxed{\\frac{1}{2}}", "the answer is 1000"],
    ...                    answer=["1000", "0.5", "0.5", "1000"])
    [1.0, 1.0, 1.0, 0.0]
    """
    answers = _per_sample(answer, len(completions), "answer", is_single=_scalar)
    out = []
    for c, a in zip(completions, answers):
        got = extract_math_answer(completion_text(c))
        out.append(1.0 if got is not None and normalize_math_answer(got) == normalize_math_answer(str(a)) else 0.0)
    return out


# --------------------------------------------------------------------------------------------
# Countdown: reach a target with + - * / over given numbers

MAX_EXPRESSION_CHARS = 200
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_OP_TEXT = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def extract_expression(text: str) -> str | None:
    """The completion's final expression: the last ``<answer>...</answer>``, else the last line of the final
    text (after ``</think>``). A trailing ``= value`` is dropped. ``None`` if there is nothing to read.

    >>> extract_expression("<think>try 3*8</think> <answer>(25 - 1) * 3 = 72</answer>")
    '(25 - 1) * 3'
    >>> extract_expression("<think>...</think>\\n50 + 25")
    '50 + 25'
    """
    found = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    if found:
        expr = found[-1]
    else:
        rest = final_text(text)
        lines = [line for line in (rest or "").splitlines() if line.strip()]
        if not lines:
            return None
        expr = lines[-1]
    expr = expr.split("=", 1)[0].strip()
    return expr or None


def _parse(expr: str) -> ast.Expression:
    """Parse an arithmetic expression; ``ValueError`` unless it is only integers, + - * / and parentheses."""
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    expr = expr.replace("\u00d7", "*").replace("\u00f7", "/").replace("\u2212", "-").strip()
    if not re.fullmatch(r"[\d\s+\-*/()]+", expr):
        raise ValueError(f"only digits, + - * / and parentheses are allowed: {expr!r}")
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {expr!r} ({e.msg})") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp):
            if type(node.op) not in _BINOPS:
                raise ValueError(f"operator {type(node.op).__name__} is not allowed (only + - * /)")
        elif isinstance(node, ast.Constant):
            if type(node.value) is not int:
                raise ValueError(f"only integer literals are allowed, got {node.value!r}")
        elif not isinstance(node, (ast.Expression, ast.operator)):
            # a bad expression, not a bad argument type: callers catch ValueError
            raise ValueError(f"{type(node).__name__} is not allowed (only + - * / and parentheses)")  # noqa: TRY004
    return tree


def _eval(node: ast.AST, values: dict[int, int] | None = None) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval(node.body, values)
    if isinstance(node, ast.Constant):
        return Fraction(values.get(node.value, node.value) if values else node.value)
    left, right = _eval(node.left, values), _eval(node.right, values)
    if isinstance(node.op, ast.Div) and right == 0:
        raise ValueError("division by zero")
    return _BINOPS[type(node.op)](left, right)


def evaluate_expression(expr: str) -> Fraction:
    """Exact value of an arithmetic expression, evaluated safely (parsed with ``ast``, never ``eval``):
    only non-negative integer literals, + - * / and parentheses; ``ValueError`` for anything else.

    >>> evaluate_expression("(25 - 1) * 3 / 9")
    Fraction(8, 1)
    >>> evaluate_expression("__import__('os').system('ls')")
    Traceback (most recent call last):
    ...
    ValueError: only digits, + - * / and parentheses are allowed: "__import__('os').system('ls')"
    """
    return _eval(_parse(expr))


def _literals(tree: ast.AST) -> list[int]:
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]


def _target(value) -> Fraction:
    return value if isinstance(value, Fraction) else Fraction(str(value).strip())


def countdown_check(expr: str | None, numbers: Sequence[int], target, *, use_all: bool = False) -> bool:
    """Whether ``expr`` solves the Countdown problem (``numbers``, ``target``): it evaluates to ``target``
    and uses each given number at most once (exactly once, all of them, with ``use_all=True``); a number
    that appears twice in ``numbers`` may be used twice.

    >>> countdown_check("(25 - 1) * 3", [1, 3, 25, 50], 72)
    True
    >>> countdown_check("25 * 3 - 1 - 1", [1, 3, 25, 50], 73)  # 1 used twice
    False
    >>> countdown_check("72 - 0", [1, 3, 25, 50], 72)  # literals that are not given numbers
    False
    >>> countdown_check("(25 - 1) * 3", [1, 3, 25, 50], 72, use_all=True)
    False
    """
    if not expr:
        return False
    try:
        tree = _parse(expr)
        used, given = Counter(_literals(tree)), Counter(int(n) for n in numbers)
        if used - given or (use_all and used != given):
            return False
        return _eval(tree) == _target(target)
    except (ValueError, TypeError, ZeroDivisionError):
        return False


def countdown_reward(prompts, completions, numbers, target, *, use_all: bool = False, **kw) -> list[float]:
    """Countdown reward: 1.0 if the completion's final expression (:func:`extract_expression`, e.g. in
    ``<answer>...</answer>``) solves the problem per :func:`countdown_check`, else 0.0.

    Rules: each given number at most once (the classic game; TinyZero's exactly-once rule with
    ``use_all=True``), only integer literals from ``numbers``, + - * / and parentheses, exact rational
    arithmetic (``6 / 4`` is ``3/2``, not rounded).

    >>> countdown_reward(None, ["<answer>(25 - 1) * 3</answer>", "<answer>25 * 3</answer>", "<answer>72</answer>"],
    ...                  numbers=[1, 3, 25, 50], target=72)
    [1.0, 0.0, 0.0]
    """
    n = len(completions)
    nums = _per_sample(numbers, n, "numbers", is_single=lambda v: bool(v) and all(isinstance(x, int) for x in v))
    targets = _per_sample(target, n, "target", is_single=_scalar)
    return [
        1.0 if countdown_check(extract_expression(completion_text(c)), ns, t, use_all=use_all) else 0.0
        for c, ns, t in zip(completions, nums, targets)
    ]


arithmetic_reward = countdown_reward
"""Alias of :func:`countdown_reward` (arithmetic-expression puzzles). For the addition/subtraction task
of :mod:`leantune.tasks.arithmetic` use its own ``reward``."""


def _number_text(value: Fraction):
    return int(value) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def relabel_countdown(numbers: Sequence[int], solution: str, k: int = 2, seed: int = 0, *, max_number: int = 99) -> list[dict]:
    """``k`` isomorphic variants of a Countdown problem: the numbers relabelled by a random injective map of
    values (equal numbers get equal new values, so the relabelling is consistent under any permutation of
    the positions) and the target recomputed from the reference ``solution`` on the new numbers.

    Each variant is ``{"numbers": [...], "target": t}`` with ``numbers`` aligned position by position with
    the original (``t`` is an int, or ``"p/q"`` when the relabelled solution is not whole). Variants whose
    target equals the original are avoided, so a constant expression cannot pass them.

    >>> relabel_countdown([1, 3, 25, 50], "(25 - 1) * 3", k=1, seed=0)  # 1->38, 3->88, 25->54: (54 - 38) * 88
    [{'numbers': [38, 88, 54, 97], 'target': 1408}]
    """
    tree = _parse(solution)
    base = _eval(tree)
    distinct = sorted({int(n) for n in numbers})
    rng = random.Random(f"countdown-variants|{seed}|{numbers}|{solution}")
    variants = []
    for _ in range(k):
        chosen = None
        for _attempt in range(100):
            mapping = dict(zip(distinct, rng.sample(range(1, max(max_number, len(distinct)) + 1), len(distinct))))
            try:
                value = _eval(tree, mapping)
            except ValueError:  # the relabelled solution divides by zero
                continue
            chosen = (mapping, value)
            if value != base:
                break
        if chosen is None:
            raise ValueError(f"could not relabel {numbers} for solution {solution!r} without dividing by zero")
        mapping, value = chosen
        variants.append({"numbers": [mapping[int(n)] for n in numbers], "target": _number_text(value)})
    return variants


# --------------------------------------------------------------------------------------------
# Format

DEFAULT_FORMAT = r"\s*<think>.*</think>\s*\S.*"


def format_reward(pattern: str = DEFAULT_FORMAT, *, flags: int = re.DOTALL) -> RewardFn:
    """A reward callable: 1.0 if the whole completion matches ``pattern`` (``re.fullmatch``), else 0.0.

    The default asks for a thinking span followed by a non-empty answer.

    >>> reward = format_reward()
    >>> reward(None, ["<think>3 * 8 = 24</think> 24", "24", "<think>3 * 8 = 24</think>  "])
    [1.0, 0.0, 0.0]
    >>> format_reward(r".*<answer>.+</answer>\\s*")(None, ["<answer>1 + 2</answer>"])
    [1.0]
    """
    regex = re.compile(pattern, flags)

    def reward(prompts, completions, **kw) -> list[float]:
        return [1.0 if regex.fullmatch(completion_text(c)) else 0.0 for c in completions]

    reward.__name__ = "format_reward"
    return reward


# --------------------------------------------------------------------------------------------
# Length


def length_aware_reward(correct: Sequence[bool], lengths: Sequence[int], group_size: int) -> list[float]:
    """Kimi k1.5 length reward (arXiv 2501.12599, section 2.3.3), per group of ``group_size`` consecutive
    completions of one prompt: ``lam = 0.5 - (len - min_len) / (max_len - min_len)`` (``lam = 0`` when all
    lengths are equal); the reward is ``lam`` if correct, else ``min(0, lam)``. Short correct answers gain,
    long ones lose; wrong answers are never rewarded for being short. Add it to the correctness reward
    with a weight (:func:`length_aware` makes it a reward callable).

    >>> length_aware_reward([True, False, True, False], [10, 20, 30, 10], group_size=4)
    [0.5, 0.0, -0.5, 0.0]
    >>> length_aware_reward([True, True], [7, 7], group_size=2)
    [0.0, 0.0]
    """
    if group_size < 1 or len(correct) != len(lengths) or len(lengths) % group_size:
        raise ValueError(
            f"need as many correct flags as lengths, a multiple of group_size >= 1; "
            f"got {len(correct)} flags, {len(lengths)} lengths, group_size={group_size}"
        )
    out = []
    for g in range(0, len(lengths), group_size):
        lens = lengths[g : g + group_size]
        lo, hi = min(lens), max(lens)
        for ok, length in zip(correct[g : g + group_size], lens):
            lam = 0.0 if hi == lo else 0.5 - (length - lo) / (hi - lo)
            out.append(lam if ok else min(0.0, lam))
    return out


def soft_overlong_penalty(lengths: Sequence[int], max_len: int, cache_len: int) -> list[float]:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), per completion length (tokens):
    0 up to ``max_len - cache_len``; then falling linearly, ``(max_len - cache_len - len) / cache_len``,
    to -1 at ``max_len``; -1 beyond ``max_len``.

    >>> soft_overlong_penalty([80, 90, 100, 120], max_len=100, cache_len=20)
    [0.0, -0.5, -1.0, -1.0]
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    free = max_len - cache_len
    return [0.0 if n <= free else (-1.0 if n > max_len else (free - n) / cache_len) for n in lengths]


def _lengths(completions, kw: dict, unit: str) -> list[int]:
    if unit == "chars":
        return [len(completion_text(c)) for c in completions]
    if unit != "tokens":
        raise ValueError(f"unit must be 'tokens' or 'chars', got {unit!r}")
    ids = kw.get("completion_ids")
    if ids is None:
        raise ValueError("unit='tokens' needs the completion_ids keyword (TRL passes it); use unit='chars' otherwise")
    return [len(x) for x in ids]


def length_aware(correctness: RewardFn, group_size: int, *, unit: str = "tokens") -> RewardFn:
    """A reward callable: :func:`length_aware_reward` with correct = ``correctness(...) > 0`` and lengths
    in tokens (from TRL's ``completion_ids``) or characters (``unit="chars"``).

    >>> reward = length_aware(exact_match_reward, group_size=3, unit="chars")
    >>> reward(None, ["4", "  4", "5 or so"], answer="4")
    [0.5, 0.16666666666666669, -0.5]
    """

    def reward(prompts, completions, **kw) -> list[float]:
        correct = [r > 0 for r in correctness(prompts, completions, **kw)]
        return length_aware_reward(correct, _lengths(completions, kw, unit), group_size)

    reward.__name__ = f"length_aware_{getattr(correctness, '__name__', 'reward')}"
    return reward


def overlong_penalty(max_len: int, cache_len: int, *, unit: str = "tokens") -> RewardFn:
    """A reward callable: :func:`soft_overlong_penalty` of each completion's length (tokens by default).

    >>> overlong_penalty(100, 20)(None, ["a", "b"], completion_ids=[[0] * 50, [0] * 95])
    [0.0, -0.75]
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")

    def reward(prompts, completions, **kw) -> list[float]:
        return soft_overlong_penalty(_lengths(completions, kw, unit), max_len, cache_len)

    reward.__name__ = "overlong_penalty"
    return reward


# --------------------------------------------------------------------------------------------
# Composition


def combine_rewards(terms: Iterable[tuple[RewardFn, float]]) -> RewardFn:
    """One reward callable returning ``sum(weight * fn(...))`` over ``(fn, weight)`` pairs; every ``fn``
    receives the same arguments (so each must accept ``**kw``).

    >>> r = combine_rewards([(exact_match_reward, 1.0), (format_reward(), 0.5)])
    >>> r(None, ["<think>x</think> 7", "7"], answer="7")
    [1.5, 1.0]
    >>> r.__name__
    '1*exact_match_reward+0.5*format_reward'
    """
    terms = [(fn, float(w)) for fn, w in terms]
    if not terms or not all(callable(fn) for fn, _ in terms):
        raise ValueError("combine_rewards needs a non-empty list of (callable, weight) pairs")

    def combined(prompts, completions, **kw) -> list[float]:
        total = [0.0] * len(completions)
        for fn, w in terms:
            scores = fn(prompts, completions, **kw)
            if len(scores) != len(total):
                raise ValueError(f"{getattr(fn, '__name__', fn)} returned {len(scores)} rewards for {len(total)} completions")
            total = [t + w * float(s) for t, s in zip(total, scores)]
        return total

    combined.__name__ = "+".join(f"{w:g}*{getattr(fn, '__name__', 'reward')}" for fn, w in terms)
    return combined


def with_isomorphic_variants(reward_fn: RewardFn, make_variants: Callable[[str, dict], list[tuple[str, dict]]]) -> RewardFn:
    """Isomorphic perturbation testing (arXiv 2604.15149): a completion keeps its reward only
    if the same solution, re-instantiated on relabelled variants of its task, also earns it.

    ``make_variants(completion_text, fields)`` gets one completion and its task fields (the keyword
    arguments for that sample) and returns ``(variant_completion, variant_fields)`` pairs: the
    completion's method carried over to a relabelled task (e.g. :func:`countdown_variants`). Each variant
    is scored by ``reward_fn`` (variant fields override the sample's fields; the prompt is the original).
    The result is the base reward if every variant scores at least as much, else 0. ``make_variants``
    returning ``[]`` means the task declares no variants (base reward kept); raising ``ValueError`` means
    the completion cannot be carried over (reward 0). Only completions with a positive base reward are
    checked.

    A solution that genuinely computes the answer from the task's data transfers to the relabelled task; a
    shortcut that encodes the answer (a hard-coded target, outputs memorised per test case) does not.

    >>> def lax(prompts, completions, target, **kw):  # a weak verifier: checks the value only
    ...     return [1.0 if countdown_check_value(extract_expression(c), t) else 0.0 for c, t in zip(completions, target)]
    >>> p = {"numbers": [1, 3, 25, 50], "target": 72, "variants": relabel_countdown([1, 3, 25, 50], "(25 - 1) * 3")}
    >>> guarded = with_isomorphic_variants(lax, countdown_variants)
    >>> completions = ["<answer>(25 - 1) * 3</answer>", "<answer>3 * (25 - 1)</answer>", "<answer>72 - 0</answer>"]
    >>> lax(None, completions, target=[72] * 3), guarded(None, completions, **{k: [v] * 3 for k, v in p.items()})
    ([1.0, 1.0, 1.0], [1.0, 1.0, 0.0])
    """
    generation_keys = {"completion_ids"}  # describe the original completion, not the variant

    def reward(prompts, completions, **kw) -> list[float]:
        n = len(completions)
        base = [float(r) for r in reward_fn(prompts, completions, **kw)]
        per_sample = {k for k, v in kw.items() if isinstance(v, (list, tuple)) and len(v) == n and k not in generation_keys}
        out = list(base)
        for i, score in enumerate(base):
            if score <= 0:
                continue
            fields = {k: (v[i] if k in per_sample else v) for k, v in kw.items() if k not in generation_keys}
            try:
                variants = make_variants(completion_text(completions[i]), fields)
            except ValueError:
                out[i] = 0.0
                continue
            if not variants:
                continue
            rows = [{**{k: fields[k] for k in per_sample}, **vf} for _, vf in variants]
            v_kw = {k: v for k, v in kw.items() if k not in per_sample and k not in generation_keys}
            v_kw.update({k: [row.get(k) for row in rows] for k in set().union(*rows)})
            m = len(variants)
            v_prompts = [prompts[i]] * m if prompts is not None else None
            scores = reward_fn(v_prompts, [c for c, _ in variants], **v_kw)
            if min(float(s) for s in scores) < score - 1e-9:
                out[i] = 0.0
        return out

    reward.__name__ = f"isomorphic_{getattr(reward_fn, '__name__', 'reward')}"
    return reward


def countdown_check_value(expr: str | None, target) -> bool:
    """Whether ``expr`` evaluates to ``target``, ignoring which numbers it uses: a deliberately weak
    verifier, for showing what :func:`with_isomorphic_variants` catches.

    >>> countdown_check_value("72 - 0", 72)
    True
    """
    try:
        return expr is not None and evaluate_expression(expr) == _target(target)
    except (ValueError, ZeroDivisionError):
        return False


def countdown_variants(completion: str, fields: dict) -> list[tuple[str, dict]]:
    """``make_variants`` for Countdown (:func:`with_isomorphic_variants`): the completion's expression with
    the same structure re-instantiated on each declared variant of its problem.

    The task declares variants in ``fields["variants"]`` (as :func:`leantune.tasks.countdown.countdown_problems` does), or gives a
    reference ``fields["solution"]`` from which two are made (:func:`relabel_countdown`); with neither there
    are no variants. Every literal of the expression that is one of the given numbers is replaced by its
    relabelled value (equal numbers relabel equally, so it does not matter which occurrence a literal
    stands for); literals that are not given numbers stay as they are. The variant completion is
    ``<answer>expression</answer>``.

    What it catches: any expression whose value does not follow the numbers the way the task's
    computation does: a hard-coded target (``72``, ``72 - 0``, ``72 * 1``), constants smuggled in next to
    the numbers, or an expression that hits the target by coincidence. The price: a correct alternative
    solution that is not the reference computation up to algebra (``3 * (25 - 1)``, ``25*3 - 3`` are
    equivalent; ``50 + 25 - 3`` is not) also fails, because on relabelled numbers the two differ. Use it to
    guard weak or value-only verifiers, where hard-coding pays, or weight it rather than gate with it.

    >>> countdown_variants("<answer>(25 - 1) * 3</answer>", {"numbers": [1, 3, 25, 50], "target": 72,
    ...                    "variants": [{"numbers": [2, 4, 30, 60], "target": 112}]})
    [('<answer>(30 - 2) * 4</answer>', {'numbers': [2, 4, 30, 60], 'target': 112})]
    """
    numbers = [int(x) for x in fields.get("numbers") or []]
    variants = fields.get("variants")
    if not variants and fields.get("solution"):
        variants = relabel_countdown(numbers, str(fields["solution"]))
    if not variants:
        return []
    expr = extract_expression(completion)
    if expr is None:
        raise ValueError("no expression to carry over")
    tree = _parse(expr)
    out = []
    for variant in variants:
        new_numbers = [int(x) for x in variant["numbers"]]
        if len(new_numbers) != len(numbers):
            raise ValueError(f"variant has {len(new_numbers)} numbers, the problem {len(numbers)}")
        mapping = dict(zip(numbers, new_numbers))
        relabelled = _relabel_literals(tree, mapping)
        out.append((f"<answer>{ast.unparse(relabelled)}</answer>", {"numbers": new_numbers, "target": variant["target"]}))
    return out


class _Relabel(ast.NodeTransformer):
    def __init__(self, mapping: dict[int, int]):
        self.mapping = mapping

    def visit_Constant(self, node: ast.Constant) -> ast.Constant:
        return ast.Constant(self.mapping.get(node.value, node.value))


def _relabel_literals(tree: ast.Expression, mapping: dict[int, int]) -> ast.AST:
    return _Relabel(mapping).visit(copy.deepcopy(tree)).body


# --------------------------------------------------------------------------------------------
# The registry: reward names a recipe's `rl.rewards` may use


class RewardSpec:
    """One named reward term: ``make(rl_config, correctness) -> reward callable``. ``verifier``: this term can
    also serve as the pass/fail check (pass@k, prompt selection) when no task is set; ``needs_task``: it is
    built from `rl.task`'s verifier."""

    def __init__(self, make: Callable, help: str, *, verifier: RewardFn | None = None, needs_task: bool = False):
        self.make, self.help, self.verifier, self.needs_task = make, help, verifier, needs_task


REWARDS: dict[str, RewardSpec] = {
    "task": RewardSpec(lambda rl, correct: correct, "the task's verifier: 1.0 if correct, else 0.0", needs_task=True),
    "task_isomorphic": RewardSpec(
        lambda rl, correct: _isomorphic_task_reward(rl.task, correct),
        "the task's verifier, kept only if the completion also solves relabelled variants of its problem "
        "(isomorphic perturbation testing, arXiv 2604.15149; tasks with make_variants: countdown)", needs_task=True),
    "length_aware": RewardSpec(
        lambda rl, correct: length_aware(correct, rl.group_size),
        "Kimi k1.5 length reward (arXiv 2501.12599), added as a weighted term: per group, lam = 0.5 - "
        "(len - min)/(max - min); lam if correct, else min(0, lam)", needs_task=True),
    "format": RewardSpec(lambda rl, correct: format_reward(), "1.0 for '<think>...</think> answer', else 0.0"),
    "overlong": RewardSpec(
        lambda rl, correct: overlong_penalty(rl.max_new_tokens, max(1, min(rl.overlong_buffer, rl.max_new_tokens))),
        "DAPO's soft overlong penalty (arXiv 2503.14476): 0 down to -1 over the last rl.overlong_buffer tokens"),
    "exact_match": RewardSpec(lambda rl, correct: exact_match_reward, "final text == the row's `answer`",
                              verifier=exact_match_reward),
    "math": RewardSpec(lambda rl, correct: math_answer_reward, "\\boxed{} / #### answer == the row's `answer`",
                       verifier=math_answer_reward),
}


def _isomorphic_task_reward(task_name: str, correct: RewardFn) -> RewardFn:
    """``correct`` guarded by the task's own ``make_variants`` (:func:`with_isomorphic_variants`)."""
    from leantune.tasks import get_task

    return with_isomorphic_variants(correct, get_task(task_name).make_variants)


def check_reward_names(rewards: dict[str, float], task: str | None) -> None:
    """ValueError for a recipe's `rl.rewards` that cannot be built (the config validator calls this)."""
    unknown = [n for n in rewards if n not in REWARDS and ":" not in n]
    if unknown:
        raise ValueError(f"unknown reward {unknown[0]!r}; available: {', '.join(REWARDS)}, or 'package.module:function' "
                         "for your own")
    if task is None:
        needing = [n for n in rewards if n in REWARDS and REWARDS[n].needs_task]
        if needing:
            raise ValueError(f"{needing[0]!r} is built from rl.task's verifier; set rl.task")
        if not any(":" in n or REWARDS[n].verifier is not None for n in rewards):
            raise ValueError("name a verifier: set rl.task, or use an 'exact_match', 'math' or 'module:function' reward")
    elif "task_isomorphic" in rewards:
        from leantune.tasks import available_tasks, get_task

        if not callable(getattr(get_task(task), "make_variants", None)):
            having = [t for t in available_tasks() if callable(getattr(get_task(t), "make_variants", None))]
            raise ValueError(f"'task_isomorphic' needs a task that declares isomorphic variants (make_variants); "
                             f"rl.task={task!r} does not. Tasks that do: {', '.join(having)}")


def import_reward(spec: str) -> RewardFn:
    """The callable named by ``package.module:function``: your own reward, ``(prompts, completions, **fields)
    -> list[float]``. Only code importable on your Python path runs; nothing is fetched."""
    import importlib

    module, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"rl.rewards: cannot import {spec!r}: {err}") from None
    if not callable(fn):
        raise ValueError(f"rl.rewards: {spec!r} is not callable")
    return fn


def build_rewards(rl) -> tuple[RewardFn, RewardFn, object]:
    """(total reward, correctness, task module or None) for an `RLConfig`: callables ``(prompts, completions,
    **fields) -> list[float]``. Correctness (pass/fail, for pass@k and prompt selection) is the task's verifier,
    else exact_match, math or your own term, in that order, if named in `rl.rewards`."""
    from leantune.tasks import get_task

    check_reward_names(rl.rewards, rl.task)
    task = get_task(rl.task) if rl.task else None
    custom = {n: import_reward(n) for n in rl.rewards if ":" in n}
    if task is not None:
        correctness = task.reward
    else:
        builtin = [REWARDS[n].verifier for n in REWARDS if n in rl.rewards and REWARDS[n].verifier is not None]
        correctness = (builtin + list(custom.values()))[0]  # exact_match, then math, then your own
    terms = [(custom[n] if n in custom else REWARDS[n].make(rl, correctness), w) for n, w in rl.rewards.items()]
    return combine_rewards(terms), correctness, task
