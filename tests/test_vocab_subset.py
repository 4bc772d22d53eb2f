"""vocab_subset_cross_entropy: exact when the subset is the whole vocabulary; otherwise equal to plain
F.cross_entropy over the restricted logits (values and autograd gradients); candidate builders; the
trainer wiring (recipe field, accumulation invariance, ledger note)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import tiny_recipe
from test_linear_cross_entropy import (
    IGNORE,
    _loss_and_grads,
    _make,
    _OutputRecorder,
    _reference,
)

from leantune.cli import main
from leantune.config import DataConfig, SpanWeights
from leantune.data.sft import collate, load_sft_examples
from leantune.losses import (
    build_candidates,
    embedding_neighbour_candidates,
    linear_cross_entropy,
    softmax_mass,
    token_counts,
    top_token_candidates,
    vocab_subset,
    vocab_subset_cross_entropy,
)
from leantune.train.sft import SFTLoss, accumulate_gradients, lm_loss_sum, step_vocab_subset


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _subset_ref(hidden, weight, labels, candidates, weights=None, reduction="mean"):
    """Plain fp64 PyTorch reference: S from Python sets, logits over W[S] only, F.cross_entropy on labels
    renumbered into S; autograd gives the gradients (zero for rows of W outside S)."""
    flat = labels.flatten().tolist()
    w_flat = None if weights is None else weights.flatten().tolist()
    kept = [y for i, y in enumerate(flat) if y != IGNORE and (w_flat is None or w_flat[i] != 0)]
    subset = sorted(set(candidates.tolist()) | set(kept))
    pos = {t: j for j, t in enumerate(subset)}
    sub_labels = torch.tensor([pos[y] if y in pos and y != IGNORE else IGNORE for y in flat]).reshape(labels.shape)
    if weights is not None:  # zero-weight tokens are dropped, whatever their label
        sub_labels = sub_labels.masked_fill(weights == 0, IGNORE)
    restricted = weight[torch.tensor(subset, dtype=torch.long)]  # (S, H), differentiable w.r.t. weight
    return _reference(hidden, restricted, sub_labels, weights, reduction=reduction)


def _check(fn_a, fn_b, hidden, weight, labels, weights=None, atol=1e-5, rtol=1e-5, **kw):
    a = _loss_and_grads(fn_a, hidden, weight, labels, weights, **kw)
    b = _loss_and_grads(fn_b, hidden, weight, labels, weights, **kw)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.double(), y.double(), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# Whole vocabulary == the exact loss


@pytest.mark.parametrize("shape,vocab,chunk_size", [((5, 123, 64), 257, 37), ((3, 7, 33), 1000, 7), ((50, 16), 37, 8)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_weights", [False, True])
def test_whole_vocabulary_equals_exact_loss(shape, vocab, chunk_size, reduction, with_weights):
    hidden, weight, labels, weights = _make(shape, vocab, seed=chunk_size, with_weights=with_weights)
    everything = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))  # any order
    everything = torch.cat([everything, everything[:5]])  # duplicates are fine
    kw = {"chunk_size": chunk_size, "reduction": reduction}

    def subset_loss(h, w, y, weights=None, **k):
        return vocab_subset_cross_entropy(h, w, y, everything, weights=weights, **k)

    # Same computation as linear_cross_entropy: equal to float rounding...
    _check(subset_loss, linear_cross_entropy, hidden, weight, labels, weights, atol=0, rtol=0, **kw)
    # ...and to plain F.cross_entropy over the full logits (fp64).
    loss, gh, gw = _loss_and_grads(subset_loss, hidden, weight, labels, weights, **kw)
    rloss, rgh, rgw = _loss_and_grads(_reference, hidden.double(), weight.double(), labels, weights,
                                      reduction=reduction)
    for x, y in ((loss, rloss), (gh, rgh), (gw, rgw)):
        torch.testing.assert_close(x.double(), y, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("use_weights", [False, True])
@pytest.mark.parametrize("n_candidates", [0, 4, 31])
def test_all_masked_gives_zero_loss_and_zero_grads(reduction, use_weights, n_candidates):
    hidden, weight, labels, _ = _make((2, 9, 16), 31, seed=4)
    weights = None
    if use_weights:
        labels = labels.clamp(min=0)
        weights = torch.zeros(labels.shape)
    else:
        labels = torch.full_like(labels, IGNORE)
    hidden[0, 0, 0] = float("inf")  # unused rows must not leak NaN into the loss
    cands = torch.arange(n_candidates)
    loss, gh, gw = _loss_and_grads(
        lambda h, w, y, weights=None, **k: vocab_subset_cross_entropy(h, w, y, cands, weights=weights, **k),
        hidden, weight, labels, weights, reduction=reduction,
    )
    assert loss.dim() == 0 and loss.item() == 0.0
    assert torch.equal(gh, torch.zeros_like(hidden))
    assert torch.equal(gw, torch.zeros_like(weight))


# ---------------------------------------------------------------------------------------------
# A real subset == plain cross-entropy over the restricted logits


@pytest.mark.parametrize("shape,vocab,n_cand,chunk_size", [
    ((5, 123, 64), 257, 40, 37),
    ((3, 7, 33), 1000, 100, 4),
    ((50, 16), 37, 0, 8),  # no candidates: softmax over the batch's targets only
    ((4, 30, 24), 101, 3, 1024),
])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_weights", [False, True])
def test_subset_matches_restricted_reference(shape, vocab, n_cand, chunk_size, reduction, with_weights):
    hidden, weight, labels, weights = _make(shape, vocab, seed=n_cand + 1, with_weights=with_weights)
    if with_weights:  # some zero weights: their labels must not join the subset
        weights = weights.masked_fill(torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)) < 0.2, 0.0)
    cands = torch.randperm(vocab, generator=torch.Generator().manual_seed(n_cand))[:n_cand]
    loss, gh, gw = _loss_and_grads(
        lambda h, w, y, weights=None, **k: vocab_subset_cross_entropy(h, w, y, cands, weights=weights, **k),
        hidden, weight, labels, weights, chunk_size=chunk_size, reduction=reduction,
    )
    rloss, rgh, rgw = _loss_and_grads(
        lambda h, w, y, weights=None, **k: _subset_ref(h, w, y, cands, weights, **k),
        hidden.double(), weight.double(), labels, weights, reduction=reduction,
    )
    torch.testing.assert_close(loss.double(), rloss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh.double(), rgh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw.double(), rgw, atol=1e-5, rtol=1e-5)
    # rows of the LM head outside the subset get exactly zero gradient
    inside = vocab_subset(cands, labels if weights is None else labels.masked_fill(weights == 0, IGNORE))
    outside = torch.ones(vocab, dtype=torch.bool)
    outside[inside] = False
    assert torch.equal(gw[outside], torch.zeros_like(gw[outside]))


def test_bf16_matches_fp64_restricted_reference():
    hidden, weight, labels, weights = _make((5, 123, 64), 257, seed=9, dtype=torch.bfloat16, with_weights=True)
    cands = torch.arange(0, 257, 5)
    loss, gh, gw = _loss_and_grads(
        lambda h, w, y, weights=None, **k: vocab_subset_cross_entropy(h, w, y, cands, weights=weights, **k),
        hidden, weight, labels, weights, chunk_size=37,
    )
    assert loss.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    rloss, rgh, rgw = _loss_and_grads(
        lambda h, w, y, weights=None, **k: _subset_ref(h, w, y, cands, weights, **k),
        hidden.double(), weight.double(), labels, weights,
    )
    torch.testing.assert_close(loss.double(), rloss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh.double(), rgh, atol=1e-4, rtol=2e-2)
    torch.testing.assert_close(gw.double(), rgw, atol=1e-4, rtol=2e-2)


def test_subset_loss_is_a_lower_bound_per_token():
    hidden, weight, labels, _ = _make((4, 40, 32), 300, seed=7)
    labels = labels.clamp(min=0)
    cands = torch.arange(0, 300, 7)
    for i in range(labels.numel()):  # token by token: drop all others
        one = torch.full_like(labels, IGNORE).flatten()
        one[i] = labels.flatten()[i]
        one = one.reshape(labels.shape)
        approx = vocab_subset_cross_entropy(hidden, weight, one, cands)
        exact = linear_cross_entropy(hidden, weight, one)
        assert approx <= exact + 1e-6
    grow = [float(vocab_subset_cross_entropy(hidden, weight, labels, torch.arange(k))) for k in (0, 50, 150, 300)]
    assert grow == sorted(grow)  # a larger subset never lowers the loss
    assert grow[-1] == pytest.approx(float(linear_cross_entropy(hidden, weight, labels)), rel=1e-6)


def test_gradcheck_fp64():
    hidden, weight, labels, weights = _make((2, 5, 6), 9, seed=10, dtype=torch.float64, with_weights=True)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    cands = torch.tensor([0, 4])
    assert torch.autograd.gradcheck(
        lambda h, w: vocab_subset_cross_entropy(h, w, labels, cands, weights=weights, chunk_size=3, reduction="sum"),
        (h, w),
    )


def test_never_allocates_vocabulary_sized_logits():
    n, hdim, vocab, chunk = 256, 16, 300, 32
    hidden, weight, labels, _ = _make((n, hdim), vocab, seed=11, ignore_frac=0.0)
    labels = labels % 20  # targets inside a 20-token subset
    cands = torch.arange(10)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with _OutputRecorder() as rec:
        vocab_subset_cross_entropy(h, w, labels, cands, chunk_size=chunk).backward()
    logit_shapes = [s for op, s in rec.outputs if "mm" in op and len(s) == 2 and s[0] <= chunk and s[1] != hdim]
    assert logit_shapes and all(s[1] == 20 for s in logit_shapes), set(logit_shapes)  # (chunk, |S|) only
    assert rec.max_numel() <= max(vocab * hdim, n * hdim, chunk * 20) < n * vocab


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"candidates": torch.tensor([0, 10])}, "candidate 10 is outside"),
        ({"candidates": torch.tensor([-1])}, "candidate -1 is outside"),
        ({"candidates": torch.zeros(2, 2, dtype=torch.long)}, "1-D integer"),
        ({"candidates": torch.tensor([1.0])}, "1-D integer"),
        ({"labels": torch.full((2, 3), 10)}, "label 10 is outside"),
        ({"ignore_index": 0}, "ignore_index must be negative"),
        ({"weights": torch.ones(2, 4)}, "weights shape"),
    ],
)
def test_input_errors(kwargs, match):
    args = {"hidden": torch.randn(2, 3, 8), "weight": torch.randn(10, 8), "labels": torch.zeros(2, 3, dtype=torch.long),
            "candidates": torch.tensor([1, 2])}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        vocab_subset_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), args.pop("candidates"),
                                   **args)


# ---------------------------------------------------------------------------------------------
# Candidate sets


def test_frequent_candidates_rank_by_count_then_id():
    counts = token_counts([[5, 5, 5, 2, 2, 9], [2, 7]], vocab_size=10)
    assert counts.tolist() == [0, 0, 3, 0, 0, 3, 0, 1, 0, 1]
    assert top_token_candidates(counts, 3).tolist() == [2, 5, 7]
    assert top_token_candidates(counts, 6).tolist() == [0, 1, 2, 5, 7, 9]  # filled with the lowest ids
    assert top_token_candidates(counts, 50).tolist() == list(range(10))
    with pytest.raises(ValueError, match="token ids must lie"):
        token_counts([[10]], vocab_size=10)


def test_embedding_candidates_are_seeds_plus_nearest_rows():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 8, generator=g)
    weight[17] = 3.0 * weight[3]  # same direction as seed 3: nearest by cosine
    weight[40] = weight[8] + 0.01 * torch.randn(8, generator=g)
    got = embedding_neighbour_candidates(weight, torch.tensor([3, 8]), k=4, chunk_size=7)
    assert set(got.tolist()) >= {3, 8, 17, 40} and got.tolist() == sorted(got.tolist())
    assert embedding_neighbour_candidates(weight, torch.tensor([3]), k=100).tolist() == list(range(50))


def test_softmax_mass_matches_plain_softmax():
    hidden, weight, _, _ = _make((37, 16), 101, seed=12)
    ref = torch.softmax(hidden.double() @ weight.double().T, dim=-1).sum(0)  # (V,)
    torch.testing.assert_close(softmax_mass(hidden, weight, chunk_size=5), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(softmax_mass(hidden.bfloat16(), weight.bfloat16()).sum(), torch.tensor(37.0, dtype=torch.float64))


def test_build_candidates_dispatch():
    weight = torch.randn(30, 4, generator=torch.Generator().manual_seed(1))
    all_counts = token_counts([[1, 1, 2, 3]], 30)
    target_counts = token_counts([[20, 21]], 30)
    kw = {"weight": weight, "all_counts": all_counts, "target_counts": target_counts}
    freq = build_candidates("frequency", 5, **kw)
    assert freq.tolist() == [0, 1, 2, 3, 4]
    emb = build_candidates("embedding", 5, **kw)
    assert {20, 21} <= set(emb.tolist()) and emb.numel() == 5
    mass = torch.zeros(30, dtype=torch.float64)
    mass[[29, 7, 12]] = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    assert build_candidates("probability", 3, probability_mass=mass, **kw).tolist() == [7, 12, 29]
    with pytest.raises(ValueError, match="needs probability_mass"):
        build_candidates("probability", 3, **kw)
    with pytest.raises(ValueError, match="source must be one of"):
        build_candidates("random", 5, **kw)


# ---------------------------------------------------------------------------------------------
# The trainer


def test_accumulation_8x1_equals_1x8_with_subset(tiny_model_dir, sft_data):
    from test_sft import _grads, _lora_model

    model, tok = _lora_model(tiny_model_dir)
    examples, _ = load_sft_examples(sft_data, tok, DataConfig(train=str(sft_data), max_length=64))
    examples = examples[:8]
    w = SpanWeights(think=0.5, answer=2.0)
    cands = torch.arange(20)
    model.train()
    accumulate_gradients(SFTLoss(model), [collate(examples, tok.pad_token_id, w)], 7, cands)
    big = _grads(model)
    model.zero_grad()
    accumulate_gradients(SFTLoss(model), [collate([e], tok.pad_token_id, w) for e in examples], 7, cands)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, big[n], rtol=1e-4, atol=1e-6, msg=n)


def test_lm_loss_sum_whole_vocabulary_is_exact(tiny_model_dir, sft_data):
    from test_sft import _lora_model

    model, tok = _lora_model(tiny_model_dir)
    examples, _ = load_sft_examples(sft_data, tok, DataConfig(train=str(sft_data), max_length=64))
    batch = collate(examples[:5], tok.pad_token_id, SpanWeights(think=0.25))
    vocab = model.get_output_embeddings().weight.shape[0]
    with torch.no_grad():
        exact = lm_loss_sum(model, batch, 3)
        assert torch.equal(lm_loss_sum(model, batch, 3, torch.arange(vocab)), exact)
        subset = step_vocab_subset(torch.arange(10), [batch])
        approx = lm_loss_sum(model, batch, 3, subset)
    assert 0 < float(approx) < float(exact)
    assert step_vocab_subset(None, [batch]) is None


def _train(tmp_path, model_dir, data_file, name, **loss):
    raw = tiny_recipe(model_dir, data_file, tmp_path / name, loss={"chunk_size": 16, **loss},
                      data={"eval": str(data_file)})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 0
    run = tmp_path / name
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return metrics, json.loads((run / "ledger.json").read_text())


def test_train_with_vocab_subset(tmp_path, tiny_model_dir, sft_data, capsys):
    exact_m, exact_l = _train(tmp_path, tiny_model_dir, sft_data, "exact")
    vocab = exact_l["flops"]["inputs"]["vocab"]  # the whole lm_head
    for source in ("probability", "frequency"):  # k >= V: the whole vocabulary, the exact loss
        full_m, _ = _train(tmp_path, tiny_model_dir, sft_data, f"full-{source}", vocab_subset=100000,
                           vocab_subset_source=source)
        assert [m["loss"] for m in full_m] == [m["loss"] for m in exact_m]
    prob_m, prob_l = _train(tmp_path, tiny_model_dir, sft_data, "prob", vocab_subset=16)  # default source
    assert prob_l["extra"]["loss"]["vocab_subset_source"] == "probability"
    assert prob_l["extra"]["loss"]["vocab_subset_calibration"] == 64
    assert prob_m[0]["loss"] < exact_m[0]["loss"]
    capsys.readouterr()
    sub_m, sub_l = _train(tmp_path, tiny_model_dir, sft_data, "sub", vocab_subset=16, vocab_subset_source="embedding")
    captured = capsys.readouterr()
    printed = captured.out + captured.err  # the start message is a log line (stderr), the summary is stdout
    assert "APPROXIMATE vocabulary subset, 16 candidates" in printed  # at start
    assert "loss" in printed and "APPROXIMATE: vocabulary subset of 16 candidates" in printed  # in the summary
    assert sub_m[0]["loss"] < exact_m[0]["loss"]  # same model at step 1: the subset loss is a lower bound
    assert sub_l["recipe"]["loss"]["vocab_subset"] == 16
    note = sub_l["extra"]["loss"]
    assert note["kind"].startswith("APPROXIMATE") and note["candidates"] == 16
    assert 16 <= note["subset_size_mean"] <= vocab
    assert exact_l["extra"]["loss"]["kind"].startswith("exact")
    assert sub_l["flops"]["inputs"]["vocab"] == round(note["subset_size_mean"])
    assert vocab > 16 * 10
    assert "eval_loss" in sub_m[-1]  # evaluation stays exact


def test_resume_with_subset_equals_uninterrupted(tmp_path, tiny_model_dir, sft_data):
    """The candidates are built once, at the run's start, from the data and the freshly initialized model, and
    carried by every checkpoint: a resumed run uses the same subset (not one calibrated on the trained model)."""
    from safetensors.torch import load_file

    from leantune.config import recipe_from_dict
    from leantune.train.sft import train

    def recipe(name, steps):
        return recipe_from_dict(tiny_recipe(tiny_model_dir, sft_data, tmp_path / name,
                                            loss={"chunk_size": 16, "vocab_subset": 16},
                                            optim={"lr": 1e-2, "scheduler": "constant"},
                                            train={"steps": steps, "save_every": 1}))

    train(recipe("straight", 4), quiet=True)
    train(recipe("resumed", 2), quiet=True)
    resumed = train(recipe("resumed", 4), resume=True, quiet=True)
    assert resumed.ledger["extra"]["resumed"] is True
    a = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
