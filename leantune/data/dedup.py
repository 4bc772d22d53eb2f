"""Exact and near-duplicate removal of training rows, keeping the first occurrence.

Why: repeated training examples are memorized far more than unique ones (Carlini et al., arXiv 2202.07646;
Lee et al., arXiv 2107.06499, who also show near-duplicates -- MinHash, Jaccard >= 0.8 over word 5-grams --
dominate web corpora). Memorization Sinks (arXiv 2507.09937) isolates what repetition teaches; removing
the repetition in the first place is the cheap baseline this module provides.

A row's text (:func:`record_text`) is its ``messages`` rendered as ``"role: content"`` lines, or its
``prompt`` and ``completion`` joined by a newline (or the fields named by ``fields``). Then, in row order:

1. **Exact** (``exact=True``): rows whose *normalized* text (:func:`normalize_text`: Unicode NFKC,
   ``str.casefold``, every run of whitespace one space, stripped) equals an earlier row's are removed.
2. **Near** (``near=threshold``): a row is removed when its estimated Jaccard similarity with *any earlier
   row* (kept or removed) is ``>= threshold``. Similarity is over sets of shingles (:func:`shingles`: word
   n-grams ``words:N`` or character n-grams ``chars:N`` of the normalized text), estimated with MinHash
   (``num_perm`` permutations, ``seed``) and found with MinHash LSH (``datasketch``); LSH candidates are
   re-checked with the MinHash estimate. A removed row joins the cluster of the earliest earlier row it
   matches, so a cluster is a chain of near-duplicates whose root is the row kept.

"Any earlier row" (rather than "an earlier kept row") makes the decision monotone: with exact Jaccard, the
rows kept at a threshold are a subset of those kept at any higher threshold. It is also one pass (rows
are decided as they arrive), which is what the streaming loader needs. MinHash is an estimate (standard
error ~ sqrt(J(1-J)/num_perm)): pairs near the threshold may fall either way, and LSH may miss a pair.

Memory: a MinHash signature (``num_perm`` x 8 bytes) plus its LSH band keys per row with text.

>>> report = dedup_texts(["Hello  World", "hello world", "something else"], ["f:1", "f:2", "f:3"],
...                      DedupConfig(near=None))
>>> report.kept, [(c.kept.location, [r.location for r in c.removed]) for c in report.clusters]
([0, 2], [('f:1', ['f:2'])])
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from leantune.config import DedupConfig
from leantune.data.records import DataError

_WHITESPACE = re.compile(r"\s+")


# --------------------------------------------------------------------------------------------
# Text, shingles, Jaccard (pure)


def normalize_text(text: str) -> str:
    """The text compared for duplicates: Unicode NFKC, casefolded, whitespace runs -> one space, stripped.

    >>> normalize_text("  The\\tQUICK\\n\\nfox ")
    'the quick fox'
    >>> normalize_text("Ｆｕｌｌ width") == normalize_text("full WIDTH")
    True
    """
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def record_text(data: Any, where: str, fields: list[str] | None = None) -> str:
    """The text of one row that duplicates are judged on (not normalized).

    ``fields`` None: ``messages`` as ``"role: content"`` lines, else ``prompt`` and ``completion`` (those
    present) joined by a newline. ``fields`` given: those fields in that order, non-strings as JSON.

    >>> record_text({"prompt": "2+2?", "completion": "4", "id": 7}, "f:1")
    '2+2?\\n4'
    >>> record_text({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "f:1")
    'user: hi\\nassistant: yo'
    >>> record_text({"question": "2+2?", "answer": 4}, "f:1", ["question", "answer"])
    '2+2?\\n4'
    """
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}. Each row must be one object.")
    if fields:
        missing = [f for f in fields if data.get(f) is None]
        if missing:
            have = ", ".join(sorted(k for k, v in data.items() if v is not None)) or "no fields"
            raise DataError(f"{where}: missing field {missing[0]!r} (record has: {have}). Every row needs the fields dedup compares ({', '.join(fields)}).")
        return "\n".join(v if isinstance(v, str) else json.dumps(v, sort_keys=True, ensure_ascii=False)
                         for v in (data[f] for f in fields))
    messages = data.get("messages")
    if isinstance(messages, list):
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" if isinstance(m, dict) else str(m) for m in messages)
    parts = [data[k] for k in ("prompt", "completion") if isinstance(data.get(k), str)]
    if not parts:
        keys = ", ".join(sorted(data)) or "none"
        raise DataError(f"{where}: no 'messages', 'prompt' or 'completion' to compare (fields: {keys}). Name the fields to compare (--field NAME).")
    return "\n".join(parts)


@dataclass(frozen=True)
class Shingling:
    """How a text becomes a set: ``words`` n-grams (space-joined) or ``chars`` n-grams, of the normalized text."""

    kind: Literal["words", "chars"]
    n: int

    @classmethod
    def parse(cls, spec: str) -> Shingling:
        """``"words:3"`` or ``"chars:5"`` (the form ``data.dedup.shingle`` and ``--shingle`` take).

        >>> Shingling.parse("chars:5")
        Shingling(kind='chars', n=5)
        """
        kind, _, n = spec.partition(":")
        if kind not in ("words", "chars") or not n.isdigit() or int(n) < 1:
            raise ValueError(f"shingle {spec!r}: expected words:N or chars:N with N >= 1, e.g. words:3")
        return cls(kind, int(n))  # type: ignore[arg-type]


def shingles(text: str, shingling: Shingling) -> set[str]:
    """The shingle set of ``normalize_text(text)``; a text shorter than n units is one shingle (itself),
    an empty text the empty set.

    >>> sorted(shingles("A b  c d", Shingling("words", 3)))
    ['a b c', 'b c d']
    >>> sorted(shingles("Abcd", Shingling("chars", 3))), shingles("ab", Shingling("chars", 3))
    (['abc', 'bcd'], {'ab'})
    """
    norm = normalize_text(text)
    if not norm:
        return set()
    units: list[str] | str = norm.split(" ") if shingling.kind == "words" else norm
    n, sep = shingling.n, " " if shingling.kind == "words" else ""
    if len(units) <= n:
        return {sep.join(units)}
    return {sep.join(units[i : i + n]) for i in range(len(units) - n + 1)}


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b| (1.0 for two empty sets).

    >>> jaccard({1, 2, 3}, {2, 3, 4})
    0.5
    """
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def text_hash(text: str) -> str:
    """SHA-256 (hex) of the normalized text: the key of exact deduplication."""
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()


def minhash(shingle_set: set[str], num_perm: int, seed: int):
    """A ``datasketch.MinHash`` of ``shingle_set`` (same ``num_perm`` and ``seed`` -> comparable signatures)."""
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=seed)
    m.update_batch([s.encode("utf-8") for s in sorted(shingle_set)])
    return m


# --------------------------------------------------------------------------------------------
# Report


@dataclass
class RowRef:
    """A row: its 0-based position in the input and its location (``file:line`` or ``source:row N``)."""

    index: int
    location: str


@dataclass
class RemovedRow(RowRef):
    """A removed row, the earlier row it matched and their Jaccard estimate (1.0 for exact duplicates), and
    its estimate against the cluster's kept row (lower than ``jaccard`` when it joined through a chain)."""

    matched: str = ""
    jaccard: float = 1.0
    jaccard_to_kept: float = 1.0


@dataclass
class DuplicateCluster:
    """One kept row and the rows removed as its duplicates; ``kind`` says which stage found the cluster
    (``exact``, or ``near`` once any member is a near-duplicate)."""

    id: int
    kind: Literal["exact", "near"]
    kept: RowRef
    removed: list[RemovedRow] = field(default_factory=list)


@dataclass
class DedupReport:
    """What :func:`dedup_texts` decided: the indices kept (ascending) and the clusters of removed rows."""

    rows: int
    kept: list[int]
    exact_removed: int
    near_removed: int
    clusters: list[DuplicateCluster]
    settings: dict

    def as_dict(self) -> dict:
        """JSON-ready: counts, settings, clusters (without the kept index list)."""
        out = asdict(self)
        out.pop("kept")
        out["kept_rows"] = len(self.kept)
        return out


# --------------------------------------------------------------------------------------------
# One pass


class Deduplicator:
    """Decides row by row (:meth:`add` -> keep?), so the streaming loader can use it in its one pass;
    :meth:`report` gives the clusters so far. ``cfg``: a :class:`~leantune.config.DedupConfig`."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.shingling = Shingling.parse(cfg.shingle)
        self.rows = 0
        self.kept: list[int] = []
        self._by_hash: dict[str, int] = {}  # normalized-text hash -> first row
        self._root: dict[int, int] = {}  # every row seen -> the kept row of its cluster
        self._where: dict[int, str] = {}  # kept and near-indexed rows -> location
        self._clusters: dict[int, DuplicateCluster] = {}  # kept row -> its cluster
        self._signatures: dict = {}  # near-indexed rows -> MinHash
        self._to_kept: dict[int, float] = {}  # removed rows -> Jaccard estimate against their cluster's kept row
        self.exact_removed = self.near_removed = 0
        self._lsh = None
        if cfg.near is not None:
            from datasketch import MinHashLSH

            self._lsh = MinHashLSH(threshold=cfg.near, num_perm=cfg.num_perm)

    def _remove(self, i: int, where: str, matched: int, estimate: float, kind: Literal["exact", "near"], sig=None) -> None:
        root = self._root[matched]
        self._root[i] = root
        if kind == "exact":  # identical to `matched`, so exactly as similar to the root as it is
            to_kept = self._to_kept.get(matched, 1.0)
            self.exact_removed += 1
        else:
            to_kept = float(sig.jaccard(self._signatures[root])) if root in self._signatures else 0.0
            self.near_removed += 1
        self._to_kept[i] = to_kept
        cluster = self._clusters.setdefault(root, DuplicateCluster(0, "exact", RowRef(root, self._where[root])))
        if kind == "near":
            cluster.kind = "near"
        cluster.removed.append(RemovedRow(i, where, self._where[matched], round(estimate, 4), round(to_kept, 4)))

    def add(self, text: str, where: str) -> bool:
        """Row ``self.rows`` (0-based, in input order) with ``text`` at ``where``: True to keep it."""
        i = self.rows
        self.rows += 1
        key = text_hash(text)
        first = self._by_hash.get(key)
        if first is not None and self.cfg.exact:
            self._remove(i, where, first, 1.0, "exact")
            return False
        self._by_hash.setdefault(key, i)
        self._where[i] = where
        if self._lsh is not None:
            sig_set = shingles(text, self.shingling)
            if sig_set:  # an empty text has no shingles: only exact dedup can match it
                sig = minhash(sig_set, self.cfg.num_perm, self.cfg.seed)
                scored = [(j, float(sig.jaccard(self._signatures[j]))) for j in self._lsh.query(sig)]
                matches = sorted((j, s) for j, s in scored if s >= self.cfg.near)
                self._signatures[i] = sig
                self._lsh.insert(i, sig)
                if matches:
                    j, estimate = matches[0]  # the earliest earlier row it matches
                    self._remove(i, where, j, estimate, "near", sig)
                    return False
        self._root[i] = i
        self.kept.append(i)
        return True

    def report(self) -> DedupReport:
        clusters = [self._clusters[k] for k in sorted(self._clusters)]
        for n, c in enumerate(clusters):
            c.id = n
        return DedupReport(rows=self.rows, kept=list(self.kept), exact_removed=self.exact_removed, near_removed=self.near_removed,
                           clusters=clusters, settings=self.cfg.model_dump())


def dedup_texts(texts: list[str], locations: list[str], cfg: DedupConfig) -> DedupReport:
    """Deduplicate ``texts`` (one per row, in order; ``locations`` name them in the report); see the module
    docstring for the rule. The rows to keep are ``report.kept``."""
    if len(texts) != len(locations):
        raise ValueError(f"dedup_texts: {len(texts)} texts but {len(locations)} locations")
    d = Deduplicator(cfg)
    for text, where in zip(texts, locations):
        d.add(text, where)
    return d.report()


# --------------------------------------------------------------------------------------------
# Files (`leantune data dedup`)


def dedup_file(source: str, out: str, cfg: DedupConfig, *, fields: list[str] | None = None, split: str | None = None,
               report_path: str | None = None) -> DedupReport:
    """Read every row of ``source`` (any source ``data.train`` takes), deduplicate, write the kept rows as JSON
    Lines to ``out`` (and the report as JSON to ``report_path``), each atomically.

    Every row is read and checked before anything is written: on a bad row (DataError with its location)
    or an output that is not JSON Lines, no file is created or changed.
    """
    from pathlib import Path

    from leantune.atomic import atomic_open, atomic_write_json, json_default
    from leantune.data.records import JSONL_SUFFIXES, read_rows

    if Path(out).suffix.lower() not in JSONL_SUFFIXES:
        raise DataError(f"{out}: the output is written as JSON Lines; give it a {' / '.join(JSONL_SUFFIXES)} name.")
    rows = read_rows(source, lambda data, where: (data, where, record_text(data, where, fields)), split=split)
    report = dedup_texts([text for _, _, text in rows], [where for _, where, _ in rows], cfg)
    lines = []
    for i in report.kept:
        data, where, _ = rows[i]
        try:
            lines.append(json.dumps(data, ensure_ascii=False, default=json_default))
        except TypeError as err:
            raise DataError(f"{where}: this row cannot be written as JSON ({err}).") from None
    with atomic_open(out) as f:
        f.writelines(line + "\n" for line in lines)
    if report_path:
        atomic_write_json(report_path, {"source": str(source), "out": str(out), **report.as_dict()})
    return report


def summary_line(report: DedupReport, source: str, out: str) -> str:
    """One line for people: rows read, removed by kind, clusters, rows written.

    >>> r = DedupReport(rows=5, kept=[0, 3], exact_removed=2, near_removed=1, clusters=[], settings={})
    >>> summary_line(r, "in.jsonl", "out.jsonl")
    'in.jsonl: 5 rows; removed 2 exact + 1 near duplicates (0 clusters); wrote 2 rows to out.jsonl'
    """
    return (f"{source}: {report.rows} rows; removed {report.exact_removed} exact + {report.near_removed} near "
            f"duplicates ({len(report.clusters)} clusters); wrote {len(report.kept)} rows to {out}")
