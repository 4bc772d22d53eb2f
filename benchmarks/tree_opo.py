#!/usr/bin/env python
"""Tree-OPO prefix rollouts (rl.prefix_rollouts, arXiv 2509.09284) against plain DAPO: held-out accuracy after
the same number of rollouts, from the same SFT start.

Both arms run leantune's DAPO loss on the `multistep` task from one SFT LoRA adapter, with the same seed, prompt
pool, prompts per update, completion budget, learning rate and number of policy updates. Dynamic sampling is
off in both (one sampling round per step), so every step samples exactly the same number of rollouts:

- ``dapo``: `rl.group_size = len(depths) x G` completions of the bare prompt;
- ``tree_opo``: `rl.prefix_rollouts.enabled`: G completions from each of len(depths) prefixes of the task's
  worked solution (depths 0, 1/3, 2/3 of its tokens), advantage r - alpha V(prefix), centred and std-scaled
  over the prompt's tree.

Reported per arm: rollouts, tokens generated, context (prompt + prefix) tokens, wall time, reward by prefix
depth (tree arm), and greedy held-out accuracy on ``--eval-problems`` test problems
(`leantune.eval.evaluate.task_accuracy`, prompts only: no prefix at evaluation). The SFT adapter both start from
is trained once with the leantune CLI and cached in the work directory.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/tree_opo.py --quick --json   # tiny random model, smoke check (accuracy 0)
    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/tree_opo.py --json # SmolLM2-135M-Instruct

Logs go to stderr; ``--json`` prints one JSON object to stdout. Run it with the working directory outside the
repository (``--work-dir`` defaults to ./bench_tree_opo).
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
TASK = "multistep"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import router  # noqa: E402  (the shared SFT start, held-out accuracy and the toy task)
from router import TOY_WORDS, digit_reward  # noqa: E402,F401  (digit_reward: this module's reward spec)


def prepare_sft(spec: dict) -> dict:
    """The SFT run both arms start from (router.prepare_sft on the multistep task, cached by its overrides)."""
    return router.prepare_sft(spec, task=TASK, recipe="sft_multistep.yaml",
                              extra=("train.save_every=0", "optim.warmup_steps=2"), quick_extra=("data.max_length=512",),
                              stamp_name="bench_tree_opo_sft.json")


def accuracy(model, tok, spec) -> dict:
    return router.accuracy(model, tok, spec, task=TASK)


def toy_accuracy(model, tok, spec) -> dict:
    """Held-out sampled pass@1 from the bare prompt over `toy_rows("test")`."""
    return router.toy_accuracy(model, tok, spec, rows=toy_rows("test"))


def log(*args) -> None:
    print("[tree_opo]", *args, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# --toy: a task a random tiny model has headroom on, so the mechanism runs in minutes on a busy CPU

def toy_rows(split: str) -> list[dict]:
    """'Tell me about A and B.' over word pairs, train and test disjoint; the reference trace ends in a digit,
    so no prefix shorter than the whole trace gives the answer away."""
    pairs = [(a, b) for i, a in enumerate(TOY_WORDS) for b in TOY_WORDS[i + 1:]]
    rows = [{"prompt": f"Tell me about {a} and {b}.", "completion": f"{a} and {b} make {len(a) + len(b)}"}
            for a, b in pairs]
    return rows[::5] if split == "test" else [r for i, r in enumerate(rows) if i % 5]



def run_arm(name: str, spec: dict, sft: dict) -> dict:
    from leantune.config import recipe_from_dict
    from leantune.train.rl import train_rl

    depths = spec["depths"]
    tree = name == "tree_opo"
    model = {"path": str(Path(spec["work_dir"]) / "tiny"), "dtype": "float32"} if spec["quick"] or spec["toy"] else \
        {"path": "builtin:smollm2-135m-instruct"}
    raw = {
        "model": model,
        "data": {"max_length": 512 if spec["quick"] else 256},
        "adapter": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "loss": {"chunk_size": 256},
        "optim": {"lr": spec["lr"], "scheduler": "constant", "warmup_steps": 0, "max_grad_norm": 1.0},
        "train": {"steps": spec["steps"], "micro_batch_size": 8, "seed": spec["seed"], "threads": spec["threads"],
                  "output_dir": str(Path(spec["work_dir"]) / f"run-{name}"), "progress": False, "save_every": 0},
        "rl": {"task": TASK, "rewards": {"task": 1.0}, "init": sft["dir"], "loss": "dapo",
               "group_size": spec["group_size"] if tree else spec["group_size"] * len(depths),
               "prompts_per_step": spec["prompts_per_step"], "max_new_tokens": spec["max_new_tokens"],
               "num_prompts": spec["num_prompts"], "dynamic_sampling": False,
               "prefix_rollouts": {"enabled": tree, "depths": depths, "alpha": spec["alpha"]}},
    }
    if spec["toy"]:
        data = Path(spec["work_dir"]) / "toy_train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in toy_rows("train")))
        raw["data"]["train"] = str(data)
        # every toy completion is cut at max_new_tokens: overlong filtering would mask them all
        raw["rl"].update(task=None, rewards={"benchmarks.tree_opo:digit_reward": 1.0}, init=None, overlong_filter=False)
        raw["adapter"]["target_modules"] = ["q_proj", "v_proj", "down_proj"]
    recipe = recipe_from_dict(raw)
    run_dir = Path(raw["train"]["output_dir"])
    if run_dir.exists():  # each arm is measured afresh (the SFT start is what is cached)
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    result = train_rl(recipe, quiet=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tot = result.ledger["totals"]["rollouts"]
    ledger_extra = result.ledger.get("extra", result.ledger)
    out = {"arm": name, "rl_wall_s": round(wall, 1), "updates": len(rows),
           "rollouts_generated": tot["rollouts_generated"], "rollouts_used": tot["rollouts_used"],
           "tokens_generated": tot["tokens_generated"],
           "per_step": [{k: r.get(k) for k in ("step", "rollouts", "rollouts_used", "reward_mean", "pass@1",
                                               "zero_variance_frac", "completion_len", "prefix_tokens",
                                               *[f"prefix_reward@{d:.2f}" for d in depths])}
                        for r in rows]}
    if tree:
        out["prefix_rollouts"] = ledger_extra.get("prefix_rollouts")
    out["final"] = (toy_accuracy if spec["toy"] else accuracy)(result.model, result.tokenizer, spec)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random model (a smoke check: accuracy stays 0)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--toy", action="store_true",
                   help="tiny random model, no SFT, on a toy verifier it has headroom on (a digit in the text); "
                        "reference traces end in the digit; accuracy = held-out sampled pass@1 from the bare prompt")
    p.add_argument("--work-dir", default="bench_tree_opo")
    p.add_argument("--steps", type=int, default=8, help="policy updates per arm")
    p.add_argument("--sft-steps", type=int, default=40)
    p.add_argument("--group-size", type=int, default=4, help="G: per prefix (tree arm); x len(depths) for dapo")
    p.add_argument("--depths", default="0,0.3333,0.6667")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--eval-problems", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="train.seed of both arms (prompt order, rollouts)")
    p.add_argument("--only", default="dapo,tree_opo", help="arms to run, in order")
    a = p.parse_args()
    spec = {"quick": a.quick, "toy": a.toy, "work_dir": str(Path(a.work_dir).resolve()), "steps": 2 if a.quick else a.steps,
            "sft_steps": 2 if a.quick else a.sft_steps, "group_size": a.group_size,
            "depths": [float(x) for x in a.depths.split(",")], "alpha": a.alpha,
            "prompts_per_step": a.prompts_per_step, "max_new_tokens": 8 if a.quick else a.max_new_tokens,
            "eval_problems": 8 if a.quick else a.eval_problems, "lr": a.lr, "threads": a.threads, "num_prompts": 512, "seed": a.seed}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    real_stdout, sys.stdout = sys.stdout, sys.stderr  # the CLI and the trainers print summaries: keep stdout JSON
    import torch

    torch.set_num_threads(a.threads)
    Path(spec["work_dir"]).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load0 = [round(x, 2) for x in os.getloadavg()]
    from leantune.eval.evaluate import load_for_eval

    if a.toy:
        from leantune.models.tiny import save_tiny_model

        tiny = Path(spec["work_dir"]) / "tiny"
        if not (tiny / "config.json").exists():
            save_tiny_model(tiny, chat_template=True)
        sft = {"dir": None, "note": "--toy: no SFT, RL starts from the random tiny model"}
        model, tok = load_for_eval(str(tiny))
    else:
        sft = prepare_sft(spec)
        model, tok = load_for_eval(sft["dir"])
    start = (toy_accuracy if a.toy else accuracy)(model, tok, spec)
    del model
    log(f"SFT start: accuracy {start['accuracy']:.3f}")
    arms = {}
    for name in a.only.split(","):
        log(f"arm {name}: {spec['steps']} updates")
        arms[name] = run_arm(name, spec, sft)
        log(f"arm {name}: rollouts {arms[name]['rollouts_generated']}, accuracy {arms[name]['final']}")
    from leantune.compute import cpu_summary

    out = {"benchmark": "tree_opo", "mode": "toy" if a.toy else "quick" if a.quick else "smollm2-135m-instruct",
           "task": "toy_digit" if a.toy else TASK,
           "settings": spec, "sft": sft, "start_accuracy": start, "arms": arms,
           "machine": {"cpu": cpu_summary(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                       "python": platform.python_version(), "torch": torch.__version__, "torch_threads": a.threads,
                       "loadavg_start": load0, "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
           "total_wall_s": round(time.perf_counter() - t0, 1)}
    busy = max([*load0, *out["machine"]["loadavg_end"]], default=0.0)
    if busy > a.threads + 1:  # more runnable work than this benchmark's threads: say so, as measured
        out["machine"]["note"] = (f"load average up to {busy:.1f} with {a.threads} torch threads: other jobs shared "
                                  "the cores, so wall times are not clean")
    if {"dapo", "tree_opo"} <= set(arms):
        d, t = arms["dapo"], arms["tree_opo"]
        out["comparison"] = {"rollouts": [d["rollouts_generated"], t["rollouts_generated"]],
                             "accuracy_start": start["accuracy"],
                             "accuracy_dapo": d["final"]["accuracy"], "accuracy_tree_opo": t["final"]["accuracy"],
                             "accuracy_delta_points": round(100 * (t["final"]["accuracy"] - d["final"]["accuracy"]), 2)}
    sys.stdout = real_stdout
    print(json.dumps(out, indent=1) if a.json else json.dumps(out.get("comparison", {}), indent=1))


if __name__ == "__main__":
    main()
