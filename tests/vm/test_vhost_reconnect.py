"""Backend crash under guest I/O: QEMU reconnects, in-flight requests are resubmitted.

qemu-storage-daemon, without inflight tracking, loses the requests that were
inside it when it died; this backend must not lose a single one.
"""

from __future__ import annotations

from typing import Any

import pytest
from restart_load import fio_verify_command, wait_until

from harness.testing.disk import DiskFactory

pytestmark = pytest.mark.vm

FIO = fio_verify_command("crash", 16)


def writes_served(disk: Any) -> int:
    try:
        return int(disk.stats()["requests"].get("OUT", 0))
    except (OSError, ValueError):
        return 0


@pytest.mark.parametrize("queues", [1, 2])
def test_backend_killed_and_restarted_under_fio_verify(
    vm_factory: Any,
    powercut_disk: DiskFactory,
    queues: int,
) -> None:
    image = vm_factory.disk_file(64, "crash.img")
    # Every write spends 5 ms inside the stack, so each kill finds requests in flight.
    slow = (
        f"driver=blkdebug,rules=write:delay=5,file.driver=raw,file.file.driver=file,"
        f"file.file.filename={image}"
    )
    disk = powercut_disk(
        vm_factory, image=image, blockdev=slow, cache="writeback", num_queues=queues
    )
    machine = vm_factory(disk.start(), cpus=queues)
    g = machine.ssh
    g.check_output(f"setsid sh -c '{FIO}' </dev/null >/dev/null 2>&1 &")
    kills = 0
    for threshold in (300, 1200, 2400):
        wait_until(f"{threshold} writes served", lambda t=threshold: writes_served(disk) >= t, 300)
        disk.kill()
        kills += 1
        disk.start()
    wait_until("fio finished", lambda: g.run("test -s /tmp/fio.rc").ok, 900)
    out = g.check_output("cat /tmp/fio.out")
    rc = int(g.check_output("cat /tmp/fio.rc"))
    assert rc == 0, out
    assert "verify" not in out.lower() or "bad" not in out.lower(), out
    dmesg = g.check_output("dmesg")
    assert "I/O error" not in dmesg and "blk_update_request" not in dmesg, dmesg[-2000:]
    log = disk.log_path.read_text()
    assert log.count("frontend connected") >= kills + 1
    assert "resubmitting" in log, "no request was in flight at any of the kills"
