"""Countdown with a calculator: the problems, verifier and reward of :mod:`leantune.tasks.countdown`, with a
prompt that tells the policy it may call a calculator (`rl.tools`, ``leantune.rl.tools``) and a worked
solution that shows the syntax.

A call is ``<calc>EXPR</calc>`` (+ - * / and parentheses on non-negative integers); the rollout appends the
exact value as ``<result>VALUE</result>`` and the policy goes on. These are `ToolsConfig`'s default markers;
a recipe that changes them should not use this task's prompt. The answer is still checked by the Countdown
verifier on ``<answer>...</answer>``: the calculator only helps with the search, it is not the answer.

>>> p = generate(1, seed=0)[0]
>>> "<calc>" in p["prompt"] and "<calc>" in p["completion"], verify(p["completion"], p["answer"])
(True, True)
"""

from __future__ import annotations

from leantune.tasks import countdown
from leantune.tasks.countdown import (  # noqa: F401  (the task interface, unchanged)
    SPLITS,
    extract_answer,
    is_complete,
    make_variants,
    reward,
    solution_steps,
    split_of,
    verify,
    write_jsonl,
)

NAME = "countdown_calculator"

CALCULATOR_HINT = (" You may use a calculator: write <calc>expression</calc> (e.g. <calc>(25 - 1) * 3</calc>) and "
                   "its value comes back as <result>value</result>.")

def worked_solution(numbers: list[int], target: int, solution: str) -> str:
    """The SFT completion: each step of the reference computation asked of the calculator, then the answer.

    >>> worked_solution([1, 3, 25, 50], 122, "(25 - 1) * 3 + 50")
    '<think>Target 122 from 1, 3, 25, 50. <calc>25 - 1</calc><result>24</result> <calc>24 * 3</calc><result>72</result> <calc>72 + 50</calc><result>122</result> That is 122.</think> <answer>(25 - 1) * 3 + 50</answer>'
    """
    calls = " ".join(f"<calc>{step.split(' = ')[0]}</calc><result>{step.split(' = ')[1]}</result>"
                     for step in solution_steps(solution))
    return (f"<think>Target {target} from {', '.join(map(str, numbers))}. {calls} That is {target}.</think> "
            f"<answer>{solution}</answer>")

def generate(n: int, seed: int = 0, split: str = "train", *, count: int = 4) -> list[dict]:
    """Countdown's problems (the same ones, same split) with the calculator described in the prompt."""
    out = []
    for p in countdown.generate(n, seed=seed, split=split, count=count):
        p = dict(p, prompt=p["prompt"] + CALCULATOR_HINT)
        p["completion"] = worked_solution(p["numbers"], p["target"], p["solution"])
        out.append(p)
    return out

