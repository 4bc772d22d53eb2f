#!/usr/bin/env python
"""Difficulty routing (rl.router, arXiv 2511.03808) against HIVE-style prompt selection alone: rollouts and
held-out accuracy at the same start and the same number of policy updates.

Both arms run DAPO (leantune's RL defaults: dynamic sampling, prompt selection) on the `addition` task from
the same SFT LoRA adapter, with the same seed, prompt pool, group size, prompts per update, completion budget,
learning rate and number of policy updates. They differ in one switch:

- ``selection``: `rl.router.enabled: false`: every admitted prompt gets `rl.group_size` samples;
- ``router``: `rl.router.enabled: true`: a logistic probe on the prefill's middle-layer state predicts
  P(correct) per prompt, prompts predicted solved / hopeless are skipped, the rest get group sizes by p (1 - p).

Reported per arm: rollouts generated, rollouts used, the router's own counters (prompts routed / skipped,
rollouts saved, Brier score of the probe on fresh outcomes), wall time, and greedy held-out accuracy on
``--eval-problems`` test problems (`leantune.eval.evaluate.task_accuracy`). The SFT adapter both start from
is trained once with the leantune CLI and cached in the work directory.

    HF_HUB_OFFLINE=1 python benchmarks/router.py --quick --json            # tiny random model, smoke check
    HF_HUB_OFFLINE=1 python benchmarks/router.py --json > router.json      # SmolLM2-135M-Instruct, ~15 min idle 2 cores

Logs go to stderr; ``--json`` prints one JSON object to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASK = "addition"


def log(*args) -> None:
    print("[router]", *args, file=sys.stderr, flush=True)


def cpu_model() -> str:
    """The CPU's model name and whether it has AVX512-BF16."""
    from leantune.compute import cpu_summary

    return cpu_summary()


def prepare_sft(spec: dict, task: str = TASK, recipe: str = "sft_smollm2_addition.yaml", extra: tuple = (),
                quick_extra: tuple = (), stamp_name: str = "bench_router_sft.json") -> dict:
    """The SFT run both arms start from (cached by its overrides): ``task``'s data, ``recipes/<recipe>`` with
    ``extra`` overrides (``quick_extra`` too on the tiny model). benchmarks/tree_opo.py calls it too."""
    from leantune.cli import main as cli

    work, sft_dir = Path(spec["work_dir"]), Path(spec["work_dir"]) / "sft"
    over = [f"data.train={work / 'data' / 'train.jsonl'}", f"data.eval={work / 'data' / 'valid.jsonl'}",
            f"train.steps={spec['sft_steps']}", f"train.output_dir={sft_dir}", f"train.threads={spec['threads']}",
            "train.progress=false", *extra]
    if spec["quick"]:
        from leantune.models.tiny import save_tiny_model

        tiny = work / "tiny"
        if not (tiny / "config.json").exists():
            save_tiny_model(tiny, chat_template=True)
        over += [f"model.path={tiny}", "model.dtype=float32", "optim.lr=0.01", *quick_extra]
    stamp = sft_dir / stamp_name
    if stamp.exists() and json.loads(stamp.read_text()).get("overrides") == over and (sft_dir / "adapter").is_dir():
        log(f"SFT adapter: cached in {sft_dir}")
        return json.loads(stamp.read_text())
    t0 = time.perf_counter()
    if cli(["make-data", task, "--out", str(work / "data")]) != 0:
        raise RuntimeError("leantune make-data failed")
    if cli(["train", str(ROOT / "recipes" / recipe), *over]) != 0:
        raise RuntimeError("leantune train (SFT) failed")
    out = {"overrides": over, "sft_seconds": round(time.perf_counter() - t0, 1), "dir": str(sft_dir)}
    stamp.write_text(json.dumps(out, indent=1))
    return out


def accuracy(model, tok, spec, task: str = TASK) -> dict:
    from leantune.eval.evaluate import task_accuracy

    acc = task_accuracy(model, tok, task, num_problems=spec["eval_problems"], max_new_tokens=spec["max_new_tokens"])
    return {k: acc[k] for k in ("accuracy", "correct", "problems", "eval_seconds")}


# ------------------------------------------------------------------------------------------------
# --toy: a task a random tiny model has headroom on, so the whole mechanism runs in minutes on a busy CPU

TOY_WORDS = ["cats", "dogs", "rain", "sun", "tea", "maps", "keys", "wind", "salt", "ink", "snow", "moss", "rice",
             "gold", "iron", "wool", "milk", "sand", "fern", "clay"]


def digit_reward(prompts, completions, **kw) -> list[float]:
    """1.0 when the completion contains a digit (the toy task's verifier)."""
    return [1.0 if any(ch.isdigit() for ch in c) else 0.0 for c in completions]


def toy_prompts(split: str) -> list[dict]:
    """Distinct prompts: 'Tell me about A and B.' over word pairs; train and test are disjoint pairs."""
    pairs = [(a, b) for i, a in enumerate(TOY_WORDS) for b in TOY_WORDS[i + 1:]]
    rows = [{"prompt": f"Tell me about {a} and {b}."} for a, b in pairs]
    return rows[::5] if split == "test" else [r for i, r in enumerate(rows) if i % 5]


def toy_accuracy(model, tok, spec, rows: list[dict] | None = None) -> dict:
    """Held-out sampled pass@1 from the bare prompt: the mean toy reward of 8 seeded samples per test prompt
    (``rows``: default `toy_prompts("test")`)."""
    from leantune.rl.rollout import sample_groups

    rows = toy_prompts("test") if rows is None else rows
    t0 = time.perf_counter()
    ro = sample_groups(model, tok, [r["prompt"] for r in rows], group_size=8, max_new_tokens=spec["max_new_tokens"],
                       seeds=list(range(len(rows))))
    r = digit_reward(None, ro.texts)
    return {"accuracy": sum(r) / len(r), "correct": int(sum(r)), "problems": len(r), "eval_seconds": time.perf_counter() - t0,
            "kind": "sampled pass@1, 8 seeded samples per held-out prompt"}


def run_arm(name: str, spec: dict, sft: dict) -> dict:
    from leantune.config import recipe_from_dict
    from leantune.train.rl import train_rl

    model_path = str(Path(spec["work_dir"]) / "tiny") if spec["quick"] else "builtin:smollm2-135m-instruct"
    router = {"enabled": name == "router", "warmup_prompts": spec["warmup_prompts"],
              "min_group_size": spec["min_group_size"], "max_group_size": spec["max_group_size"],
              "skip_solved": spec["skip_solved"], "skip_hopeless": spec["skip_hopeless"], "explore": spec["explore"],
              "l2": spec["l2"]}
    raw = {
        "model": {"path": model_path, **({"dtype": "float32"} if spec["quick"] else {})},
        "data": {"max_length": 128},
        "adapter": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "loss": {"chunk_size": 256},
        "optim": {"lr": spec["lr"], "scheduler": "constant", "warmup_steps": 0, "max_grad_norm": 1.0},
        "train": {"steps": spec["steps"], "micro_batch_size": 8, "seed": 0, "threads": spec["threads"],
                  "output_dir": str(Path(spec["work_dir"]) / f"run-{name}"), "progress": False, "save_every": 0},
        "rl": {"task": TASK, "rewards": {"task": 1.0}, "init": sft["dir"], "group_size": spec["group_size"],
               "prompts_per_step": spec["prompts_per_step"], "max_new_tokens": spec["max_new_tokens"],
               "num_prompts": spec["num_prompts"], "max_sampling_rounds": 3, "router": router},
    }
    if spec["toy"]:
        data = Path(spec["work_dir"]) / "toy_train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in toy_prompts("train")))
        raw["model"] = {"path": str(Path(spec["work_dir"]) / "tiny"), "dtype": "float32"}
        raw["data"]["train"] = str(data)
        # every toy completion is cut at max_new_tokens: overlong filtering would mask them all
        raw["rl"].update(task=None, rewards={"benchmarks.router:digit_reward": 1.0}, init=None, overlong_filter=False)
        raw["adapter"]["target_modules"] = ["q_proj", "v_proj", "down_proj"]
    recipe = recipe_from_dict(raw)
    run_dir = Path(raw["train"]["output_dir"])
    if run_dir.exists():  # an arm is measured afresh every time (the SFT start is what is cached)
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    result = train_rl(recipe, quiet=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (Path(raw["train"]["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    tot = result.ledger["totals"]["rollouts"]
    out = {"arm": name, "rl_wall_s": round(wall, 1), "updates": len(rows),
           "rollouts_generated": tot["rollouts_generated"], "rollouts_used": tot["rollouts_used"],
           "tokens_generated": tot["tokens_generated"], "zero_variance_rollouts_dropped": tot["zero_variance_rollouts_dropped"],
           "prompt_selection_rollouts_saved": tot["prompt_selection_rollouts_saved"],
           "router": {k: tot[k] for k in tot if k.startswith("router_")},
           "per_step": [{k: r.get(k) for k in ("step", "rollouts", "rollouts_used", "sampling_rounds", "pass@1",
                                               "router_prompts", "router_skipped", "router_rollouts_saved",
                                               "router_group_size_min", "router_group_size_max", "router_brier")}
                        for r in rows]}
    if tot["router_brier_n"]:
        out["router"]["brier"] = tot["router_brier_sum"] / tot["router_brier_n"]
    out["final"] = (toy_accuracy if spec["toy"] else accuracy)(result.model, result.tokenizer, spec)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random model (a smoke check: accuracy stays 0)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--toy", action="store_true",
                   help="tiny random model on a toy verifier (does the completion hold a digit?) it has headroom on; "
                        "no SFT; accuracy = held-out sampled pass@1")
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "bench_router"))
    p.add_argument("--steps", type=int, default=8, help="policy updates per arm")
    p.add_argument("--sft-steps", type=int, default=20)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--eval-problems", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup-prompts", type=int, default=12)
    p.add_argument("--skip-solved", type=float, default=0.9)
    p.add_argument("--skip-hopeless", type=float, default=0.1)
    p.add_argument("--explore", type=float, default=0.1)
    p.add_argument("--l2", type=float, default=1.0)
    p.add_argument("--only", default="selection,router",
                   help="arms to run, in order; one arm per process lets both run side by side on a shared machine")
    p.add_argument("--no-start-eval", action="store_true", help="skip the SFT start's accuracy (another process measures it)")
    a = p.parse_args()
    spec = {"quick": a.quick, "toy": a.toy, "work_dir": a.work_dir, "steps": 2 if a.quick else a.steps,
            "sft_steps": 2 if a.quick else a.sft_steps, "group_size": a.group_size, "prompts_per_step": a.prompts_per_step,
            "max_new_tokens": 8 if a.quick else a.max_new_tokens, "eval_problems": 8 if a.quick else a.eval_problems,
            "lr": a.lr, "threads": a.threads, "num_prompts": 512, "warmup_prompts": 4 if a.quick else a.warmup_prompts,
            "min_group_size": 2, "max_group_size": 2 * a.group_size, "skip_solved": a.skip_solved,
            "skip_hopeless": a.skip_hopeless, "explore": a.explore, "l2": a.l2}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    real_stdout, sys.stdout = sys.stdout, sys.stderr  # the CLI and the trainers print their summaries: keep stdout JSON
    import torch

    torch.set_num_threads(a.threads)
    Path(a.work_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load0 = [round(x, 2) for x in os.getloadavg()]
    if a.toy:
        from leantune.models.tiny import save_tiny_model

        tiny = Path(a.work_dir) / "tiny"
        if not (tiny / "config.json").exists():
            save_tiny_model(tiny, chat_template=True)
        sft = {"dir": None, "note": "--toy: no SFT, RL starts from the random tiny model"}
    else:
        sft = prepare_sft(spec)
    from leantune.eval.evaluate import load_for_eval

    start = None
    if not a.no_start_eval:
        model, tok = load_for_eval(str(Path(a.work_dir) / "tiny") if a.toy else sft["dir"])
        start = (toy_accuracy if a.toy else accuracy)(model, tok, spec)
        del model
        log(f"SFT start: accuracy {start['accuracy']:.3f}")
    arms = {}
    for name in a.only.split(","):
        log(f"arm {name}: {spec['steps']} updates")
        arms[name] = run_arm(name, spec, sft)
        log(f"arm {name}: rollouts {arms[name]['rollouts_generated']}, accuracy {arms[name]['final']}")
    out = {"benchmark": "router", "mode": "toy" if a.toy else "quick" if a.quick else "smollm2-135m-instruct",
           "task": "toy_digit" if a.toy else TASK,
           "settings": spec, "sft": sft, "start_accuracy": start, "arms": arms,
           "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                       "python": platform.python_version(), "torch": torch.__version__, "torch_threads": a.threads,
                       "loadavg_start": load0, "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
           "total_wall_s": round(time.perf_counter() - t0, 1)}
    if {"selection", "router"} <= set(arms):
        s, r = arms["selection"], arms["router"]
        out["comparison"] = {
            "rollouts_saved_frac": 1 - r["rollouts_generated"] / max(1, s["rollouts_generated"]),
            "accuracy_delta_points": 100 * ((r["final"] or {}).get("accuracy", 0) - (s["final"] or {}).get("accuracy", 0)),
            "target": ">= 30% fewer rollouts at equal held-out accuracy (+-1 point)"}
    sys.stdout = real_stdout
    print(json.dumps(out, indent=1) if a.json else json.dumps(out.get("comparison", {}), indent=1))


if __name__ == "__main__":
    main()
