"""Host-side checks of crash states: the oracle, and the filesystem checker on a throwaway view.

For each state: the scratch image is moved to it (`overlay.Scratch`, only the
sectors that differ from the previous state are written), then

* the **oracle** (`harness.durability.oracle.check`) judges it against the log
  *as of the cut at its point* (`log_as_of`: requests submitted before the
  point, completions after it undone) and the promise the guest was told
  (`judge`). A state enumerated under the same promise is inside the
  contract by construction, so a violation there is a bug in exploration;
  under a disk that keeps less than it promised (unsafe, a lying flush) the
  violations are the finding.
* the **filesystem checker**, with journal recovery, never by mounting the
  image in the host's kernel. ext4: `e2fsck -p -f -z UNDO` (preen: replays the
  journal, releases orphans and fixes the summary counts a crash leaves
  behind, and exits 4 on anything a crash must not cause), then `e2undo` puts
  back every block it wrote, so the scratch holds the state again (measured
  here against a sector diff: the undo file is both cheaper and exact). The
  other filesystems' host tools and what they can say are in `checker_for`.

Identical images are checked once: a state whose content hash was seen
already takes that state's findings (`duplicate_of`). A state's verdict is a
`StateVerdict` (`harness.explore.doc`): violation when the oracle fails it,
fail when a filesystem checker does, pass.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from harness.durability.contract import Promise
from harness.durability.oracle import check
from harness.durability.writelog import Op, Request, WriteLog
from harness.errors import ConfigError
from harness.explore.doc import OracleRecord, StateCheck, StateVerdict, Where
from harness.explore.overlay import Scratch, StateBuilder, StateView
from harness.explore.states import State, Timeline

log = logging.getLogger(__name__)


def log_as_of(wlog: WriteLog, at: int) -> WriteLog:
    """The log as the oracle would have read it had the power been cut after record `at - 1`."""
    requests = []
    for r in wlog.requests:
        if r.submit_index >= at:
            break  # requests are in submit order
        if r.complete_index is not None and r.complete_index >= at:
            r = dataclasses.replace(r, complete_index=None, complete_ns=None, status=None)
        requests.append(r)
    return dataclasses.replace(
        wlog,
        requests=requests,
        records=at,
        torn_bytes=0,
        marks=[m for m in wlog.marks if m[0] < at],
        write_cache_changes=[c for c in wlog.write_cache_changes if c[0] < at],
        preimages=[p for p in wlog.preimages if p[0] < at],
    )


def trim_log(wlog: WriteLog, sectors: Sequence[int]) -> WriteLog:
    """The log cut down to the sorted `sectors`: flushes, and each write's pieces over them.

    The oracle classifies a sector from every version written to it and its
    initial content, which this keeps whole for the sectors given; a sector
    outside them is not checked at all.
    """
    ss = wlog.header.sector_size
    requests: list[Request] = []
    for r in wlog.requests:
        if r.op == Op.FLUSH:
            requests.append(r)
            continue
        if r.length == 0:
            continue
        first = r.offset // ss
        for a, n in _runs_within(sectors, first, -(-(r.offset + r.length) // ss)):
            i = a - first
            requests.append(
                dataclasses.replace(
                    r,
                    offset=a * ss,
                    length=n * ss,
                    crcs=r.crcs[i : i + n] if r.crcs is not None else None,
                    pre=r.pre[i : i + n] if r.pre is not None else None,
                    span_crc=None,
                    data_offset=None,
                )
            )
    preimages = [
        (index, a, crcs[a - first : a - first + n])
        for index, first, crcs in wlog.preimages
        for a, n in _runs_within(sectors, first, first + len(crcs))
    ]
    return dataclasses.replace(wlog, requests=requests, preimages=preimages)


def _runs_within(sectors: Sequence[int], lo: int, hi: int) -> list[tuple[int, int]]:
    """(first, count) runs of the sorted `sectors` inside [lo, hi)."""
    i = bisect.bisect_left(sectors, lo)
    runs: list[tuple[int, int]] = []
    while i < len(sectors) and sectors[i] < hi:
        s = sectors[i]
        if runs and runs[-1][0] + runs[-1][1] == s:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((s, 1))
        i += 1
    return runs


@dataclass
class _PointOracle:
    at: int
    footprint: list[int]
    rest_ok: bool | None = None  # the whole check of the point's first state found nothing
    trimmed: WriteLog | None = None


@dataclass(frozen=True)
class Finding:
    """One filesystem checker's word on one state: ok True/False, or None when it could not
    judge (explore.json keeps it as a `StateCheck` with its role)."""

    checker: str
    ok: bool | None
    detail: str = ""
    seconds: float = 0.0
    image_changed: bool = False  # the checker wrote the image and could not undo it

    def record(self, role: str) -> StateCheck:
        """As explore.json keeps it: a host-side check in `role`."""
        return StateCheck(self.checker, role, self.ok, self.detail, Where.HOST, None, self.seconds)


class FsChecker(Protocol):
    name: str

    def check(self, image: Path) -> Finding:
        """Judge the image; leave it exactly as it was (or raise ProcessError)."""
        ...


E2FSCK_CONF = "[options]\n\tbroken_system_clock = 1\n"
# The checkers' output is matched against their English messages: never a translation
# (LC_ALL wins over LANG and LC_MESSAGES, so LANG=C alone is not enough).
C_LOCALE = {"LC_ALL": "C"}


class Ext4Checker:
    """`e2fsck -p -f` with journal recovery on the scratch image, undone with `e2undo`."""

    name = "e2fsck"

    def __init__(self, workdir: Path | str) -> None:
        self.workdir = Path(workdir)
        self.undo = self.workdir / "fsck.e2undo"
        conf = self.workdir / "e2fsck.conf"
        conf.write_text(E2FSCK_CONF)
        # A crash state's superblock may carry times from the recording: never "in the future".
        self.env = {**os.environ, "E2FSCK_CONFIG": str(conf), **C_LOCALE}
        for tool in ("e2fsck", "e2undo"):
            if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
                raise ConfigError(f"{tool} is not installed; install e2fsprogs")

    def check(self, image: Path) -> Finding:
        t0 = time.perf_counter()
        self.undo.unlink(missing_ok=True)
        run = subprocess.run(
            ["e2fsck", "-p", "-f", "-z", str(self.undo), str(image)],
            capture_output=True,
            text=True,
            env=self.env,
            close_fds=False,
            check=False,
        )
        code = run.returncode
        out = (run.stdout + run.stderr).strip()
        if self.undo.exists():
            back = subprocess.run(
                ["e2undo", str(self.undo), str(image)],
                capture_output=True,
                text=True,
                env=self.env,
                close_fds=False,
                check=False,
            )
            # An e2fsck that gave up half-way (exit 8) may leave an undo file without its
            # header: the caller then rebuilds the image instead.
            restored = back.returncode == 0
        else:
            restored = code == 8  # could not even open the image: nothing written
        ok = code in (0, 1, 2)  # 1, 2: fixed what a crash leaves (journal, orphans, counts)
        detail = _tail(out) if not ok else ("recovered the journal" if "recover" in out else "")
        return Finding(
            self.name,
            ok,
            f"exit {code}" + (f": {detail}" if detail else ""),
            time.perf_counter() - t0,
            image_changed=not restored,
        )


class ReadOnlyChecker:
    """A checker that never writes the image, for filesystems whose host tool cannot recover.

    * xfs: `xfs_repair -n` cannot replay the log; on a dirty one it warns of
      spurious inconsistencies, so such a state is reported as not judged (ok
      None) — the checker guest's mount replays the log and judges it.
    * btrfs: `btrfs check --readonly` checks the last committed transaction; the
      fsync log tree is replayed only by a mount, so fsync'd-but-uncommitted data
      is the checker guest's to judge.
    * f2fs: `fsck.f2fs` (no fixing) checks the last checkpoint; roll-forward
      recovery of fsync'd data is the mount's, again the guest's.
    """

    def __init__(self, name: str, argv: list[str], dirty_log_marker: str | None = None) -> None:
        self.name = name
        self.argv = argv
        self.dirty_log_marker = dirty_log_marker

    def check(self, image: Path) -> Finding:
        t0 = time.perf_counter()
        run = subprocess.run(
            [*self.argv, str(image)],
            capture_output=True,
            text=True,
            env={**os.environ, **C_LOCALE},  # the dirty-log marker is xfs_repair's English
            check=False,
            close_fds=False,
        )
        out = (run.stdout + run.stderr).strip()
        if self.dirty_log_marker and self.dirty_log_marker in out:
            return Finding(
                self.name,
                None,
                "log needs replay: only a mount can judge this state",
                time.perf_counter() - t0,
            )
        ok = run.returncode == 0
        return Finding(
            self.name,
            ok,
            f"exit {run.returncode}" + ("" if ok else f": {_tail(out)}"),
            time.perf_counter() - t0,
        )


def checker_for(fstype: str | None, workdir: Path | str) -> FsChecker | None:
    """The host-side checker of a filesystem type (None: no filesystem, the oracle alone)."""
    if fstype in (None, "", "none", "raw"):
        return None
    if fstype in ("ext2", "ext3", "ext4"):
        return Ext4Checker(workdir)
    if fstype == "xfs":
        return ReadOnlyChecker(
            "xfs_repair", ["xfs_repair", "-n", "-f"], "valuable metadata changes in a log"
        )
    if fstype == "btrfs":
        return ReadOnlyChecker("btrfs-check", ["btrfs", "check", "--readonly"])
    if fstype == "f2fs":
        return ReadOnlyChecker("fsck.f2fs", ["fsck.f2fs", "--dry-run"])
    raise ConfigError(
        f"no host-side checker for filesystem {fstype!r}; known: ext2/3/4, xfs, btrfs, f2fs"
    )


def _tail(text: str, lines: int = 4) -> str:
    return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())


@dataclass(frozen=True)
class HostResult:
    """A state checked host-side: its image's hash, the oracle's report, the findings."""

    state: State
    digest: str
    oracle: OracleRecord | None  # None: the cell's checkers leave the oracle out
    findings: list[Finding]
    verdict: StateVerdict
    seconds: float
    duplicate_of: str | None = None
    sectors_differing: int = 0

    @property
    def failed(self) -> bool:
        return self.verdict is not StateVerdict.PASS


def verdict_of(oracle_ok: bool, findings: Iterable[Finding]) -> StateVerdict:
    if not oracle_ok:
        return StateVerdict.VIOLATION
    return StateVerdict.FAIL if any(f.ok is False for f in findings) else StateVerdict.PASS


class HostChecker:
    """Checks states one after another on one scratch image (one worker)."""

    def __init__(
        self,
        timeline: Timeline,
        log_path: Path | str,
        base: Path | str,
        judge: Promise,
        *,
        fsck: FsChecker | None = None,
        workdir: Path | str | None = None,
        oracle: bool = True,
        full_every: int = 32,
    ) -> None:
        self.timeline = timeline
        self.judge = judge
        self.fsck = fsck
        self.oracle = oracle
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="powercut-explore-", dir=_fast_tmp())
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.builder = StateBuilder(timeline, log_path, base)
        self.scratch = Scratch(self.builder, self.workdir / "scratch.img")
        self._points: dict[int, _PointOracle] = {}
        self._points_seen = 0
        self.full_every = full_every
        self._full_view: tuple[int, WriteLog] | None = None

    def _full(self, at: int) -> WriteLog:
        if self._full_view is None or self._full_view[0] != at:
            self._full_view = (at, log_as_of(self.timeline.wlog, at))
        return self._full_view[1]

    def _oracle(self, state: State) -> OracleRecord:
        """The oracle on the scratch image, as of the state's point.

        Every state at a point shares the content of every sector no pending
        write touches, and that content is the newest durable write's by
        construction — which the oracle can only confirm. So states are checked
        on the pending writes' sectors (the log trimmed to them, every version of
        each kept), where they differ and where a loss can be; the whole log is
        checked for the first state of one point in `full_every` (every point
        with `full_every=1`) as a check of the construction itself, and for every
        state of a point where that found a violation.
        """
        point = state.point
        po = self._points.get(point.at)
        if po is None:
            if len(self._points) >= 4096:
                self._points.clear()
            footprint = sorted(
                {
                    s
                    for w in self.timeline.pending(point)
                    for s in range(
                        w.offset // self.timeline.sector_size,
                        -(-(w.offset + w.length) // self.timeline.sector_size),
                    )
                }
            )
            po = self._points[point.at] = _PointOracle(point.at, footprint)
            if self._points_seen % self.full_every:
                po.rest_ok = True  # not checked whole: see above
            self._points_seen += 1
        if po.rest_ok is None or not po.rest_ok:
            report = check(self.scratch.path, self._full(point.at), self.judge)
            if po.rest_ok is None:
                po.rest_ok = report.ok
            return OracleRecord.of(report, "all")
        if po.trimmed is None:
            po.trimmed = trim_log(self._full(point.at), po.footprint)
        report = check(self.scratch.path, po.trimmed, self.judge)
        return OracleRecord.of(report, "pending sectors")

    def view(self, state: State) -> StateView:
        return self.scratch.materialize(state)

    def check(
        self, state: State, view: StateView | None = None, cache: CheckCache | None = None
    ) -> HostResult:
        """Check one state; with `cache`, an image seen before is not checked again.

        The filesystem checker's word depends on the image alone, so it is shared
        by content hash; the oracle's depends on the point too (what was durable
        there), so it is shared by content hash and point.
        """
        t0 = time.perf_counter()
        if view is None:
            view = self.scratch.materialize(state)
        digest = view.digest
        duplicate_of = None
        oracle: OracleRecord | None = None
        if self.oracle:
            key = (digest, state.point.at)
            oracle = cache.oracle.get(key) if cache is not None else None
            if oracle is None:
                oracle = self._oracle(state)
                if cache is not None:
                    cache.oracle[key] = oracle
        findings: list[Finding] = []
        if self.fsck is not None:
            seen = cache.fsck.get(digest) if cache is not None else None
            if seen is None:
                try:
                    finding = self.fsck.check(self.scratch.path)
                except BaseException:
                    self.scratch.forget()
                    raise
                if finding.image_changed:
                    self.scratch.forget()  # then hold the state again, as after any check
                    self.scratch.materialize(state)
                if cache is not None:
                    cache.fsck[digest] = (state.id, finding)
                findings.append(finding)
            else:
                duplicate_of = seen[0]
                findings.append(dataclasses.replace(seen[1], seconds=0.0))
        elif cache is not None:
            duplicate_of = cache.first.setdefault(digest, state.id)
            duplicate_of = None if duplicate_of == state.id else duplicate_of
        return HostResult(
            state,
            digest,
            oracle,
            findings,
            verdict_of(oracle is None or oracle.ok, findings),
            time.perf_counter() - t0,
            duplicate_of=duplicate_of,
            sectors_differing=len(self.scratch.held),
        )

    def close(self) -> None:
        self.scratch.close()
        self.builder.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> HostChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fast_tmp() -> str | None:
    """tmpfs when there is one: e2fsck's and the undo file's syncs then cost nothing."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


@dataclass
class CheckCache:
    """What was checked already: fsck findings by content hash, oracle reports by (hash, point)."""

    fsck: dict[str, tuple[str, Finding]] = field(default_factory=dict)
    oracle: dict[tuple[str, int], OracleRecord] = field(default_factory=dict)
    first: dict[str, str] = field(default_factory=dict)  # digest -> first state id (no fsck)


@dataclass
class Exploration:
    """Results so far, in enumeration order; `explored` counts duplicates too."""

    results: list[HostResult] = field(default_factory=list)
    unique: int = 0
    seconds: float = 0.0

    @property
    def explored(self) -> int:
        return len(self.results)

    @property
    def failing(self) -> list[HostResult]:
        return [r for r in self.results if r.failed]


def explore_host(
    checkers: list[HostChecker],
    states: Iterable[State],
    *,
    on_result: Callable[[HostResult], None] | None = None,
    cache: CheckCache | None = None,
) -> Exploration:
    """Check `states` on `checkers` (one per worker thread), identical images once.

    States are dealt to workers in consecutive blocks, so each worker's scratch
    and durable map move forward through the points. `on_result` sees every
    result as it comes (to write explore.json as it goes); the results list is in
    enumeration order.
    """
    t0 = time.perf_counter()
    cache = cache if cache is not None else CheckCache()
    lock = threading.Lock()
    found: dict[int, HostResult] = {}
    order = list(states)
    errors: list[BaseException] = []
    block = 16

    def blocks(worker: int) -> Iterator[int]:
        n = len(checkers)
        for start in range(worker * block, len(order), n * block):
            yield from range(start, min(start + block, len(order)))

    def run(worker: int) -> None:
        hc = checkers[worker]
        try:
            for i in blocks(worker):
                result = hc.check(order[i], cache=cache)
                with lock:
                    found[i] = result
                    if on_result is not None:
                        on_result(result)
                if errors or stop.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller's thread below
            errors.append(exc)

    stop = threading.Event()
    if len(checkers) == 1:
        run(0)
    else:
        threads = [
            threading.Thread(target=run, args=(w,), daemon=True) for w in range(len(checkers))
        ]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException:
            # Interrupted (Ctrl-C): let each worker finish the state in hand, whose checker
            # process then exits, so nothing is left running; what was checked is kept
            # by `on_result`.
            stop.set()
            for t in threads:
                t.join()
            raise
    if errors:
        raise errors[0]
    results = [found[i] for i in sorted(found)]
    return Exploration(results, len({r.digest for r in results}), time.perf_counter() - t0)
