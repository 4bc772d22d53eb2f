"""Policy losses for GRPO-family RL: one clipped surrogate per token, three ways to average it.

All three share the per-token PPO-clip surrogate (Schulman et al., arXiv 1707.06347) as TRL writes it:

    ratio = exp(logp - old_logp)                                   # (B, T) importance ratio
    loss_t = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)

plus, if beta > 0, beta * KL_t to a reference policy (the k3 estimator, added per token *before*
aggregation, as TRL does). They differ only in how loss_t is averaged -- which decides how much each token
of each completion weighs -- and in the default clip range:

- `grpo_loss`: "GRPO" as in DeepSeekMath (arXiv 2402.03300): mean over each completion's tokens, then mean
  over completions. A token's weight is 1 / |o_i|, so short correct answers are pushed up harder than long
  ones and long wrong answers are pushed down more gently: a length bias (Dr.GRPO, arXiv 2503.20783, 3.1).
- `dapo_loss`: DAPO (arXiv 2503.14476): sum over all tokens / number of tokens, every token weighs the same;
  clip-higher (eps_high 0.28 > eps_low 0.2) lets low-probability tokens grow, against entropy collapse.
  Pass `num_tokens` = the token count of the whole accumulation window so micro-batch losses add up to the
  window's token mean (TRL's `num_items_in_batch`).
- `dr_grpo_loss`: Dr.GRPO: sum over all tokens / (B * max_completion_length), a constant, so a token's weight
  depends neither on its completion's length nor on the batch's.

When old_logps is None (one gradient step per rollout batch) the ratio is exactly 1 in value, clipping never
fires, and each loss is plain REINFORCE, -A * logp, with its own token weights. Inputs: logps, old_logps,
mask (B, T) per completion token, mask 1 on real completion tokens (padding may hold any finite value);
advantages (B,) (or (B, T) for per-token advantages). Each returns (0-d loss, stats) where stats holds
python floats named as TRL logs them. The loss is not divided by gradient-accumulation steps: the loop does
that for `grpo_loss` / `dr_grpo_loss`; `dapo_loss` is already normalized by `num_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PolicyWindow:
    """What the losses of one optimizer step are normalized by, over all its micro-batches: the trainer
    passes the same window to every micro-batch and sums their losses; each loss reduces by its own rule."""

    num_sequences: int  # completions in the step (grpo, dr_grpo)
    num_tokens: float  # completion tokens of the sequences that carry a loss (dapo)
    max_completion_length: int  # the generation limit (dr_grpo)


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(d) - d - 1 with d = ref_logp - logp; (B, T) -> (B, T).

    Unbiased for KL(pi || pi_ref) when tokens are sampled from pi, and always >= 0 (Schulman, "Approximating
    KL divergence", 2020; used by GRPO, arXiv 2402.03300, eq. 4).

    >>> kl_k3(torch.zeros(2), torch.tensor([1.0, 2.0]).log())  # d = 0, ln 2
    tensor([0.0000, 0.3069])
    """
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of x (B, T) over mask == 1 positions, as a float (0.0 for an empty mask)."""
    return ((x * mask).sum() / mask.sum().clamp(min=1.0)).item()


def _clipped_surrogate(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
    ref_logps: torch.Tensor | None,
    bias_correction_kl: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Per-token loss (B, T) (unmasked), the float mask (B, T), and stats; shared by every loss below."""
    if logps.dim() != 2 or logps.shape != mask.shape:
        raise ValueError(
            f"logps and mask must both be (B, T); got {tuple(logps.shape)} and {tuple(mask.shape)}"
        )
    if old_logps is not None and old_logps.shape != logps.shape:
        raise ValueError(f"old_logps shape {tuple(old_logps.shape)} != logps shape {tuple(logps.shape)}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # (B, 1), broadcast over tokens
    if advantages.shape[0] != logps.shape[0]:
        raise ValueError(f"advantages has {advantages.shape[0]} rows, logps has B={logps.shape[0]}")
    mask = mask.to(logps.dtype)
    advantages = advantages.to(logps.dtype)
    if old_logps is None:  # single step per rollout batch: ratio == 1 in value, gradient of logp kept
        old_logps = logps.detach()

    ratio = torch.exp(logps - old_logps)  # (B, T)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)  # (B, T)
    per_token = -torch.min(ratio * advantages, clipped * advantages)  # (B, T)

    stats: dict[str, float] = {}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError(f"beta={beta} needs ref_logps (B, T), the reference policy's token log-probs")
        kl = kl_k3(logps, ref_logps)  # (B, T)
        if bias_correction_kl:
            # Weighting by the (differentiable) ratio makes the KL gradient the unbiased reverse-KL gradient,
            # (logp - ref_logp) per token on-policy (DeepSeek-V3.2, arXiv 2512.02556); TRL's default.
            kl = kl * ratio
        per_token = per_token + beta * kl
        with torch.no_grad():
            stats["kl"] = _masked_mean(kl, mask)

    with torch.no_grad():  # TRL's clip metrics: tokens where the clipped branch is active
        low = ((ratio < 1 - epsilon_low) & (advantages < 0)).to(mask.dtype)
        high = ((ratio > 1 + epsilon_high) & (advantages > 0)).to(mask.dtype)
        stats["clip_ratio/low_mean"] = _masked_mean(low, mask)
        stats["clip_ratio/high_mean"] = _masked_mean(high, mask)
        stats["clip_ratio/region_mean"] = _masked_mean(torch.maximum(low, high), mask)
    return per_token, mask, stats


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    bias_correction_kl: bool = True,
    window: PolicyWindow | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO (arXiv 2402.03300): clipped surrogate, mean over each sequence's tokens, then over sequences.

    TRL loss_type="grpo". A sequence with no real tokens contributes 0 but still counts in the mean over B.
    With a ``window``, the sequence means are summed and divided by ``window.num_sequences`` (the step's
    completions), so micro-batch losses add up to the step's mean.
    """
    per_token, mask, stats = _clipped_surrogate(
        logps, old_logps, advantages, mask, epsilon_low, epsilon_high, beta, ref_logps, bias_correction_kl
    )
    seq_means = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (B,)
    loss = seq_means.mean() if window is None else seq_means.sum() / window.num_sequences  # ()
    return loss, stats


def dapo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.28,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    bias_correction_kl: bool = True,
    num_tokens: float | torch.Tensor | None = None,
    window: PolicyWindow | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DAPO (arXiv 2503.14476): token-level loss, sum of per-token losses / num_tokens, clip-higher.

    num_tokens defaults to mask.sum() (this batch's completion tokens). TRL loss_type="dapo" divides by
    `num_items_in_batch` -- the completion tokens of the whole generation batch -- scaled to one accumulation
    window; for one process that is the tokens of all micro-batches of the window, so pass that count here
    and sum (not average) the micro-batch losses (a ``window`` carries that count).
    """
    per_token, mask, stats = _clipped_surrogate(
        logps, old_logps, advantages, mask, epsilon_low, epsilon_high, beta, ref_logps, bias_correction_kl
    )
    if num_tokens is None:
        num_tokens = window.num_tokens if window is not None else mask.sum()
    num_tokens = torch.as_tensor(num_tokens, dtype=per_token.dtype).clamp(min=1.0)
    loss = (per_token * mask).sum() / num_tokens  # ()
    return loss, stats


def dr_grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    bias_correction_kl: bool = True,
    max_completion_length: int | None = None,
    window: PolicyWindow | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Dr.GRPO (arXiv 2503.20783): sum of per-token losses / (B * max_completion_length).

    TRL loss_type="dr_grpo". Pass the configured generation limit as max_completion_length so the
    normalizer is the same every step; it defaults to T, the padded width of this batch. A ``window``
    gives both: B = its num_sequences (the step's completions), its max_completion_length.
    """
    if window is not None:
        max_completion_length = window.max_completion_length
    per_token, mask, stats = _clipped_surrogate(
        logps, old_logps, advantages, mask, epsilon_low, epsilon_high, beta, ref_logps, bias_correction_kl
    )
    length = logps.shape[1] if max_completion_length is None else max_completion_length
    if length < logps.shape[1]:
        raise ValueError(
            f"max_completion_length={length} is shorter than the completions' width T={logps.shape[1]}"
        )
    n_seq = logps.shape[0] if window is None else window.num_sequences
    loss = (per_token * mask).sum() / (n_seq * length)  # ()
    return loss, stats


def entropy_gradient_correlation(entropy: torch.Tensor, grad_norm: torch.Tensor, mask: torch.Tensor,
                                 eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation, within each completion, of token entropy H_t and logit-gradient norm
    |d log pi(y_t) / d z_t|_2 over its real tokens: (B, T) x3 -> (B,), differentiable in both.

    The "entropy-gradient inversion" of arXiv 2605.17770 is this correlation turning negative in reasoning
    models. A completion with fewer than 3 real tokens (two points always correlate +-1) gets exactly 0;
    ``eps`` keeps a constant series finite (correlation 0 there).

    >>> h = torch.tensor([[1.0, 2.0, 3.0, 0.0]]); g = torch.tensor([[3.0, 2.0, 1.0, 9.0]])
    >>> entropy_gradient_correlation(h, g, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    tensor([-1.])
    """
    mask = mask.to(entropy.dtype)
    n = mask.sum(-1)  # (B,)
    mu_h = (entropy * mask).sum(-1) / n.clamp(min=1.0)  # (B,)
    mu_g = (grad_norm * mask).sum(-1) / n.clamp(min=1.0)
    dh = (entropy - mu_h[:, None]) * mask  # (B, T)
    dg = (grad_norm - mu_g[:, None]) * mask
    rho = (dh * dg).sum(-1) * torch.rsqrt((dh * dh).sum(-1) * (dg * dg).sum(-1) + eps)  # (B,)
    return torch.where(n >= 3, rho, torch.zeros_like(rho))


def entropy_gradient_penalty(entropy: torch.Tensor, grad_norm: torch.Tensor, mask: torch.Tensor, *,
                             window: PolicyWindow | None = None) -> torch.Tensor:
    """The CorR-PO-style regularizer leantune adds to any policy loss (times `rl.entropy_reg`): the mean over
    the step's completions of their entropy / logit-gradient correlation, sum_i rho_i / window.num_sequences
    (this micro-batch's B without a window). Minimising it pushes the correlation negative, towards the
    inversion arXiv 2605.17770 associates with stronger reasoning. (B, T) x3 -> ()."""
    rho = entropy_gradient_correlation(entropy, grad_norm, mask)  # (B,)
    return rho.sum() / (window.num_sequences if window is not None else max(1, rho.numel()))


# name (TRL's loss_type) -> loss function; all take (logps, old_logps, advantages, mask, *, epsilon_low,
# epsilon_high, beta, ref_logps, bias_correction_kl, window) and reduce by their own rule.
POLICY_LOSSES = {"grpo": grpo_loss, "dapo": dapo_loss, "dr_grpo": dr_grpo_loss}
# the advantage estimator each loss is defined with (`rl.advantage: null`), a name in rl.advantages.ADVANTAGES
DEFAULT_ADVANTAGE = {"grpo": "grpo", "dapo": "grpo", "dr_grpo": "dr_grpo"}
