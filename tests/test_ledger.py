"""The ledger: hashes, atomic files, metrics log, peak memory, energy, FLOPs estimate, assembly."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from leantune import ledger as L


# ---------------------------------------------------------------------------------------------
# Hashes


def test_sha256_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 9000  # > 1 MiB chunk, so the streamed path crosses a boundary
    f = tmp_path / "blob.bin"
    f.write_bytes(data)
    assert L.sha256_file(f) == hashlib.sha256(data).hexdigest()
    g = tmp_path / "abc.txt"
    g.write_bytes(b"abc")
    assert L.sha256_paths([f, str(g)]) == {
        str(f): hashlib.sha256(data).hexdigest(),
        str(g): "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    }


def test_model_weights_hash_dir_file_and_hub_id(tmp_path):
    (tmp_path / "model-00001.safetensors").write_bytes(b"w1")
    (tmp_path / "model.gguf").write_bytes(b"w2")
    (tmp_path / "config.json").write_text("{}")  # not a weight file
    h = L.model_weights_hash(tmp_path)
    assert h["files"] == {
        "model-00001.safetensors": hashlib.sha256(b"w1").hexdigest(),
        "model.gguf": hashlib.sha256(b"w2").hexdigest(),
    }
    assert len(h["combined"]) == 64
    single = L.model_weights_hash(tmp_path / "model.gguf")
    assert single["files"] == {"model.gguf": hashlib.sha256(b"w2").hexdigest()}
    (tmp_path / "model.gguf").write_bytes(b"changed")
    assert L.model_weights_hash(tmp_path)["combined"] != h["combined"]
    assert L.model_weights_hash("HuggingFaceTB/not-on-this-disk") == {
        "id": "HuggingFaceTB/not-on-this-disk",
        "note": "not a local path",
    }


# ---------------------------------------------------------------------------------------------
# Atomic writes and the metrics log


class _Unserializable:
    def item(self):
        raise RuntimeError("serializer failed mid-way")


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "ledger.json"
    L.atomic_write_json(target, {"version": 1})
    before = target.read_text()
    # A large first value gets written into the temp file before the bad object is reached.
    with pytest.raises(RuntimeError, match="mid-way"):
        L.atomic_write_json(target, {"big": "x" * 200_000, "bad": _Unserializable()})
    assert target.read_text() == before
    assert json.loads(before) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]  # no temp file left behind
    L.atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]


def test_read_metrics_tolerates_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with L.MetricsLog(path) as log:
        log.log({"step": 1, "loss": 2.5})
        log.log({"step": 2, "loss": 2.25, "p": Path("x")})
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')  # the run was killed mid-write
    assert L.read_metrics(path) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25, "p": "x"}]

    # Resuming drops the torn tail instead of gluing the next record onto it.
    with L.MetricsLog(path) as log:
        log.log({"step": 3, "loss": 2.0})
    assert [r["step"] for r in L.read_metrics(path)] == [1, 2, 3]

    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        L.read_metrics(path)


# ---------------------------------------------------------------------------------------------
# Peak memory and energy


def test_peak_memory_sees_a_200mb_allocation():
    with L.PeakMemory() as mem:
        x = torch.ones(50 * 2**20, dtype=torch.float32)  # 200 MiB, every page touched
        time.sleep(0.1)
        del x
        time.sleep(0.05)
    assert mem.peak_rss_bytes >= mem.baseline_rss_bytes + 150 * 2**20
    assert mem.current_rss_bytes() > 0
    assert mem.cuda_peak_bytes is None or mem.cuda_peak_bytes >= 0


def test_peak_memory_sample_without_thread_interval():
    mem = L.PeakMemory(interval_s=60.0).start()  # the poller will not fire: only sample() counts
    x = torch.ones(50 * 2**20, dtype=torch.float32)
    mem.sample()
    del x
    out = mem.stop()
    assert out["peak_rss_bytes"] >= out["baseline_rss_bytes"] + 150 * 2**20


def test_energy_meter_reports_positive_joules_and_method():
    meter = L.EnergyMeter(watts_per_core=12.5).start()
    t0 = time.process_time()
    a = torch.randn(256, 256)
    while time.process_time() - t0 < 0.2:
        a = torch.tanh(a @ a)
    r = meter.stop()
    assert r["joules"] > 0
    assert r["method"]
    if r["cpu_method"].startswith("estimate"):
        assert r["method"].startswith("estimate: TDP x time x load")
        assert r["assumed_watts_per_core"] == 12.5
        assert r["joules"] == pytest.approx(12.5 * r["cores"] * r["wall_s"] * r["cpu_load"])
        assert 0 < r["cpu_load"] <= 1


def test_rapl_wraparound(tmp_path):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text("1000000\n")
    (zone / "energy_uj").write_text("999000\n")
    sub = tmp_path / "intel-rapl:0:0"  # the core subzone is inside package-0: must not be added
    sub.mkdir()
    (sub / "name").write_text("core\n")
    (sub / "energy_uj").write_text("5\n")
    meter = L.EnergyMeter(powercap_root=tmp_path, rapl_poll_s=3600).start()
    (sub / "energy_uj").write_text("999999\n")
    (zone / "energy_uj").write_text("1000\n")  # wrapped: 1000 uJ to the top, 1000 uJ after
    meter._read_rapl()  # what the poller does every rapl_poll_s: a second wrap is then counted too
    (zone / "energy_uj").write_text("500\n")  # wrapped again: 999000 uJ more
    r = meter.stop()
    assert r["cpu_method"].startswith("RAPL")
    assert r["cpu_joules"] == pytest.approx(0.002 + 0.9995)


# ---------------------------------------------------------------------------------------------
# FLOPs


def test_full_finetune_is_6N_per_token():
    n, tokens = 1_000_000, 4096
    f = L.estimate_train_flops(tokens=tokens, n_layers=4, hidden=256, body_params=n, trainable_body_params=n)
    assert f["total"] == 6 * n * tokens
    assert f["per_token"] == 6 * n


def test_llama_dims_derive_body_params():
    # 1 layer, H=4, I=8, no GQA: q,k,v,o = 4 * 16, MLP = 3 * 32 -> 160 weights
    f = L.estimate_train_flops(tokens=1, n_layers=1, hidden=4, intermediate=8, trainable_body_params=0, lora_params=1)
    assert f["inputs"]["body_params"] == 160
    assert f["body_forward"] == 320 and f["body_backward_activations"] == 320 and f["lora"] == 6


def test_lora_costs_less_than_full_and_frozen_model_needs_no_backward():
    common = dict(tokens=1000, n_layers=2, hidden=64, seq_len=128, vocab=512, body_params=73728)
    full = L.estimate_train_flops(**common, trainable_body_params=73728, lm_head_trainable=True)
    lora = L.estimate_train_flops(**common, lora_params=7168)
    frozen = L.estimate_train_flops(**common)
    assert frozen["total"] < lora["total"] < full["total"]
    assert frozen["body_backward_activations"] == 0
    # Attention: forward 2*L*T*H per token, backward twice that.
    assert lora["attention_forward"] == 2 * 2 * 128 * 64 * 1000
    assert lora["body_backward_activations"] == 2 * 73728 * 1000 + 2 * lora["attention_forward"]


def test_logits_masking_scales_lm_head_flops():
    common = dict(tokens=1000, n_layers=2, hidden=64, vocab=512, body_params=0, lora_params=10)
    all_tokens = L.estimate_train_flops(**common)
    masked = L.estimate_train_flops(**common, loss_tokens=300)
    assert all_tokens["lm_head"] == 4 * 512 * 64 * 1000
    assert masked["lm_head"] == pytest.approx(0.3 * all_tokens["lm_head"])
    trainable_head = L.estimate_train_flops(**common, loss_tokens=300, lm_head_trainable=True)
    assert trainable_head["lm_head"] == 6 * 512 * 64 * 300


def test_checkpointing_adds_one_forward_of_checkpointed_layers():
    common = dict(tokens=100, n_layers=2, hidden=8, seq_len=16, body_params=1000, lora_params=50)
    base = L.estimate_train_flops(**common)
    half = L.estimate_train_flops(**common, checkpoint_fraction=0.5)
    one_forward = base["body_forward"] + base["attention_forward"] + 2 * 50 * 100
    assert half["total"] - base["total"] == 0.5 * one_forward
    with pytest.raises(ValueError, match="checkpoint_fraction"):
        L.estimate_train_flops(**common, checkpoint_fraction=2)
    with pytest.raises(ValueError, match="loss_tokens"):
        L.estimate_train_flops(**common, loss_tokens=101)


def test_flops_from_model_counts_trainable_frozen_lora_and_head():
    from leantune.adapters.lora import apply_adapter
    from leantune.config import AdapterConfig
    from leantune.models.tiny import tiny_model

    body = L.decoder_body_params(n_layers=2, hidden=64, intermediate=128, kv_hidden=32)
    full = L.model_param_counts(tiny_model())
    assert full == {"body_params": body, "trainable_body_params": body, "lora_params": 0,
                    "lm_head_params": 512 * 64, "lm_head_trainable": True}
    peft_model = apply_adapter(tiny_model(), AdapterConfig(r=8, target_modules=["q_proj", "v_proj"]))
    counts = L.model_param_counts(peft_model)
    # q: 64x8 + 8x64, v: 64x8 + 8x32 (GQA, 2 kv heads of 16), two layers
    assert counts["lora_params"] == 2 * (1024 + 768)
    assert counts["trainable_body_params"] == 0 and counts["body_params"] == body
    assert counts["lm_head_trainable"] is False
    f = L.flops_from_model(peft_model, tokens=1000, loss_tokens=250, seq_len=64, checkpoint_fraction=1.0)
    assert f["inputs"]["vocab"] == 512 and f["inputs"]["n_layers"] == 2
    assert f["lm_head"] == 4 * 512 * 64 * 250
    assert f["total"] == sum(v for k, v in f.items() if k not in ("total", "per_token", "method", "inputs"))


# ---------------------------------------------------------------------------------------------
# Environment and the ledger


def test_versions_and_hardware():
    v = L.library_versions()
    assert {"python", "torch", "transformers", "peft", "leantune"} <= set(v)
    import leantune

    assert v["leantune"] == leantune.__version__
    hw = L.hardware_info()
    assert hw["logical_cores"] >= 1 and hw["ram_bytes"] > 0 and hw["torch_threads"] >= 1
    assert isinstance(hw["cpu"], str) and hw["cpu"]
    assert isinstance(hw["gpus"], list)


def test_build_and_write_ledger(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"weights")
    flops = L.estimate_train_flops(tokens=1000, n_layers=1, hidden=4, body_params=10, lora_params=2)
    energy = {"joules": 50.0, "method": "estimate: TDP x time x load", "assumed_watts_per_core": 10.0}
    started = time.time() - 5
    led = L.build_ledger(
        recipe={"model": {"path": str(model_dir)}},
        data_files=[str(data), None],
        model_location=str(model_dir),
        seed=7,
        totals={"steps": 3, "tokens": 1000, "trainable_tokens": 400, "wall_s": 5.0, "peak_rss_bytes": 2**30},
        flops=flops,
        energy=energy,
        extra={"note": "test"},
        started_unix=started,
    )
    for key in ("recipe", "seed", "model_hash", "data_sha256", "versions", "hardware", "totals", "per_token",
                "flops", "energy", "timestamps", "extra", "schema"):
        assert key in led, key
    assert led["data_sha256"] == {str(data): hashlib.sha256(data.read_bytes()).hexdigest()}
    assert led["model_hash"]["files"] == {"model.safetensors": hashlib.sha256(b"weights").hexdigest()}
    assert set(L.TOTALS_KEYS) <= set(led["totals"]) and led["totals"]["cuda_max_allocated_bytes"] is None
    assert led["totals"]["tokens_processed"] == 1000 and led["totals"]["wall_time_s"] == 5.0  # aliases mapped
    assert led["per_token"]["joules_per_token"] == pytest.approx(0.05)
    assert led["per_token"]["tokens_per_s"] == pytest.approx(200.0)
    assert led["timestamps"]["finished_utc"].endswith("+00:00") and led["timestamps"]["started_utc"]

    path = L.write_ledger(tmp_path / "run", led)
    assert path == tmp_path / "run" / "ledger.json"
    assert json.loads(path.read_text())["seed"] == 7

    text = L.summarize_ledger(led)
    for word in ("tokens", "1,000", "energy", "J/token", "FLOPs", "peak memory", "1.00 GiB", "sha256"):
        assert word in text, word


def test_ledger_records_unreadable_data_instead_of_crashing(tmp_path):
    led = L.build_ledger(recipe={}, data_files=[str(tmp_path / "gone.jsonl")], model_location="some/hub-id",
                         seed=0, totals={}, flops={}, energy={"joules": 1.0, "wall_s": 60.0})
    assert led["timestamps"]["started_utc"] < led["timestamps"]["finished_utc"]  # dated from the meter's wall_s
    assert led["data_sha256"][str(tmp_path / "gone.jsonl")].startswith("unreadable")
    assert led["model_hash"]["note"] == "not a local path"
    assert "not a local path" in L.summarize_ledger(led)


def test_heap_allocator_restores_the_training_thresholds(monkeypatch):
    from leantune import allocator as metering

    calls = []
    monkeypatch.setattr(metering, "set_malloc_mmap_threshold", lambda n: calls.append(("mmap", n)) or True)
    monkeypatch.setattr(metering, "set_malloc_trim_threshold", lambda n: calls.append(("trim", n)) or True)
    monkeypatch.setattr(metering, "malloc_trim", lambda: calls.append(("malloc_trim",)) or True)
    with metering.heap_allocator(131072):
        assert calls == [("mmap", metering.HEAP_MMAP_THRESHOLD), ("trim", metering.HEAP_TRIM_THRESHOLD)]
    assert calls[2:] == [("mmap", 131072), ("trim", metering.GLIBC_TRIM_THRESHOLD), ("malloc_trim",)]
    calls.clear()
    with pytest.raises(RuntimeError), metering.heap_allocator(4096):
        raise RuntimeError("sampling failed")
    assert calls[2:] == [("mmap", 4096), ("trim", metering.GLIBC_TRIM_THRESHOLD), ("malloc_trim",)]  # on error too
    calls.clear()
    with metering.heap_allocator(None):  # glibc left alone
        pass
    assert calls == []


_REUSE_PROBE = """
import resource, torch
from leantune import allocator as metering
assert metering.set_malloc_mmap_threshold(131072)
def faults_of_reuse():
    torch.empty(2**21).fill_(1.0)  # 8 MiB, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.empty(2**21).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
outside = faults_of_reuse()  # each one a fresh mmap, faulted in 4 KiB page by page
with metering.heap_allocator(131072):
    faults_of_reuse()  # the heap grows to the working set
    faults_of_reuse()
    inside = faults_of_reuse()
print(outside, inside)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc tunables")
def test_heap_allocator_keeps_pages_for_reuse():
    """On glibc, once the heap has grown to the working set, a freed 8 MiB buffer allocated again inside
    ``heap_allocator`` faults (almost) no pages in. In a fresh process: glibc's choices depend on the heap's history."""
    out = subprocess.run([sys.executable, "-c", _REUSE_PROBE], capture_output=True, text=True, timeout=120, check=False,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    outside, inside = map(int, out.stdout.split())
    assert outside > 20 * 1000 and inside < outside / 5  # ~41k faults outside; inside 0 or one buffer's 2k
