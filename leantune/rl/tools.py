"""Tool calls inside RL rollouts (`rl.tools`): the policy writes a call, the rollout runs it, appends the answer
to that row's context and keeps sampling.

Syntax (markers configurable, `ToolsConfig`): ``<calc>(25 - 1) * 3</calc>`` asks the calculator,
``<python>print(6 * 7)</python>`` runs Python in leantune's sandbox; right after the token that closes a call
the rollout appends ``<result>72</result>`` (or ``<result>error: ...</result>``) and the policy goes on from
there. A row makes at most ``max_calls`` calls; after that, markers are plain text. Tool answers count
against ``rl.max_new_tokens`` (the KV cache and the update are sized by it).

What the loss sees: the appended answer is *context*, like the prompt. `Rollouts.loss_mask` is 0 on its
tokens, they carry no log-prob (0.0 placeholders) and no entropy, and `policy_update` multiplies its mask by
``loss_mask``: no policy-gradient term, no importance ratio, no token in DAPO's normalizer. The training
forward still reads them (they condition every later token), so the log-probs recorded while sampling are
the log-probs of one forward over prompt + completion (tested). This is the masking of tool / environment
observations that ReTool (arXiv 2504.11536) and ToRL (arXiv 2503.23383) apply for code-interpreter RL.

The decode loop (`sample_with_tools`) is the plain sampler's (`leantune.rl.rollout`) with one change: a row
that called a tool feeds its sampled token *and* the answer's tokens in the same forward; the other rows'
shorter feeds are right-padded with masked columns ("holes", positions given per row, so holes never shift
RoPE), compacted as in the speculative sampler. A row's randomness is indexed by its own count of *sampled*
tokens (`row_uniforms_at`), so with per-prompt seeds its completion does not depend on the batch, the worker,
or other rows' tool calls, and a run with tools whose markers never occur samples exactly what plain sampling
samples (tested).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from leantune.config import ToolsConfig
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

MAX_EXPRESSION_CHARS = 256
"""Longest calculator expression evaluated (the evaluator is exact: long products make huge integers)."""
PARALLEL_CALLS = max(1, min(8, os.cpu_count() or 1))
"""Tool calls closed in the same decode step that run at once (threads waiting on sandboxed children)."""


# ----------------------------------------------------------------------------------------------
# The tools


@dataclass(frozen=True)
class ToolCall:
    tool: str  # "calculator" | "python"
    body: str  # the text between the markers


@dataclass(frozen=True)
class ToolResult:
    text: str  # what goes between the result markers
    error: bool  # the tool refused or failed (bad expression, timeout, non-zero exit)


def calculator(expr: str) -> str:
    """The exact value of an arithmetic expression: non-negative integer literals, + - * / and parentheses
    (`leantune.rl.rewards.evaluate_expression`, the Countdown verifier's ``ast`` evaluator, never ``eval``).
    An integer prints as one, a fraction as ``p/q``. ValueError for anything else.

    >>> calculator(" (25 - 1) * 3 "), calculator("7 / 2")
    ('72', '7/2')
    >>> calculator("__import__('os')")
    Traceback (most recent call last):
    ...
    ValueError: only digits, + - * / and parentheses are allowed: "__import__('os')"
    """
    from leantune.rl.rewards import evaluate_expression

    expr = expr.strip()
    if not expr:
        raise ValueError("empty expression")
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        value = evaluate_expression(expr)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def run_python(code: str, *, timeout_s: float, memory_mb: int, max_chars: int = 2000) -> ToolResult:
    """Run ``code`` in the sandbox (`leantune.rl.sandbox.run_code`: wall-time and memory limits, no network);
    its stdout is the answer, or ``error: <reason>`` (timeout, memory, the last stderr line)."""
    from leantune.rl.sandbox import run_code

    r = run_code(code, timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=4 * max_chars)
    if r.ok:
        return ToolResult(r.stdout.strip()[:max_chars], False)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    why = r.killed_reason or (lines[-1] if lines else f"exit status {r.returncode}")
    return ToolResult(f"error: {why}"[:max_chars], True)


@dataclass(frozen=True)
class Toolbox:
    """The tools one rollout may call and their markers (built from `ToolsConfig` by `Toolbox.from_config`)."""

    tags: dict[str, tuple[str, str]]  # tool name -> (open, close)
    result_tags: tuple[str, str]
    max_calls: int = 4
    max_result_tokens: int = 32
    python_timeout_s: float = 2.0
    python_memory_mb: int = 256
    runners: dict[str, Callable[[str], ToolResult]] = field(default_factory=dict, compare=False)

    @classmethod
    def from_config(cls, cfg: ToolsConfig) -> Toolbox:
        tags = {}
        if cfg.calculator:
            tags["calculator"] = tuple(cfg.calculator_tags)
        if cfg.python:
            tags["python"] = tuple(cfg.python_tags)
        return cls(tags=tags, result_tags=tuple(cfg.result_tags), max_calls=cfg.max_calls,
                   max_result_tokens=cfg.max_result_tokens, python_timeout_s=cfg.python_timeout_s,
                   python_memory_mb=cfg.python_memory_mb)

    def find_call(self, text: str) -> ToolCall | None:
        """The first complete call in ``text`` (the row's text since its last tool answer): the earliest close
        marker that follows an open marker of the same tool; the body starts after the last open marker before it.

        >>> tb = Toolbox(tags={"calculator": ("<calc>", "</calc>")}, result_tags=("<result>", "</result>"))
        >>> tb.find_call("so <calc>2 <calc>3 * 4</calc> more"), tb.find_call("<calc>3 * 4</cal")
        (ToolCall(tool='calculator', body='3 * 4'), None)
        """
        best: tuple[int, ToolCall] | None = None
        for tool, (open_tag, close_tag) in self.tags.items():
            i = text.find(open_tag)
            if i < 0:
                continue
            j = text.find(close_tag, i + len(open_tag))
            if j < 0 or (best is not None and j >= best[0]):
                continue
            i = text.rfind(open_tag, 0, j)  # the last open marker that ends before the close
            best = (j, ToolCall(tool, text[i + len(open_tag): j]))
        return best[1] if best else None

    def run(self, call: ToolCall) -> ToolResult:
        """The tool's answer; a failure is a result (``error: ...``, ``error=True``), never an exception."""
        if call.tool in self.runners:
            return self.runners[call.tool](call.body)
        if call.tool == "calculator":
            try:
                return ToolResult(calculator(call.body), False)
            except (ValueError, SyntaxError, RecursionError, MemoryError) as err:
                return ToolResult(f"error: {err}", True)
        if call.tool == "python":
            return run_python(call.body, timeout_s=self.python_timeout_s, memory_mb=self.python_memory_mb)
        raise ValueError(f"unknown tool {call.tool!r}")

    def result_ids(self, tokenizer, result: ToolResult) -> list[int]:
        """The tokens appended for ``result``: open marker, the answer cut to fit ``max_result_tokens``, close
        marker (the markers are tokenized on their own, so the close marker is never cut)."""
        def ids(s: str) -> list[int]:
            return tokenizer(s, add_special_tokens=False)["input_ids"]

        head, tail = ids(self.result_tags[0]), ids(self.result_tags[1])
        room = max(0, self.max_result_tokens - len(head) - len(tail))
        return head + ids(result.text)[:room] + tail


# ----------------------------------------------------------------------------------------------
# The decode loop


@dataclass
class _Row:
    """One completion being sampled."""

    tokens: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    ents: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)  # 1 sampled, 0 tool answer
    sampled: int = 0  # tokens drawn so far: the index into the row's uniform stream
    segment: int = 0  # where the text searched for the next call starts (after the last answer)
    calls: int = 0
    errors: int = 0

    def add_sampled(self, tok: int, logp: float, ent: float) -> None:
        self.tokens.append(tok)
        self.logps.append(logp)
        self.ents.append(ent)
        self.mask.append(1)
        self.sampled += 1

    def add_context(self, ids: Sequence[int]) -> None:
        self.tokens += ids
        self.logps += [0.0] * len(ids)
        self.ents += [0.0] * len(ids)
        self.mask += [0] * len(ids)
        self.segment = len(self.tokens)


def closed_call(row: _Row, tokenizer, tools: Toolbox) -> ToolCall | None:
    """The call the row's last sampled token closed, if any (none once it made ``max_calls``)."""
    if row.calls >= tools.max_calls:
        return None
    return tools.find_call(tokenizer.decode(row.tokens[row.segment:], skip_special_tokens=True))


def append_result(row: _Row, tokenizer, tools: Toolbox, result: ToolResult, budget: int) -> tuple[list[int], bool]:
    """Append a call's answer to the row's context, cut to the ``budget`` of completion tokens. Returns (the
    answer's tokens appended, whether the budget is now spent)."""
    ids = tools.result_ids(tokenizer, result)[: max(0, budget - len(row.tokens))]
    row.add_context(ids)
    row.calls += 1
    row.errors += int(result.error)
    return ids, len(row.tokens) >= budget


def run_calls(tools: Toolbox, calls: Sequence[ToolCall]) -> list[ToolResult]:
    """The answers of the calls closed in one decode step, in order; up to :data:`PARALLEL_CALLS` at once (a
    sandboxed Python call spends its time waiting on a child process)."""
    if len(calls) <= 1:
        return [tools.run(c) for c in calls]
    with ThreadPoolExecutor(max_workers=min(PARALLEL_CALLS, len(calls))) as pool:
        return list(pool.map(tools.run, calls))


def tool_step(row: _Row, tokenizer, tools: Toolbox, budget: int) -> tuple[list[int], bool]:
    """After a row sampled a token: run the call it just closed, if any, and append the answer (cut to the
    ``budget`` of completion tokens). Returns (the answer's tokens appended, whether the budget is now spent)."""
    call = closed_call(row, tokenizer, tools)
    if call is None:
        return [], False
    return append_result(row, tokenizer, tools, tools.run(call), budget)


@torch.no_grad()
def sample_with_tools(model, tokenizer, prompts: Sequence[str], *, tools: Toolbox, group_size: int, max_new_tokens: int,
                      temperature: float = 1.0, top_p: float = 1.0, stop: Sequence[str] = (),
                      is_complete: Callable[[str], bool] | None = None, generator: torch.Generator | None = None,
                      seeds: Sequence[int] | None = None) -> Rollouts:
    """`sample_groups` with tool calls (module docstring); called by it when ``tools`` is given, the adapter
    already folded. The rollouts carry ``loss_mask``, ``tool_calls`` and ``tool_errors`` per row."""
    from leantune.rl.speculative import compact_holes

    start_time = time.perf_counter()
    was_training, decoder, head_w, eos, pad, dev = decode_setup(model, tokenizer)
    distinct = _tokenize_prompts(tokenizer, prompts)
    prompt_ids = [ids for ids in distinct for _ in range(group_size)]
    n = len(prompt_ids)
    keys = row_keys(seeds, group_size) if seeds is not None else None  # (n,)
    rows_state = [_Row() for _ in range(n)]
    truncated = [False] * n
    steps = row_steps = 0
    cache, kw = DynamicCache(), _cache_kwarg(decoder)
    try:
        h, attn, next_pos = prefill_groups(decoder, distinct, group_size, pad, cache, dev)  # (n, H), (n, P), (n,)
        rows = torch.arange(n)  # active row -> sequence index (CPU)
        while len(rows):
            logp_all, weights, entropy = token_distribution(h, head_w, temperature, top_p)  # (n, V), (n, V), (n,)
            u = None
            if keys is not None:
                u = row_uniforms_at(keys[rows], torch.tensor([rows_state[s].sampled for s in rows.tolist()]))
            nxt = sample_categorical(weights, generator, uniforms=u)  # (n,)
            nxt_logp = logp_all.gather(1, nxt[:, None]).squeeze(1).tolist()  # (n,)
            ent = entropy.tolist()
            del weights, logp_all
            row_steps += len(rows)
            live, calls = [], {}  # rows still sampling; the calls closed this step, run together below
            for r, (seq, tok) in enumerate(zip(rows.tolist(), nxt.tolist())):
                st = rows_state[seq]
                st.add_sampled(tok, nxt_logp[r], ent[r])
                if row_finished(tokenizer, st.tokens, eos, stop, is_complete):
                    continue
                live.append((r, seq, tok))
                if (call := closed_call(st, tokenizer, tools)) is not None:
                    calls[r] = call
            results = dict(zip(calls, run_calls(tools, list(calls.values()))))
            keep, feeds = [], []
            for r, seq, tok in live:
                st = rows_state[seq]
                answer, spent = (append_result(st, tokenizer, tools, results[r], max_new_tokens) if r in results
                                 else ([], False))
                if spent or len(st.tokens) >= max_new_tokens:
                    truncated[seq] = True
                    continue
                keep.append(r)
                feeds.append([tok, *answer])
            if not keep:
                break
            if len(keep) < len(rows):  # finished rows leave the batch, cache included
                idx = torch.tensor(keep)
                cache.batch_select_indices(idx.to(dev))
                rows, attn, next_pos = rows[idx], attn[idx.to(dev)], next_pos[idx.to(dev)]
            lens = torch.tensor([len(f) for f in feeds], device=dev)  # (n,)
            w = int(lens.max())
            x = torch.full((len(feeds), w), pad, dtype=torch.long)  # (n, w), right-padded with masked holes
            for i, f in enumerate(feeds):
                x[i, : len(f)] = torch.tensor(f)
            fed = (torch.arange(w, device=dev)[None, :] < lens[:, None]).to(attn.dtype)  # (n, w)
            attn = torch.cat([attn, fed], dim=1)
            positions = next_pos[:, None] + torch.arange(w, device=dev)[None, :]  # (n, w)
            out = decoder(input_ids=x.to(dev), attention_mask=attn, position_ids=positions, use_cache=True, **{kw: cache})
            h = out.last_hidden_state[torch.arange(len(feeds), device=dev), lens - 1].contiguous()  # (n, H)
            del out
            next_pos = next_pos + lens
            steps += 1
            if w > 1:
                attn = compact_holes(cache, attn)
    finally:
        del cache
        model.train(was_training)
    tokens = [st.tokens for st in rows_state]
    return Rollouts(
        group_size=group_size, prompt_ids=prompt_ids, completion_ids=tokens,
        texts=tokenizer.batch_decode(tokens, skip_special_tokens=True), logprobs=[st.logps for st in rows_state],
        entropy=[st.ents for st in rows_state], truncated=truncated, decode_steps=steps, row_steps=row_steps,
        seconds=time.perf_counter() - start_time,
        extra={"prefill_tokens": sum(len(p) for p in distinct)},
        loss_mask=[st.mask for st in rows_state], tool_calls=[st.calls for st in rows_state],
        tool_errors=[st.errors for st in rows_state],
    )
