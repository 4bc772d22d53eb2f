"""SFT loop: accumulation equivalence, checkpointing equivalence, end-to-end CLI, ledger, export."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import tiny_recipe, write_jsonl
from leantune.adapters.lora import apply_adapter
from leantune.cli import main
from leantune.config import AdapterConfig, DataConfig, SpanWeights
from leantune.data.sft import collate, load_sft_examples
from leantune.models.loading import load_model_and_tokenizer
from leantune.config import ModelConfig
from leantune.train.session import set_activation_checkpointing
from leantune.train.sft import SFTLoss, accumulate_gradients, lm_loss_sum, loss_weight_total


def _lora_model(model_dir, seed=0, dropout=0.0):
    model, tok, _ = load_model_and_tokenizer(ModelConfig(path=str(model_dir)))
    model = apply_adapter(model, AdapterConfig(r=4, alpha=8, dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"]), seed)
    # Non-zero B so that gradients reach A too (PEFT initializes B = 0).
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, tok


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulation_8x1_equals_1x8(tiny_model_dir, sft_data):
    model, tok = _lora_model(tiny_model_dir)
    examples, _ = load_sft_examples(sft_data, tok, DataConfig(train=str(sft_data), max_length=64))
    examples = examples[:8]
    w = SpanWeights(think=0.5, answer=2.0)
    model.train()
    accumulate_gradients(SFTLoss(model), [collate(examples, tok.pad_token_id, w)], chunk_size=7)
    big = _grads(model)
    model.zero_grad()
    loss_small, _ = accumulate_gradients(SFTLoss(model), [collate([e], tok.pad_token_id, w) for e in examples], chunk_size=7)
    small = _grads(model)
    for n in big:
        torch.testing.assert_close(small[n], big[n], rtol=1e-4, atol=1e-6, msg=n)
    assert any(float(g.abs().sum()) > 0 for g in big.values())


def test_step_loss_is_token_weighted_mean(tiny_model_dir, sft_data):
    """The normalized loss equals plain weighted cross-entropy on the model's own logits."""
    model, tok = _lora_model(tiny_model_dir)
    examples, _ = load_sft_examples(sft_data, tok, DataConfig(train=str(sft_data), max_length=64))
    batch = collate(examples[:5], tok.pad_token_id, SpanWeights(think=0.25))
    with torch.no_grad():
        ours = float(lm_loss_sum(model, batch, chunk_size=3)) / loss_weight_total(batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels, wts = batch["labels"][:, 1:], batch["loss_weights"][:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        ref = float((ce * wts.reshape(-1)).sum() / (wts * (labels != -100)).sum())
    assert ours == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("policy", ["all", 2])
def test_activation_checkpointing_same_gradients(tiny_model_dir, sft_data, policy):
    model, tok = _lora_model(tiny_model_dir)
    examples, _ = load_sft_examples(sft_data, tok, DataConfig(train=str(sft_data), max_length=64))
    batch = collate(examples[:4], tok.pad_token_id, SpanWeights())
    model.train()
    accumulate_gradients(SFTLoss(model), [batch], 16)
    ref = _grads(model)
    model.zero_grad()
    n = set_activation_checkpointing(model, policy)
    assert n == (2 if policy == "all" else 1)
    accumulate_gradients(SFTLoss(model), [batch], 16)
    for k, g in _grads(model).items():
        torch.testing.assert_close(g, ref[k], rtol=1e-5, atol=1e-7)


def _run_cli(tmp_path, model_dir, data_file, *extra, **sections):
    raw = tiny_recipe(model_dir, data_file, tmp_path / "run", **sections)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return main(["train", str(path), *extra]), tmp_path / "run"


def test_cli_train_end_to_end(tmp_path, tiny_model_dir, sft_data, capsys):
    from safetensors.torch import load_file

    code, run = _run_cli(tmp_path, tiny_model_dir, sft_data, "train.steps=4", "train.save_every=2",
                         data={"eval": str(sft_data)}, train={"eval_every": 2})
    assert code == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["loss"] > 0 and m["tokens_per_s"] > 0 for m in metrics)
    assert "eval_loss" in metrics[1] and "eval_loss" in metrics[3]
    # every trainable parameter changed
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    model, _ = _lora_model(tiny_model_dir)
    init = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapter, "adapter is empty"
    model0, _, _ = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    fresh = apply_adapter(model0, AdapterConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), 0)
    fresh_state = {n: p.detach().clone() for n, p in fresh.named_parameters() if p.requires_grad}
    assert len(fresh_state) == len(adapter) == len(init)
    for name, t in adapter.items():
        key = next(k for k in fresh_state if k.replace(".default", "") == name)
        assert not torch.equal(t, fresh_state[key]), f"{name} did not change"
    ledger = json.loads((run / "ledger.json").read_text())
    assert ledger["totals"]["steps"] == 4
    assert (run / "checkpoints" / "latest").read_text() == "step-00000004"


def test_ledger_counts_tokens_on_known_input(tmp_path, tiny_model_dir):
    from leantune.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    rows = [{"prompt": "What is 1 + 2?", "completion": "<think>1 + 2 = 3</think> 3"}] * 4
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    n_prompt = len(tok("What is 1 + 2?").input_ids)
    n_completion = len(tok("<think>1 + 2 = 3</think>", add_special_tokens=False).input_ids) + len(
        tok(" 3", add_special_tokens=False).input_ids) + 1  # + eos
    code, run = _run_cli(tmp_path, tiny_model_dir, data, "train.steps=2", train={"micro_batch_size": 2})
    assert code == 0
    ledger = json.loads((run / "ledger.json").read_text())
    t = ledger["totals"]
    assert t["tokens_processed"] == 2 * 2 * (n_prompt + n_completion)
    assert t["trainable_tokens"] == 2 * 2 * n_completion
    assert t["data"]["records"] == 4
    for key in ("recipe", "data_sha256", "model_hash", "versions", "hardware", "seed", "totals", "flops", "energy"):
        assert key in ledger, key
    assert t["peak_rss_bytes"] > 50 * 2**20
    assert ledger["flops"]["total"] > 0
    assert ledger["energy"]["joules"] > 0 and ledger["energy"]["method"]


def test_same_seed_same_weights(tmp_path, tiny_model_dir, sft_data):
    from safetensors.torch import load_file

    outs = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        code, run = _run_cli(tmp_path / str(i), tiny_model_dir, sft_data, adapter={"dropout": 0.1})
        assert code == 0
        outs.append(load_file(str(run / "adapter" / "adapter_model.safetensors")))
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k])


def test_existing_run_requires_resume(tmp_path, tiny_model_dir, sft_data, capsys):
    assert _run_cli(tmp_path, tiny_model_dir, sft_data)[0] == 0
    assert _run_cli(tmp_path, tiny_model_dir, sft_data)[0] == 2
    assert "--resume" in capsys.readouterr().err


def test_export_round_trips_through_peft_and_transformers(tmp_path, tiny_model_dir, sft_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    code, run = _run_cli(tmp_path, tiny_model_dir, sft_data)
    assert code == 0
    assert main(["export", str(run), "--merged", str(tmp_path / "merged"), "--adapter", str(tmp_path / "adapter")]) == 0
    from leantune.eval.evaluate import load_for_eval

    trained, tok = load_for_eval(str(run))
    ids = tok(["What is 3 + 4? <think>", "hello there"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = trained(**ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        via_peft = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(**ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(**ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(**ids).logits
    torch.testing.assert_close(via_peft, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged, ref, rtol=0, atol=1e-5)
    assert (plain - ref).abs().max() > 1e-3, "training changed nothing"


def test_bad_target_module_is_a_clear_error(tmp_path, tiny_model_dir, sft_data, capsys):
    code, _ = _run_cli(tmp_path, tiny_model_dir, sft_data, adapter={"target_modules": ["qq_proj"]})
    assert code == 2
    err = capsys.readouterr().err
    assert "qq_proj" in err and "q_proj" in err


def test_full_finetuning_runs(tmp_path, tiny_model_dir, sft_data):
    code, run = _run_cli(tmp_path, tiny_model_dir, sft_data, adapter={"method": "full"}, optim={"lr": 1e-3})
    assert code == 0
    assert (run / "model" / "model.safetensors").exists()


def test_eval_cli_on_data_and_task(tmp_path, tiny_model_dir, sft_data, capsys):
    code, run = _run_cli(tmp_path, tiny_model_dir, sft_data)
    assert code == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(sft_data)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["eval_loss"] > 0 and out["eval_ppl"] == pytest.approx(__import__("math").exp(out["eval_loss"]))
    assert out["examples"] == 24
    assert main(["eval", str(run), "--task", "arithmetic", "--num-problems", "4", "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["problems"] == 4 and 0.0 <= out["accuracy"] <= 1.0
