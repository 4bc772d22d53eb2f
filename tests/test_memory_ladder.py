"""benchmarks/memory_ladder.py: the ratio table (pure) and, opt-in, a real --quick run on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_ladder.py"


def _module():
    spec = importlib.util.spec_from_file_location("memory_ladder", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(peak_gib: float, tps: float) -> dict:
    gib = 2**30
    return {"status": "ok", "train_peak_rss_bytes": int(peak_gib * gib), "process_peak_rss_bytes": int(peak_gib * gib) + gib,
            "train_peak_rss_gib": peak_gib, "process_peak_rss_gib": peak_gib + 1, "tokens_per_s": tps,
            "losses": [1.0], "batch_digests": ["d"], "runtime_baseline_rss_bytes": gib // 4,
            "net_train_peak_rss_bytes": int(peak_gib * gib) - gib // 4, "net_train_peak_rss_gib": peak_gib - 0.25}


def test_ladder_table_ratios_against_first_and_previous_row():
    ladder = _module()
    runs = {"peer_lora": _run(8.0, 100.0), "int4_base": _run(4.0, 50.0), "checkpointing": _run(2.0, 40.0),
            "vocab_subset": _run(1.0, 40.0), "logits_masking": _run(0.5, 45.0), "offloaded_checkpoints": _run(0.4, 40.0),
            "quantized_embeddings": _run(0.32, 39.0), "aside_exact_masked": _run(0.8, 44.0)}
    table = ladder.ladder_table(runs)
    rows = {r["row"]: r for r in table["rows"]}
    assert [r["row"] for r in table["rows"]] == list(ladder.ROWS)
    assert rows["logits_masking"]["train_peak_reduction_vs_first"] == 16.0
    assert rows["logits_masking"]["train_peak_reduction_vs_previous"] == 2.0
    assert rows["int4_base"]["tokens_per_s_vs_first"] == 0.5
    assert "train_peak_reduction_vs_previous" not in rows["aside_exact_masked"]  # not a ladder step
    assert table["overall"]["train_peak_reduction"] == 16.0 and table["overall"]["meets_target_train_peak"]
    assert table["overall"]["net_train_peak_reduction"] == 31.0  # (8 - 0.25) / (0.5 - 0.25)
    # the five rows end at logits_masking; the optional offload row extends the ladder by one
    assert table["overall"]["to"] == "logits_masking"
    assert table["overall_with_offload"]["to"] == "offloaded_checkpoints"
    assert table["overall_with_offload"]["train_peak_reduction"] == 20.0
    assert rows["offloaded_checkpoints"]["train_peak_reduction_vs_previous"] == 1.25
    # and the INT4 embedding row on top of that: everything leantune has
    assert table["overall_all"]["to"] == "quantized_embeddings" and table["overall_all"]["train_peak_reduction"] == 25.0
    assert rows["quantized_embeddings"]["train_peak_reduction_vs_previous"] == 1.25
    assert table["identical_batches"]


def test_failed_rows_are_left_out_of_the_table():
    ladder = _module()
    runs = {"peer_lora": _run(8.0, 100.0), "int4_base": {"status": "failed", "error": "x"},
            "logits_masking": _run(1.0, 50.0)}
    table = ladder.ladder_table(runs)
    assert [r["row"] for r in table["rows"]] == ["peer_lora", "logits_masking"]
    assert table["overall"]["train_peak_reduction"] == 8.0 and not table["overall"]["meets_target_train_peak"]
    assert "overall_with_offload" not in table and "overall_all" not in table  # those rows were not measured


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", "--threads", "1", "--only", "peer_lora,logits_masking",
         "--work-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=900, check=True,
    )
    result = json.loads(out.stdout)
    assert all(r["status"] == "ok" for r in result["runs"].values())
    assert result["ladder"]["identical_batches"]
    assert result["settings"]["malloc"] == "MALLOC_MMAP_THRESHOLD_=131072 in every row"
    assert result["runs"]["logits_masking"]["losses"][0] < result["runs"]["peer_lora"]["losses"][0]  # subset: lower
