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
['addition', 'arithmetic', 'code', 'countdown', 'multistep']
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
    leantune.tasks.UnknownTaskError: unknown task 'arithmatic' (did you mean 'arithmetic'?); available tasks: addition, arithmetic, code, countdown, multistep
    """
    key = str(name).strip().lower()
    if key not in _TASKS:
        close = difflib.get_close_matches(key, list(_TASKS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownTaskError(f"unknown task {name!r}{hint}; available tasks: {', '.join(available_tasks())}")
    return importlib.import_module(_TASKS[key])


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


__all__ = ["UnknownTaskError", "available_tasks", "completion_text", "get_task"]
