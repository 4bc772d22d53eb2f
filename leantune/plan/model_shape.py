"""What the memory planner needs to know about a model, read without loading a single weight.

Sources are resolved as ``leantune.models.loading`` does: a local directory is read through its
``config.json`` (``transformers.AutoConfig``); a GGUF file (including ``builtin:`` models) through its
metadata header only (``read_gguf_header`` parses the key/value section and the tensor names, skipping
the tokenizer arrays, and never touches tensor data); a hub id through ``AutoConfig`` (cache or network).

From the config, the model is instantiated on PyTorch's ``meta`` device: every parameter gets its
shape and no storage, so the parameter inventory (which linear layers exist, their shapes and biases,
tied embeddings, norms) is the architecture's own, not a re-derivation. A 135M model takes well under
a second this way and allocates nothing.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path

from leantune.config import ModelConfig

_LAYER = re.compile(r"\.layers\.(\d+)\.")


class PlanError(ValueError):
    """The planner cannot predict this run; the message says why and what to do."""


@dataclass(frozen=True)
class LinearSpec:
    """One ``nn.Linear`` of the model: full module name, (in, out) features, bias, decoder layer index."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    layer: int | None  # None outside the decoder layers (lm_head)

    @property
    def short(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class ModelShape:
    """Dimensions and parameter inventory of a Llama-style decoder (q/k/v/o + gate/up/down per layer).

    ``params`` counts every distinct parameter once (tied embeddings once); ``linears`` lists every
    ``nn.Linear`` including ``lm_head`` (whose weight *is* the embedding when ``tied``).
    """

    model_type: str
    layers: int  # L
    hidden: int  # H
    intermediate: int  # I
    heads: int  # n_h
    kv_heads: int  # n_kv
    head_dim: int  # d
    vocab: int  # V
    tied: bool
    params: int
    linears: tuple[LinearSpec, ...]
    source: str
    file_dtype: str | None = None  # dtype of most weight bytes on disk ("float32", "bfloat16", "gguf"), if known
    file_bytes: int | None = None  # bytes of the weights on disk (safetensors tensors, or the .gguf file)

    @property
    def linear_params(self) -> int:
        """Weights + biases of the linear layers other than a tied lm_head."""
        return sum(lin.in_features * lin.out_features + lin.out_features * lin.bias
                   for lin in self.linears if not (self.tied and lin.short == "lm_head"))


# ----------------------------------------------------------------------------------------------
# GGUF metadata header (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md)

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_header(path: str | Path) -> tuple[dict, list[str]]:
    """(metadata, tensor names) of a GGUF v2/v3 file, reading the header only.

    Scalars and strings are returned as values; arrays (the tokenizer's vocabulary and merges) as their
    length only, e.g. ``{"tokenizer.ggml.tokens": 49152}``: walking them is all the planner needs.
    """
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise PlanError(f"{path}: not a GGUF file (bad magic)")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise PlanError(f"{path}: GGUF version {version} is not supported (need 2 or 3)")
        pos = 24

        def string(pos: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", buf, pos)
            return bytes(buf[pos + 8 : pos + 8 + n]).decode("utf-8", "replace"), pos + 8 + n

        def skip_value(kind: int, pos: int) -> int:
            if kind == _GGUF_STRING:
                (n,) = struct.unpack_from("<Q", buf, pos)
                return pos + 8 + n
            return pos + struct.calcsize(_GGUF_SCALARS[kind])

        meta: dict = {}
        for _ in range(n_kv):
            key, pos = string(pos)
            (kind,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if kind == _GGUF_ARRAY:
                item, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if item == _GGUF_STRING:
                    for _ in range(count):
                        pos = skip_value(item, pos)
                else:
                    pos += count * struct.calcsize(_GGUF_SCALARS[item])
                meta[key] = count
            elif kind == _GGUF_STRING:
                meta[key], pos = string(pos)
            else:
                (meta[key],) = struct.unpack_from(_GGUF_SCALARS[kind], buf, pos)
                pos = skip_value(kind, pos)
        names = []
        for _ in range(n_tensors):
            name, pos = string(pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            pos += 4 + 8 * n_dims + 4 + 8  # dims, ggml type, data offset
            names.append(name)
    return meta, names


# Safetensors headers (8-byte little-endian length + JSON)

_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def safetensors_weight_bytes(directory: str | Path) -> dict[str, int]:
    """Bytes of the tensors stored in ``directory``'s ``*.safetensors`` files, per dtype, from their
    headers only (``{"float32": 662700032}``)."""
    out: dict[str, int] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, stop = info["data_offsets"]
            dtype = _ST_DTYPES.get(info["dtype"], info["dtype"].lower())
            out[dtype] = out.get(dtype, 0) + stop - start
    return out


# GGUF architecture -> transformers model_type, for the Llama-style families the planner models.
_GGUF_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


def config_from_gguf(path: str | Path):
    """A ``transformers`` config built from a GGUF header (no tensor data read)."""
    from transformers import AutoConfig

    meta, names = read_gguf_header(path)
    arch = meta.get("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise PlanError(f"{path}: GGUF architecture {arch!r} is not modelled by the planner "
                        f"(supported: {', '.join(_GGUF_ARCHS)})")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    heads = get("attention.head_count")
    kw = {
        "num_hidden_layers": get("block_count"), "hidden_size": get("embedding_length"),
        "intermediate_size": get("feed_forward_length"), "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "vocab_size": get("vocab_size") or meta.get("tokenizer.ggml.tokens"),
        "max_position_embeddings": get("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in names,
    }
    if get("attention.key_length"):
        kw["head_dim"] = get("attention.key_length")
    missing = [k for k, v in kw.items() if v is None]
    if missing:
        raise PlanError(f"{path}: GGUF metadata lacks {missing}; cannot plan this model")
    return AutoConfig.for_model(_GGUF_ARCHS[arch], **kw)


# ----------------------------------------------------------------------------------------------
# Config -> shape


def load_config(cfg: ModelConfig):
    """The model's transformers config, from wherever ``model.path`` points; nothing else is read."""
    from transformers import AutoConfig

    from leantune.models.loading import resolve_source

    source = resolve_source(cfg)
    if source.kind == "gguf":
        return config_from_gguf(source.weight_path), source
    try:
        return AutoConfig.from_pretrained(source.location, trust_remote_code=cfg.trust_remote_code), source
    except Exception as err:  # transformers raises many types; the user needs one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PlanError(f"{source.location}: cannot read the model config: {first}") from err


def shape_from_config(config, source: str = "config") -> ModelShape:
    """Instantiate ``config``'s causal LM on the meta device and take its parameter inventory."""
    import torch
    from transformers import AutoModelForCausalLM

    for attr in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads"):
        if not isinstance(getattr(config, attr, None), int):
            raise PlanError(f"{config.model_type}: config has no integer {attr!r}; the planner models "
                            "Llama-style decoders (q/k/v/o_proj attention + gate/up/down_proj MLP)")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = tuple(
        LinearSpec(name, m.in_features, m.out_features, m.bias is not None,
                   int(g.group(1)) if (g := _LAYER.search(f".{name}.")) else None)
        for name, m in model.named_modules() if type(m) is torch.nn.Linear
    )
    per_layer = {lin.short for lin in linears if lin.layer == 0}
    needed = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    if not needed <= per_layer:
        raise PlanError(f"{config.model_type}: decoder layers hold {sorted(per_layer)}; the planner models "
                        f"Llama-style layers with {sorted(needed)}")
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    heads = config.num_attention_heads
    return ModelShape(
        model_type=config.model_type,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab=in_emb.weight.shape[0],
        tied=out_emb is not None and out_emb.weight is in_emb.weight,
        params=sum(p.numel() for p in model.parameters()),
        linears=linears,
        source=source,
    )


def model_shape(cfg: ModelConfig) -> ModelShape:
    """Shape of the model a recipe names, without loading its weights; with the on-disk weight bytes
    and dtype for local and GGUF sources (they decide what loading costs)."""
    config, source = load_config(cfg)
    shape = shape_from_config(config, source=f"{source.kind}:{source.weight_path}")
    if source.kind == "gguf":
        return replace(shape, file_dtype="gguf", file_bytes=Path(source.weight_path).stat().st_size)
    if source.kind == "local":
        per_dtype = safetensors_weight_bytes(source.location)
        if per_dtype:
            return replace(shape, file_dtype=max(per_dtype, key=per_dtype.get), file_bytes=sum(per_dtype.values()))
    return shape
