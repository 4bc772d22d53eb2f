"""make_report: plots, summary and report.html from a run directory, tolerant of missing keys and torn lines;
compare_runs: several runs on the same axes in compare.html."""

from __future__ import annotations

import base64
import html
import json
import math
import re

import pytest
import yaml

from conftest import tiny_recipe
from leantune.cli import main
from leantune.ledger import MetricsLog, atomic_write_json
from leantune.report import compare_runs, make_report
from leantune.report_html import recipe_diff


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
    assert paths == [png, md, tmp_path / "report.html"]
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


# --- report.html ---------------------------------------------------------------------------------------

LEDGER = {
    "schema": "leantune.ledger/1",
    "seed": 7,
    "compute_dtype": "bfloat16",
    "malloc": "jemalloc",
    "model_hash": {"location": "/models/tiny", "files": {"model.safetensors": "ab" * 32}, "combined": "cd" * 32},
    "data_sha256": {"/data/train.jsonl": "ef" * 32},
    "versions": {"python": "3.11.7", "torch": "2.13.0+cpu", "leantune": "0.1.0"},
    "hardware": {"cpu": "AMD EPYC", "machine": "x86_64", "physical_cores": 2, "logical_cores": 2, "usable_cores": 2,
                 "ram_bytes": 25 * 2**30, "torch_threads": 2, "gpus": []},
    "totals": {"steps": 40, "tokens_processed": 20480, "trainable_tokens": 6000, "wall_time_s": 24.5,
               "peak_rss_bytes": 1_700_000_000, "cuda_max_allocated_bytes": None},
    "per_token": {"tokens_per_s": 835.9, "joules_per_token": 0.012, "flops_per_token": 7.3e7},
    "energy": {"joules": 245.0, "method": "estimate: TDP x time x load", "assumed_watts_per_core": 10.0},
    "flops": {"total": 1.5e12, "method": "estimate: parameter counting"},
    "timestamps": {"started_utc": "2026-01-02T03:04:05+00:00", "finished_utc": "2026-01-02T03:04:30+00:00"},
    "extra": {"kind": "sft", "resumed": False},
}
EVIL = "<script>alert('pwned')</script>"


def _page_images(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def _text(page: str) -> str:
    """The page's visible text, tags dropped and entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def test_report_html_has_ledger_recipe_and_images(tmp_path):
    _synthetic_run(tmp_path)
    atomic_write_json(tmp_path / "ledger.json", LEDGER)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"optim": {"lr": 0.000123, "name": "adamw"},
                                                          "data": {"train": "/data/train.jsonl", "think_start": EVIL}}))
    make_report(tmp_path)
    page = (tmp_path / "report.html").read_text()
    text = _text(page)
    # the ledger, as tables: cost with its method labels, then what it ran on
    for expected in ("20,480", "6,000", "24.5 s", "836", "1.58 GiB", "1.5e+12 FLOPs", "estimate: parameter counting",
                     "245 J", "estimate: TDP x time x load, 10.0 W/core assumed", "0.012 J", "AMD EPYC (x86_64)",
                     "25.00 GiB", "bfloat16", "jemalloc", "torch version 2.13.0+cpu",
                     "cd" * 32, "ef" * 32, "/models/tiny", "2026-01-02T03:04:05+00:00"):
        assert expected in text, expected
    assert re.search(r"<th>malloc</th><td>jemalloc</td>", page)
    # results from the metrics: final loss and best eval
    assert "final train loss 0.7085 (step 40)" in text and "best eval_accuracy 0.8" in text
    # the raw ledger, folded away
    raw = re.search(r"<details><summary>Raw ledger.json</summary><pre>(.*?)</pre></details>", page, re.S)
    assert raw and json.loads(html.unescape(raw.group(1))) == LEDGER
    # the recipe: its values, and the file as written
    assert "lr: 0.000123" in text and "name: adamw" in text
    # the plot, embedded byte for byte
    assert _page_images(page) == [(tmp_path / "report.png").read_bytes()]
    # nothing from outside the page
    assert not re.search(r"<(script|link|iframe)\b|@import|https?://|src=\"(?!data:)", page, re.I)


def test_report_html_escapes_file_content(tmp_path):
    run = tmp_path / "<img src=x onerror=alert(1)>"
    run.mkdir()
    _synthetic_run(run, steps=3, with_eval=False, torn=False)
    ledger = dict(LEDGER, malloc=EVIL, data_sha256={EVIL: "00"})
    atomic_write_json(run / "ledger.json", ledger)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"data": {"think_start": EVIL}}))
    make_report(run)
    page = (run / "report.html").read_text()
    assert "<script" not in page and "<img src=x" not in page
    escaped = html.escape(EVIL)
    assert page.count(escaped) >= 4  # malloc row, data hash label, recipe block, recipe.yaml text (+ raw ledger)
    assert "&lt;img src=x onerror=alert(1)&gt;" in page  # the run directory's name in the title


def test_report_html_without_ledger_or_recipe(tmp_path):
    _synthetic_run(tmp_path, steps=5, with_eval=False, torn=False)
    make_report(tmp_path)
    text = _text((tmp_path / "report.html").read_text())
    assert "No ledger.json in this run directory" in text and "No recipe.yaml in this run directory" in text
    assert "tokens processed 2,560 metrics (last running total)" in text  # the summary falls back to the metrics
    assert "Raw ledger.json" not in text


def test_report_cli_out_dir_and_rl_plot(tmp_path, capsys):
    _synthetic_run(tmp_path / "run", steps=4, with_eval=False, torn=False)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        for s in range(1, 4):
            f.write(json.dumps({"step": s, "reward_mean": 0.2 * s, "pass@1": 0.1 * s}) + "\n")
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.png", "rl.png", "summary.md"]
    assert _page_images((out / "report.html").read_text()) == [(out / "report.png").read_bytes(), (out / "rl.png").read_bytes()]
    assert f"open {(out / 'report.html').resolve().as_uri()}" in capsys.readouterr().out
    assert not (tmp_path / "run" / "report.html").exists()


def test_report_cli_bad_run_is_a_user_error(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["report", str(tmp_path)]) == 2
    assert "no metric records" in capsys.readouterr().err


# --- compare_runs --------------------------------------------------------------------------------------

def test_recipe_diff_lists_only_differing_keys():
    a = {"optim": {"lr": 0.01, "betas": [0.9, 0.99]}, "train": {"steps": 3}, "rl": {"beta": 0.0}}
    b = {"optim": {"lr": 0.01, "betas": [0.9, 0.95]}, "train": {"steps": 3}}
    assert recipe_diff([a, b]) == [("optim.betas", ["[0.9, 0.99]", "[0.9, 0.95]"]), ("rl.beta", ["0.0", "(absent)"])]
    assert recipe_diff([a, a, a]) == []


@pytest.fixture(scope="module")
def two_tiny_runs(tmp_path_factory, tiny_model_dir, sft_data):
    """Two real 3-step SFT runs of the tiny model that differ in the learning rate and LoRA rank."""
    root = tmp_path_factory.mktemp("compare")
    runs = []
    for name, lr, r in (("run_a", 1e-2, 4), ("run_b", 3e-3, 2)):
        raw = tiny_recipe(tiny_model_dir, sft_data, root / name, optim={"lr": lr}, adapter={"r": r})
        (root / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        assert main(["train", str(root / f"{name}.yaml")]) == 0
        runs.append(root / name)
    return runs


def test_compare_two_tiny_runs(two_tiny_runs, tmp_path, capsys):
    a, b = two_tiny_runs
    assert main(["report", str(a), str(b), "--out", str(tmp_path)]) == 0
    assert f"open {(tmp_path / 'compare.html').resolve().as_uri()}" in capsys.readouterr().out
    page = (tmp_path / "compare.html").read_text()
    png = (tmp_path / "compare.png").read_bytes()
    assert _page_images(page) == [png]
    # one column per run, in the order given
    assert re.search(r"<thead><tr><th></th><th>run_a</th><th>run_b</th></tr></thead>", page)
    text = _text(page)
    la, lb = (json.loads((d / "ledger.json").read_text()) for d in (a, b))
    for ledger in (la, lb):
        assert f"{ledger['totals']['tokens_processed']:,}" in text
        assert f"{ledger['totals']['wall_time_s']:.1f} s" in text
        assert ledger["model_hash"]["combined"] in text
    # the recipe diff: the keys that differ and nothing that is the same
    diff = page[page.index("Recipe differences"):]
    keys = re.findall(r"<tr><th><code>([^<]+)</code></th>", diff)
    assert set(keys) == {"adapter.r", "optim.lr", "train.output_dir"}
    assert "0.01" in diff and "0.003" in diff
    # the same run twice, with the default output directory (the first run's)
    paths = compare_runs([a, a])
    assert paths == [a / "compare.png", a / "compare.html"]
    twice = (a / "compare.html").read_text()
    assert "The recipes are identical." in twice and "<th>run_a (1)</th><th>run_a (2)</th>" in twice


def test_compare_adds_rl_panels_and_disambiguates_names(tmp_path):
    for parent in ("x", "y"):
        _synthetic_run(tmp_path / parent / "run", steps=6, with_eval=False, torn=False)
    with open(tmp_path / "y" / "run" / "metrics.jsonl", "a") as f:
        for s in range(1, 4):
            f.write(json.dumps({"step": s, "reward_mean": 0.2 * s, "pass@1": 0.1 * s}) + "\n")
    sft_only = compare_runs([tmp_path / "x" / "run", tmp_path / "x" / "run"], tmp_path / "o1")[0]
    with_rl = compare_runs([tmp_path / "x" / "run", tmp_path / "y" / "run"], tmp_path / "o2")
    from PIL import Image

    # reward and pass@1 add a column of panels
    assert Image.open(with_rl[0]).width > Image.open(sft_only).width
    assert re.search(r"<th>x/run</th><th>y/run</th>", with_rl[1].read_text())


def test_compare_needs_two_runs(tmp_path):
    _synthetic_run(tmp_path, steps=2, with_eval=False, torn=False)
    with pytest.raises(ValueError, match="at least two run directories"):
        compare_runs([tmp_path])
