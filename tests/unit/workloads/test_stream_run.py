"""A streaming workload that ends before the cut: a clean exit, a failure, a lost channel.

Before the cut the guest is alive, so a run whose channel ended without the
command's exit status (a signal killed it: EPIPE on its stdout when the SSH
server closed the channel under it) did not finish: it failed, and the cell
must say so instead of cutting a run that acknowledged nothing. The clock
helper's channel, for its part, is closed only after the helper exited.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.durability.contract import FaultModel
from harness.guest.clock import close_after_exit
from harness.guest.ssh import CommandResult
from harness.workloads.stream import StreamRun


class Ctx:
    def __init__(self, tmp: Path, code: int | None, error: Exception | None = None) -> None:
        self.directory = tmp
        self.code, self.error = code, error

    @property
    def ssh(self) -> Any:
        ctx = self

        class Ssh:
            def run(self, command: str, timeout: float = 60, **kw: Any) -> CommandResult:
                kw["on_stdout"]("1")
                if ctx.error is not None:
                    raise ctx.error
                return CommandResult(command, ctx.code if ctx.code is not None else -1, "", "")

        return Ssh()


def ended(tmp: Path, code: int | None, error: Exception | None = None) -> StreamRun:
    run = StreamRun(Ctx(tmp, code, error), "app", "app", FaultModel.HOST_POWER_CUT)  # type: ignore[arg-type]
    run.stream.join(30)
    assert not run.alive()
    return run


def test_a_clean_exit_is_no_failure_and_a_lost_channel_is(tmp_path: Path) -> None:
    assert ended(tmp_path, 0).failure() is None
    assert "exited 3" in (ended(tmp_path, 3).failure() or "")
    lost = ended(tmp_path, -1).failure() or ""
    assert lost.startswith("its SSH channel ended before the command exited (no exit status")
    broken = ended(tmp_path, None, EOFError("Channel closed")).failure() or ""
    assert "Channel closed" in broken


def test_the_helpers_channel_is_closed_only_after_it_exited() -> None:
    calls: list[str] = []

    class Chan:
        closed = False
        polls = 0

        def shutdown_write(self) -> None:
            calls.append("eof")

        def exit_status_ready(self) -> bool:
            self.polls += 1
            return self.polls > 3

        def close(self) -> None:
            calls.append(f"close after {self.polls} polls")

    close_after_exit(Chan())
    assert calls == ["eof", "close after 4 polls"]
