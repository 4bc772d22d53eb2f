"""make_report: plots and summary from a run directory, tolerant of missing keys and torn lines."""

from __future__ import annotations

import json
import math

import pytest

from leantune.ledger import MetricsLog, atomic_write_json
from leantune.report import make_report


def _synthetic_run(run_dir, steps=40, with_eval=True, torn=True):
    with MetricsLog(run_dir / "metrics.jsonl") as log:
        for s in range(1, steps + 1):
            log.log({
                "step": s,
                "loss": 3.0 * math.exp(-s / 15) + 0.5,
                "lr": 2e-4 * min(1.0, s / 5) * (0.5 + 0.5 * math.cos(math.pi * s / steps)),
                "grad_norm": 1.0 / math.sqrt(s),
                "tokens": 512 * s,
                "trainable_tokens": 150 * s,
                "tokens_per_s": 900 + 20 * math.sin(s),
                "rss_bytes": int(1.2e9 + 1e7 * s),
                "elapsed_s": 0.6 * s,
            })
            if with_eval and s % 10 == 0:
                log.log({"step": s, "eval_loss": 3.2 * math.exp(-s / 20) + 0.6,
                         "eval_ppl": math.exp(3.2 * math.exp(-s / 20) + 0.6), "eval_accuracy": min(1.0, s / 50), "eval_tokens": 600})
    if torn:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write('{"step": 41, "loss": 0.')


def test_make_report_writes_png_and_summary(tmp_path):
    _synthetic_run(tmp_path)
    atomic_write_json(tmp_path / "ledger.json", {
        "totals": {"steps": 40, "tokens_processed": 20480, "trainable_tokens": 6000, "wall_time_s": 24.5,
                   "peak_rss_bytes": 1_700_000_000, "cuda_max_allocated_bytes": None},
        "per_token": {"joules_per_token": 0.012},
        "energy": {"joules": 245.0, "method": "estimate: TDP x time x load"},
        "flops": {"total": 1.5e12, "method": "estimate: parameter counting"},
    })
    paths = make_report(tmp_path)
    png, md = tmp_path / "report.png", tmp_path / "summary.md"
    assert paths == [png, md]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    text = md.read_text()
    assert "| final train loss | 0.7085 (step 40) |" in text
    assert "best eval_accuracy | 0.8" in text  # max for accuracy
    assert "best eval_loss" in text and "(step 40;" in text  # min for loss: the last eval here
    assert "eval_tokens" not in text  # a count, not a score
    assert "20,480" in text and "| ledger |" in text
    assert "24.5 s" in text and "1.58 GiB" in text
    assert "245 J (0.012 J/token)" in text and "estimate: TDP x time x load" in text
    assert "1.5e+12 FLOPs" in text


def test_make_report_without_ledger_or_eval(tmp_path):
    _synthetic_run(tmp_path, steps=5, with_eval=False, torn=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"event": "finished"}) + "\n")  # a line with no step: ignored by plots
    make_report(tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "2,560" in text and "running total" in text  # tokens read from the metrics
    assert "| energy | n/a | no ledger.json |" in text
    assert "best eval" not in text
    assert (tmp_path / "report.png").stat().st_size > 0


def test_make_report_sparse_keys(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [{"step": 1, "loss": 2.0, "tokens": 100}, {"step": 2, "loss": float("nan"), "tokens": 100}])
        + "\n"
    )
    make_report(tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "| final train loss | 2.0000 (step 1) |" in text  # NaN skipped
    assert "| tokens processed | 200 | metrics (sum of per-step counts) |" in text


def test_make_report_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl: no metrics file"):
        make_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no metric records"):
        make_report(tmp_path)
