"""`leantune dpo`: preference optimization (DPO / IPO / SimPO) at leantune's memory.

One step, as the loop below reads:

1. the step's micro-batches of pairs (a seeded order over the data, a function of the step: resume replays it);
2. the reference's summed log-probs of each chosen and rejected completion: the same model with its LoRA adapter
   disabled, no gradient (never a second copy of the model), or the table `dpo.precompute_reference` filled with
   one no-grad pass before training (two floats per pair); reference-free losses (SimPO) skip this;
3. the policy's summed log-probs with gradient, then the loss (``PREFERENCE_LOSSES``, each reducing by its own
   rule over the step's pairs), backward per micro-batch, one optimizer step.

Memory: a pair's chosen and rejected completions share its prompt, so the prompt goes through the decoder once
(`completion_logprobs` indexes its keys and values out to both completions; autograd adds their gradients back),
and only completion positions reach the LM head, chunk by chunk (`linear_token_logprobs`): the [tokens, vocab]
logits never exist. TRL's DPOTrainer runs prompt + completion twice per pair, for the policy and again for the
reference. With activation checkpointing the prompt runs once per completion (the shared cache is dropped under
checkpointing).

Accumulation: each micro-batch's loss is divided by the step's pair count (over every micro-batch and process),
so micro-batch 8 x accumulation 1 equals 1 x 8. Several processes (torchrun, DDP only): rank r runs its
micro-batches and the adapter's gradients are summed over ranks before the step, as in ``leantune rl``.

Active pair selection (``dpo.active``, arXiv 2511.04286): ``data.train`` is a pool of unlabelled pairs; before
the steps where a round is due, `leantune.active.rounds.ActivePairs` picks pairs, asks the labeller for those only
and the loop goes on with the same step over every pair labelled so far. Labels spent are a ledger total
(``totals.labels``) beside tokens and joules.

Everything around the step (device, model and adapter, optimizer, resume, checkpoints, metrics, ledger) is the
run session's (``leantune.train.session``). Run: ``leantune dpo recipes/dpo_smollm2.yaml``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass

import torch

from leantune import ledger as ledger_mod
from leantune.adapters.lora import low_precision_lora
from leantune.config import DPOConfig, Recipe, RecipeError
from leantune.data.preference import Pair, PairRecord, read_pair_rows, tokenize_pairs
from leantune.data.records import DataError
from leantune.data.sft import batch_at
from leantune.distributed import all_gather_objects, all_reduce_gradients, all_reduce_sum, rank_micro_steps
from leantune.losses.preference import PREFERENCE_LOSSES, PreferenceStats
from leantune.rl.rollout import completion_logprobs
from leantune.train.session import RunSession, TrainResult

# ----------------------------------------------------------------------------------------------
# Pure pieces the loop calls


def pair_logps(model, pairs: list[Pair], *, pad_id: int, chunk_size: int, low_precision=None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen, rejected, chosen_tokens, rejected_tokens), each (P,): Σ_t log pi(y_t | x, y_<t) of each pair's
    completions and their token counts, with gradient when grad is enabled. The batch is [c_0, r_0, c_1, r_1, ...]
    over shared prompts: each distinct prompt is prefilled once. ``low_precision``: a
    `leantune.adapters.lora.LowPrecisionLoRA` whose ``forward()`` wraps the decoder (bf16 LoRA matmuls)."""
    prompts = [p.prompt_ids for p in pairs for _ in range(2)]
    completions = [c for p in pairs for c in (p.chosen_ids, p.rejected_ids)]
    ctx = low_precision.forward if low_precision is not None else contextlib.nullcontext
    logps, _, mask = completion_logprobs(model, prompts, completions, pad_id=pad_id, chunk_size=chunk_size,
                                         decoder_context=ctx)  # (2P, T)
    sums, tokens = (logps * mask).sum(-1), mask.sum(-1)  # (2P,)
    return sums[0::2], sums[1::2], tokens[0::2], tokens[1::2]


@contextlib.contextmanager
def reference_context(model, disable_adapter: bool):
    """No gradient, and the adapter disabled when the reference is the base (a PEFT model's own switch)."""
    with torch.no_grad(), model.disable_adapter() if disable_adapter else contextlib.nullcontext():
        yield


def precompute_reference(model, pairs: list[Pair], *, batch_size: int, pad_id: int, chunk_size: int,
                         disable_adapter: bool, dist=None) -> tuple[list[float], list[float]]:
    """The reference's summed log-probs of every pair, (chosen, rejected) lists of floats, one no-grad pass in
    eval mode (no dropout). With several processes rank r scores batches r, r + W, ... and the tables are gathered."""
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    was_training = model.training
    model.eval()
    mine: dict[int, tuple[float, float]] = {}
    try:
        with reference_context(model, disable_adapter):
            for start in range(rank * batch_size, len(pairs), world * batch_size):
                chunk = pairs[start : start + batch_size]
                c, r, _, _ = pair_logps(model, chunk, pad_id=pad_id, chunk_size=chunk_size)
                mine.update({start + i: (float(a), float(b)) for i, (a, b) in enumerate(zip(c.tolist(), r.tolist()))})
    finally:
        model.train(was_training)
    if world > 1:
        for part in all_gather_objects(mine, dist):
            mine.update(part)
    return [mine[i][0] for i in range(len(pairs))], [mine[i][1] for i in range(len(pairs))]


@dataclass
class DPOTotals:
    """Run totals, carried by checkpoints."""

    pairs: int = 0
    tokens: int = 0  # through the decoder with gradient: each micro-batch's distinct prompts once + completions
    completion_tokens: int = 0  # scored by the LM head with gradient (chosen + rejected)
    reference_tokens: int = 0  # through the decoder without gradient (live reference or the precomputed pass)
    reference_completion_tokens: int = 0
    elapsed_s: float = 0.0
    reference_s: float = 0.0


@dataclass
class StepResult:
    loss: float
    stats: PreferenceStats
    tokens: int
    completion_tokens: int
    reference_tokens: int
    reference_completion_tokens: int


def _decoder_tokens(pairs: list[Pair], shared: bool) -> tuple[int, int]:
    """(tokens the decoder runs, completion tokens) for one forward over ``pairs``."""
    prompts = {p.prompt_ids for p in pairs}
    completion = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    prompt = sum(len(p) for p in prompts) if shared else 2 * sum(len(p.prompt_ids) for p in pairs)
    return prompt + completion, completion


def micro_batch_loss(model, pairs: list[Pair], idx: list[int], dpo: DPOConfig, *, beta: float, num_pairs: float,
                     pad_id: int, chunk_size: int, reference: tuple[list[float], list[float]] | None,
                     low_precision=None) -> tuple[torch.Tensor, PreferenceStats, bool]:
    """(loss, stats, whether the reference ran) of pairs ``idx``: the loss of ``dpo.loss`` divided by ``num_pairs``.

    ``reference``: the precomputed (chosen, rejected) table, indexed by pair; None: when the loss needs a
    reference, the adapter-disabled model scores the micro-batch first (no gradient).
    """
    entry = PREFERENCE_LOSSES[dpo.loss]
    batch = [pairs[i] for i in idx]
    ref_c = ref_r = None
    live = entry.needs_reference and reference is None
    if entry.needs_reference and reference is not None:
        ref_c, ref_r = (torch.tensor([table[i] for i in idx]) for table in reference)
    elif live:
        with reference_context(model, disable_adapter=True):
            ref_c, ref_r, _, _ = pair_logps(model, batch, pad_id=pad_id, chunk_size=chunk_size)
    c, r, c_tok, r_tok = pair_logps(model, batch, pad_id=pad_id, chunk_size=chunk_size, low_precision=low_precision)
    if ref_c is not None:
        ref_c, ref_r = ref_c.to(c), ref_r.to(c)
    loss, stats = entry.fn(c, r, ref_c, ref_r, c_tok, r_tok, beta=beta, gamma=dpo.gamma,
                           label_smoothing=dpo.label_smoothing, num_pairs=num_pairs)
    return loss, stats, live


def dpo_step(model, micro: list[list[int]], pairs: list[Pair], dpo: DPOConfig, *, beta: float, num_pairs: float,
             pad_id: int, chunk_size: int, reference: tuple[list[float], list[float]] | None,
             shared_prompts: bool = True, low_precision=None) -> StepResult:
    """Backward over one optimizer step's micro-batches (pair indices) on this process; the caller steps.
    ``num_pairs``: the step's pairs over every micro-batch and process, the loss's normalizer; ``reference`` as
    in `micro_batch_loss`. ``low_precision``: a `leantune.adapters.lora.LowPrecisionLoRA` (bf16 LoRA matmuls in
    the policy's forward; its ``step()`` spans forward and backward)."""
    out = StepResult(0.0, PreferenceStats(), 0, 0, 0, 0)
    for idx in micro:
        with low_precision.step() if low_precision is not None else contextlib.nullcontext():
            loss, stats, ran_reference = micro_batch_loss(model, pairs, idx, dpo, beta=beta, num_pairs=num_pairs,
                                                          pad_id=pad_id, chunk_size=chunk_size, reference=reference,
                                                          low_precision=low_precision)
            loss.backward()
        out.loss += float(loss.detach())
        out.stats = out.stats + stats
        batch = [pairs[i] for i in idx]
        n, k = _decoder_tokens(batch, shared=shared_prompts)
        out.tokens += n
        out.completion_tokens += k
        if ran_reference:
            n, k = _decoder_tokens(batch, shared=True)  # no grad: always prompt-shared
            out.reference_tokens += n
            out.reference_completion_tokens += k
    return out


@torch.no_grad()
def evaluate_pairs(model, pairs: list[Pair], dpo: DPOConfig, *, beta: float, pad_id: int, chunk_size: int,
                   batch_size: int, reference: tuple[list[float], list[float]] | None) -> dict[str, float]:
    """The loss and TRL's metrics, mean over ``pairs`` (held out), no gradient, eval mode: ``eval_loss``,
    ``eval_rewards/chosen``, ... (TRL's eval names)."""
    was_training = model.training
    model.eval()
    loss, stats = 0.0, PreferenceStats()
    try:
        for start in range(0, len(pairs), batch_size):
            idx = list(range(start, min(start + batch_size, len(pairs))))
            part, st, _ = micro_batch_loss(model, pairs, idx, dpo, beta=beta, num_pairs=len(pairs), pad_id=pad_id,
                                           chunk_size=chunk_size, reference=reference)
            loss += float(part)
            stats = stats + st
    finally:
        model.train(was_training)
    return {"eval_loss": loss, **{f"eval_{k}": v for k, v in stats.as_metrics().items()}}


# ----------------------------------------------------------------------------------------------
# The loop


def train_dpo(recipe: Recipe, *, resume: bool = False, quiet: bool = False, model=None, tokenizer=None,
              recipe_path: str | None = None) -> TrainResult:
    """Run DPO / IPO / SimPO as the recipe says (``dpo`` section); return the ledger and the policy.

    Every row is validated before anything is written (a bad row is a DataError naming file:line and field).
    ``model``/``tokenizer``: train this (already adapted) model instead of loading `model.path` (+ `dpo.init`).
    """
    recipe.require_for("dpo")
    if recipe.memory.budget is not None:  # refused before the pairs are read (the session checks it again, cheaply)
        from leantune.plan.search import check_budget

        check_budget(recipe, recipe_path, mode="dpo")
    pool = None
    if recipe.dpo.active.enabled:  # a pool of unlabelled pairs (response a in the chosen slot) + its labeller
        from leantune.active.pool import build_labeler, read_pool

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would call the labeller: labels paid N times
            raise RecipeError("dpo.active runs in one process (each rank would ask for the same labels); launch "
                              "without torchrun / --nproc")

        rows, column = read_pool(recipe.data.train, recipe.data, recipe.dpo.active)
        records = [r.as_pair_record() for r in rows]
        pool = build_labeler(recipe.dpo.active, rows, column)
    else:
        records = read_pair_rows(recipe.data.train, recipe.data)
    eval_records = read_pair_rows(recipe.data.eval, recipe.data, role="eval") if recipe.data.eval else []
    session = RunSession(recipe, "dpo", resume=resume, quiet=quiet, recipe_path=recipe_path, model=model,
                         tokenizer=tokenizer, init=recipe.dpo.init)
    with session:
        return _train_dpo(session, records, eval_records, labeler=pool)


def _reference_table(session: RunSession, pairs: list[Pair], key: str, totals: DPOTotals, pad_id: int
                     ) -> tuple[list[float], list[float]]:
    """The precomputed reference of ``pairs``: from the checkpoint's ``key`` when resuming, else scored now.

    The reference is the starting policy: the base for a fresh LoRA adapter (its B is zero), the loaded adapter
    for dpo.init, the initial weights for full fine-tuning."""
    saved = session.trainer_state.get(key)
    if saved is not None:
        if len(saved["chosen"]) != len(pairs):
            raise RecipeError(f"{len(pairs)} pairs now, {len(saved['chosen'])} when this run started; the data "
                              "changed. Resume with the original data or start a new run.")
        return saved["chosen"], saved["rejected"]
    if session.step > 0:  # resumed from a checkpoint that holds no table: the starting policy is gone
        raise RecipeError(f"{session.resumed_from}: this checkpoint holds no precomputed reference for {key}; it can "
                          "only be scored by the starting policy. Start a new run (or drop data.eval).")
    t0 = time.perf_counter()
    table = precompute_reference(session.model, pairs, batch_size=session.recipe.train.micro_batch_size,
                                 pad_id=pad_id, chunk_size=session.recipe.loss.chunk_size, disable_adapter=False,
                                 dist=session.dist)
    totals.reference_s += time.perf_counter() - t0
    for p in pairs:
        n, k = _decoder_tokens([p], shared=True)
        totals.reference_tokens += n
        totals.reference_completion_tokens += k
    session.info(f"reference: {len(pairs)} pairs scored in {time.perf_counter() - t0:.1f}s")
    return table


def _active_pairs(session: RunSession, pool: list[Pair], records: list[PairRecord], labeler, eval_pairs: list[Pair]):
    """The `ActivePairs` of an active run: the labeller sees row indices of the pool file, the rounds see the
    tokenized pool (pairs dropped as overlong are never offered); restored from the checkpoint when resuming."""
    from leantune.active.rounds import ActivePairs

    row_of = {r.source: i for i, r in enumerate(records)}
    rows = [row_of[p.source] for p in pool]
    recipe = session.recipe
    active = ActivePairs(pool, lambda j: labeler(rows[j]), recipe.dpo.active, steps=recipe.train.steps,
                         seed=recipe.train.seed, eval_pairs=eval_pairs)
    if session.trainer_state.get("active"):
        active.load_state_dict(session.trainer_state["active"])
    return active


def _train_dpo(session: RunSession, records: list[PairRecord], eval_records: list[PairRecord], *,
               labeler=None) -> TrainResult:
    recipe, cfg, dpo, model, dist = session.recipe, session.recipe.train, session.recipe.dpo, session.model, session.dist
    tokenizer = session.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs, stats = tokenize_pairs(records, tokenizer, recipe.data)
    if not pairs:
        raise DataError(f"{recipe.data.train}: all {stats.records} pairs were dropped (longer than data.max_length="
                        f"{recipe.data.max_length} tokens); raise data.max_length")
    session.info(f"data: {stats.as_dict()}")
    entry = PREFERENCE_LOSSES[dpo.loss]
    beta = dpo.beta if dpo.beta is not None else entry.default_beta
    chunk = recipe.loss.chunk_size
    state = session.trainer_state
    totals = DPOTotals(**state["totals"]) if state.get("totals") else DPOTotals()
    eval_pairs = tokenize_pairs(eval_records, tokenizer, recipe.data)[0] if eval_records else []
    if eval_records and not eval_pairs:
        raise DataError(f"{recipe.data.eval}: every pair is longer than data.max_length={recipe.data.max_length}")
    reference = eval_reference = None
    if entry.needs_reference and dpo.precompute_reference:
        reference = _reference_table(session, pairs, "reference", totals, pad_id)
        if eval_pairs:
            eval_reference = _reference_table(session, eval_pairs, "eval_reference", totals, pad_id)
    shared = session.checkpointed_layers == 0
    low_precision = low_precision_lora(model, recipe)
    if low_precision is not None:
        session.auto_choices["adapter.compute_dtype"] = ("bfloat16: the policy's LoRA matmuls under bf16 autocast over "
                                                         "the bf16 base, fp32 adapter weights and optimizer state")
    params = [p for p in model.parameters() if p.requires_grad]
    active = None
    if labeler is not None:  # dpo.active: train on the pool pairs labelled so far
        active = _active_pairs(session, pairs, records, labeler, eval_pairs)
        pairs = active.train_pairs()
    order = list(range(len(pairs)))
    bar = session.progress("dpo")
    row: dict = {}  # stays empty when a finished run is resumed
    model.train()
    while session.step < cfg.steps:
        round_row: dict = {}
        while active is not None and active.due(session.step):  # select -> label, then train on all labelled
            report = active.run_round(model, pad_id=pad_id, batch_size=cfg.micro_batch_size)
            round_row = report.as_metrics()
            session.info(f"round {report.round}: {report.picked} labelled, {report.labels_spent}/"
                         f"{dpo.active.label_budget} labels spent, {report.labelled_pairs} preferences")
            pairs = active.train_pairs()
            order = list(range(len(pairs)))
        micro = [batch_at(order, i, cfg.micro_batch_size, cfg.seed, recipe.data.shuffle)
                 for i in rank_micro_steps(session.step, cfg.grad_accum, dist.world_size, dist.rank)]
        num_pairs = all_reduce_sum(sum(len(m) for m in micro), dist)
        with session.timed() as dt, session.step_guard():
            res = dpo_step(model, micro, pairs, dpo, beta=beta, num_pairs=num_pairs, pad_id=pad_id, chunk_size=chunk,
                           reference=reference, shared_prompts=shared, low_precision=low_precision)
            if dist.world_size > 1:
                all_reduce_gradients(params, dist)
                res.loss = all_reduce_sum(res.loss, dist)
                res.stats = PreferenceStats(*(all_reduce_sum(v, dist) for v in dataclasses.astuple(res.stats)))
            clip = recipe.optim.max_grad_norm
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf")))
            session.optimizer.step()
            lr = session.scheduler.get_last_lr()[0]
            session.scheduler.step()
            session.optimizer.zero_grad(set_to_none=True)
        session.step += 1
        totals.pairs += int(num_pairs)
        totals.tokens += res.tokens
        totals.completion_tokens += res.completion_tokens
        totals.reference_tokens += res.reference_tokens
        totals.reference_completion_tokens += res.reference_completion_tokens
        totals.elapsed_s += dt[0]
        rss = session.memory.sample()
        row = {"step": session.step, "loss": res.loss, "lr": lr, "grad_norm": grad_norm, **res.stats.as_metrics(),
               "pairs": totals.pairs, "tokens": totals.tokens, "tokens_per_s": res.tokens / max(dt[0], 1e-9),
               "rss_bytes": rss, "elapsed_s": totals.elapsed_s}
        if active is not None:
            row.update({"labels_spent": active.ledger.spent, "labelled_pairs": len(pairs), **round_row})
        if eval_pairs and ((cfg.eval_every and session.step % cfg.eval_every == 0) or session.step == cfg.steps):
            row.update(evaluate_pairs(model, eval_pairs, dpo, beta=beta, pad_id=pad_id, chunk_size=chunk,
                                      batch_size=cfg.micro_batch_size, reference=eval_reference))
        session.log(row, force="eval_loss" in row or bool(round_row))
        bar.set_postfix(loss=f"{res.loss:.4f}", acc=f"{row['rewards/accuracies']:.2f}", rss=f"{rss / 2**30:.2f}G")
        bar.update(1)
        if session.should_save():
            session.save_checkpoint({"totals": dataclasses.asdict(totals),
                                     "active": active.state_dict() if active is not None else None, **{
                key: None if table is None else {"chosen": table[0], "rejected": table[1]}
                for key, table in (("reference", reference), ("eval_reference", eval_reference))}})
    bar.close()
    ledger_totals = _ledger_totals(session.step, totals, stats)
    flops = _dpo_flops(model, totals, stats)
    extra = {}
    if active is not None:  # labels are a cost like tokens and joules; feature passes are forward-only FLOPs
        ledger_totals["labels"] = {**active.ledger.summary(), "labeler": dpo.active.labeler,
                                   "select": dpo.active.select, "pool_pairs": len(active.pairs),
                                   "feature_tokens": active.feature_tokens, "selection_s": active.seconds}
        feat = ledger_mod.zeroth_order_flops(ledger_mod.flops_from_model(
            model, tokens=active.feature_tokens, loss_tokens=0, seq_len=max(1, stats.prompt_tokens // max(1, stats.pairs))),
            forward_passes=1)["total"] if active.feature_tokens else 0
        flops = {**flops, "total": flops["total"] + feat, "active_features": feat,
                 "method": flops["method"] + "; active features = one forward pass per token"}
        extra["active"] = dpo.active.model_dump()
    return session.finish(totals=ledger_totals, flops=flops,
                          data_files=[recipe.data.train] + ([recipe.data.eval] if recipe.data.eval else []),
                          extra={"kind": "dpo", "final_metrics": row, **extra,
                                 "preference": {"loss": dpo.loss, "beta": beta, "reference": (
                                     "none" if not entry.needs_reference else "precomputed"
                                     if dpo.precompute_reference else "adapter disabled")}})


def _ledger_totals(steps: int, t: DPOTotals, stats) -> dict:
    return {"steps": steps, "tokens_processed": t.tokens, "trainable_tokens": t.completion_tokens,
            "wall_time_s": t.elapsed_s, "data": stats.as_dict(), "preference": dataclasses.asdict(t)}


def _dpo_flops(model, t: DPOTotals, stats) -> dict:
    """FLOPs estimate: forward + backward over the policy's tokens (the LM head on completion tokens only), plus
    one forward over the reference's tokens (live or precomputed)."""
    seq = round((stats.prompt_tokens + (stats.chosen_tokens + stats.rejected_tokens) / 2) / max(1, stats.pairs))
    policy = ledger_mod.flops_from_model(model, tokens=t.tokens, loss_tokens=t.completion_tokens, seq_len=seq)
    ref_total = 0
    if t.reference_tokens:
        ref_total = ledger_mod.zeroth_order_flops(
            ledger_mod.flops_from_model(model, tokens=t.reference_tokens, loss_tokens=t.reference_completion_tokens,
                                        seq_len=seq), forward_passes=1)["total"]
    return {"total": policy["total"] + ref_total, "policy": policy["total"], "reference": ref_total,
            "method": "estimate: policy = " + policy["method"] + "; reference = one forward pass per token"}
