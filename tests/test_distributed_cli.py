"""`leantune train|rl --nproc 2` (torchrun, gloo, two CPU processes) against one process at the same global
batch, through the real CLI and run session: equal losses per step and equal final weights; a killed rank
stops the job with a clear error and `--resume` finishes it to the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_recipe, write_jsonl

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def _env():
    tests = os.path.dirname(os.path.abspath(__file__))  # rl_helpers (a custom reward) is importable from here
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p))
    env.pop("WORLD_SIZE", None)
    return env


def _leantune(*args, timeout=240, check=True):
    proc = subprocess.run([sys.executable, "-m", "leantune", *args], env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"leantune {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def _recipe_file(tmp_path, raw: dict, name: str):
    raw["train"].update(threads=1, allocator="system", progress=False, log_every=1)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _losses(run_dir, key="loss"):
    return [json.loads(line)[key] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(a_file, b_file, rel=1e-5):
    a, b = load_file(str(a_file)), load_file(str(b_file))
    assert a.keys() == b.keys() and a
    for k in a:
        scale = max(float(b[k].abs().max()), 1e-6)
        assert float((a[k] - b[k]).abs().max()) <= rel * scale + 1e-7, k


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_at_the_same_global_batch(tiny_model_dir, sft_data, tmp_path, parallel):
    """DDP with LoRA, FSDP2 with full fine-tuning: 2 ranks x grad_accum 1 == 1 rank x grad_accum 2."""
    adapter = {"method": "full"} if parallel == "fsdp" else {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    common = dict(adapter=adapter, optim={"lr": 1e-2, "scheduler": "constant"})
    one = tiny_recipe(tiny_model_dir, sft_data, tmp_path / "one",
                      train={"steps": 3, "micro_batch_size": 3, "grad_accum": 2, "seed": 0}, **common)
    two = tiny_recipe(tiny_model_dir, sft_data, tmp_path / "two",
                      train={"steps": 3, "micro_batch_size": 3, "grad_accum": 1, "seed": 0, "parallel": parallel},
                      **common)
    _leantune("train", str(_recipe_file(tmp_path, one, "one")))
    out = _leantune("train", str(_recipe_file(tmp_path, two, "two")), "--nproc", "2")
    assert out.stdout.count("peak memory") == 1  # rank 0 alone prints the summary
    for a, b in zip(_losses(tmp_path / "two"), _losses(tmp_path / "one"), strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    weights = "model/model.safetensors" if parallel == "fsdp" else "adapter/adapter_model.safetensors"
    _assert_same_weights(tmp_path / "two" / weights, tmp_path / "one" / weights)
    ledger = json.loads((tmp_path / "two" / "ledger.json").read_text())
    one_ledger = json.loads((tmp_path / "one" / "ledger.json").read_text())
    assert ledger["extra"]["distributed"] == {"world_size": 2, "backend": "gloo", "parallel": parallel,
                                              "global_batch": 6}
    assert ledger["totals"]["tokens_processed"] == one_ledger["totals"]["tokens_processed"]  # summed over ranks


def test_two_process_rl_step_equals_one(tiny_model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)}
                                                 for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]])
    runs = {}
    for name, nproc in (("one", 1), ("two", 2)):
        raw = tiny_recipe(tiny_model_dir, prompts, tmp_path / name, train={"steps": 2, "micro_batch_size": 2, "seed": 0},
                          optim={"lr": 5e-2, "scheduler": "constant"})
        raw["rl"] = {"rewards": {"rl_helpers:digit_share": 1.0}, "group_size": 4, "prompts_per_step": 3,
                     "max_new_tokens": 6, "dynamic_sampling": False, "overlong_filter": False,
                     "prompt_selection": {"enabled": False}}
        _leantune("rl", str(_recipe_file(tmp_path, raw, name)), "--nproc", str(nproc))
        runs[name] = tmp_path / name
    for key in ("loss", "reward_mean", "grad_norm"):
        for a, b in zip(_losses(runs["two"], key), _losses(runs["one"], key), strict=True):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-7), key
    assert any(abs(x) > 0 for x in _losses(runs["one"], "grad_norm"))
    _assert_same_weights(runs["two"] / "adapter/adapter_model.safetensors", runs["one"] / "adapter/adapter_model.safetensors")


def test_a_killed_rank_stops_the_job_and_resume_finishes_it(tiny_model_dir, sft_data, tmp_path):
    common = dict(adapter={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                  optim={"lr": 1e-2, "scheduler": "constant"})
    steps = 30  # enough that the kill lands mid-run (a step with its checkpoint takes tens of ms here)
    straight = tiny_recipe(tiny_model_dir, sft_data, tmp_path / "straight",
                           train={"steps": steps, "micro_batch_size": 2, "save_every": 1, "seed": 0}, **common)
    _leantune("train", str(_recipe_file(tmp_path, straight, "straight")), "--nproc", "2")
    killed = tiny_recipe(tiny_model_dir, sft_data, tmp_path / "killed",
                         train={"steps": steps, "micro_batch_size": 2, "save_every": 1, "seed": 0,
                                "dist_timeout_s": 30},
                         **common)
    path = _recipe_file(tmp_path, killed, "killed")
    proc = subprocess.Popen([sys.executable, "-m", "leantune", "train", str(path), "--nproc", "2"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and not (ckpts / "latest").exists():  # a first checkpoint: kill rank 1
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before its first checkpoint (exit {proc.returncode}):\n"
                                 f"{proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    assert (ckpts / "latest").exists(), "the run never wrote a checkpoint"
    victims = subprocess.run(["pgrep", "-f", f"leantune train {path}"], capture_output=True, text=True).stdout.split()
    ranks = {}
    for pid in victims:
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        rank = [e for e in env if e.startswith(b"RANK=")]
        if rank:
            ranks[rank[0].split(b"=")[1].decode()] = int(pid)
    assert "1" in ranks, f"rank 1 not found among {victims}"
    os.kill(ranks["1"], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "rank 1" in err or "lost its peers" in err or "exitcode: -9" in err, err[-2000:]
    assert not (tmp_path / "killed" / "ledger.json").exists()
    _leantune("train", str(path), "--nproc", "2", "--resume")
    _assert_same_weights(tmp_path / "killed/adapter/adapter_model.safetensors",
                         tmp_path / "straight/adapter/adapter_model.safetensors", rel=0)
    ledger = json.loads((tmp_path / "killed" / "ledger.json").read_text())
    assert ledger["extra"]["resumed"] is True and ledger["totals"]["steps"] == steps


def test_two_process_rl_with_the_router_equals_one(tiny_chat_model_dir, tmp_path):
    """rl.router under torchrun: each rank routes its chunk of the prompts, and the next round's over-draw follows
    the skip rate of all of them, so both ranks draw the same candidates and the run equals one process."""
    words = ["cats", "dogs", "rain", "sun", "tea", "maps", "keys", "wind", "salt", "ink", "snow", "moss"]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say something about {w}.", "answer": str(i)}
                                                 for i, w in enumerate(words)])
    # confident predictions (weak penalty) and near thresholds: the router skips prompts, so it over-draws
    router = {"enabled": True, "warmup_prompts": 3, "min_group_size": 2, "max_group_size": 8, "l2": 1e-3,
              "skip_solved": 0.6, "skip_hopeless": 0.4, "explore": 0.0}
    runs = {}
    for name, nproc in (("one", 1), ("two", 2)):
        raw = tiny_recipe(tiny_chat_model_dir, prompts, tmp_path / name,
                          train={"steps": 4, "micro_batch_size": 8, "seed": 0}, optim={"lr": 1e-2, "scheduler": "constant"})
        raw["rl"] = {"rewards": {"rl_helpers:has_digit": 1.0}, "group_size": 4, "prompts_per_step": 3,
                     "max_new_tokens": 2, "overlong_filter": False, "max_sampling_rounds": 2, "router": router,
                     "prompt_selection": {"enabled": False}}
        _leantune("rl", str(_recipe_file(tmp_path, raw, name)), "--nproc", str(nproc))
        runs[name] = tmp_path / name
    for key in ("rollouts", "router_prompts", "router_skipped", "reward_mean", "loss", "grad_norm"):
        for a, b in zip(_losses(runs["two"], key), _losses(runs["one"], key), strict=True):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-7), key
    assert sum(_losses(runs["one"], "router_skipped")) > 0  # the over-draw path ran
    _assert_same_weights(runs["two"] / "adapter/adapter_model.safetensors", runs["one"] / "adapter/adapter_model.safetensors")


def test_two_process_mixture_equals_one(tiny_model_dir, tmp_path):
    """data.mixture (dash) under torchrun: the same chunk choices and losses as one process at the same global
    batch, and the ledger's per-dataset counts are the run's (summed over ranks), not rank 0's."""
    from leantune.data.mixture import write_demo_sources

    sources = write_demo_sources(tmp_path / "data", n=48, heldout=12, seed=0)
    ledgers = {}
    for name, nproc, accum in (("one", 1, 2), ("two", 2, 1)):
        raw = tiny_recipe(tiny_model_dir, sources["clean"], tmp_path / name,
                          train={"steps": 4, "micro_batch_size": 3, "grad_accum": accum, "seed": 0},
                          optim={"lr": 1e-2, "scheduler": "constant"})
        raw["data"].pop("train")
        raw["data"]["mixture"] = {"sources": {"arith": [str(sources["clean"]), str(sources["noisy"])],
                                              "junk": [str(sources["random"]), str(sources["shuffled"])]},
                                  "select": "dash", "chunk_steps": 2, "heldout": str(sources["heldout"])}
        _leantune("train", str(_recipe_file(tmp_path, raw, name)), "--nproc", str(nproc))
        ledgers[name] = json.loads((tmp_path / name / "ledger.json").read_text())
    for a, b in zip(_losses(tmp_path / "two"), _losses(tmp_path / "one"), strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    one, two = ledgers["one"]["extra"]["mixture"], ledgers["two"]["extra"]["mixture"]
    assert two["choices"] == one["choices"] and len(one["choices"]) == 2
    assert [d["tokens"] for d in two["datasets"]] == [d["tokens"] for d in one["datasets"]]
    assert [d["trainable_tokens"] for d in two["datasets"]] == [d["trainable_tokens"] for d in one["datasets"]]
    assert sum(d["tokens"] for d in two["datasets"]) == ledgers["two"]["totals"]["tokens_processed"]
    assert two["rewards"] == pytest.approx(one["rewards"], rel=1e-4)
