"""A Bradley–Terry reward head with a Laplace-approximated posterior, and dueling Thompson sampling over a pool
of response pairs: the selection math of active preference labelling (arXiv 2511.04286), as pure functions.

The model. Each response has a feature vector phi (H,) (the policy's hidden state, `leantune.active.pairs`); the
reward head is linear, r(y) = w . phi(y), and the Bradley–Terry likelihood of "a preferred to b" is
sigmoid(w . (phi(a) - phi(b))). A labelled pair enters as its *winner-minus-loser* difference x = phi(win) -
phi(lose), so every label is 1 and the log-likelihood is sum_i log sigmoid(w . x_i). The head's bias cancels in
differences and is not modelled.

The posterior. Prior w ~ N(0, I / lambda) (``prior_precision`` lambda). The MAP w* minimizes

    L(w) = -sum_i log sigmoid(x_i . w) + lambda/2 |w|^2

(convex), found by damped Newton steps (IRLS); the Laplace approximation is N(w*, H^-1) with the Hessian at the
MAP, H = X^T diag(p_i (1 - p_i)) X + lambda I, p_i = sigmoid(x_i . w*) (`laplace_posterior`), kept in
Woodbury form (n labelled pairs << D dimensions: no D x D factorization). Only this last
layer is Bayesian: the features are fixed while the head is fitted (a last-layer Laplace approximation).

The acquisition: dueling Thompson sampling on a fixed pool of pairs (`dueling_thompson_select`). For each slot
of a batch, two heads w1, w2 are drawn from the posterior (two "duellists"); each predicts, for every unlabelled
pair with difference d = phi(a) - phi(b), the probability that a wins, sigmoid(w . d). The pair picked is the one
on which the two draws disagree most, |sigmoid(w1 . d) - sigmoid(w2 . d)|, mixed with the posterior's own
spread of that probability when ``alpha`` < 1 (see `dueling_scores`). Pairs whose outcome the posterior already
knows (a large |mu . d| with little variance), and pairs whose responses have (nearly) the same features, score
near 0 under every draw, so labels go to the pairs the head is unsure about. Each slot draws afresh; the
posterior is refitted between rounds, not within one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LaplacePosterior:
    """N(mean, H^-1) over the head's weights, H = lambda I + Z^T Z with Z = diag(sqrt(p (1 - p))) X at the MAP.

    Kept in Woodbury form: with n labelled pairs and D feature dimensions (n is the label budget, D the hidden
    size, n << D usually) every operation is O(n^2 D + n^3), never a D x D factorization:
    H^-1 v = (v - Z^T K^-1 Z v) / lambda with K = lambda I_n + Z Z^T (n, n), Cholesky ``k_chol``.
    ``precision`` and ``covariance`` build the D x D matrices, for tests and small D.
    """

    mean: torch.Tensor  # (D,)
    z: torch.Tensor  # (n, D)
    prior_precision: float
    k_chol: torch.Tensor  # (n, n), lower: K = L L^T
    newton_steps: int  # steps taken to converge

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """H^-1 v for v (D, k) -> (D, k)."""
        return _woodbury_solve(self.z, self.prior_precision, self.k_chol, v)

    def quad(self, d: torch.Tensor) -> torch.Tensor:
        """(N,) d_i^T H^-1 d_i for rows d (N, D) = (|d|^2 - |L^-1 Z d|^2) / lambda."""
        u = torch.linalg.solve_triangular(self.k_chol, self.z @ d.T, upper=False)  # (n, N)
        return (d.square().sum(1) - u.square().sum(0)) / self.prior_precision

    @property
    def precision(self) -> torch.Tensor:
        """H, (D, D)."""
        eye = torch.eye(self.mean.numel(), dtype=self.mean.dtype)
        return self.prior_precision * eye + self.z.T @ self.z

    @property
    def covariance(self) -> torch.Tensor:
        """H^-1, (D, D)."""
        return self.solve(torch.eye(self.mean.numel(), dtype=self.mean.dtype))


def _woodbury_solve(z: torch.Tensor, lam: float, k_chol: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(lambda I + Z^T Z)^-1 v = (v - Z^T (lambda I + Z Z^T)^-1 Z v) / lambda; z (n, D), v (D, k)."""
    return (v - z.T @ torch.cholesky_solve(z @ v, k_chol)) / lam


def _k_chol(z: torch.Tensor, lam: float) -> torch.Tensor:
    """Cholesky factor of K = lambda I_n + Z Z^T, (n, n)."""
    return torch.linalg.cholesky(lam * torch.eye(z.shape[0], dtype=z.dtype) + z @ z.T)


def bt_objective(w: torch.Tensor, x: torch.Tensor, prior_precision: float) -> torch.Tensor:
    """L(w) = -sum log sigmoid(x w) + lambda/2 |w|^2, a scalar. w (D,), x (N, D) winner-minus-loser differences."""
    return -F.logsigmoid(x @ w).sum() + 0.5 * prior_precision * (w @ w)


def bt_gradient_hessian(w: torch.Tensor, x: torch.Tensor, prior_precision: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient (D,), Z (N, D)) of `bt_objective` at w, in closed form: g = -X^T (1 - p) + lambda w and the
    Hessian H = lambda I + Z^T Z with Z = diag(sqrt(p (1 - p))) X, p = sigmoid(X w) (N,)."""
    p = torch.sigmoid(x @ w)  # (N,)
    grad = -x.T @ (1 - p) + prior_precision * w  # (D,)
    return grad, x * (p * (1 - p)).sqrt()[:, None]


def laplace_posterior(x: torch.Tensor, prior_precision: float, *, max_steps: int = 50, tol: float = 1e-16
                      ) -> LaplacePosterior:
    """The Laplace posterior of the BT head given labelled differences x (N, D) (N may be 0: the prior).

    Newton's method (Woodbury solves) with step halving until the objective does not increase (it is convex,
    so this converges); stops when the Newton decrement g^T H^-1 g / 2 falls under ``tol``. Float64.
    """
    if prior_precision <= 0:
        raise ValueError(f"prior_precision must be > 0, got {prior_precision}")
    x = x.to(torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64)
    steps = 0
    for steps in range(1, max_steps + 1):
        grad, z = bt_gradient_hessian(w, x, prior_precision)
        delta = _woodbury_solve(z, prior_precision, _k_chol(z, prior_precision), grad[:, None])[:, 0]  # H^-1 g
        if float(grad @ delta) / 2 < tol:
            break
        f0, t = bt_objective(w, x, prior_precision), 1.0
        while t > 1e-10 and bt_objective(w - t * delta, x, prior_precision) > f0:
            t /= 2
        w = w - t * delta
    _, z = bt_gradient_hessian(w, x, prior_precision)
    return LaplacePosterior(w, z, prior_precision, _k_chol(z, prior_precision), steps)


def sample_heads(post: LaplacePosterior, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k draws (k, D) from N(mean, H^-1): u = sqrt(lambda) e1 + Z^T e2 ~ N(0, H) with e1 (D,), e2 (n,) standard
    normal, so H^-1 u ~ N(0, H^-1 H H^-1) = N(0, H^-1)."""
    d, n = post.mean.numel(), post.z.shape[0]
    e1 = torch.randn(d, k, dtype=post.mean.dtype, generator=generator)
    e2 = torch.randn(n, k, dtype=post.mean.dtype, generator=generator)
    u = post.prior_precision ** 0.5 * e1 + post.z.T @ e2  # (D, k)
    return post.mean[None] + post.solve(u).T


def preference_spread(post: LaplacePosterior, d: torch.Tensor) -> torch.Tensor:
    """(N,) the delta-method standard deviation of P(a preferred to b) = sigmoid(w . d) under the posterior,
    sigmoid'(mu . d) sqrt(d^T H^-1 d), for pool differences d (N, D)."""
    d = d.to(post.mean.dtype)
    p = torch.sigmoid(d @ post.mean)  # (N,)
    return p * (1 - p) * post.quad(d).clamp_min(0).sqrt()


def dueling_scores(d: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, spread: torch.Tensor | None = None,
                   alpha: float = 1.0) -> torch.Tensor:
    """(N, K) scores of N pool pairs (differences d (N, D)) under K slots of two posterior draws w1, w2 (K, D):

        alpha |sigmoid(d w1) - sigmoid(d w2)| + (1 - alpha) spread

    the two duellists' disagreement on which response wins, and (alpha < 1) the posterior spread of that
    probability (`preference_spread`, (N,)). alpha = 1: pure dueling Thompson sampling."""
    d = d.to(w1.dtype)
    disagree = (torch.sigmoid(d @ w1.T) - torch.sigmoid(d @ w2.T)).abs()  # (N, K)
    if alpha >= 1.0 or spread is None:
        return disagree
    return alpha * disagree + (1 - alpha) * spread.to(disagree)[:, None]


def dueling_thompson_select(post: LaplacePosterior, d: torch.Tensor, k: int, *, alpha: float = 1.0,
                            generator: torch.Generator | None = None) -> list[int]:
    """Indices (k distinct, k <= N) of pool pairs to label next: slot j draws its own (w1, w2) and takes the
    highest-scoring pair (`dueling_scores`) not taken by an earlier slot. d: (N, D) unlabelled differences."""
    n = d.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"cannot pick {k} of {n} pairs")
    w1, w2 = sample_heads(post, k, generator), sample_heads(post, k, generator)  # (k, D) each
    spread = preference_spread(post, d) if alpha < 1.0 else None
    scores = dueling_scores(d, w1, w2, spread, alpha)  # (N, k)
    taken: list[int] = []
    for j in range(k):
        col = scores[:, j].clone()
        col[taken] = -1.0
        taken.append(int(col.argmax()))
    return taken


def feature_scale(features: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(H,) per-dimension standard deviation of response features (..., H) over every leading index (the pool's
    responses), float64: dividing by it makes the prior precision mean the same for any model's hidden size and
    scale. Centering is left out: it cancels in a - b differences."""
    flat = features.reshape(-1, features.shape[-1]).to(torch.float64)
    return flat.std(0, unbiased=False) + eps


def bt_accuracy(w: torch.Tensor, x: torch.Tensor) -> float:
    """Fraction of winner-minus-loser differences x (N, D) that the head w (D,) ranks right (x . w > 0)."""
    return float(((x.to(w.dtype) @ w) > 0).double().mean()) if x.shape[0] else float("nan")
