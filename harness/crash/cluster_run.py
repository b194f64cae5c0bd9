"""Run one cluster cell: N nodes boot, the client writes, a scope of nodes loses power, all recover.

A cluster cell composes one `CrashSession` per node (each its own disk,
`powercut serve` backend, write log, journal and oracle, in the cell's
directory under the node's name) with the private network of
harness/vm/network.py; it copies none of a session's logic. The sequence:

1. every node's backend starts, every QEMU starts, each is waited for and
   put on the network (`boot_nodes`); on every node, in parallel, the
   fresh filesystem is mounted at /mnt, the cluster's `setup` runs (first
   boot only) and its `start`; `ready` is retried on the client node;
2. the workload (a `command`) runs on the client node: `ack TOKEN` for
   what the cluster acknowledged, each new count on the cell's time line;
3. at the cut moment the scope's nodes lose power (`Cell.cut_plan`): those
   at one instant have every disk frozen first, then every QEMU killed with
   every signal sent before any reap (`kill_at_once`); a staggered cut does
   that node by node, `stagger` seconds apart. A client that kept power is
   stopped. Then each cut node settles (its host's processes die, the
   policy applies with the node's own seed, its oracle judges its disk);
4. every cut node is served again on what its disk kept and rebooted (in
   parallel), mounted and started; the cluster recovers on its own until
   `ready`; the client's `check` runs with its timeout;
5. each disk's verdict and the client's check make the cluster's verdict
   (`harness.crash.cluster_verdict`); the record carries each node side by
   side and the cell's time line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from harness.crash.cell_run import CellRunner, Deadline, SessionFactory, Timer, _Guest
from harness.crash.cluster_verdict import (
    ClusterVerdict,
    NodeJudgement,
    cluster_expectation,
    judge_cluster,
    judge_disk,
)
from harness.crash.record import cluster_result, error_result
from harness.crash.session import CrashSession, PowerCut
from harness.crash.verdict import OracleObservation
from harness.durability.contract import CutPolicy, Promise, promise
from harness.errors import ConfigError, GuestError, PowercutError
from harness.guest.ssh import SSHSession
from harness.report.results import CellResult, NodeResult, TimelineEvent
from harness.scenario.cells import Cell, derive_seed
from harness.scenario.cluster import ClusterSpec, NodeCut, NodeSpec
from harness.scenario.model import TriggerKind
from harness.vm.cluster import boot_nodes, kill_at_once, node_spec
from harness.vm.image import GuestImage
from harness.vm.network import ENV_FILE, NetworkPlan, PrivateNetwork
from harness.vm.spec import Accel, MachineSpec
from harness.workloads import filesystem
from harness.workloads.base import MOUNT, ORACLE, POLL, Observation, Run
from harness.workloads.stream import StreamRun

log = logging.getLogger(__name__)

T = TypeVar("T")

READY_POLL = 1.0  # seconds between two runs of the cluster's `ready`


def node_command(command: str) -> str:
    """`command` as a cluster node runs it: in /mnt, with the node environment."""
    return f". {ENV_FILE} && cd {MOUNT} && {command}"


class ClusterCellRunner:
    """Runs one cluster cell in its directory and returns its `CellResult`."""

    session_type: type[CrashSession] = CrashSession  # what boots each node

    def __init__(
        self,
        cell: Cell,
        directory: Path,
        image: GuestImage,
        *,
        accel: Accel | None,
        out: Path,
        reproduce: str,
        on_phase: Callable[[str], None] | None = None,
    ) -> None:
        if cell.cluster is None:
            raise ConfigError(f"cell {cell.id} is not a cluster cell")
        self.cell = cell
        self.spec: ClusterSpec = cell.cluster
        self.directory = Path(directory).resolve()
        self.image = image
        self.accel = accel
        self.out = Path(out).resolve()
        self.reproduce = reproduce
        self.on_phase = on_phase or (lambda _p: None)
        self.timer = Timer()
        self.deadline = Deadline(cell.timeout)
        self.workload = cell.workload.workload
        self.sessions: dict[str, CrashSession] = {}
        self.timeline: list[TimelineEvent] = []
        self.cut_at: dict[str, float] = {}
        self._t0 = time.monotonic()
        self._closed = False

    # -- the record's clock ------------------------------------------------------------

    def event(self, node: str, what: str) -> None:
        self.timeline.append(TimelineEvent(round(time.monotonic() - self._t0, 3), node, what))

    # -- the cell ----------------------------------------------------------------------

    def run(self) -> CellResult:
        cell = self.cell
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._t0 = time.monotonic()
        rundir = Path(tempfile.mkdtemp(prefix="pc-"))
        network: PrivateNetwork | None = None
        try:
            refusal = self.workload.refuse(timed_cut=cell.cut.kind.timed, fault=cell.fault)
            if refusal:
                raise ConfigError(refusal)
            with self.timer.phase("prepare"):
                accel = self.accel
                if accel is None:  # run_plan, the pytest session and the fixture resolve it
                    raise ConfigError("a cluster cell needs the run's accelerator, resolved once")
                network = PrivateNetwork(NetworkPlan.of(self.spec.names), rundir / "net")
                self._sessions(network, accel)
            verdict, client, cuts = self._run(network)
            self._close(network, rundir)  # the machines' logs join the nodes' directories
            return cluster_result(
                cell,
                verdict,
                client,
                nodes=self._nodes(verdict, cuts),
                timeline=tuple(self.timeline),
                timings=self.timer.total(),
                artifacts=self._artifacts(),
                reproduce=self.reproduce,
            )
        except PowercutError as exc:
            log.warning("cell %s: %s", cell.id, exc)
            self._close(network, rundir)
            result = error_result(
                cell,
                f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
                timings=self.timer.total(),
                artifacts=self._artifacts(),
                reproduce=self.reproduce,
            )
            return dataclasses.replace(result, timeline=tuple(self.timeline))
        finally:
            self._close(network, rundir)

    def _close(self, network: PrivateNetwork | None, rundir: Path) -> None:
        """Every node's machine and backend, then the switch; nothing is left running."""
        if self._closed:
            return
        self._closed = True
        for session in self.sessions.values():
            with contextlib.suppress(PowercutError, OSError):
                session.close()
        if network is not None:
            network.stop()
        shutil.rmtree(rundir, ignore_errors=True)

    def _sessions(self, network: PrivateNetwork, accel: Accel) -> None:
        for node in self.spec.nodes:

            def spec_for(spec: MachineSpec, name: str = node.name) -> MachineSpec:
                return node_spec(spec, network, name)

            self.sessions[node.name] = self._session(node, accel, spec_for)

    def _session(
        self, node: NodeSpec, accel: Accel, machine_spec: Callable[[MachineSpec], MachineSpec]
    ) -> CrashSession:
        """`node`'s session on the private network (`machine_spec`); a subclass boots another."""
        return self.session_type(
            self.directory / node.name,
            self.image,
            node.mode_in(self.cell.mode),
            self.cell.disk,
            accel=accel,
            memory_mib=self.spec.memory_mib,
            name=node.name,
            machine_spec=machine_spec,
        )

    def _run(
        self, network: PrivateNetwork
    ) -> tuple[ClusterVerdict, Observation | None, dict[str, PowerCut]]:
        cell = self.cell
        names = list(self.spec.names)
        self.on_phase("boot")
        with self.timer.phase("boot"):
            for name in names:
                self.sessions[name].backend.start()
                self.event(name, "power on")
            self._boot(network, names)
            self._on_nodes(names, lambda n, ssh: self._bring_up(n, ssh, first=True))
            self._wait_ready()
        client = self.sessions[self.spec.client_node]
        guest = _Guest(client, self.directory, self.deadline)
        self.on_phase("workload")
        with self.timer.phase("workload"):
            run = self.workload.start(guest, cell.seed, cell.fault)
            self.event(self.spec.client_node, "client started")
            self._wait_for_cut(client, run)
            if failure := run.failure():
                raise GuestError(f"the client failed before the cut: {failure}")
        self.on_phase("cut")
        with self.timer.phase("cut"):
            plan = cell.cut_plan()
            cuts = self._cut(plan.nodes, plan.cuts, run)
        self.on_phase("reboot")
        with self.timer.phase("reboot"):
            for name in plan.nodes:
                self.sessions[name].serve_after_cut()
                self.event(name, "power on")
            self._boot(network, list(plan.nodes))
            self._on_nodes(list(plan.nodes), lambda n, ssh: self._bring_up(n, ssh, first=False))
            self._wait_ready()
        self.on_phase("check")
        observed: Observation | None = None
        client_error = ""
        with self.timer.phase("check"):
            try:
                observed = self.workload.check(guest, cell.seed, run)
                self.event(self.spec.client_node, "check: " + observed.summary())
            except PowercutError as exc:
                client_error = f"the client's check could not run: {exc}"
                self.event(self.spec.client_node, client_error)
        verdict = self._judge(cuts, observed, client_error)
        for session in self.sessions.values():
            with contextlib.suppress(PowercutError, OSError):
                session.power_off()
        return verdict, observed, cuts

    # -- boots ---------------------------------------------------------------------------

    def _boot(self, network: PrivateNetwork, names: list[str]) -> None:
        machines = {n: s.machine for n, s in self.sessions.items()}
        boot_nodes(machines, network, names, self.deadline.left(300))
        for name in names:
            self.event(name, "up, on the network")

    def _bring_up(self, name: str, ssh: SSHSession, *, first: bool) -> None:
        """Mount the node's disk at /mnt; on the first boot its setup; at every boot, start."""
        disk = self.cell.disk
        assert disk.filesystem is not None  # a cluster's client is a command: it has one
        if not filesystem.mount(ssh, disk.filesystem, disk.mount_options):
            raise GuestError(
                f"node {name}: could not mount its {disk.filesystem} on {filesystem.DEVICE}; "
                f"see {self.directory / name / 'console.log'}"
            )
        if first:
            filesystem.make_directories(ssh, disk.filesystem, disk.directories)
            for guest_path, host_path in self.cell.guest_files:
                parent = guest_path.rsplit("/", 1)[0] or "/"
                ssh.run(f"mkdir -p {shlex.quote(parent)}", timeout=60, check=True)
                ssh.put(host_path, guest_path, mode=Path(host_path).stat().st_mode & 0o7777)
            setup = self.spec.setup_for(name)
            if setup is not None:
                self._node_run(name, ssh, "setup", setup)
        self._node_run(name, ssh, "start", self.spec.start)

    def _node_run(self, name: str, ssh: SSHSession, what: str, command: str) -> None:
        result = ssh.run(node_command(command), timeout=self.deadline.left(300))
        with open(self.directory / name / f"{what}.log", "a") as f:
            f.write(f"$ {command}  (exit {result.exit_code})\n{result.stdout}{result.stderr}\n")
        if not result.ok:
            raise GuestError(
                f"node {name}: the cluster's {what} exited {result.exit_code}: "
                f"{(result.stderr.strip() or result.stdout.strip())[-300:]}"
            )
        self.event(name, f"{what} done")

    def _wait_ready(self) -> None:
        """Run `ready` on the client node until it exits 0 (the cluster recovered on its own)."""
        if self.spec.ready is None:
            return
        name = self.spec.client_node
        ssh = self.sessions[name].ssh
        end = time.monotonic() + min(self.spec.ready_timeout, self.deadline.left())
        last = ""
        while True:
            result = ssh.run(node_command(self.spec.ready), timeout=self.deadline.left(60))
            if result.ok:
                self.event(name, "cluster ready")
                return
            last = (result.stderr.strip() or result.stdout.strip())[-300:]
            if time.monotonic() > end:
                raise GuestError(
                    f"the cluster was not ready after {self.spec.ready_timeout:.0f}s "
                    f"(field cluster.ready-timeout); ready's last output: {last}"
                )
            time.sleep(READY_POLL)

    def _on_nodes(self, names: list[str], work: Callable[[str, SSHSession], T]) -> dict[str, T]:
        with ThreadPoolExecutor(max(1, len(names))) as pool:
            futures = {n: pool.submit(work, n, self.sessions[n].ssh) for n in names}
            return {n: f.result() for n, f in futures.items()}

    # -- the cut ---------------------------------------------------------------------------

    def _wait_for_cut(self, client: CrashSession, run: Run) -> None:
        cell = self.cell
        trigger = cell.cut.kind
        seen = 0
        base_flushes = client.requests("FLUSH") if trigger is TriggerKind.AFTER_FLUSHES else 0
        while True:
            acked = run.acked()
            if acked != seen:
                seen = acked
                self.event(self.spec.client_node, f"{acked} acked")
            if trigger is TriggerKind.AFTER_EXIT:
                if not run.alive():
                    return
            elif trigger.timed:
                if time.monotonic() - run.started >= cell.cut_at:
                    return
            elif trigger is TriggerKind.AFTER_ACKED_WRITES:
                if acked >= cell.cut_at:
                    return
            elif client.requests("FLUSH") - base_flushes >= cell.cut_at:
                return
            if not run.alive() and trigger is not TriggerKind.AFTER_EXIT:
                log.warning("cell %s: the client ended before the cut moment", cell.id)
                return
            self.deadline.check(f"waiting for the cut ({cell.cut.label})")
            time.sleep(POLL)

    def _cut(
        self, names: tuple[str, ...], plan: tuple[NodeCut, ...], run: Run
    ) -> dict[str, PowerCut]:
        """Each group of nodes at one delay: every disk frozen, then every QEMU killed."""
        cell = self.cell
        machines = {n: s.machine for n, s in self.sessions.items()}
        start = time.monotonic()
        delays = sorted({c.delay for c in plan})
        for delay in delays:
            group = [c.node for c in plan if c.delay == delay]
            with contextlib.suppress(ValueError):
                time.sleep(max(0.0, start + delay - time.monotonic()))
            for name in group:
                self.sessions[name].freeze(cell.fault)
            kill_at_once(machines, group)
            for name in group:
                self.cut_at[name] = round(time.monotonic() - self._t0, 3)
                self.event(name, f"power cut: {cell.fault_label}")
        acked = run.acked()
        if self.spec.client_node not in names and isinstance(run, StreamRun):
            # The client kept power: what it was told after the cut is acknowledged too,
            # and it stops here.
            with contextlib.suppress(PowercutError, OSError):
                self.sessions[self.spec.client_node].ssh.run(run.stop_command, timeout=30)
        run.after_cut(30)
        if run.acked() != acked:
            self.event(self.spec.client_node, f"{run.acked()} acked")
        cuts: dict[str, PowerCut] = {}
        check = ORACLE in cell.checkers
        for name in names:
            cut = self.sessions[name].settle(
                cell.fault, cell.policy or CutPolicy.LOSE_ALL, self._node_seed(name), check=check
            )
            cuts[name] = cut
            if cut.cut is not None:
                self.event(name, cut.cut.summary())
        return cuts

    def _node_seed(self, name: str) -> int:
        cell = self.cell
        return derive_seed(cell.policy_seed or 0, cell.scenario, f"{cell.id}/{name}", "policy")

    # -- the verdict -------------------------------------------------------------------------

    def _judge(
        self, cuts: Mapping[str, PowerCut], client: Observation | None, client_error: str
    ) -> ClusterVerdict:
        cell = self.cell
        nodes = []
        for node in self.spec.nodes:
            mode = node.mode_in(cell.mode)
            cut = cuts.get(node.name)
            disk = None
            if cut is not None and cut.oracle is not None:
                oracle = OracleObservation.from_report(cut.oracle)
                disk = judge_disk(mode, cell.fault, cut.policy, cell.workload, oracle)
            nodes.append(
                NodeJudgement(
                    node.name, mode, cut is not None, promise(mode, cell.fault, cell.policy), disk
                )
            )
        modes = [n.mode for n in nodes if n.cut]
        expected_outcome = cluster_expectation(modes, cell.fault, cell.policy, cell.expect)
        return judge_cluster(expected_outcome, client, nodes, client_error)

    def _nodes(
        self, verdict: ClusterVerdict, cuts: Mapping[str, PowerCut]
    ) -> tuple[NodeResult, ...]:
        out = []
        for node in verdict.nodes:
            cut = cuts.get(node.name)
            out.append(
                NodeResult(
                    name=node.name,
                    mode=node.mode.value,
                    cut=node.cut,
                    verdict=node.disk.verdict.value if node.disk is not None else "not cut",
                    reason=node.summary
                    + (f"; {cut.cut.summary()}" if cut is not None and cut.cut else ""),
                    cut_at=self.cut_at.get(node.name),
                    policy_seed=cut.seed if cut is not None else None,
                    artifacts=self._node_artifacts(node.name),
                )
            )
        return tuple(out)

    def _relative(self, path: Path) -> str:
        p = path.resolve()
        return str(p.relative_to(self.out)) if p.is_relative_to(self.out) else str(p)

    def _node_artifacts(self, name: str) -> dict[str, str]:
        session = self.sessions.get(name)
        files = dict(session.artifacts()) if session is not None else {}
        for log_name in ("setup.log", "start.log"):
            path = self.directory / name / log_name
            if path.exists():
                files[log_name.replace(".", "_")] = path
        return {k: self._relative(p) for k, p in files.items()}

    def _artifacts(self) -> dict[str, str]:
        files = {}
        for name in ("acks.txt", "checks.log", "setup.log", "workload.stderr"):
            path = self.directory / name
            if path.exists():
                files[name.replace(".", "_")] = self._relative(path)
        return files


def node_promises(cell: Cell) -> dict[str, Promise]:
    """What each node's mode promises across the cell's fault (for reports and tests)."""
    assert cell.cluster is not None
    return {
        n.name: promise(n.mode_in(cell.mode), cell.fault, cell.policy) for n in cell.cluster.nodes
    }


def runner_for(
    cell: Cell,
    directory: Path,
    image: GuestImage,
    *,
    accel: Accel | None,
    out: Path,
    reproduce: str,
    on_phase: Callable[[str], None] | None = None,
    session_factory: SessionFactory | None = None,
) -> CellRunner | ClusterCellRunner:
    """The runner of `cell`: a cluster cell's, or a single guest's (with `session_factory`)."""
    if cell.cluster is not None:
        if session_factory is not None:
            raise ConfigError("a cluster cell's sessions are its own: no session_factory")
        return ClusterCellRunner(
            cell, directory, image, accel=accel, out=out, reproduce=reproduce, on_phase=on_phase
        )
    return CellRunner(
        cell,
        directory,
        image,
        accel=accel,
        out=out,
        reproduce=reproduce,
        on_phase=on_phase,
        session_factory=session_factory,
    )
