"""`powercut report DIR`, `powercut report --merge DIR... --out DIR`: render the reports.

    powercut report out/demo                       # again, from out/demo/results.json
    powercut report --merge shards/* --out merged  # one report from `--shard K/N` runs

A run that died part-way renders too: its cells that never ran are named.
A merge refuses directories from different scenario sets, schema versions or
splits, and shards that overlap or miss a cell (`harness.report.merge`).
"""

from __future__ import annotations

import argparse

from rich.console import Console

from harness.errors import ConfigError
from harness.report.console import print_results
from harness.report.merge import merge_results
from harness.report.render import render_all, rerender

NAME = "report"
HELP = "render the reports (JUnit, Markdown, HTML, plots) from results.json, or merge shards"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "directory", nargs="?", metavar="DIR", help="a `powercut run --out` directory"
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="results directories of one run's shards (`powercut run --shard K/N`) to merge",
    )
    parser.add_argument("--out", metavar="DIR", help="with --merge: where the merged run goes")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when any cell failed, errored or never ran (as `powercut run` does)",
    )


def run(args: argparse.Namespace) -> int:
    if args.merge:
        if args.directory is not None:
            raise ConfigError("give either DIR or --merge DIR... --out DIR, not both")
        if not args.out:
            raise ConfigError("--merge needs --out DIR: where the merged results go")
        results = merge_results(args.merge, args.out)
        rendered = render_all(results, args.out)
    else:
        if args.directory is None:
            raise ConfigError("name a results directory (DIR), or --merge DIR... --out DIR")
        if args.out:
            raise ConfigError("--out goes with --merge; `powercut report DIR` renders into DIR")
        results, rendered = rerender(args.directory)
    console = Console()
    print_results(results, console)
    paths = (rendered.results, rendered.junit, rendered.markdown, rendered.html, *rendered.plots)
    for path in paths:
        if path is not None:
            console.print(f"  {path}", markup=False, highlight=False)
    if args.strict and not results.ok:
        return 1
    return 0
