"""Adapter methods by name (``adapter.method``): how a model is made trainable, saved, and what the memory
planner should count for it, side by side.

Each entry: ``apply(model, cfg, seed) -> model`` (the model to train), ``save(model, tokenizer, run_dir) ->
Path`` (the run's final export), ``trains_base`` (every base weight trains: no quantized base, gradients
and optimizer state for all of them), ``trainable_elements(shape, recipe)`` and ``trainable_bytes(shape,
recipe)`` (for ``leantune.plan``). Adding a method: its module, its name here and in ``AdapterConfig.method``,
and its test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from leantune.adapters import full, lora


@dataclass(frozen=True)
class AdapterMethod:
    name: str
    apply: Callable  # (model, AdapterConfig, seed) -> model
    save: Callable  # (model, tokenizer, run_dir, state_dict=None) -> Path
    trains_base: bool
    trainable_elements: Callable  # (ModelShape, Recipe) -> int
    trainable_bytes: Callable  # (ModelShape, Recipe) -> int


ADAPTERS: dict[str, AdapterMethod] = {
    "lora": AdapterMethod("lora", lora.apply_lora, lora.save_run_adapter, False, lora.planned_elements,
                          lora.planned_bytes),
    "full": AdapterMethod("full", full.apply_full, full.save_run_model, True, full.planned_elements,
                          full.planned_bytes),
}


def apply_adapter(model, cfg, seed: int = 0):
    """``cfg.method``'s adapter on ``model``; returns the model to train (seeded init)."""
    return ADAPTERS[cfg.method].apply(model, cfg, seed)


def save_run_output(model, tokenizer, method: str, run_dir: Path, state_dict: dict | None = None) -> Path:
    """The run's final export: RUN/adapter (LoRA, PEFT format) or RUN/model (full). ``state_dict``: full
    tensors gathered from FSDP2 shards, written instead of the model's own."""
    return ADAPTERS[method].save(model, tokenizer, Path(run_dir), state_dict)


__all__ = ["ADAPTERS", "AdapterMethod", "apply_adapter", "save_run_output"]
