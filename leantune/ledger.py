"""The run ledger: what a run used (model, data, code, hardware, seed) and what it cost (tokens, FLOPs,
time, memory, energy), written atomically as ``RUN_DIR/ledger.json`` next to ``metrics.jsonl``.

arXiv 2512.11588: a score without metadata is quicksand) and G2 (arXiv 2602.05712:
report energy per token). Every measured number says how it was measured; every estimated number says
that it is an estimate and what it assumed.

>>> f = estimate_train_flops(tokens=10, n_layers=1, hidden=4, body_params=100, trainable_body_params=100)
>>> f["total"]  # full fine-tuning, no attention term, no lm_head: 6 * N * tokens
6000
>>> format_bytes(1536 * 2**20)
'1.50 GiB'
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")
_CHUNK = 1 << 20  # 1 MiB reads keep hashing memory flat for multi-GB weight files

from leantune.allocator import active as allocator_active
from leantune.atomic import atomic_write_json, atomic_write_text, json_default  # noqa: F401
from leantune.flops import (  # noqa: F401
    decoder_body_params,
    estimate_train_flops,
    flops_from_model,
    model_param_counts,
    zeroth_order_flops,
)
from leantune.metering import EnergyMeter, PeakMemory, hardware_info, library_versions  # noqa: F401

# --------------------------------------------------------------------------------------------
# Hashes


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (constant memory, ~1 GB/s)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_paths(paths: Iterable[str | Path]) -> dict[str, str]:
    """``{path as given: hex SHA-256}`` for each file. A missing file raises FileNotFoundError."""
    return {str(p): sha256_file(p) for p in paths}


def _combined(files: dict[str, str]) -> str:
    """One digest over (name, digest) pairs in name order: changes if any file or name changes."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]}\n".encode())
    return h.hexdigest()


def model_weights_hash(location: str | Path) -> dict:
    """Hashes of a model's weight files (*.safetensors, *.gguf, *.bin).

    ``location`` is a local directory (weight files at its top level, else anywhere below it), a
    single weight file, or a hub id. Returns ``{"files": {relative name: sha256}, "combined": sha256}``;
    for a hub id that is not a local path, ``{"id": location, "note": "not a local path"}`` (the
    ledger then cannot prove which revision was used).
    """
    p = Path(location).expanduser()
    if p.is_file():
        files = {p.name: sha256_file(p)}
        return {"files": files, "combined": _combined(files)}
    if not p.is_dir():
        return {"id": str(location), "note": "not a local path"}
    found = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    if not found:
        found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    files = {f.relative_to(p).as_posix(): sha256_file(f) for f in found}
    if not files:
        return {"files": {}, "combined": None, "note": f"no {'/'.join(WEIGHT_SUFFIXES)} files under {p}"}
    return {"files": files, "combined": _combined(files)}


# --------------------------------------------------------------------------------------------
# Files: atomic writes and the metrics log


class MetricsLog:
    """Append-only JSON lines: one ``log(dict)`` = one line, flushed, so a killed run keeps every
    finished line. Reopening drops a torn last line left by a crash before appending.

    ``sinks``: trackers (``leantune.trackers.build_trackers``) that get every row live as
    ``sink.log(row, step)`` (``step``: the row's own ``step``, else the row's index in this log), the ledger
    through ``log_ledger``, and ``close()`` with the log. A sink that raises is reported once and dropped:
    metrics.jsonl stays complete either way."""

    def __init__(self, path: str | Path, sinks: Iterable = ()):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")
        self.sinks = list(sinks)
        self._rows = 0

    def log(self, record: dict) -> None:
        self._f.write(json.dumps(record, default=json_default) + "\n")
        self._f.flush()
        step = record.get("step", self._rows)
        self._rows += 1
        for sink in list(self.sinks):
            try:
                sink.log(record, step)
            except Exception as err:  # noqa: BLE001 -- a tracker is a live copy; never lose the run for it
                self.sinks.remove(sink)
                logging.getLogger(__name__).warning("tracker %s failed (%s); metrics.jsonl still has every row, "
                                                    "the tracker gets no more", type(sink).__name__, err)

    def log_ledger(self, ledger: dict) -> None:
        """Send the finished run's ledger to the sinks (the file is written by ``write_ledger``)."""
        if self.sinks:
            from leantune.trackers import send_ledger

            send_ledger(self.sinks, ledger)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        sinks, self.sinks = self.sinks, []
        if sinks:
            from leantune.trackers import close_trackers

            close_trackers(sinks)

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_torn_tail(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl. A torn last line (the run was killed mid-write) is skipped; a bad
    line anywhere else is an error naming file:line."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no newline after it: a torn final write
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON object ({e.msg}); fix or delete that line") from e
    return records


# --------------------------------------------------------------------------------------------
# The ledger

TOTALS_KEYS = ("steps", "tokens_processed", "trainable_tokens", "wall_time_s", "peak_rss_bytes", "cuda_max_allocated_bytes")
# Short names a caller may use for the same totals.
TOTALS_ALIASES = {"tokens": "tokens_processed", "wall_s": "wall_time_s", "cuda_peak_bytes": "cuda_max_allocated_bytes"}

def _utc_iso(t: float | None = None) -> str:
    return _dt.datetime.fromtimestamp(time.time() if t is None else t, tz=_dt.timezone.utc).isoformat(timespec="seconds")


def _safe_sha(path: str) -> str:
    try:
        return sha256_file(path)
    except OSError as e:  # the ledger is written at the end of a run: record the problem, do not crash
        return f"unreadable: {e.strerror or e}"


def _compute_dtype(recipe: dict) -> str | None:
    """The base's compute dtype with ``model.dtype: auto`` resolved, as the run used it."""
    name = (recipe or {}).get("model", {}).get("dtype")
    if name is None:
        return None
    from leantune.models.precision import resolve_dtype

    return resolve_dtype(name)


def build_ledger(
    *,
    recipe: dict,
    data_files: list[str],
    model_location: str,
    seed: int,
    totals: dict,
    flops: dict,
    energy: dict,
    extra: dict | None = None,
    started_unix: float | None = None,
    compute: dict | None = None,
) -> dict:
    """The ledger dict of one run.

    ``totals`` carries ``steps``, ``tokens_processed``, ``trainable_tokens`` (loss-carrying),
    ``wall_time_s``, ``peak_rss_bytes``, ``cuda_max_allocated_bytes`` (or the short names in
    ``TOTALS_ALIASES``); missing ones are recorded as None, extra keys are kept. ``flops`` is an
    ``estimate_train_flops`` result, ``energy`` an ``EnergyMeter.stop()`` result. ``started_unix``
    (time.time() at start) dates the start; without it the start is now minus the energy meter's wall_s.
    ``compute`` is a :func:`leantune.compute.compute_summary` result (achieved FLOP/s and the fraction of the
    machine's measured matmul peak).
    """
    totals = {TOTALS_ALIASES.get(k, k): v for k, v in totals.items()}
    tot = {k: totals.get(k) for k in TOTALS_KEYS} | {k: v for k, v in totals.items() if k not in TOTALS_KEYS}
    tokens, wall, joules = tot["tokens_processed"], tot["wall_time_s"], (energy or {}).get("joules")
    now = time.time()
    if started_unix is None and (energy or {}).get("wall_s") is not None:
        started_unix = now - energy["wall_s"]
    per_token = {
        "tokens_per_s": tokens / wall if tokens and wall else None,
        "joules_per_token": joules / tokens if tokens and joules is not None else None,
        "flops_per_token": (flops or {}).get("total", 0) / tokens if tokens and flops else None,
    }
    return {
        "schema": "leantune.ledger/1",
        "recipe": recipe,
        "seed": seed,
        "compute_dtype": _compute_dtype(recipe),
        "model_hash": {"location": str(model_location), **model_weights_hash(model_location)},
        "data_sha256": {str(p): _safe_sha(str(p)) for p in data_files if p},
        "versions": library_versions(),
        "hardware": hardware_info(),
        "malloc": allocator_active(),
        "totals": tot,
        "per_token": per_token,
        "flops": flops,
        "compute": compute,
        "energy": energy,
        "timestamps": {
            "started_utc": _utc_iso(started_unix) if started_unix is not None else None,
            "finished_utc": _utc_iso(now),
        },
        "extra": extra or {},
    }


def write_ledger(run_dir: str | Path, ledger: dict) -> Path:
    """Write ``run_dir/ledger.json`` atomically; returns its path."""
    return atomic_write_json(Path(run_dir) / "ledger.json", ledger)


def format_bytes(n: float | None) -> str:
    """Binary units, 3 significant digits: ``format_bytes(2**30) == '1.00 GiB'``."""
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _peak_text(compute: dict | None) -> str:
    if not compute or compute.get("fraction_of_peak") is None:
        return ""
    return (f"; {compute['achieved_flops_per_s'] / 1e9:,.1f} GFLOP/s = {100 * compute['fraction_of_peak']:.1f}% of this "
            f"machine's {compute['dtype']} matmul peak ({compute['matmul_peak_flops_per_s'] / 1e9:,.0f} GFLOP/s)")


def summarize_ledger(ledger: dict) -> str:
    """A few plain-text lines for the terminal: what ran, on what, and what it cost."""
    t, v, hw = ledger.get("totals", {}), ledger.get("versions", {}), ledger.get("hardware", {})
    pt, fl, en = ledger.get("per_token", {}), ledger.get("flops") or {}, ledger.get("energy") or {}
    model = ledger.get("model_hash", {})
    gpus = ", ".join(g["name"] for g in hw.get("gpus", [])) or "no GPU"

    def num(x, fmt="{:,}"):
        return "n/a" if x is None else fmt.format(x)

    rows = [
        ("run", f"leantune {v.get('leantune', '?')}, torch {v.get('torch', '?')}, seed {ledger.get('seed')}"
         + (f", {ledger['compute_dtype']}" if ledger.get("compute_dtype") else "")
         + (f", malloc: {ledger['malloc']}" if ledger.get("malloc") else "")),
        ("hardware", f"{hw.get('cpu', '?')} ({hw.get('usable_cores', '?')} cores), {format_bytes(hw.get('ram_bytes'))} RAM, {gpus}"),
        ("steps", num(t.get("steps"))),
        ("tokens", f"{num(t.get('tokens_processed'))} processed, {num(t.get('trainable_tokens'))} trainable"),
        ("wall time", f"{num(t.get('wall_time_s'), '{:.1f}')} s ({num(pt.get('tokens_per_s'), '{:,.0f}')} tokens/s)"),
        ("peak memory", f"{format_bytes(t.get('peak_rss_bytes'))} RSS"
         + (f", {format_bytes(t['cuda_max_allocated_bytes'])} CUDA" if t.get("cuda_max_allocated_bytes") else "")),
        ("compute", f"{num(fl.get('total'), '{:.3g}')} FLOPs ({fl.get('method', 'not estimated')})"
         + _peak_text(ledger.get("compute"))),
        ("energy", f"{num(en.get('joules'), '{:.3g}')} J, {num(pt.get('joules_per_token'), '{:.3g}')} J/token ({en.get('method', 'not measured')}"
         + (f", {en['assumed_watts_per_core']} W/core assumed" if "assumed_watts_per_core" in en else "") + ")"),
    ]
    if t.get("labels"):  # dpo.active: labels are a cost of their own
        lb = t["labels"]
        rows.append(("labels", f"{num(lb.get('spent'))} spent of {num(lb.get('budget'))} ({lb.get('select')}, "
                     f"{lb.get('labeler')}): {num(lb.get('preferences'))} preferences, {num(lb.get('ties'))} ties, "
                     f"{num(lb.get('failures'))} failures, {num(lb.get('rounds'))} rounds"))
    if t.get("rollouts"):
        r = t["rollouts"]
        rows.append(("rollouts", f"{num(r.get('rollouts_generated'))} generated, {num(r.get('rollouts_used'))} trained on; "
                     f"{num(r.get('tokens_generated'))} tokens generated, {num(r.get('early_stop_tokens_saved'))} saved by early stop"))
        rows.append(("filters", f"{num(r.get('zero_variance_rollouts_dropped'))} zero-variance rollouts dropped, "
                     f"{num(r.get('prompt_selection_rollouts_saved'))} rollouts never sampled (prompt selection), "
                     f"{num(r.get('overlong_rollouts_masked'))} overlong masked"))
        if r.get("draft_tokens"):
            rows.append(("speculative", f"{num(r.get('accepted_tokens'))} of {num(r.get('draft_tokens'))} drafted tokens "
                         f"accepted ({r['acceptance_rate']:.0%}), {r['tokens_per_forward']:.2f} tokens per policy forward"
                         + (f", {num(r['draft_row_forwards'])} draft-model row forwards" if r.get("draft_row_forwards") else "")))
    if model.get("combined"):
        rows.append(("model", f"{model['location']} sha256 {model['combined'][:16]} ({len(model['files'])} file{'s' if len(model['files']) != 1 else ''})"))
    else:
        rows.append(("model", f"{model.get('location', '?')} ({model.get('note', 'no hash')})"))
    for path, sha in ledger.get("data_sha256", {}).items():
        rows.append(("data", f"{path} sha256 {sha[:16]}"))
    loss = (ledger.get("extra") or {}).get("loss") or {}
    if loss.get("vocab_subset"):
        what = f"{loss['candidates']} candidates ({loss['vocab_subset_source']}) + each step's targets"
        rows.append(("loss", f"APPROXIMATE: vocabulary subset of {what}; eval_loss is exact"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {val}" for k, val in rows)
