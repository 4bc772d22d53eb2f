"""Messages and progress bars for the command line: ``leantune --quiet`` / ``--verbose``.

Diagnostics go through the ``logging`` module (loggers under ``leantune``), to stderr, as
``[leantune] message``; results (JSON, tables, the ledger summary) are printed to stdout by the commands,
so ``leantune eval ... > result.json`` stays clean. Levels:

- default: info and up, progress bars on;
- ``--quiet``: warnings and errors only, no progress bars (leantune's nor Hugging Face's);
- ``--verbose``: debug too (per-stage timings of model loading, trackers started, ...).

Library use (``from leantune.train.sft import train``) leaves logging alone until ``configure_logging`` is
called; Python then shows warnings only, and progress bars stay on.

>>> import logging
>>> configure_logging(quiet=True); progress_enabled(), logging.getLogger("leantune").level == logging.WARNING
(False, True)
>>> configure_logging(); progress_enabled()
True
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "leantune"
_state = {"progress": True, "env_set": []}


class _Format(logging.Formatter):
    """``[leantune] text``; warnings and errors say so; debug lines name their module."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            return f"[leantune] {record.levelname.lower()}: {text}"
        if record.levelno < logging.INFO:
            return f"[leantune] debug ({record.name}): {text}"
        return f"[leantune] {text}"


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the moment (pytest swaps it per test), through ``tqdm.write``
    so that a message never tears a progress bar in two."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 -- logging must not raise
            self.handleError(record)


def configure_logging(*, quiet: bool = False, verbose: bool = False) -> None:
    """Set up the ``leantune`` loggers for the command line (idempotent: call again to change the level)."""
    if quiet and verbose:
        raise ValueError("--quiet and --verbose contradict each other; give one")
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(_Format())
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    _state["progress"] = not quiet
    _quiet_hugging_face(quiet)


def _quiet_hugging_face(quiet: bool) -> None:
    """Hugging Face's own bars (weight loading, downloads) follow --quiet; undone by a later non-quiet call."""
    for name in _state["env_set"]:
        os.environ.pop(name, None)
    _state["env_set"] = []
    if quiet and "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ:  # read when huggingface_hub is imported
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        _state["env_set"].append("HF_HUB_DISABLE_PROGRESS_BARS")
    if "transformers" in sys.modules:  # already imported: its switch, not the environment, decides
        from transformers.utils import logging as hf_logging

        (hf_logging.disable_progress_bar if quiet else hf_logging.enable_progress_bar)()


def progress_enabled() -> bool:
    """False under ``--quiet``: every progress bar passes ``disable=not progress_enabled()``."""
    return _state["progress"]


def progress_bar(iterable=None, *, total: int | None = None, desc: str | None = None, unit: str = "it",
                 leave: bool = False, **kwargs):
    """A tqdm bar on stderr that obeys ``--quiet``; by default it clears itself when done (``leave=False``)."""
    from tqdm.auto import tqdm

    disable = kwargs.pop("disable", False) or not progress_enabled()
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, disable=disable, **kwargs)
