"""LoRA through PEFT (or full fine-tuning), and export to formats other tools load.

The adapter is a standard PEFT ``LoraConfig``; leantune adds nothing to its file format, so
``peft.PeftModel.from_pretrained(base, RUN_DIR/adapter)`` loads what ``leantune train`` writes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from leantune.atomic import atomic_dir
from leantune.config import AdapterConfig, RecipeError


def apply_adapter(model, cfg: AdapterConfig, seed: int = 0):
    """``cfg.method``'s adapter on ``model`` (see ``leantune.adapters.ADAPTERS``): the model to train."""
    from leantune.adapters import apply_adapter as apply

    return apply(model, cfg, seed)


def apply_lora(model, cfg: AdapterConfig, seed: int = 0):
    """Wrap ``model`` with LoRA adapters (PEFT). The adapter init is seeded so runs are reproducible."""
    from peft import LoraConfig, get_peft_model

    from leantune.quant import QuantLinear, register_quant_lora

    targets = cfg.target_modules
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if isinstance(targets, list):
        missing = [t for t in targets if t not in names]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, QuantLinear))})
            raise RecipeError(
                f"adapter.target_modules: {missing} not found in {model.config.model_type}; "
                f"linear modules are: {', '.join(linear)}"
            )
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        register_quant_lora(lora)  # PEFT's custom-module API: LoRA over QuantLinear, merge refused
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora)
    return peft_model


class LowPrecisionLoRA:
    """bf16 LoRA matmuls over a bf16 base, with fp32 adapter weights (``adapter.compute_dtype: auto``).

    PEFT keeps LoRA weights in fp32 over a bf16 base and casts every adapted projection's input to fp32 and its
    output back (``LoraLayer._cast_input_dtype``): with q/k/v/o adapted that is 4 casts of the hidden states per
    layer and per direction, 14% of a bf16 SmolLM2 step's time in `benchmarks/step_profile.py` (docs/compute.md).
    Instead, ``step()`` turns that cast off with PEFT's own switch (``peft.helpers.disable_input_dtype_casting``)
    for the whole forward + backward (a checkpointed layer's recompute runs inside backward and must replay the
    forward's ops), and ``forward()`` runs the forward under bf16 autocast, which casts the small fp32 A and B to
    bf16 for each matmul; the gradients still land in the fp32 parameters (mixed precision, as Trainer's
    ``bf16=True``). The base's ops are unchanged: its weights and activations already are bf16, and
    transformers' RMSNorm and rotary code upcast explicitly. A forward outside ``step()`` is PEFT's default.
    """

    def __init__(self, model):
        self.model = model
        self.device_type = next(model.parameters()).device.type

    def forward(self):
        # cache_enabled=False: every forward and every recompute casts each weight itself, so a selectively
        # checkpointed layer replays exactly its forward's ops; the casts are r x d, cheap.
        return torch.autocast(self.device_type, dtype=torch.bfloat16, cache_enabled=False)

    def step(self):
        from peft.helpers import disable_input_dtype_casting

        return disable_input_dtype_casting(self.model)


def low_precision_lora(model, recipe) -> LowPrecisionLoRA | None:
    """`LowPrecisionLoRA` for a LoRA recipe over an unquantized bf16 base with ``adapter.compute_dtype: auto``,
    else None (fp32 bases, quantized bases, full fine-tuning, ``compute_dtype: float32``)."""
    if not (recipe.adapter.method == "lora" and recipe.adapter.compute_dtype == "auto"
            and recipe.model.compute_dtype == "bfloat16" and recipe.quant.bits is None):
        return None
    return LowPrecisionLoRA(model)


def causal_lm(model):
    """The transformers CausalLM under an optional PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Name -> tensor of every trainable parameter (what a checkpoint stores)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unknown[:3]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def save_adapter(model, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Write the PEFT adapter (adapter_config.json + adapter_model.safetensors) atomically. ``state_dict``:
    the full tensors to write when the model's own are shards (FSDP2)."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    return Path(out_dir)


def save_run_adapter(model, tokenizer, run_dir: Path, state_dict: dict | None = None) -> Path:
    """A LoRA run's final export: RUN/adapter, a standard PEFT adapter."""
    return save_adapter(model, Path(run_dir) / "adapter", state_dict)


def planned_elements(shape, recipe) -> int:
    """r x (in + out) per targeted linear (A is r x in, B is out x r)."""
    from leantune.plan.memory import lora_targets

    return sum(recipe.adapter.r * (lin.in_features + lin.out_features)
               for lin in lora_targets(shape, recipe.adapter.target_modules))


def planned_bytes(shape, recipe) -> int:
    """LoRA weights train in fp32 (4 bytes), whatever the base's dtype."""
    return planned_elements(shape, recipe) * 4


def save_full_model(model, tokenizer, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Write a transformers model directory (safetensors) atomically; used for merged exports and full
    fine-tuning runs (``state_dict``: full tensors when the model's own are FSDP2 shards)."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def merge_adapter(model):
    """Fold LoRA deltas into the base weights and return the plain transformers model.

    A quantized base is dequantized first: the deltas land on W_hat, the weights they were trained against.
    """
    from leantune.quant import dequantize_model

    dequantize_model(model)
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def _foldable(layer) -> bool:
    """A PEFT LoRA layer whose delta can be folded into a plain ``nn.Linear`` base weight for inference."""
    base = layer.get_base_layer()
    return (type(base) is torch.nn.Linear and not getattr(layer, "merged", False)
            and not layer.disable_adapters  # already folded, or inside disable_adapter(): the base is what runs
            and not any(getattr(layer, "use_dora", {}).get(a, False) for a in layer.active_adapters))


@contextlib.contextmanager
def folded_adapter(model):
    """Inside, every LoRA layer computes with one weight, W + (alpha/r) B A, and the adapter is disabled:
    one matmul per layer instead of three plus a scale and an add. For sampling (no gradients).

    The folded weights are new tensors swapped into the base layers: the original W is never written, so
    leaving restores the model bit for bit (PEFT's ``merge_adapter``/``unmerge_adapter`` subtract the delta
    back, which is not exact in floating point). Costs one copy of the adapted layers' weights while inside.
    Yields whether it folded: False (and changes nothing) without LoRA layers, or when one of them cannot
    be folded this way (a quantized or non-Linear base, DoRA, already merged), or when the adapter is
    disabled already (inside ``disable_adapter()`` or another fold: folding again would add the delta twice).
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        yield False
        return
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers or not hasattr(model, "disable_adapter") or not all(_foldable(m) for m in layers):
        yield False
        return
    originals = []
    try:
        with torch.no_grad():
            for layer in layers:
                base = layer.get_base_layer()
                w = base.weight
                folded = w.detach().clone()
                for name in layer.active_adapters:
                    if name in layer.lora_A:
                        folded += layer.get_delta_weight(name).to(folded.dtype)
                originals.append((base, w))
                base.weight = torch.nn.Parameter(folded, requires_grad=False)
        with model.disable_adapter():
            yield True
    finally:
        for base, w in originals:
            base.weight = w
