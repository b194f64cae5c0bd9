"""The run tracer's life around a workload, on a fake guest (the VM tests trace real ones).

What matters without a guest: the command comes back wrapped only when
tracing started; a tracer that cannot start leaves the run untraced and says
why (never a failed cell); the tree is listed before the run and, when the
workload ended before the cut, after it; the result keeps the acks as the host
received them and is saved where the cell keeps it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness.crash import explain as explain_module
from harness.crash import tracer as tracer_module
from harness.crash.tracer import RunTracer
from harness.durability.cut import CutResult, RevertedWrite
from harness.errors import GuestError
from harness.explore.clock import ClockBounds
from harness.explore.fileview import EntryType, FileEntry, FileView
from harness.explore.syscalls import parse_strace
from harness.explore.traced import load_traced
from harness.guest.tracing import Mechanism, TracingUnavailable


class FakeStream:
    mechanism = Mechanism.TRACEFS
    error = None

    def __init__(self) -> None:
        self.finished = self.joined = False

    def command(self, workload: str) -> str:
        return f"traced({workload})"

    def finish(self, quiet: float, timeout: float) -> None:
        self.finished = True

    def join(self, timeout: float) -> None:
        self.joined = True

    def trace(self) -> Any:
        return parse_strace('1 1.000000000 write(1<pipe:[1]>, "ack 1\\n", 6) = 6 <0.000001>\n')

    def arrival_bounds(self) -> list[tuple[int, int]]:
        return [(1_000_000_000, 1_000_000_500)]


def tree(*names: str) -> FileView:
    return FileView("/mnt", "ext4", tuple(FileEntry(n, EntryType.FILE, 1) for n in names))


@pytest.fixture
def guest(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    seen: dict[str, Any] = {"listed": [], "stream": FakeStream(), "fail": None}

    def start_tracing(ssh: Any, text: Path, cwd: str) -> tuple[Any, str | None]:
        if seen["fail"]:
            raise TracingUnavailable(seen["fail"])
        return seen["stream"], "no eprobes"

    def file_view(
        ssh: Any, root: str, fs: str, *, sync: bool, chunk_map: bool, timeout: float
    ) -> FileView:
        assert sync is False  # a live tree before the cut: nothing may be written back
        seen["listed"].append(root)
        return tree("a") if len(seen["listed"]) == 1 else tree("a", "b")

    monkeypatch.setattr(tracer_module, "start_tracing", start_tracing)
    monkeypatch.setattr(tracer_module, "file_view", file_view)
    monkeypatch.setattr(tracer_module, "sample_offset", lambda *a, **k: ClockBounds(0, 1000, 20))
    return seen


def test_a_traced_run_lists_the_tree_wraps_the_command_and_keeps_the_acks(
    guest: dict[str, Any], tmp_path: Path
) -> None:
    tracer = RunTracer(tmp_path, "ext4", ack_pattern=r"^ack (\S+)$")
    assert tracer.wrap(object(), "perl app.pl") == "traced(perl app.pl)"  # type: ignore[arg-type]
    tracer.run_ended(object())  # type: ignore[arg-type]
    tracer.at_cut()
    run = tracer.result([("1", 1_000_000_900)])
    assert guest["stream"].finished and guest["stream"].joined
    assert run.traced and run.mechanism == "tracefs" and run.fallback == "no eprobes"
    assert run.existing == tree("a") and run.final == tree("a", "b")
    # The line's arrival tightened the round trips' bound from above (d <= 500 ns).
    assert run.clock == ClockBounds(0, 500, 21)
    assert run.ack_times() == {"1": (1_000_000_000, 1_000_000_000)}
    assert load_traced(tmp_path) == run
    assert set(tracer.seconds) == {"prepare", "finish"}


def test_a_tracer_that_cannot_start_leaves_the_run_untraced_and_says_why(
    guest: dict[str, Any], tmp_path: Path
) -> None:
    guest["fail"] = "the guest has no strace"
    tracer = RunTracer(tmp_path, "ext4", ack_pattern=r"^ack (\S+)$")
    assert tracer.wrap(object(), "perl app.pl") == "perl app.pl"  # type: ignore[arg-type]
    tracer.at_cut()
    run = tracer.result([])
    assert not run.traced and run.summary() == (
        "not traced: tracing could not start: the guest has no strace"
    )
    why = explain_module.explain_state(run, "s", tree("a"), ["1"], point_host_ns=None)
    assert why.unexplained and why.evidence == (run.summary(),)


def test_a_listing_that_fails_is_a_note_not_an_error(
    guest: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*a: Any, **k: Any) -> FileView:
        raise GuestError("perl died")

    monkeypatch.setattr(tracer_module, "file_view", broken)
    tracer = RunTracer(tmp_path, "ext4")
    tracer.wrap(object(), "x")  # type: ignore[arg-type]
    run = tracer.result([])
    assert run.traced and run.existing is None
    assert run.notes == ("the tree before the run could not be listed: perl died",)


def test_the_cuts_reverted_writes_are_lost_whole_or_torn() -> None:
    def reverted(offset: int, done: int, total: int) -> RevertedWrite:
        return RevertedWrite(1, offset, 4096, "write", 3, done, total)

    cut = CutResult(
        "i", "j", "lose-all", 0, 512, 3, 0, 3, 0, 2, 1, 0, 0, 0, False,
        [reverted(0, 8, 8), reverted(8192, 3, 8), reverted(65536, 0, 8)],
    )  # fmt: skip
    assert explain_module.cut_writes(cut) == ([(0, 4096)], [(8192, 4096)])
    assert explain_module.cut_writes(None) == ([], [])


def test_the_disk_freezes_before_the_tracer_reads_the_end_of_a_run_cut_by_the_host() -> None:
    # The tracer's seconds after the run must not let the filesystem's own commit make the
    # run's unsynced changes durable: the disk stops first, then the trace is read.
    from types import SimpleNamespace

    from harness.crash.cell_run import CellRunner, Timer

    events: list[str] = []
    tracer = SimpleNamespace(run_ended=lambda ssh: events.append(f"trace-end:{ssh}"))
    runner = SimpleNamespace(notes={}, tracer=tracer, timer=Timer())
    run = SimpleNamespace(alive=lambda: False)
    guest = SimpleNamespace(ssh="ssh")
    CellRunner._run_ended(runner, guest, run, freeze=lambda: events.append("freeze"))  # type: ignore[arg-type]
    assert events == ["freeze", "trace-end:ssh"]
    assert "trace" in runner.timer.phases

    events.clear()  # no freeze given (another fault, the recording): the tracer alone
    CellRunner._run_ended(runner, guest, run)  # type: ignore[arg-type]
    assert events == ["trace-end:ssh"]

    events.clear()  # a run the cut interrupts: nothing to read to its end, nothing frozen
    alive = SimpleNamespace(alive=lambda: True)
    CellRunner._run_ended(runner, guest, alive, freeze=lambda: events.append("freeze"))  # type: ignore[arg-type]
    assert events == []
