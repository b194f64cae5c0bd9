"""`powercut run`'s runner on real guests: one cell per fault, and a negative control.

A few cells only (each boots twice under TCG); the whole matrix is the demo
(`tox -e demo`).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from scenario_cells import cell_directory, checker, run_scenario_cell

from harness import hygiene
from harness.durability.writelog import read_log
from harness.report.results import load_results

pytestmark = pytest.mark.vm

ROOT = Path(__file__).parents[2]
SCENARIOS = ROOT / "scenarios"


def test_writethrough_keeps_every_acknowledged_record_across_a_host_power_cut(
    tmp_path: Path, guest_image: Any, powercut_accel: Any
) -> None:
    result = run_scenario_cell(
        tmp_path,
        guest_image,
        powercut_accel,
        "matrix.toml",
        "writethrough/host-power-cut.lose-all/ack-records/after-200-acked/r0",
    )
    assert result.verdict == "pass", result.reason
    assert result.writes_durable == result.writes_acknowledged > 0
    assert checker(result, "ack-records").details["acked"] >= 200
    assert checker(result, "fsck").verdict == "pass"
    assert result.reproduce.endswith(
        "--cell writethrough/host-power-cut.lose-all/ack-records/after-200-acked/r0 --accel "
        + powercut_accel.value
    )


def test_writeback_lose_all_loses_only_unflushed_fio_writes(
    tmp_path: Path, guest_image: Any, powercut_accel: Any
) -> None:
    result = run_scenario_cell(
        tmp_path,
        guest_image,
        powercut_accel,
        "matrix.toml",
        "writeback/host-power-cut.lose-all/fio-verify/after-4s/r0",
    )
    assert result.verdict == "pass", result.reason
    assert result.lost == 0 and result.corrupt == 0
    # The model did its job: every write not durable at the cut was reverted, and the
    # oracle found no unflushed data left (fio stops and flushes when its trigger fires,
    # so how many were unflushed at that instant varies from run to run).
    out = tmp_path / "out"
    cut = json.loads((out / result.artifacts["cut_json"]).read_text())
    assert cut["policy"] == "lose-all" and cut["writes_reverted"] == cut["writes_not_durable"]
    assert checker(result, "oracle").details["may"] == 0
    if cut["writes_not_durable"]:
        assert "lose-all reverted all" in result.reason
    assert checker(result, "fio-verify").details["blocks_verified"] > 0


# Writes that stall in the disk (blkdebug delays 2% of them by 3 s) while the others
# complete: at fio's trigger some have been in flight for longer than fio's last
# `iodepth` completions, and fio 3.33's verify state takes them as done.
STALLED_WRITES = """
name = "stalled-writes"
modes = ["directsync"]
seed = 3
timeout = 120

[[blkdebug]]
op = "write"
action = "delay"
delay_ms = 3000
probability = 0.02
seed = 11

[[fault]]
model = "host-power-cut"
policy = "lose-all"

[[workload]]
kind = "fio-verify"
[workload.fio]
rw = "randwrite"
bs = "4k"
size = "32M"
iodepth = 8
ioengine = "libaio"
direct = 1
time_based = 1
runtime = 60

[cut]
after-seconds = 4
"""


def test_a_block_fio_expects_that_the_disk_never_acknowledged_is_no_loss(
    tmp_path: Path, guest_image: Any, powercut_accel: Any
) -> None:
    scenario = tmp_path / "stalled-writes.toml"
    scenario.write_text(STALLED_WRITES)
    result = run_scenario_cell(
        tmp_path,
        guest_image,
        powercut_accel,
        scenario,
        "directsync/host-power-cut.lose-all/fio-verify/after-4s/r0",
    )
    fio = checker(result, "fio-verify").details
    # fio named blocks whose newest write was still in flight at the cut (the write log
    # says so); directsync keeps every completed write, and these never completed.
    assert fio["unacknowledged"], fio
    assert set(fio["unacknowledged"]) <= set(fio["bad_offsets"])
    wlog = read_log(cell_directory(tmp_path, result) / "writes.log")
    for offset in fio["unacknowledged"]:
        newest = [r for r in wlog.requests if r.offset <= offset < r.offset + r.length][-1]
        assert not newest.completed_ok
    assert result.verdict == "pass", result.reason


def test_lying_flush_negative_control_passes_only_because_the_loss_is_detected(
    tmp_path: Path, guest_image: Any, powercut_accel: Any
) -> None:
    result = run_scenario_cell(
        tmp_path,
        guest_image,
        powercut_accel,
        "lying-flush.toml",
        "writeback/host-power-cut.lose-all/ack-records/after-4s/r0",
    )
    assert result.verdict == "pass", result.reason
    assert result.reason.startswith("loss detected as expected")
    assert result.lost > 0


def test_guest_power_cut_loses_nothing_the_backend_completed(
    tmp_path: Path, guest_image: Any, powercut_accel: Any
) -> None:
    result = run_scenario_cell(
        tmp_path,
        guest_image,
        powercut_accel,
        "guest-crash.toml",
        "writeback/guest-power-cut/ack-records/after-4s/r0",
    )
    assert result.verdict == "pass", result.reason
    assert result.lost == 0 and result.writes_durable == result.writes_acknowledged
    assert "cut_json" not in result.artifacts  # nothing reverted: no offline cut


def test_backend_crash_under_fio_loses_nothing_and_the_guest_sees_no_io_error(
    tmp_path: Path, guest_image: Any, powercut_accel: Any
) -> None:
    result = run_scenario_cell(
        tmp_path,
        guest_image,
        powercut_accel,
        "backend-crash.toml",
        "writeback/backend-crash/fio-verify",
    )
    assert result.verdict == "pass", result.reason
    assert checker(result, "fio-verify").details["blocks_verified"] > 0
    log = (tmp_path / "out" / result.artifacts["backend_log"]).read_text()
    assert log.count("frontend connected") >= 2, "QEMU never reconnected: was there a crash?"
    assert "crash" in result.timings


def _terminal_sigint() -> None:
    """The SIGINT disposition a terminal's foreground job has.

    A background job of a non-interactive shell (`nohup pytest ... &`, some CI
    runners) starts with SIGINT ignored, every child inherits that, and Python
    then keeps ignoring it: the run would never see the Ctrl-C this test sends.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_the_run_cleanly_and_leaves_nothing_running(
    tmp_path: Path, powercut_accel: Any
) -> None:
    out = tmp_path / "out"
    argv = [
        sys.executable,
        "-m",
        "harness.cli",
        "run",
        str(SCENARIOS / "guest-crash.toml"),
        "--out",
        str(out),
        "--mode",
        "writeback",
        "--accel",
        powercut_accel.value,
    ]
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=_terminal_sigint,
    )
    try:
        # Interrupt while the first cell's guest is up (the backend has a frontend).
        deadline = time.monotonic() + 300
        while not any(
            "frontend connected" in p.read_text(errors="replace")
            for p in out.glob("cells/*/disk-powercut-serve.log")
        ):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the first cell never booted"
            time.sleep(0.2)
        backend_log = next(out.glob("cells/*/disk-powercut-serve.log")).read_text()
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=120)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output
    verdicts = [c.verdict for c in load_results(out).cells]
    assert verdicts == ["skipped"] * len(verdicts) and len(verdicts) == 2
    # Nothing the run started is left: its QEMU and backend both used the cell's socket.
    socket = backend_log.split("--socket ", 1)[1].split()[0]
    left = hygiene.processes_naming(socket)
    assert not left, f"still running: {left}"
