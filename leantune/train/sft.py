"""Supervised fine-tuning (LoRA or full) with a memory-lean loss: the whole loop, visible.

Memory levers (MISSION A1): the model's base returns hidden states and the loss applies the lm_head
chunk by chunk, only at positions that carry a label (``linear_cross_entropy``), so the ``[B, T, V]``
logits never exist; prompt tokens cost no lm_head work at all; activation checkpointing is per layer
(off, all, or every k-th). Opt-in and approximate: ``loss.vocab_subset`` restricts the softmax to a
candidate set built once from the training data plus the step's targets (``vocab_subset_cross_entropy``);
evaluation losses stay exact.

Gradient accumulation is normalized by the number of loss-carrying tokens in the whole optimizer step
(sum of weights), so ``micro_batch_size=8, grad_accum=1`` and ``micro_batch_size=1, grad_accum=8``
give the same update.

Run: ``leantune train recipes/sft_tiny.yaml`` (see ``leantune.cli``).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from leantune import ledger as ledger_mod
from leantune.adapters.lora import (
    apply_adapter,
    causal_lm,
    load_trainable_state,
    save_adapter,
    trainable_state,
)
from leantune.allocator import release_free_memory
from leantune.config import Recipe, RecipeError, SpanWeights
from leantune.data.sft import (
    SPAN_PROMPT,
    DataStats,
    Example,
    batch_at,
    collate,
    load_sft_examples,
)
from leantune.losses import (
    build_candidates,
    linear_cross_entropy,
    softmax_mass,
    token_counts,
    vocab_subset,
    vocab_subset_cross_entropy,
)
from leantune.metering import set_malloc_mmap_threshold
from leantune.models.loading import load_model_and_tokenizer, resolve_source
from leantune.optim import MeZO
from leantune.quant.weight_only import dense_head_weight, head_weight
from leantune.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)

# ----------------------------------------------------------------------------------------------
# Pure pieces the loop calls


def lm_loss_sum(model, batch: dict[str, torch.Tensor], chunk_size: int,
                candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_t w_t · CE(token t) over the batch, computed without materializing logits.

    batch: input_ids, attention_mask, labels, loss_weights, each (B, T), labels aligned with input_ids.
    candidates: None for the exact loss; else (C,) token ids, and the softmax runs over candidates ∪ the
    batch's targets only (``vocab_subset_cross_entropy``, approximate: a lower bound of the exact loss).
    """
    lm = causal_lm(model)
    out = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
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


def accumulate_gradients(model, batches: list[dict[str, torch.Tensor]], chunk_size: int,
                         candidates: torch.Tensor | None = None, spill=None) -> tuple[float, float]:
    """Backward over all micro-batches of one optimizer step; return (step loss, normalizer).

    Each micro-batch's loss sum is divided by the weighted count of loss-carrying tokens of the whole
    step, so the accumulated gradient equals that of one big batch (token-level mean). ``candidates``:
    see ``lm_loss_sum``; the subset is the same for every micro-batch of the step. ``spill``: an
    `offload.ActivationSpill` that keeps the forward's layer inputs in a file (`train.offload_checkpoints`).
    """
    norm = sum(loss_weight_total(b) for b in batches)
    subset = step_vocab_subset(candidates, batches)
    step_loss = 0.0
    for batch in batches:
        with spill.forward() if spill is not None else contextlib.nullcontext():
            loss = lm_loss_sum(model, batch, chunk_size, subset) / max(norm, 1e-12)
        loss.backward()
        step_loss += float(loss.detach())
    return step_loss, norm


def zeroth_order_step(optimizer: MeZO, model, batches: list[dict[str, torch.Tensor]],
                      chunk_size: int, candidates: torch.Tensor | None = None) -> tuple[float, float, dict]:
    """One MeZO step (MISSION C1) on the step's token-mean loss over all micro-batches: 2 * zo_samples
    forward passes, no backward. Returns (loss ~ (L+ + L-)/2, normalizer, MeZO's step info)."""
    norm = sum(loss_weight_total(b) for b in batches)
    subset = step_vocab_subset(candidates, batches)

    def objective() -> float:
        return sum(float(lm_loss_sum(model, b, chunk_size, subset)) for b in batches) / max(norm, 1e-12)

    info = optimizer.step(objective)
    return info["loss"], norm, info


def lr_lambda(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step``: linear warmup, then cosine or constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_activation_checkpointing(model, policy) -> int:
    """Checkpoint decoder layers: 'off', 'all', or every k-th layer (int). Returns how many layers."""
    if policy == "off":
        return 0
    from transformers.modeling_layers import GradientCheckpointingLayer

    lm = causal_lm(model)
    kwargs = {"use_reentrant": False}  # works with frozen embeddings (no input grads needed)
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    layers = [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)]
    k = 1 if policy == "all" else int(policy)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % k == 0
    return sum(layer.gradient_checkpointing for layer in layers)


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], pad_id: int, weights: SpanWeights, batch_size: int,
                  chunk_size: int) -> dict[str, float]:
    """Weighted mean cross-entropy per loss-carrying token over ``examples``, and its perplexity."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id, weights)
        total += float(lm_loss_sum(model, batch, chunk_size))
        count += loss_weight_total(batch)
    model.train(was_training)
    mean = total / max(count, 1e-12)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": count}


# ----------------------------------------------------------------------------------------------
# Set-up


@dataclass
class Run:
    """Everything the loop needs, built by the _setup_* functions."""

    recipe: Recipe
    run_dir: Path
    model: torch.nn.Module
    tokenizer: object
    source: object
    train_examples: list[Example]
    train_stats: DataStats
    eval_examples: list[Example] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None


def setup_model(recipe: Recipe, init: str | None = None):
    """(model, tokenizer, source, checkpointed layers, quant info): the base, quantized if asked, with a
    fresh adapter -- or, with ``init`` (a finished LoRA run directory), that run's adapter, trainable."""
    model, tokenizer, source = load_model_and_tokenizer(recipe.model)
    quant = None
    if recipe.quant.bits or recipe.quant.embedding_bits:  # before the adapter: LoRA wraps the QuantLinear layers
        from leantune.quant import QuantStats, quantize_embeddings, quantize_model

        stats = QuantStats(0, 0, 0)
        if recipe.quant.bits:
            stats += quantize_model(model, recipe.quant.bits, recipe.quant.group_size, skip=["lm_head"])
        if recipe.quant.embedding_bits:
            stats += quantize_embeddings(model, recipe.quant.embedding_bits, recipe.quant.group_size)
        quant = stats.as_dict()
    if init:
        adapter_dir = Path(init) / "adapter"
        if not adapter_dir.is_dir():
            raise RecipeError(f"rl.init: {init} is not a finished LoRA run directory (no adapter/ inside)")
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    else:
        model = apply_adapter(model, recipe.adapter, seed=recipe.train.seed)
    n_ckpt = set_activation_checkpointing(model, recipe.train.activation_checkpointing)
    model.train()
    release_free_memory()  # what loading and quantizing freed: a caching malloc would keep it all run long
    return model, tokenizer, source, n_ckpt, quant


def _setup_data(recipe: Recipe, tokenizer):
    train, stats = load_sft_examples(recipe.data.train, tokenizer, recipe.data)
    evals: list[Example] = []
    if recipe.data.eval:
        evals, _ = load_sft_examples(recipe.data.eval, tokenizer, recipe.data, role="eval")
    return train, stats, evals


def _setup_loss(recipe: Recipe, model, train_examples: list[Example], pad_id: int) -> torch.Tensor | None:
    """Candidate token ids of the approximate vocabulary-subset loss (sorted int64), or None (exact loss).

    Built once from the training data: token counts over every token and over completion tokens, and for
    the "probability" source the model's summed softmax at the loss positions of a seeded sample of
    ``loss.vocab_subset_calibration`` examples (forward only, no gradients).
    """
    k = recipe.loss.vocab_subset
    if k is None:
        return None
    head = causal_lm(model).get_output_embeddings()
    vocab = head.out_features
    weight = dense_head_weight(head) if recipe.loss.vocab_subset_source == "embedding" else None  # (V, H)
    all_counts = token_counts((e.input_ids for e in train_examples), vocab)
    target_counts = token_counts(
        ([t for t, s in zip(e.input_ids, e.spans) if s != SPAN_PROMPT] for e in train_examples), vocab
    )
    mass = None
    if recipe.loss.vocab_subset_source == "probability":
        n = min(recipe.loss.vocab_subset_calibration, len(train_examples))
        sample = [train_examples[i] for i in sorted(random.Random(recipe.train.seed).sample(range(len(train_examples)), n))]
        mass = calibration_softmax_mass(model, sample, pad_id, recipe.loss.weights_at(0),
                                        recipe.train.micro_batch_size, recipe.loss.chunk_size)
    return build_candidates(recipe.loss.vocab_subset_source, k, weight=weight, all_counts=all_counts,
                            target_counts=target_counts, probability_mass=mass)


@torch.no_grad()
def calibration_softmax_mass(model, examples: list[Example], pad_id: int, weights: SpanWeights, batch_size: int,
                             chunk_size: int) -> torch.Tensor:
    """(V,) Σ softmax over the loss-carrying positions of ``examples``: where the model puts its probability."""
    was_training = model.training
    model.eval()
    lm = causal_lm(model)
    weight = dense_head_weight(lm.get_output_embeddings())  # (V, H); a quantized head: a transient copy
    mass = torch.zeros(weight.shape[0], dtype=torch.float64)
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id, weights)
        hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False).last_hidden_state[:, :-1]  # (B, T-1, H)
        keep = batch["labels"][:, 1:] != -100
        mass += softmax_mass(hidden[keep], weight, chunk_size=chunk_size)  # (V,)
    model.train(was_training)
    return mass


def setup_optimizer(recipe: Recipe, model, total_steps: int | None = None):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    o = recipe.optim
    if o.name == "mezo":
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        optimizer = MeZO(named, lr=o.lr, eps=o.zo_eps, weight_decay=o.weight_decay, samples=o.zo_samples,
                         seed=recipe.train.seed)
    else:
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    total = total_steps or recipe.train.steps

    def schedule(step: int) -> float:
        return lr_lambda(step, warmup=o.warmup_steps, total=total, schedule=o.scheduler, min_ratio=o.min_lr_ratio)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


# ----------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    ledger: dict  # also written to RUN_DIR/ledger.json
    model: torch.nn.Module
    tokenizer: object


def train(recipe: Recipe, *, resume: bool = False, quiet: bool = False, model=None, tokenizer=None,
          recipe_path: str | None = None) -> TrainResult:
    """Run SFT as the recipe says; return the ledger and the trained model.

    ``model``/``tokenizer``: continue training this (already adapted) model instead of loading
    `model.path` and adding a fresh adapter -- expert iteration (`leantune rft`) trains one adapter
    across rounds this way.

    With ``memory.budget`` set, the run is planned first (model config only) and refused with
    ``BudgetError``, naming settings that fit, before any data, weights or run directory are touched.
    """
    cfg = recipe.train
    if recipe.data.train is None:
        raise RecipeError("data.train: leantune train needs training data (a .jsonl or .parquet file)")
    if recipe.memory.budget is not None:
        from leantune.plan.search import check_budget

        check_budget(recipe, recipe_path, mode="sft")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.malloc_mmap_threshold is not None:
        set_malloc_mmap_threshold(cfg.malloc_mmap_threshold)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = run_dir / "checkpoints"
    resume_from = latest_checkpoint(ckpt_root) if resume else None
    if resume and resume_from is None and not quiet:
        print(f"[leantune] no checkpoint under {ckpt_root}; starting from scratch")
    if not resume and latest_checkpoint(ckpt_root) is not None:
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another train.output_dir"
        )

    memory = ledger_mod.PeakMemory()
    memory.start()
    energy = ledger_mod.EnergyMeter()
    energy.start()
    torch.manual_seed(cfg.seed)

    if model is None:
        model, tokenizer, source, n_ckpt_layers, quant = setup_model(recipe)
        model_location = source.weight_path
    else:
        n_ckpt_layers, quant, model_location = 0, None, resolve_source(recipe.model).weight_path
    train_examples, stats, eval_examples = _setup_data(recipe, tokenizer)
    if not quiet:
        print(f"[leantune] data: {stats.as_dict()}")
    candidates = _setup_loss(recipe, model, train_examples, tokenizer.pad_token_id)
    if candidates is not None and not quiet:
        print(f"[leantune] loss: APPROXIMATE vocabulary subset, {candidates.numel()} candidates "
              f"({recipe.loss.vocab_subset_source}) + each step's targets; eval_loss stays exact")
    optimizer, scheduler = setup_optimizer(recipe, model)
    pad_id = tokenizer.pad_token_id
    subset_rows = []  # |subset| of every step (vocabulary-subset loss only), for the FLOPs bill

    # ---- resume state
    step, micro_step = 0, 0
    totals = {"tokens": 0, "trainable_tokens": 0, "loss_weight": 0.0, "elapsed_s": 0.0}
    metrics_path = run_dir / "metrics.jsonl"
    if resume_from is not None:
        tensors, payload, state = load_checkpoint(resume_from)
        load_trainable_state(model, tensors)
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        set_rng_state(payload["rng"])
        step, micro_step, totals = state["step"], state["micro_step"], state["totals"]
        # Steps logged after the checkpoint by the killed run are replayed: drop their lines.
        kept = [m for m in ledger_mod.read_metrics(metrics_path) if m.get("step", 0) <= step]
        ledger_mod.atomic_write_text(metrics_path, "".join(json.dumps(m) + "\n" for m in kept))
        if not quiet:
            print(f"[leantune] resumed from {resume_from} at step {step}")
    elif metrics_path.exists():
        metrics_path.unlink()
    ledger_mod.atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    metrics = ledger_mod.MetricsLog(metrics_path)

    # Energy and peak memory of earlier (killed) segments of this run, carried by the checkpoint.
    prior_joules = totals.get("energy_joules", 0.0)
    prior_peak = totals.get("peak_rss_bytes", 0)

    def checkpoint():
        totals["energy_joules"] = prior_joules + energy.reading()["joules"]
        totals["peak_rss_bytes"] = max(prior_peak, memory.peak_rss_bytes)
        save_checkpoint(
            ckpt_root, step, trainable_state(model), optimizer, scheduler,
            {"step": step, "micro_step": micro_step, "totals": totals},
        )

    params = [p for p in model.parameters() if p.requires_grad]
    spill = None
    if cfg.offload_checkpoints and not isinstance(optimizer, MeZO):  # MeZO keeps no activations for backward
        from leantune.train.offload import ActivationSpill

        spill = ActivationSpill(model, run_dir)
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=quiet or not cfg.progress, dynamic_ncols=True)
    t_last = time.perf_counter()
    row: dict = {}  # stays empty when a finished run is resumed
    model.train()
    while step < cfg.steps:
        weights = recipe.loss.weights_at(step)
        batches = [
            collate(batch_at(train_examples, micro_step + i, cfg.micro_batch_size, cfg.seed, recipe.data.shuffle),
                    pad_id, weights)
            for i in range(cfg.grad_accum)
        ]
        micro_step += cfg.grad_accum
        zo = None
        subset = step_vocab_subset(candidates, batches)
        if subset is not None:
            subset_rows.append(subset.numel())
        if isinstance(optimizer, MeZO):
            step_loss, norm, zo = zeroth_order_step(optimizer, model, batches, recipe.loss.chunk_size, subset)
        else:
            step_loss, norm = accumulate_gradients(model, batches, recipe.loss.chunk_size, subset, spill)
        for batch in batches:
            totals["tokens"] += int(batch["attention_mask"].sum())
            totals["trainable_tokens"] += int((batch["labels"][:, 1:] != -100).sum())
        totals["loss_weight"] += norm
        lr = scheduler.get_last_lr()[0]
        if zo is not None:  # already stepped; |g| is the only gradient MeZO sees
            grad_norm = abs(zo["projected_grad"])
        else:
            clip = recipe.optim.max_grad_norm
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        now = time.perf_counter()
        dt, t_last = now - t_last, now
        totals["elapsed_s"] += dt
        step_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        rss = memory.sample()
        row = {
            "step": step, "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm),
            "tokens": totals["tokens"], "trainable_tokens": totals["trainable_tokens"],
            "tokens_per_s": step_tokens / max(dt, 1e-9), "rss_bytes": rss, "elapsed_s": totals["elapsed_s"],
        }
        if zo is not None:
            row.update(projected_grad=zo["projected_grad"], zo_restore_bytes=zo["restore_bytes"])
        is_last = step == cfg.steps
        if eval_examples and ((cfg.eval_every and step % cfg.eval_every == 0) or is_last):
            row.update(evaluate_loss(model, eval_examples, pad_id, weights, cfg.micro_batch_size,
                                     recipe.loss.chunk_size))
            t_last = time.perf_counter()  # evaluation time is not training time
        if step % cfg.log_every == 0 or is_last or "eval_loss" in row:
            metrics.log(row)
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", rss=f"{rss / 2**30:.2f}G")
        bar.update(1)
        if (cfg.save_every and step % cfg.save_every == 0) or is_last:
            checkpoint()
    bar.close()
    offloaded = None
    if spill is not None:
        offloaded = {"slots_written": spill.slots_written, "bytes_written": spill.bytes_written}
        spill.close()

    save_adapter_or_model(model, tokenizer, recipe, run_dir)
    energy_report = energy.stop()
    memory.stop()
    if prior_joules:
        energy_report["joules_this_segment"] = energy_report["joules"]
        energy_report["joules"] += prior_joules
        energy_report["note"] = "includes earlier segments of this run (resumed from a checkpoint)"
    flops = ledger_mod.flops_from_model(
        model,
        tokens=totals["tokens"],
        loss_tokens=totals["trainable_tokens"],
        seq_len=stats.tokens / max(1, stats.examples),  # mean example length, for the attention term
        checkpoint_fraction=n_ckpt_layers / max(1, causal_lm(model).config.num_hidden_layers),
        lm_head_rows=round(sum(subset_rows) / len(subset_rows)) if subset_rows else None,
    )
    if isinstance(optimizer, MeZO):
        flops = ledger_mod.zeroth_order_flops(flops, forward_passes=2 * recipe.optim.zo_samples)
    run_totals = {
        "steps": step,
        "tokens_processed": totals["tokens"],
        "trainable_tokens": totals["trainable_tokens"],
        "wall_time_s": totals["elapsed_s"],
        "peak_rss_bytes": max(prior_peak, memory.peak_rss_bytes),
        "cuda_max_allocated_bytes": memory.cuda_peak_bytes,
        "data": stats.as_dict(),
    }
    data_files = [recipe.data.train] + ([recipe.data.eval] if recipe.data.eval else [])
    ledger = ledger_mod.build_ledger(
        recipe=recipe.model_dump(mode="json"), data_files=data_files, model_location=model_location,
        seed=cfg.seed, totals=run_totals, flops=flops, energy=energy_report,
        extra={"resumed": resume_from is not None, "final_metrics": row, "quant": quant,
               "loss": loss_note(recipe, candidates, subset_rows), "offloaded_checkpoints": offloaded},
    )
    ledger_mod.write_ledger(run_dir, ledger)
    return TrainResult(ledger, model, tokenizer)


def loss_note(recipe: Recipe, candidates: torch.Tensor | None, subset_rows: list[int]) -> dict:
    """The ledger's account of which loss was trained: exact, or the approximate vocabulary subset."""
    if candidates is None:
        return {"kind": "exact cross-entropy (chunked linear_cross_entropy, logits masking)"}
    return {
        "kind": "APPROXIMATE vocabulary-subset cross-entropy (arXiv 2606.19528)",
        "vocab_subset": recipe.loss.vocab_subset,
        "vocab_subset_source": recipe.loss.vocab_subset_source,
        "vocab_subset_calibration": recipe.loss.vocab_subset_calibration
        if recipe.loss.vocab_subset_source == "probability" else None,
        "candidates": candidates.numel(),
        "subset_size_mean": sum(subset_rows) / len(subset_rows) if subset_rows else None,
        "subset_size_max": max(subset_rows, default=None),
        "note": "softmax over candidates + each step's targets only; the logged training loss is a lower "
                "bound of the exact loss; eval_loss is the exact loss",
    }


def save_adapter_or_model(model, tokenizer, recipe: Recipe, run_dir: Path) -> Path:
    """Final export into the run directory: RUN/adapter (LoRA, PEFT format) or RUN/model (full)."""
    if recipe.adapter.method == "lora":
        return save_adapter(model, run_dir / "adapter")
    from leantune.adapters.lora import save_full_model

    return save_full_model(model, tokenizer, run_dir / "model")
