"""`leantune rl`: RL with verifiable rewards (GRPO / DAPO / Dr.GRPO) that wastes no rollouts.

One step, as the loop below reads:

1. pick prompts: a seeded stream over the pool, skipping prompts the selector says are stale (their last
   groups were all solved or all failed; HIVE, arXiv 2603.25184), optionally keeping the highest-entropy ones;
2. sample G completions per prompt with a KV cache, each stopping as soon as its answer is closed; with
   `rl.router` on, a probe on the prefill's middle-layer state sets each prompt's own group size (0: skipped;
   arXiv 2511.03808, ``leantune.rl.router``) and learns from the outcomes;
3. score them (the task's verifier plus weighted extra terms, ``leantune.rl.rewards.REWARDS``);
4. dynamic sampling: drop groups whose rewards are all equal, sample more prompts until the batch holds
   `rl.prompts_per_step` groups or `rl.max_sampling_rounds` is reached (DAPO, arXiv 2503.14476);
5. advantages per group, overlong completions masked out, then `rl.updates_per_batch` optimizer steps of the
   policy loss (``POLICY_LOSSES``, each reducing by its own rule over the step's ``PolicyWindow``) over
   micro-batches -- completions with zero advantage are skipped when there is no KL term (they carry no
   gradient). `rl.entropy_reg` adds an entropy / logit-gradient correlation term to the loss (after arXiv
   2605.17770, ``entropy_gradient_penalty``). An optimizer that needs no backward (``optim.name: mezo``) instead takes one zeroth-order step on
   the reward itself (`zeroth_order_update`).

The KL reference is the same model with the adapter disabled (never a second copy). Checkpoints hold the
adapter, optimizer, scheduler, RNG, the prompt stream, the selector and the sampler's generator, so a killed
run resumes exactly. Everything around the step is the run session's (``leantune.train.session``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch

from leantune.adapters.lora import causal_lm, low_precision_lora
from leantune.allocator import heap_allocator
from leantune.config import Recipe, RLConfig
from leantune.distributed import all_gather_objects, all_reduce_gradients, all_reduce_sum
from leantune.rl.advantages import ADVANTAGES, ragged_advantages
from leantune.rl.losses import DEFAULT_ADVANTAGE, POLICY_LOSSES, PolicyWindow, entropy_gradient_penalty
from leantune.rl.bill import RLTotals, ledger_totals, rl_flops
from leantune.rl.batch import (  # noqa: F401  (Batch, collect_batch: the sampling half of the step)
    Batch,
    Sampler,
    SamplingStats,
    _fields,
    check_prompt_lengths,
    collect_batch,
    load_prompt_pool,
    next_candidates,
)
from leantune.rl.rewards import build_rewards
from leantune.rl.router import DifficultyRouter
from leantune.rl.rollout import completion_logprobs, sample_groups
from leantune.rl.selection import PromptSelector, PromptStream
from leantune.rl.tree_opo import TREE_SCALE, build_tree, tree_advantages
from leantune.train.session import RunSession, TrainResult

# ----------------------------------------------------------------------------------------------
# The update


@dataclass
class UpdateStats:
    """What one step's update did: its loss, and the work it ran (for the ledger)."""

    loss: float = 0.0
    clip_fraction: float = 0.0
    kl: float = 0.0
    entropy_grad_corr: float | None = None  # rl.entropy_reg > 0: mean per-completion corr(entropy, logit-grad norm)
    grad_norm: float = 0.0
    sequences_trained: int = 0
    tokens_trained: int = 0
    update_tokens: int = 0  # tokens through the decoder: each micro-batch's distinct prompts once + completions
    overlong_masked: int = 0
    zo_rollouts: int = 0  # zeroth-order updates only: the re-sampling at theta +- eps z
    zo_tokens_generated: int = 0
    zo_prompt_tokens: int = 0
    zo_prefill_tokens: int = 0
    zo_reward_plus: float | None = None
    zo_reward_minus: float | None = None


def policy_update(model, optimizer, scheduler, batch: Batch, rl: RLConfig, *, pad_id: int, micro_batch: int,
                  chunk_size: int, max_grad_norm: float | None, dist=None, behaviour: bool = False,
                  low_precision=None) -> UpdateStats:
    """`rl.updates_per_batch` optimizer steps of the policy loss on one batch. ``dist``: with several processes
    (every rank holds the same batch), rank r runs micro-batches r, r + W, ... and the gradients are summed
    over ranks before the step, so W processes take the step one process takes. ``behaviour``: the batch was
    sampled by an older policy (`rl.async_rollouts`): the importance ratio is taken against the sampling
    policy's log-probs (``batch.logprobs``), as DAPO's clipping expects. ``low_precision``: a
    `leantune.adapters.lora.LowPrecisionLoRA` (bf16 LoRA matmuls over a bf16 base, as in `leantune train` and
    `leantune dpo`): every forward of the update runs under its ``forward()``, forward + backward under ``step()``."""
    g, n = rl.group_size, len(batch.rewards)
    loss_fn = POLICY_LOSSES[rl.loss]
    estimator = ADVANTAGES[rl.advantage or DEFAULT_ADVANTAGE[rl.loss]]
    if batch.node_sizes:  # rl.prefix_rollouts: each group is a tree; the baseline is the prefix's value
        adv = tree_advantages(torch.tensor(batch.rewards), batch.node_sizes, alpha=rl.prefix_rollouts.alpha,
                              scale=TREE_SCALE[rl.advantage or DEFAULT_ADVANTAGE[rl.loss]])
    else:
        adv = ragged_advantages(estimator, torch.tensor(batch.rewards), batch.group_sizes or g) if n else torch.zeros(0)
    lengths = [len(c) for c in batch.completion_ids]  # tokens through the decoder (tool answers included)
    # rl.tools: tool answers are context, not actions: only sampled tokens carry a loss (and count for DAPO)
    loss_mask = batch.loss_mask or [[1] * k for k in lengths]
    sampled = [sum(m) for m in loss_mask]
    # Overlong filtering (DAPO): a completion cut at max_new_tokens has no verdict on its ending; mask it.
    use = [not (rl.overlong_filter and t) for t in batch.truncated]
    window = PolicyWindow(num_sequences=n, num_tokens=float(max(sum(k for k, u in zip(sampled, use) if u), 1)),
                          max_completion_length=rl.max_new_tokens)
    # Sequences that carry gradient: non-zero advantage (or any, when the KL term is on), not masked, not empty.
    active = [i for i in range(n) if use[i] and sampled[i] > 0 and (rl.beta > 0 or adv[i] != 0)]
    params = [p for p in model.parameters() if p.requires_grad]
    micro = [active[i : i + micro_batch] for i in range(0, len(active), micro_batch)]
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    mine = list(enumerate(micro))[rank::world]  # (k, indices) of the micro-batches this rank runs
    ran = sum(len(p) for idx in micro for p in {tuple(batch.prompt_ids[i]) for i in idx}) + sum(lengths[i] for i in active)
    out = UpdateStats(sequences_trained=len(active), tokens_trained=sum(sampled[i] for i in active) * rl.updates_per_batch,
                      update_tokens=ran * rl.updates_per_batch, overlong_masked=sum(not u for u in use))
    if not active:
        return out
    device = next(iter(params)).device

    decoder_context = low_precision.forward if low_precision is not None else contextlib.nullcontext

    def logps_of(idx, grad: bool, grad_stats: bool = False):
        with contextlib.nullcontext() if grad else torch.no_grad():
            return completion_logprobs(model, [batch.prompt_ids[i] for i in idx], [batch.completion_ids[i] for i in idx],
                                       pad_id=pad_id, temperature=rl.temperature, chunk_size=chunk_size,
                                       grad_stats=grad_stats, decoder_context=decoder_context)

    ref = {}
    if rl.beta > 0:  # the reference: this model with its adapter disabled
        with model.disable_adapter():
            ref = {k: logps_of(idx, grad=False)[0] for k, idx in mine}
    old = {}
    if behaviour:  # the policy that sampled the batch (one step older)
        old = {k: _padded([batch.logprobs[i] for i in idx], device) for k, idx in mine}
    elif rl.updates_per_batch > 1:  # the behaviour policy's logps, before any update (ratio != 1 afterwards)
        old = {k: logps_of(idx, grad=False)[0] for k, idx in mine}
    model.train()
    stats_acc: dict[str, float] = {}
    for _ in range(rl.updates_per_batch):
        step_loss = 0.0
        for k, idx in mine:
            with low_precision.step() if low_precision is not None else contextlib.nullcontext():
                logps, entropy, mask, *gnorm = logps_of(idx, grad=True, grad_stats=rl.entropy_reg > 0)
                mask = mask * _padded([loss_mask[i] for i in idx], device).to(mask.dtype)  # (B, T): 0 on tool answers
                loss, st = loss_fn(logps, old.get(k), adv[idx].to(device), mask, epsilon_low=rl.epsilon_low,
                                   epsilon_high=rl.epsilon_high, beta=rl.beta, ref_logps=ref.get(k), window=window)
                if rl.entropy_reg > 0:  # CorR-PO-style term (arXiv 2605.17770), on top of whichever loss
                    reg = entropy_gradient_penalty(entropy, gnorm[0], mask, window=window)
                    loss = loss + rl.entropy_reg * reg
                    st = {**st, "entropy_grad_corr": float(reg.detach()) * window.num_sequences / len(idx)}
                loss.backward()
            step_loss += float(loss.detach())
            for key, v in st.items():
                stats_acc[key] = stats_acc.get(key, 0.0) + v * len(idx)
        if world > 1:
            all_reduce_gradients(params, dist)
            step_loss = all_reduce_sum(step_loss, dist)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        out.loss, out.grad_norm = step_loss, float(grad_norm)
    if world > 1:  # one collective on every rank: a rank with no micro-batch this step has no stats keys at all
        summed: dict[str, float] = {}
        for part in all_gather_objects(stats_acc, dist):
            for key, v in part.items():
                summed[key] = summed.get(key, 0.0) + v
        stats_acc = summed
    denom = len(active) * rl.updates_per_batch
    out.clip_fraction = stats_acc.get("clip_ratio/region_mean", 0.0) / denom
    out.kl = stats_acc.get("kl", 0.0) / denom if rl.beta > 0 else 0.0
    if rl.entropy_reg > 0:
        out.entropy_grad_corr = stats_acc.get("entropy_grad_corr", 0.0) / denom
    return out


def _padded(rows: list[list[float]], device) -> torch.Tensor:
    """(B, T) zero-padded float tensor of per-token values."""
    out = torch.zeros(len(rows), max((len(r) for r in rows), default=0), device=device)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=out.dtype)
    return out


def zeroth_order_update(model, tokenizer, optimizer, scheduler, batch: Batch, reward_fn, task, rl: RLConfig,
                        generator: torch.Generator) -> UpdateStats:
    """One zeroth-order step (an optimizer without backward, e.g. MeZO) on a non-differentiable objective:
    minus the mean reward of G completions per kept prompt, *re-sampled* at θ+εz and at θ-εz.

    No logprobs, no backward, no optimizer state: memory is that of sampling. Both evaluations replay the
    same sampling noise (the generator is reset; MeZO resets torch's RNG), so their difference comes from
    the perturbation, not from luck (common random numbers). Each step costs ``2 * optim.zo_samples``
    extra rounds of sampling on the kept prompts; they are counted in the ledger.
    """
    out = UpdateStats()
    if not batch.rows:
        return out
    g = rl.group_size
    prompts = [r["prompt"] for r in batch.rows]
    fields = _fields(batch.rows, g)
    state = generator.get_state()

    def objective() -> float:  # a float: the verifier's verdicts have no gradient
        generator.set_state(state)
        ro = sample_groups(model, tokenizer, prompts, group_size=g, max_new_tokens=rl.max_new_tokens,
                           temperature=rl.temperature, top_p=rl.top_p, stop=rl.stop,
                           is_complete=getattr(task, "is_complete", None), generator=generator,
                           fold_adapter=rl.fold_adapter, tools=rl.tools if rl.tools.enabled else None)
        out.zo_rollouts += len(ro)
        out.zo_tokens_generated += ro.tokens_generated
        out.zo_prompt_tokens += sum(len(p) for p in ro.prompt_ids)
        out.zo_prefill_tokens += ro.extra.get("prefill_tokens", 0)
        rewards = reward_fn([p for p in prompts for _ in range(g)], ro.texts, completion_ids=ro.completion_ids, **fields)
        return -sum(float(x) for x in rewards) / len(rewards)

    info = optimizer.step(objective)
    scheduler.step()
    out.loss, out.grad_norm, out.sequences_trained = info["loss"], abs(info["projected_grad"]), len(batch.rewards)
    out.zo_reward_plus, out.zo_reward_minus = -info["loss_plus"], -info["loss_minus"]
    return out


# ----------------------------------------------------------------------------------------------
# The loop


def step_metrics(step: int, s: SamplingStats, u: UpdateStats, rl: RLConfig, lr: float, dt: float) -> dict:
    """The metrics row of one RL step."""
    n_roll, g = max(1, s.rollouts), rl.group_size
    mean_r = s.reward_sum / n_roll
    row = {
        "step": step, "loss": u.loss, "lr": lr, "grad_norm": u.grad_norm,
        "reward_mean": mean_r, "reward_std": math.sqrt(max(0.0, s.reward_sq / n_roll - mean_r**2)),
        "pass@1": s.correct / n_roll, f"pass@{g}": s.pass_at_k_sum / max(1, s.groups),
        "completion_len": s.tokens_generated / n_roll,
        "entropy_mean": s.entropy_sum / max(1, s.tokens_generated),
        "high_entropy_frac": s.high_entropy / max(1, s.tokens_generated),
        "zero_variance_frac": s.zero_variance_groups / max(1, s.groups),
        "clip_fraction": u.clip_fraction, "truncated_frac": s.truncated / n_roll,
        "rollouts": s.rollouts, "rollouts_used": u.sequences_trained, "sampling_rounds": s.rounds,
        "prompts_skipped": s.prompts_skipped, "rollout_s": s.rollout_seconds, "step_s": dt,
    }
    if rl.router.enabled:
        row.update(router_prompts=s.router_prompts, router_skipped=s.router_skipped,
                   router_rollouts_saved=s.router_rollouts_saved,
                   router_group_size_min=min(s.router_sizes, default=None),
                   router_group_size_max=max(s.router_sizes, default=None),
                   router_brier=s.router_brier_sum / s.router_brier_n if s.router_brier_n else None)
    if rl.beta > 0:
        row["kl"] = u.kl
    if u.entropy_grad_corr is not None:
        row["entropy_grad_corr"] = u.entropy_grad_corr
    if rl.prefix_rollouts.enabled:  # pass@1 and reward_mean above include prefix-assisted completions
        row["prefix_tokens"] = s.prefix_tokens / n_roll
        row.update({f"prefix_reward@{d:.2f}": v / max(1, k) for d, (v, k) in sorted(s.depth_reward.items())})
    if rl.speculative != "off":
        row.update(spec_acceptance=s.acceptance_rate, tokens_per_forward=s.tokens_per_forward)
        if rl.speculative == "draft":
            row["draft_row_forwards"] = s.draft_row_forwards
    if rl.tools.enabled:
        row.update(tool_calls_per_completion=s.tool_calls / n_roll, tool_errors=s.tool_errors,
                   tool_error_frac=s.tool_errors / max(1, s.tool_calls), tool_tokens=s.tool_tokens)
    if u.zo_rollouts:
        row.update(zo_reward_plus=u.zo_reward_plus, zo_reward_minus=u.zo_reward_minus, zo_rollouts=u.zo_rollouts)
    return row


def train_rl(recipe: Recipe, *, resume: bool = False, quiet: bool = False, model=None, tokenizer=None,
             recipe_path: str | None = None) -> TrainResult:
    """Run RL as the recipe says; return the ledger and the policy. ``model``/``tokenizer``: start from these
    (e.g. the demo's SFT result) instead of loading `model.path` (+ `rl.init`)."""
    recipe.require_for("rl")
    reward_fn, correct_fn, task = build_rewards(recipe.rl)  # bad rewards or prompts fail before anything is written
    pool = load_prompt_pool(recipe)
    session = RunSession(recipe, "rl", resume=resume, quiet=quiet, recipe_path=recipe_path, model=model,
                         tokenizer=tokenizer, init=recipe.rl.init,
                         total_steps=recipe.train.steps * recipe.rl.updates_per_batch)
    with session:
        return _train_rl(session, pool, reward_fn, correct_fn, task)


def _train_rl(session: RunSession, pool, reward_fn, correct_fn, task) -> TrainResult:
    recipe, cfg, rl, model, tokenizer = session.recipe, session.recipe.train, session.recipe.rl, session.model, session.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    longest_prompt = check_prompt_lengths(pool, tokenizer, recipe.data.max_length, recipe.data.train or f"rl.task={rl.task}")
    stream = PromptStream(len(pool), seed=cfg.seed)
    selector = PromptSelector(rl.prompt_selection.window, rl.prompt_selection.cooldown_steps, rl.prompt_selection.enabled)
    generator = torch.Generator().manual_seed(cfg.seed)
    totals = RLTotals()
    workers = _start_workers(session) if rl.rollout_workers else None
    router = DifficultyRouter(rl.router, rl.group_size) if rl.router.enabled else None
    tree = build_tree(recipe, pool, tokenizer) if rl.prefix_rollouts.enabled else None
    sampler = Sampler(model, tokenizer, rl, task, seed=cfg.seed, dist=session.dist, pool=workers, router=router,
                      tree=tree)
    low_precision = low_precision_lora(model, recipe) if session.needs_backward else None
    if low_precision is not None:
        session.auto_choices["adapter.compute_dtype"] = ("bfloat16: the update's LoRA matmuls under bf16 autocast over "
                                                         "the bf16 base, fp32 adapter weights and optimizer state")
    depth_reward: dict[float, list[float]] = {}  # over the whole run (this process), for the ledger
    if session.trainer_state:  # resumed
        st = session.trainer_state
        totals = RLTotals(**st["totals"])
        stream.load_state_dict(st["stream"])
        selector.load_state_dict(st["selector"])
        generator.set_state(torch.tensor(st["generator"], dtype=torch.uint8))
        depth_reward.update({d: [v, k] for d, v, k in st.get("depth_reward", [])})
        if router is not None and st.get("router"):
            router.load_state_dict(st["router"])
        if st.get("prefetched"):  # drawn for an async step that never ran: sampled now, on the current policy
            sampler.prefetch(st["prefetched"], [pool[i]["prompt"] for i in st["prefetched"]], session.step, 0)
    bar = session.progress("rl")
    row: dict = {}
    try:
        while session.step < cfg.steps:
            row, upd, batch, dt = _rl_step(session, sampler, pool, stream, selector, reward_fn, correct_fn, task,
                                           generator, pad_id, low_precision)
            totals.add(batch.stats, upd, rl, dt)
            for d, (v, k) in batch.stats.depth_reward.items():
                acc = depth_reward.setdefault(d, [0.0, 0])
                acc[0], acc[1] = acc[0] + v, acc[1] + k
            row.update(tokens_generated=totals.tokens_generated, rss_bytes=session.memory.sample(),
                       elapsed_s=totals.elapsed_s)
            if workers is not None:
                row.update(adapter_bytes_sent=sampler.bytes_sent, adapter_sync_s=sampler.sync_seconds)
            session.log(row)
            bar.set_postfix(reward=f"{row['reward_mean']:.2f}", pass1=f"{row['pass@1']:.2f}",
                            len=f"{row['completion_len']:.0f}", used=f"{upd.sequences_trained}/{batch.stats.rollouts}")
            bar.update(1)
            if session.should_save():
                session.save_checkpoint({"totals": dataclasses.asdict(totals), "stream": stream.state_dict(),
                                         "selector": selector.state_dict(), "generator": generator.get_state().tolist(),
                                         "prefetched": sampler.pending,
                                         "depth_reward": [[d, v, k] for d, (v, k) in sorted(depth_reward.items())],
                                         **({"router": router.state_dict()} if router is not None else {})})
    finally:
        if workers is not None:
            workers.close()
    bar.close()
    extra = {"kind": "rl", "final_metrics": row, "num_layers": causal_lm(model).config.num_hidden_layers,
             "longest_prompt_tokens": longest_prompt}
    if router is not None:
        extra["router"] = {"rollouts_saved": totals.router_rollouts_saved, "prompts_routed": totals.router_prompts_routed,
                           "prompts_skipped": totals.router_prompts_skipped,
                           "brier": totals.router_brier_sum / totals.router_brier_n if totals.router_brier_n else None,
                           "layer": rl.router.layer, "fixed_group_size": rl.group_size}
    if rl.tools.enabled:
        extra["tools"] = {"calls": totals.tool_calls, "errors": totals.tool_errors, "tool_tokens": totals.tool_tokens,
                          "calls_per_completion": totals.tool_calls / max(1, totals.rollouts_generated),
                          "calculator": rl.tools.calculator, "python": rl.tools.python, "max_calls": rl.tools.max_calls}
    if tree is not None:
        pr = rl.prefix_rollouts
        extra["prefix_rollouts"] = {"depths": pr.depths, "alpha": pr.alpha, "traces": pr.traces,
                                    "prompts_with_trace": tree.with_trace, "prompts": len(pool),
                                    "scale": TREE_SCALE[rl.advantage or DEFAULT_ADVANTAGE[rl.loss]],
                                    "reward_by_depth": {f"{d:.2f}": v / max(1, k) for d, (v, k) in sorted(depth_reward.items())},
                                    "rollouts_by_depth": {f"{d:.2f}": k for d, (v, k) in sorted(depth_reward.items())}}
    if workers is not None:
        extra["rollout_workers"] = {"workers": rl.rollout_workers, "async": rl.async_rollouts,
                                    "adapter_bytes_sent": sampler.bytes_sent, "adapter_sync_s": sampler.sync_seconds,
                                    "ray_address": rl.ray_address}
    return session.finish(totals=ledger_totals(session.step, totals), flops=rl_flops(model, totals, rl),
                          data_files=[recipe.data.train] if recipe.data.train else [], extra=extra)


def _start_workers(session: RunSession):
    from leantune.rl.workers import RolloutPool

    rl = session.recipe.rl
    session.info(f"starting {rl.rollout_workers} Ray rollout worker(s)"
                 + (f" on {rl.ray_address}" if rl.ray_address else " (local Ray)"))
    return RolloutPool(session.recipe, num_workers=rl.rollout_workers, address=rl.ray_address, init=rl.init,
                       threads_per_worker=session.recipe.train.threads)


def _rl_step(session: RunSession, sampler: Sampler, pool, stream, selector, reward_fn, correct_fn, task, generator,
             pad_id: int, low_precision=None):
    """One RL step: sample (and, async, start the next step's sampling), update. Returns (row, update, batch, s)."""
    recipe, cfg, rl, model = session.recipe, session.recipe.train, session.recipe.rl, session.model
    with session.timed() as dt, session.step_guard():
        # sampling and the short-sequence update reuse the same mid-size buffers: keep them on the heap
        with heap_allocator(cfg.malloc_mmap_threshold):
            async_batch = sampler.pending != []
            sampler.begin_step()
            batch = collect_batch(sampler, pool, stream, selector, reward_fn, correct_fn, rl, session.step)
            if rl.async_rollouts and session.step + 1 < cfg.steps:
                skipped_before = selector.skipped
                cand = next_candidates(stream, selector, rl.prompts_per_step, session.step + 1)
                sampler.prefetch(cand, [pool[i]["prompt"] for i in cand], session.step + 1,
                                 selector.skipped - skipped_before)
            if session.needs_backward:
                upd = policy_update(model, session.optimizer, session.scheduler, batch, rl, pad_id=pad_id,
                                    micro_batch=cfg.micro_batch_size, chunk_size=recipe.loss.chunk_size,
                                    max_grad_norm=recipe.optim.max_grad_norm, dist=session.dist,
                                    behaviour=async_batch, low_precision=low_precision)
            else:
                upd = zeroth_order_update(model, session.tokenizer, session.optimizer, session.scheduler, batch,
                                          reward_fn, task, rl, generator)
    session.step += 1
    row = step_metrics(session.step, batch.stats, upd, rl, session.scheduler.get_last_lr()[0], dt[0])
    return row, upd, batch, dt[0]


