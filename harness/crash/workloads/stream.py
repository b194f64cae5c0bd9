"""Acknowledgement streams: lines that arrive in pieces from a guest that may die mid-line."""

from __future__ import annotations

import logging

from harness.errors import GuestError

log = logging.getLogger(__name__)


class AckStream:
    """Collects acknowledged sequence numbers from a workload's stdout.

    Feed it whatever bytes arrive (`feed`); a trailing partial line is kept
    until its newline comes, and dropped if it never does — a line cut by the
    power cut was never an acknowledgement. Sequence numbers must rise by one;
    anything else means the stream is not what the workload prints.
    """

    def __init__(self, name: str = "workload") -> None:
        self.name = name
        self._partial = b""
        self.highest = 0
        self.lines = 0

    def feed(self, data: bytes | str) -> list[int]:
        """Consume a chunk; returns the sequence numbers it completed."""
        if isinstance(data, str):
            data = data.encode()
        buf = self._partial + data
        *complete, self._partial = buf.split(b"\n")
        seqs = [self._line(line) for line in complete if line.strip()]
        return seqs

    def _line(self, line: bytes) -> int:
        first = line.split(None, 1)[0]
        try:
            seq = int(first)
        except ValueError:
            raise GuestError(
                f"{self.name}: acknowledgement line {line[:80]!r} does not start with a number; "
                "is the guest running the workload this harness version expects?"
            ) from None
        if seq != self.highest + 1:
            raise GuestError(
                f"{self.name}: acknowledgement {seq} after {self.highest}; "
                "acknowledgements must count up by one (was the stream mixed with other output?)"
            )
        self.highest = seq
        self.lines += 1
        return seq
