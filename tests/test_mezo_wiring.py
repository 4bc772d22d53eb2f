import json
import torch
from safetensors.torch import load_file
from conftest import tiny_recipe
from leantune.config import recipe_from_dict
from leantune.train.sft import train
from leantune.train.checkpoint import latest_checkpoint


def _raw(tmp_path, model_dir, data, name, steps):
    return tiny_recipe(model_dir, data, tmp_path / name, adapter={"dropout": 0.1},
                       train={"steps": steps, "save_every": 1, "grad_accum": 2, "micro_batch_size": 3},
                       optim={"name": "mezo", "lr": 0.3, "zo_eps": 1e-3, "zo_samples": 2, "warmup_steps": 2, "scheduler": "constant"})


def test_mezo_recipe_trains_and_resumes_exactly(tmp_path, tiny_model_dir, sft_data):
    straight = train(recipe_from_dict(_raw(tmp_path, tiny_model_dir, sft_data, "straight", 6)), quiet=True)
    rows = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all("projected_grad" in r and "zo_restore_bytes" in r for r in rows)
    assert "zeroth-order" in straight.ledger["flops"]["method"]
    assert straight.ledger["flops"]["forward_passes_per_token"] == 2 * straight.ledger["recipe"]["optim"]["zo_samples"]
    assert all(p.grad is None for p in straight.model.parameters())
    # interrupted at step 3, resumed to 6
    train(recipe_from_dict(_raw(tmp_path, tiny_model_dir, sft_data, "cut", 3)), quiet=True)
    train(recipe_from_dict(_raw(tmp_path, tiny_model_dir, sft_data, "cut", 6)), resume=True, quiet=True)
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
