"""RL post-training math: group advantages and GRPO / DAPO / Dr.GRPO policy losses (pure functions)."""

from leantune.rl.advantages import ADVANTAGES, group_advantages, rloo_advantages
from leantune.rl.losses import POLICY_LOSSES, dapo_loss, dr_grpo_loss, grpo_loss, kl_k3

__all__ = [
    "ADVANTAGES",
    "POLICY_LOSSES",
    "dapo_loss",
    "dr_grpo_loss",
    "group_advantages",
    "grpo_loss",
    "kl_k3",
    "rloo_advantages",
]
