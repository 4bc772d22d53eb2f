"""Memorization with and without deduplication: the same training run on data with injected duplicates,
once as is and once with ``data.dedup``, then k-extractable rates (arXiv 2202.07646) and held-out loss.

Data (seeded): ``--unique`` prompt/completion rows of random words, plus ``--repeated`` other rows each
written ``--copies`` times (half as exact copies, half with one word changed: near-duplicates), shuffled
together; ``--heldout`` rows from the same generator for the control and the held-out loss. Random words
make a completion predictable only by memorizing it.

Held equal: model and its init, optimizer steps (``--steps``) and batch, lr, seed; only ``data.dedup``
differs (so the deduplicated run spends its steps on fewer, distinct rows). Measured after training with
``leantune.eval.memorization.memorization`` (window: ``--prefix`` prompt tokens before the completion,
``--suffix`` completion tokens, ``align="completion"``): the extractable rate on the repeated rows, on the
unique rows and on the held-out rows, and the mean held-out loss.

    PYTHONPATH=. python benchmarks/memorization.py                 # tiny 2-layer model, full fine-tuning, ~5 min
    PYTHONPATH=. python benchmarks/memorization.py --real          # SmolLM2-135M-Instruct, LoRA (slow)

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

# words of the tiny tokenizer's corpus (one or two tokens each)
WORDS = ("the quick brown fox jumps over lazy dog cats watch birds apples left answer question help today what "
         "how many you had ate user hello assistant system helpful compute think is are").split()


def rows(rng: random.Random, n: int, prompt_words: int = 8, completion_words: int = 12) -> list[dict]:
    return [{"prompt": " ".join(rng.choices(WORDS, k=prompt_words)),
             "completion": " ".join(rng.choices(WORDS, k=completion_words))} for _ in range(n)]


def one_word_changed(row: dict, rng: random.Random) -> dict:
    words = row["completion"].split()
    i = rng.randrange(len(words))
    words[i] = rng.choice([w for w in WORDS if w != words[i]])
    return {"prompt": row["prompt"], "completion": " ".join(words)}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_data(out: Path, unique: int, repeated: int, copies: int, heldout: int, seed: int) -> dict[str, Path]:
    rng = random.Random(seed)
    uniq, rep, held = rows(rng, unique), rows(rng, repeated), rows(rng, heldout)
    train = list(uniq)
    for r in rep:
        train += [r] + [r if k % 2 else one_word_changed(r, rng) for k in range(1, copies)]
    rng.shuffle(train)
    return {"train": write_jsonl(out / "train.jsonl", train), "unique": write_jsonl(out / "unique.jsonl", uniq),
            "repeated": write_jsonl(out / "repeated.jsonl", rep), "heldout": write_jsonl(out / "heldout.jsonl", held)}


def run(args, data: dict[str, Path], model_path: str, out: Path, dedup: dict | None) -> dict:
    from leantune.config import DataConfig, Recipe, SpanWeights
    from leantune.data.sft import load_sft_examples
    from leantune.eval.memorization import memorization
    from leantune.train.sft import train

    raw = {
        "model": {"path": model_path},
        "data": {"train": str(data["train"]), "eval": str(data["heldout"]), "max_length": 128, "dedup": dedup},
        "adapter": ({"method": "lora", "r": 16, "alpha": 32} if args.real else {"method": "full"}),
        "optim": {"lr": args.lr, "warmup_steps": 0},
        "train": {"steps": args.steps, "micro_batch_size": args.batch, "seed": args.seed, "progress": False,
                  "output_dir": str(out), "eval_every": 0},
    }
    recipe = Recipe.model_validate(raw)
    start = time.perf_counter()
    result = train(recipe, quiet=True)
    seconds = time.perf_counter() - start
    model, tok = result.model, result.tokenizer
    cfg = DataConfig(max_length=128)
    measured = {}
    for name in ("repeated", "unique"):
        examples, _ = load_sft_examples(data[name], tok, cfg)
        held, _ = load_sft_examples(data["heldout"], tok, cfg)
        measured[name] = memorization(model, tok, list(examples), list(held), prefix=args.prefix, suffix=args.suffix,
                                      samples=args.samples, seed=args.seed, align="completion", weights=SpanWeights())
    return {
        "dedup": dedup,
        "data": result.ledger["totals"]["data"],
        "train_seconds": round(seconds, 1),
        "extractable_repeated": measured["repeated"]["train"]["rate"],
        "extractable_unique": measured["unique"]["train"]["rate"],
        "extractable_heldout": measured["unique"]["heldout"]["rate"],
        "mean_loss_repeated": round(measured["repeated"]["train"]["mean_loss"], 4),
        "mean_loss_unique": round(measured["unique"]["train"]["mean_loss"], 4),
        "heldout_loss": round(measured["unique"]["heldout"]["mean_loss"], 4),
    }


def cpu_model() -> str:
    """The CPU's model name and whether it has AVX512-BF16."""
    from leantune.compute import cpu_summary

    return cpu_summary()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct (builtin) with LoRA instead of the tiny model")
    p.add_argument("--unique", type=int, default=256, help="rows that appear once")
    p.add_argument("--repeated", type=int, default=16, help="rows injected several times")
    p.add_argument("--copies", type=int, default=16, help="times each repeated row appears (half exact, half near)")
    p.add_argument("--heldout", type=int, default=64, help="held-out rows")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps, the same for both runs")
    p.add_argument("--batch", type=int, default=8, help="micro-batch size")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate")
    p.add_argument("--prefix", type=int, default=6, help="prompt tokens before the completion")
    p.add_argument("--suffix", type=int, default=8, help="completion tokens to reproduce")
    p.add_argument("--samples", type=int, default=64, help="rows sampled per set")
    p.add_argument("--near", type=float, default=0.5, help="data.dedup.near of the deduplicated run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.real and args.lr == 3e-3:
        args.lr = 1e-3

    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_data(tmp, args.unique, args.repeated, args.copies, args.heldout, args.seed)
        if args.real:
            model_path = "builtin:smollm2-135m-instruct"
        else:
            from leantune.models.tiny import save_tiny_model

            model_path = str(save_tiny_model(tmp / "tiny", seed=0))
        runs = {
            "as_is": run(args, data, model_path, tmp / "as_is", None),
            "dedup": run(args, data, model_path, tmp / "dedup", {"exact": True, "near": args.near, "num_perm": 128}),
        }
    print(json.dumps({"model": "builtin:smollm2-135m-instruct (LoRA r=16)" if args.real else "tiny 2-layer Llama, hidden 64 (full)",
                      "cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
                      "settings": vars(args), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
