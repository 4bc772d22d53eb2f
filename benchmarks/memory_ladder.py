#!/usr/bin/env python
"""The edge-LoRA memory ladder (arXiv 2606.19528): one technique added per row.

SmolLM2-135M-Instruct, sequence 2048, batch 1, fp32 compute, LoRA r=16 on q/k/v/o, AdamW, the same
token ids and loss mask (prompt ~70% of the tokens, loss on the rest) in every row:

1. ``peer_lora``: plain PEFT LoRA and the model's full ``[B, T, V]`` logits into ``F.cross_entropy``
   (no leantune code in the step);
2. ``int4_base``: + the frozen base's linear layers in INT4 (leantune ``quant.bits: 4``, group 64);
3. ``checkpointing``: + activation checkpointing of every decoder layer;
4. ``vocab_subset``: + softmax over a vocabulary subset (the ``--subset`` most frequent tokens of the
   data plus the step's targets; APPROXIMATE, see leantune/losses/vocab_subset.py) -- still written
   plainly: ``hidden @ W[S].T`` at every position, prompt included, then ``F.cross_entropy``;
5. ``logits_masking``: + only loss-carrying positions reach the LM head (leantune's
   ``vocab_subset_cross_entropy``: masked and chunked, ``--chunk-size`` rows at a time).
6. ``offloaded_checkpoints``: + the checkpointed layers' inputs in a memory-mapped file (leantune's
   ``train.offload_checkpoints``, `leantune.train.offload.ActivationSpill`), paged out once read.
7. ``quantized_embeddings``: + the tied embedding / LM head quantized too, to ``--embedding-bits`` (8;
   leantune's ``quant.embedding_bits``, `leantune.quant.quantize_embeddings`): lookups and the subset
   loss dequantize only the rows they read.

Rows 1-5 are the issue's ladder (``overall``: first to fifth row); row 6 is the optional technique the
issue adds (``overall_with_offload``); row 7 is everything leantune has (``overall_all``).

An aside row, ``aside_exact_masked`` (INT4 + checkpointing + masking, *exact* loss: leantune's
``linear_cross_entropy``), shows what rows 4-5 owe to the approximation. ``--only`` selects rows.

Every row runs in its own subprocess (peak RSS is per run; the parent never imports torch; data is
prepared in a subprocess too). Peak RSS comes from a 10 ms psutil poll plus explicit samples after
forward and backward, and the kernel's ``ru_maxrss`` for the whole process. Two peaks are reported:
``train_peak_rss`` (during the optimizer steps: the ladder's headline, as in the paper) and
``process_peak_rss`` (whole child, model loading included: loading the fp32 GGUF and quantizing it
costs more than INT4 training does). ``net_train_peak_rss`` subtracts the child's RSS once torch,
transformers and peft are imported (``runtime_baseline``, ~0.3-0.4 GiB, the same in every row): on a
135M model that fixed cost is a large share of the last rows, unlike on the paper's 3B model.
tokens/s counts every token (prompt included) and excludes the first step.

Allocator: every row gets the same glibc setting, ``MALLOC_MMAP_THRESHOLD_=--malloc-mmap-threshold``
(default 131072, leantune's ``train.malloc_mmap_threshold`` default; ``0`` leaves glibc's dynamic
threshold in every row). The peer row thus gets the allocator fix too: the ladder measures the
techniques, not the allocator.

    HF_HUB_OFFLINE=1 python benchmarks/memory_ladder.py --quick --json     # tiny model, seq 128, ~1 min
    HF_HUB_OFFLINE=1 python benchmarks/memory_ladder.py --json > ladder.json   # SmolLM2, ~15-30 min on 2 cores

Do not import torch at module level: the parent must stay small.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# This checkout's leantune (not whatever `pip install -e` points at) and the sibling benchmark's helpers.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import sft_memory as sm  # shared helpers: RssMonitor, data preparation, model loading

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# name -> (quant bits, checkpoint every layer, loss)
ROWS = {
    "peer_lora": (None, False, "full_logits"),
    "int4_base": (4, False, "full_logits"),
    "checkpointing": (4, True, "full_logits"),
    "vocab_subset": (4, True, "subset_all_positions"),
    "logits_masking": (4, True, "leantune_subset_masked"),
    "offloaded_checkpoints": (4, True, "leantune_subset_masked"),
    "quantized_embeddings": (4, True, "leantune_subset_masked"),
    "aside_exact_masked": (4, True, "leantune_exact_masked"),
}
OFFLOADED = {"offloaded_checkpoints", "quantized_embeddings"}  # + the checkpointed layers' inputs in a memory-mapped file
QUANT_EMBEDDINGS = {"quantized_embeddings"}  # + the embedding / LM head in --embedding-bits
ISSUE_LADDER = ["peer_lora", "int4_base", "checkpointing", "vocab_subset", "logits_masking"]  # the issue's five rows
LADDER = [*ISSUE_LADDER, "offloaded_checkpoints", "quantized_embeddings"]
SUMMARIES = {"overall": "logits_masking", "overall_with_offload": "offloaded_checkpoints", "overall_all": "quantized_embeddings"}
TARGET_REDUCTION = 10.0  # first row / last row, from the issue


def log(*args) -> None:
    print("[memory_ladder]", *args, file=sys.stderr, flush=True)


# ================================================================================================
# Child side


def _batches(spec: dict):
    import torch

    tokens = json.loads((Path(spec["work_dir"]) / "tokens.json").read_text())
    b = spec["batch"]
    for step in range(spec["steps"]):
        sl = slice(step * b, (step + 1) * b)
        yield {k: torch.tensor(v[sl]) for k, v in tokens.items()}


def _candidates(spec: dict, vocab: int):
    """The --subset most frequent tokens of the benchmark data (leantune's 'frequency' source)."""
    import torch

    from leantune.losses import token_counts, top_token_candidates

    tokens = json.loads((Path(spec["work_dir"]) / "tokens.json").read_text())
    ids = [[t for t, m in zip(row, mask) if m] for row, mask in zip(tokens["input_ids"], tokens["attention_mask"])]
    return top_token_candidates(token_counts(ids, vocab), spec["subset"]).to(torch.long)


def _full_logits_loss(model, batch, candidates, spec):
    """The peer's step: the model's own [B, T, V] logits, then plain cross-entropy (mean over loss tokens)."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def _subset_all_positions_loss(model, batch, candidates, spec):
    """Vocabulary subset written plainly: (B, T, |S|) logits at every position, then F.cross_entropy."""
    import torch
    import torch.nn.functional as F

    from leantune.adapters.lora import causal_lm
    from leantune.losses import vocab_subset

    lm = causal_lm(model)
    hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).last_hidden_state  # (B, T, H)
    labels = batch["labels"][:, 1:]
    subset = vocab_subset(candidates, labels)  # (S,)
    logits = hidden[:, :-1] @ lm.get_output_embeddings().weight[subset].T  # (B, T-1, S)
    sub_labels = torch.where(labels == -100, -100, torch.searchsorted(subset, labels.clamp(min=0)))
    return F.cross_entropy(logits.flatten(0, 1), sub_labels.flatten(), ignore_index=-100)


def _leantune_loss(model, batch, candidates, spec):
    """leantune's lm_loss_sum: logits masking + chunking (+ the subset when candidates is not None)."""
    from leantune.losses import vocab_subset
    from leantune.train.sft import lm_loss_sum, loss_weight_total

    subset = None if candidates is None else vocab_subset(candidates, batch["labels"][:, 1:])
    batch = {**batch, "loss_weights": (batch["labels"] != -100).float()}
    return lm_loss_sum(model, batch, spec["chunk_size"], subset) / loss_weight_total(batch)


LOSSES = {"full_logits": _full_logits_loss, "subset_all_positions": _subset_all_positions_loss,
          "leantune_subset_masked": _leantune_loss, "leantune_exact_masked": _leantune_loss}


def run_row(spec: dict, mon) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    bits, ckpt, loss_name = ROWS[spec["runner"]]
    mon.set_phase("setup")
    model = sm._load_model(spec)  # fp32, GGUF dequantized
    quant = None
    if bits:
        from leantune.quant import quantize_model

        stats = quantize_model(model, bits, spec["group_size"], skip=["lm_head"])
        if spec["runner"] in QUANT_EMBEDDINGS:
            from leantune.quant import quantize_embeddings

            stats += quantize_embeddings(model, spec["embedding_bits"], spec["group_size"])
        quant = stats.as_dict()
    lora = LoraConfig(r=spec["lora_r"], lora_alpha=2 * spec["lora_r"], lora_dropout=0.0, target_modules=LORA_TARGETS,
                      bias="none", task_type="CAUSAL_LM")
    if bits:
        from leantune.quant import register_quant_lora

        register_quant_lora(lora)
    torch.manual_seed(0)
    model = get_peft_model(model, lora)
    n_ckpt = 0
    if ckpt:
        from leantune.train.session import set_activation_checkpointing

        n_ckpt = set_activation_checkpointing(model, "all")
    spill = None
    if spec["runner"] in OFFLOADED:
        from leantune.train.offload import ActivationSpill

        spill = ActivationSpill(model, spec["work_dir"])
    model.train()
    vocab = model.get_output_embeddings().out_features
    candidates = _candidates(spec, vocab) if "subset" in loss_name else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    loss_fn = LOSSES[loss_name]

    losses, step_times, step_cpu, digests = [], [], [], []
    mon.set_phase("train")
    for batch in _batches(spec):
        digests.append(sm._digest_batch(batch["input_ids"], batch["labels"]))
        t0, c0 = time.perf_counter(), mon.cpu_seconds()
        with spill.forward() if spill is not None else contextlib.nullcontext():
            loss = loss_fn(model, batch, candidates, spec)
        mon.sample()
        loss.backward()
        mon.sample()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mon.sample()
        step_times.append(time.perf_counter() - t0)
        step_cpu.append(mon.cpu_seconds() - c0)
        losses.append(float(loss.detach()))
    mon.set_phase("teardown")
    offloaded = None
    if spill is not None:
        offloaded = {"slots_written": spill.slots_written, "bytes_written": spill.bytes_written}
        spill.close()
    return {
        "config": {"quant_bits": bits,
                   "quant_embedding_bits": spec["embedding_bits"] if spec["runner"] in QUANT_EMBEDDINGS else None,
                   "activation_checkpointing_layers": n_ckpt, "loss": loss_name,
                   "offloaded_checkpoints": offloaded,
                   "loss_doc": (LOSSES[loss_name].__doc__ or "").strip().splitlines()[0],
                   "vocab": vocab, "candidates": None if candidates is None else int(candidates.numel()),
                   "quant": quant, "attn_implementation": getattr(model.config, "_attn_implementation", None)},
        "losses": losses,
        "step_times_s": step_times,
        "step_cpu_s": step_cpu,
        "batch_digests": digests,
        "lora_init_digest": None,
        "trainable_params": sum(p.numel() for p in params),
    }


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    mon = sm.RssMonitor()
    out: dict = {"runner": spec["runner"], "pid": os.getpid(), "loadavg_before": sm.loadavg()}
    t0 = time.perf_counter()
    try:
        sm._setup_torch(spec["threads"])
        out.update(sm.prepare_data(spec) if spec["kind"] == "prepare" else run_row(spec, mon))
        import importlib.util

        out["leantune_file"] = importlib.util.find_spec("leantune").origin  # which checkout (import-free for the peer)
        out["status"] = "ok"
    except Exception as err:  # noqa: BLE001  (report, do not crash the whole benchmark)
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
               MKL_NUM_THREADS=str(spec["threads"]), PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if spec["malloc_mmap_threshold"]:  # the same for every row (data preparation included)
        env["MALLOC_MMAP_THRESHOLD_"] = str(spec["malloc_mmap_threshold"])
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", str(spec_path)],
                              stdout=sys.stderr, stderr=sys.stderr, env=env, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"runner": spec["runner"], "status": "failed", "error": f"timeout after {timeout_s:.0f}s"}
    result_path = Path(spec["result_path"])
    if not result_path.exists():
        return {"runner": spec["runner"], "status": "failed",
                "error": f"child exited with code {proc.returncode} without a result (killed? out of memory?)"}
    return json.loads(result_path.read_text())


def summarize(res: dict, spec: dict) -> dict:
    if res.get("status") != "ok":
        return res
    res = sm.summarize(res, spec)
    res["process_peak_rss_bytes"] = res["peak_rss_bytes"]
    res["train_peak_rss_bytes"] = res.get("phase_peak_rss_bytes", {}).get("train")
    res["train_peak_rss_gib"] = round(res["train_peak_rss_bytes"] / 2**30, 3) if res["train_peak_rss_bytes"] else None
    res["process_peak_rss_gib"] = res["peak_rss_gib"]
    # RSS of the child once torch, transformers and peft are imported, before the model is loaded: the
    # runtime's fixed cost, the same in every row. Peak minus it = what the training itself holds.
    base = res.get("rss_at_setup_start")
    res["runtime_baseline_rss_bytes"] = base
    res["net_train_peak_rss_bytes"] = res["train_peak_rss_bytes"] - base if base and res["train_peak_rss_bytes"] else None
    res["net_train_peak_rss_gib"] = round(res["net_train_peak_rss_bytes"] / 2**30, 3) if res["net_train_peak_rss_bytes"] else None
    return res


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def ladder_table(runs: dict) -> dict:
    """Peaks and tokens/s per row with ratios to the first row (peer) and to the previous row."""
    names = [n for n in list(ROWS) if n in runs and runs[n].get("status") == "ok"]
    first = runs[names[0]] if names else None
    table, prev = [], None
    for n in names:
        r = runs[n]
        row = {"row": n, "train_peak_rss_gib": r["train_peak_rss_gib"], "process_peak_rss_gib": r["process_peak_rss_gib"],
               "net_train_peak_rss_gib": r.get("net_train_peak_rss_gib"),
               "tokens_per_s": round(r["tokens_per_s"], 1) if r.get("tokens_per_s") else None,
               "losses": [round(x, 4) for x in r["losses"]]}
        if first is not None:
            row["train_peak_reduction_vs_first"] = _ratio(first["train_peak_rss_bytes"], r["train_peak_rss_bytes"])
            row["process_peak_reduction_vs_first"] = _ratio(first["process_peak_rss_bytes"], r["process_peak_rss_bytes"])
            row["net_train_peak_reduction_vs_first"] = _ratio(first.get("net_train_peak_rss_bytes"),
                                                              r.get("net_train_peak_rss_bytes"))
            row["tokens_per_s_vs_first"] = _ratio(r.get("tokens_per_s"), first.get("tokens_per_s"))
        if prev is not None and n in LADDER:
            row["train_peak_reduction_vs_previous"] = _ratio(prev["train_peak_rss_bytes"], r["train_peak_rss_bytes"])
        if n in LADDER:
            prev = r
        table.append(row)
    out = {"rows": table}
    for key, last in SUMMARIES.items():
        ladder = [n for n in LADDER[: LADDER.index(last) + 1] if n in names]
        if len(ladder) < 2 or ladder[0] != LADDER[0] or ladder[-1] != last:
            continue
        a, b = runs[ladder[0]], runs[ladder[-1]]
        red = _ratio(a["train_peak_rss_bytes"], b["train_peak_rss_bytes"])
        out[key] = {"from": ladder[0], "to": ladder[-1], "train_peak_reduction": red,
                          "process_peak_reduction": _ratio(a["process_peak_rss_bytes"], b["process_peak_rss_bytes"]),
                          "net_train_peak_reduction": _ratio(a.get("net_train_peak_rss_bytes"),
                                                             b.get("net_train_peak_rss_bytes")),
                          "runtime_baseline_gib": round(b["runtime_baseline_rss_bytes"] / 2**30, 3)
                          if b.get("runtime_baseline_rss_bytes") else None,
                          "target_reduction": TARGET_REDUCTION,
                          "meets_target_train_peak": red is not None and red >= TARGET_REDUCTION}
    digests = {n: runs[n].get("batch_digests") for n in names}
    out["identical_batches"] = len({json.dumps(d) for d in digests.values()}) <= 1
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout (logs go to stderr)")
    p.add_argument("--quick", action="store_true", help="tiny 2-layer model, seq 128: a smoke check")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per row; the first is warm-up (default 3)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per example (default 2048; 128 with --quick)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2r)")
    p.add_argument("--group-size", type=int, default=64, help="INT4 group size")
    p.add_argument("--embedding-bits", type=int, choices=(4, 8), default=8,
                   help="bits of the embedding / LM head in the quantized_embeddings row")
    p.add_argument("--subset", type=int, default=None, help="vocabulary candidates (default 1024; 64 with --quick)")
    p.add_argument("--chunk-size", type=int, default=1024, help="leantune loss.chunk_size (rows 5 and aside)")
    p.add_argument("--prompt-fraction", type=float, default=0.7, help="share of each example that is prompt")
    p.add_argument("--threads", type=int, default=2, help="torch threads per row")
    p.add_argument("--malloc-mmap-threshold", type=int, default=131072, metavar="BYTES",
                   help="MALLOC_MMAP_THRESHOLD_ for every row (0: glibc's dynamic default in every row)")
    p.add_argument("--only", default="", help="comma-separated row names (default: all)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per row before it is killed")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 3)
    args.seq_len = args.seq_len or (128 if args.quick else 2048)
    args.subset = args.subset or (64 if args.quick else 1024)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._child:
        child_main(args._child)
        return 0
    os.environ["HF_HUB_OFFLINE"] = "1"
    rows = [r.strip() for r in args.only.split(",") if r.strip()] or list(ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--only: unknown rows {unknown}; rows are {', '.join(ROWS)}")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="memory-ladder-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start, load_start = time.perf_counter(), sm.loadavg()
    base = {"work_dir": str(work), "quick": args.quick, "seq_len": args.seq_len, "batch": args.batch,
            "steps": args.steps, "lr": args.lr, "prompt_fraction": args.prompt_fraction, "threads": args.threads,
            "chunk_size": args.chunk_size, "subset": args.subset, "lora_r": args.lora_r,
            "group_size": args.group_size, "embedding_bits": args.embedding_bits, "tiny_dir": str(work / "tiny-model"),
            "malloc_mmap_threshold": args.malloc_mmap_threshold}
    log(f"work dir {work}; rows: {', '.join(rows)}; load {load_start}")
    if args.quick:
        code = "import sys; from leantune.models.tiny import save_tiny_model; save_tiny_model(sys.argv[1], layers=2)"
        subprocess.run([sys.executable, "-c", code, base["tiny_dir"]], check=True, stdout=sys.stderr)
    data = run_child({**base, "runner": "prepare", "kind": "prepare"}, args.timeout)
    if data.get("status") != "ok":
        print(json.dumps({"status": "failed", "stage": "prepare", "error": data.get("error")}))
        return 1
    data = {k: data[k] for k in ("examples", "prompt_tokens_per_example", "completion_tokens_per_example",
                                 "prompt_fraction", "tokens_total", "loss_tokens_per_batch", "digest")}
    log(f"data: {data}")

    runs: dict[str, dict] = {}
    for name in rows:
        log(f"--- {name} (load {sm.loadavg()})")
        runs[name] = summarize(run_child({**base, "runner": name, "kind": "row"}, args.timeout), base)
        r = runs[name]
        if r.get("status") == "ok":
            log(f"{name}: train peak {r['train_peak_rss_gib']} GiB, process peak {r['process_peak_rss_gib']} GiB, "
                f"{r['tokens_per_s']:.1f} tok/s, losses {[round(x, 4) for x in r['losses']]}")
        else:
            log(f"{name}: {r.get('status')}: {r.get('error')}")

    result = {
        "benchmark": "memory_ladder",
        "mode": "quick" if args.quick else "full",
        "model": "tiny (leantune.models.tiny, 2 layers, hidden 64)" if args.quick
        else f"builtin:{sm.MODEL_BUILTIN} (GGUF dequantized to fp32)",
        "settings": {"seq_len": args.seq_len, "batch": args.batch, "steps": args.steps,
                     "warmup_steps_excluded_from_tokens_per_s": 1, "lr": args.lr, "dtype": "float32",
                     "optimizer": "AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay=0), grad clip 1.0",
                     "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0, "targets": LORA_TARGETS},
                     "int4_group_size": args.group_size, "embedding_bits": args.embedding_bits,
                     "vocab_subset_candidates": args.subset,
                     "vocab_subset_source": "frequency (the data's most frequent tokens) + each step's targets",
                     "leantune_chunk_size": args.chunk_size, "threads": args.threads,
                     "malloc": (f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold} in every row"
                                if args.malloc_mmap_threshold else "glibc default (dynamic threshold) in every row"),
                     "loss": "mean CE over completion tokens (+eos) only; rows vocab_subset and logits_masking "
                             "are APPROXIMATE (softmax over the subset)"},
        "rows_doc": {n: {"quant_bits": b, "quant_embedding_bits": args.embedding_bits if n in QUANT_EMBEDDINGS else None,
                         "checkpointing": c,
                         "offloaded_checkpoints": n in OFFLOADED, "loss": lo} for n, (b, c, lo) in ROWS.items()},
        "data": data,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_start": load_start, "loadavg_end": sm.loadavg(),
                    "total_ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
        "load_during_runs": {k: {"loadavg_before": v.get("loadavg_before"), "loadavg_after": v.get("loadavg_after"),
                                 **(v.get("contention") or {})} for k, v in runs.items()},
        "versions": sm._versions(),
        "runs": runs,
        "ladder": ladder_table(runs),
        "total_wall_time_s": round(time.perf_counter() - t_start, 1),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return 0 if all(r.get("status") == "ok" for r in runs.values()) else 1


def format_table(result: dict) -> str:
    header = f"{'row':20s} {'train peak GiB':>14s} {'net GiB':>8s} {'process peak GiB':>16s} {'tok/s':>8s} "
    lines = [header + f"{'vs first':>9s}  losses"]
    for r in result["ladder"]["rows"]:
        lines.append(f"{r['row']:20s} {r['train_peak_rss_gib']:14.3f} {r['net_train_peak_rss_gib'] or 0:8.3f} "
                     f"{r['process_peak_rss_gib']:16.3f} {r['tokens_per_s'] or 0:8.1f} "
                     f"{r.get('train_peak_reduction_vs_first') or 0:8.2f}x  {r['losses']}")
    for name, r in result["runs"].items():
        if r.get("status") != "ok":
            lines.append(f"{name:20s} {r.get('status')}: {r.get('error')}")
    for key in SUMMARIES:
        if key in result["ladder"]:
            lines.append(f"{key}: " + json.dumps(result["ladder"][key], indent=2))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
