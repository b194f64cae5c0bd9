"""`powercut report DIR`: render the reports again from DIR/results.json."""

from __future__ import annotations

import argparse

from rich.console import Console

from harness.report.console import print_results
from harness.report.render import rerender

NAME = "report"
HELP = "render the reports (JUnit, Markdown, HTML, plots) again from DIR/results.json"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="a `powercut run --out` directory")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when any cell failed or errored (as `powercut run` does)",
    )


def run(args: argparse.Namespace) -> int:
    results, rendered = rerender(args.directory)
    console = Console()
    print_results(results, console)
    for path in (rendered.junit, rendered.markdown, rendered.html, *rendered.plots):
        console.print(f"  {path}", markup=False, highlight=False)
    if args.strict and not results.ok:
        return 1
    return 0
