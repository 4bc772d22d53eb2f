"""Atomic checkpoints: trainable weights, optimizer, scheduler, RNG states and data position.

Layout of ``RUN_DIR/checkpoints``::

    step-00000010/
        trainable.safetensors   # only the parameters that train (LoRA: the adapter)
        optimizer.pt            # optimizer + scheduler state and RNG states (loaded weights_only)
        state.json              # step, micro_step, totals so far
    latest                      # text: name of the newest complete checkpoint

A checkpoint is written into a temporary directory and renamed into place; ``latest`` is replaced
atomically afterwards. A run killed at any moment leaves the previous checkpoint and ``latest``
intact, so ``--resume`` always finds a complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from leantune.atomic import atomic_write_bytes, fsync_dir


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout on a GPU draws from its generator
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_root: Path, step: int, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                    state: dict, keep: int = 2, *, optimizer_state: dict | None = None) -> Path:
    """Write checkpoint ``step`` atomically and point ``latest`` at it; keep the newest ``keep``.
    ``optimizer_state``: the state to store instead of ``optimizer.state_dict()`` (several processes: the
    full, name-keyed state ``leantune.distributed.optimizer_state_dict`` gathers)."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-step-", dir=ckpt_root))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save(
            {"optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
             "scheduler": scheduler.state_dict(), "rng": rng_state()},
            tmp / "optimizer.pt",
        )
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # a re-run of the same step: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(ckpt_root / "latest", final.name.encode())
    complete = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in complete[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / "latest"
    if not pointer.exists():
        return None
    path = ckpt_root / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Return (trainable tensors, optimizer/scheduler/rng payload, state)."""
    trainable = load_file(str(path / "trainable.safetensors"))
    # Our own file, and weights_only refuses arbitrary pickled objects anyway.
    payload = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    state = json.loads((path / "state.json").read_text())
    return trainable, payload, state
