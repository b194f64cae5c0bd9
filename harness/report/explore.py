"""The exploration's report: DIR/report.html, report.md and plots/explore-timeline.png.

Renders what `powercut explore` wrote (the records of `harness.explore.doc`)
and judges nothing: per cell the verdict and its reason, the counts, where
the time went, whether the runner's own cuts at the end are among the
explored states, and every failing state with the checkers that failed, its
minimized writes and what they hold, and the command that rebuilds it as an
image. The plot puts the failing states on the workload's timeline:
persistence points in log order on the x axis, states explored at each as
bars, those that fail in colour.
"""

from __future__ import annotations

import base64
import os
from collections import Counter
from html import escape
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.durability.writelog import Op, read_log
from harness.errors import ConfigError, PowercutError
from harness.explore.causes import Explanation
from harness.explore.doc import (
    CellRecord,
    ClusterRecord,
    ExploreDocument,
    Minimized,
    StateRecord,
    Where,
    load_doc,
)
from harness.explore.recording import LOG_NAME
from harness.explore.states import PointKind
from harness.explore.syscalls import CallKind
from harness.explore.traced import load_traced
from harness.report.html import CSS

PLOT = "plots/explore-timeline.png"
COLOURS = {
    "pass": "#b7c9b0",
    "fail, allowed": "#f0a202",
    "breaks the contract": "#c62828",
}


def _category(state: StateRecord) -> str:
    if not state.failed:
        return "pass"
    return "breaks the contract" if state.contract_broken else "fail, allowed"


def plot_timeline(doc: ExploreDocument, path: Path) -> Path | None:
    """One row per cell: states per persistence point, failing ones in colour."""
    cells = [c for c in doc.cells if c.states]
    if not cells:
        return None
    fig = Figure(figsize=(9.0, 2.4 * len(cells) + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(cells), 1, squeeze=False)
    for ax, cell in zip(axes[:, 0], cells, strict=True):
        per: dict[str, Counter[int]] = {k: Counter() for k in COLOURS}
        for s in cell.states:
            per[_category(s)][s.point.number] += 1
        points = sorted({s.point.number for s in cell.states})
        bottom = [0] * len(points)
        for name, colour in COLOURS.items():
            values = [per[name][p] for p in points]
            if any(values):
                ax.bar(points, values, 0.9, bottom=bottom, color=colour, label=name)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        acks = [p.point.number for p in cell.points if PointKind.ACK in p.point.kinds]
        if acks:
            ax.plot(acks, [0] * len(acks), "|", color="#1565c0", markersize=6, label="ack point")
        ax.set_xlabel("persistence point (log order)")
        ax.set_ylabel("states")
        ax.set_title(f"{cell.scenario}: {cell.id}", fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False, ncols=4)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img alt='{escape(path.name)}' src='data:image/png;base64,{data}'>"


def _writes(minimized: Minimized) -> str:
    rows = []
    for w in minimized.writes:
        holds = "; ".join(w.holds) or "—"
        torn = f" (sectors lost {list(w.sectors_lost)})" if w.sectors_lost else ""
        rows.append(
            f"<tr><td>{escape(w.loss.value)}{escape(torn)}</td><td>{w.seq}</td>"
            f"<td>{w.offset}</td><td>{w.length}</td>"
            f"<td>{w.submit_index}</td><td>{w.flush_epoch}</td>"
            f"<td>{escape(holds)}</td></tr>"
        )
    if not rows:
        return ""
    return (
        "<table><tr><th>loss</th><th>write</th><th>offset</th><th>length</th>"
        "<th>log record</th><th>flush epoch</th><th>holds</th></tr>" + "".join(rows) + "</table>"
    )


def _failing(cell: CellRecord, limit: int = 50) -> str:
    failing = cell.failing
    failing.sort(key=lambda s: (not s.contract_broken, s.minimized is None))
    items = []
    for s in failing[:limit]:
        bad = [c for c in s.checks if c.ok is False]
        checks = "".join(
            f"<li><b>{escape(c.checker)}</b> ({escape((c.where or Where.HOST).value)}): "
            f"{escape(c.detail)}</li>"
            for c in bad
        )
        minimized = s.minimized
        shrunk = ""
        if minimized is not None and minimized.state is not None:
            shrunk = (
                f"<p>Shrunk to <code>{escape(minimized.state.id)}</code>: "
                f"{minimized.losses_before} → {minimized.losses_after} lost or torn "
                f"writes in {minimized.checks} checks "
                f"({escape(minimized.by.value if minimized.by else '')})."
                f"</p>{_writes(minimized)}<pre>{escape(minimized.replay)}</pre>"
            )
        elif minimized is not None:
            why = minimized.note or minimized.error or ""
            shrunk = f"<p class='small'>{escape(why)}</p>"
        label = ", ".join(s.point.labels)
        cls = "fail" if s.contract_broken else "error"
        items.append(
            f"<tr><td class='{cls}'>{escape(s.verdict.value)}"
            f"{'<br>breaks the contract' if s.contract_broken else '<br>allowed'}</td>"
            f"<td><code>{escape(s.id)}</code><br><span class='small'>point "
            f"{s.point.number} ({escape(label)}), {s.acked} acknowledged; "
            f"{len(s.state.lost)} lost, {len(s.state.torn)} torn of "
            f"{s.state.pending} pending</span></td>"
            f"<td><ul>{checks}</ul>{_why(s.explanation)}{shrunk}"
            f"<pre>{escape(s.replay or '')}</pre></td></tr>"
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


def _why(e: Explanation | None) -> str:
    """A failing state's explanation: its causes, or why none is named, with the evidence."""
    if e is None:
        return ""
    head = f"<p><b>Why</b> (boundary: {escape(e.boundary)}):</p>"
    if e.causes:
        items = "".join(
            f"<li><b>{escape(c.relied_on.value)}</b>: "
            f"{escape(', '.join(call.describe() for call in c.calls))} — {escape(c.evidence)}"
            f"<br>fix: {escape(c.fix)}</li>"
            for c in e.causes
        )
    else:
        items = "<li><b>unexplained</b>: no call's missing durability explains it</li>"
    evidence = "".join(f"<li>{escape(x)}</li>" for x in (*e.evidence, *e.writes, *e.kept)[:12])
    return f"{head}<ul>{items}</ul><ul class='small'>{evidence}</ul>"


def _causes(cell: CellRecord) -> str:
    """The failing states by cause (one line each), what was kept, and the trace itself."""
    if cell.trace is None:
        return ""
    rows = "".join(
        f"<tr><td>{escape(g.relied_on.value if g.relied_on else 'unexplained')}</td>"
        f"<td>{escape(g.fix)}</td><td>{len(g.states)}</td><td><code>{escape(g.smallest)}"
        f"</code><pre>{escape(g.replay or '')}</pre></td></tr>"
        for g in cell.causes
    )
    table = (
        "<table><tr><th>relied on</th><th>what would have kept it</th><th>states</th>"
        f"<th>smallest</th></tr>{rows}</table>"
        if rows
        else "<p>No failing state to explain.</p>"
    )
    kept = "".join(f"<li>{escape(k)}</li>" for k in cell.kept[:20])
    kept_html = (
        f"<p>Kept by the filesystem though never made durable:</p><ul>{kept}</ul>" if kept else ""
    )
    return f"<h4>Why it was lost</h4><p class='small'>{escape(cell.trace)}</p>{table}{kept_html}"


def _timeline(cell: CellRecord, out: Path | None, limit: int = 120) -> str:
    """The traced calls, the log's flushes and the acknowledgements in one order (the guest's
    clock), each acknowledgement with what was not yet durable and the failing states whose
    first lost acknowledgement it is."""
    if out is None or cell.recorded is None or cell.trace is None:
        return ""
    root = Path(cell.recorded.recording)
    try:
        traced = load_traced(root if root.is_absolute() else out / root)
    except ConfigError:
        return ""
    if traced is None or not traced.traced:
        return ""
    top = traced.root.rstrip("/") + "/"
    events: list[tuple[int, str, str]] = []
    for call in traced.trace.calls:
        if not call.ok or call.kind not in _SHOWN or not (call.path or "").startswith(top):
            continue
        events.append((call.enter_ns, "call", call.describe()))
    risks = {r.token: r for r in cell.at_risk}
    lost_at: dict[str, list[str]] = {}
    for s in cell.failing:
        if s.explanation is not None and s.explanation.boundary.startswith("ack "):
            lost_at.setdefault(s.explanation.boundary[4:], []).append(s.id)
    for token, (latest, _earliest) in traced.ack_times().items():
        r = risks.get(token)
        at = "; ".join(x.describe() for x in r.risks) if r is not None else ""
        states = lost_at.get(token, [])
        note = f" — lost in {len(states)} state(s): {', '.join(states[:4])}" if states else ""
        events.append((latest, "ack", f"ack {token}{note}" + (f"; at risk: {at}" if at else "")))
    if traced.clock is not None and traced.clock.consistent:
        try:
            wlog = read_log(Path(root if root.is_absolute() else out / root) / LOG_NAME)
        except (OSError, PowercutError):
            wlog = None
        for req in wlog.requests if wlog is not None else ():
            if req.op == Op.FLUSH and req.complete_ns is not None:
                g = req.complete_ns - traced.clock.midpoint
                error = f"±{traced.clock.error_ns / 1e6:.2f} ms"
                events.append((g, "flush", f"flush {req.seq} completed ({error})"))
    events.sort(key=lambda e: e[0])
    first_call = next((t for t, kind, _ in events if kind == "call"), None)
    events = [e for e in events if first_call is None or e[0] >= first_call]
    if not events:
        return ""
    t0 = events[0][0]
    keep = events
    if len(events) > limit:  # the acknowledgements first states lost, and what came before
        marked = [i for i, e in enumerate(events) if " — lost in " in e[2]]
        end = (marked[0] + limit // 2) if marked else limit
        keep = events[max(0, end - limit) : end]
    rows = "".join(
        f"<tr><td>{(t - t0) / 1e6:.3f}</td><td>{escape(kind)}</td><td>{escape(text)}</td></tr>"
        for t, kind, text in keep
    )
    more = (
        f"<p class='small'>{len(events) - len(keep)} more events not shown</p>"
        if len(keep) < len(events)
        else ""
    )
    return (
        "<details><summary>Timeline: calls, flushes and acknowledgements</summary>"
        "<table><tr><th>ms</th><th></th><th>what</th></tr>" + rows + f"</table>{more}</details>"
    )


_SHOWN = frozenset(
    {
        CallKind.OPEN,
        CallKind.WRITE,
        CallKind.TRUNCATE,
        CallKind.FALLOCATE,
        CallKind.RENAME,
        CallKind.LINK,
        CallKind.SYMLINK,
        CallKind.UNLINK,
        CallKind.MKDIR,
        CallKind.RMDIR,
        CallKind.FSYNC,
        CallKind.FDATASYNC,
        CallKind.SYNC,
        CallKind.SYNCFS,
        CallKind.MSYNC,
    }
)


def _unjudged(cell: CellRecord, limit: int = 50) -> str:
    """The states no checker failed and some could not judge, with what each checker said."""
    unjudged = cell.unjudged
    if not unjudged:
        return ""
    rows = []
    for s in unjudged[:limit]:
        why = "".join(
            f"<li><b>{escape(c.checker)}</b> ({escape((c.where or Where.HOST).value)}): "
            f"{escape(c.detail)}</li>"
            for c in s.checks
            if c.ok is None
        )
        rows.append(
            f"<tr><td class='error'>not judged</td><td><code>{escape(s.id)}</code><br>"
            f"<span class='small'>point {s.point.number}, {s.acked} acknowledged</span></td>"
            f"<td><ul>{why}</ul></td></tr>"
        )
    more = (
        f"<p class='small'>… and {len(unjudged) - limit} more in explore.json</p>"
        if len(unjudged) > limit
        else ""
    )
    allowed = cell.explore.unjudged_states if cell.explore is not None else 0
    return (
        f"<h4>States not judged ({len(unjudged)}; the scenario's unjudged-states allows "
        f"{allowed})</h4>"
        "<table><tr><th></th><th>state</th><th>why not</th></tr>"
        + "".join(rows)
        + "</table>"
        + more
    )


def _cell(cell: CellRecord, out: Path | None = None) -> str:
    verdict = cell.verdict.value if cell.verdict is not None else cell.status.value
    cls = {"pass": "pass", "fail": "fail"}.get(verdict, "error")
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in cell.seconds.to_json().items())
    guest = cell.guest
    guest_line = ""
    if guest is not None:
        guest_line = (
            f"<li>checker guest: {guest.checks} states mounted and checked, "
            f"{guest.same_image} identical to one checked, "
            f"{guest.decided_host_side} decided host-side; "
            f"{guest.states_per_s} states/s ({guest.checks_per_s} checks/s), "
            f"boot {guest.boot_seconds} s</li>"
        )
    cuts = cell.runner_cuts
    cuts_line = ""
    if cuts is not None and cuts.error is None and cuts.cuts:
        parts = [
            f"{escape(c.policy.value)}: "
            + ("the same image as " + escape(str(c.state)) if c.same_image else "differs")
            for c in cuts.cuts
        ]
        cuts_line = f"<li>the runner's cuts at the end: {'; '.join(parts)}</li>"
    recorded = cell.recorded
    counts = cell.counts
    per_s = cell.host_states_per_s
    if cell.cluster is not None:
        rows = "\n".join(
            f"<li>{escape(line)}</li>" for line in _cluster_markdown(cell, cell.cluster) if line
        )
        return f"""
<h3><span class='verdict'>{escape(verdict).upper()}</span> {escape(cell.scenario)}:
<code>{escape(cell.id)}</code></h3>
<table><tr><td class='{cls}'>{escape(cell.reason)}</td></tr></table>
<ul class='small'>{rows}<li>{escape(seconds)}</li></ul>
"""
    return f"""
<h3><span class='verdict'>{escape(verdict).upper()}</span> {escape(cell.scenario)}:
<code>{escape(cell.id)}</code></h3>
<table><tr><td class='{cls}'>{escape(cell.reason)}</td></tr></table>
<ul class='small'>
<li>{counts.states_explored} states explored ({counts.states_unique} unique images)
at {len(cell.points)} of {recorded.points_total if recorded else 0} persistence points;
{counts.states_failing} fail, {counts.states_breaking_contract} break the contract,
{counts.states_unjudged} not judged
</li>
<li>mode {escape(cell.mode.value if cell.mode else "None")}, workload {escape(cell.workload)} on
{escape(str(cell.filesystem))} {escape(cell.mount_options or "")};
states enumerated under {escape(cell.keep.name if cell.keep else "None")}, judged under
{escape(cell.judge.name if cell.judge else "None")}; {recorded.acks if recorded else 0}
acknowledgements, {recorded.writes if recorded else 0} writes in the log</li>
{guest_line}{cuts_line}
<li>{escape(seconds)}; host side {per_s if per_s is not None else 0} states/s</li>
</ul>
{_causes(cell)}
{_timeline(cell, out)}
<h4>Failing states</h4>
{_failing(cell)}
{_unjudged(cell)}
"""


def render_explore_html(
    doc: ExploreDocument, plot: Path | None = None, out: Path | None = None
) -> str:
    ok = bool(doc.ok)
    status = "PASSED" if ok else "INTERRUPTED" if doc.interrupted else "FAILED"
    counts = doc.counts
    summary = (
        f"{counts.states_explored} states explored ({counts.states_unique} unique), "
        f"{counts.states_failing} failing, {counts.states_breaking_contract} "
        f"breaking the contract, {counts.states_unjudged} not judged, "
        f"checked in {counts.check_seconds} s"
    )
    plot_html = _img(plot) if plot is not None and plot.exists() else ""
    cells = "".join(_cell(c, out) for c in doc.cells)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>powercut exploration</title>
<style>{CSS}</style></head>
<body>
<h1>powercut exploration</h1>
<p><span class="status {"ok" if ok else "bad"}">{status}</span> {escape(summary)}</p>
<ul class="small"><li>command: <code>{escape(doc.command)}</code></li>
<li>started {escape(doc.started)}, finished {escape(str(doc.finished))}</li></ul>
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


def render_explore_markdown(doc: ExploreDocument) -> str:
    """The same report as Markdown (a CI job's summary, a pull request comment)."""
    counts = doc.counts
    status = "PASSED" if doc.ok else "INTERRUPTED" if doc.interrupted else "FAILED"
    lines = [
        "# powercut exploration",
        "",
        f"**{status}**: {counts.states_explored} states explored ({counts.states_unique} "
        f"unique), {counts.states_failing} failing, {counts.states_breaking_contract} breaking "
        f"the contract, {counts.states_unjudged} not judged",
        "",
        f"`{doc.command}`",
        "",
        "| cell | verdict | explored | failing | breaking the contract | not judged | reason |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in doc.cells:
        verdict = c.verdict.value if c.verdict is not None else c.status.value
        reason = c.reason.replace("|", "\\|")
        lines.append(
            f"| {c.scenario}: `{c.id}` | {verdict.upper()} | {c.counts.states_explored} | "
            f"{c.counts.states_failing} | {c.counts.states_breaking_contract} | "
            f"{c.counts.states_unjudged} | {reason} |"
        )
    for c in doc.cells:
        if c.cluster is not None:
            lines += _cluster_markdown(c, c.cluster)
            continue
        shown = c.breaking[:5] or (c.failing[:5] if c.expect == "violation" else [])
        unjudged = c.unjudged[:10]
        if not shown and not unjudged and not c.causes and not c.kept:
            continue
        lines += ["", f"## `{c.id}`"]
        for g in c.causes:
            lines.append(f"- cause: {g.line()}")
        for k in c.kept[:5]:
            lines.append(f"- kept: {k}")
        for s in shown:
            by = ", ".join(s.broken_by) or s.verdict.value
            lines.append(f"- `{s.id}` fails ({by}): `{s.replay or ''}`")
            if s.explanation is not None:
                lines += [f"  - {line}" for line in s.explanation.lines()]
        for s in unjudged:
            why = "; ".join(f"{x.checker}: {x.detail}" for x in s.checks if x.ok is None)
            lines.append(f"- `{s.id}` not judged: {why}")
        if len(c.unjudged) > len(unjudged):
            lines.append(f"- … and {len(c.unjudged) - len(unjudged)} more not judged")
    return "\n".join(lines) + "\n"


def _cluster_markdown(cell: CellRecord, cluster: ClusterRecord) -> list[str]:
    """A cluster cell: its nodes, each state checked, what a failing one shrank to."""
    nodes = ", ".join(
        f"{n} ({m}, {cluster.writes.get(n, 0)} writes)" for n, m in cluster.nodes.items()
    )
    lines = [
        "",
        f"## `{cell.id}` (cluster)",
        "",
        f"Nodes {nodes}; {cluster.acks} acknowledgements, {cluster.points} cluster points; "
        f"{len(cluster.states)} cluster states checked, "
        f"{cluster.states_per_s if cluster.states_per_s is not None else 0} per second.",
        "",
        "| state | combination | verdict | client's check |",
        "|---|---|---|---|",
    ]
    for s in cluster.states:
        verdict = "NOT JUDGED" if s.unjudged else s.verdict.value.upper()
        if s.contract_broken:
            verdict += " (breaks the contract)"
        said = (s.client or s.unjudged).replace("|", "\\|")
        lines.append(f"| `{s.id}` | {s.state.describe()} | {verdict} | {said} |")
    for s in cluster.states:
        m = s.minimized
        if m is None:
            continue
        if m.state is None:
            lines.append(f"- `{s.id}` not shrunk: {m.note or m.error}")
            continue
        lines.append(
            f"- `{s.id}` shrunk to `{m.state.id}`: {m.state.describe()} — nodes that must "
            f"deviate: {', '.join(m.nodes) or 'none'}; {m.losses_before} lost or torn writes "
            f"-> {m.losses_after}; {m.node_checks} checks for the nodes, {m.write_checks} for "
            f"the writes{f', {m.unjudged} not judged' if m.unjudged else ''}"
        )
        for node, st in m.state.nodes:
            if st.lost or st.torn:
                torn = f", torn {[seq for seq, _s in st.torn]}" if st.torn else ""
                lines.append(f"  - {node}: lost writes {list(st.lost)}{torn}")
    return lines


def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def render_explore(directory: Path | str, doc: ExploreDocument | None = None) -> Path:
    """Write DIR/report.html (and the plot) and DIR/report.md from DIR/explore.json (or `doc`,
    what it holds); returns report.html's path."""
    out = Path(directory)
    if doc is None:
        doc = load_doc(out)
    plot = plot_timeline(doc, out / PLOT)
    _write(out / "report.md", render_explore_markdown(doc))
    return _write(out / "report.html", render_explore_html(doc, plot, out))
