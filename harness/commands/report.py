"""`powercut report DIR`: render the reports again from DIR/results.json."""

from __future__ import annotations

import argparse
import sys

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
    print(f"{results.summary}", file=sys.stdout)
    for path in (rendered.junit, rendered.markdown, rendered.html, *rendered.plots):
        print(f"  {path}")
    if args.strict and not results.ok:
        return 1
    return 0
