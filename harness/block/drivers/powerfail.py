"""`powerfail`: the host's volatile storage (page cache + disk cache) as an undo journal.

A write goes through to the image exactly as it would without this node;
before it does, the pre-image of the blocks it covers is appended to the
journal (`harness.durability.journal`). A flush that reaches the disk makes durable
exactly the writes that had completed when the flush started; writes still
in flight keep their entries. Under `cache=unsafe` (no-flush) nothing ever
becomes durable through a flush. A power cut is applied later, offline, by
`powercut cut`, which puts back a policy-chosen part of the journal.

A backend *process* crash reverts nothing: the journal and the image both
live in the host page cache, which survives. Reopening the journal after such
a crash continues it (torn tail cut off, writes that were in flight marked
complete — they can no longer be), so a later power cut still loses what the
crashed process had not made durable.

Options: `journal` (path, required), `sector-size` (undo granularity, default
512), `writeback-horizon` (seconds; writes completed longer ago than this
become durable on their own, as the host kernel's writeback would; 0 = off),
`journal-compact` (size; default 1M: at a durable flush a journal at least this
big is emptied when nothing is owed — started over in place, so its page-cache
pages serve the next writes — or else rewritten without its durable writes once
it has doubled since the last rewrite — a busy guest always has writes in
flight).

Cost per write: one pre-image read, one journal record with its CRC and one
small COMPLETE record, both stored through a mapping of the journal (no system
call; `harness.durability.mapped`), plus the write itself.

Recommended graph (log-writes above powerfail, so the log sees what the guest
sees and the journal models what the host loses):

    driver=log-writes,log=/x/w.log,
      file.driver=powerfail,file.journal=/x/d.journal,
      file.file.driver=file,file.file.filename=/x/d.img
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from harness.block.node import BlockNode, IOVec, OpenFlags, Option, RequestFlags, iov_length
from harness.block.registry import register_driver
from harness.durability.journal import (
    DurableReason,
    JournalWriter,
    OpKind,
    compact_journal,
    read_journal,
)
from harness.errors import ConfigError, JournalError

log = logging.getLogger(__name__)

PREIMAGE_CHUNK = 1 << 20  # bytes of pre-image per journal record
_WRITE = OpKind.WRITE  # a module constant: an enum attribute lookup per write is not free


@register_driver
class PowerfailNode(BlockNode):
    driver: ClassVar[str] = "powerfail"
    is_filter: ClassVar[bool] = True
    has_child: ClassVar[bool] = True
    options: ClassVar[Mapping[str, Option]] = {
        "journal": Option(str, required=True, help="undo journal path (beside the image)"),
        "sector-size": Option(int, 512, size=True, help="undo granularity in bytes"),
        "writeback-horizon": Option(
            float, 0.0, help="seconds after which a completed write is durable anyway (0: off)"
        ),
        "journal-compact": Option(
            int,
            1 << 20,
            size=True,
            help="empty the journal at a durable flush when nothing is owed and it is this big",
        ),
    }

    def __init__(
        self, node_name: str, opts: Mapping[str, Any], file: BlockNode | None, flags: OpenFlags
    ) -> None:
        super().__init__(node_name, opts, file, flags)
        if file is None:
            raise ConfigError(f"powerfail node {node_name!r} needs a file child (the image)")
        self.child: BlockNode = file
        self.journal_path = Path(str(self._opt("journal")))
        self.granularity = int(self._opt("sector-size"))
        if self.granularity < 512 or self.granularity & (self.granularity - 1):
            raise ConfigError(
                f"powerfail node {node_name!r}: sector-size {self.granularity} must be a "
                "power of two >= 512"
            )
        self.horizon = float(self._opt("writeback-horizon"))
        self.compact_at = int(self._opt("journal-compact"))
        self.supported_write_flags = RequestFlags.NONE  # FUA: emulated by a (durable) flush
        self.supported_zero_flags = RequestFlags.MAY_UNMAP | RequestFlags.NO_FALLBACK
        self.can_discard = True
        self.can_write_zeroes = True
        self.request_alignment = file.request_alignment
        self._child_length = file.length  # fixed while open (drivers cannot resize)

        self._state = threading.Lock()  # journal appends, the counters below, `_held`
        # Overlapping requests are serialized: they must reach the image in the order their
        # pre-images were taken, or the journal's chain of versions would be wrong.
        # Disjoint ones run in parallel. (One lock for both: fewer acquisitions per write.)
        self._ranges_free = threading.Condition(self._state)
        self._held: list[tuple[int, int]] = []  # byte ranges of requests in progress
        self._waiting = 0
        self._next_seq = 1
        self._completed = 0  # last completion index handed out
        self._durable = 0  # completion indexes <= this are durable
        self._inflight: set[int] = set()
        self._completion_times: deque[tuple[int, int]] = deque()  # (index, monotonic ns)
        self.journal = self._open_journal()
        self._compacted_size = self.journal.size()
        self._stop = threading.Event()
        self._horizon_thread: threading.Thread | None = None
        if self.horizon > 0 and not flags.read_only:
            self._horizon_thread = threading.Thread(
                target=self._horizon_loop, name=f"powerfail-horizon-{node_name}", daemon=True
            )
            self._horizon_thread.start()

    def _opt(self, name: str) -> Any:
        value = self.opts.get(name)
        return self.options[name].default if value is None else value

    # -- journal lifecycle -------------------------------------------------------

    def _open_journal(self) -> JournalWriter:
        size = self.child.length
        if not self.journal_path.exists() or self.journal_path.stat().st_size == 0:
            writer = JournalWriter.create(self.journal_path, self.granularity, size)
        else:
            state, data = read_journal(self.journal_path)
            if state.header.sector_size != self.granularity:
                raise JournalError(
                    f"journal {self.journal_path} uses sector-size {state.header.sector_size}, "
                    f"node {self.node_name!r} asks for {self.granularity}; pass "
                    f"sector-size={state.header.sector_size} or cut and remove the journal"
                )
            if state.header.image_size != size:
                raise JournalError(
                    f"journal {self.journal_path} belongs to an image of {state.header.image_size} "
                    f"bytes, this one has {size}; pass the journal of this image"
                )
            if state.torn_bytes:
                log.warning(
                    "journal %s: ignoring a torn tail of %d bytes (the backend was killed)",
                    self.journal_path,
                    state.torn_bytes,
                )
            writer = JournalWriter.reopen(self.journal_path, state.valid_length)
            self._next_seq = state.next_seq
            self._completed = state.last_completion
            self._durable = state.durable_index
            # Writes in flight when the last backend died have either reached the page cache or
            # not; they can no longer be in flight, so later flushes cover them.
            for seq in dict.fromkeys(p.seq for p in state.preimages):
                if seq not in state.completion:
                    self._completed += 1
                    writer.complete(seq, self._completed, failed=True)
            if not isinstance(data, bytes):
                data.close()
            log.info(
                "journal %s continued: %d pre-images, durable up to completion %d",
                self.journal_path,
                len(state.preimages),
                self._durable,
            )
        writer.opened()
        return writer

    # -- requests ----------------------------------------------------------------

    def driver_preadv(self, offset: int, iov: IOVec) -> None:
        self.child.preadv(offset, iov)

    def driver_pwritev(self, offset: int, iov: IOVec, flags: RequestFlags) -> None:
        length = len(iov[0]) if len(iov) == 1 else iov_length(iov)
        self._journaled(offset, length, _WRITE, self.child.pwritev, offset, iov, flags)

    def driver_pdiscard(self, offset: int, length: int) -> None:
        self._journaled(offset, length, OpKind.DISCARD, self.child.pdiscard, offset, length)

    def driver_pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        self._journaled(
            offset, length, OpKind.WRITE_ZEROES, self.child.pwrite_zeroes, offset, length, flags
        )

    def _journaled(
        self, offset: int, length: int, kind: OpKind, apply: Callable[..., None], *args: Any
    ) -> None:
        if length <= 0:
            apply(*args)
            return
        g = self.granularity
        start = offset - offset % g
        end = -(-(offset + length) // g) * g
        if end > self._child_length:
            end = max(self._child_length, offset + length)
        key = (start, end)
        with self._state:
            held = self._held
            while held and any(s < end and start < e for s, e in held):
                self._waiting += 1
                self._ranges_free.wait()
                self._waiting -= 1
            held.append(key)
        holding = True
        seq: int | None = None
        try:
            # The pre-image is in the journal before the image changes: a crash between
            # the two leaves an entry whose revert is a no-op, never a change without one.
            # Large requests (a guest's discard of the whole disk) go in bounded pieces.
            if end - start <= PREIMAGE_CHUNK:
                pre = bytearray(end - start)
                self.child.preadv(start, [memoryview(pre)])
                with self._state:
                    seq = self._next_seq
                    self._next_seq = seq + 1
                    self.journal.preimage(seq, kind, start, pre)
                    self._inflight.add(seq)
            else:
                with self._state:
                    seq = self._next_seq
                    self._next_seq = seq + 1
                    # Owed from the first piece on: a flush between pieces must not start
                    # the journal over and drop the pieces already taken.
                    self._inflight.add(seq)
                pos = start
                while pos < end:
                    n = min(PREIMAGE_CHUNK, end - pos)
                    pre = bytearray(n)
                    self.child.preadv(pos, [memoryview(pre)])
                    with self._state:
                        self.journal.preimage(seq, kind, pos, pre)
                    pos += n
            failed = True
            try:
                apply(*args)
                failed = False
            finally:
                with self._state:
                    self._completed = index = self._completed + 1
                    self.journal.complete(seq, index, failed)
                    self._inflight.discard(seq)
                    if self.horizon > 0:
                        self._completion_times.append((index, time.monotonic_ns()))
                    held.remove(key)
                    holding = False
                    if self._waiting:
                        self._ranges_free.notify_all()
        finally:
            if holding:  # no pre-image (nothing applied), or its completion not recorded
                with self._state:
                    if seq in self._inflight:  # pieces taken, then a read failed: nothing applied
                        self._completed = index = self._completed + 1
                        self.journal.complete(seq, index, True)
                        self._inflight.discard(seq)
                    held.remove(key)
                    if self._waiting:
                        self._ranges_free.notify_all()

    def driver_flush(self) -> None:
        with self._state:
            snapshot = self._completed  # exactly the writes completed when the flush started
        self.child.flush()
        if self.open_flags.no_flush:
            return  # unsafe: the flush stopped at the OS, nothing is stable
        with self._state:
            self._mark_durable(snapshot, DurableReason.FLUSH)

    def _mark_durable(self, index: int, reason: DurableReason) -> None:
        # Caller holds self._state.
        if index <= self._durable:
            return
        self._durable = index
        self.journal.durable(index, reason)
        while self._completion_times and self._completion_times[0][0] <= index:
            self._completion_times.popleft()
        size = self.journal.size()
        if size < self.compact_at:
            return
        if not self._inflight and self._durable == self._completed:
            self.journal.reset(self.granularity, self.child.length)  # nothing is owed
            self.journal.opened()
            self._compacted_size = self.journal.size()
        elif size >= 2 * self._compacted_size:
            # Writes are always in flight under a busy guest: retire the durable ones by
            # rewriting the journal (amortized: only once it has doubled since the last time).
            self.journal.sync()
            self.journal.close()
            length = compact_journal(self.journal_path)
            self.journal = JournalWriter.reopen(self.journal_path, length)
            self._compacted_size = length

    def _horizon_loop(self) -> None:
        period = min(max(self.horizon / 4, 0.01), 1.0)
        horizon_ns = int(self.horizon * 1e9)
        while not self._stop.wait(period):
            # Also under unsafe: the host kernel writes dirty pages back whatever QEMU ignores.
            now = time.monotonic_ns()
            with self._state:
                ready = 0
                for index, done in self._completion_times:
                    if now - done < horizon_ns:
                        break
                    ready = index
                if ready:
                    self._mark_durable(ready, DurableReason.HORIZON)

    # -- introspection -----------------------------------------------------------

    @property
    def durable_index(self) -> int:
        return self._durable

    @property
    def completed_index(self) -> int:
        return self._completed

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        with self._state:
            info.update(
                {
                    "journal": str(self.journal_path),
                    "sector-size": self.granularity,
                    "writeback-horizon": self.horizon,
                    "writes-completed": self._completed,
                    "writes-durable": self._durable,
                    "in-flight": len(self._inflight),
                }
            )
        return info

    def driver_close(self) -> None:
        self._stop.set()
        with self._state:
            self.journal.sync()
        if self._horizon_thread is not None:
            self._horizon_thread.join(timeout=5)
        self.journal.close()


def journal_path_for(image: str | os.PathLike[str]) -> Path:
    """The conventional journal beside an image: d.img -> d.img.journal."""
    return Path(f"{os.fspath(image)}.journal")
