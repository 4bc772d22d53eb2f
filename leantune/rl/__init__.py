"""RL post-training: group advantages, policy losses, rewards, rollouts and prompt selection.

The names below are imported on first use, so ``leantune.rl.rewards`` (which the recipe validators read)
does not pull in torch.
"""

import importlib

_EXPORTS = {
    "ADVANTAGES": "advantages", "group_advantages": "advantages", "rloo_advantages": "advantages",
    "POLICY_LOSSES": "losses", "PolicyWindow": "losses", "dapo_loss": "losses", "dr_grpo_loss": "losses",
    "grpo_loss": "losses", "kl_k3": "losses",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"leantune.rl.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'leantune.rl' has no attribute {name!r}")
