"""Peak RSS of a streamed SFT run (tiny model, 20 steps) against the size of its JSONL: does training, not only
loading, stay flat in the data's size?

    cd /tmp && HF_HUB_OFFLINE=1 PYTHONPATH=/path/to/leantune python /path/to/leantune/benchmarks/stream_train.py 20
    cd /tmp && HF_HUB_OFFLINE=1 PYTHONPATH=/path/to/leantune python /path/to/leantune/benchmarks/stream_train.py 200

The argument is the file size in MB (the synthetic data of ``stream_memory.py``, written to the current
directory once and kept). Prints one JSON line with the ledger's peak RSS (the whole process, sampled every
10 ms: torch's runtime included).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stream_memory import write_jsonl  # noqa: E402

from leantune.config import Recipe  # noqa: E402
from leantune.models.tiny import save_tiny_model  # noqa: E402
from leantune.train.sft import train  # noqa: E402


def main(size_mb: int) -> dict:
    path = Path(f"stream_train_{size_mb}mb.jsonl")
    if not path.exists():
        write_jsonl(path, size_mb * 2**20)
    model = save_tiny_model("stream_train_tiny", seed=0)
    t0 = time.time()
    result = train(Recipe.model_validate({
        "model": {"path": str(model)},
        "data": {"train": str(path), "max_length": 512, "streaming": True},
        "adapter": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        "optim": {"lr": 1e-3},
        "train": {"steps": 20, "micro_batch_size": 8, "output_dir": f"stream_train_run_{size_mb}mb_{int(t0)}",
                  "progress": False},
    }), quiet=True)
    t = result.ledger["totals"]
    out = {"file_mb": size_mb, "records": t["data"]["records"], "steps": t["steps"],
           "peak_rss_bytes": t["peak_rss_bytes"], "wall_s": round(time.time() - t0)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
