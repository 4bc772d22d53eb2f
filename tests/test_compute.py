"""The compute floor: the cached matmul-peak probe, the achieved fraction, and both in a run's ledger."""

from __future__ import annotations

import json

import pytest

from leantune.compute import cache_path, compute_summary, matmul_peak, probe_key


@pytest.fixture()
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


def test_probe_is_measured_once_and_cached_per_key(cache_home):
    first = matmul_peak("float32", sizes=(96, 160), repeats=2)
    assert first["cached"] is False and first["flops_per_s"] > 0 and first["size"] in (96, 160)
    again = matmul_peak("float32", sizes=(96, 160), repeats=2)
    assert again["cached"] is True and again["flops_per_s"] == first["flops_per_s"]
    stored = json.loads(cache_path().read_text())
    assert cache_path().parent == cache_home / "leantune" and probe_key("float32", "cpu") in stored
    other = matmul_peak("bfloat16", sizes=(96,), repeats=1)  # another dtype: another entry
    assert other["cached"] is False and len(json.loads(cache_path().read_text())) == 2
    assert matmul_peak("float32", sizes=(96,), repeats=1, refresh=True)["cached"] is False


def test_a_corrupt_cache_is_measured_again(cache_home):
    cache_path().parent.mkdir(parents=True)
    cache_path().write_text("{not json")
    assert matmul_peak("float32", sizes=(64,), repeats=1)["cached"] is False
    assert json.loads(cache_path().read_text())  # rewritten whole


def test_probe_key_names_cpu_flags_threads_and_dtype():
    import torch

    key = probe_key("bfloat16", "cpu")
    assert f"threads={torch.get_num_threads()}" in key and key.endswith("| bfloat16") and torch.__version__ in key


def test_summary_is_flops_over_seconds_per_process_against_the_peak():
    s = compute_summary(flops_total=6e12, seconds=4.0, dtype="float32", device="cpu", processes=3,
                        peak={"flops_per_s": 1e12, "size": 2048})
    assert s["achieved_flops_per_s"] == pytest.approx(5e11) and s["fraction_of_peak"] == pytest.approx(0.5)
    assert s["peak_probe"] == {"size": 2048}
    assert compute_summary(flops_total=None, seconds=1.0, dtype="float32", device="cpu", peak={"flops_per_s": 1}) is None
    assert compute_summary(flops_total=1.0, seconds=0.0, dtype="float32", device="cpu", peak={"flops_per_s": 1}) is None


def test_a_run_ledger_reports_achieved_flops_against_the_peak(tiny_model_dir, sft_data, tmp_path, cache_home):
    from conftest import tiny_recipe

    from leantune.config import Recipe
    from leantune.ledger import summarize_ledger
    from leantune.report import make_report
    from leantune.train.sft import train

    result = train(Recipe.model_validate(tiny_recipe(tiny_model_dir, sft_data, tmp_path / "run", model={"dtype": "float32"})))
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    c = ledger["compute"]
    assert c == result.ledger["compute"] and c["dtype"] == "float32" and c["processes"] == 1
    assert c["achieved_flops_per_s"] == pytest.approx(ledger["flops"]["total"] / ledger["totals"]["wall_time_s"])
    assert c["fraction_of_peak"] == pytest.approx(c["achieved_flops_per_s"] / c["matmul_peak_flops_per_s"])
    assert 0 < c["fraction_of_peak"] < 1.5  # a tiny model runs far below peak; above it would mean broken units
    assert "of this machine's float32 matmul peak" in summarize_ledger(ledger)
    paths = make_report(tmp_path / "run")
    md = next(p for p in paths if p.suffix == ".md").read_text()
    assert "achieved / matmul peak" in md
