#!/usr/bin/env python
"""`leantune rl`'s update with bf16 LoRA matmuls (`adapter.compute_dtype: auto`) against PEFT's fp32-adapter casts.

`policy_update` CPU-seconds on SmolLM2-135M-Instruct (bf16) with `recipes/rl_countdown.yaml`'s adapter, the two
settings alternating on the same batch (4 groups x 8 completions, 60-token prompts, 94-100-token completions,
random ids), lr 0 so every repetition updates the same weights; the first repetition of each is a warm-up.
Prints one JSON object: each setting's CPU-s per update, the medians and their ratio (auto / float32), the CPU.

    HF_HUB_OFFLINE=1 python benchmarks/rl_update_compute.py [--threads 1] [--repeats 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's leantune


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1, as the learning_per_cost arms)")
    p.add_argument("--repeats", type=int, default=4, help="updates per setting, the first a warm-up")
    args = p.parse_args(argv)

    import torch

    from leantune.adapters.lora import low_precision_lora
    from leantune.compute import cpu_summary
    from leantune.config import load_recipe
    from leantune.rl.batch import Batch
    from leantune.train.rl import policy_update
    from leantune.train.session import setup_model

    torch.set_num_threads(args.threads)
    recipe = load_recipe(str(ROOT / "recipes" / "rl_countdown.yaml"), ["rl.init=null", "model.dtype=bfloat16"])
    model, tok, *_ = setup_model(recipe)
    g = torch.Generator().manual_seed(0)
    n, prompt_len, completion_len = 32, 60, 100
    prompts = [torch.randint(100, 40000, (prompt_len,), generator=g).tolist() for _ in range(n // 8)]
    batch = Batch(prompt_ids=[prompts[i // 8] for i in range(n)],
                  completion_ids=[torch.randint(100, 40000, (completion_len - i % 7,), generator=g).tolist()
                                  for i in range(n)],
                  rewards=[float(i % 3 == 0) for i in range(n)], correct=[False] * n, truncated=[False] * n,
                  texts=[""] * n)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.0)  # lr 0: every repetition updates the same weights
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    low = low_precision_lora(model, recipe)
    if low is None:
        raise SystemExit("adapter.compute_dtype auto does not apply to this recipe (needs a bf16, unquantized base)")
    runs: dict[str, list[float]] = {"auto": [], "float32": []}
    for rep in range(args.repeats):
        for name, lp in (("auto", low), ("float32", None)):
            c0 = time.process_time()
            policy_update(model, opt, sched, batch, recipe.rl, pad_id=tok.pad_token_id, micro_batch=8,
                          chunk_size=recipe.loss.chunk_size, max_grad_norm=1.0, low_precision=lp)
            if rep:  # the first repetition warms up
                runs[name].append(time.process_time() - c0)
    median = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    print(json.dumps({"benchmark": "rl_update_compute", "cpu": cpu_summary(), "threads": args.threads,
                      "cpu_s_per_update": {k: [round(x, 2) for x in v] for k, v in runs.items()},
                      "median_cpu_s": {k: round(v, 2) for k, v in median.items()},
                      "auto_over_float32": round(median["auto"] / median["float32"], 3)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
