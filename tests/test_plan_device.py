"""`leantune plan` for a recipe that trains on CUDA plans device memory: no host-only terms, a labelled CUDA
context estimate, the weights' tensor bytes (no mapped file), and output labelled as device memory.
CUDA is faked where needed (``train.device: cuda`` needs no device to be planned; ``auto`` asks torch)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import tiny_recipe
from leantune.config import recipe_from_dict
from leantune.plan.memory import CALIBRATION, plan_memory, weight_bytes
from leantune.plan.model_shape import model_shape


def _recipe(model_dir, data, out, device, **sections):
    return recipe_from_dict(tiny_recipe(model_dir, data, out, model={"dtype": "float32"}, train={"device": device},
                                        **sections))


def test_a_cuda_recipe_plans_device_memory(tiny_model_dir, sft_data, tmp_path):
    cpu_recipe = _recipe(tiny_model_dir, sft_data, tmp_path / "r", "cpu")
    gpu_recipe = _recipe(tiny_model_dir, sft_data, tmp_path / "r", "cuda")
    shape = model_shape(cpu_recipe.model)
    cpu, gpu = plan_memory(cpu_recipe, shape), plan_memory(gpu_recipe, shape)
    assert (cpu.device, gpu.device) == ("cpu", "cuda")
    assert cpu.label == "predicted peak RSS" and gpu.label == "predicted peak device memory (cuda)"
    assert cpu.phases.keys() == gpu.phases.keys()
    for name, terms in gpu.phases.items():
        assert "runtime" not in terms and "load" not in terms, name  # host-only terms are left out
        assert terms["cuda_context"][0] == CALIBRATION.cuda_context_bytes
        assert "ESTIMATE" in terms["cuda_context"][1] and "34323" in terms["cuda_context"][1]
    # fp32 safetensors, not quantized: every training phase is the CPU phase minus the host runtime plus the context
    for name in gpu.phases.keys() - {"load"}:
        host_only = cpu.phases[name]["runtime"][0]
        assert gpu.totals[name] == cpu.totals[name] - host_only + CALIBRATION.cuda_context_bytes, name
    assert gpu.phases["load"] == {k: gpu.phases["forward + loss"][k] for k in ("cuda_context", "weights")}
    assert any("device memory" in n for n in gpu.notes) and not any("device memory" in n for n in cpu.notes)


def test_device_plan_has_no_tokenizer_or_gguf_residue(tiny_model_dir, sft_data, tmp_path):
    recipe = _recipe(tiny_model_dir, sft_data, tmp_path / "r", "cuda:1")
    shape = model_shape(recipe.model)
    local, gguf = plan_memory(recipe, shape, "local"), plan_memory(recipe, shape, "gguf")
    assert local.totals == gguf.totals  # the GGUF reader's residue and load transient are host memory
    cpu = _recipe(tiny_model_dir, sft_data, tmp_path / "r", "cpu")
    assert plan_memory(cpu, shape, "gguf").peak > plan_memory(cpu, shape, "local").peak  # they count on the host


def test_device_plan_counts_quantized_tensors_not_the_mapped_file(tiny_model_dir, sft_data, tmp_path):
    quant = {"bits": 4, "group_size": 32}
    gpu = _recipe(tiny_model_dir, sft_data, tmp_path / "r", "cuda", quant=quant)
    cpu = _recipe(tiny_model_dir, sft_data, tmp_path / "r", "cpu", quant=quant)
    shape = model_shape(gpu.model)
    dev_weights = plan_memory(gpu, shape).phases["forward + loss"]["weights"][0]
    assert dev_weights == weight_bytes(shape, 4, 4, 32)
    assert plan_memory(cpu, shape).phases["forward + loss"]["weights"][0] > dev_weights  # host: file pages too


@pytest.mark.parametrize(("available", "device"), [(True, "cuda"), (False, "cpu")])
def test_auto_plans_the_device_it_would_train_on(monkeypatch, tiny_model_dir, sft_data, tmp_path, available, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    recipe = _recipe(tiny_model_dir, sft_data, tmp_path / "r", "auto")
    assert plan_memory(recipe, model_shape(recipe.model)).device == device


def test_cli_plan_labels_device_memory(tiny_model_dir, sft_data, tmp_path, capsys):
    from leantune.cli import main

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, sft_data, tmp_path / "run", model={"dtype": "float32"})))
    assert main(["plan", str(path), "train.device=cuda"]) == 0
    out = capsys.readouterr().out
    assert "predicted peak device memory (cuda)" in out and "cuda_context" in out
    assert "python + torch + transformers" not in out  # the host runtime term is not listed
    assert main(["plan", str(path), "train.device=cuda", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["device"] == "cuda" and plan["what"].startswith("predicted peak device memory")
    assert "cuda_context" in plan["terms"] and "runtime" not in plan["terms"]
    assert main(["plan", str(path), "train.device=cpu"]) == 0
    assert "predicted peak RSS" in capsys.readouterr().out
