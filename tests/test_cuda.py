"""leantune on a CUDA device: equivalence with plain PyTorch references and with the same run on the CPU.

Tests marked ``cuda`` skip themselves where torch sees no CUDA device (``tests/conftest.py``); run them with
``pytest -m cuda -q`` on a GPU machine (``benchmarks/gpu_check.py`` does, and reports the counts). The
unmarked tests at the top check the device plumbing that can be checked on a CPU-only machine.

Tolerances, per dtype: fp32 compares against a float64 CPU reference at rtol 1e-4 / atol 1e-5 (TF32 off;
cuBLAS sums in another order than the CPU); bf16 inputs are computed in fp32 by the losses, so values keep
fp32 accuracy, while gradients returned in bf16 carry bf16 rounding (rtol / atol 2e-2).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_recipe, write_jsonl
from leantune.config import recipe_from_dict
from leantune.losses import linear_cross_entropy, linear_token_logprobs

CUDA = torch.device("cuda", 0)
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}
VALUE_TOL = {"rtol": 1e-4, "atol": 1e-5}  # loss / logp values: fp32 math for fp32 and bf16 inputs alike


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch):
    """fp32 matmuls in full fp32 (the default; pinned so a site-wide setting cannot loosen the tests)."""
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Device plumbing checkable on the CPU (not CUDA-marked)


def test_to_device_is_a_no_op_on_the_cpu_and_moves_every_key_elsewhere(tiny_model_dir, sft_data, tmp_path):
    from leantune.train.session import RunSession

    session = RunSession(recipe_from_dict(tiny_recipe(tiny_model_dir, sft_data, tmp_path / "run")), "train")
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "loss_weights": torch.ones(2, 3)}
    session.device = torch.device("cpu")
    assert session.to_device(batch) is batch  # the same dict, no copy
    session.device = torch.device("meta")  # any other device: every tensor goes there
    moved = session.to_device(batch)
    assert moved.keys() == batch.keys() and all(v.device.type == "meta" for v in moved.values())
    assert all(v.device.type == "cpu" for v in batch.values())


@pytest.mark.parametrize("command", ["train", "rl"])
def test_a_cuda_recipe_without_cuda_fails_before_any_run_directory(monkeypatch, tiny_model_dir, sft_data, tmp_path,
                                                                   command):
    """train.device=cuda on a machine without one: the clear error, and nothing written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    raw = tiny_recipe(tiny_model_dir, sft_data, out, train={"device": "cuda"}, model={"dtype": "float32"})
    if command == "rl":
        raw["data"] = {"max_length": 64}
        raw["rl"] = {"task": "addition", "num_prompts": 4, "group_size": 2, "prompts_per_step": 1, "max_new_tokens": 4}
    recipe = recipe_from_dict(raw)
    if command == "train":
        from leantune.train.sft import train as run
    else:
        from leantune.train.rl import train_rl as run
    with pytest.raises(ValueError, match="no CUDA device"):
        run(recipe, quiet=True)
    assert not out.exists()


def test_retie_quantized_head_after_a_device_move():
    """Module.to converts each module's buffers on their own, untying a quantized tied head; the re-tie
    restores one set of codes, the same outputs, and a tied export. Checked on the CPU with a dtype move
    (float buffers are converted per module just as a device move converts all of them)."""
    from leantune.models.tiny import tiny_model
    from leantune.quant import dequantize_model, quantize_embeddings, retie_quantized_head

    model = tiny_model(tie=True)
    quantize_embeddings(model, 8, 32)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert head.scale is emb.scale
    ids = torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    model.to(torch.float64)
    assert head.scale is not emb.scale and torch.equal(head.scale, emb.scale)  # untied: a second copy
    with torch.no_grad():
        before = model(ids).logits
    assert retie_quantized_head(model)
    assert all(getattr(head, n) is getattr(emb, n) for n in ("qweight", "scale", "offset"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    dequantize_model(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not retie_quantized_head(tiny_model())  # nothing quantized: a no-op


# ----------------------------------------------------------------------------------------------
# Losses on CUDA vs a plain PyTorch reference (odd shapes, forward and every gradient)


def _ce_reference(hidden, weight, labels, weights):
    """Weighted mean cross-entropy in float64 on the CPU: (hidden @ weight.T) materialized."""
    h, w = hidden.detach().cpu().double().requires_grad_(), weight.detach().cpu().double().requires_grad_()
    per_tok = F.cross_entropy((h @ w.T).flatten(0, -2), labels.cpu().flatten(), ignore_index=-100, reduction="none")
    wt = weights.cpu().double().flatten() * (labels.cpu().flatten() != -100)
    loss = (per_tok * wt).sum() / wt.sum()
    loss.backward()
    return loss, h.grad, w.grad


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("b", "t", "h", "v", "chunk"), [(3, 47, 31, 123, 13), (2, 5, 64, 1031, 7), (1, 1, 8, 17, 4)])
@pytest.mark.parametrize("train_head", [False, True], ids=["frozen_head", "trained_head"])
def test_linear_cross_entropy_on_cuda_matches_reference(dtype, b, t, h, v, chunk, train_head):
    g = torch.Generator().manual_seed(b * 1000 + t)
    hidden = torch.randn(b, t, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < 0.3] = -100
    labels.view(-1)[0] = 1  # at least one kept token
    weights = torch.rand(b, t, generator=g) + 0.5
    ref, ref_gh, ref_gw = _ce_reference(hidden, weight, labels, weights)

    hc = hidden.to(CUDA).requires_grad_()
    wc = weight.to(CUDA).requires_grad_(train_head)
    loss = linear_cross_entropy(hc, wc, labels.to(CUDA), weights=weights.to(CUDA), chunk_size=chunk)
    loss.backward()
    assert loss.device.type == "cuda" and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double().cpu(), ref, **VALUE_TOL)
    assert hc.grad.dtype == dtype
    torch.testing.assert_close(hc.grad.double().cpu(), ref_gh, **TOL[dtype])
    if train_head:
        assert wc.grad.dtype == dtype
        torch.testing.assert_close(wc.grad.double().cpu(), ref_gw, **TOL[dtype])
    else:
        assert wc.grad is None


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("k", "h", "v", "chunk", "tau"), [(37, 31, 123, 13, 0.7), (5, 64, 1031, 2, 1.0)])
@pytest.mark.parametrize("train_head", [False, True], ids=["frozen_head_jacobian", "trained_head_recompute"])
def test_linear_token_logprobs_on_cuda_matches_reference(dtype, k, h, v, chunk, tau, train_head):
    g = torch.Generator().manual_seed(k)
    hidden = torch.randn(k, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    targets = torch.randint(0, v, (k,), generator=g)
    upstream = torch.randn(k, generator=g)

    hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref_all = torch.log_softmax(hr @ wr.T / tau, -1)
    ref = ref_all.gather(1, targets[:, None]).squeeze(1)
    ref_ent = -(ref_all.exp() * ref_all).sum(-1)
    (ref * upstream.double()).sum().backward()

    hc = hidden.to(CUDA).requires_grad_()
    wc = weight.to(CUDA).requires_grad_(train_head)
    logps, ent = linear_token_logprobs(hc, wc, targets.to(CUDA), chunk_size=chunk, temperature=tau)
    (logps * upstream.to(CUDA)).sum().backward()
    torch.testing.assert_close(logps.double().cpu(), ref.detach(), **VALUE_TOL)
    torch.testing.assert_close(ent.double().cpu(), ref_ent.detach(), **VALUE_TOL)
    torch.testing.assert_close(hc.grad.double().cpu(), hr.grad, **TOL[dtype])
    if train_head:
        torch.testing.assert_close(wc.grad.double().cpu(), wr.grad, **TOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("source", ["frequency", "embedding"])
def test_vocab_subset_builders_and_loss_on_cuda(source):
    """Candidates built on the CPU (or from a CUDA head) join CUDA labels; the subset loss equals the exact one
    when the subset is the whole vocabulary, on CUDA as on the CPU."""
    from leantune.losses import vocab_subset, vocab_subset_cross_entropy
    from leantune.losses.vocab_subset import build_candidates, softmax_mass, token_counts

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 9, 16, generator=g), torch.randn(41, 16, generator=g)
    labels = torch.randint(0, 41, (2, 9), generator=g)
    counts = token_counts(labels.tolist(), 41)
    cands = build_candidates(source, 8, weight=weight.to(CUDA), all_counts=counts, target_counts=counts)
    assert torch.equal(cands, build_candidates(source, 8, weight=weight, all_counts=counts, target_counts=counts))
    subset = vocab_subset(cands, [labels.to(CUDA)])
    assert subset.device.type == "cuda"
    cpu = vocab_subset_cross_entropy(hidden, weight, labels, cands)
    gpu = vocab_subset_cross_entropy(hidden.to(CUDA), weight.to(CUDA), labels.to(CUDA), cands)
    torch.testing.assert_close(gpu.cpu(), cpu, **VALUE_TOL)
    whole = vocab_subset_cross_entropy(hidden.to(CUDA), weight.to(CUDA), labels.to(CUDA), torch.arange(41))
    torch.testing.assert_close(whole, linear_cross_entropy(hidden.to(CUDA), weight.to(CUDA), labels.to(CUDA)), **VALUE_TOL)
    mass = softmax_mass(hidden.flatten(0, 1).to(CUDA), weight.to(CUDA))
    torch.testing.assert_close(mass, softmax_mass(hidden.flatten(0, 1), weight), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Weight-only quantization


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("out_f", "in_f", "group"), [(45, 77, 32), (70001, 64, 64)], ids=["odd", "blocked_rows"])
def test_quant_linear_on_cuda_equals_cpu_and_the_dequantized_reference(bits, out_f, in_f, group):
    """The second shape (an LM-head-sized (V, H)) takes the dequantize-a-block-of-rows path in forward and backward."""
    from leantune.quant import QuantLinear, dequantize

    g = torch.Generator().manual_seed(bits)
    lin = torch.nn.Linear(in_f, out_f, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(out_f, generator=g))
    cpu = QuantLinear.from_linear(lin, bits, group)
    gpu = QuantLinear.from_linear(lin, bits, group).to(CUDA)
    x = torch.randn(3, 5, in_f, generator=g)
    up = torch.randn(3, 5, out_f, generator=g)

    xc, xg = x.clone().requires_grad_(), x.clone().to(CUDA).requires_grad_()
    yc, yg = cpu(xc), gpu(xg)
    (yc * up).sum().backward()
    (yg * up.to(CUDA)).sum().backward()
    assert yg.device.type == "cuda"
    assert torch.equal(gpu.qweight.cpu(), cpu.qweight)  # the same codes whichever device holds them
    torch.testing.assert_close(yg.cpu(), yc, **TOL[torch.float32])
    torch.testing.assert_close(xg.grad.cpu(), xc.grad, **TOL[torch.float32])
    w_hat = dequantize(cpu.quantized()).double()  # the reference: a plain linear on W_hat
    xr = x.double().requires_grad_()
    (F.linear(xr, w_hat, lin.bias.detach().double()) * up.double()).sum().backward()
    torch.testing.assert_close(yg.double().cpu(), F.linear(x.double(), w_hat, lin.bias.detach().double()),
                               **TOL[torch.float32])
    torch.testing.assert_close(xg.grad.double().cpu(), xr.grad, **TOL[torch.float32])


@pytest.mark.cuda
def test_quantized_tied_embedding_on_cuda_is_retied_and_equals_cpu():
    from leantune.models.tiny import tiny_model
    from leantune.quant import quantize_embeddings, quantize_model, retie_quantized_head

    model = tiny_model(tie=True)
    quantize_model(model, 4, 32)
    quantize_embeddings(model, 4, 32)
    ids = torch.randint(3, 512, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    model.to(CUDA)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert head.qweight.data_ptr() != emb.qweight.data_ptr()  # Module.to copied the shared codes twice
    assert retie_quantized_head(model)
    assert head.qweight.data_ptr() == emb.qweight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model(ids.to(CUDA)).logits.cpu(), ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# MeZO


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mezo_perturb_restore_is_bit_exact_on_cuda(dtype):
    from leantune.optim import MeZO

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(n, generator=g) * s).to(dtype).to(CUDA))
              for n, s in ((4097, 0.02), (333, 1.0), (50, 1e-4))]
    with torch.no_grad():  # values plain float arithmetic cannot restore
        params[0][:6] = torch.tensor([-0.0, 1e-40, -3e-30, 7e-6, 0.5, 1.0]).to(dtype)
        params[2].zero_()
    before = [p.detach().clone() for p in params]
    opt = MeZO(params, lr=1e-3, eps=1e-3, samples=2, chunk_numel=1000)
    seen = []

    def objective():
        seen.append(any(not torch.equal(p, b) for p, b in zip(params, before)))
        return float(sum((p.float() ** 2).sum() for p in params))

    opt.estimate_gradient(objective)
    assert len(seen) == 4 and all(seen)
    bits = {4: torch.int32, 2: torch.int16}[params[0].element_size()]
    for p, b in zip(params, before):
        assert p.device.type == "cuda"
        assert torch.equal(p.detach().view(bits), b.view(bits)), "not bit-identical after restore"


# ----------------------------------------------------------------------------------------------
# Whole runs: SFT on CUDA == SFT on the CPU; RL completes on CUDA


def _sft_losses(tiny_model_dir, sft_data, out, device, train=None, **sections):
    from leantune.train.sft import train as run

    raw = tiny_recipe(tiny_model_dir, sft_data, out, model={"dtype": "float32"},
                      train={"device": device, "steps": 3, **(train or {})}, **sections)
    result = run(recipe_from_dict(raw), quiet=True)
    return [m["loss"] for m in _metrics(out) if "loss" in m], result.ledger


SFT_VARIANTS = {
    "plain": {},
    "checkpointed": {"train": {"activation_checkpointing": "all"}},
    "int4_vocab_subset": {"quant": {"bits": 4, "group_size": 32, "embedding_bits": 8},
                          "loss": {"vocab_subset": 64, "vocab_subset_source": "probability"}},
}


@pytest.mark.cuda
@pytest.mark.parametrize("variant", list(SFT_VARIANTS))
def test_sft_on_cuda_gives_the_cpu_losses(tiny_model_dir, sft_data, tmp_path, variant):
    """Per-step losses of 3 fp32 steps agree (rtol 1e-3): the run computes the same thing on either device."""
    cpu_losses, cpu_ledger = _sft_losses(tiny_model_dir, sft_data, tmp_path / "cpu", "cpu", **SFT_VARIANTS[variant])
    gpu_losses, gpu_ledger = _sft_losses(tiny_model_dir, sft_data, tmp_path / "cuda", "cuda", **SFT_VARIANTS[variant])
    assert len(gpu_losses) == len(cpu_losses) == 3
    torch.testing.assert_close(torch.tensor(gpu_losses), torch.tensor(cpu_losses), rtol=1e-3, atol=1e-4)
    assert gpu_ledger["extra"]["device"].startswith("cuda")
    assert cpu_ledger["extra"]["device"] == "cpu"
    peak = gpu_ledger["totals"]["cuda_max_allocated_bytes"]
    assert isinstance(peak, int) and 0 < peak <= torch.cuda.max_memory_allocated()


@pytest.mark.cuda
def test_mezo_sft_run_on_cuda_completes(tiny_model_dir, sft_data, tmp_path):
    losses, ledger = _sft_losses(tiny_model_dir, sft_data, tmp_path / "zo", "cuda",
                                 optim={"name": "mezo", "lr": 1e-3, "zo_eps": 1e-3})
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert ledger["extra"]["device"].startswith("cuda")


@pytest.mark.cuda
def test_sample_categorical_takes_a_cpu_generator_with_cuda_probabilities():
    """train_rl and sampled_accuracy pass a CPU torch.Generator; rollouts run on the training device."""
    from leantune.rl.rollout import sample_categorical

    probs = torch.tensor([[0.0, 3.0, 1.0]], device=CUDA).expand(64, 3)
    draws = sample_categorical(probs, torch.Generator().manual_seed(0))
    assert draws.device.type == "cuda" and int((draws == 0).sum()) == 0


@pytest.mark.cuda
def test_rl_run_on_cuda_completes_and_the_ledger_says_the_device(tiny_chat_model_dir, tmp_path):
    from leantune.train.rl import train_rl

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say something about {w}.", "answer": str(i)}
                                                      for i, w in enumerate(["cats", "dogs", "rain", "sun", "tea"])])
    out = tmp_path / "rl"
    raw = {"model": {"path": str(tiny_chat_model_dir), "dtype": "float32"}, "data": {"train": str(prompts)},
           "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
           "loss": {"chunk_size": 16}, "optim": {"lr": 1e-2},
           "train": {"steps": 2, "micro_batch_size": 4, "seed": 0, "output_dir": str(out), "progress": False,
                     "device": "cuda"},
           "rl": {"rewards": {"rl_helpers:has_digit": 1.0}, "group_size": 2, "prompts_per_step": 2,
                  "max_new_tokens": 8, "overlong_filter": False}}
    result = train_rl(recipe_from_dict(raw), quiet=True)
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["totals"]["steps"] == 2 == result.ledger["totals"]["steps"]
    assert ledger["extra"]["device"].startswith("cuda")
    assert ledger["totals"]["cuda_max_allocated_bytes"] > 0
    assert ledger["totals"]["rollouts"]["rollouts_generated"] >= 2 * 2
    assert all(p.device.type == "cuda" for p in result.model.parameters())
