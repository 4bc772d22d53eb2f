"""The embedded default, end to end: `leantune demo --quick` (default suite) and the real demo (slow)."""

from __future__ import annotations

import json

import pytest

from leantune.cli import main


def test_quick_demo_runs_every_stage(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "accuracy before fine-tuning" in out and "accuracy after fine-tuning" in out
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 <= summary["accuracy_after"] <= 1.0
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    assert ledger["totals"]["steps"] == 8 and ledger["totals"]["trainable_tokens"] > 0
    assert main(["report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_real_demo_raises_accuracy(tmp_path):
    from leantune.demo import run_demo

    summary = run_demo(tmp_path)
    assert summary["accuracy_after"] >= summary["accuracy_before"] + 0.2
    assert summary["total_wall_s"] < 600
