"""Checkpoints: a run killed with SIGKILL and resumed ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_recipe
from leantune.config import recipe_from_dict
from leantune.train import checkpoint as ckpt
from leantune.train.sft import train

STEPS = 24


def _recipe(tmp_path, model_dir, data, name):
    # dropout on, so the RNG state must be restored too; accumulation 2 so micro_step matters
    return tiny_recipe(model_dir, data, tmp_path / name, adapter={"dropout": 0.1},
                       train={"steps": STEPS, "save_every": 1, "grad_accum": 2, "micro_batch_size": 3},
                       optim={"lr": 5e-3, "warmup_steps": 3})


def _adapter(run):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir, sft_data):
    raw = _recipe(tmp_path, tiny_model_dir, sft_data, "killed")
    recipe_path = tmp_path / "killed.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "leantune.cli", "train", str(recipe_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "step-00000005":
            proc.send_signal(signal.SIGKILL)
            killed_at = latest.read_text().strip()
            break
        time.sleep(0.005)
    rc = proc.wait(timeout=60)
    assert killed_at is not None and rc == -signal.SIGKILL, f"run was not killed mid-training: {proc.stderr.read()[-2000:]}"
    assert not (tmp_path / "killed" / "adapter").exists()

    resumed = train(recipe_from_dict(raw), resume=True, quiet=True)
    assert resumed.ledger["extra"]["resumed"] is True
    reference = train(recipe_from_dict(_recipe(tmp_path, tiny_model_dir, sft_data, "straight")), quiet=True)
    assert reference.ledger["totals"]["steps"] == resumed.ledger["totals"]["steps"] == STEPS
    a, b = _adapter(tmp_path / "killed"), _adapter(tmp_path / "straight")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    steps = [__import__("json").loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), "metrics.jsonl should have each step exactly once"


def test_interrupted_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    root = tmp_path / "checkpoints"
    params = {n: p for n, p in model.named_parameters()}
    ckpt.save_checkpoint(root, 1, params, opt, sched, {"step": 1})

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt.torch, "save", boom)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(root, 2, params, opt, sched, {"step": 2})
    good = ckpt.latest_checkpoint(root)
    assert good is not None and good.name == "step-00000001"
    tensors, _, state = ckpt.load_checkpoint(good)
    assert state["step"] == 1
    assert not torch.equal(tensors["weight"], model.weight.detach())
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp")] == []
