#!/usr/bin/env python
"""RL with verifiable rewards: leantune (`leantune.train.rl.train_rl`) vs TRL's `GRPOTrainer`, side by side.

Both runners do DAPO (token-level loss, clip-higher 0.2/0.28, no KL, group-normalized advantages,
overlong completions masked) on the `addition` task with the task's own verifier as the reward, starting
from the same SFT LoRA adapter (trainable) on the same base, with the same prompt pool, group size,
prompts per update, completion budget, temperature, learning rate, optimizer (AdamW, constant lr,
grad clip 1.0), micro-batch, dtype and number of policy updates (optimizer steps). Each runner is its
own subprocess with 1 torch thread (default), and ends with a greedy held-out accuracy
(`leantune.eval.evaluate.task_accuracy`, the same 200 test problems) of its final policy.

Runners (``--only NAME[,NAME...]``):

- ``leantune``: leantune's defaults for RL: dynamic sampling (drop all-equal groups, refill, up to
  3 sampling rounds) and prompt selection (skip prompts whose last group was all solved / all failed);
- ``leantune_plain``: the same with dynamic sampling and prompt selection off: one sampling round, the
  same prompts per update as TRL (checked by digest);
- ``leantune_spec``: ``leantune`` with exact speculative rollouts (``--speculative``: ``prompt_lookup`` or
  ``draft:SOURCE``); the comparison reports its rollout phase against ``leantune``'s separately;
- ``leantune_ds`` / ``leantune_ps``: only dynamic sampling / only prompt selection (not run by default);
- ``trl``: ``trl.GRPOTrainer(loss_type="dapo")`` on CPU, generating with ``model.generate``.

The SFT adapter both start from is trained once with the leantune CLI (``make-data addition`` then
``train recipes/sft_smollm2_addition.yaml train.steps=20``) and cached in the work directory.

    HF_HUB_OFFLINE=1 python benchmarks/rl_vs_trl.py --quick --json     # tiny random model, smoke check
    HF_HUB_OFFLINE=1 python benchmarks/rl_vs_trl.py --json > rl.json   # SmolLM2-135M-Instruct

Logs go to stderr; ``--json`` prints one JSON object to stdout. The parent never imports torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's leantune
from leantune.compute import cpu_summary  # noqa: E402  (no torch at import)

MODEL_BUILTIN = "builtin:smollm2-135m-instruct"
TASK = "addition"
TARGETS = {
    "trl_time_per_update_over_leantune_min": 3.0,
    "note": "from the issue: leantune >= 3x faster per policy update than TRL GRPOTrainer at equal or better "
    "held-out accuracy, with the rollout phase's speed-up from speculative decoding reported separately",
}
VARIANTS = {  # runner name -> (dynamic_sampling, prompt_selection, speculative rollouts)
    "leantune": (True, True, False),
    "leantune_plain": (False, False, False),
    "leantune_ds": (True, False, False),
    "leantune_ps": (False, True, False),
    "leantune_spec": (True, True, True),  # leantune's defaults + rl.speculative (--speculative)
}
DEFAULT_RUNNERS = ["leantune", "leantune_plain", "leantune_spec", "trl"]


def log(*args) -> None:
    print("[rl_vs_trl]", *args, file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ================================================================================================
# Child side


class Meter:
    """Peak RSS (psutil poll + ru_maxrss) and how busy the machine was while this child trained."""

    def __init__(self):
        import threading

        import psutil

        self._proc = psutil.Process()
        self._stop = threading.Event()
        self.peak = self._proc.memory_info().rss
        self.training = False
        self.load_samples: list[float] = []
        self.marks: dict[str, tuple[float, float, float]] = {}
        self._thread = threading.Thread(target=self._run, daemon=True, name="meter")
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._proc.memory_info().rss)
            n += 1
            if self.training and n % 100 == 0:  # every ~5 s
                self.load_samples.append(os.getloadavg()[0])

    def mark(self, name: str) -> None:
        """Wall clock, machine-wide busy CPU seconds and this process's CPU seconds at ``name``."""
        import psutil

        if name in self.marks:
            return
        sys_t, own = psutil.cpu_times(), self._proc.cpu_times()
        busy = sum(getattr(sys_t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))
        self.marks[name] = (time.perf_counter(), busy, own.user + own.system)
        self.training = name == "train_start"

    def contention(self) -> dict:
        if "train_start" not in self.marks or "train_end" not in self.marks:
            return {}
        (t0, s0, o0), (t1, s1, o1) = self.marks["train_start"], self.marks["train_end"]
        wall = max(t1 - t0, 1e-9)
        return {
            "train_wall_s": round(wall, 2),
            "train_cpu_s_this_run": round(o1 - o0, 2),
            "cores_this_run": round((o1 - o0) / wall, 2),
            "cores_other_processes": round(max(0.0, (s1 - s0) - (o1 - o0)) / wall, 2),
            "loadavg1_mean": round(sum(self.load_samples) / len(self.load_samples), 2) if self.load_samples else None,
            "loadavg1_max": max(self.load_samples) if self.load_samples else None,
        }

    def stop(self) -> dict:
        import resource

        self._stop.set()
        self._thread.join()
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_rss_bytes": max(self.peak, ru), "contention": self.contention()}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]


def _prompt_set_digest(prompt_ids) -> str:
    """Digest of the set of distinct prompts (token ids) of one update, independent of order and repeats."""
    return _digest(sorted({tuple(int(t) for t in p) for p in prompt_ids}))


def _sft_overrides(spec: dict) -> list[str]:
    data = Path(spec["work_dir"]) / "data"
    over = [f"data.train={data / 'train.jsonl'}", f"data.eval={data / 'valid.jsonl'}",
            f"train.steps={spec['sft_steps']}", f"train.output_dir={spec['sft_dir']}",
            f"train.threads={spec['threads']}", "train.progress=false"]
    if spec["quick"]:  # a random 2-layer model: fp32, a larger lr
        over += [f"model.path={spec['tiny_dir']}", "model.dtype=float32", "optim.lr=0.01"]
    return over


def prepare(spec: dict, meter: Meter) -> dict:
    """The SFT adapter both runners start from (cached), its held-out accuracy, and TRL's prompt order."""
    from leantune.cli import main as cli
    from leantune.eval.evaluate import load_for_eval, task_accuracy
    from leantune.rl.selection import PromptStream
    from leantune.tasks import get_task

    work, task = Path(spec["work_dir"]), spec.get("task", TASK)
    recipe = Path(__file__).resolve().parent.parent / "recipes" / spec.get("sft_recipe", "sft_smollm2_addition.yaml")
    key = {"recipe": recipe.read_text(), "overrides": _sft_overrides(spec), "quick": spec["quick"]}
    cache = Path(spec["sft_dir"]) / "bench_sft.json"
    cached = json.loads(cache.read_text()) if cache.exists() else None
    if cached and cached.get("key") == _digest(key) and (Path(spec["sft_dir"]) / "adapter").is_dir():
        log(f"SFT adapter: cached in {spec['sft_dir']}")
        sft = cached
    else:
        if spec["quick"] and not (Path(spec["tiny_dir"]) / "config.json").exists():
            from leantune.models.tiny import save_tiny_model

            save_tiny_model(spec["tiny_dir"], chat_template=True)
        if Path(spec["sft_dir"]).exists():
            import shutil

            shutil.rmtree(spec["sft_dir"])
        t0 = time.perf_counter()
        if cli(["make-data", task, "--out", str(work / "data")]) != 0:
            raise RuntimeError("leantune make-data failed")
        if cli(["train", str(recipe), *_sft_overrides(spec)]) != 0:
            raise RuntimeError("leantune train (SFT) failed")
        sft_s = time.perf_counter() - t0
        model, tok = load_for_eval(spec["sft_dir"])
        acc = task_accuracy(model, tok, task, num_problems=spec["eval_problems"], max_new_tokens=spec["max_new_tokens"])
        sft = {"key": _digest(key), "command": ["leantune", "train", str(recipe), *_sft_overrides(spec)],
               "sft_seconds": round(sft_s, 1), "accuracy": acc["accuracy"], "correct": acc["correct"],
               "problems": acc["problems"], "examples": acc["examples"]}
        cache.write_text(json.dumps(sft, indent=1))
    if sft["problems"] != spec["eval_problems"]:  # cached adapter, measured on another number of problems
        model, tok = load_for_eval(spec["sft_dir"])
        acc = task_accuracy(model, tok, task, num_problems=spec["eval_problems"], max_new_tokens=spec["max_new_tokens"])
        sft.update(accuracy=acc["accuracy"], correct=acc["correct"], problems=acc["problems"], examples=acc["examples"])
        cache.write_text(json.dumps(sft, indent=1))
        del model
    # The prompt pool leantune builds from rl.task (train split, seed 0), in the order its PromptStream
    # walks it: TRL gets exactly the prompts of leantune_plain's updates, in order, unshuffled.
    pool = get_task(task).generate(spec["num_prompts"], seed=0, split="train")
    stream = PromptStream(len(pool), seed=0)
    order = [stream.next() for _ in range(spec["steps"] * spec["prompts_per_step"])]
    rows = [{"prompt": pool[i]["prompt"], "answer": pool[i]["answer"]} for i in order]
    (work / "trl_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"sft": {k: v for k, v in sft.items() if k != "key"}, "trl_prompts": len(rows)}


def _rl_recipe(spec: dict, dynamic_sampling: bool, prompt_selection: bool, out_dir: str, speculative: bool = False):
    from leantune.config import Recipe

    return Recipe.model_validate({
        "model": {"path": spec["tiny_dir"] if spec["quick"] else MODEL_BUILTIN, "dtype": spec["dtype"]},
        "data": {},
        "loss": {"chunk_size": 256},
        "optim": {"lr": spec["lr"], "scheduler": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                  "betas": [0.9, 0.999], "eps": 1e-8, "max_grad_norm": 1.0},
        "train": {"steps": spec["steps"], "micro_batch_size": spec["micro_batch"], "seed": 0, "output_dir": out_dir,
                  "threads": spec["threads"], "progress": False, "log_every": 1, "save_every": 0},
        "rl": {"init": spec["sft_dir"], "task": spec.get("task", TASK), "num_prompts": spec["num_prompts"], "loss": "dapo",
               "rewards": {"task": 1.0}, "group_size": spec["group_size"],
               "prompts_per_step": spec["prompts_per_step"], "temperature": 1.0, "top_p": 1.0,
               "max_new_tokens": spec["max_new_tokens"], "epsilon_low": 0.2, "epsilon_high": 0.28, "beta": 0.0,
               "updates_per_batch": 1, "dynamic_sampling": dynamic_sampling, "max_sampling_rounds": 3,
               "overlong_filter": True,
               "prompt_selection": {"enabled": prompt_selection, "window": 1, "cooldown_steps": 8},
               **(_speculative_settings(spec["speculative"]) if speculative else {})},
    })


def _speculative_settings(arg: str) -> dict:
    """``--speculative``: ``prompt_lookup``, or ``draft:SOURCE`` (rl.speculative_draft, e.g. ``draft:layers:8``)."""
    if arg.startswith("draft:"):
        return {"speculative": "draft", "speculative_draft": arg[len("draft:"):]}
    return {"speculative": arg}


def _final_accuracy(model, tok, spec: dict) -> dict:
    from leantune.eval.evaluate import task_accuracy

    acc = task_accuracy(model, tok, spec.get("task", TASK), num_problems=spec["eval_problems"],
                        max_new_tokens=spec["max_new_tokens"])
    return {"accuracy": acc["accuracy"], "correct": acc["correct"], "problems": acc["problems"],
            "eval_seconds": round(acc["eval_seconds"], 1), "examples": acc["examples"][:2]}


def run_leantune(spec: dict, meter: Meter) -> dict:
    """`train_rl` as shipped; its two phases are timed by wrapping (not changing) collect_batch / policy_update."""
    import leantune.train.rl as rl_mod

    ds, ps, spec_on = VARIANTS[spec["runner"]]
    out_dir = str(Path(spec["work_dir"]) / f"run-{spec['runner']}")
    if Path(out_dir).exists():
        import shutil

        shutil.rmtree(out_dir)
    recipe = _rl_recipe(spec, ds, ps, out_dir, speculative=spec_on)
    steps: list[dict] = []
    collect, update = rl_mod.collect_batch, rl_mod.policy_update

    def timed_collect(*args, **kwargs):
        meter.mark("train_start")
        w0, c0 = time.perf_counter(), time.process_time()
        batch = collect(*args, **kwargs)
        s = batch.stats if isinstance(batch.stats, dict) else vars(batch.stats)  # a SamplingStats dataclass
        steps.append({"rollout_wall_s": time.perf_counter() - w0, "rollout_cpu_s": time.process_time() - c0,
                      "sample_groups_s": s["rollout_seconds"], "rollouts": s["rollouts"],
                      "tokens_generated": s["tokens_generated"], "decode_steps": s["decode_steps"],
                      "sampling_rounds": s["rounds"], "groups_sampled": s["groups"],
                      "zero_variance_groups": s["zero_variance_groups"], "prompts_skipped": s["prompts_skipped"],
                      "groups_kept": len(batch.rewards) // spec["group_size"],
                      "prompt_digest": _prompt_set_digest(batch.prompt_ids)})
        return batch

    def timed_update(*args, **kwargs):
        w0, c0 = time.perf_counter(), time.process_time()
        out = update(*args, **kwargs)
        u = out if isinstance(out, dict) else vars(out)  # an UpdateStats dataclass
        steps[-1].update({"update_wall_s": time.perf_counter() - w0, "update_cpu_s": time.process_time() - c0,
                          "sequences_trained": u["sequences_trained"], "tokens_trained": u["tokens_trained"],
                          "optimizer_step": u["sequences_trained"] > 0})
        return out

    rl_mod.collect_batch, rl_mod.policy_update = timed_collect, timed_update
    try:
        result = rl_mod.train_rl(recipe, quiet=True)
    finally:
        rl_mod.collect_batch, rl_mod.policy_update = collect, update
    meter.mark("train_end")
    metrics = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for st, m in zip(steps, metrics):  # leantune's own per-step wall time: collect + update + bookkeeping
        st.update({"update_total_wall_s": m["step_s"], "reward_mean": m["reward_mean"], "pass@1": m["pass@1"],
                   "completion_len": m["completion_len"]})
    roll = result.ledger["totals"]["rollouts"]
    return {
        "config": {"dynamic_sampling": ds, "prompt_selection": ps, "max_sampling_rounds": 3,
                   "speculative": _speculative_settings(spec["speculative"]) if spec_on else "off",
                   "early_stop": "eos, or the task's is_complete (answer closed)", "overlong_filter": True,
                   "malloc_mmap_threshold": recipe.train.malloc_mmap_threshold, "run_dir": out_dir,
                   "compute_dtype": recipe.model.compute_dtype},
        "steps": steps,
        "ledger_rollouts": roll,
        "final": _final_accuracy(result.model, result.tokenizer, spec),
    }


def trl_model(spec: dict):
    """(model, tokenizer, recipe) for TRL: the very same construction as leantune's, base in spec dtype + the
    SFT adapter, trainable."""
    import torch

    from leantune.adapters.lora import causal_lm
    from leantune.train.session import setup_model

    recipe = _rl_recipe(spec, False, False, str(Path(spec["work_dir"]) / "run-trl"))
    torch.manual_seed(0)
    model, tok, _, _, _ = setup_model(recipe, init=spec["sft_dir"])
    base = causal_lm(model)
    if getattr(base, "hf_quantizer", None) is not None:
        # GGUF weights are dequantized into plain tensors on load, but transformers keeps a GGUF "quantizer"
        # marker that makes Trainer refuse to train; leantune trains the same tensors as they are.
        base.hf_quantizer = None
        base.is_quantized = False
        if hasattr(base.config, "quantization_config"):
            del base.config.quantization_config
    return model, tok, recipe


def trl_dataset(spec: dict):
    """The prompts `prepare` wrote, in leantune_plain's order, as TRL conversational rows with the answer column."""
    from datasets import Dataset

    rows = [json.loads(line) for line in (Path(spec["work_dir"]) / "trl_prompts.jsonl").read_text().splitlines()]
    return Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                              for r in rows])


def grpo_args(spec: dict):
    """TRL's GRPOConfig for DAPO with the same settings as leantune's runners (see the module docstring)."""
    from trl import GRPOConfig

    g, pps, micro = spec["group_size"], spec["prompts_per_step"], spec["micro_batch"]
    return GRPOConfig(
        output_dir=str(Path(spec["work_dir"]) / "run-trl"),
        # one generation batch (pps prompts x G completions) per optimizer step, in micro-batches of `micro`
        per_device_train_batch_size=micro, gradient_accumulation_steps=pps * g // micro,
        num_generations=g, max_completion_length=spec["max_new_tokens"],
        temperature=1.0, top_p=1.0, top_k=0,
        loss_type="dapo", beta=0.0, epsilon=0.2, epsilon_high=0.28, scale_rewards="group",
        mask_truncated_completions=True, num_iterations=1,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, max_steps=spec["steps"],
        use_cpu=True, bf16=False, fp16=False,  # no autocast: the base already is in spec dtype, as in leantune
        gradient_checkpointing=False,  # TRL defaults to True (slower); leantune's run does not checkpoint either
        shuffle_dataset=False, seed=0, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, log_completions=False,
        generation_kwargs={"use_cache": True},
    )


def run_trl(spec: dict, meter: Meter) -> dict:
    import trl
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from leantune.adapters.lora import causal_lm
    from leantune.tasks import get_task

    model, tok, recipe = trl_model(spec)
    base = causal_lm(model)
    dataset, args = trl_dataset(spec), grpo_args(spec)
    decoder = base.get_decoder()
    gen = {"on": False, "prefill_tokens": 0, "row_steps": 0, "decode_calls": 0}

    def count(module, a, kw):
        ids = kw.get("input_ids", a[0] if a else None)
        if gen["on"] and ids is not None:
            if ids.shape[1] == 1:
                gen["row_steps"] += ids.shape[0]
                gen["decode_calls"] += 1
            else:
                gen["prefill_tokens"] += ids.numel()

    decoder.register_forward_pre_hook(count, with_kwargs=True)
    steps: list[dict] = []

    class Timed(GRPOTrainer):
        def _generate_single_turn(self, *a, **kw):
            gen.update(on=True, prefill_tokens=0, row_steps=0, decode_calls=0)
            w0 = time.perf_counter()
            try:
                completion_ids, logprobs = super()._generate_single_turn(*a, **kw)
            finally:
                gen["on"] = False
                gen["generate_s"] = time.perf_counter() - w0
            gen["lengths"] = [len(c) for c in completion_ids]  # cut after the first eos, eos included
            return completion_ids, logprobs

        def _generate_and_score_completions(self, inputs):
            meter.mark("train_start")
            w0, c0 = time.perf_counter(), time.process_time()
            out = super()._generate_and_score_completions(inputs)
            cm = out["completion_mask"]  # (N, T), truncated completions zeroed (mask_truncated_completions)
            adv = out["advantages"]
            steps.append({"rollout_wall_s": time.perf_counter() - w0, "rollout_cpu_s": time.process_time() - c0,
                          "generate_s": gen["generate_s"], "rollouts": int(cm.shape[0]),
                          "tokens_generated": sum(gen["lengths"]), "decode_steps": gen["decode_calls"],
                          "decode_row_steps": gen["row_steps"], "prefill_tokens": gen["prefill_tokens"],
                          "completion_width": int(cm.shape[1]),
                          "truncated_masked": int((cm.sum(1) == 0).sum()),
                          "rollouts_with_gradient": int(((adv != 0) & (cm.sum(1) > 0)).sum()),
                          "prompt_digest": _prompt_set_digest(_unpad(out["prompt_ids"], out["prompt_mask"]))})
            return out

    class Clock(TrainerCallback):
        def __init__(self):
            self.t, self.cpu = [], []

        def on_step_begin(self, args, state, control, **kw):
            if not self.t:
                self.t.append(time.perf_counter())
                self.cpu.append(time.process_time())

        def on_step_end(self, args, state, control, **kw):
            self.t.append(time.perf_counter())
            self.cpu.append(time.process_time())

    clock = Clock()
    reward = get_task(spec.get("task", TASK)).reward
    trainer = Timed(model=model, reward_funcs=[reward], args=args, train_dataset=dataset, processing_class=tok,
                    callbacks=[clock])
    trainer.train()
    meter.mark("train_end")
    logs = [h for h in trainer.state.log_history if "reward" in h]
    for i, st in enumerate(steps):
        st["update_total_wall_s"] = clock.t[i + 1] - clock.t[i]
        st["update_total_cpu_s"] = clock.cpu[i + 1] - clock.cpu[i]
        st["update_wall_s"] = st["update_total_wall_s"] - st["rollout_wall_s"]
        st["update_cpu_s"] = st["update_total_cpu_s"] - st["rollout_cpu_s"]
        st["sequences_trained"] = st["rollouts"]  # every rollout goes through forward + backward
        st["optimizer_step"] = True
        if i < len(logs):
            st["reward_mean"] = logs[i]["reward"]
            st["completion_len"] = logs[i].get("completions/mean_length")
            st["trl_step_time"] = logs[i].get("step_time")
            st["frac_reward_zero_std"] = logs[i].get("frac_reward_zero_std")
    model.eval()
    return {
        "config": {"trl_version": trl.__version__, "loss_type": args.loss_type, "scale_rewards": args.scale_rewards,
                   "epsilon": args.epsilon, "epsilon_high": args.epsilon_high, "beta": args.beta,
                   "mask_truncated_completions": args.mask_truncated_completions,
                   "generation_batch_size": args.generation_batch_size,
                   "steps_per_generation": args.steps_per_generation,
                   "per_device_train_batch_size": args.per_device_train_batch_size,
                   "gradient_accumulation_steps": args.gradient_accumulation_steps,
                   "gradient_checkpointing": args.gradient_checkpointing, "bf16": args.bf16,
                   "compute_dtype": recipe.model.compute_dtype,
                   "optim": str(args.optim), "generation": "model.generate (KV cache), until eos or max_completion_length"},
        "steps": steps,
        "final": _final_accuracy(trainer.model, tok, spec),
    }


def _unpad(ids, mask) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def child_main(spec_path: str, runners: dict | None = None) -> None:
    """Run the spec's runner in this (child) process and write its result JSON. ``runners``: name -> fn(spec,
    meter) -> dict, for other benchmarks on this harness (default: this one's; ``prepare`` is always there)."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    meter = Meter()
    out: dict = {"runner": spec["runner"], "pid": os.getpid(), "loadavg_before": loadavg()}
    t0 = time.perf_counter()
    try:
        if spec["runner"] == "prepare":
            out.update(prepare(spec, meter))
        elif runners is not None:
            out.update(runners[spec["runner"]](spec, meter))
        elif spec["runner"] == "trl":
            out.update(run_trl(spec, meter))
        else:
            out.update(run_leantune(spec, meter))
        out["status"] = "ok"
        from leantune.allocator import active

        out["malloc"] = active()
    except Exception as err:  # report, do not crash the whole benchmark
        import traceback

        traceback.print_exc(file=sys.stderr)
        out["status"] = "failed"
        out["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    out["wall_time_s"] = round(time.perf_counter() - t0, 1)
    out["loadavg_after"] = loadavg()
    out.update(meter.stop())
    Path(spec["result_path"]).write_text(json.dumps(out))


# ================================================================================================
# Parent side


def run_child(spec: dict, timeout_s: float, script: str | None = None) -> dict:
    """Run ``script --_child SPEC`` (default: this file) for ``spec["runner"]``; its result JSON, or a failure."""
    spec_path = Path(spec["work_dir"]) / f"spec-{spec['runner']}.json"
    spec["result_path"] = str(Path(spec["work_dir"]) / f"result-{spec['runner']}.json")
    Path(spec["result_path"]).unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(spec["threads"]),
               MKL_NUM_THREADS=str(spec["threads"]), PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", PYTHONWARNINGS="ignore")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if spec["runner"] != "prepare":  # leantune runners on its train.allocator; TRL as its users run it
        from leantune.allocator import preload_env

        env = preload_env(spec["peer_allocator"] if spec["runner"] == "trl" else spec["allocator"], base=env)
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(script or __file__), "--_child", str(spec_path)],
                              stdout=sys.stderr, stderr=sys.stderr, env=env, timeout=timeout_s)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        return {"runner": spec["runner"], "status": "failed", "error": f"timeout after {timeout_s:.0f}s"}
    path = Path(spec["result_path"])
    if not path.exists():
        return {"runner": spec["runner"], "status": "failed",
                "error": f"child exited with code {rc} without a result (killed? out of memory?)"}
    return json.loads(path.read_text())


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(res: dict) -> dict:
    """Per-runner totals from the per-update rows."""
    if res.get("status") != "ok":
        return res
    st = res["steps"]
    upd = [s["update_total_wall_s"] for s in st]
    cpu = [s.get("update_total_cpu_s", s["rollout_cpu_s"] + s.get("update_cpu_s", 0.0)) for s in st]
    s = {
        "updates": len(st),
        "optimizer_steps": sum(bool(x.get("optimizer_step")) for x in st),
        "time_per_update_s": _mean(upd),
        "time_per_update_s_excl_first": _mean(upd[1:]) if len(upd) > 1 else _mean(upd),
        "total_update_time_s": sum(upd),
        "cpu_s_per_update": _mean(cpu),
        "rollout_s_total": sum(x["rollout_wall_s"] for x in st),
        "policy_update_s_total": sum(x["update_wall_s"] for x in st),
        "rollout_share": sum(x["rollout_wall_s"] for x in st) / max(sum(upd), 1e-9),
        "tokens_generated": sum(x["tokens_generated"] for x in st),
        "decode_row_steps": sum(x.get("decode_row_steps", x["tokens_generated"]) for x in st),
        "rollouts_generated": sum(x["rollouts"] for x in st),
        "rollouts_trained": sum(x["sequences_trained"] for x in st),
        "rollouts_with_gradient": sum(x.get("rollouts_with_gradient", x["sequences_trained"]) for x in st),
        "reward_mean_per_update": [round(x["reward_mean"], 4) if x.get("reward_mean") is not None else None for x in st],
        "final_accuracy": res["final"]["accuracy"],
    }
    res["summary"] = s
    return res


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def compare(runs: dict, start_accuracy: float | None) -> dict:
    ok = {k: v for k, v in runs.items() if v.get("status") == "ok"}
    out: dict = {"start_accuracy": start_accuracy}
    trl = ok.get("trl")
    for name, run in ok.items():
        if name == "trl" or trl is None:
            continue
        a, b = run["summary"], trl["summary"]
        ratio = _ratio(b["time_per_update_s"], a["time_per_update_s"])
        acc_ok = a["final_accuracy"] >= b["final_accuracy"]
        out[name] = {
            "trl_over_leantune_time_per_update": ratio,
            "trl_over_leantune_time_per_update_excl_first": _ratio(b["time_per_update_s_excl_first"],
                                                                   a["time_per_update_s_excl_first"]),
            "trl_over_leantune_cpu_s_per_update": _ratio(b["cpu_s_per_update"], a["cpu_s_per_update"]),
            "trl_over_leantune_rollout_s": _ratio(b["rollout_s_total"], a["rollout_s_total"]),
            "trl_over_leantune_policy_update_s": _ratio(b["policy_update_s_total"], a["policy_update_s_total"]),
            "accuracy_leantune_minus_trl": round(a["final_accuracy"] - b["final_accuracy"], 4),
            "meets_target": bool(ratio is not None and ratio >= TARGETS["trl_time_per_update_over_leantune_min"] and acc_ok),
        }
        if name == "leantune_plain":  # same prompts in every update?
            pa = [s["prompt_digest"] for s in run["steps"]]
            pb = [s["prompt_digest"] for s in trl["steps"]]
            out[name]["same_prompts_as_trl_every_update"] = pa == pb
    if "leantune" in ok and "leantune_spec" in ok:  # the rollout phase alone, plain vs speculative sampling
        a, b = ok["leantune"]["summary"], ok["leantune_spec"]["summary"]
        roll = ok["leantune_spec"].get("ledger_rollouts") or {}
        out["speculative_rollouts"] = {
            "setting": ok["leantune_spec"]["config"]["speculative"],
            "rollout_s_plain_over_speculative": _ratio(a["rollout_s_total"], b["rollout_s_total"]),
            "rollout_s_per_token_plain_over_speculative": _ratio(a["rollout_s_total"] / max(a["tokens_generated"], 1),
                                                                 b["rollout_s_total"] / max(b["tokens_generated"], 1)),
            "acceptance_rate": roll.get("acceptance_rate"), "tokens_per_forward": roll.get("tokens_per_forward"),
            "note": "same seeds and settings as the `leantune` runner; bf16 rounding lets completions differ, so "
                    "the per-token ratio is the comparable one",
        }
    signal = {k: v["summary"]["rollouts_with_gradient"] for k, v in ok.items()}
    if signal and not any(signal.values()):
        out["warning"] = ("no rollout carried a learning signal (every group's rewards were equal): the runs did no "
                          "real policy update, so the time ratios compare rollouts only")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout (logs go to stderr)")
    p.add_argument("--quick", action="store_true", help="tiny random 2-layer model, 3 updates: a smoke check")
    p.add_argument("--steps", type=int, default=None, help="policy updates (optimizer steps) per runner (8; quick 3)")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--prompts-per-step", type=int, default=None, help="prompt groups per update (8; quick 4)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward in the update")
    p.add_argument("--max-new-tokens", type=int, default=48, help="completion budget (TRL max_completion_length)")
    p.add_argument("--lr", type=float, default=1e-4, help="constant learning rate (recipes/rl_smollm2_addition.yaml)")
    p.add_argument("--num-prompts", type=int, default=512, help="training prompt pool (rl.num_prompts)")
    p.add_argument("--sft-steps", type=int, default=None, help="SFT steps of the shared starting adapter (20; quick 40)")
    p.add_argument("--eval-problems", type=int, default=None, help="held-out problems, greedy (200; quick 20)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default=None,
                   help="base weights dtype in both runners (auto, the recipes' choice: bfloat16 where this machine "
                   "runs it faster, else float32; quick float32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per runner (1: fair on a shared box)")
    p.add_argument("--only", action="append", default=[],
                   help=f"runners to run, comma-separated (default {','.join(DEFAULT_RUNNERS)}; also "
                   f"{','.join(v for v in VARIANTS if v not in DEFAULT_RUNNERS)})")
    p.add_argument("--speculative", default="prompt_lookup",
                   help="the leantune_spec runner's rl.speculative: prompt_lookup, or draft:SOURCE "
                   "(rl.speculative_draft, e.g. draft:layers:8)")
    p.add_argument("--allocator", default="auto", choices=["auto", "system", "jemalloc", "tbbmalloc"],
                   help="malloc of the leantune runners, as train.allocator picks it for the leantune command "
                   "(default auto: jemalloc if installed, else tbbmalloc)")
    p.add_argument("--peer-allocator", default="system", choices=["auto", "system", "jemalloc", "tbbmalloc"],
                   help="malloc of the TRL runner (default: the system's, as its users run it)")
    p.add_argument("--timeout", type=float, default=7200, help="seconds per runner before it is killed")
    p.add_argument("--work-dir", default=None,
                   help="data, the cached SFT adapter and run directories (default runs/bench_rl_vs_trl[_quick])")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 8)
    args.prompts_per_step = args.prompts_per_step or (4 if args.quick else 8)
    args.sft_steps = args.sft_steps or (40 if args.quick else 20)
    args.eval_problems = args.eval_problems or (20 if args.quick else 200)
    args.dtype = args.dtype or ("float32" if args.quick else "auto")
    if (args.prompts_per_step * args.group_size) % args.micro_batch:
        p.error("--micro-batch must divide prompts-per-step x group-size (TRL's accumulation needs it)")
    return args


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "leantune"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    here = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "leantune"], cwd=here, capture_output=True, text=True)
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
    wanted = [w.strip() for item in args.only for w in item.split(",") if w.strip()] or DEFAULT_RUNNERS
    bad = [w for w in wanted if w != "trl" and w not in VARIANTS]
    if bad:
        raise SystemExit(f"--only: unknown runner(s) {bad}; runners: {', '.join([*VARIANTS, 'trl'])}")
    work = Path(args.work_dir or f"runs/bench_rl_vs_trl{'_quick' if args.quick else ''}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = {"work_dir": str(work), "quick": args.quick, "steps": args.steps, "group_size": args.group_size,
            "prompts_per_step": args.prompts_per_step, "micro_batch": args.micro_batch,
            "max_new_tokens": args.max_new_tokens, "lr": args.lr, "num_prompts": args.num_prompts,
            "sft_steps": args.sft_steps, "eval_problems": args.eval_problems, "dtype": args.dtype,
            "threads": args.threads, "tiny_dir": str(work / "tiny-model"), "sft_dir": str(work / "sft"),
            "allocator": args.allocator, "peer_allocator": args.peer_allocator, "speculative": args.speculative}
    t_start, load_start = time.perf_counter(), loadavg()
    log(f"work dir {work}; runners {wanted}; load {load_start}")
    prep = run_child({**base, "runner": "prepare"}, args.timeout)
    if prep.get("status") != "ok":
        log(f"preparation failed: {prep.get('error')}")
        print(json.dumps({"status": "failed", "stage": "prepare", "error": prep.get("error")}))
        return 1
    log(f"SFT start: accuracy {prep['sft']['accuracy']:.2f} ({prep['sft']['correct']}/{prep['sft']['problems']})")
    runs: dict[str, dict] = {}
    for name in wanted:
        log(f"--- {name} (load {loadavg()})")
        runs[name] = summarize(run_child({**base, "runner": name}, args.timeout))
        r = runs[name]
        if r.get("status") == "ok":
            s = r["summary"]
            log(f"{name}: {s['time_per_update_s']:.1f} s/update (rollout share {s['rollout_share']:.2f}), "
                f"{s['rollouts_generated']} rollouts, {s['rollouts_trained']} trained, "
                f"accuracy {s['final_accuracy']:.2f}, malloc {r.get('malloc')}, contention {r.get('contention')}")
        else:
            log(f"{name}: {r.get('status')}: {r.get('error')}")
    result = {
        "benchmark": "rl_vs_trl",
        "mode": "quick" if args.quick else "full",
        "model": "tiny random (leantune.models.tiny, 2 layers, hidden 64)" if args.quick
        else f"{MODEL_BUILTIN} (GGUF dequantized, {args.dtype})",
        "settings": {k: base[k] for k in ("steps", "group_size", "prompts_per_step", "micro_batch", "max_new_tokens",
                                          "lr", "num_prompts", "eval_problems", "dtype", "threads",
                                          "allocator", "peer_allocator", "speculative")}
        | {"task": TASK, "loss": "dapo (token-level, eps 0.2/0.28, no KL)", "advantage": "group-normalized (std)",
           "temperature": 1.0, "optimizer": "AdamW(0.9, 0.999, eps 1e-8, wd 0), constant lr, clip 1.0",
           "start": "the cached SFT adapter, trainable", "sft_steps": args.sft_steps},
        "sft": prep["sft"],
        "machine": {"cpu": cpu_summary(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "loadavg_start": load_start, "loadavg_end": loadavg()},
        "load_during_runs": {k: {"loadavg_before": v.get("loadavg_before"), "loadavg_after": v.get("loadavg_after"),
                                 **(v.get("contention") or {})} for k, v in runs.items()},
        "versions": _versions(),
        "runs": runs,
        "comparison": compare(runs, prep["sft"]["accuracy"]),
        "targets": TARGETS,
        "total_wall_time_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0 if all(r.get("status") == "ok" for r in runs.values()) else 1


def format_table(result: dict) -> str:
    lines = [f"{'runner':16s} {'s/update':>9s} {'rollout s':>10s} {'update s':>9s} {'rollouts':>9s} {'trained':>8s} "
             f"{'tokens':>7s} {'acc':>5s}"]
    for name, r in result["runs"].items():
        if r.get("status") != "ok":
            lines.append(f"{name:16s} {r.get('status')}: {r.get('error')}")
            continue
        s = r["summary"]
        lines.append(f"{name:16s} {s['time_per_update_s']:9.1f} {s['rollout_s_total']:10.1f} "
                     f"{s['policy_update_s_total']:9.1f} {s['rollouts_generated']:9d} {s['rollouts_trained']:8d} "
                     f"{s['tokens_generated']:7d} {s['final_accuracy']:5.2f}")
    lines.append(json.dumps(result["comparison"], indent=2))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
