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


def test_quick_demo_with_rl_phase(tmp_path, capsys):
    assert main(["demo", "--quick", "--rl", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "accuracy after RL" in out
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert 0.0 <= summary["accuracy_after_rl"] <= 1.0
    for key in ("sampled_after_sft", "sampled_after_rl"):  # the accuracy RL optimizes, before and after
        sampled = summary[key]
        assert (sampled["problems"], sampled["samples"]) == (4, 2)
        assert 0.0 <= sampled["pass@1"] <= sampled["pass@2"] <= 1.0
    assert "sampled accuracy after RL" in out
    roll = summary["rl_rollouts"]
    assert roll["rollouts_generated"] > 0 and roll["rollouts_used"] <= roll["rollouts_generated"]
    ledger = json.loads((tmp_path / "rl-run" / "ledger.json").read_text())
    assert ledger["extra"]["kind"] == "rl" and ledger["totals"]["steps"] == 2
    assert main(["report", str(tmp_path / "rl-run")]) == 0
    assert (tmp_path / "rl-run" / "rl.png").stat().st_size > 10_000


@pytest.mark.slow
def test_real_demo_raises_accuracy(tmp_path):
    from leantune.demo import run_demo

    summary = run_demo(tmp_path)
    assert summary["accuracy_after"] >= summary["accuracy_before"] + 0.2
    assert summary["total_wall_s"] < 600


@pytest.mark.slow
def test_real_demo_rl_phase_keeps_or_raises_accuracy(tmp_path):
    from leantune.demo import run_demo

    summary = run_demo(tmp_path, rl=True)
    assert summary["accuracy_after_rl"] >= summary["accuracy_after"]
