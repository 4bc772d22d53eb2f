"""Plots, a summary table and a self-contained HTML page for one run directory (``report.png``,
``rl.png`` for RL runs, ``summary.md``, ``report.html``), and the comparison of several runs on the same
axes (``compare.png``, ``compare.html``).

Reads ``RUN_DIR/metrics.jsonl`` (one JSON object per logged step; keys the trainer writes: step,
loss, lr, grad_norm, tokens, trainable_tokens, tokens_per_s, rss_bytes, elapsed_s, and at eval steps
eval_loss, eval_ppl, eval_accuracy or other ``eval_*``), ``RUN_DIR/ledger.json`` and
``RUN_DIR/recipe.yaml`` when present. Any key may be missing from any line; a panel with nothing to
show says so. The pages themselves are built in ``leantune/report_html.py``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from leantune import report_html
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
    _peak_axis(axes[1, 0], records, ledger)

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


def _peak_axis(ax, records: list[dict], ledger: dict | None) -> None:
    """A right-hand axis on the throughput panel: each step's achieved FLOP/s (tokens/s x the run's
    FLOPs per token, per process) as a percentage of the machine's measured matmul peak."""
    compute = (ledger or {}).get("compute") or {}
    per_token = ((ledger or {}).get("per_token") or {}).get("flops_per_token")
    peak = compute.get("matmul_peak_flops_per_s")
    xs, tps = _series(records, "tokens_per_s")
    if not (xs and per_token and peak):
        return
    scale = per_token / compute.get("processes", 1) / peak * 100
    if compute.get("fraction_of_peak") is not None:
        ax.axhline(compute["fraction_of_peak"] * 100 / scale, color="gray", linestyle=":",
                   label=f"run: {100 * compute['fraction_of_peak']:.1f}% of peak")
        ax.legend(loc="lower right")
    lo, hi = ax.get_ylim()
    right = ax.twinx()
    right.set_ylim(lo * scale, hi * scale)  # the same curve, read as % of peak
    right.set_ylabel(f"% of {compute.get('dtype', '')} matmul peak ({peak / 1e9:,.0f} GFLOP/s)")


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
    compute = (ledger or {}).get("compute") or {}
    if compute.get("fraction_of_peak") is not None:
        rows.append(("achieved / matmul peak", f"{compute['achieved_flops_per_s'] / 1e9:,.1f} / "
                     f"{compute['matmul_peak_flops_per_s'] / 1e9:,.0f} GFLOP/s ({100 * compute['fraction_of_peak']:.1f}%)",
                     f"ledger ({compute['dtype']}, peak probed {compute['peak_probe'].get('measured_utc', '?')})"))
    return rows


def _markdown(rows: list[tuple[str, str, str]], title: str) -> str:
    def cell(s: str) -> str:
        return str(s).replace("|", "\\|")

    lines = [f"# {title}", "", "| metric | value | source |", "|---|---|---|"]
    lines += [f"| {cell(a)} | {cell(b)} | {cell(c)} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


@dataclass
class RunData:
    """What a report reads from one run directory. ``recipe`` is ``recipe.yaml`` parsed, else the
    recipe the ledger recorded; ``recipe_text`` is the file as written (None when absent)."""

    path: Path
    records: list[dict]
    ledger: dict | None
    recipe: dict | None
    recipe_text: str | None

    @property
    def is_rl(self) -> bool:
        return any("reward_mean" in r for r in self.records)


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory. Raises FileNotFoundError if ``metrics.jsonl`` is missing and ValueError if
    it holds no records or ``ledger.json`` is not JSON."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(
            f"{metrics}: no metrics file. leantune report needs the directory a training run wrote "
            f"(train.output_dir in the recipe, e.g. runs/<name>)."
        )
    records = [r for r in read_metrics(metrics) if isinstance(r, dict)]
    if not records:
        raise ValueError(f"{metrics}: no metric records yet (was the run killed before its first log step?)")
    ledger_path = run_dir / "ledger.json"
    ledger = None
    if ledger_path.is_file():
        try:
            ledger = json.loads(ledger_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{ledger_path}:{e.lineno}: not valid JSON ({e.msg}); the ledger is written atomically, "
                             f"so this file was edited or copied partially") from None
    recipe_path = run_dir / "recipe.yaml"
    recipe_text = recipe_path.read_text(encoding="utf-8") if recipe_path.is_file() else None
    try:
        recipe = yaml.safe_load(recipe_text) if recipe_text else None
    except yaml.YAMLError:
        recipe = None  # the page still shows the text; the diff falls back to the ledger's copy
    if not isinstance(recipe, dict):
        recipe = (ledger or {}).get("recipe") if isinstance((ledger or {}).get("recipe"), dict) else None
    return RunData(run_dir, records, ledger, recipe, recipe_text)


def make_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write ``report.png`` (loss, lr, grad norm, tokens/s, memory, eval metrics vs step), for RL runs
    ``rl.png`` (reward, pass@k, length, entropy, wasted-rollout fractions), ``summary.md`` (final loss,
    best eval, tokens, wall time, peak memory, energy) and ``report.html`` (all of that, the ledger as
    tables and the resolved recipe, on one self-contained page) into ``out_dir`` (default ``run_dir``).

    Returns the written paths. Raises FileNotFoundError if ``run_dir/metrics.jsonl`` is missing and
    ValueError if it holds no records.
    """
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.path
    out.mkdir(parents=True, exist_ok=True)
    title = f"leantune run: {run.path.resolve().name}"
    written = [_plot(run.records, run.ledger, out / "report.png", title)]
    captions = ["training curves vs step"]
    if run.is_rl:
        written.append(_plot_rl(run.records, out / "rl.png", title))
        captions.append("RL curves vs step")
    rows = _summary_rows(run.records, run.ledger)
    md = out / "summary.md"
    md.write_text(_markdown(rows, title), encoding="utf-8")
    page = report_html.run_page(
        title=title, subtitle=_subtitle(run), summary=rows,
        images=[(p.read_bytes(), c) for p, c in zip(written, captions)],
        ledger=run.ledger, recipe=run.recipe, recipe_text=run.recipe_text)
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return [*written, md, html_path]


def _subtitle(run: RunData) -> str:
    kind = ((run.ledger or {}).get("extra") or {}).get("kind") or ("rl" if run.is_rl else "sft")
    started = ((run.ledger or {}).get("timestamps") or {}).get("started_utc")
    last = max((r["step"] for r in run.records if isinstance(r.get("step"), (int, float))), default=None)
    bits = [str(run.path.resolve()), f"kind: {kind}", f"last logged step: {last}" if last is not None else ""]
    return " · ".join(b for b in bits + [f"started {started}" if started else ""] if b)


def _run_names(paths: list[Path]) -> list[str]:
    """Short unique labels: the directory name, with parent directories added until all differ."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(x) for x in parts) + 1):
        names = ["/".join(x[-depth:]) for x in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{p.resolve().name} ({i + 1})" for i, p in enumerate(paths)]  # the same directory given twice


def _running_tokens(records: list[dict]) -> dict[float, float]:
    """step -> tokens processed so far. ``tokens`` is read as a running total when it strictly
    increases (what the SFT loop logs) and accumulated otherwise."""
    steps, values = _series(records, "tokens")
    if not values:
        return {}
    if len(values) > 1 and not all(b > a for a, b in zip(values, values[1:])):
        values = [sum(values[: i + 1]) for i in range(len(values))]
    return dict(zip(steps, values))


def _pairs(records: list[dict], x, key: str) -> tuple[list[float], list[float]]:
    """(x, y) over records with a finite ``key``; ``x`` is a record key or a function step -> x."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
            continue
        xv = x(r.get("step")) if callable(x) else r.get(x)
        if isinstance(xv, (int, float)) and not isinstance(xv, bool) and math.isfinite(xv):
            xs.append(xv)
            ys.append(float(v))
    return xs, ys


def _plot_compare(runs: list[RunData], names: list[str], out: Path) -> Path:
    """Overlay the runs on shared panels: loss vs step, wall time and tokens; eval loss; tokens/s;
    RSS (from zero, with each run's sampled peak dotted); for RL runs reward and pass@1."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    with rc_context({"font.size": 11}):  # the figure is shown ~0.75x in the page
        rl = any(r.is_rl for r in runs)
        # (title, x label, x: record key or step -> x, y key, y label, y scale)
        panels = [
            ("loss vs step", "step", "step", "loss", "train loss", 1.0),
            ("loss vs wall time", "wall time (s)", "elapsed_s", "loss", "train loss", 1.0),
            ("loss vs tokens", "tokens processed", None, "loss", "train loss", 1.0),
            ("eval loss", "step", "step", "eval_loss", "eval loss", 1.0),
            ("throughput", "step", "step", "tokens_per_s", "tokens / s", 1.0),
            ("memory", "step", "step", "rss_bytes", "resident memory (GiB)", 1 / 2**30),
        ]
        if rl:
            panels += [("reward", "step", "step", "reward_mean", "mean reward", 1.0),
                       ("pass@1", "step", "step", "pass@1", "pass@1", 1.0)]
        cols = 4 if rl else 3
        fig = Figure(figsize=(4.2 * cols, 7.8), layout="constrained")
        axes = fig.subplots(2, cols).flat
        colors = [f"C{i % 10}" for i in range(len(runs))]
        # a dash pattern per run as well: two runs with the same curve (same seed and math) stay both visible
        dashes = [("-", 2.2), ("--", 1.8), ("-.", 1.6), (":", 2.2)]
        for ax, (title, xlabel, x, key, ylabel, scale) in zip(axes, panels):
            for i, (run, color, name) in enumerate(zip(runs, colors, names)):
                xs, ys = _pairs(run.records, x if x is not None else _running_tokens(run.records).get, key)
                marker = "o" if key.startswith("eval_") or len(xs) < 3 else None
                ls, lw = dashes[i % len(dashes)]
                if xs:
                    ax.plot(xs, [y * scale for y in ys], linestyle=ls, linewidth=lw, marker=marker, color=color,
                            label=name, markersize=4)
                if key == "rss_bytes":
                    peak = ((run.ledger or {}).get("totals") or {}).get("peak_rss_bytes")
                    if peak:
                        ax.axhline(peak * scale, color=color, linestyle=(0, (1, 3)), linewidth=1.0)
            if key == "rss_bytes" and ax.lines:
                ax.set_ylim(0, max(max(line.get_ydata()) for line in ax.lines) * 1.15)
                ax.text(0.02, 0.03, "dotted: peak RSS (ledger, 10 ms sampling)", transform=ax.transAxes, fontsize=9, color="gray")
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if not ax.lines:
                ax.text(0.5, 0.5, "not logged by any run", ha="center", va="center", transform=ax.transAxes, color="gray")
                ax.set_xticks([])
                ax.set_yticks([])
        handles = [Line2D([], [], color=c, linestyle=dashes[i % len(dashes)][0], linewidth=dashes[i % len(dashes)][1], label=n)
                   for i, (c, n) in enumerate(zip(colors, names))]
        fig.legend(handles=handles, loc="outside upper center", ncols=min(len(runs), 6), frameon=False, fontsize=12)
        fig.savefig(out, dpi=100)
    return out


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> list[Path]:
    """Compare runs on one set of axes: write ``compare.png`` (metrics overlaid) and ``compare.html``
    (that figure, results and ledger side by side with one column per run, and the recipe keys that
    differ) into ``out_dir`` (default: the first run's directory). Returns the written paths.

    Raises ValueError for fewer than two runs, and what ``load_run`` raises for a bad run directory.
    """
    if len(run_dirs) < 2:
        raise ValueError(f"compare_runs needs at least two run directories, got {len(run_dirs)}; "
                         f"for one run use make_report")
    runs = [load_run(d) for d in run_dirs]
    out = Path(out_dir) if out_dir is not None else runs[0].path
    out.mkdir(parents=True, exist_ok=True)
    names = _run_names([r.path for r in runs])
    png = _plot_compare(runs, names, out / "compare.png")
    links = [os.path.relpath(r.path / "report.html", out) if (r.path / "report.html").is_file() else None for r in runs]
    page = report_html.compare_page(
        title=f"leantune comparison: {len(runs)} runs", subtitle=" · ".join(str(r.path.resolve()) for r in runs),
        names=names, links=links, image=png.read_bytes(),
        summaries=[_summary_rows(r.records, r.ledger) for r in runs], ledgers=[r.ledger for r in runs],
        recipes=[r.recipe for r in runs])
    html_path = out / "compare.html"
    html_path.write_text(page, encoding="utf-8")
    return [png, html_path]
