"""Rollouts in-process vs over a local Ray `RolloutPool`: sampling time, adapter sync time and bytes per step.

    HF_HUB_OFFLINE=1 python benchmarks/ray_rollouts.py --workers 2 --calls 2 --threads 1 --out benchmarks/results/ray_rollouts.json

The recipe is recipes/rl_smollm2_addition.yaml without rl.init (a fresh LoRA adapter with random weights, so
the adapter changes the policy), prompts from the addition task; seeds per prompt. What is timed:
- in-process `sample_groups` with a `torch.Generator` and with per-row seeds (the cost of per-row streams);
- `RolloutPool.sample_groups` with fresh weights each call (one ray.put + one fetch per worker, as one RL step).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time

import torch
import yaml

from leantune.adapters.lora import trainable_state
from leantune.config import Recipe
from leantune.rl.rollout import sample_groups
from leantune.rl.workers import RolloutPool
from leantune.tasks import get_task
from leantune.train.session import setup_model


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), platform.processor())
    flags = open("/proc/cpuinfo").read()
    return f"{name}, {torch.get_num_threads()} torch threads, avx512_bf16={'avx512_bf16' in flags}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/rl_smollm2_addition.yaml")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the driver and in each worker")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # on a shared 2-core box, 2 OpenMP threads ran 10x slower than 1

    raw = yaml.safe_load(open(args.recipe))
    raw["rl"].pop("init", None)
    raw["train"]["output_dir"] = tempfile.mkdtemp()
    recipe = Recipe.model_validate(raw)
    rl = recipe.rl
    model, tok, *_ = setup_model(recipe)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.01)
    task = get_task(rl.task)
    prompts = [r["prompt"] for r in task.generate(rl.prompts_per_step * args.calls, seed=0)]
    kw = dict(group_size=rl.group_size, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
              top_p=rl.top_p, stop=rl.stop, fold_adapter=rl.fold_adapter)
    n = rl.prompts_per_step
    batches = [prompts[i * n : (i + 1) * n] for i in range(args.calls)]
    seeds = [[1000 * i + j for j in range(n)] for i in range(args.calls)]

    res: dict = dict(cpu=cpu_model(), prompts_per_call=n, group_size=rl.group_size, max_new_tokens=rl.max_new_tokens,
                     dtype=str(next(model.parameters()).dtype), in_process_generator=[], in_process_seeds=[], pool=[])
    refs = []
    for b, s in zip(batches, seeds):
        for key, extra in [("in_process_generator", dict(generator=torch.Generator().manual_seed(0))),
                           ("in_process_seeds", dict(seeds=s))]:
            ro = sample_groups(model, tok, b, is_complete=task.is_complete, **kw, **extra)
            res[key].append(dict(seconds=ro.seconds, tokens=ro.tokens_generated))
            print(key, res[key][-1], flush=True)
        refs.append(ro)
    start = time.perf_counter()
    pool = RolloutPool(recipe, num_workers=args.workers, threads_per_worker=args.threads)
    res["pool_start_seconds"] = time.perf_counter() - start
    print("pool started", res["pool_start_seconds"], flush=True)
    try:
        for b, s, ref in zip(batches, seeds, refs):
            state = trainable_state(model)  # new weights every call, as after each update
            ro = pool.sample_groups(state, b, seeds=s, task=rl.task, **kw)
            res["pool"].append(dict(seconds=ro.seconds, tokens=ro.tokens_generated, **{k: ro.extra[k] for k in (
                "adapter_bytes_sent", "sync_seconds", "put_seconds", "worker_seconds", "worker_restarts")},
                same_as_in_process=ro.completion_ids == ref.completion_ids))
            print("pool", res["pool"][-1], flush=True)
    finally:
        pool.close()
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        open(args.out, "w").write(text + "\n")


if __name__ == "__main__":
    main()
