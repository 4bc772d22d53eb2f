"""Rollouts sampled by N Ray actors (`RolloutPool`): the base model is built once per actor, only the adapter
travels, and a worker that dies is restarted and its prompts sampled again.

Why this shape (AWorld, arXiv 2508.20404: rollouts dominate agentic RL's wall time, so they are spread over
many workers while one learner updates the policy):

- Each actor builds the frozen base **once** from the recipe, with the same code as the trainer
  (`leantune.train.session.setup_model`: load, optional quantization, the LoRA adapter). Per call it receives
  only the adapter's trainable weights, put once into Ray's object store (`RolloutPool.put_adapter`) and
  fetched by each actor that does not hold them yet -- kilobytes to a few megabytes for LoRA, instead of the
  whole model.
- Determinism by prompt, not by worker: every prompt comes with a seed and completion j of a prompt draws
  from its own counter-based stream (`leantune.rl.rollout.row_keys`), so the rollouts do not depend on how
  the prompts were split across workers, nor on a restart.
- Fault tolerance with Ray's own machinery: actors are created with ``max_restarts=-1`` (Ray starts a new
  process and runs the constructor again, base rebuilt) and ``max_task_retries=0`` (a call in flight on a
  dying actor fails with `ray.exceptions.RayActorError`); `RolloutHandle.result` catches it and sends that
  worker's chunk again, same prompts, same seeds. A failed attempt returns nothing, so nothing is counted
  twice.
- The task's stop rule (``is_complete``) is rebuilt in the worker from the task *name*
  (`leantune.tasks.get_task`): closures do not travel. Tool settings (``tools``, a `ToolsConfig`) travel
  with the other sampling arguments; the tools run in the worker (`leantune.rl.tools`).

Layout and fields of the result are those of `sample_groups` (group-contiguous, prompt order), plus in
``extra``: ``adapter_bytes_sent``, ``worker_seconds``, ``worker_restarts``, ``sync_seconds``,
``put_seconds``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from leantune.config import Recipe
from leantune.rl.rollout import Rollouts


def _ray():
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is an optional dependency
        raise ImportError("leantune.rl.workers needs Ray: pip install 'ray>=2.9'") from None
    return ray


@dataclass
class AdapterWeights:
    """The adapter's trainable weights in Ray's object store: put once, sent to each worker at most once."""

    ref: object  # ray.ObjectRef of dict[str, Tensor] (CPU)
    nbytes: int  # bytes of the tensors
    put_seconds: float


def chunk_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) chunks of n items over at most ``parts`` workers, sizes differing by at most one;
    no empty chunk.

    >>> chunk_bounds(5, 2), chunk_bounds(1, 3), chunk_bounds(0, 2)
    ([(0, 3), (3, 5)], [(0, 1)], [])
    """
    k = min(n, parts)
    out, lo = [], 0
    for i in range(k):
        hi = lo + n // k + (1 if i < n % k else 0)
        out.append((lo, hi))
        lo = hi
    return out


def merge_rollouts(parts: Sequence[Rollouts], group_size: int) -> Rollouts:
    """Concatenate per-chunk rollouts in chunk order (group-contiguous stays group-contiguous)."""
    out = Rollouts(group_size=group_size, prompt_ids=[], completion_ids=[], texts=[], logprobs=[], entropy=[],
                   truncated=[])
    for ro in parts:
        out.prompt_ids += ro.prompt_ids
        out.completion_ids += ro.completion_ids
        out.texts += ro.texts
        out.logprobs += ro.logprobs
        out.entropy += ro.entropy
        out.truncated += ro.truncated
        out.decode_steps = max(out.decode_steps, ro.decode_steps)  # the workers run side by side
        out.row_steps += ro.row_steps
        out.draft_tokens += ro.draft_tokens
        out.accepted_tokens += ro.accepted_tokens
        out.draft_row_steps += ro.draft_row_steps
    if any(ro.loss_mask is not None for ro in parts):  # rl.tools
        out.loss_mask = [m for ro in parts for m in ro.masks()]
        out.tool_calls = [c for ro in parts for c in (ro.tool_calls or [0] * len(ro))]
        out.tool_errors = [c for ro in parts for c in (ro.tool_errors or [0] * len(ro))]
    out.extra["prefill_tokens"] = sum(ro.extra.get("prefill_tokens", 0) for ro in parts)
    if any(ro.group_sizes is not None for ro in parts):  # routed (torchrun ranks): sizes and features in chunk order
        out.group_sizes = [n for ro in parts for n in (ro.group_sizes or [])]
        feats = [ro.features for ro in parts if ro.features is not None and len(ro.features)]
        out.features = torch.cat(feats) if feats else None
    return out


class RolloutWorker:
    """One Ray actor: the policy built from the recipe once; per call, load the adapter if new, then sample."""

    def __init__(self, recipe: dict, init: str | None, threads: int | None):
        if threads:
            torch.set_num_threads(threads)
        from leantune.train.session import setup_model

        self.model, self.tokenizer, *_ = setup_model(Recipe.model_validate(recipe), init=init)
        self.loaded: str | None = None  # object id of the adapter weights now in the model

    def pid(self) -> int:
        return os.getpid()

    def sample(self, weights: list, prompts: list[str], seeds: list[int], kwargs: dict, task: str | None) -> dict:
        """``weights``: [ObjectRef] (in a list, so Ray does not fetch it unless this worker needs it)."""
        from leantune.adapters.lora import load_trainable_state
        from leantune.rl.rollout import sample_groups

        ray = _ray()
        start = time.perf_counter()
        ref, received = weights[0], 0
        if ref.hex() != self.loaded:
            load_trainable_state(self.model, ray.get(ref))
            self.loaded, received = ref.hex(), 1
        sync = time.perf_counter() - start
        is_complete = None
        if task is not None:
            from leantune.tasks import get_task

            is_complete = getattr(get_task(task), "is_complete", None)
        ro = sample_groups(self.model, self.tokenizer, prompts, seeds=seeds, is_complete=is_complete, **kwargs)
        return dict(rollouts=ro, received=received, sync_seconds=sync, seconds=time.perf_counter() - start)


class RolloutHandle:
    """A pool call in flight (`RolloutPool.submit`); `result()` waits, re-sends failed chunks, merges."""

    def __init__(self, pool: RolloutPool, weights: AdapterWeights, prompts: list[str], seeds: list[int],
                 kwargs: dict, task: str | None):
        self._pool, self._weights, self._prompts, self._seeds = pool, weights, prompts, seeds
        self._kwargs, self._task = kwargs, task
        self._chunks = chunk_bounds(len(prompts), len(pool.actors))
        self._start = time.perf_counter()
        self._refs = [self._send(k) for k in range(len(self._chunks))]
        self._result: Rollouts | None = None

    def _send(self, k: int):
        lo, hi = self._chunks[k]
        return self._pool.actors[k].sample.remote([self._weights.ref], self._prompts[lo:hi], self._seeds[lo:hi],
                                                  self._kwargs, self._task)

    def result(self) -> Rollouts:
        if self._result is not None:
            return self._result
        ray = _ray()
        done: list[dict | None] = [None] * len(self._chunks)
        attempts = [1] * len(self._chunks)
        pending = {ref: k for k, ref in enumerate(self._refs)}
        restarts = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            k = pending.pop(ready[0])
            try:
                done[k] = ray.get(ready[0])
            except ray.exceptions.RayActorError as err:  # the actor died; Ray restarts it (max_restarts=-1)
                if attempts[k] > self._pool.max_attempts:
                    raise RuntimeError(f"rollout worker {k} died {attempts[k]} times on the same prompts "
                                       f"({self._chunks[k]}); last error: {err}") from err
                attempts[k] += 1
                restarts += 1
                self._pool.wait_ready(k)  # calls to a restarting actor fail at once: wait for its new process
                pending[self._send(k)] = k
        parts = [d["rollouts"] for d in done]
        ro = merge_rollouts(parts, self._kwargs["group_size"])
        received = sum(d["received"] for d in done)  # a worker killed after fetching is not seen, not counted
        ro.seconds = time.perf_counter() - self._start
        ro.extra.update(
            adapter_bytes_sent=received * self._weights.nbytes,
            worker_seconds=[d["seconds"] for d in done],
            worker_restarts=restarts,
            put_seconds=self._weights.put_seconds,
            sync_seconds=self._weights.put_seconds + max((d["sync_seconds"] for d in done), default=0.0),
        )
        self._result = ro
        return ro


class RolloutPool:
    """N Ray actors that sample rollouts for a policy built from ``recipe`` (see the module docstring).

    ``address``: None starts (or joins) a local Ray with ``num_cpus`` (default: os.cpu_count()); a cluster
    address (``ray start --head`` on the head node, then e.g. ``"auto"`` or ``"ray://host:10001"``) joins it.
    ``init``: a finished LoRA run directory to build the adapter from (as ``rl.init``); its weights are
    replaced by those sent anyway, this only fixes the adapter's shape. ``threads_per_worker``: torch
    threads in each actor (default: num_cpus_per_worker). ``max_attempts``: tries per chunk per call before
    a worker that keeps dying is an error; ``ready_timeout``: seconds to wait for a restarted worker.
    """

    def __init__(self, recipe: Recipe | dict, *, num_workers: int = 2, address: str | None = None,
                 num_cpus: int | None = None, num_cpus_per_worker: float = 1, threads_per_worker: int | None = None,
                 init: str | None = None, max_attempts: int = 3, ready_timeout: float = 600.0):
        if num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        ray = _ray()
        recipe = recipe if isinstance(recipe, Recipe) else Recipe.model_validate(recipe)
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            if address is None:
                ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, ignore_reinit_error=True)
            else:
                ray.init(address=address, ignore_reinit_error=True)
        self.max_attempts, self.ready_timeout = max_attempts, ready_timeout
        threads = threads_per_worker or max(1, int(num_cpus_per_worker))
        actor_cls = ray.remote(num_cpus=num_cpus_per_worker, max_restarts=-1, max_task_retries=0)(RolloutWorker)
        self.actors = [actor_cls.remote(recipe.model_dump(), init, threads) for _ in range(num_workers)]
        ray.get([a.pid.remote() for a in self.actors])  # wait until every base is built (errors surface here)

    def wait_ready(self, k: int) -> int:
        """Block until actor ``k`` answers (Ray may be restarting it: rebuilding the base takes a while);
        returns its process id. Raises TimeoutError after ``ready_timeout`` seconds."""
        ray = _ray()
        deadline = time.monotonic() + self.ready_timeout
        while True:
            try:
                return ray.get(self.actors[k].pid.remote(), timeout=max(1.0, deadline - time.monotonic()))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rollout worker {k} not back after {self.ready_timeout:.0f} s: {err}") from err
                time.sleep(0.2)

    def put_adapter(self, adapter_state: dict[str, torch.Tensor]) -> AdapterWeights:
        """Copy the weights into the object store now (later in-place updates do not reach them)."""
        ray = _ray()
        start = time.perf_counter()
        state = {n: t.detach().to("cpu").contiguous() for n, t in adapter_state.items()}
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        ref = ray.put(state)
        return AdapterWeights(ref=ref, nbytes=nbytes, put_seconds=time.perf_counter() - start)

    def submit(self, adapter_state: dict[str, torch.Tensor] | AdapterWeights, prompts: Sequence[str], *,
               group_size: int, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
               stop: Sequence[str] = (), seeds: Sequence[int], fold_adapter: bool = True,
               task: str | None = None, speculative: str = "off", speculative_tokens: int = 4,
               speculative_ngram: int = 3, speculative_draft: str | None = None, tools=None) -> RolloutHandle:
        """Start sampling and return at once; the weights are copied before this returns."""
        if seeds is None or len(seeds) != len(prompts):
            raise ValueError(f"seeds: one per prompt (the pool's rollouts are determined by them), got "
                             f"{None if seeds is None else len(seeds)} for {len(prompts)} prompts")
        weights = adapter_state if isinstance(adapter_state, AdapterWeights) else self.put_adapter(adapter_state)
        kwargs = dict(group_size=group_size, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      stop=list(stop), fold_adapter=fold_adapter, speculative=speculative,
                      speculative_tokens=speculative_tokens, speculative_ngram=speculative_ngram,
                      speculative_draft=speculative_draft, tools=tools)
        return RolloutHandle(self, weights, list(prompts), [int(s) for s in seeds], kwargs, task)

    def sample_groups(self, adapter_state: dict[str, torch.Tensor] | AdapterWeights, prompts: Sequence[str], *,
                      group_size: int, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                      stop: Sequence[str] = (), seeds: Sequence[int], fold_adapter: bool = True,
                      task: str | None = None, speculative: str = "off", speculative_tokens: int = 4,
                      speculative_ngram: int = 3, speculative_draft: str | None = None, tools=None) -> Rollouts:
        """`sample_groups` over the workers: prompts in contiguous chunks, results in prompt order."""
        return self.submit(adapter_state, prompts, group_size=group_size, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, stop=stop, seeds=seeds, fold_adapter=fold_adapter,
                           task=task, speculative=speculative, speculative_tokens=speculative_tokens,
                           speculative_ngram=speculative_ngram, speculative_draft=speculative_draft,
                           tools=tools).result()

    def close(self) -> None:
        ray = _ray()
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        if self.started_ray:
            ray.shutdown()

    def __enter__(self) -> RolloutPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
