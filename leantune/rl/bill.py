"""What an RL run did and what it cost: the run totals a checkpoint carries, and the ledger's FLOPs estimate."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from leantune import ledger as ledger_mod
from leantune.config import RLConfig
from leantune.rl.batch import SamplingStats


@dataclass
class RLTotals:
    """Run totals, carried by checkpoints: the ledger's ``totals.rollouts``."""

    rollouts_generated: int = 0
    rollouts_used: int = 0
    tokens_generated: int = 0
    tokens_trained: int = 0
    zero_variance_rollouts_dropped: int = 0
    prompt_selection_rollouts_saved: int = 0
    overlong_rollouts_masked: int = 0
    early_stop_tokens_saved: int = 0
    entropy_filter_rollouts_saved: int = 0
    router_rollouts_saved: int = 0  # rl.group_size x prompts routed - rollouts the router gave them
    router_prompts_routed: int = 0
    router_prompts_skipped: int = 0
    router_brier_sum: float = 0.0  # probe calibration on fresh outcomes (sum of (p - y)^2 over completions)
    router_brier_n: int = 0
    prompt_tokens: int = 0  # of every rollout generated
    prefill_tokens: int = 0  # what the prefill ran
    update_tokens: int = 0
    zo_rollouts: int = 0
    zo_tokens_generated: int = 0
    zo_prompt_tokens: int = 0
    elapsed_s: float = 0.0
    rollout_s: float = 0.0
    row_forwards: int = 0  # rows of the rollout policy forwards sampled from (tokens per forward = tokens / this)
    draft_tokens: int = 0  # rl.speculative: tokens drafted and verified
    accepted_tokens: int = 0  # rl.speculative: drafted tokens accepted
    tool_calls: int = 0  # rl.tools: calls made in all rollouts
    tool_errors: int = 0  # rl.tools: calls answered with an error
    tool_tokens: int = 0  # rl.tools: completion tokens written by tools (run through the decoder, no loss)
    draft_row_forwards: int = 0  # rl.speculative: draft: rows of the draft model's forwards

    def add(self, s: SamplingStats, u, rl: RLConfig, dt: float) -> None:
        g = rl.group_size
        self.elapsed_s += dt
        self.rollout_s += s.rollout_seconds
        self.rollouts_generated += s.rollouts
        self.rollouts_used += u.sequences_trained
        self.tokens_generated += s.tokens_generated + u.zo_tokens_generated  # ZO re-sampling is real work
        self.tokens_trained += u.tokens_trained
        self.update_tokens += u.update_tokens
        self.prompt_tokens += s.prompt_tokens + u.zo_prompt_tokens
        self.prefill_tokens += s.prefill_tokens + u.zo_prefill_tokens
        self.zo_rollouts += u.zo_rollouts
        self.zo_tokens_generated += u.zo_tokens_generated
        self.zo_prompt_tokens += u.zo_prompt_tokens
        self.zero_variance_rollouts_dropped += s.zero_variance_groups * g if rl.dynamic_sampling else 0
        self.prompt_selection_rollouts_saved += s.prompts_skipped * g
        self.entropy_filter_rollouts_saved += s.entropy_filtered * g
        self.router_rollouts_saved += s.router_rollouts_saved
        self.router_prompts_routed += s.router_prompts
        self.router_prompts_skipped += s.router_skipped
        self.router_brier_sum += s.router_brier_sum
        self.router_brier_n += s.router_brier_n
        self.overlong_rollouts_masked += u.overlong_masked
        self.early_stop_tokens_saved += s.rollouts * rl.max_new_tokens - s.tokens_generated - s.tool_tokens
        self.row_forwards += s.row_forwards
        self.draft_tokens += s.draft_tokens
        self.accepted_tokens += s.accepted_tokens
        self.tool_calls += s.tool_calls
        self.tool_errors += s.tool_errors
        self.tool_tokens += s.tool_tokens
        self.draft_row_forwards += s.draft_row_forwards


def ledger_totals(steps: int, t: RLTotals) -> dict:
    rollouts = {k: v for k, v in dataclasses.asdict(t).items() if k != "elapsed_s"}
    if t.draft_tokens:  # rl.speculative
        rollouts["acceptance_rate"] = t.accepted_tokens / t.draft_tokens
        rollouts["tokens_per_forward"] = (t.tokens_generated - t.zo_tokens_generated) / max(1, t.row_forwards)
    return {"steps": steps, "tokens_processed": t.tokens_generated + t.prompt_tokens, "trainable_tokens": t.tokens_trained,
            "wall_time_s": t.elapsed_s, "rollouts": rollouts}


def rl_flops(model, t: RLTotals, rl: RLConfig) -> dict:
    """FLOPs: rollouts are one forward pass over the prefilled prompts (each distinct prompt once) and the
    generated tokens (the LM head only on the rows that sample) and the tool answers fed back (rl.tools, no
    head); the update is forward + backward over each
    micro-batch's distinct prompts and the completions of the sequences trained, the LM head on completion
    tokens only (LoRA-aware, as for SFT). No-grad reference/old-policy passes (rl.beta > 0,
    rl.updates_per_batch > 1) are not counted."""
    seq = round(rl.max_new_tokens + t.prompt_tokens / max(1, t.rollouts_generated + t.zo_rollouts))
    rollout = ledger_mod.zeroth_order_flops(
        ledger_mod.flops_from_model(model, tokens=t.tokens_generated + t.prefill_tokens + t.tool_tokens,
                                    loss_tokens=t.tokens_generated,
                                    seq_len=seq), forward_passes=1)
    update = ledger_mod.flops_from_model(model, tokens=t.update_tokens, loss_tokens=t.tokens_trained, seq_len=seq)
    return {"total": rollout["total"] + update["total"], "rollouts": rollout["total"], "update": update["total"],
            "method": "estimate: rollouts = one forward pass per prompt/generated token; update = " + update["method"]}
