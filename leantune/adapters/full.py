"""Full fine-tuning: every weight trains; the run exports a plain transformers model (safetensors)."""

from __future__ import annotations

from pathlib import Path

from leantune.adapters.lora import save_full_model


def apply_full(model, cfg, seed: int = 0):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save_run_model(model, tokenizer, run_dir: Path, state_dict: dict | None = None) -> Path:
    return save_full_model(model, tokenizer, Path(run_dir) / "model", state_dict)


def planned_elements(shape, recipe) -> int:
    """Every parameter of the model."""
    return shape.params


def planned_bytes(shape, recipe) -> int:
    """Trainable weights in ``model.dtype``."""
    from leantune.plan.memory import DTYPE_BYTES

    return planned_elements(shape, recipe) * DTYPE_BYTES[recipe.model.compute_dtype]
