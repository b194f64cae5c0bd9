"""A run's plan: the scenarios, validated, and the cells to run, in order, and where.

`make_plan` is what `powercut run` (harness/commands/run.py) and the tests
build; `harness.crash.runner.run_plan` runs it cell by cell
(`harness.crash.cell_run`), and docs/architecture.md follows one cell from
here to its verdict.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.durability.contract import VALID_MODES, CacheMode, parse_cache_mode
from harness.errors import ConfigError
from harness.scenario.cells import Cell, expand_all
from harness.scenario.model import Scenario
from harness.scenario.parse import load_scenario

ACCELS = ("auto", "kvm", "tcg")


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


def make_plan(
    scenarios: Sequence[str | Path],
    out: str | Path,
    *,
    modes: Sequence[str] | None = None,
    seed: int | None = None,
    repeat: int | None = None,
    cell: str | None = None,
    accel: str = "auto",
    kernel: str | Path | None = None,
    modules: str | Path | None = None,
) -> RunPlan:
    """Load and validate every scenario, then expand the cells the options select.

    `kernel` (and `modules`) replace every scenario's own kernel.
    """
    loaded = tuple(_with_kernel(load_scenario(p), kernel, modules) for p in scenarios)
    if seed is not None and seed < 0:
        raise ConfigError(f"--seed must be >= 0, not {seed}")
    if accel not in ACCELS:
        raise ConfigError(f"--accel {accel!r}: use one of {', '.join(ACCELS)}")
    chosen = _modes(modes)
    cells = tuple(expand_all(loaded, seed=seed, modes=chosen, repeat=repeat, cell=cell))
    if not cells:
        wanted = ", ".join(m.value for m in chosen or [])
        raise ConfigError(f"no cells to run: the scenarios have no cell in mode(s) {wanted}")
    return RunPlan(loaded, cells, Path(out), accel, seed, repeat)


def _with_kernel(
    scenario: Scenario, kernel: str | Path | None, modules: str | Path | None
) -> Scenario:
    if kernel is None:
        if modules is not None:
            raise ConfigError("--modules needs --kernel")
        return scenario
    path = Path(kernel).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"--kernel {kernel}: no such file")
    tree = Path(modules).expanduser().resolve() if modules is not None else None
    if tree is not None and not tree.is_dir():
        raise ConfigError(f"--modules {modules}: not a directory")
    guest = dataclasses.replace(
        scenario.guest, kernel=str(path), modules=str(tree) if tree else None
    )
    return dataclasses.replace(scenario, guest=guest)


def command_line(argv: Sequence[str]) -> str:
    """The command as it was typed, for results.json."""
    return shlex.join(["powercut", *argv])
