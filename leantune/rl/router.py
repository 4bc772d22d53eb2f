"""Difficulty routing: a probe on the prompt's hidden state predicts P(correct); each prompt gets its group size.

Predictive routing (arXiv 2511.03808) trains small probes on a middle layer's hidden state of a problem to
predict whether a model will solve it. leantune uses the same idea to decide how many rollouts a prompt is
worth, before decoding any of them:

- the feature is the hidden state of the prompt's last token after layer `rl.router.layer`, taken from the
  prefill the rollout runs anyway (`sample_groups(..., route=...)`: a forward hook on that layer during the
  prefill only; no second forward);
- the probe is L2-regularised logistic regression on standardised features, refitted after every sampling
  round by Newton's method (IRLS, from zero) on a bounded buffer of the latest prompts' outcomes: each prompt's
  group contributes k correct out of n samples, i.e. n Bernoulli observations (`fit_logistic`);
- a prompt predicted solved (p >= `skip_solved`) or hopeless (p <= `skip_hopeless`) gets 0 samples (a
  fraction `explore` of them still gets `min_group_size`, seeded, so the probe keeps seeing both ends); the
  others share (their count) x `rl.group_size` samples in proportion to the Bernoulli variance p (1 - p),
  each within [`min_group_size`, `max_group_size`] (`allocate_group_sizes`): the average group stays
  `rl.group_size`, the skipped prompts' rollouts are the saving.

The probe's calibration is measured on each round's fresh outcomes *before* it is refitted on them (Brier
score, per completion), so the number is an honest out-of-sample one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def fit_logistic(x: torch.Tensor, k: torch.Tensor, n: torch.Tensor, *, l2: float, steps: int = 25,
                 init: torch.Tensor | None = None, tol: float = 1e-8) -> torch.Tensor:
    """Binomial logistic regression by Newton's method: weights (D + 1,), bias last.

    Minimises  (1 / sum n) * sum_i [ -k_i log p_i - (n_i - k_i) log(1 - p_i) ]  +  (l2 / 2) |w|^2
    with p_i = sigmoid(x_i . w + b); the bias is not penalised. x (N, D) float, k (N,) successes,
    n (N,) trials (k_i of n_i samples of prompt i were correct). Strictly convex for l2 > 0, so Newton
    converges from any start (``init``: warm start). fp64 throughout: the (D+1, D+1) solve is the cost.
    """
    if x.dim() != 2 or k.shape != x.shape[:1] or n.shape != x.shape[:1]:
        raise ValueError(f"fit_logistic: need x (N, D), k (N,), n (N,); got {tuple(x.shape)}, {tuple(k.shape)}, {tuple(n.shape)}")
    if l2 <= 0:
        raise ValueError(f"fit_logistic: l2 must be > 0 (the fit is unbounded on separable data), got {l2}")
    xb = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)  # (N, D+1)
    k, n = k.double(), n.double()
    total = n.sum().clamp(min=1.0)
    reg = torch.full((xb.shape[1],), l2, dtype=torch.float64)
    reg[-1] = 0.0  # (D+1,), no penalty on the bias
    w = torch.zeros(xb.shape[1], dtype=torch.float64) if init is None else init.double().clone()
    for _ in range(steps):
        p = torch.sigmoid(xb @ w)  # (N,)
        grad = xb.T @ (n * p - k) / total + reg * w  # (D+1,)
        hess = (xb.T * (n * p * (1 - p) / total)) @ xb + torch.diag(reg) + 1e-10 * torch.eye(len(w), dtype=torch.float64)
        delta = torch.linalg.solve(hess, grad)
        w = w - delta
        if float(delta.abs().max()) < tol:
            break
    return w


def allocate_group_sizes(p: Sequence[float], *, group_size: int, min_size: int, max_size: int,
                         skip_solved: float, skip_hopeless: float, explore: Sequence[bool] | None = None) -> list[int]:
    """Samples per prompt from predicted success probabilities p: 0 for the skipped, the rest by p (1 - p).

    A prompt with p >= skip_solved or p <= skip_hopeless is skipped (0), unless its ``explore`` flag is set
    (then ``min_size``). The m remaining prompts share m * group_size samples in proportion to p (1 - p),
    each clamped to [min_size, max_size]: x_i = clamp(lam * p_i (1 - p_i), min, max) with lam chosen so the
    x_i sum to the budget (bisection), then rounded by largest remainder so the integers sum to it exactly.

    >>> allocate_group_sizes([0.5, 0.5, 0.99, 0.01], group_size=4, min_size=2, max_size=8, skip_solved=0.95, skip_hopeless=0.05)
    [4, 4, 0, 0]
    >>> allocate_group_sizes([0.5, 0.2, 0.1], group_size=4, min_size=2, max_size=8, skip_solved=0.95, skip_hopeless=0.05)
    [6, 4, 2]
    """
    if not 1 <= min_size <= group_size <= max_size:
        raise ValueError(f"need 1 <= min_size <= group_size <= max_size, got {min_size}, {group_size}, {max_size}")
    explore = list(explore) if explore is not None else [False] * len(p)
    sizes = [0] * len(p)
    live = [i for i, q in enumerate(p) if skip_hopeless < q < skip_solved]
    for i, q in enumerate(p):
        if i not in live and explore[i]:
            sizes[i] = min_size
    if not live:
        return sizes
    budget = len(live) * group_size
    var = [max(p[i] * (1 - p[i]), 1e-12) for i in live]

    def total(lam: float) -> float:
        return sum(min(max(lam * v, min_size), max_size) for v in var)

    lo, hi = 0.0, max_size / min(var)  # total(lo) = m * min <= budget <= m * max = total(hi)
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) < budget else (lo, mid)
    x = [min(max(hi * v, min_size), max_size) for v in var]
    base = [math.floor(v + 1e-9) for v in x]
    left = budget - sum(base)
    order = sorted(range(len(x)), key=lambda j: (-(x[j] - base[j]), j))
    for j in order:
        if left <= 0:
            break
        if base[j] < max_size:
            base[j] += 1
            left -= 1
    for j, i in enumerate(live):
        sizes[i] = base[j]
    return sizes


def brier_score(p: Sequence[float], k: Sequence[int], n: Sequence[int]) -> float:
    """Mean squared error of p against each of the sum(n) Bernoulli outcomes (k_i ones, n_i - k_i zeros).

    >>> brier_score([0.5, 1.0], [1, 2], [2, 2])
    0.125
    """
    num = sum(ki * (1 - pi) ** 2 + (ni - ki) * pi ** 2 for pi, ki, ni in zip(p, k, n))
    return num / max(1, sum(n))


def explore_flags(seeds: Sequence[int], fraction: float) -> list[bool]:
    """One seeded coin per prompt, from its rollout seed (no generator state): True with prob. ``fraction``."""
    return [((int(s) * 0x9E3779B97F4A7C15) % (1 << 64)) / float(1 << 64) < fraction for s in seeds]


@dataclass
class RouterRound:
    """What the router did in one sampling round (the metrics and the ledger add these up)."""

    prompts: int = 0
    skipped: int = 0
    rollouts: int = 0
    fixed_rollouts: int = 0  # what rl.group_size per prompt would have cost
    brier_sum: float = 0.0  # sum over completions of (p - outcome)^2, fresh outcomes, before the refit
    brier_n: int = 0


class DifficultyRouter:
    """The online probe and the allocation rule; state is plain data (checkpointed)."""

    def __init__(self, cfg, group_size: int):
        self.cfg, self.group_size = cfg, group_size
        self.feats: list[list[float]] = []  # buffer: one row per observed prompt, newest last
        self.k: list[int] = []
        self.n: list[int] = []
        self.seen = 0  # prompts observed so far
        self.w: torch.Tensor | None = None  # (D + 1,) on standardised features
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.skip_rate = 0.0  # skipped share of the latest routed round

    @property
    def active(self) -> bool:
        """Warm: enough prompts seen, and the buffer holds both successes and failures (a probe fitted on one
        outcome only would extrapolate it to every prompt and skip them all)."""
        both = 0 < sum(self.k) < sum(self.n)
        return self.w is not None and self.seen >= self.cfg.warmup_prompts and both

    def predict(self, feats: torch.Tensor) -> list[float]:
        """P(correct) per row of feats (n, D); 0.5 before the first fit."""
        if self.w is None:
            return [0.5] * len(feats)
        z = (feats.double() - self.mean) / self.std
        return torch.sigmoid(z @ self.w[:-1] + self.w[-1]).tolist()

    def route(self, feats: torch.Tensor, seeds: Sequence[int]) -> list[int]:
        """Group size per prompt from its features (n, D); rl.group_size each until the probe is warm."""
        p = self.predict(feats)
        if not self.active:
            return [self.group_size] * len(p)
        c = self.cfg
        return allocate_group_sizes(p, group_size=self.group_size, min_size=c.min_group_size,
                                    max_size=c.max_group_size, skip_solved=c.skip_solved,
                                    skip_hopeless=c.skip_hopeless, explore=explore_flags(seeds, c.explore))

    def note_round(self, sizes: Sequence[int]) -> None:
        """Record a routed round's group sizes, over *all* its prompts (under torchrun each rank routes only its
        chunk): the next round's over-draw follows its skip rate, the same on every rank."""
        self.skip_rate = sum(n == 0 for n in sizes) / max(1, len(sizes))

    def draw_factor(self) -> float:
        """How many more candidates to draw per wanted group, given the latest skip rate (at most 4x)."""
        return 1.0 / max(0.25, 1.0 - self.skip_rate) if self.active else 1.0

    def observe(self, feats: torch.Tensor, k: Sequence[int], n: Sequence[int]) -> tuple[float, int]:
        """Score the latest predictions on these outcomes (Brier sum, completions), then refit the probe.
        feats (m, D) of the sampled prompts (n_i > 0), k_i correct of n_i."""
        p = self.predict(feats)
        brier = brier_score(p, k, n) * sum(n)
        self.feats += feats.double().tolist()
        self.k += [int(v) for v in k]
        self.n += [int(v) for v in n]
        cut = max(0, len(self.k) - self.cfg.buffer)
        del self.feats[:cut], self.k[:cut], self.n[:cut]
        self.seen += len(k)
        self._fit()
        return brier, sum(n)

    def _fit(self) -> None:
        x = torch.tensor(self.feats, dtype=torch.float64)  # (N, D)
        self.mean, self.std = x.mean(0), x.std(0, correction=0).clamp(min=1e-6)
        z = (x - self.mean) / self.std
        # from zero, not warm-started: the probe is a function of the buffer alone, so a resumed run refits
        # exactly the probe the interrupted one had
        self.w = fit_logistic(z, torch.tensor(self.k), torch.tensor(self.n), l2=self.cfg.l2, steps=self.cfg.newton_steps)

    def state_dict(self) -> dict:
        return {"feats": self.feats, "k": self.k, "n": self.n, "seen": self.seen, "skip_rate": self.skip_rate}

    def load_state_dict(self, state: dict) -> None:
        self.feats, self.k, self.n, self.seen = [list(r) for r in state["feats"]], list(state["k"]), list(state["n"]), int(state["seen"])
        self.skip_rate = float(state.get("skip_rate", 0.0))  # checkpoints from before it was saved: no over-draw
        self.w = None
        if self.k:
            self._fit()  # a function of the buffer: the refit gives the saved probe back
