"""The run ledger: what a run used (model, data, code, hardware, seed) and what it cost (tokens, FLOPs,
time, memory, energy), written atomically as ``RUN_DIR/ledger.json`` next to ``metrics.jsonl``.

MISSION G1 (arXiv 2512.11588: a score without metadata is quicksand) and G2 (arXiv 2602.05712:
report energy per token). Every measured number says how it was measured; every estimated number says
that it is an estimate and what it assumed.

>>> f = estimate_train_flops(tokens=10, n_layers=1, hidden=4, body_params=100, trainable_body_params=100)
>>> f["total"]  # full fine-tuning, no attention term, no lm_head: 6 * N * tokens
6000
>>> format_bytes(1536 * 2**20)
'1.50 GiB'
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import psutil

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")
DEFAULT_WATTS_PER_CORE = 10.0
_CHUNK = 1 << 20  # 1 MiB reads keep hashing memory flat for multi-GB weight files

# --------------------------------------------------------------------------------------------
# Hashes


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (constant memory, ~1 GB/s)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_paths(paths: Iterable[str | Path]) -> dict[str, str]:
    """``{path as given: hex SHA-256}`` for each file. A missing file raises FileNotFoundError."""
    return {str(p): sha256_file(p) for p in paths}


def _combined(files: dict[str, str]) -> str:
    """One digest over (name, digest) pairs in name order: changes if any file or name changes."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]}\n".encode())
    return h.hexdigest()


def model_weights_hash(location: str | Path) -> dict:
    """Hashes of a model's weight files (*.safetensors, *.gguf, *.bin).

    ``location`` is a local directory (weight files at its top level, else anywhere below it), a
    single weight file, or a hub id. Returns ``{"files": {relative name: sha256}, "combined": sha256}``;
    for a hub id that is not a local path, ``{"id": location, "note": "not a local path"}`` (the
    ledger then cannot prove which revision was used).
    """
    p = Path(location).expanduser()
    if p.is_file():
        files = {p.name: sha256_file(p)}
        return {"files": files, "combined": _combined(files)}
    if not p.is_dir():
        return {"id": str(location), "note": "not a local path"}
    found = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    if not found:
        found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    files = {f.relative_to(p).as_posix(): sha256_file(f) for f in found}
    if not files:
        return {"files": {}, "combined": None, "note": f"no {'/'.join(WEIGHT_SUFFIXES)} files under {p}"}
    return {"files": files, "combined": _combined(files)}


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
        if rss > self._peak:
            self._peak = rss
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

    def stop(self) -> dict:
        """Stop sampling; returns ``{"peak_rss_bytes", "baseline_rss_bytes", "cuda_peak_bytes"}``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
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
            threading.Thread(target=self._poll_rapl, name="leantune-rapl", daemon=True).start()
        self._nvml = _nvml_handles()
        self._nvml_start = _nvml_millijoules(self._nvml) if self._nvml else 0
        self._cpu_start = self._cpu_seconds()
        self._wall_start = time.perf_counter()
        return self

    def stop(self) -> dict:
        """Joules since start() plus the method label and every assumption behind the number."""
        out = self.reading()
        self._stop.set()
        return out

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


# --------------------------------------------------------------------------------------------
# FLOPs


def decoder_body_params(*, n_layers: int, hidden: int, intermediate: int, kv_hidden: int | None = None, gated_mlp: bool = True) -> int:
    """Matmul weights of a Llama-style decoder stack (no embeddings, no lm_head, norms ignored).

    Per layer: q and o projections ``2 * hidden^2``, k and v ``2 * hidden * kv_hidden``
    (kv_hidden = n_kv_heads * head_dim, default hidden), MLP ``3 * hidden * intermediate``
    (gate, up, down) or ``2 * ...`` without gating.

    >>> decoder_body_params(n_layers=2, hidden=64, intermediate=128, kv_hidden=32)
    73728
    """
    kv = hidden if kv_hidden is None else kv_hidden
    return n_layers * (2 * hidden * hidden + 2 * hidden * kv + (3 if gated_mlp else 2) * hidden * intermediate)


def estimate_train_flops(
    *,
    tokens: int,
    n_layers: int,
    hidden: int,
    loss_tokens: int | None = None,
    seq_len: int = 0,
    vocab: int = 0,
    body_params: int | None = None,
    intermediate: int | None = None,
    kv_hidden: int | None = None,
    trainable_body_params: int = 0,
    lora_params: int = 0,
    lm_head_trainable: bool = False,
    checkpoint_fraction: float = 0.0,
) -> dict:
    """Training FLOPs (multiply + add = 2) of a decoder LM, aware of LoRA, logits masking and
    activation checkpointing. An estimate from parameter counts (Kaplan et al., arXiv 2001.08361, §2.1),
    not a profile: elementwise ops, norms, softmax and optimizer updates are left out.

    Per processed token (``tokens``: every position through the stack):
      * body forward ``2 * N_body`` (N_body = matmul weights of the layers, frozen + trainable,
        adapters excluded; give ``body_params`` or ``intermediate`` to derive it Llama-style),
        plus attention scores and values ``2 * n_layers * seq_len * hidden`` (Kaplan's term;
        ``seq_len`` 0 drops it);
      * body backward, activation gradients ``2 * N_body`` + attention ``2x`` its forward (Q, K and V
        are all activations), through every layer since the gradient must reach the earliest
        adapter; zero when nothing in the body is trainable;
      * weight gradients ``2 * N_trainable`` only for trainable base weights (full fine-tuning:
        2 + 2 + 2 = the classic 6N; LoRA: 0);
      * LoRA adapters ``6 * N_lora`` (forward, activation and weight gradients);
      * activation checkpointing recomputes the forward of ``checkpoint_fraction`` of the layers.
    Per loss-carrying token (``loss_tokens``: positions where logits are computed; with logits
    masking only the trainable ones, default all tokens): lm_head forward ``2 * V * H`` and
    backward ``2 * V * H`` (activation gradient), ``+ 2 * V * H`` if the lm_head is trainable.

    Returns ``{part: FLOPs}`` for each term, ``"total"``, ``"per_token"`` (total / tokens), ``"method"``
    and the ``"inputs"`` used.
    """
    if body_params is None:
        if intermediate is None:
            raise ValueError("estimate_train_flops: give body_params, or intermediate (and kv_hidden) to derive it")
        body_params = decoder_body_params(n_layers=n_layers, hidden=hidden, intermediate=intermediate, kv_hidden=kv_hidden)
    if not 0.0 <= checkpoint_fraction <= 1.0:
        raise ValueError(f"checkpoint_fraction={checkpoint_fraction}: must be in [0, 1] (fraction of layers recomputed)")
    loss_tokens = tokens if loss_tokens is None else loss_tokens
    if loss_tokens > tokens:
        raise ValueError(f"loss_tokens={loss_tokens} > tokens={tokens}: loss positions are a subset of processed ones")
    needs_body_backward = trainable_body_params > 0 or lora_params > 0

    attn_fwd = 2 * n_layers * seq_len * hidden * tokens
    parts = {
        "body_forward": 2 * body_params * tokens,
        "attention_forward": attn_fwd,
        "body_backward_activations": (2 * body_params * tokens + 2 * attn_fwd) if needs_body_backward else 0,
        "body_weight_gradients": 2 * trainable_body_params * tokens,
        "lora": 6 * lora_params * tokens,
        "lm_head": (4 + (2 if lm_head_trainable else 0)) * vocab * hidden * loss_tokens,
    }
    recompute = parts["body_forward"] + attn_fwd + 2 * lora_params * tokens
    parts["checkpoint_recompute"] = round(checkpoint_fraction * recompute)
    total = sum(parts.values())
    return {
        **parts,
        "total": total,
        "per_token": total / tokens if tokens else 0.0,
        "method": "estimate: parameter counting (2 FLOPs per weight per token per pass), LoRA- and logits-mask-aware",
        "inputs": {
            "tokens": tokens, "loss_tokens": loss_tokens, "n_layers": n_layers, "hidden": hidden,
            "seq_len": seq_len, "vocab": vocab, "body_params": body_params,
            "trainable_body_params": trainable_body_params, "lora_params": lora_params,
            "lm_head_trainable": lm_head_trainable, "checkpoint_fraction": checkpoint_fraction,
        },
    }


def _config_int(config, *names: str) -> int | None:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int):
            return v
    return None


def model_param_counts(model) -> dict:
    """Matmul weight counts of a torch causal LM, split the way ``estimate_train_flops`` needs them.

    Leaf modules with ``in_features``/``out_features`` (nn.Linear, quantized linears, PEFT's lora_A /
    lora_B) count ``in * out``; other leaves count their >=2-D parameters; embeddings count nothing
    (a lookup). LoRA = leaves whose name contains ``lora_``; lm_head = ``get_output_embeddings()``.
    """
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    counts = {"body_params": 0, "trainable_body_params": 0, "lora_params": 0, "lm_head_params": 0, "lm_head_trainable": False}
    for name, mod in model.named_modules():
        if any(True for _ in mod.children()) or mod is inp or isinstance(mod, torch.nn.Embedding):
            continue
        own = list(mod.parameters(recurse=False))
        if isinstance(getattr(mod, "in_features", None), int) and isinstance(getattr(mod, "out_features", None), int):
            n = mod.in_features * mod.out_features
        else:
            n = sum(p.numel() for p in own if p.dim() >= 2)
        if n == 0:
            continue
        trainable = any(p.requires_grad for p in own)
        if mod is head:
            counts["lm_head_params"] = n
            counts["lm_head_trainable"] = trainable
        elif "lora_" in name:
            counts["lora_params"] += n
        else:
            counts["body_params"] += n
            counts["trainable_body_params"] += n if trainable else 0
    return counts


def flops_from_model(model, *, tokens: int, loss_tokens: int | None = None, seq_len: int = 0, checkpoint_fraction: float = 0.0) -> dict:
    """``estimate_train_flops`` with parameter counts taken from ``model`` (see ``model_param_counts``);
    n_layers and hidden from ``model.config``, V from the lm_head size. ``seq_len``: mean sequence
    length of the batches (0 leaves out the attention-score term)."""
    config = getattr(model, "config", None)
    n_layers = _config_int(config, "num_hidden_layers", "n_layer", "num_layers") or 0
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model") or 0
    c = model_param_counts(model)
    return estimate_train_flops(
        tokens=tokens,
        loss_tokens=loss_tokens,
        n_layers=n_layers,
        hidden=hidden,
        seq_len=seq_len,
        vocab=c["lm_head_params"] // hidden if hidden else 0,
        body_params=c["body_params"],
        trainable_body_params=c["trainable_body_params"],
        lora_params=c["lora_params"],
        lm_head_trainable=c["lm_head_trainable"],
        checkpoint_fraction=checkpoint_fraction,
    )


# --------------------------------------------------------------------------------------------
# Files: atomic writes and the metrics log


@contextmanager
def _atomic_open(path: str | Path):
    """A text file handle whose contents replace ``path`` only if the block finishes: temp file in
    the same directory (same filesystem, so os.replace is atomic), fsync, replace, fsync the dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # some filesystems (and Windows) cannot fsync a directory
        pass


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` so readers see the old file or the new one, never half of either."""
    with _atomic_open(path) as f:
        f.write(text)
    return Path(path)


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "model_dump"):  # pydantic
        return obj.model_dump()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """``atomic_write_text`` for JSON (indent 2; Paths, sets, tensor scalars and pydantic models converted)."""
    with _atomic_open(path) as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")
    return Path(path)


class MetricsLog:
    """Append-only JSON lines: one ``log(dict)`` = one line, flushed, so a killed run keeps every
    finished line. Reopening drops a torn last line left by a crash before appending."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        self._f.write(json.dumps(record, default=_json_default) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_torn_tail(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl. A torn last line (the run was killed mid-write) is skipped; a bad
    line anywhere else is an error naming file:line."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no newline after it: a torn final write
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON object ({e.msg}); fix or delete that line") from e
    return records


# --------------------------------------------------------------------------------------------
# The ledger

TOTALS_KEYS = ("steps", "tokens_processed", "trainable_tokens", "wall_time_s", "peak_rss_bytes", "cuda_max_allocated_bytes")
# Short names a caller may use for the same totals.
TOTALS_ALIASES = {"tokens": "tokens_processed", "wall_s": "wall_time_s", "cuda_peak_bytes": "cuda_max_allocated_bytes"}

def _utc_iso(t: float | None = None) -> str:
    return _dt.datetime.fromtimestamp(time.time() if t is None else t, tz=_dt.timezone.utc).isoformat(timespec="seconds")


def _safe_sha(path: str) -> str:
    try:
        return sha256_file(path)
    except OSError as e:  # the ledger is written at the end of a run: record the problem, do not crash
        return f"unreadable: {e.strerror or e}"


def build_ledger(
    *,
    recipe: dict,
    data_files: list[str],
    model_location: str,
    seed: int,
    totals: dict,
    flops: dict,
    energy: dict,
    extra: dict | None = None,
    started_unix: float | None = None,
) -> dict:
    """The ledger dict of one run.

    ``totals`` carries ``steps``, ``tokens_processed``, ``trainable_tokens`` (loss-carrying),
    ``wall_time_s``, ``peak_rss_bytes``, ``cuda_max_allocated_bytes`` (or the short names in
    ``TOTALS_ALIASES``); missing ones are recorded as None, extra keys are kept. ``flops`` is an
    ``estimate_train_flops`` result, ``energy`` an ``EnergyMeter.stop()`` result. ``started_unix``
    (time.time() at start) dates the start; without it the start is now minus the energy meter's wall_s.
    """
    totals = {TOTALS_ALIASES.get(k, k): v for k, v in totals.items()}
    tot = {k: totals.get(k) for k in TOTALS_KEYS} | {k: v for k, v in totals.items() if k not in TOTALS_KEYS}
    tokens, wall, joules = tot["tokens_processed"], tot["wall_time_s"], (energy or {}).get("joules")
    now = time.time()
    if started_unix is None and (energy or {}).get("wall_s") is not None:
        started_unix = now - energy["wall_s"]
    per_token = {
        "tokens_per_s": tokens / wall if tokens and wall else None,
        "joules_per_token": joules / tokens if tokens and joules is not None else None,
        "flops_per_token": (flops or {}).get("total", 0) / tokens if tokens and flops else None,
    }
    return {
        "schema": "leantune.ledger/1",
        "recipe": recipe,
        "seed": seed,
        "model_hash": {"location": str(model_location), **model_weights_hash(model_location)},
        "data_sha256": {str(p): _safe_sha(str(p)) for p in data_files if p},
        "versions": library_versions(),
        "hardware": hardware_info(),
        "totals": tot,
        "per_token": per_token,
        "flops": flops,
        "energy": energy,
        "timestamps": {
            "started_utc": _utc_iso(started_unix) if started_unix is not None else None,
            "finished_utc": _utc_iso(now),
        },
        "extra": extra or {},
    }


def write_ledger(run_dir: str | Path, ledger: dict) -> Path:
    """Write ``run_dir/ledger.json`` atomically; returns its path."""
    return atomic_write_json(Path(run_dir) / "ledger.json", ledger)


def format_bytes(n: float | None) -> str:
    """Binary units, 3 significant digits: ``format_bytes(2**30) == '1.00 GiB'``."""
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def summarize_ledger(ledger: dict) -> str:
    """A few plain-text lines for the terminal: what ran, on what, and what it cost."""
    t, v, hw = ledger.get("totals", {}), ledger.get("versions", {}), ledger.get("hardware", {})
    pt, fl, en = ledger.get("per_token", {}), ledger.get("flops") or {}, ledger.get("energy") or {}
    model = ledger.get("model_hash", {})
    gpus = ", ".join(g["name"] for g in hw.get("gpus", [])) or "no GPU"

    def num(x, fmt="{:,}"):
        return "n/a" if x is None else fmt.format(x)

    rows = [
        ("run", f"leantune {v.get('leantune', '?')}, torch {v.get('torch', '?')}, seed {ledger.get('seed')}"),
        ("hardware", f"{hw.get('cpu', '?')} ({hw.get('usable_cores', '?')} cores), {format_bytes(hw.get('ram_bytes'))} RAM, {gpus}"),
        ("steps", num(t.get("steps"))),
        ("tokens", f"{num(t.get('tokens_processed'))} processed, {num(t.get('trainable_tokens'))} trainable"),
        ("wall time", f"{num(t.get('wall_time_s'), '{:.1f}')} s ({num(pt.get('tokens_per_s'), '{:,.0f}')} tokens/s)"),
        ("peak memory", f"{format_bytes(t.get('peak_rss_bytes'))} RSS"
         + (f", {format_bytes(t['cuda_max_allocated_bytes'])} CUDA" if t.get("cuda_max_allocated_bytes") else "")),
        ("compute", f"{num(fl.get('total'), '{:.3g}')} FLOPs ({fl.get('method', 'not estimated')})"),
        ("energy", f"{num(en.get('joules'), '{:.3g}')} J, {num(pt.get('joules_per_token'), '{:.3g}')} J/token ({en.get('method', 'not measured')}"
         + (f", {en['assumed_watts_per_core']} W/core assumed" if "assumed_watts_per_core" in en else "") + ")"),
    ]
    if model.get("combined"):
        rows.append(("model", f"{model['location']} sha256 {model['combined'][:16]} ({len(model['files'])} file{'s' if len(model['files']) != 1 else ''})"))
    else:
        rows.append(("model", f"{model.get('location', '?')} ({model.get('note', 'no hash')})"))
    for path, sha in ledger.get("data_sha256", {}).items():
        rows.append(("data", f"{path} sha256 {sha[:16]}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {val}" for k, val in rows)
