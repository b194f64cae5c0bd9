"""Acknowledgement streams: a guest command whose every output line is a promise.

`AckStream` parses lines that arrive in pieces from a guest that may die
mid-line; `GuestStream` runs the command on its own SSH channel in a thread,
so the power can be cut at any moment; `StreamRun` is the `Run` of every
workload built that way (ack-records, ext4-metadata). `AckClock` stamps each
acknowledgement with the host's CLOCK_MONOTONIC as it arrives (the clock the
write log is stamped with): exploration places acknowledgements in the log by
it, and an explanation places them between the traced calls.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from harness.durability.contract import FaultModel
from harness.errors import GuestError, PowercutError
from harness.guest.ssh import SSHSession
from harness.workloads.base import POLL, GuestContext, Run

log = logging.getLogger(__name__)

# Where a streaming workload's output is kept, in its cell's directory: stdout (every
# acknowledgement line and whatever else it printed) and stderr, as they arrive.
ACKS_FILE = "acks.txt"
STDERR_FILE = "workload.stderr"

# Exit statuses of a workload the runner stopped on purpose (SIGKILL, SIGTERM), or
# whose channel died with the connection.
_STOPPED = (137, 143, -1)


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

    @property
    def count(self) -> int:
        """How many acknowledgements so far."""
        return self.highest


class TokenStream:
    """Collects the tokens a user's command acknowledges: every line `pattern` matches.

    `pattern` has exactly one group, the token (`ack (\\S+)` by default). Other
    lines are the command's own output and are ignored; a token acknowledged
    twice counts once. As with `AckStream`, a line the cut left unfinished
    was never an acknowledgement.
    """

    def __init__(self, pattern: re.Pattern[str], name: str = "workload") -> None:
        self.pattern = pattern
        self.name = name
        self._partial = b""
        self.tokens: list[str] = []
        self._seen: set[str] = set()
        self.lines = 0

    def feed(self, data: bytes | str) -> list[str]:
        if isinstance(data, str):
            data = data.encode()
        buf = self._partial + data
        *complete, self._partial = buf.split(b"\n")
        new = []
        for raw in complete:
            self.lines += 1
            match = self.pattern.search(raw.decode(errors="replace").rstrip("\r"))
            if match and match.group(1) not in self._seen:
                self._seen.add(match.group(1))
                self.tokens.append(match.group(1))
                new.append(match.group(1))
        return new

    @property
    def count(self) -> int:
        return len(self.tokens)


class Acknowledgements(Protocol):
    """What a stream of acknowledgement lines offers (`AckStream`, `TokenStream`)."""

    def feed(self, data: bytes | str) -> Sequence[object]: ...

    @property
    def count(self) -> int: ...


class GuestStream:
    """A guest command in a thread; every acknowledgement line it prints is counted.

    Runs on its own SSH channel so the cut can come at any moment: the
    command ends when its connection dies with the guest. Every line is
    also appended to `ack_file` as it arrives, and every line of its stderr
    to `stderr_file`: when the workload fails, what it said is kept with the
    cell, however long it ran and wherever it stopped.
    """

    def __init__(
        self,
        ssh: SSHSession,
        command: str,
        name: str,
        ack_file: Path,
        stream: Acknowledgements | None = None,
        stderr_file: Path | None = None,
    ) -> None:
        self.ssh = ssh
        self.command = command
        self.stream: Acknowledgements = stream if stream is not None else AckStream(name)
        self.ack_file = ack_file
        self.stderr_file = stderr_file
        self.error: BaseException | None = None
        self.exit_code: int | None = None
        self.stderr = ""
        self.started = 0.0
        self.ended: float | None = None  # when the command's channel closed (host monotonic)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"guest-{name}", daemon=True)

    def start(self) -> GuestStream:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with (
                open(self.ack_file, "a", buffering=1) as acks,
                open(self.stderr_file or os.devnull, "a", buffering=1) as errors,
            ):

                def line(text: str) -> None:
                    with self._lock:
                        self.stream.feed(text + "\n")
                    acks.write(text + "\n")

                def error_line(text: str) -> None:
                    errors.write(text + "\n")

                result = self.ssh.run(
                    self.command, timeout=3600, on_stdout=line, on_stderr=error_line
                )
            self.exit_code = result.exit_code
            self.stderr = result.stderr
        except (PowercutError, OSError, EOFError) as exc:
            self.error = exc
        except Exception as exc:  # noqa: BLE001 - paramiko raises its own kinds when the guest dies
            self.error = exc
        finally:
            self.ended = time.monotonic()

    @property
    def acked(self) -> int:
        with self._lock:
            return self.stream.count

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def failure(self) -> str | None:
        """Why the workload itself failed (not because the power was cut)."""
        if isinstance(self.error, GuestError):
            return str(self.error)
        if self.exit_code not in (None, 0, -1):
            return f"{self.command!r} exited {self.exit_code}: {self.stderr.strip()[-300:]}"
        return None


class StreamRun(Run):
    """A streaming workload's run: acknowledgements counted as they arrive."""

    # After a backend crash the workload must go on: this many more acknowledgements
    # (or this many seconds) show that it did, then it is stopped.
    RESUME_ACKS = 20
    RESUME_SECONDS = 10.0

    def __init__(
        self,
        ctx: GuestContext,
        command: str,
        name: str,
        fault: FaultModel,
        *,
        stream: Acknowledgements | None = None,
        stop: str | None = None,
    ) -> None:
        super().__init__(fault)
        program = shlex.split(command)[0].rsplit("/", 1)[-1]
        # How to stop it once the backend is back (after a backend crash).
        self.stop_command = stop or f"killall {shlex.quote(program)} 2>/dev/null; true"
        self.stream = GuestStream(
            ctx.ssh,
            command,
            name,
            ctx.directory / ACKS_FILE,
            stream,
            stderr_file=ctx.directory / STDERR_FILE,
        ).start()
        self.started = self.stream.started

    def acked(self) -> int:
        return self.stream.acked

    def alive(self) -> bool:
        return self.stream.alive

    def failure(self) -> str | None:
        """Why the run failed before the cut; a channel that ended without the command's
        exit status (killed by a signal, or closed under it) while the guest lived is one."""
        found = self.stream.failure()
        if found or self.stream.alive:
            return found
        if self.stream.error is not None or self.stream.exit_code == -1:
            why = self.stream.error or "no exit status: a signal killed it or its channel closed"
            return f"its SSH channel ended before the command exited ({why})"
        return None

    def after_cut(self, timeout: float) -> None:
        # Every acknowledgement the host had received when the power went is a
        # promise, also those that came in while the cut was being made.
        self.stream.join(timeout)

    def after_backend_crash(self, ctx: GuestContext, acked_at_crash: int) -> None:
        resumed = time.monotonic()
        while (
            self.stream.alive
            and self.stream.acked < acked_at_crash + self.RESUME_ACKS
            and time.monotonic() - resumed < self.RESUME_SECONDS
        ):
            time.sleep(POLL)
        ctx.ssh.run(self.stop_command, timeout=30)
        self.stream.join(ctx.time_left(60))
        failure = self.stream.failure()
        if failure and self.stream.exit_code not in _STOPPED:
            raise GuestError(f"the workload failed across the backend crash: {failure}")


# -- when the host received each acknowledgement ----------------------------------------


class Stamping:
    """An acknowledgement stream that time-stamps what it completes (delegates the rest)."""

    def __init__(self, inner: Acknowledgements, clock: AckClock) -> None:
        self.inner = inner
        self.clock = clock

    def feed(self, data: bytes | str) -> Sequence[object]:
        items = self.inner.feed(data)
        if items:
            self.clock.stamp(items, time.monotonic_ns())
        return items

    @property
    def count(self) -> int:
        return self.inner.count

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def acked_items(stream: Acknowledgements) -> list[str]:
    """Every acknowledgement a stream has completed, in order, as tokens."""
    if isinstance(stream, TokenStream):
        return list(stream.tokens)
    return [str(i) for i in range(1, stream.count + 1)]


class AckClock:
    """The host's receipt time of each acknowledgement (CLOCK_MONOTONIC ns), in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stamps: list[tuple[str, int]] = []
        self._stream: Acknowledgements | None = None

    def stamp(self, items: Sequence[object], ns: int) -> None:
        with self._lock:
            self.stamps.extend((str(item), ns) for item in items)

    def attach(self, run: Run) -> None:
        """Start stamping `run`'s acknowledgements (those already in: now, which is later)."""
        if not isinstance(run, StreamRun):
            return
        inner = run.stream.stream
        run.stream.stream = Stamping(inner, self)
        self._stream = inner
        self._catch_up(time.monotonic_ns())

    def _catch_up(self, ns: int) -> None:
        if self._stream is None:
            return
        items = acked_items(self._stream)
        with self._lock:
            missing = items[len(self.stamps) :]
            self.stamps.extend((item, ns) for item in missing)

    def finish(self, run: Run) -> list[tuple[str, int]]:
        """After the cut: every acknowledgement, stamped (late ones at the end of the run);
        the run's stream is its own again (its checker reads it as it was)."""
        now = time.monotonic_ns()
        if self._stream is not None:
            self._catch_up(now)
            if isinstance(run, StreamRun) and isinstance(run.stream.stream, Stamping):
                run.stream.stream = run.stream.stream.inner
        else:
            with self._lock:
                done = len(self.stamps)
                self.stamps.extend((str(i), now) for i in range(done + 1, run.acked() + 1))
        with self._lock:
            return list(self.stamps)
