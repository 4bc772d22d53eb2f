"""train.allocator: finding jemalloc / tbbmalloc, the LD_PRELOAD environment, and the CLI's one re-exec."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import tiny_recipe

from leantune import allocator
from leantune.allocator import AllocatorError, preload_env, preload_for


def _libdir(tmp_path, *names):
    for n in names:
        (tmp_path / n).write_bytes(b"")
    return [str(tmp_path)]


def test_choices_and_missing_libraries(tmp_path):
    assert preload_for("system") is None
    assert preload_for("auto", dirs=[]) is None  # nothing found: the system's malloc, no error
    with pytest.raises(AllocatorError, match="train.allocator: jemalloc is not installed"):
        preload_for("jemalloc", dirs=[])
    with pytest.raises(AllocatorError, match="pip install tbb"):
        preload_for("tbbmalloc", dirs=_libdir(tmp_path, "libtbbmalloc.so.2"))  # the proxy is missing
    with pytest.raises(AllocatorError, match="not one of"):
        preload_for("mimalloc")


def test_auto_prefers_jemalloc_then_tbbmalloc(tmp_path):
    (tmp_path / "a").mkdir()
    tbb_only = _libdir(tmp_path / "a", "libtbbmalloc.so.2", "libtbbmalloc_proxy.so.2")
    pre = preload_for("auto", dirs=tbb_only)
    assert pre.name == "tbbmalloc"
    assert [os.path.basename(p) for p in pre.libs] == ["libtbbmalloc.so.2", "libtbbmalloc_proxy.so.2"]  # lib first
    (tmp_path / "b").mkdir()
    both = _libdir(tmp_path / "b", "libjemalloc.so.2", "libtbbmalloc.so.2", "libtbbmalloc_proxy.so.2")
    assert preload_for("auto", dirs=both).name == "jemalloc"
    assert preload_for("tbbmalloc", dirs=both).name == "tbbmalloc"


def test_preload_env_keeps_existing_preloads_and_user_conf(tmp_path):
    dirs = _libdir(tmp_path, "libjemalloc.so.2")
    lib = str((tmp_path / "libjemalloc.so.2").resolve())
    env = preload_env("jemalloc", base={"LD_PRELOAD": "/x/libfoo.so"}, dirs=dirs)
    assert env["LD_PRELOAD"].split() == [lib, "/x/libfoo.so"]
    assert env["MALLOC_CONF"] == allocator.JEMALLOC_CONF
    env = preload_env("jemalloc", base={"MALLOC_CONF": "narenas:1"}, dirs=dirs)
    assert env["MALLOC_CONF"] == "narenas:1"  # the user's setting wins
    assert preload_env("system", base={"A": "1"}) == {"A": "1"}


def test_reexec_happens_once_and_only_when_needed(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(allocator.os, "execve", lambda exe, argv, env: calls.append((argv, env)))
    monkeypatch.setattr(allocator, "_lib_dirs", lambda: _libdir(tmp_path, "libjemalloc.so.2"))
    monkeypatch.delenv(allocator.REEXEC_GUARD, raising=False)
    monkeypatch.setattr(allocator, "active", lambda: "jemalloc")
    allocator.reexec_with("auto", ["train", "r.yaml"])
    assert calls == []  # already on it
    monkeypatch.setattr(allocator, "active", lambda: "system")
    allocator.reexec_with("system", ["train", "r.yaml"])
    assert calls == []  # asked for the system's
    allocator.reexec_with("auto", ["train", "r.yaml", "optim.lr=1e-3"])
    (argv, env), = calls
    assert argv[1:] == ["-m", "leantune", "train", "r.yaml", "optim.lr=1e-3"]
    assert env[allocator.REEXEC_GUARD] == "jemalloc" and "libjemalloc.so.2" in env["LD_PRELOAD"]
    monkeypatch.setenv(allocator.REEXEC_GUARD, "jemalloc")
    allocator.reexec_with("auto", ["train", "r.yaml"])
    assert len(calls) == 1  # never twice, even if the preload did not take


def test_glibc_knobs_are_left_alone_under_a_preloaded_malloc(monkeypatch):
    from leantune import allocator as metering

    monkeypatch.setattr(allocator, "active", lambda: "tbbmalloc")
    assert metering.set_malloc_mmap_threshold(131072) is False
    assert metering.malloc_trim() is False


@pytest.mark.skipif(not sys.platform.startswith("linux") or allocator.find_tbbmalloc() is None,
                    reason="needs Linux and the tbb wheel (a leantune dependency on Linux x86-64)")
def test_cli_reexecutes_on_the_recipe_allocator(tiny_model_dir, sft_data, tmp_path):
    """The real program: `python -m leantune train` re-executes on tbbmalloc, and the ledger says so."""
    out = tmp_path / "run"
    raw = tiny_recipe(tiny_model_dir, sft_data, out, train={"steps": 1, "allocator": "tbbmalloc"})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in (allocator.REEXEC_GUARD, "LD_PRELOAD")}
    proc = subprocess.run([sys.executable, "-m", "leantune", "train", str(path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["malloc"] == "tbbmalloc"
    assert "malloc: tbbmalloc" in proc.stdout


RELEASE_CODE = """
import torch
from leantune.allocator import active, release_free_memory
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) * 1024
xs = [torch.ones(1 << 20) for _ in range(64)]  # 64 x 4 MiB, then freed: a caching malloc keeps them
alive = rss()
del xs
what = release_free_memory()
print(active(), what, alive - rss())
"""


@pytest.mark.parametrize("choice", ["system", "jemalloc", "tbbmalloc"])
def test_release_free_memory_hands_freed_memory_back(choice):
    """After a load frees a lot, each malloc is asked to return it (jemalloc runs with no decay and would
    otherwise keep it all run long): by then at least half of 256 MiB freed has left the process."""
    if not {"system": True, "jemalloc": allocator.find_jemalloc(), "tbbmalloc": allocator.find_tbbmalloc()}[choice]:
        pytest.skip(f"{choice} is not installed here")
    env = preload_env(choice) if choice != "system" else {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 << 20)  # glibc: keep the 4 MiB buffers in its heap, as a cache would
    out = subprocess.run([sys.executable, "-c", RELEASE_CODE], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    kind, what, released = out[0], " ".join(out[1:-1]), int(out[-1])
    assert kind == choice
    assert what == {"system": "glibc trim", "jemalloc": "jemalloc purge", "tbbmalloc": "tbbmalloc clean"}[choice]
    assert released > 128 << 20, released
