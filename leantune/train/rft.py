"""`leantune rft`: expert iteration (arXiv 2512.24940) -- sample, keep verified, fine-tune, repeat.

Each round:

1. sample `rft.samples_per_prompt` completions for every prompt of the pool (KV cache, early stop, the
   same sampler as `leantune rl`);
2. keep the verified ones -- by default the shortest correct completion per prompt (short correct
   reasoning is cheaper to train on and to run);
3. fine-tune the one adapter on the union of everything accepted so far, for `rft.steps_per_round` SFT
   steps (memory-lean loss, completion tokens only).

With a binary verifier this is REINFORCE on the accepted samples, off-policy (2512.24940). The ledger
holds rounds, samples per round and the accepted fraction; each round's SFT run and its accepted data
sit in RUN/round-N/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from leantune import ledger as ledger_mod
from leantune.allocator import heap_allocator
from leantune.config import Recipe
from leantune.rl.batch import load_prompt_pool
from leantune.rl.rewards import build_rewards
from leantune.rl.rollout import sample_groups
from leantune.train.session import RunSession, TrainResult
from leantune.train.sft import train


def select_accepted(completions: list[str], correct: list[bool], lengths: list[int], keep: str) -> list[str]:
    """The verified completions of one prompt to keep: all, the first, or the shortest (by tokens).

    >>> select_accepted(["long answer 4", "4", "5"], [True, True, False], [3, 1, 1], "shortest")
    ['4']
    >>> select_accepted(["a", "b"], [False, False], [1, 1], "all")
    []
    """
    ok = [(n, i, c) for i, (c, good, n) in enumerate(zip(completions, correct, lengths)) if good]
    if not ok:
        return []
    if keep == "all":
        return [c for _, _, c in ok]
    if keep == "first":
        return [ok[0][2]]
    return [min(ok)[2]]  # shortest; ties go to the earlier sample


def train_rft(recipe: Recipe, *, quiet: bool = False, model=None, tokenizer=None) -> TrainResult:
    """Run `rft.rounds` rounds of expert iteration; return the final ledger and model."""
    recipe.require_for("rft")
    _, correct_fn, task = build_rewards(recipe.rl)  # bad rewards or prompts fail before anything is written
    pool = load_prompt_pool(recipe)
    if any(Path(recipe.train.output_dir).glob("round-*")):
        raise FileExistsError(f"{recipe.train.output_dir} already holds a run; choose another train.output_dir")
    session = RunSession(recipe, "rft", quiet=quiet, model=model, tokenizer=tokenizer, init=recipe.rl.init,
                         checkpoints=False)
    with session:
        return _train_rft(session, pool, correct_fn, task)


def _train_rft(session: RunSession, pool, correct_fn, task) -> TrainResult:
    recipe, cfg, rl, rft = session.recipe, session.recipe.train, session.recipe.rl, session.recipe.rft
    model, tokenizer, run_dir = session.model, session.tokenizer, session.run_dir
    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(cfg.seed)
    accepted: dict[int, list[str]] = {}
    rounds = []
    for r in range(rft.rounds):
        k = rft.samples_per_prompt
        start = time.perf_counter()
        with heap_allocator(cfg.malloc_mmap_threshold):
            ro = sample_groups(model, tokenizer, [p["prompt"] for p in pool], group_size=k,
                               max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_p=rl.top_p,
                               stop=rl.stop, is_complete=getattr(task, "is_complete", None), generator=generator,
                               fold_adapter=rl.fold_adapter)
        fields = {key: [row.get(key) for row in pool for _ in range(k)] for key in {x for row in pool for x in row} - {"prompt"}}
        prompts = [p["prompt"] for p in pool for _ in range(k)]
        correct = [x > 0 for x in correct_fn(prompts, ro.texts, completion_ids=ro.completion_ids, **fields)]
        new = 0
        for i in range(len(pool)):
            sl = slice(i * k, (i + 1) * k)
            keep = select_accepted(ro.texts[sl], correct[sl], [len(c) for c in ro.completion_ids[sl]], rft.keep)
            fresh = [c for c in keep if c not in accepted.get(i, [])]
            if fresh:
                accepted.setdefault(i, []).extend(fresh)
                new += len(fresh)
        round_dir = run_dir / f"round-{r + 1}"
        round_dir.mkdir(parents=True, exist_ok=True)
        data = round_dir / "accepted.jsonl"
        lines = [json.dumps({"messages": [{"role": "user", "content": pool[i]["prompt"]},
                                          {"role": "assistant", "content": c}]})
                 for i in sorted(accepted) for c in accepted[i]]
        ledger_mod.atomic_write_text(data, "".join(line + "\n" for line in lines))
        info = {"round": r + 1, "samples": len(ro), "correct": sum(correct), "pass@1": sum(correct) / len(ro),
                "prompts_solved": sum(1 for i in range(len(pool)) if any(correct[i * k:(i + 1) * k])),
                "accepted_new": new, "accepted_total": len(lines), "accepted_fraction": new / len(ro),
                "tokens_generated": ro.tokens_generated, "sample_s": ro.seconds}
        if lines:
            sub = recipe.model_copy(deep=True)
            sub.data.train, sub.data.eval = str(data), None
            sub.train.steps, sub.train.output_dir = rft.steps_per_round, str(round_dir / "sft")
            sub.train.save_every = 0
            result = train(sub, quiet=session.quiet, model=model, tokenizer=tokenizer)
            info["sft_loss"] = result.ledger["extra"]["final_metrics"].get("loss")
            info["sft_tokens"] = result.ledger["totals"]["tokens_processed"]
        info["round_s"] = time.perf_counter() - start
        rounds.append(info)
        session.step = r + 1
        session.log({"step": r + 1, **info}, force=True)
        session.info(f"[rft] round {r + 1}: pass@1 {info['pass@1']:.1%}, accepted {new} new ({len(lines)} total)")
    totals = {
        "steps": sum(rft.steps_per_round for x in rounds if x["accepted_total"]),
        "tokens_processed": sum(x["tokens_generated"] + x.get("sft_tokens", 0) for x in rounds),
        "trainable_tokens": sum(x.get("sft_tokens", 0) for x in rounds),
        "wall_time_s": time.perf_counter() - t0,
        "rft": {"rounds": len(rounds), "samples_per_round": len(pool) * rft.samples_per_prompt,
                "accepted_fraction": [x["accepted_fraction"] for x in rounds], "per_round": rounds},
    }
    return session.finish(totals=totals, flops={"note": "see each round's sft/ledger.json for the fine-tuning FLOPs"},
                          data_files=[recipe.data.train] if recipe.data.train else [], extra={"kind": "rft"})
