"""One cluster cell's exploration: record every node once, check combinations of their states.

The engine's half is harness/explore/cluster.py (cluster points on one clock,
the sample, the shrinking); this is the half with real guests, built from a
cluster cell's own pieces (`ClusterCellRunner`) and a single guest's
exploration's (`RecordingSession`, `AckClock`, `StateBuilder`):

1. record (`ClusterRecorder`): the cluster runs as `powercut run` runs it —
   boot, setup, start, ready, the client's workload to the cut moment — with
   every node's disk a `RecordingSession` (its base copied after mkfs, its
   write log keeping the data) and the client's acknowledgements stamped on
   the host's CLOCK_MONOTONIC as they arrive (`AckClock`), the clock every
   node's log is stamped with. At the cut moment every node loses power at
   one instant (every disk frozen, then every QEMU killed) and nothing is
   reverted: each node's recording ends there;
2. states (`cluster_states`): at each acknowledgement and at the end, one
   state per node by its own cache mode's contract; all-lose-all and
   all-keep-all at every point first, then seeded mixes, within `max-states`.
   The scenario's scope folds away (a node that kept power is its keep-all);
3. check (`StateCheck`): every node boots at once on its state — the
   recording's base under a `crash-state` node with the state's delta, so
   nothing is copied and the base is never written — and the cluster's
   `start` runs on each, `ready` on the client, then the client's `check`
   with the acknowledgements received by that point; the cell's timeout
   bounds each state. The cluster's verdict rules judge it
   (`judge_cluster`); a state whose nodes could not boot, get ready or be
   checked is unjudged, counted and named, never a pass;
4. shrink (`minimize_cluster_state`): the first failing states, nodes first,
   then their writes, within `minimize-checks` cluster checks each;
5. the cell's `CellRecord` with its `ClusterRecord`, in explore.json as it goes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.block.options import format_dotted
from harness.crash.cell_run import _Guest
from harness.crash.cluster_run import ClusterCellRunner
from harness.crash.cluster_verdict import NodeJudgement, cluster_expectation, judge_cluster
from harness.crash.explorer.cell import CellExploration, recording_record
from harness.crash.explorer.progress import Phase, Progress, ProgressCallback
from harness.crash.explorer.record import RecordingSession, RunAsOf
from harness.crash.explorer.run import ExploreDoc
from harness.crash.session import CrashSession
from harness.durability.contract import CutPolicy, FaultModel, Promise, Verdict, promise
from harness.durability.writelog import read_log
from harness.errors import ConfigError, GuestError, PowercutError
from harness.explore.cluster import (
    ClusterBounds,
    ClusterState,
    ClusterTimeline,
    cluster_states,
    minimize_cluster_state,
)
from harness.explore.doc import (
    CellRecord,
    CellStatus,
    ClusterRecord,
    ClusterShrunk,
    ClusterStateRecord,
    PhaseSeconds,
    StateVerdict,
)
from harness.explore.overlay import StateBuilder
from harness.explore.recording import Recording, acks_from_times, write_recording
from harness.explore.spec import ExploreSpec
from harness.explore.states import disk_promise
from harness.guest.ssh import SSHSession
from harness.scenario.cells import Cell
from harness.scenario.cluster import NodeSpec
from harness.scenario.model import DiskSpec, Expectation
from harness.vm.cluster import kill_at_once
from harness.vm.image import GuestImage
from harness.vm.network import NetworkPlan, PrivateNetwork
from harness.vm.spec import Accel, MachineSpec
from harness.workloads.base import Observation, Run
from harness.workloads.stream import AckClock, StreamRun, TokenStream

log = logging.getLogger(__name__)

FAULT = FaultModel.HOST_POWER_CUT


@dataclass(frozen=True)
class RecordedCluster:
    """Every node's recording and the client's acknowledgements on the host's clock."""

    recordings: dict[str, Recording]
    stamps: tuple[tuple[str, int], ...]  # (token, CLOCK_MONOTONIC ns), as they arrived
    token_pattern: str
    stream_name: str
    timings: dict[str, float]


class ClusterRecorder(ClusterCellRunner):
    """Runs a cluster cell to its cut moment with every node's disk recorded."""

    session_type = RecordingSession

    def record(self) -> RecordedCluster:
        cell = self.cell
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        rundir = Path(tempfile.mkdtemp(prefix="pc-"))
        network: PrivateNetwork | None = None
        try:
            refusal = self.workload.refuse(timed_cut=cell.cut.kind.timed, fault=cell.fault)
            if refusal:
                raise ConfigError(refusal)
            if self.accel is None:
                raise ConfigError("a cluster cell needs the run's accelerator, resolved once")
            with self.timer.phase("prepare"):
                network = PrivateNetwork(NetworkPlan.of(self.spec.names), rundir / "net")
                self._sessions(network, self.accel)
            return self._record(network)
        finally:
            self._close(network, rundir)

    def _record(self, network: PrivateNetwork) -> RecordedCluster:
        cell = self.cell
        names = list(self.spec.names)
        self.on_phase("boot")
        with self.timer.phase("boot"):
            for name in names:
                self.sessions[name].backend.start()
            self._boot(network, names)
            self._on_nodes(names, lambda n, ssh: self._bring_up(n, ssh, first=True))
            self._wait_ready()
        client = self.sessions[self.spec.client_node]
        guest = _Guest(client, self.directory, self.deadline)
        clock = AckClock()
        self.on_phase("record")
        with self.timer.phase("workload"):
            run = self.workload.start(guest, cell.seed, cell.fault)
            clock.attach(run)
            self._wait_for_cut(client, run)
            if failure := run.failure():
                raise GuestError(f"the client failed before the cut: {failure}")
        self.on_phase("cut")
        with self.timer.phase("cut"):
            # Every node at one instant: every disk frozen, then every QEMU killed; the
            # recording keeps what each disk was told, and reverts nothing.
            for name in names:
                self.sessions[name].backend.freeze()
            machines = {n: s.machine for n, s in self.sessions.items()}
            kill_at_once(machines, names)
            for name in names:
                self.sessions[name].backend.kill()
            run.after_cut(30)
            stamps = tuple(clock.finish(run))
        inner = run.stream.stream if isinstance(run, StreamRun) else None
        inner = getattr(inner, "inner", inner)
        if not isinstance(inner, TokenStream):
            raise ConfigError(
                "a cluster's client must acknowledge tokens (a command workload) to be explored"
            )
        recordings = {}
        for name in names:
            session = self.sessions[name]
            assert isinstance(session, RecordingSession)
            wlog = read_log(session.write_log)
            recordings[name] = write_recording(
                session.recording_dir,
                mode=session.mode,
                acks=acks_from_times(wlog, stamps),
                extra={
                    "cell": cell.id,
                    "scenario": cell.scenario,
                    "node": name,
                    "cluster_acks": [list(s) for s in stamps],
                    "token_pattern": inner.pattern.pattern,
                },
            )
        return RecordedCluster(
            recordings,
            stamps,
            inner.pattern.pattern,
            inner.name,
            self.timer.total(),
        )


class OverlaySession(CrashSession):
    """A node booted on one crash state: the recording's base (never written) under a
    `crash-state` node with the state's delta; what the guest writes stays in memory."""

    def __init__(
        self,
        directory: Path,
        image: GuestImage,
        spec: DiskSpec,
        recording: Recording,
        delta: Path,
        *,
        accel: Accel | None,
        memory_mib: int,
        name: str,
        machine_spec: Callable[[MachineSpec], MachineSpec],
    ) -> None:
        self._prepare(directory, image, recording.mode, spec, "disk.img")
        try:
            self.disk = recording.base
            self.socket = self.rundir / "disk.sock"
            graph = {
                "driver": "crash-state",
                "delta": str(delta),
                "file": {"driver": "file", "filename": str(recording.base)},
            }
            self.backend = self.serve(format_dotted(graph))
            self._start_machine(self.backend.disk(), accel, memory_mib, name, machine_spec)
        except BaseException:
            shutil.rmtree(self.rundir, ignore_errors=True)
            raise


class StateCheck(ClusterCellRunner):
    """Boots every node on its state of one cluster state and runs the client's check."""

    def __init__(
        self,
        cell: Cell,
        directory: Path,
        image: GuestImage,
        *,
        accel: Accel,
        recordings: dict[str, Recording],
        deltas: dict[str, Path],
    ) -> None:
        super().__init__(cell, directory, image, accel=accel, out=directory, reproduce="")
        self.recordings = recordings
        self.deltas = deltas

    def _session(
        self, node: NodeSpec, accel: Accel, machine_spec: Callable[[MachineSpec], MachineSpec]
    ) -> CrashSession:
        return OverlaySession(
            self.directory / node.name,
            self.image,
            self.cell.disk,
            self.recordings[node.name],
            self.deltas[node.name],
            accel=accel,
            memory_mib=self.spec.memory_mib,
            name=node.name,
            machine_spec=machine_spec,
        )

    def check(self, run_for: Callable[[SSHSession], Run]) -> tuple[Observation | None, str]:
        """The client's observation, or None and why the state could not be judged."""
        self.directory.mkdir(parents=True, exist_ok=True)
        rundir = Path(tempfile.mkdtemp(prefix="pc-"))
        network: PrivateNetwork | None = None
        names = list(self.spec.names)
        try:
            assert self.accel is not None
            network = PrivateNetwork(NetworkPlan.of(self.spec.names), rundir / "net")
            self._sessions(network, self.accel)
            for name in names:
                self.sessions[name].backend.start()
            self._boot(network, names)
            self._on_nodes(names, lambda n, ssh: self._bring_up(n, ssh, first=False))
            self._wait_ready()
            client = self.sessions[self.spec.client_node]
            guest = _Guest(client, self.directory, self.deadline)
            return self.workload.check(guest, self.cell.seed, run_for(client.ssh)), ""
        except PowercutError as exc:
            return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
        finally:
            for session in self.sessions.values():
                with contextlib.suppress(PowercutError, OSError):
                    session.power_off()
            self._close(network, rundir)


def client_as_of(recorded: RecordedCluster, acked: int) -> Callable[[SSHSession], Run]:
    """The client's run as it stood when it had received `acked` acknowledgements."""

    def run_for(ssh: SSHSession) -> Run:
        stream = TokenStream(re.compile(recorded.token_pattern), recorded.stream_name)
        stream.tokens = [t for t, _ns in recorded.stamps[:acked]]
        return RunAsOf(stream, ssh, FAULT)

    return run_for


class ClusterExplorer:
    """Explores one cluster cell: record, sample, check by booting every node, shrink."""

    def __init__(
        self,
        cell: Cell,
        spec: ExploreSpec,
        directory: Path,
        image: GuestImage | None,
        *,
        out: Path,
        index: int,
        max_states: int | None = None,
        accel: Accel | None = None,
        doc: ExploreDoc | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        if cell.cluster is None:
            raise ConfigError(f"cell {cell.id} is not a cluster cell")
        self.cell = cell
        self.cluster = cell.cluster
        self.spec = spec if max_states is None else spec.with_budget(max_states)
        self.directory = Path(directory).resolve()
        self.image = image
        self.out = Path(out)
        self.index = index
        self.accel = accel
        self.on_progress = on_progress or (lambda _p: None)
        self.seed = spec.seed if spec.seed is not None else cell.seed
        self.negative = cell.expect is Expectation.VIOLATION
        self.modes = {n.name: n.mode_in(cell.mode) for n in self.cluster.nodes}
        self.keep: dict[str, Promise] = {n: disk_promise(m) for n, m in self.modes.items()}
        self.record = recording_record(
            cell,
            index=index,
            seed=self.seed,
            explore=self.spec,
            cluster=ClusterRecord(nodes={n: m.value for n, m in self.modes.items()}, recordings={}),
        )
        self.states: list[ClusterStateRecord] = []
        self.seconds = PhaseSeconds()
        self.check_seconds = 0.0
        self.doc = doc
        if doc is not None:
            doc.add_cell(self.snapshot)

    # -- the record as it stands -----------------------------------------------------------

    def snapshot(self) -> CellRecord:
        assert self.record.cluster is not None
        checked = [s for s in self.states if s.seconds]
        per_s = round(len(checked) / self.check_seconds, 5) if self.check_seconds else None
        cluster = dataclasses.replace(
            self.record.cluster, states=tuple(self.states), states_per_s=per_s
        )
        return dataclasses.replace(
            self.record,
            cluster=cluster,
            counts=cluster.counts(round(self.check_seconds, 3)),
            seconds=self.seconds,
        )

    def _save(self) -> None:
        if self.doc is not None:
            self.doc.save(force=True)

    def _set(self, **values: Any) -> None:
        self.record = dataclasses.replace(self.record, **values)
        self._save()

    def _progress(self, phase: Phase, checked: int = 0, planned: int = 0) -> None:
        failing = sum(1 for s in self.states if s.failed)
        unjudged = sum(1 for s in self.states if s.unjudged)
        self.on_progress(Progress(self.record.id, phase, 0, 0, checked, planned, failing, unjudged))

    # -- the whole cell --------------------------------------------------------------------

    def run(self) -> CellExploration:
        t0 = time.monotonic()
        try:
            if self.image is None or self.accel is None:
                raise ConfigError("exploring a cluster needs a guest image and an accelerator")
            self._progress(Phase.BOOT)
            recorder = ClusterRecorder(
                self.cell,
                self.directory / "record",
                self.image,
                accel=self.accel,
                out=self.out,
                reproduce="",
                on_phase=lambda p: self._progress(Phase.RECORD if p == "record" else Phase.BOOT),
            )
            recorded = recorder.record()
            self.seconds = dataclasses.replace(self.seconds, record=round(time.monotonic() - t0, 3))
            self.record = dataclasses.replace(self.record, record_timings=recorded.timings)
            self.explore(recorded)
        except PowercutError as exc:
            reason = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("explore %s: %s", self.record.id, reason)
            self._set(status=CellStatus.ERROR, verdict=Verdict.ERROR, reason=reason)
        except KeyboardInterrupt:
            self._set(
                status=CellStatus.INTERRUPTED, verdict=Verdict.ERROR, reason="interrupted (Ctrl-C)"
            )
            raise
        finally:
            self.seconds = dataclasses.replace(self.seconds, total=round(time.monotonic() - t0, 3))
            self._save()
        return CellExploration(self.snapshot(), self.out)

    def explore(self, recorded: RecordedCluster) -> None:
        """Steps 2-5 on the recordings."""
        self.recorded = recorded
        logs = {n: recorded.recordings[n].read_log() for n in self.cluster.names}
        ct = ClusterTimeline(logs, self.keep, recorded.stamps)
        self.ct = ct
        bounds = ClusterBounds(
            max_states=self.spec.max_states,
            per_point=self.spec.states_per_point,
            policies=self.spec.policies,
            seed=self.seed,
            tear_unit=self.spec.tear_unit,
        )
        states = cluster_states(ct, bounds)
        assert self.record.cluster is not None
        cluster = dataclasses.replace(
            self.record.cluster,
            recordings={n: _rel(r.root, self.out) for n, r in recorded.recordings.items()},
            acks=len(recorded.stamps),
            points=len(ct.points),
            writes={n: len(t.writes) for n, t in ct.timelines.items()},
        )
        self.record = dataclasses.replace(self.record, cluster=cluster, status=CellStatus.GUEST)
        self._builders = {
            n: StateBuilder(
                ct.timelines[n], recorded.recordings[n].log, recorded.recordings[n].base
            )
            for n in self.cluster.names
        }
        try:
            t0 = time.monotonic()
            for i, state in enumerate(states):
                self._progress(Phase.GUEST, i, len(states))
                self.states.append(self._judged(state))
                self._save()
            self.seconds = dataclasses.replace(self.seconds, guest=round(time.monotonic() - t0, 3))
            self._set(status=CellStatus.MINIMIZE)
            t0 = time.monotonic()
            self._minimize()
            self.seconds = dataclasses.replace(
                self.seconds, minimize=round(time.monotonic() - t0, 3)
            )
        finally:
            for builder in self._builders.values():
                builder.close()
        self._verdict()

    # -- one state -------------------------------------------------------------------------

    def _check(self, state: ClusterState) -> tuple[Observation | None, str, Path]:
        """Boot every node on its state, check; the observation or why none."""
        assert self.image is not None and self.accel is not None
        where = self.directory / "states" / state.id
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True, exist_ok=True)
        deltas = {}
        for name, node_state in state.nodes:
            deltas[name] = where / f"{name}.delta"
            self._builders[name].delta(node_state, deltas[name])
        checker = StateCheck(
            self.cell,
            where,
            self.image,
            accel=self.accel,
            recordings=self.recorded.recordings,
            deltas=deltas,
        )
        t0 = time.monotonic()
        observed, error = checker.check(client_as_of(self.recorded, state.point.acked))
        self.check_seconds += time.monotonic() - t0
        for delta in deltas.values():
            delta.unlink(missing_ok=True)
        return observed, error, where

    def _judged(self, state: ClusterState) -> ClusterStateRecord:
        t0 = time.monotonic()
        observed, error, where = self._check(state)
        nodes = [
            NodeJudgement(n, m, True, promise(m, FAULT, CutPolicy.RANDOM))
            for n, m in self.modes.items()
        ]
        expected = cluster_expectation(
            list(self.modes.values()), FAULT, CutPolicy.RANDOM, Expectation.CONTRACT
        )
        verdict = judge_cluster(expected, observed, nodes, error)
        failed = observed is not None and bool(observed.loss or observed.corruption)
        lost = tuple(getattr(observed, "lost", ()) or ())
        record = ClusterStateRecord(
            state=state,
            verdict=StateVerdict.FAIL if failed else StateVerdict.PASS,
            contract_broken=verdict.verdict is Verdict.FAIL,
            reason=(verdict.explanation or verdict.reason) if observed is not None else error,
            client=observed.summary() if observed is not None else "",
            lost=lost,
            unjudged="" if observed is not None else (error or "no result"),
            seconds=round(time.monotonic() - t0, 3),
            directory=_rel(where, self.out),
        )
        if not record.failed and not record.unjudged:
            shutil.rmtree(where, ignore_errors=True)  # a pass keeps nothing
            record = dataclasses.replace(record, directory=None)
        return record

    # -- shrinking ---------------------------------------------------------------------------

    def _minimize(self) -> None:
        if self.spec.minimize <= 0:
            return
        target = [i for i, s in enumerate(self.states) if s.contract_broken]
        if not target and self.negative:
            target = [i for i, s in enumerate(self.states) if s.failed]
        target = target[: self.spec.minimize]
        for done, i in enumerate(target):
            self._progress(Phase.MINIMIZE, done, len(target))
            entry = self.states[i]
            try:
                shrunk = self._shrink(entry.state)
            except PowercutError as exc:
                shrunk = ClusterShrunk(error=f"{type(exc).__name__}: {exc}"[:300])
            self.states[i] = dataclasses.replace(self.states[i], minimized=shrunk)
            self._save()

    def _shrink(self, state: ClusterState) -> ClusterShrunk:
        if not state.deviating:
            return ClusterShrunk(note="every node keeps all it wrote: nothing to shrink")
        unjudged = [0]

        def fails(candidate: ClusterState) -> bool:
            observed, error, where = self._check(candidate)
            shutil.rmtree(where, ignore_errors=True)
            if observed is None:
                unjudged[0] += 1  # not judged: taken as not failing, so never shrunk onto
                log.info("shrink %s: not judged: %s", candidate.id, error)
                return False
            return bool(observed.loss or observed.corruption)

        m = minimize_cluster_state(state, fails, max_checks=self.spec.minimize_checks)
        return ClusterShrunk(
            m.state,
            m.nodes,
            m.node_checks,
            m.write_checks,
            len(state.losses),
            len(m.state.losses),
            unjudged[0],
        )

    # -- the verdict -------------------------------------------------------------------------

    def _verdict(self) -> None:
        counts = self.snapshot().counts
        n, failing = counts.states_explored, counts.states_failing
        broken, unjudged = counts.states_breaking_contract, counts.states_unjudged
        allowed = self.spec.unjudged_states
        judged = f"{n} cluster states" if not unjudged else f"{n - unjudged} judged of {n}"
        if self.negative:
            ok = failing > 0
            reason = (
                f"loss detected: {failing} of {n} cluster states lose acknowledged data"
                if ok
                else f"no loss detected in {judged} (a negative control must find some)"
            )
        else:
            ok = broken == 0
            reason = (
                f"all {judged} inside the contract"
                if ok
                else f"{broken} of {n} cluster states break the contract"
            )
        first = next(
            (s for s in self.states if s.contract_broken or (self.negative and s.failed)), None
        )
        if first is not None:
            reason += f"; first: {first.id} ({first.state.describe()}: {first.client})"
            if first.minimized is not None and first.minimized.state is not None:
                reason += f"; shrunk to {first.minimized.state.describe()}"
        verdict = Verdict.PASS if ok else Verdict.FAIL
        conclusive = failing > 0 if self.negative else broken > 0
        if unjudged > allowed and not conclusive:
            verdict = Verdict.ERROR
        if unjudged:
            why = next(s for s in self.states if s.unjudged)
            reason += (
                f"; {unjudged} not judged (unjudged-states allows {allowed}); "
                f"first: {why.id}: {why.unjudged}"
            )
        self._set(status=CellStatus.DONE, verdict=verdict, reason=reason)


def _rel(path: Path, out: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)
