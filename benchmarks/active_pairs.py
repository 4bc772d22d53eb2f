#!/usr/bin/env python
"""Active vs random pair selection for DPO (`dpo.active`, arXiv 2511.04286): held-out preference accuracy
against labels spent, same budget, same start, on 2-digit addition with a verifier labeller.

Pool: ``answer_pool`` (the worked solution vs the same text with its final answer off by +-1..9, random
order); held out: ``answer_pairs`` from the task's test split (chosen = right). The labeller is the
``exact_match`` verifier against each row's answer (every pool pair is right vs wrong, so no ties).

Two parts:

- ``head``: the selection math alone, many seeds. Features are computed once with the starting policy (the base
  model; a fresh LoRA adapter changes nothing), then for each seed and arm: rounds of select (dueling Thompson
  sampling on the Laplace posterior, or uniform) -> label -> refit; after each round, the Bradley–Terry head's
  MAP ranks the held-out pairs (accuracy = share where the right response scores higher). The same functions
  the trainer calls (`leantune.active.laplace`), without DPO: features do not move between rounds here.
- ``loop``: the real `leantune dpo` with `dpo.active` (the recipe recipes/dpo_active_addition.yaml, scaled down
  by the flags), both arms, ``--loop-seeds`` seeds. Per round: the head's held-out accuracy
  (``active/bt_eval_accuracy``, features recomputed by the trained policy) and DPO's own held-out implicit-reward
  accuracy (``eval_rewards/accuracies``, chosen reward strictly above rejected) just before the next round.

    HF_HUB_OFFLINE=1 python benchmarks/active_pairs.py --json out.json --plot docs/img/active_pairs.png
    HF_HUB_OFFLINE=1 python benchmarks/active_pairs.py --tiny --loop-seeds 1   # the tiny test model, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's leantune

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def log(*args) -> None:
    print("[active_pairs]", *args, file=sys.stderr, flush=True)


def cpu_model() -> str:
    """The CPU's model name and whether it has AVX512-BF16."""
    from leantune.compute import cpu_summary

    return cpu_summary()


def write_data(d: Path, n_pool: int, n_eval: int, seed: int) -> tuple[Path, Path]:
    from leantune.active.pool import answer_pool
    from leantune.data.preference import answer_pairs
    from leantune.tasks.addition import generate

    d.mkdir(parents=True, exist_ok=True)
    pool, held = d / "pool.jsonl", d / "eval.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in answer_pool(generate(n_pool, seed=seed), seed=seed)))
    rows = answer_pairs(generate(n_eval, seed=seed + 1, split="test"), seed=seed + 1)
    held.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return pool, held


# ================================================================================================
# Part 1: the head alone, fixed features


def head_curves(model_path: str, pool: Path, held: Path, *, budget: int, batch: int, seeds: int, prior: float,
                alpha: float, max_length: int, dtype: str) -> dict:
    import random

    import torch

    from leantune.active.laplace import bt_accuracy, dueling_thompson_select, feature_scale, laplace_posterior
    from leantune.active.pool import read_pool
    from leantune.active.rounds import pair_features
    from leantune.config import ActiveConfig, DataConfig, ModelConfig
    from leantune.data.preference import load_pairs, tokenize_pairs
    from leantune.models.loading import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(ModelConfig(path=model_path, dtype=dtype))
    data = DataConfig(train=str(pool), max_length=max_length)
    rows, column = read_pool(pool, data, ActiveConfig(enabled=True, labeler="column"))
    truth = [column.reveal(i) for i in range(len(rows))]  # the benchmark's oracle, not the selector's
    pairs, _ = tokenize_pairs([r.as_pair_record() for r in rows], tok, data)
    eval_pairs, _ = load_pairs(held, tok, data, role="eval")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    t0 = time.perf_counter()
    feats = pair_features(model, pairs, pad_id=pad, batch_size=16, how="last")  # (N, 2, H)
    efeats = pair_features(model, eval_pairs, pad_id=pad, batch_size=16, how="last")  # (E, 2, H)
    feature_s = time.perf_counter() - t0
    scale = feature_scale(feats)
    diff = (feats[:, 0] - feats[:, 1]).double() / scale  # (N, H)
    ediff = (efeats[:, 0] - efeats[:, 1]).double() / scale  # (E, H) chosen - rejected
    sign = torch.tensor([1.0 if t == 0 else -1.0 for t in truth], dtype=torch.float64)
    full = bt_accuracy(laplace_posterior(diff * sign[:, None], prior).mean, ediff)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fits are small (n x n Woodbury solves); on a shared CPU 2 threads only spin
    curves: dict[str, list[list[float]]] = {"thompson": [], "random": []}
    spent_axis = list(range(batch, budget + 1, batch))
    for arm in curves:
        for s in range(seeds):
            rng, gen = random.Random(s), torch.Generator().manual_seed(s)
            labelled: list[int] = []
            accs = []
            for _ in spent_axis:
                x = diff[labelled] * sign[labelled][:, None]
                post = laplace_posterior(x, prior)
                taken = set(labelled)
                rest = [i for i in range(len(pairs)) if i not in taken]
                if arm == "random":
                    picks = rng.sample(rest, batch)
                else:
                    picks = [rest[j] for j in dueling_thompson_select(post, diff[rest], batch, alpha=alpha,
                                                                      generator=gen)]
                labelled += picks
                post = laplace_posterior(diff[labelled] * sign[labelled][:, None], prior)
                accs.append(bt_accuracy(post.mean, ediff))
            curves[arm].append(accs)
    torch.set_num_threads(threads)
    return {"labels": spent_axis, "accuracy": curves, "all_pool_labelled_accuracy": full,
            "pool_pairs": len(pairs), "eval_pairs": len(eval_pairs), "hidden": int(feats.shape[-1]),
            "feature_pass_s": round(feature_s, 1), "seeds": seeds, "prior_precision": prior, "alpha": alpha}


# ================================================================================================
# Part 2: the real loop


def loop_run(model_path: str, pool: Path, held: Path, out: Path, *, select: str, seed: int, budget: int,
             batch: int, steps_per_round: int, max_length: int, dtype: str, micro: int) -> dict:
    from leantune.config import recipe_from_dict
    from leantune.train.dpo import train_dpo

    rounds = -(-budget // batch)
    raw = {"model": {"path": model_path, "dtype": dtype},
           "data": {"train": str(pool), "eval": str(held), "max_length": max_length},
           "adapter": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
           "loss": {"chunk_size": 256}, "optim": {"lr": 5e-4, "scheduler": "constant"},
           "train": {"steps": rounds * steps_per_round, "micro_batch_size": micro, "seed": seed,
                     "eval_every": steps_per_round, "save_every": 0, "output_dir": str(out), "progress": False},
           "dpo": {"loss": "dpo", "beta": 0.1,
                   "active": {"enabled": True, "label_budget": budget, "batch": batch, "labeler": "verifier",
                              "verifier": "exact_match", "select": select}}}
    t0 = time.perf_counter()
    result = train_dpo(recipe_from_dict(raw), quiet=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [m for m in rows if isinstance(m.get("step"), int)]
    head = [(m["labels_spent"], m["active/bt_eval_accuracy"]) for m in rows if "active/round" in m]
    dpo = [(m["labels_spent"], m["eval_rewards/accuracies"]) for m in rows if "eval_rewards/accuracies" in m]
    return {"select": select, "seed": seed, "head": head, "dpo": dpo, "wall_s": round(wall, 1),
            "labels": result.ledger["totals"]["labels"], "steps": raw["train"]["steps"]}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + bool(result.get("loop"))
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    h = result["head"]
    for arm, color in (("thompson", "C0"), ("random", "C1")):
        runs = h["accuracy"][arm]
        mean = [sum(c) / len(c) for c in zip(*runs)]
        lo = [min(c) for c in zip(*runs)]
        hi = [max(c) for c in zip(*runs)]
        ax.plot(h["labels"], mean, "-o", color=color, ms=3, label=f"{arm} (mean of {len(runs)} seeds)")
        ax.fill_between(h["labels"], lo, hi, color=color, alpha=0.15)
    ax.axhline(h["all_pool_labelled_accuracy"], color="grey", ls=":", label="every pool pair labelled")
    ax.set(xlabel="labels spent", ylabel="held-out preference accuracy", title="BT head, fixed starting features")
    ax.legend(fontsize=8)
    if panels == 2:
        ax = axes[0][1]
        for run in result["loop"]:
            color = "C0" if run["select"] == "thompson" else "C1"
            ax.plot(*zip(*run["head"]), "-o", color=color, ms=3, label=f"{run['select']} seed {run['seed']}: head")
            if run["dpo"]:
                ax.plot(*zip(*run["dpo"]), "--s", color=color, ms=3, label=f"{run['select']} seed {run['seed']}: DPO")
        ax.set(xlabel="labels spent", ylabel="held-out preference accuracy", title="leantune dpo with dpo.active")
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['model']} on {result['cpu']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny built-in test model instead of SmolLM2-135M-Instruct")
    p.add_argument("--pool", type=int, default=256)
    p.add_argument("--eval", type=int, default=128)
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seeds", type=int, default=20, help="seeds of the head part")
    p.add_argument("--prior", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--loop-seeds", type=int, default=1, help="seeds of the full DPO loop per arm (0: skip it)")
    p.add_argument("--loop-budget", type=int, default=24)
    p.add_argument("--loop-batch", type=int, default=8)
    p.add_argument("--loop-pool", type=int, default=64)
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--plot", type=Path, help="write the PNG plot here")
    args = p.parse_args(argv)

    import torch

    work = Path(tempfile.mkdtemp(prefix="active_pairs_"))
    if args.tiny:
        from leantune.models.tiny import save_tiny_model

        model_path = str(save_tiny_model(work / "tiny", seed=0))
    else:
        model_path = "builtin:smollm2-135m-instruct"
    t0 = time.perf_counter()
    pool, held = write_data(work / "data", args.pool, args.eval, seed=0)
    log(f"head part: {args.pool} pool pairs, {args.eval} held out, {args.seeds} seeds")
    result = {"benchmark": "active_pairs", "model": "tiny test model (leantune.models.tiny, seed 0)" if args.tiny else model_path, "cpu": cpu_model(),
              "torch_threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg()[0],
              "task": "addition (2-digit), right vs wrong final answer, verifier exact_match"}
    result["head"] = head_curves(model_path, pool, held, budget=args.budget, batch=args.batch, seeds=args.seeds,
                                 prior=args.prior, alpha=args.alpha, max_length=args.max_length, dtype=args.dtype)
    h = result["head"]
    for arm in ("thompson", "random"):
        h[f"{arm}_mean"] = [round(sum(c) / len(c), 4) for c in zip(*h["accuracy"][arm])]
    log("head:", {k: h[k] for k in ("labels", "thompson_mean", "random_mean", "all_pool_labelled_accuracy")})
    if args.loop_seeds:
        lpool, lheld = write_data(work / "loop_data", args.loop_pool, min(args.eval, 64), seed=0)
        result["loop"] = []
        for seed in range(args.loop_seeds):
            for select in ("thompson", "random"):
                log(f"loop: {select} seed {seed}")
                run = loop_run(model_path, lpool, lheld, work / f"run_{select}_{seed}", select=select, seed=seed,
                               budget=args.loop_budget, batch=args.loop_batch, steps_per_round=args.steps_per_round,
                               max_length=args.max_length, dtype=args.dtype, micro=args.loop_batch)
                log(run)
                result["loop"].append(run)
        result["loop_setup"] = {"pool": args.loop_pool, "eval": min(args.eval, 64), "budget": args.loop_budget,
                                "batch": args.loop_batch, "steps_per_round": args.steps_per_round}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    if args.plot:
        plot(result, args.plot)
        log(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
