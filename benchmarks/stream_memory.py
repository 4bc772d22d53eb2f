"""Peak memory of loading a large JSON Lines file for SFT, eager vs ``data.streaming: true``.

Writes a synthetic prompt/completion JSONL of ``--size-mb`` (seeded; ~640 bytes per record, with a
think block), then, in a fresh subprocess per mode, loads it with ``load_sft_examples`` (tiny byte-level BPE
tokenizer) and collates ``--batches`` micro-batches at random micro-steps (random access across epochs,
shuffled). Prints one JSON line: file size and, per mode, RSS after imports (baseline), peak RSS
(``ru_maxrss``), their difference, load and batch times, and the DataStats.

    PYTHONPATH=. python benchmarks/stream_memory.py --size-mb 150 --modes eager,streaming
    PYTHONPATH=. python benchmarks/stream_memory.py --size-mb 2048 --modes streaming   # eager needs ~87x the file

The file is deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("the", "a", "sum", "of", "two", "numbers", "is", "think", "step", "carry", "digit", "answer", "so",
         "we", "add", "then", "ten", "one", "result", "check", "again", "first", "second", "total")


def write_jsonl(path: Path, size_bytes: int, seed: int = 0) -> int:
    """A prompt/completion JSONL of at least ``size_bytes`` bytes; returns the number of records."""
    rng = random.Random(seed)
    n, written = 0, 0
    with open(path, "w") as f:
        while written < size_bytes:
            lines = []
            for _ in range(1000):
                a, b = rng.randrange(10**6), rng.randrange(10**6)
                think = " ".join(rng.choices(WORDS, k=rng.randrange(60, 160)))
                rec = {"prompt": f"What is {a} + {b}? Show your work.",
                       "completion": f"<think>{think}</think> {a + b}"}
                lines.append(json.dumps(rec))
            block = "\n".join(lines) + "\n"
            f.write(block)
            written += len(block)
            n += 1000
    return n


def _warmup_file(path: str) -> str:
    warm = f"{path}.warmup.jsonl"
    with open(warm, "w") as f:
        f.write(json.dumps({"prompt": "1 + 1?", "completion": "<think>1 + 1 = 2</think> 2"}) + "\n")
    return warm


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(path: str, streaming: bool, batches: int, micro_batch_size: int, max_length: int) -> dict:
    """Run in a fresh process: load, then collate ``batches`` random micro-batches; memory and time."""
    from leantune.config import DataConfig, SpanWeights
    from leantune.data.sft import batch_at, collate, load_sft_examples, micro_batches_per_epoch
    from leantune.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tok(["warm up"] * 128)
    collate(load_sft_examples(_warmup_file(path), tok, DataConfig(streaming=streaming))[0][:1], tok.pad_token_id,
            SpanWeights())  # touch torch's and the loader's code pages: fixed costs, not the data's
    baseline = rss_bytes()
    t0 = time.perf_counter()
    examples, stats = load_sft_examples(path, tok, DataConfig(max_length=max_length, streaming=streaming))
    load_s = time.perf_counter() - t0
    after_load = rss_bytes()
    peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    per_epoch = micro_batches_per_epoch(len(examples), micro_batch_size)
    rng = random.Random(0)
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(batches):
        step = rng.randrange(3 * per_epoch)  # any of three epochs, each a different permutation
        batch = collate(batch_at(examples, step, micro_batch_size, seed=0, shuffle=True), tok.pad_token_id, SpanWeights())
        tokens += int(batch["attention_mask"].sum())
    batch_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"baseline_rss_bytes": baseline, "rss_after_load_bytes": after_load, "peak_rss_load_bytes": peak_load,
            "peak_rss_bytes": peak,
            "rss_growth_bytes": peak - baseline, "load_s": round(load_s, 2), "batches": batches,
            "batch_s": round(batch_s, 3), "batch_tokens": tokens, "examples": len(examples), "stats": stats.as_dict()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=150)
    ap.add_argument("--dir", default=".")
    ap.add_argument("--modes", default="eager,streaming", help="comma-separated: eager, streaming")
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--keep", action="store_true", help="keep the generated file")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: "PATH,MODE" in the child process
    args = ap.parse_args(argv)
    if args.measure:
        path, mode = args.measure.rsplit(",", 1)
        result = measure(path, mode == "streaming", args.batches, args.micro_batch_size, args.max_length)
        print(json.dumps(result))
        return result
    path = Path(args.dir) / f"stream_memory_{int(args.size_mb)}mb.jsonl"
    t0 = time.perf_counter()
    records = write_jsonl(path, int(args.size_mb * 2**20)) if not path.exists() else None
    out: dict = {"file_bytes": path.stat().st_size, "records": records, "write_s": round(time.perf_counter() - t0, 1)}
    try:
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--measure", f"{path},{mode}", "--batches", str(args.batches),
                   "--micro-batch-size", str(args.micro_batch_size), "--max-length", str(args.max_length)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                out[mode] = {"error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
                continue
            out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            out[mode]["rss_growth_over_file"] = round(out[mode]["rss_growth_bytes"] / out["file_bytes"], 4)
    finally:
        Path(f"{path}.warmup.jsonl").unlink(missing_ok=True)
        if not args.keep:
            path.unlink(missing_ok=True)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
