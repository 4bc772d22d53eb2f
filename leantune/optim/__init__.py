"""Optimizers and the learning-rate schedule, chosen by name from ``OPTIMIZERS`` (``optim.name``).

Each entry says what the training loop must know about it, so the loop never asks which one it has:
``needs_backward`` (False: the optimizer evaluates the objective itself, ``step(objective)``, as MeZO
does) and ``state_copies`` (optimizer state in units of the trainable parameters' bytes, for the memory
planner). Adding an optimizer: a builder here (or in its own module), its name in ``OptimConfig.name``,
and its test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from leantune.optim.mezo import MeZO, direction_seed, zo_projected_gradient


@dataclass(frozen=True)
class OptimizerSpec:
    build: Callable[..., torch.optim.Optimizer]  # (OptimConfig, [(name, param)], seed) -> optimizer
    needs_backward: bool
    state_copies: int  # optimizer state / trainable bytes (AdamW: exp_avg + exp_avg_sq)


def _adamw(cfg, named_params, seed: int) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for _, p in named_params], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def _mezo(cfg, named_params, seed: int) -> torch.optim.Optimizer:
    return MeZO(named_params, lr=cfg.lr, eps=cfg.zo_eps, weight_decay=cfg.weight_decay, samples=cfg.zo_samples,
                seed=seed)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(_adamw, needs_backward=True, state_copies=2),
    "mezo": OptimizerSpec(_mezo, needs_backward=False, state_copies=0),  # z is regenerated from a seed
}


def lr_lambda(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step``: linear warmup, then cosine or constant.

    >>> [round(lr_lambda(s, warmup=2, total=6, schedule="cosine", min_ratio=0.0), 3) for s in range(6)]
    [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]
    """
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(cfg, model, *, seed: int, total_steps: int):
    """(optimizer, LambdaLR scheduler) over ``model``'s trainable parameters, as ``cfg`` (OptimConfig) says."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("nothing to train: no parameter requires grad")
    optimizer = OPTIMIZERS[cfg.name].build(cfg, named, seed)

    def schedule(step: int) -> float:
        return lr_lambda(step, warmup=cfg.warmup_steps, total=total_steps, schedule=cfg.scheduler,
                         min_ratio=cfg.min_lr_ratio)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


__all__ = ["OPTIMIZERS", "MeZO", "OptimizerSpec", "build_optimizer", "direction_seed", "lr_lambda",
           "zo_projected_gradient"]
