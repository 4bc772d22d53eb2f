"""Deduplication: exact and MinHash near-duplicate removal against a brute-force exact-Jaccard reference,
the cluster report, threshold monotonicity, `leantune data dedup`, and `data.dedup` in training."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from conftest import tiny_recipe, write_jsonl
from leantune.cli import main
from leantune.config import DataConfig, DedupConfig, RecipeError, recipe_from_dict
from leantune.data.dedup import Shingling, dedup_texts, jaccard, normalize_text, record_text, shingles

pytest.importorskip("datasketch")

WORDS = [f"w{i}" for i in range(300)]


def _mutate(words: list[str], m: int, rng: random.Random) -> list[str]:
    out = list(words)
    for pos in rng.sample(range(len(out)), m):
        out[pos] = rng.choice(WORDS) + "x"  # never in a base document
    return out


def _corpus() -> list[str]:
    """13 odd rows: 3 base documents (37, 41, 29 words), variants with 1, 2, 6 and 14 words replaced, a
    case/whitespace variant, a fullwidth variant, an empty row, a one-word row, an unrelated row."""
    rng = random.Random(7)
    bases = [[rng.choice(WORDS) for _ in range(n)] for n in (37, 41, 29)]
    rows = [
        " ".join(bases[0]),
        " ".join(_mutate(bases[0], 1, rng)),
        " ".join(bases[1]),
        "  ".join(bases[0]).upper(),  # exact duplicate of row 0 after normalization
        " ".join(_mutate(bases[0], 6, rng)),
        "",
        " ".join(_mutate(bases[1], 2, rng)),
        "lonely",
        " ".join(bases[2]),
        " ".join(_mutate(bases[2], 14, rng)),
        "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in " ".join(bases[2])),  # fullwidth: NFKC-equal to row 8
        " ".join(rng.choice(WORDS) for _ in range(23)),
        " ".join(_mutate(bases[1], 1, rng)),
    ]
    return rows


def _reference_kept(texts: list[str], threshold: float | None, shingling: Shingling, exact: bool = True) -> list[int]:
    """Brute force with exact Jaccard: a row goes if its normalized text was seen (exact) or its shingle set
    has Jaccard >= threshold with any earlier row's that is not an exact duplicate."""
    sets = [shingles(t, shingling) for t in texts]
    seen, earlier, kept = set(), [], []
    for i, t in enumerate(texts):
        norm = normalize_text(t)
        if exact and norm in seen:
            continue
        seen.add(norm)
        dup = threshold is not None and bool(sets[i]) and any(sets[j] and jaccard(sets[i], sets[j]) >= threshold for j in earlier)
        earlier.append(i)
        if not dup:
            kept.append(i)
    return kept


def _locations(n: int) -> list[str]:
    return [f"d.jsonl:{i + 1}" for i in range(n)]


def test_normalize_and_shingles_by_hand():
    assert normalize_text("A\u00a0b\tC ") == "a b c"  # no-break space is whitespace after NFKC
    assert shingles("a b", Shingling("words", 3)) == {"a b"}
    assert shingles("  ", Shingling("words", 3)) == set()
    assert shingles("x y z w", Shingling("words", 2)) == {"x y", "y z", "z w"}
    assert jaccard(shingles("a b c d", Shingling("words", 2)), shingles("a b c e", Shingling("words", 2))) == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="words:N or chars:N"):
        Shingling.parse("tokens:3")


def test_exact_duplicates_removed_first_kept_with_locations():
    texts = ["What is 2+2?\n4", "what  is 2+2?\n\n4", "What is 2+3?\n5", "WHAT IS 2+2? 4", "What is 2+3?\n5"]
    report = dedup_texts(texts, _locations(5), DedupConfig(near=None))
    assert report.kept == [0, 2]
    assert (report.exact_removed, report.near_removed) == (3, 0)
    got = [(c.id, c.kind, c.kept.location, [(r.location, r.matched, r.jaccard) for r in c.removed]) for c in report.clusters]
    assert got == [
        (0, "exact", "d.jsonl:1", [("d.jsonl:2", "d.jsonl:1", 1.0), ("d.jsonl:4", "d.jsonl:1", 1.0)]),
        (1, "exact", "d.jsonl:3", [("d.jsonl:5", "d.jsonl:3", 1.0)]),
    ]


@pytest.mark.parametrize("threshold", [0.17, 0.5])
def test_near_matches_brute_force_exact_jaccard(threshold):
    texts = _corpus()
    sh = Shingling("words", 3)
    sets = [shingles(t, sh) for t in texts]
    pairs = [jaccard(sets[i], sets[j]) for i in range(len(texts)) for j in range(i) if sets[i] and sets[j]]
    margin = 0.1  # MinHash with 256 permutations: standard error <= 0.031; no pair may sit this close to the threshold
    assert all(abs(p - threshold) > margin for p in pairs), "test data has a pair too close to the threshold"
    report = dedup_texts(texts, _locations(len(texts)), DedupConfig(near=threshold, num_perm=256, seed=3))
    assert report.kept == _reference_kept(texts, threshold, sh)
    assert report.rows == len(texts) and len(report.kept) + report.exact_removed + report.near_removed == len(texts)
    index = {loc: i for i, loc in enumerate(_locations(len(texts)))}
    for c in report.clusters:
        assert c.kept.index in report.kept
        for r in c.removed:
            i, j = r.index, index[r.matched]
            assert j < i and r.location == f"d.jsonl:{i + 1}"
            assert r.jaccard == pytest.approx(jaccard(sets[i], sets[j]), abs=margin)
            assert r.jaccard_to_kept == pytest.approx(jaccard(sets[i], sets[c.kept.index]), abs=margin)
    assert report.exact_removed == 2  # rows 3 (case/whitespace) and 10 (fullwidth)


def test_near_duplicates_are_found_and_reported():
    texts = _corpus()
    report = dedup_texts(texts, _locations(len(texts)), DedupConfig(near=0.5, num_perm=256, seed=3))
    by_kept = {c.kept.index: (c.kind, sorted(r.index for r in c.removed)) for c in report.clusters}
    # exact Jaccard: 1 ~ 0: 0.84, 6 ~ 2: 0.73, 12 ~ 2: 0.95, 4 ~ 0: 0.32 (kept); 3 and 10 are exact copies of 0 and 8
    assert by_kept == {0: ("near", [1, 3]), 2: ("near", [6, 12]), 8: ("exact", [10])}
    assert report.near_removed == 3 and 5 in report.kept and 7 in report.kept  # empty and one-word rows stay


def test_threshold_monotone():
    """A lower threshold removes a superset: kept(t) ⊆ kept(t') for t < t', for the reference and for MinHash."""
    texts = _corpus()
    thresholds = [0.2, 0.4, 0.6, 0.8, 0.95]
    ref = [set(_reference_kept(texts, t, Shingling("words", 3))) for t in thresholds]
    got = [set(dedup_texts(texts, _locations(len(texts)), DedupConfig(near=t, num_perm=256, seed=3)).kept) for t in thresholds]
    for kept in (ref, got):
        for low, high in zip(kept, kept[1:]):
            assert low <= high
    assert len(got[0]) < len(got[-1])  # the range matters on this data


def test_char_shingles_catch_numeric_near_duplicates():
    texts = ["12345 + 67890 = 80235", "12345 + 67890 = 80236", "99999 + 11111 = 111110"]
    words = dedup_texts(texts, _locations(3), DedupConfig(near=0.6, shingle="words:3", num_perm=256))
    chars = dedup_texts(texts, _locations(3), DedupConfig(near=0.6, shingle="chars:4", num_perm=256))
    assert words.kept == [0, 1, 2]  # a changed last number changes 1 of the 3 word 3-grams: J = 2/4
    assert chars.kept == [0, 2]
    assert _reference_kept(texts, 0.6, Shingling("chars", 4)) == [0, 2]


def test_record_text_shapes_and_errors():
    from leantune.data.records import DataError

    assert record_text({"prompt": "p", "completion": "c"}, "f:1") == "p\nc"
    with pytest.raises(DataError, match=r"f:3: no 'messages', 'prompt' or 'completion'.*--field"):
        record_text({"question": "q"}, "f:3")
    with pytest.raises(DataError, match=r"f:4: missing field 'answer'"):
        record_text({"question": "q"}, "f:4", ["question", "answer"])


# --------------------------------------------------------------------------------------------
# CLI


def _rows():
    return [
        {"prompt": "What is 2 + 2?", "completion": "The answer is 4."},
        {"prompt": "What is 2 + 2?", "completion": "The answer is 4.", "id": 9},  # exact (id is ignored)
        {"prompt": "Name the capital of France.", "completion": "Paris is the capital of France, in Europe."},
        {"prompt": "name the capital of france.", "completion": "Paris is the capital of France, in western Europe."},
        {"prompt": "What colour is the sky on a clear day?", "completion": "Blue."},
    ]


def test_cli_round_trip(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    rows = _rows()
    src.write_text(json.dumps(rows[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in rows[1:]))  # blank line 2
    out, rep = tmp_path / "out.jsonl", tmp_path / "report.json"
    assert main(["data", "dedup", str(src), str(out), "--threshold", "0.6", "--report", str(rep)]) == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert kept == [rows[0], rows[2], rows[4]]
    report = json.loads(rep.read_text())
    assert (report["rows"], report["kept_rows"], report["exact_removed"], report["near_removed"]) == (5, 3, 1, 1)
    clusters = [(c["kind"], c["kept"]["location"], [r["location"] for r in c["removed"]]) for c in report["clusters"]]
    assert clusters == [("exact", f"{src}:1", [f"{src}:3"]), ("near", f"{src}:4", [f"{src}:5"])]
    assert report["settings"]["near"] == 0.6 and report["settings"]["shingle"] == "words:3"
    printed = capsys.readouterr().out
    assert "5 rows; removed 1 exact + 1 near duplicates (2 clusters); wrote 3 rows" in printed
    # the output is itself a source: dedup again removes nothing
    assert main(["data", "dedup", str(out), str(tmp_path / "again.jsonl"), "--threshold", "0.6"]) == 0
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()


def test_cli_parquet_source_and_fields(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist([{"q": "a b c", "a": "1"}, {"q": "A  B c", "a": "2"}, {"q": "d", "a": "1"}]), src)
    out = tmp_path / "out.jsonl"
    assert main(["data", "dedup", str(src), str(out), "--field", "q", "--threshold", "0"]) == 0
    assert [json.loads(x)["a"] for x in out.read_text().splitlines()] == ["1", "1"]
    assert "removed 1 exact + 0 near" in capsys.readouterr().out


def test_cli_bad_input_writes_nothing(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", _rows()[:2])
    with open(src, "a") as f:
        f.write("{not json\n")
    out, rep = tmp_path / "out.jsonl", tmp_path / "r.json"
    assert main(["data", "dedup", str(src), str(out), "--report", str(rep)]) == 2
    assert f"{src}:3: malformed JSON" in capsys.readouterr().err
    assert not out.exists() and not rep.exists()
    good = write_jsonl(tmp_path / "good.jsonl", _rows())
    assert main(["data", "dedup", str(good), str(tmp_path / "out.csv")]) == 2
    assert "JSON Lines" in capsys.readouterr().err
    assert main(["data", "dedup", str(good), str(out), "--shingle", "tokens:3"]) == 2
    assert main(["data", "dedup", str(good), str(out), "--threshold", "1.5"]) == 2
    assert main(["data", "dedup", str(good), str(out), "--threshold", "0", "--no-exact"]) == 2
    assert "nothing would be removed" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.glob(".*tmp")) == []


# --------------------------------------------------------------------------------------------
# data.dedup in training


def test_recipe_dedup_section_validates():
    base = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}}
    assert recipe_from_dict(base).data.dedup is None
    cfg = recipe_from_dict({**base, "data": {"train": "t.jsonl", "dedup": {"near": 0.7}}}).data.dedup
    assert (cfg.exact, cfg.near, cfg.num_perm, cfg.shingle) == (True, 0.7, 128, "words:3")
    with pytest.raises(RecipeError, match="data.dedup.shingle"):
        recipe_from_dict({**base, "data": {"train": "t.jsonl", "dedup": {"shingle": "words"}}})
    with pytest.raises(RecipeError, match="data.dedup.near"):
        recipe_from_dict({**base, "data": {"train": "t.jsonl", "dedup": {"near": 0}}})
    from leantune.config import apply_overrides

    raw = apply_overrides({"data": {"train": "t.jsonl", "dedup": None}}, ["data.dedup.near=0.6"])
    assert raw["data"]["dedup"] == {"near": 0.6}  # an override under a null section creates it
    with pytest.raises(RecipeError, match="nothing would be removed"):
        recipe_from_dict({**base, "data": {"train": "t.jsonl", "dedup": {"exact": False, "near": None}}})


def _dup_data(tmp_path):
    rows = [{"prompt": f"What is {a} + {b}?",
             "completion": f"<think>{a} + {b} = {a + b}, so we add the two numbers and check the sum twice</think> The answer is {a + b}."}
            for a, b in [(3, 4), (10, 20), (7, 7), (12, 30)]]
    rows += [rows[0], dict(rows[1], prompt="what is 10 +  20?"), rows[0]]  # 3 exact duplicates
    rows.append(dict(rows[0], completion=rows[0]["completion"][:-1] + "!"))  # a near one (J ~ 0.9)
    return write_jsonl(tmp_path / "dup.jsonl", rows)


DEDUP = {"exact": True, "near": 0.7, "shingle": "words:3", "num_perm": 256}


def test_streaming_and_eager_dedup_agree(tmp_path):
    from leantune.data.sft import load_sft_examples
    from leantune.models.tiny import tiny_tokenizer

    data = _dup_data(tmp_path)
    tok = tiny_tokenizer()
    dedup = DedupConfig(**DEDUP)
    eager, s1 = load_sft_examples(data, tok, DataConfig(train=str(data), dedup=dedup))
    streamed, s2 = load_sft_examples(data, tok, DataConfig(train=str(data), dedup=dedup, streaming=True))
    assert s1 == s2
    assert [e.source for e in eager] == [e.source for e in streamed] == [f"{data}:{i}" for i in (1, 2, 3, 4)]
    assert (s1.records, s1.examples, s1.dedup_exact, s1.dedup_near, s1.dedup_clusters) == (8, 4, 3, 1, 2)
    plain, s0 = load_sft_examples(data, tok, DataConfig(train=str(data)))
    assert (len(plain), s0.dedup_exact, s0.dedup_near) == (8, 0, 0)
    # eval data is never deduplicated
    held, s3 = load_sft_examples(data, tok, DataConfig(train=str(data), eval=str(data), dedup=dedup), role="eval")
    assert len(held) == 8 and s3.dedup_exact == 0


def test_training_ledger_counts_dedup(tmp_path, tiny_model_dir, capsys):
    data = _dup_data(tmp_path)
    raw = tiny_recipe(tiny_model_dir, data, tmp_path / "run", train={"steps": 1},
                      data={"dedup": DEDUP})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 0
    totals = json.loads((tmp_path / "run" / "ledger.json").read_text())["totals"]["data"]
    assert (totals["records"], totals["examples"], totals["dedup_exact"], totals["dedup_near"], totals["dedup_clusters"]) == (8, 4, 3, 1, 2)
