"""Data sources beyond JSON Lines / Parquet, data.columns, splits and streamed (lazy) SFT examples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

from leantune.config import DataConfig  # noqa: E402
from leantune.data.records import DataError, read_prompt_rows, read_records  # noqa: E402
from leantune.data.sft import StreamedExamples, batch_at, load_sft_examples  # noqa: E402
from leantune.models.tiny import tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROWS = [
    {"prompt": f"What is {i} + {i}?", "completion": f"<think>{i} + {i} = {2 * i}</think> {2 * i}"} for i in range(7)
]
QA = [{"question": r["prompt"], "answer": r["completion"], "id": i} for i, r in enumerate(ROWS)]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def as_pairs(examples) -> list:
    return [(e.input_ids, e.spans) for e in examples]


# --------------------------------------------------------------------------------------------
# Every source kind gives the same records as JSON Lines


def _make_source(kind: str, tmp_path: Path) -> str:
    ds = datasets.Dataset.from_list(ROWS)
    if kind == "save_to_disk":
        ds.save_to_disk(tmp_path / "ds")
        return str(tmp_path / "ds")
    if kind == "datasetdict":
        other = datasets.Dataset.from_list([{"prompt": "x", "completion": "y"}])
        datasets.DatasetDict({"train": ds, "test": other}).save_to_disk(tmp_path / "dd")
        return str(tmp_path / "dd")
    if kind == "csv":
        ds.to_csv(tmp_path / "d.csv", index=False)
        return str(tmp_path / "d.csv")
    if kind == "json_array":
        (tmp_path / "d.json").write_text(json.dumps(ROWS))
        return str(tmp_path / "d.json")
    if kind == "parquet":
        ds.to_parquet(tmp_path / "d.parquet")
        return str(tmp_path / "d.parquet")
    if kind == "arrow":
        ds.save_to_disk(tmp_path / "tmp")
        arrow = next((tmp_path / "tmp").glob("*.arrow"))
        arrow.rename(tmp_path / "d.arrow")
        return str(tmp_path / "d.arrow")
    raise AssertionError(kind)


KINDS = ["save_to_disk", "datasetdict", "csv", "json_array", "parquet", "arrow"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_source_reads_the_same_records(tmp_path, tok, kind):
    source = _make_source(kind, tmp_path)
    records = read_records(source)
    assert [r.data["prompt"] for r in records] == [r["prompt"] for r in ROWS]
    assert [r.data["completion"] for r in records] == [r["completion"] for r in ROWS]
    label = f"{source}[train]" if kind == "datasetdict" else source
    assert records[3].source == f"{label}:row 3"
    reference, ref_stats = load_sft_examples(write_jsonl(tmp_path / "ref.jsonl", ROWS), tok, DataConfig())
    for streaming in (False, True):
        examples, stats = load_sft_examples(source, tok, DataConfig(streaming=streaming))
        assert as_pairs(examples) == as_pairs(reference)
        assert stats == ref_stats


def test_datasetdict_splits_by_role(tmp_path, tok):
    source = _make_source("datasetdict", tmp_path)
    train, _ = load_sft_examples(source, tok, DataConfig(train=source, eval=source))
    held, _ = load_sft_examples(source, tok, DataConfig(train=source, eval=source), role="eval")
    assert len(train) == len(ROWS) and len(held) == 1  # eval: no validation split, so `test`
    assert held[0].source == f"{source}[test]:row 0"
    with pytest.raises(DataError) as err:
        read_records(source, split="validation")
    assert str(err.value) == (
        f"{source}: no split 'validation' (available: train, test). Set data.split to one of them."
    )
    with pytest.raises(DataError, match=r"no split 'dev' \(available: train, test\)\. Set data\.eval_split"):
        load_sft_examples(source, tok, DataConfig(train=source, eval=source, eval_split="dev"), role="eval")
    # A file is one split named `train`.
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert len(read_records(path, split="train")) == len(ROWS)
    with pytest.raises(DataError, match=r"d\.jsonl: no split 'test' \(available: train\)"):
        read_records(path, split="test")


# --------------------------------------------------------------------------------------------
# Column mapping


def test_column_mapping_sft_and_rl(tmp_path, tok):
    ds = datasets.Dataset.from_list(QA)
    ds.save_to_disk(tmp_path / "qa")
    cols = {"prompt": "question", "completion": "answer"}
    reference, _ = load_sft_examples(write_jsonl(tmp_path / "ref.jsonl", ROWS), tok, DataConfig())
    for source in (str(tmp_path / "qa"), str(write_jsonl(tmp_path / "qa.jsonl", QA))):
        for streaming in (False, True):
            examples, _ = load_sft_examples(source, tok, DataConfig(columns=cols, streaming=streaming))
            assert as_pairs(examples) == as_pairs(reference)
    # RL: any target, reward fields included; unmapped columns pass through.
    rows = read_prompt_rows(tmp_path / "qa", columns={"prompt": "question", "target": "answer"})
    assert rows[2] == {"prompt": QA[2]["question"], "target": QA[2]["answer"], "id": 2}


def test_column_mapping_errors(tmp_path, tok):
    datasets.Dataset.from_list(QA).save_to_disk(tmp_path / "qa")
    source = str(tmp_path / "qa")
    with pytest.raises(DataError) as err:
        load_sft_examples(source, tok, DataConfig(columns={"prompt": "q", "completion": "answer"}))
    assert str(err.value) == (
        f"{source}: data.columns maps 'prompt' to column 'q', which the dataset does not have (columns: question, answer, id)."
    )
    with pytest.raises(DataError, match=r"unknown field\(s\) 'answer_text'; SFT fields are prompt, completion, messages"):
        load_sft_examples(source, tok, DataConfig(columns={"prompt": "question", "answer_text": "answer"}))
    # JSON Lines: per record, with file:line.
    path = write_jsonl(tmp_path / "qa.jsonl", [QA[0], {"question": "q"}])
    with pytest.raises(DataError, match=r"qa\.jsonl:2: missing field 'answer' \(data\.columns maps 'completion' to it; record has: question\)"):
        read_records(path, columns={"prompt": "question", "completion": "answer"})
    with pytest.raises(ValueError, match="empty name"):
        DataConfig(columns={"prompt": ""})
    with pytest.raises(ValueError, match="data.split is set but data.train is not"):
        DataConfig(split="train")
    with pytest.raises(ValueError, match="data.eval_split is set but data.eval is not"):
        DataConfig(train="x", eval_split="test")


# --------------------------------------------------------------------------------------------
# Bad inputs name the source, row and field


def test_wrong_type_names_row_and_column(tmp_path, tok):
    bad = [*QA[:2], {"question": "q", "answer": 5, "id": 2}]
    path = write_jsonl(tmp_path / "bad.jsonl", bad)
    cfg = DataConfig(columns={"prompt": "question", "completion": "answer"})
    for streaming in (False, True):
        with pytest.raises(DataError) as err:
            load_sft_examples(path, tok, cfg.model_copy(update={"streaming": streaming}))
        assert str(err.value).startswith(f"{path}:3: field 'completion' must be a string, got int (5)."), err.value
        assert "(data.columns: 'completion' is column 'answer')" in str(err.value)
    # A dataset row: source:row N.
    datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": None}]).save_to_disk(tmp_path / "ds")
    for streaming in (False, True):
        with pytest.raises(DataError, match=r"ds:row 1: missing field 'completion' \(record has: prompt\)"):
            load_sft_examples(tmp_path / "ds", tok, DataConfig(streaming=streaming))


def test_streamed_jsonl_errors_match_eager(tmp_path, tok):
    lines = [json.dumps(ROWS[0]), "", '{"prompt": "p" "completion": "c"}']
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    for streaming in (False, True):
        with pytest.raises(DataError, match=r"d\.jsonl:3: malformed JSON: Expecting ',' delimiter \(column 16\)"):
            load_sft_examples(path, tok, DataConfig(streaming=streaming))
    unclosed = write_jsonl(tmp_path / "u.jsonl", [ROWS[0], {"prompt": "p", "completion": "<think>never closed"}])
    with pytest.raises(DataError, match=r"u\.jsonl:2: field 'completion': '<think>' at character 0 is never closed"):
        load_sft_examples(unclosed, tok, DataConfig(streaming=True))


def test_missing_sources(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: file not found"):
        read_records(tmp_path / "nope.csv")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"plain: is a directory, not a data file or a `datasets` save_to_disk directory"):
        read_records(tmp_path / "plain")
    (tmp_path / "broken.arrow").write_bytes(b"not arrow")
    with pytest.raises(DataError, match=r"broken\.arrow: `datasets` cannot read it as arrow"):
        read_records(tmp_path / "broken.arrow")


def test_offline_hub_id_is_one_clear_line(tmp_path):
    code = (
        "from leantune.data.records import read_prompt_rows, DataError\n"
        "try:\n    read_prompt_rows('leantune-no-such-owner/no-such-dataset')\n"
        "except DataError as err:\n    print('DataError:', err)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    assert lines[0].startswith(
        "DataError: leantune-no-such-owner/no-such-dataset: not a local file or directory, and the hub dataset "
        "'leantune-no-such-owner/no-such-dataset' could not be loaded (HF_HUB_OFFLINE=1 is set"
    ), lines[0]
    assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------------------------
# Streaming == eager


def test_streaming_matches_eager_examples_stats_and_batches(tmp_path, tok):
    rows = [*ROWS, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"prompt": "long " * 40, "completion": "x"},  # prompt alone over max_length: dropped even under truncate
            {"prompt": "p", "completion": "y " * 40}]  # truncated
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:5]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[5:]) + "\n")
    for overlong in ("truncate", "drop"):
        cfg = DataConfig(max_length=24, overlong=overlong)
        eager, eager_stats = load_sft_examples(path, tok, cfg)
        lazy, lazy_stats = load_sft_examples(path, tok, cfg.model_copy(update={"streaming": True}))
        assert isinstance(lazy, StreamedExamples) and isinstance(eager, list)
        assert lazy_stats == eager_stats and eager_stats.dropped >= 1
        assert len(lazy) == len(eager)
        assert [(e.input_ids, e.spans, e.source) for e in lazy] == [(e.input_ids, e.spans, e.source) for e in eager]
        assert as_pairs(lazy[2:5]) == as_pairs(eager[2:5]) and lazy[-1].source == eager[-1].source
        for step in range(9):
            assert as_pairs(batch_at(lazy, step, 3, seed=1, shuffle=True)) == as_pairs(batch_at(eager, step, 3, seed=1, shuffle=True))
    with pytest.raises(IndexError):
        lazy[len(lazy)]


def test_streamed_examples_notice_a_changed_file(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    lazy, _ = load_sft_examples(path, tok, DataConfig(streaming=True))
    write_jsonl(path, ROWS[::-1] + ROWS)
    with pytest.raises(DataError, match="changed after it was validated"):
        lazy[0]


# --------------------------------------------------------------------------------------------
# Memory: streaming holds neither the text nor the token ids


def _stream_memory(size_mb: int, tmp_path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "stream_memory.py"), "--size-mb", str(size_mb), "--dir", str(tmp_path),
         "--batches", "300", "--modes", "streaming"],
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=3000,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout.strip().splitlines()[-1])  # the measurement, for docs/data.md (pytest -s)
    return json.loads(out.stdout.strip().splitlines()[-1])


# The fixed cost of streaming (tokenizer and allocator working set, the 256-example LRU, write buffers):
# ~20 MB measured at 21 MB and 2 GB alike. The per-record index used to add ~49 bytes per record (185 MB
# at 2 GB); the bound is the same for every file size.
FLAT_BYTES = 64 * 2**20


@pytest.mark.slow
def test_streaming_memory_stays_flat_200mb(tmp_path):
    result = _stream_memory(200, tmp_path)
    stream = result["streaming"]
    assert stream["batches"] == 300 and stream["examples"] > 100_000
    assert stream["rss_growth_bytes"] < FLAT_BYTES, result


@pytest.mark.slow
def test_streaming_memory_stays_flat_2gb(tmp_path):
    result = _stream_memory(2048, tmp_path)
    assert result["streaming"]["examples"] > 3_000_000
    assert result["streaming"]["rss_growth_bytes"] < FLAT_BYTES, result
