"""What the backend-restart tests share: fio's verify load in the guest, and a bounded wait."""

from __future__ import annotations

import time
from collections.abc import Callable


def fio_verify_command(name: str, size_mib: int) -> str:
    """Random 4 KiB writes at QD16 with crc32c verify; fio's exit status lands in /tmp/fio.rc."""
    return (
        f"fio --name={name} --filename=/dev/vda --rw=randwrite --bs=4k --size={size_mib}M "
        "--ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --do_verify=1 "
        "--verify_fatal=1 --output=/tmp/fio.out; echo $? > /tmp/fio.rc"
    )


def wait_until(what: str, condition: Callable[[], object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.1)
