"""Prefix-conditioned tree rollouts and their advantage (`rl.prefix_rollouts`; Tree-OPO, arXiv 2509.09284).

A prompt with a reference trace (the task's worked solution, or a teacher's accepted completion) becomes a
tree: one node per cut point of that trace (`rl.prefix_rollouts.depths`, fractions of its tokens; 0 = the bare
prompt), and `rl.group_size` completions sampled from each node with the prompt + the trace's first tokens as
context. The prefix is context: it sits in ``prompt_ids``, so the policy loss covers only the generated tokens.
A deep prefix leaves less to do, so its completions succeed more often; the tree's advantage compares each
completion with the value of the prefix it started from:

    V_k     = mean_j r_kj                          (node k's subtree success rate)
    a_kj    = r_kj - alpha * V_k
    A_kj    = (a_kj - mean_tree a) [/ (std_tree a + eps)]

centred (and, unless `rl.advantage: dr_grpo`, scaled by the unbiased std) over all completions of the prompt's
tree, exactly 0 where every a of the tree is equal. This is the simple prefix-value baseline of the paper's
staged advantage estimation, not its constrained quadratic program.

The tree is laid out as rollouts already are (group-contiguous): one group per prompt of size
``sum(node sizes)``, its nodes consecutive in depth order; ``Rollouts.extra`` carries the node structure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from leantune.config import Recipe, RecipeError

TREE_SCALE = {"grpo": "std", "dr_grpo": "none"}
"""rl.advantage (or the loss's default) -> how the tree advantage is scaled: the tree follows the group's rule."""


def cut_points(num_tokens: int, depths: Sequence[float]) -> list[int]:
    """Distinct prefix lengths (tokens) of a trace of ``num_tokens`` at fractional ``depths``, increasing:
    floor(d * num_tokens). Short traces collapse cuts (a ragged tree).

    >>> cut_points(9, [0.0, 1 / 3, 2 / 3]), cut_points(2, [0.0, 1 / 3, 2 / 3]), cut_points(0, [0.0, 0.5])
    ([0, 3, 6], [0, 1], [0])
    """
    out: list[int] = []
    for d in depths:
        k = math.floor(d * num_tokens + 1e-9)
        if not out or k > out[-1]:
            out.append(k)
    return out


def tree_advantages(rewards: torch.Tensor, node_sizes: Sequence[Sequence[int]], *, alpha: float = 1.0,
                    scale: str = "std", eps: float = 1e-4) -> torch.Tensor:
    """Tree-OPO advantages, rewards (N,) -> (N,), for trees laid out contiguously, nodes contiguous in each.

    ``node_sizes[t]``: completions of each node of tree t (sum over all trees = N). Per node
    a = r - alpha * mean(node rewards); per tree A = a - mean(a) [/ (unbiased std(a) + eps) with scale="std"];
    a tree whose a are all equal (or that has one completion) gives exactly 0.

    >>> tree_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), [[2, 2]], alpha=1.0, scale="none")
    tensor([ 0.5000, -0.5000,  0.0000,  0.0000])
    >>> tree_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), [[2, 2]], alpha=0.0, scale="none")
    tensor([ 0.2500, -0.7500,  0.2500,  0.2500])
    """
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    sizes = [[int(m) for m in t] for t in node_sizes]
    if any(m < 1 for t in sizes for m in t) or any(not t for t in sizes):
        raise ValueError(f"node sizes {sizes}: every tree needs >= 1 node, every node >= 1 completion")
    if rewards.dim() != 1 or sum(map(sum, sizes)) != rewards.numel():
        raise ValueError(f"node sizes {sizes} do not cover rewards of shape {tuple(rewards.shape)}")
    r = rewards.detach().to(torch.get_default_dtype() if not torch.is_floating_point(rewards) else rewards.dtype)
    if not torch.isfinite(r).all():
        raise ValueError("rewards contain NaN or inf; give unscorable completions a finite reward (e.g. 0)")
    out = []
    for tree, part in zip(sizes, r.split([sum(t) for t in sizes])):
        nodes = part.split(tree)  # each (m_k,)
        a = torch.cat([x - alpha * x.mean() for x in nodes])  # (N_t,)
        if a.numel() < 2 or bool(a.max() == a.min()):
            out.append(torch.zeros_like(a))
            continue
        adv = a - a.mean()
        if scale == "std":
            adv = adv / (a.std(correction=1) + eps)
        out.append(adv)
    return torch.cat(out) if out else r.new_zeros(0)


# ----------------------------------------------------------------------------------------------
# Reference traces


def _trace_row(data, where: str) -> dict:
    """A trace row: {prompt, completion} or {messages: [..., user, assistant]}, as {"prompt", "completion"}."""
    from leantune.data.records import DataError
    from leantune.tasks import completion_text

    if isinstance(data, dict) and isinstance(data.get("prompt"), str) and "completion" in data:
        return {"prompt": data["prompt"], "completion": completion_text(data["completion"])}
    msgs = data.get("messages") if isinstance(data, dict) else None
    if isinstance(msgs, list) and len(msgs) >= 2 and all(isinstance(m, dict) for m in msgs[-2:]) \
            and msgs[-1].get("role") == "assistant" and msgs[-2].get("role") == "user":
        return {"prompt": str(msgs[-2].get("content", "")), "completion": str(msgs[-1].get("content", ""))}
    raise DataError(f"{where}: a reference trace row needs 'prompt' and 'completion', or 'messages' ending in a "
                    "user turn and an assistant turn (an rft run's accepted.jsonl)")


def load_traces(recipe: Recipe) -> dict[str, str]:
    """prompt -> reference trace text, from `rl.prefix_rollouts.traces` (the first trace of a prompt wins)."""
    from leantune.data.records import read_rows

    src, rl = recipe.rl.prefix_rollouts.traces, recipe.rl
    if src != "task":
        rows = read_rows(src, _trace_row)
    elif recipe.data.train:
        from leantune.data.records import read_prompt_rows

        rows = [r for r in read_prompt_rows(recipe.data.train, split=recipe.data.split, columns=recipe.data.columns)
                if isinstance(r.get("completion"), str)]
    else:
        from leantune.tasks import get_task

        rows = get_task(rl.task).generate(rl.num_prompts, seed=recipe.train.seed, split="train")
    out: dict[str, str] = {}
    for r in rows:
        out.setdefault(r["prompt"], r["completion"])
    return out


# ----------------------------------------------------------------------------------------------
# The tree of each prompt


@dataclass
class TreeNodes:
    """The sampling entries of a list of prompts: one per (prompt, cut), prompt-contiguous, in depth order."""

    prompts: list[str]  # (E,) the prompt of each entry
    prefixes: list[list[int]]  # (E,) its prefix tokens (empty at depth 0)
    depths: list[float]  # (E,) the configured depth that gave the cut (the first, when cuts collapse)
    per_prompt: list[int]  # (n_p,) entries (nodes) of each prompt


class PrefixTree:
    """Each prompt's prefix cuts, from its tokenized reference trace (prompts without one: depth 0 only)."""

    def __init__(self, traces: dict[str, str], tokenizer, depths: Sequence[float]):
        self.depths = list(depths)
        self.tokenizer = tokenizer
        self.traces = traces
        self._cuts: dict[str, tuple[list[int], list[tuple[int, float]]]] = {}
        self.with_trace = 0  # prompts of the pool that have a trace (build_tree sets it; for the ledger)

    def cuts(self, prompt: str) -> tuple[list[int], list[tuple[int, float]]]:
        """(trace tokens, [(prefix length, depth)]) of ``prompt``; cached."""
        if prompt not in self._cuts:
            text = self.traces.get(prompt)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            lengths = cut_points(len(ids), self.depths) if ids else [0]
            depth_of = {}
            for d in self.depths:
                depth_of.setdefault(math.floor(d * len(ids) + 1e-9), d)
            self._cuts[prompt] = (ids, [(k, depth_of.get(k, 0.0)) for k in lengths])
        return self._cuts[prompt]

    def nodes(self, prompts: Sequence[str]) -> TreeNodes:
        out = TreeNodes([], [], [], [])
        for p in prompts:
            ids, cuts = self.cuts(p)
            for k, d in cuts:
                out.prompts.append(p)
                out.prefixes.append(ids[:k])
                out.depths.append(d)
            out.per_prompt.append(len(cuts))
        return out

    def longest_context(self, prompts: Sequence[str]) -> tuple[int, int]:
        """(index, tokens) of the prompt whose deepest prefix is longest, rendered prompt included."""
        from leantune.rl.rollout import _tokenize_prompts

        lengths = [len(ids) + self.cuts(p)[1][-1][0] for p, ids in zip(prompts, _tokenize_prompts(self.tokenizer, prompts))]
        i = max(range(len(lengths)), key=lengths.__getitem__, default=0)
        return i, (lengths[i] if lengths else 0)

    @staticmethod
    def regroup(ro, nodes: TreeNodes, group_size: int):
        """Rollouts sampled as one group per entry -> one group per prompt (its whole tree), with
        ``extra``: tree_nodes (per prompt, the size of each node), prefix_depth and prefix_tokens (per completion)."""
        if len(ro) != group_size * len(nodes.prompts):
            raise ValueError(f"{len(ro)} rollouts for {len(nodes.prompts)} tree nodes of {group_size}")
        tree_nodes = [[group_size] * k for k in nodes.per_prompt]
        extra = {**ro.extra, "tree_nodes": tree_nodes,
                 "prefix_depth": [d for d in nodes.depths for _ in range(group_size)],
                 "prefix_tokens": [len(x) for x in nodes.prefixes for _ in range(group_size)]}
        return replace(ro, group_sizes=[sum(t) for t in tree_nodes], extra=extra)


def build_tree(recipe: Recipe, pool: list[dict], tokenizer) -> PrefixTree:
    """The run's PrefixTree; RecipeError when no prompt of the pool has a trace, or when a prompt plus its
    deepest prefix exceeds data.max_length (the memory plan's bound on an RL context)."""
    pr = recipe.rl.prefix_rollouts
    traces = load_traces(recipe)
    prompts = [r["prompt"] for r in pool]
    have = sum(p in traces for p in prompts)
    if not have:
        raise RecipeError(f"rl.prefix_rollouts.traces={pr.traces!r}: no reference trace for any of the {len(prompts)} "
                          "prompts (traces are matched to prompts by exact text)")
    tree = PrefixTree(traces, tokenizer, pr.depths)
    i, n = tree.longest_context(prompts)
    if n > recipe.data.max_length:
        raise RecipeError(f"rl.prefix_rollouts: prompt {i + 1} plus its deepest prefix is {n} tokens, more than "
                          f"data.max_length={recipe.data.max_length}; raise data.max_length or lower the depths")
    tree.with_trace = have
    return tree
