"""report.md: the matrix and every cell, readable in a terminal, a PR comment or CI summary."""

from __future__ import annotations

from collections.abc import Sequence

from harness.report.cluster import node_names, node_rows, timeline_rows
from harness.report.grid import build_grid
from harness.report.results import CellResult, RunResults

ICON = {"pass": "✅", "fail": "❌", "error": "⚠️", "skipped": "⏭️"}


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def matrix_table(cells: Sequence[CellResult]) -> list[str]:
    grid = build_grid(cells)
    header = ["mode", *[f"{fault} · {workload}" for fault, workload in grid.columns]]
    lines = ["| " + " | ".join(_md(h) for h in header) + " |", "|" + "---|" * len(header)]
    for mode in grid.modes:
        row = [f"**{mode}**"]
        for column in grid.columns:
            sq = grid.square(mode, column)
            if sq is None:
                row.append("")
                continue
            row.append(
                f"{ICON[sq.verdict]} {sq.label}<br>expected: {sq.expected}"
                f"<br>observed: {sq.observed}"
            )
        lines.append("| " + " | ".join(_md(r) for r in row) + " |")
    return lines


def cluster_section(cell: CellResult) -> list[str]:
    """A cluster cell's nodes, then its time line with the nodes side by side."""
    out = [f"### `{_md(cell.id)}` ({cell.scenario})", ""]
    if cell.explanation:
        out += [f"Why: {_md(cell.explanation)}", ""]
    out += ["| node | mode | lost power | disk | why |", "|---|---|---|---|---|"]
    out += ["| " + " | ".join(_md(x) for x in row) + " |" for row in node_rows(cell)]
    names = node_names(cell)
    out += ["", "| t (s) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    out += [
        f"| {row.when} | " + " | ".join(_md(x) for x in row.cells) + " |"
        for row in timeline_rows(cell)
    ]
    return out


def render_markdown(results: RunResults, plots: Sequence[str] = ()) -> str:
    out = ["# powercut results", ""]
    status = "PASSED" if results.ok else "FAILED"
    out.append(f"**{status}** — {results.summary}.")
    if not results.complete:
        out += ["", "_Partial: the run had not ended when these results were written._"]
    out.append("")
    meta = [
        ("command", f"`{results.command}`" if results.command else ""),
        ("started", results.started),
        ("finished", results.finished),
        ("powercut", results.powercut_version),
    ]
    if results.shard is not None:
        meta.append(("shard", f"{results.shard.label} of {len(results.shard.plan)} cells"))
    meta += [(f"host {k}", str(v)) for k, v in results.host.items() if v not in (None, "")]
    out += [f"- {k}: {v}" for k, v in meta if v]
    out += ["", "## Matrix", "", *matrix_table(results.cells), ""]
    if plots:
        out += ["## Plots", ""]
        out += [f"![{p}]({p})" for p in plots]
        out.append("")
    out += [
        "## Cells",
        "",
        "| cell | expected | verdict | reason | seed | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for c in results.cells:
        out.append(
            f"| `{_md(c.id)}` | {_md(c.expected)} | {ICON[c.verdict]} {c.verdict} "
            f"| {_md(c.reason)}{_md(' — why: ' + c.explanation) if c.explanation else ''} "
            f"| {c.seed} | {c.total_seconds:.1f} |"
        )
    clusters = [c for c in results.cells if c.nodes or c.timeline]
    if clusters:
        out += ["", "## Clusters"]
        for c in clusters:
            out += ["", *cluster_section(c)]
    if results.missing:
        out += ["", f"## Never ran ({len(results.missing)})", ""]
        out += [f"- `{_md(k.id)}` ({_md(k.scenario)})" for k in results.missing]
    explained = [c for c in results.cells if c.causes is not None and c.verdict == "pass"]
    if explained:
        out += ["", "## Losses explained (negative controls that caught them)", ""]
        for c in explained:
            out += [f"### `{c.id}` ({c.scenario})", ""]
            out += [f"- {line}" for line in c.cause_lines()]
            out.append("")
    bad = [c for c in results.cells if c.verdict in ("fail", "error")]
    if bad:
        out += ["", "## Failures", ""]
        for c in bad:
            out += [f"### `{c.id}` ({c.scenario})", "", f"{c.verdict.upper()}: {c.reason}", ""]
            if c.explanation:
                out += [f"Why: {c.explanation}", ""]
            out += [f"- {line}" for line in c.cause_lines()]
            out += [
                f"- {ch.name} (expected {ch.expected}): {ch.verdict} — {ch.reason}"
                for ch in c.checkers
            ]
            out += [f"- {name}: `{path}`" for name, path in sorted(c.artifacts.items())]
            out += ["", "Reproduce:", "", "```", c.reproduce, "```", ""]
    return "\n".join(out).rstrip() + "\n"
