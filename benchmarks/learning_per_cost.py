#!/usr/bin/env python
"""Learning per CPU-second on Countdown: held-out accuracy against training CPU-seconds for three RL arms
that start from the same SFT adapter.

Arms (``--only NAME[,NAME...]``), each its own subprocess:

- ``leantune_router``: leantune DAPO with dynamic sampling, prompt selection and difficulty routing
  (``rl.router``, its settings read from ``recipes/rl_countdown_router.yaml``);
- ``leantune_plain``: leantune plain DAPO: one sampling round, no prompt selection, no router;
- ``trl``: ``trl.GRPOTrainer(loss_type="dapo")``, set up as in ``benchmarks/rl_vs_trl.py`` (the same model
  construction, bf16/dtype handling and GRPOConfig; TRL walks leantune_plain's prompts in order).

The shared settings are the ones rl_vs_trl.py uses: the same base and SFT LoRA adapter (trained once with
``leantune train recipes/sft_countdown.yaml train.steps=N`` and cached), prompt pool, group size, prompts per
update, completion budget, temperature 1, learning rate, AdamW, micro-batch, dtype, seed, torch threads, and
the plain task verifier (``rl.rewards: {task: 1.0}``) as the reward in all three arms.

**What is measured.** Each arm trains until its *training CPU-seconds* reach ``--cpu-budget`` (checked after
every update) or it has done ``--max-updates`` updates. Training CPU-seconds are the child process's CPU
time (``time.process_time()``: user + system of every thread, the meter rl_vs_trl.py uses) from the start of
the first update, *minus* the CPU time of the evaluations. Every ``--eval-every`` updates, and after the
last one, the arm evaluates greedy held-out accuracy (``leantune.eval.evaluate.task_accuracy``) on the same
``--eval-problems`` test problems; the SFT start's accuracy is the point at 0 CPU-seconds of every curve. TRL
is evaluated at the same update counts by a ``TrainerCallback`` (``on_step_end``; stops at the budget through
``control.should_training_stop``).

Output: ``OUT.json`` (curves, accuracy at equal CPU-seconds by linear interpolation between measured points,
the CPU-seconds at which each leantune arm first *measures* TRL's final accuracy, its ratio to TRL's total,
and whether the issue's target, ratio <= 1/2, is met), ``OUT.png`` (accuracy against CPU-seconds, one line
per arm), the CPU model and flags (`leantune.compute.cpu_summary`) and load averages.

    # smoke check: tiny random model (accuracy 0 is expected), under a minute on 2 busy cores
    HF_HUB_OFFLINE=1 python benchmarks/learning_per_cost.py --quick --out lpc_quick
    # the measurement (SmolLM2-135M-Instruct), = --cpu-budget 5400 --max-updates 200 --eval-every 4
    # --eval-problems 100 --sft-steps 100 --threads 1; --parallel 3 runs the arms at once. The first run
    # (2026-12-06) used --cpu-budget 2400 --eval-problems 64 --parallel 3: 88 min wall (docs/learning_per_cost.md)
    HF_HUB_OFFLINE=1 python benchmarks/learning_per_cost.py --out lpc

Logs go to stderr; ``--json`` also prints the JSON object to stdout. The parent never imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's leantune
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks
import rl_vs_trl as rlvt  # noqa: E402  (the child harness, Meter, prepare, the TRL setup; no torch at import)

from leantune.compute import cpu_summary  # noqa: E402

TASK = "countdown"
SFT_RECIPE = "sft_countdown.yaml"
ROUTER_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "rl_countdown_router.yaml"
ARMS = ["leantune_router", "leantune_plain", "trl"]
LEANTUNE_ARMS = {"leantune_router": (True, True, True), "leantune_plain": (False, False, False)}
"""arm -> (dynamic_sampling, prompt_selection, router)"""
TARGET_RATIO = 0.5
TARGET = ("leantune reaches TRL's final held-out accuracy in <= 1/2 of TRL's training CPU-seconds (issue 15); "
          "a leantune arm's time is its first evaluation at or above TRL's final accuracy")


def log(*args) -> None:
    print("[learning_per_cost]", *args, file=sys.stderr, flush=True)


# ================================================================================================
# Pure pieces (tested in tests/test_learning_per_cost.py)


def accuracy_at(points: list[tuple[float, float]], cpu_s: float) -> float | None:
    """Accuracy at ``cpu_s`` by linear interpolation between measured (cpu_s, accuracy) points, sorted by
    cpu_s; None outside the measured range (no extrapolation)."""
    if not points or cpu_s < points[0][0] or cpu_s > points[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= cpu_s <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (cpu_s - x0) / (x1 - x0)
    return points[-1][1]  # a single point, at cpu_s


def first_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """CPU-seconds of the first measured point with accuracy >= ``target`` (not interpolated: accuracy is only
    known where it was measured); None if no point reaches it."""
    for x, y in points:
        if y >= target - 1e-12:
            return x
    return None


def cpu_grid(curves: dict[str, list[tuple[float, float]]], n: int = 8) -> list[float]:
    """``n`` evenly spaced CPU-seconds from 0 to the longest curve's end (the table's columns)."""
    end = max((pts[-1][0] for pts in curves.values() if pts), default=0.0)
    return [round(end * i / (n - 1), 1) for i in range(n)] if end > 0 else [0.0]


def compare(curves: dict[str, list[tuple[float, float]]], n_grid: int = 8) -> dict:
    """Accuracy at equal CPU-seconds, and each leantune arm's CPU-seconds to TRL's final accuracy against TRL's
    total. ``curves``: arm -> sorted (training CPU-seconds, accuracy) points, the start (0, acc0) first."""
    grid = cpu_grid(curves, n_grid)
    out: dict = {"cpu_s_grid": grid,
                 "accuracy_at_cpu_s": {arm: [accuracy_at(pts, x) for x in grid] for arm, pts in curves.items()},
                 "final": {arm: {"cpu_s": pts[-1][0], "accuracy": pts[-1][1]} for arm, pts in curves.items() if pts}}
    trl = curves.get("trl")
    if not trl:
        out["target"] = {"met": None, "why": "no TRL curve"}
        return out
    trl_cpu, trl_acc, start = trl[-1][0], trl[-1][1], trl[0][1]
    # leantune's accuracy at TRL's own CPU-seconds
    out["accuracy_at_trl_total_cpu_s"] = {arm: accuracy_at(pts, trl_cpu) for arm, pts in curves.items()}
    reach = {}
    for arm, pts in curves.items():
        if arm == "trl":
            continue
        x = first_reach(pts, trl_acc)
        reach[arm] = {"cpu_s": x, "ratio_to_trl_total": round(x / trl_cpu, 4) if x is not None and trl_cpu > 0 else None}
    out["reach_trl_final_accuracy"] = reach
    if trl_acc <= start:
        out["target"] = {"met": None, "trl_final_accuracy": trl_acc, "start_accuracy": start,
                         "why": "TRL ended at or below the start's accuracy: every arm 'reaches' it at 0 CPU-seconds, "
                                "so the target says nothing here"}
        return out
    ratios = {arm: r["ratio_to_trl_total"] for arm, r in reach.items()}
    best = min((r for r in ratios.values() if r is not None), default=None)
    out["target"] = {"met": best is not None and best <= TARGET_RATIO, "best_ratio": best, "ratios": ratios,
                     "trl_final_accuracy": trl_acc, "trl_total_cpu_s": trl_cpu, "start_accuracy": start,
                     "max_ratio": TARGET_RATIO}
    return out


# ================================================================================================
# Child side


class Curve:
    """Training CPU-seconds (this process, every thread; evaluations excluded) and held-out accuracy at every
    ``eval_every``-th update and at the last one."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.points: list[dict] = []
        self.start_cpu = self.start_wall = None
        self.eval_cpu = self.eval_wall = 0.0
        self.updates = 0

    def begin(self) -> None:
        if self.start_cpu is None:
            self.start_cpu, self.start_wall = time.process_time(), time.perf_counter()

    def train_cpu_s(self) -> float:
        return time.process_time() - self.start_cpu - self.eval_cpu

    def after_update(self, model, tokenizer, extra: dict | None = None) -> bool:
        """Count one update; evaluate when due. True when the arm must stop (budget or max updates)."""
        from leantune.eval.evaluate import task_accuracy

        self.updates += 1
        cpu = self.train_cpu_s()
        wall = time.perf_counter() - self.start_wall - self.eval_wall
        budget = self.spec["cpu_budget"]
        done = self.updates >= self.spec["steps"] or (budget is not None and cpu >= budget)
        if done or self.updates % self.spec["eval_every"] == 0:
            c0, w0 = time.process_time(), time.perf_counter()
            acc = task_accuracy(model, tokenizer, TASK, num_problems=self.spec["eval_problems"],
                                max_new_tokens=self.spec["max_new_tokens"])
            eval_cpu = time.process_time() - c0
            self.eval_cpu += eval_cpu
            self.eval_wall += time.perf_counter() - w0
            self.points.append({"update": self.updates, "train_cpu_s": round(cpu, 2), "train_wall_s": round(wall, 2),
                                "accuracy": acc["accuracy"], "correct": acc["correct"],
                                "eval_cpu_s": round(eval_cpu, 2), **(extra or {})})
            log(f"{self.spec['runner']}: update {self.updates}, {cpu:.1f} training CPU-s, accuracy {acc['accuracy']:.3f}")
        return done

    def result(self) -> dict:
        return {"points": self.points, "updates": self.updates,
                "train_cpu_s": round(self.train_cpu_s(), 2) if self.start_cpu is not None else None,
                "eval_cpu_s_total": round(self.eval_cpu, 2)}


class BudgetReached(Exception):
    """Raised after the update at which a leantune arm's training CPU-seconds pass the budget."""


SAMPLING_TOTALS = ("rollouts", "tokens_generated", "rounds", "groups", "zero_variance_groups", "prompts_skipped",
                   "router_prompts", "router_skipped", "router_rollouts_saved", "router_brier_sum", "router_brier_n")
"""SamplingStats fields a leantune arm sums over its updates (the ledger's totals are not written when the
budget stops the run)."""


def router_settings(spec: dict) -> dict:
    """rl.router of the shipped recipe; ``--quick`` shortens its warm-up so the router acts in a few updates."""
    import yaml

    router = dict(yaml.safe_load(ROUTER_RECIPE.read_text())["rl"]["router"])
    if spec["quick"]:
        router["warmup_prompts"] = 2 * spec["prompts_per_step"]
    return router


def arm_recipe(spec: dict, out_dir: str):
    """rl_vs_trl's recipe (settings shared with TRL) with this arm's switches."""
    from leantune.config import Recipe

    ds, ps, router = LEANTUNE_ARMS[spec["runner"]]
    base = rlvt._rl_recipe(spec, ds, ps, out_dir)
    raw = base.model_dump(mode="json", exclude_unset=True)
    raw["rl"]["router"] = router_settings(spec) if router else {"enabled": False}
    return Recipe.model_validate(raw)


def run_leantune_curve(spec: dict, meter) -> dict:
    """`train_rl` as shipped; updates are counted and evaluated by wrapping (not changing) its
    collect_batch / policy_update, as rl_vs_trl.py does. The CPU budget ends the run by an exception out of
    the update wrapper (the session may swap in its own recipe, e.g. its activation-checkpointing choice, so
    lowering train.steps from here would not reach its loop)."""
    import shutil

    import leantune.train.rl as rl_mod

    out_dir = Path(spec["work_dir"]) / f"run-{spec['runner']}"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    recipe = arm_recipe(spec, str(out_dir))
    curve, seen, totals = Curve(spec), {}, {}
    collect, update = rl_mod.collect_batch, rl_mod.policy_update

    def counted_collect(sampler, *args, **kwargs):
        meter.mark("train_start")
        curve.begin()
        seen["tokenizer"] = sampler.tokenizer
        batch = collect(sampler, *args, **kwargs)
        s = vars(batch.stats)
        seen["step"] = {k: s.get(k) for k in ("rollouts", "tokens_generated")}
        for k in SAMPLING_TOTALS:
            totals[k] = totals.get(k, 0) + s.get(k, 0)
        return batch

    def counted_update(model, *args, **kwargs):
        out = update(model, *args, **kwargs)
        seen["rollouts"] = seen.get("rollouts", 0) + seen["step"]["rollouts"]
        seen["tokens"] = seen.get("tokens", 0) + seen["step"]["tokens_generated"]
        u = out if isinstance(out, dict) else vars(out)  # an UpdateStats dataclass
        seen["trained"] = seen.get("trained", 0) + u["sequences_trained"]  # rollouts with a nonzero advantage
        extra = {"rollouts": seen["rollouts"], "rollouts_trained": seen["trained"], "tokens_generated": seen["tokens"]}
        if curve.after_update(model, seen["tokenizer"], extra) and curve.updates < spec["steps"]:
            raise BudgetReached  # out of train_rl: no export, no ledger (the sampling totals are summed here)
        return out

    rl_mod.collect_batch, rl_mod.policy_update = counted_collect, counted_update
    stopped = "max_updates"
    try:
        rl_mod.train_rl(recipe, quiet=True)
    except BudgetReached:
        stopped = "cpu_budget"
    finally:
        rl_mod.collect_batch, rl_mod.policy_update = collect, update
    meter.mark("train_end")
    ds, ps, _ = LEANTUNE_ARMS[spec["runner"]]
    return {"config": {"dynamic_sampling": ds, "prompt_selection": ps, "router": recipe.rl.router.model_dump(),
                       "compute_dtype": recipe.model.compute_dtype, "run_dir": str(out_dir)},
            "stopped_by": stopped, "sampling_totals": totals, "curve": curve.result()}


def run_trl_curve(spec: dict, meter) -> dict:
    """TRL GRPOTrainer as rl_vs_trl.py sets it up, evaluated at the same update counts by a callback."""
    import trl
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from leantune.tasks import get_task

    model, tok, recipe = rlvt.trl_model(spec)
    curve = Curve(spec)
    done = {"rollouts": 0}

    class EvaluateEvery(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            meter.mark("train_start")
            curve.begin()

        def on_step_end(self, args, state, control, **kw):
            done["rollouts"] += spec["prompts_per_step"] * spec["group_size"]
            if curve.after_update(model, tok, {"rollouts": done["rollouts"]}):
                control.should_training_stop = True
            return control

    args = rlvt.grpo_args(spec)
    trainer = GRPOTrainer(model=model, reward_funcs=[get_task(TASK).reward], args=args,
                          train_dataset=rlvt.trl_dataset(spec), processing_class=tok, callbacks=[EvaluateEvery()])
    trainer.train()
    meter.mark("train_end")
    return {"config": {"trl_version": trl.__version__, "loss_type": args.loss_type, "bf16": args.bf16,
                       "compute_dtype": recipe.model.compute_dtype, "gradient_checkpointing": args.gradient_checkpointing,
                       "gradient_accumulation_steps": args.gradient_accumulation_steps,
                       "per_device_train_batch_size": args.per_device_train_batch_size},
            "stopped_by": "cpu_budget" if curve.updates < spec["steps"] else "max_updates", "curve": curve.result()}


def learning_signal(runs: dict) -> dict:
    """A warning when no leantune arm trained a single rollout (every group's rewards equal: no gradient)."""
    trained = {arm: r["curve"]["points"][-1].get("rollouts_trained") for arm, r in runs.items()
               if r.get("status") == "ok" and arm in LEANTUNE_ARMS and r["curve"]["points"]}
    if trained and not any(trained.values()):
        return {"warning": "no rollout carried a learning signal (every group's rewards were equal): no arm's policy "
                           "moved, so the curves compare the cost of rollouts only"}
    return {}


RUNNERS = {"leantune_router": run_leantune_curve, "leantune_plain": run_leantune_curve, "trl": run_trl_curve}


# ================================================================================================
# Parent side


def curve_points(run: dict, start_accuracy: float) -> list[tuple[float, float]]:
    """(training CPU-seconds, accuracy) of one arm, the SFT start at 0 first."""
    return [(0.0, start_accuracy)] + [(p["train_cpu_s"], p["accuracy"]) for p in run["curve"]["points"]]


def plot(curves: dict[str, list[tuple[float, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, pts in curves.items():
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=arm)
    if curves.get("trl"):
        ax.axhline(curves["trl"][-1][1], color="grey", linestyle=":", linewidth=1, label="TRL final accuracy")
        ax.axvline(TARGET_RATIO * curves["trl"][-1][0], color="grey", linestyle="--", linewidth=1,
                   label="1/2 of TRL's CPU-seconds")
    ax.set_xlabel("training CPU-seconds (process time, evaluation excluded)")
    top = max((y for pts in curves.values() for _, y in pts), default=0.0)
    ax.set_ylim(-0.02, min(1.02, max(0.1, top + 0.05)))
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random 2-layer model, a few updates: a smoke check")
    p.add_argument("--json", action="store_true", help="also print the JSON object to stdout")
    p.add_argument("--out", default="learning_per_cost", help="writes OUT.json and OUT.png")
    p.add_argument("--cpu-budget", type=float, default=None,
                   help="training CPU-seconds per arm, evaluation excluded (5400; quick none); 0: --max-updates alone")
    p.add_argument("--max-updates", type=int, default=None, help="most policy updates per arm, a safety cap: the budget should bind first (200; quick 6)")
    p.add_argument("--eval-every", type=int, default=None, help="updates between evaluations (4; quick 2)")
    p.add_argument("--eval-problems", type=int, default=None, help="held-out problems, greedy (100; quick 8)")
    p.add_argument("--group-size", type=int, default=None, help="completions per prompt (8; quick 4)")
    p.add_argument("--prompts-per-step", type=int, default=None, help="prompt groups per update (4; quick 2)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="completion budget, rollouts and evaluation (160 as recipes/rl_countdown.yaml; quick 16)")
    p.add_argument("--lr", type=float, default=None, help="constant learning rate (1e-4; quick 1e-2)")
    p.add_argument("--num-prompts", type=int, default=512, help="training prompt pool (rl.num_prompts)")
    p.add_argument("--sft-steps", type=int, default=None, help="steps of the shared SFT start (100; quick 10)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default=None,
                   help="base weights dtype, every arm (auto, as the recipes; quick float32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per arm")
    p.add_argument("--parallel", type=int, default=1,
                   help="arms run at once (1: one after another). With N > 1 they share the cores; CPU-seconds "
                        "stay comparable because every arm runs beside the others, and each arm's contention "
                        "is recorded")
    p.add_argument("--prep-threads", type=int, default=None,
                   help="torch threads for the shared SFT start (default: --threads); its time is not compared")
    p.add_argument("--only", default=",".join(ARMS), help=f"arms, comma-separated (default {','.join(ARMS)})")
    p.add_argument("--allocator", default="auto", choices=["auto", "system", "jemalloc", "tbbmalloc"],
                   help="malloc of the leantune arms (train.allocator's choice)")
    p.add_argument("--peer-allocator", default="system", choices=["auto", "system", "jemalloc", "tbbmalloc"],
                   help="malloc of the TRL arm (the system's, as its users run it)")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per arm before it is killed")
    p.add_argument("--work-dir", default=None, help="data, the cached SFT adapter, run directories "
                   "(default runs/bench_learning_per_cost[_quick])")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    q = a.quick
    a.cpu_budget = (None if q else 5400.0) if a.cpu_budget is None else (a.cpu_budget or None)
    a.max_updates = a.max_updates or (6 if q else 200)
    a.eval_every = a.eval_every or (2 if q else 4)
    a.eval_problems = a.eval_problems or (8 if q else 100)
    a.group_size = a.group_size or (4 if q else 8)
    a.prompts_per_step = a.prompts_per_step or (2 if q else 4)
    a.max_new_tokens = a.max_new_tokens or (16 if q else 160)
    a.lr = a.lr or (1e-2 if q else 1e-4)
    a.sft_steps = a.sft_steps or (10 if q else 100)
    a.dtype = a.dtype or ("float32" if q else "auto")
    if (a.prompts_per_step * a.group_size) % a.micro_batch:
        p.error("--micro-batch must divide prompts-per-step x group-size (TRL's accumulation needs it)")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a._child:
        rlvt.child_main(a._child, RUNNERS)
        return 0
    os.environ["HF_HUB_OFFLINE"] = "1"
    arms = [x.strip() for x in a.only.split(",") if x.strip()]
    bad = [x for x in arms if x not in RUNNERS]
    if bad:
        raise SystemExit(f"--only: unknown arm(s) {bad}; arms: {', '.join(ARMS)}")
    work = Path(a.work_dir or f"runs/bench_learning_per_cost{'_quick' if a.quick else ''}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = {"work_dir": str(work), "quick": a.quick, "task": TASK, "sft_recipe": SFT_RECIPE, "steps": a.max_updates,
            "cpu_budget": a.cpu_budget, "eval_every": a.eval_every, "group_size": a.group_size,
            "prompts_per_step": a.prompts_per_step, "micro_batch": a.micro_batch, "max_new_tokens": a.max_new_tokens,
            "lr": a.lr, "num_prompts": a.num_prompts, "sft_steps": a.sft_steps, "eval_problems": a.eval_problems,
            "dtype": a.dtype, "threads": a.threads, "tiny_dir": str(work / "tiny-model"), "sft_dir": str(work / "sft"),
            "allocator": a.allocator, "peer_allocator": a.peer_allocator, "speculative": "off"}
    script = os.path.abspath(__file__)
    t0, load0 = time.perf_counter(), rlvt.loadavg()
    log(f"work dir {work}; arms {arms}; load {load0}")
    prep = rlvt.run_child({**base, "runner": "prepare", "threads": a.prep_threads or a.threads}, a.timeout,
                          script=script)
    if prep.get("status") != "ok":
        log(f"preparation failed: {prep.get('error')}")
        print(json.dumps({"status": "failed", "stage": "prepare", "error": prep.get("error")}))
        return 1
    start = prep["sft"]["accuracy"]
    log(f"SFT start: accuracy {start:.3f} ({prep['sft']['correct']}/{prep['sft']['problems']})")

    def run_arm(arm: str) -> dict:
        log(f"--- {arm} (load {rlvt.loadavg()})")
        r = rlvt.run_child({**base, "runner": arm}, a.timeout, script=script)
        if r.get("status") == "ok":
            c = r["curve"]
            log(f"{arm}: {c['updates']} updates, {c['train_cpu_s']:.1f} training CPU-s, final accuracy "
                f"{c['points'][-1]['accuracy']:.3f}, stopped by {r['stopped_by']}")
        else:
            log(f"{arm}: {r.get('status')}: {r.get('error')}")
        return r

    with ThreadPoolExecutor(max_workers=max(1, a.parallel)) as pool:  # each arm is its own subprocess
        runs: dict[str, dict] = dict(zip(arms, pool.map(run_arm, arms)))
    curves = {arm: curve_points(r, start) for arm, r in runs.items() if r.get("status") == "ok"}
    model = ("tiny random (leantune.models.tiny, 2 layers, hidden 64)" if a.quick
             else f"{rlvt.MODEL_BUILTIN} (GGUF dequantized, {a.dtype})")
    result = {
        "benchmark": "learning_per_cost",
        "mode": "quick" if a.quick else "full",
        "task": TASK,
        "model": model,
        "settings": {k: base[k] for k in ("steps", "cpu_budget", "eval_every", "group_size", "prompts_per_step",
                                          "micro_batch", "max_new_tokens", "lr", "num_prompts", "sft_steps",
                                          "eval_problems", "dtype", "threads", "allocator", "peer_allocator")}
        | {"parallel_arms": a.parallel, "prep_threads": a.prep_threads or a.threads}
        | {"reward": "the task verifier ({task: 1.0}) in every arm", "loss": "dapo (token-level, eps 0.2/0.28, no KL)",
           "cpu_meter": "time.process_time() of the arm's process (all threads), from its first update, "
                        "evaluation excluded", "router_recipe": str(ROUTER_RECIPE.name)},
        "sft": prep["sft"],
        "machine": {"cpu": cpu_summary(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "loadavg_start": load0, "loadavg_end": rlvt.loadavg()},
        "load_during_runs": {k: {"loadavg_before": v.get("loadavg_before"), "loadavg_after": v.get("loadavg_after"),
                                 **(v.get("contention") or {})} for k, v in runs.items()},
        "versions": rlvt._versions(),
        "runs": runs,
        "curves": {arm: [list(p) for p in pts] for arm, pts in curves.items()},
        "comparison": compare(curves) | learning_signal(runs),
        "target": TARGET,
        "total_wall_time_s": round(time.perf_counter() - t0, 1),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out.with_name(out.name + ".json"), out.with_name(out.name + ".png")
    json_path.write_text(json.dumps(result, indent=1))
    if curves:
        plot(curves, png_path, f"{TASK}, {model}; {result['machine']['cpu']}")
    log(f"wrote {json_path}" + (f" and {png_path}" if curves else ""))
    print(json.dumps(result, indent=1) if a.json else format_table(result))
    return 0 if all(r.get("status") == "ok" for r in runs.values()) else 1


def format_table(result: dict) -> str:
    comp = result["comparison"]
    grid = comp["cpu_s_grid"]
    lines = ["accuracy at equal training CPU-seconds (linear between measured points; - = not measured)",
             f"{'arm':16s} " + " ".join(f"{x:>8.1f}" for x in grid)]
    for arm, accs in comp["accuracy_at_cpu_s"].items():
        lines.append(f"{arm:16s} " + " ".join(f"{y:8.3f}" if y is not None else f"{'-':>8s}" for y in accs))
    for arm, r in result["runs"].items():
        if r.get("status") != "ok":
            lines.append(f"{arm}: {r.get('status')}: {r.get('error')}")
    lines.append(json.dumps({k: comp.get(k) for k in ("reach_trl_final_accuracy", "target")}, indent=1))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
