"""SFT examples: records -> token ids with a span id per token -> padded, weighted batches.

Each example is ``prompt ids + completion ids + [eos]`` with one span id per token:

- ``SPAN_PROMPT`` (0): the prompt, tokenized with ``add_special_tokens=True`` (so a BOS is added if the
  tokenizer adds one). A chat-template prompt is tokenized with ``add_special_tokens=False`` because the
  template already writes its special tokens.
- ``SPAN_THINK`` (1): the completion up to and including ``data.think_end`` -- any text before
  ``data.think_start`` plus the whole ``<think>...</think>`` block, markers included. A completion with
  ``think_end`` but no ``think_start`` (templates that open ``<think>`` in the generation prompt) is
  thinking up to ``think_end``. A ``think_start`` with no ``think_end`` after it is an error.
- ``SPAN_ANSWER`` (2): the completion after ``think_end`` (all of it when there are no markers), plus
  the eos token. Only the first think block is special; a later one is part of the answer.

The prompt, thinking and answer pieces are tokenized separately, so span boundaries are exact token
boundaries (joint tokenization of the same text could merge characters across a boundary).

Messages records: the prompt is the conversation before the *last* assistant message, rendered with
the tokenizer's chat template and ``add_generation_prompt=True``; the completion is that message's
content. Earlier assistant turns are context only (never trained on). Without a chat template the
documented fallback renders each message as ``"{role}: {content}\\n"`` followed by ``"assistant: "``:

>>> fallback_chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}])
'system: Be brief.\\nuser: 2+2?\\nassistant: '

Overlong examples (``> data.max_length`` tokens): ``truncate`` keeps the first ``max_length`` tokens
(which cuts the eos), ``drop`` removes them; a truncated example with no completion token left is
dropped too. Batches are right-padded; pad positions have span ``-1``.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from leantune.config import DataConfig, DedupConfig, SpanWeights
from leantune.data.dedup import DedupReport, Deduplicator, dedup_texts, record_text
from leantune.data.index import DiskInts, SeededPermutation
from leantune.data.records import DataError, Record, read_records

SPAN_PROMPT, SPAN_THINK, SPAN_ANSWER = 0, 1, 2
SPAN_PAD = -1
IGNORE_INDEX = -100


@dataclass
class Example:
    """One tokenized example: ``input_ids`` and ``spans`` have the same length; ``source`` is file:line."""

    input_ids: list[int]
    spans: list[int]
    source: str


@dataclass
class DataStats:
    """Counts over one loaded file. Token counts are over the kept examples, after truncation.
    ``records == examples + dropped + dedup_exact + dedup_near``."""

    records: int = 0
    examples: int = 0
    truncated: int = 0  # kept, but cut to max_length
    dropped: int = 0  # too long under "drop", or no completion token left after truncation
    tokens: int = 0
    prompt_tokens: int = 0
    think_tokens: int = 0
    answer_tokens: int = 0
    dedup_exact: int = 0  # removed by data.dedup as exact duplicates of an earlier row (before tokenization)
    dedup_near: int = 0  # removed by data.dedup as near-duplicates (MinHash Jaccard >= data.dedup.near)
    dedup_clusters: int = 0  # kept rows that had duplicates removed

    def trainable_tokens(self, weights: SpanWeights) -> int:
        """Tokens whose span weight is > 0, i.e. ``labels != -100`` in :func:`collate` (before the shift).

        After the trainer's one-token shift, position 0 of each example is never a target; that only
        matters when the first token's span has weight > 0 (prompt weight > 0, or an empty prompt).
        """
        counts = (self.prompt_tokens, self.think_tokens, self.answer_tokens)
        return sum(n for n, w in zip(counts, (weights.prompt, weights.think, weights.answer)) if w > 0)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Record -> (prompt text, thinking text, answer text)


def split_completion(text: str, think_start: str, think_end: str) -> tuple[str, str]:
    """Split a completion into (thinking part, answer part); see the module docstring for the rule.

    >>> split_completion("Hmm. <think>2+2=4</think> It is 4.", "<think>", "</think>")
    ('Hmm. <think>2+2=4</think>', ' It is 4.')
    >>> split_completion("It is 4.", "<think>", "</think>")
    ('', 'It is 4.')
    >>> split_completion("<think>2+2", "<think>", "</think>")
    Traceback (most recent call last):
    ...
    ValueError: '<think>' at character 0 is never closed by '</think>'
    """
    start = text.find(think_start)
    end = text.find(think_end, start + len(think_start) if start >= 0 else 0)
    if start >= 0 and end < 0:
        raise ValueError(f"{think_start!r} at character {start} is never closed by {think_end!r}")
    if end < 0:
        return "", text
    cut = end + len(think_end)
    return text[:cut], text[cut:]


def fallback_chat_prompt(messages: list[dict]) -> str:
    """The generation prompt for a tokenizer without a chat template: ``"{role}: {content}\\n"`` per message,
    then ``"assistant: "``."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def render_prompt(tokenizer, prompt: str) -> tuple[str, bool]:
    """(text the model sees before its answer, add_special_tokens) for a single user turn.

    Rendered exactly as a ``messages`` training record's prompt: a chat template already writes its special
    tokens; without one, the documented fallback.
    """
    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), False
    return fallback_chat_prompt(messages), True


def _prompt_and_completion(record: Record, tokenizer) -> tuple[str, bool, str, str]:
    """(prompt text, add_special_tokens for the prompt, completion text, completion field name)."""
    if record.kind == "prompt_completion":
        return record.data["prompt"], True, record.data["completion"], "completion"
    messages = record.data["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    context, field = messages[:last], f"messages[{last}].content"
    if not getattr(tokenizer, "chat_template", None):
        return fallback_chat_prompt(context), True, messages[last]["content"], field
    try:
        prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # jinja errors: templates raise on roles/orders they do not support
        raise DataError(
            f"{record.source}: the tokenizer's chat template failed on field 'messages' ({type(err).__name__}: {err}). "
            "Fix the conversation (roles, order) or use prompt/completion records."
        ) from None
    return prompt, False, messages[last]["content"], field


def _encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


SFT_FIELDS = ("prompt", "completion", "messages")


def check_sft_columns(columns: dict[str, str], where: str) -> None:
    """DataError for a ``data.columns`` target that is not an SFT field (RL prompt rows accept any)."""
    unknown = [t for t in columns if t not in SFT_FIELDS]
    if unknown:
        raise DataError(
            f"{where}: data.columns maps unknown field(s) {', '.join(map(repr, unknown))}; SFT fields are "
            f"{', '.join(SFT_FIELDS)} (RL prompt rows also take reward fields such as answer)."
        )


def _tokenize_records(records: list[Record], tokenizer, cfg: DataConfig, eos: int) -> list[tuple[list[int], list[int], bool] | None]:
    """Per record ``(input_ids, spans, truncated)``, or None when it is dropped as overlong.

    The one tokenization path of both loaders: eager calls it on every record at once, streaming on
    chunks in its validating pass and on one record per access, so both give the same examples.
    """
    prompts, prompt_special, thinks, answers = [], [], [], []
    for rec in records:
        prompt, special, completion, field = _prompt_and_completion(rec, tokenizer)
        if not completion.strip():
            raise DataError(
                f"{rec.source}: field {field!r} is empty, so the example has nothing to learn. "
                "Fill it in or remove the record."
            )
        try:
            think, answer = split_completion(completion, cfg.think_start, cfg.think_end)
        except ValueError as err:
            raise DataError(
                f"{rec.source}: field {field!r}: {err}. Close the thinking block, or change data.think_start / data.think_end."
            ) from None
        prompts.append(prompt)
        prompt_special.append(special)
        thinks.append(think)
        answers.append(answer)

    # Batched tokenization (one call per piece kind) is much faster than one call per record.
    prompt_ids: list[list[int]] = [[] for _ in records]
    for special in (True, False):
        idx = [i for i, s in enumerate(prompt_special) if s == special]
        for i, ids in zip(idx, _encode(tokenizer, [prompts[i] for i in idx], special)):
            prompt_ids[i] = ids
    think_ids = _encode(tokenizer, thinks, False)
    answer_ids = _encode(tokenizer, answers, False)

    out: list[tuple[list[int], list[int], bool] | None] = []
    for p, t, a in zip(prompt_ids, think_ids, answer_ids):
        ids = p + t + a + [eos]
        spans = [SPAN_PROMPT] * len(p) + [SPAN_THINK] * len(t) + [SPAN_ANSWER] * (len(a) + 1)
        if len(ids) <= cfg.max_length:
            out.append((ids, spans, False))
        elif cfg.overlong == "drop" or len(p) >= cfg.max_length:
            out.append(None)
        else:
            out.append((ids[: cfg.max_length], spans[: cfg.max_length], True))
    return out


def _count(stats: DataStats, tokenized: tuple[list[int], list[int], bool] | None) -> None:
    stats.records += 1
    if tokenized is None:
        stats.dropped += 1
        return
    ids, spans, truncated = tokenized
    stats.examples += 1
    stats.truncated += truncated
    stats.tokens += len(ids)
    stats.prompt_tokens += spans.count(SPAN_PROMPT)
    stats.think_tokens += spans.count(SPAN_THINK)
    stats.answer_tokens += spans.count(SPAN_ANSWER)


def _eos(path, tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"{path}: the tokenizer has no eos token; every example ends with one. Set tokenizer.eos_token.")
    return eos


def _all_dropped(path, stats: DataStats, cfg: DataConfig) -> DataError:
    return DataError(
        f"{path}: all {stats.records} examples are longer than data.max_length={cfg.max_length} tokens and were dropped "
        f"(data.overlong={cfg.overlong!r}). Raise data.max_length or shorten the prompts."
    )


def dedup_records(records: list[Record], cfg: DedupConfig) -> tuple[list[Record], DedupReport]:
    """``records`` without the exact and near duplicates ``cfg`` (``data.dedup``) finds, first kept
    (:mod:`leantune.data.dedup`), and the report of what was removed."""
    report = dedup_texts([record_text(r.data, r.source) for r in records], [r.source for r in records], cfg)
    return [records[i] for i in report.kept], report


def _count_dedup(stats: DataStats, report: DedupReport) -> None:
    stats.records += report.exact_removed + report.near_removed
    stats.dedup_exact += report.exact_removed
    stats.dedup_near += report.near_removed
    stats.dedup_clusters += len(report.clusters)


def load_sft_examples(path: str | Path, tokenizer, cfg: DataConfig,
                      role: Literal["train", "eval"] = "train") -> tuple[Sequence[Example], DataStats]:
    """Read ``path`` (any source of :mod:`leantune.data.sources`) and tokenize every record into an :class:`Example`.

    ``role`` says whether ``path`` is data.train or data.eval: it picks ``cfg.split`` or ``cfg.eval_split``
    and the default split rule. ``cfg.columns`` renames dataset columns first. With ``cfg.dedup`` (training
    data only) exact and near duplicates are removed before tokenization, first occurrence kept, and counted
    in the stats (``dedup_exact``, ``dedup_near``, ``dedup_clusters``). With ``cfg.streaming`` the
    examples are a :class:`StreamedExamples` (same items, tokenized on access) after one validating pass
    that computes the same :class:`DataStats`; otherwise a list.

    Raises :class:`~leantune.data.records.DataError` (with file:line or source:row, and field) for bad
    records, empty completions, an unclosed think block, or when every example is dropped as too long.
    """
    eos = _eos(path, tokenizer)
    check_sft_columns(cfg.columns, str(path))
    if cfg.streaming:
        return _load_streamed(path, tokenizer, cfg, role, eos)
    records = read_records(path, cfg.format, split=cfg.split_for(role), columns=cfg.columns, role=role)
    stats = DataStats()
    if cfg.dedup is not None and role == "train":
        records, report = dedup_records(records, cfg.dedup)
        _count_dedup(stats, report)
    examples = []
    for rec, tokenized in zip(records, _tokenize_records(records, tokenizer, cfg, eos)):
        _count(stats, tokenized)
        if tokenized is not None:
            examples.append(Example(input_ids=tokenized[0], spans=tokenized[1], source=rec.source))
    if not examples:
        raise _all_dropped(path, stats, cfg)
    return examples, stats


# --------------------------------------------------------------------------------------------
# Streaming


class StreamedExamples(Sequence):
    """The kept examples of a row table, tokenized on access (``len()``, ``[i]``, slices, iteration).

    Holds the table (a file read by offset, or memory-mapped Arrow), the row key of each kept example
    (8 bytes each, on disk: :class:`DiskInts`), with ``data.packing`` its token count (``lengths``, 4 bytes
    each in memory: what packing plans with, next to the plan's own arrays) and an LRU of the last
    ``cache_size`` examples -- not the data. ``[i]`` equals the eager loader's ``examples[i]``.
    """

    def __init__(self, rows, keys: Sequence[int], check, tokenizer, cfg: DataConfig, eos: int, cache_size: int = 256,
                 lengths: array | None = None):
        self.rows, self.keys, self.check, self.lengths = rows, keys, check, lengths
        self.tokenizer, self.cfg, self.eos = tokenizer, cfg, eos
        self.cache_size = cache_size
        self._cache: OrderedDict[int, Example] = OrderedDict()

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"example {i} out of range ({n} examples)")
        i %= n
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        data, where = self.rows.fetch(self.keys[i])
        record = self.check(data, where)
        tokenized = _tokenize_records([record], self.tokenizer, self.cfg, self.eos)[0]
        if tokenized is None:  # the validating pass kept it: the data changed under us
            raise DataError(f"{where}: this example was kept when the data was validated but is dropped now; the data changed. Restart the run.")
        example = Example(input_ids=tokenized[0], spans=tokenized[1], source=record.source)
        self._cache[i] = example
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return example


def _load_streamed(path, tokenizer, cfg: DataConfig, role, eos: int, chunk: int = 128):
    """One pass over the rows in chunks: validate, tokenize, count, keep only the row keys of kept examples."""
    from leantune.data.records import check_record
    from leantune.data.sources import mapped_check, open_rows

    rows = open_rows(path, cfg.split_for(role), role, cfg.columns)
    check = mapped_check(lambda data, where: check_record(data, where, cfg.format), cfg.columns)
    # Without packing nothing here grows with the data; packing's plan needs every length (4 bytes each).
    stats, keys, lengths = DataStats(), DiskInts(), array("I") if cfg.packing else None
    dedup = Deduplicator(cfg.dedup) if cfg.dedup is not None and role == "train" else None

    def flush(batch: list[tuple[int, Record]]) -> None:
        for (key, _), tokenized in zip(batch, _tokenize_records([r for _, r in batch], tokenizer, cfg, eos)):
            _count(stats, tokenized)
            if tokenized is not None:
                keys.append(key)
                if lengths is not None:
                    lengths.append(len(tokenized[0]))
        batch.clear()

    batch: list[tuple[int, Record]] = []
    for key, data, where in rows.scan():
        record = check(data, where)
        if dedup is not None and not dedup.add(record_text(record.data, where), where):
            continue
        batch.append((key, record))
        if len(batch) == chunk:
            flush(batch)
    flush(batch)
    keys.flush()
    if dedup is not None:
        _count_dedup(stats, dedup.report())
    if stats.records == 0:
        raise DataError(f"{path}: no records (the file is empty or has only blank lines). Add at least one record.")
    if not keys:
        raise _all_dropped(path, stats, cfg)
    return StreamedExamples(rows, keys, check, tokenizer, cfg, eos, lengths=lengths), stats


# --------------------------------------------------------------------------------------------
# Batches


def span_weight_table(weights: SpanWeights) -> torch.Tensor:
    """Loss weight indexed by span id: ``table[SPAN_PROMPT] == weights.prompt`` etc. (3,) float32."""
    return torch.tensor([weights.prompt, weights.think, weights.answer], dtype=torch.float32)


def collate(examples: list[Example], pad_id: int, weights: SpanWeights) -> dict[str, torch.Tensor]:
    """Right-pad ``examples`` into a batch.

    Returns ``input_ids``, ``attention_mask``, ``labels``, ``spans`` as (B, T) long and ``loss_weights``
    as (B, T) float32. ``labels`` equals ``input_ids`` where the span weight is > 0 and -100 elsewhere
    (pads, weight-0 spans); it is aligned with ``input_ids``, not shifted -- the trainer shifts.
    ``loss_weights`` is the span weight per token (0 on pads); ``spans`` is -1 on pads.
    """
    if not examples:
        raise ValueError("collate: no examples")
    if pad_id is None:
        raise ValueError("collate: pad_id is None; use tokenizer.pad_token_id (or eos_token_id if it has no pad token)")
    B, T = len(examples), max(len(e.input_ids) for e in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    spans = torch.full((B, T), SPAN_PAD, dtype=torch.long)
    for b, e in enumerate(examples):
        input_ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
        spans[b, : len(e.spans)] = torch.tensor(e.spans, dtype=torch.long)
    attention_mask = (spans != SPAN_PAD).long()  # (B, T)
    loss_weights = span_weight_table(weights)[spans.clamp(min=0)] * attention_mask  # (B, T)
    labels = torch.where(loss_weights > 0, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "loss_weights": loss_weights,
        "spans": spans,
    }


def epoch_order(n_examples: int, seed: int, epoch: int, shuffle: bool) -> Sequence[int]:
    """The example indices of ``epoch`` in order: a permutation seeded by (seed, epoch), or 0..n-1.

    The shuffle is a :class:`SeededPermutation`, computed one index at a time, so a batch costs the same
    and holds no per-example memory whether the dataset has a thousand examples or a billion, and eager
    and streamed examples see the same order.

    >>> list(epoch_order(5, seed=0, epoch=0, shuffle=False))
    [0, 1, 2, 3, 4]
    >>> sorted(epoch_order(5, seed=0, epoch=1, shuffle=True))
    [0, 1, 2, 3, 4]
    """
    if not shuffle:
        return range(n_examples)
    return SeededPermutation(n_examples, f"leantune-data:{seed}:{epoch}")


def micro_batches_per_epoch(n_examples: int, micro_batch_size: int) -> int:
    """ceil(n_examples / micro_batch_size): the last micro-batch of an epoch may be short."""
    return -(-n_examples // micro_batch_size)


def batch_at(examples: list, micro_step: int, micro_batch_size: int, seed: int, shuffle: bool) -> list:
    """The examples of global micro-batch ``micro_step`` (0-based, counted across epochs).

    Epoch ``e`` covers micro-steps ``[e * k, (e + 1) * k)`` with ``k = micro_batches_per_epoch(...)`` and
    visits every example exactly once; its last micro-batch is short when ``micro_batch_size`` does not
    divide the number of examples (no wrap-around, nothing dropped). The result depends only on the
    arguments, so a resumed run continues from its saved micro-step count.

    >>> batch_at(list("abcde"), 2, micro_batch_size=2, seed=0, shuffle=False)
    ['e']
    >>> batch_at(list("abcde"), 3, micro_batch_size=2, seed=0, shuffle=False)
    ['a', 'b']
    """
    if not examples:
        raise ValueError("batch_at: no examples")
    if micro_batch_size <= 0 or micro_step < 0:
        raise ValueError(f"batch_at: need micro_batch_size > 0 and micro_step >= 0, got {micro_batch_size}, {micro_step}")
    per_epoch = micro_batches_per_epoch(len(examples), micro_batch_size)
    epoch, b = divmod(micro_step, per_epoch)
    order = epoch_order(len(examples), seed, epoch, shuffle)
    return [examples[order[i]] for i in range(b * micro_batch_size, min((b + 1) * micro_batch_size, len(examples)))]
