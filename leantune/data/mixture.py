"""Data mixtures (`data.mixture`): several SFT datasets grouped by source, one dataset per chunk of steps.

Training runs in chunks of ``chunk_steps`` optimizer steps; every batch of a chunk comes from one dataset, chosen
at the chunk's start by the rule ``select`` names (``SELECTORS``):

- ``uniform``: every dataset equally likely (flat over datasets, whatever their source);
- ``weights``: drawn with the recipe's weights (a source's weight split equally over its datasets, or one
  weight per dataset);
- ``dash``: DaSH (Dataset Selection via Hierarchies, arXiv 2512.10952), two-level Gaussian Thompson sampling.

DaSH, as implemented here. Every source ``g`` and every dataset ``d`` is an arm with a Gaussian posterior over
its mean reward, ``N(m, v)``, starting at ``N(prior_mean, prior_std²)``. The reward of a chunk is the held-out
loss gain ``r = L_heldout(before the chunk) − L_heldout(after it)`` (nats per loss-carrying token), modelled as
``r ~ N(mean of the arm, noise_std²)`` with the noise variance known, so the update is the closed-form conjugate
one (``gaussian_update``)::

    v' = 1 / (1/v + 1/s²)        m' = v' · (m/v + r/s²)        s = noise_std

Selection: draw ``θ_g ~ N(m_g, v_g)`` for every source and take the largest; then draw ``θ_d ~ N(m_d, v_d)`` for
every dataset of that source and take the largest. Both the chosen source's arm and the chosen dataset's arm
are updated with the same observed ``r``. (The paper's group and dataset posteriors ``N(μ_i, σ_i²)`` /
``N(θ_i, σ̂_i²)``, chosen group first then a dataset in it, both updated per reward; this version keeps the two
levels' priors independent and the noise variance fixed.) The reward is not stationary -- every chunk's gain
shrinks as training goes on -- which the model ignores by default; ``reward: advantage`` (``chunk_signal``: the
gain minus the mean gain of the last chunks) and ``discount`` (``discount_arm``: discounted Thompson sampling,
arXiv 1707.09727) are the closed-form remedies; docs/mixture.md shows what each costs and gains.

Randomness: chunk ``c``'s draw uses ``random.Random("mixture|seed|c")``, a pure function of the seed and the
chunk index, so the sampler's whole state is its posteriors, its counters and the held-out loss at the chunk's
start -- ``state_dict()``, saved with every checkpoint; a resumed run makes the same choices.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from leantune.config import MixtureConfig

# ----------------------------------------------------------------------------------------------
# The Gaussian arm (pure)


@dataclass(frozen=True)
class GaussianArm:
    """A Gaussian posterior ``N(mean, var)`` over an arm's mean reward, and how often it was pulled."""

    mean: float
    var: float
    pulls: int = 0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)


def gaussian_update(arm: GaussianArm, reward: float, noise_var: float) -> GaussianArm:
    """The conjugate posterior after observing ``reward ~ N(θ, noise_var)`` under the prior ``θ ~ N(arm.mean, arm.var)``.

    >>> a = gaussian_update(GaussianArm(0.0, 1.0), 2.0, 1.0)
    >>> a.mean, a.var, a.pulls
    (1.0, 0.5, 1)
    """
    var = 1.0 / (1.0 / arm.var + 1.0 / noise_var)
    return GaussianArm(var * (arm.mean / arm.var + reward / noise_var), var, arm.pulls + 1)


def discount_arm(arm: GaussianArm, prior: GaussianArm, gamma: float) -> GaussianArm:
    """Forget a share ``1 - gamma`` of what the arm learned: the posterior whose data precision and data-weighted
    reward sum (what it gained over ``prior``) are both multiplied by ``gamma``, so it moves back toward ``prior``.

    Applied to every arm before every observation, an observation ``k`` rewards ago weighs ``gamma**k``: the
    Gaussian form of discounted Thompson sampling (arXiv 1707.09727, which discounts Beta counts the same way).
    ``gamma = 1`` returns ``arm`` unchanged; ``gamma = 0`` returns ``prior`` (keeping the pull count).

    >>> a = discount_arm(GaussianArm(1.0, 0.5, 3), GaussianArm(0.0, 1.0), 0.5)   # data precision 1 -> 0.5, sum 2 -> 1
    >>> a.mean, a.var, a.pulls
    (0.6666666666666666, 0.6666666666666666, 3)
    """
    if gamma == 1.0:
        return arm
    data_precision = 1.0 / arm.var - 1.0 / prior.var  # Σ w/s² of the observations so far (>= 0)
    data_sum = arm.mean / arm.var - prior.mean / prior.var  # Σ w·r/s²
    var = 1.0 / (1.0 / prior.var + gamma * data_precision)
    return GaussianArm(var * (prior.mean / prior.var + gamma * data_sum), var, arm.pulls)


def chunk_signal(kind: str, gain: float, loss_before: float, past_gains: Sequence[float], window: int) -> float | None:
    """What the posteriors learn from one chunk (``data.mixture.reward``), from its held-out gain
    ``gain = L_before - L_after``, the loss before it, and the gains of the chunks before it (oldest first).

    - ``gain``: the gain itself (arXiv 2512.10952's reward; it shrinks as training goes on);
    - ``relative``: ``gain / L_before``, the share of the loss the chunk removed;
    - ``advantage``: ``gain`` minus the mean gain of the last ``window`` chunks (whatever their datasets): the
      gain relative to what a chunk gained at this point of training. The first chunk has no baseline: None
      (the posteriors are not updated).

    >>> chunk_signal("advantage", 0.5, 3.0, [0.9, 2.0, 1.0], window=2), chunk_signal("relative", 0.5, 2.0, [], 2)
    (-1.0, 0.25)
    """
    if kind == "gain":
        return gain
    if kind == "relative":
        return gain / loss_before
    if kind == "advantage":
        recent = list(past_gains)[-window:]
        return gain - sum(recent) / len(recent) if recent else None
    raise ValueError(f"unknown data.mixture.reward {kind!r}; expected gain, relative or advantage")


def chunk_rng(seed: int, chunk: int) -> random.Random:
    """The generator of chunk ``chunk``'s draw: a pure function of (seed, chunk), so resume needs no RNG state."""
    return random.Random(f"mixture|{seed}|{chunk}")


# ----------------------------------------------------------------------------------------------
# Selection rules: (sampler, rng) -> dataset index


def select_uniform(sampler: MixtureSampler, rng: random.Random) -> int:
    return rng.randrange(len(sampler.datasets))


def select_weights(sampler: MixtureSampler, rng: random.Random) -> int:
    return rng.choices(range(len(sampler.datasets)), weights=sampler.probabilities)[0]


def select_dash(sampler: MixtureSampler, rng: random.Random) -> int:
    """Thompson sampling on sources, then on the datasets of the chosen source (ties: the first)."""
    draws = [rng.gauss(a.mean, a.std) for a in sampler.source_arms]
    g = max(range(len(draws)), key=draws.__getitem__)
    members = sampler.members[g]
    inner = [rng.gauss(sampler.dataset_arms[d].mean, sampler.dataset_arms[d].std) for d in members]
    return members[max(range(len(inner)), key=inner.__getitem__)]


SELECTORS: dict[str, Callable[[MixtureSampler, random.Random], int]] = {
    "uniform": select_uniform, "weights": select_weights, "dash": select_dash}


def dataset_probabilities(cfg: MixtureConfig) -> list[float]:
    """Per-dataset draw probabilities of ``select: weights`` (normalized), in ``cfg.datasets()`` order.

    >>> cfg = MixtureConfig(sources={"a": ["x", "y"], "b": ["z"]}, select="weights", weights={"a": 2, "b": [1]})
    >>> dataset_probabilities(cfg)
    [0.3333333333333333, 0.3333333333333333, 0.3333333333333333]
    """
    raw = []
    for name, paths in cfg.sources.items():
        w = cfg.weights[name]
        raw += list(w) if isinstance(w, list) else [w / len(paths)] * len(paths)
    total = sum(raw)
    return [x / total for x in raw]


# ----------------------------------------------------------------------------------------------
# The sampler: posteriors + which dataset each chunk trains on


@dataclass
class MixtureSampler:
    """Chooses a dataset per chunk and learns from each chunk's reward (``dash``); carries its state through checkpoints."""

    cfg: MixtureConfig
    seed: int
    datasets: list[tuple[str, str]] = field(init=False)  # (source, path), the order of cfg.datasets()
    sources: list[str] = field(init=False)
    members: list[list[int]] = field(init=False)  # per source: its dataset indices
    source_of: list[int] = field(init=False)  # per dataset: its source index
    probabilities: list[float] | None = field(init=False)
    source_arms: list[GaussianArm] = field(init=False)
    dataset_arms: list[GaussianArm] = field(init=False)
    choices: list[int] = field(default_factory=list)  # dataset of every chunk so far
    rewards: list[float] = field(default_factory=list)  # dash: the held-out gain of every finished chunk
    signals: list[float | None] = field(default_factory=list)  # dash: what the posteriors learned from it (reward:)

    def __post_init__(self):
        self.datasets = self.cfg.datasets()
        self.sources = list(self.cfg.sources)
        self.source_of = [self.sources.index(s) for s, _ in self.datasets]
        self.members = [[d for d, g in enumerate(self.source_of) if g == i] for i in range(len(self.sources))]
        self.probabilities = dataset_probabilities(self.cfg) if self.cfg.select == "weights" else None
        self.prior = GaussianArm(self.cfg.prior_mean, self.cfg.prior_std ** 2)
        self.source_arms = [self.prior] * len(self.sources)
        self.dataset_arms = [self.prior] * len(self.datasets)

    def choose(self, chunk: int) -> int:
        """The dataset chunk ``chunk`` trains on (its draw is seeded by the chunk index); recorded in ``choices``."""
        if chunk != len(self.choices):
            raise ValueError(f"mixture: chunk {chunk} chosen after {len(self.choices)} chunks; chunks go in order")
        d = SELECTORS[self.cfg.select](self, chunk_rng(self.seed, chunk))
        self.choices.append(d)
        return d

    def observe(self, dataset: int, reward: float, loss_before: float | None = None) -> float | None:
        """Learn from one chunk: ``reward`` = its held-out gain (nats), ``loss_before`` = the held-out loss at its
        start (needed by ``reward: relative``). Every arm is first discounted toward the prior (``discount``), then
        the dataset's and its source's posteriors are updated with the chunk's signal (``chunk_signal``; None: no
        update). Returns the signal."""
        signal = chunk_signal(self.cfg.reward, reward, loss_before if loss_before is not None else math.nan,
                              self.rewards, self.cfg.baseline_chunks)
        self.rewards.append(reward)
        self.signals.append(signal)
        if signal is None:
            return None
        gamma, noise = self.cfg.discount, self.cfg.noise_std ** 2
        self.source_arms = [discount_arm(a, self.prior, gamma) for a in self.source_arms]
        self.dataset_arms = [discount_arm(a, self.prior, gamma) for a in self.dataset_arms]
        g = self.source_of[dataset]
        self.source_arms[g] = gaussian_update(self.source_arms[g], signal, noise)
        self.dataset_arms[dataset] = gaussian_update(self.dataset_arms[dataset], signal, noise)
        return signal

    def state_dict(self) -> dict:
        return {"source_arms": [asdict(a) for a in self.source_arms],
                "dataset_arms": [asdict(a) for a in self.dataset_arms],
                "choices": list(self.choices), "rewards": list(self.rewards), "signals": list(self.signals)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["dataset_arms"]) != len(self.datasets) or len(state["source_arms"]) != len(self.sources):
            raise ValueError(f"mixture: the checkpoint has {len(state['dataset_arms'])} datasets in "
                             f"{len(state['source_arms'])} sources, the recipe {len(self.datasets)} in "
                             f"{len(self.sources)}; resume with the recipe the run started with")
        self.source_arms = [GaussianArm(**a) for a in state["source_arms"]]
        self.dataset_arms = [GaussianArm(**a) for a in state["dataset_arms"]]
        self.choices, self.rewards = list(state["choices"]), list(state["rewards"])
        self.signals = list(state.get("signals", state["rewards"]))  # checkpoints before `reward:` learned the gain


# ----------------------------------------------------------------------------------------------
# The run's schedule: which dataset and which of its batches a step trains on


class IndexedView(Sequence):
    """``items[indices[i]]`` for each ``i``: a dataset less its held-out rows, without copying (streamed data too)."""

    def __init__(self, items: Sequence, indices: Sequence[int]):
        self.items, self.indices = items, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.items[self.indices[i]]


def heldout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices) of ``n`` items: ``ceil(fraction·n)`` seeded picks held out (at least 1, and
    at least 1 left to train on when n > 1), both in ascending order.

    >>> heldout_split(10, 0.2, seed=0)[1] == heldout_split(10, 0.2, seed=0)[1], len(heldout_split(10, 0.2, 0)[1])
    (True, 2)
    """
    k = min(max(1, math.ceil(fraction * n)), max(1, n - 1))
    held = sorted(random.Random(f"heldout|{seed}").sample(range(n), k))
    chosen = set(held)
    return [i for i in range(n) if i not in chosen], held


@dataclass
class DatasetTally:
    """What one dataset contributed: chunks chosen, optimizer steps, tokens (all, and loss-carrying)."""

    chunks: int = 0
    steps: int = 0
    tokens: int = 0
    trainable_tokens: int = 0


class MixtureSchedule:
    """The loop's view of a mixture: per step, which dataset trains and which of its micro-batches (each dataset
    walks its own seeded epochs with ``batch_at``); per chunk, the held-out reward for ``dash``.

    ``items``: per dataset, its training examples (or packed rows); ``heldout_loss()``: the held-out loss of the
    current model (dash only). Call ``begin_step(step)`` before a step and ``end_step(...)`` after it.
    """

    def __init__(self, cfg: MixtureConfig, items: list[Sequence], seed: int, state: dict | None = None):
        self.cfg, self.items, self.seed = cfg, items, seed
        self.sampler = MixtureSampler(cfg, seed)
        self.tally = [DatasetTally() for _ in items]
        self.current: int | None = None  # dataset of the open chunk
        self.loss_before: float | None = None  # dash: held-out loss at the open chunk's start
        self.heldout_evals = 0
        if state:
            self.sampler.load_state_dict(state["sampler"])
            self.tally = [DatasetTally(**t) for t in state["tally"]]
            self.current, self.loss_before = state["current"], state["loss_before"]
            self.heldout_evals = state["heldout_evals"]

    @property
    def uses_heldout(self) -> bool:
        return self.cfg.select == "dash"

    def begin_step(self, step: int, heldout_loss: Callable[[], float]) -> int:
        """The dataset step ``step`` trains on; opens a new chunk (and, for dash, measures its starting loss
        unless the previous chunk's end already did) when ``step`` starts one."""
        if step % self.cfg.chunk_steps == 0 and self.current is None:
            self.current = self.sampler.choose(step // self.cfg.chunk_steps)
            self.tally[self.current].chunks += 1
            if self.uses_heldout and self.loss_before is None:
                self.loss_before = self._measure(heldout_loss)
        return self.current

    def micro_index(self, dataset: int, global_micro: int, step: int, per_step: int) -> int:
        """The dataset's own micro-batch counter for global micro-batch ``global_micro`` of ``step`` (``per_step`` =
        grad_accum · world size micro-batches per step): its earlier steps, then the position within this one."""
        return self.tally[dataset].steps * per_step + (global_micro - step * per_step)

    def end_step(self, step: int, tokens: int, trainable_tokens: int, last_step: int,
                 heldout_loss: Callable[[], float]) -> dict:
        """Count step ``step`` (0-based) for the open chunk's dataset; at a chunk's end (or the run's) close it: for
        dash, measure the held-out loss, observe the gain. Returns the metrics of a closed chunk, else {}."""
        d = self.current
        t = self.tally[d]
        t.steps, t.tokens, t.trainable_tokens = t.steps + 1, t.tokens + tokens, t.trainable_tokens + trainable_tokens
        if (step + 1) % self.cfg.chunk_steps and step + 1 != last_step:
            return {}
        row = {"mixture_dataset": d}
        if self.uses_heldout:
            after = self._measure(heldout_loss)
            reward = self.loss_before - after
            signal = self.sampler.observe(d, reward, self.loss_before)
            row.update(mixture_reward=reward, heldout_loss=after)
            if self.cfg.reward != "gain" and signal is not None:
                row["mixture_signal"] = signal
            self.loss_before = after  # the next chunk starts where this one ended: one evaluation per chunk
        self.current = None
        return row

    def _measure(self, heldout_loss: Callable[[], float]) -> float:
        self.heldout_evals += 1
        return float(heldout_loss())

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "tally": [asdict(t) for t in self.tally],
                "current": self.current, "loss_before": self.loss_before, "heldout_evals": self.heldout_evals}

    def ledger(self, heldout_examples: int) -> dict:
        """The ledger's ``mixture`` block: per dataset and per source what was trained, and the posterior means."""
        s = self.sampler
        dash = self.uses_heldout
        datasets = [{"source": src, "path": path, **asdict(self.tally[d]),
                     **({"posterior_mean": s.dataset_arms[d].mean, "posterior_std": s.dataset_arms[d].std} if dash else {})}
                    for d, (src, path) in enumerate(s.datasets)]
        sources = {}
        for g, name in enumerate(s.sources):
            tallies = [self.tally[d] for d in s.members[g]]
            sources[name] = {"chunks": sum(t.chunks for t in tallies), "steps": sum(t.steps for t in tallies),
                             "tokens": sum(t.tokens for t in tallies),
                             "trainable_tokens": sum(t.trainable_tokens for t in tallies),
                             **({"posterior_mean": s.source_arms[g].mean, "posterior_std": s.source_arms[g].std}
                                if dash else {})}
        out = {"select": self.cfg.select, "chunk_steps": self.cfg.chunk_steps, "chunks": len(s.choices),
               "choices": list(s.choices), "datasets": datasets, "sources": sources}
        if s.probabilities is not None:
            out["probabilities"] = s.probabilities
        if dash:
            out.update(rewards=list(s.rewards), signals=list(s.signals), heldout_evaluations=self.heldout_evals,
                       heldout_examples=heldout_examples, final_heldout_loss=self.loss_before,
                       prior={"mean": self.cfg.prior_mean, "std": self.cfg.prior_std, "noise_std": self.cfg.noise_std},
                       reward=self.cfg.reward, discount=self.cfg.discount,
                       **({"baseline_chunks": self.cfg.baseline_chunks} if self.cfg.reward == "advantage" else {}))
        return out


# ----------------------------------------------------------------------------------------------
# Loading


def load_mixture(cfg: MixtureConfig, tokenizer, data_cfg, seed: int, eval_examples: Sequence | None = None):
    """(per-dataset training examples, held-out examples or None, summed DataStats, per-dataset stats).

    Each dataset is read by ``load_sft_examples`` (the loaders data.train uses). ``heldout``: a file is read as
    eval data; a fraction is taken from every dataset (seeded per dataset) and removed from its training rows;
    null falls back to ``eval_examples`` (data.eval). At most ``heldout_max`` held-out examples are kept.
    """
    from leantune.data.sft import DataStats, load_sft_examples

    items, heldout, per_stats = [], [], []
    total = DataStats()
    for d, (_, path) in enumerate(cfg.datasets()):
        examples, stats = load_sft_examples(path, tokenizer, data_cfg)
        if isinstance(cfg.heldout, float) and cfg.select == "dash":
            train_idx, held_idx = heldout_split(len(examples), cfg.heldout, seed + d)
            heldout += [examples[i] for i in held_idx]
            examples = IndexedView(examples, train_idx)
        items.append(examples)
        per_stats.append(stats.as_dict())
        for k, v in stats.as_dict().items():
            setattr(total, k, getattr(total, k) + v)
    if cfg.select != "dash":
        return items, None, total, per_stats
    if isinstance(cfg.heldout, str):
        heldout = list(load_sft_examples(cfg.heldout, tokenizer, data_cfg, role="eval")[0])
    elif cfg.heldout is None:
        heldout = list(eval_examples or [])
    if len(heldout) > cfg.heldout_max:
        keep = sorted(random.Random(f"heldout-max|{seed}").sample(range(len(heldout)), cfg.heldout_max))
        heldout = [heldout[i] for i in keep] if isinstance(cfg.heldout, float) else heldout[: cfg.heldout_max]
    return items, heldout, total, per_stats


# ----------------------------------------------------------------------------------------------
# Demo data: a clean task, a noisy copy and off-task text, for recipes/sft_mixture_dash.yaml and the benchmark


def demo_rows(kind: str, n: int, seed: int) -> list[dict]:
    """``n`` prompt/completion rows of one demo dataset.

    ``clean``: 2-digit addition with worked solutions (leantune.tasks.addition); ``noisy``: the same kind of
    problems with the final answer replaced by a wrong number in half the rows; ``shuffled``: addition prompts
    with another problem's completion; ``random``: random words, prompt and completion.
    """
    from leantune.tasks import addition

    rng = random.Random(f"demo|{kind}|{seed}")
    if kind == "random":
        words = ["the", "of", "river", "blue", "seven", "quickly", "under", "paper", "sing", "glass", "north",
                 "cold", "apple", "market", "listen", "stone", "eleven", "window", "loud", "garden"]
        return [{"prompt": " ".join(rng.choices(words, k=rng.randint(4, 9))),
                 "completion": " ".join(rng.choices(words, k=rng.randint(6, 14)))} for _ in range(n)]
    rows = addition.generate(n, seed=seed, split="train")
    if kind == "clean":
        return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    if kind == "noisy":
        out = []
        for r in rows:
            completion = r["completion"]
            if rng.random() < 0.5:  # a wrong final answer: off by 1..30, never negative
                right, delta = int(r["answer"]), rng.randint(1, 30)
                wrong = right - delta if right - delta >= 0 and rng.random() < 0.5 else right + delta
                completion = completion[: completion.rindex(r["answer"])] + str(wrong)
            out.append({"prompt": r["prompt"], "completion": completion})
        return out
    if kind == "shuffled":
        completions = [r["completion"] for r in rows]
        rng.shuffle(completions)
        return [{"prompt": r["prompt"], "completion": c} for r, c in zip(rows, completions)]
    raise ValueError(f"unknown demo dataset {kind!r}; expected clean, noisy, shuffled or random")


DEMO_KINDS = ("clean", "noisy", "shuffled", "random")


def write_demo_sources(out: Path, n: int = 512, heldout: int = 64, seed: int = 0) -> dict[str, Path]:
    """Write ``OUT/{clean,noisy,shuffled,random}.jsonl`` (``n`` rows each, each file's problems seeded on its own) and
    ``OUT/heldout.jsonl`` (clean addition from the test split); returns name -> path."""
    from leantune.tasks import addition

    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, kind in enumerate(DEMO_KINDS):
        paths[kind] = _write_rows(out / f"{kind}.jsonl", demo_rows(kind, n, seed + 101 * i))
    test = addition.generate(heldout, seed=seed, split="test")
    paths["heldout"] = _write_rows(out / "heldout.jsonl", [{"prompt": r["prompt"], "completion": r["completion"]}
                                                           for r in test])
    return paths


def _write_rows(path: Path, rows: list[dict]) -> Path:
    from leantune.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m leantune.data.mixture --out data/mixture``: write the demo sources."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m leantune.data.mixture", description=main.__doc__)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, default=512, help="rows per training dataset (default 512)")
    p.add_argument("--heldout", type=int, default=64, help="held-out clean addition rows (default 64)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name, path in write_demo_sources(Path(args.out), args.n, args.heldout, args.seed).items():
        print(f"wrote {name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
