"""Why it was lost: the calls behind a failing state, and the fix that would have kept it.

Pure: a traced run (`harness.explore.syscalls.Trace`), the guest clock's bounds
on the host's (`harness.explore.clock.ClockBounds`), the acknowledgements'
host receipt times, and for a failing state the recovered file view and the
reference view at the same point (every write kept;
`harness.explore.fileview.FileView`), the lost tokens and, if known, the lost
and torn writes as device byte ranges. No guest, no disk.

The calls are replayed in enter order into what the POSIX contract promises
durable: a file's data (write, pwrite, writev, truncate, fallocate) is
durable once an fsync or fdatasync of that file, an msync of its mapping,
sync(2) or syncfs(2) completed after it, or when it went through a
descriptor opened O_SYNC/O_DSYNC; a directory entry (create, rename, link,
symlink, unlink, mkdir, rmdir) once an fsync of its directory, sync(2) or
syncfs(2) completed after it. close(2) and sync_file_range(2) promise
nothing. A file keeps its identity across renames and links, so the writes
made to `x.tmp` are the data of `x` after `rename(x.tmp, x)`.

For a failing state, every path where the recovered tree differs from the
reference is an effect that was lost; the calls that made that effect and
completed before the boundary — the earliest lost acknowledgement, or the
state's own point when only the check failed — are looked up, and the
property each relied on is named in a fixed vocabulary (`Property`):

- data not synced: a write with no fsync/fdatasync of its file before the ack;
- directory entry not synced: a create, rename, link or unlink with no fsync
  of its directory before the ack;
- order assumed: a later write of another file was made durable, the earlier
  write was not, and nothing between them forced the order;
- a single call not atomic: a write whose range the state tore (known only
  with the torn writes mapped to files), or a rename that left both names or
  neither.

Each cause says what would have made it durable ("fsync the directory /mnt
after rename(/mnt/x.tmp, /mnt/x)"). A lost effect whose calls were all
durable before the boundary is not the application's doing and is never
blamed on a call: the state is `unexplained`, with the evidence (the
differences, the calls and the syncs that covered them, the writes by file).

Times: a call is before the boundary when it returned by then on the guest's
clock. The boundary is the workload's own `write` of the acknowledgement line
when the trace has it (same clock, exact), else the host's receipt time
mapped back with the clock's bounds, taking the side that blames no call that
might have come after (and credits every sync that might have come before).
"""

from __future__ import annotations

import enum
import posixpath
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.explore.clock import ClockBounds
from harness.explore.fileview import FileView, differences
from harness.explore.syscalls import O_CREAT, O_DSYNC, Call, CallKind, Trace

NEVER = 1 << 62


class Property(enum.Enum):
    """The persistence property a lost effect was relied on for."""

    DATA_NOT_SYNCED = "data not synced"
    ENTRY_NOT_SYNCED = "directory entry not synced"
    ORDER_ASSUMED = "order assumed"
    NOT_ATOMIC = "a single call not atomic"


@dataclass(frozen=True)
class AckTime:
    """An acknowledgement: its token and when the host received it (CLOCK_MONOTONIC ns)."""

    token: str
    host_ns: int


@dataclass(frozen=True)
class Cause:
    """One property a state's loss relied on, the calls that relied on it, and the fix."""

    relied_on: Property
    path: str  # the file or directory entry whose effect is lost
    calls: tuple[Call, ...]
    fix: str
    evidence: str  # what the recovered tree shows

    @property
    def key(self) -> str:
        """What states share when the same fix would have kept them (grouping)."""
        return f"{self.relied_on.value}: {self.fix}"

    def describe(self) -> str:
        calls = ", ".join(c.describe() for c in self.calls)
        return f"{self.relied_on.value}: {calls} ({self.evidence}); {self.fix}"

    def to_json(self) -> dict[str, Any]:
        return {
            "property": self.relied_on.value,
            "path": self.path,
            "calls": [c.to_json() for c in self.calls],
            "fix": self.fix,
            "evidence": self.evidence,
        }


@dataclass(frozen=True)
class Explanation:
    """A failing state's causes, or why none is named (`unexplained`), with the evidence."""

    state: str
    lost_tokens: tuple[str, ...]
    boundary: str  # "ack TOKEN" or "the state's point"
    causes: tuple[Cause, ...] = ()
    evidence: tuple[str, ...] = ()  # differences and what the calls say of them
    kept: tuple[str, ...] = ()  # effects not promised durable that the filesystem kept anyway
    writes: tuple[str, ...] = ()  # lost and torn writes of the disk, by file

    @property
    def unexplained(self) -> bool:
        return not self.causes

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "lost_tokens": list(self.lost_tokens),
            "boundary": self.boundary,
            "causes": [c.to_json() for c in self.causes],
            "unexplained": self.unexplained,
            "evidence": list(self.evidence),
            "kept": list(self.kept),
            "writes": list(self.writes),
        }


@dataclass(frozen=True)
class CauseGroup:
    """One distinct cause over all failing states: how many it explains, and the smallest."""

    key: str
    relied_on: Property
    fix: str
    states: tuple[str, ...]
    smallest: str
    replay: str | None = None

    def line(self) -> str:
        replay = f"; replay: {self.replay}" if self.replay else ""
        return f"{self.key} — {len(self.states)} state(s), smallest {self.smallest}{replay}"

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "property": self.relied_on.value,
            "fix": self.fix,
            "states": list(self.states),
            "count": len(self.states),
            "smallest": self.smallest,
            "replay": self.replay,
        }


@dataclass(frozen=True)
class Risk:
    """At an acknowledgement: a file's data or a directory entry not yet durable, since a call."""

    path: str
    what: str  # "data" or "entry"
    since: Call

    def describe(self) -> str:
        return f"{self.what} of {self.path} since {self.since.describe()}"

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "what": self.what, "since": self.since.to_json()}


@dataclass(frozen=True)
class AckRisk:
    token: str
    guest_ns: int
    risks: tuple[Risk, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "guest_ns": self.guest_ns,
            "risks": [r.to_json() for r in self.risks],
        }


# -- the calls replayed into what is durable ---------------------------------------------


@dataclass
class _Change:
    call: Call
    file: int  # the file's identity (data) or -1 (entries)
    path: str  # the path at the time (data), the entry's path (entries)
    directory: str  # the entry's directory (entries)
    synced_by: Call | None = None  # the first call that made it durable
    self_synced: bool = False  # written through an O_SYNC/O_DSYNC descriptor


@dataclass
class _Replay:
    """Every data and entry change of the trace, each with the call that made it durable."""

    data: list[_Change] = field(default_factory=list)
    entries: list[_Change] = field(default_factory=list)
    names: dict[str, int] = field(default_factory=dict)  # path -> file identity, at the end
    history: dict[int, list[str]] = field(default_factory=dict)  # identity -> its paths, in order
    renames: list[Call] = field(default_factory=list)
    unnamed_msyncs: list[Call] = field(default_factory=list)


_DATA = (CallKind.WRITE, CallKind.TRUNCATE, CallKind.FALLOCATE)


def replay(trace: Trace, until_ns: int = NEVER, existing: Iterable[str] = ()) -> _Replay:
    """Walk the successful calls that returned by `until_ns` (guest) in enter order.

    `existing`: absolute paths that were in the tree before the run, so that
    opening one with O_CREAT is not mistaken for creating it.
    """
    out = _Replay()
    existing = set(existing)
    sync_fds: dict[tuple[int, int], bool] = {}
    next_id = 0

    def ident(path: str) -> int:
        nonlocal next_id
        if path not in out.names:
            out.names[path] = next_id
            out.history[next_id] = [path]
            next_id += 1
        return out.names[path]

    def entry(call: Call, path: str) -> None:
        out.entries.append(_Change(call, -1, path, posixpath.dirname(path)))

    for call in trace.calls:
        if not call.ok or (call.exit_ns or NEVER) > until_ns:
            continue
        kind, path = call.kind, call.path
        if kind is CallKind.OPEN and path is not None:
            if call.fd is not None:
                sync_fds[(call.pid, call.fd)] = bool((call.flags or 0) & O_DSYNC)
            # O_CREAT makes an entry only for a name that did not exist: one the trace has not
            # seen (or saw removed) and that was not in the tree before the run (`existing`).
            new = path not in out.names and path not in existing
            ident(path)
            if new and (call.flags or 0) & O_CREAT:
                entry(call, path)
        elif kind is CallKind.CLOSE and call.fd is not None:
            sync_fds.pop((call.pid, call.fd), None)
        elif kind in _DATA and path is not None:
            change = _Change(call, ident(path), path, posixpath.dirname(path))
            change.self_synced = kind is CallKind.WRITE and sync_fds.get(
                (call.pid, call.fd if call.fd is not None else -1), False
            )
            out.data.append(change)
        elif kind is CallKind.RENAME and path is not None and call.path2 is not None:
            moved = {p: i for p, i in out.names.items() if p == path or p.startswith(path + "/")}
            for p in moved:
                del out.names[p]
            for p, fid in moved.items():
                moved_to = call.path2 + p[len(path) :]
                out.names[moved_to] = fid
                out.history.setdefault(fid, []).append(moved_to)
            if path not in moved:
                ident(call.path2)
            out.renames.append(call)
            entry(call, path)
            entry(call, call.path2)
        elif kind is CallKind.LINK and path is not None and call.path2 is not None:
            fid = ident(path)
            out.names[call.path2] = fid
            out.history[fid].append(call.path2)
            entry(call, call.path2)
        elif kind in (CallKind.UNLINK, CallKind.RMDIR) and path is not None:
            out.names.pop(path, None)
            existing.discard(path)
            entry(call, path)
        elif kind in (CallKind.MKDIR, CallKind.SYMLINK) and path is not None:
            ident(path)
            entry(call, path)
        elif kind in (CallKind.FSYNC, CallKind.FDATASYNC) and path is not None:
            synced = out.names.get(path)
            for change in out.data:
                if (
                    change.synced_by is None
                    and change.file == synced
                    and _before(change.call, call)
                ):
                    change.synced_by = call
            if kind is CallKind.FSYNC:  # a directory's fsync makes its entries durable
                for change in out.entries:
                    if (
                        change.synced_by is None
                        and change.directory == path
                        and _before(change.call, call)
                    ):
                        change.synced_by = call
        elif kind is CallKind.MSYNC:
            if path is None:
                out.unnamed_msyncs.append(call)
                continue
            mapped = out.names.get(path)
            for change in out.data:
                if (
                    change.synced_by is None
                    and change.file == mapped
                    and _before(change.call, call)
                ):
                    change.synced_by = call
        elif kind in (CallKind.SYNC, CallKind.SYNCFS):
            for change in out.data + out.entries:
                if change.synced_by is None and _before(change.call, call):
                    change.synced_by = call
    return out


def _before(change: Call, sync: Call) -> bool:
    """The change had returned when the sync started (so the sync covers it)."""
    return (change.exit_ns or NEVER) <= sync.enter_ns


def _durable_by(change: _Change, until_ns: int) -> bool:
    if change.self_synced:
        return True
    sync = change.synced_by
    return sync is not None and (sync.exit_ns or NEVER) <= until_ns


# -- boundaries on the guest's clock -------------------------------------------------------


def ack_guest_times(
    trace: Trace, acks: Sequence[AckTime], clock: ClockBounds, pattern: Callable[[str], str | None]
) -> dict[str, tuple[int, int]]:
    """Per token, two guest times: (credit until, blame until).

    A sync that returned by the first may have made something durable before
    the acknowledgement; a call that returned by the second surely came before
    it. The workload's own write of the acknowledgement line, when the trace
    has it, is both (the call's start: everything that returned before it
    came before the promise). Without it, the host's receipt bounds the
    acknowledgement from above only: `g <= host - d`, and `d` in `[lo, hi]`,
    so syncs are credited up to `host - lo` and calls blamed up to `host - hi`
    (calls between the print and the receipt cannot be told apart from those
    before it, and are not blamed).
    """
    written: dict[str, Call] = {}
    for call in trace.calls:
        if call.kind is CallKind.WRITE and call.data and call.ok:
            for line in call.data.decode("utf-8", "replace").splitlines():
                token = pattern(line)
                if token is not None and token not in written:
                    written[token] = call
    out: dict[str, tuple[int, int]] = {}
    for ack in acks:
        printed = written.get(ack.token)
        if printed is not None and printed.exit_ns is not None:
            out[ack.token] = (printed.enter_ns, printed.enter_ns)
        else:
            out[ack.token] = (ack.host_ns - clock.lo_ns, ack.host_ns - clock.hi_ns)
    return out


# -- explaining one failing state ------------------------------------------------------------


def explain(
    state: str,
    trace: Trace,
    recovered: FileView,
    reference: FileView,
    *,
    lost_tokens: Sequence[str],
    ack_times: dict[str, tuple[int, int]],
    point_guest_ns: tuple[int, int] | None = None,
    lost_writes: Sequence[tuple[int, int]] = (),
    torn_writes: Sequence[tuple[int, int]] = (),
    existing: Iterable[str] = (),
) -> Explanation:
    """Name the calls and properties behind one failing state, or say why none is named.

    `ack_times` from `ack_guest_times`; `point_guest_ns` the state's point as
    (latest, earliest) guest time, for a state that failed with no token lost
    (its check exited non-zero); the lost and torn writes as device byte
    ranges, mapped to files through the reference view.
    """
    root = recovered.root.rstrip("/") or "/"
    if lost_tokens:
        first = min(lost_tokens, key=lambda t: ack_times.get(t, (NEVER, NEVER))[1])
        latest, earliest = ack_times.get(first, (NEVER, NEVER))
        boundary = f"ack {first}"
    elif point_guest_ns is not None:
        latest, earliest = point_guest_ns
        boundary = "the state's point"
    else:
        latest = earliest = NEVER
        boundary = "the end of the trace"
    # Blame only calls that surely returned before the boundary; credit every sync that
    # may have returned before it.
    state_replay = replay(trace, latest, existing)
    diffs = [(f"{root}/{p}" if p else root, what) for p, what in differences(recovered, reference)]
    writes = _writes_by_file(reference, root, lost_writes, "lost") + _writes_by_file(
        reference, root, torn_writes, "torn"
    )
    torn_files = _torn_ranges(reference, root, torn_writes)
    causes: list[Cause] = []
    evidence: list[str] = [f"{p}: {what}" for p, what in diffs]
    if trace.last_ns is not None and trace.last_ns < earliest and earliest != NEVER:
        evidence.append("the trace ends before the boundary: calls after its end are unknown")
    for path, what in diffs:
        found = _explain_path(
            path, what, state_replay, recovered, root, earliest, latest, torn_files
        )
        if isinstance(found, Cause):
            if all(c.key != found.key for c in causes):
                causes.append(found)
        else:
            evidence.extend(found)
    if not diffs:
        evidence.append(
            "the recovered tree equals the reference at this point: the loss is not in the "
            "files' names, sizes or contents (the check's own reading of them differs)"
        )
    if state_replay.unnamed_msyncs:
        evidence.append(
            f"{len(state_replay.unnamed_msyncs)} msync call(s) of mappings the trace cannot name "
            "(mmap is not traced) may have made more durable than shown"
        )
    kept = _kept(state_replay, recovered, reference, root, earliest, {p for p, _ in diffs})
    return Explanation(
        state=state,
        lost_tokens=tuple(lost_tokens),
        boundary=boundary,
        causes=tuple(causes),
        evidence=tuple(evidence),
        kept=tuple(kept),
        writes=tuple(writes),
    )


def _explain_path(
    path: str,
    what: str,
    rep: _Replay,
    recovered: FileView,
    root: str,
    earliest: int,
    latest: int,
    torn: dict[str, list[tuple[int, int]]],
) -> Cause | list[str]:
    """A cause for one lost effect, or the evidence that no call explains it."""
    before = [c for c in rep.entries if c.path == path and (c.call.exit_ns or NEVER) <= earliest]
    entries_pending = [c for c in before if not _durable_by(c, latest)]
    file_id = rep.names.get(path)
    data = [
        c
        for c in rep.data
        if file_id is not None and c.file == file_id and (c.call.exit_ns or NEVER) <= earliest
    ]
    data_pending = [c for c in data if not _durable_by(c, latest)]
    if what.startswith(("missing", "present")) and entries_pending:
        return _entry_cause(path, what, entries_pending[-1], recovered)
    if data_pending:
        return _data_cause(path, what, data_pending, rep, file_id, earliest, latest, torn)
    # The data was durable, but the name still leads to the file it led to before: a rename
    # or link onto the path that was not. (A create whose file is there took effect.)
    repointed = [
        c
        for c in entries_pending
        if c.call.kind in (CallKind.RENAME, CallKind.LINK) and c.call.path2 == path
    ]
    if repointed:
        return _entry_cause(path, what, repointed[-1], recovered)
    notes: list[str] = []
    for change in before + data:
        sync = change.synced_by
        if change.self_synced:
            how = "through O_SYNC/O_DSYNC"
        else:
            how = f"by {sync.describe()}" if sync is not None else "by nothing"
        notes.append(
            f"{change.call.describe()} was durable before the boundary ({how}), yet {path}: "
            f"{what} — not the application's doing"
        )
    if not notes:
        notes.append(f"no traced call before the boundary changed {path}")
    return notes


def _entry_cause(path: str, what: str, change: _Change, recovered: FileView) -> Cause:
    call = change.call
    if call.kind is CallKind.RENAME and call.path2 is not None:
        partial = _rename_partly(call, recovered, what)
        if partial is not None:
            return Cause(
                Property.NOT_ATOMIC,
                path,
                (call,),
                f"do not rely on {call.describe()} being all or nothing: recover from either name",
                partial,
            )
    return Cause(
        Property.ENTRY_NOT_SYNCED,
        path,
        (call,),
        f"fsync the directory {change.directory} after {call.describe()}",
        f"{path}: {what}",
    )


def _data_cause(
    path: str,
    what: str,
    pending: list[_Change],
    rep: _Replay,
    file_id: int | None,
    earliest: int,
    latest: int,
    torn: dict[str, list[tuple[int, int]]],
) -> Cause:
    first, last = pending[0].call, pending[-1].call
    for c in pending:
        ranges = torn.get(c.path, []) + torn.get(path, [])
        offset = c.call.offset
        if offset is not None and any(
            offset <= lo and hi <= offset + (c.call.length or 0) for lo, hi in ranges
        ):
            return Cause(
                Property.NOT_ATOMIC,
                path,
                (c.call,),
                f"do not overwrite acknowledged data in place with one {c.call.name}: "
                "write it elsewhere, fdatasync, then switch to it",
                f"{path}: {what}; the state tore {c.call.describe()}",
            )
    later = _later_durable_write(rep, last, file_id, earliest, latest)
    if later is not None:
        return Cause(
            Property.ORDER_ASSUMED,
            path,
            (last, later.call),
            f"fdatasync {last.path} after {last.describe()} and before {later.call.describe()}",
            f"{path}: {what}; {later.path} kept its later change",
        )
    calls = (first,) if first is last else (first, last)
    renamed = [r for r in rep.renames if r.path2 == path and r.path == last.path]
    renamed = [r for r in renamed if _before(last, r)]
    if renamed:
        r = renamed[-1]
        fix = f"fsync {r.path} after {last.describe()} and before {r.describe()}"
    else:
        fix = f"fdatasync {path} after {last.describe()} and before the acknowledgement"
    return Cause(Property.DATA_NOT_SYNCED, path, calls, fix, f"{path}: {what}")


def _rename_partly(call: Call, recovered: FileView, what: str) -> str | None:
    """Both names on one file after a rename: it was applied in part (the new entry made,
    the old not removed). Neither name, or the old one alone, is a rename not applied."""
    src, dst = recovered.get(call.path or ""), recovered.get(call.path2 or "")
    if src is not None and dst is not None and src.inode and src.inode == dst.inode:
        return f"both {call.path} and {call.path2} name one file after {call.describe()}"
    return None


def _later_durable_write(
    rep: _Replay, earlier: Call, file_id: int | None, earliest: int, latest: int
) -> _Change | None:
    """A write of another file after `earlier`, made durable before the boundary, with no
    sync between them that covered `earlier` (so only an assumed order kept them apart)."""
    for change in rep.data:
        if change.file == file_id or not _before(earlier, change.call):
            continue
        if (change.call.exit_ns or NEVER) > earliest or not _durable_by(change, latest):
            continue
        return change
    return None


def _writes_by_file(
    view: FileView, root: str, ranges: Sequence[tuple[int, int]], how: str
) -> list[str]:
    out = []
    for offset, length in ranges:
        hits = view.files_at(offset, length)
        where = (
            ", ".join(f"{root}/{p} bytes {o}-{o + n}" for p, o, n in hits)
            if hits
            else "no file's data (metadata, free space, or a file the view does not map)"
        )
        out.append(f"{how} write at disk byte {offset} ({length} bytes): {where}")
    return out


def _torn_ranges(
    view: FileView, root: str, ranges: Sequence[tuple[int, int]]
) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for offset, length in ranges:
        for p, o, n in view.files_at(offset, length):
            out[f"{root}/{p}"].append((o, o + n))
    return out


def _kept(
    rep: _Replay,
    recovered: FileView,
    reference: FileView,
    root: str,
    earliest: int,
    differing: set[str],
) -> list[str]:
    """Changes not promised durable by the boundary that the recovered tree has anyway."""
    out = []
    for change in rep.entries:
        if (change.call.exit_ns or NEVER) > earliest or _durable_by(change, earliest):
            continue
        if change.path in differing or not change.path.startswith(root + "/"):
            continue
        if (recovered.get(change.path) is None) == (reference.get(change.path) is None):
            out.append(
                f"{change.call.describe()}: the entry {change.path} was not promised (no fsync "
                f"of {change.directory}) and the filesystem kept it"
            )
    return out


# -- many states ---------------------------------------------------------------------------------


def group(
    explanations: Iterable[Explanation],
    size: Callable[[str], int] | None = None,
    replay_command: Callable[[str], str] | None = None,
) -> list[CauseGroup]:
    """One line per distinct cause, with the states it explains and the smallest of them.

    `size` ranks states (fewest lost writes first, say); without it, the first
    state in the order given is the smallest. Unexplained states are grouped
    under their own line.
    """
    members: dict[str, list[str]] = defaultdict(list)
    first: dict[str, Cause] = {}
    unexplained: list[str] = []
    order: dict[str, int] = {}
    for n, e in enumerate(explanations):
        order[e.state] = n
        if e.unexplained:
            unexplained.append(e.state)
        for c in e.causes:
            if e.state not in members[c.key]:
                members[c.key].append(e.state)
            first.setdefault(c.key, c)

    def rank(s: str) -> tuple[int, int]:
        return (size(s) if size is not None else 0, order[s])

    out = []
    for key, states in members.items():
        smallest = min(states, key=rank)
        cause = first[key]
        out.append(
            CauseGroup(
                key,
                cause.relied_on,
                cause.fix,
                tuple(states),
                smallest,
                replay_command(smallest) if replay_command else None,
            )
        )
    out.sort(key=lambda g: (-len(g.states), g.key))
    if unexplained:
        smallest = min(unexplained, key=rank)
        out.append(
            CauseGroup(
                "unexplained: no call's missing durability explains the loss",
                Property.DATA_NOT_SYNCED,
                "none named: see each state's evidence",
                tuple(unexplained),
                smallest,
                replay_command(smallest) if replay_command else None,
            )
        )
    return out


def at_risk(
    trace: Trace,
    ack_times: dict[str, tuple[int, int]],
    root: str = "/",
    existing: Iterable[str] = (),
) -> list[AckRisk]:
    """At each acknowledgement: what under `root` is not yet durable, and since which call.

    The ack's latest possible guest time is used, so every change that may have
    come before it is listed; a sync counts only if it surely returned by then.
    """
    root = root.rstrip("/")
    out: list[AckRisk] = []
    for token, (latest, earliest) in sorted(ack_times.items(), key=lambda kv: kv[1]):
        rep = replay(trace, latest, existing)
        risks: list[Risk] = []
        seen: set[tuple[str, str]] = set()
        paths = {i: p for p, i in rep.names.items()}
        for change in rep.data:
            if _durable_by(change, earliest):
                continue
            path = paths.get(change.file, change.path)
            if not path.startswith(root + "/") or (path, "data") in seen:
                continue
            seen.add((path, "data"))
            risks.append(Risk(path, "data", change.call))
        for change in rep.entries:
            if _durable_by(change, earliest) or not change.path.startswith(root + "/"):
                continue
            if (change.path, "entry") in seen:
                continue
            seen.add((change.path, "entry"))
            risks.append(Risk(change.path, "entry", change.call))
        out.append(AckRisk(token, latest, tuple(risks)))
    return out
