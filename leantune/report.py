"""Plots and a summary table for one run directory: ``report.png`` and ``summary.md``.

Reads ``RUN_DIR/metrics.jsonl`` (one JSON object per logged step; keys the trainer writes: step,
loss, lr, grad_norm, tokens, trainable_tokens, tokens_per_s, rss_bytes, elapsed_s, and at eval steps
eval_loss, eval_ppl, eval_accuracy or other ``eval_*``) and ``RUN_DIR/ledger.json`` when present.
Any key may be missing from any line; a panel with nothing to show says so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from leantune.ledger import format_bytes, read_metrics

LOWER_IS_BETTER = ("loss", "ppl", "perplexity")
COUNT_SUFFIXES = ("_tokens", "_examples", "_count", "_n", "_s")


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of every record that has a finite number under ``key`` and a step."""
    xs, ys = [], []
    for r in records:
        v, s = r.get(key), r.get("step")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and isinstance(s, (int, float)):
            xs.append(s)
            ys.append(float(v))
    return xs, ys


def _eval_keys(records: list[dict]) -> list[str]:
    """Eval scores (eval_loss, eval_accuracy, ...), not bookkeeping counts like eval_tokens."""
    keys = {k for r in records for k in r if k.startswith("eval_") and not k.endswith(COUNT_SUFFIXES)}
    return sorted(keys)


def _lower_is_better(key: str) -> bool:
    return any(w in key for w in LOWER_IS_BETTER)


def _total_tokens(values: list[float]) -> tuple[float | None, str]:
    """A trainer may log a running total or a per-step count: a strictly increasing series is read
    as a running total, anything else is summed."""
    if not values:
        return None, ""
    if len(values) > 1 and all(b > a for a, b in zip(values, values[1:])):
        return values[-1], "metrics (last running total)"
    return sum(values), "metrics (sum of per-step counts)"


def _plot(records: list[dict], ledger: dict | None, out: Path, title: str) -> Path:
    # A bare Figure renders with Agg and leaves pyplot's global backend and figure list alone.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(15, 8), layout="constrained")
    axes = fig.subplots(2, 3)
    fig.suptitle(title)

    def panel(ax, ylabel, lines, legend=False, empty="not logged"):
        drawn = False
        for key, label, style in lines:
            xs, ys = _series(records, key)
            if xs:
                ax.plot(xs, ys, style, label=label, markersize=4)
                drawn = True
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="gray")
        elif legend or len(lines) > 1:
            ax.legend()

    panel(axes[0, 0], "loss", [("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")])
    axes[0, 0].set_title("loss")
    panel(axes[0, 1], "learning rate", [("lr", "lr", "-")])
    axes[0, 1].set_title("learning rate")
    axes[0, 1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    panel(axes[0, 2], "gradient norm (before clipping)", [("grad_norm", "grad norm", "-")])
    axes[0, 2].set_title("gradient norm")
    panel(axes[1, 0], "tokens / s", [("tokens_per_s", "tokens/s", "-")])
    axes[1, 0].set_title("throughput")

    ax = axes[1, 1]
    xs, ys = _series(records, "rss_bytes")
    if xs:
        gib = [y / 2**30 for y in ys]
        peak = [max(gib[: i + 1]) for i in range(len(gib))]
        ax.plot(xs, gib, "-", label="RSS at log time")
        ax.plot(xs, peak, "--", label="running peak of those")
    ledger_peak = ((ledger or {}).get("totals") or {}).get("peak_rss_bytes")
    if ledger_peak:
        ax.axhline(ledger_peak / 2**30, color="red", linestyle=":", label="run peak (ledger, 10 ms sampling)")
    if xs or ledger_peak:
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xlabel("step")
    ax.set_ylabel("resident memory (GiB)")
    if xs or ledger_peak:
        top = max([y / 2**30 for y in ys] + [(ledger_peak or 0) / 2**30])
        ax.set_ylim(0, top * 1.15)  # from zero: a zoomed axis makes a 0.1% drift look like a leak
    ax.set_title("memory")
    ax.grid(alpha=0.3)

    # eval_loss is on the loss panel and eval_ppl is exp(eval_loss): show the other eval metrics.
    others = [k for k in _eval_keys(records) if k not in ("eval_loss", "eval_ppl")]
    panel(axes[1, 2], "value", [(k, k, "o-") for k in others] or [("eval_accuracy", "eval_accuracy", "o-")], legend=True,
          empty="no eval scores besides eval_loss" if _series(records, "eval_loss")[0] else "not logged")
    axes[1, 2].set_title("evaluation")

    for ax in axes.flat:
        if ax.lines:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.savefig(out, dpi=100)
    return out


def _plot_rl(records: list[dict], out: Path, title: str) -> Path:
    """RL metrics vs step (written when metrics.jsonl has reward_mean): rewards, pass rates, lengths,
    entropy, the wasted-rollout fractions and what each step generated vs trained on."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(15, 8), layout="constrained")
    axes = fig.subplots(2, 3)
    fig.suptitle(title + " (RL)")
    pass_k = sorted({k for r in records for k in r if k.startswith("pass@") and k != "pass@1"})
    panels = [
        ("reward", [("reward_mean", "mean"), ("reward_std", "std")]),
        ("pass rate", [("pass@1", "pass@1")] + [(k, k) for k in pass_k]),
        ("completion length (tokens)", [("completion_len", "mean length")]),
        ("token entropy", [("entropy_mean", "mean (nats)"), ("high_entropy_frac", "high-entropy fraction")]),
        ("fraction", [("zero_variance_frac", "zero-variance groups"), ("clip_fraction", "clipped tokens"),
                      ("truncated_frac", "truncated (overlong)"), ("kl", "KL to base")]),
        ("rollouts per step", [("rollouts", "generated"), ("rollouts_used", "trained on"),
                               ("prompts_skipped", "prompts skipped")]),
    ]
    for ax, (label, lines) in zip(axes.flat, panels):
        for key, name in lines:
            xs, ys = _series(records, key)
            if xs:
                ax.plot(xs, ys, "-", label=name)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.savefig(out, dpi=100)
    return out


def _summary_rows(records: list[dict], ledger: dict | None) -> list[tuple[str, str, str]]:
    """(metric, value, source) rows; the ledger wins over metrics where both have a number."""
    rows = []
    totals = (ledger or {}).get("totals", {})
    steps, losses = _series(records, "loss")
    if losses:
        rows.append(("final train loss", f"{losses[-1]:.4f} (step {steps[-1]:g})", "metrics"))
    for key in _eval_keys(records):
        xs, ys = _series(records, key)
        if not ys:
            continue
        pick = min if _lower_is_better(key) else max
        best = pick(range(len(ys)), key=ys.__getitem__)
        rows.append((f"best {key}", f"{ys[best]:.4g} (step {xs[best]:g}; last {ys[-1]:.4g})", "metrics"))

    for key, ledger_key, label in (("tokens", "tokens_processed", "tokens processed"),
                                   ("trainable_tokens", "trainable_tokens", "trainable (loss) tokens")):
        if totals.get(ledger_key) is not None:
            rows.append((label, f"{totals[ledger_key]:,}", "ledger"))
        else:
            total, source = _total_tokens(_series(records, key)[1])
            if total is not None:
                rows.append((label, f"{total:,.0f}", source))

    _, elapsed = _series(records, "elapsed_s")
    if totals.get("wall_time_s") is not None:
        rows.append(("wall time", f"{totals['wall_time_s']:.1f} s", "ledger"))
    elif elapsed:
        rows.append(("wall time", f"{elapsed[-1]:.1f} s", "metrics (last elapsed_s)"))
    _, tps = _series(records, "tokens_per_s")
    if tps:
        rows.append(("mean tokens/s", f"{sum(tps) / len(tps):,.0f}", "metrics"))

    _, rss = _series(records, "rss_bytes")
    if totals.get("peak_rss_bytes") is not None:
        rows.append(("peak memory (RSS)", format_bytes(totals["peak_rss_bytes"]), "ledger (sampled every 10 ms)"))
    elif rss:
        rows.append(("peak memory (RSS)", format_bytes(max(rss)), "metrics (at log steps only)"))
    if totals.get("cuda_max_allocated_bytes"):
        rows.append(("peak CUDA memory", format_bytes(totals["cuda_max_allocated_bytes"]), "ledger (torch max allocated)"))

    energy = (ledger or {}).get("energy") or {}
    if energy.get("joules") is not None:
        jpt = ((ledger or {}).get("per_token") or {}).get("joules_per_token")
        value = f"{energy['joules']:.3g} J" + (f" ({jpt:.3g} J/token)" if jpt is not None else "")
        rows.append(("energy", value, energy.get("method", "unknown method")))
    else:
        rows.append(("energy", "n/a", "no ledger.json"))
    roll = totals.get("rollouts") or {}
    if roll:
        rows.append(("rollouts generated / trained on", f"{roll['rollouts_generated']:,} / {roll['rollouts_used']:,}", "ledger"))
        rows.append(("tokens generated / trained", f"{roll['tokens_generated']:,} / {roll['tokens_trained']:,}", "ledger"))
        rows.append(("saved: early stop", f"{roll['early_stop_tokens_saved']:,} tokens not generated", "ledger (vs max_new_tokens)"))
        rows.append(("saved: prompt selection", f"{roll['prompt_selection_rollouts_saved']:,} rollouts not sampled", "ledger"))
        rows.append(("dropped: zero-variance groups", f"{roll['zero_variance_rollouts_dropped']:,} rollouts not trained on", "ledger"))
    _, p1 = _series(records, "pass@1")
    if p1:
        rows.append(("pass@1 first / last step", f"{p1[0]:.3f} / {p1[-1]:.3f}", "metrics"))
    flops = (ledger or {}).get("flops") or {}
    if flops.get("total") is not None:
        rows.append(("compute", f"{flops['total']:.3g} FLOPs", flops.get("method", "estimate")))
    return rows


def _markdown(rows: list[tuple[str, str, str]], title: str) -> str:
    def cell(s: str) -> str:
        return str(s).replace("|", "\\|")

    lines = [f"# {title}", "", "| metric | value | source |", "|---|---|---|"]
    lines += [f"| {cell(a)} | {cell(b)} | {cell(c)} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def make_report(run_dir: str | Path) -> list[Path]:
    """Write ``run_dir/report.png`` (loss, lr, grad norm, tokens/s, memory, eval metrics vs step), for RL
    runs ``run_dir/rl.png`` (reward, pass@k, length, entropy, wasted-rollout fractions), and
    ``run_dir/summary.md`` (final loss, best eval, tokens, wall time, peak memory, energy).

    Returns the written paths. Raises FileNotFoundError if ``run_dir/metrics.jsonl`` is missing and
    ValueError if it holds no records.
    """
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(
            f"{metrics}: no metrics file. make_report needs the directory a training run wrote "
            f"(train.output_dir in the recipe, e.g. runs/<name>)."
        )
    records = [r for r in read_metrics(metrics) if isinstance(r, dict)]
    if not records:
        raise ValueError(f"{metrics}: no metric records yet (was the run killed before its first log step?)")
    ledger_path = run_dir / "ledger.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.is_file() else None

    title = f"leantune run: {run_dir.resolve().name}"
    written = [_plot(records, ledger, run_dir / "report.png", title)]
    if any("reward_mean" in r for r in records):
        written.append(_plot_rl(records, run_dir / "rl.png", title))
    md = run_dir / "summary.md"
    md.write_text(_markdown(_summary_rows(records, ledger), title), encoding="utf-8")
    return [*written, md]
