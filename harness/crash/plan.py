"""A run's plan: the scenarios, validated, and the cells to run, in order, and where.

`make_plan` is what `powercut run` (harness/commands/run.py) and the tests
build; `harness.crash.runner.run_plan` runs it cell by cell
(`harness.crash.cell_run`), and docs/architecture.md follows one cell from
here to its verdict.

`--shard K/N` keeps share K of N of the cells, so N CI jobs run one plan
between them (`powercut report --merge` joins their results). The split is
deterministic — every job computes the same one from the same command
line — and balanced by expected duration: the longest cells first, each to
the share with the least so far. A cell's expected duration is its time in
an earlier run's results.json when one is given (`--durations`), else an
estimate from what it does (`expected_seconds`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shlex
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.durability.contract import CacheMode, FaultModel
from harness.errors import ConfigError
from harness.report.results import CellKey, ScenarioRef, Shard, load_results
from harness.scenario.cells import Cell, expand_all
from harness.scenario.model import Scenario, TriggerKind
from harness.scenario.parse import load_scenario
from harness.scenario.shipped import resolve_scenario
from harness.vm.spec import Accel

# Expected seconds of a cell's parts (TCG on 2 cores, from benchmarks/results/matrix-*.json);
# only their ratios matter, for balancing shards.
BOOT_SECONDS = 8.0
CHECK_SECONDS = {"fio-verify": 6.0}
DEFAULT_CHECK_SECONDS = 3.0
SECONDS_PER_ACK = {"ack-records": 0.02, "ext4-metadata": 0.03}
SECONDS_PER_FLUSH = 0.05
UNTIMED_SECONDS = 15.0  # a cut after the workload exits: unknown, call it this


def key(cell: Cell) -> CellKey:
    return CellKey(cell.scenario, cell.id)


def expected_seconds(cell: Cell) -> float:
    """What the cell should take, from its boots, its cut moment and its check."""
    boots = 1 if cell.fault is FaultModel.BACKEND_CRASH else 2
    kind = cell.cut.kind
    if kind.timed:
        workload = cell.cut_at
    elif kind is TriggerKind.AFTER_ACKED_WRITES:
        workload = cell.cut_at * SECONDS_PER_ACK.get(cell.workload.kind, 0.02)
    elif kind is TriggerKind.AFTER_FLUSHES:
        workload = cell.cut_at * SECONDS_PER_FLUSH
    else:
        workload = UNTIMED_SECONDS
    check = CHECK_SECONDS.get(cell.workload.kind, DEFAULT_CHECK_SECONDS)
    return boots * BOOT_SECONDS + workload + check


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` with 1 <= K <= N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ConfigError(f"--shard {text!r}: write K/N, e.g. --shard 1/4 (share 1 of 4)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise ConfigError(f"--shard {text}: N must be at least 1")
    if not 1 <= index <= count:
        raise ConfigError(
            f"--shard {text}: K must be between 1 and N ({count}); shares are numbered from 1"
        )
    return index, count


def shard_cells(
    cells: Sequence[Cell],
    index: int,
    count: int,
    durations: Mapping[CellKey, float] | None = None,
) -> tuple[Cell, ...]:
    """Share `index` (1-based) of `count`: every cell is in exactly one share.

    Longest expected first, each to the share with the least expected time
    so far (ties: the lower share); the share keeps the plan's order.
    """
    durations = durations or {}

    def seconds(cell: Cell) -> float:
        return durations.get(key(cell), expected_seconds(cell))

    order = sorted(range(len(cells)), key=lambda i: (-seconds(cells[i]), i))
    load = [0.0] * count
    owner: dict[int, int] = {}
    for i in order:
        share = min(range(count), key=lambda s: (load[s], s))
        owner[i] = share
        load[share] += seconds(cells[i])
    return tuple(c for i, c in enumerate(cells) if owner[i] == index - 1)


def durations_from(path: str | Path) -> dict[CellKey, float]:
    """Each cell's total seconds in an earlier run (`--durations DIR|results.json`)."""
    results = load_results(path)
    return {
        CellKey(c.scenario, c.id): c.total_seconds
        for c in results.cells
        if c.total_seconds > 0 and c.verdict != "skipped"
    }


def scenario_ref(scenario: Scenario) -> ScenarioRef:
    try:
        digest: str | None = hashlib.sha256(Path(scenario.path).read_bytes()).hexdigest()
    except OSError:
        digest = None
    return ScenarioRef(scenario.name, scenario.path, digest)


@dataclass(frozen=True)
class RunPlan:
    scenarios: tuple[Scenario, ...]
    cells: tuple[Cell, ...]
    out: Path
    accel: Accel | None  # the one asked for; None: auto (the run resolves it once)
    seed: int | None
    repeat: int | None
    shard: Shard | None = None

    @property
    def scenario_refs(self) -> tuple[ScenarioRef, ...]:
        return tuple(scenario_ref(s) for s in self.scenarios)

    @property
    def planned(self) -> tuple[CellKey, ...]:
        return tuple(key(c) for c in self.cells)

    def reproduce(self, cell: Cell) -> str:
        """The cell's reproduce command; names the accelerator when one was forced."""
        return cell.reproduce_command(out=str(self.out / "repro"), accel=self.accel)

    def cell_directory(self, index: int, cell: Cell) -> Path:
        """Where cell number `index` keeps its artifacts (logs, write log, journal).

        Artifact paths in results.json are relative to `out`, so a results
        directory can be moved or archived whole.
        """
        return self.out / "cells" / f"{index:03d}-{cell_slug(cell)}"

    def listing(self) -> list[str]:
        return [f"{c.scenario}: {c.id}  seed={c.seed}" for c in self.cells]


def cell_slug(cell: Cell) -> str:
    """A file name for a cell: its scenario and id, with anything but [A-Za-z0-9_.-] as '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{cell.scenario}_{cell.id}")


def make_plan(
    scenarios: Sequence[str | Path],
    out: str | Path,
    *,
    modes: Sequence[CacheMode] | None = None,
    seed: int | None = None,
    repeat: int | None = None,
    cell: str | None = None,
    accel: Accel | None = None,
    kernel: str | Path | None = None,
    modules: str | Path | None = None,
    shard: str | tuple[int, int] | None = None,
    durations: Mapping[CellKey, float] | None = None,
) -> RunPlan:
    """Load and validate every scenario, then expand the cells the options select.

    A scenario is a file, or the name of a shipped one (`matrix`). `kernel`
    (and `modules`) replace every scenario's own kernel. `shard` ("K/N")
    keeps share K of N (see the module docstring); a share may be empty.
    """
    split = parse_shard(shard) if isinstance(shard, str) else shard
    loaded = tuple(
        _with_kernel(load_scenario(resolve_scenario(p)), kernel, modules) for p in scenarios
    )
    if seed is not None and seed < 0:
        raise ConfigError(f"--seed must be >= 0, not {seed}")
    chosen = list(modes) if modes else None
    cells = tuple(expand_all(loaded, seed=seed, modes=chosen, repeat=repeat, cell=cell))
    if not cells:
        wanted = ", ".join(m.value for m in chosen or [])
        raise ConfigError(f"no cells to run: the scenarios have no cell in mode(s) {wanted}")
    keys = [key(c) for c in cells]
    duplicates = sorted(str(k) for k, n in Counter(keys).items() if n > 1)
    if duplicates:
        raise ConfigError(
            f"two scenarios share a name, so their cells would be confused: {duplicates[0]}; "
            "give each scenario its own `name`"
        )
    plan_shard = None
    if split is not None:
        plan_shard = Shard(split[0], split[1], tuple(keys))
        cells = shard_cells(cells, split[0], split[1], durations)
    return RunPlan(loaded, cells, Path(out), accel, seed, repeat, plan_shard)


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
