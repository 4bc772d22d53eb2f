"""A small data-parallel SFT loop on the tiny Llama, run by tests/test_distributed.py both in-process
(one process, the reference) and under torchrun (W processes): the loop the trainer is meant to run.

As a script: ``python -m torch.distributed.run --nproc-per-node 2 dist_helpers.py OUT.pt ddp:lora,fsdp:full
[KILL_STEP]`` writes, per spec, the per-step losses and the final trainable weights to OUT.pt (rank 0).
"""

from __future__ import annotations

import functools
import os
import signal
import sys

import torch

from leantune.adapters.lora import apply_adapter
from leantune.config import AdapterConfig, SpanWeights
from leantune.data.sft import SPAN_ANSWER, SPAN_PROMPT, Example, batch_at, collate
from leantune.distributed import (
    LossModule,
    all_reduce_sum,
    clip_grad_norm,
    destroy,
    full_state_dict,
    init_distributed,
    load_full_state_dict,
    load_optimizer_state_dict,
    optimizer_state_dict,
    peer_guard,
    rank_micro_steps,
    sync_gradients,
    wrap_for_training,
)
from leantune.models.tiny import tiny_model, tiny_tokenizer
from leantune.train.session import set_activation_checkpointing
from leantune.train.sft import lm_loss_sum, loss_weight_total

GLOBAL_ACCUM = 4  # micro-batches per optimizer step over all ranks
MICRO_BATCH = 2
STEPS_BEFORE_RESUME = 2  # steps 0..1, a checkpoint, then step 2 twice: continued and resumed
CHUNK = 8


def examples(tok) -> list[Example]:
    """14 prompt/answer examples of different lengths (padding and a short last micro-batch of an epoch)."""
    out = []
    for i in range(14):
        prompt = tok(f"What is {i} + {3 * i}?").input_ids
        answer = tok(" " + " ".join(str(i + k) for k in range(1 + i % 5)) + " done").input_ids
        out.append(Example(prompt + answer, [SPAN_PROMPT] * len(prompt) + [SPAN_ANSWER] * len(answer), f"mem:{i}"))
    return out


def build(ctx, parallel: str, method: str, flags: frozenset = frozenset()):
    """Model (LoRA or full), LossModule, wrapper and AdamW, identical on every rank. ``flags``: "tied"
    (lm_head shares the embedding), "ckpt" (activation checkpointing on every layer)."""
    model = tiny_model(vocab_size=len(tiny_tokenizer()), seed=0, tie="tied" in flags)
    model = apply_adapter(model, AdapterConfig(method=method, r=4, alpha=8.0), seed=0)
    if "ckpt" in flags:
        set_activation_checkpointing(model, "all")
    model.train()
    wrapped = wrap_for_training(LossModule(model, functools.partial(lm_loss_sum, chunk_size=CHUNK)), ctx, parallel)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    return wrapped, optimizer


def train_step(ctx, wrapped, optimizer, data, pad_id: int, step: int) -> tuple[float, float]:
    """One optimizer step over this rank's micro-batches; returns (global step loss, grad norm)."""
    accum = GLOBAL_ACCUM // ctx.world_size
    with peer_guard(ctx):
        batches = [collate(batch_at(data, i, MICRO_BATCH, seed=0, shuffle=True), pad_id, SpanWeights())
                   for i in rank_micro_steps(step, accum, ctx.world_size, ctx.rank)]
        norm = all_reduce_sum(sum(loss_weight_total(b) for b in batches), ctx)
        local = 0.0
        for j, batch in enumerate(batches):
            with sync_gradients(wrapped, enabled=j == len(batches) - 1):
                loss = wrapped(batch) / norm
                loss.backward()
            local += float(loss.detach())
        step_loss = all_reduce_sum(local, ctx)
        grad_norm = clip_grad_norm(wrapped, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm


def run(parallel: str, method: str, kill_step: int | None = None, ctx=None, flags: frozenset = frozenset()) -> dict | None:
    """Steps 0..STEPS_BEFORE_RESUME-1, checkpoint, then the last step continued and, from the
    checkpoint, resumed in a fresh model. Rank 0 returns losses, grad norms and both final weights.
    ``ctx``: the job's context; None runs in one process."""
    ctx = init_distributed("cpu") if ctx is None else ctx
    tok = tiny_tokenizer()
    data = examples(tok)
    wrapped, optimizer = build(ctx, parallel, method, flags)
    losses, norms = [], []
    for step in range(STEPS_BEFORE_RESUME):
        if kill_step is not None and step == kill_step and ctx.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        loss, norm = train_step(ctx, wrapped, optimizer, data, tok.pad_token_id, step)
        losses.append(loss)
        norms.append(norm)
    model_ckpt = full_state_dict(wrapped, ctx, trainable_only=True)
    optim_ckpt = optimizer_state_dict(wrapped, optimizer, ctx)
    last = train_step(ctx, wrapped, optimizer, data, tok.pad_token_id, STEPS_BEFORE_RESUME)
    continued = full_state_dict(wrapped, ctx, trainable_only=True)
    with torch.no_grad():  # evaluation: every rank runs the wrapped module (FSDP2 all-gathers in it)
        eval_loss = float(wrapped(collate(data[:4], tok.pad_token_id, SpanWeights())))

    fresh, fresh_opt = build(ctx, parallel, method, flags)
    load_full_state_dict(fresh, model_ckpt, ctx, trainable_only=True)
    load_optimizer_state_dict(fresh, fresh_opt, optim_ckpt, ctx)
    resumed_last = train_step(ctx, fresh, fresh_opt, data, tok.pad_token_id, STEPS_BEFORE_RESUME)
    resumed = full_state_dict(fresh, ctx, trainable_only=True)
    if not ctx.is_main:
        return None
    return {"losses": losses + [last[0]], "grad_norms": norms + [last[1]], "resumed_loss": resumed_last[0], "eval_loss": eval_loss,
            "final": continued, "resumed": resumed, "world_size": ctx.world_size}


def main(argv: list[str]) -> None:
    """argv: OUT.pt SPEC[,SPEC...] [KILL_STEP], SPEC = PARALLEL:METHOD[:FLAG...] (e.g. ddp:lora,fsdp:full:tied:ckpt)."""
    out, specs = argv[0], argv[1].split(",")
    kill = int(argv[2]) if len(argv) > 2 else None
    torch.set_num_threads(1)
    ctx = init_distributed("cpu", timeout_s=float(os.environ.get("LEANTUNE_TEST_TIMEOUT", "60")))
    results = {}
    for spec in specs:
        parallel, method, *flags = spec.split(":")
        results[spec] = run(parallel, method, kill, ctx, frozenset(flags))
    destroy(ctx)
    if ctx.is_main:
        torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1:])
