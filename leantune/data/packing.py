"""Sequence packing for SFT: several tokenized examples per row of at most ``data.max_length`` tokens.

``data.packing: true`` turns the training examples into rows once, before training:

1. **Plan** (:func:`pack_lengths`): best-fit decreasing over the example lengths -- examples longest
   first (ties: lower index first), each put into the open row with the least room that still fits it,
   else a new row. Deterministic: a function of the lengths and ``max_length`` only. The same strategy
   as TRL's ``pack_dataset(strategy="bfd")``; its fill is within a few percent of optimal on short examples.
2. **Order**: the rows are then what ``batch_at`` draws from, shuffled per epoch by ``(seed, epoch)``
   exactly like unpacked examples, so a resumed run picks the same rows at the same micro-step.
   ``train.micro_batch_size`` counts rows. Examples packed together stay together in every epoch.
3. **Batch** (:func:`collate_packed`): the examples of a row are concatenated; ``position_ids`` restart
   at 0 for each example, and the tail padding of a row is one more sequence of its own (positions
   0, 1, ...). The first token of every example carries no label, so no example is predicted from the
   previous one's last token -- the token set of the loss is exactly the unpacked one's.

No attention across examples: the decoder is called with ``position_ids`` and ``attention_mask=None``.
transformers (5.x, ``masking_utils.find_packed_sequence_indices``) then detects the packed format from the
position ids (a new sequence wherever the position does not grow by one) and builds a block-diagonal
causal mask: an explicit boolean mask for SDPA and eager attention (the CPU path), and the varlen
(``cu_seqlens``) path for flash-attention on GPU. :func:`check_packed_attention` verifies this once per run
on the actual model, because a model whose attention ignores position ids (a recurrent or linear-attention
layer, a custom implementation) would silently leak across examples.

transformers' ``DataCollatorWithFlattening`` is not used: it flattens a whole batch into one row with no
``max_length`` bound and carries only ``input_ids``/``labels``, not the span ids and loss weights.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from leantune.config import SpanWeights
from leantune.data.sft import IGNORE_INDEX, SPAN_PAD, Example, span_weight_table


@dataclass
class PackingStats:
    """What packing made of the training set. ``fill = tokens / (rows * max_length)``: 1.0 is no padding."""

    rows: int
    examples: int
    tokens: int  # real (non-pad) tokens over all rows
    max_length: int
    fill: float
    examples_per_row: float  # mean
    max_examples_per_row: int

    def as_dict(self) -> dict:
        return asdict(self)


def pack_lengths(lengths: Sequence[int], max_length: int) -> tuple[array, array]:
    """Best-fit decreasing bin packing of ``lengths`` into rows of capacity ``max_length``.

    Returns ``(members, offsets)``, two int64 arrays: row ``r`` holds the example indices
    ``members[offsets[r]:offsets[r + 1]]`` in the order they were placed (longest first). Rows are numbered
    in the order they were opened.

    >>> members, offsets = pack_lengths([3, 5, 2, 4, 1], max_length=6)
    >>> [list(members[offsets[r]:offsets[r + 1]]) for r in range(len(offsets) - 1)]
    [[1, 4], [3, 2], [0]]
    """
    if max_length <= 0:
        raise ValueError(f"pack_lengths: max_length must be > 0, got {max_length}")
    too_long = [i for i, n in enumerate(lengths) if not 0 < n <= max_length]
    if too_long:
        i = too_long[0]
        raise ValueError(f"pack_lengths: example {i} has {lengths[i]} tokens; every example needs 1..{max_length}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    # open rows as (room left, row index), kept sorted: bisect finds the tightest row that fits
    room: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(room, (n, -1))
        if k == len(room):
            rows.append([i])
            r, left = len(rows) - 1, max_length - n
        else:
            left, r = room.pop(k)
            rows[r].append(i)
            left -= n
        if left > 0:
            bisect.insort(room, (left, r))
    members, offsets = array("q"), array("q", [0])
    for row in rows:
        members.extend(row)
        offsets.append(len(members))
    return members, offsets


def example_lengths(examples: Sequence[Example]) -> Sequence[int]:
    """Token count per example; streamed examples carry them from their validating pass (no re-tokenization)."""
    lengths = getattr(examples, "lengths", None)
    return lengths if lengths is not None else [len(e.input_ids) for e in examples]


class PackedRows(Sequence):
    """The packed rows of ``examples``: ``rows[r]`` is the list of :class:`Example` in row ``r``.

    Holds the plan (two int64 arrays, 16 bytes per example plus 8 per row), not the examples, so it works
    over streamed examples too. ``stats`` is the :class:`PackingStats`.
    """

    def __init__(self, examples: Sequence[Example], max_length: int):
        lengths = example_lengths(examples)
        self.examples, self.max_length = examples, max_length
        self.members, self.offsets = pack_lengths(lengths, max_length)
        rows = len(self.offsets) - 1
        per_row = [self.offsets[r + 1] - self.offsets[r] for r in range(rows)]
        tokens = sum(lengths)
        self.stats = PackingStats(rows=rows, examples=len(lengths), tokens=tokens, max_length=max_length,
                                  fill=tokens / (rows * max_length), examples_per_row=len(lengths) / rows,
                                  max_examples_per_row=max(per_row))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, r):
        if isinstance(r, slice):
            return [self[j] for j in range(*r.indices(len(self)))]
        n = len(self)
        if not -n <= r < n:
            raise IndexError(f"row {r} out of range ({n} rows)")
        r %= n
        return [self.examples[i] for i in self.members[self.offsets[r] : self.offsets[r + 1]]]


def pack_examples(examples: Sequence[Example], max_length: int) -> PackedRows:
    """Pack ``examples`` (each at most ``max_length`` tokens, as the loader guarantees) into rows."""
    return PackedRows(examples, max_length)


def collate_packed(rows: list[list[Example]], pad_id: int, weights: SpanWeights) -> dict[str, torch.Tensor]:
    """Concatenate each row's examples and right-pad the rows into a batch.

    Returns what :func:`leantune.data.sft.collate` returns, plus ``position_ids``, all (B, T) with T the
    longest row:

    - ``position_ids``: 0, 1, ... restarting at every example; the pad tail of a row counts from 0 again,
      so it is a sequence of its own that no real token attends to.
    - ``labels`` / ``loss_weights``: as unpacked, except that the first token of every example is -100 / 0
      (it would otherwise be the target of the previous example's last position).
    - ``attention_mask``: 1 on real tokens, 0 on pads -- for counting only; the loss passes
      ``attention_mask=None`` with ``position_ids`` so transformers builds the block-diagonal mask.
    """
    if not rows or not all(rows):
        raise ValueError("collate_packed: need at least one row, each with at least one example")
    if pad_id is None:
        raise ValueError("collate_packed: pad_id is None; use tokenizer.pad_token_id (or eos_token_id if it has no pad token)")
    B = len(rows)
    T = max(sum(len(e.input_ids) for e in row) for row in rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    spans = torch.full((B, T), SPAN_PAD, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    first = torch.zeros((B, T), dtype=torch.bool)  # first token of an example
    for b, row in enumerate(rows):
        t = 0
        for e in row:
            n = len(e.input_ids)
            input_ids[b, t : t + n] = torch.tensor(e.input_ids, dtype=torch.long)
            spans[b, t : t + n] = torch.tensor(e.spans, dtype=torch.long)
            position_ids[b, t : t + n] = torch.arange(n)
            first[b, t] = True
            t += n
        position_ids[b, t:] = torch.arange(T - t)
    attention_mask = (spans != SPAN_PAD).long()  # (B, T)
    loss_weights = span_weight_table(weights)[spans.clamp(min=0)] * attention_mask * ~first  # (B, T)
    labels = torch.where(loss_weights > 0, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "labels": labels,
        "loss_weights": loss_weights,
        "spans": spans,
    }


@torch.no_grad()
def check_packed_attention(model, lengths: tuple[int, ...] = (5, 3)) -> float:
    """Check once that ``model``'s decoder keeps packed examples apart; return the largest deviation.

    Runs two short token sequences separately and packed into one row (with ``position_ids``, no mask)
    and compares the hidden states of the second one, relative to their scale. A model whose attention
    does not honour packed position ids (so the second example would see the first) raises ValueError.
    """
    from leantune.adapters.lora import causal_lm

    lm = causal_lm(model)
    decoder = lm.get_decoder()
    # the compute dtype and device (not those of a quantized layer's codes)
    param = next(p for p in model.parameters() if p.is_floating_point())
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, lm.config.vocab_size, (1, n), generator=gen).to(param.device) for n in lengths]
    was_training = model.training
    model.eval()
    try:
        alone = [decoder(input_ids=s, use_cache=False).last_hidden_state.float() for s in seqs]
        ids = torch.cat(seqs, dim=1)
        pos = torch.cat([torch.arange(n) for n in lengths])[None].to(param.device)
        packed = decoder(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False).last_hidden_state.float()
    finally:
        model.train(was_training)
    ref = torch.cat(alone, dim=1)
    err = float((packed - ref).abs().max() / ref.abs().max().clamp(min=1e-6))
    tol = 1e-4 if param.dtype == torch.float32 else 5e-2
    if not err <= tol:
        impl = getattr(lm.config, "_attn_implementation", "?")
        raise ValueError(
            f"data.packing: this model's decoder (attention {impl!r}) does not keep packed examples apart: "
            f"hidden states differ from unpacked ones by {err:.2e} (relative, tolerance {tol:.0e}). "
            "Set data.packing: false, or load the model with attention sdpa, eager or flash_attention_2."
        )
    return err
