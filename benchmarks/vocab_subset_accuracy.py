#!/usr/bin/env python
"""How approximate is the vocabulary-subset loss (arXiv 2606.19528), and does it train as well?

Two measurements on the demo task (2-digit addition, SmolLM2-135M-Instruct, offline):

1. ``loss_error``: on held-out examples, the exact per-token cross-entropy against the subset loss, for
   every ``--sources`` x ``--subsets`` (candidates built from the training split, as the trainer does),
   with the model in fp32 ("probability" calibrates on 64 training examples, seed 0, as the trainer
   does): the gap (exact - subset, >= 0, in nats), the probability mass outside the
   subset (1 - exp(-gap)), and the gradient with respect to the final hidden states (cosine and relative
   error vs the exact gradient). Measured on the base model and, with ``--train``, on each trained run.
2. ``training`` (``--train``): ``leantune train`` on the demo recipe (recipes/sft_smollm2_addition.yaml)
   with the exact loss and with each ``--train-subsets`` size (same seed, data, steps), then
   ``leantune eval RUN --task addition``: accuracy, the run's final *exact* eval loss, wall time, peak RSS.
   Every run is a subprocess with this checkout's leantune.

    HF_HUB_OFFLINE=1 python benchmarks/vocab_subset_accuracy.py --json                      # loss error only, ~2 min
    HF_HUB_OFFLINE=1 python benchmarks/vocab_subset_accuracy.py --train --json > vs.json    # + training, ~30-60 min
    HF_HUB_OFFLINE=1 python benchmarks/vocab_subset_accuracy.py --quick --train --json      # tiny model smoke check

Logs go to stderr; ``--json`` prints one JSON object.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's leantune
RECIPE = ROOT / "recipes" / "sft_smollm2_addition.yaml"


def log(*args) -> None:
    print("[vocab_subset_accuracy]", *args, file=sys.stderr, flush=True)


def _env(threads: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore",
               TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ------------------------------------------------------------------------------------------------
# 1. Loss error on held-out data


def loss_error(model, tokenizer, train_file: Path, valid_file: Path, sources: list[str], subsets: list[int],
               max_length: int, batch_size: int = 16, calibration: int = 64, seed: int = 0) -> dict:
    """Exact vs subset loss (and hidden-state gradient) per held-out loss token, for each candidate set."""
    import torch

    from leantune.adapters.lora import causal_lm
    from leantune.config import DataConfig, SpanWeights
    from leantune.data.sft import SPAN_PROMPT, collate, load_sft_examples
    from leantune.losses import (
        build_candidates,
        linear_cross_entropy,
        token_counts,
        vocab_subset,
        vocab_subset_cross_entropy,
    )
    from leantune.losses.subset_setup import calibration_softmax_mass

    lm = causal_lm(model)
    weight = lm.get_output_embeddings().weight.detach().float()  # (V, H)
    vocab = weight.shape[0]
    cfg = DataConfig(train=str(train_file), max_length=max_length)
    train, _ = load_sft_examples(train_file, tokenizer, cfg)
    valid, _ = load_sft_examples(valid_file, tokenizer, cfg)
    all_counts = token_counts((e.input_ids for e in train), vocab)
    target_counts = token_counts(([t for t, s in zip(e.input_ids, e.spans) if s != SPAN_PROMPT] for e in train), vocab)
    mass = None
    if "probability" in sources:  # the trainer's calibration: a seeded sample of the training split
        n = min(calibration, len(train))
        sample = [train[i] for i in sorted(random.Random(seed).sample(range(len(train)), n))]
        mass = calibration_softmax_mass(model, sample, tokenizer.pad_token_id, SpanWeights(), 8, 1024)

    # Final hidden states and labels of every held-out loss token: (K, H), (K,)
    hs, ys = [], []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(valid), batch_size):
            batch = collate(valid[i : i + batch_size], tokenizer.pad_token_id, SpanWeights())
            h = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state[:, :-1]
            y = batch["labels"][:, 1:]
            keep = y != -100
            hs.append(h[keep].float())
            ys.append(y[keep])
    hidden, labels = torch.cat(hs), torch.cat(ys)

    def hidden_grad(fn, *extra):
        """(total loss, d(sum of token losses)/d hidden (K, H)) from the library function itself."""
        h = hidden.clone().requires_grad_(True)
        total = fn(h, weight, labels, *extra, reduction="sum")
        total.backward()
        return float(total), h.grad

    def token_losses(rows: torch.Tensor | None) -> torch.Tensor:
        """(K,) per-token loss, plain PyTorch in chunks: logsumexp over W[rows] (None: all) minus the target logit."""
        head = weight if rows is None else weight[rows]
        out = torch.empty(labels.numel())
        with torch.no_grad():
            for i in range(0, labels.numel(), 512):
                h = hidden[i : i + 512]
                out[i : i + 512] = torch.logsumexp(h @ head.T, dim=1) - (h * weight[labels[i : i + 512]]).sum(1)
        return out

    exact = token_losses(None)
    total_exact, g_exact = hidden_grad(linear_cross_entropy)
    assert abs(total_exact - float(exact.sum())) <= 1e-3 * abs(total_exact), (total_exact, float(exact.sum()))
    rows = []
    for source in sources:
        for k in subsets:
            cands = build_candidates(source, k, weight=weight, all_counts=all_counts, target_counts=target_counts,
                                     probability_mass=mass)
            approx = token_losses(vocab_subset(cands, labels))
            total, g = hidden_grad(vocab_subset_cross_entropy, cands)
            assert abs(total - float(approx.sum())) <= 1e-3 * abs(total), (total, float(approx.sum()))
            gap = exact - approx  # (K,) >= 0
            cos = torch.nn.functional.cosine_similarity(g.flatten(), g_exact.flatten(), dim=0)
            rows.append({
                "source": source, "candidates": int(cands.numel()), "subset_size": int(vocab_subset(cands, labels).numel()),
                "targets_outside_candidates": int((~torch.isin(labels, cands)).sum()),
                "mean_exact_loss": float(exact.mean()), "mean_subset_loss": float(approx.mean()),
                "mean_gap_nats": float(gap.mean()), "relative_gap": float(gap.mean() / exact.mean()),
                "max_gap_nats": float(gap.max()), "median_gap_nats": float(gap.median()),
                "mean_mass_outside_subset": float((1 - torch.exp(-gap)).mean()),
                "hidden_grad_cosine": float(cos),
                "hidden_grad_relative_error": float((g - g_exact).norm() / g_exact.norm()),
            })
            log(f"{source:9s} k={k:6d}: gap {rows[-1]['mean_gap_nats']:.4f} nats "
                f"({100 * rows[-1]['relative_gap']:.2f}%), grad cos {rows[-1]['hidden_grad_cosine']:.4f}")
    return {"loss_tokens": int(labels.numel()), "examples": len(valid), "vocab": vocab,
            "mean_exact_loss": float(exact.mean()), "rows": rows}


def measure_model(target: str, args, data_dir: Path) -> dict:
    """loss_error for a model location or a run directory (base + adapter), in fp32."""
    import torch

    from leantune.eval.evaluate import load_for_eval

    torch.set_num_threads(args.threads)
    model, tok = load_for_eval(target, dtype="float32")
    return loss_error(model, tok, data_dir / "train.jsonl", data_dir / "valid.jsonl", args.sources, args.subsets,
                      args.max_length)


# ------------------------------------------------------------------------------------------------
# 2. Training exact vs subset


def train_and_eval(name: str, subset: int | None, args, data_dir: Path, work: Path, model_path: str) -> dict:
    run = work / f"run-{name}"
    overrides = [f"model.path={model_path}", f"data.train={data_dir / 'train.jsonl'}",
                 f"data.eval={data_dir / 'valid.jsonl'}", f"train.output_dir={run}", f"train.steps={args.steps}",
                 f"train.threads={args.threads}", "train.progress=false", "train.save_every=0"]
    if subset is not None:
        overrides += [f"loss.vocab_subset={subset}", f"loss.vocab_subset_source={args.train_source}"]
    if args.quick:
        overrides += ["model.dtype=float32", "adapter.r=4", "adapter.alpha=8", "optim.lr=0.01", "optim.warmup_steps=0"]
    cmd = [sys.executable, "-m", "leantune.cli", "train", str(RECIPE), *overrides]
    log(f"train {name}: {' '.join(cmd[3:])}")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=_env(args.threads), stdout=sys.stderr, cwd=ROOT)
    train_s = time.perf_counter() - t0
    ledger = json.loads((run / "ledger.json").read_text())
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    cmd = [sys.executable, "-m", "leantune.cli", "eval", str(run), "--task", "addition",
           "--num-problems", str(args.num_problems), "--batch-size", "25"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, env=_env(args.threads), capture_output=True, text=True, cwd=ROOT).stdout
    acc = json.loads(out[out.index("{"):])
    final = metrics[-1]
    return {
        "vocab_subset": subset, "source": args.train_source if subset else None, "steps": args.steps,
        "accuracy": acc["accuracy"], "correct": acc["correct"], "problems": acc["problems"],
        "final_train_loss": final["loss"], "final_eval_loss_exact": final.get("eval_loss"),
        "train_losses": [round(m["loss"], 4) for m in metrics],
        "wall_time_s": ledger["totals"].get("wall_time_s"), "train_process_s": round(train_s, 1),
        "eval_s": round(time.perf_counter() - t0, 1),
        "peak_rss_gib": round(ledger["totals"]["peak_rss_bytes"] / 2**30, 3),
        "tokens_per_s": ledger["per_token"].get("tokens_per_s"),
        "loss_note": ledger.get("extra", {}).get("loss"), "run_dir": str(run),
    }


# ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny random model: a smoke check, numbers mean nothing")
    p.add_argument("--subsets", default="64,256,1024,4096", help="candidate-set sizes for the loss error")
    p.add_argument("--sources", default="probability,frequency,embedding", help="candidate sources for the loss error")
    p.add_argument("--train", action="store_true", help="also train exact vs subset on the demo recipe and evaluate")
    p.add_argument("--no-base-error", action="store_true", help="skip the loss error of the untrained base model")
    p.add_argument("--no-exact-run", action="store_true", help="train only the subset runs (e.g. to add a source)")
    p.add_argument("--train-subsets", default="1024", help="subset sizes trained (besides the exact loss)")
    p.add_argument("--train-source", default="probability", choices=["probability", "frequency", "embedding"])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per training run (the demo uses 60)")
    p.add_argument("--num-problems", type=int, default=50, help="held-out addition problems for accuracy")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch threads (training runs and measurements)")
    p.add_argument("--work-dir", default=None)
    args = p.parse_args(argv)
    args.subsets = [int(x) for x in args.subsets.split(",") if x.strip()]
    args.sources = [x.strip() for x in args.sources.split(",") if x.strip()]
    args.train_subsets = [int(x) for x in args.train_subsets.split(",") if x.strip()]
    if args.quick:
        args.subsets = [k for k in args.subsets if k <= 64] or [16, 64]
        args.train_subsets, args.steps, args.num_problems = [16], min(args.steps, 4), min(args.num_problems, 8)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="vocab-subset-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    import leantune
    from leantune.demo import NUM_TRAIN, NUM_VALID, write_task_data

    data_dir = work / "data"
    write_task_data("addition", data_dir, NUM_TRAIN, NUM_VALID, seed=0)  # = leantune make-data addition
    if args.quick:
        from leantune.models.tiny import save_tiny_model

        model_path = str(save_tiny_model(work / "tiny-model", seed=0, chat_template=True))
    else:
        model_path = "builtin:smollm2-135m-instruct"
    log(f"work dir {work}; leantune from {leantune.__file__}")

    result: dict = {"benchmark": "vocab_subset_accuracy", "mode": "quick" if args.quick else "full",
                    "model": model_path, "task": "addition (leantune make-data addition: 2000 train, 64 valid)",
                    "settings": {k: v for k, v in vars(args).items() if k not in ("json", "work_dir")},
                    "loss_error": {} if args.no_base_error else {"base_model": measure_model(model_path, args, data_dir)}}
    if args.train:
        runs = {} if args.no_exact_run else {"exact": train_and_eval("exact", None, args, data_dir, work, model_path)}
        for k in args.train_subsets:
            name = f"subset_{args.train_source}_{k}"
            runs[name] = train_and_eval(name, k, args, data_dir, work, model_path)
        for name, r in runs.items():
            log(f"{name}: accuracy {r['accuracy']:.3f}, exact eval loss {r['final_eval_loss_exact']}")
        result["training"] = runs
        for name, r in runs.items():  # how approximate the loss is once the model has learned the task
            result["loss_error"][f"after_training_{name}"] = measure_model(r["run_dir"], args, data_dir)
    result["machine"] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                         "loadavg_start": load_start, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                         "note": "2-core VM shared with other jobs: wall times are upper bounds"}
    result["total_wall_time_s"] = round(time.perf_counter() - t_start, 1)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, block in result["loss_error"].items():
            print(f"== loss error: {name} (exact {block['mean_exact_loss']:.4f} nats over {block['loss_tokens']} tokens)")
            for r in block["rows"]:
                print(f"  {r['source']:9s} {r['candidates']:6d}  gap {r['mean_gap_nats']:.5f}  "
                      f"rel {100 * r['relative_gap']:.3f}%  mass {r['mean_mass_outside_subset']:.5f}  "
                      f"grad cos {r['hidden_grad_cosine']:.5f}")
        for name, r in result.get("training", {}).items():
            print(f"== train {name}: accuracy {r['accuracy']:.3f} ({r['correct']}/{r['problems']}), "
                  f"exact eval loss {r['final_eval_loss_exact']}, {r['wall_time_s']:.0f} s, peak {r['peak_rss_gib']} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
