"""Measuring a run: software versions, hardware, peak process memory and energy.

Energy comes from RAPL counters where readable, NVML on GPU, otherwise a labelled estimate
(watts per core x cores x wall time x CPU load). Every reading says which method produced it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

DEFAULT_WATTS_PER_CORE = 10.0

# --------------------------------------------------------------------------------------------
# Software and hardware


def _dist_version(name: str) -> str | None:
    """Installed version of a distribution without importing it (importing trl takes seconds)."""
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (importable, no package metadata)"


def library_versions() -> dict:
    """Versions of python, torch, transformers, peft, leantune, and trl / bitsandbytes if installed."""
    import torch

    import leantune

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": _dist_version("transformers"),
        "peft": _dist_version("peft"),
        "leantune": leantune.__version__,
        "platform": platform.platform(),
    }
    for optional in ("trl", "bitsandbytes"):
        if (v := _dist_version(optional)) is not None:
            out[optional] = v
    return out


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "Model", "Hardware", "cpu model"):
        for line in text.splitlines():
            if line.split(":", 1)[0].strip() == key and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _cgroup_memory_limit() -> int | None:
    """The container's memory limit in bytes (cgroup v2 or v1), or None when unlimited/unknown."""
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(f).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < psutil.virtual_memory().total:
            return int(raw)
    return None


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return psutil.cpu_count() or 1


def hardware_info() -> dict:
    """CPU model, core counts, RAM (bytes), torch threads, and GPU name + memory (bytes) if CUDA is up."""
    import torch

    info = {
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "usable_cores": _usable_cores(),
        "ram_bytes": psutil.virtual_memory().total,
        "cgroup_memory_limit_bytes": _cgroup_memory_limit(),
        "torch_threads": torch.get_num_threads(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": props.name, "memory_bytes": props.total_memory})
    return info


# --------------------------------------------------------------------------------------------
# Peak memory


def _ru_maxrss_bytes() -> int:
    """Lifetime peak RSS from the kernel: kilobytes on Linux, bytes on macOS."""
    raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return raw if sys.platform == "darwin" else raw * 1024


class PeakMemory:
    """Peak resident memory (bytes) of this process between start() and stop().

    A daemon thread samples RSS every ``interval_s`` (default 10 ms); ``sample()`` lets the training
    loop add a sample at points it knows are high (after backward). Spikes shorter than the interval
    are still caught when they set a new lifetime high-water mark: if the kernel's ``ru_maxrss`` grew
    while tracking, that new maximum happened inside the window and is used as a floor. On CUDA,
    ``cuda_peak_bytes`` is ``torch.cuda.max_memory_allocated()`` since start().

    >>> with PeakMemory() as mem:
    ...     _ = bytearray(1 << 20)
    >>> mem.peak_rss_bytes >= mem.baseline_rss_bytes > 0
    True
    """

    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self.baseline_rss_bytes = 0
        self._peak = 0
        self._maxrss_at_start = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = psutil.Process()
        self.cuda_peak_bytes: int | None = None

    def current_rss_bytes(self) -> int:
        """Resident set size of this process now, in bytes."""
        return self._process.memory_info().rss

    def sample(self) -> int:
        """Take one RSS sample now (a few microseconds); returns it in bytes."""
        rss = self.current_rss_bytes()
        self._peak = max(self._peak, rss)
        return rss

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> PeakMemory:
        self.baseline_rss_bytes = self._peak = self.current_rss_bytes()
        self._maxrss_at_start = _ru_maxrss_bytes()
        if _cuda_ready():
            import torch

            torch.cuda.reset_peak_memory_stats()
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="leantune-peak-memory", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the sampling thread without reading (a failed run's cleanup); safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def stop(self) -> dict:
        """Stop sampling; returns ``{"peak_rss_bytes", "baseline_rss_bytes", "cuda_peak_bytes"}``."""
        self.close()
        self.sample()
        if _cuda_ready():
            import torch

            self.cuda_peak_bytes = int(torch.cuda.max_memory_allocated())
        return {
            "peak_rss_bytes": self.peak_rss_bytes,
            "baseline_rss_bytes": self.baseline_rss_bytes,
            "cuda_peak_bytes": self.cuda_peak_bytes,
        }

    @property
    def peak_rss_bytes(self) -> int:
        """Highest RSS seen since start(), in bytes (kernel high-water mark as a floor, see class doc)."""
        maxrss = _ru_maxrss_bytes()
        floor = maxrss if maxrss > self._maxrss_at_start else 0
        return max(self._peak, floor)

    def __enter__(self) -> PeakMemory:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _cuda_ready() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()


# --------------------------------------------------------------------------------------------
# Energy


def _rapl_zones(root: Path) -> list[tuple[Path, int]]:
    """Readable RAPL zones that do not double count: CPU packages (deduplicated by name, since
    intel-rapl-mmio repeats package-0) and DRAM subzones (not part of the package counter)."""
    zones, seen = [], set()
    for d in sorted(root.glob("*rapl*:*")):
        try:
            name = (d / "name").read_text().strip()
            int((d / "energy_uj").read_text())
        except (OSError, ValueError):
            continue  # energy_uj is root-only on most kernels since 2020 (CVE-2020-8694)
        top_level = d.name.count(":") == 1
        if (top_level and name.startswith("package")) or (not top_level and name == "dram"):
            if name in seen and top_level:
                continue
            seen.add(name)
            try:
                wrap = int((d / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                wrap = 0
            zones.append((d / "energy_uj", wrap))
    return zones


def _nvml_handles() -> list | None:
    """NVML handles of the GPUs this process can see (CUDA_VISIBLE_DEVICES respected via UUIDs)."""
    torch = sys.modules.get("torch")
    if importlib.util.find_spec("pynvml") is None or torch is None or not torch.cuda.is_available():
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = []
        for i in range(torch.cuda.device_count()):
            uuid = getattr(torch.cuda.get_device_properties(i), "uuid", None)
            handles.append(
                pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}") if uuid else pynvml.nvmlDeviceGetHandleByIndex(i)
            )
        for h in handles:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(h)  # raises on pre-Volta GPUs
        return handles
    except Exception:  # noqa: BLE001 - any NVML failure means "not measurable", not a crash
        return None


def _nvml_millijoules(handles: list) -> int:
    import pynvml

    return sum(pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in handles)


class EnergyMeter:
    """Energy (joules) used between start() and stop(), and how it was obtained.

    CPU: Intel/AMD RAPL counters (``/sys/class/powercap/*/energy_uj``, wraparound handled) when
    readable. They measure the whole socket and DRAM, other processes included. Otherwise an
    estimate: ``watts_per_core x cores x wall_s x cpu_load`` with ``cpu_load = process CPU time /
    (wall_s x cores)``, i.e. assumed watts per busy core times this process's CPU seconds; idle and
    uncore power are not counted. GPU: NVML total-energy counters if pynvml is installed and CUDA is
    in use; otherwise GPU energy is not measured and the label says so.

    >>> m = EnergyMeter().start(); _ = sum(i * i for i in range(10000)); r = m.stop()
    >>> r["joules"] >= 0 and "method" in r
    True
    """

    def __init__(
        self,
        watts_per_core: float = DEFAULT_WATTS_PER_CORE,
        cores: int | None = None,
        powercap_root: str | Path = "/sys/class/powercap",
        rapl_poll_s: float = 30.0,
    ):
        self.watts_per_core = watts_per_core
        self.rapl_poll_s = rapl_poll_s
        self.cores = cores or _usable_cores()
        self.powercap_root = Path(powercap_root)
        self._process = psutil.Process()

    def _cpu_seconds(self) -> float:
        t = self._process.cpu_times()
        return t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)

    def _read_rapl(self) -> None:
        """Fold counter deltas since the last read into the total. RAPL counters wrap every
        ~45 min at 100 W, so a daemon thread reads them every ``rapl_poll_s`` between start and stop."""
        with self._lock:
            for i, (path, wrap) in enumerate(self._zones):
                now = int(path.read_text())
                last = self._rapl_last[i]
                self._rapl_uj += now - last if now >= last else now + wrap - last
                self._rapl_last[i] = now

    def _poll_rapl(self) -> None:
        while not self._stop.wait(self.rapl_poll_s):
            try:
                self._read_rapl()
            except (OSError, ValueError):
                return

    def start(self) -> EnergyMeter:
        self._zones = _rapl_zones(self.powercap_root)
        self._rapl_last = [int(p.read_text()) for p, _ in self._zones]
        self._rapl_uj = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if self._zones:
            self._rapl_thread = threading.Thread(target=self._poll_rapl, name="leantune-rapl", daemon=True)
            self._rapl_thread.start()
        self._nvml = _nvml_handles()
        self._nvml_start = _nvml_millijoules(self._nvml) if self._nvml else 0
        self._cpu_start = self._cpu_seconds()
        self._wall_start = time.perf_counter()
        return self

    def stop(self) -> dict:
        """Joules since start() plus the method label and every assumption behind the number."""
        out = self.reading()
        self.close()
        return out

    def close(self) -> None:
        """Stop the RAPL polling thread without reading (a failed run's cleanup); safe to call twice."""
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        thread = getattr(self, "_rapl_thread", None)
        if thread is not None:
            thread.join()
            self._rapl_thread = None

    def reading(self) -> dict:
        """Like stop(), without stopping: the energy so far (used to carry totals across a resume)."""
        wall = time.perf_counter() - self._wall_start
        cpu_s = self._cpu_seconds() - self._cpu_start
        load = min(1.0, cpu_s / (wall * self.cores)) if wall > 0 else 0.0
        out: dict[str, Any] = {"wall_s": wall, "cpu_time_s": cpu_s, "cores": self.cores, "cpu_load": load}
        cpu_j = None
        if self._zones:
            try:
                self._read_rapl()
                cpu_j = self._rapl_uj / 1e6
                out["cpu_method"] = "RAPL (measured, whole CPU package + DRAM, all processes)"
            except (OSError, ValueError):
                cpu_j = None
        if cpu_j is None:
            cpu_j = self.watts_per_core * self.cores * wall * load
            out["cpu_method"] = "estimate: TDP x time x load"
            out["assumed_watts_per_core"] = self.watts_per_core
        out["cpu_joules"] = cpu_j
        if self._nvml:
            out["gpu_joules"] = (_nvml_millijoules(self._nvml) - self._nvml_start) / 1e3
            out["gpu_method"] = "NVML (measured, whole visible GPUs)"
        else:
            torch = sys.modules.get("torch")
            on_gpu = torch is not None and torch.cuda.is_available()
            out["gpu_joules"] = None
            out["gpu_method"] = "not measured: pynvml missing or unsupported GPU" if on_gpu else "no GPU"
        out["joules"] = cpu_j + (out["gpu_joules"] or 0.0)
        out["method"] = out["cpu_method"] + (" + NVML" if self._nvml else "")
        return out


