"""Rounds of active labelling for `leantune dpo` with `dpo.active` (arXiv 2511.04286): select -> label -> train.

`ActivePairs` holds the pool (tokenized pairs, response a in the ``chosen`` slot), the labeller and what was
spent (`LabelLedger`). The DPO loop calls `ActivePairs.due(step)`; when a round is due, `ActivePairs.run_round`:

1. computes each pool response's feature with the current policy (adapter on, no gradient, eval mode;
   `response_features`), scaled per dimension by the pool's spread (`feature_scale`);
2. fits the Bradley–Terry head's Laplace posterior on the labelled pairs (`laplace_posterior`);
3. picks ``dpo.active.batch`` unlabelled pairs: the first ``warmup`` labels of the run at random, then by
   dueling Thompson sampling (`dueling_thompson_select`), or all at random with ``select: random``;
4. asks the labeller for each pick only (a failure after the retries is skipped and counted, and another
   pair is picked in its place); ties spend a label but give no training pair;
5. refits the head with the new labels and, with ``data.eval`` pairs, reports its held-out accuracy.

The DPO steps then train on every preference labelled so far (`ActivePairs.train_pairs`, chosen = the winner).
Rounds start at steps r x steps / rounds (`round_starts`), so every round is followed by training.
"""

from __future__ import annotations

import dataclasses
import random
import time

import torch

from leantune.active.laplace import (
    bt_accuracy,
    dueling_thompson_select,
    feature_scale,
    laplace_posterior,
)
from leantune.active.pool import LabelLedger, Labeler, label_with_retries
from leantune.adapters.lora import causal_lm
from leantune.config import ActiveConfig
from leantune.data.preference import Pair
from leantune.data.records import DataError
from leantune.rl.rollout import _joint_hidden


def round_starts(budget: int, batch: int, steps: int) -> list[int]:
    """The step before which each labelling round runs: ceil(budget / batch) rounds spread evenly over
    ``steps``, the first at step 0.

    >>> round_starts(20, 8, 12)
    [0, 4, 8]
    """
    rounds = -(-budget // batch)
    return [r * steps // rounds for r in range(rounds)]


@torch.no_grad()
def response_features(model, prompts: list[tuple[int, ...]], responses: list[tuple[int, ...]], *, pad_id: int,
                      batch_size: int, how: str) -> torch.Tensor:
    """(N, H) float32 features of N responses after their prompts: the decoder's final hidden state at the
    response's last token (``how='last'``) or its mean over the response's tokens (``'mean'``). No gradient,
    eval mode, whatever adapter is on stays on (the policy's features)."""
    decoder = causal_lm(model).get_decoder()
    was_training = model.training
    model.eval()
    out = []
    try:
        for s in range(0, len(prompts), batch_size):
            p, c = prompts[s:s + batch_size], responses[s:s + batch_size]
            hidden = _joint_hidden(decoder, p, c, pad_id).float()  # (B, L, H)
            for i, (pi, ci) in enumerate(zip(p, c)):
                span = hidden[i, len(pi):len(pi) + len(ci)]  # (T_i, H): the response's positions
                out.append(span[-1] if how == "last" else span.mean(0))
    finally:
        model.train(was_training)
    return torch.stack(out)


def pair_features(model, pairs: list[Pair], *, pad_id: int, batch_size: int, how: str) -> torch.Tensor:
    """(P, 2, H): features of each pair's chosen-slot and rejected-slot response."""
    prompts = [p.prompt_ids for p in pairs for _ in range(2)]
    responses = [r for p in pairs for r in (p.chosen_ids, p.rejected_ids)]
    feats = response_features(model, prompts, responses, pad_id=pad_id, batch_size=batch_size, how=how)  # (2P, H)
    return feats.view(len(pairs), 2, -1)


def oriented(pair: Pair, winner: int) -> Pair:
    """The pool pair as a training pair: chosen = the labelled winner (0: response a, 1: response b)."""
    return pair if winner == 0 else Pair(pair.prompt_ids, pair.rejected_ids, pair.chosen_ids, pair.source)


@dataclasses.dataclass
class RoundReport:
    """One round's metrics (logged with the step after it)."""

    round: int
    picked: int
    labels_spent: int
    labelled_pairs: int
    label_ties: int
    label_failures: int
    bt_train_accuracy: float
    bt_eval_accuracy: float | None
    newton_steps: int
    seconds: float

    def as_metrics(self) -> dict:
        out = {"active/round": self.round, "active/picked": self.picked, "labels_spent": self.labels_spent,
               "labelled_pairs": self.labelled_pairs, "label_ties": self.label_ties,
               "label_failures": self.label_failures, "active/bt_train_accuracy": self.bt_train_accuracy,
               "active/newton_steps": self.newton_steps, "active/round_s": self.seconds}
        if self.bt_eval_accuracy is not None:
            out["active/bt_eval_accuracy"] = self.bt_eval_accuracy
        return out


class ActivePairs:
    """The pool, its labeller and the labels spent; see the module docstring."""

    def __init__(self, pairs: list[Pair], labeler: Labeler, cfg: ActiveConfig, *, steps: int, seed: int,
                 eval_pairs: list[Pair] | None = None):
        self.pairs, self.labeler, self.cfg, self.seed = pairs, labeler, cfg, seed
        self.eval_pairs = eval_pairs or []
        self.starts = round_starts(cfg.label_budget, cfg.batch, steps)
        self.ledger = LabelLedger(budget=cfg.label_budget)
        self.feature_tokens = 0  # decoder tokens of the feature passes (no gradient)
        self.seconds = 0.0

    # -- state (checkpoints)
    def state_dict(self) -> dict:
        return {"ledger": dataclasses.asdict(self.ledger), "feature_tokens": self.feature_tokens,
                "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.ledger = LabelLedger(**state["ledger"])
        self.feature_tokens, self.seconds = state["feature_tokens"], state["seconds"]

    # -- the loop's interface
    def due(self, step: int) -> bool:
        """Whether a labelling round runs before optimizer step ``step`` (0-based): its start is reached, or no
        preference has been labelled yet (a round of ties or failures leaves nothing to train on)."""
        led = self.ledger
        return (led.rounds < len(self.starts) and led.spent < led.budget
                and (step >= self.starts[led.rounds] or not led.labelled))

    def train_pairs(self) -> list[Pair]:
        """Every labelled preference as a chosen/rejected pair, in label order."""
        return [oriented(self.pairs[i], w) for i, w in zip(self.ledger.labelled, self.ledger.winners)]

    def _features(self, model, pairs: list[Pair], pad_id: int, batch_size: int) -> torch.Tensor:
        self.feature_tokens += sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        return pair_features(model, pairs, pad_id=pad_id, batch_size=batch_size, how=self.cfg.features)

    def _posterior(self, diff: torch.Tensor):
        """Laplace posterior from the labelled pool pairs' scaled differences ``diff`` (N, H)."""
        led = self.ledger
        sign = torch.tensor([1.0 if w == 0 else -1.0 for w in led.winners], dtype=torch.float64)  # (n,)
        x = diff[led.labelled] * sign[:, None] if led.labelled else diff[:0]  # (n, H) winner - loser
        return laplace_posterior(x, self.cfg.prior_precision), x

    def run_round(self, model, *, pad_id: int, batch_size: int) -> RoundReport:
        """Select, label and refit once (see the module docstring); returns the round's report."""
        t0 = time.perf_counter()
        cfg, led = self.cfg, self.ledger
        r = led.rounds
        need_head = cfg.select == "thompson" or bool(self.eval_pairs)
        diff = post = scale = None
        if need_head:
            feats = self._features(model, self.pairs, pad_id, batch_size)  # (N, 2, H)
            scale = feature_scale(feats)  # (H,)
            diff = (feats[:, 0] - feats[:, 1]).double() / scale  # (N, H)
            post, _ = self._posterior(diff)
        rng = random.Random(f"leantune-active:{self.seed}:{r}")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + r)
        want = min(cfg.batch, led.budget - led.spent)
        got = 0
        while got < want:
            closed = set(led.labelled) | set(led.excluded)
            avail = [i for i in range(len(self.pairs)) if i not in closed]
            if not avail:
                break
            k = min(want - got, len(avail))
            n_random = k if cfg.select == "random" else min(k, max(0, cfg.warmup - led.spent))
            picks = rng.sample(avail, n_random)
            if k > n_random:
                rest = [i for i in avail if i not in set(picks)]
                chosen = dueling_thompson_select(post, diff[rest], k - n_random, alpha=cfg.alpha, generator=gen)
                picks += [rest[j] for j in chosen]
            for i in picks:
                spent = led.spent
                led.record(i, label_with_retries(self.labeler, i, cfg.retries))
                got += led.spent - spent
        led.rounds += 1
        train_acc, eval_acc, steps = float("nan"), None, 0
        if need_head:
            post, x = self._posterior(diff)
            train_acc, steps = bt_accuracy(post.mean, x), post.newton_steps
            if self.eval_pairs:
                ef = self._features(model, self.eval_pairs, pad_id, batch_size)  # (E, 2, H): chosen, rejected
                eval_acc = bt_accuracy(post.mean, (ef[:, 0] - ef[:, 1]).double() / scale)
        if not led.labelled and (led.spent >= led.budget or led.rounds >= len(self.starts)):
            raise DataError(f"dpo.active: {led.spent} labels spent and no preference among them ({led.ties} ties, "
                            f"{led.failures} failures); nothing to train on. Check the labeller "
                            f"({cfg.labeler}){': ' + led.last_errors[-1] if led.last_errors else ''}")
        dt = time.perf_counter() - t0
        self.seconds += dt
        return RoundReport(r, got, led.spent, len(led.labelled), led.ties, led.failures, train_acc, eval_acc, steps, dt)
