"""QEMU's own block layer on the powercut disk (`backend = "qemu"`, `"qemu-storage-daemon"`).

A few cells only (each boots twice under TCG): one qcow2 cell on QEMU, one on
qemu-storage-daemon, and the differential — the same raw scenario on
powercut's own stack and on QEMU, compared per cache mode by verdict and by
the flushes and FUA writes that reached the disk, in all five cache modes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from scenario_cells import SCENARIOS, cell_directory, checker, run_scenario_cell

from harness.durability.writelog import LogFlags, Op, WriteLog, read_log
from harness.report.results import CellResult

pytestmark = pytest.mark.vm


def with_backend(tmp_path: Path, source: str, backend: str) -> Path:
    """`source` (a shipped scenario) with another `backend`, written under tmp_path."""
    text = (SCENARIOS / source).read_text()
    text, count = re.subn(r'^backend = "[^"]*"$', f'backend = "{backend}"', text, flags=re.M)
    assert count == 1
    path = tmp_path / f"{backend}-{source}"
    path.write_text(text)
    return path


@dataclass(frozen=True)
class DiskPattern:
    """How a write log's writes were made durable at the disk below it."""

    writes: int  # completed writes
    fua: int  # of those, with FUA
    unprotected: int  # neither FUA nor followed by a flush that started after it completed
    flushes: int  # completed flushes in the log
    flushes_reaching_disk: int  # 0 when the node was opened with cache.no-flush

    @property
    def kind(self) -> str:
        if self.writes and self.unprotected == 0 and self.fua == self.writes:
            return "every write FUA"  # the guest then sends no flushes: nothing to cache
        if self.flushes_reaching_disk == 0:
            return "no flush reaches the disk"
        if self.fua == 0:
            return "writes without FUA, made durable by flushes"
        return "mixed"


def disk_pattern(wlog: WriteLog) -> DiskPattern:
    writes = [r for r in wlog.requests if r.op is Op.WRITE and r.completed_ok]
    flush_starts = sorted(
        r.submit_index for r in wlog.requests if r.op is Op.FLUSH and r.completed_ok
    )
    last_flush_start = flush_starts[-1] if flush_starts else -1
    unprotected = sum(
        1
        for w in writes
        if not w.fua and (w.complete_index is None or w.complete_index > last_flush_start)
    )
    flushes = len(flush_starts)
    no_flush = bool(wlog.header.flags & LogFlags.NO_FLUSH)
    return DiskPattern(
        writes=len(writes),
        fua=sum(1 for w in writes if w.fua),
        unprotected=unprotected,
        flushes=flushes,
        flushes_reaching_disk=0 if no_flush else flushes,
    )


def test_qcow2_on_qemu_writeback_keeps_every_synced_record_and_a_sound_image(
    tmp_path: Path, guest_image: Any, powercut_accel: Any
) -> None:
    result = run_scenario_cell(
        tmp_path,
        guest_image,
        powercut_accel,
        "qcow2.toml",
        "writeback/host-power-cut.lose-all/ack-records/after-200-acked/r0",
    )
    directory = cell_directory(tmp_path, result)
    assert result.verdict == "pass", result.reason
    assert checker(result, "ack-records").details["acked"] >= 200
    img = checker(result, "qemu-img-check")
    assert img.verdict == "pass", img.reason
    assert img.details["check"]["corruptions"] == 0 and img.details["check"]["exit_code"] in (0, 3)
    assert checker(result, "fsck").verdict == "pass"
    # The oracle judged the qcow2 file's bytes against the disk's own contract.
    assert checker(result, "oracle").verdict == "pass"
    assert (directory / "disk.qcow2").read_bytes()[:4] == b"QFI\xfb"
    # QEMU's qcow2 flushed through to the powercut disk; the guest was on QEMU's graph.
    pattern = disk_pattern(read_log(directory / "writes.log"))
    assert pattern.flushes_reaching_disk > 0 and pattern.writes > 0
    qemu_log = (tmp_path / "out" / result.artifacts["qemu_log"]).read_text()
    assert "driver=qcow2,node-name=vda0,file=proto0" in qemu_log
    assert "write-cache=on" in qemu_log
    assert "cut_json" in result.artifacts and "qemu_img_check_log" in result.artifacts


def test_qcow2_on_qemu_storage_daemon_writeback_keeps_every_synced_record(
    tmp_path: Path, guest_image: Any, powercut_accel: Any
) -> None:
    scenario = with_backend(tmp_path, "qcow2.toml", "qemu-storage-daemon")
    result = run_scenario_cell(
        tmp_path,
        guest_image,
        powercut_accel,
        scenario,
        "writeback/host-power-cut.lose-all/ack-records/after-200-acked/r0",
    )
    directory = cell_directory(tmp_path, result)
    assert result.verdict == "pass", result.reason
    assert checker(result, "qemu-img-check").verdict == "pass"
    assert checker(result, "ack-records").details["acked"] >= 200
    qsd_log = (tmp_path / "out" / result.artifacts["qsd_log"]).read_text()
    assert "type=vhost-user-blk" in qsd_log and "writethrough=off" in qsd_log
    # The guest's fsyncs reached the disk as flushes: the cache_type fix took.
    assert disk_pattern(read_log(directory / "writes.log")).flushes_reaching_disk > 0


DIFFERENTIAL = {
    "writeback": "writes without FUA, made durable by flushes",
    "none": "writes without FUA, made durable by flushes",
    "writethrough": "every write FUA",
    "directsync": "every write FUA",
    "unsafe": "no flush reaches the disk",
}


@pytest.mark.parametrize("mode", list(DIFFERENTIAL))
def test_the_same_raw_scenario_on_powercut_and_on_qemu_agrees_per_cache_mode(
    mode: str, tmp_path: Path, guest_image: Any, powercut_accel: Any
) -> None:
    cell = f"{mode}/host-power-cut.lose-all/ack-records/after-100-acked/r0"
    results: dict[str, CellResult] = {}
    patterns: dict[str, DiskPattern] = {}
    for backend in ("powercut", "qemu"):
        scenario = with_backend(tmp_path, "differential.toml", backend)
        result = run_scenario_cell(tmp_path / backend, guest_image, powercut_accel, scenario, cell)
        directory = cell_directory(tmp_path / backend, result)
        results[backend] = result
        patterns[backend] = disk_pattern(read_log(directory / "writes.log"))
        (tmp_path / f"{backend}.json").write_text(json.dumps(patterns[backend].__dict__))
    powercut, qemu = results["powercut"], results["qemu"]
    if mode != "unsafe":
        assert powercut.verdict == qemu.verdict == "pass", (powercut.reason, qemu.reason)
        assert patterns["powercut"].kind == patterns["qemu"].kind == DIFFERENTIAL[mode], patterns
        return
    # Measured, and the one difference: powercut's unsafe (as QEMU's on a file) keeps every
    # flush from the disk, so the lose-all cut loses synced records and the negative
    # control passes; QEMU's NBD client sends flushes even under cache.no-flush (its flush
    # is bdrv_co_flush_to_os), so nothing is lost and the negative control fails.
    assert powercut.verdict == "pass" and powercut.reason.startswith("loss detected")
    assert patterns["powercut"].kind == "no flush reaches the disk"
    assert patterns["qemu"].kind == "writes without FUA, made durable by flushes", patterns
    assert patterns["qemu"].flushes_reaching_disk > 0
    assert qemu.verdict == "fail", qemu.reason
    assert "expected the loss to be detected, but no checker saw any" in qemu.reason
    assert checker(qemu, "ack-records").details["acked"] >= 100
