"""The embedded default: fine-tune SmolLM2-135M-Instruct on a verifiable arithmetic task, offline.

Pipeline: generate problems deterministically -> accuracy before -> LoRA SFT (memory-lean loss) ->
accuracy after -> export the adapter to OUT/adapter -> print the ledger summary.

``--quick`` runs the same pipeline on a tiny random model (2 layers, hidden 64) in well under a
minute: a smoke test of every stage, whose accuracy numbers mean nothing.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from leantune.config import recipe_from_dict

log = logging.getLogger(__name__)

# The demo's recipe. recipes/sft_smollm2_arithmetic.yaml is the same recipe as a file (a test checks).
DEMO_RECIPE: dict = {
    "model": {"path": "builtin:smollm2-135m-instruct", "dtype": "auto"},
    "data": {"train": "data/addition/train.jsonl", "eval": "data/addition/valid.jsonl", "max_length": 128},
    "adapter": {"method": "lora", "r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "loss": {"chunk_size": 256},
    "optim": {"lr": 3e-3, "warmup_steps": 5, "scheduler": "cosine"},
    "train": {"steps": 60, "micro_batch_size": 8, "grad_accum": 1, "seed": 0, "save_every": 20,
              "output_dir": "runs/sft_smollm2_addition", "threads": None},
    "eval": {"task": "addition", "num_problems": 50, "max_new_tokens": 48, "batch_size": 25},
}

QUICK_OVERRIDES = {
    "model": {"dtype": "float32"},
    "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "optim": {"lr": 1e-2, "warmup_steps": 0},
    "train": {"steps": 8, "micro_batch_size": 4, "save_every": 4},
    "eval": {"num_problems": 8, "max_new_tokens": 16, "batch_size": 8},
}

# `leantune demo --rl`: after SFT, a short DAPO phase on the same task, continuing the SFT adapter.
# 16 steps x 8 prompts: after SFT ~86% of sampled completions are right and most groups carry no gradient;
# 8 steps x 4 prompts (tried first) left accuracy where it was, a higher lr (3e-4, 1e-3) made it worse.
DEMO_RL = {
    "optim": {"lr": 1e-4, "warmup_steps": 0, "scheduler": "constant"},
    "train": {"steps": 16, "micro_batch_size": 8, "save_every": 8},
    "rl": {"task": "addition", "num_prompts": 512, "loss": "dapo", "group_size": 8, "prompts_per_step": 8,
           "max_new_tokens": 48, "temperature": 1.0, "max_sampling_rounds": 3},
}
# With --rl every accuracy (before, after SFT, after RL) is measured on more held-out problems: after SFT
# the model already solves ~94% of 50, and one problem is 2 points, so a change of a few problems is noise.
DEMO_RL_EVAL_PROBLEMS = 200
# ... and the accuracy RL optimizes: sampled completions at the RL temperature (pass@1 over problems x samples).
DEMO_RL_SAMPLED = {"num_problems": 100, "samples": 4}
QUICK_RL_SAMPLED = {"num_problems": 4, "samples": 2}
QUICK_RL = {"train": {"steps": 2, "micro_batch_size": 4}, "rl": {"group_size": 2, "prompts_per_step": 2,
                                                                  "max_new_tokens": 8, "max_sampling_rounds": 1}}

NUM_TRAIN, NUM_VALID = 2000, 64


def _merge(base: dict, over: dict) -> dict:
    out = json.loads(json.dumps(base))
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_task_data(task_name: str, out_dir: Path, n_train: int, n_valid: int, seed: int = 0,
                    pairs: bool = False) -> dict[str, Path]:
    """Write train/valid JSONL in the ``messages`` shape (the tokenizer's chat template applies); with ``pairs``,
    preference rows for `leantune dpo` instead: the worked solution (chosen) vs a wrong final answer (rejected)."""
    from leantune.data.preference import answer_pairs
    from leantune.tasks import get_task

    task = get_task(task_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n, s, part in (("train", n_train, seed, "train"), ("valid", n_valid, seed + 1, "test")):
        rows = task.generate(n, seed=s, split=part)
        path = out_dir / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        records = answer_pairs(rows, seed=s) if pairs else [
            {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in rows]
        with open(tmp, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        tmp.replace(path)
        paths[split] = path
    return paths


def run_demo(out: Path, quick: bool = False, rl: bool = False) -> dict:
    import os
    import shutil

    from leantune.adapters.lora import save_adapter
    from leantune.eval.evaluate import task_accuracy
    from leantune.ledger import summarize_ledger
    from leantune.models.loading import load_model_and_tokenizer
    from leantune.train.sft import train

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = _merge(DEMO_RECIPE, QUICK_OVERRIDES) if quick else _merge(DEMO_RECIPE, {})
    if rl and not quick:
        raw["eval"]["num_problems"] = DEMO_RL_EVAL_PROBLEMS
    data = write_task_data(raw["eval"]["task"], out / "data", NUM_TRAIN if not quick else 64, NUM_VALID if not quick else 8)
    raw["data"].update(train=str(data["train"]), eval=str(data["valid"]))
    run_dir = out / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the demo always starts fresh
    raw["train"]["output_dir"] = str(run_dir)
    if quick:
        from leantune.models.tiny import save_tiny_model

        raw["model"]["path"] = str(save_tiny_model(out / "tiny-model", chat_template=True))
    recipe = recipe_from_dict(raw)
    ev = recipe.eval
    log.info("demo: model %s (%s); task: %s; output: %s", recipe.model.path, recipe.model.compute_dtype, ev.task, out)

    model, tok, _ = load_model_and_tokenizer(recipe.model)
    before = task_accuracy(model, tok, ev.task, num_problems=ev.num_problems, max_new_tokens=ev.max_new_tokens,
                           batch_size=ev.batch_size)
    print(f"[demo] accuracy before fine-tuning: {before['accuracy']:.1%} ({before['correct']}/{before['problems']}, "
          f"{before['eval_seconds']:.0f} s)")
    del model

    result = train(recipe)
    after = task_accuracy(result.model, result.tokenizer, ev.task, num_problems=ev.num_problems,
                          max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size)
    adapter_dir = save_adapter(result.model, out / "adapter")
    print(f"[demo] accuracy after fine-tuning:  {after['accuracy']:.1%} ({after['correct']}/{after['problems']})")
    print(f"[demo] example: {after['examples'][0]['prompt']!r} -> {after['examples'][0]['completion']!r}")
    print(summarize_ledger(result.ledger))
    rl_summary = {}
    if rl:
        rl_summary = _rl_phase(raw, out, quick, result, ev, after)
    summary = {
        "model": recipe.model.path,
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "problems": after["problems"],
        "train_wall_s": result.ledger["totals"]["wall_time_s"],
        "total_wall_s": time.perf_counter() - t0,
        "adapter": str(adapter_dir),
        "run_dir": str(run_dir),
        **rl_summary,
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"[demo] adapter: {adapter_dir}  run: {run_dir}  total time: {summary['total_wall_s']:.0f} s")
    return summary


def _rl_phase(raw: dict, out: Path, quick: bool, sft, ev, sft_greedy: dict) -> dict:
    """DAPO on the same task, starting from the SFT adapter in memory; accuracy again at the end, greedy
    and sampled at the RL temperature (the policy RL trains), each before and after the RL phase."""
    import shutil

    from leantune.adapters.lora import save_adapter
    from leantune.eval.evaluate import sampled_accuracy, task_accuracy
    from leantune.ledger import summarize_ledger
    from leantune.train.rl import train_rl

    rl_raw = _merge(raw, DEMO_RL)
    if quick:
        rl_raw = _merge(rl_raw, QUICK_RL)
    rl_raw["data"]["train"] = None  # prompts come from the task generator (train split)
    run_dir = out / "rl-run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    rl_raw["train"]["output_dir"] = str(run_dir)
    recipe = recipe_from_dict(rl_raw)
    sampled_kw = dict(QUICK_RL_SAMPLED if quick else DEMO_RL_SAMPLED, temperature=recipe.rl.temperature,
                      max_new_tokens=ev.max_new_tokens)
    sampled_before = sampled_accuracy(sft.model, sft.tokenizer, ev.task, **sampled_kw)
    print(f"[demo] sampled accuracy after fine-tuning (T={recipe.rl.temperature}): pass@1 "
          f"{sampled_before['pass@1']:.1%} over {sampled_before['problems']} problems x {sampled_before['samples']}")
    log.info("demo: RL phase: %s, %d steps x %d prompts x %d samples, dynamic sampling + prompt selection",
             recipe.rl.loss, recipe.train.steps, recipe.rl.prompts_per_step, recipe.rl.group_size)
    result = train_rl(recipe, model=sft.model, tokenizer=sft.tokenizer)
    after = task_accuracy(result.model, result.tokenizer, ev.task, num_problems=ev.num_problems,
                          max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size)
    sampled_after = sampled_accuracy(result.model, result.tokenizer, ev.task, **sampled_kw)
    adapter_dir = save_adapter(result.model, out / "adapter-rl")
    print(summarize_ledger(result.ledger))
    print(f"[demo] accuracy after RL:           {after['accuracy']:.1%} ({after['correct']}/{after['problems']}), "
          f"greedy; was {sft_greedy['accuracy']:.1%} after fine-tuning")
    print(f"[demo] sampled accuracy after RL (T={recipe.rl.temperature}): pass@1 {sampled_after['pass@1']:.1%}; "
          f"was {sampled_before['pass@1']:.1%} after fine-tuning")
    roll = result.ledger["totals"]["rollouts"]
    return {"accuracy_after_rl": after["accuracy"], "sampled_after_sft": sampled_before, "sampled_after_rl": sampled_after,
            "rl_wall_s": result.ledger["totals"]["wall_time_s"], "rl_rollouts": roll, "adapter_rl": str(adapter_dir),
            "rl_run_dir": str(run_dir)}
