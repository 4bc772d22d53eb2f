"""Sequence packing (data.packing): the bin plan, the packed batch, loss/gradient equality with the
unpacked batch on a tiny LoRA model, the attention check, the trainer, the planner and the ledger."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import tiny_recipe
from leantune.adapters.lora import apply_adapter
from leantune.cli import main
from leantune.config import AdapterConfig, DataConfig, ModelConfig, RecipeError, SpanWeights, recipe_from_dict
from leantune.data.packing import (
    PackedRows, check_packed_attention, collate_packed, pack_examples, pack_lengths,
)
from leantune.data.sft import IGNORE_INDEX, SPAN_ANSWER, SPAN_PROMPT, SPAN_THINK, Example, batch_at, collate, load_sft_examples
from leantune.models.loading import load_model_and_tokenizer
from leantune.train.sft import SFTLoss, accumulate_gradients, lm_loss_sum, loss_weight_total

ODD_LENGTHS = [7, 13, 3, 11, 5, 9, 17, 2, 1, 19]


def _rows(members, offsets):
    return [list(members[offsets[r]:offsets[r + 1]]) for r in range(len(offsets) - 1)]


def _examples(lengths, vocab=300, seed=0):
    """Random token ids; spans: a prompt of ~1/3, a thinking span, an answer span (each example odd-shaped)."""
    g = random.Random(seed)
    out = []
    for k, n in enumerate(lengths):
        p = n // 3
        t = (n - p) // 2
        spans = [SPAN_PROMPT] * p + [SPAN_THINK] * t + [SPAN_ANSWER] * (n - p - t)
        out.append(Example([g.randrange(5, vocab) for _ in range(n)], spans, f"synthetic:{k}"))
    return out


def _lora_model(model_dir, seed=0):
    model, tok, _ = load_model_and_tokenizer(ModelConfig(path=str(model_dir)))
    model = apply_adapter(model, AdapterConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]), seed)
    with torch.no_grad():  # non-zero B so that gradients reach A too (PEFT initializes B = 0)
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, tok


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------
# The plan


@pytest.mark.parametrize("max_length", [19, 24, 40])
def test_plan_places_every_example_once_within_max_length(max_length):
    lengths = ODD_LENGTHS * 3
    members, offsets = pack_lengths(lengths, max_length)
    rows = _rows(members, offsets)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= max_length for row in rows)
    # fewer rows than examples, and never more than the trivial lower bound + what BFD can waste
    assert len(rows) < len(lengths)
    assert len(rows) >= -(-sum(lengths) // max_length)
    # best fit: no two rows could be merged
    sums = sorted(sum(lengths[i] for i in row) for row in rows)
    assert sums[0] + sums[1] > max_length
    assert (members, offsets) == pack_lengths(lengths, max_length)  # deterministic


def test_plan_is_best_fit_decreasing_by_hand():
    # longest first: 5 -> row0 (room 1), 4 -> row1 (room 2), 3 -> row2 (room 3), 2 -> row1 (tightest), 1 -> row0
    assert _rows(*pack_lengths([3, 5, 2, 4, 1], 6)) == [[1, 4], [3, 2], [0]]


def test_plan_refuses_an_example_longer_than_a_row():
    with pytest.raises(ValueError, match="example 1 has 9 tokens"):
        pack_lengths([3, 9], 8)


# ----------------------------------------------------------------------------------------------
# The packed batch


def test_collate_packed_positions_labels_and_padding():
    ex = _examples([4, 3, 5])
    w = SpanWeights(prompt=1.0)  # every real token weighted: only boundaries and pads are masked
    b = collate_packed([[ex[0], ex[1]], [ex[2]]], pad_id=0, weights=w)
    assert b["input_ids"].shape == (2, 7)
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1]]
    assert b["attention_mask"].tolist() == [[1] * 7, [1] * 5 + [0, 0]]
    assert b["input_ids"][0].tolist() == ex[0].input_ids + ex[1].input_ids
    starts = [[0, 4], [0]]
    for r, row_starts in enumerate(starts):
        for t in range(7):
            masked = t in row_starts or not b["attention_mask"][r, t]
            assert (b["labels"][r, t] == IGNORE_INDEX) == masked, (r, t)
            assert (b["loss_weights"][r, t] == 0) == masked, (r, t)


def test_transformers_builds_a_block_diagonal_mask_from_position_ids(tiny_model_dir):
    """The path we rely on: position ids + no mask -> each packed example's hidden states as if alone."""
    model, _ = _lora_model(tiny_model_dir)
    model.eval()
    ex = _examples([6, 5, 4])
    b = collate_packed([ex], pad_id=0, weights=SpanWeights())
    decoder = model.get_base_model().get_decoder()
    with torch.no_grad():
        packed = decoder(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=None,
                         use_cache=False).last_hidden_state
        t = 0
        for e in ex:
            alone = decoder(input_ids=torch.tensor([e.input_ids]), use_cache=False).last_hidden_state
            torch.testing.assert_close(packed[:, t : t + len(e.input_ids)], alone, rtol=0, atol=1e-5)
            t += len(e.input_ids)
        # without position ids the third example does see the first two: the check above can fail
        leaked = decoder(input_ids=b["input_ids"], use_cache=False).last_hidden_state
        assert float((leaked[:, 11:] - alone).abs().max()) > 1e-2


# ----------------------------------------------------------------------------------------------
# Loss and gradients equal the unpacked ones (fp32, LoRA, odd lengths)


@pytest.mark.parametrize("weights", [SpanWeights(think=0.5, answer=2.0), SpanWeights(prompt=1.0)])
@pytest.mark.parametrize("max_length", [20, 37])
def test_packed_loss_and_gradients_equal_unpacked(tiny_model_dir, weights, max_length):
    model, tok = _lora_model(tiny_model_dir)
    assert next(model.parameters()).dtype == torch.float32
    examples = _examples(ODD_LENGTHS)
    unpacked = collate(examples, tok.pad_token_id, weights)
    packed_rows = pack_examples(examples, max_length)
    packed = collate_packed(list(packed_rows), tok.pad_token_id, weights)
    assert packed["input_ids"].numel() < unpacked["input_ids"].numel()

    # the same loss-carrying tokens, so the same normalizer (token-level mean over the step)
    assert loss_weight_total(packed) == pytest.approx(loss_weight_total(unpacked), rel=1e-7)
    assert int((packed["labels"][:, 1:] != -100).sum()) == int((unpacked["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        s_packed, s_unpacked = float(lm_loss_sum(model, packed, 5)), float(lm_loss_sum(model, unpacked, 5))
    assert s_packed == pytest.approx(s_unpacked, rel=1e-6)

    model.train()
    loss_u, norm_u = accumulate_gradients(SFTLoss(model), [unpacked], chunk_size=7)
    ref = _grads(model)
    model.zero_grad()
    loss_p, norm_p = accumulate_gradients(SFTLoss(model), [packed], chunk_size=7)
    assert norm_p == norm_u
    assert abs(loss_p - loss_u) < 1e-5
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, ref[n], rtol=1e-4, atol=1e-6, msg=n)
    assert any(float(g.abs().sum()) > 0 for g in ref.values())


def test_packed_accumulation_equals_one_packed_batch(tiny_model_dir):
    """Rows split over micro-batches (grad_accum) give the one-batch gradient: the step's normalizer is shared."""
    model, tok = _lora_model(tiny_model_dir)
    rows = list(pack_examples(_examples(ODD_LENGTHS), 20))
    w = SpanWeights()
    model.train()
    accumulate_gradients(SFTLoss(model), [collate_packed(rows, tok.pad_token_id, w)], chunk_size=7)
    big = _grads(model)
    model.zero_grad()
    accumulate_gradients(SFTLoss(model), [collate_packed([r], tok.pad_token_id, w) for r in rows], chunk_size=7)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, big[n], rtol=1e-4, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------------------------
# The attention check


class _LeakyDecoder(torch.nn.Module):
    """A 'decoder' whose output at t is the mean embedding of tokens 0..t: it ignores position ids."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 8)

    def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=False):
        h = self.embed(input_ids).cumsum(1) / torch.arange(1, input_ids.shape[1] + 1)[None, :, None]
        return SimpleNamespace(last_hidden_state=h)


class _LeakyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = _LeakyDecoder()
        self.config = SimpleNamespace(vocab_size=32, _attn_implementation="custom")

    def get_decoder(self):
        return self.decoder


def test_attention_check_passes_on_llama_and_refuses_a_leaky_model(tiny_model_dir):
    model, _ = _lora_model(tiny_model_dir)
    assert check_packed_attention(model) < 1e-4
    with pytest.raises(ValueError, match="does not keep packed examples apart.*data.packing: false"):
        check_packed_attention(_LeakyLM())


# ----------------------------------------------------------------------------------------------
# Determinism, streaming, the trainer, the ledger, the planner


def test_rows_are_a_function_of_seed_and_step(tiny_model_dir, sft_data):
    _, tok = _lora_model(tiny_model_dir)
    cfg = DataConfig(train=str(sft_data), max_length=64)
    examples, _ = load_sft_examples(sft_data, tok, cfg)
    a, b = pack_examples(examples, 64), pack_examples(list(examples), 64)
    for step in (0, 3, 11):  # 11 is past the first epoch
        assert batch_at(a, step, 2, seed=5, shuffle=True) == batch_at(b, step, 2, seed=5, shuffle=True)
    assert batch_at(a, 0, 2, seed=5, shuffle=True) != batch_at(a, 0, 2, seed=6, shuffle=True)
    streamed, _ = load_sft_examples(sft_data, tok, cfg.model_copy(update={"streaming": True, "packing": True}))
    s = pack_examples(streamed, 64)
    assert list(s.lengths if hasattr(s, "lengths") else streamed.lengths) == [len(e.input_ids) for e in examples]
    assert (s.members, s.offsets) == (a.members, a.offsets)
    assert s[2] == a[2]


def _write_recipe(tmp_path, raw):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_train_with_packing_records_stats_in_ledger(tmp_path, tiny_model_dir, sft_data):
    raw = tiny_recipe(tiny_model_dir, sft_data, tmp_path / "run", data={"packing": True, "max_length": 64},
                      train={"steps": 3, "micro_batch_size": 2})
    assert main(["--quiet", "train", str(_write_recipe(tmp_path, raw))]) == 0
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    p = ledger["extra"]["packing"]
    examples = ledger["totals"]["data"]["examples"]
    assert p["examples"] == examples == 24
    assert p["rows"] < examples and p["examples_per_row"] == pytest.approx(examples / p["rows"])
    assert p["fill"] == pytest.approx(ledger["totals"]["data"]["tokens"] / (p["rows"] * 64))
    assert 0 < p["fill"] <= 1
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(m["loss"] > 0 for m in metrics)
    # 2 rows per step, most holding several examples: 3 steps (6 rows) carry more tokens than 6 examples
    assert metrics[-1]["tokens"] > 6 * max(1, ledger["totals"]["data"]["tokens"] // examples)


def test_unpacked_ledger_says_no_packing(tmp_path, tiny_model_dir, sft_data):
    raw = tiny_recipe(tiny_model_dir, sft_data, tmp_path / "run", train={"steps": 1})
    assert main(["--quiet", "train", str(_write_recipe(tmp_path, raw))]) == 0
    assert json.loads((tmp_path / "run" / "ledger.json").read_text())["extra"]["packing"] is None


def test_packing_is_refused_by_rl_and_dpo(tmp_path, tiny_model_dir, sft_data):
    recipe = recipe_from_dict(tiny_recipe(tiny_model_dir, sft_data, tmp_path / "run", data={"packing": True}))
    recipe.require_for("train")
    for command in ("rl", "dpo"):
        with pytest.raises(RecipeError, match="data.packing"):
            recipe.require_for(command)


def test_planner_sizes_packed_rows_with_the_block_mask(tiny_model_dir, tmp_path):
    from leantune.plan import model_shape, plan_memory

    def plan(batch, packing):
        r = recipe_from_dict(tiny_recipe(tiny_model_dir, tmp_path / "t.jsonl", tmp_path / "run",
                                         data={"packing": packing, "max_length": 64},
                                         train={"micro_batch_size": batch}))
        return plan_memory(r, model_shape(r.model), "local")

    one_row, one_example = plan(1, True), plan(1, False)
    # a single packed row still carries the explicit block-diagonal mask (and un-grouped K/V on CPU)
    assert one_row.totals["forward + loss"] > one_example.totals["forward + loss"]
    assert any("data.packing" in n for n in one_row.notes)
    # at micro-batch 2 both are masked B x max_length batches: the same plan
    assert plan(2, True).totals == plan(2, False).totals


def test_packed_resume_equals_uninterrupted(tmp_path, tiny_model_dir, sft_data):
    """4 packed steps in one go == 2 steps, then --resume to 4 (the rows at a step are a function of seed + step)."""
    from leantune.train.sft import train

    def recipe(run, steps):
        return recipe_from_dict(tiny_recipe(tiny_model_dir, sft_data, tmp_path / run, data={"packing": True},
                                            optim={"scheduler": "constant", "warmup_steps": 0},
                                            train={"steps": steps, "micro_batch_size": 2, "save_every": 2}))

    whole = train(recipe("whole", 4), quiet=True).model
    train(recipe("split", 2), quiet=True)
    resumed = train(recipe("split", 4), resume=True, quiet=True).model
    a = {n: p for n, p in whole.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=0, msg=n)
    # the resumed run trained on packed rows of several examples
    assert json.loads((tmp_path / "split" / "ledger.json").read_text())["extra"]["packing"]["examples_per_row"] > 1.5
