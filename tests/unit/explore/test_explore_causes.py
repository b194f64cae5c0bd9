"""`powercut explore` explains its failing states by the recorded run's calls (no VM).

A recording made through the real fault stack stands in for the guest's run,
as in test_explore_run.py, with a traced run beside it (trace.json in the
recording, as `RunTracer` leaves it): an application appending 4 KiB records
to /mnt/log and acknowledging each. The fake checker guest reads the state
(the records intact from the start) and lists the tree as a guest would (the
log, as long as the records it holds). The explanation must name the
appends' missing fdatasync in every failing state — and, for the same disk
states, must not blame a call when the trace shows the records synced.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from harness.crash.explorer.checker import GuestCheck
from harness.durability.delta import read_delta
from harness.explore.causes import AckTime, Property
from harness.explore.clock import ClockBounds
from harness.explore.fileview import EntryType, FileEntry, FileView
from harness.explore.syscalls import parse_strace
from harness.explore.traced import TracedRun, load_traced
from harness.report.explore import render_explore
from harness.workloads.command import CommandObservation

from .conftest import pattern
from .test_explore_run import RECORD, FakeGuest, acked_records, explore

ACK = r"^ack (\S+)$"


def traced_appends(n: int, *, fdatasync: bool) -> TracedRun:
    lines = ['openat(-100</mnt>, "log", 0x441, 0644) = 3</mnt/log>']
    for i in range(1, n + 1):
        lines.append(f'write(3</mnt/log>, "rec", {RECORD}) = {RECORD}')
        if fdatasync:
            lines.append("fdatasync(3</mnt/log>) = 0")
        lines.append(f'write(1<pipe:[1]>, "ack {i}\\n", 6) = 6')
    text = "".join(f"100 1.{k:03d}000000 {c} <0.000100>\n" for k, c in enumerate(lines, 1))
    return TracedRun(
        "/mnt",
        "tracefs",
        parse_strace(text),
        ClockBounds(0, 0),
        tuple(AckTime(str(i), 2_000_000_000 + i) for i in range(1, n + 1)),
        ACK,
        existing=FileView("/mnt", "ext4", (FileEntry("lost+found", EntryType.DIR, 4096),)),
    )


class ListingGuest(FakeGuest):
    """The fake checker guest with the command workload's check and a listing of the tree."""

    listed: list[str] = []  # the images `view` was asked for (md5)

    def _records(self, delta: Path) -> int:
        image = bytearray(self.base)
        for sector, data in read_delta(delta).iter_sectors():
            image[sector * 512 : sector * 512 + 512] = data
        found = 0
        while image[found * RECORD : (found + 1) * RECORD] == pattern(100 + found):
            found += 1
        self.last = hashlib.md5(image).hexdigest()
        return found

    def check(
        self, delta: Path, run: Any, *, guest_fsck: bool, verify: bool, state: str = ""
    ) -> GuestCheck:
        acked = [str(i) for i in range(1, run.acked() + 1)]
        found = min(self._records(delta), len(acked))
        return GuestCheck(True, CommandObservation(tuple(acked), found, tuple(acked[found:]), 0))

    def view(self, delta: Path) -> FileView:
        size = self._records(delta) * RECORD
        self.listed.append(self.last)
        entries = (
            FileEntry("log", EntryType.FILE, size),
            FileEntry("lost+found", EntryType.DIR, 4096),
        )
        return FileView("/mnt", "ext4", entries)


def explored(tmp_path: Path, recorder: Any, traced: TracedRun | None) -> tuple[Any, dict[str, Any]]:
    rec = recorder()
    acked_records(rec, 4, flush=False)  # the disk never sees a flush: nothing is durable
    recording = rec.finish()
    if traced is not None:
        traced.save(recording.root)
    ListingGuest.listed = []
    return explore(tmp_path, rec, recording, fake=ListingGuest)


def test_every_failing_state_is_explained_by_the_appends_missing_fdatasync(
    recorder: Any, tmp_path: Path
) -> None:
    explorer, doc = explored(tmp_path, recorder, traced_appends(4, fdatasync=False))
    cell = doc["cells"][0]
    failing = [s for s in cell["states"] if s["verdict"] != "pass"]
    assert failing and all("explanation" in s for s in failing)
    assert all(s["explanation"]["seconds"] is not None for s in failing)
    (group,) = cell["causes"]
    assert group["property"] == Property.DATA_NOT_SYNCED.value
    assert group["fix"] == (
        "fdatasync /mnt/log after write(/mnt/log, 4096 bytes) and before the acknowledgement"
    )
    assert group["count"] == len(failing)
    assert group["replay"].startswith("powercut explore replay ")
    # Identical images are listed once.
    assert len(ListingGuest.listed) == len(set(ListingGuest.listed))
    assert len(ListingGuest.listed) == len({s["digest"] for s in failing})
    # What was at risk at each acknowledgement: the log's data, since its first write.
    assert [r["token"] for r in cell["at_risk"]] == ["1", "2", "3", "4"]
    assert all(r["risks"][0]["path"] == "/mnt/log" for r in cell["at_risk"])
    result = explorer.snapshot()
    assert [g.relied_on for g in result.causes] == [Property.DATA_NOT_SYNCED]
    html = render_explore(tmp_path / "out").read_text()
    assert "Why it was lost" in html and "fdatasync /mnt/log" in html
    assert "Timeline: calls, flushes and acknowledgements" in html
    md = (tmp_path / "out" / "report.md").read_text()
    assert "- cause: data not synced: fdatasync /mnt/log" in md


def test_the_same_states_with_the_appends_synced_blame_no_call(
    recorder: Any, tmp_path: Path
) -> None:
    _explorer, doc = explored(tmp_path, recorder, traced_appends(4, fdatasync=True))
    cell = doc["cells"][0]
    failing = [s for s in cell["states"] if s["verdict"] != "pass"]
    assert failing and all(s["explanation"]["unexplained"] for s in failing)
    (group,) = cell["causes"]
    assert group["property"] is None and group["count"] == len(failing)
    evidence = failing[0]["explanation"]["evidence"]
    assert any("not the application's doing" in line for line in evidence), evidence


def test_a_run_without_a_trace_is_not_explained_and_one_that_failed_to_trace_says_why(
    recorder: Any, tmp_path: Path
) -> None:
    _explorer, doc = explored(tmp_path / "a", recorder, None)
    cell = doc["cells"][0]
    assert "trace" not in cell and all("explanation" not in s for s in cell["states"])
    broken = TracedRun("/mnt", error="tracing could not start: no strace")
    _explorer, doc = explored(tmp_path / "b", recorder, broken)
    cell = doc["cells"][0]
    assert cell["trace"] == "not traced: tracing could not start: no strace"
    failing = [s for s in cell["states"] if s["verdict"] != "pass"]
    assert failing and cell["verdict"] == "fail"  # the missing trace changes no verdict
    assert all(
        s["explanation"]["evidence"] == ["not traced: tracing could not start: no strace"]
        for s in failing
    )


def test_a_traced_run_reads_back_as_it_was_saved(tmp_path: Path) -> None:
    run = traced_appends(2, fdatasync=True)
    run.save(tmp_path)
    back = load_traced(tmp_path)
    assert back == run
    assert back is not None and back.ack_times() == run.ack_times()
    assert load_traced(tmp_path / "nothing") is None
