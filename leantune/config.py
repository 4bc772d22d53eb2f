"""Typed recipe configuration: the one source of truth for every setting, its default and its help text.

A recipe is a YAML file whose top-level sections map onto the models below. Unknown keys are
errors that list the valid keys; a wrong type names the field. Dotted overrides from the command
line (``optim.lr=1e-4``) are parsed as YAML scalars and applied before validation.

>>> r = Recipe.model_validate({"model": {"path": "some/dir"}, "data": {"train": "train.jsonl"}})
>>> r.optim.lr, r.adapter.method
(0.0002, 'lora')
>>> apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=3e-4", "train.steps=5"])
{'optim': {'lr': 0.0003}, 'train': {'steps': 5}}
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from leantune.config_hints import foreign_hint


class RecipeError(ValueError):
    """A recipe that cannot be used; the message says where and what to do."""


class Section(BaseModel):
    """Base for all config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    path: str = Field(description="Local directory (safetensors), a Hugging Face hub id, or a .gguf file.")
    gguf_file: str | None = Field(
        default=None, description="GGUF file name inside `path` (or set `path` to the .gguf file itself)."
    )
    tokenizer: str | None = Field(default=None, description="Tokenizer location if different from `path`.")
    dtype: Literal["float32", "bfloat16", "auto"] = Field(
        default="float32",
        description="Compute dtype of the frozen base. bfloat16: half the memory, ~3x faster matmuls on CPUs with AVX512-BF16/AMX, but ~90x slower on AVX2-only CPUs; less precise. auto: for the training device (train.device): on the CPU whichever a one-off matmul probe finds faster (even when a GPU is visible), on a GPU bfloat16 where it supports it (the ledger records the choice).",
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow code shipped with the model to run. Off unless you trust the source."
    )
    _device_type: str | None = PrivateAttr(default=None)  # the training device's type, set by Recipe

    @property
    def compute_dtype(self) -> str:
        """``dtype`` with ``auto`` resolved for the training device (``float32`` or ``bfloat16``)."""
        from leantune.models.precision import resolve_dtype

        return resolve_dtype(self.dtype, self._device_type)


class DedupConfig(Section):
    """Duplicate removal before tokenization, keeping the first occurrence (docs/dedup.md, leantune.data.dedup).
    Repeated examples are what a model memorizes (arXiv 2202.07646, 2507.09937)."""

    exact: bool = Field(default=True, description="Remove rows whose normalized text (NFKC, casefolded, whitespace collapsed) equals an earlier row's.")
    near: float | None = Field(
        default=0.8, gt=0, le=1,
        description="Remove rows whose estimated Jaccard similarity (MinHash over `shingle` sets) with any earlier row is >= this. null: exact only. Lower removes more.",
    )
    num_perm: int = Field(default=128, ge=16, le=1024, description="MinHash permutations: more = a closer Jaccard estimate (error ~ 1/sqrt(num_perm)), more time and memory per row.")
    shingle: str = Field(
        default="words:3", pattern=r"^(words|chars):[1-9][0-9]*$",
        description="What the sets are made of: words:N (word N-grams, for prose) or chars:N (character N-grams, for short or numeric text).",
    )
    seed: int = Field(default=0, description="Seed of the MinHash permutations (same seed, same decisions).")

    @model_validator(mode="after")
    def _something_to_do(self):
        if not self.exact and self.near is None:
            raise ValueError("exact is false and near is null, so nothing would be removed; enable one, or set data.dedup: null")
        return self


class MixtureConfig(Section):
    """Training data from several datasets grouped by source, chosen chunk by chunk (`data.mixture`, docs/mixture.md).
    With select: dash, a two-level Gaussian Thompson sampler (a source, then a dataset in it: DaSH, arXiv 2512.10952)
    learns which datasets lower the held-out loss the most."""

    sources: dict[str, list[str]] = Field(
        description="Source name -> its datasets: SFT data files (any source data.train takes, usually .jsonl), e.g. {arith: [clean.jsonl, noisy.jsonl], web: [text.jsonl]}. Relative paths are from the working directory.",
    )
    select: Literal["uniform", "weights", "dash"] = Field(
        default="dash",
        description="How each chunk's dataset is chosen: uniform = every dataset equally likely; weights = drawn with `weights`; dash = two-level Gaussian Thompson sampling on each chunk's held-out loss gain (arXiv 2512.10952).",
    )
    weights: dict[str, float | list[float]] | None = Field(
        default=None,
        description="select: weights only. Source name -> its weight (split equally over its datasets) or a list with one weight per dataset; every source needs one, >= 0, not all 0. Chunks are drawn with these probabilities (normalized).",
    )
    chunk_steps: int = Field(default=4, gt=0, description="Optimizer steps per chunk: each chunk trains on one dataset. dash: one held-out evaluation per chunk, so smaller = more feedback, more evaluation work.")
    heldout: str | float | None = Field(
        default=None,
        description="select: dash only: where the reward's held-out loss is measured. A file (any source data.eval takes): the data you want to get better at; a fraction in (0, 1): that share of every dataset (seeded), never trained on; null: data.eval.",
    )
    heldout_max: int = Field(default=64, gt=0, description="dash: at most this many held-out examples (the first ones; a fraction's are seeded) per evaluation. More: a less noisy reward, more work per chunk.")
    prior_mean: float = Field(default=0.0, description="dash: prior mean of every arm's reward (held-out loss gain per chunk, nats).")
    prior_std: float = Field(default=0.1, gt=0, description="dash: prior standard deviation of every arm's mean reward (nats): larger = trust the first rewards more.")
    noise_std: float = Field(default=0.05, gt=0, description="dash: known standard deviation of one chunk's reward around its arm's mean (nats): larger = each reward moves the posterior less, more exploration.")
    reward: Literal["gain", "relative", "advantage"] = Field(
        default="gain",
        description="dash: what the posteriors learn from a chunk. gain = held-out loss before - after (the paper's; shrinks as training goes on, so the first dataset tried tends to win); relative = gain / loss before; advantage = gain - mean gain of the last baseline_chunks chunks (the gain relative to what chunks gained at this point of training; the first chunk updates nothing).",
    )
    baseline_chunks: int = Field(default=2, gt=0, description="dash, reward: advantage: how many of the previous chunks (any dataset) the baseline averages.")
    discount: float = Field(default=1.0, gt=0, le=1, description="dash: before every update every arm keeps this share of what it learned and moves back toward the prior (discounted Thompson sampling, arXiv 1707.09727): an observation k chunks old weighs discount**k. 1 = never forget.")

    @field_validator("sources")
    @classmethod
    def _sources_nonempty(cls, sources):
        if not sources:
            raise ValueError("data.mixture.sources: name at least one source, e.g. {arith: [train.jsonl]}")
        for name, paths in sources.items():
            if not str(name).strip():
                raise ValueError("data.mixture.sources: a source has an empty name")
            if not paths:
                raise ValueError(f"data.mixture.sources.{name}: empty source; list at least one dataset file or remove it")
            for i, p in enumerate(paths):
                if not str(p).strip():
                    raise ValueError(f"data.mixture.sources.{name}[{i}]: empty path")
        return sources

    @model_validator(mode="after")
    def _weights_and_heldout(self):
        if self.select == "weights":
            if self.weights is None:
                raise ValueError("data.mixture.weights: select: weights needs a weight per source, e.g. "
                                 + "{" + ", ".join(f"{n}: 1.0" for n in self.sources) + "}")
            missing = [n for n in self.sources if n not in self.weights]
            if missing:
                raise ValueError(f"data.mixture.weights: no weight for source(s) {', '.join(missing)}; every source needs one (0 to skip it)")
            unknown = [n for n in self.weights if n not in self.sources]
            if unknown:
                raise ValueError(f"data.mixture.weights: {', '.join(unknown)} is not a source; sources: {', '.join(self.sources)}")
            for name, w in self.weights.items():
                ws = w if isinstance(w, list) else [w]
                if isinstance(w, list) and len(w) != len(self.sources[name]):
                    raise ValueError(f"data.mixture.weights.{name}: {len(w)} weights for {len(self.sources[name])} datasets; "
                                     "give one per dataset, or one number for the whole source")
                if any(x < 0 for x in ws):
                    raise ValueError(f"data.mixture.weights.{name}: weights must be >= 0 (got {w})")
            if sum(sum(w) if isinstance(w, list) else w for w in self.weights.values()) <= 0:
                raise ValueError("data.mixture.weights: all weights are 0; give at least one dataset a positive weight")
        elif self.weights is not None:
            raise ValueError(f"data.mixture.weights: only used with select: weights (select is {self.select}); remove it")
        if isinstance(self.heldout, float) and not 0 < self.heldout < 1:
            raise ValueError(f"data.mixture.heldout: a fraction must be in (0, 1), got {self.heldout}")
        if self.heldout is not None and self.select != "dash":
            raise ValueError(f"data.mixture.heldout: only select: dash measures a held-out loss (select is {self.select}); remove it")
        for name in ("reward", "baseline_chunks", "discount"):
            if name in self.model_fields_set and self.select != "dash":
                raise ValueError(f"data.mixture.{name}: only select: dash learns from rewards (select is {self.select}); remove it")
        if "baseline_chunks" in self.model_fields_set and self.reward != "advantage":
            raise ValueError(f"data.mixture.baseline_chunks: only reward: advantage uses a baseline (reward is {self.reward}); remove it")
        return self

    def datasets(self) -> list[tuple[str, str]]:
        """Every (source, path), in recipe order: the index of a dataset everywhere (ledger, checkpoints)."""
        return [(name, path) for name, paths in self.sources.items() for path in paths]

    def missing_files(self) -> list[str]:
        """``data.mixture.sources.NAME[i]: file not found: PATH`` for every dataset path, and the held-out file, that
        does not exist (a hub id -- ``owner/name`` with no suffix and no local match -- is left to the loader)."""
        out = []
        entries = [(f"data.mixture.sources.{n}[{i}]", p) for n in self.sources for i, p in enumerate(self.sources[n])]
        if isinstance(self.heldout, str):
            entries.append(("data.mixture.heldout", self.heldout))
        for field, path in entries:
            hub_id = re.fullmatch(r"[A-Za-z0-9][\w-]*/[A-Za-z0-9][\w-]*(:[\w.-]+)?", path) is not None
            if not hub_id and not Path(path).exists():
                out.append(f"{field}: file not found: {path}")
        return out


class DataConfig(Section):
    """Where the examples come from and how they become tokens (docs/data.md has a recipe per source)."""

    train: str | None = Field(
        default=None,
        description="Training data: a .jsonl or .parquet file, a .csv/.tsv/.json/.arrow file (read by `datasets`), a `datasets` save_to_disk directory, or a hub dataset id (`owner/name` or `owner/name:config`, online). SFT needs it; RL reads prompts (plus reward fields such as `answer`) from it, or generates them from `rl.task` when it is unset.",
    )
    eval: str | None = Field(default=None, description="Held-out data for loss/perplexity every `train.eval_every` steps; any source `train` accepts.")
    split: str | None = Field(
        default=None,
        description="Split of data.train when it has several (a save_to_disk DatasetDict, a hub dataset). null: `train`, or the only split. A file is one split named `train`.",
    )
    eval_split: str | None = Field(
        default=None,
        description="Split of data.eval. null: `validation`, `valid`, `dev` or `test` (the first present), or the only split.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="leantune field -> dataset column, e.g. {prompt: question, completion: answer}; mapped columns are renamed, the rest pass through. SFT fields: prompt, completion, messages; RL prompt rows also take any reward field (answer, numbers...).",
    )
    streaming: bool = Field(
        default=False,
        description="SFT: keep the data on disk (JSONL by line offset, other sources memory-mapped Arrow) and tokenize examples on access, so memory stays flat in the dataset's size. One validating pass up front still counts every statistic and finds every bad row before training. RL prompt pools are always read whole.",
    )
    format: Literal["auto", "prompt_completion", "messages"] = Field(
        default="auto", description="Record shape: {prompt, completion} or {messages: [...]}; auto detects per file."
    )
    max_length: int = Field(default=512, gt=1, description="Maximum tokens per example (prompt + completion). In RL, the longest rendered prompt allowed (a longer one is an error): the memory plan sizes rollouts with it.")
    overlong: Literal["truncate", "drop"] = Field(
        default="truncate", description="What to do with examples longer than max_length; counts are reported."
    )
    think_start: str = Field(default="<think>", description="Marker opening the thinking span inside a completion.")
    think_end: str = Field(default="</think>", description="Marker closing the thinking span; the rest is the answer span.")
    shuffle: bool = Field(default=True, description="Shuffle training examples every epoch (seeded).")
    packing: bool = Field(
        default=False,
        description="SFT (`leantune train`): pack several examples into each row of up to max_length tokens (best-fit decreasing, once; rows shuffled per epoch), positions restarting per example and no attention across examples. train.micro_batch_size then counts rows. Less padding, more examples per step; the loss over the same examples is unchanged (docs/packing.md).",
    )
    dedup: DedupConfig | None = Field(
        default=None,
        description="SFT: remove exact and near-duplicate training rows before tokenization, e.g. {exact: true, near: 0.8}; the counts go to the ledger (totals.data). null: keep every row. data.eval is not deduplicated.",
    )
    mixture: MixtureConfig | None = Field(
        default=None,
        description="SFT (`leantune train`) instead of data.train: datasets grouped by source, each chunk of mixture.chunk_steps steps drawn from one of them (uniform, fixed weights, or DaSH Thompson sampling on the held-out loss gain; docs/mixture.md). null: data.train.",
    )

    @model_validator(mode="after")
    def _splits_and_columns(self):
        if self.split is not None and self.train is None:
            raise ValueError("data.split is set but data.train is not; set data.train or remove data.split")
        if self.mixture is not None and self.train is not None:
            raise ValueError("data.mixture replaces data.train; set one of them")
        if self.mixture is not None and self.split is not None:
            raise ValueError("data.split applies to data.train; a mixture's files are read whole (remove data.split)")
        if self.mixture is not None and self.mixture.select == "dash" and self.mixture.heldout is None and self.eval is None:
            raise ValueError("data.mixture.heldout: select: dash needs held-out data for its reward; set mixture.heldout "
                             "(a file or a fraction such as 0.05) or data.eval")
        if self.eval_split is not None and self.eval is None:
            raise ValueError("data.eval_split is set but data.eval is not; set data.eval or remove data.eval_split")
        for target, column in self.columns.items():
            if not target.strip() or not column.strip():
                raise ValueError(f"data.columns: empty name in {target!r}: {column!r}; map a leantune field to a dataset column")
        return self

    def split_for(self, role: Literal["train", "eval"]) -> str | None:
        """The configured split of data.train (``role="train"``) or data.eval (``"eval"``); None: the default rule."""
        return self.split if role == "train" else self.eval_split


class SpanWeights(Section):
    """Per-token loss weight by span. A weight of 0 masks the span out of the loss (no lm_head work)."""

    prompt: float = Field(default=0.0, ge=0, description="Prompt tokens (0: loss on completions only).")
    think: float = Field(default=1.0, ge=0, description="Tokens of the thinking span (<think>...</think>).")
    answer: float = Field(default=1.0, ge=0, description="Tokens of the answer span (the completion after thinking).")


class LossStage(Section):
    """One stage of a span-weight schedule (SFTKey: all tokens first, then answer only)."""

    until_step: int | None = Field(default=None, description="Last optimizer step (exclusive) of this stage; None = to the end.")
    weights: SpanWeights = Field(default_factory=SpanWeights)


class LossConfig(Section):
    chunk_size: int = Field(
        default=1024, gt=0, description="Tokens per lm_head+cross-entropy chunk. Smaller: less memory, slightly slower."
    )
    weights: SpanWeights = Field(default_factory=SpanWeights, description="Loss weight per span.")
    stages: list[LossStage] = Field(
        default_factory=list, description="Optional schedule of span weights; overrides `weights` when set."
    )
    vocab_subset: int | None = Field(
        default=None,
        gt=0,
        description="APPROXIMATE loss (arXiv 2606.19528): softmax over this many candidate tokens plus the step's target tokens instead of the whole vocabulary; lm_head work and memory scale with the subset. Training loss reads lower than the exact loss (eval_loss stays exact). null: exact cross-entropy.",
    )
    vocab_subset_source: Literal["probability", "frequency", "embedding"] = Field(
        default="probability",
        description="Candidate set, built once at start: probability = the tokens the model itself gives the most probability at the loss positions of `vocab_subset_calibration` training examples (measured most accurate); frequency = the training data's most frequent tokens (ties to the lower id); embedding = the completion tokens and their nearest neighbours (cosine) in the output embedding.",
    )
    vocab_subset_calibration: int = Field(
        default=64, gt=0,
        description="probability source only: training examples (a seeded sample) run through the model, without gradients, to rank the vocabulary.",
    )

    def weights_at(self, step: int) -> SpanWeights:
        """Span weights in force at optimizer step ``step`` (0-based)."""
        for stage in self.stages:
            if stage.until_step is None or step < stage.until_step:
                return stage.weights
        return self.stages[-1].weights if self.stages else self.weights


class AdapterConfig(Section):
    method: Literal["lora", "full"] = Field(default="lora", description="lora: train low-rank adapters; full: train every weight.")
    r: int = Field(default=8, gt=0, description="LoRA rank.")
    alpha: float = Field(default=16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names to adapt, or one regex matched against full module names.",
    )
    compute_dtype: Literal["auto", "float32"] = Field(
        default="auto",
        description="Dtype of LoRA's matmuls in training steps. The adapter's weights and optimizer state are fp32 either way. auto: with a bfloat16 base (not quantized), the step's forward runs under bf16 autocast with PEFT's input casting off, so x·A·B runs in bf16 like the base (mixed precision, as Trainer's bf16=True) instead of casting every adapted projection's input and output between bf16 and fp32 (measured in docs/compute.md); float32: PEFT's default casts. Used by the SFT and DPO training steps and RL's policy update; no effect on fp32 or quantized bases, MeZO, or sampling.",
    )


class QuantConfig(Section):
    """Weight-only quantization of the frozen base (QLoRA-style: arXiv 2305.14314)."""

    bits: Literal[4, 8] | None = Field(
        default=None,
        description="Store the base's linear layers (not lm_head) as INT4/INT8, dequantized on the fly; null: full precision. INT4: ~0.16x their fp32 bytes, slower matmuls.",
    )
    group_size: int = Field(default=64, gt=0, description="Input columns per scale/offset pair. Smaller: more accurate, more scale bytes.")
    embedding_bits: Literal[4, 8] | None = Field(
        default=None,
        description="Store the input embedding and the LM head (once when tied) as INT8/INT4 too; null: full precision. SmolLM2-135M's tied table: 113 MB fp32 -> 32 MB INT8 / 18 MB INT4; measured loss cost on the demo task's base model +0.007 nats (INT8) vs +0.13 (INT4). Lookups and the vocabulary-subset loss dequantize only the rows they read, the exact loss 16 MiB of rows at a time; RL sampling, RL log-probs and evaluation use a transient full-precision copy of the head.",
    )


class OptimConfig(Section):
    name: Literal["adamw", "mezo"] = Field(
        default="adamw",
        description="adamw: backprop + Adam state. mezo: zeroth-order SGD (arXiv 2305.17333), 2 forward passes per sample and no gradients or optimizer state: memory ~ inference, but many more steps (paper: lr 1e-6..1e-7 for full parameters; LoRA needs larger values). In `leantune train` MeZO lowers the loss; in `leantune rl` it raises the reward itself (a non-differentiable objective, e.g. verifier accuracy), re-sampling the kept prompts at theta +- zo_eps * z.",
    )
    lr: float = Field(default=2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="adamw only.")
    eps: float = Field(default=1e-8, gt=0, description="adamw only: Adam's denominator epsilon.")
    max_grad_norm: float | None = Field(default=1.0, description="Clip the global gradient norm; null disables. adamw only.")
    zo_eps: float = Field(default=1e-3, gt=0, description="mezo only: perturbation scale of theta +- zo_eps * z.")
    zo_samples: int = Field(
        default=1, gt=0, description="mezo only: directions averaged per step; each costs two forward passes."
    )
    scheduler: Literal["cosine", "constant"] = Field(default="cosine", description="LR after warmup.")
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1, description="Cosine floor as a fraction of lr.")


class TrainConfig(Section):
    steps: int = Field(default=100, gt=0, description="Optimizer steps.")
    micro_batch_size: int = Field(default=4, gt=0, description="Examples per forward/backward.")
    grad_accum: int = Field(default=1, gt=0, description="Micro-batches per optimizer step.")
    seed: int = Field(default=0, description="Seeds data order, adapter init and dropout.")
    activation_checkpointing: Literal["off", "all", "selective"] | int | None = Field(
        default=None,
        description="Recompute layer activations in backward: off, all, every k-th layer (int k), or selective (every "
        "layer keeps its matmul and attention outputs and recomputes only norms, activations, rotary, elementwise "
        "ops and LoRA's rank-r product: memory between off and all, less extra compute; docs/planning.md). all: less memory, ~30% more compute. null (the "
        "default): chosen at run start, the fastest setting the planner predicts to fit memory.budget, or 80% of the "
        "available RAM (free device memory on CUDA); the ledger records the choice and why (extra.auto_choices). "
        "YAML's unquoted off/false/no mean off, on/true/yes mean all.",
    )
    offload_checkpoints: bool = Field(
        default=False,
        description="Keep the inputs of checkpointed layers in a memory-mapped file in the run directory instead of RAM "
        "(paged out once read, paged back in by backward's recomputation): activations drop to about one layer's input, "
        "for one write and one read of them per step. Needs activation_checkpointing; CPU training only (a model on another device is refused); `leantune train` (SFT).",
    )
    eval_every: int = Field(default=0, ge=0, description="Evaluate on data.eval every N steps (0: only at the end).")
    save_every: int = Field(default=0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    log_every: int = Field(default=1, gt=0, description="Write a metrics line every N steps.")
    output_dir: str = Field(default="runs/default", description="Run directory: checkpoints, metrics.jsonl, ledger.json.")
    threads: int | None = Field(default=None, gt=0, description="torch CPU threads (default: torch's choice).")
    progress: bool = Field(default=True, description="Show a progress bar.")
    report_to: list[Literal["tensorboard", "trackio", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="Experiment trackers that receive every metrics.jsonl row live, and the ledger at the end "
        "(docs/trackers.md): tensorboard (RUN/tensorboard/), trackio (local), wandb (respects WANDB_MODE, e.g. "
        "offline), mlflow (RUN/mlruns unless MLFLOW_TRACKING_URI is set). Each needs its extra, e.g. "
        "pip install 'leantune[tensorboard]'. metrics.jsonl is always written.",
    )
    allocator: Literal["auto", "system", "jemalloc", "tbbmalloc"] = Field(
        default="auto",
        description="The malloc the leantune command runs on (it re-executes itself with the library in LD_PRELOAD; "
        "the Python API keeps its process's malloc). auto: jemalloc if installed, else tbbmalloc (the tbb wheel), else "
        "the system's. A caching malloc reuses freed pages instead of faulting them in again: measured on SmolLM2 LoRA "
        "SFT (seq 1024, batch 4, every 2nd layer checkpointed) 84 tokens/s at 3.05 GiB on glibc, 118 at 3.17 GiB on "
        "tbbmalloc, 149 at 3.33 GiB on jemalloc; on the demo's short sequences tbbmalloc peaked 2.50 GiB vs 1.82 on "
        "glibc and 1.89 on jemalloc. system: the C library's malloc, tuned by malloc_mmap_threshold.",
    )
    malloc_mmap_threshold: int | None = Field(
        default=131072,
        ge=0,
        description="glibc only (allocator system, or auto with no caching malloc found): allocations of this many bytes or more are mmap'd and returned to the OS on free, "
        "which keeps peak RSS near the true working set (null: leave malloc alone). A memory-for-speed trade: measured "
        "on SmolLM2 LoRA SFT (seq 1024, batch 4) 3.05 GiB at 98 tokens/s with it, 5.82 GiB at 143 tokens/s with null. "
        "RL steps (sampling and the short-sequence update) run with glibc's largest threshold and keep freed heap "
        "pages for reuse (allocator.heap_allocator), then this value is restored.",
    )

    device: str = Field(
        default="auto",
        description="Where training runs: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps. Under torchrun each process takes cuda:LOCAL_RANK.",
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="With several processes (torchrun): ddp replicates the model and all-reduces the (small) adapter gradients; fsdp shards parameters, gradients and optimizer state with FSDP2 (full fine-tuning, or a base too large for one device). gloo on the CPU, nccl on GPUs.",
    )
    dist_timeout_s: int = Field(
        default=300, gt=0,
        description="Seconds a process waits on its peers (a collective) before the job stops with an error naming the lost rank.",
    )

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _yaml_booleans(cls, v):
        # YAML 1.1 reads unquoted off/no/false as False and on/yes/true as True
        if v is False:
            return "off"
        if v is True:
            return "all"
        return v

    @field_validator("device")
    @classmethod
    def _device_name(cls, v):
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError("expected auto, cpu, cuda, cuda:N or mps")
        return v

    @field_validator("activation_checkpointing")
    @classmethod
    def _positive_k(cls, v):
        if isinstance(v, int) and v <= 0:
            raise ValueError("every-k checkpointing needs k >= 1 (or 'off' / 'all')")
        return v

    @model_validator(mode="after")
    def _offload_needs_checkpointing(self):
        if self.offload_checkpoints and self.activation_checkpointing in ("off", None):
            raise ValueError("offload_checkpoints: the inputs of checkpointed layers are what it moves to a file; "
                             "set train.activation_checkpointing (all, selective, or every k-th layer)")
        return self


class EvalConfig(Section):
    task: str | None = Field(default=None, description="Verifiable task for accuracy (e.g. 'arithmetic').")
    num_problems: int = Field(default=50, gt=0, description="Held-out problems for task accuracy.")
    max_new_tokens: int = Field(default=64, gt=0)
    batch_size: int = Field(default=8, gt=0)


_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*((?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]\+?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: str | float) -> int:
    """Bytes in a memory size: an integer byte count or a number with a unit. GB/MB/KB/TB are powers of
    1000, GiB/MiB/KiB/TiB powers of 1024 (``"2GB"`` = 2,000,000,000 bytes; ``"2GiB"`` = 2,147,483,648).

    >>> parse_size("2GB"), parse_size("1.5 GiB"), parse_size(4096), parse_size("512mib"), parse_size("2e9")
    (2000000000, 1610612736, 4096, 536870912, 2000000000)
    """
    units = "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        # ValueError, not TypeError: pydantic turns only ValueErrors into field errors with file:line
        raise ValueError(f"a memory size is a number of bytes or a string such as '2GB' or '1.5GiB', got {value!r}")  # noqa: TRY004
    if isinstance(value, (int, float)):
        if value <= 0 or value != int(value):
            raise ValueError(f"a memory size in bytes must be a positive whole number, got {value!r}")
        return int(value)
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f"cannot read {value!r} as a memory size; write e.g. '2GB', '1.5GiB' or 2000000000 (units: {units})")
    number, unit = float(m.group(1)), (m.group(2) or "b").lower()
    if unit not in _SIZE_UNITS:
        hint = f"; did you mean '{m.group(1)}{unit[0].upper()}B' (10^n) or '{m.group(1)}{unit[0].upper()}iB' (2^n)?" if unit in ("k", "m", "g", "t") else ""
        raise ValueError(f"unknown unit {m.group(2)!r} in memory size {value!r}{hint} (units: {units})")
    nbytes = round(number * _SIZE_UNITS[unit])
    if nbytes <= 0:
        raise ValueError(f"a memory size must be positive, got {value!r}")
    return nbytes


class MemoryConfig(Section):
    """Memory planning (`leantune plan`): a budget the run must fit, checked before anything loads."""

    budget: str | int | None = Field(
        default=None,
        description="Peak-memory (RSS) budget, e.g. '2GB' (10^9 bytes), '1.5GiB' (2^30) or bytes; `leantune train` "
        "refuses to start, naming settings that fit, when the planner predicts more. null: no check.",
    )
    loss_fraction: float = Field(
        default=1.0, gt=0, le=1,
        description="Share of token positions that carry a loss (completion tokens), for the planner's loss "
        "workspace; 1.0 assumes the worst case.",
    )

    @field_validator("budget")
    @classmethod
    def _parseable(cls, v):
        if v is not None:
            parse_size(v)
        return v

    @property
    def budget_bytes(self) -> int | None:
        return None if self.budget is None else parse_size(self.budget)


class PromptSelectionConfig(Section):
    """Skip prompts that teach nothing right now: recent pass rate exactly 0 or 1."""

    enabled: bool = Field(default=True, description="Skip prompts whose last `window` observed pass rates were all 0 or all 1.")
    window: int = Field(default=1, gt=0, description="How many recent rollout groups of a prompt must agree before it is skipped.")
    cooldown_steps: int = Field(default=8, gt=0, description="Steps a skipped prompt sits out before it is re-admitted (the policy may have moved).")


class RouterConfig(Section):
    """Difficulty routing (arXiv 2511.03808): a probe on the prompt's prefill hidden state predicts P(correct) and sets
    each prompt's group size; prompts predicted solved or hopeless are skipped."""

    enabled: bool = Field(default=False, description="Route: give each prompt its own group size from the probe's prediction.")
    layer: int | None = Field(default=None, ge=0, description="Decoder layer whose output (prompt's last token) feeds the probe; null: the middle layer (num_layers // 2).")
    min_group_size: int = Field(default=2, ge=2, description="Fewest samples a routed prompt gets (a group of 1 has no advantage).")
    max_group_size: int = Field(default=16, ge=2, description="Most samples an uncertain prompt gets.")
    skip_solved: float = Field(default=0.9, gt=0, le=1, description="Skip prompts with predicted P(correct) at or above this.")
    skip_hopeless: float = Field(default=0.1, ge=0, lt=1, description="Skip prompts with predicted P(correct) at or below this.")
    explore: float = Field(default=0.1, ge=0, le=1, description="Share of would-be-skipped prompts sampled anyway (min_group_size), so the probe keeps seeing both ends.")
    warmup_prompts: int = Field(default=32, ge=1, description="Prompts observed (at rl.group_size each) before the router acts.")
    l2: float = Field(default=1.0, gt=0, description="L2 penalty of the logistic probe on standardised features (larger: smoother, less overfit).")
    newton_steps: int = Field(default=25, gt=0, description="Newton iterations per refit (converges in a handful).")
    buffer: int = Field(default=512, gt=0, description="Most recent prompts the probe is refitted on.")

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_group_size > self.max_group_size:
            raise ValueError(f"rl.router.min_group_size={self.min_group_size} > max_group_size={self.max_group_size}")
        if self.skip_hopeless >= self.skip_solved:
            raise ValueError(f"rl.router.skip_hopeless={self.skip_hopeless} must be below skip_solved={self.skip_solved}")
        return self


class ToolsConfig(Section):
    """Tool calls inside RL rollouts (`leantune.rl.tools`): a completion that writes ``<calc>EXPR</calc>`` (or
    ``<python>CODE</python>``) has the tool's answer appended as ``<result>...</result>`` and keeps sampling.
    The appended tokens are context: no loss, no importance ratio. docs/tools.md."""

    enabled: bool = Field(default=False, description="Let rollouts call tools; the result is appended to the row and sampling continues.")
    calculator: bool = Field(default=True, description="The calculator: exact + - * / and parentheses on non-negative integers (an `ast` evaluator, never eval).")
    python: bool = Field(default=False, description="Python run in leantune's sandbox (leantune.rl.sandbox: time and memory limits, no network); its stdout is the result.")
    calculator_tags: tuple[str, str] = Field(default=("<calc>", "</calc>"), description="Open and close markers of a calculator call.")
    python_tags: tuple[str, str] = Field(default=("<python>", "</python>"), description="Open and close markers of a Python call.")
    result_tags: tuple[str, str] = Field(default=("<result>", "</result>"), description="What wraps a tool's answer in the completion.")
    max_calls: int = Field(default=4, ge=1, description="Tool calls acted on per completion; later call markers are plain text.")
    max_result_tokens: int = Field(default=32, ge=1, description="Most tokens of one tool answer (markers included; a longer answer is cut, the close marker kept). They count against rl.max_new_tokens.")
    python_timeout_s: float = Field(default=2.0, gt=0, description="Wall-clock limit of one Python call (sandbox).")
    python_memory_mb: int = Field(default=256, gt=0, description="Address-space limit of one Python call, MiB (sandbox).")

    @model_validator(mode="after")
    def _usable(self):
        if self.enabled and not (self.calculator or self.python):
            raise ValueError("rl.tools.enabled with neither calculator nor python: turn one on")
        tags = [*self.calculator_tags, *self.python_tags, *self.result_tags]
        if any(not t for t in tags) or len(set(tags)) != len(tags):
            raise ValueError(f"rl.tools: the six markers must be non-empty and distinct, got {tags}")
        return self


class PrefixRolloutsConfig(Section):
    """Tree-OPO prefix-conditioned rollouts (arXiv 2509.09284): each prompt's completions start from prefixes of
    its reference trace (the prefix is context, never trained on); advantages subtract each prefix's subtree
    value. docs/tree_opo.md has the formula."""

    enabled: bool = Field(default=False, description="Sample each prompt as a tree: rl.group_size completions from each prefix of its reference trace.")
    depths: list[float] = Field(
        default_factory=lambda: [0.0, 1 / 3, 2 / 3],
        description="Cut points as fractions of the reference trace's tokens, increasing, in [0, 1); 0 = the bare prompt. A prompt's tree has one node per distinct cut (short traces can give fewer).",
    )
    alpha: float = Field(default=1.0, ge=0, description="Weight of the prefix's subtree value V (mean reward of the completions sharing the prefix) subtracted from each reward: A = r - alpha V, then centred over the whole tree. 0: a plain group over the tree.")
    traces: str = Field(
        default="task",
        description="Where reference traces come from: 'task' (the `completion` column of data.train's rows, or the worked solution rl.task generates) or a JSONL path of {prompt, completion} rows (e.g. an rft run's accepted.jsonl; the first row of a prompt wins). Prompts without a trace get the bare-prompt node only.",
    )

    @field_validator("depths")
    @classmethod
    def _depths_ordered(cls, v):
        if not v:
            raise ValueError("rl.prefix_rollouts.depths: give at least one cut point, e.g. [0.0, 0.33, 0.67]")
        if any(not 0 <= d < 1 for d in v):
            raise ValueError(f"rl.prefix_rollouts.depths: each cut is a fraction of the trace in [0, 1), got {v}")
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"rl.prefix_rollouts.depths must increase strictly, got {v}")
        return v


class RLConfig(Section):
    """RL with verifiable rewards (`leantune rl`): sample groups, score, filter, update. Steps come from `train.steps`."""

    loss: Literal["grpo", "dapo", "dr_grpo"] = Field(
        default="dapo", description="Policy loss: grpo (sequence-mean), dapo (token-level, clip-higher), dr_grpo (constant normalizer)."
    )
    advantage: Literal["grpo", "dr_grpo", "rloo"] | None = Field(
        default=None, description="Advantage estimator; null picks the loss's own (dr_grpo -> mean-only, else group-normalized)."
    )
    init: str | None = Field(
        default=None,
        description="A finished LoRA run directory (e.g. from `leantune train`): the policy starts from its adapter, on the base in `model`.",
    )
    task: str | None = Field(default=None, description="Bundled task (`leantune make-data --help` lists them): its prompts when data.train is unset, and its verifier as the `task` reward.")
    num_prompts: int = Field(default=512, gt=0, description="Training prompts generated from `rl.task` when data.train is unset.")
    rewards: dict[str, float] = Field(
        default_factory=lambda: {"task": 1.0},
        description="Reward terms and their weights, summed: task (the task's verifier), task_isomorphic (the task's verifier, kept only if the solution also solves relabelled variants of the problem, arXiv 2604.15149; countdown), length_aware (Kimi k1.5, arXiv 2501.12599: a term added to the others, lam if correct else min(0, lam)), format, overlong (DAPO's soft penalty), exact_match, math (verifiers on the rows' `answer`), or 'package.module:function' for your own.",
    )
    group_size: int = Field(default=8, gt=1, description="Completions sampled per prompt (G).")
    prompts_per_step: int = Field(default=8, gt=0, description="Prompt groups in each policy update's batch.")
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=64, gt=0, description="Completion budget; a completion cut here is 'overlong'.")
    stop: list[str] = Field(default_factory=list, description="Stop strings; generation also stops when the task says the answer is complete.")
    speculative: Literal["off", "prompt_lookup", "draft"] = Field(
        default="off",
        description="Exact speculative rollouts. prompt_lookup: draft up to `speculative_tokens` tokens per row by "
        "matching the last `speculative_ngram` tokens earlier in the prompt + completion, verify them in one policy "
        "forward with the speculative-sampling rule (arXiv 2211.17192): the same distribution, log-probs and (per-prompt "
        "seeds) tokens as off, fewer forwards when completions copy from the prompt. Each forward is up to "
        "1 + speculative_tokens tokens wide, so it pays when the forward is memory-bound (small batches, large models) "
        "and acceptance is high; draft: a draft model (`speculative_draft`) samples the k tokens from its own "
        "distribution q, accepted with probability min(1, p/q) (arXiv 2302.01318): the same distribution and log-probs "
        "as off, other tokens; docs/speculative.md has measurements.",
    )
    speculative_tokens: int = Field(default=4, gt=0, le=64, description="Most tokens drafted per row per policy forward (k).")
    speculative_ngram: int = Field(default=3, gt=0, description="Longest n-gram prompt lookup matches (it falls back to shorter ones, down to 1).")
    speculative_draft: str | None = Field(
        default=None,
        description="The draft model of speculative: draft. 'layers:N': the policy's own first N decoder layers + final "
        "norm + LM head (self-speculation, shares the weights and the adapter); or a model directory (safetensors) / "
        ".gguf file sharing the policy's tokenizer. Exact whatever the draft; a better one is accepted more often.",
    )

    @model_validator(mode="after")
    def _speculative_draft(self):
        spec = self.speculative_draft
        if self.speculative == "draft" and not spec:
            raise ValueError("rl.speculative: draft needs rl.speculative_draft: 'layers:N' (the policy's first N "
                             "layers) or the path of a draft model sharing the policy's tokenizer")
        if spec and spec.startswith("layers:") and not spec[len("layers:"):].isdigit():
            raise ValueError(f"rl.speculative_draft: {spec!r}: expected layers:N with N a positive integer, e.g. layers:8")
        if spec == "layers:0":
            raise ValueError("rl.speculative_draft: layers:0 drafts from no layer at all; use layers:1 or more")
        return self
    fold_adapter: bool = Field(
        default=True,
        description="Sample with each LoRA delta folded into a copy of its base weight (one matmul per layer, faster rollouts; the copy lives while sampling and `leantune plan` counts it). No effect on a quantized base.",
    )
    epsilon_low: float = Field(default=0.2, ge=0, description="Lower clip of the importance ratio.")
    epsilon_high: float = Field(default=0.28, ge=0, description="Upper clip (DAPO clip-higher; set = epsilon_low for symmetric).")
    beta: float = Field(default=0.0, ge=0, description="KL-to-base coefficient (k3 estimator; reference = the base with the adapter disabled).")
    updates_per_batch: int = Field(default=1, gt=0, description="Optimizer passes over each rollout batch (mu); >1 makes the clip active.")
    dynamic_sampling: bool = Field(default=True, description="Drop groups whose rewards are all equal and sample more prompts to refill the batch (DAPO).")
    max_sampling_rounds: int = Field(default=3, gt=0, description="Cap on sampling rounds per step when refilling the batch.")
    overlong_filter: bool = Field(default=True, description="Mask completions cut at max_new_tokens out of the loss (DAPO overlong filtering).")
    overlong_buffer: int = Field(default=16, ge=0, description="Soft overlong penalty ramp (tokens before max_new_tokens), for the `overlong` reward.")
    prompt_selection: PromptSelectionConfig = Field(default_factory=PromptSelectionConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    tools: ToolsConfig = Field(default_factory=ToolsConfig)
    prefix_rollouts: PrefixRolloutsConfig = Field(default_factory=PrefixRolloutsConfig)
    entropy_reg: float = Field(
        default=0.0, ge=0,
        description="CorR-PO-style term (arXiv 2605.17770): adds entropy_reg x the mean per-completion Pearson correlation of token entropy and logit-gradient norm to the loss (pushes it negative); 0 = off. See docs/entropy_loss.md.",
    )
    entropy_filter: float | None = Field(
        default=None, ge=0, le=1, description="Optional: keep only this fraction of candidate prompts with the highest policy prompt entropy."
    )
    rollout_workers: int = Field(
        default=0, ge=0,
        description="Ray actors that sample rollouts (each holds the frozen base once and receives only the adapter's weights each step); 0 samples in-process. Needs `pip install 'leantune[ray]'`.",
    )
    ray_address: str | None = Field(
        default=None, description="Ray cluster to join (`ray start --head` on the head node); null starts a local Ray.",
    )
    async_rollouts: bool = Field(
        default=False,
        description="Sample step t+1's rollouts while step t updates (one step off-policy; the importance ratio uses the sampling policy's log-probs). Needs rollout_workers >= 1.",
    )

    @field_validator("task")
    @classmethod
    def _known_task(cls, v):
        if v is not None:
            from leantune.tasks import UnknownTaskError, get_task

            try:
                get_task(v)
            except UnknownTaskError as err:
                raise ValueError(str(err)) from None
        return v

    @model_validator(mode="after")
    def _rewards_buildable(self):
        from leantune.rl.rewards import check_reward_names

        if self.task is not None or self.rewards != {"task": 1.0}:  # the defaults are for recipes that set rl.task
            check_reward_names(self.rewards, self.task)
        if self.async_rollouts and self.rollout_workers < 1:
            raise ValueError("rl.async_rollouts overlaps sampling with the update in Ray workers; set rl.rollout_workers >= 1")
        if self.router.enabled and not (self.router.min_group_size <= self.group_size <= self.router.max_group_size):
            raise ValueError(f"rl.router: need min_group_size <= rl.group_size <= max_group_size, got "
                             f"{self.router.min_group_size} <= {self.group_size} <= {self.router.max_group_size}")
        if self.router.enabled and self.rollout_workers:
            raise ValueError("rl.router reads the prefill's hidden states in-process; set rl.rollout_workers: 0 "
                             "or rl.router.enabled: false")
        if self.router.enabled and self.speculative != "off":
            raise ValueError("rl.router sizes groups inside plain sampling; speculative rollouts do not route yet: "
                             "set rl.speculative: off or rl.router.enabled: false")
        if self.tools.enabled:
            self._tools_supported()
        if self.prefix_rollouts.enabled:
            self._check_prefix_rollouts()
        if self.async_rollouts and self.entropy_filter is not None:
            raise ValueError("rl.async_rollouts picks the next step's prompts before this step's update; the entropy "
                             "filter needs the updated policy: set rl.entropy_filter: null or rl.async_rollouts: false")
        return self

    def _tools_supported(self) -> None:
        """rl.tools runs in the plain sampler only, and a stop string must not end a row inside a tool call."""
        if self.speculative != "off":
            raise ValueError("rl.tools appends tool answers inside plain sampling; speculative rollouts do not call "
                             "tools: set rl.speculative: off or rl.tools.enabled: false")
        if self.router.enabled:
            raise ValueError("rl.tools with rl.router is not supported (the router sizes groups inside its own "
                             "sampler): set rl.router.enabled: false or rl.tools.enabled: false")
        t = self.tools
        tags = [*t.calculator_tags, *t.python_tags, *t.result_tags]
        clash = [(s, tag) for s in self.stop for tag in tags if s in tag]
        if clash:
            raise ValueError(f"rl.stop {clash[0][0]!r} occurs in the rl.tools marker {clash[0][1]!r}: rows would stop "
                             "inside a tool call; drop that stop string or change the marker")

    def _check_prefix_rollouts(self) -> None:
        """What rl.prefix_rollouts does not combine with, and why (each says what to change)."""
        off = "or rl.prefix_rollouts.enabled: false"
        if self.router.enabled:
            raise ValueError(f"rl.prefix_rollouts samples fixed-size groups per prefix; the router sizes groups per prompt: set rl.router.enabled: false {off}")
        if self.speculative != "off":
            raise ValueError(f"rl.prefix_rollouts conditions plain sampling on a prefix; speculative rollouts do not take one yet: set rl.speculative: off {off}")
        if self.rollout_workers:
            raise ValueError(f"rl.prefix_rollouts samples in-process (or on torchrun ranks), not on Ray workers yet: set rl.rollout_workers: 0 {off}")
        if self.tools.enabled:
            raise ValueError(f"rl.prefix_rollouts with rl.tools is not supported (tool calls run in their own sampler): set rl.tools.enabled: false {off}")
        if self.advantage == "rloo":
            raise ValueError(f"rl.prefix_rollouts has its own tree advantage (mean-centred, std-scaled unless rl.advantage: dr_grpo); set rl.advantage: null, grpo or dr_grpo {off}")


class RFTConfig(Section):
    """Expert iteration (`leantune rft`, arXiv 2512.24940): sample, keep verified, fine-tune on all accepted, repeat."""

    rounds: int = Field(default=3, gt=0)
    samples_per_prompt: int = Field(default=4, gt=0, description="k completions sampled per prompt each round.")
    keep: Literal["shortest", "all", "first"] = Field(default="shortest", description="Which verified completions of a prompt to keep.")
    steps_per_round: int = Field(default=20, gt=0, description="SFT optimizer steps on the accepted union each round.")


class ActiveConfig(Section):
    """Active pair selection (`dpo.active`, arXiv 2511.04286): data.train is a pool of unlabelled pairs
    (``{"prompt": ..., "responses": [a, b], ...}``); rounds of select -> label -> DPO steps on the labelled set."""

    enabled: bool = Field(default=False, description="Train on pairs chosen from an unlabelled pool and labelled on demand, instead of on chosen/rejected rows.")
    label_budget: int = Field(default=64, ge=1, description="Labels to spend in all (labelling-function calls that return an answer, ties included). The run stops asking once spent.")
    batch: int = Field(default=8, ge=1, description="Pairs labelled per round. Rounds are spread evenly over train.steps (round r starts at step r x steps / rounds); smaller = the posterior steers more often, at one feature pass over the pool per round.")
    warmup: int = Field(default=0, ge=0, description="Labels of the first round(s) picked uniformly at random before the selector takes over (0: the selector starts from the prior).")
    labeler: str = Field(default="column", description="Who labels a pair: 'column' (the pool's label_column, read only for pairs selected), 'verifier' (the reward named by `verifier` scores each response against the row's fields, e.g. answer; higher wins, equal is a tie), or 'package.module:function', a judge called as fn(prompt, response_a, response_b, **row_fields) -> 0 (a wins), 1 (b wins) or None (tie).")
    label_column: str = Field(default="preferred", description="labeler: column: the pool column holding the preferred response's index, 0 or 1.")
    verifier: str = Field(default="exact_match", description="labeler: verifier: a reward with a verifier from leantune.rl.rewards.REWARDS (exact_match, math), called as (prompts, completions, **row_fields).")
    retries: int = Field(default=1, ge=0, description="Extra tries for a labelling call that raises; after them the pair is skipped and counted (label_failures), and no label is spent.")
    select: Literal["thompson", "random"] = Field(default="thompson", description="thompson: dueling Thompson sampling on a Bradley-Terry head with a Laplace posterior over the policy's response features; random: uniform without replacement (the baseline).")
    alpha: float = Field(default=1.0, ge=0, le=1, description="thompson: weight of the two posterior draws' disagreement on a pair; 1 - alpha weighs the posterior spread of the pair's preference probability. 1: pure dueling Thompson sampling.")
    prior_precision: float = Field(default=1.0, gt=0, description="Precision (1/variance) of the Gaussian prior on the head's weights over standardized features: larger = trust the labels less, explore less.")
    features: Literal["last", "mean"] = Field(default="last", description="A response's feature: the policy's final hidden state at its last token (last) or averaged over its tokens (mean); computed with the adapter on, no gradient.")


class DPOConfig(Section):
    """Preference optimization (`leantune dpo`) on chosen/rejected pairs; steps come from `train.steps`."""

    loss: Literal["dpo", "ipo", "simpo"] = Field(
        default="dpo",
        description="dpo: -log sigmoid(beta x log-ratio margin) (arXiv 2305.18290); ipo: squared loss to a margin of 1/(2 beta) on token-averaged log-ratios (arXiv 2310.12036); simpo: length-normalized log-probs, no reference model, target margin gamma (arXiv 2405.14734).",
    )
    beta: float | None = Field(
        default=None, gt=0,
        description="dpo: inverse temperature of the implicit reward; ipo: the regularization tau; simpo: reward scale. null: the loss's usual value (dpo 0.1, ipo 0.1, simpo 2.0).",
    )
    gamma: float = Field(default=0.5, ge=0, description="simpo only: target reward margin between chosen and rejected.")
    label_smoothing: float = Field(
        default=0.0, ge=0, lt=0.5,
        description="dpo and simpo: probability that a pair's label is flipped (conservative DPO); 0 trusts every label. Not defined for ipo.",
    )
    precompute_reference: bool = Field(
        default=False,
        description="Score every pair under the reference once, without gradients, before training (two floats per pair, kept in memory and in checkpoints) instead of a no-grad reference forward every step: one pass over the data up front, then each step runs the policy only. Required with adapter.method: full or dpo.init (the reference is then the starting model, which a disabled adapter cannot give). Unused by simpo.",
    )
    init: str | None = Field(
        default=None,
        description="A finished LoRA run directory (e.g. from `leantune train`): training starts from its adapter, and the reference is that starting policy (needs precompute_reference unless the loss has no reference).",
    )
    active: ActiveConfig = Field(default_factory=ActiveConfig, description="Active pair selection: label only the pairs a Bayesian reward head is unsure about (docs/active.md).")


class Recipe(Section):
    model: ModelConfig
    data: DataConfig
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    rl: RLConfig = Field(default_factory=RLConfig, description="Used by `leantune rl` and `leantune rft` only.")
    rft: RFTConfig = Field(default_factory=RFTConfig, description="Used by `leantune rft` only.")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="Used by `leantune dpo` only.")
    memory: MemoryConfig = Field(default_factory=MemoryConfig, description="Budget checked by `leantune train` and `leantune plan`.")

    @model_validator(mode="after")
    def _quant_needs_lora(self):
        if self.quant.bits and self.adapter.method != "lora":
            raise ValueError("quant.bits: a quantized base is frozen; use adapter.method: lora (or quant.bits: null)")
        if self.quant.embedding_bits and self.adapter.method != "lora":
            raise ValueError("quant.embedding_bits: a quantized embedding is frozen; use adapter.method: lora (or quant.embedding_bits: null)")
        if 4 in (self.quant.bits, self.quant.embedding_bits) and self.quant.group_size % 2:
            raise ValueError(f"quant.group_size: 4-bit codes are packed two per byte, use an even size (got {self.quant.group_size})")
        return self

    @model_validator(mode="after")
    def _device_for_dtype(self):
        from leantune.models.precision import device_type

        self.model._device_type = device_type(self.train.device)
        return self

    @model_validator(mode="after")
    def _mezo_rules(self):
        if self.optim.name == "mezo" and self.rl.beta > 0:
            raise ValueError("rl.beta: the KL term needs gradients; with optim.name: mezo set rl.beta: 0")
        if self.optim.name == "mezo" and self.rl.prefix_rollouts.enabled:
            raise ValueError("rl.prefix_rollouts: optim.name: mezo re-samples from bare prompts; set rl.prefix_rollouts.enabled: false or use a gradient optimizer")
        if self.optim.name == "mezo" and self.rl.updates_per_batch != 1:
            raise ValueError("rl.updates_per_batch: optim.name: mezo takes one step per batch; set it to 1")
        if self.rl.beta > 0 and self.adapter.method != "lora":
            raise ValueError("rl.beta > 0 needs a LoRA adapter (the KL reference is the base with the adapter disabled)")
        if self.train.parallel == "fsdp" and self.quant.bits:
            raise ValueError("train.parallel: fsdp shards full-precision weights; a quantized base (quant.bits) runs with ddp")
        return self

    def require_for(self, command: str) -> None:
        """RecipeError unless the recipe has what ``command`` (train, rl, rft, dpo) needs beyond its own checks."""
        if command == "train" and self.data.train is None and self.data.mixture is None:
            raise RecipeError("data.train: leantune train needs training data (a .jsonl or .parquet file) or data.mixture")
        if command == "train" and self.data.mixture is not None and (missing := self.data.mixture.missing_files()):
            raise RecipeError("; ".join(missing))
        if command != "train" and self.data.mixture is not None:
            raise RecipeError(f"data.mixture: mixes SFT data for leantune train; leantune {command} reads data.train. "
                              "Remove data.mixture")
        if command in ("rl", "dpo") and self.train.offload_checkpoints:
            raise RecipeError(f"train.offload_checkpoints: moves checkpointed layer inputs to a file in leantune train "
                              f"(and rft's fine-tuning rounds); leantune {command} does not. Set it to false")
        if command in ("rl", "dpo") and self.data.packing:
            raise RecipeError(f"data.packing: packs SFT examples (leantune train, and rft's fine-tuning rounds); "
                              f"leantune {command} does not pack. Set data.packing: false")
        if command in ("rl", "rft"):
            if self.data.train is None and self.rl.task is None:
                raise RecipeError("rl: set data.train (prompt rows) or rl.task (a bundled task generates them)")
            from leantune.rl.rewards import check_reward_names

            try:
                check_reward_names(self.rl.rewards, self.rl.task)
            except ValueError as err:
                raise RecipeError(f"rl.rewards: {err}") from None
        if command == "dpo":
            if self.data.train is None:
                raise RecipeError("data.train: leantune dpo needs preference pairs (rows with prompt, chosen, rejected)")
            if self.optim.name != "adamw":
                raise RecipeError(f"optim.name: {self.optim.name} is not supported by leantune dpo; use adamw")
            if problem := self.dpo_problem():
                raise RecipeError(problem)

    def dpo_problem(self) -> str | None:
        """What makes the dpo section unusable with the rest of the recipe, or None."""
        from leantune.losses.preference import PREFERENCE_LOSSES

        dpo = self.dpo
        if PREFERENCE_LOSSES[dpo.loss].needs_reference and not dpo.precompute_reference:
            if self.adapter.method != "lora":
                return (f"dpo.loss: {dpo.loss} compares against a reference, which is the base with the adapter "
                        "disabled; full fine-tuning has none: set dpo.precompute_reference: true")
            if dpo.init is not None:
                return ("dpo.init: the reference is the starting (initialized) policy, which a disabled adapter "
                        "cannot give: set dpo.precompute_reference: true")
        if dpo.loss == "ipo" and dpo.label_smoothing:
            return "dpo.label_smoothing: IPO's squared loss has no label-noise form; set it to 0 or use dpo / simpo"
        if dpo.init is not None and self.adapter.method != "lora":
            return "dpo.init starts from a LoRA adapter; use adapter.method: lora"
        return self.active_problem()

    def active_problem(self) -> str | None:
        """What makes dpo.active unusable with the rest of the recipe, or None."""
        act = self.dpo.active
        if not act.enabled:
            return None
        rounds = -(-act.label_budget // act.batch)
        if rounds > self.train.steps:
            return (f"dpo.active: {act.label_budget} labels in rounds of {act.batch} is {rounds} rounds, more than "
                    f"train.steps={self.train.steps} (a round is followed by at least one step); raise dpo.active.batch "
                    "or train.steps")
        if self.dpo.precompute_reference:
            return ("dpo.precompute_reference: the labelled set grows during an active run; use the live reference "
                    "(the adapter disabled) with dpo.active")
        if act.labeler not in ("column", "verifier") and ":" not in act.labeler:
            return (f"dpo.active.labeler: {act.labeler!r} is not 'column', 'verifier' or 'package.module:function'")
        if act.labeler == "verifier":
            from leantune.rl.rewards import REWARDS

            if act.verifier not in REWARDS or REWARDS[act.verifier].verifier is None:
                having = [n for n, spec in REWARDS.items() if spec.verifier is not None]
                return f"dpo.active.verifier: {act.verifier!r} is not a reward with a verifier; use one of {', '.join(having)}"
        return None

    @model_validator(mode="after")
    def _dpo_consistent(self):
        # only a recipe that writes a dpo section is checked here; `leantune dpo` checks every recipe (require_for)
        if "dpo" in self.model_fields_set and (problem := self.dpo_problem()):
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _stages_ordered(self):
        ends = [s.until_step for s in self.loss.stages]
        if any(e is None for e in ends[:-1]):
            raise ValueError("loss.stages: only the last stage may omit until_step")
        bounded = [e for e in ends if e is not None]
        if bounded != sorted(bounded):
            raise ValueError("loss.stages: until_step values must increase")
        return self


# --------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def _parse_scalar(text: str) -> Any:
    """YAML scalar, except that ``3e-4`` is a float (YAML 1.1 would keep it a string)."""
    if text == "":
        return ""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") and "inf" not in value.lower() else int(value)
        except ValueError:
            return value
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r}: expected key.sub=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            if node.get(p) is None:  # absent, or an optional section set to null (data.dedup: null)
                node[p] = {}
            nxt = node[p]
            if not isinstance(nxt, dict):
                raise RecipeError(f"override {item!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = _parse_scalar(value)
    return raw


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The config class that owns the field at ``loc`` (for listing valid keys)."""
    cls: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        elif inner and any(isinstance(a, type) and issubclass(a, BaseModel) for a in inner):
            cls = next(a for a in inner if isinstance(a, type) and issubclass(a, BaseModel))
        else:
            return None
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _line_of(path: Path | None, loc: tuple) -> str:
    """Best-effort ``file:line`` of a dotted key in a YAML file."""
    if path is None or not path.exists():
        return "<overrides>"
    try:
        node = yaml.compose(path.read_text())
        line = 1
        for part in loc:
            if node is None:
                break
            if isinstance(node, yaml.MappingNode):
                match = [v for k, v in node.value if k.value == str(part)]
                if not match:
                    break
                key_node = next(k for k, v in node.value if k.value == str(part))
                line = key_node.start_mark.line + 1
                node = match[0]
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                break
        return f"{path}:{line}"
    except Exception:
        return str(path)


def format_validation_error(err: ValidationError, path: Path | None = None) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc) or "<root>"
        where = _line_of(path, loc) if loc else str(path or "<recipe>")
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc)
            valid = sorted(owner.model_fields) if owner else []
            section = ".".join(str(p) for p in loc[:-1] if not isinstance(p, int)) or None
            foreign = foreign_hint(str(loc[-1]), section) if len(loc) <= 2 else None
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" {foreign}" if foreign else f" Did you mean {close[0]!r}?" if close else ""
            lines.append(f"{where}: unknown key {dotted!r}.{hint} Valid keys: {', '.join(valid)}")
        elif e["type"] == "missing":
            lines.append(f"{where}: missing required field {dotted!r}")
        else:
            lines.append(f"{where}: field {dotted!r}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def recipe_from_dict(raw: dict, path: Path | None = None) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, path)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply dotted overrides and validate. Raises RecipeError with file:line."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}:1: a recipe is a mapping of sections (model, data, train, ...)")
    apply_overrides(raw, overrides or [])
    return recipe_from_dict(raw, path)


def _section_model(annotation) -> type[BaseModel] | None:
    """The config model a field holds (``RouterConfig``, or ``MixtureConfig`` of ``MixtureConfig | None``)."""
    import typing

    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _reference_rows(prefix: str, cls: type[BaseModel]) -> list[str]:
    """One table row per key of ``cls``; a nested section's keys follow its own row, dotted (``rl.router.enabled``)."""
    rows = []
    for key, f in cls.model_fields.items():
        value = f.get_default(call_default_factory=True)
        nested = _section_model(f.annotation)
        default = "required" if f.is_required() else repr(value)
        if isinstance(value, BaseModel):
            default = "(section)"
        elif nested is not None and value is None:
            default = "`None`: off; a mapping sets the keys below"
        typ = str(f.annotation).replace("typing.", "").replace("|", "\\|")
        typ = typ.replace("<class '", "").replace("'>", "")
        typ = re.sub(r"\b[\w.]*\.(?=[A-Z]\w*)", "", typ)  # drop module qualifiers
        doc = (nested.__doc__ or "").strip().split("\n\n")[0] if nested is not None else ""
        desc = (f.description or " ".join(doc.split())).replace("|", "\\|")
        default_cell = default if default.startswith("`") else f"`{default}`"
        rows.append(f"| `{prefix}.{key}` | {typ} | {default_cell} | {desc} |")
        if nested is not None:
            rows.extend(_reference_rows(f"{prefix}.{key}", nested))
    return rows


def recipe_reference_markdown() -> str:
    """The recipe reference tables (one per section, nested sections' keys included) for docs/recipes.md,
    generated from the config models."""
    out = []
    for name, field in Recipe.model_fields.items():
        out.append(f"### `{name}`\n\n| key | type | default | meaning |\n|---|---|---|---|")
        out.extend(_reference_rows(name, field.annotation))
        out.append("")
    return "\n".join(out)


REFERENCE_MARKERS = ("<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->")


def sync_reference(path: str | Path) -> bool:
    """Rewrite the block between the recipe-reference markers of a Markdown file (docs/recipes.md) from the
    config models; True if the file changed."""
    path = Path(path)
    text = path.read_text()
    start, end = REFERENCE_MARKERS
    if start not in text or end not in text:
        raise RecipeError(f"{path}: markers {start} / {end} not found")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{start}\n{recipe_reference_markdown()}\n{end}{tail}"
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":  # python -m leantune.config [docs/recipes.md]: print, or sync that file's reference
    import sys

    if len(sys.argv) > 1:
        print("updated" if sync_reference(sys.argv[1]) else "already in sync")
    else:
        print(recipe_reference_markdown())
