"""Shared fixtures: a tiny model directory and small SFT data files, built locally (no downloads)."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from leantune.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory):
    from leantune.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-chat-model"), seed=0, chat_template=True)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory):
    """24 prompt/completion records with think and answer spans, of varying length."""
    d = tmp_path_factory.mktemp("sft-data")
    rows = [
        {
            "prompt": f"What is {a} + {b}?" + " Think carefully." * (a % 3),
            "completion": f"<think>{a} + {b} = {a + b}</think> The answer is {a + b}.",
        }
        for a, b in [(i * 7 % 50, i * 11 % 40) for i in range(24)]
    ]
    return write_jsonl(d / "train.jsonl", rows)


def tiny_recipe(model_dir, data_file, out_dir, **sections) -> dict:
    """A recipe dict for the tiny model; ``sections`` update individual sections."""
    raw = {
        "model": {"path": str(model_dir)},
        "data": {"train": str(data_file), "max_length": 64},
        "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "loss": {"chunk_size": 16},
        "optim": {"lr": 1e-2, "max_grad_norm": 1.0},
        "train": {"steps": 3, "micro_batch_size": 4, "seed": 0, "output_dir": str(out_dir), "progress": False},
    }
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return raw


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip themselves on a machine where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def sigkill_mid_run(command: str, raw_recipe: dict, run_dir, at_step: int) -> str:
    """Run ``leantune COMMAND`` on ``raw_recipe`` in a subprocess and SIGKILL it once its latest checkpoint
    reaches ``at_step``; returns that checkpoint's name (fails if the run ended or stalled first)."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(raw_recipe))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "leantune.cli", command, str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = run_dir / "checkpoints" / "latest"
    deadline, killed = time.time() + 240, None
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() >= f"step-{at_step:08d}":
            proc.send_signal(signal.SIGKILL)
            killed = latest.read_text().strip()
            break
        time.sleep(0.005)
    rc = proc.wait(timeout=60)
    assert killed is not None and rc == -signal.SIGKILL, f"not killed mid-run: {proc.stderr.read()[-2000:]}"
    return killed


def assert_same_adapter(run_a, run_b) -> None:
    """The two runs' saved adapters are bit-identical."""
    from safetensors.torch import load_file

    a = load_file(str(run_a / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run_b / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def observe_lora_a(monkeypatch, module, name: str, seen: list, setting: list) -> None:
    """Wrap ``module.name`` (a function whose first argument is the model) so that every ``lora_A`` call it makes
    with gradient enabled appends (setting[0], input dtype, output dtype) to ``seen``."""
    import torch

    original = getattr(module, name)

    def observed(model, *a, **kw):
        hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((setting[0], args[0].dtype, out.dtype)))
                 for n, m in model.named_modules() if n.endswith("lora_A.default")] if torch.is_grad_enabled() else []
        try:
            return original(model, *a, **kw)
        finally:
            for h in hooks:
                h.remove()

    monkeypatch.setattr(module, name, observed)
