"""The backend killed (SIGKILL) and restarted many times in a row under fio verify load.

The guest must see nothing: fio's verify finds every block it wrote (no
completed write lost), fio exits 0, and the guest kernel logs no I/O error.
Twenty restarts take about 65 s under TCG here (a reconnect costs ~1.05 s),
so they run in the normal suite. POWERCUT_RESTART_RECORD=FILE writes the
figures (reconnect times, resubmitted requests) as JSON.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from restart_load import fio_verify_command, wait_until

from harness.testing.disk import DiskFactory

pytestmark = pytest.mark.vm

WRITES_PER_LIFE = 250  # writes each backend process serves before it is killed


def stats(disk: Any) -> dict[str, Any]:
    try:
        result: dict[str, Any] = disk.stats()
        return result
    except (OSError, ValueError):
        return {}


def restart_under_fio(vm_factory: Any, powercut_disk: DiskFactory, restarts: int) -> None:
    t_start = time.monotonic()
    # fio writes every 4 KiB block once, so the run must outlast the restarts.
    size_mib = max(16, (restarts + 2) * WRITES_PER_LIFE * 4 // 1024 + 8)
    image = vm_factory.disk_file(size_mib + 8, "restart.img")
    # Every write spends 5 ms inside the stack, so each kill finds requests in flight.
    slow = (
        "driver=blkdebug,rules=write:delay=5,file.driver=raw,file.file.driver=file,"
        f"file.file.filename={image}"
    )
    disk = powercut_disk(vm_factory, image=image, blockdev=slow, cache="writeback", num_queues=2)
    machine = vm_factory(disk.start(), cpus=2)
    g = machine.ssh
    g.check_output(
        f"setsid sh -c '{fio_verify_command('restart', size_mib)}' </dev/null >/dev/null 2>&1 &"
    )
    reconnects: list[float] = []
    served: list[int] = []
    for _ in range(restarts):
        wait_until(
            f"{WRITES_PER_LIFE} writes served",
            lambda: stats(disk).get("requests", {}).get("OUT", 0) >= WRITES_PER_LIFE,
            300,
        )
        served.append(int(stats(disk)["requests"].get("OUT", 0)))
        t0 = time.monotonic()
        disk.kill()
        disk.start()
        wait_until("QEMU reconnected", lambda: stats(disk).get("connected", False), 60)
        reconnects.append(time.monotonic() - t0)
    assert g.run("test ! -s /tmp/fio.rc").ok, "fio ended before the last restart"
    wait_until("fio finished", lambda: g.run("test -s /tmp/fio.rc").ok, 900)
    out = g.check_output("cat /tmp/fio.out")
    rc = int(g.check_output("cat /tmp/fio.rc"))
    dmesg = g.check_output("dmesg")
    log = disk.log_path.read_text()
    resubmitted = [int(n) for n in re.findall(r"resubmitting (\d+) requests", log)]
    figures = {
        "restarts": restarts,
        "fio_exit": rc,
        "fio_verify_errors": len(re.findall(r"verify: bad|bad magic|crc32c: verify failed", out)),
        "guest_io_errors": len(re.findall(r"I/O error|blk_update_request", dmesg)),
        "connections": log.count("frontend connected"),
        "writes_served_per_life": served,
        "reconnect_seconds": [round(r, 2) for r in reconnects],
        "reconnect_median_seconds": round(sorted(reconnects)[len(reconnects) // 2], 2),
        "reconnect_max_seconds": round(max(reconnects), 2),
        "requests_resubmitted": sum(resubmitted),
        "restarts_with_resubmission": len(resubmitted),
        "fio_size_mib": size_mib,
        "seconds": round(time.monotonic() - t_start, 1),
    }
    record = os.environ.get("POWERCUT_RESTART_RECORD")
    if record:
        Path(record).write_text(json.dumps(figures, indent=1) + "\n")
    assert rc == 0, out
    assert figures["fio_verify_errors"] == 0, out
    assert figures["guest_io_errors"] == 0, dmesg[-2000:]
    assert figures["connections"] >= restarts + 1
    assert figures["restarts_with_resubmission"] > 0, "no request was in flight at any kill"


@pytest.mark.timeout(900)
def test_twenty_backend_restarts_in_a_row_under_fio_verify_lose_nothing(
    vm_factory: Any, powercut_disk: DiskFactory
) -> None:
    restart_under_fio(vm_factory, powercut_disk, 20)
