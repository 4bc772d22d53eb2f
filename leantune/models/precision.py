"""Pick the compute dtype this machine runs fastest: ``model.dtype: auto``.

bfloat16 halves weight and activation memory, but whether it is *faster* depends on the hardware:

- a CPU with AVX512-BF16 or AMX (e.g. AMD Zen 4, Intel Sapphire Rapids) runs bf16 matmuls ~3x faster
  than fp32;
- a CPU with only AVX2 (e.g. AMD Zen 3) has no bf16 instructions; PyTorch falls back to a path that
  was measured ~90x *slower* than fp32 (0.9 vs 85 GFLOP/s on a 2-core Zen 3 VM).

So ``auto`` does not guess from flags: it times one small matmul in each dtype, once per process, and
takes bf16 only when it is at least as fast as fp32 -- for a CPU run even when a GPU is visible. On CUDA it
takes bf16 where the device supports it.

>>> resolve_dtype("float32")
'float32'
>>> resolve_dtype("auto") in ("float32", "bfloat16")
True
"""

from __future__ import annotations

import functools
import time

import torch

DTYPE_NAMES = ("float32", "bfloat16")


def _matmul_seconds(dtype: torch.dtype, n: int = 256, repeats: int = 3) -> float:
    """Best-of-``repeats`` wall time of one ``n x n`` matmul in ``dtype`` on the CPU."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b  # warm-up: first-call dispatch and allocation
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of a 256x256 matmul on this CPU (> 1: bf16 is faster). Measured once."""
    return _matmul_seconds(torch.float32) / max(_matmul_seconds(torch.bfloat16), 1e-9)


def resolve_dtype(name: str, device: str | None = None) -> str:
    """``float32`` / ``bfloat16`` unchanged; ``auto`` -> the faster of the two on the training device:
    ``device`` = "cpu" runs the probe (even when a GPU is visible), "cuda" takes bf16 where supported, None
    means the device ``train.device: auto`` would pick."""
    if name in DTYPE_NAMES:
        return name
    if name != "auto":
        raise ValueError(f"model.dtype: expected one of {('auto', *DTYPE_NAMES)}, got {name!r}")
    device = device or device_type("auto")
    if device == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device == "mps":
        return "float32"
    return "bfloat16" if cpu_bf16_speedup() >= 1.0 else "float32"


def device_type(spec: str) -> str:
    """The device type ``train.device`` trains on: ``auto`` is ``cuda`` when CUDA is available, else ``cpu``.

    >>> device_type("cuda:1"), device_type("cpu")
    ('cuda', 'cpu')
    """
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec.split(":", 1)[0]


def resolve_device(spec: str, local_rank: int | None = None) -> torch.device:
    """The ``torch.device`` for ``train.device``; under torchrun a bare ``cuda`` is ``cuda:LOCAL_RANK``.
    A device that is not there is a clear error, not a crash deep inside the first forward."""
    kind = device_type(spec)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"train.device: {spec!r}, but torch sees no CUDA device (torch {torch.__version__}, "
                             f"built with CUDA {torch.version.cuda}); use train.device=cpu or auto")
        index = int(spec.split(":", 1)[1]) if ":" in spec else (local_rank or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"train.device: cuda:{index}, but only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device("cuda", index)
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError("train.device: mps, but this torch has no MPS device; use train.device=cpu or auto")
    return torch.device(kind)
