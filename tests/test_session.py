"""The run session and the registries every trainer shares: device and dtype decisions, recipe checks in the
validators, resume rules, trackers wired into a real run, and each policy loss owning its reduction."""

from __future__ import annotations

import json
import typing

import pytest
import torch
import yaml

from conftest import tiny_recipe
from leantune.config import RecipeError, recipe_from_dict
from leantune.models import precision


# ----------------------------------------------------------------------------------------------
# Device and dtype


def test_device_type_and_resolution_on_a_cpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.device_type("auto") == "cpu" and precision.device_type("cuda:1") == "cuda"
    assert precision.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        precision.resolve_device("cuda")


def test_auto_dtype_follows_the_training_device_not_a_visible_gpu(monkeypatch):
    """CUDA visible but training on the CPU: the CPU probe decides (the AVX2-only trap), not the GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 0.011)  # an AVX2-only CPU: bf16 ~90x slower
    assert precision.resolve_dtype("auto", "cpu") == "float32"
    assert precision.resolve_dtype("auto", "cuda") == "bfloat16"
    assert precision.device_type("auto") == "cuda"
    base = {"model": {"path": "m", "dtype": "auto"}, "data": {"train": "t.jsonl"}}
    on_cpu = recipe_from_dict({**base, "train": {"device": "cpu"}})
    assert on_cpu.model.compute_dtype == "float32"
    assert recipe_from_dict(base).model.compute_dtype == "bfloat16"  # auto device: the GPU
    assert on_cpu.model_copy(deep=True).model.compute_dtype == "float32"  # copies keep the device


def test_train_device_names_are_checked_before_anything_loads():
    with pytest.raises(RecipeError, match="train.device"):
        recipe_from_dict({"model": {"path": "m"}, "data": {"train": "t"}, "train": {"device": "gpu0"}})


@pytest.mark.parametrize(("text", "expected"), [("off", "off"), ("false", "off"), ("no", "off"), ("on", "all"),
                                                ("true", "all"), ("all", "all"), ("2", 2)])
def test_yaml_booleans_for_activation_checkpointing(tmp_path, text, expected):
    """YAML 1.1 reads an unquoted `off` as False: accepted as off (and on/true as all)."""
    from leantune.config import load_recipe

    p = tmp_path / "r.yaml"
    p.write_text(f"model: {{path: m}}\ndata: {{train: t}}\ntrain:\n  activation_checkpointing: {text}\n")
    assert load_recipe(p).train.activation_checkpointing == expected


# ----------------------------------------------------------------------------------------------
# Registries: a name in the config's Literal has an implementation, and the other way round


def _literal(model, field):
    return set(typing.get_args(model.model_fields[field].annotation))


def test_every_configurable_name_is_registered():
    from leantune.adapters import ADAPTERS
    from leantune.config import AdapterConfig, OptimConfig, RLConfig
    from leantune.optim import OPTIMIZERS
    from leantune.rl.advantages import ADVANTAGES
    from leantune.rl.losses import DEFAULT_ADVANTAGE, POLICY_LOSSES

    assert set(OPTIMIZERS) == _literal(OptimConfig, "name")
    assert set(ADAPTERS) == _literal(AdapterConfig, "method")
    assert set(POLICY_LOSSES) == _literal(RLConfig, "loss") == set(DEFAULT_ADVANTAGE)
    assert set(DEFAULT_ADVANTAGE.values()) <= set(ADVANTAGES)
    assert {OPTIMIZERS[n].needs_backward for n in OPTIMIZERS} == {True, False}


@pytest.mark.parametrize("name", ["grpo", "dapo", "dr_grpo"])
def test_each_policy_loss_reduces_a_split_step_to_the_whole_step(name):
    """Micro-batch losses over one PolicyWindow add up to the loss of the whole step (odd sizes): the trainer
    never asks which loss it has."""
    from leantune.rl.losses import POLICY_LOSSES, PolicyWindow

    g = torch.Generator().manual_seed(3)
    b, t = 7, 11
    logps = torch.randn(b, t, generator=g) * 0.3 - 1
    old = logps + 0.05 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    window = PolicyWindow(num_sequences=b, num_tokens=float(mask.sum()), max_completion_length=t + 2)
    fn = POLICY_LOSSES[name]
    whole, _ = fn(logps, old, adv, mask, window=window)
    parts = sum(fn(logps[i:j], old[i:j], adv[i:j], mask[i:j], window=window)[0] for i, j in [(0, 3), (3, 4), (4, 7)])
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-7)
    if name != "dr_grpo":  # without a window each loss is its own batch's mean (the TRL-parity form)
        alone, _ = fn(logps, old, adv, mask)
        torch.testing.assert_close(alone, whole, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Recipe checks live in the validators


@pytest.mark.parametrize(("rl", "optim", "match"), [
    ({"beta": 0.1}, {"name": "mezo"}, "KL term needs gradients"),
    ({"updates_per_batch": 2}, {"name": "mezo"}, "one step per batch"),
    ({"task": "addition", "rewards": {"nope": 1.0}}, {}, "unknown reward 'nope'"),
    ({"rewards": {"length_aware": 1.0}}, {}, "set rl.task"),
    ({"task": "additoin"}, {}, "did you mean 'addition'"),
    ({"async_rollouts": True}, {}, "rollout_workers"),
])
def test_rl_recipe_errors_are_validation_errors(rl, optim, match):
    with pytest.raises(RecipeError, match=match):
        recipe_from_dict({"model": {"path": "m"}, "data": {}, "rl": rl, "optim": optim})


def test_command_requirements():
    r = recipe_from_dict({"model": {"path": "m"}, "data": {}})
    with pytest.raises(RecipeError, match="data.train"):
        r.require_for("train")
    with pytest.raises(RecipeError, match="rl.task"):
        r.require_for("rl")


# ----------------------------------------------------------------------------------------------
# The session in real runs


def test_resume_with_another_world_size_is_refused(tiny_model_dir, sft_data, tmp_path):
    from leantune.train.sft import train

    out = tmp_path / "run"
    recipe = recipe_from_dict(tiny_recipe(tiny_model_dir, sft_data, out, train={"steps": 2, "save_every": 1}))
    train(recipe, quiet=True)
    state_file = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip() / "state.json"
    state = json.loads(state_file.read_text())
    assert state["world_size"] == 1
    state["world_size"] = 2
    state_file.write_text(json.dumps(state))
    longer = recipe_from_dict(tiny_recipe(tiny_model_dir, sft_data, out, train={"steps": 3, "save_every": 1}))
    with pytest.raises(RecipeError, match="checkpointed with 2 process"):
        train(longer, resume=True, quiet=True)


def test_a_run_that_fails_after_setup_stops_its_meter_threads(tiny_model_dir, sft_data, tmp_path):
    # The refused resume fails in setup(), after the peak-memory and energy meters started: their polling
    # threads must not outlive the run (before the fix each failed run left one sampling RSS every 10 ms).
    import threading

    from leantune.train.sft import train

    def meters() -> int:
        return sum(t.name in ("leantune-peak-memory", "leantune-rapl") for t in threading.enumerate())

    out = tmp_path / "run"
    train(recipe_from_dict(tiny_recipe(tiny_model_dir, sft_data, out, train={"steps": 1, "save_every": 1})),
          quiet=True)
    before = meters()
    with pytest.raises(FileExistsError, match="already holds a run"):  # refused before the meters start
        train(recipe_from_dict(tiny_recipe(tiny_model_dir, sft_data, out, train={"steps": 1})), quiet=True)
    state_file = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip() / "state.json"
    state = json.loads(state_file.read_text())
    state["world_size"] = 2
    state_file.write_text(json.dumps(state))
    longer = recipe_from_dict(tiny_recipe(tiny_model_dir, sft_data, out, train={"steps": 2, "save_every": 1}))
    with pytest.raises(RecipeError, match="checkpointed with 2 process"):  # refused after the meters start
        train(longer, resume=True, quiet=True)
    assert meters() == before


def test_a_finished_run_is_never_overwritten(tiny_model_dir, sft_data, tmp_path):
    from leantune.train.sft import train

    out = tmp_path / "run"
    recipe = recipe_from_dict(tiny_recipe(tiny_model_dir, sft_data, out, train={"steps": 1}))
    train(recipe, quiet=True)
    before = (out / "ledger.json").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(recipe, quiet=True)
    assert (out / "ledger.json").read_bytes() == before


def test_report_to_tensorboard_gets_every_logged_row(tiny_model_dir, sft_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from leantune.train.sft import train

    out = tmp_path / "run"
    recipe = recipe_from_dict(tiny_recipe(tiny_model_dir, sft_data, out,
                                          train={"steps": 3, "report_to": ["tensorboard"]}))
    result = train(recipe, quiet=True)
    acc = EventAccumulator(str(out / "tensorboard")).Reload()
    losses = [e.value for e in acc.Scalars("loss")]
    logged = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(logged, rel=1e-6) and len(losses) == 3
    assert result.ledger["extra"]["distributed"]["world_size"] == 1
    assert result.ledger["extra"]["device"] == "cpu"


def test_ledger_records_device_and_global_batch(tiny_model_dir, sft_data, tmp_path):
    from leantune.train.sft import train

    out = tmp_path / "run"
    recipe = recipe_from_dict(tiny_recipe(tiny_model_dir, sft_data, out,
                                          train={"steps": 1, "micro_batch_size": 2, "grad_accum": 3}))
    ledger = train(recipe, quiet=True).ledger
    assert ledger["extra"]["distributed"] == {"world_size": 1, "backend": None, "parallel": None, "global_batch": 6}
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["device"] == "auto"
