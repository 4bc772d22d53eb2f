"""Group-relative advantages: one scalar per completion from the rewards of its prompt's group.

Rollouts come as `n_groups` prompts x `group_size` completions each, flattened group-contiguously:
rewards[g * group_size + i] is completion i of prompt g (TRL's layout: `rewards.view(-1, num_generations)`).
Every function maps rewards (N,) -> advantages (N,), N = n_groups * group_size, and is pure (no state,
no in-place writes, no gradient).

- GRPO (DeepSeekMath, arXiv 2402.03300, section 4.1.2): A_i = (r_i - mean_g) / (std_g + eps), std unbiased.
- Dr.GRPO (arXiv 2503.20783, section 3.1): A_i = r_i - mean_g. Dividing by std_g up-weights prompts that are
  nearly always solved or nearly always failed (a question-level difficulty bias); Dr.GRPO drops it.
- RLOO (Ahmadian et al., arXiv 2402.14740): A_i = r_i - mean of the *other* completions of the group
  = group_size / (group_size - 1) * (r_i - mean_g): a baseline independent of the sample it scores.

Two cases carry no learning signal and give exactly zero advantage, by construction rather than by
rounding: a group whose rewards are all equal (zero variance; DAPO's dynamic sampling drops these groups,
arXiv 2503.14476) and a single-completion group (group_size == 1: nothing to compare against). TRL computes
(r - mean) / (0 + 1e-4) there, which float rounding of the mean can turn into a tiny non-zero value
(e.g. seven rewards of 0.1 in fp32 give -7.45e-5 each); here it is exactly 0.
"""

from __future__ import annotations

from functools import partial

import torch

_SCALES = ("std", "none")


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Validate and reshape rewards (N,) -> (n_groups, group_size), in a floating dtype."""
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}; "
            "pass all group_size completions of every prompt, group-contiguously"
        )
    if not torch.is_floating_point(rewards):
        rewards = rewards.to(torch.get_default_dtype())
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; give unscorable completions a finite reward (e.g. 0)")
    return rewards.detach().view(-1, group_size)


def _zero_flat_groups(adv: torch.Tensor, grouped: torch.Tensor) -> torch.Tensor:
    """Exact zeros for groups whose rewards are all equal (no signal): adv, grouped (G, K) -> (N,)."""
    flat = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)  # (G, 1)
    return adv.masked_fill(flat, 0.0).reshape(-1)


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: str = "std", eps: float = 1e-4
) -> torch.Tensor:
    """Group-normalized advantages: (r - group mean) [/ (group std + eps)], rewards (N,) -> (N,).

    scale="std" is GRPO (arXiv 2402.03300) with TRL's convention: unbiased (Bessel-corrected, n - 1) group
    std, and `eps` added to the std, not to the variance. scale="none" is Dr.GRPO (arXiv 2503.20783):
    mean-centred only. Zero-variance and single-sample groups give exactly 0.

    >>> group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), 3, scale="none")
    tensor([ 0.6667, -0.3333, -0.3333,  0.0000,  0.0000,  0.0000])
    >>> group_advantages(torch.tensor([1.0, 0.0, 2.0, 4.0]), 2)  # std of each pair: 0.7071, 1.4142
    tensor([ 0.7070, -0.7070, -0.7071,  0.7071])
    """
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
    grouped = _grouped(rewards, group_size)  # (G, K)
    adv = grouped - grouped.mean(dim=1, keepdim=True)  # (G, K)
    if scale == "std" and group_size > 1:
        adv = adv / (grouped.std(dim=1, keepdim=True, correction=1) + eps)  # (G, K)
    return _zero_flat_groups(adv, grouped)  # (N,)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave-one-out advantages (RLOO, arXiv 2402.14740): r_i - mean_{j != i} r_j, rewards (N,) -> (N,).

    Computed as TRL's RLOOTrainer does: baseline_i = (group sum - r_i) / (group_size - 1). A single-sample
    group has no "others" and gives 0; an all-equal group gives exactly 0.

    >>> rloo_advantages(torch.tensor([1.0, 0.0, 0.0]), 3)
    tensor([ 1.0000, -0.5000, -0.5000])
    """
    grouped = _grouped(rewards, group_size)  # (G, K)
    if group_size == 1:
        return torch.zeros_like(grouped).reshape(-1)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # (G, K)
    return _zero_flat_groups(grouped - baseline, grouped)  # (N,)


def ragged_advantages(estimator, rewards: torch.Tensor, group_sizes) -> torch.Tensor:
    """Any estimator above on groups of different sizes (routed rollouts): rewards (N,) -> (N,).

    ``group_sizes``: one int for all groups (the estimator as is), or one size >= 1 per group,
    group-contiguous, summing to N. Each group is centred (and scaled) by its own statistics only, exactly as
    the estimator does for a batch of equal groups.

    >>> ragged_advantages(ADVANTAGES["dr_grpo"], torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]), [2, 3])
    tensor([ 0.5000, -0.5000,  0.3333,  0.3333, -0.6667])
    """
    if isinstance(group_sizes, int):
        return estimator(rewards, group_sizes)
    sizes = [int(n) for n in group_sizes]
    if sum(sizes) != rewards.numel() or min(sizes, default=1) < 1:
        raise ValueError(f"group sizes {sizes} (each >= 1) do not cover {rewards.numel()} rewards")
    if len(set(sizes)) <= 1:  # equal groups: one batched call
        return estimator(rewards, sizes[0]) if sizes else estimator(rewards, 1)
    return torch.cat([estimator(part, len(part)) for part in rewards.split(sizes)])


# name -> (rewards (N,), group_size) -> advantages (N,). Chosen once, by config, not by if/elif chains.
ADVANTAGES = {
    "grpo": partial(group_advantages, scale="std"),
    "dr_grpo": partial(group_advantages, scale="none"),
    "rloo": rloo_advantages,
}
