"""Where training rows come from, and how a dataset's columns become leantune's fields.

``data.train`` / ``data.eval`` name one of:

- a JSON Lines (``.jsonl``, ``.jsonlines``, ``.json-lines``, ``.ndjson``) or Parquet (``.parquet``, ``.pq``)
  file, read by leantune's own readers (:mod:`leantune.data.records`; locations ``file:line`` and
  ``file:row N``);
- any other file ``datasets.load_dataset`` reads: ``.csv`` / ``.tsv`` (every cell read as text), ``.json``
  (an array of objects, or one object per line), ``.arrow`` (memory-mapped in place);
- a directory written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` whose split
  ``data.split`` / ``data.eval_split`` picks);
- a Hugging Face hub dataset id, ``owner/name`` or ``owner/name:config``, when online (or already cached).

Rows from ``datasets`` are located as ``source:row N`` (0-based), or ``source[split]:row N`` when the
source has named splits.

Splits (:func:`resolve_split`): a file is one split named ``train``. Without an explicit split,
``data.train`` uses ``train`` and ``data.eval`` uses ``validation``, ``valid``, ``dev`` or ``test`` (the first
present); either falls back to the only split when there is one. Otherwise the error lists the splits.

Column mapping (:func:`map_columns`): ``data.columns`` maps leantune's field names to the dataset's
columns, e.g. ``{prompt: question, completion: answer}``; a mapped column is renamed, the rest pass through.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from leantune.data.index import DiskInts
from leantune.data.records import (
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    DataError,
    _read_jsonl,
    _read_parquet,
)

Role = Literal["train", "eval"]
DATASETS_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".arrow": "arrow"}
EVAL_SPLITS = ("validation", "valid", "dev", "test")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(:[\w.-]+)?$")


def _split_field(role: Role) -> str:
    return "data.split" if role == "train" else "data.eval_split"


def resolve_split(available: list[str], split: str | None, role: Role, source: str) -> str:
    """The split to read: ``split`` if given (it must exist), else the default rule of the module docstring.

    >>> resolve_split(["train", "validation", "test"], None, "eval", "d")
    'validation'
    >>> resolve_split(["train", "test"], None, "train", "d")
    'train'
    >>> resolve_split(["a", "b"], None, "train", "d")
    Traceback (most recent call last):
    ...
    leantune.data.records.DataError: d: which split? It has a, b and none is named train. Set data.split to one of them.
    """
    have = ", ".join(available)
    if split is not None:
        if split in available:
            return split
        raise DataError(f"{source}: no split {split!r} (available: {have}). Set {_split_field(role)} to one of them.")
    preferred = ("train",) if role == "train" else EVAL_SPLITS
    for name in preferred:
        if name in available:
            return name
    if len(available) == 1:
        return available[0]
    raise DataError(
        f"{source}: which split? It has {have} and none is named {' or '.join(preferred)}. "
        f"Set {_split_field(role)} to one of them."
    )


def map_columns(data: Any, columns: dict[str, str], where: str) -> Any:
    """``data`` with each mapped column renamed to its leantune field (``columns``: field -> column).

    >>> map_columns({"question": "2+2?", "answer": "4", "id": 7}, {"prompt": "question", "completion": "answer"}, "f:1")
    {'id': 7, 'prompt': '2+2?', 'completion': '4'}
    >>> map_columns({"q": "2+2?"}, {"prompt": "question"}, "f:1")
    Traceback (most recent call last):
    ...
    leantune.data.records.DataError: f:1: missing field 'question' (data.columns maps 'prompt' to it; record has: q).
    """
    if not columns or not isinstance(data, dict):
        return data
    sources = set(columns.values())
    out = {k: v for k, v in data.items() if k not in sources}
    for target, column in columns.items():
        if data.get(column) is None:
            have = ", ".join(sorted(k for k, v in data.items() if v is not None)) or "no fields"
            raise DataError(f"{where}: missing field {column!r} (data.columns maps {target!r} to it; record has: {have}).")
        out[target] = data[column]
    return out


def mapped_check(check: Callable[[Any, str], Any], columns: dict[str, str] | None) -> Callable[[Any, str], Any]:
    """``check`` applied after :func:`map_columns`; its errors about a mapped field also name the column."""
    if not columns:
        return check
    renamed = {target: column for target, column in columns.items() if target != column}

    def run(data: Any, where: str) -> Any:
        try:
            return check(map_columns(data, columns, where), where)
        except DataError as err:
            named = re.search(r"field '(\w+)", str(err))  # the field the error is about: messages[0].role -> messages
            if not named or named.group(1) not in renamed:
                raise
            raise DataError(f"{err} (data.columns: {named.group(1)!r} is column {renamed[named.group(1)]!r})") from None

    return run


# --------------------------------------------------------------------------------------------
# Row tables: random access by key, for streaming


@dataclass
class JsonlRows:
    """A JSON Lines file indexed by :meth:`scan` (byte offset and line of every record, 16 bytes each, kept
    on disk by :class:`DiskInts`); :meth:`fetch` re-reads one record. The file must not change after the scan
    (checked by size and mtime)."""

    path: Path
    offsets: DiskInts = field(default_factory=DiskInts)
    lines: DiskInts = field(default_factory=DiskInts)
    stamp: tuple[int, int] = (0, 0)

    def scan(self) -> Iterator[tuple[int, Any, str]]:
        """(key, decoded record, "file:line") per non-blank line; same errors as the eager reader."""
        try:
            handle = open(self.path, "rb")
        except OSError as err:
            raise DataError(f"{self.path}: cannot read file ({err.strerror or err}). Check the path and its permissions.") from None
        st = os.stat(self.path)
        self.stamp = (st.st_size, st.st_mtime_ns)
        with handle:
            offset = 0
            for lineno, line in enumerate(handle, start=1):
                data = _decode_line(line, lineno, f"{self.path}:{lineno}")
                if data is not _BLANK:
                    self.offsets.append(offset)
                    self.lines.append(lineno)
                    yield len(self.offsets) - 1, data, f"{self.path}:{lineno}"
                offset += len(line)
        self.offsets.flush()  # the write buffers drain to disk: nothing per record stays in memory
        self.lines.flush()

    def fetch(self, key: int) -> tuple[Any, str]:
        st = os.stat(self.path)
        if (st.st_size, st.st_mtime_ns) != self.stamp:
            raise DataError(f"{self.path}: the file changed after it was validated; streaming reads it during training. Restart the run.")
        with open(self.path, "rb") as handle:
            handle.seek(self.offsets[key])
            line = handle.readline()
        where = f"{self.path}:{self.lines[key]}"
        return _decode_line(line, self.lines[key], where), where


_BLANK = object()


def _decode_line(line: bytes, lineno: int, where: str) -> Any:
    try:
        text = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: not UTF-8 text (byte {err.start + 1}). Re-encode the file as UTF-8.") from None
    if not text.strip():
        return _BLANK
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{where}: malformed JSON: {err.msg} (column {err.colno}). Each line must be exactly one JSON object."
        ) from None


@dataclass
class DatasetRows:
    """A ``datasets.Dataset`` (Arrow, memory-mapped) read row by row; ``name`` prefixes row locations."""

    dataset: Any
    name: str

    def scan(self) -> Iterator[tuple[int, Any, str]]:
        i = 0
        for batch in self.dataset.iter(batch_size=1000):
            keys = list(batch)
            for values in zip(*(batch[k] for k in keys)):
                yield i, dict(zip(keys, values)), f"{self.name}:row {i}"
                i += 1

    def fetch(self, key: int) -> tuple[Any, str]:
        return self.dataset[int(key)], f"{self.name}:row {key}"


# --------------------------------------------------------------------------------------------
# Dispatch


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("this data source needs the `datasets` package: pip install 'leantune[datasets]'") from None
    datasets.disable_progress_bars()
    return datasets


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def is_save_to_disk_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def _load_file(path: Path) -> dict:
    """A file `datasets` reads, as {"train": Dataset}."""
    ds = _datasets()
    suffix = path.suffix.lower()
    builder = DATASETS_SUFFIXES[suffix]
    try:
        if builder == "arrow":
            try:
                return {"train": ds.Dataset.from_file(str(path))}  # memory-mapped in place, no copy
            except Exception:  # an Arrow IPC *file* (not stream): let the arrow builder convert it
                pass
        kwargs: dict = {}
        if builder == "csv":
            sep = "\t" if suffix == ".tsv" else ","
            with open(path, newline="", encoding="utf-8-sig") as handle:
                header = next(csv.reader(handle, delimiter=sep), [])
            kwargs = {"sep": sep, "features": ds.Features({c: ds.Value("string") for c in header})}
        return {"train": ds.load_dataset(builder, data_files=str(path), split="train", **kwargs)}
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: `datasets` cannot read it as {builder} ({_one_line(err)}). Check that the file is complete and valid.") from None


def _load_hub(spec: str) -> dict:
    ds = _datasets()
    name, _, config = spec.partition(":")
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0")
    try:
        return dict(ds.load_dataset(name, config or None))
    except Exception as err:
        why = ("HF_HUB_OFFLINE=1 is set and it is not in the local cache; unset it (online) or download it once"
               if offline else _one_line(err))
        raise DataError(
            f"{spec}: not a local file or directory, and the hub dataset {name!r} could not be loaded ({why})."
        ) from None


def open_rows(source: str | Path, split: str | None = None, role: Role = "train",
              columns: dict[str, str] | None = None) -> JsonlRows | DatasetRows:
    """A random-access row table over ``source`` (see the module docstring), for streaming.

    JSON Lines stays a file read by offset; Parquet is converted once into the ``datasets`` Arrow cache;
    everything else is what ``datasets`` memory-maps. A column of ``columns`` missing from a dataset's
    schema is an error here, before any row is read.
    """
    path = Path(source)
    if path.is_file() and path.suffix.lower() in JSONL_SUFFIXES:
        resolve_split(["train"], split, role, str(path))
        return JsonlRows(path)
    if path.is_file() and path.suffix.lower() in PARQUET_SUFFIXES:
        resolve_split(["train"], split, role, str(path))
        try:
            table = _datasets().load_dataset("parquet", data_files=str(path), split="train")
        except Exception as err:
            raise DataError(f"{path}: cannot read Parquet file ({_one_line(err)}). Check that it is a complete, valid Parquet file.") from None
        return _checked(DatasetRows(table, str(path)), columns)
    splits, name = _open_datasets(source)
    chosen = resolve_split(list(splits), split, role, str(source))
    label = name if list(splits) == ["train"] and not _has_named_splits(source) else f"{name}[{chosen}]"
    return _checked(DatasetRows(splits[chosen], label), columns)


def _has_named_splits(source: str | Path) -> bool:
    path = Path(source)
    return not path.exists() or (path / "dataset_dict.json").exists()


def _open_datasets(source: str | Path) -> tuple[dict, str]:
    """({split: Dataset}, name) for every source `datasets` reads; DataError naming the source otherwise."""
    path = Path(source)
    if is_save_to_disk_dir(path):
        try:
            loaded = _datasets().load_from_disk(str(path))
        except DataError:
            raise
        except Exception as err:
            raise DataError(f"{path}: cannot load this save_to_disk directory ({_one_line(err)}).") from None
        return (dict(loaded) if hasattr(loaded, "keys") else {"train": loaded}), str(path)
    if path.is_dir():
        raise DataError(
            f"{path}: is a directory, not a data file or a `datasets` save_to_disk directory (no dataset_dict.json "
            "or state.json). Point data.train / data.eval at a file, or save the dataset with save_to_disk."
        )
    if path.is_file():
        if path.suffix.lower() in DATASETS_SUFFIXES:
            return _load_file(path), str(path)
        known = (*JSONL_SUFFIXES, *PARQUET_SUFFIXES, *DATASETS_SUFFIXES)
        raise DataError(
            f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}. Use one of {', '.join(known)}, "
            "a `datasets` save_to_disk directory, or a hub dataset id."
        )
    text = str(source)
    if path.suffix.lower() in (*JSONL_SUFFIXES, *PARQUET_SUFFIXES, *DATASETS_SUFFIXES) or not _HUB_ID.match(text):
        raise DataError(f"{path}: file not found. Check data.train / data.eval (relative paths are resolved from the working directory).")
    return _load_hub(text), text


def read_source_rows(source: str | Path, check: Callable[[Any, str], Any], *, split: str | None = None,
                     columns: dict[str, str] | None = None, role: Role = "train") -> list:
    """Every row of ``source``, mapped by ``columns`` and passed through ``check(row, where)``.

    JSON Lines and Parquet go through leantune's readers (their exact ``file:line`` / ``file:row N`` errors);
    everything else through ``datasets``. Raises :class:`DataError` at the first problem or when empty.
    """
    check = mapped_check(check, columns)
    path = Path(source)
    if path.is_file() and path.suffix.lower() in JSONL_SUFFIXES:
        resolve_split(["train"], split, role, str(path))
        records = _read_jsonl(path, check)
    elif path.is_file() and path.suffix.lower() in PARQUET_SUFFIXES:
        resolve_split(["train"], split, role, str(path))
        records = _read_parquet(path, check)
    else:
        rows = open_rows(source, split, role, columns)
        records = [check(data, where) for _, data, where in rows.scan()]
    if not records:
        raise DataError(f"{source}: no records (the file is empty or has only blank lines). Add at least one record.")
    return records


def _checked(rows: DatasetRows, columns: dict[str, str] | None) -> DatasetRows:
    """``rows`` as plain Python rows (a format saved with the dataset, e.g. torch, is dropped), or DataError
    for a mapped column absent from its schema (naming the source and its columns)."""
    rows.dataset = rows.dataset.with_format(None)
    have = list(rows.dataset.column_names)
    for target, column in (columns or {}).items():
        if column not in have:
            raise DataError(
                f"{rows.name}: data.columns maps {target!r} to column {column!r}, which the dataset does not have "
                f"(columns: {', '.join(have)})."
            )
    return rows
