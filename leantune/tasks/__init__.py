"""Bundled verifiable tasks: problem generators with worked solutions, answer checkers and rewards.

Each task is a module exposing ``NAME``, ``generate(n, seed, split)``, ``extract_answer``,
``verify(completion, answer)``, ``reward``, ``is_complete`` and ``write_jsonl``; optionally
``make_variants`` (isomorphic variants of a problem, arXiv 2604.15149: the ``task_isomorphic`` reward).
Every generated problem holds ``prompt``, ``completion`` (a worked solution) and ``answer`` (a string:
whatever ``verify`` needs, e.g. a JSON object for countdown and code), so ``verify(completion,
problem["answer"])`` checks any task. ``docs/tasks.md`` describes each task.

>>> get_task("arithmetic").NAME
'arithmetic'
>>> available_tasks()
['addition', 'arithmetic', 'code', 'countdown', 'countdown_calculator', 'multistep']
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable
from types import ModuleType

_TASKS = {
    "addition": "leantune.tasks.addition",
    "arithmetic": "leantune.tasks.arithmetic",
    "code": "leantune.tasks.code",
    "countdown": "leantune.tasks.countdown",
    "countdown_calculator": "leantune.tasks.countdown_calculator",
    "multistep": "leantune.tasks.multistep",
}


class UnknownTaskError(ValueError):
    """A task name that is not bundled; the message lists the available tasks."""


def available_tasks() -> list[str]:
    """Names of the bundled tasks."""
    return sorted(_TASKS)


def get_task(name: str) -> ModuleType:
    """The task module called ``name``.

    >>> get_task("arithmatic")
    Traceback (most recent call last):
    ...
    leantune.tasks.UnknownTaskError: unknown task 'arithmatic' (did you mean 'arithmetic'?); available tasks: addition, arithmetic, code, countdown, countdown_calculator, multistep
    """
    key = str(name).strip().lower()
    if key not in _TASKS:
        close = difflib.get_close_matches(key, list(_TASKS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownTaskError(f"unknown task {name!r}{hint}; available tasks: {', '.join(available_tasks())}")
    return importlib.import_module(_TASKS[key])


def distinct_problems(name: str, n: int, seed: int, split: str, splits: tuple[str, ...], templates: dict,
                      chosen, make, split_of) -> list[dict]:
    """``n`` distinct problems of ``split`` from template generators, deterministic in the arguments.

    ``chosen``: template names (None: all of ``templates``); ``make(template_output) -> problem dict`` with a
    ``prompt``; ``split_of(prompt) -> split``. A problem whose prompt was seen or belongs to the other split is
    skipped; ValueError after too many tries, naming how many were found.
    """
    import random

    if split not in splits:
        raise ValueError(f"unknown split {split!r}; expected one of {splits}")
    if n < 0:
        raise ValueError("n must be >= 0")
    names = list(chosen or templates)
    bad = [t for t in names if t not in templates]
    if bad:
        raise ValueError(f"unknown template(s) {bad}; available: {', '.join(templates)}")
    rng = random.Random(f"{name}|{seed}|{split}|{','.join(names)}")
    seen: set[str] = set()
    out: list[dict] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise ValueError(f"only {len(out)} distinct {split} problems found for templates {names}; asked for {n}")
        problem = make(templates[rng.choice(names)](rng))
        if problem["prompt"] in seen or split_of(problem["prompt"]) != split:
            continue
        seen.add(problem["prompt"])
        out.append(problem)
    return out


def completion_text(completion) -> str:
    """Plain text of a completion: a string, or a chat-style message / list of messages (TRL's
    conversational format).

    >>> completion_text([{"role": "assistant", "content": "42"}])
    '42'
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, Iterable):
        return "".join(completion_text(m) for m in completion)
    return ""


__all__ = ["UnknownTaskError", "available_tasks", "completion_text", "distinct_problems", "get_task"]
