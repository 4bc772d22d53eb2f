"""Sequence packing (``data.packing``) vs padded batches on the demo task: tokens/s and steps to accuracy.

Two arms train the same LoRA adapter (same seeded init) on the demo's data (2-digit addition in the
``messages`` shape, ``leantune.demo.write_task_data``), side by side in one process:

- ``unpacked``: the demo recipe -- ``train.micro_batch_size`` (8) examples per step, each micro-batch
  padded to its longest example, ``data.max_length`` 128;
- ``packed``: ``data.packing: true`` with ``data.max_length`` = ``--packed-length`` (256), the same
  ``train.micro_batch_size`` counting rows (each row holds ~3 of the demo's ~79-token examples), or
  ``--packed-rows`` rows (e.g. 3: about the unpacked arm's tokens per step).

Held equal: model, adapter init, lr, seed, data, threads. The demo's cosine schedule is replaced by a
constant lr after its 5 warm-up steps, because each arm trains in segments of ``--eval-every`` steps
(``leantune.train.sft.train`` resumed from its own checkpoint, the model kept in memory), and a cosine
schedule would depend on where the run stops. After each segment, greedy accuracy on ``--problems``
held-out problems (``leantune.eval.evaluate.task_accuracy``, as the demo measures it; 0 skips it) and the
exact held-out loss on the demo's 64 validation examples (``evaluate_loss``, unpacked). The packed arm is
evaluated every ``eval_every / examples_per_row`` steps (rounded, at least 1), so both arms are evaluated
after about the same number of examples.

Measured:
- ``same_examples``: forward + backward of the same examples packed (8 rows) and padded (micro-batches of
  8), alternated ``--repeats`` times after a warm-up: real tokens/s of each, robust to a changing load;
- ``tokens_per_s``: real (non-pad) tokens per second of training step (median over the steps after
  the first of each segment; from the run's metrics.jsonl, which counts ``attention_mask`` tokens);
- ``target``: the unpacked arm's accuracy (``--target accuracy``, the default) or held-out loss
  (``--target eval_loss``, the default with ``--tiny``) at ``--steps`` (the demo's 60 steps);
  ``steps_to_target`` / ``examples_to_target`` / ``train_s_to_target``: the first evaluation at which each
  arm reaches it (null: not within its budget). The packed arm's budget is ``--steps`` too.

    PYTHONPATH=. python benchmarks/packing.py                  # SmolLM2-135M-Instruct (the demo's model)
    PYTHONPATH=. python benchmarks/packing.py --tiny --problems 0   # tiny random model: held-out loss only

Prints one JSON object (``--json PATH`` also writes it).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def cpu_info() -> dict:
    """lscpu's model name, core count and whether the CPU has AVX512-BF16."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {"model": fields.get("Model name", "?").strip(), "cores": os.cpu_count(),
            "avx512_bf16": "avx512_bf16" in flags}


def arm_recipe(base: dict, packed: bool, args, run_dir: Path, steps: int) -> dict:
    from leantune.demo import _merge

    over = {"optim": {"scheduler": "constant"},
            "train": {"steps": steps, "save_every": 0, "output_dir": str(run_dir), "progress": False,
                      "log_every": 1}}
    if packed:
        over["data"] = {"packing": True, "max_length": args.packed_length}
        if args.packed_rows:
            over["train"]["micro_batch_size"] = args.packed_rows
    return _merge(base, over)


def reached(point: dict, target: float | None, metric: str) -> bool:
    """Whether an evaluation point meets the target: accuracy at least it, eval_loss at most it."""
    if target is None:
        return False
    return point[metric] >= target if metric == "accuracy" else point[metric] <= target


def run_arm(name: str, base_raw: dict, base_model, tok, args, out: Path, target: float | None) -> dict:
    import torch

    from leantune.adapters import apply_adapter
    from leantune.config import recipe_from_dict
    from leantune.eval.evaluate import task_accuracy
    from leantune.data.sft import load_sft_examples
    from leantune.train.sft import evaluate_loss, train

    packed = name == "packed"
    run_dir = out / name
    raw = arm_recipe(base_raw, packed, args, run_dir, args.steps)
    recipe = recipe_from_dict(raw)
    torch.manual_seed(0)
    model = apply_adapter(copy.deepcopy(base_model), recipe.adapter, seed=recipe.train.seed)
    every = args.eval_every
    held_out = load_sft_examples(args.valid, tok, recipe.data, role="eval")[0]
    if packed:
        from leantune.data.packing import pack_examples

        stats = pack_examples(load_sft_examples(recipe.data.train, tok, recipe.data)[0], args.packed_length).stats
        every = max(1, round(args.eval_every / stats.examples_per_row))
    curve, step, train_s, reached_at, starts = [], 0, 0.0, None, set()
    while step < args.steps:
        starts.add(step + 1)  # the first step of a segment pays its warm-up
        resume, step = step > 0, min(step + every, args.steps)
        seg = recipe_from_dict(arm_recipe(base_raw, packed, args, run_dir, step))
        result = train(seg, resume=resume, quiet=True, model=model, tokenizer=tok)
        model = result.model
        train_s = result.ledger["totals"]["wall_time_s"]
        acc = task_accuracy(model, tok, recipe.eval.task, num_problems=args.problems,
                            max_new_tokens=recipe.eval.max_new_tokens,
                            batch_size=recipe.eval.batch_size) if args.problems else {"accuracy": None}
        held = evaluate_loss(model, held_out, tok.pad_token_id, recipe.loss.weights, 8, recipe.loss.chunk_size)
        model.train()
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        examples = step * recipe.train.micro_batch_size * (stats.examples_per_row if packed else 1)
        curve.append({"step": step, "accuracy": acc["accuracy"], "eval_loss": round(held["eval_loss"], 5),
                      "examples_seen": round(examples), "train_s": round(train_s, 2), "loss": rows[-1]["loss"]})
        print(f"[{name}] step {step}: accuracy {acc['accuracy']}, eval_loss {held['eval_loss']:.4f}, "
              f"train {train_s:.0f} s", flush=True)
        if reached_at is None and reached(curve[-1], target, args.target):
            reached_at = curve[-1]
            if not args.full_curves:
                break
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in rows if r["step"] not in starts]
    ledger = result.ledger
    return {
        "recipe": {"data.packing": packed, "data.max_length": recipe.data.max_length,
                   "train.micro_batch_size": recipe.train.micro_batch_size, "eval_every_steps": every},
        "packing": ledger["extra"]["packing"],
        "tokens_per_s_median": statistics.median(tps) if tps else None,
        "tokens_per_s_steps": len(tps),
        "tokens": ledger["totals"]["tokens_processed"],
        "steps": curve[-1]["step"],
        "train_s": ledger["totals"]["wall_time_s"],
        "curve": curve,
        "reached_target_at": reached_at,
    }


def interleaved_step_times(base_raw: dict, base_model, tok, args) -> dict:
    """Forward + backward over the *same* examples, packed and padded, alternating ``--repeats`` times.

    The examples of the first ``--rows`` packed rows (8 rows of ``--packed-length``) are run once as those
    rows and once as padded micro-batches of 8 examples (the unpacked arm's batches), with the trainer's
    loss (``accumulate_gradients``, one optimizer step's worth, no update). Alternating the two keeps a
    change in the machine's load from favouring either. Real tokens/s = the examples' tokens / median time.
    """
    import torch

    from leantune.adapters import apply_adapter
    from leantune.config import recipe_from_dict
    from leantune.data.packing import collate_packed, pack_examples
    from leantune.data.sft import collate, load_sft_examples
    from leantune.train.sft import SFTLoss, accumulate_gradients

    recipe = recipe_from_dict(arm_recipe(base_raw, True, args, Path(tempfile.mkdtemp()), 1))
    examples = load_sft_examples(recipe.data.train, tok, recipe.data)[0]
    rows = list(pack_examples(examples, args.packed_length)[: args.rows])
    chosen = [e for row in rows for e in row]
    mb = base_raw["train"]["micro_batch_size"]
    w = recipe.loss.weights
    packed = [collate_packed(rows, tok.pad_token_id, w)]
    padded = [collate(chosen[i : i + mb], tok.pad_token_id, w) for i in range(0, len(chosen), mb)]
    tokens = sum(len(e.input_ids) for e in chosen)
    torch.manual_seed(0)
    model = apply_adapter(copy.deepcopy(base_model), recipe.adapter, seed=0).train()
    loss_module, times = SFTLoss(model), {"packed": [], "unpacked": []}
    for r in range(args.repeats + 1):  # the first round is a warm-up
        for name, batches in (("packed", packed), ("unpacked", padded)) if r % 2 else (("unpacked", padded), ("packed", packed)):
            t = time.perf_counter()
            accumulate_gradients(loss_module, batches, recipe.loss.chunk_size)
            model.zero_grad(set_to_none=True)
            if r:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "examples": len(chosen), "real_tokens": tokens,
        "positions": {"packed": sum(b["input_ids"].numel() for b in packed),
                      "unpacked": sum(b["input_ids"].numel() for b in padded)},
        "micro_batches": {"packed": f"1 x {len(rows)} rows", "unpacked": f"{len(padded)} x <= {mb} examples"},
        "step_s_median": {k: round(v, 4) for k, v in med.items()},
        "step_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "tokens_per_s": {k: round(tokens / v, 1) for k, v in med.items()},
        "packed_over_unpacked": round(med["unpacked"] / med["packed"], 3),
        "repeats": args.repeats,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random model instead of SmolLM2-135M (smoke test)")
    p.add_argument("--steps", type=int, default=60, help="step budget of each arm (the demo: 60)")
    p.add_argument("--eval-every", type=int, default=10, help="unpacked steps between accuracy checks")
    p.add_argument("--packed-length", type=int, default=256, help="data.max_length of the packed arm")
    p.add_argument("--packed-rows", type=int, default=None,
                   help="train.micro_batch_size (rows) of the packed arm; default: the unpacked arm's (8)")
    p.add_argument("--problems", type=int, default=50, help="held-out problems per accuracy check (the demo: 50)")
    p.add_argument("--target", choices=["accuracy", "eval_loss"], default=None,
                   help="what the packed arm must reach (the unpacked arm's final value): default accuracy, "
                        "eval_loss with --tiny (a random tiny model solves no problem)")
    p.add_argument("--full-curves", action="store_true", help="keep training the packed arm after it reaches the target")
    p.add_argument("--rows", type=int, default=8, help="packed rows in the same-examples comparison")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds of the same-examples comparison")
    p.add_argument("--only-interleaved", action="store_true", help="only the same-examples step-time comparison")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the JSON here")
    args = p.parse_args()
    args.target = args.target or ("eval_loss" if args.tiny else "accuracy")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from leantune.config import recipe_from_dict
    from leantune.demo import DEMO_RECIPE, NUM_TRAIN, NUM_VALID, QUICK_OVERRIDES, _merge, write_task_data
    from leantune.models.loading import load_model_and_tokenizer

    t0 = time.perf_counter()
    out = Path(tempfile.mkdtemp(prefix="leantune-packing-"))
    base_raw = _merge(DEMO_RECIPE, QUICK_OVERRIDES if args.tiny else {})
    base_raw["train"]["micro_batch_size"] = DEMO_RECIPE["train"]["micro_batch_size"]
    data = write_task_data(base_raw["eval"]["task"], out / "data", NUM_TRAIN, NUM_VALID)
    base_raw["data"].update(train=str(data["train"]), eval=None)
    args.valid = data["valid"]  # held-out loss after each segment (exact, unpacked)
    if args.tiny:
        from leantune.models.tiny import save_tiny_model

        base_raw["model"]["path"] = str(save_tiny_model(out / "tiny-model", chat_template=True))
    base_model, tok, _ = load_model_and_tokenizer(recipe_from_dict(base_raw).model)
    load_s = time.perf_counter() - t0
    load_before = os.getloadavg()

    same_examples = interleaved_step_times(base_raw, base_model, tok, args)
    print(f"[interleaved] {same_examples['tokens_per_s']} real tokens/s", flush=True)
    if args.only_interleaved:
        print(json.dumps({"benchmark": "packing", "model": base_raw["model"]["path"], "cpu": cpu_info(),
                          "load_average_before_after": [load_before, os.getloadavg()],
                          "same_examples": same_examples, "wall_s": round(time.perf_counter() - t0, 1)}, indent=1))
        return
    unpacked = run_arm("unpacked", base_raw, base_model, tok, args, out, target=None)
    target = unpacked["curve"][-1][args.target]
    unpacked["reached_target_at"] = next(c for c in unpacked["curve"] if reached(c, target, args.target))
    packed = run_arm("packed", base_raw, base_model, tok, args, out, target=target)

    def ratio(a, b):
        return None if not a or not b else round(a / b, 3)

    hit = packed["reached_target_at"]
    result = {
        "benchmark": "packing",
        "model": base_raw["model"]["path"] + (" (tiny random: accuracy means nothing)" if args.tiny else ""),
        "cpu": cpu_info(), "torch_threads": torch.get_num_threads(),
        "load_average_before_after": [load_before, os.getloadavg()],
        "data": {"task": base_raw["eval"]["task"], "train_examples": NUM_TRAIN},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "target": {"metric": args.target, "value": target, "rule": "the unpacked arm's value at its last step"},
        "same_examples": same_examples,
        "arms": {"unpacked": unpacked, "packed": packed},
        "comparison": {
            "tokens_per_s_packed_over_unpacked": ratio(packed["tokens_per_s_median"], unpacked["tokens_per_s_median"]),
            "steps_to_target": {"unpacked": unpacked["reached_target_at"]["step"], "packed": hit and hit["step"]},
            "examples_to_target": {"unpacked": unpacked["reached_target_at"]["examples_seen"],
                                   "packed": hit and hit["examples_seen"]},
            "train_s_to_target": {"unpacked": unpacked["reached_target_at"]["train_s"], "packed": hit and hit["train_s"]},
        },
        "model_load_s": round(load_s, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
