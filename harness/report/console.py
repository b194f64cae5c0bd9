"""The matrix on a terminal (rich), as `powercut run` and `powercut report` show it."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from harness.report.grid import build_grid
from harness.report.results import RunResults

STYLE = {"pass": "bold green", "fail": "bold red", "error": "bold yellow", "skipped": "dim"}


def matrix_table(results: RunResults) -> Table:
    grid = build_grid(results.cells)
    table = Table(title="powercut: cache modes x faults x workloads", show_lines=True)
    table.add_column("mode", style="bold")
    for fault, workload in grid.columns:
        table.add_column(f"{fault}\n{workload}")
    for mode in grid.modes:
        row: list[Text | str] = [mode]
        for column in grid.columns:
            sq = grid.square(mode, column)
            if sq is None:
                row.append("")
                continue
            text = Text(sq.label, style=STYLE[sq.verdict])
            text.append(f"\nexpected: {sq.expected}\nobserved: {sq.observed}", style="default")
            row.append(text)
        table.add_row(*row)
    return table


def print_results(results: RunResults, console: Console | None = None) -> None:
    """The matrix, then each failed or errored cell with its reason and reproduce command."""
    console = console or Console()
    console.print(matrix_table(results))
    for cell in results.cells:
        if cell.verdict in ("fail", "error") or cell.causes is not None:
            console.print(Text(f"{cell.verdict.upper()} {cell.id}", style=STYLE[cell.verdict]))
            console.print(f"  {cell.reason}", markup=False, highlight=False, soft_wrap=True)
            if cell.explanation:
                console.print(
                    f"  why: {cell.explanation}", markup=False, highlight=False, soft_wrap=True
                )
            for line in cell.cause_lines():
                console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
            console.print(
                f"  reproduce: {cell.reproduce}", markup=False, highlight=False, soft_wrap=True
            )
    if results.missing:
        console.print(
            Text(f"{len(results.missing)} cells never ran:", style="bold yellow"),
        )
        for key in results.missing:
            console.print(f"  {key}", markup=False, highlight=False, soft_wrap=True)
    style = "bold green" if results.ok else "bold red"
    console.print(Text(("PASSED: " if results.ok else "FAILED: ") + results.summary, style=style))
