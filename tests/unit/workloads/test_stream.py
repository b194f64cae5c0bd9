"""Acknowledgement streams: what counts as an acknowledgement, and how a streaming run ends.

Every acknowledgement is a promise the verdict holds the disk (or the
application) to, so what the parsers accept and what a run reports as its own
failure decide cells. The guest here is scripted (`ScriptedSSH`): its output
arrives through the same `GuestStream` thread as a real guest's.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness.durability.contract import FaultModel
from harness.errors import GuestError
from harness.guest.ssh import CommandResult
from harness.workloads.stream import (
    ACKS_FILE,
    STDERR_FILE,
    AckStream,
    GuestStream,
    StreamRun,
    TokenStream,
)


@dataclass
class ScriptedSSH:
    """Prints `lines` on the run's stdout, then exits `code` (or raises `error`)."""

    lines: list[str] = field(default_factory=list)
    code: int = 0
    stderr: str = ""
    error: BaseException | None = None
    hold: threading.Event | None = None  # the run waits for this before it exits
    commands: list[tuple[str, float | None]] = field(default_factory=list)

    def run(
        self,
        command: str,
        timeout: float | None = 60.0,
        *,
        on_stdout: Callable[[str], None] | None = None,
        on_stderr: Callable[[str], None] | None = None,
        **_: Any,
    ) -> CommandResult:
        self.commands.append((command, timeout))
        if on_stdout is None:  # not the streamed run: the stop command
            if self.hold is not None:
                self.hold.set()
            return CommandResult(command, 0, "", "")
        for line in self.lines:
            on_stdout(line)
        if on_stderr is not None:
            for line in self.stderr.splitlines():
                on_stderr(line)
        if self.hold is not None:
            self.hold.wait(30)
        if self.error is not None:
            raise self.error
        return CommandResult(command, self.code, "\n".join(self.lines), self.stderr)


@dataclass
class Ctx:
    ssh: Any
    directory: Path
    asked: list[float | None] = field(default_factory=list)

    def time_left(self, cap: float | None = None) -> float:
        self.asked.append(cap)
        return 60.0 if cap is None else cap


def finished(ssh: ScriptedSSH, tmp_path: Path, stream: Any = None) -> GuestStream:
    gs = GuestStream(ssh, "app --run", "app", tmp_path / "acks.txt", stream).start()  # type: ignore[arg-type]
    gs.join(30)
    assert not gs.alive
    return gs


# -- what counts as an acknowledgement ----------------------------------------------------


def test_a_token_line_may_end_in_crlf_and_other_lines_may_hold_any_bytes() -> None:
    stream = TokenStream(re.compile(r"^ack (\S+)$"))
    got = stream.feed(b"ack 7\r\nack MAX\r\n\xff\xfe not utf-8\nack 5 \nack x\n")
    assert got == ["7", "MAX", "x"]  # "ack 5 " does not match: the pattern ends at the token


def test_an_ack_stream_takes_the_number_before_the_first_blank() -> None:
    stream = AckStream("fsmeta")
    assert stream.feed(b"1 create a b\n2\tmkdir c\n") == [1, 2] and stream.count == 2


# -- the run's own failure ----------------------------------------------------------------


@pytest.mark.parametrize("code", [0, -1])
def test_a_run_that_exits_0_or_loses_its_connection_did_not_fail(tmp_path: Path, code: int) -> None:
    gs = finished(ScriptedSSH(["1", "2"], code=code), tmp_path)
    assert gs.failure() is None and gs.exit_code == code and gs.acked == 2


@pytest.mark.parametrize("code", [1, 2, 137])
def test_a_run_that_exits_otherwise_failed(tmp_path: Path, code: int) -> None:
    gs = finished(ScriptedSSH(["1"], code=code, stderr="boom\n"), tmp_path)
    assert gs.failure() == f"exited {code}: boom (the command: 'app --run')"


def test_output_that_is_not_acknowledgements_fails_the_run(tmp_path: Path) -> None:
    gs = finished(ScriptedSSH(["1", "hello"]), tmp_path)
    assert gs.failure() is not None and "does not start with a number" in gs.failure()  # type: ignore[operator]
    assert gs.acked == 1


def test_a_dead_guest_is_not_the_runs_failure(tmp_path: Path) -> None:
    gs = finished(ScriptedSSH(["1"], error=EOFError("the guest lost power")), tmp_path)
    assert gs.failure() is None and isinstance(gs.error, EOFError) and gs.exit_code is None


def test_every_line_is_kept_as_it_arrives_and_the_run_may_take_an_hour(tmp_path: Path) -> None:
    ssh = ScriptedSSH(["1", "2 x"])
    finished(ssh, tmp_path)
    assert (tmp_path / "acks.txt").read_text() == "1\n2 x\n"
    assert ssh.commands == [("app --run", 3600)]


# -- a streaming run ----------------------------------------------------------------------


def test_a_run_starts_its_clock_when_the_stream_starts(tmp_path: Path) -> None:
    t0 = time.monotonic()
    run = StreamRun(
        Ctx(ScriptedSSH(["1"]), tmp_path), "/usr/bin/app --go", "app", FaultModel.HOST_POWER_CUT
    )
    assert run.started is not None and t0 <= run.started <= time.monotonic()
    assert run.fault is FaultModel.HOST_POWER_CUT
    run.after_cut(30)
    assert run.acked() == 1 and not run.alive()
    assert run.stop_command == "killall app 2>/dev/null; true"  # the program, not its path


def test_a_run_keeps_what_the_program_said_on_stderr_in_the_cells_directory(
    tmp_path: Path,
) -> None:
    ssh = ScriptedSSH(["1", "2"], code=0, stderr="warming up\nready\n")
    run = StreamRun(Ctx(ssh, tmp_path), "app --go", "the app", FaultModel.HOST_POWER_CUT)
    run.after_cut(30)
    assert (tmp_path / STDERR_FILE).read_text() == "warming up\nready\n"
    assert (tmp_path / ACKS_FILE).read_text() == "1\n2\n"
    assert run.failure() is None and run.acked() == 2
    (tmp_path / "bad").mkdir()
    bad = StreamRun(
        Ctx(ScriptedSSH(["oops"]), tmp_path / "bad"), "app", "the app", FaultModel.HOST_POWER_CUT
    )
    bad.after_cut(30)
    assert "the app: acknowledgement line b'oops'" in (bad.failure() or "")  # the stream's name


def test_after_a_backend_crash_the_run_goes_on_then_is_stopped(tmp_path: Path) -> None:
    hold = threading.Event()
    ssh = ScriptedSSH([str(i) for i in range(1, 31)], hold=hold)
    ctx = Ctx(ssh, tmp_path)
    run = StreamRun(ctx, "app", "app", FaultModel.BACKEND_CRASH, stop="kill-it")
    run.after_backend_crash(ctx, 5)  # type: ignore[arg-type]
    assert ("kill-it", 30) in ssh.commands and hold.is_set()
    assert ctx.asked == [60] and run.acked() == 30


def test_a_run_that_fails_across_a_backend_crash_fails_the_cell(tmp_path: Path) -> None:
    ssh = ScriptedSSH(["1", "2"], code=3, stderr="I/O error\n")
    ctx = Ctx(ssh, tmp_path)
    run = StreamRun(ctx, "app", "app", FaultModel.BACKEND_CRASH, stop="kill-it")
    with pytest.raises(GuestError, match="failed across the backend crash: exited 3: I/O"):
        run.after_backend_crash(ctx, 1)  # type: ignore[arg-type]
    stopped = StreamRun(
        Ctx(ScriptedSSH(["1"], code=143), tmp_path), "app", "app", FaultModel.BACKEND_CRASH
    )
    stopped.after_backend_crash(Ctx(ScriptedSSH(), tmp_path), 1)  # type: ignore[arg-type]
