"""Exact speculative rollouts: draft tokens cheaply, verify them in one policy forward, sample exactly the policy.

Speculative sampling (Leviathan et al., arXiv 2211.17192; Chen et al., arXiv 2302.01318) drafts k tokens
from a proposal q, runs the policy once over all of them, accepts drafted token x with probability
min(1, p(x) / q(x)), and on the first rejection samples from the residual norm(max(p - q, 0)); when all k
are accepted it samples one bonus token from the last position. The accepted prefix plus that one token is
distributed exactly as p, token by token: rollouts stay on-policy.

Prompt lookup (the proposal of transformers' prompt-lookup decoding, Saxena 2023) drafts by matching the
last n tokens of prompt + completion earlier in the same sequence and proposing what followed there. Its q
is a point mass on the drafted token, so the rule becomes: accept x with probability p(x); on rejection
sample from p with x removed and renormalized. `verify_point_drafts` does exactly that with one uniform u
per position, coupled to plain sampling: it draws s = F_p^{-1}(u) (the token plain inverse-CDF sampling
would draw from u) and accepts x iff s == x. P(accept) = P(u lands in x's CDF interval) = p(x), and given
a rejection s is distributed as p restricted to the other tokens, renormalized: the point-mass rule. The
emitted token at every position is then s itself, so with the per-row uniform streams of
`leantune.rl.rollout.row_uniforms` (token t of a row always uses uniform t) a speculative rollout is the
plain rollout token for token, up to float rounding of the wider forward. tests/test_speculative.py checks
the distribution with a chi-square test (and that the test rejects a wrong rule), the recorded log-probs
against a teacher-forced recompute, and greedy equality.

`p` is what plain sampling draws from: `token_distribution` (logits / temperature, softmax, top-p), and
the recorded log-prob of each token is log softmax(logits / temperature) at its position, as in plain
sampling.

KV cache and rows of different acceptance lengths: every verify forward appends w = 1 + the longest draft
columns to the cache for all rows (the pending token plus the drafts, shorter drafts padded). A row that
accepts a drafts keeps its first a + 1 columns; its rejected columns stay in the cache as holes masked out
by the attention mask (positions are given explicitly per row, so holes do not shift RoPE). Columns that no
row kept are cropped off the end (`DynamicCache.crop`). Each row advances by its own acceptance length, no
row waits for another's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache

from leantune.rl.rollout import (
    Rollouts,
    _cache_kwarg,
    _tokenize_prompts,
    decode_setup,
    prefill_groups,
    row_finished,
    row_keys,
    row_uniforms_at,
    sample_categorical,
    token_distribution,
)


class PromptLookup:
    """The n-gram index of one growing token sequence, for prompt-lookup drafts.

    ``index`` maps each n-gram (n <= max_ngram) to the end of its latest occurrence that has a continuation;
    `propose` looks up the sequence's last n tokens, longest n first, and proposes what followed.

    >>> pl = PromptLookup([5, 6, 7, 8, 5, 6], max_ngram=2)
    >>> pl.propose(3)
    [7, 8, 5]
    >>> pl.extend([9]); pl.propose(3)
    []
    """

    def __init__(self, ids: Sequence[int] = (), max_ngram: int = 3):
        if max_ngram < 1:
            raise ValueError(f"max_ngram must be >= 1, got {max_ngram}")
        self.max_ngram = max_ngram
        self.ids: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}
        self.extend(ids)

    def extend(self, tokens: Sequence[int]) -> None:
        for tok in tokens:
            end = len(self.ids)  # the n-grams ending here now have a continuation: tok
            for n in range(1, min(self.max_ngram, end) + 1):
                self.index[tuple(self.ids[end - n:end])] = end
            self.ids.append(int(tok))

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix n-gram."""
        if k < 1:
            return []
        end = len(self.ids)
        for n in range(min(self.max_ngram, end), 0, -1):
            at = self.index.get(tuple(self.ids[end - n:]))
            if at is not None:
                return self.ids[at:at + k]
        return []

    def fork(self) -> PromptLookup:
        other = PromptLookup.__new__(PromptLookup)
        other.max_ngram, other.ids, other.index = self.max_ngram, list(self.ids), dict(self.index)
        return other


def prompt_lookup_drafter(max_ngram: int = 3) -> Callable[[Sequence[int]], PromptLookup]:
    """A drafter: prompt ids -> a draft state with ``extend(tokens)``, ``propose(k)`` and ``fork()``."""
    return lambda ids: PromptLookup(ids, max_ngram=max_ngram)


def verify_point_drafts(weights: torch.Tensor, draft: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The token each verified position emits if reached, under the speculative rule for a point-mass draft.

    weights (K, V): the policy's sampling distribution at each position (unnormalized, as `token_distribution`
    gives it); draft (K,): the drafted token each position checks (-1: none, the bonus position);
    uniforms (K,) in [0, 1). Returns s (K,); the caller accepts a drafted token iff s == draft there.
    s = F^{-1}(u), so P(s == x) = p(x) (accept) and s | s != x ~ norm(max(p - 1_x, 0)) (the residual):
    Leviathan et al.'s rule with q = 1_x (arXiv 2211.17192, Algorithm 1), using the uniform plain sampling
    uses. The draft does not change s, only whether the row continues past it.
    """
    del draft  # the coupling needs only u; the signature is the rule's, so other rules can be tested in its place
    return sample_categorical(weights, uniforms=uniforms)


Verify = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def compact_holes(cache: DynamicCache, attn: torch.Tensor, slack: float = 0.25, min_holes: int = 16) -> torch.Tensor:
    """Squeeze the masked columns out of ``cache`` once they are more than ``slack`` of its length: returns the
    new attention mask (n, L') (or ``attn`` unchanged).

    Each row's kept columns move right, in order, left-padded with masked ones: keys are stored after RoPE and
    positions are explicit, so moving a column changes nothing the attention computes (masked columns weigh
    exactly 0). Bounds the cache at (1 + slack) x what plain sampling holds, which is what `leantune plan`
    budgets for, instead of growing by every rejected draft.
    """
    length = attn.shape[1]
    width = int(attn.sum(1).max())
    if length - width < max(min_holes, slack * length):
        return attn
    order = torch.sort(attn, dim=1, stable=True).indices[:, length - width:]  # (n, L'): kept columns, in order
    for layer in cache.layers:
        idx = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])  # (n, heads, L', d)
        layer.keys, layer.values = layer.keys.gather(2, idx), layer.values.gather(2, idx)
    return attn.gather(1, order)


@torch.no_grad()
def sample_speculative(model, tokenizer, prompts: Sequence[str], *, group_size: int, max_new_tokens: int,
                       temperature: float = 1.0, top_p: float = 1.0, stop: Sequence[str] = (),
                       is_complete: Callable[[str], bool] | None = None, generator: torch.Generator | None = None,
                       seeds: Sequence[int] | None = None, max_draft: int = 4,
                       drafter: Callable[[Sequence[int]], PromptLookup] | None = None,
                       verify: Verify = verify_point_drafts) -> Rollouts:
    """`leantune.rl.rollout.sample_groups` with drafts verified in one forward (see the module docstring).

    Same arguments and result as `sample_groups` (adapter folding is the caller's), plus ``max_draft``: k,
    the most tokens drafted per row per forward; ``drafter``: prompt ids -> draft state (default: prompt
    lookup with 3-grams); ``verify``: the acceptance rule (`verify_point_drafts`; tests swap in wrong ones).
    The result also counts ``draft_tokens`` and ``accepted_tokens``; ``row_steps`` counts the rows of every
    policy forward whose output was sampled from, prefill included, so tokens_per_forward =
    tokens_generated / row_steps (1.0 for plain sampling).
    """
    if max_draft < 1:
        raise ValueError(f"max_draft (rl.speculative_tokens) must be >= 1, got {max_draft}")
    drafter = drafter or prompt_lookup_drafter(3)
    start_time = time.perf_counter()
    was_training, decoder, head_w, eos, pad, dev = decode_setup(model, tokenizer)  # model now in eval mode

    distinct = _tokenize_prompts(tokenizer, prompts)
    prompt_ids = [ids for ids in distinct for _ in range(group_size)]
    n = len(prompt_ids)
    states = [base.fork() for base in (drafter(ids) for ids in distinct) for _ in range(group_size)]
    tokens: list[list[int]] = [[] for _ in range(n)]
    logps: list[list[float]] = [[] for _ in range(n)]
    ents: list[list[float]] = [[] for _ in range(n)]
    truncated = [False] * n
    keys = row_keys(seeds, group_size) if seeds is not None else None  # (n,)
    rows = torch.arange(n)  # cache row -> sequence index (CPU)
    cache = DynamicCache()
    cache_kw = _cache_kwarg(decoder)
    steps = row_steps = drafted = accepted = 0
    try:
        h, attn, next_pos = prefill_groups(decoder, distinct, group_size, pad, cache, dev)  # (n, H), (n, P), (n,)
        hidden = h[:, None]  # (n, w=1, H): the prefill's last position, no drafts
        drafts: list[list[int]] = [[] for _ in range(n)]
        while True:
            # 1. the policy's distribution at every verified position, and the token each would emit
            w = hidden.shape[1]
            lens = torch.tensor([len(d) for d in drafts], dtype=torch.long)  # (n,)
            valid = torch.arange(w)[None, :] <= lens[:, None]  # (n, w): pending token + its drafts
            rr, jj = valid.nonzero(as_tuple=True)  # (K,), (K,)
            logp_all, weights, entropy = token_distribution(hidden[rr.to(dev), jj.to(dev)], head_w, temperature, top_p)
            want = torch.tensor([d + [-1] * (w - len(d)) for d in drafts], dtype=torch.long)  # (n, w): draft checked at (r, j)
            t_at = torch.tensor([len(tokens[q]) for q in rows.tolist()], dtype=torch.long)[rr] + jj  # (K,) token index
            u = (row_uniforms_at(keys[rows[rr]], t_at) if keys is not None
                 else torch.rand(len(rr), generator=generator))  # (K,)
            s = verify(weights, want[rr, jj].to(dev), u.to(dev)).cpu()  # (K,)
            s_logp = logp_all.gather(1, s.to(dev)[:, None]).squeeze(1).tolist()  # (K,)
            s_ent = entropy.tolist()  # (K,)
            del logp_all, weights, entropy
            emit = torch.full((len(rows), w), -1, dtype=torch.long).index_put_((rr, jj), s)  # (n, w)
            at = torch.full((len(rows), w), -1, dtype=torch.long).index_put_((rr, jj), torch.arange(len(rr)))
            acc = ((emit == want) & (want >= 0)).long().cumprod(1).sum(1)  # (n,) leading drafts accepted
            row_steps += len(rows)
            drafted += int(lens.sum())
            accepted += int(acc.sum())
            # 2. emit each row's tokens up to its first rejection (or the bonus), stopping like plain sampling
            done = torch.zeros(len(rows), dtype=torch.bool)
            s_tok, at_k, n_acc = s.tolist(), at.tolist(), acc.tolist()
            for r, seq in enumerate(rows.tolist()):
                for k in at_k[r][: n_acc[r] + 1]:
                    tokens[seq].append(s_tok[k])
                    logps[seq].append(s_logp[k])
                    ents[seq].append(s_ent[k])
                    if row_finished(tokenizer, tokens[seq], eos, stop, is_complete):
                        done[r] = True
                        break
                    if len(tokens[seq]) == max_new_tokens:
                        done[r] = truncated[seq] = True
                        break
            if done.all():
                break
            # 3. the cache keeps each row's pending token + accepted drafts; rejected ones become masked holes
            nxt = emit.gather(1, acc[:, None]).squeeze(1)  # (n,) each row's newest token, not yet in the cache
            if steps:  # the verify forward fed w columns
                attn[:, -w:] = (torch.arange(w)[None, :] <= acc[:, None]).to(attn)
                next_pos = next_pos + (acc + 1).to(dev)
            if done.any():  # finished rows leave the batch, cache included
                keep = (~done).nonzero().squeeze(1)
                cache.batch_select_indices(keep.to(dev))
                rows, nxt, acc = rows[keep], nxt[keep], acc[keep]
                attn, next_pos = attn[keep.to(dev)], next_pos[keep.to(dev)]
            drop = w - 1 - int(acc.max()) if steps else 0  # trailing columns no remaining row kept
            if drop:
                cache.crop(-drop)
                attn = attn[:, :-drop]
            attn = compact_holes(cache, attn)
            # 4. draft the next tokens and run the policy once over pending token + drafts
            drafts = []
            for seq in rows.tolist():
                states[seq].extend(tokens[seq][len(states[seq].ids) - len(prompt_ids[seq]):])
                room = max_new_tokens - len(tokens[seq]) - 1  # the forward also yields one token past the drafts
                drafts.append(states[seq].propose(min(max_draft, room)))
            w = 1 + max(len(d) for d in drafts)
            x = torch.tensor([[t, *d] + [pad] * (w - 1 - len(d)) for t, d in zip(nxt.tolist(), drafts)],
                             dtype=torch.long)  # (n, w): pending token, drafts, padding
            fed = torch.arange(w)[None, :] <= torch.tensor([len(d) for d in drafts])[:, None]  # (n, w)
            attn = torch.cat([attn, fed.to(attn)], dim=1)  # pad columns of shorter drafts are masked
            positions = next_pos[:, None] + torch.arange(w, device=dev)[None, :]  # (n, w)
            out = decoder(input_ids=x.to(dev), attention_mask=attn, position_ids=positions, use_cache=True,
                          **{cache_kw: cache})
            hidden = out.last_hidden_state  # (n, w, H)
            del out
            steps += 1
    finally:
        del cache
        model.train(was_training)
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return Rollouts(
        group_size=group_size, prompt_ids=prompt_ids, completion_ids=tokens, texts=texts, logprobs=logps,
        entropy=ents, truncated=truncated, decode_steps=steps, row_steps=row_steps, draft_tokens=drafted,
        accepted_tokens=accepted, seconds=time.perf_counter() - start_time,
        extra={"prefill_tokens": sum(len(p) for p in distinct)},
    )
