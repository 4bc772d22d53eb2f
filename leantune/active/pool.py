"""The pool of unlabelled pairs and the labelling functions of `dpo.active`.

A pool row is a prompt and two responses, no preference yet; any other field travels with the row (a
verifier's ``answer``, a judge's context) and, for ``labeler: column``, the label column:

    {"prompt": "What is 2 + 2?", "responses": ["<think>...</think> 4", "<think>...</think> 5"], "answer": "4",
     "preferred": 0}

``prompt`` is a string (plain text) or a list of messages (rendered with the chat template), as in
`leantune.data.preference`; each response is a string or one assistant message. Every row is checked before
anything is written: a missing field, an empty response, two identical responses, or (labeler: column) a label
that is not 0 or 1 is a `DataError` naming ``file:line`` and the field.

Labelling. A labeller maps a pool index to 0 (response a preferred), 1 (b preferred) or None (a tie: no
preference to learn). It is called only for pairs the selector picked; the label column is held by
`HiddenColumn`, whose only way out is `HiddenColumn.reveal` (counted), so a run cannot read labels it did not
pay for. `label_with_retries` retries a labeller that raises and reports a failure instead of stopping the run.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leantune.config import ActiveConfig, DataConfig
from leantune.data.preference import PairRecord, _completion, _messages
from leantune.data.records import DataError, _short, _type_name, read_rows

POOL_HINT = ('Expected {"prompt": str or [messages], "responses": [response_a, response_b], ...fields}, each '
             "response a string or one assistant message.")

Labeler = Callable[[int], "int | None"]


@dataclass(frozen=True)
class PoolRow:
    """One validated pool row: the prompt, the two response texts, the other fields (label column removed)."""

    prompt: str | list[dict]
    responses: tuple[str, str]
    fields: dict
    source: str

    def as_pair_record(self) -> PairRecord:
        """The row as a PairRecord with response a in the 'chosen' slot (an orientation, not a preference)."""
        return PairRecord(self.prompt, self.responses[0], self.responses[1], self.source)


class HiddenColumn:
    """A label column that is read only through `reveal(i)`, which records each index asked for."""

    def __init__(self, values: Sequence[int], name: str):
        self._values, self.name = values, name
        self.revealed: list[int] = []

    def __len__(self) -> int:
        return len(self._values)

    def reveal(self, i: int) -> int:
        self.revealed.append(i)
        return self._values[i]


def check_pool_row(data: Any, where: str, label_column: str | None) -> tuple[PoolRow, int | None]:
    """(row, its label or None) of one decoded pool row; DataError naming ``where`` and the field."""
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(data)} ({_short(data)}). {POOL_HINT}")
    prompt = data.get("prompt")
    if prompt is None:
        raise DataError(f"{where}: missing field 'prompt'. {POOL_HINT}")
    if not isinstance(prompt, str):
        prompt = _messages(prompt, where, "prompt")
    responses = data.get("responses")
    if not isinstance(responses, list) or len(responses) != 2:
        raise DataError(f"{where}: field 'responses' must be a list of two responses, got {_type_name(responses)} "
                        f"({_short(responses)}). {POOL_HINT}")
    texts = tuple(_completion(r, where, f"responses[{i}]") for i, r in enumerate(responses))
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise DataError(f"{where}: field 'responses[{i}]' is empty; there is nothing to compare. {POOL_HINT}")
    if texts[0] == texts[1]:
        raise DataError(f"{where}: field 'responses[1]' is identical to 'responses[0]'; a tie carries no preference. "
                        "Remove the row.")
    label = None
    if label_column is not None:
        value = data.get(label_column)
        if value not in (0, 1) or isinstance(value, bool):
            raise DataError(f"{where}: field {label_column!r} (dpo.active.label_column) must be 0 (responses[0] "
                            f"preferred) or 1, got {_short(value)}")
        label = int(value)
    fields = {k: v for k, v in data.items() if k not in ("prompt", "responses", label_column)}
    return PoolRow(prompt, texts, fields, where), label


def read_pool(path: str | Path, data: DataConfig, active: ActiveConfig) -> tuple[list[PoolRow], HiddenColumn | None]:
    """Every row of the pool ``path`` (any `data.train` source) and, for labeler: column, the hidden labels."""
    column = active.label_column if active.labeler == "column" else None
    checked = read_rows(path, lambda row, where: check_pool_row(row, where, column), split=data.split_for("train"),
                        columns=data.columns, role="train")
    rows = [r for r, _ in checked]
    if not rows:
        raise DataError(f"{path}: the pool is empty")
    return rows, (HiddenColumn([lab for _, lab in checked], column) if column else None)


# --------------------------------------------------------------------------------------------
# Labellers: pool index -> 0 | 1 | None


def column_labeler(column: HiddenColumn) -> Labeler:
    """The pool's own label column, revealed one pair at a time."""
    return column.reveal


def verifier_labeler(rows: Sequence[PoolRow], reward: Callable) -> Labeler:
    """A reward ``(prompts, completions, **fields) -> [float, float]`` scores both responses of a row with its
    fields (e.g. ``answer``); the higher wins, equal scores are a tie (None).

    >>> from leantune.rl.rewards import exact_match_reward
    >>> rows = [PoolRow("2+2?", ("<think>.</think> 5", "<think>.</think> 4"), {"answer": "4"}, "x:1")]
    >>> verifier_labeler(rows, exact_match_reward)(0)
    1
    """
    def label(i: int) -> int | None:
        row = rows[i]
        a, b = reward([row.prompt, row.prompt], list(row.responses), **row.fields)
        return None if a == b else (0 if a > b else 1)

    return label


def judge_labeler(rows: Sequence[PoolRow], judge: Callable) -> Labeler:
    """Your judge, ``fn(prompt, response_a, response_b, **fields) -> 0 | 1 | None``."""
    def label(i: int) -> int | None:
        row = rows[i]
        out = judge(row.prompt, row.responses[0], row.responses[1], **row.fields)
        if out not in (0, 1, None) or isinstance(out, bool):
            raise ValueError(f"{row.source}: the judge returned {out!r}; it must return 0 (a wins), 1 (b wins) or None (tie)")
        return out

    return label


def import_judge(spec: str) -> Callable:
    """The callable named by ``package.module:function`` (your code on the Python path; nothing is fetched)."""
    module, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise DataError(f"dpo.active.labeler: cannot import {spec!r}: {err}") from None
    if not callable(fn):
        raise DataError(f"dpo.active.labeler: {spec!r} is not callable")
    return fn


def build_labeler(active: ActiveConfig, rows: Sequence[PoolRow], column: HiddenColumn | None) -> Labeler:
    """The labeller `dpo.active.labeler` names."""
    if active.labeler == "column":
        return column_labeler(column)
    if active.labeler == "verifier":
        from leantune.rl.rewards import REWARDS

        return verifier_labeler(rows, REWARDS[active.verifier].verifier)
    return judge_labeler(rows, import_judge(active.labeler))


@dataclass
class LabelOutcome:
    """What one labelling call gave: a label (0, 1), a tie, or a failure after every retry (``error``)."""

    label: int | None
    failed: bool = False
    error: str = ""
    tries: int = 1


def label_with_retries(labeler: Labeler, i: int, retries: int) -> LabelOutcome:
    """``labeler(i)``, retried up to ``retries`` more times if it raises; a failure is returned, not raised."""
    err = ""
    for attempt in range(retries + 1):
        try:
            return LabelOutcome(labeler(i), tries=attempt + 1)
        except Exception as e:  # a judge or verifier we do not control: counted and skipped, never fatal
            err = f"{type(e).__name__}: {e}"
    return LabelOutcome(None, failed=True, error=err, tries=retries + 1)


@dataclass
class LabelLedger:
    """The labelling costs of a run (checkpointed; the ledger's ``totals.labels``)."""

    budget: int = 0
    spent: int = 0  # calls that returned (a label or a tie)
    ties: int = 0
    failures: int = 0  # pairs skipped after every retry (no label spent)
    calls: int = 0  # every call, retries included
    rounds: int = 0
    labelled: list[int] = field(default_factory=list)  # pool indices with a preference, in label order
    winners: list[int] = field(default_factory=list)  # 0 / 1 per labelled index
    excluded: list[int] = field(default_factory=list)  # ties and failures: never offered again
    last_errors: list[str] = field(default_factory=list)  # up to 5 recent failure messages

    def record(self, i: int, out: LabelOutcome) -> None:
        self.calls += out.tries
        if out.failed:
            self.failures += 1
            self.excluded.append(i)
            self.last_errors = (self.last_errors + [out.error])[-5:]
            return
        self.spent += 1
        if out.label is None:
            self.ties += 1
            self.excluded.append(i)
        else:
            self.labelled.append(i)
            self.winners.append(out.label)

    def summary(self) -> dict:
        return {"budget": self.budget, "spent": self.spent, "preferences": len(self.labelled), "ties": self.ties,
                "failures": self.failures, "calls": self.calls, "rounds": self.rounds,
                **({"last_errors": self.last_errors} if self.last_errors else {})}


# --------------------------------------------------------------------------------------------
# A pool generator: right vs wrong final answers in a random order (the recipe, the benchmark, tests)


def answer_pool(problems: list[dict], seed: int = 0) -> list[dict]:
    """Pool rows from verifiable problems ({prompt, completion, answer}, e.g. a task's ``generate``): the worked
    solution and the same text with its final answer off by +-1..9 (`answer_pairs`), in a seeded random order;
    ``answer`` is kept for a verifier and ``preferred`` (the right one's index) for ``labeler: column``.

    >>> row = answer_pool([{"prompt": "What is 2 + 2?", "completion": "<think>2 + 2 = 4</think> 4", "answer": "4"}])[0]
    >>> row["responses"][row["preferred"]]
    '<think>2 + 2 = 4</think> 4'
    """
    from leantune.data.preference import answer_pairs

    rng = random.Random(f"leantune-pool:{seed}")
    rows = []
    for p, pair in zip(problems, answer_pairs(problems, seed=seed)):
        right, wrong = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        first = rng.randint(0, 1)
        responses = [right, wrong] if first == 0 else [wrong, right]
        rows.append({"prompt": pair["prompt"], "responses": responses, "answer": p["answer"], "preferred": first})
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m leantune.active.pool TASK --out DIR``: DIR/pool.jsonl (unlabelled pairs, with ``answer`` and
    ``preferred``) and DIR/eval.jsonl (held-out chosen/rejected pairs from the task's test split)."""
    import argparse
    import json

    from leantune.data.preference import answer_pairs
    from leantune.tasks import get_task

    ap = argparse.ArgumentParser(prog="python -m leantune.active.pool", description=main.__doc__)
    ap.add_argument("task")
    ap.add_argument("--out", required=True)
    ap.add_argument("--pool", type=int, default=256, help="pool pairs")
    ap.add_argument("--eval", type=int, default=64, help="held-out pairs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    task = get_task(args.task)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool = answer_pool(task.generate(args.pool, seed=args.seed, split="train"), seed=args.seed)
    held = answer_pairs(task.generate(args.eval, seed=args.seed + 1, split="test"), seed=args.seed + 1)
    for name, rows in (("pool.jsonl", pool), ("eval.jsonl", held)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(out / name, len(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
