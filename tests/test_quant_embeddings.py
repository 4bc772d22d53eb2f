"""INT4/INT8 embedding and LM head (`quant.embedding_bits`): lookups, losses, tying, export, the CLI run."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from conftest import tiny_recipe

from leantune.config import RecipeError, recipe_from_dict
from leantune.losses import linear_cross_entropy, vocab_subset_cross_entropy
from leantune.models.tiny import save_tiny_model, tiny_model
from leantune.quant import (
    QuantEmbedding,
    QuantLinear,
    dense_head_weight,
    dequantize,
    dequantize_model,
    dequantize_rows,
    fake_quantize_model,
    head_weight,
    quantize_embeddings,
    quantize_groupwise,
    quantize_model,
)

torch.set_num_threads(1)
VOCAB = 301  # odd: nothing lines up with a power of two


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-tied"), seed=0, tie=True)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,group_size", [((301, 72), 32), ((97, 64), 64), ((50, 10), 4)])
def test_dequantize_rows_equals_rows_of_the_whole_matrix(bits, shape, group_size):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    qw = quantize_groupwise(w, bits, group_size)
    rows = torch.tensor([[shape[0] - 1, 0], [5, 5]])  # any shape, repeats, both ends
    got = dequantize_rows(qw, rows)  # (4, in)
    assert got.shape == (4, shape[1])
    assert torch.equal(got, dequantize(qw)[rows.reshape(-1)])
    assert torch.equal(dequantize_rows(qw, rows, torch.bfloat16), dequantize(qw, torch.bfloat16)[rows.reshape(-1)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_embedding_lookup_is_the_dequantized_row_within_the_error_bound(dtype):
    emb = torch.nn.Embedding(VOCAB, 72, padding_idx=0).to(dtype)
    q = QuantEmbedding.from_embedding(emb, bits=4, group_size=32)
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))
    out = q(ids)  # (3, 11, 72)
    assert out.shape == (3, 11, 72) and out.dtype == dtype and q.padding_idx == 0
    assert torch.equal(out, q.dequantized_weight()[ids])
    bound = q.scale.repeat_interleave(32, 1)[:, :72] / 2 + 1e-6  # |w - w_hat| <= scale / 2 per group
    err = (emb.weight.detach().float() - q.dequantized_weight(torch.float32)).abs()
    assert err.max() > 0 and (err <= bound + (1e-2 if dtype == torch.bfloat16 else 0)).all()
    assert not list(q.parameters())  # frozen: buffers only


@pytest.mark.parametrize("tie", [True, False])
def test_quantized_embeddings_give_the_fake_quantized_model_s_logits(tie):
    """quantize_model + quantize_embeddings computes what the full-precision model computes on W_hat."""
    quant, ref = tiny_model(vocab_size=VOCAB, tie=tie), tiny_model(vocab_size=VOCAB, tie=tie)
    quantize_model(quant, 4, 32)
    stats = quantize_embeddings(quant, 4, 32)
    assert fake_quantize_model(ref, 4, 32, embedding_bits=4) == 14 + (1 if tie else 2)
    emb, head = quant.get_input_embeddings(), quant.get_output_embeddings()
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear)
    assert (head.qweight is emb.qweight) == tie  # tied: the table is stored once
    table = VOCAB * 64 * 4
    assert stats.bytes_before == table * (1 if tie else 2)
    assert stats.bytes_after == emb.quantized().nbytes * (1 if tie else 2)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(quant(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_the_full_precision_table_is_freed():
    model = tiny_model(vocab_size=VOCAB, tie=True)
    old = weakref.ref(model.get_input_embeddings().weight)
    quantize_embeddings(model, 4, 32)
    gc.collect()
    assert old() is None
    floats = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point() and t.shape[0] == VOCAB]
    assert all(t.shape[1] < 64 for t in floats)  # only (V, n_groups) scales and offsets are left


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_losses_over_a_quantized_head_equal_those_over_its_dense_weight(dtype):
    g = torch.Generator().manual_seed(2)
    head = QuantLinear.from_linear(torch.nn.Linear(72, VOCAB, bias=False), bits=4, group_size=32)
    dense = dense_head_weight(head, dtype)  # (V, H)
    assert dense.dtype == dtype and isinstance(head_weight(head), type(head.quantized()))
    hidden = torch.randn(3, 13, 72, generator=g).to(dtype)
    labels = torch.randint(0, VOCAB, (3, 13), generator=g)
    labels[0, :4] = -100
    candidates = torch.randint(0, VOCAB, (40,), generator=g)
    results = []
    for weight in (head_weight(head), dense):
        h = hidden.clone().requires_grad_()
        loss = vocab_subset_cross_entropy(h, weight, labels, candidates, chunk_size=7)
        loss.backward()
        results.append((loss.detach(), h.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
    # and the whole vocabulary as candidates: the exact loss on W_hat
    whole = vocab_subset_cross_entropy(hidden, head_weight(head), labels, torch.arange(VOCAB))
    torch.testing.assert_close(whole, linear_cross_entropy(hidden, dense, labels), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_bytes", [16 << 20, 40 * 72 * 4 + 4])  # one block; 40-row blocks (301 = 7 x 40 + 21)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_exact_loss_over_a_quantized_head_never_needs_its_dense_copy(monkeypatch, block_bytes, reduction):
    """linear_cross_entropy takes the QuantizedWeight itself and dequantizes it a block of rows at a time:
    the loss and grad(hidden) equal those over the dense W_hat, and the dense copy is never made."""
    import importlib

    lce = importlib.import_module("leantune.losses.linear_cross_entropy")  # the module, not the function

    monkeypatch.setattr(lce, "_CAST_BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(4)
    head = QuantLinear.from_linear(torch.nn.Linear(72, VOCAB, bias=False), bits=8, group_size=32)
    hidden = torch.randn(2, 17, 72, generator=g)
    labels = torch.randint(0, VOCAB, (2, 17), generator=g)
    labels[1, 3:9] = -100
    weights = torch.rand(2, 17, generator=g)
    calls = []
    qw = head_weight(head)
    real_slice = type(qw).row_slice
    monkeypatch.setattr(type(qw), "row_slice", lambda self, a, b, dtype=torch.float32:
                        calls.append(b - a) or real_slice(self, a, b, dtype))
    out = []
    for weight in (qw, dense_head_weight(head)):
        h = hidden.clone().requires_grad_()
        loss = linear_cross_entropy(h, weight, labels, chunk_size=5, weights=weights, reduction=reduction)
        loss.backward()
        out.append((loss.detach(), h.grad))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-5, atol=1e-6)
    assert calls and max(calls) == min(VOCAB, max(1, block_bytes // (72 * 4)))  # never more rows than a block
    empty = linear_cross_entropy(hidden, qw, torch.full_like(labels, -100))  # nothing kept: a zero loss
    assert float(empty) == 0.0


@pytest.mark.parametrize("tie", [True, False])
def test_dequantize_model_restores_embeddings_and_the_tie(tie):
    model = tiny_model(vocab_size=VOCAB, tie=tie)
    quantize_model(model, 4, 32)
    quantize_embeddings(model, 4, 32)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert dequantize_model(model) == 14 + 2
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert type(emb) is torch.nn.Embedding and type(head) is torch.nn.Linear
    assert (head.weight is emb.weight) == tie
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_recipe_checks_for_embedding_bits(tmp_path, tiny_model_dir, sft_data):
    with pytest.raises(RecipeError, match="quant.embedding_bits"):
        recipe_from_dict(tiny_recipe(tiny_model_dir, sft_data, tmp_path / "r", quant={"embedding_bits": 8},
                                     adapter={"method": "full"}))
    with pytest.raises(RecipeError, match="even"):
        recipe_from_dict(tiny_recipe(tiny_model_dir, sft_data, tmp_path / "r", quant={"embedding_bits": 4, "group_size": 33}))
    with pytest.raises(RecipeError, match="embedding_bits"):
        recipe_from_dict(tiny_recipe(tiny_model_dir, sft_data, tmp_path / "r", quant={"embedding_bits": 5}))


def test_embedding_bits_alone_and_mixed_with_linear_bits():
    """INT8 table over full-precision linears; INT8 table over INT4 linears: each matrix at its own bits."""
    for bits, emb_bits in ((None, 8), (4, 8)):
        quant, ref = tiny_model(vocab_size=VOCAB, tie=True), tiny_model(vocab_size=VOCAB, tie=True)
        if bits:
            quantize_model(quant, bits, 32)
        quantize_embeddings(quant, emb_bits, 32)
        assert fake_quantize_model(ref, bits, 32, embedding_bits=emb_bits) == (14 if bits else 0) + 1
        assert quant.get_input_embeddings().bits == emb_bits
        ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(quant(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vocab_subset,embedding_bits", [(None, 8), (32, 4)])
def test_cli_run_with_quantized_embeddings_trains_evaluates_and_exports(tmp_path, tied_model_dir, sft_data, vocab_subset,
                                                                        embedding_bits):
    """A tied model, INT4 linears, INT8/INT4 table: the run trains (exact or subset loss), bills the table's bytes, and
    `leantune eval`'s loader / the merged export give the trained model's logits."""
    from transformers import AutoModelForCausalLM

    from leantune.cli import main
    from leantune.eval.evaluate import load_for_eval
    from leantune.train.sft import train

    run = tmp_path / "run"
    raw = tiny_recipe(tied_model_dir, sft_data, run, quant={"bits": 4, "group_size": 32, "embedding_bits": embedding_bits},
                      loss={"vocab_subset": vocab_subset, "vocab_subset_source": "frequency"})
    result = train(recipe_from_dict(raw), quiet=True)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses)
    assert all(p.abs().sum() > 0 for n, p in result.model.named_parameters() if "lora_B" in n)  # it trained
    lm = result.model.base_model.model
    assert isinstance(lm.get_input_embeddings(), QuantEmbedding)
    assert lm.get_output_embeddings().qweight is lm.get_input_embeddings().qweight
    quant = result.ledger["extra"]["quant"]
    vocab, hidden = lm.get_input_embeddings().num_embeddings, lm.get_input_embeddings().embedding_dim
    assert quant["layers"] == 14 + 2 and quant["bytes_before"] >= vocab * hidden * 4

    ids = torch.tensor([[5, 17, 33, 2, 99, 250]])
    with torch.no_grad():
        expected = result.model.eval()(input_ids=ids).logits
        loaded, _ = load_for_eval(str(run))
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert main(["export", str(run), "--merged", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()  # still tied
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_rl_sampling_and_logprobs_over_a_quantized_head_equal_the_fake_quantized_model():
    """Rollouts and the update's token log-probs read a quantized head through a dense transient copy:
    the same samples and log-probs as the full-precision model on W_hat."""
    from leantune.models.tiny import tiny_tokenizer
    from leantune.rl.rollout import completion_logprobs, sample_groups

    tok = tiny_tokenizer(chat_template=True)
    quant, ref = tiny_model(vocab_size=len(tok), tie=True), tiny_model(vocab_size=len(tok), tie=True)
    quantize_model(quant, 4, 32)
    quantize_embeddings(quant, 4, 32)
    fake_quantize_model(ref, 4, 32, embedding_bits=4)
    outs = []
    for model in (quant, ref):
        ro = sample_groups(model, tok, ["What is 2 + 3?", "hi"], group_size=3, max_new_tokens=8, temperature=0.9,
                           generator=torch.Generator().manual_seed(1))
        logps, _, mask = completion_logprobs(model, ro.prompt_ids, ro.completion_ids, pad_id=tok.pad_token_id,
                                             temperature=0.9, chunk_size=4)
        outs.append((ro, logps, mask))
    (qro, qlp, qmask), (rro, rlp, _) = outs
    assert qro.completion_ids == rro.completion_ids and sum(map(len, qro.completion_ids)) > 0
    keep = qmask.bool()
    torch.testing.assert_close(qlp[keep], rlp[keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_a_large_quant_linear_is_dequantized_in_row_blocks(monkeypatch, bias):
    """Over _BLOCK_BYTES a QuantLinear (the LM head in generation) works block by block: the same output
    and grad(x) as the single-matrix path, with no block wider than the limit."""
    import leantune.quant.weight_only as wo

    head = QuantLinear.from_linear(torch.nn.Linear(72, VOCAB, bias=bias), bits=4, group_size=32)
    x = torch.randn(3, 5, 72, generator=torch.Generator().manual_seed(5))
    results, seen, real = [], [], wo._dequantize_parts
    monkeypatch.setattr(wo, "_dequantize_parts", lambda q, *a: seen.append(q.shape[0]) or real(q, *a))
    for block in (16 << 20, 40 * 72 * 4):  # everything at once; 40 rows at a time (301 = 7 x 40 + 21)
        monkeypatch.setattr(wo, "_BLOCK_BYTES", block)
        seen.clear()
        xi = x.clone().requires_grad_()
        y = head(xi)
        y.square().sum().backward()
        results.append((y.detach(), xi.grad))
        assert max(seen) == (VOCAB if block > 40 * 72 * 4 else 40)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-4)
