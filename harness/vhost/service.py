"""Run exports until told to stop: the body of `powercut serve` and the storage daemon.

Any server with start() and close() (vhost-user-blk, NBD) can be run here.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Protocol

from harness.control import ControlServer

log = logging.getLogger(__name__)


class Service(Protocol):
    """What is served: a VhostUserBlkServer, an NbdServer."""

    def start(self) -> object: ...

    def close(self) -> None: ...


def run_until_signalled(servers: Sequence[Service], control: ControlServer | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then close everything; exit status 0."""
    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    old = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for server in servers:
            server.start()
        if control is not None:
            control.start()
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if control is not None:
            control.close()
        for server in servers:
            server.close()
    return 0
