"""A quantized-base LoRA run through the real CLI: trains, resumes, exports onto W_hat."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from conftest import tiny_recipe
from leantune.cli import main
from leantune.config import RecipeError, recipe_from_dict
from leantune.train.sft import train

torch.set_num_threads(1)


def test_quant_recipe_validation(tmp_path, tiny_model_dir, sft_data):
    raw = tiny_recipe(tiny_model_dir, sft_data, tmp_path / "run", quant={"bits": 4}, adapter={"method": "full"})
    with pytest.raises(RecipeError, match="adapter.method: lora"):
        recipe_from_dict(raw)
    with pytest.raises(RecipeError, match="even"):
        recipe_from_dict(tiny_recipe(tiny_model_dir, sft_data, tmp_path / "r", quant={"bits": 4, "group_size": 33}))
    with pytest.raises(RecipeError, match="quant.bits"):
        recipe_from_dict(tiny_recipe(tiny_model_dir, sft_data, tmp_path / "r", quant={"bits": 3}))


def test_quantized_run_trains_and_exports_onto_w_hat(tmp_path, tiny_model_dir, sft_data):
    from transformers import AutoModelForCausalLM

    from leantune.quant import QuantLinear

    raw = tiny_recipe(tiny_model_dir, sft_data, tmp_path / "run", quant={"bits": 4, "group_size": 32})
    result = train(recipe_from_dict(raw), quiet=True)
    assert result.ledger["extra"]["quant"]["ratio"] < 0.2
    assert any(isinstance(m, QuantLinear) for m in result.model.modules())
    run = tmp_path / "run"
    assert main(["export", str(run), "--merged", str(tmp_path / "merged")]) == 0
    ids = torch.tensor([[5, 17, 33, 2, 99, 250]])
    with torch.no_grad():
        ref = result.model.eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, ref, rtol=0, atol=1e-5)
    ledger = json.loads((run / "ledger.json").read_text())
    print(json.dumps({k: v for k, v in ledger.items() if k in ("extra",)}, default=str)[:400])


def test_bf16_quantized_run_evaluates_on_the_grid_it_trained_on(tmp_path, tiny_model_dir, sft_data):
    """The demo's setting (bf16 base) with an INT4 base: training runs, and `leantune eval`'s loader
    (fresh base, fake-quantized in bf16, plus the saved adapter) gives the trained model's logits."""
    from leantune.eval.evaluate import load_for_eval

    raw = tiny_recipe(tiny_model_dir, sft_data, tmp_path / "run", quant={"bits": 4, "group_size": 32},
                      model={"dtype": "bfloat16"})
    result = train(recipe_from_dict(raw), quiet=True)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(map(math.isfinite, losses))
    ids = torch.tensor([[5, 17, 33, 2, 99, 250]])
    model, _ = load_for_eval(str(tmp_path / "run"))
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        ref = result.model.eval()(input_ids=ids).logits.float()
        got = model.eval()(input_ids=ids).logits.float()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
