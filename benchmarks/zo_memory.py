#!/usr/bin/env python
"""Peak memory and time of one MeZO step vs an inference forward vs an AdamW step, full parameters.

MeZO (arXiv 2305.17333) claims training at the memory of inference. This benchmark puts
one number on that claim for leantune: the same model, dtype, batch and allocator setting, each
runner in its *own* subprocess, and the peak resident memory (RSS) of the steps measured by the
kernel. Runners (``--only NAME[,NAME...]``):

- ``inference``: ``lm_loss_sum`` under ``torch.no_grad()``: one forward of the batch through
  leantune's loss (chunked lm_head + cross-entropy at loss positions only). This is exactly the
  objective MeZO evaluates, so it is the reference of the "<= 1.15x inference" target.
- ``inference_logits``: the model's own forward under ``no_grad`` returning the ``[B, T, V]``
  logits (what a stock ``model(**batch)`` costs; no loss).
- ``mezo``: ``leantune.train.sft.zeroth_order_step`` with the ``MeZO`` optimizer that
  ``optim.name: mezo`` builds (every weight trainable, ``adapter.method: full``).
- ``adamw``: the trainer's AdamW step (``accumulate_gradients``, grad clip, ``AdamW.step``,
  ``zero_grad(set_to_none=True)``), every weight trainable, activation checkpointing off.
- ``adamw_ckpt``: the same with every layer checkpointed (``train.activation_checkpointing: all``).

Models and optimizers are built by leantune's own set-up functions (``setup_model``,
``build_optimizer``) from a recipe made in code, so the rows measure the code users run.

Memory. In every child the first thing done is ``leantune.allocator.set_malloc_mmap_threshold``
(``--malloc-mmap-threshold``, default 131072 bytes, the trainer's ``train.malloc_mmap_threshold``
default; ``--malloc-mmap-threshold 0`` leaves glibc alone in *all* rows). After the model, optimizer
and batch are set up, the kernel's high-water mark is reset (``/proc/self/clear_refs`` = 5) and
``VmHWM`` read after the steps: ``step_peak_rss_bytes`` is the exact peak RSS of the steps, model
weights included, without the transient peak of loading (GGUF dequantization, which is the same in
every row and would otherwise hide the differences). ``process_peak_rss_bytes`` is the lifetime
peak, loading included. A 10 ms polling thread (``leantune.metering.PeakMemory``) cross-checks.

Time: wall and CPU seconds per step; ``step_time_s`` is the median over steps after the first.

    HF_HUB_OFFLINE=1 python benchmarks/zo_memory.py --quick --json      # tiny 2-layer model, < 1 min
    HF_HUB_OFFLINE=1 python benchmarks/zo_memory.py --json > zo.json     # SmolLM2-135M, ~3 min

The parent process never imports torch (keeps the children's baseline small and honest).
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

REPO = Path(__file__).resolve().parents[1]  # children import leantune from this checkout
MODEL_BUILTIN = "smollm2-135m-instruct"
RUNNER_NAMES = ("inference", "inference_logits", "mezo", "adamw", "adamw_ckpt")
TARGETS = {"mezo_vs_inference_max": 1.15, "mezo_vs_adamw_max": 0.35,
           "note": "issue 4: a MeZO step's peak memory <= 1.15x an inference forward and <= 0.35x an AdamW "
                   "full-parameter step, same model, dtype and batch"}


def log(*args) -> None:
    print("[zo_memory]", *args, file=sys.stderr, flush=True)


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


# ================================================================================================
# Child side


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def kernel_peak_rss_bytes() -> int | None:
    """VmHWM: this process's peak RSS since start or the last ``reset_peak_rss``, in bytes."""
    kib = _proc_status_kib("VmHWM")
    return None if kib is None else kib * 1024


def current_rss_bytes() -> int | None:
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _recipe(spec: dict, runner: str):
    from leantune.config import Recipe

    model_path = spec["tiny_dir"] if spec["quick"] else f"builtin:{MODEL_BUILTIN}"
    optim = {"name": "mezo", "lr": 1e-6, "zo_eps": 1e-3, "zo_samples": 1} if runner == "mezo" else \
        {"name": "adamw", "lr": 1e-5, "max_grad_norm": 1.0}
    return Recipe.model_validate({
        "model": {"path": model_path, "dtype": spec["dtype"]},
        "data": {"train": spec["data_path"], "max_length": spec["max_length"], "shuffle": False},
        "adapter": {"method": "full"},
        "loss": {"chunk_size": spec["chunk_size"]},
        "optim": {**optim, "scheduler": "constant", "weight_decay": 0.0},
        "train": {"steps": spec["steps"], "micro_batch_size": spec["batch"], "seed": 0,
                  "activation_checkpointing": "all" if runner == "adamw_ckpt" else "off",
                  "malloc_mmap_threshold": spec["malloc_mmap_threshold"] or None,
                  "output_dir": str(Path(spec["work_dir"]) / f"run-{runner}"), "progress": False},
    })


def _batch(spec: dict):
    import torch

    raw = json.loads(Path(spec["batch_path"]).read_text())
    return {k: torch.tensor(v, dtype=torch.float32 if k == "loss_weights" else torch.long) for k, v in raw.items()}


def _step_fn(spec: dict, runner: str):
    """(model, one-step callable returning the step's loss, extra info dict), built with leantune's set-up."""
    import torch

    from leantune.adapters.lora import causal_lm
    from leantune.optim import build_optimizer
    from leantune.train import sft
    from leantune.train.session import setup_model

    recipe = _recipe(spec, runner)
    torch.manual_seed(0)
    model, _tok, _src, n_ckpt, _ = setup_model(recipe)
    batch = _batch(spec)
    chunk = spec["chunk_size"]
    info: dict = {"checkpointed_layers": n_ckpt,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                  "dtype": str(next(model.parameters()).dtype)}

    if runner.startswith("inference"):
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if runner == "inference":
            norm = sft.loss_weight_total(batch)

            @torch.no_grad()
            def step():
                return float(sft.lm_loss_sum(model, batch, chunk)) / norm
        else:
            lm = causal_lm(model)

            @torch.no_grad()
            def step():
                logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            use_cache=False).logits  # (B, T, V)
                info["logits_bytes"] = logits.numel() * logits.element_size()
        return model, step, info

    optimizer, scheduler = build_optimizer(recipe.optim, model, seed=recipe.train.seed, total_steps=recipe.train.steps)
    info["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if runner == "mezo":
        restore = []

        def step():
            loss, _norm, zo = sft.zeroth_order_step(optimizer, model, [batch], chunk)
            scheduler.step()
            restore.append(zo["restore_bytes"])
            info["restore_bytes_per_step"] = restore
            return loss
        return model, step, info

    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        loss, _norm = sft.accumulate_gradients(sft.SFTLoss(model), [batch], chunk)
        torch.nn.utils.clip_grad_norm_(params, recipe.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return model, step, info


def run_runner(spec: dict) -> dict:
    import resource

    import torch

    from leantune.metering import PeakMemory

    runner = spec["runner"]
    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    _model, step, info = _step_fn(spec, runner)
    setup_s = time.perf_counter() - t0
    setup_peak = kernel_peak_rss_bytes()
    rss_before = current_rss_bytes()
    kernel_reset = reset_peak_rss()
    poll = PeakMemory().start()

    losses, wall, cpu, hwm_after = [], [], [], []
    for _ in range(spec["steps"]):
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        w0 = time.perf_counter()
        losses.append(step())
        wall.append(time.perf_counter() - w0)
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime))
        hwm_after.append(kernel_peak_rss_bytes())
    poll.stop()
    rss_after = current_rss_bytes()
    step_peak = kernel_peak_rss_bytes() if kernel_reset else None
    timed = sorted(wall[1:] or wall)
    return {
        **info,
        "losses": losses,
        "step_wall_s": wall,
        "step_cpu_s": cpu,
        "step_time_s": timed[len(timed) // 2],
        "setup_s": setup_s,
        "rss_before_steps_bytes": rss_before,
        "rss_after_steps_bytes": rss_after,
        "step_peak_rss_bytes": step_peak if step_peak is not None else poll.peak_rss_bytes,
        "step_peak_rss_method": "kernel VmHWM after /proc/self/clear_refs" if step_peak is not None
        else "10 ms polling (clear_refs unavailable)",
        "step_peak_rss_poll_bytes": poll.peak_rss_bytes,
        "step_peak_rss_after_each_step_bytes": hwm_after if kernel_reset else None,
        "setup_peak_rss_bytes": setup_peak,
        "process_peak_rss_bytes": max(x for x in (setup_peak, step_peak, poll.peak_rss_bytes) if x is not None),
    }


def prepare(spec: dict) -> dict:
    """Write the task data and the one batch every runner uses (leantune's tokenization and collate)."""
    import hashlib

    from leantune.config import DataConfig, SpanWeights
    from leantune.data.sft import collate, load_sft_examples
    from leantune.demo import write_task_data
    from leantune.models.loading import load_tokenizer

    work = Path(spec["work_dir"])
    if spec["quick"]:
        from leantune.models.tiny import save_tiny_model

        save_tiny_model(spec["tiny_dir"], seed=0)
    paths = write_task_data("addition", work / "data", spec["batch"], 1, seed=0)
    recipe = _recipe({**spec, "data_path": str(paths["train"])}, "inference")
    tok = load_tokenizer(recipe.model)
    examples, stats = load_sft_examples(paths["train"], tok, DataConfig(max_length=spec["max_length"]))
    batch = collate(examples[: spec["batch"]], tok.pad_token_id, SpanWeights())
    raw = {k: v.tolist() for k, v in batch.items()}
    Path(spec["batch_path"]).write_text(json.dumps(raw))
    shape = list(batch["input_ids"].shape)
    return {
        "data_path": str(paths["train"]),
        "batch_shape": shape,
        "tokens": int(batch["attention_mask"].sum()),
        "loss_tokens": int((batch["labels"][:, 1:] != -100).sum()),
        "digest": hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16],
        "stats": stats.as_dict(),
    }


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out: dict = {"runner": spec["runner"], "loadavg_before": loadavg()}
    try:
        import leantune

        out["leantune_path"] = str(Path(leantune.__file__).parent)
        if spec["runner"] != "prepare" and spec["malloc_mmap_threshold"]:
            from leantune.allocator import set_malloc_mmap_threshold

            out["malloc_mmap_threshold_applied"] = set_malloc_mmap_threshold(spec["malloc_mmap_threshold"])
        out.update(prepare(spec) if spec["runner"] == "prepare" else run_runner(spec))
        out["status"] = "ok"
    except Exception as err:  # noqa: BLE001 -- report, do not crash the whole benchmark
        import traceback

        traceback.print_exc(file=sys.stderr)
        out["status"] = "failed"
        out["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    out["loadavg_after"] = loadavg()
    Path(spec["result_path"]).write_text(json.dumps(out))


# ================================================================================================
# Parent side


def run_child(spec: dict, timeout_s: float) -> dict:
    work = Path(spec["work_dir"])
    spec = {**spec, "result_path": str(work / f"result-{spec['runner']}.json")}
    spec_path = work / f"spec-{spec['runner']}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(spec["threads"]),
               MKL_NUM_THREADS=str(spec["threads"]), PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("MALLOC_MMAP_THRESHOLD_", None)  # the threshold is set in the child, the same way for all rows
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", str(spec_path)],
                              check=False, stdout=sys.stderr, stderr=sys.stderr, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"runner": spec["runner"], "status": "failed", "error": f"timeout after {timeout_s:.0f}s"}
    result = Path(spec["result_path"])
    if not result.exists():
        return {"runner": spec["runner"], "status": "failed",
                "error": f"child exited with code {proc.returncode} without a result (killed? out of memory?)"}
    return json.loads(result.read_text())


def _gib(n) -> float | None:
    return None if n is None else round(n / 2**30, 3)


def compare(runs: dict) -> dict:
    def ratio(a: str, b: str, key: str) -> float | None:
        if runs.get(a, {}).get("status") != "ok" or runs.get(b, {}).get("status") != "ok":
            return None
        return round(runs[a][key] / runs[b][key], 3)

    out: dict = {}
    for key, label in (("step_peak_rss_bytes", "step_peak"), ("process_peak_rss_bytes", "process_peak"),
                       ("step_time_s", "step_time")):
        out[label] = {f"mezo_vs_{ref}": ratio("mezo", ref, key)
                      for ref in ("inference", "inference_logits", "adamw", "adamw_ckpt")}
    sp = out["step_peak"]
    out["meets_targets"] = {
        "mezo_vs_inference": None if sp["mezo_vs_inference"] is None
        else sp["mezo_vs_inference"] <= TARGETS["mezo_vs_inference_max"],
        "mezo_vs_adamw": None if sp["mezo_vs_adamw"] is None else sp["mezo_vs_adamw"] <= TARGETS["mezo_vs_adamw_max"],
    }
    ok = {k: v for k, v in runs.items() if v.get("status") == "ok" and v.get("rss_before_steps_bytes")}
    out["step_memory_above_setup_gib"] = {
        k: _gib(v["step_peak_rss_bytes"] - v["rss_before_steps_bytes"]) for k, v in ok.items()}
    if "inference" in ok and "mezo" in ok and ok["inference"]["losses"][0] is not None:
        out["first_loss"] = {k: ok[k]["losses"][0] for k in ("inference", "mezo", "adamw", "adamw_ckpt") if k in ok}
    return out


def format_table(result: dict) -> str:
    lines = [(f"{'runner':18s} {'step peak GiB':>13s} {'process peak GiB':>16s} {'before steps GiB':>16s} "
              f"{'s/step':>8s}")]
    for name, r in result["runs"].items():
        if r.get("status") != "ok":
            lines.append(f"{name:18s} {r.get('status')}: {r.get('error')}")
            continue
        lines.append(f"{name:18s} {_gib(r['step_peak_rss_bytes']):13.3f} {_gib(r['process_peak_rss_bytes']):16.3f} "
                     f"{_gib(r['rss_before_steps_bytes']):16.3f} {r['step_time_s']:8.2f}")
    lines.append(json.dumps(result["comparison"], indent=2))
    return "\n".join(lines)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "leantune"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random 2-layer model instead of SmolLM2-135M")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    p.add_argument("--only", action="append", default=[], help="runner names, comma-separated (repeatable)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="model.dtype of every runner (default float32: MeZO's full-parameter setting)")
    p.add_argument("--batch", type=int, default=16, help="examples in the batch (default 16, recipes/mezo_lora.yaml)")
    p.add_argument("--max-length", type=int, default=128, help="data.max_length (default 128, the demo's)")
    p.add_argument("--steps", type=int, default=3, help="steps per runner; timing skips the first")
    p.add_argument("--chunk-size", type=int, default=256, help="loss.chunk_size (default 256, the demo's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--malloc-mmap-threshold", type=int, default=131072,
                   help="bytes, applied in every runner (0: leave glibc's dynamic threshold alone)")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._child:
        child_main(args._child)
        return 0
    runners = [n for part in args.only for n in part.split(",") if n] or list(RUNNER_NAMES)
    unknown = [n for n in runners if n not in RUNNER_NAMES]
    if unknown:
        raise SystemExit(f"--only: unknown runner(s) {unknown}; valid: {', '.join(RUNNER_NAMES)}")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="zo_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    base = {"quick": args.quick, "dtype": args.dtype, "batch": args.batch, "max_length": args.max_length,
            "steps": args.steps, "chunk_size": args.chunk_size, "threads": args.threads,
            "malloc_mmap_threshold": args.malloc_mmap_threshold, "work_dir": str(work),
            "tiny_dir": str(work / "tiny-model"), "batch_path": str(work / "batch.json"),
            "data_path": str(work / "data" / "train.jsonl")}
    load_start = loadavg()
    log(f"work dir {work}; preparing data")
    data = run_child({**base, "runner": "prepare"}, args.timeout)
    if data.get("status") != "ok":
        log(f"data preparation failed: {data.get('error')}")
        return 1
    log(f"batch {data['batch_shape']}, {data['loss_tokens']} loss tokens, digest {data['digest']}")
    runs: dict[str, dict] = {}
    for name in runners:
        log(f"--- {name} (load {loadavg()})")
        r = runs[name] = run_child({**base, "runner": name}, args.timeout)
        if r.get("status") == "ok":
            r["step_peak_rss_gib"] = _gib(r["step_peak_rss_bytes"])
            r["process_peak_rss_gib"] = _gib(r["process_peak_rss_bytes"])
            log(f"{name}: step peak {r['step_peak_rss_gib']} GiB, process peak {r['process_peak_rss_gib']} GiB, "
                f"{r['step_time_s']:.2f} s/step, losses {r['losses']}")
        else:
            log(f"{name}: {r.get('status')}: {r.get('error')}")
    result = {
        "benchmark": "zo_memory",
        "mode": "quick" if args.quick else "full",
        "model": "tiny (leantune.models.tiny, 2 layers, hidden 64)" if args.quick
        else f"builtin:{MODEL_BUILTIN} (GGUF Q4_1 dequantized to {args.dtype})",
        "settings": {"dtype": args.dtype, "batch": args.batch, "max_length": args.max_length, "steps": args.steps,
                     "chunk_size": args.chunk_size, "threads": args.threads,
                     "malloc_mmap_threshold": args.malloc_mmap_threshold or "glibc default (dynamic)",
                     "malloc_note": "set with leantune.allocator.set_malloc_mmap_threshold at the start of every "
                                    "runner's process (all rows alike)",
                     "trainable": "every parameter (adapter.method: full) for mezo and adamw",
                     "mezo": {"lr": 1e-6, "zo_eps": 1e-3, "zo_samples": 1},
                     "adamw": {"lr": 1e-5, "betas": [0.9, 0.999], "max_grad_norm": 1.0},
                     "data": "2-digit addition (leantune make-data addition), messages shape, loss on the "
                             "assistant turn; the same collated batch in every runner"},
        "data": {k: data[k] for k in ("batch_shape", "tokens", "loss_tokens", "digest")},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "loadavg_start": load_start,
                    "loadavg_end": loadavg(),
                    "total_ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
        "versions": _versions(),
        "leantune_commit": leantune_commit(),
        "runs": runs,
        "comparison": compare(runs),
        "targets": TARGETS,
        "total_wall_time_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0 if all(r.get("status") == "ok" for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
