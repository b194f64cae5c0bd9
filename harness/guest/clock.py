"""The guest's clock sampled from the host: round trips to one process in the guest.

`harness.explore.clock` holds the bounds and how they are tightened (pure);
this module takes the samples: the host notes its clock, asks a Perl process
in the guest for its clock (`clock_gettime(2)`), notes its clock again.
"""

from __future__ import annotations

import select
import time
from typing import TYPE_CHECKING, Any

from harness.errors import GuestError
from harness.explore.clock import ClockBounds, bounds_from_round_trips

if TYPE_CHECKING:
    from harness.guest.ssh import SSHSession

CLOCK_REALTIME = 0  # strace's --timestamps=unix
CLOCK_MONOTONIC = 1  # tracefs's `mono` trace clock


def _clock_helper(clock_id: int) -> str:
    """Reads a line, answers with the clock in ns (clock_gettime(2) itself: x86_64 number
    228, a 16-byte timespec), exactly, without floating point."""
    return (
        'perl -e \'$|=1; while (<STDIN>) { my $ts = "\\0" x 16; '
        f'syscall(228, {int(clock_id)}, $ts) == 0 or die "clock_gettime: $!"; '
        'my ($s, $ns) = unpack("q q", $ts); print $s * 1000000000 + $ns, "\\n" }\''
    )


def sample_round_trips(
    ssh: SSHSession, count: int = 20, timeout: float = 30.0, clock_id: int = CLOCK_REALTIME
) -> list[tuple[int, int, int]]:
    """`count` round trips (host sent ns, guest ns, host received ns) to one Perl process.

    The process is asked once before the trips that count: its first answer
    waits for Perl to start (a second or more under TCG) and bounds nothing.
    """
    chan = ssh.open_channel(_clock_helper(clock_id))
    trips: list[tuple[int, int, int]] = []
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        for _ in range(count + 1):
            sent = time.monotonic_ns()
            chan.sendall(b"\n")
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestError(f"the guest's clock helper did not answer within {timeout} s")
                select.select([chan], [], [], left)
                data = chan.recv(4096) if chan.recv_ready() else b""
                if not data and (chan.exit_status_ready() or chan.closed):
                    err = chan.recv_stderr(4096).decode(errors="replace")
                    raise GuestError(f"the guest's clock helper exited: {err.strip()}")
                buf += data
            received = time.monotonic_ns()
            line, buf = buf.split(b"\n", 1)
            trips.append((sent, int(line), received))
    finally:
        close_after_exit(chan)
    return trips[1:]


def close_after_exit(chan: Any, timeout: float = 10.0) -> None:
    """End a helper's channel by its stdin and wait for the helper to exit, then close it.

    Closing the channel under a running process makes it exit while the next
    command's channel may be opening. Once, a workload started right after the
    clock was sampled got EPIPE on its first acknowledgement: its channel was
    closed under it. That is what Debian 12's dropbear (2022.83) is known to do
    when a child's exit signal is pending while a new channel starts
    (mkj/dropbear #173, fixed upstream by #326); not proven the cause here, but
    waiting for the helper's exit status takes its signal out of the way.
    """
    try:
        chan.shutdown_write()
        deadline = time.monotonic() + timeout
        while not chan.exit_status_ready() and not chan.closed:
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
    except (OSError, EOFError):
        pass
    finally:
        chan.close()


def sample_offset(
    ssh: SSHSession, count: int = 20, timeout: float = 30.0, clock_id: int = CLOCK_REALTIME
) -> ClockBounds:
    """Bound the offset by `count` round trips to one Perl process on its own channel."""
    return bounds_from_round_trips(sample_round_trips(ssh, count, timeout, clock_id))
