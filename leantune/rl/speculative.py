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

Draft model (`DraftModel`, `DraftRollout`): a small causal LM sharing the policy's vocabulary proposes k tokens
per row autoregressively, each sampled from its own distribution q (the same temperature and top-p processing as
p), with its own batched KV cache. `verify_sampled_drafts` applies the general rule: accept x with probability
min(1, p(x) / q(x)); on rejection sample from norm(max(p - q, 0)); after k accepted, a bonus token from p. The
output is distributed exactly as p whatever q is (a poor draft only lowers acceptance); the coupling to plain
sampling's uniforms is lost (draws use separate counter-based streams per row, token and purpose), so the tokens
differ from plain sampling's, the distribution does not. The draft is either a model directory / GGUF file loaded
like the policy (`load_draft_model`), or the policy's own first N decoder layers + final norm + LM head
(`self_draft`, layer-skip self-speculation: a view sharing the policy's modules, adapter included).

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

import copy
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from leantune.rl.rollout import (
    Rollouts,
    _cache_kwarg,
    _i64,
    _tokenize_prompts,
    decode_setup,
    prefill_groups,
    row_finished,
    row_keys,
    row_uniforms_at,
    sample_categorical,
    splitmix64,
    token_distribution,
    top_p_filter,
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
    exactly 0). Bounds the cache at about max(width + min_holes, width / (1 - slack)) columns (plus the round
    being verified) instead of growing by every rejected draft; `leantune plan` budgets that bound
    (`leantune.plan.memory.speculative_cache_tokens`, whose constants are these defaults).
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


def verify_sampled_drafts(weights: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, u_accept: torch.Tensor,
                          u_resample: torch.Tensor) -> torch.Tensor:
    """The token each verified position emits if reached, under the speculative rule for a sampled draft.

    weights (K, V): the policy's sampling distribution at each position, unnormalized (`token_distribution`);
    q (K, V): the draft distribution the drafted token was sampled from, normalized (rows of bonus positions
    unused); draft (K,): the drafted token each position checks (-1: none, the bonus position); u_accept,
    u_resample (K,) in [0, 1), independent. Returns s (K,); the caller accepts a drafted token iff s == draft.
    Accept x iff u_accept < p(x) / q(x) (probability min(1, p(x)/q(x))); otherwise s ~ norm(max(p - q, 0)), which
    is 0 at x whenever x can be rejected, so s != x; at the bonus position s ~ p (arXiv 2211.17192 Algorithm 1,
    arXiv 2302.01318 Algorithm 2). Where the residual is all zero (p == q, acceptance then certain up to
    rounding) it falls back to p.
    """
    p = weights / weights.sum(-1, keepdim=True)  # (K, V)
    has = draft >= 0  # (K,)
    x = draft.clamp(min=0)[:, None]  # (K, 1)
    px, qx = p.gather(1, x).squeeze(1), q.gather(1, x).squeeze(1)  # (K,), (K,)
    accept = has & (u_accept * qx < px)
    residual = (p - q).clamp_(min=0)  # (K, V)
    use_p = ~has | (residual.sum(-1) <= 0)  # (K,)
    residual = torch.where(use_p[:, None], p, residual)
    return torch.where(accept, draft, sample_categorical(residual, uniforms=u_resample))


SampledVerify = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Salts that split a row's stream key into independent streams per purpose: the draft's own samples and the
# acceptance tests; the residual / bonus draws use the plain stream (`row_uniforms_at(keys, t)`).
_DRAFT_SALT, _ACCEPT_SALT = 0x5DEECE66D, 0x2545F4914F6CDD1D


def salted_keys(keys: torch.Tensor, salt: int) -> torch.Tensor:
    """Stream keys (n,) -> keys of an independent stream per row, (n,) (splitmix64 of key + salt)."""
    return splitmix64(keys + _i64(salt))


@dataclass
class DraftModel:
    """A draft for `rl.speculative: draft`: a decoder (input ids -> last hidden states, with a KV cache) and the
    dense LM-head weight (V, H) it samples from; V must be the policy's vocabulary. ``name`` says which."""

    decoder: torch.nn.Module
    head_w: torch.Tensor  # (V, H)
    name: str


def self_draft(model, n_layers: int) -> DraftModel:
    """Layer-skip self-speculation (arXiv 2309.08168, 2404.16710): the policy's first ``n_layers`` decoder layers,
    its final norm and LM head, as a view sharing the policy's modules (no copy). The view is a shallow copy of
    the decoder whose config says ``num_hidden_layers = n_layers``: transformers' decoders (Llama, Qwen2/3,
    Mistral, Gemma, Phi3) run ``self.layers[: config.num_hidden_layers]``. The LoRA adapter applies to the draft
    as to the policy (folded or not: the layers are the same modules)."""
    decoder, head_w = _decoder_and_head(model)
    total = decoder.config.num_hidden_layers
    if not 1 <= n_layers <= total:
        raise ValueError(f"rl.speculative_draft: layers:{n_layers}, but the policy has {total} decoder layers "
                         f"(use 1..{total}; fewer is cheaper, more is accepted more often)")
    view = copy.copy(decoder)  # shares _modules/_parameters: the same layers, norm, embeddings
    view.config = copy.deepcopy(decoder.config)
    view.config.num_hidden_layers = n_layers
    if getattr(view.config, "layer_types", None):
        view.config.layer_types = list(view.config.layer_types)[:n_layers]
    return DraftModel(view, head_w, f"layers:{n_layers}")


def _decoder_and_head(model) -> tuple[torch.nn.Module, torch.Tensor]:
    """The policy's decoder and dense LM-head weight (V, H), as `decode_setup` finds them."""
    from leantune.adapters.lora import causal_lm
    from leantune.quant.weight_only import dense_head_weight

    lm = causal_lm(model)
    return lm.get_decoder(), dense_head_weight(lm.get_output_embeddings())


@functools.lru_cache(maxsize=2)
def load_draft_model(path: str, dtype: str, device: str) -> DraftModel:
    """A draft model directory (safetensors) or GGUF file, loaded like the policy (`leantune.models.loading`:
    no remote code, no pickles), frozen, in ``dtype`` on ``device``; cached per process (Ray workers load it once)."""
    from leantune.adapters.lora import causal_lm
    from leantune.config import ModelConfig
    from leantune.models.loading import load_model
    from leantune.quant.weight_only import dense_head_weight

    lm = load_model(ModelConfig(path=path, dtype=dtype)).to(device).eval().requires_grad_(False)
    return DraftModel(lm.get_decoder(), dense_head_weight(causal_lm(lm).get_output_embeddings()), path)


def draft_model_for(model, spec: str | DraftModel | None) -> DraftModel:
    """``rl.speculative_draft`` -> a `DraftModel`: ``layers:N`` (`self_draft`), a path (`load_draft_model`, in the
    policy's dtype and device), or a `DraftModel` as is. Checks the vocabulary matches the policy's."""
    if spec is None:
        raise ValueError("rl.speculative: draft needs rl.speculative_draft: 'layers:N' (the policy's first N layers) "
                         "or the path of a draft model sharing the policy's tokenizer")
    head_w = _decoder_and_head(model)[1]  # (V, H): the policy's vocabulary, dtype and device
    if isinstance(spec, DraftModel):
        draft = spec
    elif spec.startswith("layers:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"rl.speculative_draft: {spec!r}: expected layers:N with N an integer") from None
        draft = self_draft(model, n)
    else:
        dtype = "bfloat16" if head_w.dtype == torch.bfloat16 else "float32"
        draft = load_draft_model(spec, dtype, str(head_w.device))
    vocab = head_w.shape[0]
    if draft.head_w.shape[0] != vocab:
        raise ValueError(f"rl.speculative_draft: {draft.name} has a vocabulary of {draft.head_w.shape[0]} tokens, the "
                         f"policy {vocab}: the draft must share the policy's tokenizer")
    return draft


class DraftRollout:
    """The draft model's side of a batched speculative rollout: its own KV cache over the same rows as the policy's.

    Per verify round (`propose`): feed each row the tokens its cache lacks (the pending token, plus the last
    accepted draft and the bonus token after a fully accepted round), then sample up to k tokens one forward at
    a time from q. After verification (`commit`): the columns of rejected drafts become masked holes, trailing
    columns no row kept are cropped, holes are compacted as in the policy's cache (`compact_holes`).
    """

    def __init__(self, draft: DraftModel, temperature: float, top_p: float, pad: int):
        self.draft, self.temperature, self.top_p, self.pad = draft, temperature, top_p, pad
        self.cache = DynamicCache()
        self.cache_kw = _cache_kwarg(draft.decoder)
        self.forwards = self.row_forwards = 0  # batched draft forwards and their rows (prefill excluded)
        self._round: tuple[torch.Tensor, int] | None = None  # (catch-up widths (n,), drafts fed per row)
        self.attn = self.next_pos = None  # (n, L) mask of the draft cache, (n,) next position id: set by `prefill`
        self.seen: list[int] = []  # completion tokens each row's cache holds

    def prefill(self, distinct: Sequence[Sequence[int]], group_size: int, dev: torch.device) -> None:
        _, self.attn, self.next_pos = prefill_groups(self.draft.decoder, distinct, group_size, self.pad, self.cache,
                                                     dev)
        self.seen = [0] * self.attn.shape[0]

    def _forward(self, ids: torch.Tensor, fed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.attn = torch.cat([self.attn, fed.to(self.attn)], dim=1)
        out = self.draft.decoder(input_ids=ids, attention_mask=self.attn, position_ids=positions, use_cache=True,
                                 **{self.cache_kw: self.cache})
        self.forwards += 1
        self.row_forwards += ids.shape[0]
        return out.last_hidden_state  # (n, w, H)

    def propose(self, tokens: list[list[int]], room: list[int], max_draft: int, keys: torch.Tensor | None,
                generator: torch.Generator | None) -> tuple[list[list[int]], torch.Tensor | None]:
        """Draft for the batch's rows: ``tokens`` each row's completion so far (its last token not yet in either
        cache), ``room`` the most drafts each row may take. Returns (drafts, q (n, kmax, V): the normalized
        distribution each draft was sampled from; None when nothing is drafted)."""
        n, dev = len(tokens), self.attn.device
        lens = [max(0, min(max_draft, r)) for r in room]
        kmax = max(lens, default=0)
        if kmax == 0:
            self._round = None
            return [[] for _ in range(n)], None
        catch = [t[s:] for t, s in zip(tokens, self.seen)]  # each non-empty: the pending token at least
        c = torch.tensor([len(x) for x in catch], dtype=torch.long)  # (n,)
        width = int(c.max())
        ids = torch.tensor([x + [self.pad] * (width - len(x)) for x in catch], dtype=torch.long, device=dev)  # (n, C)
        fed = torch.arange(width)[None, :] < c[:, None]  # (n, C)
        positions = self.next_pos[:, None] + torch.arange(width, device=dev)[None, :]  # (n, C)
        h = self._forward(ids, fed, positions)[torch.arange(n, device=dev), (c - 1).to(dev)]  # (n, H)
        t0 = torch.tensor([len(t) for t in tokens], dtype=torch.long)  # (n,): token index of the first draft
        dkeys = salted_keys(keys, _DRAFT_SALT) if keys is not None else None
        xs, qs = [], []
        for j in range(kmax):
            logits = (h @ self.draft.head_w.T).float() / self.temperature  # (n, V)
            q = top_p_filter(torch.softmax(logits, dim=-1), self.top_p)  # (n, V), unnormalized after top-p
            q = q / q.sum(-1, keepdim=True)
            del logits
            u = row_uniforms_at(dkeys, t0 + j) if dkeys is not None else torch.rand(n, generator=generator)  # (n,)
            x = sample_categorical(q, uniforms=u.to(q.device))  # (n,)
            xs.append(x)
            qs.append(q)
            if j < kmax - 1:  # the last draft is not fed: the policy's verify decides what follows it
                pos = (self.next_pos + c.to(dev) + j)[:, None]  # (n, 1)
                h = self._forward(x[:, None].to(dev), torch.ones(n, 1, dtype=torch.bool), pos)[:, -1]
        self._round = (c, kmax - 1)
        drafted = torch.stack(xs, 1).tolist()  # (n, kmax)
        return [d[:k] for d, k in zip(drafted, lens)], torch.stack(qs, 1)  # (n, kmax, V)

    def commit(self, acc: torch.Tensor) -> None:
        """After verification: each row (same order as `propose`'s) accepted its first ``acc`` (n,) drafts."""
        if self._round is None:
            return
        c, fed = self._round
        self._round = None
        kept = torch.clamp(acc, max=fed)  # (n,) drafts whose column stays
        if fed:
            self.attn[:, -fed:] = (torch.arange(fed)[None, :] < kept[:, None]).to(self.attn)
        step = c + kept  # (n,) completion tokens each cache gained
        self.next_pos = self.next_pos + step.to(self.next_pos.device)
        self.seen = [s + int(d) for s, d in zip(self.seen, step.tolist())]
        drop = fed - int(kept.max())
        if drop:
            self.cache.crop(-drop)
            self.attn = self.attn[:, :-drop]
        self.attn = compact_holes(self.cache, self.attn)

    def select(self, keep: torch.Tensor) -> None:
        """Keep only rows ``keep`` (indices, as the policy's batch does when rows finish)."""
        self.cache.batch_select_indices(keep.to(self.attn.device))
        self.attn, self.next_pos = self.attn[keep.to(self.attn.device)], self.next_pos[keep.to(self.attn.device)]
        self.seen = [self.seen[i] for i in keep.tolist()]


@torch.no_grad()
def sample_speculative(model, tokenizer, prompts: Sequence[str], *, group_size: int, max_new_tokens: int,
                       temperature: float = 1.0, top_p: float = 1.0, stop: Sequence[str] = (),
                       is_complete: Callable[[str], bool] | None = None, generator: torch.Generator | None = None,
                       seeds: Sequence[int] | None = None, max_draft: int = 4,
                       drafter: Callable[[Sequence[int]], PromptLookup] | None = None,
                       draft_model: DraftModel | None = None,
                       verify: Verify | SampledVerify | None = None) -> Rollouts:
    """`leantune.rl.rollout.sample_groups` with drafts verified in one forward (see the module docstring).

    Same arguments and result as `sample_groups` (adapter folding is the caller's), plus ``max_draft``: k,
    the most tokens drafted per row per forward; ``drafter``: prompt ids -> draft state (default: prompt
    lookup with 3-grams); ``draft_model``: draft with this model instead (`DraftModel`, q sampled); ``verify``:
    the acceptance rule (default `verify_point_drafts`, with a draft model `verify_sampled_drafts`; tests swap
    in wrong ones). The result also counts ``draft_tokens`` and ``accepted_tokens``; ``row_steps`` counts the
    rows of every policy forward whose output was sampled from, prefill included, so tokens_per_forward =
    tokens_generated / row_steps (1.0 for plain sampling); ``draft_row_steps`` the rows of every draft-model
    forward (``extra["draft_forwards"]``: the batched draft forwards).
    """
    if max_draft < 1:
        raise ValueError(f"max_draft (rl.speculative_tokens) must be >= 1, got {max_draft}")
    if draft_model is not None and drafter is not None:
        raise ValueError("sample_speculative: give a drafter (point-mass drafts) or a draft_model, not both")
    drafter = drafter or prompt_lookup_drafter(3)
    verify = verify or (verify_point_drafts if draft_model is None else verify_sampled_drafts)
    start_time = time.perf_counter()
    was_training, decoder, head_w, eos, pad, dev = decode_setup(model, tokenizer)  # model now in eval mode

    distinct = _tokenize_prompts(tokenizer, prompts)
    prompt_ids = [ids for ids in distinct for _ in range(group_size)]
    n = len(prompt_ids)
    states = ([base.fork() for base in (drafter(ids) for ids in distinct) for _ in range(group_size)]
              if draft_model is None else None)
    tokens: list[list[int]] = [[] for _ in range(n)]
    logps: list[list[float]] = [[] for _ in range(n)]
    ents: list[list[float]] = [[] for _ in range(n)]
    truncated = [False] * n
    keys = row_keys(seeds, group_size) if seeds is not None else None  # (n,)
    acc_keys = salted_keys(keys, _ACCEPT_SALT) if keys is not None else None  # (n,)
    rows = torch.arange(n)  # cache row -> sequence index (CPU)
    cache = DynamicCache()
    cache_kw = _cache_kwarg(decoder)
    drafting = DraftRollout(draft_model, temperature, top_p, pad) if draft_model is not None else None
    steps = row_steps = drafted = accepted = 0
    try:
        h, attn, next_pos = prefill_groups(decoder, distinct, group_size, pad, cache, dev)  # (n, H), (n, P), (n,)
        if drafting is not None:
            drafting.prefill(distinct, group_size, dev)
        hidden = h[:, None]  # (n, w=1, H): the prefill's last position, no drafts
        drafts: list[list[int]] = [[] for _ in range(n)]
        q = None  # (n, kmax, V): the draft model's distributions behind ``drafts``
        while True:
            # 1. the policy's distribution at every verified position, and the token each would emit
            w = hidden.shape[1]
            lens = torch.tensor([len(d) for d in drafts], dtype=torch.long)  # (n,)
            valid = torch.arange(w)[None, :] <= lens[:, None]  # (n, w): pending token + its drafts
            rr, jj = valid.nonzero(as_tuple=True)  # (K,), (K,)
            logp_all, weights, entropy = token_distribution(hidden[rr.to(dev), jj.to(dev)], head_w, temperature, top_p)
            want = torch.tensor([d + [-1] * (w - len(d)) for d in drafts], dtype=torch.long)  # (n, w): draft checked at (r, j)
            t_at = torch.tensor([len(tokens[seq]) for seq in rows.tolist()], dtype=torch.long)[rr] + jj  # (K,) token index
            u = (row_uniforms_at(keys[rows[rr]], t_at) if keys is not None
                 else torch.rand(len(rr), generator=generator))  # (K,)
            if drafting is None:
                s = verify(weights, want[rr, jj].to(dev), u.to(dev)).cpu()  # (K,)
            else:
                u_acc = (row_uniforms_at(acc_keys[rows[rr]], t_at) if acc_keys is not None
                         else torch.rand(len(rr), generator=generator))  # (K,)
                q_at = torch.zeros_like(weights)  # (K, V); rows of bonus positions stay 0 (unused)
                if q is not None:
                    drafted_at = (jj < lens[rr]).nonzero().squeeze(1)  # verified positions that check a draft
                    q_at[drafted_at.to(dev)] = q[rr[drafted_at].to(dev), jj[drafted_at].to(dev)].to(q_at)
                s = verify(weights, q_at, want[rr, jj].to(dev), u_acc.to(dev), u.to(dev)).cpu()  # (K,)
                del q_at, q
                q = None
            s_logp = logp_all.gather(1, s.to(dev)[:, None]).squeeze(1).tolist()  # (K,)
            s_ent = entropy.tolist()  # (K,)
            del logp_all, weights, entropy
            emit = torch.full((len(rows), w), -1, dtype=torch.long).index_put_((rr, jj), s)  # (n, w)
            at = torch.full((len(rows), w), -1, dtype=torch.long).index_put_((rr, jj), torch.arange(len(rr)))
            acc = ((emit == want) & (want >= 0)).long().cumprod(1).sum(1)  # (n,) leading drafts accepted
            row_steps += len(rows)
            drafted += int(lens.sum())
            accepted += int(acc.sum())
            if drafting is not None:
                drafting.commit(acc)
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
                if drafting is not None:
                    drafting.select(keep)
            drop = w - 1 - int(acc.max()) if steps else 0  # trailing columns no remaining row kept
            if drop:
                cache.crop(-drop)
                attn = attn[:, :-drop]
            attn = compact_holes(cache, attn)
            # 4. draft the next tokens and run the policy once over pending token + drafts
            # most drafts per row: the verify forward also yields one token past them
            room = [max_new_tokens - len(tokens[seq]) - 1 for seq in rows.tolist()]
            if drafting is None:
                drafts = []
                for seq, rm in zip(rows.tolist(), room):
                    states[seq].extend(tokens[seq][len(states[seq].ids) - len(prompt_ids[seq]):])
                    drafts.append(states[seq].propose(min(max_draft, rm)))
            else:
                drafts, q = drafting.propose([tokens[seq] for seq in rows.tolist()], room, max_draft,
                                             keys[rows] if keys is not None else None, generator)
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
    extra = {"prefill_tokens": sum(len(p) for p in distinct)}
    if drafting is not None:
        extra.update(draft_forwards=drafting.forwards, draft=draft_model.name)
    return Rollouts(
        group_size=group_size, prompt_ids=prompt_ids, completion_ids=tokens, texts=texts, logprobs=logps,
        entropy=ents, truncated=truncated, decode_steps=steps, row_steps=row_steps, draft_tokens=drafted,
        accepted_tokens=accepted, draft_row_steps=drafting.row_forwards if drafting is not None else 0,
        seconds=time.perf_counter() - start_time, extra=extra,
    )
