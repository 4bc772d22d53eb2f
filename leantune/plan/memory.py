"""Peak memory of a leantune run, predicted from the model's shape and the recipe.

Every term is a small pure function of shapes and byte sizes. ``plan_memory`` adds them up phase by
phase -- loading, forward + loss, loss backward, decoder backward, optimizer step (or MeZO's forward
passes, or an RL rollout) -- and the peak is the largest phase. What is counted is what the trainer
(``leantune.train.sft``) really keeps alive, traced with ``torch.autograd.graph.saved_tensors_hooks``
on the tiny Llama (``tests/test_plan.py`` checks the per-layer formula against such a trace):

- weights: every distinct parameter in ``model.dtype``; with ``quant.bits`` every ``nn.Linear`` but
  ``lm_head`` as codes + fp32 scale/offset per group (``leantune.quant.weight_only``); with
  ``quant.embedding_bits`` also the embedding and the lm_head (once when tied); norms stay full precision;
- adapter: LoRA's A (r x in) and B (out x r) per targeted linear, fp32 (PEFT keeps adapters in fp32
  over a bf16 base); ``adapter.method: full`` trains every weight in ``model.dtype``;
- gradients: one per trainable element, same dtype; optimizer: AdamW 2 states per trainable element
  plus one trainable-sized temporary in its foreach step; MeZO none (plus its restore list);
- activations: what autograd saves per decoder layer (``layer_saved_bytes``), or only the layer input
  for checkpointed layers, which are recomputed one at a time in backward (selective checkpointing: the
  input + the layer's matmul and attention outputs, ``selective_layer_saved_bytes``);
- loss workspace: ``linear_cross_entropy`` materializes ``chunk x V`` fp32 logits twice (logits and
  their exp) for ``chunk = min(loss.chunk_size, loss-carrying rows)``; with ``loss.vocab_subset`` V
  becomes S = at most k candidates + the loss rows' targets, plus the (S x H) rows it gathers; a
  quantized head (``quant.embedding_bits``) adds a 16 MiB block of dequantized rows (its whole
  dequantized V x H copy in RL's log-probs and rollouts);
- rollout KV cache (RL recipes): ``2 x L x n_kv x d x (prompt + new) x batch x dtype bytes``, plus, with
  ``rl.fold_adapter``, a copy of the LoRA-adapted layers' weights (the deltas folded in); with
  ``rl.speculative`` the cache's holes (rejected drafts, up to the compaction threshold) and one verify round's
  1 + k columns, logits at 1 + k positions, and for ``draft`` the draft's own cache, its k distributions and (a
  separate draft model) its weights;
- runtime: python + torch + transformers + peft + the tokenizer, measured (``Calibration``).

Assumptions (worst case within the recipe): every micro-batch is padded to ``data.max_length``; a
micro-batch of more than one sequence carries padding, so SDPA gets an explicit attention mask (on CPU
that costs a ``B x T x T`` mask per layer and un-grouped K/V); ``memory.loss_fraction`` of the
positions carry a loss. With ``data.packing`` (SFT) a micro-batch is ``micro_batch_size`` packed rows
of ``data.max_length`` tokens, and even one row gets the explicit (block-diagonal) mask.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from leantune.config import Recipe
from leantune.plan.model_shape import LinearSpec, ModelShape

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
MiB = 2**20


@dataclass(frozen=True)
class Calibration:
    """Constants measured on the dev machine (2-core x86 VM, torch 2.13 CPU, transformers 5.23, glibc
    malloc with ``M_MMAP_THRESHOLD=131072``); ``benchmarks/plan_accuracy.py`` checks them.

    runtime_bytes: RSS of a process that imported torch, transformers (with the model class), peft and
        leantune: 401 MiB after the imports + 13 MiB once ``from_pretrained`` ran (``/proc/self/status``).
    peft_bytes: the part of it that is peft (11 MiB), not imported by full fine-tuning.
    tokenizer_bytes_per_token: RSS of a loaded fast tokenizer per vocabulary entry (SmolLM2: 27-31 MiB
        for 49,152 entries).
    gguf_resident_bytes: what a GGUF load leaves behind besides the weights (32 MiB measured after
        loading SmolLM2's GGUF, vs 13 MiB for a safetensors directory).
    gguf_load_transient: peak extra RSS while transformers dequantizes a GGUF file, in units of its
        largest tensor in fp32 (the V x H embedding): 240-265 MiB for SmolLM2's 108 MiB embedding, in
        fp32 and bf16 alike. Measured on one GGUF model (the only one shipped); an estimate elsewhere.
    backward_workspace: gradient buffers alive inside one layer's backward, in units of
        ``N x (3 I + 2 H) x dtype bytes`` (grad of the MLP product, of act and up, of the residual).
    forward_workspace: the same for one layer's no-grad forward (MeZO, rollouts), units of
        ``N x (3 I + 4 H) x dtype bytes``.
    mezo_restore_fraction: MeZO's exception list for bit-exact restore, as a fraction of the trainable
        bytes (2-15% measured in ``leantune.optim.mezo``).
    cuda_context_bytes: device memory of the CUDA context (device plans only): NOT measured, an estimate
        (``CUDA_CONTEXT_NOTE`` says where it comes from); ``benchmarks/gpu_check.py`` reports the measured value.
    """

    runtime_bytes: int = 414 * MiB
    peft_bytes: int = 11 * MiB
    tokenizer_bytes_per_token: int = 600
    gguf_resident_bytes: int = 19 * MiB
    gguf_load_transient: float = 2.25
    backward_workspace: float = 1.0
    forward_workspace: float = 1.0
    mezo_restore_fraction: float = 0.15
    cuda_context_bytes: int = 512 * MiB


CALIBRATION = Calibration()

CUDA_CONTEXT_NOTE = (
    "CUDA context + loaded kernels: a labelled ESTIMATE, not measured here (no GPU in this repo's runs). "
    "pytorch/pytorch#34323 reports 781 MB in nvidia-smi for a process that only initialized CUDA (eager "
    "module loading); torch's default CUDA_MODULE_LOADING=LAZY (CUDA >= 11.7) loads kernels on first use, "
    "so it is usually smaller. Outside torch.cuda.max_memory_allocated(); benchmarks/gpu_check.py measures it")


# ----------------------------------------------------------------------------------------------
# Weights and trainable state


def quantized_linear_bytes(lin: LinearSpec, bits: int, group_size: int, dtype_bytes: int) -> int:
    """Bytes of one ``QuantLinear``: uint8 codes (two per byte at 4 bits) of the (out, in_padded)
    matrix + fp32 scale and offset per (row, group) + the bias in ``dtype_bytes``.

    in_padded = n_groups x g with g = min(group_size, in (+1 if odd, 4-bit)), n_groups = ceil(in / g).
    """
    n_in = lin.in_features
    g = min(group_size, n_in + (n_in % 2 if bits == 4 else 0))
    n_groups = -(-n_in // g)
    codes = lin.out_features * n_groups * g * bits // 8  # (out, in_padded) codes, bits/8 bytes each
    scales = 2 * lin.out_features * n_groups * 4  # scale + offset, (out, G) fp32 each
    return codes + scales + lin.bias * lin.out_features * dtype_bytes


def quantized_linears(shape: ModelShape) -> list[LinearSpec]:
    """The linears ``_setup_model`` quantizes: all but ``lm_head`` (its skip list)."""
    return [lin for lin in shape.linears if lin.short != "lm_head"]


def quantized_tables(shape: ModelShape) -> list[LinearSpec]:
    """The matrices ``quantize_embeddings`` replaces: the (V x H) embedding, and the lm_head unless tied
    (a tied head shares the embedding's codes)."""
    table = [LinearSpec("embed_tokens", shape.hidden, shape.vocab, False, None)]
    return table + [lin for lin in shape.linears if lin.short == "lm_head" and not shape.tied]


def _quantized(shape: ModelShape, bits: int | None, embedding_bits: int | None) -> list[tuple[LinearSpec, int]]:
    """(matrix, bits) of everything ``setup_model`` quantizes: the linears but lm_head at ``bits``, the
    embedding (and an untied lm_head) at ``embedding_bits``."""
    return ([(lin, bits) for lin in quantized_linears(shape)] if bits else []) + (
        [(t, embedding_bits) for t in quantized_tables(shape)] if embedding_bits else [])


def weight_bytes(shape: ModelShape, dtype_bytes: int, bits: int | None = None, group_size: int = 64,
                 embedding_bits: int | None = None) -> int:
    """Frozen (or full-FT) weights in memory: every distinct parameter in ``dtype_bytes``; with ``bits``
    the linears but ``lm_head`` as ``QuantLinear`` buffers instead; with ``embedding_bits`` the
    embedding and an untied lm_head as well."""
    quantized = _quantized(shape, bits, embedding_bits)
    replaced = sum(lin.in_features * lin.out_features + lin.bias * lin.out_features for lin, _ in quantized)
    return (shape.params - replaced) * dtype_bytes + sum(
        quantized_linear_bytes(lin, b, group_size, dtype_bytes) for lin, b in quantized)


def resident_weight_bytes(shape: ModelShape, dtype: str, bits: int | None, group_size: int, source_kind: str,
                          embedding_bits: int | None = None) -> int:
    """Weight bytes counted in RSS while training.

    A safetensors file already in ``model.dtype`` is memory-mapped, not copied: its pages count once
    touched. Quantizing reads every linear's pages, and they stay resident afterwards, because the
    parameters left full precision (the embedding, or at least the norms) keep the file mapping alive:
    then RSS holds the whole file *plus* the quantized buffers. GGUF weights are dequantized into
    ordinary memory, which quantization frees.
    """
    e = DTYPE_BYTES[dtype]
    mapped = source_kind != "gguf" and shape.file_dtype in (None, dtype)
    quantized = _quantized(shape, bits, embedding_bits)
    if quantized and mapped and shape.file_bytes:
        return shape.file_bytes + sum(quantized_linear_bytes(lin, b, group_size, e) for lin, b in quantized)
    return weight_bytes(shape, e, bits, group_size, embedding_bits)


def load_extra_bytes(shape: ModelShape, dtype: str, source_kind: str, cal: Calibration) -> int:
    """RSS above the runtime while ``from_pretrained`` runs (before any quantization).

    GGUF: the dequantized weights in ``model.dtype`` + transformers' dequantization temporaries
    (``gguf_load_transient`` x the V x H embedding in fp32). Safetensors in another dtype: the file's
    pages, read to convert, + the converted copy. Safetensors in ``model.dtype``: mapped lazily; its
    pages are counted in the training phases instead.
    """
    e = DTYPE_BYTES[dtype]
    if source_kind == "gguf":
        return shape.params * e + int(cal.gguf_load_transient * shape.vocab * shape.hidden * 4) + cal.gguf_resident_bytes
    if shape.file_dtype not in (None, dtype) and shape.file_bytes:
        return shape.file_bytes + shape.params * e
    return 0


def lora_targets(shape: ModelShape, target_modules: list[str] | str) -> list[LinearSpec]:
    """The linear layers PEFT adapts: a list entry matches a module's name or its last components
    (``q_proj`` matches ``model.layers.0.self_attn.q_proj``); a string is a regex matched in full."""
    import re

    if isinstance(target_modules, str):
        return [lin for lin in shape.linears if re.fullmatch(target_modules, lin.name)]
    return [lin for lin in shape.linears
            if any(lin.name == t or lin.name.endswith(f".{t}") for t in target_modules)]


def trainable_elements(shape: ModelShape, recipe: Recipe) -> int:
    """Trainable parameters, as the adapter method counts them (``leantune.adapters.ADAPTERS``)."""
    from leantune.adapters import ADAPTERS

    return ADAPTERS[recipe.adapter.method].trainable_elements(shape, recipe)


def trainable_bytes(shape: ModelShape, recipe: Recipe) -> int:
    """Trainable parameter bytes (LoRA: fp32 adapters; full fine-tuning: ``model.dtype``)."""
    from leantune.adapters import ADAPTERS

    return ADAPTERS[recipe.adapter.method].trainable_bytes(shape, recipe)


def trains_base(recipe: Recipe) -> bool:
    """Whether every base weight trains (gradients and activations for all of them)."""
    from leantune.adapters import ADAPTERS

    return ADAPTERS[recipe.adapter.method].trains_base


def optimizer_state_bytes(trainable: int, optimizer: str) -> int:
    """Optimizer state: ``OPTIMIZERS[name].state_copies`` x the trainable bytes (AdamW: exp_avg + exp_avg_sq;
    MeZO: none, z is regenerated from a seed)."""
    from leantune.optim import OPTIMIZERS

    return OPTIMIZERS[optimizer].state_copies * trainable


# ----------------------------------------------------------------------------------------------
# Activations


@dataclass(frozen=True)
class LayerSpec:
    """What decides one decoder layer's saved activations (see ``layer_saved_bytes``)."""

    adapted: frozenset[str]  # short names of the LoRA-adapted linears in this layer
    full: bool  # every weight trainable (adapter.method: full)
    input_requires_grad: bool  # something trainable below this layer (or full FT)


def _lora_input_bytes(n: int, width: int, dtype_bytes: int, dropout: bool, input_requires_grad: bool) -> int:
    """What ``lora_A`` saves of its input (N x width) when not shared with another saved tensor: with
    dropout, the dropout output (fp32) and, if the input requires grad, the scaled noise it was
    multiplied by (CPU dropout is ``x * noise``); else the fp32 cast PEFT makes over a non-fp32 base."""
    if dropout:
        return n * width * (4 + (4 if input_requires_grad else 0))
    return n * width * 4 if dtype_bytes != 4 else 0


def layer_saved_bytes(spec: LayerSpec, shape: ModelShape, batch: int, seq: int, dtype_bytes: int,
                      r: int, dropout: bool, masked: bool) -> int:
    """Bytes autograd keeps for one Llama decoder layer (no checkpointing), N = batch x seq tokens.

    RMSNorm saves its fp32 input (N x H x 4; a copy for bf16) and rsqrt (N x 4), + the normalized
    input (N x H x e) when its weight trains. SDPA (CPU flash kernel) saves q, k, v, out (N x n_h d or
    n_kv d, e each; K/V repeated to n_h heads when a mask is passed) and logsumexp (N x n_h x 4), plus
    the mask in the compute dtype (B x T x T x e). SiLU-gated MLP: gate, act, up (N x I x e each). LoRA: the input
    of ``lora_A`` (shared with the base when fp32 and no dropout, else an fp32 copy per module) and its
    output (N x r x 4). Full fine-tuning: each linear's input, shared within q/k/v and gate/up.
    """
    n, e, H, I = batch * seq, dtype_bytes, shape.hidden, shape.intermediate
    qd, kvd = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    A, full = spec.adapted, spec.full
    fp32_shared = e == 4 and not dropout  # lora_A saves the very tensor the base layer got
    total = 0

    def norm(requires_grad: bool) -> int:
        return n * (4 * H + 4) + (n * H * e if full else 0) if requires_grad else 0

    def lora(names: set[str], width: int, shared_saved: bool, input_rg: bool) -> int:
        """LoRA inputs for ``names`` reading the same (N x width) tensor, + their (N x r) outputs."""
        hit = [m for m in names if m in A]
        if not hit:
            return 0
        if fp32_shared:
            inputs = 0 if shared_saved else n * width * 4
        else:
            inputs = len(hit) * _lora_input_bytes(n, width, e, dropout, input_rg)
        return inputs + len(hit) * n * r * 4

    # attention block
    total += norm(spec.input_requires_grad)
    y_rg = spec.input_requires_grad or full
    qkv = {"q_proj", "k_proj", "v_proj"}
    total += lora(qkv, H, shared_saved=False, input_rg=y_rg)
    total += n * H * e if full else 0  # y, input of q/k/v, for their weight gradients
    sdpa_rg = y_rg or bool(qkv & A) or full
    if sdpa_rg:
        kv_width = qd if masked else kvd  # repeat_kv when a mask rules out enable_gqa
        total += n * e * (2 * qd + 2 * kv_width) + n * shape.heads * 4  # q, k, v, out + logsumexp
        total += batch * seq * seq * e if masked else 0
    total += lora({"o_proj"}, qd, shared_saved=sdpa_rg, input_rg=sdpa_rg)  # o_proj's input is SDPA's saved output
    h_rg = sdpa_rg or "o_proj" in A or spec.input_requires_grad
    # MLP block
    total += norm(h_rg)
    y2_rg = h_rg or full
    total += lora({"gate_proj", "up_proj"}, H, shared_saved=False, input_rg=y2_rg)
    total += n * H * e if full else 0  # y2, input of gate/up
    gate_rg = y2_rg or "gate_proj" in A
    up_rg = y2_rg or "up_proj" in A
    total += n * I * e * (gate_rg + gate_rg + up_rg)  # silu saves gate; act * up saves up (and act)
    total += lora({"down_proj"}, I, shared_saved=False, input_rg=gate_rg or up_rg)
    total += n * I * e if full else 0  # act * up, input of down_proj
    return total


def layer_specs(shape: ModelShape, recipe: Recipe) -> list[LayerSpec]:
    """Per decoder layer: which linears carry LoRA and whether its input already requires grad."""
    full = trains_base(recipe)
    targets = [] if full else lora_targets(shape, recipe.adapter.target_modules)
    adapted = [frozenset(lin.short for lin in targets if lin.layer == i) for i in range(shape.layers)]
    specs, below = [], full
    for i in range(shape.layers):
        specs.append(LayerSpec(adapted[i], full, below))
        below = below or bool(adapted[i])
    return specs


def layer_trainable_bytes(shape: ModelShape, recipe: Recipe) -> tuple[list[int], int]:
    """Gradient bytes per decoder layer, and of everything above the layers (final norm + lm_head),
    which backward produces first. LoRA: r x (in + out) x 4 per adapted linear; full: the layer's
    weights (+ 2 norms) in ``model.dtype``."""
    e = DTYPE_BYTES[recipe.model.compute_dtype]
    if trains_base(recipe):
        per = [0] * shape.layers
        for lin in shape.linears:
            if lin.layer is not None:
                per[lin.layer] += (lin.in_features * lin.out_features + lin.bias * lin.out_features) * e
        per = [p + 2 * shape.hidden * e for p in per]
        return per, (shape.vocab + 1) * shape.hidden * e  # lm_head (or the tied embedding) + final norm
    per = [0] * shape.layers
    top = 0
    for lin in lora_targets(shape, recipe.adapter.target_modules):
        nbytes = recipe.adapter.r * (lin.in_features + lin.out_features) * 4
        if lin.layer is None:
            top += nbytes
        else:
            per[lin.layer] += nbytes
    return per, top


def checkpointed_layers(policy, layers: int) -> list[bool]:
    """Which layers ``set_activation_checkpointing`` checkpoints: none ('off', or None: not chosen yet, planned
    as off), all ('all' and 'selective'), or every k-th (i % k == 0)."""
    if policy in ("off", None):
        return [False] * layers
    k = 1 if policy in ("all", "selective") else int(policy)
    return [i % k == 0 for i in range(layers)]


def selective_layer_saved_bytes(spec: LayerSpec, linears: list[LinearSpec], shape: ModelShape, batch: int,
                                seq: int, dtype_bytes: int, r: int) -> int:
    """Bytes one decoder layer keeps from forward to backward under selective checkpointing
    (``leantune.train.selective``), N = batch x seq tokens: its input (N x H x e, the checkpoint's), the
    output of every full-width matmul -- each of the layer's ``linears`` (N x out x e) and, for a
    LoRA-adapted one, lora_A's (N x r x 4; PEFT runs the adapter in fp32) -- and the SDPA kernel's output
    (N x n_h d x e) and logsumexp (N x n_h x 4). Norms, SiLU, rotary, casts, dropout, the K/V repeat and
    lora_B's rank-r product are recomputed in backward, so neither the mask nor dropout's noise is kept."""
    n, e = batch * seq, dtype_bytes
    total = n * shape.hidden * e
    for lin in linears:
        total += n * lin.out_features * e + (n * r * 4 if lin.short in spec.adapted else 0)
    return total + n * shape.heads * shape.head_dim * e + n * shape.heads * 4


def shared_saved_bytes(shape: ModelShape, seq: int, dtype_bytes: int) -> int:
    """RoPE cos and sin (T x d each, e bytes), saved once and shared by every layer."""
    return 2 * seq * shape.head_dim * dtype_bytes


def final_norm_saved_bytes(shape: ModelShape, n: int, dtype_bytes: int, full: bool) -> int:
    """The final RMSNorm: fp32 input + rsqrt, + its normalized input when its weight trains."""
    return n * (4 * shape.hidden + 4) + (n * shape.hidden * dtype_bytes if full else 0)


# ----------------------------------------------------------------------------------------------
# Loss, workspaces, RL


def loss_rows(batch: int, seq: int, loss_fraction: float) -> int:
    """K: shifted positions (B x (T - 1)) that carry a loss and reach the lm_head (logits masking)."""
    return max(1, round(batch * (seq - 1) * loss_fraction))


def loss_saved_bytes(shape: ModelShape, batch: int, seq: int, rows: int, dtype_bytes: int) -> int:
    """What ``linear_cross_entropy`` saves: hidden[:, :-1] flattened (a copy when B > 1, B x (T-1) x H
    x e) + per kept row its index and label (int64), weight and logsumexp (fp32): 24 bytes."""
    copy = batch * (seq - 1) * shape.hidden * dtype_bytes if batch > 1 else 0
    return copy + 24 * rows


def loss_workspace_bytes(shape: ModelShape, rows: int, chunk_size: int, dtype_bytes: int = 4,
                         cols: int | None = None) -> int:
    """Peak extra bytes inside ``linear_cross_entropy``: two (C x S) fp32 buffers at once (the logits and
    logsumexp's / softmax's exp), + the (C x H) fp32 gathered hidden rows, C = min(chunk_size, K); for a
    non-fp32 model also the fp32 copy of the (S x H) lm_head weight it computes with. S = ``cols``: the
    softmax's columns, V (default) or a vocabulary subset's size (``loss_cols``)."""
    c, cols = min(chunk_size, rows), shape.vocab if cols is None else cols
    weight_copy = cols * shape.hidden * 4 if dtype_bytes != 4 else 0
    return 2 * c * cols * 4 + c * shape.hidden * 4 + weight_copy


def loss_cols(shape: ModelShape, recipe: Recipe, rows: int) -> int:
    """S, the columns the loss's softmax runs over: V, or with ``loss.vocab_subset`` k at most k candidates
    + the K loss rows' targets (all distinct, the worst case), capped at V."""
    k = recipe.loss.vocab_subset
    return shape.vocab if k is None else min(shape.vocab, k + rows)


CAST_BLOCK_BYTES = 16 * MiB  # leantune.losses.linear_cross_entropy._CAST_BLOCK_BYTES


def head_copy_bytes(shape: ModelShape, recipe: Recipe, cols: int, dtype_bytes: int, rl: bool = False) -> int:
    """The LM-head matrix the loss computes with when it is not the weight itself: the subset's (S x H)
    rows (gathered, or dequantized from a quantized head; kept for backward); for a quantized head
    (``quant.embedding_bits``) and the exact loss, one 16 MiB block of fp32 rows at a time -- or, for
    ``leantune rl``'s log-probs and rollouts, its whole dequantized (V x H) copy."""
    if cols < shape.vocab:
        return cols * shape.hidden * dtype_bytes
    if not recipe.quant.embedding_bits:
        return 0
    if rl:
        return shape.vocab * shape.hidden * dtype_bytes
    return min(shape.vocab, max(1, CAST_BLOCK_BYTES // (shape.hidden * 4))) * shape.hidden * 4


def backward_workspace_bytes(shape: ModelShape, n: int, dtype_bytes: int, cal: Calibration) -> int:
    """Gradient buffers alive inside one layer's backward: ~ N x (3 I + 2 H) x e (calibrated)."""
    return int(cal.backward_workspace * n * (3 * shape.intermediate + 2 * shape.hidden) * dtype_bytes)


def forward_workspace_bytes(shape: ModelShape, batch: int, seq: int, dtype_bytes: int, masked: bool,
                            cal: Calibration) -> int:
    """One layer's no-grad forward: ~ N x (3 I + 4 H) x e (calibrated) + the attention mask if any."""
    n = batch * seq
    return int(cal.forward_workspace * n * (3 * shape.intermediate + 4 * shape.hidden) * dtype_bytes) + (
        batch * seq * seq * dtype_bytes if masked else 0)


def kv_cache_bytes(shape: ModelShape, tokens: int, batch: int, dtype_bytes: int, layers: int | None = None) -> int:
    """Rollout KV cache: K and V (2) x L layers x n_kv heads x d x (prompt + new tokens) x batch x e
    (``layers``: the first ``layers`` only, a layer-skip draft's cache)."""
    return 2 * (shape.layers if layers is None else layers) * shape.kv_heads * shape.head_dim * tokens * batch * dtype_bytes


# `leantune.rl.speculative.compact_holes`' defaults (a test checks they agree): a speculative rollout's cache keeps
# rejected drafts' columns as masked holes until they are at least max(16, 25%) of it.
SPECULATIVE_SLACK = 0.25
SPECULATIVE_MIN_HOLES = 16


def speculative_cache_tokens(tokens: int, drafted: int) -> int:
    """Most columns of a speculative rollout's KV cache holding ``tokens`` kept ones: the holes below the
    compaction threshold (``compact_holes``), plus one verify round's 1 + k appended columns."""
    held = max(tokens + SPECULATIVE_MIN_HOLES - 1, math.ceil(tokens / (1 - SPECULATIVE_SLACK)))
    return held + 1 + drafted


# ----------------------------------------------------------------------------------------------
# The breakdown


@dataclass
class MemoryPlan:
    """Predicted peak RSS of a run (bytes), phase by phase.

    ``phases`` maps each phase to its terms, each term to (bytes, how it was computed); the peak is
    the phase with the largest total.
    """

    phases: dict[str, dict[str, tuple[int, str]]]
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"  # the device type whose memory is planned: "cpu" (RSS) or "cuda" (device memory)

    @property
    def label(self) -> str:
        """What the peak is: "predicted peak RSS" (CPU) or "predicted peak device memory (cuda)"."""
        return "predicted peak RSS" if self.device == "cpu" else f"predicted peak device memory ({self.device})"

    @property
    def totals(self) -> dict[str, int]:
        return {name: sum(v for v, _ in terms.values()) for name, terms in self.phases.items()}

    @property
    def peak_phase(self) -> str:
        totals = self.totals
        return max(totals, key=totals.get)

    @property
    def peak(self) -> int:
        return self.totals[self.peak_phase]

    @property
    def terms(self) -> dict[str, tuple[int, str]]:
        """The terms of the peak phase."""
        return self.phases[self.peak_phase]

    def fits(self, budget: int | None) -> bool:
        return budget is None or self.peak <= budget


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def is_rl(recipe: Recipe) -> bool:
    """An RL recipe names an ``rl`` section (or has no SFT data): rollouts join the plan."""
    return "rl" in recipe.model_fields_set or (recipe.data.train is None and recipe.data.mixture is None)


PLAN_MODES = ("sft", "rl", "dpo")


def plan_mode(recipe: Recipe, mode: str | None = None) -> str:
    """The command a plan is for: ``mode`` if given, else "rl" for an RL recipe (``is_rl``), "dpo" for a
    recipe that names a ``dpo`` section, "sft" otherwise."""
    if mode is not None:
        if mode not in PLAN_MODES:
            raise ValueError(f"plan mode {mode!r}: expected one of {', '.join(PLAN_MODES)}")
        return mode
    if is_rl(recipe):
        return "rl"
    return "dpo" if "dpo" in recipe.model_fields_set else "sft"


def _draft_terms(recipe: Recipe, shape: ModelShape, tokens: int, rollouts: int, e: int,
                 source_kind: str) -> dict[str, tuple[int, str]]:
    """``rl.speculative: draft``: the draft's own KV cache over the same rows, its k next-token distributions
    (fp32, kept for the verify rule) and, for a separate draft model, its weights (frozen, in ``model.dtype``).
    ``layers:N`` shares the policy's modules: its first N layers' cache only."""
    from leantune.config import ModelConfig
    from leantune.models.loading import ModelLoadError
    from leantune.plan.model_shape import PlanError, model_shape

    k, spec = recipe.rl.speculative_tokens, recipe.rl.speculative_draft or ""
    out = {"draft_probs": (rollouts * k * shape.vocab * 4, f"the draft's {k} next-token distributions per row (fp32)")}
    if spec.startswith("layers:"):
        n = int(spec.split(":", 1)[1])
        out["draft_kv_cache"] = (kv_cache_bytes(shape, tokens, rollouts, e, layers=n),
                                 f"the draft's cache: the policy's first {n} layers, {tokens} tokens x {rollouts} sequences")
        return out
    try:
        draft = model_shape(ModelConfig(path=spec, dtype=recipe.model.dtype))
    except (PlanError, ModelLoadError, OSError, ValueError) as err:
        raise PlanError(f"rl.speculative_draft: {spec}: its config could not be read for the plan ({err})") from None
    kind = "gguf" if spec.endswith(".gguf") else source_kind
    out["draft_weights"] = (resident_weight_bytes(draft, recipe.model.compute_dtype, None, 64, kind),
                            f"the draft model {spec}: {draft.params:,} params, frozen")
    out["draft_kv_cache"] = (kv_cache_bytes(draft, tokens, rollouts, e),
                             f"the draft's cache: {draft.layers} layers, {tokens} tokens x {rollouts} sequences")
    return out


def _needs_reference(recipe: Recipe) -> bool:
    """Whether ``dpo.loss`` compares against a reference policy (its registry entry says)."""
    from leantune.losses.preference import PREFERENCE_LOSSES  # imports torch: only for a DPO plan

    return PREFERENCE_LOSSES[recipe.dpo.loss].needs_reference


def with_init_adapter(recipe: Recipe) -> Recipe:
    """For an RL or DPO recipe that continues a LoRA run (``rl.init``, ``dpo.init``), the adapter that run trained: its rank,
    alpha, dropout and target modules (from ``INIT/adapter/adapter_config.json``) replace the recipe's
    ``adapter`` section, as ``setup_model(recipe, init=...)`` loads it. Otherwise the recipe unchanged."""
    init = (recipe.rl.init if "rl" in recipe.model_fields_set
            else recipe.dpo.init if "dpo" in recipe.model_fields_set else None)
    cfg_path = Path(init) / "adapter" / "adapter_config.json" if init else None
    if cfg_path is None or not cfg_path.is_file():
        return recipe
    cfg = json.loads(cfg_path.read_text())
    targets = cfg.get("target_modules")
    adapter = recipe.adapter.model_copy(update={
        "r": int(cfg.get("r", recipe.adapter.r)),
        "alpha": float(cfg.get("lora_alpha", recipe.adapter.alpha)),
        "dropout": float(cfg.get("lora_dropout", recipe.adapter.dropout) or 0.0),
        "target_modules": sorted(targets) if isinstance(targets, list) else (targets or recipe.adapter.target_modules),
    })
    return recipe.model_copy(update={"adapter": adapter})


def plan_memory(recipe: Recipe, shape: ModelShape, source_kind: str = "local",
                cal: Calibration = CALIBRATION, mode: str | None = None) -> MemoryPlan:
    """Predict the peak RSS of ``recipe`` on a model of ``shape``: the largest of its phases.

    ``mode``: "sft" (``leantune train``), "rl" (``leantune rl``: rollouts, then policy updates on
    prompt + completion) or "dpo" (``leantune dpo``); None decides by ``plan_mode(recipe)``. For RL the
    prompt length is taken to be ``data.max_length`` (an upper bound on the rendered prompt).

    DPO: a micro-batch of P = ``train.micro_batch_size`` pairs is 2P sequences (chosen and rejected) of at
    most ``data.max_length`` = T tokens, the longer completion ``memory.loss_fraction`` of T (Lc; the prompt
    Lp = T - Lc). Without checkpointed layers each prompt runs once (``completion_logprobs``' shared
    prefill): P x Lp + 2P x Lc tokens through the decoder, planned as 2P sequences of Lp / 2 + Lc, plus the
    K/V of the 2P sequences of T tokens in every layer (each prompt's indexed out to its two completions, and
    the completions'); with checkpointed layers 2P x T tokens.
    Only completion positions reach the LM head, over the whole vocabulary. A loss with a reference (dpo,
    ipo) adds a no-grad phase: the same micro-batch through the adapter-disabled model (or, with
    ``dpo.precompute_reference``, the one pass before training), its K/V cache and one layer's workspace.

    A recipe that trains on CUDA (``train.device`` cuda / cuda:N, or auto on a machine with CUDA) is planned
    in device memory instead (``plan.device == "cuda"``): the host-only terms (the Python/torch runtime, the
    tokenizer, a GGUF reader's residue, from_pretrained's host-side load, mapped-file pages) are left out,
    the weights are their tensors' bytes once moved, and a CUDA context estimate is added
    (``Calibration.cuda_context_bytes``).
    """
    from leantune.models.precision import device_type

    recipe = with_init_adapter(recipe)
    on_device = device_type(recipe.train.device) == "cuda"
    e = DTYPE_BYTES[recipe.model.compute_dtype]
    full = trains_base(recipe)
    mezo = recipe.optim.name == "mezo"
    runtime = (cal.runtime_bytes - (cal.peft_bytes if full else 0) + cal.tokenizer_bytes_per_token * shape.vocab
               + (cal.gguf_resident_bytes if source_kind == "gguf" else 0))
    if on_device:  # moved to the device after loading (and quantizing) on the host: the tensors' bytes only
        weights = weight_bytes(shape, e, recipe.quant.bits, recipe.quant.group_size, recipe.quant.embedding_bits)
    else:
        weights = resident_weight_bytes(shape, recipe.model.compute_dtype, recipe.quant.bits, recipe.quant.group_size,
                                        source_kind, recipe.quant.embedding_bits)
    adapter = trainable_bytes(shape, recipe)
    grads = 0 if mezo else adapter
    optim = optimizer_state_bytes(adapter, recipe.optim.name)

    mode = plan_mode(recipe, mode)
    rl, dpo = mode == "rl", mode == "dpo"
    batch, seq = recipe.train.micro_batch_size, recipe.data.max_length
    loss_fraction = recipe.memory.loss_fraction
    if rl:  # the policy update runs on prompt + completion; only completion tokens carry a loss
        seq = recipe.data.max_length + recipe.rl.max_new_tokens
        loss_fraction = min(loss_fraction, recipe.rl.max_new_tokens / seq)
    pair_kv = 0  # DPO's shared prefill: each prompt's K/V indexed out to its two completions, + the completions' K/V
    if dpo:
        pairs, total = batch, recipe.data.max_length
        completion = max(1, min(total, round(loss_fraction * total)))
        prompt = total - completion
        batch = 2 * pairs
        if mezo or sum(checkpointed_layers(recipe.train.activation_checkpointing, shape.layers)):
            seq = total  # the prompt runs again with each completion (the shared cache needs the whole graph)
        else:
            seq = max(1, -(-prompt // 2) + completion)  # 2P x seq = P x Lp + 2P x Lc tokens
            pair_kv = kv_cache_bytes(shape, total, batch, e)
        loss_fraction = min(1.0, completion / seq)
    n = batch * seq
    packed = recipe.data.packing and mode == "sft"  # rows of max_length tokens, a block-diagonal mask even at batch 1
    masked = batch > 1 or packed
    rows = loss_rows(batch, seq, loss_fraction)
    # log-probs (RL's and DPO's) run over the whole vocabulary
    cols = shape.vocab if rl or dpo else loss_cols(shape, recipe, rows)
    head = head_copy_bytes(shape, recipe, cols, e, rl or dpo)
    lws = loss_workspace_bytes(shape, rows, recipe.loss.chunk_size, e, cols) + head
    loss_note = _loss_note(rows, recipe.loss.chunk_size, shape, e, cols, head)
    r, dropout = recipe.adapter.r, recipe.adapter.dropout > 0

    weights_note = _weights_note(shape, recipe, e, source_kind, on_device)
    phases: dict[str, dict[str, tuple[int, str]]] = {}
    if on_device:
        base = {"cuda_context": (cal.cuda_context_bytes, CUDA_CONTEXT_NOTE), "weights": (weights, weights_note)}
        phases["load"] = dict(base)  # from_pretrained runs on the host; the device gets the finished weights
    else:
        base = {"runtime": (runtime, "python + torch + transformers + peft + tokenizer (measured)"),
                "weights": (weights, weights_note)}
        phases["load"] = {
            # the tokenizer loads after the model
            "runtime": (cal.runtime_bytes - (cal.peft_bytes if full else 0), "python + torch + transformers + peft"),
            "load": (load_extra_bytes(shape, recipe.model.compute_dtype, source_kind, cal),
                     f"from_pretrained ({source_kind}, {shape.file_dtype or 'dtype unknown'} on disk -> {recipe.model.compute_dtype})"),
        }
    adapter_note = (f"{trainable_elements(shape, recipe):,} trainable x "
                    f"{e if full else 4} B ({'full' if full else f'LoRA r={r}'})")
    # Full fine-tuning trains the weights themselves: no separate adapter bytes.
    trainables = {"adapter": (0 if full else adapter, adapter_note + (" (the weights themselves)" if full else ""))}
    if optim:
        trainables["optimizer"] = (optim, "AdamW: 2 states per trainable element")

    if mezo:
        restore = int(cal.mezo_restore_fraction * adapter)
        biggest = max((lin.in_features * recipe.adapter.r for lin in lora_targets(shape, recipe.adapter.target_modules)),
                      default=0) if not full else shape.vocab * shape.hidden
        zchunk = int(2.25 * min(1 << 22, max(biggest, 1)) * (e if full else 4))
        trainables["optimizer"] = (restore + zchunk, f"MeZO: restore list ~{cal.mezo_restore_fraction:.0%} of trainable + z chunk")
        fwd = forward_workspace_bytes(shape, batch, seq, e, masked, cal)
        phases["forward (no grad)"] = {**base, **trainables, "activations": (
            fwd + n * shape.hidden * e, f"one layer's no-grad forward, B={batch} x T={seq}, + the residual stream")}
        phases["loss (no grad)"] = {**base, **trainables, "loss": (
            n * shape.hidden * e + loss_saved_bytes(shape, batch, seq, rows, e) + lws, loss_note)}
    else:
        specs = layer_specs(shape, recipe)
        policy = recipe.train.activation_checkpointing
        ckpt = checkpointed_layers(policy, shape.layers)
        kept = [layer_saved_bytes(s, shape, batch, seq, e, r, dropout, masked) for s in specs]
        layer_input = n * shape.hidden * e
        # checkpoint: the layer input only (selective: + its matmul and attention outputs) -- the input not
        # even that with offload_checkpoints (it lives in a file; one layer input is resident at a time,
        # being written in forward or read back by the recomputation)
        if policy == "selective":
            linears = [[lin for lin in shape.linears if lin.layer == i] for i in range(shape.layers)]
            ckpt_kept = [selective_layer_saved_bytes(s, linears[i], shape, batch, seq, e, r) for i, s in enumerate(specs)]
        else:
            ckpt_kept = [layer_input] * shape.layers
        offload = recipe.train.offload_checkpoints
        stored = [(c_k - (layer_input if offload else 0)) if c else k for c, c_k, k in zip(ckpt, ckpt_kept, kept)]
        resident = layer_input if offload else 0
        outside = (shared_saved_bytes(shape, seq, e) + final_norm_saved_bytes(shape, n, e, full) + (n * 8 if full else 0)
                   + resident + pair_kv)
        saved = sum(stored) + outside
        how = " (selective: matmul and attention outputs kept)" if policy == "selective" else ""
        act_note = (f"{sum(ckpt)}/{shape.layers} layers checkpointed{how}{' (inputs in a file)' if offload else ''}, "
                    f"B={batch} x T={seq}{', masked' if masked else ''}: {_gib(max(kept))} per full layer"
                    + (f" + the K/V of {batch} sequences of {total} tokens ({_gib(pair_kv)})" if pair_kv else ""))
        acc_grads = {"gradients": (grads, "accumulated over micro-batches")} if recipe.train.grad_accum > 1 else {}
        lsaved = loss_saved_bytes(shape, batch, seq, rows, e)
        head_grad = shape.vocab * shape.hidden * 4 if full else 0  # fp32 (V, H) buffer in backward
        phases["forward + loss"] = {**base, **trainables, **acc_grads,
                                    "activations": (saved, act_note),
                                    "loss": (n * shape.hidden * e + lsaved + lws, loss_note)}
        phases["loss backward"] = {**base, **trainables, **acc_grads,
                                   "activations": (saved, act_note),
                                   "loss": (lsaved + lws + batch * (seq - 1) * shape.hidden * e + head_grad,
                                            loss_note + " + grad of hidden")}
        # Decoder backward, top layer down: at layer i, layers < i still hold their saved tensors, layer i
        # its own (a checkpointed one: its input + what its recomputation saves; a selective layer's cache
        # is handed to the recomputation, which keeps what backward needs and drops the rest: checked against
        # live bytes in backward in tests/test_selective.py), gradients exist for what lies above i.
        bwd = backward_workspace_bytes(shape, n, e, cal)
        per_grad, top_grad = layer_trainable_bytes(shape, recipe)
        grads_at = [grads if recipe.train.grad_accum > 1 else top_grad + sum(per_grad[i + 1:]) for i in range(shape.layers)]
        ckpt_input = 0 if offload else layer_input
        at = [sum(stored[:i]) + (ckpt_input + kept[i] if ckpt[i] else stored[i]) + grads_at[i] for i in range(shape.layers)]
        i = max(range(shape.layers), key=at.__getitem__)
        phases["decoder backward"] = {**base, **trainables,
                                      "gradients": (grads_at[i], "accumulated over micro-batches" if recipe.train.grad_accum > 1
                                                    else f"those of the layers above layer {i}"),
                                      "activations": (at[i] - grads_at[i] + outside, act_note + f" (layers <= {i})"),
                                      "workspace": (bwd, "gradient buffers of one layer's backward")}
        phases["optimizer step"] = {**base, **trainables,
                                    "gradients": (grads, "one per trainable element"),
                                    "workspace": (adapter, "AdamW foreach temporary (sqrt of exp_avg_sq)")}

    if rl:
        rollouts = recipe.rl.group_size * recipe.rl.prompts_per_step
        if recipe.rl.prefix_rollouts.enabled:  # Tree-OPO: rl.group_size per prefix node, up to len(depths) nodes a prompt
            rollouts *= len(recipe.rl.prefix_rollouts.depths)
        tokens = recipe.data.max_length + recipe.rl.max_new_tokens
        spec, k = recipe.rl.speculative, recipe.rl.speculative_tokens
        if spec != "off":  # rejected drafts' columns stay in the cache until compacted; a verify round adds 1 + k
            tokens = speculative_cache_tokens(tokens, k)
        kv = kv_cache_bytes(shape, tokens, rollouts, e)
        prefill = forward_workspace_bytes(shape, rollouts, recipe.data.max_length, e, True, cal)
        positions = 1 if spec == "off" else 1 + k  # a verify forward scores the pending token and k drafts
        phases["rollout"] = {**base, **trainables,
                             "kv_cache": (kv, (f"2 x {shape.layers} layers x {shape.kv_heads} kv heads x {shape.head_dim} x "
                                               f"{tokens} tokens x {rollouts} sequences x {e} B"
                                               + (" (with speculative sampling's holes and one verify round)"
                                                  if spec != "off" else ""))),
                             "workspace": (prefill + 2 * rollouts * positions * shape.vocab * 4 + head,
                                           "prefill of one layer + next-token logits and probabilities"
                                           + (f" at {positions} positions" if positions > 1 else "")
                                           + (" + the dequantized lm_head" if head else ""))}
        if spec == "draft":
            phases["rollout"].update(_draft_terms(recipe, shape, tokens, rollouts, e, source_kind))
        if recipe.rl.fold_adapter and recipe.adapter.method == "lora" and not recipe.quant.bits:
            targets = lora_targets(shape, recipe.adapter.target_modules)
            note = f"rl.fold_adapter: a copy of the {len(targets)} adapted layers' weights with the LoRA delta folded in"
            phases["rollout"]["folded_weights"] = (sum(t.in_features * t.out_features for t in targets) * e, note)

    if dpo and _needs_reference(recipe):  # no grad: the prompt is always prefilled once per pair
        ref_seq = max(1, -(-prompt // 2) + completion)
        ref_n = batch * ref_seq
        fwd = forward_workspace_bytes(shape, batch, ref_seq, e, masked, cal)
        ref_loss = loss_workspace_bytes(shape, batch * completion, recipe.loss.chunk_size, e, cols) + head
        name = "reference pass (no grad)" if recipe.dpo.precompute_reference else "reference (no grad)"
        phases[name] = {**base, **trainables,
                        "kv_cache": (kv_cache_bytes(shape, total, batch, e),
                                     f"the prompts' and completions' K/V, {batch} sequences of {total} tokens"),
                        "workspace": (ref_n * shape.hidden * e + max(fwd, ref_loss),
                                      "the residual stream + one layer's forward or the log-probs' chunk, the larger")}

    plan = MemoryPlan(phases, device="cuda" if on_device else "cpu")
    if recipe.train.activation_checkpointing is None and not mezo:
        plan.notes.append("train.activation_checkpointing is null: planned as off; a run chooses at its start the "
                          "fastest setting predicted to fit (leantune.plan.search.choose_activation_checkpointing)")
    if on_device:
        plan.notes.append("device memory: the per-layer activation terms are the formula traced on the CPU's kernels "
                          "(CUDA's SDPA kernels save differently), not yet checked against a GPU measurement; "
                          "host RSS (runtime, tokenizer, loading) is not in this plan")
        if recipe.quant.embedding_bits and shape.tied:
            plan.notes.append("counts a tied quantized head once: after model.to(device) call "
                              "leantune.quant.retie_quantized_head, else its codes are on the device twice")
    if not on_device and (recipe.quant.bits or recipe.quant.embedding_bits) and plan.peak_phase == "load":
        plan.notes.append("peak is the load: the base is read in full precision and quantized afterwards, "
                          "so quantization lowers the training phases only")
    if packed:
        plan.notes.append(f"data.packing: {batch} packed row(s) of {seq} tokens per micro-batch, with the explicit "
                          "block-diagonal attention mask (B x T x T per layer)")
    elif dpo:
        plan.notes.append(f"dpo: {batch // 2} pair(s) per micro-batch = {batch} sequences of at most {total} tokens, "
                          f"the longer completion {completion} of them (memory.loss_fraction)")
    elif not rl and masked:
        plan.notes.append("micro_batch_size > 1: assumes padded batches (attention mask, B x T x T per layer)")
    if recipe.train.allocator != "system" and not on_device:
        plan.notes.append(f"calibrated on glibc's malloc; with train.allocator={recipe.train.allocator} the leantune "
                          "command runs on a caching malloc, which keeps the step's freed buffers: measured +4% "
                          "(tbbmalloc) and +9% (jemalloc) peak on SmolLM2 LoRA SFT at seq 1024, but on the demo "
                          "recipe's short sequences a training-phase RSS of 1.93 GiB (jemalloc) and 1.74 GiB "
                          "(tbbmalloc) vs 1.02 GiB on glibc; train.allocator=system keeps glibc")
    return plan


def _weights_note(shape: ModelShape, recipe: Recipe, e: int, source_kind: str, on_device: bool = False) -> str:
    q = "; ".join(part for part in (
        f"linears (not lm_head) INT{recipe.quant.bits}" if recipe.quant.bits else "",
        f"embedding/lm_head INT{recipe.quant.embedding_bits}" if recipe.quant.embedding_bits else "") if part)
    if not q:
        return f"{shape.params:,} params x {e} B ({recipe.model.compute_dtype})"
    q += f", g={recipe.quant.group_size}"
    if not on_device and source_kind != "gguf" and shape.file_dtype in (None, recipe.model.compute_dtype) and shape.file_bytes:
        return f"the mapped {shape.file_dtype} file (pages read to quantize stay resident) + {q}"
    return f"{shape.params:,} params; {q}, the rest {recipe.model.compute_dtype}"


def _loss_note(rows: int, chunk: int, shape: ModelShape, e: int, cols: int | None = None, head: int = 0) -> str:
    cols = shape.vocab if cols is None else cols
    width = f"V={shape.vocab}" if cols == shape.vocab else f"S={cols} (vocab subset)"
    copy = " + fp32 lm_head copy" if e != 4 else ""
    if head:
        copy += (" + the subset's lm_head rows" if cols < shape.vocab else " + the dequantized lm_head"
                 if head >= shape.vocab * shape.hidden else " + a block of dequantized lm_head rows")
    return f"chunk {min(chunk, rows)} of {rows} loss rows x {width} x 4 B x 2{copy}"
