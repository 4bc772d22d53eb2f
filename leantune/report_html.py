"""Self-contained HTML pages for ``leantune report``: one run (``report.html``) or several side by side
(``compare.html``).

Everything a page shows is built here from plain data (ledger dicts, recipe dicts, PNG bytes); no
plotting, no file reading. Every string that came from a file passes through ``html.escape``; images
are embedded as base64 PNG, and the style sheet is inline, so a page works offline from ``file://``.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass

from leantune.ledger import format_bytes

MISSING = "—"


@dataclass(frozen=True)
class LedgerRow:
    """One line of the ledger table: ``section`` is ``cost`` or ``provenance``; ``source`` says how the
    value was measured or estimated (empty when it is a plain record); ``mono`` sets it in monospace."""

    section: str
    label: str
    value: str
    source: str = ""
    mono: bool = False


def _num(x, fmt: str = "{:,}") -> str | None:
    return None if x is None else fmt.format(x)


def ledger_rows(ledger: dict | None) -> list[LedgerRow]:
    """The ledger as labelled rows: cost first (tokens, FLOPs, time, memory, energy, rollouts), then
    provenance (hardware, versions, hashes, malloc, dtype). Absent keys are left out, not invented.

    >>> rows = ledger_rows({"totals": {"tokens_processed": 1200, "wall_time_s": 2.0}, "malloc": "jemalloc"})
    >>> [(r.label, r.value) for r in rows]
    [('tokens processed', '1,200'), ('wall time', '2.0 s'), ('malloc', 'jemalloc')]
    """
    if not ledger:
        return []
    t = ledger.get("totals") or {}
    pt = ledger.get("per_token") or {}
    fl = ledger.get("flops") or {}
    en = ledger.get("energy") or {}
    hw = ledger.get("hardware") or {}
    rows: list[LedgerRow] = []

    def add(section, label, value, source="", mono=False):
        if value is not None:
            rows.append(LedgerRow(section, label, str(value), source, mono))

    add("cost", "steps", _num(t.get("steps")))
    add("cost", "tokens processed", _num(t.get("tokens_processed")))
    add("cost", "trainable (loss) tokens", _num(t.get("trainable_tokens")))
    add("cost", "wall time", _num(t.get("wall_time_s"), "{:.1f} s"))
    add("cost", "tokens/s", _num(pt.get("tokens_per_s"), "{:,.0f}"), "tokens processed / wall time")
    add("cost", "peak memory (RSS)", format_bytes(t["peak_rss_bytes"]) if t.get("peak_rss_bytes") else None,
        "sampled every 10 ms")
    add("cost", "peak CUDA memory", format_bytes(t["cuda_max_allocated_bytes"]) if t.get("cuda_max_allocated_bytes") else None,
        "torch max allocated")
    add("cost", "compute", _num(fl.get("total"), "{:.3g} FLOPs"), fl.get("method", ""))
    add("cost", "FLOPs/token", _num(pt.get("flops_per_token"), "{:.3g}"))
    watts = f", {en['assumed_watts_per_core']} W/core assumed" if en.get("assumed_watts_per_core") is not None else ""
    add("cost", "energy", _num(en.get("joules"), "{:.3g} J"), (en.get("method") or "") + watts)
    add("cost", "energy/token", _num(pt.get("joules_per_token"), "{:.3g} J"))
    if en.get("gpu_joules") is not None:
        add("cost", "energy: CPU", _num(en.get("cpu_joules"), "{:.3g} J"), en.get("cpu_method", ""))
        add("cost", "energy: GPU", _num(en.get("gpu_joules"), "{:.3g} J"), en.get("gpu_method", ""))
    r = t.get("rollouts") or {}
    if r:
        add("cost", "rollouts generated / trained on",
            f"{_num(r.get('rollouts_generated')) or MISSING} / {_num(r.get('rollouts_used')) or MISSING}")
        add("cost", "tokens generated / trained",
            f"{_num(r.get('tokens_generated')) or MISSING} / {_num(r.get('tokens_trained')) or MISSING}")
        add("cost", "saved by early stop", _num(r.get("early_stop_tokens_saved"), "{:,} tokens"), "vs max_new_tokens")
        add("cost", "saved by prompt selection", _num(r.get("prompt_selection_rollouts_saved"), "{:,} rollouts"))
        add("cost", "zero-variance rollouts dropped", _num(r.get("zero_variance_rollouts_dropped")))
        add("cost", "overlong rollouts masked", _num(r.get("overlong_rollouts_masked")))
    d = t.get("data") or {}
    if d:
        add("cost", "data examples", f"{_num(d.get('examples')) or MISSING} of {_num(d.get('records')) or MISSING} records",
            f"{d.get('truncated', 0)} truncated, {d.get('dropped', 0)} dropped")

    ts = ledger.get("timestamps") or {}
    add("provenance", "started (UTC)", ts.get("started_utc"))
    add("provenance", "finished (UTC)", ts.get("finished_utc"))
    if hw:
        gpus = ", ".join(g.get("name", "?") for g in hw.get("gpus") or []) or "no GPU"
        cores = f"{hw.get('usable_cores', '?')} usable ({hw.get('physical_cores', '?')} physical, {hw.get('logical_cores', '?')} logical)"
        add("provenance", "CPU", f"{hw.get('cpu', '?')} ({hw.get('machine', '?')})")
        add("provenance", "cores", cores, f"torch threads: {hw['torch_threads']}" if hw.get("torch_threads") else "")
        add("provenance", "RAM", format_bytes(hw.get("ram_bytes")),
            f"cgroup limit {format_bytes(hw['cgroup_memory_limit_bytes'])}" if hw.get("cgroup_memory_limit_bytes") else "")
        add("provenance", "GPU", gpus)
    add("provenance", "compute dtype", ledger.get("compute_dtype"))
    add("provenance", "malloc", ledger.get("malloc"))
    add("provenance", "seed", ledger.get("seed"))
    for name, version in (ledger.get("versions") or {}).items():
        add("provenance", name if name == "platform" else f"{name} version", version)
    m = ledger.get("model_hash") or {}
    if m:
        add("provenance", "model", m.get("location"), mono=True)
        add("provenance", "model sha256", m.get("combined") or m.get("note"),
            f"{len(m.get('files') or {})} weight file(s)" if m.get("combined") else "", mono=True)
    for path, sha in (ledger.get("data_sha256") or {}).items():
        add("provenance", f"data sha256: {path}", sha, mono=True)
    extra = ledger.get("extra") or {}
    loss = extra.get("loss") or {}
    add("provenance", "loss", loss.get("kind"))
    if loss.get("vocab_subset"):
        add("provenance", "loss approximation", "vocabulary subset (APPROXIMATE); eval_loss is exact")
    if extra.get("quant"):
        add("provenance", "quantization", json.dumps(extra["quant"], sort_keys=True), mono=True)
    if extra.get("resumed") is not None:
        add("provenance", "resumed", "yes" if extra["resumed"] else "no")
    add("provenance", "ledger schema", ledger.get("schema"), mono=True)
    return rows


def flatten(tree, prefix: str = "") -> dict[str, object]:
    """Dotted keys of a nested dict; lists and scalars are leaves.

    >>> flatten({"optim": {"lr": 0.01, "betas": [0.9, 0.99]}, "seed": 0})
    {'optim.lr': 0.01, 'optim.betas': [0.9, 0.99], 'seed': 0}
    """
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, object] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


_ABSENT = object()


def recipe_diff(recipes: list[dict | None]) -> list[tuple[str, list[str]]]:
    """(dotted key, one rendered value per recipe) for every key whose value is not the same in all
    recipes; a key a recipe lacks shows as ``(absent)``.

    >>> recipe_diff([{"optim": {"lr": 0.01, "name": "adamw"}}, {"optim": {"lr": 0.003, "name": "adamw"}}])
    [('optim.lr', ['0.01', '0.003'])]
    """
    flat = [flatten(r or {}) for r in recipes]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    rows = []
    for k in keys:
        values = [f.get(k, _ABSENT) for f in flat]
        if any(v != values[0] for v in values[1:]):
            rows.append((k, ["(absent)" if v is _ABSENT else json.dumps(v) if not isinstance(v, str) else v for v in values]))
    return rows


# --- page building ---------------------------------------------------------------------------------

CSS = """
:root { --fg:#1f2328; --muted:#59636e; --border:#d1d9e0; --stripe:#f6f8fa; --accent:#0969da; --diff:#fff8c5; }
* { box-sizing: border-box; }
body { margin:0; background:#fff; color:var(--fg);
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "DejaVu Sans", Arial, sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 28px 28px 64px; }
h1 { font-size: 26px; line-height: 1.25; margin: 0 0 4px; overflow-wrap: anywhere; }
h2 { font-size: 19px; margin: 36px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--border); }
h3 { font-size: 15px; margin: 22px 0 8px; color: var(--muted); text-transform: uppercase; letter-spacing: .05em; }
p.sub { color: var(--muted); margin: 0 0 20px; overflow-wrap: anywhere; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(175px, 1fr)); gap: 12px; margin: 18px 0 6px; }
.card { border: 1px solid var(--border); border-radius: 8px; padding: 10px 14px; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .05em; }
.card .v { font-size: 21px; font-weight: 600; font-variant-numeric: tabular-nums; white-space: nowrap; }
.card .v .u { font-size: 14px; font-weight: 500; color: var(--muted); }
.card .s { color: var(--muted); font-size: 12px; line-height: 1.35; overflow: hidden; display: -webkit-box;
  -webkit-box-orient: vertical; -webkit-line-clamp: 2; }
.recipe { display: grid; grid-template-columns: repeat(auto-fill, minmax(270px, 1fr)); gap: 12px; align-items: start; }
.recipe pre { margin: 0; max-height: none; }
.recipe h4 { margin: 0 0 4px; font-size: 13px; font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
th .src { font-weight: 400; }
table.runs { table-layout: fixed; }
table.runs tbody th, table.runs thead th:first-child { width: 22%; }
.two { display: grid; grid-template-columns: repeat(auto-fit, minmax(460px, 1fr)); gap: 0 28px; align-items: start; }
.two tbody th { width: 34%; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--border); vertical-align: top; }
thead th { background: var(--stripe); font-weight: 600; border-bottom: 2px solid var(--border); }
tbody th { font-weight: 500; width: 24%; }
td { font-variant-numeric: tabular-nums; }
tr.differs td { background: var(--diff); }
.src { color: var(--muted); font-size: 12.5px; }
code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: 12.5px; }
td code { overflow-wrap: anywhere; }
pre { background: var(--stripe); border: 1px solid var(--border); border-radius: 6px; padding: 12px 14px;
  overflow: auto; max-height: 640px; line-height: 1.45; }
figure { margin: 0 0 18px; }
figure img { display: block; width: 100%; height: auto; border: 1px solid var(--border); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
details { margin: 14px 0; }
summary { cursor: pointer; color: var(--accent); font-weight: 500; }
a { color: var(--accent); }
footer { margin-top: 48px; color: var(--muted); font-size: 12.5px; }
"""


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def png_figure(png: bytes, alt: str, caption: str = "") -> str:
    """An ``<img>`` with the PNG inline as a data URI, in a figure with an optional caption."""
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def _cell(value: str, source: str = "", mono: bool = False) -> str:
    v = f"<code>{esc(value)}</code>" if mono else esc(value)
    return f"<td>{v}" + (f'<div class="src">{esc(source)}</div>' if source else "") + "</td>"


def table(head: list[str], rows: list[str], cls: str = "") -> str:
    """A table from header strings and pre-rendered ``<tr>`` rows."""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    attr = f' class="{esc(cls)}"' if cls else ""
    return f"<table{attr}><thead><tr>{th}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def cards(items: list[tuple[str, str, str]]) -> str:
    """Headline numbers: (label, value, small note) boxes."""
    def value(v: str) -> str:  # "1.05e+09 FLOPs": the number large, the unit small
        number, _, unit = v.partition(" ")
        return esc(number) + (f' <span class="u">{esc(unit)}</span>' if unit else "")

    boxes = "".join(f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{value(v)}</div>'
                    + (f'<div class="s" title="{esc(s)}">{esc(s)}</div>' if s else "") + "</div>" for k, v, s in items)
    return f'<div class="cards">{boxes}</div>'


def page(title: str, subtitle: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>{esc(title)}</h1><p class=\"sub\">{esc(subtitle)}</p>{body}"
        "<footer>Written by <code>leantune report</code>. Self-contained: no external files.</footer>"
        "</main></body></html>\n"
    )


HEADLINE = ("tokens processed", "wall time", "tokens/s", "peak memory (RSS)", "compute", "energy")
# summary.md rows that the ledger tables show again, with more detail, when the run has a ledger
IN_LEDGER = ("tokens processed", "trainable (loss) tokens", "wall time", "peak memory (RSS)", "peak CUDA memory",
             "energy", "compute", "rollouts generated / trained on", "tokens generated / trained",
             "saved: early stop", "saved: prompt selection", "dropped: zero-variance groups")


ALWAYS_DIFFERENT = ("started (UTC)", "finished (UTC)")  # not highlighted: two runs never share them


def results_rows(summary: list[tuple[str, str, str]], ledger: dict | None) -> list[tuple[str, str, str]]:
    """The summary rows a page shows under Results: all of them without a ledger, else those the ledger
    tables do not repeat (losses, eval scores, pass@1, mean tokens/s from the metrics)."""
    return [r for r in summary if not ledger or r[0] not in IN_LEDGER]


def run_page(*, title: str, subtitle: str, summary: list[tuple[str, str, str]], images: list[tuple[bytes, str]],
             ledger: dict | None, recipe: dict | None, recipe_text: str | None) -> str:
    """The single-run page: headline cards, results table (``summary`` rows: metric, value, source),
    plots (PNG bytes, caption), the ledger as cost and provenance tables plus the raw JSON folded away,
    and the resolved recipe (``recipe`` one block per section, ``recipe_text`` the file as written)."""
    rows = ledger_rows(ledger)
    by_label = {r.label: r for r in rows}
    head = [(k, by_label[k].value, by_label[k].source) for k in HEADLINE if k in by_label]
    parts = [cards(head) if head else ""]
    parts.append("<h2>Results</h2>")
    parts.append(table(["metric", "value", "source"],
                       [f"<tr><th>{esc(a)}</th><td>{esc(b)}</td><td class=\"src\">{esc(c)}</td></tr>"
                        for a, b, c in results_rows(summary, ledger)]))
    parts.append("<h2>Curves</h2>")
    parts += [png_figure(png, alt=cap, caption=cap) for png, cap in images]
    parts.append("<h2>Ledger</h2>")
    if not rows:
        parts.append('<p class="src">No ledger.json in this run directory (the run did not finish, or predates the ledger).</p>')
    halves = []
    for section, heading in (("cost", "What it cost"), ("provenance", "What it ran on")):
        sec = [r for r in rows if r.section == section]
        if sec:
            halves.append(f"<div><h3>{esc(heading)}</h3>" + table(
                ["quantity", "value"], [f"<tr><th>{esc(r.label)}</th>{_cell(r.value, r.source, r.mono)}</tr>" for r in sec])
                + "</div>")
    parts.append(f'<div class="two">{"".join(halves)}</div>')
    if ledger:
        parts.append(f"<details><summary>Raw ledger.json</summary><pre>{esc(json.dumps(ledger, indent=2))}</pre></details>")
    parts.append("<h2>Recipe (resolved)</h2>")
    if recipe:
        blocks = "".join(f"<div><h4>{esc(k)}</h4><pre>{esc(_yaml_block(v))}</pre></div>" for k, v in recipe.items())
        parts.append(f'<div class="recipe">{blocks}</div>')
    if recipe_text:
        parts.append(f"<details{'' if recipe else ' open'}><summary>recipe.yaml as written</summary>"
                     f"<pre>{esc(recipe_text)}</pre></details>")
    if not recipe and not recipe_text:
        parts.append('<p class="src">No recipe.yaml in this run directory.</p>')
    return page(title, subtitle, "".join(parts))


def _yaml_block(value) -> str:
    import yaml

    return yaml.safe_dump(value, sort_keys=False, default_flow_style=False).rstrip() if isinstance(value, (dict, list)) \
        else yaml.safe_dump(value).removesuffix("\n...\n").rstrip()


def compare_page(*, title: str, subtitle: str, names: list[str], links: list[str | None], image: bytes,
                 summaries: list[list[tuple[str, str, str]]], ledgers: list[dict | None],
                 recipes: list[dict | None]) -> str:
    """The comparison page: the recipe keys that differ, one overlay figure, and tables with a column per
    run (results, ledger cost, provenance with the rows that differ highlighted)."""
    head = ["", *names]
    run_list = "".join(
        f"<li><b>{esc(n)}</b>" + (f' — <a href="{esc(link)}">its report</a>' if link else "") + "</li>"
        for n, link in zip(names, links))
    parts = [f"<ul>{run_list}</ul>"]
    parts.append("<h2>Recipe differences</h2>")
    diff = recipe_diff(recipes)
    if diff:
        parts.append(table(["key", *names], [f"<tr><th><code>{esc(k)}</code></th>" + "".join(_cell(v, mono=True) for v in vals)
                                             + "</tr>" for k, vals in diff], "runs"))
    else:
        parts.append('<p class="src">The recipes are identical.</p>')
    parts.append("<h2>Curves</h2>")
    parts.append(png_figure(image, alt="overlaid curves of the compared runs",
                            caption="Same axes for every run, each with its own colour and dash pattern (identical "
                                    "curves overlap); a run that did not log a metric is absent from that panel."))

    def side_by_side(per_run: list[dict[str, tuple[str, str, bool]]], mark: bool) -> str:
        labels = list(dict.fromkeys(k for d in per_run for k in d))
        trs = []
        for label in labels:
            cells = [d.get(label, (MISSING, "", False)) for d in per_run]
            sources = {c[1] for c in cells if c[0] != MISSING}
            shared = sources.pop() if len(sources) == 1 else None  # said once, under the label
            th = esc(label) + (f'<div class="src">{esc(shared)}</div>' if shared else "")
            tds = "".join(_cell(v, "" if shared is not None else src, mono) for v, src, mono in cells)
            differs = mark and label not in ALWAYS_DIFFERENT and len({c[0] for c in cells}) > 1
            tr = '<tr class="differs">' if differs else "<tr>"
            trs.append(f"{tr}<th>{th}</th>{tds}</tr>")
        return table(head, trs, "runs")

    parts.append("<h2>Results</h2>")
    parts.append(side_by_side([{a: (b, c, False) for a, b, c in results_rows(s, lg)} for s, lg in zip(summaries, ledgers)],
                              mark=False))
    rows = [ledger_rows(lg) for lg in ledgers]
    for section, heading in (("cost", "Ledger: what it cost"), ("provenance", "Ledger: what it ran on")):
        per_run = [{r.label: (r.value, r.source, r.mono) for r in rs if r.section == section} for rs in rows]
        if any(per_run):
            parts.append(f"<h2>{esc(heading)}</h2>")
            parts.append(side_by_side(per_run, mark=section == "provenance"))
            if section == "provenance":
                parts.append('<p class="src">Highlighted: differs between the runs.</p>')
    return page(title, subtitle, "".join(parts))
