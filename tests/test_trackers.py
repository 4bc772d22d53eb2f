"""Trackers (train.report_to): rows written through MetricsLog arrive in TensorBoard and MLflow, read back
with each tool's own reader; a tracker whose package is missing is a clear error naming the extra."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from leantune.ledger import MetricsLog, read_metrics
from leantune.trackers import TRACKERS, TrackerError, build_trackers, numeric_fields

CONFIG = {"optim": {"lr": 3e-4, "betas": [0.9, 0.99]}, "train": {"steps": 3, "report_to": ["tensorboard"]}}
ROWS = [
    {"step": 1, "loss": 2.5, "lr": 1e-4, "kind": "sft", "rewards": {"task": 0.25}, "pass@1": 0.5},
    {"step": 2, "loss": 2.125, "lr": 2e-4, "kind": "sft", "rewards": {"task": 0.5}, "pass@1": 0.75},
    {"step": 3, "loss": 1.75, "lr": 3e-4, "kind": "sft", "rewards": {"task": 1.0}, "pass@1": 1.0, "note": None},
]
LEDGER = {"totals": {"steps": 3, "tokens_processed": 960, "wall_time_s": 1.5}, "per_token": {"tokens_per_s": 640.0},
          "flops": {"total": 1.0e9}, "energy": {"joules": 12.0}, "seed": 0}


def _run(tmp_path, names):
    sinks = build_trackers(names, tmp_path, "test-run", CONFIG)
    with MetricsLog(tmp_path / "metrics.jsonl", sinks=sinks) as metrics:
        for row in ROWS:
            metrics.log(row)
        metrics.log_ledger(LEDGER)
    assert read_metrics(tmp_path / "metrics.jsonl") == ROWS  # the file is unchanged by the sinks


def test_tensorboard_scalars_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(tmp_path, ["tensorboard"])
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "rewards/task", "pass@1", "ledger/totals/steps", "ledger/energy/joules"} <= tags
    assert not {"kind", "note", "step"} & tags  # strings, None and the x axis are not curves
    for key in ("loss", "lr", "pass@1"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2, 3]
        assert [e.value for e in events] == pytest.approx([r[key] for r in ROWS], rel=1e-6)  # stored as float32
    assert [e.value for e in acc.Scalars("rewards/task")] == [0.25, 0.5, 1.0]
    (tokens,) = acc.Scalars("ledger/totals/tokens_processed")
    assert (tokens.step, tokens.value) == (3, 960.0)  # the ledger lands at the last step


def test_mlflow_file_store_read_back(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # leantune opts in for its own RUN/mlruns (restored after)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "leantune-test")
    _run(tmp_path, ["mlflow"])
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("leantune-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "test-run" and run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.0003" and run.data.params["train.report_to"] == "['tensorboard']"
    for key, name in (("loss", "loss"), ("lr", "lr"), ("pass@1", "pass_1")):  # '@' is not allowed in MLflow keys
        history = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(r["step"], r[key]) for r in ROWS]
    assert "kind" not in run.data.metrics and run.data.metrics["rewards/task"] == 1.0
    assert run.data.metrics["ledger/totals/tokens_processed"] == 960.0
    ledger_file = client.download_artifacts(run.info.run_id, "ledger.json", str(tmp_path / "dl"))
    assert json.loads(open(ledger_file).read()) == LEDGER


def test_mlflow_respects_tracking_uri(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    elsewhere = tmp_path / "server-store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere.resolve().as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a file store the user chose: their opt-in
    run_dir = tmp_path / "run"
    _run(run_dir, ["mlflow"])
    assert not (run_dir / "mlruns").exists() and elsewhere.is_dir()


def test_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    for name, module in (("wandb", "wandb"), ("trackio", "trackio"), ("mlflow", "mlflow")):
        monkeypatch.setitem(sys.modules, module, None)  # `import wandb` now raises ImportError
        with pytest.raises(TrackerError, match=rf"'{name}' needs .* pip install 'leantune\[{name}\]'"):
            build_trackers([name], tmp_path, "r", CONFIG)
    assert not (tmp_path / "mlruns").exists()


def test_unknown_tracker_name(tmp_path):
    with pytest.raises(TrackerError, match="unknown tracker 'comet'; choose from tensorboard, trackio, wandb, mlflow"):
        build_trackers(["comet"], tmp_path, "r", CONFIG)


def test_trackers_import_lazily():
    code = ("import sys, leantune.trackers, leantune.ledger; "
            "print(sorted(m for m in ('wandb', 'mlflow', 'trackio', 'tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert set(TRACKERS) == {"tensorboard", "trackio", "wandb", "mlflow"}


class _Recorder:
    def __init__(self, fail_at: int | None = None):
        self.rows, self.ledger, self.closed, self.fail_at = [], None, False, fail_at

    def log(self, row, step):
        if step == self.fail_at:
            raise ConnectionError("server gone")
        self.rows.append((step, row))

    def log_ledger(self, ledger):
        self.ledger = ledger

    def close(self):
        self.closed = True


def test_metrics_log_feeds_sinks_and_survives_a_failing_one(tmp_path, caplog):
    good, bad = _Recorder(), _Recorder(fail_at=2)
    with caplog.at_level(logging.WARNING), MetricsLog(tmp_path / "m.jsonl", sinks=[good, bad]) as metrics:
        for row in ROWS:
            metrics.log(row)
        metrics.log({"loss": 0.5})  # no step key: the row's index in the log
        metrics.log_ledger(LEDGER)
    assert [s for s, _ in good.rows] == [1, 2, 3, 3] and good.rows[0][1] == ROWS[0]
    assert [s for s, _ in bad.rows] == [1]  # dropped after its failure at step 2
    assert good.ledger == LEDGER and bad.ledger is None and good.closed and not bad.closed
    assert "_Recorder failed (server gone)" in caplog.text
    assert len(read_metrics(tmp_path / "m.jsonl")) == 4


def test_numeric_fields():
    assert numeric_fields(ROWS[2]) == {"loss": 1.75, "lr": 3e-4, "rewards/task": 1.0, "pass@1": 1.0}
