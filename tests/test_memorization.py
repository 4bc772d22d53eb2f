"""Memorization: k-extractable against a by-hand greedy reference (no KV cache), an overfit tiny model that
reproduces its training sequences but not held-out ones, the loss gap, and `leantune eval --memorization`."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from conftest import tiny_recipe, write_jsonl
from leantune.cli import main
from leantune.config import DataConfig, SpanWeights
from leantune.data.sft import Example, collate, load_sft_examples
from leantune.eval.memorization import Window, extractable, greedy_continuations, memorization, windows
from leantune.models.tiny import tiny_model, tiny_tokenizer


@torch.no_grad()
def _naive_greedy(model, prefix: list[int], steps: int) -> list[int]:
    """The reference: recompute the whole sequence every step, take the argmax of the last position."""
    ids = list(prefix)
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([ids])).logits  # (1, T, V)
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prefix):]


def test_greedy_continuations_match_naive_reference():
    model = tiny_model(seed=3).eval()
    g = torch.Generator().manual_seed(0)
    prefixes = torch.randint(5, 500, (5, 7), generator=g)  # odd: 5 prefixes of 7 tokens, batch 2
    got = greedy_continuations(model, prefixes, steps=6, batch_size=2)
    assert got.shape == (5, 6)
    for row, prefix in zip(got.tolist(), prefixes.tolist()):
        assert row == _naive_greedy(model, prefix, 6)


def test_extractable_by_hand():
    """Windows whose suffix is the model's own greedy continuation are extractable; one wrong token is not."""
    model = tiny_model(seed=1).eval()
    g = torch.Generator().manual_seed(1)
    prefixes = torch.randint(5, 500, (4, 5), generator=g).tolist()
    wins = []
    for i, p in enumerate(prefixes):
        suffix = _naive_greedy(model, p, 4)
        if i % 2:  # odd windows: change the last target token
            suffix[-1] = (suffix[-1] + 1) % 512
        wins.append(Window(p, suffix, f"f:{i + 1}"))
    res = extractable(model, wins, batch_size=3)
    assert (res["windows"], res["extractable"], res["rate"], res["extracted"]) == (4, 2, 0.5, ["f:1", "f:3"])
    assert extractable(model, [])["rate"] is None


def test_windows_skip_short_and_align_on_completion():
    ex = [Example(list(range(10)), [0] * 4 + [2] * 6, "a"), Example(list(range(5)), [0] * 4 + [2], "b"),
          Example(list(range(8)), [0] * 1 + [2] * 7, "c")]
    assert [(w.prefix, w.suffix, w.source) for w in windows(ex, 3, 3)] == [([0, 1, 2], [3, 4, 5], "a"), ([0, 1, 2], [3, 4, 5], "c")]
    assert [(w.prefix, w.suffix) for w in windows(ex, 3, 3, align="completion")] == [([1, 2, 3], [4, 5, 6])]  # c: prompt too short
    with pytest.raises(ValueError):
        windows(ex, 0, 3)


def _sentences(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    words = "the quick brown fox jumps over lazy dog cats watch birds apples left answer question help today".split()
    return [{"prompt": " ".join(rng.choice(words) for _ in range(4)), "completion": " ".join(rng.choice(words) for _ in range(10))}
            for _ in range(n)]


def test_overfit_model_memorizes_training_not_heldout(tmp_path):
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    train = write_jsonl(tmp_path / "train.jsonl", _sentences(0, 4))
    held = write_jsonl(tmp_path / "held.jsonl", _sentences(1, 4))
    cfg = DataConfig(train=str(train), max_length=64)
    train_ex, _ = load_sft_examples(train, tok, cfg)
    held_ex, _ = load_sft_examples(held, tok, cfg)
    model = tiny_model(seed=0)
    weights = SpanWeights(prompt=1.0)  # train on every token, so the whole window can be memorized
    batch = collate(train_ex, tok.pad_token_id, weights)
    before = memorization(model, tok, train_ex, held_ex, prefix=4, suffix=8, samples=4, weights=weights)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = memorization(model, tok, train_ex, held_ex, prefix=4, suffix=8, samples=4, weights=weights)
    assert before["train"]["rate"] == 0.0
    assert after["train"]["windows"] == 4 and after["train"]["rate"] > 0.5, after
    assert after["heldout"]["rate"] == 0.0, after
    assert after["loss_gap"] > 1.0 > abs(before["loss_gap"]), (before["loss_gap"], after["loss_gap"])
    assert after["train"]["mean_loss"] < before["train"]["mean_loss"]


def test_cli_eval_memorization(tmp_path, tiny_model_dir, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", _sentences(0, 6))
    held = write_jsonl(tmp_path / "held.jsonl", _sentences(1, 5))
    raw = tiny_recipe(tiny_model_dir, train, tmp_path / "run", train={"steps": 2}, data={"eval": str(held)})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    run = str(tmp_path / "run")
    assert main(["eval", run, "--memorization", "--prefix", "4", "--suffix", "4", "--samples", "3", "--seed", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train"]["windows"] == 3 and out["train"]["examples"] == 6 and out["heldout"]["windows"] == 3
    assert out["loss_gap"] == pytest.approx(out["heldout"]["mean_loss"] - out["train"]["mean_loss"])
    assert out["heldout_data"] == str(held)
    other = write_jsonl(tmp_path / "other.jsonl", _sentences(2, 2))
    assert main(["eval", run, "--memorization", "--heldout", str(other), "--prefix", "2", "--suffix", "2",
                 "--align", "completion"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["heldout"]["examples"] == 2 and out["align"] == "completion"
    assert main(["eval", str(tiny_model_dir), "--memorization"]) == 2
    assert "needs a leantune run directory" in capsys.readouterr().err
