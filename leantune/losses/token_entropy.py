"""Per-token log-prob, entropy and logit-gradient norm through the LM head, chunked, all with gradients.

An entropy-aware policy term (leantune.rl.losses.entropy_gradient_correlation, after arXiv 2605.17770) needs,
at each completion token, two functions of the *whole* next-token distribution pi = softmax(z), z = h W^T / tau:

    H   = -sum_v pi_v log pi_v                       (entropy, nats)
    |g| = |d log pi_y / d z|_2 = |onehot(y) - pi|_2 = sqrt(1 - 2 pi_y + sum_v pi_v^2)

`linear_token_stats` returns log pi_y, H and S = sum_v pi_v^2 per row, each differentiable, without [K, V]
logits: the forward runs `chunk_size` rows at a time and keeps one logsumexp per row; the backward recomputes
each chunk's softmax and applies

    d log pi_y / d z = onehot(y) - pi
    d H / d z_v      = -pi_v (log pi_v + H)
    d S / d z_v      = 2 pi_v (pi_v - S)

weighted by the three incoming gradients, then d z / d h = W / tau and d z / d W = h / tau. Three vocab-sized
matmuls per chunk (forward, recompute, d z @ W), as `linear_cross_entropy`.
"""

from __future__ import annotations

import torch

from leantune.losses.linear_cross_entropy import _compute_dtype


class LinearTokenStats(torch.autograd.Function):
    """hidden (K, H), weight (V, H), targets (K,) -> (logps, entropy, sum of squared probs), each (K,)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, temperature):
        dtype = _compute_dtype(hidden, weight)
        w = weight.to(dtype)  # (V, H)
        k = hidden.shape[0]
        logps, entropy, sumsq, lse = (torch.empty(k, dtype=dtype, device=hidden.device) for _ in range(4))  # (K,)
        for start in range(0, k, chunk_size):
            stop = min(start + chunk_size, k)
            logits = (hidden[start:stop].to(dtype) @ w.T) / temperature  # (C, V)
            lse_c = torch.logsumexp(logits, dim=-1)  # (C,)
            logp_all = logits - lse_c[:, None]  # (C, V)
            del logits
            probs = logp_all.exp()  # (C, V)
            logps[start:stop] = logp_all.gather(1, targets[start:stop, None]).squeeze(1)
            entropy[start:stop] = -(probs * logp_all).sum(-1)
            sumsq[start:stop] = (probs * probs).sum(-1)
            lse[start:stop] = lse_c
            del logp_all, probs
        ctx.save_for_backward(hidden, weight, targets, lse, entropy, sumsq)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return logps, entropy, sumsq

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_ent, g_sq):
        hidden, weight, targets, lse, entropy, sumsq = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return None, None, None, None, None
        dtype, tau = lse.dtype, ctx.temperature
        w = weight.to(dtype)
        zeros = torch.zeros_like(lse)
        g_logp, g_ent, g_sq = (zeros if g is None else g.to(dtype) for g in (g_logp, g_ent, g_sq))  # (K,)
        grad_h = torch.empty_like(hidden) if need_h else None  # (K, H)
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None  # (V, H)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = min(start + ctx.chunk_size, hidden.shape[0])
            sl = slice(start, stop)
            h = hidden[sl].to(dtype)  # (C, H)
            logp_all = (h @ w.T) / tau - lse[sl, None]  # (C, V)
            probs = logp_all.exp()  # (C, V)
            # dz = g_logp (onehot - pi) - g_ent pi (log pi + H) + 2 g_sq pi (pi - S), per row
            dz = probs * (-g_logp[sl, None] - g_ent[sl, None] * (logp_all + entropy[sl, None])
                          + 2 * g_sq[sl, None] * (probs - sumsq[sl, None]))  # (C, V)
            del logp_all, probs
            dz[torch.arange(stop - start, device=dz.device), targets[sl]] += g_logp[sl]
            dz /= tau
            if need_h:
                grad_h[sl] = (dz @ w).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(dz.T, h)
            del dz
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def linear_token_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk_size: int = 1024,
                       temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log pi_y, entropy H, sum_v pi_v^2) per row of pi = softmax(hidden @ weight.T / temperature), all (K,),
    fp32 (fp64 for fp64 inputs), all differentiable; at most one (chunk_size, V) block of logits at a time.

    >>> g = torch.Generator().manual_seed(0)
    >>> h, w, y = torch.randn(5, 8, generator=g), torch.randn(11, 8, generator=g), torch.tensor([1, 0, 10, 3, 3])
    >>> lp, ent, sq = linear_token_stats(h, w, y, chunk_size=2, temperature=0.7)
    >>> ref = torch.log_softmax(h @ w.T / 0.7, -1)
    >>> bool(torch.allclose(ent, -(ref.exp() * ref).sum(-1), atol=1e-5)), bool(torch.allclose(sq, ref.exp().pow(2).sum(-1), atol=1e-6))
    (True, True)
    """
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"linear_token_stats: chunk_size must be a positive int, got {chunk_size!r}")
    if temperature <= 0:
        raise ValueError(f"linear_token_stats: temperature must be > 0, got {temperature}")
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_token_stats: need hidden (K, H), weight (V, H), targets (K,); got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if hidden.shape[0] == 0:
        dtype = _compute_dtype(hidden, weight)
        empty = hidden.sum(-1).to(dtype) + weight[:0].sum().to(dtype)  # (0,), still in the graph
        return empty, empty.clone(), empty.clone()
    return LinearTokenStats.apply(hidden, weight, targets.long(), chunk_size, float(temperature))


def logit_grad_norm(logps: torch.Tensor, sumsq: torch.Tensor) -> torch.Tensor:
    """|onehot(y) - pi|_2 = sqrt(1 - 2 pi_y + sum pi^2) from log pi_y and sum pi^2, any shape; the norm of the
    gradient of log pi_y with respect to the (temperature-scaled) logits. Clamped at 1e-12 under the root."""
    return (1.0 - 2.0 * logps.exp() + sumsq).clamp(min=1e-12).sqrt()
