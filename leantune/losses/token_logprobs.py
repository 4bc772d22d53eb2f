"""Per-token log-probabilities through the LM head, chunked, without [N, V] logits.

RL losses (GRPO / DAPO / Dr.GRPO) need log pi(y_t | y_<t) of each completion token, not a summed
cross-entropy: the importance ratio and its clip act per token. `linear_token_logprobs` computes

    logp_i = (h_i W^T / tau)[y_i] - logsumexp(h_i W^T / tau)        (nats)

for K selected rows in chunks of `chunk_size`, without [K, V] logits. It is `linear_cross_entropy`
(leantune.losses.linear_cross_entropy) with a per-row output: d logp_i / d logits_i = onehot(y_i) - softmax_i,
scaled by the incoming gradient g_i. The per-token entropy of the same distribution comes out as a
by-product (no gradient), for the metrics.

Two backward strategies, chosen by what needs a gradient:

- frozen LM head (LoRA, the usual RL case), hidden needs a gradient: the forward also computes each row's
  Jacobian d logp_i / d h_i = (W[y_i] - softmax_i @ W) / tau, a (K, H) tensor, and backward only scales it
  by g_i. Two vocab-sized matmuls per chunk (h @ W^T, softmax @ W) instead of three (forward, recompute,
  dz @ W): the update's LM head costs a third less. Exact: the same terms, in a different order.
- trainable LM head: forward keeps one logsumexp per row; backward recomputes each chunk's softmax for
  both d h and d W.

tau is the sampling temperature: the policy that generated the tokens is softmax(logits / tau), so the
ratio is taken under the same distribution (TRL divides the logits by the temperature too).
"""

from __future__ import annotations

import torch

from leantune.losses.linear_cross_entropy import _compute_dtype


class LinearTokenLogprobs(torch.autograd.Function):
    """hidden (K, H), weight (V, H), targets (K,) long -> (logps (K,), entropy (K,)), fp32 (fp64 for fp64)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, temperature, jacobian=False):
        dtype = _compute_dtype(hidden, weight)
        w = weight.to(dtype)  # (V, H)
        k = hidden.shape[0]
        logps = torch.empty(k, dtype=dtype, device=hidden.device)  # (K,)
        entropy = torch.empty(k, dtype=dtype, device=hidden.device)  # (K,)
        lse = torch.empty(k, dtype=dtype, device=hidden.device)  # (K,)
        # jacobian (frozen head, hidden needs a gradient): the Jacobian now (K x H), nothing vocab-sized later
        jac = torch.empty((k, hidden.shape[1]), dtype=dtype, device=hidden.device) if jacobian else None  # (K, H)
        for start in range(0, k, chunk_size):
            stop = min(start + chunk_size, k)
            logits = (hidden[start:stop].to(dtype) @ w.T) / temperature  # (C, V), the only vocab-sized tensor
            lse_c = torch.logsumexp(logits, dim=-1)  # (C,)
            logp_all = logits - lse_c[:, None]  # (C, V), in place of logits
            del logits
            y = targets[start:stop]  # (C,)
            logps[start:stop] = logp_all.gather(1, y[:, None]).squeeze(1)
            probs = logp_all.exp()  # (C, V)
            entropy[start:stop] = -(probs * logp_all).sum(-1)
            del logp_all
            if jacobian:  # d logp / d h = (W[y] - softmax @ W) / tau
                jac[start:stop] = (w[y] - probs @ w) / temperature  # (C, H)
            del probs
            lse[start:stop] = lse_c
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        if jacobian:
            ctx.save_for_backward(jac)
        else:
            ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.jacobian, ctx.hidden_dtype = jacobian, hidden.dtype
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, grad_entropy):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w) or grad_logps is None:
            return None, None, None, None, None, None
        if ctx.jacobian:
            (jac,) = ctx.saved_tensors  # (K, H)
            return (grad_logps.to(jac.dtype)[:, None] * jac).to(ctx.hidden_dtype), None, None, None, None, None
        hidden, weight, targets, lse = ctx.saved_tensors
        dtype = lse.dtype
        w = weight.to(dtype)
        tau = ctx.temperature
        g = grad_logps.to(dtype)  # (K,)
        grad_h = torch.empty_like(hidden) if need_h else None  # (K, H)
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None  # (V, H)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = min(start + ctx.chunk_size, hidden.shape[0])
            h = hidden[start:stop].to(dtype)  # (C, H)
            # d logp / d z = onehot - softmax, z = h W^T / tau; times g_i and 1/tau for d z / d(h W^T)
            dz = torch.exp((h @ w.T) / tau - lse[start:stop, None])  # (C, V) softmax, recomputed
            dz.neg_()
            dz[torch.arange(stop - start, device=dz.device), targets[start:stop]] += 1.0
            dz *= (g[start:stop] / tau)[:, None]
            if need_h:
                grad_h[start:stop] = (dz @ w).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(dz.T, h)
            del dz
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(hidden @ weight.T / temperature)[targets] and the entropy of that softmax, per row.

    Args:
        hidden: (K, H) final hidden states of the rows whose next token is scored.
        weight: (V, H) the LM-head weight (no bias).
        targets: (K,) long token ids in [0, V).
        chunk_size: rows of logits materialised at once (forward: one (C, V) fp32 tensor).
        temperature: divides the logits (the sampling temperature).

    Returns:
        (logps (K,), entropy (K,)) in fp32 (fp64 if an input is fp64); only logps carries a gradient.

    >>> g = torch.Generator().manual_seed(0)
    >>> h = torch.randn(5, 8, generator=g, requires_grad=True)
    >>> w = torch.randn(11, 8, generator=g)
    >>> y = torch.tensor([1, 0, 10, 3, 3])
    >>> logps, ent = linear_token_logprobs(h, w, y, chunk_size=2, temperature=0.7)
    >>> ref = torch.log_softmax(h @ w.T / 0.7, -1).gather(1, y[:, None]).squeeze(1)
    >>> torch.allclose(logps, ref, atol=1e-6)
    True
    """
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"linear_token_logprobs: chunk_size must be a positive int, got {chunk_size!r}")
    if temperature <= 0:
        raise ValueError(f"linear_token_logprobs: temperature must be > 0, got {temperature}")
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"linear_token_logprobs: need hidden (K, H) and weight (V, H), got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_token_logprobs: targets must be (K,) = ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if hidden.shape[0] == 0:
        dtype = _compute_dtype(hidden, weight)
        empty = hidden.sum(-1).to(dtype) + weight[:0].sum().to(dtype)  # (0,), still in the graph
        return empty, empty.detach().clone()
    # under no_grad (reference / old-policy logps) neither strategy keeps anything for backward
    jacobian = torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
    return LinearTokenLogprobs.apply(hidden, weight, targets.long(), chunk_size, float(temperature), jacobian)
