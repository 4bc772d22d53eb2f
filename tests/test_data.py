"""SFT data pipeline: record validation errors, exact spans, labels/weights, overlong policy, batch order."""

from __future__ import annotations

import json

import pytest
import torch

from leantune.config import DataConfig, SpanWeights
from leantune.data import sft
from leantune.data.records import DataError, read_records
from leantune.data.sft import (
    SPAN_ANSWER,
    SPAN_PROMPT,
    SPAN_THINK,
    Example,
    batch_at,
    collate,
    epoch_order,
    load_sft_examples,
)
from leantune.models.tiny import tiny_tokenizer

PROMPT = "What is 3 + 4? "
THINK = "<think>3 + 4 = 7</think>"
ANSWER = " The answer is 7."


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return tiny_tokenizer(chat_template=True)


def write_jsonl(path, lines):
    """Write raw lines (dicts are JSON-encoded, strings written as-is)."""
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


def cfg(path, **kw) -> DataConfig:
    return DataConfig(train=str(path), **kw)


def decode_span(tok, ex: Example, span: int) -> str:
    return tok.decode([i for i, s in zip(ex.input_ids, ex.spans) if s == span])


# --------------------------------------------------------------------------------------------
# Bad input: every error names file:line (or file:row N) and the field


GOOD = {"prompt": "p", "completion": "c"}
BAD_RECORDS = [
    ("malformed", '{"prompt": "p", "completion": ', "malformed JSON"),
    ("not_object", "[1, 2]", "expected a JSON object"),
    ("missing", {"prompt": "p"}, "missing field 'completion'"),
    ("mistyped", {"prompt": "p", "completion": 42}, "field 'completion' must be a string, got int"),
    ("prompt_list", {"prompt": ["p"], "completion": "c"}, "field 'prompt' must be a string, got list"),
    ("unknown_shape", {"question": "q", "answer": "a"}, "unknown record shape (fields: answer, question)"),
    ("messages_not_list", {"messages": "hi"}, "field 'messages' must be a non-empty list"),
    ("messages_empty", {"messages": []}, "field 'messages' must be a non-empty list"),
    ("message_not_obj", {"messages": ["hi"]}, "field 'messages[0]' must be an object"),
    ("message_no_role", {"messages": [{"content": "hi"}]}, "missing field 'messages[0].role'"),
    (
        "content_not_str",
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]},
        "field 'messages[1].content' must be a string, got int",
    ),
    ("no_assistant", {"messages": [{"role": "user", "content": "q"}]}, "field 'messages' has no assistant message"),
    (
        "trailing_user",
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
        "field 'messages[1]' has role 'user' after the last assistant message",
    ),
    ("ambiguous", {"prompt": "p", "completion": "c", "messages": []}, "both 'messages' and 'prompt'/'completion'"),
]


@pytest.mark.parametrize("name,line,expected", BAD_RECORDS, ids=[b[0] for b in BAD_RECORDS])
def test_bad_record_names_file_line_and_field(tmp_path, name, line, expected):
    # Bad record on line 4, after a good record and a blank line: line numbers count blank lines.
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", GOOD, line, GOOD])
    with pytest.raises(DataError) as err:
        read_records(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:4: "), msg
    assert expected in msg, msg


def test_malformed_json_reports_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"prompt": "p" "completion": "c"}'])
    with pytest.raises(DataError, match=r"d\.jsonl:1: malformed JSON: Expecting ',' delimiter \(column 16\)"):
        read_records(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        read_records(tmp_path / "empty.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"bin\.jsonl:2: not UTF-8"):
        read_records(tmp_path / "bin.jsonl")
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match=r"dir\.jsonl: is a directory"):
        read_records(tmp_path / "dir.jsonl")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot read Parquet"):
        read_records(tmp_path / "bad.parquet")
    (tmp_path / "d.txt").write_text("prompt,completion\n")  # .csv is read by `datasets` (tests/test_data_sources.py)
    with pytest.raises(DataError, match=r"d\.txt: unsupported file type '\.txt'"):
        read_records(tmp_path / "d.txt")


def test_enforced_format_mismatch(tmp_path):
    msgs = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, msgs])
    assert [r.kind for r in read_records(path)] == ["prompt_completion", "messages"]  # auto: per record
    with pytest.raises(DataError, match=r"d\.jsonl:2: record has 'messages' but data.format is 'prompt_completion'"):
        read_records(path, "prompt_completion")
    with pytest.raises(DataError, match=r"d\.jsonl:1: record has 'prompt'/'completion' but data.format is 'messages'"):
        read_records(path, "messages")


def test_empty_completion_and_unclosed_think_are_errors(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"prompt": "p", "completion": "  "}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'completion' is empty"):
        load_sft_examples(path, tok, cfg(path))
    msgs = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}
    path = write_jsonl(tmp_path / "m.jsonl", [msgs])
    with pytest.raises(DataError, match=r"m\.jsonl:1: field 'messages\[1\]\.content' is empty"):
        load_sft_examples(path, tok, cfg(path))
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD, GOOD, {"prompt": "p", "completion": "<think>3 + 4"}])
    with pytest.raises(DataError, match=r"t\.jsonl:3: field 'completion': '<think>' at character 0 is never closed"):
        load_sft_examples(path, tok, cfg(path))


# --------------------------------------------------------------------------------------------
# Spans, labels, weights


def test_spans_decode_to_the_pieces(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": PROMPT, "completion": THINK + ANSWER},
            {"prompt": PROMPT, "completion": "7"},  # no markers: all answer
            {"prompt": PROMPT, "completion": "Well. " + THINK + ANSWER},  # text before the block is thinking
        ],
    )
    (ex, plain, pre), stats = load_sft_examples(path, tok, cfg(path))
    assert ex.source == f"{path}:1" and len(ex.input_ids) == len(ex.spans)
    assert decode_span(tok, ex, SPAN_PROMPT) == PROMPT
    assert decode_span(tok, ex, SPAN_THINK) == THINK
    assert decode_span(tok, ex, SPAN_ANSWER) == ANSWER + "<|eos|>"
    assert ex.input_ids[-1] == tok.eos_token_id
    # spans are contiguous: prompt, then think, then answer
    assert ex.spans == sorted(ex.spans)
    assert SPAN_THINK not in plain.spans and decode_span(tok, plain, SPAN_ANSWER) == "7<|eos|>"
    assert decode_span(tok, pre, SPAN_THINK) == "Well. " + THINK
    assert stats.records == stats.examples == 3 and stats.truncated == stats.dropped == 0
    assert stats.tokens == sum(len(e.input_ids) for e in (ex, plain, pre))


def test_trainable_tokens_hand_count(tmp_path, tok):
    # Hand count with the tiny tokenizer (see the token dump in the test below):
    # prompt 'What',' is',' 3',' +',' 4','?',' ' = 7; think '<think>','3',' +',' 4',' =',' 7','</think>' = 7;
    # answer ' The',' answer',' is',' 7','.' + eos = 6.
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": PROMPT, "completion": THINK + ANSWER}])
    (ex,), stats = load_sft_examples(path, tok, cfg(path))
    assert [tok.decode([i]) for i in ex.input_ids[7:14]] == ["<think>", "3", " +", " 4", " =", " 7", "</think>"]
    assert (stats.prompt_tokens, stats.think_tokens, stats.answer_tokens, stats.tokens) == (7, 7, 6, 20)
    assert stats.trainable_tokens(SpanWeights()) == 13
    assert stats.trainable_tokens(SpanWeights(think=0.0)) == 6
    assert stats.trainable_tokens(SpanWeights(prompt=0.5, think=0.0, answer=1.0)) == 13
    assert stats.as_dict()["think_tokens"] == 7


def test_collate_labels_and_weights(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": PROMPT, "completion": THINK + ANSWER}, {"prompt": "Hi ", "completion": "ok"}]
    )
    examples, stats = load_sft_examples(path, tok, cfg(path))
    long, short = examples
    B, T = 2, len(long.input_ids)
    w = SpanWeights(prompt=0.0, think=0.25, answer=1.0)
    batch = collate(examples, tok.pad_token_id, w)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (B, T) for k in batch}
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["loss_weights"].dtype == torch.float32
    n = len(short.input_ids)
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * (T - n)
    assert batch["input_ids"][1, n:].eq(tok.pad_token_id).all() and batch["spans"][1, n:].eq(-1).all()

    spans = torch.tensor(long.spans)
    expected_w = torch.where(spans == SPAN_THINK, 0.25, torch.where(spans == SPAN_ANSWER, 1.0, 0.0))
    assert torch.equal(batch["loss_weights"][0], expected_w)
    assert batch["labels"][0].tolist() == [i if s != SPAN_PROMPT else -100 for i, s in zip(long.input_ids, long.spans)]
    assert batch["labels"][1, n:].eq(-100).all() and batch["loss_weights"][1, n:].eq(0).all()
    assert int((batch["labels"] != -100).sum()) == stats.trainable_tokens(w)

    # answer-only: thinking masked out of the labels
    batch = collate(examples, tok.pad_token_id, SpanWeights(think=0.0))
    assert tok.decode(batch["labels"][0][batch["labels"][0] != -100]) == ANSWER + "<|eos|>"
    assert int((batch["labels"] != -100).sum()) == stats.trainable_tokens(SpanWeights(think=0.0))
    # prompt weight > 0: labels everywhere but pads
    batch = collate(examples, tok.pad_token_id, SpanWeights(prompt=1.0))
    assert torch.equal(batch["labels"] != -100, batch["attention_mask"].bool())


def test_truncate_vs_drop(tmp_path, tok):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 4  # > 20 tokens
    rows = [
        {"prompt": PROMPT, "completion": THINK + ANSWER},  # 20 tokens: fits
        {"prompt": PROMPT, "completion": THINK + ANSWER + ANSWER},  # 25 tokens: too long
        {"prompt": long_prompt, "completion": "7"},  # prompt alone fills max_length
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples, stats = load_sft_examples(path, tok, cfg(path, max_length=20, overlong="truncate"))
    assert (stats.records, stats.examples, stats.truncated, stats.dropped) == (3, 2, 1, 1)
    assert [len(e.input_ids) for e in examples] == [20, 20]
    assert examples[1].input_ids[-1] != tok.eos_token_id  # the eos was cut
    assert stats.tokens == 40 and stats.answer_tokens == 6 + 6

    examples, stats = load_sft_examples(path, tok, cfg(path, max_length=20, overlong="drop"))
    assert (stats.records, stats.examples, stats.truncated, stats.dropped) == (3, 1, 0, 2)
    assert [e.source for e in examples] == [f"{path}:1"]

    with pytest.raises(DataError, match=r"all 3 examples are longer than data.max_length=5"):
        load_sft_examples(path, tok, cfg(path, max_length=5, overlong="drop"))


# --------------------------------------------------------------------------------------------
# Messages, Parquet


CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 3 + 4?"},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "And 3 + 5?"},
    {"role": "assistant", "content": THINK.replace("4 = 7", "5 = 8") + " 8"},
]


def test_messages_without_chat_template_use_fallback(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVO}])
    (ex,), stats = load_sft_examples(path, tok, cfg(path))
    assert decode_span(tok, ex, SPAN_PROMPT) == (
        "system: Be brief.\nuser: What is 3 + 4?\nassistant: 7\nuser: And 3 + 5?\nassistant: "
    )
    assert decode_span(tok, ex, SPAN_THINK) == "<think>3 + 5 = 8</think>"
    assert decode_span(tok, ex, SPAN_ANSWER) == " 8<|eos|>"


def test_messages_with_chat_template(tmp_path, chat_tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVO}])
    (ex,), _ = load_sft_examples(path, chat_tok, cfg(path, format="messages"))
    expected_prompt = chat_tok.apply_chat_template(CONVO[:4], tokenize=False, add_generation_prompt=True)
    assert expected_prompt.endswith("<|bos|>assistant\n") and "<|bos|>assistant\n7<|eos|>" in expected_prompt
    assert decode_span(chat_tok, ex, SPAN_PROMPT) == expected_prompt
    assert ex.input_ids[0] == chat_tok.bos_token_id and ex.input_ids[1] != chat_tok.bos_token_id  # no double BOS
    assert decode_span(chat_tok, ex, SPAN_THINK) + decode_span(chat_tok, ex, SPAN_ANSWER) == CONVO[-1]["content"] + "<|eos|>"


def test_parquet(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(
        pa.Table.from_pylist([{"prompt": PROMPT, "completion": THINK + ANSWER}, {"prompt": "Hi ", "completion": "ok"}]),
        tmp_path / "pc.parquet",
    )
    examples, stats = load_sft_examples(tmp_path / "pc.parquet", tok, cfg(tmp_path / "pc.parquet"))
    assert [e.source for e in examples] == [f"{tmp_path / 'pc.parquet'}:row 0", f"{tmp_path / 'pc.parquet'}:row 1"]
    assert decode_span(tok, examples[0], SPAN_THINK) == THINK and stats.examples == 2

    pq.write_table(pa.Table.from_pylist([{"messages": CONVO[:3]}]), tmp_path / "m.parquet")
    (ex,), _ = load_sft_examples(tmp_path / "m.parquet", tok, cfg(tmp_path / "m.parquet"))
    assert decode_span(tok, ex, SPAN_ANSWER) == "7<|eos|>"

    pq.write_table(pa.Table.from_pylist([GOOD, {"prompt": "p", "completion": None}]), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet:row 1: missing field 'completion'"):
        read_records(tmp_path / "bad.parquet")


# --------------------------------------------------------------------------------------------
# Batch order


@pytest.mark.parametrize("n,mbs", [(10, 3), (8, 4), (1, 4), (7, 1)])
def test_batch_at_covers_each_example_once_per_epoch(n, mbs):
    items = list(range(n))
    per_epoch = -(-n // mbs)
    seen_orders = []
    for epoch in range(3):
        batches = [batch_at(items, epoch * per_epoch + b, mbs, seed=1, shuffle=True) for b in range(per_epoch)]
        assert all(1 <= len(x) <= mbs for x in batches)
        flat = [i for x in batches for i in x]
        assert sorted(flat) == items
        assert flat == list(epoch_order(n, seed=1, epoch=epoch, shuffle=True))
        seen_orders.append(flat)
    if n >= 7:
        assert seen_orders[0] != seen_orders[1]  # reshuffled every epoch
        assert list(epoch_order(n, 1, 0, True)) != list(epoch_order(n, 2, 0, True))  # seed matters
    assert list(epoch_order(n, 1, 0, shuffle=False)) == items


def test_batch_at_is_deterministic_for_resume():
    items = list(range(11))
    full = [batch_at(items, s, 4, seed=7, shuffle=True) for s in range(10)]
    # A fresh process (a resumed run) must see the same order: the permutation is a pure function of
    # (seed, epoch, index), with no per-process hash seed or cache involved.
    import subprocess
    import sys

    code = ("import json; from leantune.data.sft import batch_at; "
            "print(json.dumps([batch_at(list(range(11)), s, 4, seed=7, shuffle=True) for s in range(5, 10)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONHASHSEED": "123"})
    assert json.loads(out.stdout) == full[5:]
