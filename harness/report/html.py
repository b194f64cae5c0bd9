"""report.html: one self-contained page (inline CSS, plots as data: URIs) to open or attach."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape
from pathlib import Path

from harness.report.cluster import node_names, node_rows, timeline_rows
from harness.report.grid import build_grid
from harness.report.results import CellResult, RunResults

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { margin-bottom: .2em; }
.status { font-size: 1.2em; font-weight: 600; padding: .3em .7em; border-radius: 4px;
          display: inline-block; }
.ok { background: #e3f4e4; color: #1b5e20; } .bad { background: #fde2e2; color: #b71c1c; }
table { border-collapse: collapse; margin: 1em 0; width: 100%; }
th, td { border: 1px solid #ccc; padding: .35em .55em; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
td.pass { background: #d8f0da; } td.fail { background: #f9c9c9; } td.error { background: #ffe0b2; }
td.skipped { background: #eee; color: #777; }
.verdict { font-weight: 700; } .small { font-size: .85em; color: #444; }
.why { font-style: italic; }
code, pre { font: 12px ui-monospace, monospace; }
pre { background: #f6f6f6; padding: .5em; overflow-x: auto; }
.neg { font-size: .8em; background: #ede7f6; color: #4527a0; border-radius: 3px; padding: 0 .3em; }
img { max-width: 100%; border: 1px solid #ddd; margin: .5em 0; }
details { margin: .3em 0; }
"""


def _matrix(cells: Sequence[CellResult]) -> str:
    grid = build_grid(cells)
    head = "".join(
        f"<th>{escape(fault)}<br><span class='small'>{escape(workload)}</span></th>"
        for fault, workload in grid.columns
    )
    rows = []
    for mode in grid.modes:
        tds = [f"<th>{escape(mode)}</th>"]
        for column in grid.columns:
            sq = grid.square(mode, column)
            if sq is None:
                tds.append("<td></td>")
                continue
            neg = (
                " <span class='neg'>negative control</span>"
                if "loss detected" in sq.expected
                else ""
            )
            title = escape(
                "\n".join(f"{c.id}: {c.verdict}: {c.reason}" for c in sq.cells), quote=True
            )
            tds.append(
                f"<td class='{sq.verdict}' title=\"{title}\">"
                f"<span class='verdict'>{escape(sq.label)}</span>"
                f"{neg}<br><span class='small'>expected: {escape(sq.expected)}<br>"
                f"observed: {escape(sq.observed)}</span></td>"
            )
        rows.append("<tr>" + "".join(tds) + "</tr>")
    return f"<table class='matrix'><tr><th>mode</th>{head}</tr>{''.join(rows)}</table>"


def _cells(cells: Sequence[CellResult]) -> str:
    rows = []
    for c in cells:
        checkers = "".join(
            f"<li><b>{escape(ch.name)}</b> (expected {escape(ch.expected)}): "
            f"{escape(ch.verdict)} — {escape(ch.reason)}</li>"
            for ch in c.checkers
        )
        artifacts = "".join(
            f"<li>{escape(name)}: <a href='{escape(path, quote=True)}'>{escape(path)}</a></li>"
            for name, path in sorted(c.artifacts.items())
        )
        timings = ", ".join(f"{escape(k)} {v:.1f}s" for k, v in c.timings.items())
        explanation = f"<p class='why'>{escape(c.explanation)}</p>" if c.explanation else ""
        causes = "".join(f"<li>{escape(line)}</li>" for line in c.cause_lines())
        if causes:
            explanation += f"<ul class='why'>{causes}</ul>"
        if c.nodes or c.timeline:
            explanation += _cluster(c)
        rows.append(
            f"<tr><td class='{c.verdict}'><span class='verdict'>{escape(c.verdict)}</span></td>"
            f"<td><code>{escape(c.id)}</code><br>"
            f"<span class='small'>{escape(c.scenario)}</span></td>"
            f"<td>{escape(c.expected)}</td>"
            f"<td>{escape(c.reason)}{explanation}"
            f"<details><summary>details</summary><ul>{checkers}</ul>"
            f"<p class='small'>seed {c.seed}; writes acknowledged {c.writes_acknowledged}, durable "
            f"{c.writes_durable}; lost {c.lost} {escape(c.loss_unit)}, corrupt {c.corrupt}</p>"
            f"<p class='small'>{timings}</p><ul>{artifacts}</ul>"
            f"<pre>{escape(c.reproduce)}</pre></details></td>"
            f"<td>{c.total_seconds:.1f}</td></tr>"
        )
    return (
        "<table><tr><th>verdict</th><th>cell</th><th>expected</th><th>observed</th><th>s</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _cluster(cell: CellResult) -> str:
    """A cluster cell's nodes, then its time line with one column per node."""
    nodes = "".join(
        "<tr>" + "".join(f"<td>{escape(x)}</td>" for x in row) + "</tr>" for row in node_rows(cell)
    )
    names = node_names(cell)
    head = "".join(f"<th>{escape(n)}</th>" for n in names)
    lines = "".join(
        f"<tr><td>{escape(row.when)}</td>"
        + "".join(f"<td>{escape(x)}</td>" for x in row.cells)
        + "</tr>"
        for row in timeline_rows(cell)
    )
    return (
        "<table class='small'><tr><th>node</th><th>mode</th><th>lost power</th><th>disk</th>"
        f"<th>why</th></tr>{nodes}</table>"
        f"<table class='small'><tr><th>t (s)</th>{head}</tr>{lines}</table>"
    )


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img alt='{escape(path.name)}' src='data:image/png;base64,{data}'>"


def render_html(results: RunResults, plots: Sequence[Path] = ()) -> str:
    status_class = "ok" if results.ok else "bad"
    status = "PASSED" if results.ok else "FAILED"
    meta = [
        ("command", results.command),
        ("started", results.started),
        ("finished", results.finished),
        ("powercut", results.powercut_version),
    ]
    if results.shard is not None:
        meta.append(("shard", f"{results.shard.label} of {len(results.shard.plan)} cells"))
    meta += [(f"host {k}", str(v)) for k, v in results.host.items() if v not in (None, "")]
    meta_html = "".join(f"<li>{escape(k)}: <code>{escape(v)}</code></li>" for k, v in meta if v)
    plots_html = "".join(_img(p) for p in plots if p.exists())
    partial = (
        ""
        if results.complete
        else "<p><b>Partial:</b> the run had not ended when these results were written.</p>"
    )
    never = ""
    if results.missing:
        items = "".join(
            f"<li><code>{escape(k.id)}</code> <span class='small'>{escape(k.scenario)}</span></li>"
            for k in results.missing
        )
        never = f"<h2>Never ran ({len(results.missing)})</h2><ul>{items}</ul>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>powercut results</title>
<style>{CSS}</style></head>
<body>
<h1>powercut results</h1>
<p><span class="status {status_class}">{status}</span> {escape(results.summary)}</p>
{partial}
<ul class="small">{meta_html}</ul>
<h2>Matrix</h2>
<p class="small">Cache modes down, fault and workload across. A square passes when what the
checkers observed lies inside the mode's contract; negative controls pass only when the loss was
detected.</p>
{_matrix(results.cells)}
{"<h2>Plots</h2>" + plots_html if plots_html else ""}
<h2>Cells</h2>
{_cells(results.cells)}
{never}
</body></html>
"""
