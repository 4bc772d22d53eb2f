"""Weight-only INT4/INT8 quantization (leantune.quant): error bound, exact forward/backward against a
plain-PyTorch reference on odd shapes, what autograd saves, memory, and LoRA (PEFT) on top."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F

from leantune.quant import (
    QuantLinear,
    QuantMergeError,
    available_gpu_backend,
    dequantize,
    dequantize_model,
    fake_quantize_model,
    quantize_groupwise,
    quantize_model,
    register_quant_lora,
)
from leantune.quant import weight_only

torch.set_num_threads(1)

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _group_scale(qw, n_in):
    """The stored scale of each element's group, as an (out, in) matrix."""
    return qw.scale.float().repeat_interleave(qw.group_size, dim=1)[:, :n_in]


# ----------------------------------------------------------------------------------------------
# quantize_groupwise / dequantize


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,group_size", [((16, 64), 32), ((16, 128), 64), ((8, 256), 128),
                                              ((5, 123), 32), ((7, 123), 64), ((3, 123), 128), ((4, 10), 6)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_error_bound_per_element(bits, shape, group_size, scale_dtype):
    g = torch.Generator().manual_seed(0)
    out, n_in = shape
    w = torch.randn(out, n_in, generator=g) * torch.logspace(-2, 1, out).unsqueeze(1) + 0.3  # varied ranges
    qw = quantize_groupwise(w, bits, group_size, scale_dtype)

    n_groups = -(-n_in // qw.group_size)
    assert qw.group_size == min(group_size, n_in + (n_in % 2 if bits == 4 else 0))
    assert qw.qweight.dtype == torch.uint8
    assert qw.qweight.shape == (out, n_groups * qw.group_size // (2 if bits == 4 else 1))
    assert qw.scale.shape == qw.offset.shape == (out, n_groups)
    assert qw.scale.dtype == qw.offset.dtype == scale_dtype

    w_hat = dequantize(qw, torch.float32)
    assert w_hat.shape == (out, n_in)
    slack = 4 * torch.finfo(torch.float32).eps * w.abs().clamp_min(1.0)
    err = (w - w_hat).abs()
    assert (err <= _group_scale(qw, n_in) / 2 + slack).all(), float((err - _group_scale(qw, n_in) / 2).max())
    # the bound is not vacuous: scale is the group's range over 2**bits - 1 (up to bf16 rounding)
    rng = w.max(1).values - w.min(1).values
    assert (qw.scale.float().max(1).values <= rng / (2**bits - 1) * 1.02 + 1e-6).all()


def test_constant_groups_and_extremes_are_exact():
    w = torch.tensor([[0.5] * 8, [-2.0] * 4 + [3.0] * 4])
    for bits in (4, 8):
        qw = quantize_groupwise(w, bits, group_size=4)
        w_hat = dequantize(qw)
        assert torch.equal(w_hat[0], w[0])  # constant group: offset alone
        # min and max of a group sit on the grid: ends exact up to fp rounding
        assert torch.allclose(w_hat[1], w[1], atol=1e-6)


def test_bad_arguments_say_what_to_do():
    w = torch.randn(4, 16)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_groupwise(w, 3, 8)
    with pytest.raises(ValueError, match="group_size must be even"):
        quantize_groupwise(w, 4, 5)
    with pytest.raises(ValueError, match="positive integer"):
        quantize_groupwise(w, 8, 0)
    with pytest.raises(ValueError, match=r"\(out, in\) matrix"):
        quantize_groupwise(torch.randn(16), 8, 8)
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_groupwise(torch.tensor([[1.0, float("nan")]]), 8, 2)
    assert quantize_groupwise(w, 8, 5).group_size == 5  # odd groups are fine at 8 bits


def test_int4_packs_two_codes_per_byte():
    w = torch.randn(32, 256)
    q4, q8 = quantize_groupwise(w, 4, 64), quantize_groupwise(w, 8, 64)
    assert q4.qweight.numel() == w.numel() // 2 and q8.qweight.numel() == w.numel()
    assert q4.nbytes == w.numel() // 2 + 2 * 4 * 32 * 4  # codes + fp32 scale and offset per group


# ----------------------------------------------------------------------------------------------
# QuantLinear: forward and backward against F.linear(x, dequantize(...))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_quant_linear_matches_reference(bits, bias, dtype, tol):
    torch.manual_seed(0)
    linear = torch.nn.Linear(123, 37, bias=bias)  # odd shapes: 123 = 1 group of 64 + padded 59
    quant = QuantLinear.from_linear(linear, bits, group_size=64)
    assert list(quant.parameters()) == []  # nothing to train
    assert quant.in_features == 123 and quant.out_features == 37

    x = torch.randn(5, 7, 123, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = dequantize(quant.quantized(), dtype)
    b_ref = None if quant.bias is None else quant.bias.to(dtype)
    if bias:
        quant.bias = quant.bias.to(dtype)

    y = quant(x)
    y_ref = F.linear(x_ref, w_ref, b_ref)
    assert y.shape == (5, 7, 37) and y.dtype == dtype
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)

    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=tol, rtol=tol)


def test_quant_linear_bias_gradient_when_asked():
    torch.manual_seed(0)
    quant = QuantLinear.from_linear(torch.nn.Linear(20, 6), 8, group_size=8)
    quant.bias.requires_grad_(True)
    x = torch.randn(3, 20)
    quant(x).sum().backward()
    torch.testing.assert_close(quant.bias.grad, torch.full((6,), 3.0))


def test_backward_saves_only_the_quantized_buffers():
    """Between forward and backward autograd holds the codes and scales, not an (out, in) float W."""
    torch.manual_seed(0)
    quant = QuantLinear.from_linear(torch.nn.Linear(96, 40), 4, group_size=32)
    x = torch.randn(2, 5, 96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = quant(x)
    assert {(t.dtype, tuple(t.shape)) for t in saved} == {
        (torch.uint8, (40, 48)), (torch.float32, (40, 3)),
    }
    buffers = {quant.qweight.data_ptr(), quant.scale.data_ptr(), quant.offset.data_ptr()}
    assert {t.data_ptr() for t in saved} == buffers and len(saved) == 3  # the buffers themselves, no copies
    assert not any(t.is_floating_point() and t.numel() >= 40 * 96 for t in saved)
    y.sum().backward()
    assert x.grad is not None

    # for contrast, a frozen fp nn.Linear keeps its full (out, in) weight (as W^T) for backward
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.nn.Linear(96, 40).requires_grad_(False)(x)
    assert [t.numel() for t in saved] == [40 * 96]


# ----------------------------------------------------------------------------------------------
# Whole models


def _tiny():
    from leantune.models.tiny import tiny_model

    return tiny_model()


def _linear_bytes(model, names):
    total = 0
    for name in names:
        m = model.get_submodule(name)
        total += sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
    return total


@pytest.mark.parametrize("bits,limit", [(4, 0.16), (8, 0.3)])
def test_quantize_model_memory(bits, limit):
    model = _tiny()
    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in PROJ]
    assert len(names) == 2 * len(PROJ)
    fp32_bytes = _linear_bytes(model, names)

    stats = quantize_model(model, bits, group_size=64, skip=["lm_head"])
    assert stats.layers == len(names)
    assert stats.bytes_before == fp32_bytes
    assert stats.bytes_after == _linear_bytes(model, names)  # measured from the modules, not trusted
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    assert type(model.lm_head) is torch.nn.Linear
    assert stats.ratio <= limit, stats.as_dict()
    print(f"\nINT{bits} g64: linear bytes {stats.bytes_before} -> {stats.bytes_after} (x{stats.ratio:.4f})")


def test_quantize_model_frees_each_weight_as_it_goes(monkeypatch):
    """When layer k is quantized, the fp weights of layers 0..k-1 are gone (freed by reference
    counting, no garbage collection needed): never two copies."""
    model = _tiny()
    refs = [weakref.ref(model.get_submodule(n).weight) for n, _ in model.named_modules()
            if n.rsplit(".", 1)[-1] in PROJ]
    alive_before_each_call = []
    real = weight_only.quantize_groupwise

    def spy(w, *args, **kwargs):
        alive_before_each_call.append(sum(r() is not None for r in refs))
        return real(w, *args, **kwargs)

    monkeypatch.setattr(weight_only, "quantize_groupwise", spy)
    quantize_model(model, 4, 64)
    n = len(refs)
    assert alive_before_each_call == list(range(n, 0, -1))  # one fewer fp weight per layer done
    assert all(r() is None for r in refs)


def test_quantize_model_refuses_a_lora_model():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="before apply_adapter"):
        quantize_model(model, 4, 64)


def _lora(model, seed=0):
    from peft import LoraConfig, get_peft_model

    cfg = register_quant_lora(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="none",
                                         task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # B = 0 at init would hide the adapter; make it non-trivial
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return peft_model


def _copy_lora(src, dst):
    dst_params = dict(dst.named_parameters())
    with torch.no_grad():
        for n, p in src.named_parameters():
            if "lora_" in n:
                dst_params[n].copy_(p)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 512, (2, 11), generator=g)


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_quantized_base_equals_lora_on_dequantized_weights(bits):
    from leantune.quant.weight_only import QuantLoraLinear

    quant_model = _tiny()
    quantize_model(quant_model, bits, 64)
    ref_model = _tiny()  # same seed; each weight replaced by W_hat, computed from the quant buffers
    with torch.no_grad():
        for name, m in quant_model.named_modules():
            if isinstance(m, QuantLinear):
                ref_model.get_submodule(name).weight.copy_(dequantize(m.quantized()))
    qlora, rlora = _lora(quant_model), _lora(ref_model, seed=1)
    _copy_lora(qlora, rlora)
    assert isinstance(qlora.base_model.model.model.layers[0].self_attn.q_proj, QuantLoraLinear)

    ids = _batch()
    qlora.train(), rlora.train()
    q_logits = qlora(input_ids=ids).logits  # (B, T, V)
    r_logits = rlora(input_ids=ids).logits
    torch.testing.assert_close(q_logits, r_logits, atol=1e-5, rtol=1e-5)
    q_logits.float().logsumexp(-1).mean().backward()
    r_logits.float().logsumexp(-1).mean().backward()

    trainable = {n: p for n, p in qlora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    r_params = dict(rlora.named_parameters())
    for n, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
        torch.testing.assert_close(p.grad, r_params[n].grad, atol=1e-5, rtol=1e-4)


def test_merge_is_refused_on_codes_and_works_after_dequantize():
    model = _tiny()
    quantize_model(model, 4, 64)
    qlora = _lora(model).eval()
    ids = _batch()
    with torch.no_grad():
        expected = qlora(input_ids=ids).logits
    with pytest.raises(QuantMergeError, match="dequantize_model"):
        qlora.merge_and_unload()

    assert dequantize_model(qlora) == 2 * len(PROJ)
    merged = qlora.merge_and_unload()
    assert not any(isinstance(m, QuantLinear) or hasattr(m, "lora_A") for m in merged.modules())
    assert merged.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_export_path_fresh_base_fake_quantized_plus_saved_adapter(tmp_path):
    """What export does for a quantized run: load the base, put it on the grid, load the adapter."""
    from peft import PeftModel

    model = _tiny()
    quantize_model(model, 4, 64)
    qlora = _lora(model).eval()
    qlora.save_pretrained(tmp_path / "adapter")
    ids = _batch()
    with torch.no_grad():
        expected = qlora(input_ids=ids).logits

    base = _tiny()
    assert fake_quantize_model(base, 4, 64) == 2 * len(PROJ)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    from leantune.train.session import set_activation_checkpointing

    ids = _batch()
    grads = []
    for policy in ("off", "all"):
        model = _tiny()
        quantize_model(model, 4, 64)
        qlora = _lora(model)
        set_activation_checkpointing(qlora, policy)
        qlora.train()
        qlora(input_ids=ids).logits.logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in qlora.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_gpu_backend_is_optional():
    backend = available_gpu_backend()
    assert backend in (None, "torchao", "bitsandbytes")
    if not torch.cuda.is_available():
        assert backend is None
