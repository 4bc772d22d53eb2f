"""A LoRA-, logits-masking- and checkpointing-aware estimate of training FLOPs, from parameter counts."""

from __future__ import annotations


# --------------------------------------------------------------------------------------------
# FLOPs


def decoder_body_params(*, n_layers: int, hidden: int, intermediate: int, kv_hidden: int | None = None, gated_mlp: bool = True) -> int:
    """Matmul weights of a Llama-style decoder stack (no embeddings, no lm_head, norms ignored).

    Per layer: q and o projections ``2 * hidden^2``, k and v ``2 * hidden * kv_hidden``
    (kv_hidden = n_kv_heads * head_dim, default hidden), MLP ``3 * hidden * intermediate``
    (gate, up, down) or ``2 * ...`` without gating.

    >>> decoder_body_params(n_layers=2, hidden=64, intermediate=128, kv_hidden=32)
    73728
    """
    kv = hidden if kv_hidden is None else kv_hidden
    return n_layers * (2 * hidden * hidden + 2 * hidden * kv + (3 if gated_mlp else 2) * hidden * intermediate)


def estimate_train_flops(
    *,
    tokens: int,
    n_layers: int,
    hidden: int,
    loss_tokens: int | None = None,
    seq_len: int = 0,
    vocab: int = 0,
    body_params: int | None = None,
    intermediate: int | None = None,
    kv_hidden: int | None = None,
    trainable_body_params: int = 0,
    lora_params: int = 0,
    lm_head_trainable: bool = False,
    checkpoint_fraction: float = 0.0,
) -> dict:
    """Training FLOPs (multiply + add = 2) of a decoder LM, aware of LoRA, logits masking and
    activation checkpointing. An estimate from parameter counts (Kaplan et al., arXiv 2001.08361, §2.1),
    not a profile: elementwise ops, norms, softmax and optimizer updates are left out.

    Per processed token (``tokens``: every position through the stack):
      * body forward ``2 * N_body`` (N_body = matmul weights of the layers, frozen + trainable,
        adapters excluded; give ``body_params`` or ``intermediate`` to derive it Llama-style),
        plus attention scores and values ``2 * n_layers * seq_len * hidden`` (Kaplan's term;
        ``seq_len`` 0 drops it);
      * body backward, activation gradients ``2 * N_body`` + attention ``2x`` its forward (Q, K and V
        are all activations), through every layer since the gradient must reach the earliest
        adapter; zero when nothing in the body is trainable;
      * weight gradients ``2 * N_trainable`` only for trainable base weights (full fine-tuning:
        2 + 2 + 2 = the classic 6N; LoRA: 0);
      * LoRA adapters ``6 * N_lora`` (forward, activation and weight gradients);
      * activation checkpointing recomputes the forward of ``checkpoint_fraction`` of the layers.
    Per loss-carrying token (``loss_tokens``: positions where logits are computed; with logits
    masking only the trainable ones, default all tokens): lm_head forward ``2 * V * H`` and
    backward ``2 * V * H`` (activation gradient), ``+ 2 * V * H`` if the lm_head is trainable.

    Returns ``{part: FLOPs}`` for each term, ``"total"``, ``"per_token"`` (total / tokens), ``"method"``
    and the ``"inputs"`` used.
    """
    if body_params is None:
        if intermediate is None:
            raise ValueError("estimate_train_flops: give body_params, or intermediate (and kv_hidden) to derive it")
        body_params = decoder_body_params(n_layers=n_layers, hidden=hidden, intermediate=intermediate, kv_hidden=kv_hidden)
    if not 0.0 <= checkpoint_fraction <= 1.0:
        raise ValueError(f"checkpoint_fraction={checkpoint_fraction}: must be in [0, 1] (fraction of layers recomputed)")
    loss_tokens = tokens if loss_tokens is None else loss_tokens
    if loss_tokens > tokens:
        raise ValueError(f"loss_tokens={loss_tokens} > tokens={tokens}: loss positions are a subset of processed ones")
    needs_body_backward = trainable_body_params > 0 or lora_params > 0

    attn_fwd = 2 * n_layers * seq_len * hidden * tokens
    parts = {
        "body_forward": 2 * body_params * tokens,
        "attention_forward": attn_fwd,
        "body_backward_activations": (2 * body_params * tokens + 2 * attn_fwd) if needs_body_backward else 0,
        "body_weight_gradients": 2 * trainable_body_params * tokens,
        "lora": 6 * lora_params * tokens,
        "lm_head": (4 + (2 if lm_head_trainable else 0)) * vocab * hidden * loss_tokens,
    }
    recompute = parts["body_forward"] + attn_fwd + 2 * lora_params * tokens
    parts["checkpoint_recompute"] = round(checkpoint_fraction * recompute)
    total = sum(parts.values())
    return {
        **parts,
        "total": total,
        "per_token": total / tokens if tokens else 0.0,
        "method": "estimate: parameter counting (2 FLOPs per weight per token per pass), LoRA- and logits-mask-aware",
        "inputs": {
            "tokens": tokens, "loss_tokens": loss_tokens, "n_layers": n_layers, "hidden": hidden,
            "seq_len": seq_len, "vocab": vocab, "body_params": body_params,
            "trainable_body_params": trainable_body_params, "lora_params": lora_params,
            "lm_head_trainable": lm_head_trainable, "checkpoint_fraction": checkpoint_fraction,
        },
    }


def _config_int(config, *names: str) -> int | None:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int):
            return v
    return None


def model_param_counts(model) -> dict:
    """Matmul weight counts of a torch causal LM, split the way ``estimate_train_flops`` needs them.

    Leaf modules with ``in_features``/``out_features`` (nn.Linear, quantized linears, PEFT's lora_A /
    lora_B) count ``in * out``; other leaves count their >=2-D parameters; embeddings count nothing
    (a lookup). LoRA = leaves whose name contains ``lora_``; lm_head = ``get_output_embeddings()``.
    """
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    counts = {"body_params": 0, "trainable_body_params": 0, "lora_params": 0, "lm_head_params": 0, "lm_head_trainable": False}
    for name, mod in model.named_modules():
        if any(True for _ in mod.children()) or mod is inp or isinstance(mod, torch.nn.Embedding):
            continue
        own = list(mod.parameters(recurse=False))
        if isinstance(getattr(mod, "in_features", None), int) and isinstance(getattr(mod, "out_features", None), int):
            n = mod.in_features * mod.out_features
        else:
            n = sum(p.numel() for p in own if p.dim() >= 2)
        if n == 0:
            continue
        trainable = any(p.requires_grad for p in own)
        if mod is head:
            counts["lm_head_params"] = n
            counts["lm_head_trainable"] = trainable
        elif "lora_" in name:
            counts["lora_params"] += n
        else:
            counts["body_params"] += n
            counts["trainable_body_params"] += n if trainable else 0
    return counts


def flops_from_model(model, *, tokens: int, loss_tokens: int | None = None, seq_len: int = 0,
                     checkpoint_fraction: float = 0.0, lm_head_rows: float | None = None) -> dict:
    """``estimate_train_flops`` with parameter counts taken from ``model`` (see ``model_param_counts``);
    n_layers and hidden from ``model.config``, V from the lm_head size. ``seq_len``: mean sequence
    length of the batches (0 leaves out the attention-score term). ``lm_head_rows``: vocabulary rows
    the loss actually multiplies per loss token, when fewer than V (vocabulary-subset loss)."""
    config = getattr(model, "config", None)
    n_layers = _config_int(config, "num_hidden_layers", "n_layer", "num_layers") or 0
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model") or 0
    c = model_param_counts(model)
    return estimate_train_flops(
        tokens=tokens,
        loss_tokens=loss_tokens,
        n_layers=n_layers,
        hidden=hidden,
        seq_len=seq_len,
        vocab=(lm_head_rows if lm_head_rows is not None else c["lm_head_params"] // hidden) if hidden else 0,
        body_params=c["body_params"],
        trainable_body_params=c["trainable_body_params"],
        lora_params=c["lora_params"],
        lm_head_trainable=c["lm_head_trainable"],
        checkpoint_fraction=checkpoint_fraction,
    )


def zeroth_order_flops(train_flops: dict, forward_passes: int) -> dict:
    """Turn a training estimate into a zeroth-order one (MeZO, arXiv 2305.17333): each step runs
    ``forward_passes`` forward passes (2 per perturbation sample) and no backward.

    >>> f = estimate_train_flops(tokens=10, n_layers=1, hidden=4, body_params=100, trainable_body_params=100)
    >>> zeroth_order_flops(f, forward_passes=2)["total"]  # 2 forwards of 2 * N * tokens
    4000
    """
    inputs = train_flops["inputs"]
    lora_fwd = 2 * inputs["lora_params"] * inputs["tokens"]
    # the lm_head term counts 4 (fwd + bwd) or 6 FLOPs per weight; a forward is 2 of them
    lm_head_fwd = 2 * inputs["vocab"] * inputs["hidden"] * inputs["loss_tokens"]
    one_forward = train_flops["body_forward"] + train_flops["attention_forward"] + lora_fwd + lm_head_fwd
    total = forward_passes * one_forward
    tokens = inputs["tokens"]
    return {
        "forward_pass": one_forward,
        "forward_passes_per_token": forward_passes,
        "total": total,
        "per_token": total / tokens if tokens else 0.0,
        "method": "estimate: zeroth-order (forward passes only), parameter counting, logits-mask-aware",
        "inputs": inputs,
    }

