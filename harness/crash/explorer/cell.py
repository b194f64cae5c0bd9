"""One cell's exploration: record once, then check every crash state its contract allows.

One exploration per cell of a scenario (its fault and policy folded away: every
host power cut the contract allows is a candidate, `harness.crash.explorer.run`):

1. record (`harness.crash.explorer.record`): the workload runs once in a guest,
   to the cell's cut moment, on a disk whose write log keeps the data; the base
   is the image after mkfs; acknowledgements are time-stamped against the log;
2. enumerate (`harness.explore.spec`, `harness.explore.states`): the states the
   disk's promise allows at every persistence point after the workload's run
   started, within the scenario's `[explore]` budget, the runner's own cuts first;
3. host-side (`harness.explore.hostcheck`): the oracle and the filesystem's
   checker with journal recovery on a scratch view of each state, identical
   images once; meanwhile the checker guest boots;
4. in the guest (`harness.crash.explorer.checker`): every state the host passed
   is mounted in the one checker guest and judged by the workload's own `check`
   with the acknowledgements true at its point; identical images at the same
   acknowledgement count are checked once;
5. minimize (`harness.explore.minimize`): the first failing states are shrunk by
   delta debugging over their lost and torn writes (host-side predicate where
   the host failed them, the guest's otherwise), and their writes attributed
   (`harness.explore.attribute`, ext4);
6. the cell's `CellRecord` (`harness.explore.doc`), which the run's explore.json
   takes as it goes, so an interrupted exploration keeps what it checked.

Verdicts, per state (`StateVerdict`): `violation` (the oracle caught the disk
losing what it promised), `fail` (a checker failed while the disk kept its
promise), `pass`. Whether a failure is one the contract forbids is the verdict
module's word (`expected_for`: the oracle and the filesystem checker must find
everything the promise covers; the workload's own check, what it acknowledged
if `keeps_acknowledged`; corruption never), recorded as `contract_broken`. A
cell passes (`Verdict.PASS`) when no state breaks the contract — or, for a
negative control (`expect = "violation"`), when some state fails.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import os
import re
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.crash.explain import explain_state
from harness.crash.explorer.checker import (
    CHECK_ERRORS,
    CHECKER_DIR,
    CheckerGuest,
    GuestCheck,
    file_md5,
)
from harness.crash.explorer.progress import Phase, Progress, ProgressCallback, seconds_left
from harness.crash.explorer.record import RecordedRun, RecordingRunner, runner_cuts
from harness.crash.explorer.run import ExploreDoc
from harness.crash.verdict import Outcome, expected_for
from harness.durability.contract import (
    CutPolicy,
    FaultModel,
    Verdict,
    parse_policy,
    reference_promise,
)
from harness.errors import ConfigError, PowercutError
from harness.explore.attribute import loss_report
from harness.explore.causes import AckRisk, CauseGroup, Explanation, at_risk, group, kept_at
from harness.explore.doc import (
    CellRecord,
    CellStatus,
    Counts,
    ExploredPoint,
    GuestRecord,
    GuestStats,
    Minimized,
    PhaseSeconds,
    RecordingSummary,
    RunnerCut,
    RunnerCuts,
    StateCheck,
    StateRecord,
    StateVerdict,
    Where,
)
from harness.explore.doc import replay as replay_doc
from harness.explore.fileview import FileView
from harness.explore.hostcheck import (
    CheckCache,
    HostChecker,
    HostResult,
    checker_for,
    explore_host,
)
from harness.explore.minimize import minimize_state
from harness.explore.overlay import StateBuilder
from harness.explore.recording import fingerprint
from harness.explore.spec import ExploreSpec, bounds_for, explored_states
from harness.explore.states import State, Timeline, disk_promise
from harness.explore.traced import TracedRun, load_traced
from harness.scenario.cells import Cell
from harness.scenario.model import Expectation
from harness.vm.image import GuestImage
from harness.vm.spec import Accel
from harness.workloads.base import FSCK, ORACLE
from harness.workloads.stream import ACKS_FILE, STDERR_FILE

log = logging.getLogger(__name__)

PROGRESS_EVERY = 0.2  # seconds between progress reports while states are checked

# Files in a cell's directory that say what went wrong when a recording or its checks fail:
# the guests' consoles and the workload's own output (`RecordingRunner`, `CheckerGuest`).
EVIDENCE = (
    ("console.log", "the recording guest's console"),
    (ACKS_FILE, "the workload's stdout"),
    (STDERR_FILE, "its stderr"),
    ("setup.log", "its setup's output"),
    (f"{CHECKER_DIR}/console.log", "the checker guest's console"),
    (f"{CHECKER_DIR}/{CHECK_ERRORS}", "the checks that could not run"),
)


@dataclass(frozen=True)
class ExploreOptions:
    """How to explore (the command line's, or pytest's), beyond each scenario's `[explore]`."""

    workers: int = 1  # host-side checker processes at once
    guest: bool | None = None  # None: the scenario's `guest-check`
    max_states: int | None = None  # overrides `max-states`
    full_every: int = 32  # the oracle checks the whole log at one point in this many
    verify_every: int = 0  # compare the guest's device with the state every N checks (0: never)
    memory_mib: int = 512
    guest_factory: Callable[..., Any] = CheckerGuest


def lying_flush(cell: Cell) -> bool:
    """A blkdebug rule that acknowledges flushes without passing them down."""
    return any(r.as_dict().get("action") == "lying-flush" for r in cell.disk.blkdebug)


def recording_record(cell: Cell, *, index: int, seed: int, **rest: Any) -> CellRecord:
    """`cell`'s record as its recording starts: its identity field by field, then `rest`."""
    return CellRecord(
        index=index,
        id=cell.exploration_id,
        scenario=cell.scenario,
        status=CellStatus.RECORDING,
        cell=cell.id,
        scenario_path=cell.scenario_path,
        mode=cell.mode,
        workload=cell.workload.name,
        workload_kind=cell.workload.kind,
        filesystem=cell.disk.filesystem,
        mount_options=cell.disk.mount_options,
        cut=cell.cut.label,
        expect=cell.expect.value,
        seed=seed,
        **rest,
    )


def _rel(path: Path, out: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class CellExploration:
    """One cell's exploration as explore.json keeps it (`record`), in the directory `out`."""

    record: CellRecord
    out: Path | None = None

    @property
    def ok(self) -> bool:
        return self.record.passed

    @property
    def passed(self) -> bool:
        return self.record.passed

    @property
    def reason(self) -> str:
        return self.record.reason

    @property
    def states(self) -> tuple[StateRecord, ...]:
        return self.record.states

    @property
    def failing(self) -> list[StateRecord]:
        """States where a checker failed (allowed or not), in the order they were explored."""
        return self.record.failing

    @property
    def breaking(self) -> list[StateRecord]:
        """States that fail where the contract says they must not."""
        return self.record.breaking

    @property
    def unjudged(self) -> list[StateRecord]:
        """States no checker failed and some could not judge (beyond the scenario's
        `unjudged-states` they make the cell an error: `passed` is False)."""
        return self.record.unjudged

    @property
    def causes(self) -> tuple[CauseGroup, ...]:
        """The failing states by what they relied on (a traced run; one entry per distinct
        cause, with how many states it explains and the smallest's replay command; the
        states no cause explains last, `unexplained`)."""
        return self.record.causes

    @property
    def at_risk(self) -> tuple[AckRisk, ...]:
        """At every acknowledgement of the recorded run: what was not yet durable, since
        which call."""
        return self.record.at_risk

    @property
    def kept(self) -> tuple[str, ...]:
        """Changes never made durable that the filesystem kept in the failing states."""
        return self.record.kept

    def replay(self, state: str, image: Path | str) -> Path:
        """Rebuild one explored (or minimized) state as an image file."""
        if self.out is None:
            raise ConfigError("this exploration was not written to a directory")
        prefix = f"{self.record.index}/" if "/" not in state else ""
        return replay_doc(self.out, prefix + state, image)


class CellExplorer:
    """Explores one cell: record, enumerate, check host-side and in the guest, minimize."""

    def __init__(
        self,
        cell: Cell,
        spec: ExploreSpec,
        directory: Path,
        image: GuestImage | None,
        *,
        out: Path,
        index: int,
        options: ExploreOptions,
        accel: Accel | None = None,
        doc: ExploreDoc | None = None,
        replay_prefix: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self.cell = cell
        self.spec = spec if options.max_states is None else spec.with_budget(options.max_states)
        self.directory = Path(directory).resolve()
        self.image = image
        self.out = Path(out)
        self.index = index
        self.options = options
        self.accel = accel
        self.doc = doc
        self.replay_prefix = replay_prefix
        self.on_progress = on_progress or (lambda _p: None)
        self._reported = 0.0
        self.workload = cell.workload.workload
        expected = expected_for(
            cell.mode,
            FaultModel.HOST_POWER_CUT,
            CutPolicy.RANDOM,  # any state: what the mode's promise covers
            cell.workload,
            cell.checkers,
            Expectation.CONTRACT,
        )
        self.expectations: dict[str, Outcome] = dict(expected.checkers)
        self.negative = cell.expect is Expectation.VIOLATION
        self.keep = disk_promise(cell.mode, lying_flush=lying_flush(cell))
        self.judge = reference_promise(cell.mode, FaultModel.HOST_POWER_CUT)
        self.seed = spec.seed if spec.seed is not None else cell.seed
        self.filesystem = cell.disk.filesystem
        self.guest_wanted = self.workload.checker in cell.checkers and (
            options.guest if options.guest is not None else spec.guest_check
        )
        # The cell as it stands; `snapshot()` adds the states, the counts and the seconds.
        self.record = recording_record(
            cell,
            index=index,
            seed=self.seed,
            keep=self.keep,
            judge=self.judge,
            lying_flush=lying_flush(cell),
            checkers={k: v.value for k, v in self.expectations.items()},
            explore=dataclasses.replace(self.spec, guest_check=self.guest_wanted),
        )
        self.states: list[StateRecord] = []
        # The host checkers' scratch directories (in /dev/shm when it is writable), removed
        # when the exploration ends, however it ends.
        self.scratch_dirs: list[Path] = []
        self.counts = Counts()
        self.seconds = PhaseSeconds()
        self._by_id: dict[str, int] = {}  # state id -> its index in `states`
        if doc is not None:
            doc.add_cell(self.snapshot)

    @staticmethod
    def check_budget(spec: ExploreSpec, options: ExploreOptions) -> None:
        """A budget of zero (`--max-states 0`) is an error before anything boots."""
        if options.max_states is not None:
            spec.with_budget(options.max_states)

    def snapshot(self) -> CellRecord:
        """The cell's record as it stands (explore.json's entry)."""
        return dataclasses.replace(
            self.record, states=tuple(self.states), counts=self.counts, seconds=self.seconds
        )

    # -- the whole cell ------------------------------------------------------------------

    def run(self) -> CellExploration:
        t0 = time.monotonic()
        try:
            recorder = RecordingRunner(
                self.cell,
                self.directory,
                self._image(),
                accel=self.accel,
                out=self.out,
                on_progress=self.on_progress,
                label=self.record.id,
            )
            recorded = recorder.record()
            self._took(record=time.monotonic() - t0)
            self.record = dataclasses.replace(self.record, record_timings=recorded.timings)
            self.explore(recorded)
        except PowercutError as exc:
            reason = f"{type(exc).__name__}: {exc}"[:500] + self._evidence()
            log.warning("explore %s: %s", self.record.id, reason)
            self._set(status=CellStatus.ERROR, verdict=Verdict.ERROR, reason=reason)
        except KeyboardInterrupt:
            self._set(
                status=CellStatus.INTERRUPTED, verdict=Verdict.ERROR, reason="interrupted (Ctrl-C)"
            )
            raise
        finally:
            self._took(total=time.monotonic() - t0)
            self._save(force=True)
        return CellExploration(self.snapshot(), self.out)

    def _evidence(self) -> str:
        """What the guests and the workload said, kept in the cell's directory: named in a
        failure's reason, so the error shows where to look (`EVIDENCE`)."""
        kept = [
            f"{what} {path}"
            for name, what in EVIDENCE
            if (path := self.directory / name).is_file() and path.stat().st_size > 0
        ]
        return f"; kept: {', '.join(kept)}" if kept else ""

    def _image(self) -> GuestImage:
        if self.image is None:
            raise ConfigError("exploring a cell needs a guest image")
        return self.image

    def _set(self, **values: Any) -> None:
        self.record = dataclasses.replace(self.record, **values)
        self._save()

    def _took(self, **phases: float) -> None:
        """Seconds a phase took (rounded as explore.json keeps them)."""
        rounded = {k: round(v, 3) for k, v in phases.items()}
        self.seconds = dataclasses.replace(self.seconds, **rounded)

    def _save(self, force: bool = False) -> None:
        if self.doc is not None:
            if force:
                self.doc.save(force=True)
            else:
                self.doc.changed()

    def _state(self, index: int, state: StateRecord) -> None:
        self.states[index] = state

    # -- from a recording ----------------------------------------------------------------

    def explore(self, recorded: RecordedRun) -> None:
        """Steps 2-5 on a recording (a unit test may hand one made without a VM)."""
        rec = recorded.recording
        self.recorded = recorded
        self.directory.mkdir(parents=True, exist_ok=True)
        wlog = rec.read_log()
        timeline = Timeline(wlog, self.keep, rec.acks)
        self.timeline = timeline
        start = int(rec.extra.get("start_index", 0))
        bounds = bounds_for(self.spec, timeline, start, self.seed)
        states = explored_states(timeline, bounds)
        self._state_map = {s.id: s for s in states}
        ack_indices = sorted(a.index for a in rec.acks)
        self._acked_at = {p.at: bisect.bisect_right(ack_indices, p.at) for p in timeline.points}
        explored_points = sorted({s.point.number for s in states})
        summary = RecordingSummary(
            recording=_rel(rec.root, self.out),
            final_image=_rel(recorded.final_image, self.out),
            acks=len(rec.acks),
            start_index=start,
            log_records=wlog.records,
            writes=len(timeline.writes),
            points_total=len(timeline.points),
            points=tuple(
                ExploredPoint(timeline.points[n], self._acked_at[timeline.points[n].at])
                for n in explored_points
            ),
            in_flight_at_end=rec.extra.get("in_flight_at_end"),
        )
        self.record = dataclasses.replace(self.record, recorded=summary, status=CellStatus.HOST)
        self._save(force=True)
        guest: Any = None
        host: dict[str, HostResult] = {}
        host_error: list[BaseException] = []
        self._stop = threading.Event()

        def host_side() -> None:
            try:
                host.update(self._host_phase(states))
            except BaseException as exc:  # noqa: BLE001 - raised again by the main thread
                host_error.append(exc)

        # Host-side checks run in a thread while the main thread boots the checker guest:
        # its processes die with the thread that started them (PR_SET_PDEATHSIG).
        checking = threading.Thread(target=host_side, name="explore-host", daemon=True)
        try:
            self._host_started = time.monotonic()
            self._progress(Phase.HOST, 0, len(states), self._host_started, force=True)
            checking.start()
            if self.guest_wanted:
                guest = self._make_guest(recorded)
                guest.start()
            checking.join()
            if host_error:
                raise host_error[0]
            self._runner_cuts(recorded, states, host)
            if guest is not None:
                self._set(status=CellStatus.GUEST)
                self._guest_phase(guest, host)
            self._set(status=CellStatus.MINIMIZE)
            self._minimize(host, guest)
            self._explain(guest)
        finally:
            self._stop.set()  # an interrupted host phase stops at its next state
            if checking.is_alive():
                checking.join()
            if guest is not None:
                guest.close()
            for hc in getattr(self, "_checkers", []):
                hc.close()
            for tmp in self.scratch_dirs:
                shutil.rmtree(tmp, ignore_errors=True)
        self._verdict()
        self._progress(Phase.DONE, len(self.states), len(self.states), time.monotonic(), force=True)

    def _progress(
        self, phase: Phase, checked: int, planned: int, since: float, *, force: bool = False
    ) -> None:
        """Tell `on_progress` (at most every PROGRESS_EVERY seconds, and at every phase's
        start and end)."""
        now = time.monotonic()
        if not force and checked < planned and now - self._reported < PROGRESS_EVERY:
            return
        self._reported = now
        self.on_progress(
            Progress(
                self.record.id,
                phase,
                checked=checked,
                planned=planned,
                failing=sum(1 for s in self.states if s.failed),
                unjudged=sum(1 for s in self.states if s.unjudged),
                seconds_left=seconds_left(checked, planned, now - since),
            )
        )

    def state_of(self, state_id: str) -> State:
        """An explored (or minimized) state of this cell by its id."""
        return self._state_map[state_id]

    def _make_guest(self, recorded: RecordedRun) -> Any:
        return self.options.guest_factory(
            self.directory / CHECKER_DIR,
            self.image,
            recorded.recording.base,
            self.workload,
            self.cell.seed,
            filesystem_name=self.filesystem,
            mount_options=self.cell.disk.mount_options,
            accel=self.accel,
            memory_mib=self.options.memory_mib,
        )

    # -- host side -----------------------------------------------------------------------

    def _host_checkers(self, n: int) -> list[HostChecker]:
        rec = self.recorded.recording
        checkers: list[HostChecker] = []
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        for _ in range(n):
            work = Path(tempfile.mkdtemp(prefix="powercut-explore-", dir=shm))
            self.scratch_dirs.append(work)
            fsck = checker_for(self.filesystem, work) if FSCK in self.cell.checkers else None
            checkers.append(
                HostChecker(
                    self.timeline,
                    rec.log,
                    rec.base,
                    self.judge,
                    fsck=fsck,
                    workdir=work,
                    oracle=ORACLE in self.cell.checkers,
                    full_every=self.options.full_every,
                )
            )
        return checkers

    def _host_phase(self, states: list[State]) -> dict[str, HostResult]:
        t0 = time.monotonic()
        self._checkers = self._host_checkers(max(1, self.options.workers))
        self._cache = CheckCache()
        results: dict[str, HostResult] = {}

        def seen(result: HostResult) -> None:
            if self._stop.is_set():
                raise Interrupted("the exploration was stopped")
            results[result.state.id] = result
            self._by_id[result.state.id] = len(self.states)
            self.states.append(self._state_entry(result))
            self._count()
            self._save()
            self._progress(Phase.HOST, len(self.states), len(states), self._host_started)

        explore_host(self._checkers, states, on_result=seen, cache=self._cache)
        # Keep enumeration order (workers deliver blocks out of order).
        order = {s.id: i for i, s in enumerate(states)}
        self.states.sort(key=lambda e: order.get(e.id, 1 << 30))
        self._by_id = {s.id: i for i, s in enumerate(self.states)}
        self._took(host=time.monotonic() - t0)
        self.record = dataclasses.replace(
            self.record,
            host_states_per_s=round(len(states) / max(1e-9, time.monotonic() - t0), 1),
        )
        self._count()
        return results

    def _state_entry(self, result: HostResult) -> StateRecord:
        checks: list[StateCheck] = []
        o = result.oracle
        if o is not None:
            checks.append(
                StateCheck(
                    ORACLE,
                    ORACLE,
                    bool(o.ok),
                    f"{o.lost} sectors lost, {o.corrupt} corrupt ({o.scope})",
                    corruption=o.corrupt > 0,
                )
            )
        checks += [f.record(FSCK) for f in result.findings]
        entry = StateRecord(
            state=result.state,
            acked=self._acked_at[result.state.point.at],
            digest=result.digest,
            duplicate_of=result.duplicate_of,
            sectors_differing=result.sectors_differing,
            host_verdict=result.verdict,
            oracle=o,
            checks=tuple(checks),
            seconds=round(result.seconds, 6),
            verdict=StateVerdict.PASS,  # judged next
        )
        return self._judged(entry)

    def _runner_cuts(
        self, recorded: RecordedRun, states: list[State], host: dict[str, HostResult]
    ) -> None:
        """What the runner's cuts at the end leave, and the explored state with that image.

        The runner would have cut here and reverted by its policy from the powerfail
        journal; each of its images must be an explored state at the end (identical
        states are enumerated once, so keep-all may be lose-all's image).
        """
        if not recorded.journal.exists() or not recorded.final_image.exists():
            return
        end = self.timeline.points[-1]
        work = self.directory / "runner-cuts"
        try:
            cuts = runner_cuts(recorded, work)
            rec = recorded.recording
            images: dict[str, str] = {}
            with StateBuilder(self.timeline, rec.log, rec.base) as builder:
                for state in states:
                    if state.point.number == end.number:
                        tmp = work / "state.img"
                        builder.replay(state, tmp)
                        images.setdefault(fingerprint(tmp), state.id)
                        tmp.unlink()
        except PowercutError as exc:
            self.record = dataclasses.replace(self.record, runner_cuts=RunnerCuts(error=str(exc)))
            return
        finally:
            shutil.rmtree(work, ignore_errors=True)
        found = RunnerCuts(
            tuple(
                RunnerCut(parse_policy(policy), images.get(digest), digest in images)
                for policy, digest in cuts.items()
            )
        )
        self.record = dataclasses.replace(self.record, runner_cuts=found)

    # -- in the guest --------------------------------------------------------------------

    def _guest_phase(self, guest: Any, host: dict[str, HostResult]) -> None:
        t0 = time.monotonic()
        rec = self.recorded.recording
        delta = self.directory / "state.delta"
        cache: dict[tuple[str, int], str] = {}
        checks = same_image = decided_host_side = 0
        boot_seconds = round(getattr(guest, "boot_seconds", 0.0), 3)
        verify_every = self.options.verify_every
        self._guest_builder = StateBuilder(self.timeline, rec.log, rec.base)
        planned = len(self.states)
        self._progress(Phase.GUEST, 0, planned, t0, force=True)
        try:
            for i in range(planned):
                if i:
                    self._progress(Phase.GUEST, i, planned, t0)
                entry = self.states[i]
                result = host[entry.id]
                if result.failed:
                    skipped = GuestRecord(skipped=f"decided host-side ({result.verdict.value})")
                    self._state(i, dataclasses.replace(entry, guest=skipped))
                    decided_host_side += 1
                    continue
                key = (result.digest, entry.acked)
                if key in cache:
                    first = self.states[self._by_id[cache[key]]]
                    same = (
                        dataclasses.replace(first.guest, same_as=cache[key])
                        if first.guest is not None
                        else GuestRecord(same_as=cache[key])
                    )
                    borrowed = tuple(c for c in first.checks if c.where is Where.GUEST)
                    self._state(
                        i,
                        self._judged(
                            dataclasses.replace(entry, guest=same, checks=entry.checks + borrowed)
                        ),
                    )
                    same_image += 1
                    continue
                verify = bool(verify_every) and checks % verify_every == 0
                fsck = self._fsck_undecided(entry)
                check = self._guest_check(guest, result.state, entry.acked, delta, fsck, verify)
                if verify:
                    expected_md5 = self._expected_md5(result.state)
                    entry = dataclasses.replace(
                        entry,
                        device_md5_expected=expected_md5,
                        device_md5_matches=check.device_md5 == expected_md5,
                    )
                cache[key] = entry.id
                checks += 1
                self._state(i, self._add_guest(entry, check))
                self._count()
                self._save()
        finally:
            self._guest_builder.close()
            delta.unlink(missing_ok=True)
            seconds = time.monotonic() - t0
            self._progress(Phase.GUEST, checks + same_image + decided_host_side, planned, t0)
            stats = GuestStats(
                checks=checks,
                same_image=same_image,
                decided_host_side=decided_host_side,
                boot_seconds=boot_seconds,
                seconds=round(seconds, 3),
                states=len(self.states),
                states_per_s=round(len(self.states) / max(seconds, 1e-9), 2),
                checks_per_s=round(checks / max(seconds, 1e-9), 2),
            )
            self.record = dataclasses.replace(self.record, guest=stats)
            self._took(guest=seconds)

    def _fsck_undecided(self, entry: StateRecord) -> bool:
        """The host's filesystem checker could not judge (a log only a mount replays)."""
        return FSCK in self.cell.checkers and any(
            c.where is Where.HOST and c.ok is None for c in entry.checks
        )

    def _guest_check(
        self,
        guest: Any,
        state: State,
        acked: int,
        delta: Path,
        fsck: bool = False,
        verify: bool = False,
    ) -> GuestCheck:
        self._guest_builder.delta(state, delta)
        run = self.recorded.run_as_of(acked, guest.ssh)
        check: GuestCheck = guest.check(delta, run, guest_fsck=fsck, verify=verify, state=state.id)
        return check

    def _expected_md5(self, state: State) -> str:
        image = self.directory / "verify.img"
        try:
            self._guest_builder.replay(state, image)
            return file_md5(image, self.recorded.recording.image_size)
        finally:
            image.unlink(missing_ok=True)

    def _add_guest(self, entry: StateRecord, check: GuestCheck) -> StateRecord:
        checks = list(entry.checks)
        own = self.workload.checker
        guest = Where.GUEST
        if check.mounted is not None:
            detail = (check.error or "") if not check.mounted else "mounted (recovered)"
            checks.append(StateCheck("mount", FSCK, check.mounted, detail, guest))
        if check.observation is not None:
            obs = check.observation
            ok = not (obs.loss or obs.corruption)
            checks.append(StateCheck(own, own, ok, obs.summary(), guest, obs.corruption))
        elif check.mounted is not False and check.error:
            checks.append(StateCheck(own, own, None, check.error, guest))
        if check.fsck is not None:
            fsck = check.fsck
            checks.append(
                StateCheck(
                    fsck.command.split()[0],
                    FSCK,
                    bool(fsck.ok),
                    f"exit {fsck.exit}: {fsck.output}",
                    guest,
                )
            )
        return self._judged(dataclasses.replace(entry, guest=check.record(), checks=tuple(checks)))

    # -- verdicts --------------------------------------------------------------------------

    def _judged(self, entry: StateRecord) -> StateRecord:
        """The state with its verdict, whether it breaks the contract, and its replay command."""
        checks = entry.checks
        oracle_bad = any(c.role == ORACLE and c.ok is False for c in checks)
        other_bad = any(c.role != ORACLE and c.ok is False for c in checks)
        verdict = (
            StateVerdict.VIOLATION
            if oracle_bad
            else StateVerdict.FAIL
            if other_bad
            else StateVerdict.PASS
        )
        broken = []
        for c in checks:
            if c.ok is not False:
                continue
            forbidden = self.expectations.get(c.role, Outcome.INTACT) is Outcome.INTACT
            if forbidden or c.corruption:
                broken.append(c.checker)
        # Not judged: a checker could not say, and no other check in its role did (the
        # guest's mount and fsck settle the host's undecided filesystem checker).
        decided = {c.role for c in checks if c.ok is not None}
        unjudged = [c.checker for c in checks if c.ok is None and c.role not in decided]
        return dataclasses.replace(
            entry,
            verdict=verdict,
            contract_broken=bool(broken),
            broken_by=tuple(broken),
            unjudged_by=tuple(unjudged) if verdict is StateVerdict.PASS else (),
            replay=self._replay_command(entry.id) if verdict is not StateVerdict.PASS else None,
        )

    def _replay_command(self, state_id: str) -> str:
        qualified = state_id if self.replay_prefix is None else f"{self.replay_prefix}{state_id}"
        image = re.sub(r"[^A-Za-z0-9_.-]+", "_", qualified) + ".img"
        return shlex.join(
            ["powercut", "explore", "replay", str(self.out), "--state", qualified, "--out", image]
        )

    def _count(self) -> None:
        seconds = [s for s in (self.seconds.host, self.seconds.guest) if s is not None]
        self.counts = Counts.of_states(self.states, round(sum(seconds, 0.0), 3))

    def _verdict(self) -> None:
        """The cell's verdict: FAIL when a state breaks the contract (a negative control: when
        none fails), else ERROR when more states than `unjudged-states` were not judged."""
        self._count()
        failing = self.counts.states_failing
        broken = self.counts.states_breaking_contract
        unjudged = self.counts.states_unjudged
        allowed = self.spec.unjudged_states
        n = self.counts.states_explored
        states = f"{n} states" if not unjudged else f"{n - unjudged} judged states of {n}"
        if self.negative:
            ok = failing > 0
            reason = (
                f"loss detected: {failing} of {n} states fail"
                if ok
                else f"no loss detected in {states} (a negative control must find some)"
            )
        else:
            ok = broken == 0
            reason = (
                f"all {states} inside the contract ({failing} fail where it allows)"
                if ok
                else f"{broken} of {n} states break the contract"
            )
        verdict = Verdict.PASS if ok else Verdict.FAIL
        first = next(
            (s for s in self.states if s.contract_broken or (self.negative and s.failed)),
            None,
        )
        if first is not None:
            reason += f"; first: {first.id} ({', '.join(first.broken_by) or first.verdict.value})"
        # A state that breaks the contract (a negative control's loss) is a finding whatever
        # else was not judged; without one, too many unjudged states leave nothing to conclude.
        conclusive = failing > 0 if self.negative else broken > 0
        if unjudged > allowed and not conclusive:
            verdict = Verdict.ERROR
        if unjudged:
            reason = self._unjudged_reason(reason, unjudged, allowed, n)
        self._set(status=CellStatus.DONE, verdict=verdict, reason=reason)

    def _unjudged_reason(self, reason: str, unjudged: int, allowed: int, n: int) -> str:
        first = next(s for s in self.states if s.unjudged)
        why = next((c for c in first.checks if c.checker in first.unjudged_by), None)
        detail = f"{why.checker}: {why.detail}" if why is not None else ""
        if unjudged > allowed:
            head = (
                f"{unjudged} of {n} states could not be judged "
                f"(the scenario's unjudged-states allows {allowed})"
            )
            return f"{head}; first: {first.id} ({detail}); {reason}"
        return f"{reason}; {unjudged} not judged (unjudged-states allows {allowed})"

    # -- why it was lost ----------------------------------------------------------------------

    def _explain(self, guest: Any) -> None:
        """Every failing state of a traced run explained by its calls (`harness.crash.explain`):
        the recovered tree listed in the checker guest, compared with the tree the calls
        left; the states grouped by cause; what was at risk at every acknowledgement."""
        rec = self.recorded.recording
        try:
            traced = load_traced(rec.root)
        except ConfigError as exc:
            traced = TracedRun("/mnt", error=str(exc))
        if traced is None:
            return
        t0 = time.monotonic()
        explanations: list[Explanation] = []
        views: dict[str, FileView | str] = {}  # by image digest: the view, or why there is none
        delta = self.directory / "explain.delta"
        times = _record_times(self.timeline)
        builder = StateBuilder(self.timeline, rec.log, rec.base)
        existing = traced.existing if traced.existing is not None else ()
        risks = (
            at_risk(traced.trace, traced.ack_times(), traced.root, existing)
            if traced.traced
            else []
        )
        kept: list[str] = []
        try:
            failing = [i for i, s in enumerate(self.states) if s.failed]
            for done, i in enumerate(failing):
                self._progress(Phase.EXPLAIN, done, len(failing), t0, force=not done)
                entry = self.states[i]
                found = self._explain_state(entry, traced, guest, builder, delta, views, times)
                self._state(i, dataclasses.replace(entry, explanation=found))
                explanations.append(found)
                kept += found.kept
                self._save()
            # What the filesystem kept though the calls never made it durable: the lose-all
            # states of the acknowledgements with something at risk that lost nothing.
            risky = {r.token for r in risks if r.risks}
            ack_times = traced.ack_times()
            for entry in self._kept_probes(risky):
                token = [x[4:] for x in entry.point.labels if x.startswith("ack ")][-1]
                boundary = ack_times.get(token)
                view = self._view(entry, guest, builder, delta, views)
                if isinstance(view, FileView) and boundary is not None:
                    found_kept = kept_at(
                        traced.trace,
                        view,
                        boundary,
                        existing=existing,
                        final=traced.final,
                    )
                    kept += [f"{entry.id} (ack {token}): {k}" for k in found_kept]
        finally:
            builder.close()
            delta.unlink(missing_ok=True)
        sizes = {s.id: len(s.state.lost) + len(s.state.torn) for s in self.states}
        replays = {s.id: s.replay for s in self.states}
        groups = group(explanations, sizes.__getitem__, replays.__getitem__)
        self.record = dataclasses.replace(
            self.record,
            trace=traced.summary(),
            causes=tuple(groups),
            at_risk=tuple(risks),
            kept=tuple(dict.fromkeys(kept)),
        )
        self._took(explain=time.monotonic() - t0)
        self._save()

    KEPT_PROBES = 8  # passing lose-all states looked at for what the filesystem kept

    def _kept_probes(self, risky: set[str]) -> list[StateRecord]:
        """Passing lose-all states at acknowledgements with changes at risk, one per image."""
        out: list[StateRecord] = []
        digests: set[str] = set()
        for s in self.states:
            if s.failed or s.state.policy is not CutPolicy.LOSE_ALL or s.digest in digests:
                continue
            if any(x.startswith("ack ") and x[4:] in risky for x in s.point.labels):
                out.append(s)
                digests.add(s.digest)
        return out[: self.KEPT_PROBES]

    def _view(
        self,
        entry: StateRecord,
        guest: Any,
        builder: StateBuilder,
        delta: Path,
        views: dict[str, FileView | str],
    ) -> FileView | str:
        """The state's recovered tree listed in the checker guest (once per image), or why
        it could not be."""
        view = views.get(entry.digest)
        if view is None:
            if guest is None or getattr(guest, "broken", None):
                view = "no checker guest to list the recovered tree in"
            else:
                try:
                    builder.delta(entry.state, delta)
                    view = guest.view(delta)
                except PowercutError as exc:
                    view = f"the recovered tree could not be listed: {exc}"
            views[entry.digest] = view
        return view

    def _explain_state(
        self,
        entry: StateRecord,
        traced: TracedRun,
        guest: Any,
        builder: StateBuilder,
        delta: Path,
        views: dict[str, FileView | str],
        times: dict[int, int],
    ) -> Explanation:
        t0 = time.monotonic()
        state = entry.state
        check = entry.guest.check if entry.guest is not None else None
        lost = check.lost if check is not None else ()
        why = _not_the_workloads(entry)
        if why is not None:
            return explain_state(
                TracedRun(traced.root, error=why), state.id, None, lost, point_host_ns=None
            )
        view = self._view(entry, guest, builder, delta, views)
        ss = self.timeline.sector_size
        lost_writes = [
            (w.offset, w.length) for seq in state.lost if (w := self.timeline.by_seq.get(seq))
        ]
        torn_writes = [(s * ss, ss) for _seq, sectors in state.torn for s in sectors]
        found = explain_state(
            traced,
            state.id,
            view if isinstance(view, FileView) else None,
            lost,
            point_host_ns=times.get(state.point.at - 1),
            lost_writes=lost_writes,
            torn_writes=_merged(torn_writes),
            why_no_view=view if isinstance(view, str) else "",
        )
        # The state's own time: its view (unless an identical image's was reused) and the engine.
        return dataclasses.replace(found, seconds=round(time.monotonic() - t0, 3))

    # -- minimization ------------------------------------------------------------------------

    def _minimize(self, host: dict[str, HostResult], guest: Any) -> None:
        if self.spec.minimize <= 0:
            return
        t0 = time.monotonic()
        wanted = [i for i, s in enumerate(self.states) if s.contract_broken]
        if not wanted and self.negative:
            wanted = [i for i, s in enumerate(self.states) if s.failed]
        wanted = wanted[: self.spec.minimize]
        for done, i in enumerate(wanted):
            self._progress(Phase.MINIMIZE, done, len(wanted), t0, force=True)
            entry = self.states[i]
            try:
                minimized = self._shrink(entry, host[entry.id], guest)
            except PowercutError as exc:
                minimized = Minimized(error=f"{type(exc).__name__}: {exc}"[:300])
            self._state(i, dataclasses.replace(self.states[i], minimized=minimized))
            self._save()
        self._took(minimize=time.monotonic() - t0)

    def _shrink(self, entry: StateRecord, result: HostResult, guest: Any) -> Minimized:
        state = result.state
        if not state.lost and not state.torn:
            return Minimized(note="this state loses no write: nothing to shrink")
        acked = entry.acked
        if result.failed:
            checker = self._checkers[0]
            verdict = result.verdict
            how = Where.HOST

            def fails(s: State) -> bool:
                return checker.check(s).verdict is verdict

        elif guest is not None and not getattr(guest, "broken", None):
            how = Where.GUEST
            delta = self.directory / "shrink.delta"
            rec = self.recorded.recording
            self._guest_builder = StateBuilder(self.timeline, rec.log, rec.base)
            fsck = self._fsck_undecided(entry)

            def fails(s: State) -> bool:
                return self._guest_check(guest, s, acked, delta, fsck).failed

        else:
            return Minimized(note="failed in the guest, which is gone: not shrunk")
        try:
            m = minimize_state(state, fails, max_checks=self.spec.minimize_checks)
        finally:
            if how is Where.GUEST:
                self._guest_builder.close()
                (self.directory / "shrink.delta").unlink(missing_ok=True)
        image = self.recorded.final_image
        ext = self.filesystem in ("ext2", "ext3", "ext4") and image.exists()
        writes = loss_report(self.timeline, m.state, image if ext else None)
        self._state_map[m.state.id] = m.state
        return Minimized(
            state=m.state,
            by=how,
            checks=m.checks,
            losses_before=len(state.lost) + len(state.torn),
            losses_after=len(m.state.lost) + len(m.state.torn),
            writes=tuple(writes),
            replay=self._replay_command(m.state.id),
        )


def _not_the_workloads(entry: StateRecord) -> str | None:
    """Why a failing state's loss is no call's to explain, if it is not: the disk broke its
    promise (the oracle), or a host-side checker decided it before the guest looked."""
    if entry.verdict is StateVerdict.VIOLATION:
        return (
            "the disk lost what it promised (the oracle failed the state): not the "
            "application's doing, and no call is blamed"
        )
    guest = entry.guest
    if guest is None or guest.skipped is not None or guest.check is None:
        failed = [f"{c.checker}: {c.detail}" for c in entry.checks if c.ok is False]
        return "the workload's check did not judge this state; " + (
            "; ".join(failed) or "no checker says what it lost"
        )
    return None


def _record_times(timeline: Timeline) -> dict[int, int]:
    """The host's CLOCK_MONOTONIC time of every log record, by index."""
    out: dict[int, int] = {}
    for r in timeline.wlog.requests:
        out[r.submit_index] = r.submit_ns
        if r.complete_index is not None and r.complete_ns is not None:
            out[r.complete_index] = r.complete_ns
    return out


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte ranges (offset, length), adjacent ones joined."""
    out: list[tuple[int, int]] = []
    for offset, length in sorted(ranges):
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((offset, length))
    return out


class Interrupted(PowercutError):
    """The host-side checks were told to stop (the exploration was interrupted)."""
