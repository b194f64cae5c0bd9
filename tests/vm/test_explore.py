"""`powercut explore` on real guests: one recorded run, its crash states, one checker guest.

Few and small (each exploration records once and boots one checker guest):
the whole path on ack-records/ext4, proof that nothing of one state reaches
the next (and the control that shows the proof can fail), the three negative
controls, `power_cut.explore` with a command workload, and Ctrl-C.
"""

from __future__ import annotations

import functools
import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from harness import hygiene
from harness.cli import main
from harness.crash.explorer.cell import CellExplorer, ExploreOptions
from harness.crash.explorer.checker import CheckerGuest
from harness.crash.explorer.progress import Phase, Progress
from harness.crash.explorer.record import recorded_run
from harness.crash.explorer.run import ExploreDoc, exploration_cells
from harness.crash.plan import make_plan
from harness.durability.contract import Verdict
from harness.explore.doc import CellStatus, StateVerdict, Where, load_doc
from harness.explore.recording import open_recording
from harness.explore.spec import ExploreSpec
from harness.proc import live_processes
from harness.workloads.command import Command

pytestmark = pytest.mark.vm

ROOT = Path(__file__).parents[2]

RECORDS = """\
name = "explore-records"
modes = ["writeback"]
disk-size = "64M"
seed = 3

[[fault]]
model = "host-power-cut"

[[workload]]
kind = "ack-records"
records = 30
sync = "fsync"

[cut]
after-exit = true

[explore]
max-states = 40
minimize = 0
"""

NEGATIVE = """\
name = "{name}"
disk-size = "64M"
expect = "violation"
seed = 5
{extra}

[[fault]]
model = "host-power-cut"

[[workload]]
kind = "ack-records"
records = 30
sync = "fsync"

[cut]
after-exit = true

[explore]
max-states = 100
minimize = 1
guest-check = {guest}
"""


def _explore(argv: list[str]) -> tuple[int, set[int]]:
    before = set(live_processes())
    status = main(["explore", *argv])
    return status, set(live_processes()) - before


@pytest.fixture(scope="module")
def explored(
    tmp_path_factory: pytest.TempPathFactory, guest_image: Any, powercut_accel: Any
) -> Any:
    tmp = tmp_path_factory.mktemp("explore")
    scenario = tmp / "records.toml"
    scenario.write_text(RECORDS)
    out = tmp / "out"
    status, left = _explore(
        [str(scenario), "--out", str(out), "--accel", powercut_accel.value, "--verify-every", "5"]
    )
    return scenario, out, status, left


def test_one_recorded_run_is_explored_host_side_and_in_one_checker_guest(explored: Any) -> None:
    _scenario, out, status, left = explored
    assert not left, f"explore left processes behind: {left}"
    doc = load_doc(out)
    (cell,) = doc.cells
    assert status == 0, cell.reason
    assert doc.complete and doc.ok and cell.verdict is Verdict.PASS
    assert doc.counts.states_explored == cell.counts.states_explored == 40
    assert 0 < doc.counts.states_unique <= 40 and doc.counts.states_failing == 0
    assert doc.counts.check_seconds > 0
    assert cell.recorded is not None
    assert cell.recorded.acks == 30 and cell.recorded.start_index > 0
    # The checker guest mounted the states the host passed, once per image and ack count.
    guest = cell.guest
    assert guest is not None and guest.checks > 0
    assert guest.checks + guest.same_image + guest.decided_host_side == 40
    checked = [s for s in cell.states if s.guest and s.guest.mounted is not None]
    for state in checked:
        names = [c.checker for c in state.checks]
        assert names[:2] == ["oracle", "e2fsck"] and "ack-records" in names
        assert state.guest and state.guest.mounted
        assert state.guest.check and not state.guest.check.loss
    assert any(s.acked > 0 for s in checked)
    assert max(s.acked for s in cell.states) == 30
    # What the runner's own cuts at the end leave is among the explored states.
    assert cell.runner_cuts is not None
    cuts = {c.policy.value: c for c in cell.runner_cuts.cuts}
    assert cuts["lose-all"].same_image
    if cell.recorded.in_flight_at_end == 0:
        assert cuts["keep-all"].same_image
    assert (out / "report.html").exists() and (out / "plots" / "explore-timeline.png").exists()


def test_nothing_of_one_state_reaches_the_next_in_the_checker_guest(explored: Any) -> None:
    """Every fifth check read the guest's whole disk before mounting: exactly the state."""
    _scenario, out, _status, _left = explored
    (cell,) = load_doc(out).cells
    verified = [s for s in cell.states if s.device_md5_expected is not None]
    assert len(verified) >= 2
    assert all(s.device_md5_matches for s in verified)
    # And `explore replay` rebuilds what the guest was shown, byte for byte.
    state = verified[-1]
    image = out / "replayed.img"
    assert main(["explore", "replay", str(out), "--state", state.id, "--out", str(image)]) == 0
    assert state.guest is not None
    assert hashlib.md5(image.read_bytes()).hexdigest() == state.guest.device_md5


class HoldingGuest(CheckerGuest):
    """A checker guest where something keeps /dev/vda open (udev, a monitor): then the last
    close at umount no longer drops the device's page cache, only BLKFLSBUF does."""

    def start(self, timeout: float = 180.0) -> None:
        super().start(timeout)
        assert self.ssh is not None
        self.ssh.check_output(
            "setsid sh -c 'exec sleep 100000 </dev/vda' </dev/null >/dev/null 2>&1 &"
        )


@pytest.mark.parametrize("drop_cache", [True, False], ids=["released", "control"])
def test_a_guest_holding_the_device_open_still_sees_each_state_exactly(
    explored: Any, guest_image: Any, powercut_accel: Any, tmp_path: Path, drop_cache: bool
) -> None:
    """With BLKFLSBUF every state reads back exactly; the control without it sees the leak."""
    scenario, out, _status, _left = explored
    plan = make_plan([scenario], tmp_path / "plan")
    (cell,) = exploration_cells(plan.scenarios, plan.cells)
    cell_dir = out / "cells" / "000"
    recorded = recorded_run(open_recording(cell_dir / "recording"), cell_dir)
    explorer = CellExplorer(
        cell,
        ExploreSpec(max_states=4, minimize=0),
        tmp_path / "cell",
        guest_image,
        out=tmp_path,
        index=0,
        options=ExploreOptions(
            verify_every=1,
            guest_factory=functools.partial(HoldingGuest, drop_cache=drop_cache),
        ),
        accel=powercut_accel,
        doc=ExploreDoc(tmp_path, "control"),
    )
    before = set(live_processes())
    explorer.explore(recorded)
    assert not set(live_processes()) - before
    states = [s for s in explorer.states if s.device_md5_expected is not None]
    stats = explorer.snapshot().guest
    assert stats is not None and len(states) == stats.checks >= 3
    assert states[0].device_md5_matches  # the first state: nothing came before it
    if drop_cache:
        assert all(s.device_md5_matches for s in states)
    else:
        assert not all(s.device_md5_matches for s in states[1:])


def test_negative_controls_fail_within_the_first_hundred_states(
    tmp_path: Path, powercut_accel: Any
) -> None:
    scenarios = []
    for name, extra, guest in (
        ("explore-unsafe", 'modes = ["unsafe"]', "false"),
        (
            "explore-lying-flush",
            'modes = ["writeback"]\n\n[[blkdebug]]\nop = "flush"\naction = "lying-flush"',
            "false",
        ),
        ("explore-nobarrier", 'modes = ["writeback"]\nmount-options = "nobarrier"', "true"),
    ):
        path = tmp_path / f"{name}.toml"
        path.write_text(NEGATIVE.format(name=name, extra=extra, guest=guest))
        scenarios.append(str(path))
    out = tmp_path / "out"
    status, left = _explore([*scenarios, "--out", str(out), "--accel", powercut_accel.value])
    assert not left
    doc = load_doc(out)
    assert status == 0, [c.reason for c in doc.cells]
    unsafe, lying, nobarrier = doc.cells
    for cell in doc.cells:
        assert cell.verdict is Verdict.PASS, cell.reason
        first = next(i for i, s in enumerate(cell.states) if s.failed)
        assert first < 100
        shrunk = next(s.minimized for s in cell.states if s.minimized is not None)
        assert shrunk.state is not None and shrunk.by in (Where.HOST, Where.GUEST)
        assert 1 <= shrunk.losses_after <= shrunk.losses_before
        assert shrunk.writes and all(w.length > 0 for w in shrunk.writes)
        assert shrunk.replay.startswith("powercut explore replay ")
    # unsafe promises nothing: its losses are allowed, caught by the oracle against its flushes.
    assert unsafe.counts.states_breaking_contract == 0
    assert any(s.verdict is StateVerdict.VIOLATION for s in unsafe.states)
    # a lying flush breaks the writeback contract: the oracle sees flushed data lost.
    assert any(s.broken_by == ("oracle",) for s in lying.states)
    # nobarrier keeps the disk's promise; the filesystem configuration loses acked records.
    broken = nobarrier.breaking
    assert broken and all(s.oracle is not None and s.oracle.ok for s in broken)
    assert any("ack-records" in s.broken_by or "e2fsck" in s.broken_by for s in broken)


def test_power_cut_explore_checks_a_command_workload_with_the_tokens_of_each_point(
    power_cut: Any,
) -> None:
    workload = Command(
        run_command="for i in $(seq 8); do echo $i > f$i && sync f$i . && echo ack $i; done",
        check_command="for f in f*; do [ -s $f ] && cat $f; done; true",
    )
    result = power_cut.explore(workload, mode="writeback", max_states=30, disk_size=64 << 20)
    assert result.passed, result.reason
    assert result.record.counts.states_explored == 30 and not result.breaking
    checked = [s for s in result.states if s.guest and s.guest.mounted is not None]
    assert checked and any(s.acked >= 1 for s in checked)
    for s in checked:
        summary = next(c.detail for c in s.checks if c.checker == "check")
        assert f"all {s.acked} acknowledged tokens found" in summary
    image = result.replay(result.states[0].id, power_cut.workdir / "state.img")
    assert image.stat().st_size == 64 << 20


COMMAND = """\
name = "{name}"
modes = ["writeback"]
disk-size = "64M"

[[fault]]
model = "host-power-cut"

[[workload]]
kind = "command"
run = "{run}"
check = "{check}"

[cut]
after-exit = true

[explore]
max-states = 6
minimize = 0
"""
WRITES = "for i in 1 2 3; do echo $i > f$i && sync f$i && echo ack $i; done"


def test_a_check_that_cannot_run_judges_no_state_and_the_cell_is_an_error(
    tmp_path: Path, powercut_accel: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 19, item 1: exit 127 of the check is no pass; item 7: what it said is kept."""
    scenario = tmp_path / "uncheckable.toml"
    scenario.write_text(COMMAND.format(name="uncheckable", run=WRITES, check="no-such-check f*"))
    out = tmp_path / "out"
    status, left = _explore([str(scenario), "--out", str(out), "--accel", powercut_accel.value])
    assert not left
    (cell,) = load_doc(out).cells
    assert status == 2, cell.reason
    assert cell.verdict is Verdict.ERROR and cell.counts.states_failing == 0
    assert cell.counts.states_unjudged == cell.counts.states_explored == 6
    assert "6 of 6 states could not be judged" in cell.reason and "exit 127" in cell.reason
    kept = out / "cells" / "000" / "checker" / "check-errors.log"
    assert str(kept.resolve()) in cell.reason
    assert "no-such-check" in kept.read_text() and "not found" in kept.read_text()
    assert (out / "cells" / "000" / "checker" / "console.log").stat().st_size > 0
    shown = capsys.readouterr().out  # not a terminal: the results, no progress
    assert "ERROR" in shown and "6 not judged" in shown and "writes recorded" not in shown
    assert "6 not judged" in (out / "report.md").read_text()


def test_a_failing_workload_keeps_what_it_and_the_guest_said_and_the_error_names_it(
    tmp_path: Path, guest_image: Any, powercut_accel: Any
) -> None:
    """Issue 19, item 7: a recording that fails says where the workload's own words are."""
    run = (
        "echo 1 > f1 && sync f1 && echo ack 1; sleep 3; echo etcd: member never came up >&2; exit 3"
    )
    scenario = tmp_path / "failing.toml"
    scenario.write_text(COMMAND.format(name="failing", run=run, check="cat f1"))
    plan = make_plan([scenario], tmp_path / "plan")
    (cell,) = exploration_cells(plan.scenarios, plan.cells)
    seen: list[Progress] = []
    directory = tmp_path / "out" / "cells" / "000"
    result = CellExplorer(
        cell,
        ExploreSpec(max_states=6, minimize=0),
        directory,
        guest_image,
        out=tmp_path / "out",
        index=0,
        options=ExploreOptions(),
        accel=powercut_accel,
        on_progress=seen.append,
    ).run()
    reason = result.reason
    assert result.record.verdict is Verdict.ERROR and "exited 3" in reason, reason
    directory = directory.resolve()
    for name, says in (
        ("workload.stderr", "etcd: member never came up"),
        ("acks.txt", "ack 1"),
        ("console.log", "powercut-guest: ready"),
    ):
        assert str(directory / name) in reason
        assert says in (directory / name).read_text()
    # What a terminal would have shown meanwhile: the boot, then the run as it was recorded.
    assert [p.phase for p in seen][:2] == [Phase.BOOT, Phase.RECORD]
    recorded = [p for p in seen if p.phase is Phase.RECORD]
    assert recorded[-1].acks == 1 and recorded[-1].writes > 0


def _terminal_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as in test_runner: a terminal's Ctrl-C


def test_ctrl_c_keeps_what_was_checked_and_leaves_nothing_running(
    tmp_path: Path, powercut_accel: Any
) -> None:
    scenario = tmp_path / "records.toml"
    scenario.write_text(RECORDS.replace("max-states = 40", "max-states = 3000"))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "harness.cli", "explore", str(scenario), "--out", str(out)]
    proc = subprocess.Popen(
        [*argv, "--accel", powercut_accel.value],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=_terminal_sigint,
    )
    try:
        # Interrupt once the checker guest is checking states.
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the checker guest never started checking"
            try:
                cell = json.loads((out / "explore.json").read_text())["cells"][0]
            except (OSError, ValueError, IndexError):
                cell = {}
            if any((s.get("guest") or {}).get("mounted") for s in cell.get("states", [])):
                break
            time.sleep(0.2)
        backend_log = (out / "cells" / "000" / "checker" / "state-powercut-serve.log").read_text()
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=120)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output
    doc = load_doc(out)
    assert doc.interrupted and not doc.complete and doc.ok is False
    (cell,) = doc.cells
    assert cell.status is CellStatus.INTERRUPTED and 0 < cell.counts.states_explored <= 3000
    socket = backend_log.split("--socket ", 1)[1].split()[0]
    left = hygiene.processes_naming(socket)
    assert not left, f"still running: {left}"
