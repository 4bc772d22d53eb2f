"""adapter.compute_dtype: bf16 LoRA matmuls over a bf16 base (autocast, PEFT's input cast off), fp32 weights."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from conftest import tiny_recipe
from leantune.adapters.lora import apply_adapter, low_precision_lora
from leantune.config import AdapterConfig, DataConfig, ModelConfig, Recipe, RecipeError, SpanWeights
from leantune.data.sft import collate, load_sft_examples
from leantune.models.loading import load_model_and_tokenizer
from leantune.train.sft import lm_loss_sum


def _recipe(tmp_path, model_dir, data, **sections) -> Recipe:
    return Recipe.model_validate(tiny_recipe(model_dir, data, tmp_path / "run", **sections))


def _bf16_lora(model_dir):
    model, tok, _ = load_model_and_tokenizer(ModelConfig(path=str(model_dir), dtype="bfloat16"))
    model = apply_adapter(model, AdapterConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():  # B != 0 so that A gets gradients too
        g = torch.Generator().manual_seed(3)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model, tok


def _loss_and_grads(model, batch, lp):
    """lm_loss_sum's forward and backward, with `LowPrecisionLoRA` ``lp`` as the SFT loop uses it (or None)."""
    model.zero_grad(set_to_none=True)
    with lp.step() if lp is not None else contextlib.nullcontext():
        loss = lm_loss_sum(model, batch, chunk_size=5, compute=lp.forward if lp is not None else contextlib.nullcontext)
        loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_only_a_bf16_unquantized_lora_base_gets_the_low_precision_path(tmp_path, tiny_model_dir, sft_data):
    model, _ = _bf16_lora(tiny_model_dir)
    on = _recipe(tmp_path, tiny_model_dir, sft_data, model={"dtype": "bfloat16"})
    assert low_precision_lora(model, on) is not None
    for sections in ({"model": {"dtype": "float32"}},
                     {"model": {"dtype": "bfloat16"}, "adapter": {"compute_dtype": "float32"}},
                     {"model": {"dtype": "bfloat16"}, "quant": {"bits": 8}},
                     {"model": {"dtype": "bfloat16"}, "adapter": {"method": "full"}}):
        assert low_precision_lora(model, _recipe(tmp_path, tiny_model_dir, sft_data, **sections)) is None, sections
    with pytest.raises((RecipeError, ValueError), match="compute_dtype"):
        _recipe(tmp_path, tiny_model_dir, sft_data, adapter={"compute_dtype": "float16"})


def test_lora_matmuls_run_in_bf16_and_gradients_match_the_fp32_adapter_path(tmp_path, tiny_model_dir, sft_data):
    model, tok = _bf16_lora(tiny_model_dir)
    examples, _ = load_sft_examples(sft_data, tok, DataConfig(train=str(sft_data), max_length=48))
    batch = collate(examples[:3], tok.pad_token_id, SpanWeights())
    lp = low_precision_lora(model, _recipe(tmp_path, tiny_model_dir, sft_data, model={"dtype": "bfloat16"}))

    seen: list[tuple[torch.dtype, torch.dtype]] = []  # (input, output) dtypes of every lora_A call
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((args[0].dtype, out.dtype)))
             for n, m in model.named_modules() if n.endswith("lora_A.default")]
    model.train()
    loss_ref, ref = _loss_and_grads(model, batch, None)
    assert seen and all(d == (torch.float32, torch.float32) for d in seen)  # PEFT's default: cast to fp32
    seen.clear()
    loss_bf, fast = _loss_and_grads(model, batch, lp)
    assert seen and all(d == (torch.bfloat16, torch.bfloat16) for d in seen)  # no cast, a bf16 matmul
    for h in hooks:
        h.remove()

    # the adapter's weights and gradients stay fp32; the values agree to bf16 rounding
    assert all(g.dtype == torch.float32 for g in fast.values())
    assert loss_bf == pytest.approx(loss_ref, rel=2e-2)
    for n in ref:
        rel = float((fast[n] - ref[n]).norm() / ref[n].norm())
        assert rel < 5e-2, (n, rel)
    # and the context leaves PEFT's casting on afterwards
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in model.modules())


def test_a_bf16_run_records_the_choice_and_trains(tmp_path, tiny_model_dir, sft_data):
    from leantune.train.sft import train

    raw = tiny_recipe(tiny_model_dir, sft_data, tmp_path / "run", model={"dtype": "bfloat16"})
    raw["train"].update(steps=6)
    raw["optim"] = {**raw.get("optim", {}), "lr": 5e-3}
    result = train(Recipe.model_validate(raw), quiet=True)
    choice = result.ledger["extra"]["auto_choices"]["adapter.compute_dtype"]
    assert choice.startswith("bfloat16")
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x and '"step"' in x]
    assert len(losses) == 6 and all(map(lambda v: v == v, losses)) and losses[-1] < losses[0]
    # adapter.compute_dtype: float32 keeps PEFT's casts and says nothing
    raw32 = {**raw, "adapter": {**raw.get("adapter", {}), "compute_dtype": "float32"},
             "train": {**raw["train"], "output_dir": str(tmp_path / "run32")}}
    r32 = train(Recipe.model_validate(raw32), quiet=True)
    assert "adapter.compute_dtype" not in r32.ledger["extra"].get("auto_choices", {})


@pytest.mark.parametrize("policy", ["selective", "all"])
def test_checkpointing_recomputes_the_bf16_lora_path_exactly(tmp_path, tiny_model_dir, sft_data, policy):
    """Autocast inside checkpointed layers: the recompute must replay the forward's ops (selective checkpointing
    refuses a different number of casts), and the gradients equal those without checkpointing."""
    from leantune.train.session import set_activation_checkpointing

    model, tok = _bf16_lora(tiny_model_dir)
    examples, _ = load_sft_examples(sft_data, tok, DataConfig(train=str(sft_data), max_length=48))
    batch = collate(examples[:3], tok.pad_token_id, SpanWeights())
    lp = low_precision_lora(model, _recipe(tmp_path, tiny_model_dir, sft_data, model={"dtype": "bfloat16"}))
    model.train()
    loss_off, ref = _loss_and_grads(model, batch, lp)
    assert set_activation_checkpointing(model, policy) > 0
    loss_ck, got = _loss_and_grads(model, batch, lp)
    assert loss_ck == pytest.approx(loss_off, rel=1e-6)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)
