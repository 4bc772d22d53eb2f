"""Evaluation: greedy generation + a verifier for accuracy, or mean loss / perplexity on data.

Prompts are rendered exactly as the SFT data pipeline renders a ``messages`` record: the tokenizer's
chat template with a generation prompt, or the documented fallback ``"user: {prompt}\\nassistant: "``
when the tokenizer has none (see ``leantune.data.sft``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml

from leantune.config import ModelConfig, Recipe, SpanWeights
from leantune.data.sft import render_prompt
from leantune.log import progress_bar


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 48, batch_size: int = 16,
                    stop: str | None = None) -> list[str]:
    """Greedy completions for ``prompts`` (batched, left-padded, KV cache on)."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    # torch 2.13 CPU: F.linear on the non-contiguous [B, 1, H] slice generate() feeds the frozen lm_head
    # copies the whole weight per row (measured 16 s vs 0.014 s at batch 50); hand it a contiguous input.
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda m, args: (args[0].contiguous(),) + tuple(args[1:]))
    try:
        for i in progress_bar(range(0, len(prompts), batch_size), desc="generate", unit="batch"):
            rendered = [render_prompt(tokenizer, p) for p in prompts[i : i + batch_size]]
            texts = [text for text, _ in rendered]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=rendered[0][1]).to(
                next(model.parameters()).device)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                stop_strings=stop, tokenizer=tokenizer if stop else None,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        hook.remove()
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def task_accuracy(model, tokenizer, task: str, *, num_problems: int = 50, seed: int = 1234,
                  max_new_tokens: int = 48, batch_size: int = 16) -> dict:
    """Accuracy of greedy completions on ``num_problems`` held-out problems of a verifiable task."""
    from leantune.tasks import get_task

    t = get_task(task)
    problems = t.generate(num_problems, seed=seed, split="test")
    start = time.perf_counter()
    completions = generate_greedy(
        model, tokenizer, [p["prompt"] for p in problems], max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    correct = [bool(t.verify(c, p["answer"])) for c, p in zip(completions, problems)]
    return {
        "task": task,
        "accuracy": sum(correct) / len(correct),
        "correct": sum(correct),
        "problems": len(correct),
        "eval_seconds": time.perf_counter() - start,
        "examples": [
            {"prompt": p["prompt"], "completion": c, "answer": p["answer"], "correct": ok}
            for p, c, ok in list(zip(problems, completions, correct))[:3]
        ],
    }


def sampled_accuracy(model, tokenizer, task: str, *, num_problems: int = 100, samples: int = 4,
                     temperature: float = 1.0, seed: int = 1234, max_new_tokens: int = 48,
                     prompts_per_batch: int = 8) -> dict:
    """pass@1 and pass@``samples`` of *sampled* completions on the same held-out problems as `task_accuracy`.

    RL optimizes the policy it samples from (here at ``temperature``), so this is the accuracy an RL phase
    is expected to move; greedy accuracy follows only once the sampled mode itself changes. pass@1 is the
    fraction of all ``num_problems x samples`` completions that verify; pass@k the fraction of problems with
    at least one. Sampling is seeded (``seed``) and stops early as in RL (`leantune.rl.rollout.sample_groups`).
    """
    import torch

    from leantune.rl.rollout import sample_groups
    from leantune.tasks import get_task

    t = get_task(task)
    problems = t.generate(num_problems, seed=seed, split="test")
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    correct: list[bool] = []
    for i in progress_bar(range(0, len(problems), prompts_per_batch), desc=f"sample x{samples}", unit="batch"):
        chunk = problems[i : i + prompts_per_batch]
        ro = sample_groups(model, tokenizer, [p["prompt"] for p in chunk], group_size=samples,
                           max_new_tokens=max_new_tokens, temperature=temperature,
                           is_complete=getattr(t, "is_complete", None), generator=generator)
        correct += [bool(t.verify(text, chunk[j // samples]["answer"])) for j, text in enumerate(ro.texts)]
    per_problem = [any(correct[j * samples : (j + 1) * samples]) for j in range(len(problems))]
    return {
        "task": task,
        "temperature": temperature,
        "samples": samples,
        "problems": len(problems),
        "pass@1": sum(correct) / max(1, len(correct)),
        f"pass@{samples}": sum(per_problem) / max(1, len(per_problem)),
        "eval_seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------------------------
# Loading what a run produced


def _run_recipe(run_dir: Path) -> Recipe | None:
    path = run_dir / "recipe.yaml"
    if not path.exists():
        return None
    return Recipe.model_validate(yaml.safe_load(path.read_text()))


def load_for_eval(target: str, dtype: str | None = None):
    """(model, tokenizer) for a run directory (base + its adapter) or any model location."""
    from leantune.models.loading import load_model_and_tokenizer

    path = Path(target)
    recipe = _run_recipe(path) if path.is_dir() else None
    if recipe is None:
        cfg = ModelConfig(path=target, dtype=dtype or "float32")
        model, tok, _ = load_model_and_tokenizer(cfg)
        return model, tok
    cfg = recipe.model.model_copy(update={"dtype": dtype} if dtype else {})
    if (path / "model").is_dir():  # full fine-tuning run
        model, tok, _ = load_model_and_tokenizer(cfg.model_copy(update={"path": str(path / "model"), "gguf_file": None}))
        return model, tok
    model, tok, _ = load_model_and_tokenizer(cfg)
    if recipe.quant.bits or recipe.quant.embedding_bits:  # the adapter was trained on W_hat = dequantize(quantize(W))
        from leantune.quant import fake_quantize_model

        fake_quantize_model(model, recipe.quant.bits, recipe.quant.group_size, skip=["lm_head"],
                            embedding_bits=recipe.quant.embedding_bits)
    if (path / "adapter").is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(path / "adapter"))
    return model, tok


def evaluate_target(target: str, *, task: str | None = None, data: str | None = None, num_problems: int = 50,
                    max_new_tokens: int = 48, batch_size: int = 16, dtype: str | None = None) -> dict:
    model, tok = load_for_eval(target, dtype)
    if task:
        return task_accuracy(model, tok, task, num_problems=num_problems, max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
    from leantune.config import DataConfig
    from leantune.data.sft import load_sft_examples
    from leantune.train.sft import evaluate_loss

    recipe = _run_recipe(Path(target)) if Path(target).is_dir() else None
    # data.dedup is for training; the data evaluated is scored as it is
    data_cfg = (recipe.data if recipe else DataConfig(train=data)).model_copy(update={"train": data, "dedup": None})
    weights = recipe.loss.weights if recipe else SpanWeights()
    examples, stats = load_sft_examples(data, tok, data_cfg)
    out = evaluate_loss(model, examples, tok.pad_token_id, weights, batch_size, chunk_size=1024)
    return {"data": data, **out, "examples": len(examples)}


def export_run(run_dir: str, *, merged: str | None = None, adapter: str | None = None) -> dict[str, Path]:
    """Write the run's merged model (safetensors) and/or a copy of its PEFT adapter."""
    from leantune.adapters.lora import merge_adapter, save_adapter, save_full_model

    path = Path(run_dir)
    if _run_recipe(path) is None:
        raise FileNotFoundError(f"{path}: not a leantune run directory (no recipe.yaml)")
    if not (path / "adapter").is_dir() and not (path / "model").is_dir():
        raise FileNotFoundError(f"{path}: the run has not finished (no adapter/ or model/ yet)")
    model, tok = load_for_eval(str(path))
    written: dict[str, Path] = {}
    if adapter:
        if not (path / "adapter").is_dir():
            raise FileNotFoundError(f"{path}: full fine-tuning run; there is no adapter to export")
        written["adapter"] = save_adapter(model, adapter)
    if merged:
        written["merged model"] = save_full_model(merge_adapter(model), tok, merged)
    return written
