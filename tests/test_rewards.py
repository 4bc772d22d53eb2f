"""Reward functions: hand-checked examples (the modules' doctests run too, via --doctest-modules)."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest

from leantune.tasks.countdown import countdown_problems
from leantune.rl.rewards import (
    combine_rewards,
    countdown_check,
    countdown_check_value,
    countdown_reward,
    countdown_variants,
    evaluate_expression,
    exact_match_reward,
    extract_expression,
    extract_math_answer,
    format_reward,
    length_aware,
    length_aware_reward,
    math_answer_reward,
    normalize_math_answer,
    overlong_penalty,
    relabel_countdown,
    soft_overlong_penalty,
    with_isomorphic_variants,
)

# --------------------------------------------------------------------------------------------
# Exact and math answers


def test_exact_match():
    completions = ["<think>a</think> 42", [{"role": "assistant", "content": "42\n"}], "<think>42", "41"]
    assert exact_match_reward(None, completions, answer=["42", "42", "42", "42"]) == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="2 completions but 3"):
        exact_match_reward(None, ["a", "b"], answer=["a", "b", "c"])


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{42}", "42"),
        (r"first \boxed{1} then \boxed{\frac{a}{b^{2}}}", r"\frac{a}{b^{2}}"),
        (r"\boxed{{nested} {braces}}", "{nested} {braces}"),
        (r"\fbox{7}", "7"),
        ("work...\n#### 1,234\nextra line", "1,234"),
        (r"\boxed{unclosed", None),
        ("just text 5", None),
    ],
)
def test_extract_math_answer(text, expected):
    assert extract_math_answer(text) == expected


@pytest.mark.parametrize(
    "a, b",
    [("1,000", "1000"), ("0.50", "0.5"), ("0.5", "1/2"), (r"\frac{1}{2}", ".5"), ("$12$", "12"), ("-3", "\u22123"),
     ("5.", "5"), (r"\text{Paris}", "Paris"), (r"\left(1, 2\right)", "(1,2)"), ("1e3", "1e3")],
)
def test_normalize_math_answer_equal(a, b):
    assert normalize_math_answer(a) == normalize_math_answer(b)


@pytest.mark.parametrize("a, b", [("1,000", "1"), ("0.5", "0.51"), ("1,2", "12"), ("x+1", "x-1")])
def test_normalize_math_answer_different(a, b):
    assert normalize_math_answer(a) != normalize_math_answer(b)


def test_math_answer_reward():
    completions = [r"... so the answer is \boxed{1,000}.", "#### 0.50", r"\boxed{\dfrac{1}{2}}", "1000", r"\boxed{999}"]
    assert math_answer_reward(None, completions, answer=["1000", "1/2", "0.5", "1000", "1000"]) == [1.0, 1.0, 1.0, 0.0, 0.0]


# --------------------------------------------------------------------------------------------
# Countdown


def test_countdown_reward_rules():
    numbers, target = [1, 3, 25, 50], 72
    cases = {
        "<think>24*3</think><answer>(25 - 1) * 3</answer>": 1.0,
        "<answer>3 * (25 - 1) = 72</answer>": 1.0,  # a trailing "= value" is ignored
        "<answer>(25 - 1) * 3 * 1</answer>": 0.0,  # 1 used twice
        "<answer>72</answer>": 0.0,  # the target is not a given number
        "<answer>72 - 0</answer>": 0.0,
        "<answer>(50 + 25 - 3) * 1</answer>": 1.0,  # another valid solution
        "<answer>25 * 3</answer>": 0.0,  # wrong value
        "no answer at all": 0.0,
    }
    assert countdown_reward(None, list(cases), numbers=numbers, target=target) == list(cases.values())


def test_countdown_exact_division_and_duplicates():
    assert countdown_check("6 / 4 * 2", [6, 4, 2], 3)  # exact rationals: 6/4 is 3/2
    assert not countdown_check("7 / 2", [7, 2], 3)  # no rounding
    assert countdown_check("5 * 5 - 2", [5, 5, 2], 23)  # a number given twice may be used twice
    assert not countdown_check("5 * 5 - 2", [5, 2], 23)
    assert countdown_check("1 / 3", [1, 3], "1/3")
    assert not countdown_check("5 / (3 - 3)", [5, 3, 3], 1)  # division by zero is a failure, not a crash
    assert countdown_check("(1 + 2) * 3", [1, 2, 3], 9, use_all=True)
    assert not countdown_check("(1 + 2) * 3", [1, 2, 3, 4], 9, use_all=True)


@pytest.mark.parametrize(
    "expr",
    ["__import__('os').system('echo hacked')", "2 ** 10", "7 // 2", "7 % 2", "-3 + 5", "1.5 * 2", "abs(3)", "x + 1",
     "(lambda: 1)()", "[1, 2]", "1 if 1 else 2", "1 +", "9 ** 9 ** 9", "1" + "+1" * 150],
)
def test_unsafe_or_invalid_expressions_are_rejected(expr):
    start = time.monotonic()
    with pytest.raises(ValueError):
        evaluate_expression(expr)
    assert not countdown_check(expr, list(range(10)), 1)
    assert time.monotonic() - start < 1.0


def test_extract_expression():
    assert extract_expression("<answer>1 + 2</answer> wait <answer> 3 * 4 </answer>") == "3 * 4"
    assert extract_expression("<think>hmm</think>\nSo:\n(1 + 2) * 3 = 9\n") == "(1 + 2) * 3"
    assert extract_expression("<think>never closed") is None


def test_countdown_problems():
    problems = countdown_problems(20, seed=3)
    assert problems == countdown_problems(20, seed=3)
    assert problems != countdown_problems(20, seed=4)
    assert problems[:5] == countdown_problems(5, seed=3)
    for p in problems:
        assert len(p["numbers"]) == 4 and all(1 <= x <= 99 for x in p["numbers"])
        assert 1 <= p["target"] <= 999 and p["target"] not in p["numbers"]
        assert countdown_check(p["solution"], p["numbers"], p["target"], use_all=True)
        assert countdown_reward(None, [f"<answer>{p['solution']}</answer>"], [p["numbers"]], [p["target"]]) == [1.0]
        # the reference re-instantiated on each variant's numbers reaches that variant's target
        for (completion, fields), variant in zip(countdown_variants(f"<answer>{p['solution']}</answer>", p), p["variants"]):
            assert countdown_check(extract_expression(completion), fields["numbers"], fields["target"])
            assert variant["target"] != p["target"]
    small = countdown_problems(5, seed=0, count=3, max_number=10, max_target=50)
    assert all(len(p["numbers"]) == 3 and p["target"] <= 50 for p in small)


def test_relabelling_is_consistent_for_repeated_numbers():
    variants = relabel_countdown([5, 5, 2], "5 * 5 - 2", k=3, seed=1)
    for v in variants:
        a, b, c = v["numbers"]
        assert a == b and a != c  # equal numbers relabel equally, distinct ones distinctly
        assert Fraction(str(v["target"])) == a * b - c


# --------------------------------------------------------------------------------------------
# Format and length


def test_format_reward():
    reward = format_reward()
    texts = ["<think>x</think> 5", "  <think>\nmulti\nline\n</think>\n\n5 apples", "5", "<think>x</think>", "<think>x 5"]
    assert reward(None, texts) == [1.0, 1.0, 0.0, 0.0, 0.0]
    answer_tag = format_reward(r"<think>.*?</think>\s*<answer>[^<]+</answer>\s*")
    assert answer_tag(None, ["<think>a</think> <answer>1 + 2</answer>", "<think>a</think> 1 + 2"]) == [1.0, 0.0]


def test_length_aware_reward_kimi():
    correct = [True, True, False, False, True, False]
    lengths = [100, 300, 200, 50, 50, 50]  # two groups of 3
    # group 1: min 100, max 300 -> lam = 0.5, -0.5, 0.0 ; group 2: min = max = 50 -> lam = 0
    assert length_aware_reward(correct, lengths, group_size=3) == [0.5, -0.5, 0.0, 0.0, 0.0, 0.0]
    # wrong answers are never rewarded for being short (min(0, lam))
    assert length_aware_reward([False, False], [10, 20], group_size=2) == [0.0, -0.5]
    with pytest.raises(ValueError, match="multiple of group_size"):
        length_aware_reward([True] * 5, [1] * 5, group_size=2)


def test_length_aware_callable_uses_token_ids():
    reward = length_aware(exact_match_reward, group_size=2)
    got = reward(None, ["a", "a"], answer="a", completion_ids=[[1] * 10, [1] * 30])
    assert got == [0.5, -0.5]
    with pytest.raises(ValueError, match="completion_ids"):
        reward(None, ["a", "a"], answer="a")


def test_soft_overlong_penalty_dapo():
    # max_len 16, cache 4: free up to 12, linear to -1 at 16, -1 beyond
    assert soft_overlong_penalty([0, 12, 13, 14, 16, 17, 100], max_len=16, cache_len=4) == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]
    with pytest.raises(ValueError):
        soft_overlong_penalty([1], max_len=10, cache_len=0)
    with pytest.raises(ValueError):
        soft_overlong_penalty([1], max_len=10, cache_len=11)
    assert overlong_penalty(16, 4)(None, ["x", "y"], completion_ids=[[0] * 12, [0] * 14]) == [0.0, -0.5]


# --------------------------------------------------------------------------------------------
# Composition


def test_combine_rewards():
    def always(prompts, completions, **kw):
        return [1.0] * len(completions)

    combined = combine_rewards([(exact_match_reward, 2.0), (always, -0.5), (format_reward(), 1.0)])
    assert combined(["p", "q"], ["<think>t</think> 7", "8"], answer=["7", "7"]) == [2.5, -0.5]
    assert combined.__name__ == "2*exact_match_reward+-0.5*always+1*format_reward"

    def broken(prompts, completions, **kw):
        return [1.0]

    with pytest.raises(ValueError, match="broken returned 1 rewards for 2"):
        combine_rewards([(broken, 1.0)])(None, ["a", "b"])
    with pytest.raises(ValueError):
        combine_rewards([])


def _value_only(prompts, completions, target, **kw):
    """A weak Countdown verifier that checks only the value: hard-coding the target games it."""
    return [1.0 if countdown_check_value(extract_expression(c), t) else 0.0 for c, t in zip(completions, target)]


def test_isomorphic_variants_catch_hard_coded_targets():
    problem = countdown_problems(1, seed=11)[0]
    numbers, target, solution = problem["numbers"], problem["target"], problem["solution"]
    hacks = [f"<answer>{target}</answer>", f"<answer>{target} - 0</answer>", f"<answer>{target} * 1</answer>",
             f"<answer>{numbers[0]} - {numbers[0]} + {target}</answer>"]
    honest = [f"<answer>{solution}</answer>", f"<answer>({solution})</answer>", f"<answer>{solution} + 0</answer>"]
    completions = hacks + honest
    fields = {k: [problem[k]] * len(completions) for k in ("numbers", "target", "variants")}
    assert _value_only(None, completions, **fields) == [1.0] * len(completions)  # the weak verifier is fooled
    guarded = with_isomorphic_variants(_value_only, countdown_variants)
    # "+ 0" still computes the target from the numbers, so it transfers (the strict verifier rejects the 0)
    assert guarded(None, completions, **fields) == [0.0] * len(hacks) + [1.0] * len(honest)
    assert guarded.__name__ == "isomorphic__value_only"


def test_isomorphic_variants_with_the_strict_verifier():
    fields = {"numbers": [1, 3, 25, 50], "target": 72, "solution": "(25 - 1) * 3"}
    guarded = with_isomorphic_variants(countdown_reward, countdown_variants)
    completions = [
        "<answer>(25 - 1) * 3</answer>",
        "<answer>3 * 25 - 3 * 1</answer>",  # 3 used twice: invalid anyway
        "<answer>25 * 3 - 3</answer>",  # 3 used twice: invalid anyway
        "<answer>3 * (25 - 1)</answer>",  # same computation, reordered
        "<answer>50 + 25 - 3</answer>",  # correct but a different computation: fails the variants (documented)
    ]
    columns = {k: [v] * len(completions) for k, v in fields.items()}
    assert countdown_reward(None, completions, **columns) == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert guarded(None, completions, **columns) == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_isomorphic_variants_plumbing():
    seen = []

    def reward(prompts, completions, answer, flag=None, **kw):
        seen.append((prompts, list(completions), answer, flag, sorted(kw)))
        return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]

    def variants(completion, fields):
        if completion == "raise":
            raise ValueError("cannot carry over")
        if completion == "none":
            return []
        return [(completion.upper(), {"answer": fields["answer"].upper()}), (completion, {"answer": "other"})]

    guarded = with_isomorphic_variants(reward, variants)
    out = guarded(["p1", "p2", "p3", "p4"], ["ab", "raise", "none", "zz"], answer=["ab", "raise", "none", "no"],
                  flag="shared", completion_ids=[[1], [2], [3], [4]])
    # "ab" passes its base check but not the second variant; "raise" cannot be carried over; "none" declares
    # no variants (base kept); "zz" has base 0 and is not checked.
    assert out == [0.0, 0.0, 1.0, 0.0]
    assert len(seen) == 2
    prompts, comps, answers, flag, other = seen[1]
    assert prompts == ["p1", "p1"] and comps == ["AB", "ab"] and answers == ["AB", "other"]
    assert flag == "shared" and other == []  # non-column kwargs pass through; completion_ids do not


def test_isomorphic_variants_for_programs():
    # A program run on variant inputs: hard-coding the visible test's output does not transfer.
    def variant_tests(completion, fields):
        return [(completion, {"tests": fields["hidden_tests"]})]

    from leantune.rl.rewards import code_reward

    guarded = with_isomorphic_variants(code_reward, variant_tests)
    genuine = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    hard_coded = "```python\nprint(5)\n```"
    visible = [{"input": "2 3", "output": "5"}]
    hidden = [{"input": "7 8", "output": "15"}]
    got = guarded(None, [genuine, hard_coded], tests=[visible, visible], hidden_tests=[hidden, hidden])
    assert got == [1.0, 0.0]
