"""The guest's clock on the host's: where each traced call falls between persistence points.

The write log and the acknowledgements are stamped with the host's
CLOCK_MONOTONIC; the tracer stamps calls with a guest clock (tracefs: the
guest's CLOCK_MONOTONIC; strace: its CLOCK_REALTIME). The
two differ by an offset `d = host - guest` that this module bounds, never
guesses: a guest time `g` happened at a host time in `[g + lo, g + hi]`.

- Round trips (`sample_offset`): the host notes its clock, asks a process in
  the guest for its clock, notes its clock again; the guest read its clock in
  between, so `d` lies in `[sent - g, received - g]`. Over many round trips
  the intersection holds (the error bound is half the shortest round trip).
  Sampled before and after the run; a guest clock that drifted between the
  two makes the intervals disjoint, and then their hull is used (wider, still
  true).
- Causality from above (`tighten_upper`): a line of the trace reached the
  host after strace printed it, which was after the call returned, so
  `d <= arrival - printed` for every line (`TraceStream.arrival_bounds`). The
  workload's own `write(1, "ack 7\\n")` is the same kind of sample: the host
  had the acknowledgement after the guest wrote it.
- Causality from below (`tighten_lower`, `fsync_samples`): an fsync that
  made something durable returned after the flush it caused completed on the
  host: `d >= flush_completed - fsync_returned`. Only fsyncs of files on the
  disk under test whose window holds a flush count, and the flush taken is
  the earliest that can be the fsync's, so the bound stays a bound when a
  flush of another process sits in the window.

Under TCG (measured, `python -m benchmarks trace`, docs/tracing.md), round
trips bound the offset to about ±0.3-0.6 ms. Twice the offset did not hold
still: an exploratory run's two batches of round trips were 30.9 s apart,
and a VM test once placed a call 2.08 s before the host started the program
(the line arrivals after the change tightened the bound for the calls before
it). A jump of the guest clock explains both; why it jumps is not
established (TCG keeps the guest TSC monotonic over host TSCs that may not
agree is one candidate). So bounds that disagree keep their hull and say
`consistent: False`, are not tightened further, and `causal_upper` bounds
each instant from above by the arrival of a later line, which no jump breaks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from harness.errors import GuestError


@dataclass(frozen=True)
class ClockBounds:
    """`host = guest + d`, `lo_ns <= d <= hi_ns` (host CLOCK_MONOTONIC, the tracer's clock)."""

    lo_ns: int
    hi_ns: int
    samples: int = 0
    consistent: bool = True  # False: bounds crossed (drift); the hull was kept

    @property
    def width_ns(self) -> int:
        return self.hi_ns - self.lo_ns

    @property
    def midpoint(self) -> int:
        return (self.lo_ns + self.hi_ns) // 2

    @property
    def error_ns(self) -> int:
        """Half the width: how far the midpoint can be from the truth."""
        return (self.hi_ns - self.lo_ns + 1) // 2

    def to_host(self, guest_ns: int) -> tuple[int, int]:
        """The host interval in which a guest instant happened."""
        return guest_ns + self.lo_ns, guest_ns + self.hi_ns

    def intersect(self, other: ClockBounds) -> ClockBounds:
        lo, hi = max(self.lo_ns, other.lo_ns), min(self.hi_ns, other.hi_ns)
        n = self.samples + other.samples
        if lo <= hi:
            return ClockBounds(lo, hi, n, self.consistent and other.consistent)
        return ClockBounds(
            min(self.lo_ns, other.lo_ns), max(self.hi_ns, other.hi_ns), n, consistent=False
        )

    def tighten_upper(self, samples: Iterable[tuple[int, int]]) -> ClockBounds:
        """(guest ns, host ns) where the guest instant came first: `d <= host - guest`.

        Bounds that are not consistent (the guest clock jumped between the
        round trips) are returned as they are: samples from after a jump would
        pull the bound below what held before it."""
        if not self.consistent:
            return self
        hi, n = self.hi_ns, 0
        for guest, host in samples:
            hi = min(hi, host - guest)
            n += 1
        if hi < self.lo_ns:
            return ClockBounds(self.lo_ns, self.hi_ns, self.samples + n, consistent=False)
        return ClockBounds(self.lo_ns, hi, self.samples + n, self.consistent)

    def tighten_lower(self, samples: Iterable[tuple[int, int]]) -> ClockBounds:
        """(guest ns, host ns) where the host instant came first: `d >= host - guest`."""
        if not self.consistent:
            return self
        lo, n = self.lo_ns, 0
        for guest, host in samples:
            lo = max(lo, host - guest)
            n += 1
        if lo > self.hi_ns:
            return ClockBounds(self.lo_ns, self.hi_ns, self.samples + n, consistent=False)
        return ClockBounds(lo, self.hi_ns, self.samples + n, self.consistent)

    def to_json(self) -> dict[str, Any]:
        return {
            "lo_ns": self.lo_ns,
            "hi_ns": self.hi_ns,
            "width_ms": round(self.width_ns / 1e6, 3),
            "error_ms": round(self.error_ns / 1e6, 3),
            "samples": self.samples,
            "consistent": self.consistent,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ClockBounds:
        return cls(
            int(raw["lo_ns"]),
            int(raw["hi_ns"]),
            int(raw.get("samples", 0)),
            bool(raw.get("consistent", True)),
        )


def bounds_from_round_trips(trips: Sequence[tuple[int, int, int]]) -> ClockBounds:
    """(host sent ns, guest ns, host received ns) per round trip → the offset's bounds."""
    if not trips:
        raise GuestError("no clock round trips to bound the guest clock with")
    lo = max(sent - guest for sent, guest, _ in trips)
    hi = min(received - guest for _, guest, received in trips)
    if lo <= hi:
        return ClockBounds(lo, hi, len(trips))
    # Crossed: the guest clock moved against the host's between trips. The hull is true.
    lo = min(sent - guest for sent, guest, _ in trips)
    hi = max(received - guest for _, guest, received in trips)
    return ClockBounds(lo, hi, len(trips), consistent=False)


def causal_upper(samples: Sequence[tuple[int, int]], guest_ns: int) -> int | None:
    """The host time by which a guest instant had surely happened, with no offset at all.

    A line the guest recorded at or after `guest_ns` (its clock never goes
    back) reached the host at its arrival, so the instant came before the
    earliest such arrival. This holds across a jump of the guest clock, which
    the offset's bounds cannot survive (`consistent` False).
    """
    arrivals = [host for guest, host in samples if guest >= guest_ns]
    return min(arrivals) if arrivals else None


def fsync_samples(
    syncs: Iterable[tuple[int, int]],
    flushes: Sequence[tuple[int, int]],
    bounds: ClockBounds,
) -> list[tuple[int, int]]:
    """Lower-bound samples from fsyncs that each waited for a flush of the disk.

    `syncs`: (entered, returned) guest ns of successful fsync/fdatasync/sync
    calls on files of the disk under test; `flushes`: (submitted, completed)
    host ns of the log's flushes. A flush that can be the call's started after
    the call entered (`submitted >= entered + lo`) and completed before it
    returned (`completed <= returned + hi`); the call returned after the
    earliest such completion, so `d >= completed - returned` for that one.
    Calls with no such flush (nothing to flush, another filesystem) give none.
    """
    out: list[tuple[int, int]] = []
    ordered = sorted(flushes)
    for entered, returned in syncs:
        earliest: int | None = None
        for submitted, completed in ordered:
            if submitted < entered + bounds.lo_ns:
                continue
            if submitted > returned + bounds.hi_ns:
                break
            if completed <= returned + bounds.hi_ns:
                earliest = completed if earliest is None else min(earliest, completed)
        if earliest is not None:
            out.append((returned, earliest))
    return out
