"""The run session: what every trainer shares, written once.

A trainer (``leantune train`` SFT, ``rl``, ``rft``, and those to come) is its step function plus its metrics.
Everything around the step lives here, in torchtune's recipe lifecycle:

``setup()``
    the recipe's command checks, the memory budget (planned before anything loads), threads and malloc,
    the device and the distributed context (torchrun's rank and world size), the run directory (refusing to
    overwrite a run unless resuming), meters (peak memory, energy), the model with its adapter (optionally
    quantized, or the one a caller passes), the optimizer and scheduler from the registries, resume (weights,
    optimizer, scheduler, RNG, the trainer's own state), the metrics log with its trackers.
``log(row)``, ``save_checkpoint(trainer_state)``
    per step.
``finish(totals, flops, extra)``
    the final export (RUN/adapter or RUN/model, rank 0), energy and memory, ``ledger.json`` (rank 0; tokens,
    FLOPs and energy summed over ranks).
``cleanup()``
    closes the log, the trackers and the process group.

Several processes (``torchrun``): every rank runs the same session; rank 0 writes checkpoints, the adapter, the
metrics and the ledger. A checkpoint records the world size; resuming with another one is refused with a
clear error (the data order and the optimizer state are per world size).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from leantune import ledger as ledger_mod
from leantune.adapters import apply_adapter, save_run_output
from leantune.adapters.lora import causal_lm, load_trainable_state, trainable_state
from leantune.allocator import release_free_memory, set_malloc_mmap_threshold
from leantune.config import Recipe, RecipeError
from leantune.distributed import (
    all_reduce_max,
    all_reduce_sum,
    barrier,
    destroy,
    full_state_dict,
    init_distributed,
    load_full_state_dict,
    load_optimizer_state_dict,
    optimizer_state_dict,
    peer_guard,
    sync_gradients,
    wrap_for_training,
)
from leantune.models.precision import resolve_device
from leantune.models.loading import load_model_and_tokenizer, resolve_source
from leantune.optim import OPTIMIZERS, build_optimizer
from leantune.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state

log = logging.getLogger("leantune")

PLAN_MODE = {"train": "sft", "rl": "rl", "dpo": "dpo"}  # which memory plan a command's budget is checked against


@dataclass
class TrainResult:
    ledger: dict  # also written to RUN_DIR/ledger.json
    model: torch.nn.Module
    tokenizer: object


def set_activation_checkpointing(model, policy) -> int:
    """Checkpoint decoder layers: 'off' (or None, not yet chosen), 'all', 'selective' (every layer, keeping its
    matmul and attention outputs: ``leantune.train.selective``), or every k-th layer (int). Returns how many."""
    if policy in ("off", None):
        return 0
    from transformers.modeling_layers import GradientCheckpointingLayer

    from leantune.train.selective import selective_context_fn

    lm = causal_lm(model)
    kwargs = {"use_reentrant": False}  # works with frozen embeddings (no input grads needed)
    if policy == "selective":  # transformers hands these to torch.utils.checkpoint.checkpoint
        kwargs["context_fn"] = selective_context_fn(model)
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    layers = [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)]
    k = 1 if policy in ("all", "selective") else int(policy)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % k == 0
    return sum(layer.gradient_checkpointing for layer in layers)


def setup_model(recipe: Recipe, init: str | None = None, device: torch.device | None = None):
    """(model, tokenizer, source, checkpointed layers, quant info): the base, quantized if asked, with a fresh
    adapter -- or, with ``init`` (a finished LoRA run directory), that run's adapter, trainable -- on ``device``."""
    model, tokenizer, source = load_model_and_tokenizer(recipe.model)
    quant = None
    if recipe.quant.bits or recipe.quant.embedding_bits:  # before the adapter: LoRA wraps the QuantLinear layers
        from leantune.quant import QuantStats, quantize_embeddings, quantize_model

        stats = QuantStats(0, 0, 0)
        if recipe.quant.bits:
            stats += quantize_model(model, recipe.quant.bits, recipe.quant.group_size, skip=["lm_head"])
        if recipe.quant.embedding_bits:
            stats += quantize_embeddings(model, recipe.quant.embedding_bits, recipe.quant.group_size)
        quant = stats.as_dict()
    if init:
        adapter_dir = Path(init) / "adapter"
        if not adapter_dir.is_dir():
            raise RecipeError(f"rl.init: {init} is not a finished LoRA run directory (no adapter/ inside)")
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    else:
        model = apply_adapter(model, recipe.adapter, seed=recipe.train.seed)
    if device is not None and device.type != "cpu":
        model.to(device)
        from leantune.quant import retie_quantized_head

        retie_quantized_head(model)  # .to() gives a tied quantized head its own copy of the codes
    n_ckpt = set_activation_checkpointing(model, recipe.train.activation_checkpointing)
    model.train()
    release_free_memory()  # what loading and quantizing freed: a caching malloc would keep it all run long
    return model, tokenizer, source, n_ckpt, quant


class RunSession:
    """One run of one trainer: see the module docstring. ``command`` is train / rl / rft.

    ``model`` / ``tokenizer``: train this (already adapted) model instead of loading ``model.path``
    (expert iteration trains one adapter across rounds; the demo hands its SFT model to RL). ``init``: start
    from a finished LoRA run's adapter. ``total_steps``: scheduler length (default ``train.steps``).
    """

    def __init__(self, recipe: Recipe, command: str, *, resume: bool = False, quiet: bool = False,
                 recipe_path: str | None = None, model=None, tokenizer=None, init: str | None = None,
                 total_steps: int | None = None, checkpoints: bool = True, loss_module=None):
        self.recipe, self.command, self.quiet = recipe, command, quiet
        self.resume, self.recipe_path, self.init = resume, recipe_path, init
        self.model, self.tokenizer = model, tokenizer
        self.total_steps = total_steps or recipe.train.steps
        self.checkpoints = checkpoints
        self.make_loss_module = loss_module  # model -> nn.Module whose forward is the loss (DDP/FSDP2 wrap it)
        self.loss_module = None
        self.sync = None
        self.run_dir = Path(recipe.train.output_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.optimizer = self.scheduler = None
        self.resumed_from: Path | None = None
        self.step = 0
        self.trainer_state: dict = {}  # what the trainer saved in its last checkpoint (resume)
        self.totals: dict = {}  # energy and peak memory of earlier (killed) segments of this run
        self.quant = None
        self.checkpointed_layers = 0
        self.auto_choices: dict[str, str] = {}  # setting -> why, for what the recipe left to the run (ledger extra)
        self.metrics: ledger_mod.MetricsLog | None = None
        self.sinks: list = []

    # ------------------------------------------------------------------------------------------
    # setup

    def setup(self) -> RunSession:
        recipe, cfg = self.recipe, self.recipe.train
        recipe.require_for(self.command)
        if cfg.activation_checkpointing is None and self.model is None:  # null: the fastest setting that fits
            from leantune.plan.search import choose_activation_checkpointing

            self.recipe, note = choose_activation_checkpointing(recipe, mode=PLAN_MODE.get(self.command))
            recipe, cfg = self.recipe, self.recipe.train
            self.auto_choices["train.activation_checkpointing"] = note
        if recipe.memory.budget is not None and self.command in PLAN_MODE:
            from leantune.plan.search import check_budget

            check_budget(recipe, self.recipe_path, mode=PLAN_MODE[self.command])
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.malloc_mmap_threshold is not None:
            set_malloc_mmap_threshold(cfg.malloc_mmap_threshold)
        local = int(os.environ.get("LOCAL_RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        self.dist = init_distributed(resolve_device(cfg.device, local_rank=local), timeout_s=cfg.dist_timeout_s)
        self.device = self.dist.device
        self._check_processes()
        for note in self.auto_choices.values():
            self.info(note)
        self._prepare_run_dir()
        self.sinks = self._start_trackers()  # before the model loads: a missing tracker package fails early
        self.memory = ledger_mod.PeakMemory().start()
        self.energy = ledger_mod.EnergyMeter().start()
        torch.manual_seed(cfg.seed)
        if self.model is None:
            self.model, self.tokenizer, source, self.checkpointed_layers, self.quant = setup_model(
                recipe, init=self.init, device=self.device)
            self.model_location = source.weight_path
        else:
            self.model_location = resolve_source(recipe.model).weight_path
        if self.make_loss_module is not None:  # before the optimizer: FSDP2 replaces the parameters with shards
            self.loss_module = wrap_for_training(self.make_loss_module(self.model), self.dist, cfg.parallel)
            if self.dist.is_distributed:
                wrapped = self.loss_module
                self.sync = lambda last: sync_gradients(wrapped, last)
        self.optimizer, self.scheduler = build_optimizer(recipe.optim, self.model, seed=cfg.seed,
                                                         total_steps=self.total_steps)
        self.needs_backward = OPTIMIZERS[recipe.optim.name].needs_backward
        if self.resumed_from is not None:
            self._load_checkpoint(self.resumed_from)
        self._open_metrics()
        return self

    def _check_processes(self) -> None:
        """What several processes cannot do (yet), refused before anything is written."""
        if not self.dist.is_distributed:
            return
        recipe = self.recipe
        if not OPTIMIZERS[recipe.optim.name].needs_backward:
            raise RecipeError(f"optim.name: {recipe.optim.name} runs in one process (its perturbations are not "
                              "synchronized across ranks); launch without torchrun / --nproc")
        if recipe.train.parallel == "fsdp" and self.command != "train":
            raise RecipeError(f"train.parallel: fsdp is for `leantune train`; `leantune {self.command}` uses ddp")
        if recipe.train.offload_checkpoints:
            raise RecipeError("train.offload_checkpoints: one process only (each rank would spill to the same run directory)")

    def _prepare_run_dir(self) -> None:
        run_dir = self.run_dir
        if self.dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        barrier(self.dist)
        existing = latest_checkpoint(self.ckpt_root)
        if self.resume:
            self.resumed_from = existing
            if existing is None:
                self.info(f"no checkpoint under {self.ckpt_root}; starting from scratch")
        elif existing is not None or (run_dir / "ledger.json").exists():
            raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose "
                                  "another train.output_dir")

    def _start_trackers(self) -> list:
        if not self.dist.is_main or not self.recipe.train.report_to:
            return []
        from leantune.trackers import build_trackers

        return build_trackers(self.recipe.train.report_to, self.run_dir, self.run_dir.name,
                              self.recipe.model_dump(mode="json"))

    def _load_checkpoint(self, path: Path) -> None:
        tensors, payload, state = load_checkpoint(path)
        saved_world = state.get("world_size", 1)
        if saved_world != self.dist.world_size:
            raise RecipeError(
                f"{path}: this run was checkpointed with {saved_world} process(es) and is resumed with "
                f"{self.dist.world_size}; the data order and optimizer state are per world size. Resume with "
                f"--nproc {saved_world} (torchrun --nproc-per-node {saved_world}), or start a new run.")
        if self.dist.is_distributed:  # collectives: rank 0's copy is broadcast into replicas or shards
            target = self.loss_module or self.model
            load_full_state_dict(target, tensors if self.dist.is_main else None, self.dist, trainable_only=True)
            load_optimizer_state_dict(target, self.optimizer, payload["optimizer"] if self.dist.is_main else None,
                                      self.dist)
        else:
            load_trainable_state(self.model, {k: v.to(self.device) for k, v in tensors.items()})
            self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        set_rng_state(payload["rng"])
        self.step = state["step"]
        self.totals = state.get("session", {})
        self.trainer_state = state
        self.info(f"resumed from {path} at step {self.step}")

    def _open_metrics(self) -> None:
        if not self.dist.is_main:
            return
        metrics_path = self.run_dir / "metrics.jsonl"
        if self.resumed_from is not None:  # steps logged after the checkpoint by the killed run are replayed
            kept = [m for m in ledger_mod.read_metrics(metrics_path) if m.get("step", 0) <= self.step]
            ledger_mod.atomic_write_text(metrics_path, "".join(json.dumps(m) + "\n" for m in kept))
        elif metrics_path.exists():
            metrics_path.unlink()
        recipe_text = yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False)
        ledger_mod.atomic_write_text(self.run_dir / "recipe.yaml", recipe_text)
        self.metrics = ledger_mod.MetricsLog(metrics_path, sinks=self.sinks)

    # ------------------------------------------------------------------------------------------
    # per step

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A collated batch on the training device (a no-op on the CPU)."""
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def info(self, message: str) -> None:
        """A progress message for people (rank 0; silent with ``quiet``)."""
        if not self.quiet and self.dist.is_main:
            log.info(message)

    def progress(self, desc: str):
        from tqdm.auto import tqdm

        from leantune.log import progress_enabled

        hide = self.quiet or not self.recipe.train.progress or not self.dist.is_main or not progress_enabled()
        return tqdm(total=self.recipe.train.steps, initial=self.step, desc=desc, disable=hide, dynamic_ncols=True)

    def log(self, row: dict, *, force: bool = False) -> None:
        """Write a metrics row (rank 0) when ``train.log_every`` says so, or ``force``."""
        step = row.get("step", self.step)
        if self.metrics is not None and (force or step % self.recipe.train.log_every == 0
                                         or step == self.recipe.train.steps):
            self.metrics.log(row)

    def should_save(self) -> bool:
        every = self.recipe.train.save_every
        return self.checkpoints and ((every and self.step % every == 0) or self.step == self.recipe.train.steps)

    def save_checkpoint(self, trainer_state: dict) -> None:
        """Checkpoint the trainable weights, optimizer, scheduler, RNG and ``trainer_state`` (rank 0 writes)."""
        session = {"energy_joules": self.totals.get("energy_joules", 0.0) + self.energy.reading()["joules"],
                   "peak_rss_bytes": max(self.totals.get("peak_rss_bytes", 0), self.memory.peak_rss_bytes)}
        state = {**trainer_state, "step": self.step, "world_size": self.dist.world_size, "session": session}
        if self.dist.is_distributed:  # collectives on every rank; rank 0 writes
            target = self.loss_module or self.model
            weights = full_state_dict(target, self.dist, trainable_only=True)
            optim_state = optimizer_state_dict(target, self.optimizer, self.dist)
        else:
            weights, optim_state = trainable_state(self.model), None
        if self.dist.is_main:
            save_checkpoint(self.ckpt_root, self.step, weights, self.optimizer, self.scheduler, state,
                            optimizer_state=optim_state)
        barrier(self.dist)

    def step_guard(self):
        """Around one step: a peer process that died becomes one clear error ("rank N lost its peers ...;
        resume with --resume") instead of a hang or a gloo traceback."""
        return peer_guard(self.dist)

    @contextlib.contextmanager
    def timed(self):
        """Wall time of the block, for step timing: yields a one-item list filled on exit."""
        out = [0.0]
        t0 = time.perf_counter()
        try:
            yield out
        finally:
            out[0] = time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------
    # the end

    def finish(self, *, totals: dict, flops: dict, extra: dict, data_files: list[str] | None = None) -> TrainResult:
        """Export the trained weights, stop the meters and write ``ledger.json``; returns the TrainResult.

        ``totals``: the trainer's counts (steps, tokens_processed, trainable_tokens, wall_time_s, ...), this
        rank's; tokens, FLOPs and energy are summed over ranks here, peak memory is the largest rank's.
        """
        full = None
        if self.dist.is_distributed and self.recipe.train.parallel == "fsdp":  # gather the shards (every rank)
            full = full_state_dict(self.loss_module or self.model, self.dist,
                                   trainable_only=self.recipe.adapter.method != "full")
        if self.dist.is_main:
            save_run_output(self.model, self.tokenizer, self.recipe.adapter.method, self.run_dir, state_dict=full)
        energy = self.energy.stop()
        self.memory.stop()
        prior = self.totals.get("energy_joules", 0.0)
        if prior:
            energy["joules_this_segment"] = energy["joules"]
            energy["joules"] += prior
            energy["note"] = "includes earlier segments of this run (resumed from a checkpoint)"
        peak = max(self.totals.get("peak_rss_bytes", 0), self.memory.peak_rss_bytes)
        totals = {**totals, "peak_rss_bytes": peak, "cuda_max_allocated_bytes": self.memory.cuda_peak_bytes}
        world = self.dist.world_size
        if world > 1:
            for key in ("tokens_processed", "trainable_tokens"):
                if isinstance(totals.get(key), (int, float)):
                    totals[key] = all_reduce_sum(totals[key], self.dist)
            totals["peak_rss_bytes"] = all_reduce_max(totals["peak_rss_bytes"], self.dist)
            totals["peak_rss_bytes_note"] = "the largest rank's peak; each process holds its own copy"
            if isinstance(flops.get("total"), (int, float)):
                flops = {**flops, "total": all_reduce_sum(flops["total"], self.dist), "summed_over_ranks": world}
            energy["joules"] = all_reduce_sum(energy["joules"], self.dist)
            energy["note"] = (energy.get("note", "") + "; summed over ranks").lstrip("; ")
        extra = {**extra, **({"auto_choices": self.auto_choices} if self.auto_choices else {}),
                 "resumed": self.resumed_from is not None, "quant": self.quant,
                 "device": str(self.device),
                 "distributed": {"world_size": world, "backend": self.dist.backend,
                                 "parallel": self.recipe.train.parallel if world > 1 else None,
                                 "global_batch": self.recipe.train.micro_batch_size * self.recipe.train.grad_accum * world}}
        ledger = ledger_mod.build_ledger(
            recipe=self.recipe.model_dump(mode="json"), data_files=data_files or [],
            model_location=self.model_location, seed=self.recipe.train.seed, totals=totals, flops=flops,
            energy=energy, extra=extra, compute=self._compute(flops, totals))
        if self.dist.is_main:
            ledger_mod.write_ledger(self.run_dir, ledger)
            if self.metrics is not None:
                self.metrics.log_ledger(ledger)
        return TrainResult(ledger, self.model, self.tokenizer)

    def _compute(self, flops: dict, totals: dict) -> dict | None:
        """Achieved FLOP/s against this machine's measured matmul peak (:mod:`leantune.compute`)."""
        from leantune.compute import compute_summary
        from leantune.models.precision import resolve_dtype

        total = flops.get("total") if isinstance(flops, dict) else None
        if not isinstance(total, (int, float)):
            return None
        dtype = resolve_dtype(self.recipe.model.dtype, self.device.type)
        return compute_summary(flops_total=total, seconds=totals.get("wall_time_s"), dtype=dtype,
                               device=str(self.device), processes=self.dist.world_size)

    def cleanup(self) -> None:
        # A run that failed after setup() never reached finish(): its meters' polling threads stop here, or each
        # failed run in a long-lived process (a notebook, a sweep) would leave a thread sampling RSS every 10 ms.
        for meter in (getattr(self, "memory", None), getattr(self, "energy", None)):
            if meter is not None:
                meter.close()
        if self.metrics is not None:
            self.metrics.close()  # closes the trackers too
            self.metrics = None
        elif self.sinks:
            from leantune.trackers import close_trackers

            close_trackers(self.sinks)
        self.sinks = []
        if hasattr(self, "dist"):
            destroy(self.dist)

    def __enter__(self) -> RunSession:
        try:
            return self.setup()
        except BaseException:  # __exit__ does not run when __enter__ raises: release what setup() started
            self.cleanup()
            raise

    def __exit__(self, *exc) -> None:
        self.cleanup()
