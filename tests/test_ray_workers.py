"""RolloutPool: 2 local Ray actors sample exactly what in-process `sample_groups(..., seeds=...)` samples,
survive a killed worker without losing or repeating a prompt, and count the adapter bytes they receive.

One local Ray session and one pool for the whole file (starting Ray and two actors costs seconds)."""

from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")

from leantune.adapters.lora import trainable_state  # noqa: E402
from leantune.config import Recipe  # noqa: E402
from leantune.models.tiny import save_tiny_model  # noqa: E402
from leantune.rl.rollout import sample_groups  # noqa: E402
from leantune.rl.workers import RolloutPool, chunk_bounds  # noqa: E402
from leantune.train.session import setup_model  # noqa: E402

PROMPTS = ["What is 2 + 3?", "hi", "a longer prompt, left padded in a batch", "7 + 8 =", "x"]
KW = dict(group_size=3, max_new_tokens=10, temperature=1.0, top_p=0.95, stop=[], fold_adapter=True)


def _recipe(model_dir, out_dir) -> dict:
    return {
        "model": {"path": str(model_dir)},
        "data": {"max_length": 64},
        "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "train": {"seed": 0, "output_dir": str(out_dir), "progress": False},
        "rl": {"task": "addition", "group_size": 3},
    }


def _random_adapter(model, seed: int) -> dict[str, torch.Tensor]:
    """The model's adapter with every weight drawn at random (LoRA's B starts at 0: the adapter must show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return {n: t.clone() for n, t in trainable_state(model).items()}


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(ray_session, tmp_path_factory):
    model_dir = save_tiny_model(tmp_path_factory.mktemp("tiny-ray"), seed=0, chat_template=True)
    raw = _recipe(model_dir, tmp_path_factory.mktemp("out"))
    model, tok, *_ = setup_model(Recipe.model_validate(raw))
    pool = RolloutPool(raw, num_workers=2)
    assert not pool.started_ray  # the fixture's session is used, and not shut down by close()
    yield pool, model, tok
    pool.close()


def _assert_same(ro, ref):
    assert len(ro) == len(ref) == len(PROMPTS) * KW["group_size"]
    assert ro.prompt_ids == ref.prompt_ids  # each prompt once, in order, group-contiguous
    assert ro.completion_ids == ref.completion_ids
    assert ro.truncated == ref.truncated and ro.texts == ref.texts
    for a, b in zip(ro.logprobs, ref.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-6, rtol=0)


def test_two_workers_equal_in_process_sampling_and_count_the_bytes(setup):
    pool, model, tok = setup
    state = _random_adapter(model, seed=1)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    seeds = [100 + i for i in range(len(PROMPTS))]
    ref = sample_groups(model, tok, PROMPTS, seeds=seeds, **KW)
    assert len({tuple(c) for c in ref.completion_ids}) > 1

    ro = pool.sample_groups(state, PROMPTS, seeds=seeds, **KW)
    _assert_same(ro, ref)
    assert ro.extra["worker_restarts"] == 0 and len(ro.extra["worker_seconds"]) == 2
    assert ro.extra["adapter_bytes_sent"] == nbytes * 2
    assert ro.extra["sync_seconds"] >= ro.extra["put_seconds"] > 0

    # the same weights handle again: nothing is sent; a single prompt: one worker only gets work
    w = pool.put_adapter(state)
    assert w.nbytes == nbytes
    assert pool.sample_groups(w, PROMPTS, seeds=seeds, **KW).extra["adapter_bytes_sent"] == nbytes * 2
    again = pool.sample_groups(w, PROMPTS, seeds=seeds, **KW)
    assert again.extra["adapter_bytes_sent"] == 0
    _assert_same(again, ref)
    one = pool.sample_groups(state, PROMPTS[:1], seeds=seeds[:1], **KW)
    assert one.extra["adapter_bytes_sent"] == nbytes and one.completion_ids == ref.completion_ids[:3]


def test_submit_copies_the_weights_before_an_update_changes_them(setup):
    """Async rollouts: the policy is updated in place while the workers sample the old one."""
    pool, model, tok = setup
    seeds = [7, 8, 9, 10, 11]
    state = _random_adapter(model, seed=2)
    ref = sample_groups(model, tok, PROMPTS, seeds=seeds, **KW)
    handle = pool.submit(trainable_state(model), PROMPTS, seeds=seeds, **KW)  # tensors that share the parameters
    _random_adapter(model, seed=3)  # the "update" of step t, while step t+1 samples
    _assert_same(handle.result(), ref)
    assert handle.result() is handle.result()
    del state


def test_a_killed_worker_is_restarted_and_nothing_is_lost_or_repeated(setup):
    pool, model, tok = setup
    state = _random_adapter(model, seed=4)
    seeds = [31, 32, 33, 34, 35]
    ref = sample_groups(model, tok, PROMPTS, seeds=seeds, **KW)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    pid = ray.get(pool.actors[0].pid.remote())
    handle = pool.submit(state, PROMPTS, seeds=seeds, **KW)
    ray.kill(pool.actors[0], no_restart=False)  # the process dies with the call in flight; Ray restarts it
    ro = handle.result()
    _assert_same(ro, ref)
    assert ro.extra["worker_restarts"] == 1
    assert ro.extra["adapter_bytes_sent"] == nbytes * 2  # the new worker's fetch counted, the dead one's not seen
    assert ray.get(pool.actors[0].pid.remote()) != pid  # a new process, base rebuilt


def test_seeds_are_required_one_per_prompt(setup):
    pool, model, _ = setup
    with pytest.raises(ValueError, match="one per prompt"):
        pool.submit(trainable_state(model), PROMPTS, seeds=[1, 2], **KW)


def test_chunk_bounds_cover_every_prompt_once():
    for n in range(0, 9):
        for parts in range(1, 5):
            b = chunk_bounds(n, parts)
            assert [i for lo, hi in b for i in range(lo, hi)] == list(range(n))
            assert all(hi > lo for lo, hi in b) and len(b) == min(n, parts)


def test_draft_mode_travels_to_the_workers(setup, tmp_path):
    """rl.speculative: draft over the pool: the self-draft (`layers:1`, adapter applied on each worker) and a draft
    model directory (loaded by each worker) give what in-process sampling gives with the same seeds."""
    pool, model, tok = setup
    state = _random_adapter(model, seed=2)
    seeds = [300 + i for i in range(len(PROMPTS))]
    draft_dir = str(save_tiny_model(tmp_path / "draft", seed=7, layers=1))
    for draft in ("layers:1", draft_dir):
        kw = dict(KW, speculative="draft", speculative_draft=draft, speculative_tokens=3)
        ref = sample_groups(model, tok, PROMPTS, seeds=seeds, **kw)
        ro = pool.sample_groups(state, PROMPTS, seeds=seeds, **kw)
        _assert_same(ro, ref)
        assert ro.draft_tokens == ref.draft_tokens > 0
        assert ro.draft_row_steps > 0  # not equal: a chunk's draft forwards run as many rows as its longest draft
