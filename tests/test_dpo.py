"""leantune dpo: the preference losses against TRL's own code, the shared-prefill log-probs against full logits,
the reference, and the loop (CLI end to end, accumulation, resume, precomputed reference, bad input)."""

from __future__ import annotations

import json
import typing
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import observe_lora_a, write_jsonl
from leantune.adapters.lora import apply_adapter
from leantune.cli import main
from leantune.config import AdapterConfig, DataConfig, DPOConfig, ModelConfig, RecipeError, recipe_from_dict
from leantune.data.preference import Pair, answer_pairs, check_pair_row, load_pairs, read_pair_rows, tokenize_pairs
from leantune.data.records import DataError
from leantune.losses.preference import PREFERENCE_LOSSES, PreferenceStats, dpo_loss, simpo_loss
from leantune.models.loading import load_model_and_tokenizer
from leantune.tasks.addition import generate
from leantune.train.dpo import dpo_step, pair_logps, reference_context, train_dpo

# ----------------------------------------------------------------------------------------------
# Losses vs TRL


def _per_token(p: int, t: int, seed: int, dtype=torch.float32):
    """Random per-token log-probs (2P, T) for [chosen..., rejected...] (TRL's layout), zero past each length,
    a completion mask (2P, T + 1) whose position 0 is prompt, and reference sums (P,), (P,)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (2 * p,), generator=g)
    tok_mask = (torch.arange(t)[None] < lengths[:, None]).to(dtype)  # (2P, T)
    logps = (-torch.rand(2 * p, t, generator=g, dtype=dtype) * 3) * tok_mask
    completion_mask = torch.cat([torch.zeros(2 * p, 1, dtype=torch.long), tok_mask.long()], 1)  # (2P, T+1)
    ref = -torch.rand(2 * p, generator=g, dtype=dtype) * 3 * lengths
    return logps.requires_grad_(), completion_mask, ref[:p], ref[p:], lengths.to(dtype)


def _trl_dpo_loss(loss_type: str, beta: float, per_token, completion_mask, ref_c, ref_r):
    """TRL 1.16 `DPOTrainer._compute_loss` on a stand-in model that returns ``per_token`` as its log-probs,
    with precomputed reference log-probs: (loss, the metrics TRL logged)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    b, width = completion_mask.shape
    zeros = torch.zeros(b, width - 1)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    metrics = defaultdict(lambda: defaultdict(list))
    accel = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x,
                            unwrap_model=lambda m: m)
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accel, aux_loss_enabled=False,
                              ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                              loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
                              use_weighting=False, _metrics=metrics, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(b, width, dtype=torch.long), "attention_mask": torch.ones(b, width, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)
    return loss, {k: v[-1] for k, v in metrics["train"].items()}


def _trl_cpo_loss(loss_type: str, beta: float, chosen, rejected, *, gamma=0.0, label_smoothing=0.0):
    """TRL's `CPOTrainer.cpo_loss` (SimPO, and the label-smoothed sigmoid) on given sequence log-probs."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    trainer = SimpleNamespace(alpha=0.0, loss_type=loss_type, simpo_gamma=gamma, beta=beta,
                              label_smoothing=label_smoothing, accelerator=SimpleNamespace(device=torch.device("cpu")))
    return CPOTrainer.cpo_loss(trainer, chosen, rejected)


TRL_NAMES = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"]


@pytest.mark.parametrize("name,trl_type,beta", [("dpo", "sigmoid", 0.1), ("dpo", "sigmoid", 2.5), ("ipo", "ipo", 0.3)])
@pytest.mark.parametrize("p,t", [(1, 1), (5, 13), (3, 31)])
def test_loss_metrics_and_gradient_match_trl_dpo_trainer(name, trl_type, beta, p, t):
    per_token, cmask, ref_c, ref_r, lengths = _per_token(p, t, seed=p * 100 + t)
    trl_loss, trl_metrics = _trl_dpo_loss(trl_type, beta, per_token, cmask, ref_c, ref_r)
    (trl_grad,) = torch.autograd.grad(trl_loss, per_token)
    sums = per_token.sum(1)
    loss, stats = PREFERENCE_LOSSES[name].fn(sums[:p], sums[p:], ref_c, ref_r, lengths[:p], lengths[p:], beta=beta)
    (grad,) = torch.autograd.grad(loss, per_token)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-5, atol=1e-6)
    ours = stats.as_metrics()
    for key in TRL_NAMES:
        assert ours[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-5), key


@pytest.mark.parametrize("gamma,eps", [(0.5, 0.0), (1.3, 0.2)])
def test_simpo_matches_trl_cpo_trainer(gamma, eps):
    p = 6
    per_token, _, _, _, lengths = _per_token(p, 17, seed=7)
    sums = per_token.sum(1)
    avg = sums / lengths
    trl_losses, trl_rc, trl_rr = _trl_cpo_loss("simpo", 2.0, avg[:p], avg[p:], gamma=gamma, label_smoothing=eps)
    (trl_grad,) = torch.autograd.grad(trl_losses.mean(), per_token)
    loss, stats = simpo_loss(sums[:p], sums[p:], None, None, lengths[:p], lengths[p:], beta=2.0, gamma=gamma,
                             label_smoothing=eps)
    (grad,) = torch.autograd.grad(loss, per_token)
    torch.testing.assert_close(loss, trl_losses.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-5, atol=1e-7)
    m = stats.as_metrics()
    assert m["rewards/chosen"] == pytest.approx(float(trl_rc.mean()), rel=1e-5)
    assert m["rewards/accuracies"] == pytest.approx(float((trl_rc > trl_rr).float().mean()))
    assert m["logps/chosen"] == pytest.approx(float(avg[:p].detach().mean()), rel=1e-5)  # CPOTrainer logs averages


def test_label_smoothed_dpo_matches_trl_sigmoid():
    """cDPO: TRL's label-smoothed sigmoid (CPOTrainer's, on log-ratios) -- TRL 1.16's DPOTrainer dropped it."""
    per_token, _, ref_c, ref_r, lengths = _per_token(4, 9, seed=3)
    sums = per_token.sum(1)
    trl, _, _ = _trl_cpo_loss("sigmoid", 0.5, sums[:4] - ref_c, sums[4:] - ref_r, label_smoothing=0.25)
    loss, _ = dpo_loss(sums[:4], sums[4:], ref_c, ref_r, lengths[:4], lengths[4:], beta=0.5, label_smoothing=0.25)
    torch.testing.assert_close(loss, trl.mean())


def _by_hand(name, c, r, rc, rr, nc, nr, beta, gamma):
    """The papers' formulas written out, per pair, in float64."""
    if name == "dpo":
        return -torch.log(torch.sigmoid(beta * ((c - rc) - (r - rr))))
    if name == "ipo":
        return ((c - rc) / nc - (r - rr) / nr - 1 / (2 * beta)) ** 2
    return -torch.log(torch.sigmoid(beta * c / nc - beta * r / nr - gamma))


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
@pytest.mark.parametrize("p,t", [(3, 47), (7, 5), (2, 123)])
def test_losses_and_gradients_by_hand_on_odd_shapes_and_accumulation(name, p, t):
    per_token, _, ref_c, ref_r, lengths = _per_token(p, t, seed=t, dtype=torch.float64)
    sums = per_token.sum(1)
    args = (sums[:p], sums[p:], ref_c, ref_r, lengths[:p], lengths[p:])
    loss, _ = PREFERENCE_LOSSES[name].fn(*args, beta=0.7, gamma=0.4)
    ref = _by_hand(name, *args, beta=0.7, gamma=0.4).mean()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, per_token)[0], torch.autograd.grad(ref, per_token)[0])
    # micro-batches of one pair each, normalized by the step's pairs, add up to the whole batch's loss and stats
    parts = [PREFERENCE_LOSSES[name].fn(*(a[i : i + 1] for a in args), beta=0.7, gamma=0.4, num_pairs=p) for i in range(p)]
    torch.testing.assert_close(sum(x for x, _ in parts), loss)
    total = sum((s for _, s in parts), PreferenceStats())
    assert total.as_metrics() == pytest.approx(PREFERENCE_LOSSES[name].fn(*args, beta=0.7, gamma=0.4)[1].as_metrics())


def test_registry_matches_config_literal():
    assert set(typing.get_args(DPOConfig.model_fields["loss"].annotation)) == set(PREFERENCE_LOSSES)


# ----------------------------------------------------------------------------------------------
# Log-probs on a tiny model


def _lora_model(model_dir, nonzero_b=True):
    model, tok, _ = load_model_and_tokenizer(ModelConfig(path=str(model_dir)))
    model = apply_adapter(model, AdapterConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), 0)
    if nonzero_b:  # PEFT starts B at 0, which would make the adapter a no-op
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for n, prm in model.named_parameters():
                if "lora_B" in n:
                    prm.copy_(torch.randn(prm.shape, generator=g) * 0.2)
    return model, tok


def _pairs(tok, n=5):
    rows = [{"prompt": f"What is {a} + {b}?" + " Please." * (a % 3), "chosen": f" {a + b}",
             "rejected": f" {a + b + 1 + a % 4} is my guess"} for a, b in [(i * 7 % 50, i * 11 % 40) for i in range(n)]]
    return tokenize_pairs([check_pair_row(r, f"x:{i}") for i, r in enumerate(rows)], tok, DataConfig(max_length=64))[0]


def _full_logits_logps(model, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs from the plain model's full [T, V] logits, one sequence at a time."""
    out = []
    for p in pairs:
        for comp in (p.chosen_ids, p.rejected_ids):
            ids = torch.tensor([list(p.prompt_ids) + list(comp)])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # (L-1, V)
            pos = torch.arange(len(p.prompt_ids) - 1, ids.shape[1] - 1)
            out.append(logp[pos, ids[0, pos + 1]].sum())
    s = torch.stack(out)
    return s[0::2], s[1::2]


def test_shared_prefill_logps_equal_full_logits_values_and_gradients(tiny_model_dir):
    model, tok = _lora_model(tiny_model_dir)
    pairs = _pairs(tok)
    pairs.append(Pair(pairs[0].prompt_ids, pairs[1].chosen_ids, pairs[2].rejected_ids, "x:dup"))  # a prompt shared by 2 pairs
    params = [p for p in model.parameters() if p.requires_grad]
    c, r, nc, nr = pair_logps(model, pairs, pad_id=tok.pad_token_id, chunk_size=5)
    assert nc.tolist() == [len(p.chosen_ids) for p in pairs] and nr.tolist() == [len(p.rejected_ids) for p in pairs]
    g = torch.autograd.grad((c - 0.5 * r).sum(), params)
    c0, r0 = _full_logits_logps(model, pairs)
    g0 = torch.autograd.grad((c0 - 0.5 * r0).sum(), params)
    torch.testing.assert_close(c, c0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r, r0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_reference_is_the_base_model(tiny_model_dir):
    model, tok = _lora_model(tiny_model_dir)
    base, _, _ = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    pairs = _pairs(tok)
    with reference_context(model, disable_adapter=True):
        ref = pair_logps(model, pairs, pad_id=tok.pad_token_id, chunk_size=8)[:2]
    with torch.no_grad():
        plain = pair_logps(base, pairs, pad_id=tok.pad_token_id, chunk_size=8)[:2]
        policy = pair_logps(model, pairs, pad_id=tok.pad_token_id, chunk_size=8)[:2]
    for a, b, pol in zip(ref, plain, policy):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert (pol - b).abs().max() > 1e-3, "the adapter changes nothing: the test cannot tell them apart"


def test_accumulation_one_big_micro_batch_equals_single_pairs(tiny_model_dir):
    model, tok = _lora_model(tiny_model_dir)
    pairs = _pairs(tok, n=4)
    dpo = DPOConfig(loss="dpo")
    kw = dict(beta=0.3, num_pairs=4, pad_id=tok.pad_token_id, chunk_size=8, reference=None)
    big = dpo_step(model, [[0, 1, 2, 3]], pairs, dpo, **kw)
    g_big = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    small = dpo_step(model, [[0], [1], [2], [3]], pairs, dpo, **kw)
    assert small.loss == pytest.approx(big.loss, rel=1e-5)
    assert small.stats.as_metrics() == pytest.approx(big.stats.as_metrics(), rel=1e-5, abs=1e-5)  # fp32 sums, padded differently
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, g_big[n], rtol=1e-4, atol=1e-7, msg=n)
    assert any(float(g.abs().sum()) > 0 for g in g_big.values())


# ----------------------------------------------------------------------------------------------
# Data


def test_three_row_shapes_and_their_errors(tmp_path, tiny_chat_model_dir):
    _, tok, _ = load_model_and_tokenizer(ModelConfig(path=str(tiny_chat_model_dir)))
    user = [{"role": "user", "content": "What is 2 + 2?"}]
    explicit = {"prompt": user, "chosen": [{"role": "assistant", "content": "4"}], "rejected": "5"}
    implicit = {"chosen": user + [{"role": "assistant", "content": "4"}], "rejected": user + [{"role": "assistant", "content": "5"}]}
    plain = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}
    path = write_jsonl(tmp_path / "p.jsonl", [explicit, implicit, plain])
    pairs, stats = load_pairs(path, tok, DataConfig(max_length=64))
    ids = [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]
    assert stats.pairs == 3 and ids[0] == ids[1]  # the chat template renders both conversations alike
    assert pairs[2].prompt_ids != pairs[0].prompt_ids  # a plain-text prompt gets no template
    assert pairs[0].chosen_ids[-1] == tok.eos_token_id

    bad = {
        "missing": ({"prompt": "x", "chosen": "a"}, "p.jsonl:2: missing field 'rejected'"),
        "tie": ({"prompt": "x", "chosen": "a", "rejected": "a"}, "p.jsonl:2: field 'rejected' is identical to 'chosen'"),
        "empty": ({"prompt": "x", "chosen": "  ", "rejected": "a"}, "p.jsonl:2: field 'chosen' is empty"),
        "type": ({"prompt": "x", "chosen": "a", "rejected": 5}, "p.jsonl:2: field 'rejected' must be a string"),
        "context": ({"chosen": user + [{"role": "assistant", "content": "4"}],
                     "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]},
                    "p.jsonl:2: fields 'chosen' and 'rejected' differ before their last message"),
    }
    for row, message in bad.values():
        write_jsonl(path, [plain, row])
        with pytest.raises(DataError, match=message.replace("+", r"\+")):
            read_pair_rows(path, DataConfig())


def test_overlong_pairs_are_truncated_or_dropped_and_counted(tiny_model_dir):
    _, tok, _ = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    check = check_pair_row
    recs = [check({"prompt": "What is 2 + 2?", "chosen": " 4 because two and two make four", "rejected": " 5"}, "x:1"),
            check({"prompt": "What is 2 + 2?", "chosen": " 4 is right right right", "rejected": " 4 is right wrong"}, "x:2"),
            check({"prompt": "What is 2 + 2? " * 10, "chosen": "4", "rejected": "5"}, "x:3")]
    p_len = len(tok("What is 2 + 2?")["input_ids"])
    width = p_len + len(tok(" 4 is right")["input_ids"])
    pairs, st = tokenize_pairs(recs, tok, DataConfig(max_length=width, overlong="truncate"))
    assert (st.pairs, st.truncated, st.dropped_tied_after_truncation, st.dropped_overlong) == (1, 1, 1, 1)
    assert max(len(pairs[0].chosen_ids), len(pairs[0].rejected_ids)) + len(pairs[0].prompt_ids) <= width
    _, st = tokenize_pairs(recs, tok, DataConfig(max_length=width, overlong="drop"))
    assert (st.pairs, st.dropped_overlong) == (0, 3)


# ----------------------------------------------------------------------------------------------
# The loop


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    rows = answer_pairs([{**p, "completion": f"The answer is {p['answer']}"} for p in generate(24, seed=0)], seed=0)
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows)


@pytest.fixture(scope="module")
def pair_eval(tmp_path_factory):
    rows = answer_pairs([{**p, "completion": f"The answer is {p['answer']}"} for p in generate(6, seed=1, split="test")])
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "eval.jsonl", rows)


def _recipe(model_dir, data_file, out, **sections) -> dict:
    raw = {"model": {"path": str(model_dir)}, "data": {"train": str(data_file), "max_length": 64},
           "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
           "loss": {"chunk_size": 16}, "optim": {"lr": 1e-2, "scheduler": "constant"},
           "train": {"steps": 3, "micro_batch_size": 4, "seed": 0, "output_dir": str(out), "progress": False},
           "dpo": {"beta": 0.5}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return raw


def _metrics(run) -> list[dict]:
    """The step rows of a run's metrics.jsonl (not the ledger's row)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m for m in rows if isinstance(m.get("step"), int) and "rewards/margins" in m]


def test_cli_dpo_end_to_end(tmp_path, tiny_model_dir, pair_data, pair_eval):
    from safetensors.torch import load_file

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(tiny_model_dir, pair_data, tmp_path / "run")))
    assert main(["dpo", str(path), "train.steps=3", "train.grad_accum=2", f"data.eval={pair_eval}",
                 "train.eval_every=2"]) == 0
    run = tmp_path / "run"
    rows = _metrics(run)
    assert [m["step"] for m in rows] == [1, 2, 3]
    assert ["eval_loss" in m for m in rows] == [False, True, True]  # every 2 steps and at the end
    assert all(f"eval_{k}" in rows[2] for k in TRL_NAMES)
    for m in rows:
        assert m["loss"] > 0 and m["tokens_per_s"] > 0 and all(k in m for k in TRL_NAMES)
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # step 1: adapter B = 0, policy == reference
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    model0, _, _ = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    fresh = apply_adapter(model0, AdapterConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), 0)
    fresh_state = {n: p.detach() for n, p in fresh.named_parameters() if p.requires_grad}
    assert len(adapter) == len(fresh_state) > 0
    for name, t in adapter.items():
        key = next(k for k in fresh_state if k.replace(".default", "") == name)
        assert not torch.equal(t, fresh_state[key]), f"{name} did not change"
    ledger = json.loads((run / "ledger.json").read_text())
    assert ledger["totals"]["steps"] == 3 and ledger["totals"]["preference"]["pairs"] == 3 * 2 * 4
    assert ledger["totals"]["preference"]["reference_tokens"] > 0


def test_resume_equals_uninterrupted_with_precomputed_reference(tmp_path, tiny_model_dir, pair_data):
    sections = {"train": {"steps": 4, "save_every": 2}, "dpo": {"beta": 0.5, "precompute_reference": True}}
    straight = train_dpo(recipe_from_dict(_recipe(tiny_model_dir, pair_data, tmp_path / "a", **sections)), quiet=True)
    first = _recipe(tiny_model_dir, pair_data, tmp_path / "b", **sections)
    first["train"]["steps"] = 2  # stops after the step-2 checkpoint, as a killed run would have left it
    train_dpo(recipe_from_dict(first), quiet=True)
    resumed = train_dpo(recipe_from_dict(_recipe(tiny_model_dir, pair_data, tmp_path / "b", **sections)),
                        resume=True, quiet=True)
    assert resumed.ledger["totals"]["steps"] == 4
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6) and x["rewards/margins"] == pytest.approx(y["rewards/margins"], rel=1e-5, abs=1e-7)
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, msg=n)


def test_precomputed_reference_gives_the_live_first_step(tmp_path, tiny_model_dir, pair_data, pair_eval):
    losses = {}
    for pre in (False, True):
        raw = _recipe(tiny_model_dir, pair_data, tmp_path / f"run{pre}", train={"steps": 2, "eval_every": 1},
                      data={"eval": str(pair_eval)}, dpo={"beta": 0.5, "loss": "ipo", "precompute_reference": pre})
        train_dpo(recipe_from_dict(raw), quiet=True)
        losses[pre] = [(m["loss"], m["rewards/chosen"], m["eval_loss"]) for m in _metrics(tmp_path / f"run{pre}")]
    assert len(losses[False]) == len(losses[True]) == 2
    for (live_loss, live_reward, live_eval), (pre_loss, pre_reward, pre_eval) in zip(losses[False], losses[True]):
        assert pre_loss == pytest.approx(live_loss, rel=1e-5)
        assert pre_eval == pytest.approx(live_eval, rel=1e-5)  # the eval pairs' table too
        assert pre_reward == pytest.approx(live_reward, abs=1e-4)  # sums of ~50 fp32 log-probs, padded differently
    assert abs(losses[False][1][1]) > 1e-3  # the second step sees a moved policy: the rewards are not trivially 0


def test_init_from_an_sft_run_makes_that_policy_the_reference(tmp_path, tiny_model_dir, pair_data, sft_data):
    """dpo.init + precomputed reference: at step 1 the policy *is* the reference (loss log 2, margins 0) although
    its adapter is trained (a disabled adapter would give the base instead, and a different loss)."""
    from conftest import tiny_recipe
    from leantune.train.sft import train

    sft = tiny_recipe(tiny_model_dir, sft_data, tmp_path / "sft", train={"steps": 3})
    train(recipe_from_dict(sft), quiet=True)
    from safetensors.torch import load_file

    trained = load_file(str(tmp_path / "sft" / "adapter" / "adapter_model.safetensors"))
    assert any(float(t.abs().max()) > 1e-3 for k, t in trained.items() if "lora_B" in k)  # not the base any more
    raw = _recipe(tiny_model_dir, pair_data, tmp_path / "dpo", train={"steps": 1},
                  dpo={"beta": 0.5, "init": str(tmp_path / "sft"), "precompute_reference": True})
    train_dpo(recipe_from_dict(raw), quiet=True)
    (row,) = _metrics(tmp_path / "dpo")
    assert row["loss"] == pytest.approx(0.693147, abs=1e-5) and row["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(RecipeError, match="precompute_reference"):
        recipe_from_dict({**raw, "dpo": {"init": str(tmp_path / "sft")}})


def test_simpo_full_finetuning_runs_without_a_reference(tmp_path, tiny_model_dir, pair_data):
    raw = _recipe(tiny_model_dir, pair_data, tmp_path / "run", adapter={"method": "full"}, optim={"lr": 1e-4},
                  train={"steps": 2}, dpo={"loss": "simpo", "gamma": 0.5, "beta": None})
    result = train_dpo(recipe_from_dict(raw), quiet=True)
    rows = _metrics(tmp_path / "run")
    assert [m["step"] for m in rows] == [1, 2] and all(m["loss"] > 0 for m in rows)
    assert result.ledger["totals"]["preference"]["reference_tokens"] == 0
    assert result.ledger["extra"]["preference"] == {"loss": "simpo", "beta": 2.0, "reference": "none"}


def test_bad_input_fails_before_anything_is_written(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                                {"prompt": "a", "chosen": "same", "rejected": "same"}])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(tiny_model_dir, data, tmp_path / "run")))
    assert main(["dpo", str(path)]) == 2
    assert "bad.jsonl:2: field 'rejected' is identical to 'chosen'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_recipe_rules():
    base = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}}
    with pytest.raises(RecipeError, match="dpo.precompute_reference: true"):
        recipe_from_dict({**base, "adapter": {"method": "full"}, "dpo": {"loss": "dpo"}})
    with pytest.raises(RecipeError, match="dpo.label_smoothing"):
        recipe_from_dict({**base, "dpo": {"loss": "ipo", "label_smoothing": 0.1}})
    recipe_from_dict({**base, "adapter": {"method": "full"}, "dpo": {"loss": "simpo"}})  # no reference needed
    full_sft = recipe_from_dict({**base, "adapter": {"method": "full"}})  # an SFT recipe is not judged as DPO...
    with pytest.raises(RecipeError, match="precompute_reference"):
        full_sft.require_for("dpo")  # ...until it is run with leantune dpo
    recipe_from_dict({**base, "memory": {"budget": "2GB"}}).require_for("dpo")  # planned (leantune plan --mode dpo)
    offload = recipe_from_dict({**base, "train": {"activation_checkpointing": "all", "offload_checkpoints": True}})
    offload.require_for("train")
    for command in ("dpo", "rl"):  # refused, never silently ignored
        with pytest.raises(RecipeError, match="train.offload_checkpoints"):
            offload.require_for(command)


def test_shipped_recipe_validates_and_opens_with_its_command():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "dpo_smollm2.yaml"
    assert main(["validate", str(path)]) == 0
    first = path.read_text().splitlines()[0]
    assert first.startswith("# leantune make-data addition --pairs") and "leantune dpo recipes/dpo_smollm2.yaml" in first


@pytest.mark.slow  # ~30 s each: torchrun starts two processes
@pytest.mark.parametrize("precompute", [False, True], ids=["live_reference", "precomputed_reference"])
def test_two_processes_equal_one_at_the_same_global_batch(tmp_path, tiny_model_dir, pair_data, precompute):
    """`leantune dpo --nproc 2` (torchrun, gloo): 2 ranks x grad_accum 1 == 1 rank x grad_accum 2, per-step
    loss and metrics and the final adapter; the precomputed table is scored half per rank and gathered."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    for name, nproc, accum in (("one", 1, 2), ("two", 2, 1)):
        raw = _recipe(tiny_model_dir, pair_data, tmp_path / name, train={"steps": 2, "micro_batch_size": 3,
                      "grad_accum": accum, "threads": 1, "allocator": "system"},
                      dpo={"beta": 0.5, "precompute_reference": precompute})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        proc = subprocess.run([sys.executable, "-m", "leantune", "dpo", str(path), "--nproc", str(nproc)], env=env,
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "pairs"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    wa, wb = (load_file(str(tmp_path / n / "adapter" / "adapter_model.safetensors")) for n in ("one", "two"))
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)


def test_bf16_lora_matmuls_in_the_policy_step(tmp_path, tiny_model_dir, pair_data, monkeypatch):
    """adapter.compute_dtype auto (bf16 base): the policy's LoRA matmuls run in bf16 (autocast, PEFT's input cast
    off through backward, selective checkpointing's recompute included), recorded in the ledger; the run trains
    like PEFT's fp32-adapter path up to bf16 rounding. adapter.compute_dtype: float32 keeps PEFT's casts."""
    from leantune.train import dpo as dpo_mod

    seen = []  # (setting, input dtype, output dtype) of every lora_A call of the policy's forward
    setting = ["auto"]
    observe_lora_a(monkeypatch, dpo_mod, "pair_logps", seen, setting)

    def run(compute):
        setting[0] = compute
        raw = _recipe(tiny_model_dir, pair_data, tmp_path / compute, model={"dtype": "bfloat16"},
                      adapter={"compute_dtype": compute}, train={"activation_checkpointing": "selective"})
        return train_dpo(recipe_from_dict(raw), quiet=True), _metrics(tmp_path / compute)

    fast, rows_fast = run("auto")
    slow, rows_slow = run("float32")
    assert fast.ledger["extra"]["auto_choices"]["adapter.compute_dtype"].startswith("bfloat16")
    assert "adapter.compute_dtype" not in slow.ledger["extra"].get("auto_choices", {})
    assert {(i, o) for c, i, o in seen if c == "auto"} == {(torch.bfloat16, torch.bfloat16)}
    assert {(i, o) for c, i, o in seen if c == "float32"} == {(torch.float32, torch.float32)}
    assert rows_fast[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert len(rows_fast) == len(rows_slow) == 3
    for a, b in zip(rows_fast, rows_slow):
        assert a["loss"] == pytest.approx(b["loss"], abs=0.03)
