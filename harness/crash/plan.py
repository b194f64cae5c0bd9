"""`powercut run`'s command line and the plan it stands for.

The runner command (`harness/commands/run.py`) registers these arguments and
turns them into a `RunPlan`: the scenarios, validated, and the cells to run,
in order. Everything a runner needs per cell then comes from the pieces
below, which know nothing of VMs:

    plan = plan_from_args(args)                       # scenarios + cells
    for cell in plan.cells:
        expected = verdict.expected_for_cell(cell)    # contract; .oracle_mode for the oracle
        ... start backend (powerfail + log-writes; cell.scenario's blkdebug rules),
        ... boot, run cell.workload (workloads.ackrecords/fsmeta/fio command lines,
        ... seeded with cell.seed), cut per cell.cut / cell.cut_at,
        ... apply the cut offline (cell.policy, cell.policy_seed), reboot, run cell.checkers
        observed = verdict.Observed(oracle=..., ack_records=..., ...)
        result = report.results.cell_result(cell, verdict.judge(expected, observed), observed,
                                             timings=..., artifacts=...,
                                             reproduce=plan.reproduce(cell))
    report.render.render_all(report.results.run_results(results, ...), plan.out)
    return 0 if run_results.ok else 1
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.crash.matrix import Cell, expand_all
from harness.crash.scenario import Scenario, load_scenario
from harness.durability.contract import VALID_MODES, CacheMode, parse_cache_mode
from harness.errors import ConfigError

ACCELS = ("auto", "kvm", "tcg")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """`powercut run SCENARIO... --out DIR [--mode M] [--seed S] [--repeat N] [--accel A]`.

    Plus `--cell ID` (one cell or an id prefix, what reproduce commands use)
    and `--list` (print the cells, run nothing).
    """
    parser.add_argument("scenarios", nargs="+", metavar="SCENARIO", help="scenario files (TOML)")
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="results directory: results.json, junit.xml, report.html, logs",
    )
    parser.add_argument(
        "--mode",
        action="append",
        metavar="M",
        dest="modes",
        help="only these cache modes (repeatable; writeback, none/off, writethrough, "
        "directsync, unsafe)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="scenario seed (overrides the files'; every cell's seed derives from it)",
    )
    parser.add_argument(
        "--repeat", type=int, metavar="N", help="repetitions per cell (overrides the files')"
    )
    parser.add_argument(
        "--accel",
        choices=ACCELS,
        default="auto",
        help="QEMU accelerator: kvm, tcg, or auto (kvm when it works)",
    )
    parser.add_argument(
        "--cell", metavar="ID", help="only the cell with this id, or the cells under this id prefix"
    )
    parser.add_argument("--list", action="store_true", help="list the cells and exit")


@dataclass(frozen=True)
class RunPlan:
    scenarios: tuple[Scenario, ...]
    cells: tuple[Cell, ...]
    out: Path
    accel: str
    seed: int | None
    repeat: int | None

    def reproduce(self, cell: Cell) -> str:
        """The cell's reproduce command; names the accelerator when one was forced."""
        accel = None if self.accel == "auto" else self.accel
        return cell.reproduce_command(out=str(self.out / "repro"), accel=accel)

    def cell_directory(self, index: int, cell: Cell) -> Path:
        """Where cell number `index` keeps its artifacts (logs, write log, journal).

        Artifact paths in results.json are relative to `out`, so a results
        directory can be moved or archived whole.
        """
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{cell.scenario}_{cell.id}")
        return self.out / "cells" / f"{index:03d}-{slug}"

    def listing(self) -> list[str]:
        return [f"{c.scenario}: {c.id}  seed={c.seed}" for c in self.cells]


def _modes(names: Sequence[str] | None) -> list[CacheMode] | None:
    if not names:
        return None
    modes = []
    for name in names:
        try:
            modes.append(parse_cache_mode(name))
        except ConfigError:
            raise ConfigError(
                f"--mode {name!r} is not a cache mode; valid: {VALID_MODES}"
            ) from None
    return modes


def plan_from_args(args: argparse.Namespace) -> RunPlan:
    """Load and validate every scenario, then expand the cells the options select."""
    scenarios = tuple(load_scenario(p) for p in args.scenarios)
    if args.seed is not None and args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, not {args.seed}")
    modes = _modes(args.modes)
    cells = tuple(
        expand_all(scenarios, seed=args.seed, modes=modes, repeat=args.repeat, cell=args.cell)
    )
    if not cells:
        wanted = ", ".join(m.value for m in modes or [])
        raise ConfigError(f"no cells to run: the scenarios have no cell in mode(s) {wanted}")
    return RunPlan(scenarios, cells, Path(args.out), args.accel, args.seed, args.repeat)


def command_line(argv: Sequence[str]) -> str:
    """The command as it was typed, for results.json."""
    return shlex.join(["powercut", *argv])
