"""Why it was lost: the calls behind a failing state, and the fix that would have kept it.

Pure: a traced run (`harness.explore.syscalls.Trace`), the guest clock's
bounds on the host's (`harness.explore.clock.ClockBounds`), the
acknowledgements' host receipt times, the tree before the run and, when the
run ended before the cut, after it (`harness.explore.fileview.FileView`,
listed in the recording guest), and for a failing state the recovered file
view, the lost tokens and, if known, the lost and torn writes as device byte
ranges. No guest, no disk.

The calls are replayed in enter order into what the POSIX contract promises
durable: a file's data (write, pwrite, writev, truncate, fallocate, an open
with O_TRUNC) is durable once an fsync or fdatasync of that file, an msync of
its mapping, sync(2) or syncfs(2) completed after it, or when it went
through a descriptor opened O_SYNC/O_DSYNC; a directory entry (create,
rename, link, symlink, unlink, mkdir, rmdir) once an fsync of its directory,
sync(2) or syncfs(2) completed after it. close(2) and sync_file_range(2)
promise nothing. A file keeps its identity across renames and links, so the
writes made to `x.tmp` are the data of `x` after `rename(x.tmp, x)`.

The same replay says what the tree was when the workload acknowledged: which
names led to which file, and each file's size where the calls determine it
(created or truncated, then written through O_APPEND, at explicit offsets or
sequentially through a write-only descriptor whose seeks are traced; a file
the model cannot follow, or whose modelled size at the end of the run
disagrees with the tree listed then, has no size). A file no call changed
after the acknowledgement has the content the tree after the run shows. That
is the reference a failing state is compared with: the tree as the workload
saw it, not as the disk had it — a change that never left the guest's page
cache is on neither the disk nor any crash state, and still the one lost.

For a failing state, every path where the recovered tree differs from that
reference (missing, present though removed, shorter than the calls left it,
other content) is a lost effect; the calls that made it and completed before
the boundary — the earliest lost acknowledgement, or the state's own point
when only the check failed — are looked up, and the property each relied on
is named in a fixed vocabulary (`Property`):

- data not synced: a write with no fsync/fdatasync of its file before the ack;
- directory entry not synced: a create, rename, link or unlink with no fsync
  of its directory before the ack;
- order assumed: a later write of another file was made durable, the earlier
  write was not, and nothing between them forced the order;
- a single call not atomic: a write whose range the state tore (known only
  with the torn writes mapped to files), or a rename that left both names.

Each cause says what would have made it durable ("fsync the directory /mnt
after rename(/mnt/x.tmp, /mnt/x)"). A lost effect whose calls were all
durable before the boundary is not the application's doing and is never
blamed on a call: the state is `unexplained`, with the evidence (the
differences, the calls and the syncs that covered them, the writes by file).
Changes that were not promised yet are in the recovered tree anyway are
listed as kept by the filesystem, with the first sync after them.

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.explore.clock import ClockBounds
from harness.explore.fileview import EntryType, FileView, differences
from harness.explore.syscalls import (
    O_ACCMODE,
    O_APPEND,
    O_CLOEXEC,
    O_CREAT,
    O_DSYNC,
    O_RDWR,
    O_TRUNC,
    O_WRONLY,
    Call,
    CallKind,
    Trace,
)

NEVER = 1 << 62
FALLOC_FL_KEEP_SIZE = 0x1


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

    def to_json(self) -> dict[str, Any]:
        return {"token": self.token, "host_ns": self.host_ns}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> AckTime:
        return cls(str(raw["token"]), int(raw["host_ns"]))


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

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Cause:
        return cls(
            Property(raw["property"]),
            str(raw["path"]),
            tuple(Call.from_json(c) for c in raw.get("calls", [])),
            str(raw["fix"]),
            str(raw.get("evidence", "")),
        )


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
    seconds: float | None = None  # the time it took (the views and the engine)

    @property
    def unexplained(self) -> bool:
        return not self.causes

    def lines(self) -> list[str]:
        """The explanation as a person reads it, one line per cause (or why none)."""
        if self.causes:
            return [c.describe() for c in self.causes]
        return ["unexplained: " + "; ".join(self.evidence[:3] or ("no evidence",))]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "state": self.state,
            "lost_tokens": list(self.lost_tokens),
            "boundary": self.boundary,
            "causes": [c.to_json() for c in self.causes],
            "unexplained": self.unexplained,
            "evidence": list(self.evidence),
            "kept": list(self.kept),
            "writes": list(self.writes),
        }
        if self.seconds is not None:
            out["seconds"] = self.seconds
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Explanation:
        return cls(
            state=str(raw["state"]),
            lost_tokens=tuple(str(t) for t in raw.get("lost_tokens", [])),
            boundary=str(raw.get("boundary", "")),
            causes=tuple(Cause.from_json(c) for c in raw.get("causes", [])),
            evidence=tuple(str(e) for e in raw.get("evidence", [])),
            kept=tuple(str(k) for k in raw.get("kept", [])),
            writes=tuple(str(w) for w in raw.get("writes", [])),
            seconds=raw.get("seconds"),
        )


UNEXPLAINED_KEY = "unexplained: no call's missing durability explains the loss"


@dataclass(frozen=True)
class CauseGroup:
    """One distinct cause over all failing states: how many it explains, and the smallest."""

    key: str
    relied_on: Property | None  # None: the states no cause explains
    fix: str
    states: tuple[str, ...]
    smallest: str
    replay: str | None = None

    @property
    def unexplained(self) -> bool:
        return self.relied_on is None

    def line(self) -> str:
        replay = f"; replay: {self.replay}" if self.replay else ""
        return f"{self.key} — {len(self.states)} state(s), smallest {self.smallest}{replay}"

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "property": self.relied_on.value if self.relied_on is not None else None,
            "fix": self.fix,
            "states": list(self.states),
            "count": len(self.states),
            "smallest": self.smallest,
            "replay": self.replay,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> CauseGroup:
        prop = raw.get("property")
        return cls(
            str(raw["key"]),
            Property(prop) if prop is not None else None,
            str(raw.get("fix", "")),
            tuple(str(s) for s in raw.get("states", [])),
            str(raw.get("smallest", "")),
            raw.get("replay"),
        )


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

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Risk:
        return cls(str(raw["path"]), str(raw["what"]), Call.from_json(raw["since"]))


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

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> AckRisk:
        return cls(
            str(raw["token"]),
            int(raw["guest_ns"]),
            tuple(Risk.from_json(r) for r in raw.get("risks", [])),
        )


# -- the calls replayed into what is durable, and what the tree was ---------------------------


@dataclass
class _Change:
    call: Call
    file: int  # the file's identity (data) or -1 (entries)
    path: str  # the path at the time (data), the entry's path (entries)
    directory: str  # the entry's directory (entries)
    synced_by: Call | None = None  # the first call that made it durable
    self_synced: bool = False  # written through an O_SYNC/O_DSYNC descriptor


@dataclass
class _Desc:
    """An open descriptor as far as the model follows it."""

    file: int
    pos: int | None  # where its next write() goes (None: unknown)
    append: bool
    sync: bool
    write_only: bool  # reads are not traced: a read-write descriptor's position is unknown
    cloexec: bool


def _end(call: Call) -> int:
    return call.exit_ns if call.exit_ns is not None else NEVER


@dataclass
class _Replay:
    """Every data and entry change of the trace, each with the call that made it durable,
    and the tree as the calls left it at any instant (`name_at`, `size_at`)."""

    data: list[_Change] = field(default_factory=list)
    entries: list[_Change] = field(default_factory=list)
    names: dict[str, int] = field(default_factory=dict)  # path -> file identity, at the end
    history: dict[int, list[str]] = field(default_factory=dict)  # identity -> its paths, in order
    renames: list[Call] = field(default_factory=list)
    unnamed_msyncs: list[Call] = field(default_factory=list)
    types: dict[int, EntryType] = field(default_factory=dict)
    existing: set[str] = field(default_factory=set)  # paths in the tree before the run
    # path -> (instant, identity or None, the call), in the order the calls returned
    bindings: dict[str, list[tuple[int, int | None, Call | None]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    sizes: dict[int, list[tuple[int, int | None]]] = field(
        default_factory=lambda: defaultdict(list)
    )  # identity -> (instant, size or None: the model cannot follow it)

    def name_at(self, path: str, at: int) -> int | None:
        """The identity `path` led to once every call that returned by `at` had."""
        fid: int | None = None
        for when, bound, _call in self.bindings.get(path, ()):
            if when > at:
                break
            fid = bound
        return fid

    def tree_at(self, at: int) -> dict[str, int]:
        out = {}
        for path in self.bindings:
            fid = self.name_at(path, at)
            if fid is not None:
                out[path] = fid
        return out

    def binding_call(self, path: str, at: int) -> Call | None:
        """The call that last bound or removed `path` by `at` (None: it was there before)."""
        call = None
        for when, _bound, by in self.bindings.get(path, ()):
            if when > at:
                break
            call = by
        return call

    def size_at(self, fid: int, at: int) -> int | None:
        size: int | None = None
        for when, value in self.sizes.get(fid, ()):
            if when > at:
                break
            size = value
        return size

    def changed_after(self, fid: int, at: int) -> list[_Change]:
        return [c for c in self.data if c.file == fid and _end(c.call) > at]

    def bound_after(self, path: str, at: int) -> bool:
        return any(when > at for when, _f, _c in self.bindings.get(path, ()))


_DATA = (CallKind.WRITE, CallKind.TRUNCATE, CallKind.FALLOCATE)


def _existing_entries(existing: FileView | Iterable[str], root: str | None) -> dict[str, Any]:
    """Absolute path -> its entry in the tree before the run (None: a bare path)."""
    if isinstance(existing, FileView):
        top = existing.root.rstrip("/") or "/"
        return {(f"{top}/{e.path}" if e.path else top): e for e in existing.entries}
    return dict.fromkeys(existing)


def replay(trace: Trace, until_ns: int = NEVER, existing: FileView | Iterable[str] = ()) -> _Replay:
    """Walk the successful calls that returned by `until_ns` (guest) in enter order.

    `existing`: the tree before the run (a view, or its absolute paths), so
    that opening one of its files with O_CREAT is not mistaken for creating
    it, and its files' sizes start the model's.
    """
    out = _Replay()
    before = _existing_entries(existing, None)
    out.existing = set(before)
    descs: dict[tuple[int, int], _Desc] = {}
    next_id = 0

    def new_identity() -> int:
        nonlocal next_id
        next_id += 1
        return next_id - 1

    def bind(path: str, fid: int | None, at: int, call: Call | None) -> None:
        if fid is None:
            out.names.pop(path, None)
        else:
            out.names[path] = fid
            paths = out.history.setdefault(fid, [])
            if not paths or paths[-1] != path:
                paths.append(path)
        out.bindings[path].append((at, fid, call))

    def set_size(fid: int, at: int, size: int | None) -> None:
        out.sizes[fid].append((at, size))

    def size_now(fid: int) -> int | None:
        got = out.sizes.get(fid)
        return got[-1][1] if got else None

    for known, listed in before.items():
        fid = new_identity()
        bind(known, fid, -1, None)
        kind = listed.type if listed is not None else EntryType.FILE
        out.types[fid] = kind
        if listed is not None and kind is EntryType.FILE:
            set_size(fid, -1, listed.size)

    def ident(path: str, at: int, call: Call) -> int:
        if path not in out.names:
            fid = new_identity()
            bind(path, fid, at, call)
            out.types[fid] = EntryType.FILE
        return out.names[path]

    def entry(call: Call, path: str) -> None:
        out.entries.append(_Change(call, -1, path, posixpath.dirname(path)))

    def data(call: Call, fid: int, path: str, self_synced: bool = False) -> None:
        change = _Change(call, fid, path, posixpath.dirname(path))
        change.self_synced = self_synced
        out.data.append(change)

    for call in trace.calls:
        if not call.ok or _end(call) > until_ns:
            continue
        at = _end(call)
        kind, path = call.kind, call.path
        if kind is CallKind.OPEN and path is not None:
            flags = call.flags or 0
            # O_CREAT makes an entry only for a name that did not exist: one the trace has not
            # seen (or saw removed) and that was not in the tree before the run (`existing`).
            new = path not in out.names
            fid = ident(path, at, call)
            writable = flags & O_ACCMODE in (O_WRONLY, O_RDWR)
            if new and flags & O_CREAT:
                entry(call, path)
                set_size(fid, at, 0)
            elif flags & O_TRUNC and writable:
                data(call, fid, path)
                set_size(fid, at, 0)
            if call.fd is not None:
                descs[(call.pid, call.fd)] = _Desc(
                    fid,
                    0,
                    bool(flags & O_APPEND),
                    bool(flags & O_DSYNC),
                    flags & O_ACCMODE == O_WRONLY,
                    bool(flags & O_CLOEXEC),
                )
        elif kind is CallKind.CLOSE and call.fd is not None:
            descs.pop((call.pid, call.fd), None)
        elif kind is CallKind.SEEK and call.fd is not None:
            desc = descs.get((call.pid, call.fd))
            if desc is not None:
                desc.pos = call.offset
        elif kind is CallKind.CLONE and call.result is not None:
            for (pid, fd), d in list(descs.items()):
                if pid == call.pid:  # a shared description: its position moves under both
                    shared = _Desc(d.file, None, d.append, d.sync, d.write_only, d.cloexec)
                    descs[(call.result, fd)] = shared
                    d.pos = None if not d.append else d.pos
        elif kind is CallKind.EXEC:
            for key in [k for k, d in descs.items() if k[0] == call.pid and d.cloexec]:
                del descs[key]
        elif kind in _DATA and path is not None:
            fid = ident(path, at, call)
            desc = descs.get((call.pid, call.fd if call.fd is not None else -1))
            data(call, fid, path, kind is CallKind.WRITE and desc is not None and desc.sync)
            set_size(fid, at, _size_after(call, desc, size_now(fid)))
        elif kind is CallKind.RENAME and path is not None and call.path2 is not None:
            moved = {p: i for p, i in out.names.items() if p == path or p.startswith(path + "/")}
            if path not in moved:
                moved[path] = ident(path, at, call)
            for p in moved:
                bind(p, None, at, call)
            for p, fid in moved.items():
                bind(call.path2 + p[len(path) :], fid, at, call)
            out.renames.append(call)
            entry(call, path)
            entry(call, call.path2)
        elif kind is CallKind.LINK and path is not None and call.path2 is not None:
            bind(call.path2, ident(path, at, call), at, call)
            entry(call, call.path2)
        elif kind in (CallKind.UNLINK, CallKind.RMDIR) and path is not None:
            bind(path, None, at, call)
            entry(call, path)
        elif kind in (CallKind.MKDIR, CallKind.SYMLINK) and path is not None:
            fid = new_identity()
            bind(path, fid, at, call)
            out.types[fid] = EntryType.DIR if kind is CallKind.MKDIR else EntryType.SYMLINK
            entry(call, path)
        elif kind in (CallKind.FSYNC, CallKind.FDATASYNC) and path is not None:
            _sync(out.data, call, file=out.names.get(path))
            if kind is CallKind.FSYNC:  # a directory's fsync makes its entries durable
                _sync(out.entries, call, directory=path)
        elif kind is CallKind.MSYNC:
            if path is None:
                out.unnamed_msyncs.append(call)
                continue
            _sync(out.data, call, file=out.names.get(path))
        elif kind in (CallKind.SYNC, CallKind.SYNCFS):
            _sync(out.data + out.entries, call)
    return out


_ANY = object()


def _sync(
    changes: Iterable[_Change], call: Call, *, file: object = _ANY, directory: object = _ANY
) -> None:
    """`call` makes durable every change it covers (of `file`, in `directory`, or all)
    that had returned when it started."""
    for change in changes:
        if (
            change.synced_by is None
            and (file is _ANY or change.file == file)
            and (directory is _ANY or change.directory == directory)
            and _before(change.call, call)
        ):
            change.synced_by = call


def _size_after(call: Call, desc: _Desc | None, size: int | None) -> int | None:
    """A file's size after a data call, where the model can follow it (None otherwise)."""
    if call.kind is CallKind.TRUNCATE:
        return call.length
    if call.kind is CallKind.FALLOCATE:
        if (call.flags or 0) & FALLOC_FL_KEEP_SIZE:
            return size
        if size is None or call.offset is None or call.length is None:
            return None
        return max(size, call.offset + call.length)
    written = call.result if call.result is not None and call.result >= 0 else None
    if written is None or size is None:
        if desc is not None and not desc.append and desc.pos is not None and written is not None:
            desc.pos += written
        return None
    if call.offset is not None:  # pwrite and friends: an explicit offset
        return max(size, call.offset + written)
    if desc is None:
        return None  # a descriptor opened before the trace, or in another process
    if desc.append:
        return size + written
    if desc.write_only and desc.pos is not None:
        desc.pos += written
        return max(size, desc.pos)
    desc.pos = None
    return None


def _before(change: Call, sync: Call) -> bool:
    """The change had returned when the sync started (so the sync covers it)."""
    return _end(change) <= sync.enter_ns


def _durable_by(change: _Change, until_ns: int) -> bool:
    if change.self_synced:
        return True
    sync = change.synced_by
    return sync is not None and _end(sync) <= until_ns


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


# -- the tree as the workload saw it -------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """One name at the boundary, as the calls left it (None: not determined)."""

    path: str  # absolute
    type: EntryType
    size: int | None
    md5: str | None
    grows_after: bool  # data calls after the boundary may have made it longer
    shrinks_after: bool  # ... or shorter (a truncate, an O_TRUNC)


def expected_tree(
    rep: _Replay,
    at: int,
    root: str,
    *,
    existing: FileView | None = None,
    final: FileView | None = None,
) -> dict[str, Expected]:
    """Every name under `root` once the calls that returned by `at` had, with what it held.

    A size is the model's (`replay`), dropped when the model at the end of the
    trace disagrees with `final` (the tree listed after the run: a call the
    trace does not show changed it). A digest is known for a file no call
    changed after `at`: the one `final` lists, or `existing` if none changed it
    at all.
    """
    before = _existing_entries(existing, None) if existing is not None else {}
    after = _existing_entries(final, None) if final is not None else {}
    end = rep.tree_at(NEVER)
    ends_at = {fid: path for path, fid in end.items()}
    out: dict[str, Expected] = {}
    for path, fid in rep.tree_at(at).items():
        if not (path == root or path.startswith(root.rstrip("/") + "/")):
            continue
        kind = rep.types.get(fid, EntryType.FILE)
        later = rep.changed_after(fid, at)
        size = rep.size_at(fid, at) if kind is EntryType.FILE else None
        md5: str | None = None
        listed = after.get(ends_at.get(fid, ""))
        if final is not None and kind is EntryType.FILE:
            modelled = rep.size_at(fid, NEVER)
            if listed is not None and modelled is not None and listed.size != modelled:
                size = None  # something the trace does not show changed it
            if listed is not None and not later:
                md5 = listed.md5
                if size is None and listed.size is not None:
                    size = listed.size
        if md5 is None and not [c for c in rep.data if c.file == fid]:
            was = before.get(rep.history.get(fid, [path])[0])
            md5 = was.md5 if was is not None else None
        shrinks = any(
            c.call.kind is CallKind.TRUNCATE
            or (c.call.kind is CallKind.OPEN and (c.call.flags or 0) & O_TRUNC)
            for c in later
        )
        out[path] = Expected(path, kind, size, md5, bool(later), shrinks)
    return out


def expected_differences(
    recovered: FileView, expected: Mapping[str, Expected], rep: _Replay, at: int
) -> list[tuple[str, str]]:
    """(absolute path, what differs) between a recovered tree and the tree the calls left."""
    root = recovered.root.rstrip("/") or "/"
    got = {(f"{root}/{e.path}" if e.path else root): e for e in recovered.entries}
    out: list[tuple[str, str]] = []
    for path in sorted(set(got) | set(expected)):
        a, want = got.get(path), expected.get(path)
        if path == root:
            continue
        if a is None and want is not None:
            size = f" of {want.size} bytes" if want.size is not None else ""
            out.append((path, f"missing (the calls before it left a {want.type.value}{size})"))
        elif want is None and a is not None:
            removed = rep.binding_call(path, at)
            if removed is not None and rep.name_at(path, at) is None:
                out.append(
                    (path, f"present (a {a.type.value}), though {removed.describe()} removed it")
                )
            # Otherwise made after the boundary (allowed) or by nothing the trace shows.
            elif not rep.bound_after(path, at) and path not in rep.existing:
                out.append((path, f"present (a {a.type.value}), made by no traced call"))
        elif a is not None and want is not None:
            if a.type is EntryType.GONE:
                why = f": {a.error}" if a.error else ""
                out.append((path, f"named by its directory but unreadable{why}"))
                continue
            if a.type is not want.type:
                out.append((path, f"a {a.type.value} where the calls left a {want.type.value}"))
                continue
            if a.type is not EntryType.FILE:
                continue
            shorter = want.size is not None and a.size < want.size and not want.shrinks_after
            longer = want.size is not None and a.size > want.size and not want.grows_after
            if shorter or longer:
                out.append((path, f"{a.size} bytes where the calls before it left {want.size}"))
            elif (
                want.md5 is not None
                and a.md5 is not None
                and a.md5 != want.md5
                and (want.size is None or a.size == want.size)
            ):
                out.append((path, "other content than the calls before it left"))
    return out


# -- explaining one failing state ------------------------------------------------------------


def explain(
    state: str,
    trace: Trace,
    recovered: FileView,
    reference: FileView | None = None,
    *,
    lost_tokens: Sequence[str],
    ack_times: dict[str, tuple[int, int]],
    point_guest_ns: tuple[int, int] | None = None,
    lost_writes: Sequence[tuple[int, int]] = (),
    torn_writes: Sequence[tuple[int, int]] = (),
    existing: FileView | Iterable[str] = (),
    final: FileView | None = None,
) -> Explanation:
    """Name the calls and properties behind one failing state, or say why none is named.

    `ack_times` from `ack_guest_times`; `point_guest_ns` the state's point as
    (latest, earliest) guest time, for a state that failed with no token lost
    (its check exited non-zero); the lost and torn writes as device byte
    ranges, mapped to files through the recovered view (and `reference`'s).

    The recovered tree is compared with the tree the calls left at the
    boundary (`expected_tree`), or with `reference` when one is given (a view
    of the same point taken elsewhere: the same comparison, by the view's
    names, sizes and digests).
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
    rep = replay(trace, NEVER, existing)
    expected: dict[str, Expected] | None = None
    if reference is not None:
        diffs = [(f"{root}/{p}" if p else root, w) for p, w in differences(recovered, reference)]
    else:
        view_before = existing if isinstance(existing, FileView) else None
        expected = expected_tree(rep, earliest, root, existing=view_before, final=final)
        diffs = expected_differences(recovered, expected, rep, earliest)
    maps = [v for v in (recovered, reference, final) if v is not None]
    writes = _writes_by_file(maps, root, lost_writes, "lost") + _writes_by_file(
        maps, root, torn_writes, "torn"
    )
    torn_files = _torn_ranges(maps, root, torn_writes)
    causes: list[Cause] = []
    evidence: list[str] = [f"{p}: {what}" for p, what in diffs]
    if trace.last_ns is not None and trace.last_ns < earliest and earliest != NEVER:
        evidence.append("the trace ends before the boundary: calls after its end are unknown")
    for path, what in diffs:
        found = _explain_path(path, what, rep, recovered, earliest, latest, torn_files)
        if found and isinstance(found[0], Cause):
            causes += [c for c in found if isinstance(c, Cause) and c.key not in _keys(causes)]
        else:
            evidence.extend(str(line) for line in found)
    if not diffs:
        evidence.append(
            "the recovered tree has every name, size and known content the calls before the "
            "boundary left: the loss is in what the check reads of them"
        )
    if rep.unnamed_msyncs:
        evidence.append(
            f"{len(rep.unnamed_msyncs)} msync call(s) of mappings the trace cannot name "
            "(mmap is not traced) may have made more durable than shown"
        )
    kept = _kept(
        rep,
        recovered,
        expected if reference is None else None,
        root,
        earliest,
        latest,
        {p for p, _ in diffs},
    )
    return Explanation(
        state=state,
        lost_tokens=tuple(lost_tokens),
        boundary=boundary,
        causes=tuple(causes),
        evidence=tuple(evidence),
        kept=tuple(kept),
        writes=tuple(writes),
    )


def _keys(causes: Iterable[Cause]) -> set[str]:
    return {c.key for c in causes}


def _explain_path(
    path: str,
    what: str,
    rep: _Replay,
    recovered: FileView,
    earliest: int,
    latest: int,
    torn: dict[str, list[tuple[int, int]]],
) -> list[Cause] | list[str]:
    """The causes of one lost effect, or the evidence that no call explains it.

    A file that is missing relied on its entry and, when its data was not
    synced either, on that too: both are named (each fix alone would not
    have kept it under POSIX)."""
    before = [c for c in rep.entries if c.path == path and _end(c.call) <= earliest]
    entries_pending = [c for c in before if not _durable_by(c, latest)]
    file_id = rep.name_at(path, earliest)
    if file_id is None:
        file_id = rep.name_at(path, NEVER) if rep.binding_call(path, earliest) is None else None
    data = [
        c
        for c in rep.data
        if file_id is not None and c.file == file_id and _end(c.call) <= earliest
    ]
    data_pending = [c for c in data if not _durable_by(c, latest)]
    if what.startswith(("missing", "present")) and entries_pending:
        entry = _entry_cause(path, what, entries_pending[-1], recovered)
        if what.startswith("missing") and data_pending:
            data_cause = _data_cause(path, what, data_pending, rep, file_id, earliest, latest, torn)
            return [entry, data_cause]
        return [entry]
    if data_pending:
        return [_data_cause(path, what, data_pending, rep, file_id, earliest, latest, torn)]
    # The data was durable, but the name still leads to the file it led to before: a rename
    # or link onto the path that was not. (A create whose file is there took effect.)
    repointed = [
        c
        for c in entries_pending
        if c.call.kind in (CallKind.RENAME, CallKind.LINK) and c.call.path2 == path
    ]
    if repointed:
        return [_entry_cause(path, what, repointed[-1], recovered)]
    notes: list[str] = []
    for change in before + data:
        if not _durable_by(change, latest):
            # An entry not promised whose effect is there (the name is in the tree): what is
            # lost is not what it relied on.
            notes.append(
                f"{change.call.describe()} was not made durable before the boundary, yet its "
                f"entry {path} is in the recovered tree"
            )
            continue
        sync = change.synced_by
        how = "through O_SYNC/O_DSYNC" if change.self_synced else f"by {_describe(sync)}"
        notes.append(
            f"{change.call.describe()} was durable before the boundary ({how}), yet {path}: "
            f"{what} — not the application's doing"
        )
    if not notes:
        notes.append(f"no traced call before the boundary changed {path}")
    return notes


def _describe(call: Call | None) -> str:
    return call.describe() if call is not None else "nothing"


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
        if _end(change.call) > earliest or not _durable_by(change, latest):
            continue
        return change
    return None


def _writes_by_file(
    views: Sequence[FileView], root: str, ranges: Sequence[tuple[int, int]], how: str
) -> list[str]:
    out = []
    for offset, length in ranges:
        hits: list[tuple[str, int, int]] = []
        for view in views:
            hits = view.files_at(offset, length)
            if hits:
                break
        where = (
            ", ".join(f"{root}/{p} bytes {o}-{o + n}" for p, o, n in hits)
            if hits
            else "no file's data (metadata, free space, or a file the view does not map)"
        )
        out.append(f"{how} write at disk byte {offset} ({length} bytes): {where}")
    return out


def _torn_ranges(
    views: Sequence[FileView], root: str, ranges: Sequence[tuple[int, int]]
) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for offset, length in ranges:
        for view in views:
            hits = view.files_at(offset, length)
            for p, o, n in hits:
                out[f"{root}/{p}"].append((o, o + n))
            if hits:
                break
    return out


def _first_sync_after(rep: _Replay, call: Call, latest: int) -> Call | None:
    syncs = [
        c.synced_by
        for c in rep.data + rep.entries
        if c.synced_by is not None and _end(c.synced_by) <= latest
    ]
    after = sorted((s for s in syncs if _before(call, s)), key=lambda s: s.enter_ns)
    return after[0] if after else None


def _kept(
    rep: _Replay,
    recovered: FileView,
    expected: Mapping[str, Expected] | None,
    root: str,
    earliest: int,
    latest: int,
    differing: set[str],
) -> list[str]:
    """Changes not promised durable by the boundary that the recovered tree has anyway, with
    the first sync of anything after them (what a filesystem may have committed them with).

    An entry change counts when its effect is in the tree (a rename: the old name gone, the
    new one there); a file's unsynced writes when the tree has the size (or the content) the
    calls left, which only a known size or digest can say (`expected`)."""
    out = []
    seen: set[int] = set()

    def line(call: Call, what: str) -> str:
        sync = _first_sync_after(rep, call, latest)
        after = (
            f"; the first sync after it: {sync.describe()}"
            if sync is not None
            else "; no call synced anything after it"
        )
        return f"{call.describe()}: {what} and the filesystem kept it{after}"

    for change in rep.entries:
        call = change.call
        if call.index in seen or _end(call) > earliest or _durable_by(change, latest):
            continue
        paths = [p for p in (call.path, call.path2) if p is not None]
        if call.kind is not CallKind.RENAME:
            paths = [change.path]
        if any(p in differing or not p.startswith(root + "/") for p in paths):
            continue
        # Only the last change of each name by the boundary shows in the tree, and only if
        # nothing changed it after (the state may hold either).
        if any(rep.binding_call(p, earliest) is not call for p in paths):
            continue
        if any(rep.bound_after(p, earliest) for p in paths):
            continue
        there = [(recovered.get(p) is not None) == (rep.name_at(p, earliest) is not None)
                 for p in paths]  # fmt: skip
        if all(there):
            seen.add(call.index)
            entry = paths[-1]
            directory = posixpath.dirname(entry)
            what = f"the entry {entry} was not promised (no fsync of {directory})"
            out.append(line(call, what))
    if expected is not None:
        for path, want in expected.items():
            if path in differing or want.type is not EntryType.FILE:
                continue
            if want.size is None and want.md5 is None:
                continue
            got = recovered.get(path)
            if got is None:
                continue
            fid = rep.name_at(path, earliest)
            pending = [
                c
                for c in rep.data
                if c.file == fid and _end(c.call) <= earliest and not _durable_by(c, latest)
            ]
            if pending:
                last = pending[-1].call
                out.append(line(last, f"the data of {path} was not promised (no fdatasync)"))
    return out


def kept_at(
    trace: Trace,
    recovered: FileView,
    boundary: tuple[int, int],
    *,
    existing: FileView | Iterable[str] = (),
    final: FileView | None = None,
) -> list[str]:
    """In a state that lost nothing acknowledged by `boundary` ((latest, earliest) guest
    times): the changes made before it, never made durable, that the filesystem kept."""
    latest, earliest = boundary
    root = recovered.root.rstrip("/") or "/"
    rep = replay(trace, NEVER, existing)
    view_before = existing if isinstance(existing, FileView) else None
    expected = expected_tree(rep, earliest, root, existing=view_before, final=final)
    diffs = expected_differences(recovered, expected, rep, earliest)
    return _kept(rep, recovered, expected, root, earliest, latest, {p for p, _ in diffs})


# -- many states ---------------------------------------------------------------------------------


def group(
    explanations: Iterable[Explanation],
    size: Callable[[str], int] | None = None,
    replay_command: Callable[[str], str | None] | None = None,
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
                UNEXPLAINED_KEY,
                None,
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
    existing: FileView | Iterable[str] = (),
) -> list[AckRisk]:
    """At each acknowledgement: what under `root` is not yet durable, and since which call.

    The ack's latest possible guest time is used, so every change that may have
    come before it is listed; a sync counts only if it surely returned by then.
    """
    root = root.rstrip("/")
    rep = replay(trace, NEVER, existing)
    out: list[AckRisk] = []
    for token, (latest, earliest) in sorted(ack_times.items(), key=lambda kv: kv[1]):
        risks: list[Risk] = []
        seen: set[tuple[str, str]] = set()
        paths = {i: p for p, i in rep.tree_at(latest).items()}
        for change in rep.data:
            if _end(change.call) > latest or _durable_by(change, earliest):
                continue
            path = paths.get(change.file, change.path)
            if not path.startswith(root + "/") or (path, "data") in seen:
                continue
            seen.add((path, "data"))
            risks.append(Risk(path, "data", change.call))
        for change in rep.entries:
            if _end(change.call) > latest or _durable_by(change, earliest):
                continue
            if not change.path.startswith(root + "/") or (change.path, "entry") in seen:
                continue
            seen.add((change.path, "entry"))
            risks.append(Risk(change.path, "entry", change.call))
        out.append(AckRisk(token, latest, tuple(risks)))
    return out
