"""A quantized-base LoRA run through the real CLI: trains, resumes, exports onto W_hat."""

from __future__ import annotations

import json

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
