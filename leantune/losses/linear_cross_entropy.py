"""Chunked, masked linear cross-entropy: the LM-head matmul fused with the loss, without [N, V] logits.

For a causal LM the final projection `hidden @ lm_head.T` produces N x V logits (N tokens, V ~ 50k-250k
vocabulary), which in fp32 is often the single largest tensor of a fine-tuning step -- and autograd keeps
it alive (plus the softmax) until backward. `linear_cross_entropy` computes the same loss in chunks of
`chunk_size` rows, stores only its inputs, and recomputes each chunk's logits in backward, so the full
logits never exist. Positions that do not count (label == ignore_index, or per-token weight == 0) are
dropped *before* any LM-head work ("logits masking", arXiv 2606.19528): prompt tokens and padding cost
neither memory nor FLOPs.

Related work: Cut Cross-Entropy (Wijmans et al., arXiv 2411.09009) goes further with a Triton kernel that
never materialises even a chunk of logits in global memory; Liger-Kernel's fused linear cross-entropy
(linkedin/Liger-Kernel) is the same chunk-and-recompute idea, computing gradients in the forward pass.
This is the plain-PyTorch version: it runs on CPU and any GPU, and is tested against `F.cross_entropy`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from leantune.quant.weight_only import QuantizedWeight

_REDUCTIONS = ("mean", "sum")


def _compute_dtype(*tensors) -> torch.dtype:
    # fp32 for fp32/bf16/fp16 inputs (the logits of a bf16 model need fp32 for a stable logsumexp);
    # fp64 only when an input is already fp64 (gradcheck, references). A quantized weight is fp32 math.
    return torch.float64 if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tensors) else torch.float32


# A weight stored narrower than the compute dtype (a bf16 lm_head, fp32 math) is converted this many
# bytes at a time rather than copied whole: a full fp32 copy is V x H x 4 bytes (113 MB for
# SmolLM2-135M, an eighth of a bf16 inference step's peak RSS; 1 GiB for a 128k x 2048 head).
_CAST_BLOCK_BYTES = 16 << 20


def _cast_rows(weight, dtype: torch.dtype) -> int:
    """Rows of ``weight`` (V, H) converted to ``dtype`` at a time: all V when no conversion is needed.
    A quantized weight (``leantune.quant.QuantizedWeight``) is always dequantized a block at a time."""
    if isinstance(weight, torch.Tensor) and weight.dtype == dtype:
        return weight.shape[0]
    return max(1, _CAST_BLOCK_BYTES // (weight.shape[1] * torch.finfo(dtype).bits // 8))


def _block(weight, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``start:stop`` of ``weight`` in ``dtype``: a slice converted, or dequantized from a quantized head."""
    if isinstance(weight, torch.Tensor):
        return weight[start:stop].to(dtype)
    return weight.row_slice(start, stop, dtype)


def _logits(h: torch.Tensor, weight, dtype: torch.dtype) -> torch.Tensor:
    """``h @ weight.T`` in ``dtype``: h (C, H) already in ``dtype``, weight (V, H) -> (C, V)."""
    rows, vocab = _cast_rows(weight, dtype), weight.shape[0]
    if rows >= vocab:
        return h @ _block(weight, 0, vocab, dtype).T
    out = torch.empty(h.shape[0], vocab, dtype=dtype, device=h.device)
    for v in range(0, vocab, rows):
        out[:, v : v + rows] = h @ _block(weight, v, v + rows, dtype).T
    return out


def _times_weight(d: torch.Tensor, weight, dtype: torch.dtype) -> torch.Tensor:
    """``d @ weight`` in ``dtype``: d (C, V) in ``dtype``, weight (V, H) -> (C, H)."""
    rows, vocab = _cast_rows(weight, dtype), weight.shape[0]
    if rows >= vocab:
        return d @ _block(weight, 0, vocab, dtype)
    out = torch.zeros(d.shape[0], weight.shape[1], dtype=dtype, device=d.device)
    for v in range(0, vocab, rows):
        out.addmm_(d[:, v : v + rows], _block(weight, v, v + rows, dtype))
    return out


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd function behind `linear_cross_entropy`; works on the rows `idx` of a 2-D `hidden`.

    Inputs: hidden (N, H), weight (V, H) tensor or frozen ``QuantizedWeight``, idx (K,) long row
    indices kept, labels (K,) long in [0, V), weights (K,) float or None, chunk_size int, reduction
    "mean" | "sum". Returns a 0-d loss in the compute dtype (fp32, or fp64 for fp64 inputs). Saved for
    backward: hidden, weight, idx, labels, weights and the per-row logsumexp (K floats) -- never logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, idx, labels, weights, chunk_size, reduction):
        dtype = _compute_dtype(hidden, weight)
        k = idx.numel()
        lse = torch.empty(k, dtype=dtype, device=hidden.device)  # (K,)
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        for start in range(0, k, chunk_size):
            stop = min(start + chunk_size, k)
            h = hidden.index_select(0, idx[start:stop]).to(dtype)  # (C, H)
            logits = _logits(h, weight, dtype)  # (C, V), the only vocabulary-sized tensor
            lse_c = torch.logsumexp(logits, dim=-1)  # (C,)
            target = logits.gather(1, labels[start:stop, None]).squeeze(1)  # (C,)
            loss_c = lse_c - target
            if weights is not None:
                loss_c = loss_c * weights[start:stop]
            total = total + loss_c.sum()
            lse[start:stop] = lse_c
            del logits
        if reduction == "mean":
            norm = weights.sum() if weights is not None else torch.tensor(float(k), dtype=dtype, device=hidden.device)
        else:
            norm = torch.ones((), dtype=dtype, device=hidden.device)
        ctx.chunk_size = chunk_size
        dense = isinstance(weight, torch.Tensor)
        ctx.quantized = None if dense else weight  # frozen buffers, no autograd state to save
        ctx.save_for_backward(hidden, weight if dense else None, idx, labels, weights, lse, norm)
        return total / norm

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, idx, labels, weights, lse, norm = ctx.saved_tensors
        weight = ctx.quantized if ctx.quantized is not None else weight
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return None, None, None, None, None, None, None
        dtype = lse.dtype
        k = idx.numel()
        # d(loss)/d(logits_i) = (softmax_i - onehot(y_i)) * w_i * grad_out / norm
        coef = grad_out.to(dtype) / norm
        coef = coef.expand(k) if weights is None else weights * coef  # (K,)
        grad_h = torch.zeros_like(hidden) if need_h else None  # (N, H), zero on masked rows
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None  # (V, H)
        for start in range(0, k, ctx.chunk_size):
            stop = min(start + ctx.chunk_size, k)
            rows = idx[start:stop]
            h = hidden.index_select(0, rows).to(dtype)  # (C, H)
            dlogits = _logits(h, weight, dtype).sub_(lse[start:stop, None]).exp_()  # (C, V) softmax, recomputed in place
            dlogits[torch.arange(stop - start, device=dlogits.device), labels[start:stop]] -= 1.0
            dlogits *= coef[start:stop, None]
            if need_h:
                grad_h.index_copy_(0, rows, _times_weight(dlogits, weight, dtype).to(hidden.dtype))
            if need_w:
                grad_w.addmm_(dlogits.T, h)
            del dlogits
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor | QuantizedWeight,
    labels: torch.Tensor,
    *,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `labels`, computed in row chunks, with logits masking.

    Per kept token i: l_i = logsumexp(h_i W^T) - (h_i W^T)[y_i]  (nats). A token is kept iff
    labels != ignore_index and (weights is None or weights != 0); dropped tokens get no LM-head work and
    a zero gradient.

    - reduction="mean": sum_i w_i l_i / sum_i w_i over kept tokens (w_i = 1 without `weights`, which
      equals `F.cross_entropy(hidden @ weight.T, labels, ignore_index=ignore_index)`). With signed
      weights (e.g. advantages) that can sum to ~0, use "sum" and normalise yourself.
    - reduction="sum": sum_i w_i l_i.
    - Nothing kept: a zero scalar still connected to the graph (backward gives zero gradients).

    Args:
        hidden: (..., H) float (fp32/bf16/fp16/fp64), the final hidden states, any leading dims.
        weight: (V, H) the LM-head weight (no bias), or a frozen quantized head
            (``leantune.quant.QuantizedWeight``, ``quant.embedding_bits``): dequantized 16 MiB of fp32
            rows at a time, like a narrow weight, so no full-precision copy of the head exists.
        labels: (...) integer, already aligned with `hidden` (the caller did the causal shift).
        chunk_size: rows of logits materialised at once; peak extra memory is about twice
            chunk_size x V x 4 bytes (the logits of one chunk and logsumexp's workspace, or the
            softmax computed in place and its product with the weight). A bf16/fp16 `weight` is
            converted to fp32 16 MiB at a time, never copied whole; when it is trained, its
            gradient is accumulated in an fp32 (V, H) buffer.
        ignore_index: label value that marks a token as not counted.
        weights: optional (...) float per-token loss weights; treated as constants (no gradient).
        reduction: "mean" or "sum".

    Returns:
        0-d tensor in fp32 (fp64 if `hidden` or `weight` is fp64), whatever the input dtype.

    Logits are computed in fp32 and never stored: backward recomputes them chunk by chunk, and skips
    grad(weight) when the LM head is frozen (the usual LoRA case) and grad(hidden) when not needed.

    >>> import torch.nn.functional as F
    >>> g = torch.Generator().manual_seed(0)
    >>> hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)  # (B, T, H)
    >>> weight = torch.randn(11, 8, generator=g)  # (V, H), frozen
    >>> labels = torch.tensor([[1, 2, -100, 4, 5], [-100, -100, 7, 8, 10]])  # (B, T)
    >>> loss = linear_cross_entropy(hidden, weight, labels, chunk_size=3)
    >>> ref = F.cross_entropy((hidden @ weight.T).flatten(0, 1), labels.flatten())
    >>> torch.allclose(loss, ref)
    True
    >>> loss.backward()
    >>> hidden.grad[0, 2].abs().sum().item()  # an ignored position gets no gradient
    0.0
    """
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"linear_cross_entropy: chunk_size must be a positive int, got {chunk_size!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if hidden.dim() < 1 or not hidden.is_floating_point():
        raise ValueError(
            f"linear_cross_entropy: hidden must be a float tensor of shape (..., H), got "
            f"{hidden.dtype} of shape {tuple(hidden.shape)}"
        )
    dense = isinstance(weight, torch.Tensor)
    if (dense and weight.dim() != 2) or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"linear_cross_entropy: weight must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got weight of shape {tuple(weight.shape)} (pass lm_head.weight, not its transpose)"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"linear_cross_entropy: labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] = "
            f"{tuple(hidden.shape[:-1])}; shift labels before calling (labels[..., 1:] with hidden[..., :-1, :])"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"linear_cross_entropy: labels must be an integer tensor, got {labels.dtype}")
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(
            f"linear_cross_entropy: weights shape {tuple(weights.shape)} must equal labels shape "
            f"{tuple(labels.shape)}"
        )

    dtype = _compute_dtype(hidden, weight)
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    labels_1d = labels.reshape(-1).long()  # (N,)
    keep = labels_1d != ignore_index
    if weights is not None:
        weights_1d = weights.detach().reshape(-1)
        keep &= weights_1d != 0
    idx = keep.nonzero().squeeze(1)  # (K,) logits masking: only these rows reach the LM head
    if idx.numel() == 0:
        # Empty sums (not `x * 0`) so that inf/NaN in unused rows cannot leak into the loss.
        return hidden_2d[:0].sum().to(dtype) + (weight[:0].sum().to(dtype) if dense else 0)

    kept_labels = labels_1d.index_select(0, idx)  # (K,)
    vocab = weight.shape[0]
    lo, hi = int(kept_labels.min()), int(kept_labels.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"linear_cross_entropy: label {bad} is outside [0, {vocab}) and is not ignore_index={ignore_index}"
        )
    kept_weights = weights_1d.index_select(0, idx).to(dtype) if weights is not None else None  # (K,)
    return LinearCrossEntropyFunction.apply(hidden_2d, weight, idx, kept_labels, kept_weights, chunk_size, reduction)
