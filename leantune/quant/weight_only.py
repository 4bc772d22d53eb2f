"""Weight-only INT8 / INT4 quantization of a frozen base, dequantized on the fly; LoRA trains on top.

The frozen base weights of a LoRA run are the largest item of its memory bill (fp32:
4 bytes per weight). Stored as group-wise INT4 they take ~0.5 byte per weight plus the group scales
(arXiv 2606.19528 reports 26.2 GB -> 14.7 GB for Llama-3.2-3B with r=16 LoRA from this step alone).
This is the QLoRA recipe (Dettmers et al., arXiv 2305.14314) minus its NF4 data type and double
quantization: plain asymmetric min/max integer codes per group, in pure PyTorch, so it runs on CPU.

Format (``QuantizedWeight``), for a weight ``W`` of shape (out, in):

- the ``in`` input columns of each row are cut into groups of ``group_size`` consecutive columns; the
  last group is padded (by repeating the row's last value, so padding never widens a group's range);
- per group, ``offset = min`` and ``scale = (max - min) / (2**bits - 1)``; the code of a weight is
  ``q = round((w - offset) / scale)`` in ``[0, 2**bits - 1]`` and ``w_hat = q * scale + offset``.
  The zero-point is thus kept as a float offset in weight units (HQQ-style) rather than an integer,
  which keeps both ends of the group's range exactly on the grid;
- ``scale`` and ``offset`` are (out, n_groups) tensors in fp32 (default) or bf16 (``scale_dtype``);
  with bf16 the stored offset is rounded down and the scale up, so no code is clamped;
- codes are uint8: one per byte for 8 bits, two per byte for 4 bits (the even column in the low
  nibble), so INT4 really costs 0.5 byte per weight. Bytes per weight, group_size 64, fp32 scales:
  INT8 1 + 8/64 = 1.125 (0.28x of fp32); INT4 0.5 + 8/64 = 0.625 (0.156x).

Error bound: ``|w - w_hat| <= scale / 2`` for every element (plus float rounding of the fp32
arithmetic), ``scale`` being the stored scale of the element's group.

Training: ``QuantLinear`` keeps the codes and scales as buffers (nothing to train) and computes
``x @ dequantize(W)^T + b`` through ``_DequantLinearFn``, a custom autograd Function that saves only
the quantized buffers for backward and dequantizes again there to get ``grad_x = grad_y @ W``. No
dequantized (out, in) matrix lives between forward and backward, and the layer input is not saved
(there is no weight gradient to compute). Cost: one extra dequantization per layer per backward.

Embedding and LM head (``quant.embedding_bits``): ``quantize_embeddings`` stores the input embedding as a
``QuantEmbedding`` (a lookup dequantizes only the rows it reads, ``dequantize_rows``) and the LM head as
a ``QuantLinear``; a tied head holds the embedding's own buffers, so the table is stored once. The
vocabulary-subset loss reads only the subset's rows of a quantized head (``head_weight``); the exact
loss, RL sampling and log-probs use a transient dequantized copy (``dense_head_weight``).

LoRA: PEFT wraps ``QuantLinear`` through its custom-module API (``register_quant_lora``), with a
LoRA layer (``QuantLoraLinear``) that refuses to merge into quantized codes. Export goes through
``dequantize_model`` (back to ``nn.Linear`` holding ``W_hat``) and then PEFT's ordinary merge, so the
merged weights are ``W_hat + B A s``: the function the adapter was trained against. A base loaded
fresh for export can be put on the same grid with ``fake_quantize_model``.

GPU: nothing here needs CUDA. On a GPU box with ``torchao`` (``int4_weight_only``: group-wise
asymmetric INT4 with scales and zeros, the same scheme with another packing) or ``bitsandbytes``
(NF4, a different code book), a fused dequantize-matmul kernel would replace the body of
``_DequantLinearFn.forward``/``backward`` (the ``_dequantize_parts`` + ``F.linear`` pair);
``available_gpu_backend`` says whether one could be used. Neither package is required or imported.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as _PeftLoraLinear
from torch import nn
from torch.autograd.function import once_differentiable

from leantune.log import progress_bar

SCALE_DTYPES = (torch.float32, torch.bfloat16)


class QuantMergeError(RuntimeError):
    """Merging a LoRA adapter into quantized codes was asked for; dequantize first."""


# ----------------------------------------------------------------------------------------------
# Group-wise quantization of one weight matrix


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight matrix (out, in) as group-wise integer codes plus per-group scale and offset.

    qweight: uint8 (out, in_padded) for 8 bits; (out, in_padded // 2) for 4 bits, two codes per byte.
    scale, offset: (out, n_groups), fp32 or bf16; ``w_hat = q * scale + offset``.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def n_groups(self) -> int:
        return self.scale.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in): the shape of the matrix it encodes."""
        return self.out_features, self.in_features

    @property
    def nbytes(self) -> int:
        """Bytes held by the codes, scales and offsets."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.offset))

    def row_slice(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``start:stop`` of ``w_hat``, a (stop - start, in) matrix in ``dtype``: only those rows'
        codes are read. The losses take a quantized LM head through this (and ``rows``) without
        importing this module."""
        return _dequantize_parts(self.qweight[start:stop], self.scale[start:stop], self.offset[start:stop],
                                 self.bits, self.group_size, self.in_features, dtype)

    def rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``index`` of ``w_hat``: ``dequantize_rows(self, index, dtype)``."""
        return dequantize_rows(self, index, dtype)


def _round_toward(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """``x`` (fp32) in ``dtype``, rounded toward +inf (``up``) or -inf instead of to nearest."""
    y = x.to(dtype)
    if dtype == x.dtype:
        return y
    wrong = y.float() < x if up else y.float() > x
    limit = torch.full_like(y, math.inf if up else -math.inf)
    return torch.where(wrong, torch.nextafter(y, limit), y)


def quantize_groupwise(w: torch.Tensor, bits: int, group_size: int = 64,
                       scale_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """Quantize ``w`` (out, in), any float dtype, to ``bits`` (4 or 8) per weight, asymmetric min/max
    per group of ``group_size`` consecutive input columns (see the module docstring for the format).

    ``group_size`` larger than ``in`` is cut to ``in`` (one group per row; for 4 bits ``in`` rounded
    up to even). ``in`` not divisible by the group size: the last group is padded.

    >>> w = torch.linspace(-1, 1, 6 * 10).reshape(6, 10)
    >>> qw = quantize_groupwise(w, bits=4, group_size=4)
    >>> tuple(qw.qweight.shape), tuple(qw.scale.shape)  # 10 columns: 3 groups of 4 (2 padded), 2 codes/byte
    ((6, 6), (6, 3))
    >>> bool(((w - dequantize(qw)).abs() <= qw.scale.repeat_interleave(4, 1)[:, :10] / 2 + 1e-6).all())
    True
    """
    if bits not in (4, 8):
        raise ValueError(f"quant.bits must be 4 or 8, got {bits!r}")
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_groupwise needs a float (out, in) matrix, got {tuple(w.shape)} {w.dtype}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype}")
    out, n_in = w.shape
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"quant.group_size must be a positive integer, got {group_size!r}")
    g = min(group_size, n_in + (n_in % 2 if bits == 4 else 0))
    if bits == 4 and g % 2:
        raise ValueError(f"4-bit codes are packed two per byte: quant.group_size must be even, got {group_size}")

    wf = w.detach().float()
    if not torch.isfinite(wf).all():
        raise ValueError("quantize_groupwise: the weight holds inf or nan; nothing sensible to quantize")
    n_groups = -(-n_in // g)
    pad = n_groups * g - n_in
    if pad:  # repeat the row's last value: the padded group's min/max are those of its real columns
        wf = torch.cat([wf, wf[:, -1:].expand(out, pad)], dim=1)
    groups = wf.view(out, n_groups, g)  # (out, G, g)

    qmax = 2**bits - 1
    offset = _round_toward(groups.amin(-1), scale_dtype, up=False)  # stored offset <= group min
    scale = (groups.amax(-1) - offset.float()) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: codes are all 0
    scale = _round_toward(scale, scale_dtype, up=True)  # stored scale covers the group max

    q = groups.sub(offset.float().unsqueeze(-1)).div_(scale.float().unsqueeze(-1))
    q = q.round_().clamp_(0, qmax).to(torch.uint8).view(out, n_groups * g)
    if bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)
    return QuantizedWeight(q.contiguous(), scale.contiguous(), offset.contiguous(), bits, g, n_in)


def _dequantize_parts(qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int,
                      group_size: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale + offset`` as an (out, in_features) matrix in ``dtype``; arithmetic in fp32."""
    out, n_groups = scale.shape
    if bits == 4:  # (out, in_p / 2) bytes -> (out, in_p) codes, low nibble first
        qweight = torch.stack((qweight & 0x0F, qweight >> 4), dim=-1)
    q = qweight.reshape(out, n_groups, group_size).float()  # (out, G, g)
    w = q.mul_(scale.float().unsqueeze(-1)).add_(offset.float().unsqueeze(-1)).view(out, n_groups * group_size)
    return w[:, :in_features].to(dtype)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) matrix ``w_hat`` that ``qw`` encodes, in ``dtype``."""
    return _dequantize_parts(qw.qweight, qw.scale, qw.offset, qw.bits, qw.group_size, qw.in_features, dtype)


def dequantize_rows(qw: QuantizedWeight, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows ``rows`` (R,) of ``w_hat``, an (R, in) matrix in ``dtype``: only those rows' codes are read.

    Equal to ``dequantize(qw, dtype)[rows]`` without building the whole matrix. An embedding lookup
    (``QuantEmbedding``) and the vocabulary-subset loss over a quantized LM head use it.
    """
    rows = rows.reshape(-1).long()
    return _dequantize_parts(qw.qweight.index_select(0, rows), qw.scale.index_select(0, rows),
                             qw.offset.index_select(0, rows), qw.bits, qw.group_size, qw.in_features, dtype)


# ----------------------------------------------------------------------------------------------
# The frozen quantized linear layer


# A weight larger than this (in fp32) is dequantized a block of output rows at a time in forward and
# backward: a quantized LM head (V x H; SmolLM2: 113 MB fp32) then never exists in full precision.
_BLOCK_BYTES = 16 << 20


def _row_blocks(out_features: int, in_features: int) -> int:
    """Output rows dequantized at a time: all of them unless the fp32 matrix exceeds ``_BLOCK_BYTES``."""
    return max(1, _BLOCK_BYTES // (4 * in_features))


class _DequantLinearFn(torch.autograd.Function):
    """y = x @ W_hat^T + b with W_hat dequantized in forward and again in backward.

    Saved for backward: the uint8 codes and the (out, G) scale/offset buffers only. Gradients: x (and
    b if it requires grad); none for the codes. A large weight (an LM head) is dequantized in blocks of
    output rows (``_row_blocks``), so its full-precision matrix never exists.
    """

    @staticmethod
    def forward(ctx, x, qweight, scale, offset, bias, bits, group_size, in_features):
        ctx.save_for_backward(qweight, scale, offset)
        ctx.meta = (bits, group_size, in_features)
        out_features, rows = qweight.shape[0], _row_blocks(qweight.shape[0], in_features)
        if rows >= out_features:
            w = _dequantize_parts(qweight, scale, offset, bits, group_size, in_features, x.dtype)  # (out, in)
            return F.linear(x, w, bias)  # (..., out)
        y = x.new_empty(*x.shape[:-1], out_features)  # (..., out)
        for r in range(0, out_features, rows):
            w = _dequantize_parts(qweight[r : r + rows], scale[r : r + rows], offset[r : r + rows], bits, group_size,
                                  in_features, x.dtype)  # (rows, in)
            y[..., r : r + rows] = F.linear(x, w, None if bias is None else bias[r : r + rows])
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # grad_out (..., out)
        qweight, scale, offset = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            out_features, rows = qweight.shape[0], _row_blocks(qweight.shape[0], ctx.meta[2])
            for r in range(0, out_features, rows):
                w = _dequantize_parts(qweight[r : r + rows], scale[r : r + rows], offset[r : r + rows], *ctx.meta,
                                      grad_out.dtype)  # (rows, in)
                part = grad_out[..., r : r + rows] @ w  # (..., in)
                grad_x = part if grad_x is None else grad_x.add_(part)
        if ctx.needs_input_grad[4]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, None, grad_bias, None, None, None


class _QuantizedMatrix(nn.Module):
    """The buffers of one ``QuantizedWeight`` (``qweight``, ``scale``, ``offset``), shared by ``QuantLinear``
    and ``QuantEmbedding``; ``weight_dtype`` is the dtype of the matrix it replaced."""

    def __init__(self, qw: QuantizedWeight, weight_dtype: torch.dtype):
        super().__init__()
        self.bits = qw.bits
        self.group_size = qw.group_size
        self.weight_dtype = weight_dtype
        self._columns = qw.in_features
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scale", qw.scale)
        self.register_buffer("offset", qw.offset)

    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scale, self.offset, self.bits, self.group_size, self._columns)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W_hat in ``dtype`` (default: the dtype of the matrix this module replaced)."""
        return dequantize(self.quantized(), dtype or self.weight_dtype)


class QuantLinear(_QuantizedMatrix):
    """A frozen linear layer stored as group-wise INT4/INT8 (see ``QuantizedWeight``).

    Buffers (no Parameters; nothing to train): ``qweight`` uint8 codes, ``scale`` and ``offset``
    (out, n_groups), optional ``bias`` (out,). Input (..., in_features) in any float dtype; the
    weight is dequantized to the input's dtype. ``weight_dtype`` is the dtype of the weight it
    replaced (what ``dequantize_model`` restores by default).
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                 weight_dtype: torch.dtype = torch.float32):
        super().__init__(qw, weight_dtype)
        self.in_features = qw.in_features
        self.out_features = qw.out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 64,
                    scale_dtype: torch.dtype = torch.float32) -> QuantLinear:
        qw = quantize_groupwise(linear.weight, bits, group_size, scale_dtype)
        return cls(qw, linear.bias, weight_dtype=linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantLinearFn.apply(x, self.qweight, self.scale, self.offset, self.bias,
                                      self.bits, self.group_size, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


class QuantEmbedding(_QuantizedMatrix):
    """A frozen embedding table (V, H) stored as group-wise INT4/INT8: a lookup dequantizes only the rows
    it reads (``dequantize_rows``). Buffers ``qweight``, ``scale``, ``offset`` as in ``QuantLinear``; the
    output is in ``weight_dtype`` (the dtype of the table it replaced). There is no gradient to the table.

    A tied LM head (``lm_head.weight is embed_tokens.weight``) becomes a ``QuantLinear`` holding the
    *same* buffers (``quantize_embeddings``), so the table is stored once, as before.
    """

    def __init__(self, qw: QuantizedWeight, padding_idx: int | None = None,
                 weight_dtype: torch.dtype = torch.float32):
        super().__init__(qw, weight_dtype)
        self.num_embeddings = qw.out_features
        self.embedding_dim = qw.in_features
        self.padding_idx = padding_idx

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, group_size: int = 64,
                       scale_dtype: torch.dtype = torch.float32) -> QuantEmbedding:
        qw = quantize_groupwise(emb.weight, bits, group_size, scale_dtype)
        return cls(qw, emb.padding_idx, weight_dtype=emb.weight.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (...) int -> (..., H)
        rows = dequantize_rows(self.quantized(), input_ids, self.weight_dtype)  # (N, H)
        return rows.view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"


def head_weight(head: nn.Module) -> torch.Tensor | QuantizedWeight:
    """The LM head's weight as the losses take it: the (V, H) tensor of an ``nn.Linear``, or the
    ``QuantizedWeight`` of a ``QuantLinear`` head (``vocab_subset_cross_entropy`` then dequantizes only
    the subset's rows; see ``dense_head_weight`` for the whole matrix)."""
    return head.quantized() if isinstance(head, QuantLinear) else head.weight


def dense_head_weight(head: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The LM head's (V, H) weight as a tensor: the Parameter itself for an ``nn.Linear``, a fresh
    dequantized copy (in ``dtype``, default the replaced weight's) for a ``QuantLinear``: a transient
    V x H buffer, as large as the full-precision head."""
    if isinstance(head, QuantLinear):
        return head.dequantized_weight(dtype)
    return head.weight


# ----------------------------------------------------------------------------------------------
# Whole models


@dataclass(frozen=True)
class QuantStats:
    """What ``quantize_model`` replaced: the linear layers' bytes before (weight + bias) and after
    (codes + scales + offsets + bias)."""

    layers: int
    bytes_before: int
    bytes_after: int

    @property
    def ratio(self) -> float:
        return self.bytes_after / max(1, self.bytes_before)

    def __add__(self, other: QuantStats) -> QuantStats:
        return QuantStats(self.layers + other.layers, self.bytes_before + other.bytes_before,
                          self.bytes_after + other.bytes_after)

    def as_dict(self) -> dict:
        return {"layers": self.layers, "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "ratio": self.ratio}


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _quantizable_linears(model: nn.Module, skip: Iterable[str]) -> list[str]:
    """Names of the plain ``nn.Linear`` modules of ``model`` not named in ``skip``.

    ``skip`` entries match a module's last name component (``lm_head``) or its full dotted name.
    Subclasses of nn.Linear are left alone (e.g. MultiheadAttention's out_proj, whose owner reads
    its ``.weight``).
    """
    skip = set(skip)
    if any(hasattr(m, "lora_A") for m in model.modules()):
        raise ValueError("the model already carries LoRA layers: quantize the base model before apply_adapter")
    return [
        name for name, m in model.named_modules()
        if type(m) is nn.Linear and name not in skip and name.rsplit(".", 1)[-1] not in skip
    ]


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int, group_size: int = 64, skip: Iterable[str] = ("lm_head",),
                   scale_dtype: torch.dtype = torch.float32) -> QuantStats:
    """Replace, in place, every plain ``nn.Linear`` of ``model`` (but those in ``skip``) by a
    ``QuantLinear`` of ``bits`` bits. Returns the bytes of the replaced layers before and after.

    One layer at a time: each full-precision weight is released as soon as its layer is replaced, so
    peak memory is the original model plus one layer's temporaries, never two copies. Keep
    ``lm_head`` in ``skip``: leantune's fused loss reads ``lm_head.weight``.
    """
    layers = before = after = 0
    for name in progress_bar(_quantizable_linears(model, skip), desc=f"quantize INT{bits}", unit="layer"):
        parent, attr = _parent_and_attr(model, name)
        linear = getattr(parent, attr)
        before += _nbytes(linear.weight, linear.bias)
        quant = QuantLinear.from_linear(linear, bits, group_size, scale_dtype)
        setattr(parent, attr, quant)
        del linear  # the last reference: the fp weight is freed here, before the next layer
        after += _nbytes(quant.qweight, quant.scale, quant.offset, quant.bias)
        layers += 1
    return QuantStats(layers, before, after)


@torch.no_grad()
def quantize_embeddings(model: nn.Module, bits: int, group_size: int = 64,
                        scale_dtype: torch.dtype = torch.float32) -> QuantStats:
    """Replace, in place, the input embedding of a transformers model (``get_input_embeddings``) by a
    ``QuantEmbedding``, and its LM head (``get_output_embeddings``) by a ``QuantLinear``: for a tied head
    one holding the embedding's own buffers (stored once), else its own codes. Returns the bytes before
    and after. Call it on the base model, before the adapter (as ``quantize_model``).

    On SmolLM2-135M the tied (49152, 576) table is 113 MB in fp32, 32 MB in INT8 and 18 MB in INT4 (group
    64). What the model then computes with it: a lookup dequantizes the looked-up rows; the
    vocabulary-subset loss the subset's rows (``head_weight``); the exact loss 16 MiB of rows at a time;
    RL sampling and ``model(...).logits`` a transient full-precision copy (``dense_head_weight`` /
    ``QuantLinear.forward``).

    Shared buffers are not re-tied by ``model.to(...)`` (``Module.to`` converts each module's buffers on their
    own): call ``retie_quantized_head(model)`` after moving the model, or quantize on the training device.
    """
    if any(hasattr(m, "lora_A") for m in model.modules()):
        raise ValueError("the model already carries LoRA layers: quantize the base model before apply_adapter")
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(emb) is not nn.Embedding:
        raise ValueError(f"quantize_embeddings: the input embedding is a {type(emb).__name__}, not an nn.Embedding")
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    before = _nbytes(emb.weight)
    qemb = QuantEmbedding.from_embedding(emb, bits, group_size, scale_dtype)
    model.set_input_embeddings(qemb)
    stats = QuantStats(1, before, _nbytes(qemb.qweight, qemb.scale, qemb.offset))
    if type(head) is nn.Linear:
        if tied:  # the same buffers: the table is stored once, as the tied Parameter was
            qhead = QuantLinear(qemb.quantized(), head.bias, weight_dtype=head.weight.dtype)
            qhead.tied_to_embedding = True  # model.to(device) unties buffers: retie_quantized_head
            stats += QuantStats(1, _nbytes(head.bias), _nbytes(qhead.bias))
        else:
            qhead = QuantLinear.from_linear(head, bits, group_size, scale_dtype)
            stats += QuantStats(1, _nbytes(head.weight, head.bias),
                                _nbytes(qhead.qweight, qhead.scale, qhead.offset, qhead.bias))
        model.set_output_embeddings(qhead)
    del emb, head  # the last references: the full-precision table is freed here
    return stats


def retie_quantized_head(model: nn.Module) -> bool:
    """Point a tied quantized LM head's buffers back at the input embedding's; returns whether it did.

    ``quantize_embeddings`` on a tied model gives the head (``QuantLinear``) the embedding's own codes, scales
    and offsets. ``model.to("cuda")`` converts each module's buffers separately, so afterwards the head holds
    a copy: the same values, the table stored twice on the device, and ``dequantize_model`` (export) no longer
    sees them as one. Call this after moving the model; a no-op (False) for an untied or unquantized head.
    """
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not (isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear)
            and getattr(head, "tied_to_embedding", False)):
        return False
    for name in ("qweight", "scale", "offset"):
        setattr(head, name, getattr(emb, name))  # nn.Module.__setattr__ replaces the registered buffer
    return True


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace, in place, every ``QuantLinear`` of ``model`` (also under PEFT LoRA layers) by a frozen
    ``nn.Linear`` holding ``W_hat`` in ``dtype`` (default: each layer's original dtype), and every
    ``QuantEmbedding`` by an ``nn.Embedding``; a head that shared an embedding's buffers shares its
    Parameter again (tied). Returns how many modules. Used before merging an adapter: PEFT then merges
    into ``W_hat``.
    """
    tables: dict[int, nn.Parameter] = {}  # id(qweight) -> the dequantized embedding Parameter
    emb_names = [n for n, m in model.named_modules() if isinstance(m, QuantEmbedding)]
    for name in emb_names:
        parent, attr = _parent_and_attr(model, name)
        quant = getattr(parent, attr)
        weight = nn.Parameter(quant.dequantized_weight(dtype), requires_grad=False)
        emb = nn.Embedding(quant.num_embeddings, quant.embedding_dim, padding_idx=quant.padding_idx, device="meta")
        emb.weight = weight
        tables[id(quant.qweight)] = weight
        setattr(parent, attr, emb)
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name in names:
        parent, attr = _parent_and_attr(model, name)
        quant = getattr(parent, attr)
        tied = tables.get(id(quant.qweight))
        weight = tied if tied is not None else quant.dequantized_weight(dtype)
        linear = nn.Linear(quant.in_features, quant.out_features, bias=quant.bias is not None, device="meta")
        linear.weight = weight if tied is not None else nn.Parameter(weight, requires_grad=False)
        if quant.bias is not None:
            linear.bias = nn.Parameter(quant.bias.to(weight.dtype), requires_grad=False)
        setattr(parent, attr, linear)
    return len(emb_names) + len(names)


@torch.no_grad()
def fake_quantize_model(model: nn.Module, bits: int | None, group_size: int = 64, skip: Iterable[str] = ("lm_head",),
                        scale_dtype: torch.dtype = torch.float32, embedding_bits: int | None = None) -> int:
    """Overwrite, in place, the weight of each layer ``quantize_model`` would replace (``bits``; None:
    none) by its round trip ``W_hat = dequantize(quantize(W))``, keeping plain ``nn.Linear`` modules;
    with ``embedding_bits`` also the input embedding and the LM head (once when tied), as
    ``quantize_embeddings``. Returns how many weights.

    For export and evaluation of a quantized run from a freshly loaded base: the adapter is loaded and
    merged onto the weights it was trained against. Equal to ``dequantize_model(quantize_model(m))``
    (and ``quantize_embeddings``).
    """
    jobs = [(model.get_submodule(name).weight, bits) for name in _quantizable_linears(model, skip)] if bits else []
    if embedding_bits:
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        jobs.append((emb.weight, embedding_bits))
        if type(head) is nn.Linear and head.weight is not emb.weight:
            jobs.append((head.weight, embedding_bits))
    for w, b in progress_bar(jobs, desc="fake-quantize", unit="layer"):
        w.copy_(dequantize(quantize_groupwise(w, b, group_size, scale_dtype), w.dtype))
    return len(jobs)


# ----------------------------------------------------------------------------------------------
# PEFT: LoRA over QuantLinear


class QuantLoraLinear(_PeftLoraLinear):
    """PEFT's LoRA ``Linear`` over a ``QuantLinear`` base: y = base(x) + s · B A dropout(x).

    Forward, adapters, saving and loading are PEFT's own; only merging differs: the low-rank delta
    cannot be added to integer codes without re-quantizing (which would lose it), so ``merge``
    refuses while the base is quantized. After ``dequantize_model`` the base is an nn.Linear and
    PEFT's merge applies.
    """

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # PEFT's generic lookup handles QuantLinear too, but warns "unsupported layer type" on the way.
        if isinstance(module, QuantLinear):
            return module.in_features, module.out_features
        return super()._get_in_out_features(module)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if isinstance(self.get_base_layer(), QuantLinear):
            raise QuantMergeError(
                "cannot merge a LoRA adapter into a quantized (QuantLinear) base layer: call "
                "leantune.quant.dequantize_model(model) first, then merge (merge_and_unload)"
            )
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)


def register_quant_lora(config):
    """Let PEFT wrap ``QuantLinear`` targets with ``QuantLoraLinear``; returns ``config`` (a LoraConfig).

    Uses PEFT's custom-module API (``LoraConfig._register_custom_module``, experimental, documented at
    huggingface.co/docs/peft/developer_guides/custom_models); no PEFT code is patched. The mapping is
    not written to adapter_config.json: saved adapters are ordinary PEFT LoRA adapters.
    """
    config._register_custom_module({QuantLinear: QuantLoraLinear})
    return config


def available_gpu_backend() -> str | None:
    """'torchao' or 'bitsandbytes' if one is installed and CUDA is available, else None.

    Informational: this module always uses its own PyTorch dequantization (see the module docstring
    for where a fused kernel would go). Looks the packages up without importing them.
    """
    if not torch.cuda.is_available():
        return None
    for name in ("torchao", "bitsandbytes"):
        if importlib.util.find_spec(name) is not None:
            return name
    return None
