"""Names people already know: recipe keys from transformers, PEFT, TRL and axolotl, and leantune's name for each.

An unknown key is still refused (leantune has no aliases: one name per setting keeps recipes greppable
and the reference table honest); the error only says which leantune key means the same thing.
``FOREIGN_NAMES`` is the one table; every target in it is a real recipe field (tests/test_config_hints.py
walks the config models to check).

>>> foreign_hint("learning_rate")
"'learning_rate' is the transformers/TRL name; leantune's is 'optim.lr'."
>>> foreign_hint("lr", section="train")  # a real key of another section
"'lr' is not a key of 'train'; it lives at 'optim.lr'."
>>> foreign_hint("stepz") is None
True
"""

from __future__ import annotations

from typing import NamedTuple

from pydantic import BaseModel


class ForeignName(NamedTuple):
    target: str  # dotted leantune key, e.g. "optim.lr"
    origin: str  # where the foreign name comes from
    note: str = ""  # how the meaning differs, when it does


_HF = "transformers/TRL"
FOREIGN_NAMES: dict[str, ForeignName] = {
    # optimizer and schedule (transformers TrainingArguments, axolotl)
    "learning_rate": ForeignName("optim.lr", _HF),
    "weight_decay": ForeignName("optim.weight_decay", _HF),
    "max_grad_norm": ForeignName("optim.max_grad_norm", _HF),
    "adam_beta1": ForeignName("optim.betas", _HF, "a pair: optim.betas: [0.9, 0.999]"),
    "adam_beta2": ForeignName("optim.betas", _HF, "a pair: optim.betas: [0.9, 0.999]"),
    "adam_epsilon": ForeignName("optim.eps", _HF),
    "optimizer": ForeignName("optim.name", "axolotl", "adamw or mezo"),
    "warmup_steps": ForeignName("optim.warmup_steps", _HF),
    "warmup_ratio": ForeignName("optim.warmup_steps", _HF, "a step count, not a fraction of the run"),
    "lr_scheduler_type": ForeignName("optim.scheduler", _HF, "cosine or constant"),
    "lr_scheduler": ForeignName("optim.scheduler", "axolotl", "cosine or constant"),
    # batch, length of the run, checkpoints, logging
    "per_device_train_batch_size": ForeignName("train.micro_batch_size", _HF),
    "micro_batch_size": ForeignName("train.micro_batch_size", "axolotl"),
    "gradient_accumulation_steps": ForeignName("train.grad_accum", _HF),
    "num_train_epochs": ForeignName("train.steps", _HF, "leantune counts optimizer steps, not epochs"),
    "num_epochs": ForeignName("train.steps", "axolotl", "leantune counts optimizer steps, not epochs"),
    "max_steps": ForeignName("train.steps", _HF),
    "seed": ForeignName("train.seed", _HF),
    "output_dir": ForeignName("train.output_dir", _HF),
    "gradient_checkpointing": ForeignName("train.activation_checkpointing", _HF, "off, all, selective, or every k-th layer; null: chosen at run start"),
    "logging_steps": ForeignName("train.log_every", _HF),
    "save_steps": ForeignName("train.save_every", _HF),
    "eval_steps": ForeignName("train.eval_every", _HF),
    "report_to": ForeignName("train.report_to", _HF, "a list: [tensorboard, trackio, wandb, mlflow]"),
    "per_device_eval_batch_size": ForeignName("eval.batch_size", _HF),
    # model and precision
    "model_name_or_path": ForeignName("model.path", _HF),
    "base_model": ForeignName("model.path", "axolotl"),
    "tokenizer_name": ForeignName("model.tokenizer", _HF),
    "tokenizer_config": ForeignName("model.tokenizer", "axolotl"),
    "bf16": ForeignName("model.dtype", _HF, "model.dtype: bfloat16"),
    "fp16": ForeignName("model.dtype", _HF, "float32, bfloat16 or auto; no float16"),
    "torch_dtype": ForeignName("model.dtype", "transformers", "float32, bfloat16 or auto"),
    "load_in_4bit": ForeignName("quant.bits", "transformers/axolotl", "quant.bits: 4"),
    "load_in_8bit": ForeignName("quant.bits", "transformers/axolotl", "quant.bits: 8"),
    # adapter (PEFT LoraConfig, axolotl lora_*)
    "lora_r": ForeignName("adapter.r", "axolotl"),
    "r": ForeignName("adapter.r", "PEFT"),
    "lora_alpha": ForeignName("adapter.alpha", "PEFT/axolotl"),
    "lora_dropout": ForeignName("adapter.dropout", "PEFT/axolotl"),
    "target_modules": ForeignName("adapter.target_modules", "PEFT"),
    "lora_target_modules": ForeignName("adapter.target_modules", "axolotl"),
    # data
    "datasets": ForeignName("data.train", "axolotl", "one .jsonl or .parquet file"),
    "dataset_name": ForeignName("data.train", _HF, "a local .jsonl or .parquet file"),
    "test_datasets": ForeignName("data.eval", "axolotl", "one .jsonl or .parquet file"),
    "sequence_len": ForeignName("data.max_length", "axolotl"),
    "max_seq_length": ForeignName("data.max_length", _HF),
    "max_length": ForeignName("data.max_length", _HF),
    "max_prompt_length": ForeignName("data.max_length", "TRL", "in RL, data.max_length is the longest prompt"),
    # RL (TRL GRPOConfig)
    "num_generations": ForeignName("rl.group_size", "TRL"),
    "max_completion_length": ForeignName("rl.max_new_tokens", "TRL"),
    "beta": ForeignName("rl.beta", "TRL"),
    "epsilon": ForeignName("rl.epsilon_low", "TRL"),
    "epsilon_high": ForeignName("rl.epsilon_high", "TRL"),
    "loss_type": ForeignName("rl.loss", "TRL", "grpo, dapo or dr_grpo"),
    "temperature": ForeignName("rl.temperature", "TRL"),
    "top_p": ForeignName("rl.top_p", "TRL"),
    "num_iterations": ForeignName("rl.updates_per_batch", "TRL"),
    "mask_truncated_completions": ForeignName("rl.overlong_filter", "TRL"),
    "reward_weights": ForeignName("rl.rewards", "TRL", "a mapping reward name -> weight"),
    # preference optimization (TRL DPOConfig / CPOConfig)
    "precompute_ref_log_probs": ForeignName("dpo.precompute_reference", "TRL"),
    "simpo_gamma": ForeignName("dpo.gamma", "TRL"),
}


def _sections() -> dict[str, type[BaseModel]]:
    from leantune.config import Recipe

    return {name: f.annotation for name, f in Recipe.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}


def real_key(dotted: str) -> bool:
    """Whether ``section.key`` names a field of the recipe models."""
    section, _, key = dotted.partition(".")
    cls = _sections().get(section)
    return cls is not None and key in cls.model_fields


def foreign_hint(key: str, section: str | None = None) -> str | None:
    """One sentence naming leantune's key for an unknown ``key`` found in ``section`` (None: the top level),
    or None when there is nothing to suggest. The table comes first; then a key that is real in another section."""
    known = FOREIGN_NAMES.get(key)
    if known is not None:
        note = f" ({known.note})" if known.note else ""
        return f"{key!r} is the {known.origin} name; leantune's is {known.target!r}{note}."
    homes = [f"{name}.{key}" for name, cls in _sections().items() if key in cls.model_fields and name != section]
    if homes:
        where = f"not a key of {section!r}" if section else "not a top-level section"
        return f"{key!r} is {where}; it lives at {' or '.join(repr(h) for h in homes)}."
    return None
