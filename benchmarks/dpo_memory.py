#!/usr/bin/env python
"""Peak memory and throughput of LoRA DPO: `leantune dpo` vs TRL's DPOTrainer + PEFT.

Every arm trains the same model on the same preference pairs (a filler prompt of ``prompt_fraction x seq_len``
tokens and two completions that fill the rest, so prompt + completion = ``seq_len``), with the same LoRA
config, optimizer (AdamW, constant lr, no warmup, clip 1.0), batch (pairs), beta and steps, in the dtype each
library's users would pick on this CPU (``--dtype auto``: bf16 where the CPU has AVX512-BF16 or AMX -- leantune
trains a bf16 base, TRL runs its ``bf16=True`` CPU autocast -- fp32 elsewhere), each arm in its own subprocess (peak RSS per run: a 10 ms psutil poll and ``ru_maxrss``, `sft_memory.RssMonitor`).
The parent never imports torch.

Arms (``--only NAME[,NAME...]``, a prefix selects several):

- ``leantune_live``: ``leantune.train.dpo.train_dpo``; the reference is the adapter-disabled model, one
  no-grad forward per step; each pair's prompt is prefilled once for both completions;
- ``leantune_precompute``: the same with ``dpo.precompute_reference: true`` (the reference pass runs before
  training, outside the timed steps; its time is reported separately);
- ``trl_dpo``: ``trl.DPOTrainer`` with ``peft_config`` (the reference is the adapter-disabled model too) and
  its defaults otherwise (its own padding and checkpointing settings), except the dtype and the shared lr / schedule / steps / batch / ``max_length`` / beta.

tokens/s counts prompt + chosen + rejected tokens of each pair (the same count for every arm) and excludes
the first optimizer step (warm-up). ``--leantune-ckpt`` sets the leantune arms' activation checkpointing.

    HF_HUB_OFFLINE=1 python benchmarks/dpo_memory.py --quick --json      # tiny model, a smoke check
    HF_HUB_OFFLINE=1 python benchmarks/dpo_memory.py --json > dpo.json   # SmolLM2-135M at seq 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's leantune
sys.path.insert(0, str(HERE))
import sft_memory as sm  # noqa: E402  (no torch at import: RssMonitor, model/tokenizer loading, filler text)
from leantune.compute import cpu_summary  # noqa: E402  (no torch at import)


def log(*args) -> None:
    print("[dpo_memory]", *args, file=sys.stderr, flush=True)


# ================================================================================================
# Child side


def prepare_data(spec: dict) -> dict:
    """Write the pairs JSONL: prompt (plain text) + chosen / rejected filler of the same length."""
    import random

    tok = sm._load_tokenizer(spec)
    seq, n = spec["seq_len"], spec["batch"] * spec["steps"]
    n_prompt = int(round(spec["prompt_fraction"] * seq))
    n_completion = seq - n_prompt - 1  # + eos
    one_tok = [w for w in sm.WORDS if len(tok(" " + w, add_special_tokens=False).input_ids) == 1] or ["the"]
    rows = []
    for i in range(n):
        rng = random.Random(f"leantune-dpo-memory:{i}")
        prompt = sm._filler(tok, rng, n_prompt, f"Document {i}. Summarize the notes.\nNotes:", "\nSummary:", True, one_tok)
        chosen = sm._filler(tok, rng, n_completion, "", "", False, one_tok)
        rejected = sm._filler(tok, rng, n_completion, "", "", False, one_tok)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    (Path(spec["work_dir"]) / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"pairs": n, "prompt_tokens": n_prompt, "completion_tokens": n_completion + 1,
            "tokens_per_pair": n_prompt + 2 * (n_completion + 1)}


def run_leantune(spec: dict, mon) -> dict:
    from leantune.config import Recipe
    from leantune.train.dpo import train_dpo

    policy = spec["leantune_ckpt"]
    policy = int(policy) if str(policy).isdigit() else policy
    run_dir = Path(spec["work_dir"]) / f"run-{spec['runner']}"
    recipe = Recipe.model_validate({
        "model": {"path": spec["tiny_dir"] if spec["quick"] else f"builtin:{sm.MODEL_BUILTIN}", "dtype": spec["dtype"]},
        "data": {"train": str(Path(spec["work_dir"]) / "pairs.jsonl"), "max_length": spec["seq_len"], "shuffle": False},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": list(sm.LORA_TARGETS)},
        "loss": {"chunk_size": spec["chunk_size"]},
        "optim": {"lr": spec["lr"], "scheduler": "constant", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0},
        "train": {"steps": spec["steps"], "micro_batch_size": spec["batch"], "grad_accum": 1, "seed": 0,
                  "activation_checkpointing": policy, "output_dir": str(run_dir), "threads": spec["threads"],
                  "progress": False, "log_every": 1},
        "dpo": {"loss": "dpo", "beta": spec["beta"], "precompute_reference": spec["runner_arg"] == "precompute"},
    })
    mon.set_phase("train")  # setup (model load, the precomputed reference) is inside train_dpo
    result = train_dpo(recipe, quiet=True)
    mon.set_phase("teardown")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "step" in r and "loss" in r]
    elapsed = [r["elapsed_s"] for r in rows]
    pref = result.ledger["totals"]["preference"]
    return {"config": {"activation_checkpointing": policy, "loss.chunk_size": spec["chunk_size"],
                       "reference": "precomputed" if spec["runner_arg"] == "precompute" else "adapter disabled, per step"},
            "losses": [r["loss"] for r in rows], "step_times_s": [b - a for a, b in zip([0.0, *elapsed], elapsed)],
            "reference_precompute_s": pref["reference_s"] if spec["runner_arg"] == "precompute" else None,
            "rewards_accuracies": [r["rewards/accuracies"] for r in rows]}


def run_trl(spec: dict, mon) -> dict:
    import trl
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    mon.set_phase("setup")
    rows = [json.loads(x) for x in (Path(spec["work_dir"]) / "pairs.jsonl").read_text().splitlines()]
    tok = sm._load_tokenizer(spec)
    model = sm._load_model(spec)
    common = sm._common_args(spec, str(Path(spec["work_dir"]) / f"out-{spec['runner']}"))
    args = DPOConfig(**common, max_length=spec["seq_len"], beta=spec["beta"])
    clock = sm._StepClock(mon)
    losses = []

    class Observed(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if model.training:
                losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
            return out

    trainer = Observed(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                       peft_config=sm._lora_config(), callbacks=[clock])
    trainer.train()
    mon.set_phase("teardown")
    t = clock.t
    return {"config": {"trl_version": trl.__version__, "gradient_checkpointing": bool(args.gradient_checkpointing),
                       "precompute_ref_log_probs": args.precompute_ref_log_probs, "loss_type": args.loss_type,
                       "padding_free": getattr(args, "padding_free", None), "bf16": args.bf16,
                       "overrides_of_defaults": sorted(set(common) | {"max_length", "beta"})},
            "losses": losses, "step_times_s": [b - a for a, b in zip(t, t[1:])]}


RUNNERS = {"leantune": run_leantune, "trl": run_trl}


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    mon = sm.RssMonitor()
    out: dict = {"runner": spec["runner"], "loadavg_before": sm.loadavg()}
    t0 = time.perf_counter()
    try:
        sm._setup_torch(spec["threads"])
        out.update(prepare_data(spec) if spec["kind"] == "prepare" else RUNNERS[spec["kind"]](spec, mon))
        out["status"] = "ok"
    except Exception as err:  # report, do not crash the whole benchmark
        import traceback

        traceback.print_exc(file=sys.stderr)
        out["status"] = "failed"
        out["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    out["wall_time_s"] = time.perf_counter() - t0
    out["loadavg_after"] = sm.loadavg()
    out.update(mon.stop())
    Path(spec["result_path"]).write_text(json.dumps(out))


# ================================================================================================
# Parent side


def run_child(spec: dict, timeout_s: float) -> dict:
    spec_path = Path(spec["work_dir"]) / f"spec-{spec['runner']}.json"
    spec["result_path"] = str(Path(spec["work_dir"]) / f"result-{spec['runner']}.json")
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(spec["threads"]),
               PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
               PYTHONWARNINGS="ignore")
    if spec["kind"] != "prepare":  # leantune on its train.allocator (auto), the peer as its users run it
        from leantune.allocator import preload_env

        env = preload_env("auto" if spec["kind"] == "leantune" else "system", base=env)
    try:
        subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", str(spec_path)],
                       stdout=sys.stderr, stderr=sys.stderr, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"runner": spec["runner"], "status": "failed", "error": f"timeout after {timeout_s:.0f}s"}
    path = Path(spec["result_path"])
    if not path.exists():
        return {"runner": spec["runner"], "status": "failed", "error": "child exited without a result (out of memory?)"}
    return json.loads(path.read_text())


def summarize(res: dict, tokens_per_step: int) -> dict:
    if res.get("status") != "ok":
        return res
    st = res.get("step_times_s") or []
    timed = st[1:] if len(st) > 1 else st
    res["tokens_per_s"] = tokens_per_step * len(timed) / sum(timed) if timed and sum(timed) > 0 else None
    res["peak_rss_gib"] = round(res["peak_rss_bytes"] / 2**30, 3)
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout (logs go to stderr)")
    p.add_argument("--quick", action="store_true", help="tiny 2-layer model, seq 128: a smoke check")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per arm; the first is warm-up (default 3)")
    p.add_argument("--seq-len", type=int, default=None, help="prompt + one completion, tokens (default 1024; 128 quick)")
    p.add_argument("--batch", type=int, default=2, help="pairs per step (no accumulation)")
    p.add_argument("--prompt-fraction", type=float, default=0.5, help="share of prompt + completion that is prompt")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--leantune-ckpt", default="off", help="leantune activation_checkpointing: off, selective, all or k; a comma list runs one live arm per value "
                   "(the precomputed-reference arm uses the first)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bf16 where the CPU has AVX512-BF16 or AMX, else fp32; leantune trains a bf16 base, "
                   "TRL uses bf16=True (CPU autocast over fp32 weights)")
    p.add_argument("--chunk-size", type=int, default=256, help="leantune loss.chunk_size")
    p.add_argument("--only", action="append", default=[], help="run only these arms (names or prefixes)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per arm before it is killed")
    p.add_argument("--work-dir", default=None, help="where data and runs go (default: a temp dir)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.seq_len = args.seq_len or (128 if args.quick else 1024)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._child:
        child_main(args._child)
        return 0
    ckpts = [c.strip() for c in str(args.leantune_ckpt).split(",") if c.strip()]
    tag = (lambda c: f"_ckpt-{c}") if len(ckpts) > 1 else (lambda c: "")
    arms = [*((f"leantune_live{tag(c)}", "leantune", "live", c) for c in ckpts),
            (f"leantune_precompute{tag(ckpts[0])}", "leantune", "precompute", ckpts[0]), ("trl_dpo", "trl", "default", None)]
    wanted = [w.strip() for item in args.only for w in item.split(",") if w.strip()]
    arms = [a for a in arms if not wanted or any(a[0].startswith(w) for w in wanted)]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dpo-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    base = {"work_dir": str(work), "quick": args.quick, "seq_len": args.seq_len, "batch": args.batch,
            "steps": args.steps, "lr": args.lr, "beta": args.beta, "prompt_fraction": args.prompt_fraction,
            "threads": args.threads, "chunk_size": args.chunk_size, "leantune_ckpt": args.leantune_ckpt,
            "tiny_dir": str(work / "tiny-model"), "dtype": sm.resolve_bench_dtype(args.dtype)}
    log(f"work dir {work}; arms: {', '.join(a[0] for a in arms)}; load {sm.loadavg()}")
    if args.quick:
        code = "import sys; from leantune.models.tiny import save_tiny_model; save_tiny_model(sys.argv[1], layers=2)"
        subprocess.run([sys.executable, "-c", code, base["tiny_dir"]], check=True, stdout=sys.stderr)
    data = run_child({**base, "runner": "prepare", "kind": "prepare"}, args.timeout)
    if data.get("status") != "ok":
        print(json.dumps({"status": "failed", "stage": "prepare", "error": data.get("error")}))
        return 1
    data = {k: data[k] for k in ("pairs", "prompt_tokens", "completion_tokens", "tokens_per_pair")}
    runs = {}
    for name, kind, arg, ckpt in arms:
        log(f"--- {name}")
        runs[name] = summarize(run_child({**base, "runner": name, "kind": kind, "runner_arg": arg, "leantune_ckpt": ckpt},
                                         args.timeout),
                               data["tokens_per_pair"] * args.batch)
        r = runs[name]
        log(f"{name}: " + (f"peak {r['peak_rss_gib']} GiB, {r['tokens_per_s']} tok/s, losses {r['losses']}"
                           if r.get("status") == "ok" else f"{r.get('status')}: {r.get('error')}"))
    ok = {k: v for k, v in runs.items() if v.get("status") == "ok"}
    ratios = {k: {"peak_vs_trl_dpo": round(v["peak_rss_bytes"] / ok["trl_dpo"]["peak_rss_bytes"], 4),
                  "tokens_per_s_vs_trl_dpo": round(v["tokens_per_s"] / ok["trl_dpo"]["tokens_per_s"], 4)
                  if v.get("tokens_per_s") and ok["trl_dpo"].get("tokens_per_s") else None}
              for k, v in ok.items() if k.startswith("leantune") and "trl_dpo" in ok}
    result = {"benchmark": "dpo_memory", "mode": "quick" if args.quick else "full",
              "model": "tiny (2 layers, hidden 64)" if args.quick else f"builtin:{sm.MODEL_BUILTIN}",
              "settings": {k: base[k] for k in ("seq_len", "batch", "steps", "lr", "beta", "prompt_fraction", "threads",
                                                "chunk_size", "leantune_ckpt", "dtype")},
              "cpu": cpu_summary(),
              "data": data, "runs": runs, "leantune_ratios": ratios, "versions": sm._versions(),
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()}}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, r in runs.items():
            print(f"{name:22s} " + (f"peak {r['peak_rss_gib']:.3f} GiB  {r['tokens_per_s'] or 0:8.1f} tok/s  losses "
                                    f"{[round(x, 4) for x in r['losses']]}" if r.get("status") == "ok" else r.get("error", "")))
        print(json.dumps(ratios, indent=1))
    return 0 if all(r.get("status") == "ok" for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
