"""`power_cut`: crash tests of your own application, in pytest.

The `power_cut` fixture (harness.pytest_plugin) gives a `PowerCutHelper`:

    def test_my_database_survives_a_host_power_cut(power_cut):
        guest = power_cut.boot(mode="writeback", ext4=True)   # an SSHSession
        guest.check_output("mount /dev/vda /mnt && my-db --dir /mnt/db load 1000")
        cut = power_cut(fault="host", policy="lose-all", seed=7)
        assert cut.ok, cut.oracle.summary()                   # the disk kept its contract
        guest = power_cut.reboot()
        guest.check_output("mount /dev/vda /mnt && my-db --dir /mnt/db verify")

The disk is served by `powercut serve` with log-writes and powerfail (the
runner's `CrashSession`); the cut is applied offline with the policy and
seed; the oracle judges the image against the contract of the mode for
that fault (`harness.durability.contract.reference_promise`) before the guest boots again and
replays its journal. A failing test gets the console and backend logs in
its report.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.crash.cluster_run import runner_for
from harness.crash.explorer.cell import EVIDENCE, CellExploration, CellExplorer, ExploreOptions
from harness.crash.explorer.run import ExploreDoc
from harness.crash.images import CellImages
from harness.crash.session import CrashSession, PowerCut
from harness.durability.contract import (
    CacheMode,
    CutPolicy,
    FaultModel,
    parse_cache_mode,
    parse_fault,
    parse_policy,
)
from harness.errors import ConfigError
from harness.explore.spec import ExploreSpec
from harness.guest.ssh import SSHSession
from harness.report.explore import render_explore
from harness.report.results import CellResult
from harness.scenario.cells import Cell, single_cell
from harness.scenario.cluster import ClusterScope, ClusterSpec, NodeSpec
from harness.scenario.model import (
    BlkdebugRule,
    CutSpec,
    DiskSpec,
    Expectation,
    GuestSpec,
    TriggerKind,
)
from harness.vm.image import GuestImage
from harness.vm.spec import Accel
from harness.workloads.base import OptionValue, Workload
from harness.workloads.command import DEFAULT_ACK, Command
from harness.workloads.filesystem import default_size

log = logging.getLogger(__name__)


class PowerCutHelper:
    """One crash-test guest per test: boot, cut, reboot; closed by the fixture."""

    def __init__(self, image: GuestImage, accel: Accel | None, workdir: Path) -> None:
        self.image = image
        self.accel = accel
        self.workdir = Path(workdir)
        self.session: CrashSession | None = None
        self.cuts: list[PowerCut] = []
        self.results: list[CellResult] = []
        self.explorations: list[CellExploration] = []

    def boot(
        self,
        mode: CacheMode | str = CacheMode.WRITEBACK,
        *,
        disk_size: int = 256 << 20,
        ext4: bool = False,
        directories: tuple[str, ...] = (),
        timeout: float = 180.0,
    ) -> SSHSession:
        """Boot a guest whose /dev/vda is a crash-test disk in cache mode `mode`.

        `ext4=True` makes the filesystem on the host first (so a power cut
        can never revert the mkfs), with `directories` in it.
        """
        if self.session is not None:
            raise ConfigError("power_cut.boot() was already called; use power_cut.reboot()")
        self.session = CrashSession(
            self.workdir / "disk",
            self.image,
            parse_cache_mode(mode),
            DiskSpec("ext4" if ext4 else None, size=disk_size, directories=directories),
            accel=self.accel,
            name="crash",
        )
        return self.session.boot(timeout)

    def _require(self) -> CrashSession:
        if self.session is None:
            raise ConfigError("call power_cut.boot(mode=...) first")
        return self.session

    def __call__(
        self,
        fault: FaultModel | str = "host",
        policy: CutPolicy | str = CutPolicy.LOSE_ALL,
        seed: int = 0,
    ) -> PowerCut:
        """Cut the power now: `fault` "guest" or "host" (then `policy` and `seed` apply).

        Returns the `PowerCut`: `.ok` (the oracle found the image inside the
        contract), `.oracle` (the full report), `.cut` (what was reverted).
        """
        cut = self._require().power_cut(parse_fault(fault), parse_policy(policy), seed)
        self.cuts.append(cut)
        log.info("power cut: %s", cut.oracle.summary() if cut.oracle else cut.fault.value)
        return cut

    def crash_backend(self) -> float:
        """Kill and restart the backend under the running guest; seconds until QEMU is back."""
        return self._require().crash_backend()

    def reboot(self, timeout: float = 180.0) -> SSHSession:
        """Boot the guest again on what the power cut left."""
        return self._require().reboot(timeout)

    @property
    def ssh(self) -> SSHSession:
        return self._require().ssh

    def all_logs(self) -> dict[str, Path]:
        """What the plugin attaches to a failed test's report."""
        logs: dict[str, Path] = {}
        if self.session is not None:
            logs["crash console"] = self.session.machine.console_log.path
            logs["crash backend"] = self.session.backend_log
        for index, result in enumerate(self.results):
            for name in ("console_log", "backend_log", "checks_log"):
                if name in result.artifacts:
                    path = Path(result.artifacts[name])
                    logs[f"cell{index} {name}"] = (
                        path if path.is_absolute() else self.workdir / path
                    )
        for index, exploration in enumerate(self.explorations):
            if exploration.out is not None:
                cell = exploration.out / "cells" / "000"
                for name, what in EVIDENCE:
                    logs[f"explore{index} {what}"] = cell / name
                logs[f"explore{index} explore.json"] = exploration.out / "explore.json"
        return {k: v for k, v in logs.items() if v.exists()}

    def close(self) -> None:
        if self.session is not None:
            self.session.close()

    # -- one whole cell: your workload, the cut, the reboot, the check, the verdict ----------

    def run(
        self,
        workload: Workload,
        *,
        mode: CacheMode | str = CacheMode.WRITEBACK,
        fault: FaultModel | str = "host",
        policy: CutPolicy | str = CutPolicy.LOSE_ALL,
        cut: CutSpec | None = None,
        filesystem: str = "ext4",
        mkfs_options: Sequence[str] = (),
        mount_options: str = "",
        packages: Sequence[str] = (),
        kernel: Path | str | None = None,
        modules: Path | str | None = None,
        guest_files: Mapping[str, Path | str] | None = None,
        disk_size: int | None = None,
        expect: Expectation | str = Expectation.CONTRACT,
        seed: int = 0,
        timeout: float = 600.0,
    ) -> CellResult:
        """Run `workload` as one cell of a scenario would, and return its judged result.

        The defaults cut the power right after the workload's run exits (for a
        `Command`) and lose everything not yet durable. `result.passed`,
        `result.reason` and `result.explanation` say what happened.
        """
        cell = single_cell(
            workload,
            name=self.workdir.name,
            mode=parse_cache_mode(mode),
            fault=parse_fault(fault),
            policy=parse_policy(policy),
            cut=cut,
            disk=DiskSpec(
                filesystem,
                tuple(mkfs_options),
                mount_options,
                size=disk_size or default_size(filesystem),
            ),
            guest=GuestSpec(
                tuple(packages),
                str(Path(kernel).resolve()) if kernel else None,
                str(Path(modules).resolve()) if modules else None,
            ),
            guest_files=tuple((g, str(Path(h).resolve())) for g, h in (guest_files or {}).items()),
            expect=Expectation(expect),
            seed=seed,
            timeout=timeout,
        )
        return self._run_cell(cell)

    # -- many crash states from one recorded run ------------------------------------------

    def explore(
        self,
        workload: Workload,
        *,
        mode: CacheMode | str = CacheMode.WRITEBACK,
        cut: CutSpec | None = None,
        filesystem: str = "ext4",
        mkfs_options: Sequence[str] = (),
        mount_options: str = "",
        packages: Sequence[str] = (),
        guest_files: Mapping[str, Path | str] | None = None,
        disk_size: int | None = None,
        blkdebug: Sequence[Mapping[str, OptionValue]] = (),
        expect: Expectation | str = Expectation.CONTRACT,
        seed: int = 0,
        timeout: float = 600.0,
        max_states: int = ExploreSpec().max_states,
        guest_check: bool = True,
        spec: ExploreSpec | None = None,
        workers: int = 1,
    ) -> CellExploration:
        """Record `workload` once, then check the crash states its mode's contract allows.

        The same exploration `powercut explore` makes of one cell (its
        `[explore]` table is `spec`, or `max_states` and `guest_check`):
        `result.passed`, `result.reason`, `result.failing` and `result.breaking`
        (the states that fail, and those that fail where the contract says they
        must not), `result.replay(state_id, image)` rebuilds one as an image. A
        state whose checks could not run is no pass: `result.unjudged` names
        them, and more than `spec.unjudged_states` of them make the exploration
        an error (`result.passed` is False, `result.record.verdict` ERROR).
        """
        cell = single_cell(
            workload,
            name=self.workdir.name,
            mode=parse_cache_mode(mode),
            fault=FaultModel.HOST_POWER_CUT,
            policy=CutPolicy.LOSE_ALL,
            cut=cut,
            disk=DiskSpec(
                filesystem,
                tuple(mkfs_options),
                mount_options,
                size=disk_size or default_size(filesystem),
                blkdebug=tuple(BlkdebugRule(tuple(rule.items())) for rule in blkdebug),
            ),
            guest=GuestSpec(tuple(packages)),
            guest_files=tuple((g, str(Path(h).resolve())) for g, h in (guest_files or {}).items()),
            expect=Expectation(expect),
            seed=seed,
            timeout=timeout,
        )
        if spec is None:
            spec = ExploreSpec(max_states=max_states, guest_check=guest_check)
        image = CellImages(default=self.image)(cell)
        out = self.workdir / f"explore{len(self.explorations)}"
        doc = ExploreDoc(out, f"(pytest) explore {cell.id}")
        explorer = CellExplorer(
            cell,
            spec,
            out / "cells" / "000",
            image,
            out=out,
            index=0,
            options=ExploreOptions(workers=workers),
            accel=self.accel,
            doc=doc,
        )
        try:
            result = explorer.run()
        finally:
            document = doc.finish()
        render_explore(out, document)
        self.explorations.append(result)
        verdict = result.record.verdict
        log.info("explore %s: %s — %s", cell.id, verdict and verdict.value, result.reason)
        return result

    # -- a cluster: N guests, each on its own powercut disk ------------------------------

    def cluster(
        self,
        run: str,
        check: str,
        start: str,
        *,
        nodes: int | Sequence[str] = 3,
        ready: str | None = None,
        ready_timeout: float = 300.0,
        setup: str | None = None,
        node_modes: Mapping[str, CacheMode | str] | None = None,
        scope: ClusterScope | str = ClusterScope.RACK,
        stagger: float = 1.0,
        client: str | None = None,
        ack: str | None = None,
        mode: CacheMode | str = CacheMode.WRITEBACK,
        fault: FaultModel | str = "host",
        policy: CutPolicy | str = CutPolicy.LOSE_ALL,
        cut: CutSpec | None = None,
        packages: Sequence[str] = (),
        disk_size: int | None = None,
        memory_mib: int = 512,
        expect: Expectation | str = Expectation.CONTRACT,
        seed: int = 0,
        timeout: float = 900.0,
    ) -> CellResult:
        """One cluster cell, as a `[cluster]` scenario's: `start` on every node at every boot,
        `ready` retried on the client node, `run` there (`ack TOKEN` for what the cluster
        acknowledged), the scope's cut, every node back, `check`; judged per node and as a
        cluster (`harness.crash.cluster_verdict`).

            result = power_cut.cluster(run=..., check=..., start=..., nodes=3, scope="rack",
                                       packages=["etcd-server", "etcd-client"])
            assert result.passed, f"{result.reason}: {result.explanation}"
        """
        names = [f"n{i}" for i in range(1, nodes + 1)] if isinstance(nodes, int) else list(nodes)
        modes = {k: parse_cache_mode(v) for k, v in (node_modes or {}).items()}
        unknown = [k for k in modes if k not in names]
        if unknown:
            raise ConfigError(f"node_modes names {unknown}, which are not nodes ({names})")
        spec = ClusterSpec(
            nodes=tuple(NodeSpec(n, modes.get(n)) for n in names),
            start=start,
            ready=ready,
            ready_timeout=ready_timeout,
            setup=setup,
            client=client or names[0],
            scopes=(ClusterScope(scope),),
            stagger=stagger,
            memory_mib=memory_mib,
        )
        workload = Command(run, check, None, ack or DEFAULT_ACK)
        cell = single_cell(
            workload,
            name=self.workdir.name,
            mode=parse_cache_mode(mode),
            fault=parse_fault(fault),
            policy=parse_policy(policy),
            cut=cut or CutSpec(TriggerKind.AFTER_SECONDS, 10.0),
            disk=DiskSpec(size=disk_size or default_size("ext4")),
            guest=GuestSpec(tuple(packages)),
            expect=Expectation(expect),
            seed=seed,
            timeout=timeout,
            cluster=spec,
        )
        return self._run_cell(cell)

    def _run_cell(self, cell: Cell) -> CellResult:
        """Runs `cell` in its own directory as `powercut run` would, its result kept."""
        image = CellImages(default=self.image)(cell)
        index = len(self.results)
        runner = runner_for(
            cell,
            self.workdir / f"cell{index}",
            image,
            accel=self.accel,
            out=self.workdir,
            reproduce=f"(pytest) {cell.id}",
        )
        result = runner.run()
        self.results.append(result)
        log.info("cell %s: %s — %s %s", cell.id, result.verdict, result.reason, result.explanation)
        return result

    def command(
        self,
        run: str,
        check: str,
        *,
        setup: str | None = None,
        ack: str | None = None,
        **cell: Any,
    ) -> CellResult:
        """`run(Command(run, check, setup, ack), **cell)`: your guest commands as the workload."""
        workload = Command(run, check, setup, ack or DEFAULT_ACK)
        return self.run(workload, **cell)


def make_helper(image: Any, accel: Any, name: str) -> PowerCutHelper:
    workdir = Path(tempfile.mkdtemp(prefix=f"powercut-cut-{name[:40]}-"))
    return PowerCutHelper(image, accel, workdir)


def remove_helper(helper: PowerCutHelper, keep: bool) -> None:
    helper.close()
    if keep:
        log.warning("kept the power-cut work dir of a failed test: %s", helper.workdir)
    else:
        shutil.rmtree(helper.workdir, ignore_errors=True)
