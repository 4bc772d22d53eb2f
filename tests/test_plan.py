"""Memory planner: every term on the tiny Llama computed by hand; the activation formula against the
tensors autograd really saves; the budget check refuses before reading data; the --memory search."""

from __future__ import annotations

import collections
import json

import pytest
import torch
import yaml
from conftest import tiny_recipe

from leantune.cli import main
from leantune.config import RecipeError, load_recipe, parse_size, recipe_from_dict
from leantune.plan import CALIBRATION, model_shape, plan_memory
from leantune.plan import memory as M
from leantune.plan.model_shape import (
    config_from_gguf,
    read_gguf_header,
    shape_from_config,
)
from leantune.plan.search import COST, knob_values, search, step_cost


def _recipe(tiny_model_dir, tmp_path, data="train.jsonl", **sections):
    return recipe_from_dict(tiny_recipe(tiny_model_dir, tmp_path / data, tmp_path / "run", **sections))


def _write(tmp_path, raw: dict, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------------
# Sizes


def test_parse_size_units():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(" 1.5 gib ") == 3 * 2**29
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size(123456) == 123456
    assert parse_size("100") == 100


@pytest.mark.parametrize("bad, match", [
    ("2 gigs", "unknown unit 'gigs'"),
    ("2G", r"did you mean '2GB' \(10\^n\) or '2GiB' \(2\^n\)"),
    ("lots", "cannot read 'lots' as a memory size"),
    ("-1GB", "cannot read"),
    (0, "positive"),
    (1.5, "whole number"),
    (True, "a memory size is a number of bytes"),
])
def test_parse_size_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_size(bad)


def test_budget_error_names_file_line_and_field(tmp_path, tiny_model_dir):
    raw = tiny_recipe(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "run", memory={"budget": "2 gigs"})
    path = _write(tmp_path, raw)
    with pytest.raises(RecipeError, match=rf"{path}:\d+: field 'memory.budget'.*unknown unit 'gigs'"):
        load_recipe(path)


def test_cli_memory_flag_parse_error(tmp_path, tiny_model_dir, capsys):
    path = _write(tmp_path, tiny_recipe(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "run"))
    assert main(["plan", str(path), "--memory", "2 gigs"]) == 2
    assert "--memory: unknown unit 'gigs'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The breakdown, by hand, on the tiny Llama (2 layers, H 64, I 128, 4 heads, 2 kv heads, d 16)


def test_shape_of_tiny_model(tiny_model_dir, tmp_path):
    shape = model_shape(_recipe(tiny_model_dir, tmp_path).model)
    V = shape.vocab
    per_layer = 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 3 * 128 * 64 + 2 * 64  # q k v o, gate up down, 2 norms
    assert (shape.layers, shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim) == (2, 64, 128, 4, 2, 16)
    assert not shape.tied
    assert shape.params == 2 * V * 64 + 2 * per_layer + 64  # embed + lm_head (untied) + layers + final norm


def test_breakdown_by_hand(tiny_model_dir, tmp_path):
    # tiny_recipe: fp32, LoRA r=4 on q_proj, v_proj, down_proj; micro-batch 4 x max_length 64; chunk 16; AdamW
    recipe = _recipe(tiny_model_dir, tmp_path)
    shape = model_shape(recipe.model)
    V, B, T = shape.vocab, 4, 64
    N = B * T  # 256 tokens
    plan = plan_memory(recipe, shape, "local")

    params = 2 * V * 64 + 2 * 36992 + 64
    lora = 2 * (4 * (64 + 64) + 4 * (64 + 32) + 4 * (128 + 64))  # per layer q, v, down: r x (in + out)
    # Saved activations of layer 1 (its input requires grad), bytes:
    norm = N * (4 * 64 + 4)  # fp32 input + rsqrt
    lora_in = N * 64 * 4 + 2 * N * 4 * 4  # y shared by q/v LoRA + two (N, r) lora_A outputs
    sdpa = N * 4 * (64 + 64 + 64 + 64) + N * 4 * 4 + B * T * T * 4  # q, k, v, out (K/V repeated: masked) + lse + mask
    mlp = 3 * N * 128 * 4  # gate, act, up
    down = N * 128 * 4 + N * 4 * 4  # act*up saved by down's lora_A + its output
    layer1 = norm + lora_in + sdpa + norm + mlp + down
    layer0 = layer1 - norm  # frozen embeddings: the first norm saves nothing
    shared = 2 * T * 16 * 4  # RoPE cos, sin
    final_norm = N * (4 * 64 + 4)
    activations = layer0 + layer1 + shared + final_norm
    rows = B * (T - 1)  # loss_fraction 1.0: every shifted position
    loss_saved = B * (T - 1) * 64 * 4 + 24 * rows  # hidden[:, :-1] copy + idx/label/weight/lse per row
    loss_ws = 2 * 16 * V * 4 + 16 * 64 * 4  # chunk 16: logits + exp, gathered rows
    runtime = CALIBRATION.runtime_bytes + CALIBRATION.tokenizer_bytes_per_token * V

    fwd = plan.phases["forward + loss"]
    assert fwd["runtime"][0] == runtime
    assert fwd["weights"][0] == params * 4
    assert fwd["adapter"][0] == lora * 4
    assert fwd["optimizer"][0] == 2 * lora * 4
    assert fwd["activations"][0] == activations
    assert fwd["loss"][0] == N * 64 * 4 + loss_saved + loss_ws  # + the final hidden states alive in forward
    bwd = plan.phases["decoder backward"]
    assert bwd["gradients"][0] == 0  # at the top layer's backward no adapter gradient exists yet
    assert bwd["activations"][0] == activations  # ... and everything is still saved
    assert plan.phases["optimizer step"]["gradients"][0] == lora * 4
    assert bwd["workspace"][0] == N * (3 * 128 + 2 * 64) * 4
    assert plan.phases["loss backward"]["loss"][0] == loss_saved + loss_ws + B * (T - 1) * 64 * 4  # + grad of hidden
    assert plan.phases["load"]["load"][0] == 0  # fp32 safetensors loaded as fp32: mapped, counted when touched
    assert (shape.file_dtype, shape.file_bytes) == ("float32", params * 4)
    assert plan.peak == max(plan.totals.values())

    # checkpointing every layer: only each layer's input is kept, one layer is recomputed in backward
    ckpt = plan_memory(recipe.model_copy(update={"train": recipe.train.model_copy(update={"activation_checkpointing": "all"})}),
                       shape, "local")
    assert ckpt.phases["forward + loss"]["activations"][0] == 2 * N * 64 * 4 + shared + final_norm
    assert ckpt.phases["decoder backward"]["activations"][0] == 2 * N * 64 * 4 + layer1 + shared + final_norm

    # ... and with offload_checkpoints those inputs live in a file: one layer input stays resident
    off = plan_memory(recipe.model_copy(update={"train": recipe.train.model_copy(
        update={"activation_checkpointing": "all", "offload_checkpoints": True})}), shape, "local")
    assert off.phases["forward + loss"]["activations"][0] == N * 64 * 4 + shared + final_norm
    assert off.phases["decoder backward"]["activations"][0] == N * 64 * 4 + layer1 + shared + final_norm


def test_quantized_weights_by_hand(tiny_model_dir, tmp_path):
    from leantune.models.tiny import tiny_model
    from leantune.quant import QuantLinear, quantize_model

    recipe = _recipe(tiny_model_dir, tmp_path, quant={"bits": 4, "group_size": 32})
    shape = model_shape(recipe.model)
    V = shape.vocab
    # INT4, g=32: (out x in / 2) code bytes + 2 fp32 (out x in/32) scale/offset per linear; lm_head, embeddings, norms fp32
    def q4(out, n_in):
        return out * n_in // 2 + 2 * out * (n_in // 32) * 4

    per_layer = q4(64, 64) + 2 * q4(32, 64) + q4(64, 64) + 2 * q4(128, 64) + q4(64, 128) + 2 * 64 * 4
    expected = 2 * V * 64 * 4 + 2 * per_layer + 64 * 4
    assert M.weight_bytes(shape, 4, 4, 32) == expected
    # in a run on the fp32 safetensors directory the file stays mapped: its pages + the INT4 buffers
    plan = plan_memory(recipe, shape, "local")
    assert plan.phases["forward + loss"]["weights"][0] == params_bytes(shape) + expected - (2 * V * 64 + 64) * 4 - 2 * 2 * 64 * 4
    model = tiny_model(vocab_size=V)
    quantize_model(model, 4, 32, skip=["lm_head"])
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    real = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        t.numel() * t.element_size() for m in quant for t in (m.qweight, m.scale, m.offset))
    assert len(quant) == 14 and real == expected


def params_bytes(shape):
    return shape.params * 4


def test_bf16_and_gguf_load_terms(tiny_model_dir, tmp_path):
    recipe = _recipe(tiny_model_dir, tmp_path, model={"dtype": "bfloat16"})
    shape = model_shape(recipe.model)
    V, params = shape.vocab, shape.params
    plan = plan_memory(recipe, shape, "local")
    # converting fp32 -> bf16 reads every page of the file and keeps a bf16 copy
    assert plan.phases["load"]["load"][0] == params * 4 + params * 2
    # bf16 weights: the fused loss computes with an fp32 copy of the (V, H) lm_head weight
    rows = 4 * 63
    assert M.loss_workspace_bytes(shape, rows, 16, 2) == 2 * 16 * V * 4 + 16 * 64 * 4 + V * 64 * 4
    gguf = M.load_extra_bytes(shape, "bfloat16", "gguf", CALIBRATION)
    assert gguf == params * 2 + int(CALIBRATION.gguf_load_transient * V * 64 * 4) + CALIBRATION.gguf_resident_bytes


def test_mezo_full_and_rl_terms(tiny_model_dir, tmp_path):
    recipe = _recipe(tiny_model_dir, tmp_path, optim={"name": "mezo"})
    shape = model_shape(recipe.model)
    plan = plan_memory(recipe, shape, "local")
    assert set(plan.phases) == {"load", "forward (no grad)", "loss (no grad)"}  # no backward, no AdamW state
    assert "gradients" not in plan.terms

    full = plan_memory(_recipe(tiny_model_dir, tmp_path, adapter={"method": "full"}), shape, "local")
    step = full.phases["optimizer step"]
    assert step["adapter"][0] == 0  # the weights themselves train
    assert step["gradients"][0] == shape.params * 4 and step["optimizer"][0] == 2 * shape.params * 4

    # RL: K and V (2) x layers x kv heads x head_dim x (prompt + new tokens) x sequences x bytes
    assert M.kv_cache_bytes(shape, tokens=64 + 32, batch=16, dtype_bytes=2) == 2 * 2 * 2 * 16 * 96 * 16 * 2
    rl = recipe_from_dict({**tiny_recipe(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "run"),
                           "rl": {"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 32}})
    rollout = plan_memory(rl, shape, "local").phases["rollout"]
    assert rollout["kv_cache"][0] == 2 * 2 * 2 * 16 * (64 + 32) * 8 * 4
    # rl.fold_adapter: one copy of each adapted layer's weight (in x out x 4 B), none when it is off
    adapted = M.lora_targets(shape, rl.adapter.target_modules)
    assert adapted and rollout["folded_weights"][0] == sum(t.in_features * t.out_features for t in adapted) * 4
    unfolded = recipe_from_dict({**tiny_recipe(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "run"),
                                 "rl": {"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 32, "fold_adapter": False}})
    assert "folded_weights" not in plan_memory(unfolded, shape, "local").phases["rollout"]


# ----------------------------------------------------------------------------------------------
# The activation formula against what autograd saves


def _saved_bytes(model, run) -> int:
    """Bytes of the distinct non-parameter storages autograd saves while ``run()`` runs."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in owned:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def _traced_saved_bytes(model, batch: int, seq: int, padded: bool) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one decoder forward."""
    from leantune.adapters.lora import causal_lm

    lm = causal_lm(model)
    ids = torch.randint(0, lm.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        mask[1:, seq // 2 :] = 0
    return _saved_bytes(model, lambda: lm.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False))


@pytest.mark.parametrize("dtype, targets, method, dropout, padded", [
    ("float32", ["q_proj", "k_proj", "v_proj", "o_proj"], "lora", 0.0, False),
    ("float32", ["q_proj", "v_proj", "down_proj"], "lora", 0.1, True),
    ("float32", ["o_proj", "gate_proj", "up_proj"], "lora", 0.0, True),
    ("bfloat16", ["q_proj", "k_proj", "v_proj", "o_proj"], "lora", 0.0, True),
    ("bfloat16", ["q_proj", "v_proj", "down_proj"], "lora", 0.1, False),
    ("float32", ["q_proj"], "full", 0.0, True),
])
def test_saved_activations_match_autograd(dtype, targets, method, dropout, padded):
    from leantune.adapters.lora import apply_adapter, causal_lm
    from leantune.models.tiny import tiny_model

    B, T = 3, 24
    raw = {"model": {"path": "unused", "dtype": dtype}, "data": {"train": "unused", "max_length": T},
           "adapter": {"method": method, "r": 4, "dropout": dropout, "target_modules": targets},
           "train": {"micro_batch_size": B}}
    recipe = recipe_from_dict(raw)
    model = apply_adapter(tiny_model(vocab_size=512).to(getattr(torch, dtype)), recipe.adapter).train()
    shape = shape_from_config(causal_lm(model).config)
    e = M.DTYPE_BYTES[dtype]
    layers = [M.layer_saved_bytes(s, shape, B, T, e, 4, dropout > 0, padded) for s in M.layer_specs(shape, recipe)]
    predicted = (sum(layers) + M.shared_saved_bytes(shape, T, e) + M.final_norm_saved_bytes(shape, B * T, e, method == "full")
                 + (B * T * 8 if method == "full" else 0))  # embedding backward keeps the token ids
    assert _traced_saved_bytes(model, B, T, padded) == predicted


# ----------------------------------------------------------------------------------------------
# GGUF header


def test_gguf_header_gives_config_without_tensor_data(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"block_count": 3, "embedding_length": 32, "feed_forward_length": 64, "context_length": 128,
                       "attention.head_count": 4, "attention.head_count_kv": 2, "vocab_size": 100}.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_token_list([f"t{i}" for i in range(100)])
    w.add_tensor("token_embd.weight", np.zeros((100, 32), dtype=np.float32))  # no output.weight: tied
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta, names = read_gguf_header(path)
    assert meta["llama.block_count"] == 3 and meta["tokenizer.ggml.tokens"] == 100 and names == ["token_embd.weight"]
    cfg = config_from_gguf(path)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads) == (3, 32, 64, 2)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 100


# ----------------------------------------------------------------------------------------------
# Budget: refuse early; --memory search


def _big_recipe(tiny_model_dir, tmp_path, **memory):
    """Tiny model, long padded batches: activations dominate (~0.5 GiB over the runtime)."""
    return tiny_recipe(tiny_model_dir, tmp_path / "missing.jsonl", tmp_path / "run", data={"max_length": 1024},
                       train={"micro_batch_size": 8, "grad_accum": 1}, loss={"chunk_size": 1024}, memory=memory)


def test_train_refuses_before_reading_data(tiny_model_dir, tmp_path, capsys):
    recipe = recipe_from_dict(_big_recipe(tiny_model_dir, tmp_path))
    shape = model_shape(recipe.model)
    peak = plan_memory(recipe, shape, "local").peak
    budget = int(peak * 0.8)
    raw = _big_recipe(tiny_model_dir, tmp_path, budget=budget)
    raw["train"]["activation_checkpointing"] = "off"  # as written (left null, the run would choose one that fits)
    path = _write(tmp_path, raw)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"memory.budget {budget}" in err and "Settings that fit, cheapest first" in err
    assert "train.activation_checkpointing=" in err or "train.micro_batch_size=" in err
    assert f"leantune plan {path} --memory {budget}" in err
    assert "missing.jsonl" not in err  # the data file (which does not exist) was never opened
    assert not (tmp_path / "run").exists()


def test_train_refusal_when_nothing_fits(tiny_model_dir, tmp_path, capsys):
    path = _write(tmp_path, _big_recipe(tiny_model_dir, tmp_path, budget="100MB"))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "No searched setting fits" in err and "runtime" in err
    assert not (tmp_path / "run").exists()


def test_memory_search_fits_sorted_and_writes_loadable_recipe(tiny_model_dir, tmp_path, capsys):
    path = _write(tmp_path, _big_recipe(tiny_model_dir, tmp_path))
    recipe = load_recipe(path)
    shape = model_shape(recipe.model)
    budget = int(plan_memory(recipe, shape, "local").peak * 0.8)

    fits = search(recipe, shape, budget, "local")
    assert fits and all(c.plan.peak <= budget for c in fits)
    assert [c.cost for c in fits] == sorted(c.cost for c in fits)
    for c in fits:  # effective batch kept
        assert c.recipe.train.micro_batch_size * c.recipe.train.grad_accum == 8

    out = tmp_path / "fit.yaml"
    assert main(["plan", str(path), "--memory", str(budget), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["written"] == str(out) and all(f["peak_bytes"] <= budget for f in report["fits"])
    written = load_recipe(out)
    assert written.memory.budget_bytes == budget
    assert plan_memory(written, shape, "local").peak <= budget
    assert out.read_text().startswith(f"# leantune train {out}")
    first = report["fits"][0]["changes"]
    assert all(getattr(getattr(written, k.split(".")[0]), k.split(".")[1]) == v for k, v in first.items())


def test_plan_cli_prints_breakdown_and_default_out(tiny_model_dir, tmp_path, capsys):
    path = _write(tmp_path, _big_recipe(tiny_model_dir, tmp_path))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    for term in ("runtime", "weights", "adapter", "optimizer", "activations", "loss", "predicted peak RSS"):
        assert term in out
    assert main(["plan", str(path), "--memory", "4GiB"]) == 0
    out = capsys.readouterr().out
    assert "(as written)" in out and (tmp_path / "r.fit-4GiB.yaml").exists()


def test_cost_model_orders_settings(tiny_model_dir, tmp_path):
    recipe = _recipe(tiny_model_dir, tmp_path)
    shape = model_shape(recipe.model)

    def cost(**train):
        return step_cost(recipe.model_copy(update={"train": recipe.train.model_copy(update=train)}), shape)

    base = step_cost(recipe, shape)
    assert cost(activation_checkpointing=2) > base and cost(activation_checkpointing="all") > cost(activation_checkpointing=2)
    assert cost(micro_batch_size=1, grad_accum=4) > base
    mezo = step_cost(recipe.model_copy(update={"optim": recipe.optim.model_copy(update={"name": "mezo"})}), shape)
    assert mezo > cost(activation_checkpointing="all")
    assert cost(activation_checkpointing="all", offload_checkpoints=True) == pytest.approx(
        cost(activation_checkpointing="all") * COST.offload)


def test_search_offers_offloaded_checkpoints_for_sft_only(tiny_model_dir, tmp_path):
    """Between 'all layers checkpointed' and the same with the inputs in a file lies a budget only the
    offloaded setting fits; `leantune rl` does not offload, so its search never proposes it."""
    recipe = _recipe(tiny_model_dir, tmp_path, train={"micro_batch_size": 8})
    recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"max_length": 256})})
    shape = model_shape(recipe.model)

    def peak(**train):
        return plan_memory(recipe.model_copy(update={"train": recipe.train.model_copy(update=train)}), shape, "local").peak

    ckpt, offload = peak(activation_checkpointing="all"), peak(activation_checkpointing="all", offload_checkpoints=True)
    assert offload < ckpt
    fits = search(recipe, shape, (ckpt + offload) // 2, "local", mode="sft")
    t, r = recipe.train, recipe
    same_otherwise = [c for c in fits if c.recipe.train.activation_checkpointing == "all" and c.recipe.optim.name == "adamw"
                      and c.recipe.train.micro_batch_size == t.micro_batch_size and c.recipe.quant.bits == r.quant.bits
                      and c.recipe.loss.chunk_size == r.loss.chunk_size and c.recipe.adapter.r == r.adapter.r]
    assert same_otherwise and all(c.recipe.train.offload_checkpoints for c in same_otherwise)
    assert any("in a file" in note for c in same_otherwise for note in c.notes)
    assert knob_values(recipe, "rl")["train.offload_checkpoints"] == [False]
    assert knob_values(recipe, "dpo")["train.offload_checkpoints"] == [False]
    assert knob_values(recipe)["train.offload_checkpoints"] == [False, True]


def test_saved_counter_sanity():
    # the tracer itself: a plain linear with a trainable weight saves its input (and nothing else)
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8)
    seen = collections.Counter()

    def pack(t):
        if t.untyped_storage().data_ptr() != lin.weight.untyped_storage().data_ptr():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lin(x)
    assert sum(seen.values()) == 5 * 8 * 4


def test_quantization_not_suggested_for_a_mapped_file(tiny_model_dir, tmp_path):
    # fp32 safetensors trained in fp32: the file stays mapped, INT4 only adds its buffers on top
    recipe = recipe_from_dict(_big_recipe(tiny_model_dir, tmp_path))
    shape = model_shape(recipe.model)
    plain = plan_memory(recipe, shape, "local")
    int4 = recipe.model_copy(update={"quant": recipe.quant.model_copy(update={"bits": 4})})
    assert plan_memory(int4, shape, "local").peak > plain.peak
    fits = search(recipe, shape, int(plain.peak * 0.9), "local")
    assert fits and not any("quant.bits" in c.changes for c in fits)


def test_mode_sft_ignores_rl_section(tiny_model_dir, tmp_path):
    raw = {**tiny_recipe(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "run"), "rl": {"group_size": 4}}
    recipe = recipe_from_dict(raw)
    shape = model_shape(recipe.model)
    assert "rollout" in plan_memory(recipe, shape, "local").phases
    assert "rollout" not in plan_memory(recipe, shape, "local", mode="sft").phases


def test_rl_plan_uses_the_adapter_of_rl_init(tiny_model_dir, tmp_path):
    """`rl.init` continues a LoRA run: the plan counts *that* adapter (rank, targets), as setup_model loads it."""
    init = tmp_path / "sft-run" / "adapter"
    init.mkdir(parents=True)
    (init / "adapter_config.json").write_text(json.dumps(
        {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": ["v_proj", "q_proj", "o_proj", "k_proj"]}))
    raw = {**tiny_recipe(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "run"),
           "adapter": {"r": 2, "target_modules": ["q_proj"]}, "rl": {"group_size": 2, "prompts_per_step": 2}}
    shape = model_shape(recipe_from_dict(raw).model)
    plain = recipe_from_dict(raw)
    cont = recipe_from_dict({**raw, "rl": {**raw["rl"], "init": str(tmp_path / "sft-run")}})
    eff = M.with_init_adapter(cont)
    assert (eff.adapter.r, eff.adapter.alpha, eff.adapter.target_modules) == (16, 32.0, ["k_proj", "o_proj", "q_proj", "v_proj"])
    assert M.with_init_adapter(plain) is plain
    assert M.trainable_elements(shape, eff) == 16 * sum(
        lin.in_features + lin.out_features for lin in M.lora_targets(shape, ["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert plan_memory(cont, shape, "local").peak > plan_memory(plain, shape, "local").peak


def test_plan_says_when_the_run_will_use_another_malloc(tiny_model_dir, tmp_path):
    shape = model_shape(_recipe(tiny_model_dir, tmp_path).model)
    auto = plan_memory(_recipe(tiny_model_dir, tmp_path), shape, "local")
    system = plan_memory(_recipe(tiny_model_dir, tmp_path, train={"allocator": "system"}), shape, "local")
    assert any("calibrated on glibc" in n for n in auto.notes)
    assert not any("calibrated on glibc" in n for n in system.notes)
    assert auto.peak == system.peak  # a note, not a term


@pytest.mark.parametrize("tie", [False, True])
def test_quantized_embeddings_weights_equal_the_real_buffers(tmp_path, tie):
    """quant.embedding_bits: the planner's weight bytes are the bytes quantize_model + quantize_embeddings
    really leave (a tied head shares the embedding's codes)."""
    from leantune.models.tiny import save_tiny_model, tiny_model
    from leantune.quant import quantize_embeddings, quantize_model

    model_dir = save_tiny_model(tmp_path / "m", seed=0, tie=tie)
    recipe = _recipe(model_dir, tmp_path, quant={"bits": 4, "group_size": 32, "embedding_bits": 8})
    shape = model_shape(recipe.model)
    assert shape.tied == tie
    model = tiny_model(vocab_size=shape.vocab, tie=tie)
    quantize_model(model, 4, 32)
    quantize_embeddings(model, 8, 32)
    from leantune.quant import QuantEmbedding, QuantLinear

    codes = {id(t): t for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding)) for t in m.buffers()}
    real = sum(t.numel() * t.element_size() for t in (*model.parameters(), *codes.values()))  # shared codes once
    assert M.weight_bytes(shape, 4, 4, 32, embedding_bits=8) == real
    assert M.resident_weight_bytes(shape, "float32", 4, 32, "gguf", embedding_bits=8) == real
    # a GGUF-sourced run frees the fp32 table: V x H x 4 bytes (x 2 untied) -> its INT8 / INT4 codes
    table = shape.vocab * 64
    for emb_bits in (8, 4):
        q_table = table * emb_bits // 8 + 2 * shape.vocab * 2 * 4  # codes + fp32 scale/offset for 64 / 32 = 2 groups
        saved = (table * 4 - q_table) * (1 if tie else 2)
        assert M.weight_bytes(shape, 4, 4, 32) - M.weight_bytes(shape, 4, 4, 32, embedding_bits=emb_bits) == saved
    assert M.weight_bytes(shape, 4, None, 32, embedding_bits=8) == shape.params * 4 - (table * 4 - (table + 4 * shape.vocab * 4)) * (1 if tie else 2)


def test_vocab_subset_and_quantized_head_loss_terms_by_hand(tiny_model_dir, tmp_path):
    """loss.vocab_subset: the loss workspace is S = k + the rows' targets wide, plus the S x H head rows;
    a quantized head under the exact loss adds its dequantized V x H copy (also to RL rollouts)."""
    recipe = _recipe(tiny_model_dir, tmp_path)
    shape = model_shape(recipe.model)
    V, B, T, H = shape.vocab, 4, 64, 64
    N, rows = B * T, B * (T - 1)
    loss_saved = B * (T - 1) * H * 4 + 24 * rows

    def loss_term(**sections):
        r = _recipe(tiny_model_dir, tmp_path, **sections)
        return plan_memory(r, shape, "local").phases["forward + loss"]["loss"]

    exact = loss_term()
    assert exact[0] == N * H * 4 + loss_saved + 2 * 16 * V * 4 + 16 * H * 4
    S = min(V, 10 + rows)
    subset = loss_term(loss={"vocab_subset": 10})
    assert S < V and subset[0] == N * H * 4 + loss_saved + 2 * 16 * S * 4 + 16 * H * 4 + S * H * 4
    assert f"S={S} (vocab subset)" in subset[1]
    quant_exact = loss_term(quant={"embedding_bits": 8, "group_size": 32})
    assert quant_exact[0] == exact[0] + V * H * 4 and "dequantized lm_head" in quant_exact[1]  # one block: all V rows
    # a SmolLM2-sized head is dequantized 16 MiB of fp32 rows at a time by the exact loss, whole for RL
    import dataclasses

    big = dataclasses.replace(shape, vocab=49152, hidden=576)
    q = _recipe(tiny_model_dir, tmp_path, quant={"embedding_bits": 8})
    assert M.head_copy_bytes(big, q, 49152, 4) == (16 * 2**20 // (576 * 4)) * 576 * 4
    assert M.head_copy_bytes(big, q, 49152, 4, rl=True) == 49152 * 576 * 4
    assert M.head_copy_bytes(big, _recipe(tiny_model_dir, tmp_path), 49152, 4) == 0  # the Parameter itself
    assert loss_term(quant={"embedding_bits": 8, "group_size": 32}, loss={"vocab_subset": 10})[0] == subset[0]

    rl = {"rewards": {"rl_helpers:has_digit": 1.0}, "group_size": 2, "prompts_per_step": 2, "max_new_tokens": 8}
    roll = [plan_memory(_recipe(tiny_model_dir, tmp_path, rl=rl, quant={"bits": 4, "group_size": 32, "embedding_bits": e}),
                        shape, "local", mode="rl").phases["rollout"]["workspace"][0] for e in (None, 8)]
    assert roll[1] - roll[0] == V * H * 4


def test_search_offers_a_quantized_embedding_when_only_that_fits(tiny_model_dir, tmp_path):
    """From a GGUF file (dequantized into RAM, so quantizing frees it) there is a budget between the
    leanest AdamW setting and the same with an INT8 embedding/lm_head: every AdamW fit then quantizes it."""
    recipe = _recipe(tiny_model_dir, tmp_path)
    assert knob_values(recipe)["quant.embedding_bits"] == [None, 8]
    shape = model_shape(recipe.model)
    lean = {"train": {"activation_checkpointing": "all", "offload_checkpoints": True, "micro_batch_size": 1, "grad_accum": 4},
            "loss": {"chunk_size": 64}}
    without = plan_memory(_recipe(tiny_model_dir, tmp_path, quant={"bits": 4}, **lean), shape, "gguf").peak
    with_emb = plan_memory(_recipe(tiny_model_dir, tmp_path, quant={"bits": 4, "embedding_bits": 8}, **lean), shape, "gguf").peak
    assert with_emb < without
    fits = search(recipe, shape, (with_emb + without) // 2, "gguf", mode="sft")
    adamw = [c for c in fits if c.recipe.optim.name == "adamw"]
    assert adamw and all(c.recipe.quant.embedding_bits == 8 for c in adamw)
    assert all(any("INT8 embedding/lm_head" in n for n in c.notes) for c in adamw)


# ----------------------------------------------------------------------------------------------
# leantune dpo


def _traced_pair_bytes(model, pairs) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in the policy's forward over ``pairs``."""
    from leantune.train.dpo import pair_logps

    return _saved_bytes(model, lambda: pair_logps(model, pairs, pad_id=0, chunk_size=64))


@pytest.mark.parametrize("dtype, pairs, prompt, completion", [
    ("float32", 1, 40, 24), ("float32", 3, 10, 54), ("bfloat16", 2, 30, 34), ("bfloat16", 3, 11, 53)])
def test_dpo_plan_activations_match_what_the_shared_prefill_saves(dtype, pairs, prompt, completion):
    """The DPO plan's activations (prompt once per pair, its K/V indexed out to both completions) against the
    tensors autograd really saves in `pair_logps` (loss tensors included in the trace): within 5%."""
    from leantune.adapters.lora import apply_adapter, causal_lm
    from leantune.data.preference import Pair
    from leantune.models.tiny import tiny_model

    total = prompt + completion
    recipe = recipe_from_dict({
        "model": {"path": "unused", "dtype": dtype}, "data": {"train": "unused", "max_length": total},
        "adapter": {"r": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "train": {"micro_batch_size": pairs, "activation_checkpointing": "off"},
        "memory": {"loss_fraction": completion / total}, "dpo": {}})
    model = apply_adapter(tiny_model(vocab_size=512).to(getattr(torch, dtype)), recipe.adapter).train()
    shape = shape_from_config(causal_lm(model).config)
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return tuple(torch.randint(3, 512, (n,), generator=g).tolist())

    batch = [Pair(ids(prompt), ids(completion), ids(completion - 3), f"row {i}") for i in range(pairs)]
    plan = plan_memory(recipe, shape, "local")  # the dpo section makes it a DPO plan
    assert plan.notes[-1].startswith("dpo:") or any(n.startswith("dpo:") for n in plan.notes)
    planned = plan.phases["forward + loss"]["activations"][0]
    traced = _traced_pair_bytes(model, batch)
    assert abs(planned / traced - 1) < 0.05, (planned, traced)
    # an SFT plan of the same recipe (P sequences, no second completion) would be far below the trace
    assert plan_memory(recipe, shape, "local", mode="sft").phases["forward + loss"]["activations"][0] < 0.8 * traced


def test_dpo_plan_phases_follow_the_loss_and_the_checkpointing(tiny_model_dir, tmp_path):
    base = tiny_recipe(tiny_model_dir, tmp_path / "pairs.jsonl", tmp_path / "run")
    shape = model_shape(recipe_from_dict(base).model)

    def plan(**dpo):
        raw = {**base, "dpo": dpo, "train": {**base["train"], "micro_batch_size": 2, "activation_checkpointing": "all"}}
        return plan_memory(recipe_from_dict(raw), shape, "local")

    live, pre, simpo = plan(loss="dpo"), plan(loss="dpo", precompute_reference=True), plan(loss="simpo")
    assert "reference (no grad)" in live.phases and "reference pass (no grad)" in pre.phases
    assert not any(p.startswith("reference") for p in simpo.phases)  # SimPO has no reference
    # the reference: the K/V of 2P sequences of max_length (no grad: the prompt is shared, the cache is kept)
    assert live.phases["reference (no grad)"]["kv_cache"][0] == M.kv_cache_bytes(shape, 64, 4, 4)
    # checkpointed layers: every sequence runs prompt + completion, so the activations are SFT's at 2P sequences
    sft = recipe_from_dict({**base, "train": {**base["train"], "micro_batch_size": 4, "activation_checkpointing": "all"}})
    assert live.phases["decoder backward"]["activations"][0] == plan_memory(sft, shape, "local").phases[
        "decoder backward"]["activations"][0]
    # the log-probs run over the whole vocabulary (no vocab subset), as in RL
    assert f"V={shape.vocab}" in live.phases["forward + loss"]["loss"][1]
    assert M.plan_mode(recipe_from_dict({**base, "dpo": {}})) == "dpo"
    assert M.plan_mode(recipe_from_dict(base)) == "sft"
    with pytest.raises(ValueError, match="plan mode"):
        M.plan_mode(recipe_from_dict(base), "ppo")


def test_dpo_budget_is_checked_before_the_data_is_read(tiny_model_dir, tmp_path, capsys):
    raw = {**tiny_recipe(tiny_model_dir, tmp_path / "missing-pairs.jsonl", tmp_path / "run"),
           "dpo": {"loss": "dpo"}, "memory": {"budget": "1MB"}}
    assert main(["dpo", str(_write(tmp_path, raw))]) != 0
    err = capsys.readouterr().err
    assert "memory.budget" in err and "missing-pairs" not in err
    assert not (tmp_path / "run").exists()
    # the CLI plans it as DPO by default, and says so
    assert main(["plan", str(_write(tmp_path, {**raw, "memory": {}}, "p.yaml")), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert any(n.startswith("dpo:") for n in out["notes"]) and any(k.startswith("reference") for k in out["phases"])


def test_speculative_rollout_terms(tiny_model_dir, tmp_path):
    """rl.speculative: the cache bound is compact_holes' own threshold (its defaults are the planner's), logits at
    1 + k positions, and a layer-skip draft's cache and distributions; a separate draft model adds its weights."""
    import inspect

    from leantune.rl.speculative import compact_holes

    defaults = inspect.signature(compact_holes).parameters
    assert (defaults["slack"].default, defaults["min_holes"].default) == (M.SPECULATIVE_SLACK, M.SPECULATIVE_MIN_HOLES)
    # the cache: below 64 columns at most 15 holes, above them under a quarter; then one verify round of 1 + k
    assert M.speculative_cache_tokens(40, 4) == 40 + 15 + 5
    assert M.speculative_cache_tokens(300, 4) == 400 + 5
    base = {**tiny_recipe(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "run")}
    rl = {"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 32}

    def rollout(**extra):
        return plan_memory(recipe_from_dict({**base, "rl": {**rl, **extra}}), shape, "local").phases["rollout"]

    shape = model_shape(recipe_from_dict(base).model)
    plain = rollout()
    lookup = rollout(speculative="prompt_lookup", speculative_tokens=3)
    tokens = M.speculative_cache_tokens(64 + 32, 3)
    assert lookup["kv_cache"][0] == M.kv_cache_bytes(shape, tokens, 8, 4) > plain["kv_cache"][0]
    assert lookup["workspace"][0] - plain["workspace"][0] == 2 * 8 * 3 * shape.vocab * 4  # 1 + 3 positions, not 1
    assert "draft_kv_cache" not in lookup
    draft = rollout(speculative="draft", speculative_draft="layers:1", speculative_tokens=3)
    assert draft["draft_kv_cache"][0] == 2 * 1 * shape.kv_heads * shape.head_dim * tokens * 8 * 4
    assert draft["draft_probs"][0] == 8 * 3 * shape.vocab * 4 and "draft_weights" not in draft
    separate = rollout(speculative="draft", speculative_draft=str(tiny_model_dir), speculative_tokens=3)
    assert separate["draft_weights"][0] == M.resident_weight_bytes(shape, "float32", None, 64, "local")
    assert separate["draft_kv_cache"][0] == lookup["kv_cache"][0]  # the same model as its own draft
    from leantune.plan.model_shape import PlanError

    with pytest.raises(PlanError, match="rl.speculative_draft"):
        rollout(speculative="draft", speculative_draft=str(tmp_path / "no-such-model"))
