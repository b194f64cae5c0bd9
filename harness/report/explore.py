"""The exploration's report: DIR/report.html and DIR/plots/explore-timeline.png from explore.json.

Renders what `powercut explore` wrote (`harness.crash.explore_run`, format in
its `ExploreDoc`) and judges nothing: per cell the verdict and its reason,
the counts, where the time went, whether the runner's own cuts at the end are
among the explored states, and every failing state with the checkers that
failed, its minimized writes and what they hold, and the command that
rebuilds it as an image. The plot puts the failing states on the workload's
timeline: persistence points in log order on the x axis, states explored at
each as bars, those that fail in colour.
"""

from __future__ import annotations

import base64
import os
from collections import Counter
from html import escape
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.report.html import CSS
from harness.report.jsonfile import load_json_object

PLOT = "plots/explore-timeline.png"
COLOURS = {
    "pass": "#b7c9b0",
    "fail, allowed": "#f0a202",
    "breaks the contract": "#c62828",
}


def _category(state: dict[str, Any]) -> str:
    if state.get("verdict", "pass") == "pass":
        return "pass"
    return "breaks the contract" if state.get("contract_broken") else "fail, allowed"


def plot_timeline(doc: dict[str, Any], path: Path) -> Path | None:
    """One row per cell: states per persistence point, failing ones in colour."""
    cells = [c for c in doc.get("cells", []) if c.get("states")]
    if not cells:
        return None
    fig = Figure(figsize=(9.0, 2.4 * len(cells) + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(cells), 1, squeeze=False)
    for ax, cell in zip(axes[:, 0], cells, strict=True):
        per: dict[str, Counter[int]] = {k: Counter() for k in COLOURS}
        for s in cell["states"]:
            per[_category(s)][int(s["point"]["number"])] += 1
        points = sorted({int(s["point"]["number"]) for s in cell["states"]})
        bottom = [0] * len(points)
        for name, colour in COLOURS.items():
            values = [per[name][p] for p in points]
            if any(values):
                ax.bar(points, values, 0.9, bottom=bottom, color=colour, label=name)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        acks = [int(p["number"]) for p in cell.get("points", []) if "ack" in p.get("kinds", [])]
        if acks:
            ax.plot(acks, [0] * len(acks), "|", color="#1565c0", markersize=6, label="ack point")
        ax.set_xlabel("persistence point (log order)")
        ax.set_ylabel("states")
        ax.set_title(f"{cell.get('scenario')}: {cell.get('id')}", fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False, ncols=4)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img alt='{escape(path.name)}' src='data:image/png;base64,{data}'>"


def _writes(minimized: dict[str, Any]) -> str:
    rows = []
    for w in minimized.get("writes", []):
        holds = "; ".join(w.get("holds", [])) or "—"
        torn = f" (sectors lost {w['sectors_lost']})" if w.get("sectors_lost") else ""
        rows.append(
            f"<tr><td>{escape(w.get('loss', ''))}{escape(torn)}</td><td>{w.get('seq')}</td>"
            f"<td>{w.get('offset')}</td><td>{w.get('length')}</td>"
            f"<td>{w.get('submit_index')}</td><td>{w.get('flush_epoch')}</td>"
            f"<td>{escape(holds)}</td></tr>"
        )
    if not rows:
        return ""
    return (
        "<table><tr><th>loss</th><th>write</th><th>offset</th><th>length</th>"
        "<th>log record</th><th>flush epoch</th><th>holds</th></tr>" + "".join(rows) + "</table>"
    )


def _failing(cell: dict[str, Any], limit: int = 50) -> str:
    failing = [s for s in cell.get("states", []) if s.get("verdict") != "pass"]
    failing.sort(key=lambda s: (not s.get("contract_broken"), "minimized" not in s))
    items = []
    for s in failing[:limit]:
        bad = [c for c in s.get("checks", []) if c.get("ok") is False]
        checks = "".join(
            f"<li><b>{escape(str(c.get('checker')))}</b> ({escape(str(c.get('where', 'host')))}): "
            f"{escape(str(c.get('detail', '')))}</li>"
            for c in bad
        )
        minimized = s.get("minimized")
        shrunk = ""
        if isinstance(minimized, dict) and "id" in minimized:
            shrunk = (
                f"<p>Shrunk to <code>{escape(minimized['id'])}</code>: "
                f"{minimized.get('losses_before')} → {minimized.get('losses_after')} lost or torn "
                f"writes in {minimized.get('checks')} checks ({escape(minimized.get('by', ''))})."
                f"</p>{_writes(minimized)}<pre>{escape(minimized.get('replay', ''))}</pre>"
            )
        elif isinstance(minimized, dict):
            why = minimized.get("note") or minimized.get("error", "")
            shrunk = f"<p class='small'>{escape(why)}</p>"
        label = ", ".join(s.get("point", {}).get("labels", []))
        cls = "fail" if s.get("contract_broken") else "error"
        items.append(
            f"<tr><td class='{cls}'>{escape(s.get('verdict', ''))}"
            f"{'<br>breaks the contract' if s.get('contract_broken') else '<br>allowed'}</td>"
            f"<td><code>{escape(s['id'])}</code><br><span class='small'>point "
            f"{s['point']['number']} ({escape(label)}), {s.get('acked', 0)} acknowledged; "
            f"{len(s.get('lost', []))} lost, {len(s.get('torn', []))} torn of "
            f"{s.get('pending', 0)} pending</span></td>"
            f"<td><ul>{checks}</ul>{shrunk}<pre>{escape(s.get('replay', ''))}</pre></td></tr>"
        )
    more = (
        f"<p class='small'>… and {len(failing) - limit} more in explore.json</p>"
        if len(failing) > limit
        else ""
    )
    if not items:
        return "<p>No state fails.</p>"
    return (
        "<table><tr><th>verdict</th><th>state</th><th>what failed</th></tr>"
        + "".join(items)
        + "</table>"
        + more
    )


def _cell(cell: dict[str, Any]) -> str:
    verdict = cell.get("verdict") or cell.get("status", "")
    cls = {"pass": "pass", "fail": "fail"}.get(str(verdict), "error")
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in cell.get("seconds", {}).items())
    guest = cell.get("guest") or {}
    guest_line = ""
    if guest:
        guest_line = (
            f"<li>checker guest: {guest.get('checks', 0)} states mounted and checked, "
            f"{guest.get('same_image', 0)} identical to one checked, "
            f"{guest.get('decided_host_side', 0)} decided host-side; "
            f"{guest.get('states_per_s', 0)} states/s ({guest.get('checks_per_s', 0)} checks/s), "
            f"boot {guest.get('boot_seconds', 0)} s</li>"
        )
    cuts = cell.get("runner_cuts") or {}
    cuts_line = ""
    if cuts and "error" not in cuts:
        parts = [
            f"{escape(policy)}: "
            + (
                "the same image as " + escape(str(v.get("state")))
                if v.get("same_image")
                else "differs"
            )
            for policy, v in cuts.items()
        ]
        cuts_line = f"<li>the runner's cuts at the end: {'; '.join(parts)}</li>"
    return f"""
<h3><span class='verdict'>{escape(str(verdict)).upper()}</span> {escape(str(cell.get("scenario")))}:
<code>{escape(str(cell.get("id")))}</code></h3>
<table><tr><td class='{cls}'>{escape(str(cell.get("reason", "")))}</td></tr></table>
<ul class='small'>
<li>{cell.get("states_explored", 0)} states explored ({cell.get("states_unique", 0)} unique images)
at {len(cell.get("points", []))} of {cell.get("points_total", 0)} persistence points;
{cell.get("states_failing", 0)} fail, {cell.get("states_breaking_contract", 0)} break the contract
</li>
<li>mode {escape(str(cell.get("mode")))}, workload {escape(str(cell.get("workload")))} on
{escape(str(cell.get("filesystem")))} {escape(str(cell.get("mount_options") or ""))};
states enumerated under {escape(str(cell.get("keep")))}, judged under
{escape(str(cell.get("judge")))}; {cell.get("acks", 0)} acknowledgements,
{cell.get("writes", 0)} writes in the log</li>
{guest_line}{cuts_line}
<li>{escape(seconds)}; host side {cell.get("host_states_per_s", 0)} states/s</li>
</ul>
<h4>Failing states</h4>
{_failing(cell)}
"""


def render_explore_html(doc: dict[str, Any], plot: Path | None = None) -> str:
    ok = bool(doc.get("ok"))
    status = "PASSED" if ok else "INTERRUPTED" if doc.get("interrupted") else "FAILED"
    summary = (
        f"{doc.get('states_explored', 0)} states explored ({doc.get('states_unique', 0)} unique), "
        f"{doc.get('states_failing', 0)} failing, {doc.get('states_breaking_contract', 0)} "
        f"breaking the contract, checked in {doc.get('check_seconds', 0)} s"
    )
    plot_html = _img(plot) if plot is not None and plot.exists() else ""
    cells = "".join(_cell(c) for c in doc.get("cells", []))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>powercut exploration</title>
<style>{CSS}</style></head>
<body>
<h1>powercut exploration</h1>
<p><span class="status {"ok" if ok else "bad"}">{status}</span> {escape(summary)}</p>
<ul class="small"><li>command: <code>{escape(str(doc.get("command", "")))}</code></li>
<li>started {escape(str(doc.get("started")))}, finished {escape(str(doc.get("finished")))}</li></ul>
<h2>Exploration</h2>
<p class="small">Each cell's workload ran once; every crash state its mode's contract allows at
each persistence point (completed flushes and FUA writes, acknowledgements, the end) was checked
host-side (the oracle; the filesystem checker, with journal recovery on ext4, before log recovery
on xfs, btrfs and f2fs) and, where that passed, in one checker guest (mount with the kernel's
recovery, the workload's own check, unmount). A state breaks the contract when a
checker the promise binds finds loss.</p>
{plot_html}
{cells}
</body></html>
"""


def render_explore(directory: Path | str, doc: dict[str, Any] | None = None) -> Path:
    """Write DIR/report.html (and the plot) from DIR/explore.json."""
    out = Path(directory)
    if doc is None:
        doc = load_json_object(out / "explore.json", "an exploration file")
    plot = plot_timeline(doc, out / PLOT)
    html = out / "report.html"
    tmp = html.with_name(html.name + ".tmp")
    tmp.write_text(render_explore_html(doc, plot), encoding="utf-8")
    os.replace(tmp, html)
    return html
