"""`powercut run SCENARIO... --out DIR`: the durability matrix, cell by cell.

    powercut run scenarios/matrix.toml --out out/demo
    powercut run matrix --out out/demo -j 2            # a shipped scenario by name, 2 at once
    powercut run scenarios/*.toml --out out/all --mode writeback --seed 7
    powercut run matrix --out out/shard-1 --shard 1/4  # this CI job's share of 4
    powercut run scenarios/matrix.toml --out r --seed 1 \
        --cell writeback/host-power-cut.lose-all/ack-records/after-200-acked/r0

Exit status: 0 when every cell passed, 1 when any failed or errored, 130
after Ctrl-C (the reports are still written, unrun cells marked skipped).
results.json and junit.xml are rewritten after every cell.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from harness.commands._cells import SHIPPED, add_cell_arguments, plan_from_cell_arguments
from harness.crash.images import CellImages
from harness.crash.plan import RunPlan, command_line, durations_from
from harness.crash.runner import KeepImages, RunObserver, run_plan
from harness.errors import ConfigError
from harness.report.console import STYLE, print_results
from harness.report.results import CellResult
from harness.scenario.cells import Cell

NAME = "run"
OUT_REQUIRED = (
    "--out DIR is required: the results directory (results.json, junit.xml, reports, logs); "
    "only --list runs without one"
)
HELP = "run power-cut scenarios and judge every cell against its cache mode's contract"


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """`powercut run SCENARIO... --out DIR [--mode M] [--seed S] [--repeat N] [--accel A]`.

    The options that choose cells are `powercut explore`'s too
    (`harness.commands._cells`): `--cell ID` (one cell or an id prefix, what
    reproduce commands use) and `--list` (print the cells, run nothing: it
    needs no `--out`) among them.
    """
    add_cell_arguments(
        parser,
        scenarios=SHIPPED,
        out="results directory: results.json, junit.xml, report.html, logs (required, "
        "except with --list)",
    )
    parser.add_argument(
        "--repeat", type=int, metavar="N", help="repetitions per cell (overrides the files')"
    )
    parser.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="run N cells at once, each in its own worker process (default 1)",
    )
    parser.add_argument(
        "--shard",
        metavar="K/N",
        help="run only share K of N of the cells (for N CI jobs; `powercut report --merge` "
        "joins their results); shares are balanced by expected duration",
    )
    parser.add_argument(
        "--durations",
        metavar="RESULTS",
        help="balance --shard by each cell's time in this earlier results.json (or its "
        "directory) instead of estimates; every shard must be given the same file",
    )
    parser.add_argument(
        "--keep-images",
        choices=[k.value for k in KeepImages],
        default=KeepImages.FAILED.value,
        help="which cells keep their disk images: failed (default: failed or errored "
        "cells), all, or none; logs, write logs and journals are always kept",
    )


def plan_from_args(args: argparse.Namespace) -> RunPlan:
    """The plan the command line asks for."""
    jobs = getattr(args, "jobs", 1)
    if jobs < 1:
        raise ConfigError(f"-j/--jobs must be at least 1, not {jobs}")
    durations = getattr(args, "durations", None)
    if durations is not None and getattr(args, "shard", None) is None:
        raise ConfigError("--durations only balances --shard; give --shard K/N too")
    return plan_from_cell_arguments(
        args,
        out_required=OUT_REQUIRED,
        repeat=args.repeat,
        shard=getattr(args, "shard", None),
        durations=durations_from(durations) if durations else None,
    )


def register(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)


class _Display(RunObserver):
    """The overall bar and one line per running cell (several with -j)."""

    def __init__(self, progress: Progress, total: int, console: Console) -> None:
        self.progress = progress
        self.console = console
        self.overall = progress.add_task("cells", total=total)
        self.running: dict[int, TaskID] = {}

    def cell_started(self, index: int, cell: Cell) -> None:
        self.running[index] = self.progress.add_task(
            f"{cell.scenario}: {cell.id}: prepare", total=None
        )

    def phase(self, index: int, cell: Cell, phase: str) -> None:
        if index in self.running:
            self.progress.update(
                self.running[index], description=f"{cell.scenario}: {cell.id}: {phase}"
            )

    def cell_finished(self, index: int, cell: Cell, result: CellResult) -> None:
        if index in self.running:
            self.progress.remove_task(self.running.pop(index))
        seconds = result.timings.get("total", 0.0)
        style = STYLE.get(result.verdict, "default")
        self.console.print(
            f"[{style}]{result.verdict.upper():5}[/] {cell.scenario}: {cell.id} ({seconds:.1f}s)",
            highlight=False,
            soft_wrap=True,
        )
        self.progress.advance(self.overall)


def run(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    console = Console()
    if args.list:
        for line in plan.listing():
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        return 0
    if not plan.cells:
        assert plan.shard is not None  # only a share can be empty
        console.print(
            f"shard {plan.shard.label}: no cells (the plan has {len(plan.shard.plan)}); "
            "writing an empty results directory for the merge",
            markup=False,
        )
    argv = sys.argv[1:]  # as typed, global options and "run" included
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        build = progress.add_task("guest image", total=None)
        images = CellImages()
        images.prepare(
            plan.cells,
            lambda what: progress.update(build, description=f"guest image: {what}"),
        )
        progress.remove_task(build)
        outcome = run_plan(
            plan,
            command=command_line(argv),
            images=images,
            observer=_Display(progress, len(plan.cells), console),
            jobs=args.jobs,
            keep_images=KeepImages(args.keep_images),
        )
    print_results(outcome.results, console)
    out = Path(plan.out)
    console.print(
        f"reports: {out / 'report.html'}, report.md, junit.xml, results.json", markup=False
    )
    if outcome.interrupted:
        return 130
    return 0 if outcome.results.ok else 1
