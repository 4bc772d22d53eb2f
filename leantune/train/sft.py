"""Supervised fine-tuning (LoRA or full) with a memory-lean loss: the step and its metrics, the loop visible.

Memory levers (arXiv 2606.19528): the model's base returns hidden states and the loss applies the lm_head
chunk by chunk, only at positions that carry a label (``linear_cross_entropy``), so the ``[B, T, V]``
logits never exist; prompt tokens cost no lm_head work at all; activation checkpointing is per layer
(off, all, or every k-th). Opt-in and approximate: ``loss.vocab_subset`` restricts the softmax to a
candidate set built once from the training data plus the step's targets (``vocab_subset_cross_entropy``);
evaluation losses stay exact.

Gradient accumulation is normalized by the number of loss-carrying tokens in the whole optimizer step
(sum of weights, over every process), so ``micro_batch_size=8, grad_accum=1`` and ``micro_batch_size=1,
grad_accum=8`` -- and 2 processes at ``grad_accum=4`` -- give the same update. With ``data.packing`` a
micro-batch is ``micro_batch_size`` packed rows (``leantune.data.packing``): positions restart per example, the
decoder builds a block-diagonal mask from them, and the loss-carrying tokens -- so the loss -- are unchanged.

Everything around the step (device, processes, model and adapter, optimizer, resume, checkpoints, metrics,
ledger) is the run session's (``leantune.train.session``).

Run: ``leantune train recipes/sft_smollm2_addition.yaml`` (see ``leantune.cli``).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from leantune import ledger as ledger_mod
from leantune.adapters.lora import causal_lm, low_precision_lora
from leantune.config import Recipe, SpanWeights
from leantune.data.packing import check_packed_attention, collate_packed, pack_examples
from leantune.data.mixture import MixtureSchedule, load_mixture
from leantune.data.sft import Example, batch_at, collate, load_sft_examples
from leantune.distributed import LossModule, all_reduce_sum, clip_grad_norm, rank_micro_steps
from leantune.losses import linear_cross_entropy, vocab_subset, vocab_subset_cross_entropy
from leantune.losses.subset_setup import loss_note, sft_candidates
from leantune.quant.weight_only import head_weight
from leantune.train.session import RunSession, TrainResult

# ----------------------------------------------------------------------------------------------
# Pure pieces the loop calls


def lm_loss_sum(model, batch: dict[str, torch.Tensor], chunk_size: int,
                candidates: torch.Tensor | None = None, compute=contextlib.nullcontext) -> torch.Tensor:
    """Σ_t w_t · CE(token t) over the batch, computed without materializing logits.

    batch: input_ids, attention_mask, labels, loss_weights, each (B, T), labels aligned with input_ids; a packed
    batch (``leantune.data.packing.collate_packed``) also has position_ids, and then the decoder gets those and no
    attention mask, so transformers builds the block-diagonal (per-example) causal mask from them.
    candidates: None for the exact loss; else (C,) token ids, and the softmax runs over candidates ∪ the
    batch's targets only (``vocab_subset_cross_entropy``, approximate: a lower bound of the exact loss).
    compute: a context factory around the decoder's forward only (`leantune.adapters.lora.LowPrecisionLoRA.forward`);
    the loss over the head runs outside it, in the precision ``linear_cross_entropy`` chooses.
    """
    lm = causal_lm(model)
    if "position_ids" in batch:
        mask = {"position_ids": batch["position_ids"], "attention_mask": None}
    else:
        mask = {"attention_mask": batch["attention_mask"]}
    with compute():
        out = lm.get_decoder()(input_ids=batch["input_ids"], use_cache=False, **mask)
    hidden = out.last_hidden_state  # (B, T, H)
    # (V, H): the Parameter, or a quantized head (quant.embedding_bits), which the exact loss dequantizes
    # 16 MiB of rows at a time and the subset loss only in the subset's rows
    weight = head_weight(lm.get_output_embeddings())
    args = (hidden[:, :-1], weight, batch["labels"][:, 1:])  # position t predicts token t+1
    kwargs = {"weights": batch["loss_weights"][:, 1:], "chunk_size": chunk_size, "reduction": "sum"}
    if candidates is None:
        return linear_cross_entropy(*args, **kwargs)
    return vocab_subset_cross_entropy(*args, candidates, **kwargs)


def step_vocab_subset(candidates: torch.Tensor | None, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor | None:
    """candidates ∪ the targets of every micro-batch of the step (None stays None): one subset per
    optimizer step, so micro-batch 8 x accumulation 1 equals 1 x 8 under the approximate loss too."""
    if candidates is None:
        return None
    return vocab_subset(candidates, [b["labels"][:, 1:] for b in batches])


def loss_weight_total(batch: dict[str, torch.Tensor]) -> float:
    """Σ of the weights of loss-carrying (shifted) positions: the step's normalizer."""
    w = batch["loss_weights"][:, 1:]
    return float((w * (batch["labels"][:, 1:] != -100)).sum())


class SFTLoss(LossModule):
    """``lm_loss_sum`` as a module's forward, ``(batch, chunk_size=, candidates=)``: what DDP / FSDP2 wrap, since
    the loss calls the decoder and the lm_head itself (a wrapper only syncs work done inside its forward)."""

    def __init__(self, model, compute=contextlib.nullcontext):
        super().__init__(model, functools.partial(lm_loss_sum, compute=compute))


def accumulate_gradients(loss_module, batches: list[dict[str, torch.Tensor]], chunk_size: int,
                         candidates: torch.Tensor | None = None, spill=None, *, norm: float | None = None,
                         sync=None) -> tuple[float, float]:
    """Backward over all micro-batches of one optimizer step; return (this process's step loss, normalizer).

    ``loss_module``: an ``SFTLoss`` (or its DDP/FSDP2 wrapper). Each micro-batch's loss sum is divided by
    ``norm``, the weighted count of loss-carrying tokens of the whole step (default: over ``batches``; with
    several processes the session passes the sum over ranks), so the accumulated gradient equals that of one
    big batch (token-level mean). ``candidates``: see ``lm_loss_sum``; the subset is the same for every
    micro-batch of the step. ``spill``: an `offload.ActivationSpill` that keeps the forward's layer inputs in
    a file (`train.offload_checkpoints`). ``sync(last) -> context``: gradient synchronization across
    processes (summed over ranks) only on the last micro-batch (DDP's no_sync, FSDP2's gradient sync).
    """
    if norm is None:
        norm = sum(loss_weight_total(b) for b in batches)
    subset = step_vocab_subset(candidates, batches)
    step_loss = 0.0
    for i, batch in enumerate(batches):
        with (sync(i == len(batches) - 1) if sync is not None else contextlib.nullcontext()):
            with spill.forward() if spill is not None else contextlib.nullcontext():
                loss = loss_module(batch, chunk_size=chunk_size, candidates=subset) / max(norm, 1e-12)
            loss.backward()
        step_loss += float(loss.detach())
    return step_loss, norm


def zeroth_order_step(optimizer, model, batches: list[dict[str, torch.Tensor]],
                      chunk_size: int, candidates: torch.Tensor | None = None) -> tuple[float, float, dict]:
    """One zeroth-order step (MeZO, arXiv 2305.17333) on the step's token-mean loss over all micro-batches: 2 * zo_samples
    forward passes, no backward. Returns (loss ~ (L+ + L-)/2, normalizer, MeZO's step info)."""
    norm = sum(loss_weight_total(b) for b in batches)
    subset = step_vocab_subset(candidates, batches)

    def objective() -> float:
        return sum(float(lm_loss_sum(model, b, chunk_size, subset)) for b in batches) / max(norm, 1e-12)

    info = optimizer.step(objective)
    return info["loss"], norm, info


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], pad_id: int, weights: SpanWeights, batch_size: int,
                  chunk_size: int, *, loss_module=None) -> dict[str, float]:
    """Weighted mean cross-entropy per loss-carrying token over ``examples``, and its perplexity.
    ``loss_module``: the run's (DDP/FSDP2-wrapped) `SFTLoss`; under FSDP2 every rank must run it."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id, weights)
        dev = next(model.parameters()).device
        batch = {k: v.to(dev) for k, v in batch.items()}
        loss = lm_loss_sum(model, batch, chunk_size) if loss_module is None else loss_module(batch, chunk_size=chunk_size)
        total += float(loss)
        count += loss_weight_total(batch)
    model.train(was_training)
    mean = total / max(count, 1e-12)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": count}


# ----------------------------------------------------------------------------------------------
# The loop


def train(recipe: Recipe, *, resume: bool = False, quiet: bool = False, model=None, tokenizer=None,
          recipe_path: str | None = None) -> TrainResult:
    """Run SFT as the recipe says; return the ledger and the trained model.

    ``model``/``tokenizer``: continue training this (already adapted) model instead of loading
    `model.path` and adding a fresh adapter -- expert iteration (`leantune rft`) trains one adapter
    across rounds this way. With ``memory.budget`` set, the run is planned first (model config only) and
    refused with ``BudgetError``, naming settings that fit, before any data, weights or run directory are
    touched.
    """
    session = RunSession(recipe, "train", resume=resume, quiet=quiet, recipe_path=recipe_path, model=model,
                         tokenizer=tokenizer,
                         loss_module=lambda m: SFTLoss(m, compute=getattr(low_precision_lora(m, recipe), "forward",
                                                                           contextlib.nullcontext)))
    with session:
        return _train(session)


def _train(session: RunSession) -> TrainResult:
    recipe, cfg, model, dist = session.recipe, session.recipe.train, session.model, session.dist
    tokenizer = session.tokenizer
    eval_examples = load_sft_examples(recipe.data.eval, tokenizer, recipe.data, role="eval")[0] if recipe.data.eval else []
    mixture = heldout = None
    if recipe.data.mixture is None:
        train_examples, stats = load_sft_examples(recipe.data.train, tokenizer, recipe.data)
        datasets = [train_examples]
    else:  # data.mixture: one list of examples per dataset, each chunk of steps drawn from one (leantune.data.mixture)
        datasets, heldout, stats, per_dataset = load_mixture(recipe.data.mixture, tokenizer, recipe.data, cfg.seed,
                                                             eval_examples)
        train_examples = [e for d in datasets for e in d] if recipe.loss.vocab_subset else None
        session.info(f"mixture: {recipe.data.mixture.select} over {len(datasets)} datasets: "
                     + ", ".join(f"{p} ({s['examples']} examples)" for (_, p), s in
                                 zip(recipe.data.mixture.datasets(), per_dataset))
                     + (f"; held-out reward on {len(heldout)} examples" if heldout is not None else ""))
    session.info(f"data: {stats.as_dict()}")
    # data.packing: the batches are drawn from packed rows instead of single examples (micro_batch_size counts rows)
    collate_items, packing = collate, None
    if recipe.data.packing:
        check_packed_attention(model)
        datasets, collate_items = [pack_examples(d, recipe.data.max_length) for d in datasets], collate_packed
        packing = datasets[0].stats if len(datasets) == 1 else [d.stats.as_dict() for d in datasets]
        session.info(f"packing: {packing if isinstance(packing, list) else packing.as_dict()}")
    if recipe.data.mixture is not None:
        mixture = MixtureSchedule(recipe.data.mixture, datasets, cfg.seed, session.trainer_state.get("mixture"))
    pad_id = tokenizer.pad_token_id
    saved = session.trainer_state.get("candidates")  # resume: the subset the run started with, not a re-calibration
    candidates = torch.tensor(saved, dtype=torch.long) if saved is not None else sft_candidates(
        recipe, model, train_examples, pad_id)
    if candidates is not None:
        candidates = candidates.to(session.device)
        session.info(f"loss: APPROXIMATE vocabulary subset, {candidates.numel()} candidates "
                     f"({recipe.loss.vocab_subset_source}) + each step's targets; eval_loss stays exact")
    loss_module = session.loss_module  # the model's loss, DDP/FSDP2-wrapped under torchrun
    low_precision = low_precision_lora(model, recipe) if session.needs_backward else None
    if low_precision is not None:
        session.auto_choices["adapter.compute_dtype"] = ("bfloat16: LoRA matmuls under bf16 autocast over the bf16 "
                                                         "base, fp32 adapter weights and optimizer state")
    totals = session.trainer_state.get("totals") or {"tokens": 0, "trainable_tokens": 0, "loss_weight": 0.0,
                                                     "elapsed_s": 0.0}
    subset_rows = []  # |subset| of every step (vocabulary-subset loss only), for the FLOPs bill
    spill = None
    if cfg.offload_checkpoints and session.needs_backward:  # MeZO keeps no activations for backward
        from leantune.train.offload import ActivationSpill

        spill = ActivationSpill(model, session.run_dir)
    bar = session.progress("train")
    row: dict = {}  # stays empty when a finished run is resumed
    model.train()
    per_step = cfg.grad_accum * dist.world_size  # global micro-batches per optimizer step

    def heldout_loss() -> float:  # data.mixture's reward: the held-out loss of the model as it is now
        return evaluate_loss(model, heldout, pad_id, recipe.loss.weights, cfg.micro_batch_size, recipe.loss.chunk_size,
                             loss_module=loss_module)["eval_loss"]

    while session.step < cfg.steps:
        step = session.step
        weights = recipe.loss.weights_at(step)
        micro = rank_micro_steps(step, cfg.grad_accum, dist.world_size, dist.rank)
        if mixture is None:
            items, micro_at = datasets[0], micro
        else:  # this chunk's dataset, at that dataset's own position in its seeded epochs
            d = mixture.begin_step(step, heldout_loss)
            items = datasets[d]
            micro_at = [mixture.micro_index(d, i, step, per_step) for i in micro]
        batches = [session.to_device(collate_items(batch_at(items, i, cfg.micro_batch_size,
                                                            cfg.seed if mixture is None else cfg.seed + d,
                                                            recipe.data.shuffle), pad_id, weights))
                   for i in micro_at]
        subset = step_vocab_subset(candidates, batches)
        if subset is not None:
            subset_rows.append(subset.numel())
        with session.timed() as dt, session.step_guard():
            if session.needs_backward:
                norm = all_reduce_sum(sum(loss_weight_total(b) for b in batches), dist)
                with low_precision.step() if low_precision is not None else contextlib.nullcontext():
                    step_loss, _ = accumulate_gradients(loss_module, batches, recipe.loss.chunk_size, subset, spill,
                                                        norm=norm, sync=session.sync)
                step_loss = all_reduce_sum(step_loss, dist)
                clip = recipe.optim.max_grad_norm
                grad_norm = clip_grad_norm(loss_module, clip if clip else float("inf"))
                session.optimizer.step()
                zo = None
            else:
                step_loss, norm, zo = zeroth_order_step(session.optimizer, model, batches, recipe.loss.chunk_size,
                                                        subset)
                grad_norm = abs(zo["projected_grad"])  # |g| is the only gradient MeZO sees
            lr = session.scheduler.get_last_lr()[0]
            session.scheduler.step()
            session.optimizer.zero_grad(set_to_none=True)
        session.step += 1
        step_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        step_trainable = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        totals["tokens"] += step_tokens
        totals["trainable_tokens"] += step_trainable
        totals["loss_weight"] += norm
        totals["elapsed_s"] += dt[0]
        rss = session.memory.sample()
        row = {"step": session.step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens": totals["tokens"],
               "trainable_tokens": totals["trainable_tokens"], "tokens_per_s": step_tokens / max(dt[0], 1e-9),
               "rss_bytes": rss, "elapsed_s": totals["elapsed_s"]}
        if zo is not None:
            row.update(projected_grad=zo["projected_grad"], zo_restore_bytes=zo["restore_bytes"])
        if mixture is not None:  # the step's counts over all ranks, so the ledger's per-dataset tokens are the run's
            counts = torch.tensor([step_tokens, step_trainable], dtype=torch.int64)
            step_all, trainable_all = (int(x) for x in all_reduce_sum(counts, dist).tolist())
            row.update(mixture.end_step(step, step_all, trainable_all, cfg.steps, heldout_loss))
        is_last = session.step == cfg.steps
        if eval_examples and ((cfg.eval_every and session.step % cfg.eval_every == 0) or is_last):
            row.update(evaluate_loss(model, eval_examples, pad_id, weights, cfg.micro_batch_size, recipe.loss.chunk_size,
                                     loss_module=loss_module))
        session.log(row, force="eval_loss" in row or "mixture_dataset" in row)
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", rss=f"{rss / 2**30:.2f}G")
        bar.update(1)
        if session.should_save():
            session.save_checkpoint({"totals": totals,
                                     "candidates": None if candidates is None else candidates.tolist(),
                                     "mixture": None if mixture is None else mixture.state_dict()})
    bar.close()
    offloaded = None
    if spill is not None:
        offloaded = {"slots_written": spill.slots_written, "bytes_written": spill.bytes_written}
        spill.close()
    flops = ledger_mod.flops_from_model(
        model, tokens=totals["tokens"], loss_tokens=totals["trainable_tokens"],
        seq_len=stats.tokens / max(1, stats.examples),  # mean example length, for the attention term
        # selective checkpointing recomputes no full-width matmul (only LoRA B's rank-r product): none billed
        checkpoint_fraction=0.0 if cfg.activation_checkpointing == "selective"
        else session.checkpointed_layers / max(1, causal_lm(model).config.num_hidden_layers),
        lm_head_rows=round(sum(subset_rows) / len(subset_rows)) if subset_rows else None,
    )
    if not session.needs_backward:
        flops = ledger_mod.zeroth_order_flops(flops, forward_passes=2 * recipe.optim.zo_samples)
    run_totals = {"steps": session.step, "tokens_processed": totals["tokens"], "trainable_tokens": totals["trainable_tokens"],
                  "wall_time_s": totals["elapsed_s"], "data": stats.as_dict()}
    if mixture is not None:
        train_files = [p for _, p in recipe.data.mixture.datasets()]
        if isinstance(recipe.data.mixture.heldout, str):
            train_files.append(recipe.data.mixture.heldout)
    else:
        train_files = [recipe.data.train]
    return session.finish(
        totals=run_totals, flops=flops, data_files=train_files + ([recipe.data.eval] if recipe.data.eval else []),
        extra={"final_metrics": row, "loss": loss_note(recipe, candidates, subset_rows), "offloaded_checkpoints": offloaded,
               "packing": packing if packing is None or isinstance(packing, list) else packing.as_dict(),
               "mixture": None if mixture is None else mixture.ledger(len(heldout) if heldout is not None else 0)})
