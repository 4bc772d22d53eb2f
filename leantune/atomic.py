"""Atomic writes: a reader (or a run killed at any moment) sees the old file or the new one, never half.

Every file and directory leantune writes into a run or an export goes through here: the content is
written to a temporary path in the same directory (same filesystem, so ``os.replace`` is atomic),
fsynced, renamed into place, and the directory is fsynced.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = atomic_write_text(d / "a.txt", "one")
>>> with atomic_dir(d / "out") as tmp:
...     _ = (tmp / "f").write_text("x")
>>> (d / "a.txt").read_text(), (d / "out" / "f").read_text()
('one', 'x')
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so a rename inside it is durable (a no-op where the OS cannot)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w"):
    """A file handle whose content replaces ``path`` only if the block finishes ("w" text, "wb" bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def json_default(obj):
    """JSON for what runs produce: Paths, sets, numpy/torch scalars, pydantic models, dataclasses."""
    import dataclasses

    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """``atomic_write_text`` for JSON (indent 2, see ``json_default`` for what is converted)."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, default=json_default)
        f.write("\n")
    return Path(path)


@contextmanager
def atomic_dir(out_dir: str | Path):
    """Yield a temporary directory beside ``out_dir``; when the block finishes, its files are fsynced and it
    replaces ``out_dir`` (an existing one is moved aside first and deleted after). On error nothing changes."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
