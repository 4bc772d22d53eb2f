"""Settings that fit a memory budget, cheapest first, and the cost model that orders them.

The search varies what changes memory without changing what is learned much: activation
checkpointing (and, for SFT, offloading the checkpointed inputs to a file), micro-batch size (with
gradient accumulation keeping the effective batch), the loss chunk, weight quantization of the frozen
base (and of its embedding / lm_head), the LoRA rank, and AdamW vs MeZO. Every combination is planned
(pure arithmetic, no model is built), those under the budget are kept and ordered by their expected
cost relative to the recipe as written.

Cost model (``COST``), time to the same training progress relative to the recipe. Factors measured
with ``benchmarks/plan_accuracy.py`` (process CPU seconds per optimizer step after the first,
SmolLM2-135M fp32, LoRA r=8 on q/k/v/o, micro-batch 4 x 256 tokens, 1 thread, on a 2-core VM that
other jobs were loading -- indicative, not precise), each relative to the same run without the change:

- checkpointing: ``1 + ckpt x (checkpointed layers / layers)``: all layers 1.35x (every 2nd: 1.26x);
- selective checkpointing (every layer; matmul and attention outputs kept, the rest recomputed):
  ``1 + ckpt x selective``, ``selective`` the share of full checkpointing's recompute time it still pays:
  0.26 and 0.41 in two runs of ``benchmarks/selective_checkpointing.py`` (a SmolLM2-shaped random Llama:
  hidden 576, intermediate 1536, 9/3 heads, 4 layers, LoRA r=8 on every linear, fp32, 4 x 256 tokens,
  1 thread, on the 2-core VM under a load average of ~9 -- noisy); 0.34 is their mean. On the tiny test
  Llama (hidden 64) selective is slower than ``all`` (61 vs 44 ms a step, off 23): the Python dispatch
  of the selective checkpoint costs more per op than such small ops do;
- offloaded checkpoints (``train.offload_checkpoints``, SFT only): 1.02x (``benchmarks/memory_ladder.py``,
  SmolLM2 seq 2048, 2 threads, quiet: 61.0 -> 59.7 tokens/s);
- quantized base: INT8 1.07x, INT4 1.16x (dequantize in every forward and backward);
- INT8 embedding / lm_head (``quant.embedding_bits``): 1.03x (``benchmarks/memory_ladder.py``, SmolLM2
  seq 2048, subset loss, 2 threads, quiet: 61.8 -> 60.0 tokens/s; the INT4 table measured 61.8 -> 65.0
  in another run: within the noise);
- micro-batch: per-token time ``1 + micro_batch / m``: measured 0.97x for 1 x 4 vs 4 x 1 (CPU matmuls
  of 256 rows are already efficient on one thread); a small penalty is kept, assuming more threads
  parallelize small matmuls worse;
- loss chunk: per-token time ``1 + chunk / c``: chunk 64 vs 256 measured 1.02x;
- MeZO: ``mezo_step`` per step (two forward passes instead of forward + backward: 0.91x measured) times
  ``mezo_steps``, how many more steps MeZO needs: an assumption, not a measurement -- the repo's own
  recipes use 2000 MeZO steps where AdamW needs 60 (MeZO's paper, arXiv 2305.17333, reports far more
  steps than Adam too); treat MeZO rows as "fits, but slow to learn";
- LoRA rank: no cost in time; flagged because a smaller rank can learn less.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from leantune.config import Recipe, apply_overrides, parse_size
from leantune.plan.memory import (
    CALIBRATION,
    Calibration,
    MemoryPlan,
    checkpointed_layers,
    plan_memory,
)
from leantune.plan.model_shape import ModelShape, PlanError


@dataclass(frozen=True)
class CostModel:
    """Relative-cost factors; see the module docstring for how each was measured."""

    ckpt: float = 0.35
    selective: float = 0.34
    offload: float = 1.02
    int8: float = 1.07
    int4: float = 1.16
    embeddings: float = 1.03
    micro_batch: float = 0.03
    chunk: float = 2.0
    mezo_step: float = 0.91
    mezo_steps: float = 32.0


COST = CostModel()

# The activation-checkpointing settings the search and the run-start choice try, least recompute first.
CHECKPOINT_CHOICES = ("off", 4, 2, "selective", "all")


def step_cost(recipe: Recipe, shape: ModelShape, cost: CostModel = COST) -> float:
    """Relative time per token of training progress for ``recipe`` (an absolute scale; compare ratios)."""
    t = 1.0
    if recipe.optim.name == "mezo":
        t *= cost.mezo_step * cost.mezo_steps
    else:
        policy = recipe.train.activation_checkpointing
        ckpt = checkpointed_layers(policy, shape.layers)
        t *= 1 + cost.ckpt * (cost.selective if policy == "selective" else 1.0) * sum(ckpt) / shape.layers
        if recipe.train.offload_checkpoints:
            t *= cost.offload
    if recipe.quant.bits:
        t *= cost.int4 if recipe.quant.bits == 4 else cost.int8
    if recipe.quant.embedding_bits:
        t *= cost.embeddings
    t *= 1 + cost.micro_batch / recipe.train.micro_batch_size
    t *= 1 + cost.chunk / recipe.loss.chunk_size
    return t


@dataclass
class Candidate:
    """One setting of the searched knobs: its dotted changes to the recipe, plan and relative cost."""

    changes: dict[str, object]
    recipe: Recipe
    plan: MemoryPlan
    cost: float  # time to the same progress / the recipe's (1.0 = as written)
    speed: float  # tokens/s relative to the recipe (< 1: slower; MeZO's extra steps not included)
    notes: list[str] = field(default_factory=list)

    def overrides(self) -> list[str]:
        return [f"{k}={_yaml_scalar(v)}" for k, v in self.changes.items()]


def _yaml_scalar(v) -> str:
    return "null" if v is None else str(v)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def knob_values(recipe: Recipe, mode: str = "sft") -> dict[str, list]:
    """The values tried per knob; the recipe's own value is always among them. ``mode`` (``plan_memory``'s):
    only `leantune train` offloads checkpoints, and `leantune dpo` trains with AdamW only."""
    t, a = recipe.train, recipe.adapter
    effective = t.micro_batch_size * t.grad_accum
    lora = a.method == "lora"
    return {
        "train.activation_checkpointing": [v for v in dict.fromkeys([t.activation_checkpointing, *CHECKPOINT_CHOICES])
                                           if v is not None],
        "train.offload_checkpoints": (list(dict.fromkeys([t.offload_checkpoints, False, True])) if mode == "sft"
                                      else [t.offload_checkpoints]),
        "train.micro_batch_size": sorted({d for d in _divisors(effective) if d <= t.micro_batch_size} | {t.micro_batch_size}),
        "loss.chunk_size": sorted({recipe.loss.chunk_size, 1024, 256, 64}),
        "quant.bits": list(dict.fromkeys([recipe.quant.bits, None, 8, 4])) if lora else [recipe.quant.bits],
        "quant.embedding_bits": list(dict.fromkeys([recipe.quant.embedding_bits, None, 8])) if lora else [recipe.quant.embedding_bits],
        "adapter.r": sorted({a.r, max(1, a.r // 2), max(1, a.r // 4)}, reverse=True) if lora else [a.r],
        "optim.name": [recipe.optim.name] if mode == "dpo" else list(dict.fromkeys([recipe.optim.name, "adamw", "mezo"])),
    }


def _variant(recipe: Recipe, values: dict) -> tuple[Recipe, dict]:
    """The recipe with ``values`` applied (grad_accum follows the micro-batch) and the dotted changes."""
    data = recipe.model_dump()
    changes = {}
    effective = recipe.train.micro_batch_size * recipe.train.grad_accum
    values = dict(values)
    values["train.grad_accum"] = effective // values["train.micro_batch_size"]
    if values["optim.name"] == "mezo":  # no backward: checkpointing changes nothing, keep it as written
        values["train.activation_checkpointing"] = recipe.train.activation_checkpointing
        values["train.offload_checkpoints"] = recipe.train.offload_checkpoints
    if recipe.train.activation_checkpointing is None and values["train.activation_checkpointing"] == "off":
        values["train.activation_checkpointing"] = None  # left to the run: it chooses off wherever off fits
    if values["train.activation_checkpointing"] in ("off", None):  # nothing to offload
        values["train.offload_checkpoints"] = False
    for key, value in values.items():
        section, name = key.split(".", 1)
        if data[section][name] != value:
            changes[key] = value
            data[section][name] = value
    if recipe.adapter.alpha and "adapter.r" in changes:  # keep the LoRA scale alpha / r
        data["adapter"]["alpha"] = recipe.adapter.alpha * changes["adapter.r"] / recipe.adapter.r
        changes["adapter.alpha"] = data["adapter"]["alpha"]
    new = Recipe.model_validate(data)
    object.__setattr__(new, "__pydantic_fields_set__", set(recipe.model_fields_set))  # keep plan_mode()
    return new, changes


def _notes(recipe: Recipe, changes: dict) -> list[str]:
    notes = []
    if "adapter.r" in changes:
        notes.append(f"LoRA rank {recipe.adapter.r} -> {changes['adapter.r']}: fewer trainable parameters, may learn less")
    if changes.get("optim.name") == "mezo":
        notes.append("MeZO: no gradients; needs many more steps and a different lr (see optim.name help)")
    if changes.get("train.activation_checkpointing") == "selective":
        notes.append("selective checkpointing: matmul and attention outputs kept, norms/activations/rotary recomputed")
    if changes.get("train.offload_checkpoints"):
        notes.append("checkpointed layer inputs in a file in the run directory (one write and one read per step)")
    if changes.get("quant.bits"):
        notes.append(f"INT{changes['quant.bits']} base: small weight error; export merges into the dequantized weights")
    if changes.get("quant.embedding_bits"):
        notes.append(f"INT{changes['quant.embedding_bits']} embedding/lm_head: small error in every logit; "
                     "the exact loss dequantizes the head block by block in every chunk")
    return notes


def search(recipe: Recipe, shape: ModelShape, budget: int, source_kind: str = "local",
           cal: Calibration = CALIBRATION, cost: CostModel = COST, mode: str | None = None) -> list[Candidate]:
    """Every searched setting whose predicted peak is <= ``budget`` bytes, cheapest first (then fewest
    changes, then smallest peak)."""
    from leantune.plan.memory import plan_mode

    knobs = knob_values(recipe, plan_mode(recipe, mode))
    base_cost = step_cost(recipe, shape, cost)
    base_speed = _speed(recipe, shape, cost)
    seen, out = set(), []
    for combo in itertools.product(*knobs.values()):
        new, changes = _variant(recipe, dict(zip(knobs, combo)))
        key = tuple(sorted((k, str(v)) for k, v in changes.items()))
        if key in seen:
            continue
        seen.add(key)
        plan = plan_memory(new, shape, source_kind, cal, mode)
        if plan.peak > budget:
            continue
        out.append(Candidate(changes, new, plan, step_cost(new, shape, cost) / base_cost,
                             base_speed / _speed(new, shape, cost), _notes(recipe, changes)))
    out.sort(key=lambda c: (round(c.cost, 6), len(c.changes), c.plan.peak))
    return _undominated(out)


def _undominated(fits: list[Candidate]) -> list[Candidate]:
    """Drop a setting when another that fits costs no more and makes a subset of its changes (e.g. the
    same setting with a smaller LoRA rank, when the rank was not needed to fit). ``fits`` is sorted."""
    kept: list[Candidate] = []
    for c in fits:
        items = set(map(str, c.changes.items()))
        if not any(k.cost <= c.cost + 1e-9 and set(map(str, k.changes.items())) < items for k in kept):
            kept.append(c)
    return kept


def _speed(recipe: Recipe, shape: ModelShape, cost: CostModel) -> float:
    """Relative time per token, leaving out MeZO's step-count multiplier (for the tokens/s column)."""
    t = step_cost(recipe, shape, cost)
    return t / cost.mezo_steps if recipe.optim.name == "mezo" else t


def floor_note(recipe: Recipe, shape: ModelShape, source_kind: str, cal: Calibration = CALIBRATION,
               mode: str | None = None) -> str:
    """Why nothing fits: the smallest plan the search can reach, and its largest terms."""
    from leantune.plan.memory import plan_mode

    knobs = knob_values(recipe, plan_mode(recipe, mode))
    best = min((plan_memory(_variant(recipe, dict(zip(knobs, c)))[0], shape, source_kind, cal, mode)
                for c in itertools.product(*knobs.values())), key=lambda p: p.peak)
    terms = sorted(best.terms.items(), key=lambda kv: -kv[1][0])[:3]
    parts = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, (v, _) in terms)
    return f"the least any searched setting needs is {best.peak / 2**30:.2f} GiB ({best.peak_phase}: {parts})"


# ----------------------------------------------------------------------------------------------
# The chosen recipe on disk


def default_out_path(recipe_path: str | Path, budget_text: str) -> Path:
    """``recipes/x.yaml`` + ``2GB`` -> ``recipes/x.fit-2GB.yaml``."""
    p = Path(recipe_path)
    tag = "".join(ch for ch in str(budget_text) if ch.isalnum() or ch in ".-_")
    return p.with_name(f"{p.stem}.fit-{tag}{p.suffix or '.yaml'}")


def write_recipe(recipe_path: str | Path, overrides: list[str], chosen: Candidate, budget_text: str,
                 out: str | Path) -> Path:
    """Write the input recipe with the command-line overrides and the chosen changes applied, and
    ``memory.budget`` set, atomically (temp file + rename). The header says how it was made."""
    from leantune.ledger import atomic_write_text

    raw = yaml.safe_load(Path(recipe_path).read_text()) or {}
    apply_overrides(raw, list(overrides) + chosen.overrides() + [f"memory.budget={budget_text}"])
    changed = ", ".join(chosen.overrides()) or "nothing (the recipe fits as written)"
    head = (f"# leantune train {out}\n"
            f"# Written by `leantune plan {recipe_path} --memory {budget_text}`: predicted peak "
            f"{chosen.plan.peak / 2**30:.2f} GiB ({chosen.plan.peak_phase}); changed: {changed};\n"
            f"# expected cost x{chosen.cost:.2f} of the original (tokens/s x{chosen.speed:.2f}).\n")
    return atomic_write_text(out, head + yaml.safe_dump(raw, sort_keys=False))


def budget_bytes(text: str) -> int:
    """``--memory`` / ``memory.budget`` text -> bytes, with the recipe's parse errors as PlanError."""
    try:
        return parse_size(text)
    except ValueError as err:
        raise PlanError(f"--memory: {err}") from None


def describe(c: Candidate) -> str:
    """One line: the overrides, the peak and the cost."""
    what = " ".join(c.overrides()) or "(as written)"
    return f"{what}  -> {c.plan.peak / 2**30:.2f} GiB, cost x{c.cost:.2f}"


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------------------------
# The budget check of `leantune train`


class BudgetError(PlanError):
    """The recipe's predicted peak exceeds ``memory.budget``; the message lists settings that fit."""


def plan_recipe(recipe: Recipe, cal: Calibration = CALIBRATION, mode: str | None = None
                ) -> tuple[MemoryPlan, ModelShape, str]:
    """Plan ``recipe`` from its model's config alone: (plan, shape, source kind). A recipe that leaves
    ``train.activation_checkpointing`` null is planned with what a run would choose now
    (``choose_activation_checkpointing``), and the plan's notes say so."""
    from leantune.models.loading import resolve_source
    from leantune.plan.model_shape import model_shape

    shape = model_shape(recipe.model)
    kind = resolve_source(recipe.model).kind
    note = None
    if recipe.train.activation_checkpointing is None and recipe.optim.name != "mezo":
        recipe, note = choose_activation_checkpointing(recipe, mode=mode, shape=shape, source_kind=kind, cal=cal)
    plan = plan_memory(recipe, shape, kind, cal, mode)
    if note:
        plan.notes.insert(0, note)
    return plan, shape, kind


# ----------------------------------------------------------------------------------------------
# The run-start choice of activation checkpointing (train.activation_checkpointing: null)

AUTO_BUDGET_FRACTION = 0.8  # of the memory available at run start, when memory.budget is not set


def available_memory(recipe: Recipe) -> tuple[int, str]:
    """(bytes, what) this process may use now: free device memory (``torch.cuda.mem_get_info``) when the
    recipe trains on CUDA, else the host's available RAM (``psutil.virtual_memory().available``) shared
    by the processes torchrun starts on this host (``LOCAL_WORLD_SIZE``)."""
    import os

    from leantune.models.precision import device_type, resolve_device

    if device_type(recipe.train.device) == "cuda":
        import torch

        local = int(os.environ.get("LOCAL_RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        device = resolve_device(recipe.train.device, local_rank=local)
        free, _total = torch.cuda.mem_get_info(device)
        return free, f"free memory of {device}"
    import psutil

    procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    avail = psutil.virtual_memory().available
    return avail // procs, "available RAM" + (f" / {procs} processes on this host" if procs > 1 else "")


def auto_budget(recipe: Recipe, available: int | None = None) -> tuple[int, str]:
    """(bytes, why) of the budget the run-start choice fits: ``memory.budget`` when set, else
    ``AUTO_BUDGET_FRACTION`` of ``available`` (default: ``available_memory(recipe)``, measured now)."""
    if recipe.memory.budget is not None:
        return recipe.memory.budget_bytes, f"memory.budget {recipe.memory.budget}"
    what = "available memory"
    if available is None:
        available, what = available_memory(recipe)
    budget = int(AUTO_BUDGET_FRACTION * available)
    return budget, f"{AUTO_BUDGET_FRACTION:.0%} of {gib(available)} {what}"


def choose_activation_checkpointing(recipe: Recipe, mode: str | None = None, available: int | None = None,
                                    shape: ModelShape | None = None, source_kind: str | None = None,
                                    cal: Calibration = CALIBRATION, cost: CostModel = COST) -> tuple[Recipe, str]:
    """(recipe, note): the recipe with ``train.activation_checkpointing`` set, and why.

    A value set in the recipe is kept as it is, always (note: "set in the recipe"). For null, each of
    ``CHECKPOINT_CHOICES`` is planned (``plan_memory``, config only) and the one with the least predicted
    time (``step_cost``) whose peak fits ``auto_budget`` is taken; when none fits, the one with the smallest
    peak (the run may still fit: the plan assumes the worst case; ``memory.budget`` refuses such a run
    later, in ``check_budget``). A model whose shape cannot be read is left at off, and the note says why.
    ``available``: bytes to take instead of measuring (tests); ``mode`` as in ``plan_memory``.
    """
    policy = recipe.train.activation_checkpointing
    if policy is not None:
        return recipe, f"train.activation_checkpointing={policy}: set in the recipe"

    def with_policy(value) -> Recipe:
        new = recipe.model_copy(update={"train": recipe.train.model_copy(update={"activation_checkpointing": value})})
        object.__setattr__(new, "__pydantic_fields_set__", set(recipe.model_fields_set))  # keep plan_mode()
        return new

    if shape is None or source_kind is None:
        from leantune.models.loading import ModelLoadError, resolve_source
        from leantune.plan.model_shape import model_shape

        try:
            shape, source_kind = model_shape(recipe.model), resolve_source(recipe.model).kind
        except (ModelLoadError, OSError, ValueError) as err:  # the load reports it properly, if it fails too
            return with_policy("off"), (f"train.activation_checkpointing=off: not set, and the planner could not read "
                                        f"the model to choose ({err})")
    try:
        budget, why = auto_budget(recipe, available)
    except ValueError as err:  # e.g. planning a CUDA recipe on a machine without one: no memory to measure
        return with_policy("off"), (f"train.activation_checkpointing=off: not set, and the memory to choose for "
                                    f"cannot be measured here ({err}); a run chooses on its own machine")
    options = []
    for value in CHECKPOINT_CHOICES:
        candidate = with_policy(value)
        options.append((step_cost(candidate, shape, cost), plan_memory(candidate, shape, source_kind, cal, mode).peak,
                        value, candidate))
    fits = [o for o in options if o[1] <= budget]
    if fits:
        t, peak, value, chosen = min(fits, key=lambda o: o[0])
        return chosen, (f"train.activation_checkpointing={value}: not set; the fastest setting (time x{t / options[0][0]:.2f} "
                        f"of off) whose predicted peak {gib(peak)} fits {gib(budget)} ({why})")
    t, peak, value, chosen = min(options, key=lambda o: (o[1], o[0]))
    return chosen, (f"train.activation_checkpointing={value}: not set; no setting is predicted to fit {gib(budget)} "
                    f"({why}), {value} has the smallest predicted peak, {gib(peak)}")


def check_budget(recipe: Recipe, recipe_path: str | None = None, top: int = 3, mode: str | None = None
                 ) -> MemoryPlan | None:
    """Raise ``BudgetError`` naming the cheapest settings that fit when the plan exceeds
    ``memory.budget``; None when no budget is set. Reads the model's config only (no weights, no data).
    ``mode``: "sft" for ``leantune train``, "rl" for ``leantune rl``, "dpo" for ``leantune dpo`` (None: decided by the recipe)."""
    budget = recipe.memory.budget_bytes
    if budget is None:
        return None
    plan, shape, kind = plan_recipe(recipe, mode=mode)
    if plan.fits(budget):
        return plan
    terms = sorted(plan.terms.items(), key=lambda kv: -kv[1][0])[:3]
    lines = [f"memory.budget {recipe.memory.budget} ({gib(budget)}): the plan predicts a peak of {gib(plan.peak)} "
             f"({plan.peak_phase}: " + ", ".join(f"{k} {gib(v)}" for k, (v, _) in terms) + ")."]
    fits = [c for c in search(recipe, shape, budget, kind, mode=mode) if c.changes][:top]
    if fits:
        lines.append("Settings that fit, cheapest first (add them as overrides):")
        lines += [f"  {i}. {describe(c)}" for i, c in enumerate(fits, 1)]
        where = recipe_path or "RECIPE.yaml"
        lines.append(f"Full table and a recipe file: leantune plan {where} --memory {recipe.memory.budget}")
    else:
        lines.append(f"No searched setting fits: {floor_note(recipe, shape, kind, mode=mode)}. "
                     "Raise memory.budget or use a smaller model.")
    raise BudgetError("\n".join(lines))
