"""Expanding scenarios into cells: one cell is one boot, one cut, one verdict.

No VM is needed to know a run's cells: listing, selecting (`--cell`) and
collecting them as test items happens here.

The matrix is modes x faults (x policies) x workloads x cuts x repetitions,
in that order, so that results read mode by mode. Every cell has an id that
names it (`writeback/host-power-cut.lose-all/ack-records/after-200-acked/r0`)
and a seed derived from the scenario seed and that id alone: the same
`--seed` selects the same workload data, cut time and policy choices, and
adding a mode to a scenario does not reshuffle the other cells.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from harness.durability.contract import (
    CacheMode,
    CutPolicy,
    FaultModel,
)
from harness.errors import ConfigError
from harness.scenario.cluster import ClusterScope, ClusterSpec, CutPlan, plan_cut
from harness.scenario.model import (
    CutSpec,
    DiskSpec,
    Expectation,
    FaultSpec,
    GuestSpec,
    Scenario,
    TriggerKind,
    WorkloadSpec,
)
from harness.vm.spec import Accel
from harness.workloads.base import Workload
from harness.workloads.filesystem import default_size

SEED_BITS = 32  # fits fio's randseed, C's uint32 and JSON numbers everywhere
EXPLORE = "explore"  # an exploration id's second part, where a cell id names its fault


@dataclass(frozen=True)
class Cell:
    """Everything the runner needs to run one cell and the verdict needs to judge it."""

    scenario: str  # scenario name
    scenario_path: str
    scenario_seed: int
    mode: CacheMode
    fault: FaultModel
    policy: CutPolicy | None  # host power cut only
    policy_seed: int | None  # host power cut only: the seed the policy draws from
    workload: WorkloadSpec
    cut: CutSpec
    cut_at: float  # the resolved threshold: seconds, acked writes or flushes
    checkers: tuple[str, ...]  # checker names (harness.workloads)
    repetition: int
    seed: int  # the cell's own seed: workload data, cut time, policy
    expect: Expectation
    timeout: float
    image: str = "default"  # guest image recipe
    guest: GuestSpec = field(default_factory=GuestSpec)
    # Its disk: size, filesystem (None: the workload needs none), options, backend, blkdebug.
    disk: DiskSpec = field(default_factory=DiskSpec)
    guest_files: tuple[tuple[str, str], ...] = ()
    label: str = ""  # the workload's part of the id (with its filesystem, when several)
    # A cluster cell: the scenario's `[cluster]`, and which nodes its power fault takes.
    cluster: ClusterSpec | None = None
    scope: ClusterScope | None = None

    @property
    def fault_label(self) -> str:
        return fault_label(self.fault, self.policy, self.scope)

    def cut_plan(self) -> CutPlan:
        """A cluster cell's nodes to cut and when (seeded by the cell's policy seed or seed)."""
        if self.cluster is None or self.scope is None:
            raise ConfigError(f"cell {self.id} is not a cluster cell")
        seed = derive_seed(self.scenario_seed, self.scenario, self.id, "scope")
        return plan_cut(self.scope, self.cluster.names, seed, self.cluster.stagger)

    @property
    def id(self) -> str:
        return cell_id(
            self.mode,
            self.fault_label,
            self.label or self.workload.name,
            self.cut.label,
            self.repetition,
        )

    @property
    def exploration_id(self) -> str:
        """The id `powercut explore` gives the cell: its fault folded away (mode/explore/...).

        Exploration checks every state a host power cut may leave, so the
        cells of one mode, workload, cut and repetition are one exploration.
        """
        return cell_id(
            self.mode, EXPLORE, self.label or self.workload.name, self.cut.label, self.repetition
        )

    def named(self, wanted: str) -> bool:
        """Whether `--cell wanted` selects this cell: its id or its exploration id is
        `wanted`, or starts with `wanted/` (a prefix of whole parts: `writeback/`)."""
        wanted = wanted.rstrip("/")
        return any(
            i == wanted or i.startswith(wanted + "/") for i in (self.id, self.exploration_id)
        )

    def reproduce_command(self, out: str = "results/repro", accel: Accel | None = None) -> str:
        """The one line that runs exactly this cell again."""
        argv = [
            "powercut",
            "run",
            self.scenario_path,
            "--out",
            out,
            "--seed",
            str(self.scenario_seed),
            "--cell",
            self.id,
        ]
        if accel is not None:
            argv += ["--accel", accel.value]
        return shlex.join(argv)


def fault_label(
    fault: FaultModel, policy: CutPolicy | None, scope: ClusterScope | None = None
) -> str:
    """A cell id's second part: the fault, its policy for a host power cut, a cluster's scope."""
    label = f"{fault.value}.{policy.value}" if policy else fault.value
    return f"{label}.{scope.value}" if scope is not None else label


def cell_id(mode: CacheMode, fault: str, workload: str, cut: str, repetition: int) -> str:
    return f"{mode.value}/{fault}/{workload}/{cut}/r{repetition}"


def derive_seed(scenario_seed: int, scenario: str, cell: str, purpose: str = "cell") -> int:
    """A stable seed from the scenario seed and the cell's identity (not its position)."""
    digest = hashlib.sha256(f"{scenario_seed}\0{scenario}\0{cell}\0{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (1 << SEED_BITS)


def expand(
    scenario: Scenario,
    *,
    seed: int | None = None,
    modes: Sequence[CacheMode] | None = None,
    repeat: int | None = None,
) -> list[Cell]:
    """All cells of one scenario. `seed`, `modes` and `repeat` are the CLI overrides."""
    scenario_seed = scenario.seed if seed is None else seed
    repetitions = scenario.repetitions if repeat is None else repeat
    if repetitions < 1:
        raise ConfigError(f"--repeat must be at least 1, not {repetitions}")
    chosen_modes = [m for m in scenario.modes if modes is None or m in modes]
    # Several filesystems are a matrix dimension, named in the workload's part of the id.
    named_fs = len(scenario.disks) > 1
    # A cluster's fault scopes are a matrix dimension after the policy (rack, node, ...).
    scopes: Sequence[ClusterScope | None] = (
        scenario.cluster.scopes if scenario.cluster is not None else (None,)
    )
    cells: list[Cell] = []
    for mode in chosen_modes:
        for fault in scenario.faults:
            policies: Iterable[CutPolicy | None] = fault.policies or (None,)
            for policy in policies:
                for scope in scopes:
                    for workload in scenario.workloads:
                        for disk in disks_for(scenario, workload):
                            label = (
                                f"{workload.name}@{disk.filesystem}"
                                if named_fs and disk.filesystem
                                else workload.name
                            )
                            for cut in workload.cuts or scenario.cuts:
                                for rep in range(repetitions):
                                    cells.append(
                                        _cell(
                                            scenario,
                                            scenario_seed,
                                            mode,
                                            fault.model,
                                            policy,
                                            fault.seed,
                                            workload,
                                            label,
                                            disk,
                                            cut,
                                            rep,
                                            scope,
                                        )
                                    )
    return cells


def disks_for(scenario: Scenario, workload: WorkloadSpec) -> tuple[DiskSpec, ...]:
    """The disks a workload's cells get: one per filesystem, each with the workload's
    directories; one without a filesystem when the workload needs none.

    The one place "this cell's filesystem, or none" is decided; the cell's
    `disk` carries the answer to the runner, the sessions and the image.
    """
    if not workload.workload.needs_filesystem:
        return (dataclasses.replace(scenario.disk, filesystem=None, directories=()),)
    directories = tuple(workload.workload.directories)
    return tuple(dataclasses.replace(d, directories=directories) for d in scenario.disks)


def _cell(
    scenario: Scenario,
    scenario_seed: int,
    mode: CacheMode,
    fault: FaultModel,
    policy: CutPolicy | None,
    fixed_policy_seed: int | None,
    workload: WorkloadSpec,
    label: str,
    disk: DiskSpec,
    cut: CutSpec,
    rep: int,
    scope: ClusterScope | None = None,
) -> Cell:
    """The one place a `Cell` is made (`expand`; `single_cell` goes through it too)."""
    ident = cell_id(mode, fault_label(fault, policy, scope), label, cut.label, rep)
    policy_seed = None
    if policy is not None:
        policy_seed = (
            fixed_policy_seed
            if fixed_policy_seed is not None
            else derive_seed(scenario_seed, scenario.name, ident, "policy")
        )
    return Cell(
        scenario=scenario.name,
        scenario_path=scenario.path,
        scenario_seed=scenario_seed,
        mode=mode,
        fault=fault,
        policy=policy,
        policy_seed=policy_seed,
        workload=workload,
        cut=cut,
        cut_at=cut.resolve(derive_seed(scenario_seed, scenario.name, ident, "cut")),
        checkers=workload.checkers,
        repetition=rep,
        seed=derive_seed(scenario_seed, scenario.name, ident),
        expect=scenario.expect,
        timeout=scenario.timeout,
        image=scenario.image,
        guest=scenario.guest,
        disk=disk,
        guest_files=scenario.guest_files,
        label=label,
        cluster=scenario.cluster,
        scope=scope,
    )


def single_cell(
    workload: Workload,
    *,
    name: str = "test",
    mode: CacheMode = CacheMode.WRITEBACK,
    fault: FaultModel = FaultModel.HOST_POWER_CUT,
    policy: CutPolicy | None = CutPolicy.LOSE_ALL,
    cut: CutSpec | None = None,
    checkers: tuple[str, ...] | None = None,
    disk: DiskSpec | None = None,
    guest: GuestSpec | None = None,
    guest_files: tuple[tuple[str, str], ...] = (),
    expect: Expectation = Expectation.CONTRACT,
    seed: int = 0,
    timeout: float = 600.0,
    cluster: ClusterSpec | None = None,
) -> Cell:
    """One cell without a scenario file (the pytest `power_cut.run`), as `expand` makes it:
    the scenario of that one cell, expanded.

    The default cut is right after the workload's run exits, or after 5 s for
    a workload that cuts itself by time. The default disk is ext4 at its
    default size.
    """
    if cut is None:
        timed = workload.refuse(timed_cut=False, fault=fault) is not None
        cut = CutSpec(TriggerKind.AFTER_SECONDS, 5.0) if timed else CutSpec(TriggerKind.AFTER_EXIT)
    policies = (policy,) if fault is FaultModel.HOST_POWER_CUT and policy else ()
    one = Scenario(
        path=name,
        name=name,
        description="",
        image="default",
        modes=(mode,),
        faults=(FaultSpec(fault, policies),),
        workloads=(WorkloadSpec(workload.kind, workload, checkers or workload.checkers),),
        cuts=(cut,),
        seed=seed,
        expect=expect,
        timeout=timeout,
        disks=(disk or DiskSpec(size=default_size("ext4")),),
        guest=guest or GuestSpec(),
        guest_files=guest_files,
        cluster=cluster,
    )
    cells = expand(one)
    if len(cells) != 1:
        raise ConfigError(f"one cell was asked for, and {len(cells)} were made (one scope only)")
    return cells[0]


_REP = re.compile(r"/r(\d+)$")


def select(
    scenario: Scenario,
    cell: str,
    *,
    seed: int | None = None,
    modes: Sequence[CacheMode] | None = None,
    repeat: int | None = None,
) -> list[Cell]:
    """The cells `--cell` names (`Cell.named`): `powercut run` and `powercut explore` alike.

    A cell id (`writeback/host-power-cut.lose-all/ack-records/after-200-acked/r0`)
    or an exploration id (`writeback/explore/ack-records/after-200-acked/r0`,
    every fault of that mode, workload, cut and repetition), or a prefix of
    whole parts of either (`--cell writeback/` picks a mode). A repetition
    index beyond the scenario's repetitions is honoured, so a reproduce
    command for `r7` works without `--repeat`.
    """
    wanted = cell.rstrip("/")
    match = _REP.search(wanted)
    reps = scenario.repetitions if repeat is None else repeat
    if match:
        reps = max(reps, int(match.group(1)) + 1)
    found = [c for c in expand(scenario, seed=seed, modes=modes, repeat=reps) if c.named(wanted)]
    if not found:
        known = ", ".join(c.id for c in expand(scenario, seed=seed, modes=modes)[:6])
        raise ConfigError(
            f"--cell {cell!r} matches no cell of {scenario.path}; cells look like: {known}, ..."
        )
    return found


def expand_all(
    scenarios: Sequence[Scenario],
    *,
    seed: int | None = None,
    modes: Sequence[CacheMode] | None = None,
    repeat: int | None = None,
    cell: str | None = None,
) -> list[Cell]:
    """The cells of every scenario, in order; `cell` filters by id (see `select`)."""
    cells: list[Cell] = []
    for scenario in scenarios:
        if cell is None:
            cells += expand(scenario, seed=seed, modes=modes, repeat=repeat)
        else:
            try:
                cells += select(scenario, cell, seed=seed, modes=modes, repeat=repeat)
            except ConfigError:
                if len(scenarios) == 1:
                    raise
    if cell is not None and not cells:
        raise ConfigError(f"--cell {cell!r} matches no cell of the given scenarios")
    return cells
