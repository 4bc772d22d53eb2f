"""Preference pairs: rows with a prompt, a chosen and a rejected completion -> token ids.

Three row shapes are accepted (TRL's preference formats; extra keys such as ``id`` are ignored):

- standard: ``{"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}``; the prompt is tokenized as plain text
  with the tokenizer's special tokens (as an SFT prompt/completion record), no chat template;
- conversational, explicit prompt: ``{"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role":
  "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}``; the prompt is rendered
  with the chat template (generation prompt added; the documented fallback without a template, as SFT);
  chosen / rejected are one assistant message each (or a plain string);
- conversational, implicit prompt: ``{"chosen": [...conversation...], "rejected": [...conversation...]}``: two
  conversations that differ only in their last, assistant, message; the turns before it are the prompt.

Each completion is tokenized on its own (the prompt/completion boundary is an exact token boundary) and ends
with the eos token, as in SFT. Both completions of a pair share the prompt's tokens, which the trainer
prefills once.

Rules, checked in one pass before training starts; a bad row is a :class:`DataError` naming ``file:line`` (or
``source:row N``) and the field:

- a missing or non-string field, an empty completion (nothing to learn), a chosen completion identical to the
  rejected one (no preference to learn), an implicit-prompt pair whose conversations differ before the last
  message;
- overlong pairs (prompt + the longer completion > ``data.max_length`` tokens): ``data.overlong: truncate`` cuts
  each completion to fit (its eos may go), ``drop`` drops the pair. A pair is also dropped, and counted, when
  its prompt alone leaves no room for a completion token, or when truncation leaves chosen and rejected
  identical. Every pair dropped is an error (it names the setting to change).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from leantune.config import DataConfig
from leantune.data.records import DataError, _require_string, _short, _type_name, read_rows
from leantune.data.sft import fallback_chat_prompt

PAIR_FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PairRecord:
    """A validated row: the prompt as text (rendered later) or messages, and the two completion texts."""

    prompt: str | list[dict]
    chosen: str
    rejected: str
    source: str  # file:line or source:row N


@dataclass(frozen=True)
class Pair:
    """One tokenized pair; ``chosen_ids`` / ``rejected_ids`` are completion tokens (eos included unless cut)."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    source: str


@dataclass
class PairStats:
    """Counts over one loaded file; token counts over the kept pairs, after truncation."""

    records: int = 0
    pairs: int = 0
    truncated: int = 0  # kept, with a completion cut to fit data.max_length
    dropped_overlong: int = 0  # data.overlong: drop, or no room for a completion token after the prompt
    dropped_tied_after_truncation: int = 0  # truncation made chosen == rejected
    prompt_tokens: int = 0
    chosen_tokens: int = 0
    rejected_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Rows


_HINT = ('Expected {"prompt": str, "chosen": str, "rejected": str}, or conversations: {"prompt": [messages], '
         '"chosen": [assistant message], "rejected": [assistant message]} or {"chosen": [messages], "rejected": [messages]}.')


def _messages(value: Any, where: str, field: str) -> list[dict]:
    """``value`` as a list of {role, content} string dicts, or DataError naming ``field``."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {field!r} must be a string or a non-empty list of {{role, content}} "
                        f"messages, got {_type_name(value)} ({_short(value)}). {_HINT}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field '{field}[{i}]' must be an object with string 'role' and 'content', "
                            f"got {_short(m)}. {_HINT}")
    return value


def _completion(value: Any, where: str, field: str) -> str:
    """A completion: a string, or a list whose single message is the assistant's."""
    if isinstance(value, str):
        return value
    msgs = _messages(value, where, field)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in msgs)
        raise DataError(f"{where}: field {field!r} must be one assistant message when 'prompt' is given (roles: "
                        f"{roles}); put earlier turns in 'prompt'.")
    return msgs[0]["content"]


def check_pair_row(data: Any, where: str) -> PairRecord:
    """Validate one decoded row (see the module docstring); raises :class:`DataError`."""
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(data)} ({_short(data)}). {_HINT}")
    for key in ("chosen", "rejected"):
        if data.get(key) is None:
            have = ", ".join(sorted(k for k, v in data.items() if v is not None)) or "no fields"
            raise DataError(f"{where}: missing field {key!r} (record has: {have}). {_HINT}")
    prompt = data.get("prompt")
    if prompt is None:  # implicit prompt: two conversations sharing all but their last message
        chosen = _messages(data["chosen"], where, "chosen")
        rejected = _messages(data["rejected"], where, "rejected")
        for field, msgs in (("chosen", chosen), ("rejected", rejected)):
            if msgs[-1]["role"] != "assistant":
                raise DataError(f"{where}: field '{field}[{len(msgs) - 1}]' has role {msgs[-1]['role']!r}; an "
                                "implicit-prompt pair ends with the assistant turn being compared. " + _HINT)
        if chosen[:-1] != rejected[:-1]:
            raise DataError(f"{where}: fields 'chosen' and 'rejected' differ before their last message; an implicit "
                            "prompt is the turns they share. Give 'prompt' explicitly or fix the conversations.")
        record = PairRecord(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], where)
    elif isinstance(prompt, str):
        for key in ("chosen", "rejected"):
            _require_string(data, key, where, _HINT)
        record = PairRecord(prompt, data["chosen"], data["rejected"], where)
    else:
        record = PairRecord(_messages(prompt, where, "prompt"), _completion(data["chosen"], where, "chosen"),
                            _completion(data["rejected"], where, "rejected"), where)
    for key in ("chosen", "rejected"):
        if not getattr(record, key).strip():
            raise DataError(f"{where}: field {key!r} is empty, so the pair has nothing to compare. Fill it in or "
                            "remove the row.")
    if record.chosen == record.rejected:
        raise DataError(f"{where}: field 'rejected' is identical to 'chosen'; a tie carries no preference (its "
                        "loss has no gradient). Remove the row.")
    return record


def read_pair_rows(path: str | Path, cfg: DataConfig, role: Literal["train", "eval"] = "train") -> list[PairRecord]:
    """Every row of ``path`` (any source of :mod:`leantune.data.sources`; ``data.columns`` and ``data.split`` apply)."""
    unknown = [t for t in cfg.columns if t not in PAIR_FIELDS]
    if unknown:
        raise DataError(f"{path}: data.columns maps unknown field(s) {', '.join(map(repr, unknown))}; preference "
                        f"fields are {', '.join(PAIR_FIELDS)}.")
    return read_rows(path, check_pair_row, split=cfg.split_for(role), columns=cfg.columns, role=role)


# --------------------------------------------------------------------------------------------
# Tokens


def _render_prompt(record: PairRecord, tokenizer) -> tuple[str, bool]:
    """(prompt text, add_special_tokens): plain text as is; messages through the chat template (or fallback)."""
    if isinstance(record.prompt, str):
        return record.prompt, True
    if not getattr(tokenizer, "chat_template", None):
        return fallback_chat_prompt(record.prompt), True
    try:
        return tokenizer.apply_chat_template(record.prompt, tokenize=False, add_generation_prompt=True), False
    except Exception as err:  # jinja errors: templates raise on roles/orders they do not support
        raise DataError(f"{record.source}: the tokenizer's chat template failed on field 'prompt' "
                        f"({type(err).__name__}: {err}). Fix the conversation (roles, order).") from None


def tokenize_pairs(records: list[PairRecord], tokenizer, cfg: DataConfig) -> tuple[list[Pair], PairStats]:
    """Token ids of every kept pair and the counts (rules in the module docstring)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token; every completion ends with one. Set tokenizer.eos_token.")
    stats = PairStats(records=len(records))
    rendered = [_render_prompt(r, tokenizer) for r in records]
    prompt_ids: list[list[int]] = [[] for _ in records]
    for special in (True, False):  # batched: one tokenizer call per kind
        idx = [i for i, (_, s) in enumerate(rendered) if s == special]
        if idx:
            for i, ids in zip(idx, tokenizer([rendered[i][0] for i in idx], add_special_tokens=special)["input_ids"]):
                prompt_ids[i] = ids
    chosen_ids = tokenizer([r.chosen for r in records], add_special_tokens=False)["input_ids"]
    rejected_ids = tokenizer([r.rejected for r in records], add_special_tokens=False)["input_ids"]
    pairs = []
    for rec, p, c, r in zip(records, prompt_ids, chosen_ids, rejected_ids):
        c, r = [*c, eos], [*r, eos]
        room = cfg.max_length - len(p)
        if max(len(c), len(r)) > room:
            if cfg.overlong == "drop" or room < 1:
                stats.dropped_overlong += 1
                continue
            c, r = c[:room], r[:room]
            if c == r:
                stats.dropped_tied_after_truncation += 1
                continue
            stats.truncated += 1
        pairs.append(Pair(tuple(p), tuple(c), tuple(r), rec.source))
        stats.prompt_tokens += len(p)
        stats.chosen_tokens += len(c)
        stats.rejected_tokens += len(r)
    stats.pairs = len(pairs)
    return pairs, stats


def load_pairs(path: str | Path, tokenizer, cfg: DataConfig,
               role: Literal["train", "eval"] = "train") -> tuple[list[Pair], PairStats]:
    """Read and tokenize every pair of ``path``; DataError for a bad row or when every pair is dropped."""
    pairs, stats = tokenize_pairs(read_pair_rows(path, cfg, role), tokenizer, cfg)
    if not pairs:
        raise DataError(f"{path}: all {stats.records} pairs were dropped ({stats.dropped_overlong} longer than "
                        f"data.max_length={cfg.max_length} tokens under data.overlong={cfg.overlong!r}, "
                        f"{stats.dropped_tied_after_truncation} identical after truncation). Raise data.max_length.")
    return pairs, stats


# --------------------------------------------------------------------------------------------
# A small generator: right vs wrong answers (tests, the shipped recipe)


def answer_pairs(problems: list[dict], seed: int = 0) -> list[dict]:
    """Conversational preference rows from verifiable problems ({prompt, completion, answer}, e.g. a task's
    ``generate``): chosen = the worked solution, rejected = the same text with its final answer off by a seeded
    non-zero amount (+-1..9), so the pair differs only where the answer is right or wrong.

    >>> rows = answer_pairs([{"prompt": "What is 2 + 2?", "completion": "<think>2 + 2 = 4</think> 4", "answer": "4"}])
    >>> rows[0]["chosen"][0]["content"], rows[0]["rejected"][0]["content"] != rows[0]["chosen"][0]["content"]
    ('<think>2 + 2 = 4</think> 4', True)
    """
    import random

    rng = random.Random(f"leantune-pairs:{seed}")
    rows = []
    for p in problems:
        wrong = int(p["answer"]) + rng.choice([-1, 1]) * rng.randint(1, 9)
        head, sep, _ = p["completion"].rpartition(p["answer"])
        rejected = f"{head}{wrong}" if sep else f"{p['completion']} {wrong}"
        rows.append({"prompt": [{"role": "user", "content": p["prompt"]}],
                     "chosen": [{"role": "assistant", "content": p["completion"]}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows
