#!/usr/bin/env python
"""Peak memory and throughput of LoRA SFT: leantune vs transformers Trainer + PEFT vs TRL SFTTrainer.

Every runner trains the same model on the same token ids with the same loss mask (completion tokens
only), batch, sequence length, LoRA config, optimizer (AdamW, constant lr, no warmup, grad clip 1.0),
seed and number of optimizer steps, in the dtype each library's users would pick on this CPU (``--dtype auto``:
bf16 where the CPU has AVX512-BF16 or AMX -- leantune trains a bf16 base, Trainer and TRL run their
``bf16=True`` CPU autocast -- fp32 elsewhere), each in its *own* subprocess so that peak RSS is per run.
Every example is exactly ``--seq-len`` tokens, so the peers' padding to the longest example in a batch
pads nothing. Each result records the CPU model and flags.
Peak RSS is the larger of a psutil polling thread (10 ms) in the child and the kernel's
``ru_maxrss``; the parent process stays tiny (it never imports torch) and even data preparation runs
in a subprocess, so the children's ``ru_maxrss`` cannot inherit a large parent high-water mark.

Runners (``--only NAME[,NAME...]``, a prefix such as ``leantune`` selects several):

- ``leantune_ckpt_<policy>``: ``leantune.train.sft.train(recipe)``, one row per ``--leantune-ckpt``
  policy (``off``, ``all`` or an int k: every k-th layer), with ``--chunk-size`` for the fused loss;
- ``trainer_peft``: ``transformers.Trainer`` + ``peft.get_peft_model``, gradient checkpointing off
  (Trainer's default);
- ``trainer_peft_gc``: the same with ``gradient_checkpointing=True``;
- ``trl_sft``: ``trl.SFTTrainer`` with its defaults (prompt-completion dataset -> completion-only
  loss, its chunked LM head, its default gradient checkpointing), except ``bf16`` (set as above) and
  the shared lr / schedule / steps / batch / ``max_length`` / sequential sampling.

tokens/s counts every token of a batch (prompt included) and excludes the first optimizer step
(warm-up). Logs go to stderr; ``--json`` prints one JSON object to stdout.

    HF_HUB_OFFLINE=1 python benchmarks/sft_memory.py --quick --json      # tiny model, ~2 min
    HF_HUB_OFFLINE=1 python benchmarks/sft_memory.py --json > sft.json   # SmolLM2-135M, ~25 min on 2 cores

Base models loaded from GGUF keep a transformers "GGUF quantizer" marker although their weights are
dequantized fp32 tensors; Trainer refuses to train such a model, so the baselines drop the marker.

Do not import torch (or anything heavy) at module level: the parent must stay small.
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

# Import this checkout's leantune, not whatever `pip install -e` points at (parent and children alike).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL_BUILTIN = "smollm2-135m-instruct"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGETS = {
    # issue "speed at the memory floor": some leantune row at <= 0.2x the peak of Trainer+PEFT with its
    # gradient checkpointing and >= 1.5x its tokens/s; and >= 1.3x the fastest peer's tokens/s at <= 0.5x its peak
    "floor_peak_vs_trainer_peft_gc_max": 0.2,
    "floor_tokens_per_s_vs_trainer_peft_gc_min": 1.5,
    "fast_tokens_per_s_vs_fastest_peer_min": 1.3,
    "fast_peak_vs_fastest_peer_max": 0.5,
    "peak_vs_trainer_peft_max": 0.35,
    "peak_vs_trainer_peft_gc_max": 0.6,
    "tokens_per_s_vs_baseline_min": 0.9,
    "note": "from the issue: leantune peak <= 0.35x Trainer+PEFT default and <= 0.6x Trainer+PEFT with "
    "checkpointing, at >= 0.9x its tokens/s, same loss curve within noise",
}
# A few hundred plain English words for deterministic filler text.
WORDS = """
the of and to in is was for on that with as by at from this it be are or an not which have has had
but were all their they one there been if more when will would who so no time can about into than
only other new some could these two may first then do any like my now over such our man me even
most made after also did many before must through back years where much your way well down should
because each just those people how too little state good very make world still own see men work
long get here between both life being under never day same another know while last might us great
old year off come since against go came right used take three states himself few house use during
without again place around however home small found thought went say part once general high upon
school every does got united left number course war until always away something fact though water
less public put think almost hand enough far took head yet government system better set told
nothing night end why called didn't eyes find going look asked later point knew city next program
business give group toward young days let room president side social given present several order
national possible rather second face per among form important often things looked early white case
john become large big need four within felt along children saw best church ever least power
development light thing seemed family interest want members mind country area others done turned
although open problem door sure become river garden market letter paper music story money color
""".split()


def log(*args) -> None:
    print("[sft_memory]", *args, file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ================================================================================================
# Child side: memory monitor, data preparation, runners


class RssMonitor:
    """Peak RSS of this process: a psutil polling thread plus ru_maxrss; phases mark where peaks happen."""

    def __init__(self, interval_s: float = 0.01):
        import threading

        import psutil

        self._proc = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.peak = self._proc.memory_info().rss
        self.phase = "start"
        self.phase_peaks: dict[str, int] = {}
        self.marks: dict[str, int] = {}
        self.load_samples: list[float] = []
        self._cpu_marks: dict[str, tuple] = {}
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-monitor")
        self.ru_maxrss_at_start = self.ru_maxrss()
        self._thread.start()

    @staticmethod
    def ru_maxrss() -> int:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def sample(self) -> int:
        rss = self._proc.memory_info().rss
        if rss > self.peak:
            self.peak = rss
        if rss > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = rss
        return rss

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self._interval):
            self.sample()
            n += 1
            if n % 500 == 0 and self.phase == "train":  # every ~5 s
                self.load_samples.append(os.getloadavg()[0])

    def _cpu_mark(self, name: str) -> None:
        import psutil

        sys_t = psutil.cpu_times()
        own = self._proc.cpu_times()
        busy = sum(getattr(sys_t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))
        self._cpu_marks[name] = (time.perf_counter(), busy, own.user + own.system)

    def cpu_share(self) -> dict:
        """CPU cores used by this process and by everything else on the machine during the train phase."""
        if "train" not in self._cpu_marks or "end" not in self._cpu_marks:
            return {}
        (t0, s0, o0), (t1, s1, o1) = self._cpu_marks["train"], self._cpu_marks["end"]
        wall = max(t1 - t0, 1e-9)
        return {"train_phase_cores_this_run": round((o1 - o0) / wall, 2),
                "train_phase_cores_other_processes": round(max(0.0, (s1 - s0) - (o1 - o0)) / wall, 2),
                "train_phase_loadavg1_mean": round(sum(self.load_samples) / len(self.load_samples), 2)
                if self.load_samples else None,
                "train_phase_loadavg1_max": max(self.load_samples) if self.load_samples else None}

    def cpu_seconds(self) -> float:
        t = self._proc.cpu_times()
        return t.user + t.system

    def set_phase(self, name: str) -> None:
        self.marks[f"rss_at_{name}_start"] = self.sample()
        if name == "train" or (self.phase == "train" and name != "train"):
            self._cpu_mark("train" if name == "train" else "end")
        self.phase = name
        self.sample()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self.sample()
        ru = self.ru_maxrss()
        return {
            "peak_rss_bytes": max(self.peak, ru),
            "peak_rss_poll_bytes": self.peak,
            "ru_maxrss_bytes": ru,
            "ru_maxrss_at_child_start_bytes": self.ru_maxrss_at_start,
            "phase_peak_rss_bytes": dict(self.phase_peaks),
            **self.marks,
            "contention": self.cpu_share(),
        }


def _setup_torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return torch


def _model_location(spec: dict) -> tuple[str, str | None]:
    """(directory, gguf file name or None) of the model weights."""
    if spec["quick"]:
        return spec["tiny_dir"], None
    from leantune.models.loading import builtin_gguf

    p = builtin_gguf(MODEL_BUILTIN)
    return str(p.parent), p.name


def _load_tokenizer(spec: dict):
    from transformers import AutoTokenizer

    where, gguf = _model_location(spec)
    tok = AutoTokenizer.from_pretrained(where, **({"gguf_file": gguf} if gguf else {}))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def cpu_info() -> dict:
    """CPU model and the matmul-relevant flags (AVX2, AVX-512, AVX512-BF16, AMX), for every result."""
    from leantune.compute import cpu_flags
    from leantune.metering import _cpu_model

    return {"model": _cpu_model(), "flags": cpu_flags()}


def resolve_bench_dtype(name: str) -> str:
    """``auto``: bfloat16 where the CPU has AVX512-BF16 or AMX (where bf16 matmuls are fast), else float32 --
    how each library's users would run on this machine."""
    if name != "auto":
        return name
    flags = set(cpu_info()["flags"])
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"


def _load_model(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    where, gguf = _model_location(spec)
    kwargs = {"dtype": torch.float32}
    if gguf:
        from leantune.models.loading import gguf_dequantize_kwargs

        # plain dense fp32 weights, exactly as leantune loads them (newer transformers would otherwise keep
        # GGUF blocks packed and unpack them in every forward)
        kwargs.update(gguf_file=gguf, **gguf_dequantize_kwargs(gguf))
    model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    model.config.use_cache = False
    if gguf:
        # transformers dequantizes GGUF weights into plain fp32 parameters on load but keeps a GGUF
        # "quantizer" marker, which makes Trainer refuse to train ("QuantizationMethod.GGUF ... do not
        # support training"). The weights are ordinary tensors (leantune trains them as is): drop the marker.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(LORA_TARGETS), bias="none",
                      task_type="CAUSAL_LM")


def _digest_batch(input_ids, labels) -> str:
    """sha256 (16 hex) of a batch's token ids and its shifted loss mask (labels[:, 1:] != -100)."""
    import hashlib

    import numpy as np

    ids = np.ascontiguousarray(input_ids.detach().cpu().numpy().astype(np.int64))
    mask = np.ascontiguousarray((labels[:, 1:] != -100).detach().cpu().numpy().astype(np.uint8))
    h = hashlib.sha256()
    h.update(str(ids.shape).encode())
    h.update(ids.tobytes())
    h.update(mask.tobytes())
    return h.hexdigest()[:16]


def _lora_digest(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.split("lora_", 1)[-1].encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _n_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _filler(tok, rng, n_tokens: int, prefix: str, suffix: str, add_special: bool, one_token_words: list[str]) -> str:
    """``prefix + words + suffix`` that tokenizes (alone) to exactly ``n_tokens`` tokens."""

    def count(words: list[str]) -> int:
        return len(tok(prefix + "".join(words) + suffix, add_special_tokens=add_special).input_ids)

    words: list[str] = []
    cost = {}
    est = count([])
    while est < n_tokens - 12:
        w = rng.choice(WORDS)
        if rng.random() < 0.08:
            w += rng.choice([".", ",", ";"])
        piece = " " + w
        if piece not in cost:
            cost[piece] = len(tok(piece, add_special_tokens=False).input_ids)
        words.append(piece)
        est += cost[piece]
    for _ in range(400):
        c = count(words)
        if c == n_tokens:
            return prefix + "".join(words) + suffix
        if c < n_tokens:
            words.append(" " + rng.choice(one_token_words))
        else:
            words.pop()
    raise RuntimeError(f"could not build a {n_tokens}-token text")


def prepare_data(spec: dict) -> dict:
    """Write the shared prompt/completion JSONL and the tokenized ids (via leantune's own pipeline)."""
    import hashlib
    import random

    from leantune.config import DataConfig, SpanWeights
    from leantune.data.sft import collate, load_sft_examples

    tok = _load_tokenizer(spec)
    seq, n = spec["seq_len"], spec["batch"] * spec["steps"]
    n_prompt = int(round(spec["prompt_fraction"] * seq))
    n_completion = seq - n_prompt - 1  # + eos
    one_tok = [w for w in WORDS if len(tok(" " + w, add_special_tokens=False).input_ids) == 1] or ["the"]
    records = []
    for i in range(n):
        rng = random.Random(f"leantune-sft-memory:{i}")
        prompt = _filler(tok, rng, n_prompt, f"Document {i}. Read the notes and summarize them.\nNotes:",
                         "\nSummary:", True, one_tok)
        completion = _filler(tok, rng, n_completion, "", "", False, one_tok)
        records.append({"prompt": prompt, "completion": completion})
    data_path = Path(spec["work_dir"]) / "train.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    cfg = DataConfig(train=str(data_path), max_length=seq, shuffle=False)
    examples, stats = load_sft_examples(data_path, tok, cfg)
    lengths = sorted({len(e.input_ids) for e in examples})
    batch = collate(examples, tok.pad_token_id, SpanWeights())
    tokens = {"input_ids": batch["input_ids"].tolist(), "labels": batch["labels"].tolist(),
              "attention_mask": batch["attention_mask"].tolist()}
    (Path(spec["work_dir"]) / "tokens.json").write_text(json.dumps(tokens))
    digest = hashlib.sha256(json.dumps(tokens["input_ids"]).encode() + json.dumps(tokens["labels"]).encode())
    return {
        "examples": len(examples),
        "example_lengths": lengths,
        "prompt_tokens_per_example": n_prompt,
        "completion_tokens_per_example": n_completion + 1,
        "prompt_fraction": round(stats.prompt_tokens / stats.tokens, 4),
        "tokens_total": stats.tokens,
        "loss_tokens_per_batch": int((batch["labels"][: spec["batch"], 1:] != -100).sum()),
        "digest": digest.hexdigest()[:16],
        "stats": stats.as_dict(),
    }


def run_leantune(spec: dict, mon: RssMonitor) -> dict:
    import torch

    import leantune.train.sft as sft
    from leantune.adapters.lora import causal_lm
    from leantune.config import Recipe

    policy, _, micro = str(spec["runner_arg"]).partition("/mb")  # "all/mb1": micro-batch 1, accumulated to --batch
    policy = int(policy) if policy.isdigit() else policy
    micro = int(micro) if micro else spec["batch"]
    if spec["batch"] % micro:
        raise ValueError(f"--leantune-ckpt ...{spec['runner_arg']}: the micro-batch must divide --batch {spec['batch']}")
    model_path = spec["tiny_dir"] if spec["quick"] else f"builtin:{MODEL_BUILTIN}"
    run_dir = Path(spec["work_dir"]) / f"run-{spec['runner']}"
    recipe = Recipe.model_validate({
        "model": {"path": model_path, "dtype": spec["dtype"]},
        "data": {"train": str(Path(spec["work_dir"]) / "train.jsonl"), "max_length": spec["seq_len"], "shuffle": False},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": list(LORA_TARGETS)},
        "loss": {"chunk_size": spec["chunk_size"]},
        "optim": {"lr": spec["lr"], "scheduler": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                  "max_grad_norm": 1.0},
        "train": {"steps": spec["steps"], "micro_batch_size": micro, "grad_accum": spec["batch"] // micro, "seed": 0,
                  "activation_checkpointing": policy, "output_dir": str(run_dir), "threads": spec["threads"],
                  "progress": False, "log_every": 1},
    })

    # Observe the loop without changing it: batch digests, the adapter at the first step, step boundaries.
    digests, lora_init = [], {}
    original = sft.accumulate_gradients

    step_cpu = []

    def observed(loss_module, batches, chunk_size, *rest, **kw):
        model = getattr(loss_module, "model", loss_module)  # the SFTLoss wraps the trained model
        if not lora_init:
            lora_init["digest"] = _lora_digest(model)
            lora_init["trainable"] = _n_trainable(model)
            lora_init["attn"] = getattr(causal_lm(model).config, "_attn_implementation", None)
            mon.set_phase("train")
        if len(batches) > 1 and len({b["input_ids"].shape[1] for b in batches}) == 1:  # accumulated: the step's batch
            import torch

            digests.append(_digest_batch(torch.cat([b["input_ids"] for b in batches]),
                                         torch.cat([b["labels"] for b in batches])))
        else:
            for b in batches:
                digests.append(_digest_batch(b["input_ids"], b["labels"]))
        c0 = mon.cpu_seconds()
        out = original(loss_module, batches, chunk_size, *rest, **kw)
        step_cpu.append(mon.cpu_seconds() - c0)
        return out

    sft.accumulate_gradients = observed
    mon.set_phase("setup")
    t0 = time.perf_counter()
    try:
        result = sft.train(recipe, quiet=True)
    finally:
        sft.accumulate_gradients = original
    mon.set_phase("teardown")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step_tokens = spec["batch"] * spec["seq_len"]
    step_times = [step_tokens / r["tokens_per_s"] for r in rows]
    return {
        "config": {"activation_checkpointing": policy, "loss.chunk_size": spec["chunk_size"],
                   "micro_batch_size": micro, "grad_accum": spec["batch"] // micro,
                   "attn_implementation": lora_init.get("attn"), "optimizer": "torch.optim.AdamW (foreach)"},
        "losses": [r["loss"] for r in rows],
        "step_times_s": step_times,
        "step_cpu_s": step_cpu,
        "batch_digests": digests,
        "lora_init_digest": lora_init.get("digest"),
        "trainable_params": lora_init.get("trainable"),
        "train_call_s": time.perf_counter() - t0,
        "leantune_ledger_peak_rss_bytes": result.ledger.get("totals", {}).get("peak_rss_bytes")
        if isinstance(result.ledger.get("totals"), dict) else None,
    }


class _StepClock:
    """A TrainerCallback recording the wall time at train begin and at every optimizer step end."""

    def __new__(cls, mon: RssMonitor):
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def __init__(self):
                self.t, self.cpu, self._c0 = [], [], 0.0

            def on_train_begin(self, args, state, control, **kw):
                mon.set_phase("train")
                self.t.append(time.perf_counter())

            def on_step_begin(self, args, state, control, **kw):
                self._c0 = mon.cpu_seconds()

            def on_step_end(self, args, state, control, **kw):
                self.t.append(time.perf_counter())
                self.cpu.append(mon.cpu_seconds() - self._c0)

        return Clock()


def _observing(trainer_cls):
    """Subclass of a Trainer class that records the loss and batch digest of every compute_loss call."""

    class Observed(trainer_cls):
        _seen: list = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                digest = _digest_batch(inputs["input_ids"], inputs["labels"])
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if model.training:
                loss = out[0] if isinstance(out, tuple) else out
                self._seen.append((digest, float(loss.detach())))
            return out

    return Observed


def _common_args(spec: dict, out: str) -> dict:
    return dict(
        output_dir=out, per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", seed=0,
        train_sampling_strategy="sequential", use_cpu=True, dataloader_num_workers=0,
        bf16=spec["dtype"] == "bfloat16", fp16=False,  # bf16: Trainer's CPU autocast over fp32 weights
        disable_tqdm=True,
    )


def _trainer_result(trainer, clock, model, extra: dict) -> dict:
    seen = trainer._seen
    t = clock.t
    return {
        "config": extra,
        "losses": [loss for _, loss in seen],
        "step_times_s": [b - a for a, b in zip(t, t[1:])],
        "step_cpu_s": clock.cpu,
        "batch_digests": [d for d, _ in seen],
        "trainable_params": _n_trainable(model),
    }


def run_trainer_peft(spec: dict, mon: RssMonitor) -> dict:
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    mon.set_phase("setup")
    gc = spec["runner_arg"] == "gc"
    tokens = json.loads((Path(spec["work_dir"]) / "tokens.json").read_text())
    ds = Dataset.from_dict(tokens)
    model = _load_model(spec)
    torch.manual_seed(0)
    model = get_peft_model(model, _lora_config())
    init = _lora_digest(model)
    args = TrainingArguments(**_common_args(spec, str(Path(spec["work_dir"]) / f"out-{spec['runner']}")),
                             gradient_checkpointing=gc)
    clock = _StepClock(mon)
    trainer = _observing(Trainer)(model=model, args=args, train_dataset=ds, data_collator=default_data_collator,
                                  callbacks=[clock])
    trainer.train()
    mon.set_phase("teardown")
    res = _trainer_result(trainer, clock, model, {
        "gradient_checkpointing": gc, "optim": str(args.optim),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "loss": "model's own ForCausalLMLoss over full [B, T, V] logits"})
    res["lora_init_digest"] = init
    return res


def run_trl(spec: dict, mon: RssMonitor) -> dict:
    import trl
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    mon.set_phase("setup")
    records = [json.loads(line) for line in (Path(spec["work_dir"]) / "train.jsonl").read_text().splitlines()]
    ds = Dataset.from_list(records)
    tok = _load_tokenizer(spec)
    model = _load_model(spec)
    common = _common_args(spec, str(Path(spec["work_dir"]) / f"out-{spec['runner']}"))
    args = SFTConfig(**common, max_length=spec["seq_len"])  # everything else: SFTConfig defaults
    clock = _StepClock(mon)
    trainer = _observing(SFTTrainer)(model=model, args=args, train_dataset=ds, processing_class=tok,
                                     peft_config=_lora_config(), callbacks=[clock])
    init = _lora_digest(trainer.model)
    trainer.train()
    mon.set_phase("teardown")
    res = _trainer_result(trainer, clock, trainer.model, {
        "trl_version": trl.__version__,
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "gradient_checkpointing_kwargs": args.gradient_checkpointing_kwargs,
        "loss_type": args.loss_type, "completion_only_loss": trainer.completion_only_loss,
        "padding_free": args.padding_free, "packing": args.packing, "bf16": args.bf16, "optim": str(args.optim),
        "attn_implementation": getattr(trainer.model.config, "_attn_implementation", None),
        "overrides_of_defaults": sorted(set(common) | {"max_length"}),
    })
    res["lora_init_digest"] = init
    return res


RUNNERS = {"leantune": run_leantune, "trainer_peft": run_trainer_peft, "trl": run_trl}


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    mon = RssMonitor()
    out: dict = {"runner": spec["runner"], "pid": os.getpid(), "loadavg_before": loadavg(), "cpu": cpu_info()}
    t0 = time.perf_counter()
    try:
        _setup_torch(spec["threads"])
        if spec["kind"] == "prepare":
            out.update(prepare_data(spec))
        else:
            out.update(RUNNERS[spec["kind"]](spec, mon))
        out["status"] = "ok"
        from leantune.allocator import active

        out["malloc"] = active()
    except Exception as err:  # report, do not crash the whole benchmark
        import traceback

        traceback.print_exc(file=sys.stderr)
        out["status"] = "failed"
        out["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    out["wall_time_s"] = time.perf_counter() - t0
    out["loadavg_after"] = loadavg()
    out.update(mon.stop())
    Path(spec["result_path"]).write_text(json.dumps(out))


# ================================================================================================
# Parent side: orchestration and the comparison


def run_child(spec: dict, timeout_s: float) -> dict:
    spec_path = Path(spec["work_dir"]) / f"spec-{spec['runner']}.json"
    spec["result_path"] = str(Path(spec["work_dir"]) / f"result-{spec['runner']}.json")
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(spec["threads"]),
               MKL_NUM_THREADS=str(spec["threads"]), PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", PYTHONWARNINGS="ignore")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if spec.get("malloc_mmap_threshold") and spec["kind"] != "prepare":
        env["MALLOC_MMAP_THRESHOLD_"] = str(spec["malloc_mmap_threshold"])
    if spec["kind"] != "prepare":  # leantune rows on its train.allocator; the peers as their users run them
        from leantune.allocator import preload_env  # no torch: the parent stays small

        choice = spec["allocator"] if spec["kind"] == "leantune" else spec["peer_allocator"]
        env = preload_env(choice, base=env)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", str(spec_path)],
                              stdout=sys.stderr, stderr=sys.stderr, env=env, timeout=timeout_s)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        return {"runner": spec["runner"], "status": "failed", "error": f"timeout after {timeout_s:.0f}s"}
    result_path = Path(spec["result_path"])
    if not result_path.exists():
        return {"runner": spec["runner"], "status": "failed",
                "error": f"child exited with code {rc} without a result (killed? out of memory?)",
                "elapsed_s": time.perf_counter() - t0}
    return json.loads(result_path.read_text())


def summarize(res: dict, spec: dict) -> dict:
    """Add tokens/s (excluding the warm-up step) and friendly units to one run's result."""
    if res.get("status") != "ok":
        return res
    st = res.get("step_times_s") or []
    step_tokens = spec["batch"] * spec["seq_len"]
    timed = st[1:] if len(st) > 1 else st
    res["tokens_per_s"] = step_tokens * len(timed) / sum(timed) if timed and sum(timed) > 0 else None
    res["tokens_per_s_incl_warmup"] = step_tokens * len(st) / sum(st) if st else None
    res["train_time_s"] = sum(st)
    cpu = (res.get("step_cpu_s") or [])[1:]
    res["tokens_per_cpu_s"] = step_tokens * len(cpu) / sum(cpu) if cpu and sum(cpu) > 0 else None
    res["peak_rss_gib"] = round(res["peak_rss_bytes"] / 2**30, 3)
    return res


def _ratio(a, b):
    return round(a / b, 4) if a is not None and b else None


def compare(runs: dict, data: dict) -> dict:
    ok = {k: v for k, v in runs.items() if v.get("status") == "ok"}
    out: dict = {}
    # Same data and same loss mask everywhere?
    digests = {k: v.get("batch_digests") for k, v in ok.items()}
    ref_digests = next(iter(digests.values()), None)
    out["identical_batches"] = {k: d == ref_digests for k, d in digests.items()}
    inits = {k: v.get("lora_init_digest") for k, v in ok.items()}
    out["identical_lora_init"] = {k: d == next(iter(inits.values()), None) for k, d in inits.items()}
    # Loss curves against Trainer+PEFT default (or whatever ran).
    ref_name = "trainer_peft" if "trainer_peft" in ok else next(iter(ok), None)
    if ref_name:
        ref = ok[ref_name]["losses"]
        out["loss_reference"] = ref_name
        out["max_abs_loss_diff_vs_reference"] = {
            k: (max(abs(a - b) for a, b in zip(v["losses"], ref)) if len(v["losses"]) == len(ref) else None)
            for k, v in ok.items()
        }
    ratios = {}
    for name, run in ok.items():
        if not name.startswith("leantune"):
            continue
        r = {}
        for base in ("trainer_peft", "trainer_peft_gc", "trl_sft"):
            if base in ok:
                r[f"peak_vs_{base}"] = _ratio(run["peak_rss_bytes"], ok[base]["peak_rss_bytes"])
                r[f"tokens_per_s_vs_{base}"] = _ratio(run["tokens_per_s"], ok[base]["tokens_per_s"])
                r[f"tokens_per_cpu_s_vs_{base}"] = _ratio(run.get("tokens_per_cpu_s"), ok[base].get("tokens_per_cpu_s"))
        peers = {k: v for k, v in ok.items() if not k.startswith("leantune")}
        if "trainer_peft_gc" in ok:
            r["meets_floor_target"] = (r["peak_vs_trainer_peft_gc"] <= TARGETS["floor_peak_vs_trainer_peft_gc_max"]
                                       and r["tokens_per_s_vs_trainer_peft_gc"] >= TARGETS["floor_tokens_per_s_vs_trainer_peft_gc_min"])
        if peers:
            fastest = max(peers, key=lambda k: peers[k]["tokens_per_s"] or 0)
            r["fastest_peer"] = fastest
            r["tokens_per_s_vs_fastest_peer"] = _ratio(run["tokens_per_s"], peers[fastest]["tokens_per_s"])
            r["peak_vs_fastest_peer"] = _ratio(run["peak_rss_bytes"], peers[fastest]["peak_rss_bytes"])
            r["meets_fast_target"] = (r["tokens_per_s_vs_fastest_peer"] >= TARGETS["fast_tokens_per_s_vs_fastest_peer_min"]
                                      and r["peak_vs_fastest_peer"] <= TARGETS["fast_peak_vs_fastest_peer_max"])
        if "trainer_peft" in ok and "trainer_peft_gc" in ok:
            r["meets_peak_vs_trainer_peft"] = r["peak_vs_trainer_peft"] <= TARGETS["peak_vs_trainer_peft_max"]
            r["meets_peak_vs_trainer_peft_gc"] = r["peak_vs_trainer_peft_gc"] <= TARGETS["peak_vs_trainer_peft_gc_max"]
            r["meets_speed_vs_trainer_peft"] = r["tokens_per_s_vs_trainer_peft"] >= TARGETS["tokens_per_s_vs_baseline_min"]
            r["meets_speed_vs_trainer_peft_gc"] = (
                r["tokens_per_s_vs_trainer_peft_gc"] >= TARGETS["tokens_per_s_vs_baseline_min"])
        r["meets_all_targets"] = all(r[k] for k in r if k.startswith("meets_"))
        ratios[name] = r
    out["leantune_ratios"] = ratios
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout (logs go to stderr)")
    p.add_argument("--quick", action="store_true", help="tiny 2-layer model, seq 128: a smoke check in seconds")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per runner; the first is warm-up (default 3)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per example (default 1024; 128 with --quick)")
    p.add_argument("--batch", type=int, default=4, help="micro-batch size (no accumulation)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--prompt-fraction", type=float, default=0.85, help="share of each example that is prompt")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto (default): bfloat16 where the CPU has AVX512-BF16 or AMX, float32 elsewhere; leantune "
                   "trains a bf16 base, the peers use their bf16=True (CPU autocast over fp32 weights)")
    p.add_argument("--leantune-ckpt", default="all,2",
                   help="comma-separated leantune activation_checkpointing policies, one row each (off, selective, "
                   "all, k); a '/mbN' suffix (e.g. all/mb1) trains micro-batches of N accumulated to --batch per step "
                   "(the same examples and update)")
    p.add_argument("--chunk-size", type=int, default=256, help="leantune loss.chunk_size")
    p.add_argument("--only", action="append", default=[],
                   help="run only these runners (comma-separated names or prefixes; repeatable)")
    p.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="set MALLOC_MMAP_THRESHOLD_ (glibc) in every run, e.g. 131072: freed large blocks go "
                   "back to the OS at once, so RSS tracks live tensors (an allocator experiment; off by default)")
    p.add_argument("--allocator", default="auto", choices=["auto", "system", "jemalloc", "tbbmalloc"],
                   help="malloc of the leantune rows, as train.allocator picks it for the leantune command "
                   "(default auto: jemalloc if installed, else tbbmalloc)")
    p.add_argument("--peer-allocator", default="system", choices=["auto", "system", "jemalloc", "tbbmalloc"],
                   help="malloc of the Trainer / TRL rows (default: the system's, as their users run them)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per runner before it is killed")
    p.add_argument("--work-dir", default=None, help="where data and run directories go (default: a temp dir)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or 3
    args.seq_len = args.seq_len or (128 if args.quick else 1024)
    return args


def runner_table(args) -> list[tuple[str, str, str]]:
    """(name, kind, arg) of every runner, in run order."""
    rows = [(f"leantune_ckpt_{p.strip().replace('/', '_')}", "leantune", p.strip()) for p in args.leantune_ckpt.split(",") if p.strip()]
    rows += [("trainer_peft", "trainer_peft", "default"), ("trainer_peft_gc", "trainer_peft", "gc"),
             ("trl_sft", "trl", "default")]
    if args.only:
        wanted = [w.strip() for item in args.only for w in item.split(",") if w.strip()]
        rows = [r for r in rows if any(r[0] == w or r[0].startswith(w) for w in wanted)]
        if not rows:
            raise SystemExit(f"--only {args.only}: no runner matches; runners: leantune_ckpt_<policy>, "
                             "trainer_peft, trainer_peft_gc, trl_sft")
    return rows


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "leantune"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    try:  # which leantune code ran: commit, and whether the work tree had local changes
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "leantune"], cwd=here.parent,
                               capture_output=True, text=True)
        out["leantune_git"] = commit.stdout.strip() + ("+local-changes" if dirty.stdout.strip() else "")
    except OSError:
        out["leantune_git"] = None
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._child:
        child_main(args._child)
        return 0
    os.environ["HF_HUB_OFFLINE"] = "1"
    runners = runner_table(args)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="sft-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    load_start = loadavg()
    base = {"work_dir": str(work), "quick": args.quick, "seq_len": args.seq_len, "batch": args.batch,
            "steps": args.steps, "lr": args.lr, "prompt_fraction": args.prompt_fraction, "threads": args.threads,
            "chunk_size": args.chunk_size, "tiny_dir": str(work / "tiny-model"),
            "malloc_mmap_threshold": args.malloc_mmap_threshold, "allocator": args.allocator,
            "peer_allocator": args.peer_allocator, "dtype": resolve_bench_dtype(args.dtype)}
    log(f"work dir {work}; runners: {', '.join(r[0] for r in runners)}; load {load_start}")

    if args.quick:  # the tiny model is written by a subprocess too, to keep this process small
        code = "import sys; from leantune.models.tiny import save_tiny_model; save_tiny_model(sys.argv[1], layers=2)"
        subprocess.run([sys.executable, "-c", code, base["tiny_dir"]], check=True, stdout=sys.stderr)

    data = run_child({**base, "runner": "prepare", "kind": "prepare"}, args.timeout)
    if data.get("status") != "ok":
        log(f"data preparation failed: {data.get('error')}")
        print(json.dumps({"status": "failed", "stage": "prepare", "error": data.get("error")}))
        return 1
    data = {k: data[k] for k in ("examples", "example_lengths", "prompt_tokens_per_example",
                                 "completion_tokens_per_example", "prompt_fraction", "tokens_total",
                                 "loss_tokens_per_batch", "digest")}
    log(f"data: {data}")

    runs: dict[str, dict] = {}
    for name, kind, arg in runners:
        log(f"--- {name} (load {loadavg()})")
        res = run_child({**base, "runner": name, "kind": kind, "runner_arg": arg}, args.timeout)
        runs[name] = summarize(res, base)
        r = runs[name]
        if r.get("status") == "ok":
            log(f"{name}: peak {r['peak_rss_gib']} GiB, {r['tokens_per_s']:.1f} tok/s, malloc {r.get('malloc')}, "
                f"losses {[round(x, 4) for x in r['losses']]}, load {r.get('loadavg_after')}")
        else:
            log(f"{name}: {r.get('status')}: {r.get('error')}")

    result = {
        "benchmark": "sft_memory",
        "mode": "quick" if args.quick else "full",
        "model": "tiny (leantune.models.tiny, 2 layers, hidden 64)" if args.quick else f"builtin:{MODEL_BUILTIN} (GGUF Q4_1 dequantized to fp32)",
        "settings": {"seq_len": args.seq_len, "batch": args.batch, "grad_accum": 1, "steps": args.steps,
                     "warmup_steps_excluded_from_tokens_per_s": 1, "lr": args.lr, "scheduler": "constant",
                     "optimizer": "AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay=0), grad clip 1.0",
                     "dtype": base["dtype"], "dtype_requested": args.dtype, "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": LORA_TARGETS},
                     "seed": 0, "threads": args.threads, "leantune_chunk_size": args.chunk_size,
                     "malloc_mmap_threshold": args.malloc_mmap_threshold or "glibc default (dynamic)",
                     "allocator_leantune": args.allocator, "allocator_peers": args.peer_allocator,
                     "loss": "mean CE over completion tokens (+eos) only"},
        "data": data,
        "machine": {"cpu": cpu_info(), "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_start": load_start, "loadavg_end": loadavg(),
                    "total_ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
        "load_during_runs": {k: {"loadavg_before": v.get("loadavg_before"), "loadavg_after": v.get("loadavg_after"),
                                 **(v.get("contention") or {})} for k, v in runs.items()},
        "versions": _versions(),
        "runs": runs,
        "comparison": compare(runs, data),
        "targets": TARGETS,
        "total_wall_time_s": round(time.perf_counter() - t_start, 1),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return 0 if all(r.get("status") == "ok" for r in runs.values()) else 1


def format_table(result: dict) -> str:
    lines = [f"{'runner':24s} {'peak GiB':>9s} {'tok/s':>8s} {'wall s':>8s}  losses"]
    for name, r in result["runs"].items():
        if r.get("status") != "ok":
            lines.append(f"{name:24s} {r.get('status')}: {r.get('error')}")
            continue
        lines.append(f"{name:24s} {r['peak_rss_gib']:9.3f} {r['tokens_per_s']:8.1f} {r['wall_time_s']:8.1f}  "
                     f"{[round(x, 4) for x in r['losses']]}")
    lines.append(json.dumps(result["comparison"], indent=2))
    lines.append(f"load avg start {result['machine']['loadavg_start']} end {result['machine']['loadavg_end']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
