"""RL math: group advantages and GRPO / DAPO / Dr.GRPO losses.

Hand-computed examples, odd shapes with ragged masks, gradients against a scalar-loop reference, and
equivalence with TRL (its GRPOTrainer._compute_loss called on a stub object; its advantage formulas
copied verbatim with source locations, since they sit inline in a 500-line method).
"""

from __future__ import annotations

import collections
import math
import types

import pytest
import torch

from leantune.rl import (
    ADVANTAGES,
    POLICY_LOSSES,
    dapo_loss,
    dr_grpo_loss,
    group_advantages,
    grpo_loss,
    kl_k3,
    rloo_advantages,
)

torch.set_num_threads(1)
F64 = torch.float64
LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 3.0, 3.0, 3.0], dtype=F64)  # 2 groups of 3; the second is flat
    # group 1: mean 1/3, deviations (2/3, -1/3, -1/3), unbiased var (4/9 + 1/9 + 1/9) / 2 = 1/3, std 0.57735
    s = math.sqrt(1 / 3) + 1e-4  # 0.5774503
    want = [(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s, 0.0, 0.0, 0.0]  # 1.1545006, -0.5772503, ...
    torch.testing.assert_close(group_advantages(r, 3), torch.tensor(want, dtype=F64))
    torch.testing.assert_close(group_advantages(r, 3)[0], torch.tensor(1.1545005730, dtype=F64))
    # Dr.GRPO: mean-centred only
    torch.testing.assert_close(
        group_advantages(r, 3, scale="none"), torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0], dtype=F64)
    )
    # group of 4 with a biased-vs-unbiased difference: [1, 0, 0, 1]: mean .5, unbiased std sqrt(1/3)
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64), 4)
    torch.testing.assert_close(a, torch.tensor([1, -1, -1, 1], dtype=F64) * 0.5 / s)  # +-0.8658754


def test_rloo_advantages_by_hand():
    # [1, 0, 0]: 1 - mean(0, 0) = 1; 0 - mean(1, 0) = -0.5
    # [3, 1, 2, 2]: 3 - 5/3 = 4/3; 1 - 7/3 = -4/3; 2 - 2 = 0; 0
    r = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    torch.testing.assert_close(rloo_advantages(r, 3), torch.tensor([1.0, -0.5, -0.5], dtype=F64))
    r = torch.tensor([3.0, 1.0, 2.0, 2.0], dtype=F64)
    torch.testing.assert_close(rloo_advantages(r, 4), torch.tensor([4 / 3, -4 / 3, 0.0, 0.0], dtype=F64))
    # RLOO = G / (G - 1) * (r - mean)
    torch.testing.assert_close(rloo_advantages(r, 4), 4 / 3 * group_advantages(r, 4, scale="none"))


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_flat_and_single_sample_groups_give_exact_zeros(name):
    fn = ADVANTAGES[name]
    # seven 0.1s: TRL's (r - mean) / (0 + 1e-4) gives -7.45e-5 from fp32 rounding of the mean; we give 0
    r = torch.cat([torch.full((7,), 0.1), torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 2.0])])
    a = fn(r, 7)
    assert a.shape == (14,) and a.dtype == torch.float32
    assert torch.equal(a[:7], torch.zeros(7))
    assert (a[7:] != 0).all()
    assert torch.equal(fn(torch.tensor([0.3, 1.0, -2.0]), 1), torch.zeros(3))  # single-sample groups
    assert torch.equal(fn(torch.tensor([1, 0, 1, 1]), 2)[2:], torch.zeros(2))  # int rewards are accepted


def test_advantages_are_centred_per_group():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(5 * 6, generator=g, dtype=F64)
    for name, fn in ADVANTAGES.items():
        a = fn(r, 6).view(5, 6)
        torch.testing.assert_close(a.sum(1), torch.zeros(5, dtype=F64), msg=name)
    a = group_advantages(r, 6).view(5, 6)  # GRPO: unit unbiased std up to eps
    torch.testing.assert_close(a.std(1), torch.ones(5, dtype=F64), atol=1e-3, rtol=0)


def test_advantage_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(torch.zeros(4), 2, scale="batch")
    with pytest.raises(ValueError, match="1-D"):
        rloo_advantages(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([0.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="positive int"):
        rloo_advantages(torch.zeros(4), 0)


def _trl_grpo_advantages(rewards, num_generations, scale_rewards):
    """TRL 1.16 trl/trainer/grpo_trainer.py:2765-2787 (GRPOTrainer._generate_and_score_completions,
    multi_objective_aggregation="sum_then_normalize"), verbatim but for the NaN bookkeeping."""
    from trl.trainer.utils import nanstd

    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if num_generations > 1:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    else:
        std_rewards = torch.zeros_like(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def _trl_rloo_advantages(rewards, num_generations):
    """TRL 1.16 trl/trainer/rloo_trainer.py:1682-1692 (RLOOTrainer), verbatim but for the NaN bookkeeping."""
    grouped_rewards = rewards.view(-1, num_generations)
    if num_generations > 1:
        baselines = (grouped_rewards.sum(dim=1, keepdim=True) - grouped_rewards) / (num_generations - 1)
        return rewards - baselines.view(-1)
    return torch.zeros_like(rewards)


@pytest.mark.parametrize("group_size", [1, 2, 4, 7])
def test_advantages_match_trl(group_size):
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(group_size)
    r = torch.randn(3 * group_size, generator=g)
    r[:group_size] = torch.randint(0, 2, (group_size,), generator=g).float()  # binary, possibly flat
    torch.testing.assert_close(group_advantages(r, group_size), _trl_grpo_advantages(r, group_size, "group"))
    torch.testing.assert_close(
        group_advantages(r, group_size, scale="none"), _trl_grpo_advantages(r, group_size, "none")
    )
    torch.testing.assert_close(rloo_advantages(r, group_size), _trl_rloo_advantages(r, group_size))


# -------------------------------------------------------------------------------------------------- losses


def _hand_batch():
    """B=2, T=3: ratios [[1.5, 1.0, 0.9], [0.5, 1.3, 7.0 (padding)]], A = [+1, -2]."""
    old = torch.zeros(2, 3, dtype=F64)
    logps = torch.log(torch.tensor([[1.5, 1.0, 0.9], [0.5, 1.3, 7.0]], dtype=F64)).requires_grad_()
    adv = torch.tensor([1.0, -2.0], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logps, old, adv, mask


def test_losses_by_hand():
    logps, old, adv, mask = _hand_batch()
    # eps 0.2/0.2. Seq 0 (A=+1): -min(rA, clip(r)A) = [-min(1.5, 1.2), -1.0, -0.9] = [-1.2, -1.0, -0.9]
    # Seq 1 (A=-2): r=0.5: -min(-1.0, -1.6) = 1.6; r=1.3: -min(-2.6, -2.4) = 2.6; padding ignored.
    # grpo: mean(-3.1 / 3, 4.2 / 2) = (-1.0333 + 2.1) / 2 = 0.533333
    loss, stats = grpo_loss(logps, old, adv, mask)
    torch.testing.assert_close(loss, torch.tensor((-3.1 / 3 + 2.1) / 2, dtype=F64))
    # 5 real tokens: low-clipped r=0.5 with A<0; high-clipped r=1.5 with A>0; r=1.3 with A<0 is not clipped
    assert stats == pytest.approx(
        {"clip_ratio/low_mean": 0.2, "clip_ratio/high_mean": 0.2, "clip_ratio/region_mean": 0.4}
    )
    # d loss / d logp = -r A / (|o_i| B) where the unclipped branch is active, else 0:
    # seq 0: [0 (clipped), -1/6, -0.9/6]; seq 1: [0 (clipped), 2.6/4, 0 (padding)]
    (grad,) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(grad, torch.tensor([[0, -1 / 6, -0.15], [0, 0.65, 0]], dtype=F64))

    # dapo, eps 0.2/0.28: seq 0 r=1.5 clips at 1.28 -> [-1.28, -1.0, -0.9]; seq 1 unchanged [1.6, 2.6]
    # (-3.18 + 4.2) / 5 tokens = 0.204
    loss, _ = dapo_loss(logps, old, adv, mask)
    torch.testing.assert_close(loss, torch.tensor(0.204, dtype=F64))
    loss, _ = dapo_loss(logps, old, adv, mask, num_tokens=10)  # accumulation window of 10 tokens
    torch.testing.assert_close(loss, torch.tensor(0.102, dtype=F64))

    # dr_grpo, eps 0.2/0.2: (-3.1 + 4.2) / (B=2 * L=4) = 0.1375; default L = T = 3: 1.1 / 6
    loss, _ = dr_grpo_loss(logps, old, adv, mask, max_completion_length=4)
    torch.testing.assert_close(loss, torch.tensor(0.1375, dtype=F64))
    loss, _ = dr_grpo_loss(logps, old, adv, mask)
    torch.testing.assert_close(loss, torch.tensor(1.1 / 6, dtype=F64))


def test_kl_by_hand():
    # k3 at d = ref - logp: exp(d) - d - 1 -> d=0: 0; d=ln2: 2 - 0.693147 - 1 = 0.306853; d=-ln2: 0.193147
    logps = torch.zeros(1, 3, dtype=F64)
    ref = torch.tensor([[0.0, LN2, -LN2]], dtype=F64)
    torch.testing.assert_close(kl_k3(logps, ref), torch.tensor([[0.0, 1 - LN2, LN2 - 0.5]], dtype=F64))

    # On-policy, A = 0, so only beta * KL remains: grpo = 0.1 * mean(0.306853, 0.193147) = 0.025
    logps = torch.zeros(1, 2, dtype=F64, requires_grad=True)
    ref = torch.tensor([[LN2, -LN2]], dtype=F64)
    adv = torch.zeros(1, dtype=F64)
    loss, stats = grpo_loss(logps, None, adv, torch.ones(1, 2), beta=0.1, ref_logps=ref)
    torch.testing.assert_close(loss, torch.tensor(0.025, dtype=F64))
    assert stats["kl"] == pytest.approx(0.25)
    # with the ratio correction (TRL default) the gradient is beta * (logp - ref) / T: [-0.0346574, 0.0346574]
    (grad,) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(grad, torch.tensor([[-0.1 * LN2 / 2, 0.1 * LN2 / 2]], dtype=F64))
    # plain k3 gradient: beta * (1 - exp(ref - logp)) / T = [0.1 * (1 - 2) / 2, 0.1 * (1 - 0.5) / 2]
    loss, _ = grpo_loss(logps, None, adv, torch.ones(1, 2), beta=0.1, ref_logps=ref, bias_correction_kl=False)
    (grad,) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(grad, torch.tensor([[-0.05, 0.025]], dtype=F64))

    with pytest.raises(ValueError, match="needs ref_logps"):
        grpo_loss(logps, None, adv, torch.ones(1, 2), beta=0.1)


def _ragged_batch(seed=0, B=5, T=7, dtype=F64):
    """Odd shapes, ragged right-padded masks (one empty row); ratios within about e^+-0.3 of 1."""
    g = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(B, T, generator=g, dtype=dtype)
    logps = (old + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)).requires_grad_()
    ref = old + 0.2 * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, generator=g, dtype=dtype)
    lengths = torch.tensor([7, 3, 0, 5, 1])[:B]
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (B, T)
    return logps, old, adv, mask, ref


def _naive_loss(kind, logps, old, adv, mask, *, eps_low, eps_high, beta=0.0, ref=None, bias=True, L=None):
    """Scalar-loop reference: one token at a time, then the aggregation written out."""
    B, T = logps.shape
    per_seq, total, n_tokens = [], 0.0, 0
    for b in range(B):
        seq_sum, seq_len = 0.0, 0
        for t in range(T):
            if not mask[b, t]:
                continue
            r = torch.exp(logps[b, t] - old[b, t])
            r_clip = torch.clamp(r, 1 - eps_low, 1 + eps_high)
            loss_t = -torch.minimum(r * adv[b], r_clip * adv[b])
            if beta:
                d = ref[b, t] - logps[b, t]
                kl = torch.exp(d) - d - 1
                loss_t = loss_t + beta * (kl * r if bias else kl)
            seq_sum, seq_len = seq_sum + loss_t, seq_len + 1
        per_seq.append(seq_sum / max(seq_len, 1))
        total, n_tokens = total + seq_sum, n_tokens + seq_len
    if kind == "grpo":
        return sum(per_seq) / B
    if kind == "dapo":
        return total / n_tokens
    return total / (B * (L or T))


_EPS = {"grpo": (0.2, 0.2), "dapo": (0.2, 0.28), "dr_grpo": (0.2, 0.2)}


@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("kind", sorted(POLICY_LOSSES))
def test_losses_match_naive_reference_forward_and_grad(kind, beta):
    logps, old, adv, mask, ref = _ragged_batch()
    lo, hi = _EPS[kind]
    loss, stats = POLICY_LOSSES[kind](logps, old, adv, mask, beta=beta, ref_logps=ref)
    want = _naive_loss(kind, logps, old, adv, mask, eps_low=lo, eps_high=hi, beta=beta, ref=ref)
    torch.testing.assert_close(loss, want)
    (g,) = torch.autograd.grad(loss, logps)
    (g_ref,) = torch.autograd.grad(want, logps)
    torch.testing.assert_close(g, g_ref)
    assert g[mask == 0].abs().max() == 0  # padding gets no gradient
    assert ("kl" in stats) == (beta > 0)
    assert 0 < stats["clip_ratio/region_mean"] < 1  # the batch exercises both branches


@pytest.mark.parametrize("kind", sorted(POLICY_LOSSES))
def test_losses_gradcheck(kind):
    logps, old, adv, mask, ref = _ragged_batch(seed=1)
    fn = POLICY_LOSSES[kind]
    assert torch.autograd.gradcheck(
        lambda lp: fn(lp, old, adv, mask, beta=0.05, ref_logps=ref)[0], (logps,), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("kind", sorted(POLICY_LOSSES))
def test_on_policy_is_reinforce(kind):
    """old_logps=None: ratio 1, no clipping; the gradient is -A * (token weight) on real tokens."""
    logps, _, adv, mask, _ = _ragged_batch(seed=2)
    kw = {"max_completion_length": 9} if kind == "dr_grpo" else {}
    loss, stats = POLICY_LOSSES[kind](logps, None, adv, mask, **kw)
    (g,) = torch.autograd.grad(loss, logps)
    m = mask.to(F64)
    weight = {  # (B, T) weight of each token in the aggregate
        "grpo": m / m.sum(1, keepdim=True).clamp(min=1) / m.shape[0],
        "dapo": m / m.sum(),
        "dr_grpo": m / (m.shape[0] * 9),
    }[kind]
    torch.testing.assert_close(g, -adv[:, None] * weight)
    assert stats["clip_ratio/region_mean"] == 0.0


@pytest.mark.parametrize("kind", sorted(POLICY_LOSSES))
def test_extra_padding_changes_nothing(kind):
    logps, old, adv, mask, ref = _ragged_batch(seed=3)
    kw = {"max_completion_length": 12} if kind == "dr_grpo" else {}

    def pad(x, value):  # 3 more columns of junk, masked out
        return torch.cat([x, torch.full((x.shape[0], 3), value, dtype=x.dtype)], 1)

    a, _ = POLICY_LOSSES[kind](logps, old, adv, mask, beta=0.05, ref_logps=ref, **kw)
    b, _ = POLICY_LOSSES[kind](
        pad(logps, -9.0), pad(old, 0.0), adv, pad(mask, 0), beta=0.05, ref_logps=pad(ref, 4.0), **kw
    )
    torch.testing.assert_close(a, b)


def test_dapo_micro_batches_sum_to_full_batch():
    """Accumulation invariance: split B=5 into 2 + 3, normalize both by the window's token count, sum."""
    logps, old, adv, mask, _ = _ragged_batch(seed=4)
    full, _ = dapo_loss(logps, old, adv, mask)
    n = mask.sum()
    parts = [
        dapo_loss(logps[s], old[s], adv[s], mask[s], num_tokens=n)[0] for s in (slice(0, 2), slice(2, 5))
    ]
    torch.testing.assert_close(parts[0] + parts[1], full)


def test_loss_inputs_and_errors():
    logps, old, adv, mask, _ = _ragged_batch(seed=5)
    a, _ = grpo_loss(logps, old, adv, mask)
    b, _ = grpo_loss(logps, old, adv[:, None].expand(-1, 7), mask.bool())  # (B, T) advantages, bool mask
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"must both be \(B, T\)"):
        grpo_loss(logps, old, adv, mask[:, :3])
    with pytest.raises(ValueError, match="advantages has 4 rows"):
        dapo_loss(logps, old, adv[:4], mask)
    with pytest.raises(ValueError, match="shorter than"):
        dr_grpo_loss(logps, old, adv, mask, max_completion_length=5)
    empty, _ = dapo_loss(logps, old, adv, torch.zeros_like(mask))  # no tokens: 0, not NaN
    assert empty.item() == 0.0


# ------------------------------------------------------------------------------------ equivalence with TRL


def _trl_compute_loss(loss_type, logps, old, adv, mask, *, beta, ref, eps_low, eps_high, max_len):
    """Call TRL's own GRPOTrainer._compute_loss on a stub trainer (one process, no accumulation).

    The stub sets exactly the attributes _compute_loss reads (trl/trainer/grpo_trainer.py:3020-3295 in
    TRL 1.16) and replaces the model forward with the given per-token log-probs.
    """
    from trl import GRPOTrainer

    t = object.__new__(GRPOTrainer)
    t.loss_type, t.beta, t.max_completion_length = loss_type, beta, max_len
    t.epsilon_low, t.epsilon_high = eps_low, eps_high
    t.importance_sampling_level, t.top_entropy_quantile, t.off_policy_mask_threshold = "token", 1.0, None
    t.aux_loss_enabled, t._entropy_bonus_enabled = False, False
    t.use_vllm, t.vllm_importance_sampling_correction = False, False
    t.args = types.SimpleNamespace(use_bias_correction_kl=True, delta=None, steps_per_generation=1)
    t.model = types.SimpleNamespace(training=True)
    t.current_gradient_accumulation_steps = 1
    t.accelerator = types.SimpleNamespace(
        num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction: x
    )
    t._metrics = {"train": collections.defaultdict(list)}
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    B, T = logps.shape
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "num_items_in_batch": mask.sum(),
    }
    if old is not None:
        inputs["old_per_token_logps"] = old
    if beta:
        inputs["ref_per_token_logps"] = ref
    loss = t._compute_loss(None, inputs)
    return loss, {k: v[0] for k, v in t._metrics["train"].items()}


@pytest.mark.parametrize("on_policy", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("kind", sorted(POLICY_LOSSES))
def test_losses_match_trl(kind, beta, on_policy):
    pytest.importorskip("trl")
    logps, old, adv, mask, ref = _ragged_batch(seed=6)
    old = None if on_policy else old
    lo, hi = _EPS[kind]
    ours, stats = POLICY_LOSSES[kind](logps, old, adv, mask, beta=beta, ref_logps=ref)
    theirs, metrics = _trl_compute_loss(
        kind, logps, old, adv, mask, beta=beta, ref=ref, eps_low=lo, eps_high=hi, max_len=logps.shape[1]
    )
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, logps)[0], torch.autograd.grad(theirs, logps)[0])
    for key, value in stats.items():
        assert value == pytest.approx(metrics[key]), key
