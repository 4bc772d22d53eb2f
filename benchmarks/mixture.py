"""Data mixtures (``data.mixture``): DaSH vs uniform vs an oracle on a task where half the data is noise.

Four datasets in two sources (``leantune.data.mixture.write_demo_sources``):

- ``arith``: ``clean`` (2-digit addition with worked solutions) and ``noisy`` (the same kind, the final answer
  wrong in half the rows);
- ``junk``: ``random`` (random words) and ``shuffled`` (addition prompts with another problem's completion).

Three arms train the same model from the same seeded init, ``--steps`` steps of ``--batch`` examples, one dataset
per chunk of ``--chunk-steps`` steps:

- ``dash``: two-level Gaussian Thompson sampling on each chunk's held-out loss gain (arXiv 2512.10952), the
  reward measured on ``--reward-examples`` clean test-split problems;
- ``uniform``: every dataset equally likely per chunk;
- ``oracle``: ``select: weights`` with all weight on ``clean`` (what a person who knew would do).

Measured on ``--eval-examples`` OTHER clean test-split problems (disjoint from the reward's, so DaSH is not
scored on the set it steers by), every ``--eval-every`` steps (``train.eval_every``, exact loss): the held-out
loss curve; ``tokens_to_target``: the training tokens (real, non-pad) each arm had consumed at the first
evaluation at or below each ``--targets`` loss (null: not reached). DaSH's own held-out evaluations (one per
chunk, plus one) are not training tokens; they are counted apart (``reward_eval_tokens``).

Model: the tiny 2-layer hidden-64 Llama of ``leantune.models.tiny`` (random init), full fine-tuning (LoRA on a
random network learns little), lr ``--lr`` constant after 5 warm-up steps.

    PYTHONPATH=/path/to/leantune python benchmarks/mixture.py --seeds 0 1 2 --json results.json

Run it from a scratch directory: it writes its runs into a temporary directory. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def write_data(root: Path, n: int, reward_n: int, eval_n: int, seed: int) -> dict[str, Path]:
    """The four training sets, the reward's held-out file and the measurement's, disjoint clean test problems."""
    from leantune.data.mixture import _write_rows, write_demo_sources
    from leantune.tasks import addition

    paths = write_demo_sources(root, n=n, heldout=1, seed=seed)
    test = addition.generate(reward_n + eval_n, seed=seed, split="test")
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in test]
    paths["reward"] = _write_rows(root / "reward.jsonl", rows[:reward_n])
    paths["eval"] = _write_rows(root / "eval.jsonl", rows[reward_n:])
    return paths


def arm_recipe(arm: str, model_dir: Path, paths: dict, out: Path, args, seed: int) -> dict:
    mixture = {"sources": {"arith": [str(paths["clean"]), str(paths["noisy"])],
                           "junk": [str(paths["random"]), str(paths["shuffled"])]},
               "chunk_steps": args.chunk_steps}
    if arm == "dash":
        mixture.update(select="dash", heldout=str(paths["reward"]), heldout_max=args.reward_examples,
                       prior_mean=args.prior_mean, prior_std=args.prior_std, noise_std=args.noise_std,
                       reward=args.reward, discount=args.discount)
        if args.reward == "advantage":
            mixture["baseline_chunks"] = args.baseline_chunks
    elif arm == "uniform":
        mixture.update(select="uniform")
    else:
        mixture.update(select="weights", weights={"arith": [1.0, 0.0], "junk": 0.0})
    return {
        "model": {"path": str(model_dir)},
        "data": {"mixture": mixture, "eval": str(paths["eval"]), "max_length": 96},
        "adapter": {"method": "full"},
        "loss": {"chunk_size": 256},
        "optim": {"lr": args.lr, "warmup_steps": 5, "scheduler": "constant"},
        "train": {"steps": args.steps, "micro_batch_size": args.batch, "seed": seed, "eval_every": args.eval_every,
                  "save_every": 0, "output_dir": str(out), "progress": False, "threads": args.threads},
    }


def tokens_to(curve: list[dict], target: float) -> int | None:
    """Training tokens at the first evaluation whose loss is <= ``target`` (None: never)."""
    return next((r["tokens"] for r in curve if r["eval_loss"] <= target), None)


def run_arm(arm: str, model_dir: Path, paths: dict, root: Path, args, seed: int) -> dict:
    from leantune.config import recipe_from_dict
    from leantune.train.sft import train

    out = root / f"{arm}-{seed}"
    t0 = time.perf_counter()
    ledger = train(recipe_from_dict(arm_recipe(arm, model_dir, paths, out, args, seed)), quiet=True).ledger
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [{"step": r["step"], "tokens": r["tokens"], "eval_loss": r["eval_loss"]} for r in rows if "eval_loss" in r]
    mix = ledger["extra"]["mixture"]
    result = {
        "arm": arm, "seed": seed, "wall_s": round(wall, 1), "final_eval_loss": curve[-1]["eval_loss"],
        "tokens": ledger["totals"]["tokens_processed"], "curve": curve,
        "tokens_to_target": {str(t): tokens_to(curve, t) for t in args.targets},
        "datasets": {Path(d["path"]).stem: {k: d[k] for k in ("chunks", "steps", "tokens") + (
            ("posterior_mean",) if "posterior_mean" in d else ())} for d in mix["datasets"]},
        "choices": mix["choices"],
    }
    if arm == "dash":
        result["sources"] = {k: {"chunks": v["chunks"], "posterior_mean": v["posterior_mean"]}
                             for k, v in mix["sources"].items()}
        result["reward_evaluations"] = mix["heldout_evaluations"]
        result["reward_eval_tokens"] = mix["heldout_evaluations"] * heldout_tokens(paths["reward"], model_dir,
                                                                                  args.reward_examples)
        result["late_clean_share"] = late_share(mix["choices"], 0)
        result["rewards"], result["signals"] = mix["rewards"], mix.get("signals")
    return result


def heldout_tokens(path: Path, model_dir: Path, limit: int) -> int:
    """Tokens of the first ``limit`` examples of ``path`` as the trainer tokenizes them (one reward evaluation)."""
    from leantune.config import DataConfig
    from leantune.data.sft import load_sft_examples
    from leantune.models.tiny import tiny_tokenizer

    examples, _ = load_sft_examples(path, tiny_tokenizer(), DataConfig(max_length=96), role="eval")
    return sum(len(e.input_ids) for e in list(examples)[:limit])


def late_share(choices: list[int], dataset: int) -> float:
    """Share of the second half of the chunks that went to ``dataset``."""
    late = choices[len(choices) // 2:]
    return late.count(dataset) / max(1, len(late))


def summarize(results: list[dict], targets: list[float]) -> dict:
    out = {}
    for arm in ("dash", "uniform", "oracle"):
        rs = [r for r in results if r["arm"] == arm]
        if not rs:
            continue
        per = {"final_eval_loss_mean": statistics.mean(r["final_eval_loss"] for r in rs),
               "final_eval_loss": [round(r["final_eval_loss"], 4) for r in rs],
               "tokens_to_target": {str(t): [r["tokens_to_target"][str(t)] for r in rs] for t in targets},
               "clean_share_of_tokens": [round(r["datasets"]["clean"]["tokens"] / r["tokens"], 3) for r in rs]}
        if arm == "dash":
            per["late_clean_share"] = [round(r["late_clean_share"], 3) for r in rs]
        out[arm] = per
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=["dash", "uniform", "oracle"], choices=["dash", "uniform", "oracle"])
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--chunk-steps", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--n", type=int, default=512, help="rows per training dataset")
    p.add_argument("--reward-examples", type=int, default=32)
    p.add_argument("--eval-examples", type=int, default=128)
    p.add_argument("--prior-mean", type=float, default=0.0)
    p.add_argument("--prior-std", type=float, default=0.1)
    p.add_argument("--noise-std", type=float, default=0.05)
    p.add_argument("--reward", default="gain", choices=["gain", "relative", "advantage"], help="data.mixture.reward")
    p.add_argument("--discount", type=float, default=1.0, help="data.mixture.discount")
    p.add_argument("--baseline-chunks", type=int, default=2, help="data.mixture.baseline_chunks (reward: advantage)")
    p.add_argument("--targets", type=float, nargs="+", default=[2.0, 1.5, 1.2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import os

    import torch

    from leantune.compute import cpu_summary
    from leantune.models.tiny import save_tiny_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    results = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="leantune-mixture-") as tmp:
        root = Path(tmp)
        model_dir = save_tiny_model(root / "model", seed=0)
        paths = write_data(root / "data", args.n, args.reward_examples, args.eval_examples, seed=0)
        for seed in args.seeds:
            for arm in args.arms:
                results.append(run_arm(arm, model_dir, paths, root, args, seed))
                r = results[-1]
                print(f"[mixture] {arm} seed {seed}: final eval_loss {r['final_eval_loss']:.4f}, "
                      f"tokens to target {r['tokens_to_target']}, {r['wall_s']} s", flush=True)
    report = {
        "benchmark": "mixture", "cpu": cpu_summary(), "threads": args.threads,
        "load_average_at_end": os.getloadavg(), "wall_s": round(time.perf_counter() - t0, 1),
        "settings": {k: v for k, v in vars(args).items() if k != "json"} | {"model": "leantune.models.tiny (random init), full fine-tuning"},
        "summary": summarize(results, args.targets), "runs": results,
    }
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
