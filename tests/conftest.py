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
