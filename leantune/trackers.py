"""Experiment trackers (``train.report_to``): every metrics.jsonl row sent live, and the ledger at the end.

metrics.jsonl and ledger.json stay the record of a run; a tracker is a live copy for people who watch runs
in TensorBoard, trackio, Weights & Biases or MLflow. Each tracker is one small class behind the ``TRACKERS``
registry, and its package is imported only when the recipe names it: a missing one is a ``TrackerError``
saying which extra to install (``pip install 'leantune[tensorboard]'``).

A tracker has three methods: ``log(row, step)`` (numbers only: nested dicts are flattened to
``outer/inner``, strings and None skipped), ``log_ledger(ledger)`` once at the end, and ``close()``.
``leantune.ledger.MetricsLog(path, sinks=trackers)`` calls them for every row it writes.

>>> numeric_fields({"step": 3, "loss": 1.5, "ok": True, "kind": "sft", "reward": {"task": 0.5, "n": None}})
{'loss': 1.5, 'ok': 1.0, 'reward/task': 0.5}
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Protocol

from leantune.config import RecipeError

log = logging.getLogger(__name__)


class TrackerError(RecipeError):
    """A tracker named in ``train.report_to`` that cannot start (its package is missing); says what to install."""


class Tracker(Protocol):
    def log(self, row: dict, step: int) -> None: ...
    def log_ledger(self, ledger: dict) -> None: ...
    def close(self) -> None: ...


def _require(module: str, tracker: str, package: str):
    """Import ``module`` for ``tracker``, or raise TrackerError naming the extra that installs ``package``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise TrackerError(
            f"train.report_to: {tracker!r} needs the {package!r} package, which is not installed here "
            f"({err}); install it with: pip install 'leantune[{tracker}]' (or drop {tracker!r} from train.report_to)"
        ) from err


def numeric_fields(row: dict, prefix: str = "", skip: tuple[str, ...] = ("step",)) -> dict[str, float]:
    """The numbers of a metrics row as ``{name: float}``: bools as 0/1, nested dicts as ``outer/inner``;
    strings, lists and None skipped, and the ``step`` key (the x axis, not a curve)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if not prefix and key in skip:
            continue
        if isinstance(value, dict):
            out |= numeric_fields(value, f"{name}/", skip)
        elif isinstance(value, (bool, int, float)) or (hasattr(value, "item") and callable(value.item)):
            try:
                out[name] = float(value)
            except (TypeError, ValueError):  # a non-scalar tensor or array
                continue
    return out


def ledger_numbers(ledger: dict) -> dict[str, float]:
    """The ledger's headline numbers (totals, per-token costs, FLOPs, energy) as ``ledger/...`` scalars."""
    parts = {"totals": ledger.get("totals") or {}, "per_token": ledger.get("per_token") or {},
             "flops": {"total": (ledger.get("flops") or {}).get("total")},
             "energy": {"joules": (ledger.get("energy") or {}).get("joules")}}
    return {k: v for k, v in numeric_fields(parts, "ledger/").items() if math.isfinite(v)}


def flat_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-4}}`` -> ``{"optim.lr": 1e-4}`` (lists and scalars kept as they are)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= flat_config(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


# --------------------------------------------------------------------------------------------
# The trackers


class TensorBoardTracker:
    """Scalars to ``RUN/tensorboard/`` (``tensorboard --logdir RUN/tensorboard``); the ledger as text."""

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        _require("tensorboard", "tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / "tensorboard"
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        self._writer.add_text("recipe", "```json\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)
        self._step = 0

    def log(self, row: dict, step: int) -> None:
        for name, value in numeric_fields(row).items():
            self._writer.add_scalar(name, value, step)
        self._step = max(self._step, step)
        self._writer.flush()

    def log_ledger(self, ledger: dict) -> None:
        for name, value in ledger_numbers(ledger).items():
            self._writer.add_scalar(name, value, self._step)
        self._writer.add_text("ledger", "```json\n" + json.dumps(ledger, indent=1, default=str) + "\n```", self._step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class TrackioTracker:
    """A local trackio project (``TRACKIO_PROJECT``, default ``leantune``); ``trackio show`` opens the dashboard."""

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        trackio = _require("trackio", "trackio", "trackio")
        self._run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "leantune"), name=run_name, config=config)

    def log(self, row: dict, step: int) -> None:
        self._run.log(numeric_fields(row), step=step)

    def log_ledger(self, ledger: dict) -> None:
        self._run.log(ledger_numbers(ledger))

    def close(self) -> None:
        self._run.finish()


class WandbTracker:
    """A W&B run whose files live in the run directory (``RUN/wandb/``). ``WANDB_MODE=offline`` keeps it on
    disk (``wandb sync RUN/wandb/offline-run-*`` uploads it later); project from ``WANDB_PROJECT``, default leantune."""

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        wandb = _require("wandb", "wandb", "wandb")
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "leantune"), name=run_name,
                               dir=str(run_dir), config=config)

    def log(self, row: dict, step: int) -> None:
        self._run.log(numeric_fields(row), step=step)

    def log_ledger(self, ledger: dict) -> None:
        self._run.summary.update(ledger_numbers(ledger))
        self._run.config.update({"ledger": {k: ledger.get(k) for k in ("seed", "compute_dtype", "versions",
                                                                        "hardware", "model_hash", "data_sha256")}},
                                allow_val_change=True)

    def close(self) -> None:
        self._run.finish()


_MLFLOW_BAD = re.compile(r"[^\w\-. /]")  # MLflow keys: alphanumerics, _ - . space /


class MlflowTracker:
    """An MLflow run in ``RUN/mlruns`` (a local file store; ``mlflow ui --backend-store-uri RUN/mlruns``), or on
    the server in ``MLFLOW_TRACKING_URI`` when set. Experiment from ``MLFLOW_EXPERIMENT_NAME``, default leantune.
    The recipe goes in as params, the ledger as the artifact ``ledger.json`` plus ``ledger/...`` metrics."""

    def __init__(self, run_dir: Path, run_name: str, config: dict):
        _require("mlflow", "mlflow", "mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not self.tracking_uri:
            self.tracking_uri = (Path(run_dir) / "mlruns").resolve().as_uri()
            # MLflow 3 keeps the file store in maintenance mode behind this opt-in; the run directory's
            # store is what the recipe asked for (set MLFLOW_TRACKING_URI for a database or a server)
            if not os.environ.get("MLFLOW_ALLOW_FILE_STORE"):
                os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "leantune")
        try:
            exp = self._client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(name)
            self.run_id = self._client.create_run(exp_id, run_name=run_name).info.run_id
        except Exception as err:  # MlflowException and friends: one line, with the store it tried
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TrackerError(f"train.report_to: mlflow cannot start a run at {self.tracking_uri}: {first}") from err
        params = [Param(_MLFLOW_BAD.sub("_", k), str(v)[:6000]) for k, v in flat_config(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self._client.log_batch(self.run_id, params=params[i : i + 100])
        self._step = 0

    def _metrics(self, numbers: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_MLFLOW_BAD.sub("_", k), v, now, step) for k, v in numbers.items()]
        for i in range(0, len(metrics), 1000):
            self._client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log(self, row: dict, step: int) -> None:
        self._metrics(numeric_fields(row), step)
        self._step = max(self._step, step)

    def log_ledger(self, ledger: dict) -> None:
        self._metrics(ledger_numbers(ledger), self._step)
        self._client.log_dict(self.run_id, json.loads(json.dumps(ledger, default=str)), "ledger.json")

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


TRACKERS: dict[str, type] = {
    "tensorboard": TensorBoardTracker,
    "trackio": TrackioTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
}


def build_trackers(names: list[str], run_dir: str | Path, run_name: str, config: dict) -> list[Tracker]:
    """Start the trackers in ``names`` (``train.report_to``; duplicates once) for the run in ``run_dir``.

    ``run_name`` names the run where the tracker shows one (e.g. the run directory's name); ``config`` is
    the recipe as a plain dict (``recipe.model_dump(mode="json")``). Raises TrackerError for an unknown
    name or a missing package, after closing any tracker it already started.
    """
    started: list[Tracker] = []
    try:
        for name in dict.fromkeys(names):
            if name not in TRACKERS:
                raise TrackerError(f"train.report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
            started.append(TRACKERS[name](Path(run_dir), run_name, config))
            log.debug("tracker %s started", name)
    except BaseException:
        close_trackers(started)
        raise
    return started


def send_ledger(sinks: list[Tracker], ledger: dict) -> None:
    """Hand the finished run's ledger to every tracker (a failing one is reported, not fatal)."""
    for sink in sinks:
        try:
            sink.log_ledger(ledger)
        except Exception as err:  # noqa: BLE001 -- ledger.json on disk is the record; a tracker is a copy
            log.warning("tracker %s: could not send the ledger: %s", type(sink).__name__, err)


def close_trackers(sinks: list[Tracker]) -> None:
    for sink in sinks:
        try:
            sink.close()
        except Exception as err:  # noqa: BLE001
            log.warning("tracker %s: close failed: %s", type(sink).__name__, err)
