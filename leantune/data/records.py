"""Read and validate training records from JSON Lines or Parquet files (and, through
:mod:`leantune.data.sources`, from csv/json/arrow files, ``save_to_disk`` directories and hub datasets).

Two record shapes are accepted (extra keys such as ``id`` or ``meta`` are ignored):

- prompt/completion: ``{"prompt": "What is 2 + 2?", "completion": "<think>2 + 2 = 4</think> 4"}``
- messages: ``{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}``;
  the conversation must contain an assistant message, and the last message must be one (it is the
  turn that is trained on).

Every problem raises :class:`DataError` whose message starts with the location -- ``file:line``
(1-based, blank lines count) for JSON Lines, ``file:row N`` (0-based, as in ``pandas.iloc``) for
Parquet and other dataset rows (``source[split]:row N`` for a named split) -- then names the field and
says what to do.

>>> import json, tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "d.jsonl"
>>> _ = p.write_text(json.dumps({"prompt": "2+2=", "completion": "4"}) + "\\n\\n" + '{"prompt": "x"}\\n')
>>> read_records(p)
Traceback (most recent call last):
...
leantune.data.records.DataError: ...d.jsonl:3: missing field 'completion' (record has: prompt). Every prompt/completion record needs both 'prompt' and 'completion' strings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".json-lines", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
RecordFormat = Literal["auto", "prompt_completion", "messages"]


class DataError(ValueError):
    """A training file or record that cannot be used; the message says where, which field, and what to do."""


@dataclass(frozen=True)
class Record:
    """One validated record: ``data`` is the raw dict, ``source`` is ``file:line`` or ``file:row N``,
    ``kind`` is ``"prompt_completion"`` or ``"messages"``."""

    data: dict
    source: str
    kind: str


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _require_string(data: dict, key: str, where: str, hint: str) -> None:
    if key not in data or data[key] is None:
        have = ", ".join(sorted(k for k, v in data.items() if v is not None)) or "no fields"
        raise DataError(f"{where}: missing field {key!r} (record has: {have}). {hint}")
    if not isinstance(data[key], str):
        value = data[key]
        raise DataError(
            f"{where}: field {key!r} must be a string, got {_type_name(value)} ({_short(value)}). {hint}"
        )


def _check_prompt_completion(data: dict, where: str) -> None:
    hint = "Every prompt/completion record needs both 'prompt' and 'completion' strings."
    _require_string(data, "prompt", where, hint)
    _require_string(data, "completion", where, hint)


def _check_messages(data: dict, where: str) -> None:
    messages = data.get("messages")
    hint = 'Expected "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}].'
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if messages == [] else f"{_type_name(messages)} ({_short(messages)})"
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects, got {got}. {hint}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: field 'messages[{i}]' must be an object with 'role' and 'content', got {_type_name(m)} ({_short(m)}). {hint}")
        for key in ("role", "content"):
            if m.get(key) is None:
                raise DataError(f"{where}: missing field 'messages[{i}].{key}'. {hint}")
            if not isinstance(m[key], str):
                fix = "Multi-part (list) content is not supported; join the text parts." if isinstance(m[key], list) else hint
                raise DataError(
                    f"{where}: field 'messages[{i}].{key}' must be a string, got {_type_name(m[key])} ({_short(m[key])}). {fix}"
                )
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise DataError(
            f"{where}: field 'messages' has no assistant message (roles: {', '.join(roles)}). "
            "The last assistant message is the training target; add one or drop the record."
        )
    if roles[-1] != "assistant":
        last = len(roles) - 1 - roles[::-1].index("assistant")
        raise DataError(
            f"{where}: field 'messages[{len(roles) - 1}]' has role {roles[-1]!r} after the last assistant message "
            f"(messages[{last}]); those turns would never be trained on. End the conversation with the assistant turn."
        )


def check_record(data: Any, where: str, format: RecordFormat = "auto") -> Record:
    """Validate one decoded record and return it with its detected kind; raises :class:`DataError`."""
    if not isinstance(data, dict):
        raise DataError(
            f"{where}: expected a JSON object like {{\"prompt\": ..., \"completion\": ...}} or "
            f"{{\"messages\": [...]}}, got {_type_name(data)} ({_short(data)})."
        )
    has_msgs = "messages" in data and data["messages"] is not None
    has_pc = any(data.get(k) is not None for k in ("prompt", "completion"))
    if format == "auto":
        if has_msgs and has_pc:
            raise DataError(
                f"{where}: record has both 'messages' and 'prompt'/'completion'; the shape is ambiguous. "
                "Set data.format to 'messages' or 'prompt_completion' to choose."
            )
        if not (has_msgs or has_pc):
            keys = ", ".join(sorted(data)) or "none"
            raise DataError(
                f"{where}: unknown record shape (fields: {keys}). Expected {{\"prompt\": str, \"completion\": str}} "
                f"or {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}; rename the fields."
            )
        kind = "messages" if has_msgs else "prompt_completion"
    else:
        kind = format
        if kind == "messages" and has_pc and not has_msgs:
            raise DataError(f"{where}: record has 'prompt'/'completion' but data.format is 'messages'. Set data.format: auto (or prompt_completion).")
        if kind == "prompt_completion" and has_msgs and not has_pc:
            raise DataError(f"{where}: record has 'messages' but data.format is 'prompt_completion'. Set data.format: auto (or messages).")
    (_check_messages if kind == "messages" else _check_prompt_completion)(data, where)
    return Record(data=data, source=where, kind=kind)


def _read_jsonl(path: Path, check: Callable[[Any, str], Any]) -> list:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read file ({err.strerror or err}). Check the path and its permissions.") from None
    records = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{where}: not UTF-8 text (byte {err.start + 1}). Re-encode the file as UTF-8.") from None
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{where}: malformed JSON: {err.msg} (column {err.colno}). Each line must be exactly one JSON object."
            ) from None
        records.append(check(data, where))
    return records


def _read_parquet(path: Path, check: Callable[[Any, str], Any]) -> list:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: cannot read Parquet file ({err}). Check that it is a complete, valid Parquet file.") from None
    return [check(row, f"{path}:row {i}") for i, row in enumerate(rows)]


def read_records(path: str | Path, format: RecordFormat = "auto", *, split: str | None = None,
                 columns: dict[str, str] | None = None, role: Literal["train", "eval"] = "train") -> list[Record]:
    """All records of a ``.jsonl`` (also ``.jsonlines``, ``.json-lines``, ``.ndjson``) or ``.parquet`` file, or of
    any source :func:`read_rows` reads (``split``, ``columns``, ``role`` as there).

    ``format`` is ``data.format``: ``"auto"`` detects the shape per record, the other values enforce one.
    Blank lines are skipped. Raises :class:`DataError` at the first problem, or if there are no records.
    """
    return read_rows(path, lambda data, where: check_record(data, where, format), split=split, columns=columns, role=role)


def check_prompt_row(data: Any, where: str) -> dict:
    """An RL prompt row: ``{"prompt": str, ...reward fields}`` (e.g. ``answer``), returned as a dict."""
    if not isinstance(data, dict):
        raise DataError(f'{where}: expected a JSON object like {{"prompt": ..., "answer": ...}}, got {_type_name(data)}')
    _require_string(data, "prompt", where, "Every RL prompt row needs a 'prompt' string; other fields go to the reward.")
    return dict(data)


def read_prompt_rows(path: str | Path, *, split: str | None = None, columns: dict[str, str] | None = None) -> list[dict]:
    """RL prompts: rows with a ``prompt`` string plus the fields its reward needs (``answer``, ``numbers``...),
    from any source :func:`read_rows` reads; ``columns`` (``data.columns``) may map any field, reward fields
    included, and ``split`` is ``data.split`` (the prompt pool is a training split).

    >>> import json, tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "p.jsonl"
    >>> _ = p.write_text(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\\n" + json.dumps({"answer": "5"}) + "\\n")
    >>> read_prompt_rows(p)
    Traceback (most recent call last):
    ...
    leantune.data.records.DataError: ...p.jsonl:2: missing field 'prompt' (record has: answer). Every RL prompt row needs a 'prompt' string; other fields go to the reward.
    """
    return read_rows(path, check_prompt_row, split=split, columns=columns)


def read_rows(path: str | Path, check: Callable[[Any, str], Any], *, split: str | None = None,
              columns: dict[str, str] | None = None, role: Literal["train", "eval"] = "train") -> list:
    """Rows of ``path``, each passed through ``check(row, where)``: a JSON Lines or Parquet file (``where`` is
    ``file:line`` / ``file:row N``), or any source of :mod:`leantune.data.sources` (``source:row N``).

    ``columns`` (``data.columns``) renames dataset columns to leantune's fields first; ``split`` picks a split
    (None: the default for ``role``, see :func:`leantune.data.sources.resolve_split`).
    """
    from leantune.data.sources import read_source_rows

    return read_source_rows(path, check, split=split, columns=columns, role=role)
