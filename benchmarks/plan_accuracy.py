#!/usr/bin/env python
"""How close is `leantune plan` to the peak RSS a run really reaches?

For every configuration (model size, sequence length, micro-batch, checkpointing, quantization, dtype,
AdamW / MeZO / full fine-tuning) the planner's prediction is computed from the recipe alone, then the
run is trained for a few steps with the real CLI (``leantune train RECIPE``) in its own fresh
subprocess, and the child's whole-process peak RSS is measured: the larger of the kernel's
``ru_maxrss`` and the ledger's ``peak_rss_bytes`` (``leantune.metering.PeakMemory``). The parent
never imports torch, so no child inherits a large high-water mark. Target: every prediction within
+-15% of the measured peak.

Models: two Llama configs with random weights written as safetensors directories (``mini``: 4 layers,
hidden 256, vocab 8192; ``small``: 8 layers, hidden 512, vocab 32000, tied) and SmolLM2-135M-Instruct
(``builtin:``, GGUF). Data: prompt/completion pairs of one-token words; in every micro-batch the first
example is exactly ``data.max_length`` tokens and the others 60-90% of it (so batches are padded, as
the planner assumes), half prompt, half completion (``memory.loss_fraction: 0.5``).

The same runs give the cost model's factors (``leantune.plan.search.COST``): CPU seconds per optimizer
step (after the first) of the SmolLM2 ``cost`` family, each relative to its base configuration.

    HF_HUB_OFFLINE=1 python benchmarks/plan_accuracy.py --json > plan.json     # ~10-15 min, 1 thread per run
    HF_HUB_OFFLINE=1 python benchmarks/plan_accuracy.py --quick --json         # mini/small models only, ~3 min
    python benchmarks/plan_accuracy.py --rescore WORK_DIR [WORK_DIR ...] --json # re-predict measured runs only

Do not import torch (or anything heavy) at module level: the parent must stay small.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOLERANCE = 0.15
LORA = ["q_proj", "k_proj", "v_proj", "o_proj"]

# name -> Llama config of the random-weight models (written once per work dir)
MODELS = {
    "mini": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 8192, "tie_word_embeddings": False},
    "small": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 4, "vocab_size": 32000, "tie_word_embeddings": True},
}
SMOL = "builtin:smollm2-135m-instruct"

# (name, model, recipe changes, in --quick, cost family base or None)
CONFIGS = [
    ("mini_b4_t256", "mini", {}, True, None),
    ("mini_b8_t512", "mini", {"train.micro_batch_size": 8, "data.max_length": 512}, True, None),
    ("mini_b8_t512_ckpt_all", "mini", {"train.micro_batch_size": 8, "data.max_length": 512,
                                       "train.activation_checkpointing": "all"}, True, None),
    ("small_b4_t512", "small", {"data.max_length": 512}, True, None),
    ("small_b4_t512_ckpt2", "small", {"data.max_length": 512, "train.activation_checkpointing": 2}, True, None),
    ("small_b4_t512_int4_ckpt_all", "small", {"data.max_length": 512, "quant.bits": 4,
                                              "train.activation_checkpointing": "all"}, False, None),
    ("small_bf16_b2_t1024", "small", {"model.dtype": "bfloat16", "train.micro_batch_size": 2,
                                      "data.max_length": 1024}, False, None),
    ("small_full_b2_t256", "small", {"adapter.method": "full", "train.micro_batch_size": 2}, True, None),
    ("small_mezo_b8_t512", "small", {"optim.name": "mezo", "train.micro_batch_size": 8, "data.max_length": 512}, True, None),
    ("smol_b4_t256", SMOL, {}, False, "base"),
    ("smol_b4_t256_ckpt_all", SMOL, {"train.activation_checkpointing": "all"}, False, "smol_b4_t256"),
    ("smol_b4_t256_ckpt2", SMOL, {"train.activation_checkpointing": 2}, False, "smol_b4_t256"),
    ("smol_b4_t256_int8", SMOL, {"quant.bits": 8}, False, "smol_b4_t256"),
    ("smol_b4_t256_int4", SMOL, {"quant.bits": 4}, False, "smol_b4_t256"),
    ("smol_b4_t256_mezo", SMOL, {"optim.name": "mezo"}, False, "smol_b4_t256"),
    ("smol_b1x4_t256", SMOL, {"train.micro_batch_size": 1, "train.grad_accum": 4}, False, "smol_b4_t256"),
    ("smol_b4_t256_chunk64", SMOL, {"loss.chunk_size": 64}, False, "smol_b4_t256"),
    ("smol_b4_t1024_ckpt_all", SMOL, {"data.max_length": 1024, "train.activation_checkpointing": "all"}, False, None),
    ("smol_bf16_b8_t128", SMOL, {"model.dtype": "bfloat16", "train.micro_batch_size": 8, "data.max_length": 128}, False, None),
    # held out: added after the calibration constants were fixed, measured once, never tuned on
    ("heldout_mini_full_bf16_b4_t256", "mini", {"adapter.method": "full", "model.dtype": "bfloat16"}, True, None),
    ("heldout_small_int8_ckpt4_b2x2_t1024", "small", {"quant.bits": 8, "train.activation_checkpointing": 4,
                                                      "train.micro_batch_size": 2, "train.grad_accum": 2,
                                                      "data.max_length": 1024}, True, None),
    ("heldout_smol_alllinear_dropout_b2_t512", SMOL, {"adapter.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                                 "gate_proj", "up_proj", "down_proj"],
                                                      "adapter.r": 16, "adapter.dropout": 0.05,
                                                      "train.micro_batch_size": 2, "data.max_length": 512}, False, None),
    ("heldout_smol_mezo_bf16_int4_b8_t256", SMOL, {"optim.name": "mezo", "model.dtype": "bfloat16", "quant.bits": 4,
                                                   "train.micro_batch_size": 8}, False, None),
    # held out, 2026-12-01: the quantized embedding / lm_head and the vocabulary-subset loss
    ("heldout_smol_int4_emb8_b4_t256", SMOL, {"quant.bits": 4, "quant.embedding_bits": 8}, False, None),
    ("heldout_smol_int4_emb8_subset_ckpt_all_b1_t1024", SMOL, {"quant.bits": 4, "quant.embedding_bits": 8,
                                                               "loss.vocab_subset": 512,
                                                               "loss.vocab_subset_source": "frequency",
                                                               "train.activation_checkpointing": "all",
                                                               "train.micro_batch_size": 1,
                                                               "data.max_length": 1024}, False, None),
]


def log(*args) -> None:
    print("[plan_accuracy]", *args, file=sys.stderr, flush=True)


def base_recipe(model_path: str, data: str, out_dir: str, threads: int, steps: int) -> dict:
    return {
        "model": {"path": model_path, "dtype": "float32"},
        "data": {"train": data, "max_length": 256, "shuffle": False, "overlong": "truncate"},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "target_modules": list(LORA)},
        "loss": {"chunk_size": 256},
        "optim": {"lr": 1e-4, "scheduler": "constant", "zo_samples": 1},
        "train": {"steps": steps, "micro_batch_size": 4, "grad_accum": 1, "output_dir": out_dir,
                  "progress": False, "threads": threads},
        "memory": {"loss_fraction": 0.5},
    }


def apply(raw: dict, changes: dict) -> dict:
    import copy

    raw = copy.deepcopy(raw)
    for key, value in changes.items():
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = value
    return raw


# ================================================================================================
# Child side


def _one_token_words(tok) -> list[str]:
    """Alphabetic words w for which " w" is exactly one token (so n words = n tokens)."""
    words = []
    for piece in sorted(tok.get_vocab()):
        w = piece[1:]
        if piece.startswith("Ġ") and w.isalpha() and w.isascii() and len(tok(" " + w, add_special_tokens=False).input_ids) == 1:
            words.append(w)
        if len(words) >= 64:
            break
    if len(words) < 4:
        raise RuntimeError("tokenizer has too few one-token words for the synthetic data")
    return words


def prepare(spec: dict) -> dict:
    """Write the model (random-weight configs) and one data file per (model, max_length, batch)."""
    import random

    from leantune.config import DataConfig, ModelConfig
    from leantune.data.sft import load_sft_examples
    from leantune.models.loading import load_tokenizer

    out = {}
    if spec["model"] in MODELS:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from leantune.models.tiny import tiny_tokenizer

        path = Path(spec["model_dir"])
        if not (path / "config.json").exists():
            tok = tiny_tokenizer()
            cfg = LlamaConfig(**MODELS[spec["model"]], max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                              pad_token_id=0)
            torch.manual_seed(0)
            LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
            tok.save_pretrained(path)
        model_path = str(path)
    else:
        model_path = spec["model"]
    tok = load_tokenizer(ModelConfig(path=model_path))
    words = _one_token_words(tok)
    bos = len(tok("x", add_special_tokens=True).input_ids) - len(tok("x", add_special_tokens=False).input_ids)
    for T, B, n in spec["datasets"]:
        rng = random.Random(f"plan-accuracy:{T}:{B}")
        records = []
        for i in range(n):
            length = T if i % B == 0 else int(T * rng.uniform(0.6, 0.9))
            p = length // 2 - bos
            c = length - length // 2 - 1  # + eos
            records.append({"prompt": "".join(" " + rng.choice(words) for _ in range(p)),
                            "completion": " " + " ".join(rng.choice(words) for _ in range(c))})
        tag = Path(model_path).name.replace("builtin:", "")
        data = Path(spec["work_dir"]) / f"data-{tag}-{T}-{B}-{n}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        examples, _ = load_sft_examples(data, tok, DataConfig(train=str(data), max_length=T))
        lengths = [len(e.input_ids) for e in examples]
        if lengths[0] != T or max(lengths) != T:
            raise RuntimeError(f"synthetic data: expected first example of {T} tokens, got {lengths[:4]}")
        out[f"{T}:{B}:{n}"] = str(data)
    out["model_path"] = model_path
    return out


def predict(spec: dict) -> dict:
    """The planner's prediction for every recipe of one model (one process per model)."""
    from leantune.config import recipe_from_dict
    from leantune.models.loading import resolve_source
    from leantune.plan import model_shape, plan_memory

    out = {}
    shape = None
    for name, raw in spec["recipes"].items():
        recipe = recipe_from_dict(raw)
        shape = shape or model_shape(recipe.model)
        kind = resolve_source(recipe.model).kind
        plan = plan_memory(recipe, shape, kind)
        out[name] = {"predicted_peak_bytes": plan.peak, "peak_phase": plan.peak_phase, "phases": plan.totals,
                     "terms": {k: v for k, (v, _) in plan.terms.items()}}
    return out


def measure(spec: dict) -> dict:
    """Train the recipe with the real CLI in this (fresh) process; report its peak RSS and step costs."""
    import resource

    from leantune.cli import main as cli_main
    from leantune.train import sft

    cpu_steps: list[float] = []
    marks: dict = {}

    def maxrss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def timed(fn):
        def wrapper(*a, **kw):
            c0 = time.process_time()
            out = fn(*a, **kw)
            cpu_steps.append(time.process_time() - c0)
            return out
        return wrapper

    from leantune.train import session as session_mod

    setup = session_mod.setup_model

    def setup_model(recipe, *a, **kw):
        marks["ru_maxrss_before_load"] = maxrss()
        out = setup(recipe, *a, **kw)
        marks["ru_maxrss_after_setup"] = maxrss()
        return out

    sft.accumulate_gradients = timed(sft.accumulate_gradients)
    sft.zeroth_order_step = timed(sft.zeroth_order_step)
    session_mod.setup_model = setup_model
    t0 = time.perf_counter()
    rc = cli_main(["train", spec["recipe_path"]])
    if rc != 0:
        raise RuntimeError(f"leantune train exited with {rc}")
    ledger = json.loads((Path(spec["out_dir"]) / "ledger.json").read_text())
    peak = max(maxrss(), int(ledger["totals"]["peak_rss_bytes"]))
    return {"measured_peak_bytes": peak, "ru_maxrss_bytes": maxrss(),
            "ledger_peak_rss_bytes": ledger["totals"]["peak_rss_bytes"], **marks,
            "cpu_s_per_step": cpu_steps, "wall_s": time.perf_counter() - t0,
            "tokens": ledger["totals"]["tokens_processed"]}


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out: dict = {"loadavg_before": list(os.getloadavg())}
    try:
        out.update({"prepare": prepare, "predict": predict, "measure": measure}[spec["kind"]](spec))
        out["status"] = "ok"
    except Exception as err:  # noqa: BLE001 -- report, do not crash the whole benchmark
        import traceback

        traceback.print_exc(file=sys.stderr)
        out.update(status="failed", error=f"{type(err).__name__}: {err}")
    out["loadavg_after"] = list(os.getloadavg())
    Path(spec["result_path"]).write_text(json.dumps(out))


# ================================================================================================
# Parent side


def run_child(spec: dict, name: str, work: Path, timeout: float) -> dict:
    spec_path = work / f"spec-{name}.json"
    spec["result_path"] = str(work / f"result-{name}.json")
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore",
               TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS=str(spec.get("threads", 1)))
    env.pop("MALLOC_MMAP_THRESHOLD_", None)  # the trainer sets the threshold itself (train.malloc_mmap_threshold)
    root = str(Path(__file__).resolve().parents[1])  # measure the leantune next to this file
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", str(spec_path)],
                       stdout=sys.stderr, stderr=sys.stderr, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timeout after {timeout:.0f}s"}
    path = Path(spec["result_path"])
    return json.loads(path.read_text()) if path.exists() else {"status": "failed", "error": "no result (killed?)"}


def cost_factors(rows: dict) -> dict:
    """CPU seconds per optimizer step (steps after the first) of each cost-family run over its base's."""
    def per_step(r):
        s = r.get("cpu_s_per_step") or []
        return sum(s[1:]) / len(s[1:]) if len(s) > 1 else None

    out = {}
    for name, row in rows.items():
        base = rows.get(row.get("cost_base") or "")
        if base and per_step(row) and per_step(base):
            out[name] = round(per_step(row) / per_step(base), 3)
    return out


def prepared_recipes(configs: list, work: Path, args) -> dict[str, dict] | None:
    """Write the models and data (one child per model) and return each config's recipe dict."""
    recipes: dict[str, dict] = {}
    for model in dict.fromkeys(c[1] for c in configs):
        mine = [c for c in configs if c[1] == model]
        draft = {name: apply(base_recipe("?", "?", "?", args.threads, args.steps), ch) for name, _, ch, _, _ in mine}
        datasets = sorted({(r["data"]["max_length"], r["train"]["micro_batch_size"],
                            args.steps * r["train"]["micro_batch_size"] * r["train"]["grad_accum"]) for r in draft.values()})
        tag = model if model in MODELS else "smol"
        prep = run_child({"kind": "prepare", "model": model, "model_dir": str(work / f"model-{tag}"),
                          "work_dir": str(work), "datasets": datasets}, f"prepare-{tag}", work, args.timeout)
        if prep.get("status") != "ok":
            log(f"prepare {model} failed: {prep.get('error')}")
            return None
        for name, raw in draft.items():
            T, B = raw["data"]["max_length"], raw["train"]["micro_batch_size"]
            n = args.steps * B * raw["train"]["grad_accum"]
            raw["model"]["path"] = prep["model_path"]
            raw["data"]["train"] = prep[f"{T}:{B}:{n}"]
            raw["train"]["output_dir"] = str(work / f"run-{name}")
            recipes[name] = raw
    return recipes


def rescored_runs(configs: list, dirs: list[Path]) -> tuple[dict, dict, Path]:
    """Recipes and measured results of the configs already run in ``dirs`` (later dirs win)."""
    import yaml

    recipes, measured = {}, {}
    for d in dirs:
        for name, *_ in configs:
            if (d / f"{name}.yaml").exists() and (d / f"result-{name}.json").exists():
                recipes[name] = yaml.safe_load((d / f"{name}.yaml").read_text())
                measured[name] = json.loads((d / f"result-{name}.json").read_text())
    log(f"rescoring {len(recipes)} measured runs from {', '.join(map(str, dirs))}")
    work = Path(tempfile.mkdtemp(prefix="plan-accuracy-rescore-"))
    return recipes, measured, work


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout (logs go to stderr)")
    p.add_argument("--quick", action="store_true", help="only the random-weight mini/small models")
    p.add_argument("--only", default=None, help="comma-separated config names or prefixes")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1: the box is shared)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per child")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--rescore", nargs="+", metavar="WORK_DIR", default=None,
                   help="re-predict the runs already measured in these work dirs with the current planner "
                   "(no training): for calibrating the planner without re-measuring")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        child_main(args._child)
        return 0

    configs = [c for c in CONFIGS if c[3] or not args.quick]
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        configs = [c for c in configs if any(c[0].startswith(w) for w in wanted)]
    t_start = time.perf_counter()
    measured: dict[str, dict] = {}
    if args.rescore:
        recipes, measured, work = rescored_runs(configs, [Path(d) for d in args.rescore])
        configs = [c for c in configs if c[0] in recipes]
    else:
        work = Path(args.work_dir or tempfile.mkdtemp(prefix="plan-accuracy-"))
        work.mkdir(parents=True, exist_ok=True)
        log(f"work dir {work}; {len(configs)} configs; load {os.getloadavg()}")
        recipes = prepared_recipes(configs, work, args)
        if recipes is None:
            return 1
    predictions: dict = {}
    for model in dict.fromkeys(c[1] for c in configs):
        tag = model if model in MODELS else "smol"
        mine = {c[0]: recipes[c[0]] for c in configs if c[1] == model}
        res = run_child({"kind": "predict", "recipes": mine}, f"predict-{tag}", work, args.timeout)
        if res.get("status") != "ok":
            log(f"predict {model} failed: {res.get('error')}")
            return 1
        predictions.update({k: v for k, v in res.items() if k in mine})

    import yaml  # light; the parent never imports torch

    rows: dict[str, dict] = {}
    for name, model, changes, _, cost_base in configs:
        if name in measured:
            res = measured[name]
        else:
            recipe_path = work / f"{name}.yaml"
            recipe_path.write_text(yaml.safe_dump(recipes[name], sort_keys=False))
            log(f"--- {name} (load {os.getloadavg()[0]:.2f})")
            res = run_child({"kind": "measure", "recipe_path": str(recipe_path),
                             "out_dir": recipes[name]["train"]["output_dir"], "threads": args.threads},
                            name, work, args.timeout)
        pred = predictions[name]
        row = {"model": model if model in MODELS else "smollm2-135m", "changes": changes, "status": res.get("status"),
               "predicted_peak_bytes": pred["predicted_peak_bytes"], "peak_phase": pred["peak_phase"],
               "predicted_phases": pred["phases"], "predicted_terms": pred["terms"],
               "cost_base": None if cost_base == "base" else cost_base}
        if res.get("status") == "ok":
            m = res["measured_peak_bytes"]
            row.update({k: res[k] for k in ("measured_peak_bytes", "ru_maxrss_before_load", "ru_maxrss_after_setup",
                                            "cpu_s_per_step", "wall_s", "loadavg_after") if k in res})
            row["error"] = round((pred["predicted_peak_bytes"] - m) / m, 4)
            row["within_tolerance"] = abs(row["error"]) <= TOLERANCE
            log(f"{name}: predicted {pred['predicted_peak_bytes'] / 2**30:.3f} GiB ({pred['peak_phase']}), "
                f"measured {m / 2**30:.3f} GiB, error {row['error']:+.1%}")
        else:
            row["error_message"] = res.get("error")
            log(f"{name}: failed: {res.get('error')}")
        rows[name] = row

    ok = [r for r in rows.values() if r["status"] == "ok"]
    result = {
        "benchmark": "plan_accuracy",
        "mode": ("rescore" if args.rescore else "quick" if args.quick else "full"),
        "rescored_from": args.rescore,
        "tolerance": TOLERANCE,
        "steps": args.steps, "threads": args.threads,
        "configs": rows,
        "summary": {
            "runs": len(rows), "ok": len(ok),
            "within_tolerance": sum(r["within_tolerance"] for r in ok),
            "max_abs_error": max((abs(r["error"]) for r in ok), default=None),
            "mean_abs_error": round(sum(abs(r["error"]) for r in ok) / len(ok), 4) if ok else None,
        },
        "cost_factors_cpu_s_per_step": cost_factors(rows),
        "machine": {"cpus": os.cpu_count(), "loadavg_end": list(os.getloadavg())},
        "total_time_s": round(time.perf_counter() - t_start, 1),
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{'config':32s} {'predicted':>10s} {'measured':>10s} {'error':>8s}  phase")
        for name, r in rows.items():
            if r["status"] == "ok":
                print(f"{name:32s} {r['predicted_peak_bytes'] / 2**30:9.3f}G {r['measured_peak_bytes'] / 2**30:9.3f}G "
                      f"{r['error']:+8.1%}  {r['peak_phase']}")
            else:
                print(f"{name:32s} failed: {r.get('error_message')}")
        print(json.dumps(result["summary"]), json.dumps(result["cost_factors_cpu_s_per_step"]))
    return 0 if ok and all(r["within_tolerance"] for r in ok) else 1


if __name__ == "__main__":
    sys.exit(main())
