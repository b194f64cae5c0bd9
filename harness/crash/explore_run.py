"""`powercut explore`: record each cell once, then check every crash state its contract allows.

One exploration per cell of a scenario (its fault and policy folded away: every
host power cut the contract allows is a candidate):

1. record (`harness.crash.explore_record`): the workload runs once in a guest, to
   the cell's cut moment, on a disk whose write log keeps the data; the base is
   the image after mkfs; acknowledgements are time-stamped against the log;
2. enumerate (`harness.explore.states`): the states the disk's promise allows at
   every persistence point after the workload's run started, within the
   scenario's `[explore]` budget;
3. host-side (`harness.explore.hostcheck`): the oracle and the filesystem's
   checker with journal recovery on a scratch view of each state, identical
   images once; meanwhile the checker guest boots;
4. in the guest (`harness.crash.explore_guest`): every state the host passed is
   mounted in the one checker guest and judged by the workload's own `check`
   with the acknowledgements true at its point; identical images at the same
   acknowledgement count are checked once;
5. minimize (`harness.explore.minimize`): the first failing states are shrunk by
   delta debugging over their lost and torn writes (host-side predicate where
   the host failed them, the guest's otherwise), and their writes attributed
   (`harness.explore.attribute`, ext4);
6. `DIR/explore.json` (`ExploreDoc`), rewritten atomically as states are checked,
   so an interrupted exploration keeps what it checked.

Verdicts, per state: `violation` (the oracle caught the disk losing what it
promised), `fail` (a checker failed while the disk kept its promise), `pass`.
Whether a failure is one the contract forbids is the verdict module's word
(`expected_for`: the oracle and the filesystem checker must find everything the
promise covers; the workload's own check, what it acknowledged if
`keeps_acknowledged`; corruption never), recorded as `contract_broken`. A cell
passes when no state breaks the contract — or, for a negative control
(`expect = "violation"`), when some state fails.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.crash.explore_guest import CheckerGuest, GuestCheck, file_md5
from harness.crash.explore_record import RecordedRun, RecordingRunner, runner_cuts
from harness.crash.verdict import Outcome, expected_for
from harness.durability.contract import (
    CutPolicy,
    FaultModel,
    Promise,
    reference_promise,
)
from harness.errors import ConfigError, PowercutError
from harness.explore.attribute import loss_report
from harness.explore.hostcheck import (
    CheckCache,
    HostChecker,
    HostResult,
    checker_for,
    explore_host,
)
from harness.explore.minimize import minimize_state
from harness.explore.overlay import StateBuilder, replay_state
from harness.explore.recording import fingerprint, open_recording
from harness.explore.states import (
    Bounds,
    PointKind,
    State,
    Timeline,
    disk_promise,
    enumerate_states,
    find_state,
)
from harness.report.jsonfile import load_json_object
from harness.report.results import utc_now
from harness.scenario.cells import Cell
from harness.scenario.explore import DEFAULT, ExploreSpec
from harness.scenario.model import Expectation, Scenario
from harness.vm.image import GuestImage
from harness.vm.spec import Accel
from harness.workloads.base import FSCK, ORACLE

log = logging.getLogger(__name__)

DOC_NAME = "explore.json"
DOC_VERSION = 1
COUNTS = ("states_explored", "states_unique", "states_failing", "states_breaking_contract")


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


# -- explore.json -----------------------------------------------------------------------


class ExploreDoc:
    """DIR/explore.json: written as it goes, atomically, at most every `interval` seconds."""

    def __init__(self, out: Path, command: str, interval: float = 1.0) -> None:
        self.out = Path(out)
        self.path = self.out / DOC_NAME
        self.interval = interval
        self._lock = threading.RLock()
        self._saved = 0.0
        self.data: dict[str, Any] = {
            "version": DOC_VERSION,
            "command": command,
            "started": utc_now(),
            "finished": None,
            "complete": False,
            "interrupted": False,
            "ok": None,
            "states_explored": 0,
            "states_unique": 0,
            "states_failing": 0,
            "states_breaking_contract": 0,
            "check_seconds": 0.0,
            "cells": [],
        }

    def add_cell(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.data["cells"].append(entry)
        self.save(force=True)

    def changed(self) -> None:
        if time.monotonic() - self._saved >= self.interval:
            self.save(force=True)

    def save(self, force: bool = False) -> Path:
        with self._lock:
            if not force and time.monotonic() - self._saved < self.interval:
                return self.path
            self._totals()
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=1) + "\n")
            os.replace(tmp, self.path)
            self._saved = time.monotonic()
        return self.path

    def _totals(self) -> None:
        cells = self.data["cells"]
        for key in (
            "states_explored",
            "states_unique",
            "states_failing",
            "states_breaking_contract",
        ):
            self.data[key] = sum(int(c.get(key, 0)) for c in cells)
        self.data["check_seconds"] = round(
            sum(float(c.get("check_seconds", 0.0)) for c in cells), 3
        )

    def finish(self, *, interrupted: bool = False) -> Path:
        with self._lock:
            cells = self.data["cells"]
            self.data["finished"] = utc_now()
            self.data["interrupted"] = interrupted
            done = all(c.get("status") in ("done", "skipped") for c in cells)
            self.data["complete"] = not interrupted and done
            judged = [c for c in cells if c.get("status") != "skipped"]
            self.data["ok"] = (
                not interrupted and bool(judged) and all(c.get("verdict") == "pass" for c in judged)
            )
        return self.save(force=True)


def load_doc(directory: Path | str) -> dict[str, Any]:
    path = Path(directory) / DOC_NAME
    data = load_json_object(
        path,
        "an exploration file",
        missing=f"{directory} holds no exploration ({DOC_NAME} is missing); "
        "run powercut explore first",
    )
    if data.get("version") != DOC_VERSION:
        raise ConfigError(f"{path} has version {data.get('version')}; this powercut reads 1")
    if not isinstance(data.get("cells"), list):
        raise ConfigError(f"{path} is not an exploration (no 'cells' array)")
    return data


# -- one cell ------------------------------------------------------------------------------


def explore_id(cell: Cell) -> str:
    """The cell's id with its fault folded away: mode/explore/workload/cut/rN."""
    parts = cell.id.split("/")
    parts[1] = "explore"
    return "/".join(parts)


def exploration_cells(scenarios: Sequence[Scenario], cells: Sequence[Cell]) -> list[Cell]:
    """One cell per (scenario, mode, workload, cut, repetition): faults and policies fold away."""
    seen: set[tuple[str, str]] = set()
    out = []
    for cell in cells:
        key = (cell.scenario_path, explore_id(cell))
        if key not in seen:
            seen.add(key)
            out.append(cell)
    return out


def spec_for(cell: Cell, scenarios: Sequence[Scenario]) -> ExploreSpec:
    for s in scenarios:
        if s.path == cell.scenario_path and s.name == cell.scenario:
            return s.explore or DEFAULT
    return DEFAULT


def lying_flush(cell: Cell) -> bool:
    """A blkdebug rule that acknowledges flushes without passing them down."""
    return any(r.as_dict().get("action") == "lying-flush" for r in cell.blkdebug)


def bounds_for(spec: ExploreSpec, timeline: Timeline, start_index: int, seed: int) -> Bounds:
    kinds = tuple(PointKind(k.value) for k in spec.points)
    points = tuple(
        p.number for p in timeline.points if p.at >= start_index and set(p.kinds) & set(kinds)
    )
    if not points:
        points = (timeline.points[-1].number,)  # the end is always there
    return Bounds(
        max_states=spec.max_states,
        per_point=spec.states_per_point,
        kinds=kinds,
        policies=spec.policies,
        seed=seed,
        tear_unit=spec.tear_unit,
        points=points,
    )


def explored_states(timeline: Timeline, bounds: Bounds) -> list[State]:
    """The states to check: the runner's own lose-all and keep-all at the end first (what a
    `powercut run` of the cell would have left), then `enumerate_states`' order."""
    first: list[State] = []
    canonical = tuple(p for p in bounds.policies if p in (CutPolicy.LOSE_ALL, CutPolicy.KEEP_ALL))
    if canonical and PointKind.END in bounds.kinds:
        end = dataclasses.replace(
            bounds,
            points=(timeline.points[-1].number,),
            policies=canonical,
            max_states=len(canonical),
        )
        first = list(enumerate_states(timeline, end))[: bounds.max_states]
    left = bounds.max_states - len(first)
    if left <= 0:
        return first
    ids = {s.id for s in first}
    rest = enumerate_states(timeline, dataclasses.replace(bounds, max_states=left))
    return first + [s for s in rest if s.id not in ids]


def _rel(path: Path, out: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


@dataclass
class CellExploration:
    """One cell's exploration: its explore.json entry (`entry`), in the directory `out`."""

    entry: dict[str, Any]
    states: list[dict[str, Any]] = field(default_factory=list)
    out: Path | None = None

    @property
    def ok(self) -> bool:
        return self.entry.get("verdict") == "pass"

    passed = ok

    @property
    def reason(self) -> str:
        return str(self.entry.get("reason", ""))

    @property
    def failing(self) -> list[dict[str, Any]]:
        """States where a checker failed (allowed or not), in the order they were explored."""
        return [s for s in self.states if s.get("verdict") != "pass"]

    @property
    def breaking(self) -> list[dict[str, Any]]:
        """States that fail where the contract says they must not."""
        return [s for s in self.states if s.get("contract_broken")]

    def replay(self, state: str, image: Path | str) -> Path:
        """Rebuild one explored (or minimized) state as an image file."""
        if self.out is None:
            raise ConfigError("this exploration was not written to a directory")
        prefix = f"{self.entry['index']}/" if "/" not in state else ""
        return replay(self.out, prefix + state, image)


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
        accel: Accel | str | None = None,
        doc: ExploreDoc | None = None,
        replay_prefix: str | None = None,
        on_phase: Callable[[str], None] | None = None,
    ) -> None:
        self.cell = cell
        self.spec = spec if options.max_states is None else _budget(spec, options.max_states)
        self.directory = Path(directory).resolve()
        self.image = image
        self.out = Path(out)
        self.index = index
        self.options = options
        self.accel = accel
        self.doc = doc
        self.replay_prefix = replay_prefix
        self.on_phase = on_phase or (lambda _p: None)
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
        fs_name = cell.filesystem if self.workload.needs_filesystem else None
        self.filesystem = fs_name
        self.guest_wanted = self.workload.checker in cell.checkers and (
            options.guest if options.guest is not None else spec.guest_check
        )
        self.entry: dict[str, Any] = {
            "index": index,
            "id": explore_id(cell),
            "cell": cell.id,
            "scenario": cell.scenario,
            "scenario_path": cell.scenario_path,
            "mode": cell.mode.value,
            "workload": cell.workload.name,
            "workload_kind": cell.workload.kind,
            "filesystem": fs_name,
            "mount_options": cell.disk.mount_options,
            "cut": cell.cut.label,
            "expect": cell.expect.value,
            "seed": self.seed,
            "keep": self.keep.name,
            "judge": self.judge.name,
            "lying_flush": lying_flush(cell),
            "checkers": {k: v.value for k, v in self.expectations.items()},
            "explore": {
                **dataclasses.asdict(self.spec),
                "points": [k.value for k in self.spec.points],
                "policies": [p.value for p in self.spec.policies],
                "guest_check": self.guest_wanted,
            },
            "status": "recording",
            "verdict": None,
            "reason": "",
            "states_explored": 0,
            "states_unique": 0,
            "states_failing": 0,
            "states_breaking_contract": 0,
            "check_seconds": 0.0,
            "seconds": {},
            "states": [],
        }
        self.states = self.entry["states"]
        self._by_id: dict[str, dict[str, Any]] = {}
        if doc is not None:
            doc.add_cell(self.entry)

    @staticmethod
    def check_budget(spec: ExploreSpec, options: ExploreOptions) -> None:
        """A budget of zero (`--max-states 0`) is an error before anything boots."""
        if options.max_states is not None:
            _budget(spec, options.max_states)

    # -- the whole cell ------------------------------------------------------------------

    def run(self) -> CellExploration:
        t0 = time.monotonic()
        try:
            self.on_phase("record")
            recorder = RecordingRunner(
                self.cell, self.directory, self._image(), accel=self.accel, out=self.out
            )
            recorded = recorder.record()
            self.entry["seconds"]["record"] = round(time.monotonic() - t0, 3)
            self.entry["record_timings"] = recorded.timings
            self.explore(recorded)
        except PowercutError as exc:
            log.warning("explore %s: %s", self.entry["id"], exc)
            self._set(status="error", verdict="error", reason=f"{type(exc).__name__}: {exc}"[:500])
        except KeyboardInterrupt:
            self._set(status="interrupted", verdict="error", reason="interrupted (Ctrl-C)")
            raise
        finally:
            self.entry["seconds"]["total"] = round(time.monotonic() - t0, 3)
            self._save(force=True)
        return CellExploration(self.entry, self.states, self.out)

    def _image(self) -> GuestImage:
        if self.image is None:
            raise ConfigError("exploring a cell needs a guest image")
        return self.image

    def _set(self, **values: Any) -> None:
        self.entry.update(values)
        self._save()

    def _save(self, force: bool = False) -> None:
        if self.doc is not None:
            if force:
                self.doc.save(force=True)
            else:
                self.doc.changed()

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
        self.entry.update(
            {
                "recording": _rel(rec.root, self.out),
                "final_image": _rel(recorded.final_image, self.out),
                "acks": len(rec.acks),
                "start_index": start,
                "log_records": wlog.records,
                "writes": len(timeline.writes),
                "points_total": len(timeline.points),
                "points": [
                    {**timeline.points[n].to_json(), "acked": self._acked_at[timeline.points[n].at]}
                    for n in explored_points
                ],
                "in_flight_at_end": rec.extra.get("in_flight_at_end"),
                "status": "host",
            }
        )
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
            self.on_phase("host")
            checking.start()
            if self.guest_wanted:
                guest = self._make_guest(recorded)
                guest.start()
            checking.join()
            if host_error:
                raise host_error[0]
            self._runner_cuts(recorded, states, host)
            if guest is not None:
                self.on_phase("guest")
                self._set(status="guest")
                self._guest_phase(guest, host)
            self.on_phase("minimize")
            self._set(status="minimize")
            self._minimize(host, guest)
        finally:
            self._stop.set()  # an interrupted host phase stops at its next state
            if checking.is_alive():
                checking.join()
            if guest is not None:
                guest.close()
            for hc in getattr(self, "_checkers", []):
                hc.close()
            for tmp in getattr(self, "_tmpdirs", []):
                shutil.rmtree(tmp, ignore_errors=True)
        self._verdict()

    def state_of(self, state_id: str) -> State:
        """An explored (or minimized) state of this cell by its id."""
        return self._state_map[state_id]

    def _make_guest(self, recorded: RecordedRun) -> Any:
        return self.options.guest_factory(
            self.directory / "checker",
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
        self._tmpdirs: list[Path] = getattr(self, "_tmpdirs", [])
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        for _ in range(n):
            work = Path(tempfile.mkdtemp(prefix="powercut-explore-", dir=shm))
            self._tmpdirs.append(work)
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
            entry = self._state_entry(result)
            self.states.append(entry)
            self._by_id[result.state.id] = entry
            self._count()
            self._save()

        explore_host(self._checkers, states, on_result=seen, cache=self._cache)
        # Keep enumeration order (workers deliver blocks out of order).
        order = {s.id: i for i, s in enumerate(states)}
        self.states.sort(key=lambda e: order.get(e["id"], 1 << 30))
        self.entry["seconds"]["host"] = round(time.monotonic() - t0, 3)
        self.entry["host_states_per_s"] = round(len(states) / max(1e-9, time.monotonic() - t0), 1)
        self._count()
        return results

    def _state_entry(self, result: HostResult) -> dict[str, Any]:
        raw = result.to_json()
        state = result.state
        checks = []
        if raw.get("oracle"):
            o = raw["oracle"]
            checks.append(
                {
                    "checker": ORACLE,
                    "role": ORACLE,
                    "ok": bool(o.get("ok")),
                    "corruption": int(o.get("corrupt", 0)) > 0,
                    "detail": f"{o.get('lost', 0)} sectors lost, {o.get('corrupt', 0)} corrupt "
                    f"({o.get('scope', '')})",
                }
            )
        for c in raw.get("checks", []):
            checks.append({**c, "role": FSCK, "where": "host"})
        entry = {
            "id": state.id,
            "point": raw["point"],
            "acked": self._acked_at[state.point.at],
            "policy": raw["policy"],
            "pending": raw["pending"],
            "lost": raw["lost"],
            "torn": raw["torn"],
            "digest": raw["digest"],
            "duplicate_of": raw["duplicate_of"],
            "sectors_differing": raw["sectors_differing"],
            "host_verdict": raw["verdict"],
            "oracle": raw.get("oracle"),
            "checks": checks,
            "guest": None,
            "seconds": raw["seconds"],
        }
        self._judge_state(entry)
        return entry

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
            self.entry["runner_cuts"] = {"error": str(exc)}
            return
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.entry["runner_cuts"] = {
            policy: {"state": images.get(digest), "same_image": digest in images}
            for policy, digest in cuts.items()
        }

    # -- in the guest --------------------------------------------------------------------

    def _guest_phase(self, guest: Any, host: dict[str, HostResult]) -> None:
        t0 = time.monotonic()
        rec = self.recorded.recording
        delta = self.directory / "state.delta"
        cache: dict[tuple[str, int], str] = {}
        stats = {"checks": 0, "same_image": 0, "decided_host_side": 0, "boot_seconds": 0.0}
        stats["boot_seconds"] = round(getattr(guest, "boot_seconds", 0.0), 3)
        verify_every = self.options.verify_every
        self._guest_builder = StateBuilder(self.timeline, rec.log, rec.base)
        try:
            for entry in self.states:
                result = host[entry["id"]]
                if result.failed:
                    entry["guest"] = {"skipped": f"decided host-side ({result.verdict})"}
                    stats["decided_host_side"] += 1
                    continue
                key = (result.digest, entry["acked"])
                if key in cache:
                    first = self._by_id[cache[key]]
                    entry["guest"] = {**(first.get("guest") or {}), "same_as": cache[key]}
                    entry["checks"] += [
                        dict(c) for c in first["checks"] if c.get("where") == "guest"
                    ]
                    self._judge_state(entry)
                    stats["same_image"] += 1
                    continue
                verify = bool(verify_every) and stats["checks"] % verify_every == 0
                fsck = self._fsck_undecided(entry)
                check = self._guest_check(guest, result.state, entry["acked"], delta, fsck, verify)
                if verify:
                    check_md5 = self._expected_md5(result.state)
                    entry["device_md5_expected"] = check_md5
                    entry["device_md5_matches"] = check.device_md5 == check_md5
                cache[key] = entry["id"]
                stats["checks"] += 1
                self._add_guest(entry, check)
                self._count()
                self._save()
        finally:
            self._guest_builder.close()
            delta.unlink(missing_ok=True)
            seconds = time.monotonic() - t0
            stats["seconds"] = round(seconds, 3)
            stats["states"] = len(self.states)
            stats["states_per_s"] = round(len(self.states) / max(seconds, 1e-9), 2)
            stats["checks_per_s"] = round(stats["checks"] / max(seconds, 1e-9), 2)
            self.entry["guest"] = stats
            self.entry["seconds"]["guest"] = round(seconds, 3)

    def _fsck_undecided(self, entry: dict[str, Any]) -> bool:
        """The host's filesystem checker could not judge (a log only a mount replays)."""
        return FSCK in self.cell.checkers and any(
            c.get("where") == "host" and c.get("ok") is None for c in entry["checks"]
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
        check: GuestCheck = guest.check(delta, run, guest_fsck=fsck, verify=verify)
        return check

    def _expected_md5(self, state: State) -> str:
        image = self.directory / "verify.img"
        try:
            self._guest_builder.replay(state, image)
            return file_md5(image, self.recorded.recording.image_size)
        finally:
            image.unlink(missing_ok=True)

    def _add_guest(self, entry: dict[str, Any], check: GuestCheck) -> None:
        entry["guest"] = check.to_json()
        own = self.workload.checker
        if check.mounted is not None:
            entry["checks"].append(
                {
                    "checker": "mount",
                    "role": FSCK,
                    "where": "guest",
                    "ok": check.mounted,
                    "detail": check.error or "" if not check.mounted else "mounted (recovered)",
                }
            )
        if check.observation is not None:
            obs = check.observation
            entry["checks"].append(
                {
                    "checker": own,
                    "role": own,
                    "where": "guest",
                    "ok": not (obs.loss or obs.corruption),
                    "corruption": obs.corruption,
                    "detail": obs.summary(),
                }
            )
        elif check.mounted is not False and check.error:
            entry["checks"].append(
                {"checker": own, "role": own, "where": "guest", "ok": None, "detail": check.error}
            )
        if check.fsck is not None:
            entry["checks"].append(
                {
                    "checker": check.fsck["command"].split()[0],
                    "role": FSCK,
                    "where": "guest",
                    "ok": bool(check.fsck["ok"]),
                    "detail": f"exit {check.fsck['exit']}: {check.fsck['output']}",
                }
            )
        self._judge_state(entry)

    # -- verdicts --------------------------------------------------------------------------

    def _judge_state(self, entry: dict[str, Any]) -> None:
        checks = entry["checks"]
        oracle_bad = any(c["role"] == ORACLE and c["ok"] is False for c in checks)
        other_bad = any(c["role"] != ORACLE and c["ok"] is False for c in checks)
        entry["verdict"] = "violation" if oracle_bad else "fail" if other_bad else "pass"
        broken = []
        for c in checks:
            if c["ok"] is not False:
                continue
            forbidden = self.expectations.get(c["role"], Outcome.INTACT) is Outcome.INTACT
            if forbidden or c.get("corruption"):
                broken.append(c["checker"])
        entry["contract_broken"] = bool(broken)
        entry["broken_by"] = broken
        if entry["verdict"] != "pass":
            entry["replay"] = self._replay_command(entry["id"])
        else:
            entry.pop("replay", None)

    def _replay_command(self, state_id: str) -> str:
        qualified = state_id if self.replay_prefix is None else f"{self.replay_prefix}{state_id}"
        image = re.sub(r"[^A-Za-z0-9_.-]+", "_", qualified) + ".img"
        return shlex.join(
            ["powercut", "explore", "replay", str(self.out), "--state", qualified, "--out", image]
        )

    def _count(self) -> None:
        states = self.states
        self.entry["states_explored"] = len(states)
        self.entry["states_unique"] = len({s["digest"] for s in states})
        self.entry["states_failing"] = sum(1 for s in states if s["verdict"] != "pass")
        self.entry["states_breaking_contract"] = sum(1 for s in states if s["contract_broken"])
        self.entry["check_seconds"] = round(
            sum(self.entry["seconds"].get(k, 0.0) for k in ("host", "guest")), 3
        )

    def _verdict(self) -> None:
        self._count()
        failing = self.entry["states_failing"]
        broken = self.entry["states_breaking_contract"]
        n = self.entry["states_explored"]
        if self.negative:
            ok = failing > 0
            reason = (
                f"loss detected: {failing} of {n} states fail"
                if ok
                else f"no loss detected in {n} states (a negative control must find some)"
            )
        else:
            ok = broken == 0
            reason = (
                f"all {n} states inside the contract ({failing} fail where it allows)"
                if ok
                else f"{broken} of {n} states break the contract"
            )
        first = next(
            (
                s
                for s in self.states
                if (s["contract_broken"] or (self.negative and s["verdict"] != "pass"))
            ),
            None,
        )
        if first is not None:
            reason += (
                f"; first: {first['id']} ({', '.join(first['broken_by']) or first['verdict']})"
            )
        self._set(status="done", verdict="pass" if ok else "fail", reason=reason)

    # -- minimization ------------------------------------------------------------------------

    def _minimize(self, host: dict[str, HostResult], guest: Any) -> None:
        if self.spec.minimize <= 0:
            return
        t0 = time.monotonic()
        wanted = [s for s in self.states if s["contract_broken"]]
        if not wanted and self.negative:
            wanted = [s for s in self.states if s["verdict"] != "pass"]
        for entry in wanted[: self.spec.minimize]:
            result = host[entry["id"]]
            try:
                self._shrink(entry, result, guest)
            except PowercutError as exc:
                entry["minimized"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            self._save()
        self.entry["seconds"]["minimize"] = round(time.monotonic() - t0, 3)

    def _shrink(self, entry: dict[str, Any], result: HostResult, guest: Any) -> None:
        state = result.state
        if not state.lost and not state.torn:
            entry["minimized"] = {"note": "this state loses no write: nothing to shrink"}
            return
        acked = entry["acked"]
        if result.failed:
            checker = self._checkers[0]
            verdict = result.verdict
            how = "host"

            def fails(s: State) -> bool:
                return checker.check(s).verdict == verdict

        elif guest is not None and not getattr(guest, "broken", None):
            how = "guest"
            delta = self.directory / "shrink.delta"
            rec = self.recorded.recording
            self._guest_builder = StateBuilder(self.timeline, rec.log, rec.base)
            fsck = self._fsck_undecided(entry)

            def fails(s: State) -> bool:
                return self._guest_check(guest, s, acked, delta, fsck).failed

        else:
            entry["minimized"] = {"note": "failed in the guest, which is gone: not shrunk"}
            return
        try:
            m = minimize_state(state, fails, max_checks=self.spec.minimize_checks)
        finally:
            if how == "guest":
                self._guest_builder.close()
                (self.directory / "shrink.delta").unlink(missing_ok=True)
        image = self.recorded.final_image
        ext = self.filesystem in ("ext2", "ext3", "ext4") and image.exists()
        writes = loss_report(self.timeline, m.state, image if ext else None)
        self._state_map[m.state.id] = m.state
        entry["minimized"] = {
            "id": m.state.id,
            "by": how,
            "checks": m.checks,
            "losses_before": len(state.lost) + len(state.torn),
            "losses_after": len(m.state.lost) + len(m.state.torn),
            "lost": list(m.state.lost),
            "torn": [{"seq": seq, "sectors_lost": list(s)} for seq, s in m.state.torn],
            "writes": writes,
            "state": m.state.to_json(),
            "replay": self._replay_command(m.state.id),
        }


class Interrupted(PowercutError):
    """The host-side checks were told to stop (the exploration was interrupted)."""


def _budget(spec: ExploreSpec, max_states: int) -> ExploreSpec:
    if max_states < 1:
        raise ConfigError(
            f"--max-states {max_states}: the exploration budget must be at least 1 state"
        )
    return dataclasses.replace(spec, max_states=max_states)


# -- replay ----------------------------------------------------------------------------------


def find_recorded_state(doc: dict[str, Any], state: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(cell entry, state JSON) for `--state`: ID, or N/ID (cell N's) when ids repeat."""
    cells = doc.get("cells", [])
    if "/" in state and state.split("/", 1)[0].isdigit():
        number, ident = state.split("/", 1)
        chosen = [c for c in cells if int(c.get("index", -1)) == int(number)]
        if not chosen:
            raise ConfigError(f"no cell {number} in this exploration ({len(cells)} cells)")
        cells, state = chosen, ident
    found = []
    everything: list[dict[str, Any]] = []
    for cell in cells:
        candidates = list(cell.get("states", []))
        candidates += [
            s["minimized"]["state"]
            for s in cell.get("states", [])
            if isinstance(s.get("minimized"), dict) and "state" in s["minimized"]
        ]
        everything += candidates
        for raw in candidates:
            if raw.get("id") == state:
                found.append((cell, raw))
    if not found:
        find_state(everything, state)  # raises the clear error
    if len(found) > 1:
        names = ", ".join(f"{c['index']}/{state}" for c, _raw in found)
        raise ConfigError(f"state {state!r} is in several cells; name one: {names}")
    return found[0]


def replay(directory: Path | str, state: str, out: Path | str) -> Path:
    """`powercut explore replay DIR --state ID --out IMAGE`."""
    directory = Path(directory)
    doc = load_doc(directory)
    cell, raw = find_recorded_state(doc, state)
    if "recording" not in cell:
        raise ConfigError(f"cell {cell.get('id')} was not recorded ({cell.get('reason')})")
    root = Path(cell["recording"])
    recording = open_recording(root if root.is_absolute() else directory / root)
    keep = Promise[cell["keep"]]
    return replay_state(recording, keep, raw, out)
