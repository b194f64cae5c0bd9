"""Persistence points and the crash states at each: what the contract lets a power cut leave.

A recorded run's write log is a total order of events (`harness.durability.writelog`).
A *persistence point* is a place in that order where the workload learns
something is durable: each completed flush, each completed FUA write, each
acknowledgement of the workload (`Ack`), and the end of the run (where the
runner cuts). A point is a log record index `at`: the cut happens after every
record before it. A flush's or FUA write's point is the instant *before* its
completion: the writes it is about to make durable are still pending there
(the richest set of states), and the state right after the completion is that
point's keep-all.

At a point, the writes submitted so far split in two by the promise that
decides what the disk keeps (`Promise.durable`, as the oracle reads it, with
completions and flushes counted only if they happened before `at`): the
durable ones are on the disk in every state; the others — completed but not
made durable, failed, or still in flight — are *pending*, and a host power cut
may lose any of them, in any subset, torn at sector granularity. A *state* is
one choice: the pending writes it loses entirely (`lost`) and the sectors it
loses of others (`torn`); every other write is kept.

The choices follow the runner's cut policies (`CutPolicy`): lose-all, keep-all,
ordered prefixes of the pending writes in completion order (the host wrote back
in order and stopped), seeded random subsets, and torn writes. States come out
in a fixed order — lose-all and keep-all at every point first, then the other
policies point by point — so a budget keeps the states that matter most, and
the same recording, options and seed always give the same states with the
same ids (`p<point>-<policy>-<n>`).

Two promises may differ: `keep` decides what the disk keeps (a correct disk:
its cache mode's promise; a disk under test that lies: `Promise.NOTHING`, as
unsafe's flushes never reach it), the oracle later judges against what the
guest was told. Every state enumerated under `keep` is inside `keep`'s
contract by construction; `hostcheck` asserts it with the oracle.
"""

from __future__ import annotations

import bisect
import enum
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.durability.contract import (
    CacheMode,
    CutPolicy,
    Promise,
    host_cut_promise,
    parse_policy,
)
from harness.durability.writelog import Op, WriteLog
from harness.errors import ConfigError
from harness.explore.recording import Ack

NEVER = 1 << 62  # a write that never becomes durable / never completed
DEFAULT_POLICIES = (
    CutPolicy.LOSE_ALL,
    CutPolicy.KEEP_ALL,
    CutPolicy.PREFIX,
    CutPolicy.RANDOM,
    CutPolicy.TORN,
)


def disk_promise(mode: CacheMode, *, lying_flush: bool = False) -> Promise:
    """What a disk in `mode` really keeps across a host power cut: the states to enumerate.

    Unsafe's flushes never reach the disk, nor do a lying disk's (blkdebug
    `lying-flush`, which the log cannot see: its flushes complete), so such a
    disk keeps nothing; judge its states by `reference_promise` (what its
    flushes told the guest) to catch it.
    """
    return Promise.NOTHING if lying_flush else host_cut_promise(mode)


class PointKind(enum.Enum):
    """The persistence points a cut may follow (a scenario's `[explore] points`)."""

    FLUSH = "flush"  # a flush completed
    FUA = "fua"  # a FUA write (or write-zeroes) completed
    ACK = "ack"  # the workload acknowledged something
    END = "end"  # the end of the run: where the runner cuts


def parse_point_kind(text: str | PointKind) -> PointKind:
    if isinstance(text, PointKind):
        return text
    try:
        return PointKind(text)
    except ValueError:
        valid = ", ".join(k.value for k in PointKind)
        raise ConfigError(f"unknown persistence point kind {text!r}; valid: {valid}") from None


@dataclass(frozen=True, slots=True)
class Write:
    """A write, write-zeroes or discard of the log, with what exploration needs of it."""

    seq: int
    op: Op
    offset: int
    length: int
    fua: bool
    submit_index: int
    complete_index: int | None  # None: still in flight when the log ends
    ok: bool  # completed successfully
    data_offset: int | None  # where its data is in the log (writes)
    durable_at: int  # the first point index `at` from which it is durable (NEVER: never)
    epoch: int  # flushes completed before it was submitted

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "op": self.op.label,
            "offset": self.offset,
            "length": self.length,
            "fua": self.fua,
            "submit_index": self.submit_index,
            "complete_index": self.complete_index,
            "flush_epoch": self.epoch,
        }


@dataclass(frozen=True, slots=True)
class Point:
    number: int  # 0, 1, 2 ... in log order
    at: int  # the cut happens after every log record before this index
    kinds: tuple[PointKind, ...]
    labels: tuple[str, ...]  # "flush 12", "fua 40", "ack 7", "end"
    epoch: int  # flushes completed before it

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "at": self.at,
            "kinds": [k.value for k in self.kinds],
            "labels": list(self.labels),
            "flush_epoch": self.epoch,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Point:
        return cls(
            int(raw["number"]),
            int(raw["at"]),
            tuple(parse_point_kind(k) for k in raw.get("kinds", [])),
            tuple(str(label) for label in raw.get("labels", [])),
            int(raw.get("flush_epoch", 0)),
        )


class Timeline:
    """The writes and persistence points of a log, under the promise `keep`."""

    def __init__(self, wlog: WriteLog, keep: Promise, acks: Sequence[Ack] = ()) -> None:
        self.wlog = wlog
        self.sector_size = wlog.header.sector_size
        flushes = sorted(
            (r for r in wlog.requests if r.op == Op.FLUSH and r.completed_ok),
            key=lambda r: r.submit_index,
        )
        flush_submits = [f.submit_index for f in flushes]
        # suffix_done[i]: the earliest completion among flushes submitted at or after flush i.
        suffix_done = [NEVER] * (len(flushes) + 1)
        for i in range(len(flushes) - 1, -1, -1):
            done = flushes[i].complete_index
            suffix_done[i] = min(suffix_done[i + 1], NEVER if done is None else done)
        flush_done = sorted(f.complete_index for f in flushes if f.complete_index is not None)
        self.flush_done = flush_done
        writes: list[Write] = []
        for r in wlog.requests:
            if r.op == Op.FLUSH or r.length == 0:
                continue
            ok = r.status == 0 and r.complete_index is not None
            durable_at = NEVER
            if ok and keep is not Promise.NOTHING and r.complete_index is not None:
                if keep is Promise.EVERY_COMPLETED or r.fua:
                    durable_at = r.complete_index + 1
                else:
                    # The first completion of a flush that started after this write completed.
                    done = suffix_done[bisect.bisect_right(flush_submits, r.complete_index)]
                    durable_at = NEVER if done == NEVER else done + 1
            epoch = _count_before(flush_done, r.submit_index)
            writes.append(
                Write(
                    r.seq,
                    r.op,
                    r.offset,
                    r.length,
                    r.fua,
                    r.submit_index,
                    r.complete_index,
                    ok,
                    r.data_offset,
                    durable_at,
                    epoch,
                )
            )
        self.writes = writes
        self.by_seq = {w.seq: w for w in writes}
        self.points = self._points(wlog, acks)
        self._pending: dict[int, list[Write]] = {}

    def _points(self, wlog: WriteLog, acks: Sequence[Ack]) -> list[Point]:
        found: dict[int, list[tuple[PointKind, str]]] = {}
        for r in wlog.requests:
            if not r.completed_ok or r.complete_index is None:
                continue
            # Just before the completion: the flush (or FUA write) is still in flight, so the
            # writes it would make durable are pending; the state just after is keep-all's.
            if r.op == Op.FLUSH:
                found.setdefault(r.complete_index, []).append((PointKind.FLUSH, f"flush {r.seq}"))
            elif r.fua:
                found.setdefault(r.complete_index, []).append((PointKind.FUA, f"fua {r.seq}"))
        for a in acks:
            found.setdefault(a.index, []).append((PointKind.ACK, f"ack {a.token}"))
        found.setdefault(wlog.records, []).append((PointKind.END, "end"))
        points = []
        for number, at in enumerate(sorted(found)):
            items = found[at]
            kinds = tuple(dict.fromkeys(k for k, _label in items))
            points.append(
                Point(
                    number,
                    at,
                    kinds,
                    tuple(label for _k, label in items),
                    _count_before(self.flush_done, at),
                )
            )
        return points

    def submitted(self, point: Point) -> list[Write]:
        return [w for w in self.writes if w.submit_index < point.at]

    def durable(self, point: Point) -> list[Write]:
        return [w for w in self.writes if w.submit_index < point.at and w.durable_at <= point.at]

    def pending(self, point: Point) -> list[Write]:
        """Writes a cut at `point` may lose, in completion order (in-flight ones last)."""
        got = self._pending.get(point.at)
        if got is None:
            if len(self._pending) > 256:
                self._pending.clear()
            got = self._pending[point.at] = self._pending_at(point.at)
        return got

    def _pending_at(self, at: int) -> list[Write]:
        out = [w for w in self.writes if w.submit_index < at and w.durable_at > at]
        out.sort(
            key=lambda w: (
                w.complete_index
                if w.complete_index is not None and w.complete_index < at
                else NEVER,
                w.submit_index,
            )
        )
        return out

    def point(self, number: int) -> Point:
        if not 0 <= number < len(self.points):
            raise ConfigError(f"no persistence point {number}; this run has {len(self.points)}")
        return self.points[number]


def _count_before(sorted_values: list[int], index: int) -> int:
    return bisect.bisect_left(sorted_values, index)


@dataclass(frozen=True, slots=True)
class State:
    """One crash state: at `point`, the pending writes `lost`, and `torn` ones' lost sectors."""

    id: str
    point: Point
    policy: CutPolicy
    lost: tuple[int, ...]  # seqs, sorted
    torn: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (seq, lost sectors sorted), by seq
    pending: int = 0  # how many writes this point could lose

    @property
    def key(self) -> tuple[tuple[int, ...], tuple[tuple[int, tuple[int, ...]], ...]]:
        return self.lost, self.torn

    def with_loss(
        self, lost: Iterable[int], torn: Iterable[tuple[int, Iterable[int]]], suffix: str
    ) -> State:
        """Another state at the same point (minimization's candidates)."""
        return State(
            f"{self.id}{suffix}",
            self.point,
            self.policy,
            tuple(sorted(lost)),
            tuple(sorted((seq, tuple(sorted(s))) for seq, s in torn)),
            self.pending,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "point": self.point.to_json(),
            "policy": self.policy.value,
            "pending": self.pending,
            "lost": list(self.lost),
            "torn": [{"seq": seq, "sectors_lost": list(s)} for seq, s in self.torn],
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any], timeline: Timeline | None = None) -> State:
        """A state as explore.json holds it; with `timeline`, checked against that recording
        (its point where the recording has it, every lost or torn write pending there)."""
        state = cls(
            str(raw["id"]),
            Point.from_json(raw["point"]),
            parse_policy(str(raw["policy"])),
            tuple(int(s) for s in raw.get("lost", [])),
            tuple(
                (int(t["seq"]), tuple(int(x) for x in t["sectors_lost"]))
                for t in raw.get("torn", [])
            ),
            int(raw.get("pending", 0)),
        )
        return state if timeline is None else state.on(timeline)

    def on(self, timeline: Timeline) -> State:
        """This state on `timeline`'s own point, or a clear error when it cannot be one of its."""
        point = timeline.point(self.point.number)
        if point.at != self.point.at:
            raise ConfigError(
                f"state {self.id!r} names point {point.number} at record "
                f"{self.point.at}, but this recording has it at {point.at}; "
                "is it the same recording?"
            )
        for seq in [*self.lost, *(seq for seq, _s in self.torn)]:
            w = timeline.by_seq.get(seq)
            if w is None or w.submit_index >= point.at or w.durable_at <= point.at:
                raise ConfigError(
                    f"state {self.id!r}: write {seq} is not pending at point {point.number}"
                )
        return State(self.id, point, self.policy, self.lost, self.torn, self.pending)


def find_state(states: Iterable[State], state_id: str) -> State:
    """The state `state_id` among recorded ones (explore.json's), or a clear error."""
    ids = []
    for state in states:
        if state.id == state_id:
            return state
        ids.append(state.id)
    sample = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
    raise ConfigError(
        f"no state {state_id!r} in this exploration ({len(ids)} states: {sample or 'none'}); "
        "state ids look like p3-lose-all-0 (point, policy, number)"
    )


def check_budget(max_states: int, per_point: int) -> None:
    """An exploration budget of at least one state, and of at least one state per point."""
    if max_states < 1:
        raise ConfigError(
            f"max-states is {max_states}: the exploration budget must be at least 1 state"
        )
    if per_point < 1:
        raise ConfigError(f"states per point is {per_point}: it must be at least 1")


@dataclass(frozen=True)
class Bounds:
    """How much to explore: what `enumerate_states` takes (from a scenario's `[explore]`
    table through `harness.explore.spec.bounds_for`; its defaults are the table's)."""

    max_states: int = 200
    per_point: int = 8
    kinds: tuple[PointKind, ...] = tuple(PointKind)
    policies: tuple[CutPolicy, ...] = DEFAULT_POLICIES
    seed: int = 0
    max_torn_writes: int = 3  # writes torn in one state
    # Bytes a write tears in (the disk's atomic write unit, aligned to the disk); 0: the log's
    # sector size, the contract's granularity. 4096: a disk that never tears inside an
    # aligned 4 KiB block, whatever sector a write starts at.
    tear_unit: int = 0
    points: tuple[int, ...] | None = None  # only these point numbers
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_budget(self.max_states, self.per_point)
        if not self.policies:
            raise ConfigError("no cut policies to explore; name at least one")
        if not self.kinds:
            raise ConfigError("no persistence point kinds to explore; name at least one")


def enumerate_states(timeline: Timeline, bounds: Bounds) -> Iterator[State]:
    """The states to explore, in priority order, at most `bounds.max_states`."""
    points = [
        p
        for p in timeline.points
        if set(p.kinds) & set(bounds.kinds) and (bounds.points is None or p.number in bounds.points)
    ]
    policies = [parse_policy(p) for p in bounds.policies]
    canonical: list[CutPolicy] = [
        p for p in policies if p in (CutPolicy.LOSE_ALL, CutPolicy.KEEP_ALL)
    ]
    others = [p for p in policies if p not in canonical]
    emitted = 0
    seen: dict[int, set[Any]] = {p.number: set() for p in points}
    # Lose-all and keep-all at every point first ...
    if canonical:
        for point in points:
            for state in _at_point(timeline, point, canonical, bounds, seen[point.number]):
                yield state
                emitted += 1
                if emitted >= bounds.max_states:
                    return
    if not others:
        return
    # ... then the other policies breadth first: a round takes one state per policy at
    # every point, so a budget spreads over the whole run instead of its first points.
    live = {p.number: _at_point(timeline, p, others, bounds, seen[p.number]) for p in points}
    while live:
        for number in list(live):
            for _ in range(len(others)):
                got = next(live[number], None)
                if got is None:
                    del live[number]
                    break
                yield got
                emitted += 1
                if emitted >= bounds.max_states:
                    return


def _at_point(
    timeline: Timeline,
    point: Point,
    policies: list[CutPolicy],
    bounds: Bounds,
    seen: set[Any],
) -> Iterator[State]:
    pending = timeline.pending(point)
    n = len(pending)
    room = bounds.per_point - len(seen)
    if room <= 0:
        return
    ss = timeline.sector_size

    def state(policy: CutPolicy, k: int, lost: Iterable[int], torn: dict[int, set[int]]) -> State:
        return State(
            f"p{point.number}-{policy.value}-{k}",
            point,
            policy,
            tuple(sorted(lost)),
            tuple(sorted((seq, tuple(sorted(s))) for seq, s in torn.items())),
            n,
        )

    generators: list[Iterator[State]] = []
    for policy in policies:
        rng = random.Random(f"{bounds.seed}/{point.at}/{policy.value}")
        if policy is CutPolicy.LOSE_ALL:
            generators.append(iter([state(policy, 0, (w.seq for w in pending), {})]))
        elif policy is CutPolicy.KEEP_ALL:
            generators.append(iter([state(policy, 0, (), {})]))
        elif policy is CutPolicy.PREFIX:
            generators.append(_prefixes(pending, bounds.per_point, state))
        elif policy is CutPolicy.RANDOM:
            generators.append(_random(pending, bounds, rng, state))
        elif policy is CutPolicy.TORN:
            generators.append(_torn(pending, ss, bounds, rng, state))
    # Round robin over the policies, skipping states already seen at this point.
    while generators and room > 0:
        for gen in list(generators):
            try:
                candidate = next(gen)
            except StopIteration:
                generators.remove(gen)
                continue
            if candidate.key in seen:
                continue
            seen.add(candidate.key)
            yield candidate
            room -= 1
            if room <= 0:
                return


def _prefixes(pending: list[Write], per_point: int, state: Any) -> Iterator[State]:
    n = len(pending)
    if n < 2:
        return
    # Keep the first k pending writes (completion order), k = 1 .. n-1, spread evenly.
    count = min(per_point, n - 1)
    ks = sorted({1 + (i * (n - 2)) // max(1, count - 1) for i in range(count)})
    for j, k in enumerate(ks):
        yield state(CutPolicy.PREFIX, j, (w.seq for w in pending[k:]), {})


def _random(
    pending: list[Write], bounds: Bounds, rng: random.Random, state: Any
) -> Iterator[State]:
    for k in range(4 * bounds.per_point):
        yield state(CutPolicy.RANDOM, k, [w.seq for w in pending if rng.random() < 0.5], {})


def _torn(
    pending: list[Write], ss: int, bounds: Bounds, rng: random.Random, state: Any
) -> Iterator[State]:
    unit = max(1, (bounds.tear_unit or ss) // ss)  # sectors that tear together

    def units(w: Write) -> list[list[int]]:
        # The disk's units, aligned to the disk (a 4 KiB unit is an aligned 4 KiB block),
        # each cut down to the sectors the write covers: the first and last may be partial.
        first, end = w.offset // ss, -(-(w.offset + w.length) // ss)
        start = first - first % unit
        return [list(range(max(u, first), min(u + unit, end))) for u in range(start, end, unit)]

    tearable = [w for w in pending if len(units(w)) >= 2]
    if not tearable:
        return
    for k in range(4 * bounds.per_point):
        picked = rng.sample(tearable, rng.randint(1, min(bounds.max_torn_writes, len(tearable))))
        torn: dict[int, set[int]] = {}
        for w in picked:
            parts = units(w)
            cut = rng.randint(1, len(parts) - 1)
            torn[w.seq] = {s for part in rng.sample(parts, cut) for s in part}
        chosen = {w.seq for w in picked}
        lost = [w.seq for w in pending if w.seq not in chosen and rng.random() < 0.5]
        yield state(CutPolicy.TORN, k, lost, torn)
