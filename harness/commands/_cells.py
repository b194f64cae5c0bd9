"""What `powercut run` and `powercut explore` both ask for: scenarios, and which of their cells.

Both commands turn scenario files into the same cells (`harness.crash.plan`),
so the options that choose them are defined once, here, and mean the same
in both: `--mode`, `--seed`, `--cell`, `--accel`, `--kernel`, `--modules`,
`--list` and `--out`. This is where their words become values — a
`CacheMode` per `--mode`, an `Accel` or None (auto) for `--accel` — and
nothing below the command reads the words again.

`--cell ID` names a cell by its id as `powercut run` lists it or by its
exploration id as `powercut explore` lists it (the fault folded to
`explore`), or a prefix of whole parts of either: `--cell writeback/`
(`harness.scenario.cells.Cell.named`).

Not a command itself (its name starts with `_`, so the dispatcher skips it).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from harness.crash.plan import RunPlan, make_plan
from harness.durability.contract import VALID_MODES, CacheMode, parse_cache_mode
from harness.errors import ConfigError
from harness.vm.accel import ACCEL_CHOICES, parse_accel

SHIPPED = "scenario files (TOML), or names of shipped scenarios (matrix, guest-crash, ...)"


def add_cell_arguments(parser: argparse.ArgumentParser, *, scenarios: str, out: str) -> None:
    """The scenarios and the options that choose their cells; `scenarios` and `out` are the
    help of the positional SCENARIO and of `--out`, which say what each command does with
    them."""
    parser.add_argument("scenarios", nargs="+", metavar="SCENARIO", help=scenarios)
    parser.add_argument("--out", metavar="DIR", help=out)
    parser.add_argument(
        "--mode",
        action="append",
        metavar="M",
        dest="modes",
        help=f"only these cache modes (repeatable; {VALID_MODES})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="scenario seed (overrides the files'; every cell's seed derives from it)",
    )
    parser.add_argument(
        "--cell",
        metavar="ID",
        help="only the cell with this id (as `powercut run --list` or `powercut explore --list` "
        "shows it), or the cells under this id prefix (e.g. writeback/)",
    )
    parser.add_argument(
        "--accel",
        choices=ACCEL_CHOICES,
        default="auto",
        help="QEMU accelerator: kvm, tcg, or auto (kvm when it works)",
    )
    parser.add_argument(
        "--kernel",
        metavar="PATH",
        help="boot every guest on this kernel (bzImage or vmlinux) instead of the scenarios' own",
    )
    parser.add_argument(
        "--modules",
        metavar="DIR",
        help="the --kernel's lib/modules/VERSION tree (when its drivers are modules)",
    )
    parser.add_argument("--list", action="store_true", help="list the cells and exit")


def cache_modes(names: Sequence[str] | None) -> list[CacheMode] | None:
    """`--mode` values as cache modes (QEMU's names: off is none); None: every mode."""
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


def plan_from_cell_arguments(
    args: argparse.Namespace, *, out_required: str, **options: Any
) -> RunPlan:
    """The plan `add_cell_arguments`' options ask for; `options` are the command's own
    (`make_plan`'s `repeat`, `shard`, `durations`). `out_required` is the error when `--out`
    is missing and `--list` not given."""
    if args.out is None and not args.list:
        raise ConfigError(out_required)
    return make_plan(
        args.scenarios,
        args.out if args.out is not None else ".",  # --list writes nothing
        modes=cache_modes(args.modes),
        seed=args.seed,
        cell=args.cell,
        accel=parse_accel(args.accel),
        kernel=args.kernel,
        modules=args.modules,
        **options,
    )
