"""Preference losses (the DPO family): pure functions of per-pair sequence log-probs, one per paper.

Every loss reads the same inputs, each (P,) for P pairs of one micro-batch:

    chosen_logps, rejected_logps          Σ_t log pi_theta(y_t | x, y_<t) over each completion (nats)
    ref_chosen_logps, ref_rejected_logps  the same under the reference policy (None for reference-free losses)
    chosen_tokens, rejected_tokens        how many completion tokens each sum ran over (float)

and returns ``(loss, PreferenceStats)``. Each loss owns its reduction: all three here are a mean over pairs,
so with ``num_pairs`` = the pairs of the whole optimizer step (every micro-batch, every process) the
micro-batch losses add up to the step's mean, and micro-batch 8 x accumulation 1 equals 1 x 8.

- `dpo_loss`: DPO (Rafailov et al., arXiv 2305.18290, eq. 7), -log sigmoid(beta * Δ) with
  Δ = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)), summed log-probs. ``label_smoothing`` eps > 0
  is conservative DPO (cDPO, Mitchell 2023, "A note on DPO with noisy preferences"): the label is flipped
  with probability eps, -(1-eps) log sigmoid(beta Δ) - eps log sigmoid(-beta Δ) (TRL's pre-1.0 "sigmoid").
- `ipo_loss`: IPO (Azar et al., arXiv 2310.12036, eq. 17), (h - 1/(2 tau))^2, tau = beta, where h is the
  difference of the *token-averaged* log-ratios, as TRL computes it (the IPO authors' normalization; with
  summed log-probs the squared loss would scale with completion length).
- `simpo_loss`: SimPO (Meng et al., arXiv 2405.14734, eq. 6), -log sigmoid(beta/|y_w| log pi(y_w) -
  beta/|y_l| log pi(y_l) - gamma): length-normalized, no reference model, a target margin gamma.

Stats follow TRL's metric names (`PreferenceStats.as_metrics`): rewards/chosen, rewards/rejected (the implicit
rewards, beta x log-ratio for DPO/IPO, beta x mean log-prob for SimPO), rewards/accuracies (chosen reward
strictly above rejected), rewards/margins, logps/chosen, logps/rejected (summed for DPO/IPO, averaged for SimPO,
as TRL's DPOTrainer and CPOTrainer log them). They are kept as sums over pairs so micro-batches and processes
add up; ``as_metrics`` turns them into means.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PreferenceStats:
    """Sums over pairs of what TRL logs per step; ``+`` merges micro-batches, ``as_metrics`` gives means."""

    pairs: float = 0.0
    reward_chosen: float = 0.0
    reward_rejected: float = 0.0
    correct: float = 0.0  # pairs whose chosen reward is strictly higher
    margin: float = 0.0
    logps_chosen: float = 0.0
    logps_rejected: float = 0.0

    def __add__(self, other: PreferenceStats) -> PreferenceStats:
        return PreferenceStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def as_metrics(self) -> dict[str, float]:
        """Means over pairs under TRL's names (0.0 for no pairs)."""
        n = max(self.pairs, 1.0)
        return {"rewards/chosen": self.reward_chosen / n, "rewards/rejected": self.reward_rejected / n,
                "rewards/accuracies": self.correct / n, "rewards/margins": self.margin / n,
                "logps/chosen": self.logps_chosen / n, "logps/rejected": self.logps_rejected / n}


def _stats(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor, logps_chosen: torch.Tensor,
           logps_rejected: torch.Tensor) -> PreferenceStats:
    """PreferenceStats of (P,) rewards and logged log-probs (no gradient)."""
    rc, rr = reward_chosen.detach(), reward_rejected.detach()
    return PreferenceStats(pairs=float(rc.numel()), reward_chosen=float(rc.sum()), reward_rejected=float(rr.sum()),
                           correct=float((rc > rr).sum()), margin=float((rc - rr).sum()),
                           logps_chosen=float(logps_chosen.detach().sum()),
                           logps_rejected=float(logps_rejected.detach().sum()))


def _pair_mean(per_pair: torch.Tensor, num_pairs: float | None) -> torch.Tensor:
    """Σ per_pair / num_pairs (default: this batch's pairs): the step's mean once micro-batches are summed."""
    return per_pair.sum() / (per_pair.numel() if num_pairs is None else max(num_pairs, 1))


def _check(chosen: torch.Tensor, rejected: torch.Tensor, *refs: torch.Tensor | None) -> None:
    if chosen.dim() != 1 or chosen.shape != rejected.shape:
        raise ValueError(f"chosen and rejected log-probs must both be (P,); got {tuple(chosen.shape)} and "
                         f"{tuple(rejected.shape)}")
    for r in refs:
        if r is not None and r.shape != chosen.shape:
            raise ValueError(f"reference log-probs {tuple(r.shape)} must match the policy's {tuple(chosen.shape)}")


def _need_reference(name: str, *refs: torch.Tensor | None) -> None:
    if any(r is None for r in refs):
        raise ValueError(f"{name} compares the policy to a reference: pass ref_chosen_logps and ref_rejected_logps")


def _sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z), per pair (eps = 0: the Bradley-Terry NLL)."""
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor | None,
             ref_rejected_logps: torch.Tensor | None, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, *,
             beta: float, gamma: float = 0.0, label_smoothing: float = 0.0,
             num_pairs: float | None = None) -> tuple[torch.Tensor, PreferenceStats]:
    """DPO (arXiv 2305.18290): mean over pairs of -log sigmoid(beta * Δ), Δ the difference of summed log-ratios.

    TRL ``loss_type="sigmoid"`` at ``label_smoothing=0``; cDPO above (module docstring). ``gamma`` is unused
    (SimPO's margin). Token counts are unused: DPO's log-probs are sums.

    >>> z = torch.zeros(2)
    >>> loss, st = dpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -2.0]), z - 2, z - 2, z + 1, z + 1, beta=0.5)
    >>> round(float(loss), 4), st.as_metrics()["rewards/accuracies"], st.as_metrics()["rewards/margins"]
    (0.5032, 0.5, 0.5)
    """
    _check(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _need_reference("dpo", ref_chosen_logps, ref_rejected_logps)
    chosen_ratio = chosen_logps - ref_chosen_logps  # (P,)
    rejected_ratio = rejected_logps - ref_rejected_logps  # (P,)
    per_pair = _sigmoid_loss(beta * (chosen_ratio - rejected_ratio), label_smoothing)  # (P,)
    return _pair_mean(per_pair, num_pairs), _stats(beta * chosen_ratio, beta * rejected_ratio, chosen_logps, rejected_logps)


def ipo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor | None,
             ref_rejected_logps: torch.Tensor | None, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, *,
             beta: float, gamma: float = 0.0, label_smoothing: float = 0.0,
             num_pairs: float | None = None) -> tuple[torch.Tensor, PreferenceStats]:
    """IPO (arXiv 2310.12036, eq. 17): mean over pairs of (h - 1/(2 beta))^2, h the difference of the
    token-averaged log-ratios (TRL ``loss_type="ipo"``). Rewards are beta x the summed log-ratios, as TRL logs.
    ``gamma`` and ``label_smoothing`` are unused (the config refuses label smoothing with IPO)."""
    _check(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _need_reference("ipo", ref_chosen_logps, ref_rejected_logps)
    chosen_ratio = chosen_logps - ref_chosen_logps  # (P,)
    rejected_ratio = rejected_logps - ref_rejected_logps  # (P,)
    h = chosen_ratio / chosen_tokens.clamp(min=1.0) - rejected_ratio / rejected_tokens.clamp(min=1.0)  # (P,)
    per_pair = (h - 1 / (2 * beta)) ** 2
    return _pair_mean(per_pair, num_pairs), _stats(beta * chosen_ratio, beta * rejected_ratio, chosen_logps, rejected_logps)


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor | None,
               ref_rejected_logps: torch.Tensor | None, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, *,
               beta: float, gamma: float = 0.5, label_smoothing: float = 0.0,
               num_pairs: float | None = None) -> tuple[torch.Tensor, PreferenceStats]:
    """SimPO (arXiv 2405.14734, eq. 6): mean over pairs of -log sigmoid(beta (mean logp_w - mean logp_l) - gamma).

    No reference (the ref arguments are ignored); the log-probs are averaged over each completion's tokens here.
    TRL CPOTrainer ``loss_type="simpo"`` (``cpo_alpha=0``, ``simpo_gamma=gamma``), label smoothing included.
    """
    _check(chosen_logps, rejected_logps)
    chosen_avg = chosen_logps / chosen_tokens.clamp(min=1.0)  # (P,)
    rejected_avg = rejected_logps / rejected_tokens.clamp(min=1.0)  # (P,)
    per_pair = _sigmoid_loss(beta * (chosen_avg - rejected_avg) - gamma, label_smoothing)  # (P,)
    return _pair_mean(per_pair, num_pairs), _stats(beta * chosen_avg, beta * rejected_avg, chosen_avg, rejected_avg)


@dataclass(frozen=True)
class PreferenceLoss:
    """A registry entry: the loss, whether it compares against a reference policy, and its usual beta."""

    fn: Callable[..., tuple[torch.Tensor, PreferenceStats]]
    needs_reference: bool
    default_beta: float  # dpo.beta: null picks this (DPO/IPO papers use 0.1; SimPO's recipes 2.0-2.5)


# name (dpo.loss) -> entry; every fn takes (chosen, rejected, ref_chosen, ref_rejected, chosen_tokens,
# rejected_tokens, *, beta, gamma, label_smoothing, num_pairs) and reduces by its own rule.
PREFERENCE_LOSSES = {
    "dpo": PreferenceLoss(dpo_loss, needs_reference=True, default_beta=0.1),
    "ipo": PreferenceLoss(ipo_loss, needs_reference=True, default_beta=0.1),
    "simpo": PreferenceLoss(simpo_loss, needs_reference=False, default_beta=2.0),
}
