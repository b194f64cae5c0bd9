"""Acknowledgements time-stamped as they arrive, and the run as it stood at a point."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

from harness.crash.explorer.record import CountedRun, RecordedRun, RunAsOf
from harness.durability.contract import CacheMode, FaultModel
from harness.explore.recording import Ack, Recording
from harness.guest.ssh import CommandResult
from harness.workloads.base import Run
from harness.workloads.stream import AckClock, AckStream, StreamRun, TokenStream


class GatedSSH:
    """Prints the lines it is given, each when the test releases it."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.gates = [threading.Event() for _ in lines]
        self.sent: list[int] = []

    def run(self, command: str, timeout: float = 60, *, on_stdout: Any = None, **kw: Any) -> Any:
        for line, gate in zip(self.lines, self.gates, strict=True):
            assert gate.wait(30)
            self.sent.append(time.monotonic_ns())
            on_stdout(line)
        return CommandResult(command, 0, "", "")


class Ctx:
    def __init__(self, ssh: GatedSSH, directory: Path) -> None:
        self.ssh = ssh
        self.directory = directory


def _run(tmp_path: Path, lines: list[str], stream: Any = None) -> tuple[StreamRun, GatedSSH]:
    ssh = GatedSSH(lines)
    run = StreamRun(Ctx(ssh, tmp_path), "prog", "prog", FaultModel.HOST_POWER_CUT, stream=stream)  # type: ignore[arg-type]
    return run, ssh


def test_each_ack_is_stamped_no_earlier_than_it_arrived(tmp_path: Path) -> None:
    run, ssh = _run(tmp_path, ["1", "2", "3", "4"])
    ssh.gates[0].set()  # one ack before the clock is attached: stamped when found, later
    deadline = time.monotonic() + 30
    while run.acked() < 1:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    clock = AckClock()
    attached = time.monotonic_ns()
    clock.attach(run)
    for gate in ssh.gates[1:]:
        gate.set()
        time.sleep(0.002)
    run.after_cut(30)
    stamps = clock.finish(run)
    assert [token for token, _ns in stamps] == ["1", "2", "3", "4"]
    assert stamps[0][1] >= attached
    for (_token, ns), sent in zip(stamps[1:], ssh.sent[1:], strict=True):
        assert ns >= sent  # placed at or after the moment the line was handed over
    assert [ns for _t, ns in stamps] == sorted(ns for _t, ns in stamps)
    assert run.acked() == 4  # the run still counts through the stamping wrapper


def test_command_tokens_are_stamped_and_the_run_as_of_a_point_has_its_prefix(
    tmp_path: Path,
) -> None:
    pattern = re.compile(r"^ack (\S+)$")
    run, ssh = _run(tmp_path, ["ack a", "noise", "ack b", "ack c"], TokenStream(pattern))
    clock = AckClock()
    clock.attach(run)
    for gate in ssh.gates:
        gate.set()
    run.after_cut(30)
    assert [t for t, _ns in clock.finish(run)] == ["a", "b", "c"]
    # The run's own stream again: the runner's check after the reboot reads its tokens.
    assert isinstance(run.stream.stream, TokenStream) and run.stream.stream.tokens == [
        "a",
        "b",
        "c",
    ]
    assert [t for t, _ns in clock.finish(run)] == ["a", "b", "c"]  # finishing twice is harmless
    recording = Recording(
        root=tmp_path,
        base=tmp_path,
        log=tmp_path,
        image_size=0,
        sector_size=512,
        base_fingerprint="",
        mode=CacheMode.WRITEBACK,
        acks=(Ack("a", 3), Ack("b", 9), Ack("c", 12)),
    )
    recorded = RecordedRun(recording, tmp_path, tmp_path, "tokens", "command", pattern, {})
    as_of = recorded.run_as_of(2, None)  # type: ignore[arg-type]
    assert isinstance(as_of, RunAsOf)
    assert isinstance(as_of.stream.stream, TokenStream)  # what the command workload's check reads
    assert as_of.stream.stream.tokens == ["a", "b"] and as_of.acked() == 2
    counted = RecordedRun(recording, tmp_path, tmp_path, "count", "ack-records", None, {})
    as_of = counted.run_as_of(3, None)  # type: ignore[arg-type]
    assert isinstance(as_of.stream.stream, AckStream) and as_of.acked() == 3  # type: ignore[attr-defined]
    other = RecordedRun(recording, tmp_path, tmp_path, "run", "x", None, {})
    plain = other.run_as_of(1, None)  # type: ignore[arg-type]
    assert isinstance(plain, CountedRun) and plain.acked() == 1 and not plain.alive()


def test_a_run_that_streams_nothing_has_its_acknowledgements_stamped_when_it_ends() -> None:
    class Counted(Run):
        def acked(self) -> int:
            return 3

        def alive(self) -> bool:
            return False

    run = Counted(FaultModel.HOST_POWER_CUT)
    clock = AckClock()
    clock.attach(run)  # nothing to wrap
    clock.stamp(["1"], 5)  # one already stamped, at 5 ns
    before = time.monotonic_ns()
    stamps = clock.finish(run)
    assert [t for t, _ns in stamps] == ["1", "2", "3"]
    assert stamps[0][1] == 5 and all(before <= ns <= time.monotonic_ns() for _t, ns in stamps[1:])


def test_an_acknowledgement_the_stamping_missed_is_stamped_at_the_end(tmp_path: Path) -> None:
    pattern = re.compile(r"^ack (\S+)$")
    run, ssh = _run(tmp_path, ["ack a", "ack b"], TokenStream(pattern))
    clock = AckClock()
    clock.attach(run)
    ssh.gates[0].set()
    deadline = time.monotonic() + 30
    while run.acked() < 1:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    wrapped = run.stream.stream
    assert wrapped.tokens == ["a"]  # the stamping wrapper shows the stream it wraps
    ssh.gates[1].set()
    run.after_cut(30)
    wrapped.inner.feed(b"ack z\n")  # past the wrapper: never stamped as it came
    before = time.monotonic_ns()
    stamps = clock.finish(run)
    assert [t for t, _ns in stamps] == ["a", "b", "z"]
    assert before <= stamps[2][1] <= time.monotonic_ns()
