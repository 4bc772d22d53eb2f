#!/usr/bin/env python
"""Accuracy and loss of the demo task with an INT4 (or INT8) frozen base vs full precision.

Issue 4, item 1: "Report the accuracy and loss effect on the demo task, INT4 vs full precision". Every
arm trains the demo recipe (``recipes/sft_smollm2_addition.yaml``: SmolLM2-135M-Instruct, bf16,
LoRA r=16 on q/k/v/o, lr 3e-3, batch 8) with the same data, seed and steps through the real CLI,
each in its own process, and differs only in ``quant.bits`` / ``quant.embedding_bits``:

- ``fp``: the base as loaded (``model.dtype``, bf16 in the recipe);
- ``int4``: ``quant.bits=4`` (group size 64): every linear layer but the lm_head stored as INT4 codes,
  dequantized on the fly; LoRA trains on top;
- ``int8``: ``quant.bits=8`` (``--arms fp,int4,int8``);
- ``int4_emb8`` / ``int4_emb4``: ``int4`` + ``quant.embedding_bits=8`` / ``4``: the tied embedding / lm_head
  stored as INT8 / INT4 too.

Per arm: ``leantune train RECIPE key=value...`` then ``leantune eval RUN --task addition`` (50 held-out
problems, greedy; a quantized run is evaluated on the grid it was trained on, ``W_hat``). Reported:
the final step's train loss and the mean over the last 10 steps, the held-out loss (``data.eval``,
the run's last metrics row), accuracy, training wall time and tokens, and peak RSS two ways: the whole
training run (leantune's ledger, from ``train()``'s start), dominated by loading the GGUF file, which
is the same for every arm; and the *training phase*, from the line ``[leantune] data:`` (printed once
the model is loaded and quantized) to the end, read from the child's kernel high-water mark after
resetting it (``/proc/PID/clear_refs``). ``--baseline`` also
measures the untrained base at each arm's precision (what quantization alone costs).

    HF_HUB_OFFLINE=1 python benchmarks/int4_accuracy.py --json > int4.json           # 60 steps per arm
    HF_HUB_OFFLINE=1 python benchmarks/int4_accuracy.py --steps 20 --arms fp,int4     # quicker
    HF_HUB_OFFLINE=1 python benchmarks/int4_accuracy.py --quick --json                # tiny model smoke run

``--quick`` uses leantune's tiny random model: it checks the plumbing, its numbers mean nothing.
The parent never imports torch; logs go to stderr, ``--json`` prints one JSON object to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # children import leantune from this checkout
RECIPE = REPO / "recipes" / "sft_smollm2_addition.yaml"
ARMS = {"fp": (None, None), "int4": (4, None), "int8": (8, None), "int4_emb8": (4, 8), "int4_emb4": (4, 4)}  # name -> (bits, embedding bits)
EVAL = {"num_problems": 50, "max_new_tokens": 48, "batch_size": 25}  # the demo recipe's eval section


def log(*args) -> None:
    print("[int4_accuracy]", *args, file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def leantune_commit() -> str | None:
    """The checkout's commit, with '+local-changes' when leantune/ differs from it (None outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "leantune"], cwd=REPO, capture_output=True,
                               text=True, check=False).stdout.strip()
    except OSError:
        return None
    return (commit + ("+local-changes" if dirty else "")) or None


def _env(threads: int) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
                OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TRANSFORMERS_VERBOSITY="error",
                PYTHONWARNINGS="ignore",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def _vm_hwm_bytes(pid: int) -> int | None:
    """VmHWM of process ``pid`` (its peak RSS since start or the last clear_refs reset), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def run_measured(cmd: list[str], threads: int, timeout_s: float, stdout_path: Path | None = None,
                 phase_marker: str | None = None) -> dict:
    """Run ``cmd``; return its exit code, wall time and the kernel's peak RSS of that child (wait4).

    With ``phase_marker``, the child's stdout is read line by line: at the first line starting with it,
    the child's peak-RSS mark is reset (``/proc/PID/clear_refs``, Linux) and then read every 0.2 s, so
    ``phase_peak_rss_bytes`` is the peak from that line on (training, without the model load).
    """
    out = open(stdout_path, "w") if stdout_path else None  # noqa: SIM115 -- closed below, after wait4
    t0 = time.perf_counter()
    phase = {"started": False, "peak": None}
    reader = None
    try:
        pipe = subprocess.PIPE if phase_marker else (out or sys.stderr)
        proc = subprocess.Popen(cmd, stdout=pipe, stderr=sys.stderr, env=_env(threads), cwd=REPO,
                                text=bool(phase_marker))
        if phase_marker:
            def relay():
                for line in proc.stdout:
                    (out or sys.stderr).write(line)
                    if not phase["started"] and line.startswith(phase_marker):
                        try:
                            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
                            phase["started"] = True
                        except OSError:
                            pass
            reader = threading.Thread(target=relay, daemon=True)
            reader.start()
        deadline, timed_out = time.monotonic() + timeout_s, False
        while True:
            if phase["started"]:
                hwm = _vm_hwm_bytes(proc.pid)  # monotone between resets: the last reading is the peak so far
                if hwm:
                    phase["peak"] = max(phase["peak"] or 0, hwm)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                timed_out = True
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if reader:
            reader.join(timeout=10)
        if out:
            out.close()
    return {"returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
            "peak_rss_bytes": usage.ru_maxrss * 1024, "phase_peak_rss_bytes": phase["peak"], "timed_out": timed_out}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "leantune.cli", *args]


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def train_arm(name: str, quant: tuple[int | None, int | None], args, work: Path, data: dict, model: str | None) -> dict:
    bits, embedding_bits = quant
    run_dir = work / f"run-{name}"
    overrides = [f"data.train={data['train']}", f"data.eval={data['valid']}", f"train.output_dir={run_dir}",
                 f"train.steps={args.steps}", f"train.seed={args.seed}", "train.progress=false",
                 f"train.threads={args.threads}", f"train.save_every={args.save_every}", "train.eval_every=0"]
    if bits:
        overrides += [f"quant.bits={bits}", f"quant.group_size={args.group_size}"]
    if embedding_bits:
        overrides += [f"quant.embedding_bits={embedding_bits}", f"quant.group_size={args.group_size}"]
    if model:
        overrides.append(f"model.path={model}")
    if args.dtype:
        overrides.append(f"model.dtype={args.dtype}")
    log(f"--- {name}: train ({' '.join(overrides[3:])}), load {loadavg()}")
    resume = ["--resume"] if args.resume else []  # continue a killed arm from its last checkpoint
    train = run_measured(_cli("train", str(RECIPE), *overrides, *resume), args.threads, args.timeout,
                         phase_marker="[leantune] data:")  # printed once the model is loaded (and quantized)
    if train["returncode"] != 0:
        return {"status": "failed", "error": f"leantune train exited with {train['returncode']}", "train_process": train}
    ledger = json.loads((run_dir / "ledger.json").read_text())
    rows = _metrics(run_dir)
    losses = [r["loss"] for r in rows if "loss" in r]
    last_eval = next((r for r in reversed(rows) if "eval_loss" in r), {})
    totals = ledger.get("totals", {})

    log(f"--- {name}: eval on {EVAL['num_problems']} held-out problems")
    eval_out = work / f"eval-{name}.json"
    ev = run_measured(_cli("eval", str(run_dir), "--task", "addition", "--num-problems", str(EVAL["num_problems"]),
                           "--max-new-tokens", str(EVAL["max_new_tokens"]), "--batch-size", str(EVAL["batch_size"])),
                      args.threads, args.timeout, stdout_path=eval_out)
    accuracy = json.loads(eval_out.read_text()) if ev["returncode"] == 0 else {}
    return {
        "status": "ok" if ev["returncode"] == 0 else "eval failed",
        "quant_bits": bits,
        "quant_embedding_bits": embedding_bits,
        "final_train_loss": losses[-1] if losses else None,
        "mean_train_loss_last_10_steps": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "train_losses": losses,
        "eval_loss": last_eval.get("eval_loss"),
        "eval_ppl": last_eval.get("eval_ppl"),
        "accuracy": accuracy.get("accuracy"),
        "correct": accuracy.get("correct"),
        "problems": accuracy.get("problems"),
        "example_completions": accuracy.get("examples", [])[:2],
        "peak_rss_bytes_ledger": totals.get("peak_rss_bytes"),
        "peak_rss_bytes_training_phase": train["phase_peak_rss_bytes"],
        "train_wall_time_s_ledger": totals.get("wall_time_s"),
        "train_process_wall_s": train["wall_s"],
        "tokens_processed": totals.get("tokens_processed"),
        "quant": ledger.get("extra", {}).get("quant"),
        "eval_process": ev,
    }


BASELINE_CODE = """
import json, sys
from leantune.config import ModelConfig
from leantune.eval.evaluate import task_accuracy
from leantune.models.loading import load_model_and_tokenizer
path, dtype, bits, emb_bits, group, n, new, bs = sys.argv[1:9]
model, tok, _ = load_model_and_tokenizer(ModelConfig(path=path, dtype=dtype))
if bits != "none" or emb_bits != "none":
    from leantune.quant import fake_quantize_model
    fake_quantize_model(model, None if bits == "none" else int(bits), int(group), skip=["lm_head"],
                        embedding_bits=None if emb_bits == "none" else int(emb_bits))
print(json.dumps(task_accuracy(model, tok, "addition", num_problems=int(n), max_new_tokens=int(new), batch_size=int(bs))))
"""


def baseline_arm(name: str, quant: tuple[int | None, int | None], args, work: Path, model: str, dtype: str) -> dict:
    bits, embedding_bits = quant
    log(f"--- {name}: untrained base accuracy")
    out = work / f"baseline-{name}.json"
    res = run_measured([sys.executable, "-c", BASELINE_CODE, model, dtype, str(bits or "none"),
                        str(embedding_bits or "none"), str(args.group_size),
                        str(EVAL["num_problems"]), str(EVAL["max_new_tokens"]), str(EVAL["batch_size"])],
                       args.threads, args.timeout, stdout_path=out)
    if res["returncode"] != 0:
        return {"status": "failed", "process": res}
    acc = json.loads(out.read_text().strip().splitlines()[-1])
    return {"status": "ok", "accuracy": acc["accuracy"], "correct": acc["correct"], "problems": acc["problems"],
            "process": res}


def _recipe_value(text: str, section: str, key: str) -> str | None:
    """A scalar from the demo recipe, read without importing yaml in the parent."""
    current = None
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")):
            current = line.split(":", 1)[0].strip()
        elif current == section and line.strip().startswith(f"{key}:"):
            return line.split(":", 1)[1].split("#", 1)[0].strip()
    return None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default="fp,int4", help="comma-separated: fp, int4, int8, int4_emb8, int4_emb4 (default fp,int4)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per arm (default 60, the demo's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-size", type=int, default=64, help="quant.group_size of the quantized arms")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="model.dtype of every arm (default: the recipe's, bfloat16)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every process")
    p.add_argument("--jobs", type=int, default=1,
                   help="arms run at once (each its own process; >1 gives every arm the same machine load)")
    p.add_argument("--train-problems", type=int, default=2000, help="leantune make-data --train")
    p.add_argument("--save-every", type=int, default=10,
                   help="train.save_every: checkpoints let --resume continue an arm that was killed")
    p.add_argument("--resume", action="store_true",
                   help="continue each arm from its checkpoint in --work-dir (resume == uninterrupted in leantune; "
                        "the training-phase peak then covers the last segment only)")
    p.add_argument("--baseline", action="store_true", help="also evaluate the untrained base at each precision")
    p.add_argument("--quick", action="store_true", help="tiny random model, 3 steps: plumbing check only")
    p.add_argument("--json", action="store_true")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    if unknown := [a for a in arms if a not in ARMS]:
        raise SystemExit(f"--arms: unknown {unknown}; valid: {', '.join(ARMS)}")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="int4_accuracy_"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model = None
    if args.quick:
        args.steps = min(args.steps, 3)
        model = str(work / "tiny-model")
        code = "import sys; from leantune.models.tiny import save_tiny_model; save_tiny_model(sys.argv[1])"
        subprocess.run([sys.executable, "-c", code, model], check=True, env=_env(args.threads))
    text = RECIPE.read_text()
    dtype = args.dtype or _recipe_value(text, "model", "dtype") or "float32"
    log(f"work dir {work}; data: leantune make-data addition")
    subprocess.run(_cli("make-data", "addition", "--out", str(work / "data"), "--train", str(args.train_problems)),
                   check=True, env=_env(args.threads), cwd=REPO, stdout=sys.stderr)
    data = {"train": str(work / "data" / "train.jsonl"), "valid": str(work / "data" / "valid.jsonl")}

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each arm is its own process; threads only wait
        futures = {name: pool.submit(train_arm, name, ARMS[name], args, work, data, model) for name in arms}
        runs = {name: f.result() for name, f in futures.items()}
        baselines = {}
        if args.baseline:
            base_model = model or _recipe_value(text, "model", "path")
            futures = {name: pool.submit(baseline_arm, name, ARMS[name], args, work, base_model, dtype) for name in arms}
            baselines = {name: f.result() for name, f in futures.items()}
    for name, r in runs.items():
        log(f"{name}: acc {r.get('accuracy')}, final loss {r.get('final_train_loss')}, eval loss {r.get('eval_loss')}, "
            f"peak {r.get('peak_rss_bytes_ledger')} (training phase {r.get('peak_rss_bytes_training_phase')}), "
            f"wall {r.get('train_wall_time_s_ledger')}")

    def delta(name: str, key: str):
        a, b = runs.get(name, {}).get(key), runs.get("fp", {}).get(key)
        return None if a is None or b is None else round(a - b, 6)

    def ratio(name: str, key: str):
        a, b = runs.get(name, {}).get(key), runs.get("fp", {}).get(key)
        return None if not a or not b else round(a / b, 3)

    comparison = {name: {"accuracy_minus_fp": delta(name, "accuracy"),
                         "final_train_loss_minus_fp": delta(name, "final_train_loss"),
                         "mean_train_loss_last_10_minus_fp": delta(name, "mean_train_loss_last_10_steps"),
                         "eval_loss_minus_fp": delta(name, "eval_loss"),
                         "peak_rss_vs_fp": ratio(name, "peak_rss_bytes_ledger"),
                         "training_phase_peak_rss_vs_fp": ratio(name, "peak_rss_bytes_training_phase"),
                         "train_wall_time_vs_fp": ratio(name, "train_wall_time_s_ledger")}
                  for name in arms if name != "fp"}
    result = {
        "benchmark": "int4_accuracy",
        "mode": "quick" if args.quick else "full",
        "recipe": str(RECIPE.relative_to(REPO)),
        "leantune_commit": leantune_commit(),
        "settings": {"arms": arms, "steps": args.steps, "seed": args.seed, "dtype": dtype, "jobs": args.jobs, "resumed": args.resume,
                     "group_size": args.group_size, "threads": args.threads, "train_problems": args.train_problems,
                     "eval": {"task": "addition", **EVAL, "decoding": "greedy"},
                     "model": model or _recipe_value(text, "model", "path")},
        "runs": runs,
        "untrained_baselines": baselines,
        "comparison": comparison,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_end": loadavg()},
        "total_wall_time_s": round(time.perf_counter() - t_start, 1),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, r in runs.items():
            print(f"{name:6s} acc {r.get('accuracy')}  final loss {r.get('final_train_loss')}  "
                  f"eval loss {r.get('eval_loss')}  peak {r.get('peak_rss_bytes_ledger')}  "
                  f"wall {r.get('train_wall_time_s_ledger')}")
        print(json.dumps(comparison, indent=2))
    return 0 if all(r.get("status") == "ok" for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
