"""`leantune rl` with Ray rollout workers: the same run as in-process sampling (rollouts are seeded per
prompt), each rollout counted once in the ledger, the adapter bytes sent recorded; async rollouts run one
step off-policy against the sampling policy's log-probs."""

from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray")

from conftest import tiny_recipe, write_jsonl  # noqa: E402
from leantune.config import recipe_from_dict  # noqa: E402
from leantune.train.rl import train_rl  # noqa: E402


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


def _recipe(tiny_model_dir, prompts, out, **rl):
    raw = tiny_recipe(tiny_model_dir, prompts, out, train={"steps": 2, "micro_batch_size": 4, "seed": 0},
                      optim={"lr": 5e-2, "scheduler": "constant"})
    raw["rl"] = {"rewards": {"rl_helpers:digit_share": 1.0}, "group_size": 4, "prompts_per_step": 3,
                 "max_new_tokens": 6, "overlong_filter": False, **rl}
    return recipe_from_dict(raw)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_workers_give_the_in_process_run_and_count_each_rollout_once(ray_session, tiny_model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)}
                                                 for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]])
    local = train_rl(_recipe(tiny_model_dir, prompts, tmp_path / "local"), quiet=True).ledger
    remote = train_rl(_recipe(tiny_model_dir, prompts, tmp_path / "remote", rollout_workers=2), quiet=True).ledger
    for a, b in zip(_rows(tmp_path / "remote"), _rows(tmp_path / "local"), strict=True):
        for key in ("loss", "reward_mean", "rollouts", "completion_len", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert remote["totals"]["rollouts"]["rollouts_generated"] == local["totals"]["rollouts"]["rollouts_generated"]
    assert remote["totals"]["rollouts"]["rollouts_generated"] == sum(r["rollouts"] for r in _rows(tmp_path / "remote"))
    sent = remote["extra"]["rollout_workers"]
    adapter_bytes = sum(p.numel() * p.element_size() for p in
                        __import__("safetensors.torch", fromlist=["load_file"]).load_file(
                            str(tmp_path / "remote/adapter/adapter_model.safetensors")).values())
    assert sent["workers"] == 2 and sent["adapter_bytes_sent"] >= 2 * adapter_bytes  # >= one copy per worker per step


def test_async_rollouts_use_the_sampling_policy_as_the_ratio_reference(ray_session, tiny_model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)}
                                                 for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]])
    run = train_rl(_recipe(tiny_model_dir, prompts, tmp_path / "async", rollout_workers=1, async_rollouts=True,
                           dynamic_sampling=False) .model_copy(update={}), quiet=True)
    rows = _rows(tmp_path / "async")
    sync = train_rl(_recipe(tiny_model_dir, prompts, tmp_path / "sync", rollout_workers=1, dynamic_sampling=False),
                    quiet=True)
    sync_rows = _rows(tmp_path / "sync")
    assert rows[0]["reward_mean"] == pytest.approx(sync_rows[0]["reward_mean"])  # step 1: same policy, same prompts
    # step 2 was sampled by the step-1 policy while step 1 updated: a different batch, the same prompts
    assert rows[1]["rollouts"] == sync_rows[1]["rollouts"]
    assert rows[1]["reward_mean"] != pytest.approx(sync_rows[1]["reward_mean"], rel=1e-9)
    assert run.ledger["extra"]["rollout_workers"]["async"] is True
