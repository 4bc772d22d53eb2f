"""Rollout-phase tokens/s: plain sampling vs exact speculative rollouts (`rl.speculative: prompt_lookup | draft`).

    HF_HUB_OFFLINE=1 python benchmarks/speculative.py --task addition --init runs/sft_smollm2_addition \
        --out benchmarks/results/speculative.json
    HF_HUB_OFFLINE=1 python benchmarks/speculative.py --task addition --no-lookup --draft layers:8 \
        --out benchmarks/results/speculative_draft.json   # self-speculation: the policy's first 8 layers draft

The policy is SmolLM2-135M-Instruct (`builtin:`, the dtype `model.dtype: auto` picks) with a LoRA adapter: the
one in ``--init`` (e.g. the demo's SFT run, whose completions copy the operands from the prompt) or a fresh one.
Prompts come from the task's generator; every call samples ``--group-size`` completions per prompt with per-prompt
seeds and the task's stop rule, exactly as an RL step's rollouts. Plain and each ``--k`` (tokens drafted per
forward) alternate call by call on the same prompts and seeds, ``--repeats`` times, so load from other processes
hits both alike; the report gives each setting's median tokens/s, the acceptance rate, tokens per policy forward,
the policy forwards per call, and the fraction of completions identical to plain sampling's (same seeds: equal up
to float rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile

import torch

from leantune.config import Recipe
from leantune.rl.rollout import sample_groups
from leantune.tasks import get_task
from leantune.train.session import setup_model


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), platform.processor())
    flags = open("/proc/cpuinfo").read()
    return (f"{name}, {torch.get_num_threads()} torch threads, avx512_bf16={'avx512_bf16' in flags}, "
            f"amx_bf16={'amx_bf16' in flags}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="addition")
    ap.add_argument("--init", default=None, help="a LoRA run directory (rl.init); default: a fresh adapter")
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per call (rl.prompts_per_step)")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4], help="rl.speculative_tokens values to compare")
    ap.add_argument("--ngram", type=int, default=3)
    ap.add_argument("--draft", nargs="*", default=[], help="rl.speculative_draft values for draft mode (layers:N or a path)")
    ap.add_argument("--no-lookup", action="store_true", help="skip the prompt_lookup settings")
    ap.add_argument("--repeats", type=int, default=3, help="calls per setting (different prompts each)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    recipe = Recipe.model_validate({
        "model": {"path": args.model, "dtype": args.dtype},
        "data": {"max_length": 512},
        "train": {"output_dir": tempfile.mkdtemp(), "steps": 1},
        "rl": {"task": args.task, "group_size": args.group_size, "max_new_tokens": args.max_new_tokens,
               **({"init": args.init} if args.init else {})},
    })
    model, tok, *_ = setup_model(recipe, init=args.init)
    task = get_task(args.task)
    rows = task.generate(args.prompts * args.repeats, seed=123, split="test")
    batches = [[r["prompt"] for r in rows[i * args.prompts:(i + 1) * args.prompts]] for i in range(args.repeats)]
    settings = [("plain", dict(speculative="off"))] + [
        (f"prompt_lookup_k{k}", dict(speculative="prompt_lookup", speculative_tokens=k, speculative_ngram=args.ngram))
        for k in args.k if not args.no_lookup] + [
        (f"draft_{d}_k{k}", dict(speculative="draft", speculative_tokens=k, speculative_draft=d))
        for d in args.draft for k in args.k]
    load_before = os.getloadavg()
    kw = dict(group_size=args.group_size, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              is_complete=getattr(task, "is_complete", None))
    warm = batches[0][:2]
    sample_groups(model, tok, warm, **{**kw, "max_new_tokens": 4}, seeds=list(range(len(warm))))  # warm-up
    runs: dict[str, list[dict]] = {name: [] for name, _ in settings}
    plain_ids = {}
    for i, prompts in enumerate(batches):
        seeds = [1000 * i + j for j in range(len(prompts))]
        for name, extra in settings:
            ro = sample_groups(model, tok, prompts, seeds=seeds, **kw, **extra)
            if name == "plain":
                plain_ids[i] = ro.completion_ids
            same = sum(a == b for a, b in zip(ro.completion_ids, plain_ids[i])) / len(ro)
            runs[name].append(dict(seconds=ro.seconds, tokens=ro.tokens_generated, tokens_per_s=ro.tokens_generated / ro.seconds,
                                   policy_forwards=ro.decode_steps + 1, row_forwards=ro.row_steps,
                                   draft_tokens=ro.draft_tokens, accepted_tokens=ro.accepted_tokens,
                                   draft_forwards=ro.extra.get("draft_forwards", 0), draft_row_forwards=ro.draft_row_steps,
                                   identical_to_plain=same))
            print(name, i, {k: round(v, 3) if isinstance(v, float) else v for k, v in runs[name][-1].items()}, flush=True)
    summary = {}
    for name, rs in runs.items():
        tokens, drafted, acc, rowf = (sum(r[k] for r in rs) for k in ("tokens", "draft_tokens", "accepted_tokens", "row_forwards"))
        summary[name] = dict(median_tokens_per_s=statistics.median(r["tokens_per_s"] for r in rs),
                             total_tokens_per_s=tokens / sum(r["seconds"] for r in rs),
                             acceptance_rate=acc / drafted if drafted else None, tokens_per_forward=tokens / rowf,
                             policy_forwards_per_call=statistics.mean(r["policy_forwards"] for r in rs),
                             draft_forwards_per_call=statistics.mean(r["draft_forwards"] for r in rs),
                             draft_row_forwards_per_token=sum(r["draft_row_forwards"] for r in rs) / tokens,
                             identical_to_plain=statistics.mean(r["identical_to_plain"] for r in rs))
    base = summary["plain"]["total_tokens_per_s"]
    for s in summary.values():
        s["speedup_vs_plain"] = s["total_tokens_per_s"] / base
    res = dict(cpu=cpu_model(), torch=torch.__version__, model=args.model, init=args.init,
               dtype=str(next(model.parameters()).dtype), task=args.task, prompts_per_call=args.prompts,
               group_size=args.group_size, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
               ngram=args.ngram, repeats=args.repeats, load_average_before=load_before,
               load_average_after=os.getloadavg(), summary=summary, runs=runs)
    print(json.dumps(dict(res, runs=None), indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
