"""The compute floor: this machine's measured matmul peak, and a run's achieved fraction of it.

The ledger's FLOPs are an estimate from parameter counts (:mod:`leantune.flops`); dividing them by the time
the training steps took gives the achieved FLOP/s. What that is worth depends on the machine, so the
ledger also records the machine's *measured* matmul peak for the run's dtype and device -- the best FLOP/s
of large square matmuls (``torch.mm``, 1024 and 2048, best of 3 after a warm-up) with the run's thread count
-- and the fraction. The probe takes a second or two and is cached per machine in
``$XDG_CACHE_HOME/leantune/matmul_peak.json`` (default ``~/.cache``), keyed by CPU model and flags, device,
torch version, threads and dtype, with the 1-minute load average at the time (a probe on a busy machine
reads low, which inflates the fraction). ``python -m leantune.compute --refresh`` (``refresh=True``) measures again
and keeps the best figure seen.

>>> s = compute_summary(flops_total=2e12, seconds=10.0, dtype="float32", device="cpu", peak={"flops_per_s": 1e12})
>>> s["achieved_flops_per_s"], s["fraction_of_peak"]
(200000000000.0, 0.2)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from leantune.atomic import atomic_write_json

PROBE_SIZES = (1024, 2048)
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "leantune" / "matmul_peak.json"


def cpu_flags() -> list[str]:
    """The matmul-relevant flags of this CPU (AVX2, AVX-512, AVX512-BF16, AMX) from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [f for f in _FLAGS if f in present]
    return []


def cpu_summary() -> str:
    """``"<model name> (has|no avx512_bf16)"``: the line every benchmark records with its figures."""
    from leantune.metering import _cpu_model

    return f"{_cpu_model()} ({'has' if 'avx512_bf16' in cpu_flags() else 'no'} avx512_bf16)"


def probe_key(dtype: str, device: str) -> str:
    import torch

    from leantune.metering import _cpu_model

    if device.startswith("cuda"):
        import torch.cuda

        where = f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"
    else:
        where = f"{_cpu_model()} [{' '.join(cpu_flags())}] threads={torch.get_num_threads()}"
    return f"{where} | {device.split(':')[0]} | torch {torch.__version__} | {dtype}"


def _measure(dtype: str, device: str, sizes: tuple[int, ...], repeats: int) -> dict:
    import torch

    dt = getattr(torch, dtype)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    best = {"flops_per_s": 0.0, "size": None}
    t_start = time.perf_counter()
    for n in sizes:
        a = torch.randn(n, n, device=dev).to(dt)
        b = torch.randn(n, n, device=dev).to(dt)
        torch.mm(a, b)  # warm-up: dispatch, packing buffers, clocks
        sync()
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync()
            rate = 2 * n**3 / max(time.perf_counter() - t0, 1e-12)
            if rate > best["flops_per_s"]:
                best = {"flops_per_s": rate, "size": n}
    return {**best, "probe_s": round(time.perf_counter() - t_start, 3),
            "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def matmul_peak(dtype: str, device: str = "cpu", *, refresh: bool = False, sizes: tuple[int, ...] = PROBE_SIZES,
                repeats: int = 3) -> dict:
    """``{"flops_per_s", "size", "probe_s", "measured_utc", "key", "cached"}``: the best FLOP/s of an
    ``n x n`` matmul in ``dtype`` on ``device``, measured once per machine and cached."""
    key = probe_key(dtype, device)
    path = cache_path()
    try:
        cache = json.loads(path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    if not refresh and isinstance(cache.get(key), dict) and cache[key].get("flops_per_s"):
        return {**cache[key], "key": key, "cached": True}
    entry = _measure(dtype, device, sizes, repeats)
    old = cache.get(key) if isinstance(cache.get(key), dict) else {}
    if (old.get("flops_per_s") or 0) > entry["flops_per_s"]:  # a re-probe on a busy machine keeps the best seen
        entry = {**old, "remeasured_utc": entry["measured_utc"], "remeasured_flops_per_s": entry["flops_per_s"]}
    cache[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, cache)
    except OSError:  # a read-only home: measure again next time
        pass
    return {**entry, "key": key, "cached": False}


def compute_summary(*, flops_total: float | None, seconds: float | None, dtype: str, device: str,
                    processes: int = 1, peak: dict | None = None) -> dict | None:
    """Achieved FLOP/s per process (estimated FLOPs / training-step seconds / processes) against the
    measured matmul peak of one process; None when FLOPs or time are missing."""
    if not flops_total or not seconds or seconds <= 0:
        return None
    peak = peak or matmul_peak(dtype, device)
    achieved = flops_total / processes / seconds
    return {
        "achieved_flops_per_s": achieved,
        "matmul_peak_flops_per_s": peak["flops_per_s"],
        "fraction_of_peak": achieved / peak["flops_per_s"] if peak.get("flops_per_s") else None,
        "dtype": dtype,
        "device": device,
        "processes": processes,
        "peak_probe": {k: v for k, v in peak.items() if k != "flops_per_s"},
        "note": "achieved = estimated training FLOPs / seconds inside training steps (evaluation excluded) / processes; "
                "peak = best FLOP/s of a large square matmul on this machine with the same threads and dtype",
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m leantune.compute [--refresh] [--device cpu]``: print this machine's matmul peaks."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m leantune.compute", description=main.__doc__.split(": ", 1)[1])
    ap.add_argument("--refresh", action="store_true", help="measure again (keeps the best figure seen)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    args = ap.parse_args(argv)
    for dtype in ("float32", "bfloat16"):
        peak = matmul_peak(dtype, args.device, refresh=args.refresh)
        print(json.dumps({"dtype": dtype, "gflops_per_s": round(peak["flops_per_s"] / 1e9, 1),
                          **{k: v for k, v in peak.items() if k != "flops_per_s"}}))


if __name__ == "__main__":
    main()
