"""explore.json: what an exploration found, as typed records, and reading it back.

`powercut explore` writes DIR/explore.json as it goes (the writer is the
driver's, `harness/crash/explorer/run.py`); the report
(`harness/report/explore.py`), `explore replay`, the pytest helper and users'
scripts read it. Every part of the file is a frozen record here with
`to_json()` and `from_json()`, so writer and readers share one vocabulary:

    ExploreDocument       the file: the command, when, whether complete, the totals, the cells
      CellRecord          one cell: what was explored (mode, workload, promises, `[explore]`),
                          its status, verdict and reason, the counts, where the time went
        RecordingSummary  its recording: acknowledgements, writes, the points explored
        StateRecord       one crash state: where it was cut, what it lost, every checker's
                          word (`StateCheck`), the checker guest's (`GuestRecord`), its
                          verdict, and what minimization shrank it to (`Minimized`)
        RunnerCuts        whether the runner's own cuts at the end are explored states
        GuestStats        the checker guest's counts and rates

Two verdicts, two words: a cell's is the contract's `Verdict` (pass, fail,
error, skipped — as `powercut run`'s cells), a state's is `StateVerdict`,
which says who failed it: `violation` (the oracle caught the disk losing what
it promised), `fail` (a checker failed while the disk kept its promise),
`pass`. A cell's `checkers` map each checker to what it must report there
(`harness.crash.verdict.Outcome`'s values, as text: the engine sits below it).

A state no checker failed but some could not judge — the workload's check
did not run in the checker guest, or a host tool that cannot replay the log
said so and no mount followed — passed nothing: it is *unjudged*
(`unjudged_by`, counted in `states_unjudged`), and beyond the scenario's
`unjudged-states` it makes its cell an error rather than a pass.

The file's layout is its format: keys keep the order they have always been
written in (a record writes an optional part only when it was found, and new
keys join their record's without moving the others; readers ignore what they
do not know), so the records wrote the same bytes as the hand-built entries
before them; `tests/unit/explore/test_explore_run.py` round-trips real files.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.durability.contract import CacheMode, CutPolicy, Promise, Verdict, parse_policy
from harness.durability.oracle import OracleReport
from harness.errors import ConfigError
from harness.explore.causes import AckRisk, CauseGroup, Explanation
from harness.explore.cluster import ClusterState
from harness.explore.overlay import replay_state
from harness.explore.recording import open_recording
from harness.explore.spec import ExploreSpec
from harness.explore.states import Point, State, Write, find_state
from harness.jsonfile import load_document

DOC_NAME = "explore.json"
DOC_VERSION = 1


class StateVerdict(enum.Enum):
    """A crash state's verdict: who, if anyone, failed it."""

    PASS = "pass"  # every checker is content
    FAIL = "fail"  # the disk kept its promise, a checker failed: the software's (or fs config's)
    VIOLATION = "violation"  # the disk lost what it promised (the oracle): the disk's loss


class Where(enum.Enum):
    """Where a checker ran: on the host (a scratch view of the state) or in the checker guest."""

    HOST = "host"
    GUEST = "guest"


class CellStatus(enum.Enum):
    """How far a cell's exploration got (its phase while it runs)."""

    RECORDING = "recording"
    HOST = "host"
    GUEST = "guest"
    MINIMIZE = "minimize"
    DONE = "done"
    ERROR = "error"
    INTERRUPTED = "interrupted"
    SKIPPED = "skipped"  # cannot be explored (named before anything boots)


class Loss(enum.Enum):
    """How a state loses a write: all of it, or some of its sectors."""

    LOST = "lost"
    TORN = "torn"


def _torn_json(state: State) -> list[dict[str, Any]]:
    return [{"seq": seq, "sectors_lost": list(s)} for seq, s in state.torn]


# -- what the checkers said ---------------------------------------------------------------


@dataclass(frozen=True)
class OracleRecord:
    """The oracle's report on one state, judged against the log as of its point."""

    ok: bool
    lost: int
    corrupt: int
    must: int
    may: int
    contract: str
    scope: str  # "all" (the whole log), or "pending sectors" (the writes the point may lose)

    @classmethod
    def of(cls, report: OracleReport, scope: str) -> OracleRecord:
        return cls(
            report.ok,
            report.lost,
            report.corrupt,
            report.must,
            report.may,
            report.contract,
            scope,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "lost": self.lost,
            "corrupt": self.corrupt,
            "must": self.must,
            "may": self.may,
            "contract": self.contract,
            "scope": self.scope,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> OracleRecord:
        return cls(
            raw["ok"],
            raw["lost"],
            raw["corrupt"],
            raw["must"],
            raw["may"],
            raw["contract"],
            raw.get("scope", ""),
        )


@dataclass(frozen=True)
class StateCheck:
    """One checker's word on one crash state (an entry of a state's `checks`).

    `role` is what the verdict judges it as (`oracle`, `fsck`, or the
    workload's own checker); `ok` None: it could not judge. A host-side
    filesystem checker's entry is its `hostcheck.Finding` (checker, ok,
    detail, seconds) followed by its role and `where`; the others are written
    role first, the oracle's without `where` (it is the host's).
    """

    checker: str
    role: str
    ok: bool | None
    detail: str = ""
    where: Where | None = None
    corruption: bool | None = None  # None: the checker does not say
    seconds: float | None = None  # a host-side filesystem checker's time

    def to_json(self) -> dict[str, Any]:
        if self.seconds is not None:
            out: dict[str, Any] = {
                "checker": self.checker,
                "ok": self.ok,
                "detail": self.detail,
                "seconds": self.seconds,
                "role": self.role,
            }
            if self.where is not None:
                out["where"] = self.where.value
            return out
        out = {"checker": self.checker, "role": self.role}
        if self.where is not None:
            out["where"] = self.where.value
        out["ok"] = self.ok
        if self.corruption is not None:
            out["corruption"] = self.corruption
        out["detail"] = self.detail
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> StateCheck:
        where = raw.get("where")
        return cls(
            str(raw["checker"]),
            str(raw["role"]),
            raw.get("ok"),
            str(raw.get("detail", "")),
            Where(where) if where is not None else None,
            raw.get("corruption"),
            raw.get("seconds"),
        )


@dataclass(frozen=True)
class CheckSummary:
    """The workload's own check of a state, in the checker guest (its `Observation`)."""

    loss: bool
    corruption: bool
    summary: str
    lost: tuple[str, ...] = ()  # the acknowledged tokens it did not find (command workloads)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "loss": self.loss,
            "corruption": self.corruption,
            "summary": self.summary,
        }
        if self.lost:
            out["lost"] = list(self.lost)
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> CheckSummary:
        lost = tuple(str(t) for t in raw.get("lost", []))
        return cls(raw["loss"], raw["corruption"], str(raw["summary"]), lost)


@dataclass(frozen=True)
class GuestFsck:
    """The filesystem's checker in the checker guest, after the state was released."""

    command: str
    exit: int | None
    ok: bool
    output: str  # its last lines

    def to_json(self) -> dict[str, Any]:
        return {"command": self.command, "exit": self.exit, "ok": self.ok, "output": self.output}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> GuestFsck:
        return cls(str(raw["command"]), raw.get("exit"), raw["ok"], str(raw.get("output", "")))


@dataclass(frozen=True)
class GuestRecord:
    """What the checker guest made of one state (a state's `guest`), or why it was not asked."""

    mounted: bool | None = None  # None: the workload needs no filesystem
    seconds: float = 0.0
    check: CheckSummary | None = None  # None: the workload's check did not run (or raised)
    error: str | None = None  # the check could not judge, or the mount's error
    fsck: GuestFsck | None = None
    device_md5: str | None = None  # the device as the guest read it (`--verify-every`)
    ms: Mapping[str, int] = field(default_factory=dict)  # the helper's: mount, command, release
    same_as: str | None = None  # an identical image at the same acknowledgement count
    skipped: str | None = None  # not checked in the guest, and why (decided host-side)

    def to_json(self) -> dict[str, Any]:
        if self.skipped is not None:
            return {"skipped": self.skipped}
        out: dict[str, Any] = {"mounted": self.mounted, "seconds": self.seconds}
        if self.check is not None:
            out["check"] = self.check.to_json()
        if self.error:
            out["error"] = self.error
        if self.fsck is not None:
            out["fsck"] = self.fsck.to_json()
        if self.device_md5:
            out["device_md5"] = self.device_md5
        if self.ms:
            out["ms"] = dict(self.ms)
        if self.same_as is not None:
            out["same_as"] = self.same_as
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> GuestRecord:
        if "skipped" in raw:
            return cls(skipped=str(raw["skipped"]))
        check, fsck = raw.get("check"), raw.get("fsck")
        return cls(
            mounted=raw.get("mounted"),
            seconds=raw.get("seconds", 0.0),
            check=CheckSummary.from_json(check) if check is not None else None,
            error=raw.get("error"),
            fsck=GuestFsck.from_json(fsck) if fsck is not None else None,
            device_md5=raw.get("device_md5"),
            ms=dict(raw.get("ms") or {}),
            same_as=raw.get("same_as"),
        )


# -- minimization -------------------------------------------------------------------------


@dataclass(frozen=True)
class LostWrite:
    """A write a state loses or tears: where and when it was, and what its blocks hold."""

    loss: Loss
    seq: int
    op: str
    offset: int
    length: int
    fua: bool
    submit_index: int
    complete_index: int | None
    flush_epoch: int
    holds: tuple[str, ...] = ()  # ext4: what its blocks hold (`harness.explore.attribute`)
    sectors_lost: tuple[int, ...] | None = None  # torn: the sectors it loses

    @classmethod
    def of(
        cls, write: Write, loss: Loss, holds: Iterable[str], sectors: Iterable[int] = ()
    ) -> LostWrite:
        return cls(
            loss,
            write.seq,
            write.op.label,
            write.offset,
            write.length,
            write.fua,
            write.submit_index,
            write.complete_index,
            write.epoch,
            tuple(holds),
            tuple(sectors) if loss is Loss.TORN else None,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "loss": self.loss.value,
            "seq": self.seq,
            "op": self.op,
            "offset": self.offset,
            "length": self.length,
            "fua": self.fua,
            "submit_index": self.submit_index,
            "complete_index": self.complete_index,
            "flush_epoch": self.flush_epoch,
        }
        if self.sectors_lost is not None:
            out["sectors_lost"] = list(self.sectors_lost)
        out["holds"] = list(self.holds)
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> LostWrite:
        sectors = raw.get("sectors_lost")
        return cls(
            Loss(raw["loss"]),
            int(raw["seq"]),
            str(raw["op"]),
            int(raw["offset"]),
            int(raw["length"]),
            raw["fua"],
            int(raw["submit_index"]),
            raw.get("complete_index"),
            int(raw["flush_epoch"]),
            tuple(raw.get("holds", [])),
            tuple(sectors) if sectors is not None else None,
        )


@dataclass(frozen=True)
class Minimized:
    """A failing state shrunk by delta debugging (a state's `minimized`), or why it was not."""

    state: State | None = None  # the smallest failing state found (replayable by its id)
    by: Where | None = None  # whose check judged the candidates
    checks: int = 0
    losses_before: int = 0
    losses_after: int = 0
    writes: tuple[LostWrite, ...] = ()
    replay: str = ""
    note: str | None = None  # not shrunk: why
    error: str | None = None  # shrinking failed: how

    def to_json(self) -> dict[str, Any]:
        if self.state is None or self.by is None:
            return {"error": self.error} if self.error is not None else {"note": self.note}
        return {
            "id": self.state.id,
            "by": self.by.value,
            "checks": self.checks,
            "losses_before": self.losses_before,
            "losses_after": self.losses_after,
            "lost": list(self.state.lost),
            "torn": _torn_json(self.state),
            "writes": [w.to_json() for w in self.writes],
            "state": self.state.to_json(),
            "replay": self.replay,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Minimized:
        if "state" not in raw:
            return cls(note=raw.get("note"), error=raw.get("error"))
        return cls(
            State.from_json(raw["state"]),
            Where(raw["by"]),
            int(raw["checks"]),
            int(raw["losses_before"]),
            int(raw["losses_after"]),
            tuple(LostWrite.from_json(w) for w in raw.get("writes", [])),
            str(raw.get("replay", "")),
        )


# -- one state ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StateRecord:
    """One explored crash state: the state, every checker's word on it, and its verdict."""

    state: State
    acked: int  # acknowledgements received by its point
    digest: str  # its image's content hash
    duplicate_of: str | None  # the first state with the same image (its checks were reused)
    sectors_differing: int  # from the base
    host_verdict: StateVerdict
    oracle: OracleRecord | None
    checks: tuple[StateCheck, ...]
    seconds: float  # host side
    verdict: StateVerdict
    contract_broken: bool = False  # it fails where the contract says it must not
    broken_by: tuple[str, ...] = ()  # the checkers that say so
    # A state no checker failed, where some check could not judge it and nothing else in its
    # role did (the workload's check could not run; a host tool that cannot replay the log
    # with no mount after it): those checkers. It passed nothing: it was not judged.
    unjudged_by: tuple[str, ...] = ()
    guest: GuestRecord | None = None
    device_md5_expected: str | None = None  # `--verify-every`: the state's own MD5 ...
    device_md5_matches: bool | None = None  # ... and whether the guest's device showed it
    replay: str | None = None  # the command that rebuilds a failing state as an image
    minimized: Minimized | None = None
    explanation: Explanation | None = None  # a failing state of a traced run: why it was lost

    @property
    def id(self) -> str:
        return self.state.id

    @property
    def point(self) -> Point:
        return self.state.point

    @property
    def failed(self) -> bool:
        return self.verdict is not StateVerdict.PASS

    @property
    def unjudged(self) -> bool:
        return bool(self.unjudged_by)

    def to_json(self) -> dict[str, Any]:
        s = self.state
        out: dict[str, Any] = {
            "id": s.id,
            "point": s.point.to_json(),
            "acked": self.acked,
            "policy": s.policy.value,
            "pending": s.pending,
            "lost": list(s.lost),
            "torn": _torn_json(s),
            "digest": self.digest,
            "duplicate_of": self.duplicate_of,
            "sectors_differing": self.sectors_differing,
            "host_verdict": self.host_verdict.value,
            "oracle": self.oracle.to_json() if self.oracle is not None else {},
            "checks": [c.to_json() for c in self.checks],
            "guest": self.guest.to_json() if self.guest is not None else None,
            "seconds": self.seconds,
            "verdict": self.verdict.value,
            "contract_broken": self.contract_broken,
            "broken_by": list(self.broken_by),
            "unjudged_by": list(self.unjudged_by),
        }
        if self.device_md5_expected is not None:
            out["device_md5_expected"] = self.device_md5_expected
            out["device_md5_matches"] = self.device_md5_matches
        if self.replay is not None:
            out["replay"] = self.replay
        if self.minimized is not None:
            out["minimized"] = self.minimized.to_json()
        if self.explanation is not None:
            out["explanation"] = self.explanation.to_json()
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> StateRecord:
        oracle, guest, minimized = raw.get("oracle"), raw.get("guest"), raw.get("minimized")
        explanation = raw.get("explanation")
        return cls(
            state=State.from_json(raw),
            acked=int(raw.get("acked", 0)),
            digest=str(raw["digest"]),
            duplicate_of=raw.get("duplicate_of"),
            sectors_differing=int(raw.get("sectors_differing", 0)),
            host_verdict=StateVerdict(raw["host_verdict"]),
            oracle=OracleRecord.from_json(oracle) if oracle else None,
            checks=tuple(StateCheck.from_json(c) for c in raw.get("checks", [])),
            seconds=raw.get("seconds", 0.0),
            verdict=StateVerdict(raw["verdict"]),
            contract_broken=bool(raw.get("contract_broken", False)),
            broken_by=tuple(raw.get("broken_by", [])),
            unjudged_by=tuple(raw.get("unjudged_by", [])),
            guest=GuestRecord.from_json(guest) if guest is not None else None,
            device_md5_expected=raw.get("device_md5_expected"),
            device_md5_matches=raw.get("device_md5_matches"),
            replay=raw.get("replay"),
            minimized=Minimized.from_json(minimized) if minimized is not None else None,
            explanation=Explanation.from_json(explanation) if explanation is not None else None,
        )


# -- a cluster's states -------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterShrunk:
    """A failing cluster state shrunk: the nodes that must deviate, then their writes."""

    state: ClusterState | None = None  # the smallest failing combination found
    nodes: tuple[str, ...] = ()  # the nodes that must deviate from keep-all
    node_checks: int = 0
    write_checks: int = 0
    losses_before: int = 0
    losses_after: int = 0
    unjudged: int = 0  # candidates that could not be judged (taken as not failing)
    note: str | None = None  # not shrunk: why
    error: str | None = None  # shrinking failed: how

    def to_json(self) -> dict[str, Any]:
        if self.state is None:
            return {"error": self.error} if self.error is not None else {"note": self.note}
        return {
            "id": self.state.id,
            "nodes": list(self.nodes),
            "node_checks": self.node_checks,
            "write_checks": self.write_checks,
            "losses_before": self.losses_before,
            "losses_after": self.losses_after,
            "unjudged": self.unjudged,
            "describe": self.state.describe(),
            "state": self.state.to_json(),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ClusterShrunk:
        if "state" not in raw:
            return cls(note=raw.get("note"), error=raw.get("error"))
        return cls(
            ClusterState.from_json(raw["state"]),
            tuple(str(n) for n in raw.get("nodes", [])),
            int(raw.get("node_checks", 0)),
            int(raw.get("write_checks", 0)),
            int(raw.get("losses_before", 0)),
            int(raw.get("losses_after", 0)),
            int(raw.get("unjudged", 0)),
        )


@dataclass(frozen=True)
class ClusterStateRecord:
    """One cluster state checked: every node booted on its state, the client's check, the
    cluster's verdict (harness/crash/cluster_verdict.py)."""

    state: ClusterState
    verdict: StateVerdict  # FAIL: the client's check saw loss or damage
    contract_broken: bool  # the cluster verdict fails it where the contract allows no loss
    reason: str  # the cluster verdict's words (or why it was not judged)
    client: str = ""  # the client's check, summarised
    lost: tuple[str, ...] = ()  # acknowledged tokens the check did not find
    unjudged: str = ""  # why no verdict (a boot, ready or check that could not finish)
    seconds: float = 0.0
    directory: str | None = None  # its nodes' consoles and logs, kept when it did not pass
    minimized: ClusterShrunk | None = None

    @property
    def id(self) -> str:
        return self.state.id

    @property
    def failed(self) -> bool:
        return self.verdict is not StateVerdict.PASS

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.state.id,
            "describe": self.state.describe(),
            "state": self.state.to_json(),
            "verdict": self.verdict.value,
            "contract_broken": self.contract_broken,
            "reason": self.reason,
            "client": self.client,
            "lost": list(self.lost),
            "unjudged": self.unjudged,
            "seconds": self.seconds,
        }
        if self.directory is not None:
            out["directory"] = self.directory
        if self.minimized is not None:
            out["minimized"] = self.minimized.to_json()
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ClusterStateRecord:
        minimized = raw.get("minimized")
        return cls(
            ClusterState.from_json(raw["state"]),
            StateVerdict(raw["verdict"]),
            bool(raw.get("contract_broken", False)),
            str(raw.get("reason", "")),
            str(raw.get("client", "")),
            tuple(str(t) for t in raw.get("lost", [])),
            str(raw.get("unjudged", "")),
            float(raw.get("seconds", 0.0)),
            raw.get("directory"),
            ClusterShrunk.from_json(minimized) if minimized is not None else None,
        )


@dataclass(frozen=True)
class ClusterRecord:
    """A cluster cell's exploration: its nodes' recordings on one clock, the states checked."""

    nodes: Mapping[str, str]  # node -> its cache mode
    recordings: Mapping[str, str]  # node -> its recording's directory (relative to the run)
    acks: int = 0  # the client's acknowledgements recorded
    points: int = 0  # cluster points (every ack, and the end)
    writes: Mapping[str, int] = field(default_factory=dict)  # node -> writes recorded
    states: tuple[ClusterStateRecord, ...] = ()
    states_per_s: float | None = None  # cluster states checked per second of checking

    @property
    def failing(self) -> list[ClusterStateRecord]:
        return [s for s in self.states if s.failed]

    @property
    def breaking(self) -> list[ClusterStateRecord]:
        return [s for s in self.states if s.contract_broken]

    @property
    def unjudged(self) -> list[ClusterStateRecord]:
        return [s for s in self.states if s.unjudged]

    def counts(self, check_seconds: float) -> Counts:
        return Counts(
            len(self.states),
            len({s.state.key for s in self.states}),
            len(self.failing),
            len(self.breaking),
            len(self.unjudged),
            check_seconds,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": dict(self.nodes),
            "recordings": dict(self.recordings),
            "acks": self.acks,
            "points": self.points,
            "writes": dict(self.writes),
            "states_per_s": self.states_per_s,
            "states": [s.to_json() for s in self.states],
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ClusterRecord:
        return cls(
            dict(raw.get("nodes", {})),
            dict(raw.get("recordings", {})),
            int(raw.get("acks", 0)),
            int(raw.get("points", 0)),
            {str(k): int(v) for k, v in raw.get("writes", {}).items()},
            tuple(ClusterStateRecord.from_json(s) for s in raw.get("states", [])),
            raw.get("states_per_s"),
        )


# -- one cell -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExploredPoint:
    """A persistence point some explored state is cut at, with the acknowledgements by then."""

    point: Point
    acked: int

    def to_json(self) -> dict[str, Any]:
        return {**self.point.to_json(), "acked": self.acked}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ExploredPoint:
        return cls(Point.from_json(raw), int(raw["acked"]))


@dataclass(frozen=True)
class RecordingSummary:
    """A cell's recording: where it is (relative to the exploration's directory) and its size."""

    recording: str
    final_image: str
    acks: int
    start_index: int  # the log record where the workload's run started
    log_records: int
    writes: int
    points_total: int
    points: tuple[ExploredPoint, ...]  # the points explored
    in_flight_at_end: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "recording": self.recording,
            "final_image": self.final_image,
            "acks": self.acks,
            "start_index": self.start_index,
            "log_records": self.log_records,
            "writes": self.writes,
            "points_total": self.points_total,
            "points": [p.to_json() for p in self.points],
            "in_flight_at_end": self.in_flight_at_end,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RecordingSummary:
        return cls(
            str(raw["recording"]),
            str(raw["final_image"]),
            int(raw["acks"]),
            int(raw["start_index"]),
            int(raw["log_records"]),
            int(raw["writes"]),
            int(raw["points_total"]),
            tuple(ExploredPoint.from_json(p) for p in raw.get("points", [])),
            raw.get("in_flight_at_end"),
        )


@dataclass(frozen=True)
class RunnerCut:
    """What one of the runner's cuts at the end left: the explored state with that image."""

    policy: CutPolicy
    state: str | None
    same_image: bool


@dataclass(frozen=True)
class RunnerCuts:
    """Whether the runner's own cuts at the end are among the explored states."""

    cuts: tuple[RunnerCut, ...] = ()
    error: str | None = None  # they could not be computed

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error}
        return {c.policy.value: {"state": c.state, "same_image": c.same_image} for c in self.cuts}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RunnerCuts:
        if "error" in raw:
            return cls(error=str(raw["error"]))
        return cls(
            tuple(
                RunnerCut(parse_policy(policy), v.get("state"), bool(v.get("same_image")))
                for policy, v in raw.items()
            )
        )


@dataclass(frozen=True)
class GuestStats:
    """The checker guest's work on one cell."""

    checks: int  # states mounted and checked
    same_image: int  # identical to one checked at the same acknowledgement count
    decided_host_side: int  # failed host-side: not sent to the guest
    boot_seconds: float
    seconds: float
    states: int
    states_per_s: float
    checks_per_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            "checks": self.checks,
            "same_image": self.same_image,
            "decided_host_side": self.decided_host_side,
            "boot_seconds": self.boot_seconds,
            "seconds": self.seconds,
            "states": self.states,
            "states_per_s": self.states_per_s,
            "checks_per_s": self.checks_per_s,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> GuestStats:
        return cls(
            int(raw.get("checks", 0)),
            int(raw.get("same_image", 0)),
            int(raw.get("decided_host_side", 0)),
            raw.get("boot_seconds", 0.0),
            raw.get("seconds", 0.0),
            int(raw.get("states", 0)),
            raw.get("states_per_s", 0.0),
            raw.get("checks_per_s", 0.0),
        )


PHASES = ("record", "host", "guest", "minimize", "explain", "total")


@dataclass(frozen=True)
class PhaseSeconds:
    """Where a cell's time went, by phase (a phase that did not run is absent)."""

    record: float | None = None
    host: float | None = None
    guest: float | None = None
    minimize: float | None = None
    explain: float | None = None
    total: float | None = None

    def to_json(self) -> dict[str, float]:
        return {p: v for p in PHASES if (v := getattr(self, p)) is not None}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PhaseSeconds:
        return cls(**{p: raw[p] for p in PHASES if p in raw})


@dataclass(frozen=True)
class Counts:
    """A cell's states (or a whole exploration's), counted."""

    states_explored: int = 0
    states_unique: int = 0  # distinct images
    states_failing: int = 0  # some checker failed (allowed or not)
    states_breaking_contract: int = 0  # failing where the contract says it must not
    states_unjudged: int = 0  # not failing, and not judged either (`StateRecord.unjudged`)
    check_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "states_explored": self.states_explored,
            "states_unique": self.states_unique,
            "states_failing": self.states_failing,
            "states_breaking_contract": self.states_breaking_contract,
            "states_unjudged": self.states_unjudged,
            "check_seconds": self.check_seconds,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Counts:
        return cls(
            int(raw.get("states_explored", 0)),
            int(raw.get("states_unique", 0)),
            int(raw.get("states_failing", 0)),
            int(raw.get("states_breaking_contract", 0)),
            int(raw.get("states_unjudged", 0)),
            raw.get("check_seconds", 0.0),
        )

    @classmethod
    def of_states(cls, states: Iterable[StateRecord], check_seconds: float) -> Counts:
        states = list(states)
        return cls(
            len(states),
            len({s.digest for s in states}),
            sum(1 for s in states if s.failed),
            sum(1 for s in states if s.contract_broken),
            sum(1 for s in states if s.unjudged),
            check_seconds,
        )

    @classmethod
    def total(cls, parts: Iterable[Counts]) -> Counts:
        parts = list(parts)
        return cls(
            sum(c.states_explored for c in parts),
            sum(c.states_unique for c in parts),
            sum(c.states_failing for c in parts),
            sum(c.states_breaking_contract for c in parts),
            sum(c.states_unjudged for c in parts),
            round(sum(float(c.check_seconds) for c in parts), 3),
        )


@dataclass(frozen=True)
class CellRecord:
    """One cell's exploration: what was explored, how far it got, and every state checked."""

    index: int
    id: str  # the cell's id with its fault folded away: mode/explore/workload/cut/rN
    scenario: str
    status: CellStatus
    verdict: Verdict | None = None  # None: not judged yet
    reason: str = ""
    states: tuple[StateRecord, ...] = ()
    counts: Counts = Counts()
    cell: str = ""  # the scenario cell it was made from
    scenario_path: str = ""
    mode: CacheMode | None = None
    workload: str = ""
    workload_kind: str = ""
    filesystem: str | None = None
    mount_options: str = ""
    cut: str = ""
    expect: str = "contract"  # the scenario's `expect` ("violation": a negative control)
    seed: int = 0
    keep: Promise | None = None  # what the disk keeps: the states enumerated
    judge: Promise | None = None  # what the guest was promised: the oracle's reference
    lying_flush: bool = False
    checkers: Mapping[str, str] = field(default_factory=dict)  # checker -> must report
    explore: ExploreSpec | None = None  # the `[explore]` table in effect
    seconds: PhaseSeconds = PhaseSeconds()
    record_timings: Mapping[str, float] | None = None  # the recording's phases
    recorded: RecordingSummary | None = None
    host_states_per_s: float | None = None
    runner_cuts: RunnerCuts | None = None
    guest: GuestStats | None = None
    cluster: ClusterRecord | None = None  # a cluster cell's states (`states` is empty)
    trace: str | None = None  # how the recording's run was traced (None: not a traced workload)
    causes: tuple[CauseGroup, ...] = ()  # the failing states by cause, one line each
    at_risk: tuple[AckRisk, ...] = ()  # at every acknowledgement, what was not yet durable
    kept: tuple[str, ...] = ()  # what the filesystem kept that the calls never made durable

    @classmethod
    def skipped(cls, index: int, id: str, scenario: str, reason: str) -> CellRecord:
        """A cell that cannot be explored, named in the file without anything run."""
        return cls(index, id, scenario, CellStatus.SKIPPED, Verdict.SKIPPED, reason)

    @property
    def passed(self) -> bool:
        return self.verdict is Verdict.PASS

    @property
    def points(self) -> tuple[ExploredPoint, ...]:
        return self.recorded.points if self.recorded is not None else ()

    def to_json(self) -> dict[str, Any]:
        verdict = self.verdict.value if self.verdict is not None else None
        states = [s.to_json() for s in self.states]
        if self.status is CellStatus.SKIPPED:
            return {
                "id": self.id,
                "scenario": self.scenario,
                "status": self.status.value,
                "reason": self.reason,
                "index": self.index,
                "verdict": verdict,
                "states": states,
            }
        out: dict[str, Any] = {
            "index": self.index,
            "id": self.id,
            "cell": self.cell,
            "scenario": self.scenario,
            "scenario_path": self.scenario_path,
            "mode": self.mode.value if self.mode is not None else None,
            "workload": self.workload,
            "workload_kind": self.workload_kind,
            "filesystem": self.filesystem,
            "mount_options": self.mount_options,
            "cut": self.cut,
            "expect": self.expect,
            "seed": self.seed,
            "keep": self.keep.name if self.keep is not None else None,
            "judge": self.judge.name if self.judge is not None else None,
            "lying_flush": self.lying_flush,
            "checkers": dict(self.checkers),
            "explore": self.explore.to_json() if self.explore is not None else None,
            "status": self.status.value,
            "verdict": verdict,
            "reason": self.reason,
            **self.counts.to_json(),
            "seconds": self.seconds.to_json(),
            "states": states,
        }
        if self.record_timings is not None:
            out["record_timings"] = dict(self.record_timings)
        if self.recorded is not None:
            out.update(self.recorded.to_json())
        if self.host_states_per_s is not None:
            out["host_states_per_s"] = self.host_states_per_s
        if self.runner_cuts is not None:
            out["runner_cuts"] = self.runner_cuts.to_json()
        if self.guest is not None:
            out["guest"] = self.guest.to_json()
        if self.cluster is not None:
            out["cluster"] = self.cluster.to_json()
        if self.trace is not None:
            out["trace"] = self.trace
            out["causes"] = [g.to_json() for g in self.causes]
            out["at_risk"] = [r.to_json() for r in self.at_risk]
            out["kept"] = list(self.kept)
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> CellRecord:
        verdict, mode, keep, judge = (raw.get(k) for k in ("verdict", "mode", "keep", "judge"))
        explore, cuts, guest = (raw.get(k) for k in ("explore", "runner_cuts", "guest"))
        return cls(
            index=int(raw["index"]),
            id=str(raw["id"]),
            scenario=str(raw.get("scenario", "")),
            status=CellStatus(raw["status"]),
            verdict=Verdict(verdict) if verdict is not None else None,
            reason=str(raw.get("reason", "")),
            states=tuple(StateRecord.from_json(s) for s in raw.get("states", [])),
            counts=Counts.from_json(raw),
            cell=str(raw.get("cell", "")),
            scenario_path=str(raw.get("scenario_path", "")),
            mode=CacheMode(mode) if mode is not None else None,
            workload=str(raw.get("workload", "")),
            workload_kind=str(raw.get("workload_kind", "")),
            filesystem=raw.get("filesystem"),
            mount_options=raw.get("mount_options", ""),
            cut=str(raw.get("cut", "")),
            expect=str(raw.get("expect", "contract")),
            seed=int(raw.get("seed", 0)),
            keep=Promise[keep] if keep is not None else None,
            judge=Promise[judge] if judge is not None else None,
            lying_flush=bool(raw.get("lying_flush", False)),
            checkers=dict(raw.get("checkers") or {}),
            explore=ExploreSpec.from_json(explore) if explore is not None else None,
            seconds=PhaseSeconds.from_json(raw.get("seconds") or {}),
            record_timings=raw.get("record_timings"),
            recorded=RecordingSummary.from_json(raw) if "recording" in raw else None,
            host_states_per_s=raw.get("host_states_per_s"),
            runner_cuts=RunnerCuts.from_json(cuts) if cuts is not None else None,
            guest=GuestStats.from_json(guest) if guest is not None else None,
            cluster=ClusterRecord.from_json(raw["cluster"]) if raw.get("cluster") else None,
            trace=raw.get("trace"),
            causes=tuple(CauseGroup.from_json(g) for g in raw.get("causes", [])),
            at_risk=tuple(AckRisk.from_json(r) for r in raw.get("at_risk", [])),
            kept=tuple(str(k) for k in raw.get("kept", [])),
        )

    @property
    def failing(self) -> list[StateRecord]:
        """States where a checker failed (allowed or not), in the order they were explored."""
        return [s for s in self.states if s.failed]

    @property
    def breaking(self) -> list[StateRecord]:
        """States that fail where the contract says they must not."""
        return [s for s in self.states if s.contract_broken]

    @property
    def unjudged(self) -> list[StateRecord]:
        """States that no checker failed and some could not judge: neither pass nor fail."""
        return [s for s in self.states if s.unjudged]


# -- the file -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExploreDocument:
    """DIR/explore.json: the whole exploration."""

    command: str
    started: str
    finished: str | None = None
    complete: bool = False  # every cell done (or skipped), nothing interrupted
    interrupted: bool = False
    ok: bool | None = None  # None: not finished
    counts: Counts = Counts()  # the cells' totals
    cells: tuple[CellRecord, ...] = ()
    version: int = DOC_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "command": self.command,
            "started": self.started,
            "finished": self.finished,
            "complete": self.complete,
            "interrupted": self.interrupted,
            "ok": self.ok,
            **self.counts.to_json(),
            "cells": [c.to_json() for c in self.cells],
        }

    def text(self) -> str:
        """The file's text."""
        return json.dumps(self.to_json(), indent=1) + "\n"

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ExploreDocument:
        return cls(
            command=str(raw.get("command", "")),
            started=str(raw.get("started", "")),
            finished=raw.get("finished"),
            complete=bool(raw.get("complete", False)),
            interrupted=bool(raw.get("interrupted", False)),
            ok=raw.get("ok"),
            counts=Counts.from_json(raw),
            cells=tuple(CellRecord.from_json(c) for c in raw.get("cells", [])),
            version=int(raw.get("version", DOC_VERSION)),
        )

    def find_state(self, state: str) -> tuple[CellRecord, State]:
        """(cell, state) for `--state`: ID, or N/ID (cell N's) when ids repeat; explored and
        minimized states alike."""
        cells: Iterable[CellRecord] = self.cells
        if "/" in state and state.split("/", 1)[0].isdigit():
            number, ident = state.split("/", 1)
            chosen = [c for c in self.cells if c.index == int(number)]
            if not chosen:
                raise ConfigError(f"no cell {number} in this exploration ({len(self.cells)} cells)")
            cells, state = chosen, ident
        found: list[tuple[CellRecord, State]] = []
        everything: list[State] = []
        for cell in cells:
            candidates = [s.state for s in cell.states]
            candidates += [
                s.minimized.state
                for s in cell.states
                if s.minimized is not None and s.minimized.state is not None
            ]
            everything += candidates
            found += [(cell, s) for s in candidates if s.id == state]
        if not found:
            find_state(everything, state)  # raises the clear error
        if len(found) > 1:
            names = ", ".join(f"{c.index}/{state}" for c, _s in found)
            raise ConfigError(f"state {state!r} is in several cells; name one: {names}")
        return found[0]


def load_doc(directory: Path | str) -> ExploreDocument:
    """DIR/explore.json, or a clear error when DIR holds no exploration this powercut reads."""
    path = Path(directory) / DOC_NAME
    data = load_document(
        path,
        "an exploration file",
        document="an exploration",
        version=DOC_VERSION,
        marker="cells",
        missing=(
            f"{directory} holds no exploration ({DOC_NAME} is missing); run powercut explore first"
        ),
    )
    return ExploreDocument.from_json(data)


def replay(directory: Path | str, state: str, out: Path | str) -> Path:
    """`powercut explore replay DIR --state ID --out IMAGE`."""
    directory = Path(directory)
    cell, found = load_doc(directory).find_state(state)
    if cell.recorded is None or cell.keep is None:
        raise ConfigError(f"cell {cell.id} was not recorded ({cell.reason})")
    root = Path(cell.recorded.recording)
    recording = open_recording(root if root.is_absolute() else directory / root)
    return replay_state(recording, cell.keep, found, out)
