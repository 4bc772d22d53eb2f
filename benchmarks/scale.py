"""Processes and rollout workers on one machine: what they cost (issue: run session, parts 3-4).

SFT, SmolLM2-135M-Instruct, LoRA r=8 on q/k/v/o, fp32, the same global batch (8 examples of ~``--seq`` tokens)
in every arm, each arm its own `leantune train` process tree:

- ``1proc_2threads``: one process, 2 torch threads, micro-batch 4 x accumulation 2;
- ``ddp_2x1``: ``--nproc 2`` (torchrun, gloo), 1 thread each, micro-batch 4 x accumulation 1, DDP;
- ``fsdp_2x1``: the same with ``train.parallel: fsdp`` (FSDP2).

RL, the addition task, SmolLM2 base, DAPO, G=4 x 4 prompts, 32 new tokens, each arm its own `leantune rl`:
in-process (2 threads), 1 and 2 Ray workers (1 thread each), 2 workers with ``rl.async_rollouts``.

On a 2-core machine more processes share the same two cores: these rows show overheads, not speed-ups.
The last block *models* (does not measure) the rollout phase at 8, 32 and 128 workers from the measured
per-worker sampling time and adapter-sync cost, next to AWorld's 14.6x (arXiv 2508.20404).

    HF_HUB_OFFLINE=1 python benchmarks/scale.py --json            # ~15 min on 2 cores
    HF_HUB_OFFLINE=1 python benchmarks/scale.py --json --tiny     # smoke check, tiny model, ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def log(*a):
    print("[scale]", *a, file=sys.stderr, flush=True)


def cpu_info() -> dict:
    model, flags = platform.processor(), ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1] for line in text.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return {"model": model, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags.split(),
            "amx": "amx_bf16" in flags.split()}


def sft_data(path: Path, n: int, words: int) -> Path:
    rng = random.Random(0)
    vocab = "the a model data loss step token memory layer adapter rank batch learning rate gradient".split()
    with open(path, "w") as f:
        for i in range(n):
            prompt = f"Document {i}: " + " ".join(rng.choice(vocab) for _ in range(words // 2)) + "\nSummary:"
            completion = " ".join(rng.choice(vocab) for _ in range(words // 2))
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return path


def run(args: list[str], env_extra: dict, timeout: float) -> tuple[int, float, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **env_extra)
    env.pop("WORLD_SIZE", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "leantune", "--quiet", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        log("FAILED:", " ".join(args), proc.stderr[-1500:])
    return proc.returncode, time.perf_counter() - t0, proc.stderr[-800:]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def sft_arm(name: str, work: Path, model: str, data: Path, steps: int, seq: int, nproc: int, parallel: str) -> dict:
    accum = 2 // nproc
    recipe = {
        "model": {"path": model, "dtype": "float32"},
        "data": {"train": str(data), "max_length": 2 * seq, "shuffle": False},  # room: nothing is truncated
        "adapter": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "loss": {"chunk_size": 256},
        "optim": {"lr": 1e-4, "scheduler": "constant"},
        "train": {"steps": steps, "micro_batch_size": 4, "grad_accum": accum, "seed": 0, "parallel": parallel,
                  "activation_checkpointing": "off",
                  "threads": 2 // nproc, "output_dir": str(work / name), "progress": False, "allocator": "system",
                  "log_every": 1},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    extra = ["--nproc", str(nproc)] if nproc > 1 else []
    rc, wall, err = run(["train", str(path), *extra], {"OMP_NUM_THREADS": str(2 // nproc)}, timeout=1800)
    if rc != 0:
        return {"arm": name, "error": err}
    rows, ledger = metrics(work / name), json.loads((work / name / "ledger.json").read_text())
    timed = rows[1:]  # the first step warms up
    step_s = [r["elapsed_s"] - p["elapsed_s"] for p, r in zip(rows, rows[1:])]
    global_tokens = ledger["totals"]["tokens_processed"] / steps * len(timed)
    return {"arm": name, "processes": nproc, "threads_per_process": 2 // nproc, "parallel": parallel if nproc > 1 else None,
            "tokens_per_s": global_tokens / sum(step_s), "step_s": step_s, "losses": [r["loss"] for r in rows],
            "peak_rss_gib_per_process": ledger["totals"]["peak_rss_bytes"] / 2**30, "wall_s": wall,
            "global_batch": ledger["extra"]["distributed"]["global_batch"]}


def rl_arm(name: str, work: Path, model: str, steps: int, workers: int, async_: bool, tiny: bool) -> dict:
    recipe = {
        "model": {"path": model, "dtype": "float32"},
        "data": {"max_length": 96},
        "adapter": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "optim": {"lr": 1e-4, "scheduler": "constant"},
        "train": {"steps": steps, "micro_batch_size": 8, "seed": 0, "threads": 1 if workers else 2,
                  "output_dir": str(work / name), "progress": False, "allocator": "system", "log_every": 1},
        "rl": {"task": "addition", "num_prompts": 64, "group_size": 4, "prompts_per_step": 4,
               "max_new_tokens": 8 if tiny else 32, "dynamic_sampling": False, "rollout_workers": workers,
               "async_rollouts": async_},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    rc, wall, err = run(["rl", str(path)], {"OMP_NUM_THREADS": "1" if workers else "2"}, timeout=2400)
    if rc != 0:
        return {"arm": name, "error": err}
    rows, ledger = metrics(work / name), json.loads((work / name / "ledger.json").read_text())
    timed = rows[1:]
    out = {"arm": name, "workers": workers, "async": async_, "step_s": [r["step_s"] for r in rows],
           "seconds_per_update": sum(r["step_s"] for r in timed) / len(timed),
           "rollout_s_per_update": sum(r["rollout_s"] for r in timed) / len(timed),
           "rollouts": ledger["totals"]["rollouts"]["rollouts_generated"], "wall_s": wall,
           "peak_rss_gib_learner": ledger["totals"]["peak_rss_bytes"] / 2**30}
    if workers:
        w = ledger["extra"]["rollout_workers"]
        out.update(adapter_bytes_sent=w["adapter_bytes_sent"], adapter_sync_s_total=w["adapter_sync_s"],
                   adapter_sync_share_of_step=w["adapter_sync_s"] / max(1e-9, sum(r["step_s"] for r in rows)))
    return out


def model_rollout_phase(rl_rows: dict) -> dict:
    """Modelled, not measured: the rollout phase with N workers = (one worker's sampling time for the step's
    groups) / N + the measured adapter sync per step (workers fetch in parallel; the learner's put is once)."""
    one = rl_rows.get("ray_1")
    if not one or "error" in one:
        return {"note": "needs the ray_1 arm"}
    t1 = one["rollout_s_per_update"]
    sync = one["adapter_sync_s_total"] / max(1, len(one["step_s"]))
    update = one["seconds_per_update"] - t1
    out = {"measured_one_worker_rollout_s": t1, "measured_sync_s_per_step": sync, "measured_update_s": update,
           "assumption": "the step's groups split evenly over N workers with one worker's measured throughput each; "
                         "sync cost constant in N (object-store fetches run in parallel); update unchanged",
           "aworld_rollout_speedup": 14.6}
    for n in (8, 32, 128):
        phase = t1 / n + sync
        out[f"workers_{n}"] = {"rollout_s": phase, "rollout_speedup_vs_1": t1 / phase,
                               "seconds_per_update": update + phase}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--tiny", action="store_true", help="the tiny 2-layer model: a smoke check")
    p.add_argument("--sft-steps", type=int, default=6, help="optimizer steps per SFT arm (the first is warm-up)")
    p.add_argument("--rl-steps", type=int, default=4, help="RL updates per arm (the first is warm-up)")
    p.add_argument("--seq", type=int, default=512, help="tokens per SFT example (approximately)")
    p.add_argument("--only", choices=["sft", "rl"], help="run one half")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="leantune-scale-"))
    if args.tiny:
        from leantune.models.tiny import save_tiny_model

        model = str(save_tiny_model(work / "tiny", seed=0, chat_template=True))
    else:
        model = "builtin:smollm2-135m-instruct"
    result = {"benchmark": "scale", "cpu": cpu_info(), "model": "tiny" if args.tiny else model,
              "note": "2 cores: more processes or workers share the same two cores, so these rows are overheads, "
                      "not speed-ups", "sft": {}, "rl": {}}
    if args.only in (None, "sft"):
        data = sft_data(work / "sft.jsonl", 64, words=16 if args.tiny else args.seq * 3 // 4)
        for name, nproc, parallel in (("1proc_2threads", 1, "ddp"), ("ddp_2x1", 2, "ddp"), ("fsdp_2x1", 2, "fsdp")):
            log("sft", name)
            result["sft"][name] = sft_arm(name, work, model, data, args.sft_steps, args.seq, nproc, parallel)
        base = result["sft"]["1proc_2threads"].get("tokens_per_s")
        for name in ("ddp_2x1", "fsdp_2x1"):
            if base and "tokens_per_s" in result["sft"][name]:
                result["sft"][name]["tokens_per_s_vs_1proc"] = result["sft"][name]["tokens_per_s"] / base
        result["sft"]["target"] = "DDP at 2 processes costs <= 10% of tokens/s against 1 process x 2 threads"
    if args.only in (None, "rl"):
        for name, workers, async_ in (("in_process", 0, False), ("ray_1", 1, False), ("ray_2", 2, False),
                                      ("ray_2_async", 2, True)):
            log("rl", name)
            result["rl"][name] = rl_arm(name, work, model, args.rl_steps, workers, async_, args.tiny)
        base = result["rl"]["in_process"].get("seconds_per_update")
        for name, row in result["rl"].items():
            if base and isinstance(row, dict) and "seconds_per_update" in row:
                row["update_time_vs_in_process"] = row["seconds_per_update"] / base
        result["rl"]["target"] = "adapter sync to a Ray worker <= 5% of a step"
        result["modelled"] = model_rollout_phase(result["rl"])
    print(json.dumps(result, indent=1) if args.json else json.dumps(result))


if __name__ == "__main__":
    main()
