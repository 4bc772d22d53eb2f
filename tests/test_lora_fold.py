"""`folded_adapter`: sampling with W + (alpha/r) B A in one weight equals the adapter's own forward, and
leaving restores the model bit for bit."""

from __future__ import annotations

import pytest
import torch

from leantune.adapters.lora import apply_adapter, folded_adapter
from leantune.config import AdapterConfig
from leantune.models.tiny import tiny_model


def _lora_model(targets=("q_proj", "v_proj", "o_proj", "gate_proj"), seed=0):
    model = apply_adapter(tiny_model(vocab_size=97, hidden_size=48, seed=seed),
                          AdapterConfig(r=3, alpha=5, target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # PEFT starts B at zero; give the adapter a real delta
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _snapshot(model):
    return {n: (p, p.detach().clone()) for n, p in model.named_parameters()}


def _assert_restored(model, before):
    """The same Parameter objects as in ``before``, with bit-identical values."""
    now = dict(model.named_parameters())
    for name, (param, value) in before.items():
        assert now[name] is param and torch.equal(now[name], value), name


def test_folded_forward_matches_the_adapter_and_restores_exactly():
    model = _lora_model()
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(2))
    before = _snapshot(model)
    with torch.no_grad():
        ref = model(input_ids=ids).logits  # (3, 11, V), adapter on, unfolded
        with folded_adapter(model) as folded:
            assert folded
            swapped = dict(model.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
            assert swapped is not before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"][0]
            got = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    _assert_restored(model, before)
    assert torch.equal(after, ref)  # adapter back on, unfolded


def test_the_fold_changes_the_output_of_the_base():
    """The folded weights carry the adapter: with the adapter disabled and no fold, the output differs."""
    model = _lora_model()
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with folded_adapter(model):
            folded = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert (folded - base).abs().max() > 1e-3


def test_an_error_inside_restores_the_weights():
    model = _lora_model()
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), folded_adapter(model):
        raise RuntimeError("boom")
    _assert_restored(model, before)
    assert all(not m.disable_adapters for m in model.modules() if hasattr(m, "disable_adapters") and hasattr(m, "lora_A"))


def test_nothing_to_fold_is_a_no_op():
    plain = tiny_model(vocab_size=97, hidden_size=48)
    with folded_adapter(plain) as folded:
        assert not folded
    from leantune.quant import quantize_model

    base = tiny_model(vocab_size=97, hidden_size=48)
    quantize_model(base, 8, 16, skip=["lm_head"])
    model = apply_adapter(base, AdapterConfig(r=2, alpha=4, target_modules=["q_proj"]))
    before = _snapshot(model)
    with folded_adapter(model) as folded:
        assert not folded  # a quantized base is not folded (that would need a full-precision copy)
        assert all(dict(model.named_parameters())[n] is p for n, (p, _) in before.items())


def test_nested_or_disabled_folds_add_nothing():
    """Inside a fold (or disable_adapter) the adapter is off: a second fold must not add the delta twice."""
    model = _lora_model()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        with folded_adapter(model):
            once = model(input_ids=ids).logits
            with folded_adapter(model) as again:
                assert not again
                twice = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
            with folded_adapter(model) as folded:
                assert not folded
                still_base = model(input_ids=ids).logits
    assert torch.equal(once, twice) and torch.equal(base, still_base)
