"""The entropy / logit-gradient correlation term (rl.entropy_reg, after arXiv 2605.17770): chunked token
statistics against full-softmax references, the correlation against plain loops, gradients included, and a
tiny RL run with the term on."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import write_jsonl

from leantune.config import recipe_from_dict
from leantune.losses.token_entropy import linear_token_stats, logit_grad_norm
from leantune.models.tiny import tiny_model, tiny_tokenizer
from leantune.rl.losses import PolicyWindow, entropy_gradient_correlation, entropy_gradient_penalty
from leantune.rl.rollout import completion_logprobs
from leantune.train.rl import train_rl


def _full_stats(h, w, y, tau):
    logp = torch.log_softmax(h @ w.T / tau, -1)  # (K, V)
    p = logp.exp()
    return logp.gather(1, y[:, None]).squeeze(1), -(p * logp).sum(-1), (p * p).sum(-1)


@pytest.mark.parametrize("k,hd,v,chunk,tau", [(7, 5, 13, 3, 1.0), (1, 9, 31, 4, 0.6), (17, 6, 123, 5, 1.7)])
def test_chunked_token_stats_match_the_full_softmax_forward_and_gradients(k, hd, v, chunk, tau):
    g = torch.Generator().manual_seed(k * v)
    h = torch.randn(k, hd, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, hd, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, v, (k,), generator=g)
    up = [torch.randn(k, generator=g, dtype=torch.float64) for _ in range(3)]  # upstream gradients
    got = linear_token_stats(h, w, y, chunk_size=chunk, temperature=tau)
    ref = _full_stats(h, w, y, tau)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, atol=1e-10)
    gh, gw = torch.autograd.grad(sum((a * u).sum() for a, u in zip(got, up)), (h, w))
    rh, rw = torch.autograd.grad(sum((a * u).sum() for a, u in zip(ref, up)), (h, w))
    assert torch.allclose(gh, rh, atol=1e-10) and torch.allclose(gw, rw, atol=1e-10)
    # each output alone (None upstream gradients for the others)
    for i in range(3):
        gh_i = torch.autograd.grad(linear_token_stats(h, w, y, chunk_size=chunk, temperature=tau)[i].sum(), h)[0]
        rh_i = torch.autograd.grad(_full_stats(h, w, y, tau)[i].sum(), h)[0]
        assert torch.allclose(gh_i, rh_i, atol=1e-10)


def test_logit_grad_norm_is_the_norm_of_onehot_minus_softmax():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 19, generator=g, dtype=torch.float64)
    y = torch.randint(0, 19, (6,), generator=g)
    p = torch.softmax(z, -1)
    ref = (torch.nn.functional.one_hot(y, 19).double() - p).norm(dim=-1)
    got = logit_grad_norm(torch.log_softmax(z, -1).gather(1, y[:, None]).squeeze(1), (p * p).sum(-1))
    assert torch.allclose(got, ref, atol=1e-12)
    zz = z.clone().requires_grad_(True)  # it is the gradient of log pi_y w.r.t. the logits
    (gz,) = torch.autograd.grad(torch.log_softmax(zz, -1).gather(1, y[:, None]).sum(), zz)
    assert torch.allclose(gz.norm(dim=-1), ref, atol=1e-12)


def _pearson_loops(xs, ys):
    """Pearson correlation with plain python arithmetic; 0 below 3 points."""
    n = len(xs)
    if n < 3:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(xs, ys))
    vx, vy = sum((a - mx) ** 2 for a in xs), sum((b - my) ** 2 for b in ys)
    return cov / math.sqrt(vx * vy + 1e-8)


def _penalty_loops(ent, gn, lengths, num_sequences):
    """The same penalty built element by element (scalar torch ops, so autograd gives the reference gradient)."""
    total = ent.new_zeros(())
    for i, n in enumerate(lengths):
        if n < 3:
            continue
        xs, ys = [ent[i, t] for t in range(n)], [gn[i, t] for t in range(n)]
        mx, my = sum(xs) / n, sum(ys) / n
        cov = sum((a - mx) * (b - my) for a, b in zip(xs, ys))
        vx, vy = sum((a - mx) ** 2 for a in xs), sum((b - my) ** 2 for b in ys)
        total = total + cov / torch.sqrt(vx * vy + 1e-8)
    return total / num_sequences


@pytest.mark.parametrize("lengths", [[5, 1, 3, 7], [2, 9], [4]])
def test_correlation_and_penalty_match_plain_loops_with_gradients(lengths):
    g = torch.Generator().manual_seed(len(lengths))
    b, t = len(lengths), max(lengths) + 2  # padding on every row
    ent = torch.rand(b, t, generator=g, dtype=torch.float64).mul(3).requires_grad_(True)
    gn = torch.rand(b, t, generator=g, dtype=torch.float64).requires_grad_(True)
    mask = torch.zeros(b, t, dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    rho = entropy_gradient_correlation(ent, gn, mask)
    for i, n in enumerate(lengths):
        want = _pearson_loops(ent[i, :n].tolist(), gn[i, :n].tolist())
        assert abs(float(rho[i].detach()) - want) < 1e-9
    window = PolicyWindow(num_sequences=b + 3, num_tokens=1.0, max_completion_length=t)
    got = entropy_gradient_penalty(ent, gn, mask, window=window)
    ref = _penalty_loops(ent, gn, lengths, b + 3)
    assert torch.allclose(got, ref, atol=1e-12)
    g1 = torch.autograd.grad(got, (ent, gn))
    g2 = torch.autograd.grad(ref, (ent, gn), allow_unused=True)
    for a, r in zip(g1, g2):
        assert torch.allclose(a, torch.zeros_like(a) if r is None else r, atol=1e-10)
        assert float(a[mask == 0].abs().max()) == 0.0  # padding gets no gradient


def test_completion_stats_through_the_model_match_full_logits():
    torch.manual_seed(0)
    tok = tiny_tokenizer(chat_template=True)
    model = tiny_model(vocab_size=len(tok)).double()
    prompts = [[5, 6, 7], [5, 6, 7], [9, 10]]  # a shared prompt: the prompt-shared forward
    comps = [[11, 12, 13, 14], [15, 16, 17], [18, 19, 20, 21, 22]]
    logps, ent, mask, gn = completion_logprobs(model, prompts, comps, pad_id=0, temperature=0.8, chunk_size=3,
                                               grad_stats=True)
    pen = entropy_gradient_penalty(ent, gn, mask)
    grads = torch.autograd.grad(pen, [p for p in model.parameters() if p.requires_grad])
    # reference: one full forward per sequence, full logits, softmax by hand
    refs_e, refs_g = torch.zeros_like(ent), torch.zeros_like(gn)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) + len(c) - 1] / 0.8  # (T, V)
        pr = torch.softmax(logits, -1)
        refs_e[i, : len(c)] = -(pr * torch.log_softmax(logits, -1)).sum(-1)
        refs_g[i, : len(c)] = (torch.nn.functional.one_hot(torch.tensor(c), pr.shape[-1]).double() - pr).norm(dim=-1)
    assert torch.allclose(ent, refs_e, atol=1e-9) and torch.allclose(gn, refs_g, atol=1e-9)
    ref_grads = torch.autograd.grad(entropy_gradient_penalty(refs_e, refs_g, mask),
                                    [p for p in model.parameters() if p.requires_grad])
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-8)
    assert any(float(a.abs().max()) > 0 for a in grads)


def test_rl_run_with_entropy_reg_logs_the_correlation_and_changes_the_update(tiny_chat_model_dir, tmp_path):
    rows = [{"prompt": f"Say something about {w}.", "answer": str(i)} for i, w in enumerate(
        ["cats", "dogs", "rain", "sun", "tea", "maps", "keys", "wind"])]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)

    def run(name, reg):
        recipe = recipe_from_dict({
            "model": {"path": str(tiny_chat_model_dir)}, "data": {"train": str(prompts)},
            "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, "loss": {"chunk_size": 16},
            "optim": {"lr": 1e-2}, "train": {"steps": 2, "micro_batch_size": 4, "seed": 0,
                                             "output_dir": str(tmp_path / name), "progress": False},
            "rl": {"rewards": {"rl_helpers:digit_share": 1.0}, "group_size": 4, "prompts_per_step": 2,
                   "max_new_tokens": 6, "overlong_filter": False, "entropy_reg": reg}})
        train_rl(recipe, quiet=True)
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    on, off = run("on", 1.0), run("off", 0.0)
    assert all(-1.0 <= m["entropy_grad_corr"] <= 1.0 for m in on)
    assert "entropy_grad_corr" not in off[0]
    assert on[0]["rollouts"] == off[0]["rollouts"]  # same rollouts at step 1 (same start) ...
    assert on[0]["grad_norm"] != off[0]["grad_norm"]  # ... but the term changes the gradient
