"""Which byte spans the disk never acknowledged, by its write log as the cut left it.

A checker inside the guest may claim data the device never completed: fio 3.33's
verify state takes every write issued before its last `iodepth` completions as
done, though one may stall behind them, and it verifies failed writes too. The
write log settles such a claim: a span whose every sector's newest write
completed successfully was acknowledged; any other was not, and no cache mode
keeps it.
"""

from __future__ import annotations

import errno
from pathlib import Path

from harness.durability.writelog import read_log, unacknowledged
from harness.workloads.fio_verify import FioVerifyObservation

from .concurrent import S, Schedule

BLOCK = 8 * S


def _log(tmp: Path) -> Schedule:
    """Blocks 0..5: done; in flight; failed; never written; done then overwritten by one in
    flight; half done (its second half written by a write still in flight)."""
    sched = Schedule.new(tmp, sectors=64)
    done = sched.write(0, b"a" * BLOCK)
    stalled = sched.write(1 * BLOCK, b"b" * BLOCK)  # submitted first, never completes
    sched.complete(done)
    failed = sched.write(2 * BLOCK, b"c" * BLOCK)
    sched.complete(failed, errno.EIO)
    old = sched.write(4 * BLOCK, b"d" * BLOCK)
    sched.complete(old)
    sched.write(4 * BLOCK, b"e" * BLOCK)  # the newest version is in flight
    half = sched.write(5 * BLOCK, b"f" * BLOCK)
    sched.complete(half)
    sched.write(5 * BLOCK + BLOCK // 2, b"g" * (BLOCK // 2))
    sched.flush()
    assert stalled in sched.in_flight()
    sched.finish()
    return sched


def test_a_span_counts_as_acknowledged_only_when_each_sectors_newest_write_completed(
    tmp_path: Path,
) -> None:
    wlog = read_log(_log(tmp_path).log)
    spans = [(b * BLOCK, BLOCK) for b in range(6)]
    assert unacknowledged(wlog, spans) == {(b * BLOCK, BLOCK) for b in (1, 2, 3, 4, 5)}
    # Smaller spans are judged by their own sectors: the first half of block 5 was acknowledged.
    assert unacknowledged(wlog, [(5 * BLOCK, BLOCK // 2), (0, S)]) == set()
    assert unacknowledged(wlog, []) == set()


def test_fios_bad_blocks_the_disk_never_acknowledged_are_no_loss(tmp_path: Path) -> None:
    wlog = read_log(_log(tmp_path).log)
    # fio named the stalled and the failed block: neither is a loss.
    excused = FioVerifyObservation(2, 100, 0, (BLOCK, 2 * BLOCK), BLOCK).against_device_log(wlog)
    assert not excused.loss and excused.unacknowledged == (BLOCK, 2 * BLOCK)
    assert "fio also named 2 blocks the disk never acknowledged" in excused.summary()
    # A bad block the disk did acknowledge is a loss, whatever else fio named.
    lost = FioVerifyObservation(2, 100, 0, (0, BLOCK), BLOCK).against_device_log(wlog)
    assert lost.loss and lost.lost_blocks == 1 and lost.unacknowledged == (BLOCK,)
    assert "found 1 bad blocks of 100 (first at offset 0)" in lost.summary()
    # Bad blocks fio counted without naming them cannot be excused.
    unnamed = FioVerifyObservation(3, 100, 0, (BLOCK,), BLOCK).against_device_log(wlog)
    assert unnamed.loss and unnamed.lost_blocks == 2


def test_the_log_settles_every_checkers_claim_and_is_read_only_for_a_loss(tmp_path: Path) -> None:
    from harness.workloads.base import settle_with_device_log

    sched = _log(tmp_path)
    clean = {"fio-verify": FioVerifyObservation(0, 100)}
    # No loss: the log is not read (a path that does not exist would raise).
    assert settle_with_device_log(clean, tmp_path / "missing.log") == clean
    claimed = {"fio-verify": FioVerifyObservation(1, 100, 0, (BLOCK,), BLOCK)}
    assert settle_with_device_log(claimed, None) == claimed  # no log, nothing settled
    settled = settle_with_device_log(claimed, sched.log)
    assert not settled["fio-verify"].loss


def test_each_write_counts_for_the_sectors_it_touches_and_a_flush_or_empty_write_for_none(
    tmp_path: Path,
) -> None:
    sched = Schedule.new(tmp_path, sectors=16)
    sched.complete(sched.flush())  # a flush first: the writes after it still count
    sched.write(0, b"a" * (2 * S))  # sectors 0 and 1, in flight at the cut
    sched.complete(sched.write(S + 7, b"x"))  # one byte inside sector 1, completed
    sched.complete(sched.write(7, b""))  # no byte at all inside sector 0, completed
    wlog = read_log(sched.finish().log)
    # Sector 0: its newest write of any byte is in flight. Sector 1: a completed one-byte
    # write replaced the one in flight. Sector 2: never written.
    spans = [(0, S), (S, S), (2 * S, S)]
    assert unacknowledged(wlog, spans) == {(0, S), (2 * S, S)}
