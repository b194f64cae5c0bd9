"""`powercut explore`'s orchestration on recordings made in-process (no VM).

A recording made through the real fault stack stands in for the guest's run;
the checker guest is a fake that rebuilds each state from the delta it is
given, so the in-guest path (which states go to the guest, once per image and
acknowledgement count, with the run as of their point) is checked here, and
the VM tests check the real guest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from harness.cli import main
from harness.commands import explore as explore_command
from harness.commands.explore import exit_status
from harness.crash.explorer import cell as cell_module
from harness.crash.explorer.cell import CellExploration, CellExplorer, ExploreOptions
from harness.crash.explorer.checker import GuestCheck, mount_request, plain_argv
from harness.crash.explorer.progress import Phase, Progress
from harness.crash.explorer.record import RecordedRun, RecordingRunner
from harness.crash.explorer.run import ExploreDoc
from harness.crash.images import CellImages
from harness.crash.pytest_helpers import PowerCutHelper
from harness.durability.contract import CacheMode, FaultModel, Promise, Verdict
from harness.durability.cut import apply_cut
from harness.durability.delta import read_delta
from harness.durability.oracle import check as oracle_check
from harness.errors import ConfigError, GuestError, JournalError
from harness.explore.doc import (
    DOC_NAME,
    CellRecord,
    CellStatus,
    ExploreDocument,
    GuestFsck,
    StateRecord,
    Where,
    load_doc,
    replay,
)
from harness.explore.hostcheck import Finding, log_as_of
from harness.explore.overlay import StateBuilder
from harness.explore.recording import Recording, open_recording
from harness.explore.spec import ExploreSpec
from harness.explore.states import Timeline
from harness.guest.ssh import CommandResult
from harness.report.explore import render_explore
from harness.scenario.cells import single_cell
from harness.scenario.model import BlkdebugRule, CutSpec, DiskSpec, Expectation, TriggerKind
from harness.testing.ext4traffic import Ext4Traffic
from harness.vm.image import GuestImage
from harness.workloads.ackrecords import AckRecords
from harness.workloads.base import ORACLE, Observation, Run
from harness.workloads.stream import ACKS_FILE, STDERR_FILE, GuestStream

from .conftest import pattern

RECORD = 4096
LYING_FLUSH = BlkdebugRule((("op", "flush"), ("action", "lying-flush")))


def acked_records(rec: Any, n: int = 6, *, flush: bool = True) -> None:
    """An application appending records: write, [flush,] ack (a nobarrier one skips the flush)."""
    for i in range(n):
        rec.write(i * RECORD, pattern(100 + i))
        if flush:
            rec.flush()
        rec.ack(str(i + 1))


def recorded(rec: Any, recording: Recording) -> RecordedRun:
    return RecordedRun(
        recording=recording,
        final_image=rec.image,
        journal=rec.journal,
        stream_kind="count",
        stream_name="ack-records",
        token_pattern=None,
        timings={},
    )


@dataclass(frozen=True)
class RecordsSeen(Observation):
    """What a fake `ackrecords --check` finds: records 1..found intact of `acked`."""

    acked: int
    found: int

    @property
    def loss(self) -> bool:
        return self.found < self.acked

    def summary(self) -> str:
        return f"{self.found} of {self.acked} acknowledged records found"


class FakeGuest:
    """The checker guest, without a VM: rebuilds each state from base + delta and reads it."""

    instances: list[FakeGuest] = []

    def __init__(
        self, directory: Path, image: Any, base: Path, workload: Any, seed: int, **kw: Any
    ):
        self.base = Path(base).read_bytes()
        self.ssh = None
        self.boot_seconds = 0.0
        self.checked: list[tuple[str, int]] = []  # (md5 of the state it was shown, acked)
        self.started = self.closed = False
        FakeGuest.instances.append(self)

    def start(self) -> None:
        self.started = True

    def check(
        self, delta: Path, run: Any, *, guest_fsck: bool, verify: bool, state: str = ""
    ) -> GuestCheck:
        image = bytearray(self.base)
        for sector, data in read_delta(delta).iter_sectors():
            image[sector * 512 : sector * 512 + 512] = data
        acked = run.acked()
        self.checked.append((hashlib.md5(image).hexdigest(), acked))
        found = 0
        while found < acked and image[found * RECORD : (found + 1) * RECORD] == pattern(
            100 + found
        ):
            found += 1
        return GuestCheck(True, RecordsSeen(acked, found))

    def close(self) -> None:
        self.closed = True


def explore(
    tmp_path: Path,
    rec: Any,
    recording: Recording,
    *,
    mode: str = "writeback",
    expect: str = "contract",
    guest: bool = True,
    spec: ExploreSpec | None = None,
    checkers: tuple[str, ...] = (ORACLE, "ack-records"),
    blkdebug: bool = False,
    fake: type[FakeGuest] | None = None,
) -> tuple[CellExplorer, dict[str, Any]]:
    cell = single_cell(
        AckRecords(records=6),
        mode=CacheMode(mode),
        disk=DiskSpec("ext4", blkdebug=(LYING_FLUSH,) if blkdebug else ()),
        checkers=checkers,
        expect=Expectation(expect),
    )
    out = tmp_path / "out"
    doc = ExploreDoc(out, "test")
    explorer = CellExplorer(
        cell,
        spec or ExploreSpec(max_states=200, minimize=2),
        out / "cells" / "000",
        None,
        out=out,
        index=0,
        options=ExploreOptions(guest=guest, guest_factory=fake or FakeGuest, full_every=1),
        doc=doc,
    )
    explorer.explore(recorded(rec, recording))
    doc.finish()
    return explorer, json.loads((out / DOC_NAME).read_text())


@pytest.fixture(autouse=True)
def _fresh_fakes() -> None:
    FakeGuest.instances.clear()


def test_explore_json_holds_every_state_with_its_checks_and_the_totals(
    recorder: Any, tmp_path: Path
) -> None:
    rec = recorder()
    acked_records(rec)
    rec.write(40 * RECORD, pattern(7))  # never flushed: the runner's two cuts differ
    recording = rec.finish()
    explorer, doc = explore(tmp_path, rec, recording, guest=False)
    assert doc["complete"] and doc["ok"] and not doc["interrupted"]
    cell = doc["cells"][0]
    assert cell["status"] == "done" and cell["verdict"] == "pass", cell["reason"]
    for key in ("states_explored", "states_unique", "states_failing", "check_seconds"):
        assert doc[key] == cell[key]
    assert cell["states_explored"] == len(cell["states"]) > 12
    assert cell["states_unique"] <= cell["states_explored"]
    assert cell["states_failing"] == 0
    for state in cell["states"]:
        assert state["verdict"] == "pass"
        assert {"id", "point", "lost", "torn", "checks", "acked"} <= state.keys()
        assert state["checks"][0]["checker"] == ORACLE and state["checks"][0]["ok"]
    # The runner's own lose-all and keep-all cuts at the end are explored states: cut a copy
    # of the recorded disk as the runner would, and compare with the state each one names.
    timeline = Timeline(recording.read_log(), Promise.FLUSHED, recording.acks)
    end = timeline.points[-1].number
    with StateBuilder(timeline, recording.log, recording.base) as builder:
        for policy in ("lose-all", "keep-all"):
            image, journal = tmp_path / f"{policy}.img", tmp_path / f"{policy}.journal"
            shutil.copyfile(rec.image, image)
            shutil.copyfile(rec.journal, journal)
            apply_cut(image, journal, policy, 0)
            runner = image.read_bytes()
            ours = builder.replay(explorer.state_of(f"p{end}-{policy}-0"), tmp_path / "s.img")
            assert ours.read_bytes() == runner, policy
            assert (runner[40 * RECORD : 41 * RECORD] == pattern(7)) is (policy == "keep-all")
            named = cell["runner_cuts"][policy]
            assert named["same_image"] and named["state"] is not None
            named_image = builder.replay(explorer.state_of(named["state"]), tmp_path / "n.img")
            assert named_image.read_bytes() == runner, policy
    assert cell["states"][0]["id"].endswith("lose-all-0")
    assert cell["keep"] == "FLUSHED" and cell["judge"] == "FLUSHED"


SKIPPED = {
    "id": "writeback/explore/fio-verify/after-2s/r0",
    "scenario": "mixed",
    "status": "skipped",
    "reason": "the fio-verify workload cannot be explored",
    "index": 0,
    "verdict": "skipped",
    "states": [],
}


def test_explore_json_reads_back_as_records_that_write_the_same_bytes(
    recorder: Any, tmp_path: Path
) -> None:
    """Every part of explore.json is a record: a file read back and written again is the same
    text, key order included, so the readers and users' scripts see one format."""
    nobarrier, flushed = recorder(), recorder()
    acked_records(nobarrier, 4, flush=False)
    acked_records(flushed)
    out = tmp_path / "out"
    doc = ExploreDoc(out, "test")
    doc.add_cell(CellRecord.skipped(0, SKIPPED["id"], "mixed", SKIPPED["reason"]))
    records = single_cell(AckRecords(records=6), checkers=(ORACLE, "ack-records"))
    with_fsck = single_cell(
        AckRecords(records=6),
        disk=DiskSpec("ext4"),
        checkers=(ORACLE, "ack-records", "fsck"),  # e2fsck finds no ext4 here: host-side fails
    )
    runs = ((records, nobarrier, 2), (with_fsck, nobarrier, 0), (records, flushed, 0))
    for index, (cell, rec, verify) in enumerate(runs, start=1):
        CellExplorer(
            cell,
            ExploreSpec(max_states=60, minimize=2),
            out / "cells" / f"{index:03d}",
            None,
            out=out,
            index=index,
            options=ExploreOptions(guest_factory=FakeGuest, full_every=1, verify_every=verify),
            doc=doc,
            replay_prefix=f"{index}/",
        ).explore(recorded(rec, rec.finish()))
    CellExplorer(  # no guest image: the cell is an error
        records,
        ExploreSpec(),
        out / "cells" / "004",
        None,
        out=out,
        index=4,
        options=ExploreOptions(),
        doc=doc,
    ).run()
    doc.finish()
    text = (out / DOC_NAME).read_text()
    document = load_doc(out)
    assert document.text() == text
    assert ExploreDocument.from_json(document.to_json()) == document
    # A skipped cell is written as the command always wrote it.
    assert list(json.loads(text)["cells"][0].items()) == list(SKIPPED.items())
    # And the file holds every kind of part the records know.
    skipped, guest, host, passing, error = document.cells
    assert skipped.status is CellStatus.SKIPPED and skipped.verdict is Verdict.SKIPPED
    assert error.status is CellStatus.ERROR and "guest image" in error.reason
    assert guest.verdict is host.verdict is Verdict.FAIL and passing.verdict is Verdict.PASS
    assert any(s.guest and s.guest.same_as for s in passing.states)
    guest_states: list[StateRecord] = list(guest.states)
    assert any(s.device_md5_expected for s in guest_states)
    assert any(s.minimized and s.minimized.by is Where.GUEST for s in guest_states)
    assert guest.guest is not None and guest.runner_cuts is not None and guest.recorded
    assert all(s.guest and s.guest.skipped for s in host.states)
    assert any(
        c.where is Where.HOST and c.seconds is not None for s in host.states for c in s.checks
    )
    assert any(s.minimized and s.minimized.by is Where.HOST for s in host.states)


def test_every_explored_state_is_inside_the_contract_the_oracle_agrees(
    recorder: Any, tmp_path: Path
) -> None:
    rec = recorder()
    acked_records(rec, 8)
    for i in range(3):  # never flushed: prefix, random and torn states at the end
        rec.write((40 + 4 * i) * RECORD, pattern(7 + i, 3 * RECORD))
    recording = rec.finish()
    explorer, doc = explore(tmp_path, rec, recording, guest=False)
    states = doc["cells"][0]["states"]
    assert {s["policy"] for s in states} == {"lose-all", "keep-all", "prefix", "random", "torn"}
    assert all(s["oracle"]["ok"] for s in states)
    # And the whole oracle, on every state rebuilt as an image, with the log as of its point.
    wlog = recording.read_log()
    timeline = Timeline(wlog, Promise.FLUSHED, recording.acks)
    with StateBuilder(timeline, recording.log, recording.base) as builder:
        for s in states:
            image = builder.replay(explorer.state_of(s["id"]), tmp_path / "s.img")
            report = oracle_check(image, log_as_of(wlog, s["point"]["at"]), Promise.FLUSHED)
            assert report.ok, (s["id"], report.summary())


def test_the_guest_sees_each_passing_state_once_with_the_acks_true_at_its_point(
    recorder: Any, tmp_path: Path
) -> None:
    rec = recorder()
    acked_records(rec)
    recording = rec.finish()
    explorer, doc = explore(tmp_path, rec, recording)
    (guest,) = FakeGuest.instances
    assert guest.started and guest.closed
    cell = doc["cells"][0]
    assert cell["verdict"] == "pass", cell["reason"]
    checked = [s for s in cell["states"] if "same_as" not in (s["guest"] or {})]
    assert len(guest.checked) == len(checked) == cell["guest"]["checks"]
    # Each state the guest saw is exactly the state, with the acks received by its point.
    timeline = Timeline(recording.read_log(), Promise.FLUSHED, recording.acks)
    with StateBuilder(timeline, recording.log, recording.base) as builder:
        for (md5, acked), state in zip(guest.checked, checked, strict=True):
            image = builder.replay(explorer.state_of(state["id"]), tmp_path / "s.img")
            assert hashlib.md5(image.read_bytes()).hexdigest() == md5
            assert acked == state["acked"]
            assert acked == sum(1 for a in recording.acks if a.index <= state["point"]["at"])
    # Identical images at the same acknowledgement count went to the guest once.
    keys = [(s["digest"], s["acked"]) for s in checked]
    assert len(keys) == len(set(keys))
    assert cell["guest"]["checks"] + cell["guest"]["same_image"] == cell["states_explored"]


def test_acks_without_a_flush_are_caught_in_the_guest_and_shrunk_to_the_write(
    recorder: Any, tmp_path: Path
) -> None:
    """The nobarrier shape: acknowledged, never flushed; the disk keeps its promise."""
    rec = recorder()
    acked_records(rec, 4, flush=False)
    _explorer, doc = explore(tmp_path, rec, rec.finish())
    cell = doc["cells"][0]
    assert cell["verdict"] == "fail"
    broken = [s for s in cell["states"] if s["contract_broken"]]
    assert broken and all(s["verdict"] == "fail" for s in broken)
    assert broken[0]["broken_by"] == ["ack-records"]
    assert all(s["oracle"]["ok"] for s in broken)  # the disk lost nothing it promised
    shrunk = [s["minimized"] for s in broken if "minimized" in s]
    assert len(shrunk) == 2
    for m in shrunk:
        assert m["by"] == "guest" and m["losses_after"] == 1 <= m["losses_before"]
        (write,) = m["writes"]
        assert write["loss"] == "lost" and write["length"] == RECORD
        assert write["offset"] % RECORD == 0 and "flush_epoch" in write
    assert broken[0]["replay"].startswith("powercut explore replay ")


def test_a_state_the_checker_guest_cannot_mount_fails_and_is_counted(
    recorder: Any, tmp_path: Path
) -> None:
    """A filesystem that does not mount (its journal did not recover) is damage: fsck's role."""
    rec = recorder()
    acked_records(rec)
    recording = rec.finish()

    class Unmountable(FakeGuest):
        def check(
            self, delta: Path, run: Any, *, guest_fsck: bool, verify: bool, state: str = ""
        ) -> GuestCheck:
            if run.acked() != 2:
                return super().check(delta, run, guest_fsck=guest_fsck, verify=verify, state=state)
            return GuestCheck(False, None, "mount /dev/vda: Structure needs cleaning")

    cell = single_cell(AckRecords(records=6), checkers=(ORACLE, "ack-records"))
    out = tmp_path / "out"
    doc = ExploreDoc(out, "test")
    explorer = CellExplorer(
        cell,
        ExploreSpec(max_states=200, minimize=0),
        out / "cells" / "000",
        None,
        out=out,
        index=0,
        options=ExploreOptions(guest=True, guest_factory=Unmountable, full_every=1),
        doc=doc,
    )
    explorer.explore(recorded(rec, recording))
    doc.finish()
    result = json.loads((out / DOC_NAME).read_text())["cells"][0]
    unmounted = [s for s in result["states"] if s["acked"] == 2]
    assert unmounted and len(unmounted) < len(result["states"])
    for s in unmounted:
        assert s["verdict"] == "fail" and s["contract_broken"] and s["broken_by"] == ["mount"]
        mount = next(c for c in s["checks"] if c["checker"] == "mount")
        assert mount["ok"] is False and "needs cleaning" in mount["detail"]
    assert result["states_failing"] == result["states_breaking_contract"] == len(unmounted)
    assert result["verdict"] == "fail"
    assert "break the contract" in result["reason"]


def test_a_guest_check_that_did_not_mount_has_failed() -> None:
    assert GuestCheck(False, None, "no mount").failed
    assert GuestCheck(False, RecordsSeen(1, 1)).failed  # whatever the check said
    assert not GuestCheck(True, RecordsSeen(2, 2)).failed
    assert not GuestCheck(None, RecordsSeen(2, 2)).failed  # no filesystem to mount
    assert GuestCheck(True, RecordsSeen(2, 1)).failed
    assert GuestCheck(True, None, fsck=GuestFsck("fsck", 1, False, "")).failed
    assert not GuestCheck(True, None, "the check raised").failed  # could not judge


def test_negative_controls_pass_when_loss_is_found_and_judge_by_the_promise(
    recorder: Any, tmp_path: Path
) -> None:
    rec = recorder(mode="unsafe")
    acked_records(rec)
    recording = rec.finish()
    _e, doc = explore(tmp_path / "a", rec, recording, mode="unsafe", guest=False)
    cell = doc["cells"][0]
    # Unsafe promises nothing: its losses are allowed (the cell passes), and still seen.
    assert cell["states_failing"] > 0 and cell["states_breaking_contract"] == 0
    assert cell["verdict"] == "pass"
    assert cell["keep"] == "NOTHING" and cell["judge"] == "FLUSHED"
    failing = [s for s in cell["states"] if s["verdict"] != "pass"]
    assert all(s["verdict"] == "violation" for s in failing)
    assert cell["states"].index(failing[0]) < 100
    _e, doc = explore(
        tmp_path / "b", rec, recording, mode="unsafe", expect="violation", guest=False
    )
    assert doc["cells"][0]["verdict"] == "pass"


def test_a_lying_flush_breaks_the_writeback_contract(recorder: Any, tmp_path: Path) -> None:
    rec = recorder(mode="writeback", blkdebug="flush:lying-flush")
    acked_records(rec)
    _e, doc = explore(tmp_path, rec, rec.finish(), guest=False, blkdebug=True)
    cell = doc["cells"][0]
    assert cell["lying_flush"] and cell["keep"] == "NOTHING"
    assert cell["verdict"] == "fail" and cell["states_breaking_contract"] > 0
    first = next(s for s in cell["states"] if s["contract_broken"])
    assert first["broken_by"] == [ORACLE] and cell["states"].index(first) < 100
    assert first["minimized"]["by"] == "host"


class CannotCheck(FakeGuest):
    """A checker guest where the workload's check cannot run (a command not installed)."""

    def check(
        self, delta: Path, run: Any, *, guest_fsck: bool, verify: bool, state: str = ""
    ) -> GuestCheck:
        super().check(delta, run, guest_fsck=guest_fsck, verify=verify)
        return GuestCheck(True, None, "GuestError: the workload's check could not run (exit 127)")


def test_a_check_that_could_not_run_is_not_a_pass_and_makes_the_cell_an_error(
    recorder: Any, tmp_path: Path
) -> None:
    rec = recorder()
    acked_records(rec)
    recording = rec.finish()
    spec = ExploreSpec(max_states=30, minimize=0)
    explorer, doc = explore(tmp_path / "a", rec, recording, spec=spec, fake=CannotCheck)
    cell = doc["cells"][0]
    n = cell["states_explored"]
    assert cell["verdict"] == "error" and cell["status"] == "done"
    assert cell["states_failing"] == 0 and cell["states_unjudged"] == n > 20
    assert doc["states_unjudged"] == n and doc["ok"] is False
    assert cell["reason"].startswith(f"{n} of {n} states could not be judged")
    assert "exit 127" in cell["reason"]
    assert all(s["unjudged_by"] == ["ack-records"] for s in cell["states"])
    result = CellExploration(explorer.snapshot(), tmp_path / "a" / "out")
    assert not result.passed and len(result.unjudged) == n
    # Named in both reports, with what the checker said.
    render_explore(tmp_path / "a" / "out")
    html = (tmp_path / "a" / "out" / "report.html").read_text()
    markdown = (tmp_path / "a" / "out" / "report.md").read_text()
    first = cell["states"][0]["id"]
    for text in (html, markdown):
        assert f"{n} not judged" in text and first in text and "exit 127" in text
    # The scenario may accept them: then the cell is judged on the rest, and says so.
    allowed = ExploreSpec(max_states=30, minimize=0, unjudged_states=30)
    _e, doc = explore(tmp_path / "b", rec, recording, spec=allowed, fake=CannotCheck)
    cell = doc["cells"][0]
    assert cell["verdict"] == "pass" and cell["states_unjudged"] == n
    assert f"{n} not judged (unjudged-states allows 30)" in cell["reason"]


def test_a_broken_contract_is_a_failure_whatever_else_was_not_judged(
    recorder: Any, tmp_path: Path
) -> None:
    rec = recorder(mode="writeback", blkdebug="flush:lying-flush")
    acked_records(rec)
    spec = ExploreSpec(max_states=60, minimize=0)
    _e, doc = explore(tmp_path, rec, rec.finish(), spec=spec, blkdebug=True, fake=CannotCheck)
    cell = doc["cells"][0]
    assert cell["states_breaking_contract"] > 0 and cell["states_unjudged"] > 0
    assert cell["verdict"] == "fail"


class Undecided:
    """A host-side filesystem checker that cannot replay the log (as xfs_repair -n)."""

    name = "xfs_repair"

    def check(self, image: Path) -> Finding:
        return Finding(self.name, None, "log needs replay: only a mount can judge this state")


def test_a_host_tool_that_cannot_replay_the_log_leaves_states_unjudged_unless_a_mount_follows(
    recorder: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cell_module, "checker_for", lambda fs, work: Undecided())
    rec = recorder()
    acked_records(rec)
    recording = rec.finish()
    checkers = (ORACLE, "ack-records", "fsck")
    spec = ExploreSpec(max_states=20, minimize=0)
    _e, doc = explore(tmp_path / "a", rec, recording, guest=False, checkers=checkers, spec=spec)
    cell = doc["cells"][0]
    assert cell["verdict"] == "error"
    assert cell["states_unjudged"] == cell["states_explored"] > 10
    assert "xfs_repair: log needs replay" in cell["reason"]
    # With the checker guest, its mount (and fsck) settle what the host tool could not.
    _e, doc = explore(tmp_path / "b", rec, recording, checkers=checkers, spec=spec)
    cell = doc["cells"][0]
    assert cell["verdict"] == "pass" and cell["states_unjudged"] == 0, cell["reason"]


def test_replay_rebuilds_explored_and_minimized_states(recorder: Any, tmp_path: Path) -> None:
    rec = recorder()
    acked_records(rec, 4, flush=False)
    recording = rec.finish()
    explorer, doc = explore(tmp_path, rec, recording)
    out = tmp_path / "out"
    state = next(s for s in doc["cells"][0]["states"] if "minimized" in s)
    timeline = Timeline(recording.read_log(), Promise.FLUSHED, recording.acks)
    for ident in (state["id"], state["minimized"]["id"]):
        image = replay(out, ident, tmp_path / f"{ident}.img")
        want = explorer.state_of(ident) if ident == state["id"] else None
        if want is not None:
            with StateBuilder(timeline, recording.log, recording.base) as builder:
                assert builder.replay(want, tmp_path / "w.img").read_bytes() == image.read_bytes()
    # The CLI, and the command each failing state carries.
    command = state["replay"].split()
    assert command[:3] == ["powercut", "explore", "replay"]
    assert main([*command[1:-1], str(tmp_path / "cli.img")]) == 0
    assert (tmp_path / "cli.img").read_bytes() == (tmp_path / f"{state['id']}.img").read_bytes()


def test_replay_bad_input_is_a_clear_error(recorder: Any, tmp_path: Path) -> None:
    rec = recorder()
    acked_records(rec, 3)
    recording = rec.finish()
    explore(tmp_path, rec, recording, guest=False)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"no state 'p999-lose-all-0'.*look like"):
        replay(out, "p999-lose-all-0", tmp_path / "x.img")
    with pytest.raises(ConfigError, match="no exploration"):
        replay(tmp_path, "p0-lose-all-0", tmp_path / "x.img")
    with pytest.raises(ConfigError, match="no cell 7"):
        load_doc(out).find_state("7/p0-lose-all-0")
    first = load_doc(out).cells[0].states[0].id
    with open(recording.base, "r+b") as f:  # the base changed since the recording
        f.seek(8192)
        f.write(b"changed")
    with pytest.raises(ConfigError, match="changed since the recording"):
        replay(out, first, tmp_path / "x.img")
    assert main(["explore", "replay", str(out), "--out", "x.img"]) == 1  # no --state


def test_a_log_without_data_cannot_be_explored(recorder: Any, tmp_path: Path) -> None:
    rec = recorder(log_data=False)
    acked_records(rec, 2)
    if not rec.backend.root.closed:
        rec.backend.graph.close()
    from harness.durability.writelog import read_log
    from harness.explore.recording import write_recording

    with pytest.raises(JournalError, match=r"without data.*log-data=on"):
        write_recording(rec.root, mode=CacheMode.WRITEBACK, acks=[])
    # A recording whose log was swapped for one without data is refused when read.
    good = recorder()
    acked_records(good, 2)
    recording = good.finish()
    shutil.copyfile(rec.root / "write.log", recording.log)
    assert read_log(recording.log).records
    with pytest.raises(JournalError, match="without data"):
        explore(tmp_path, good, open_recording(recording.root, verify_base=False), guest=False)


def test_a_budget_of_zero_is_refused_before_anything_runs() -> None:
    with pytest.raises(ConfigError, match="budget must be at least 1"):
        CellExplorer.check_budget(ExploreSpec(), ExploreOptions(max_states=0))
    CellExplorer.check_budget(ExploreSpec(), ExploreOptions(max_states=1))


def test_an_interrupted_exploration_keeps_what_it_checked(recorder: Any, tmp_path: Path) -> None:
    """Ctrl-C while the checker guest boots: the host side stops, explore.json keeps its states."""
    rec = recorder()
    acked_records(rec, 12)
    recording = rec.finish()
    out = tmp_path / "out"
    doc = ExploreDoc(out, "test", interval=0.0)

    class Interrupting(FakeGuest):
        def start(self) -> None:
            deadline = time.monotonic() + 60
            while len(doc.cells[0].states) < 5:
                assert time.monotonic() < deadline, "the host side never got going"
                time.sleep(0.001)
            raise KeyboardInterrupt

    cell = single_cell(AckRecords(records=12), checkers=(ORACLE, "ack-records"))
    explorer = CellExplorer(
        cell,
        ExploreSpec(max_states=300),
        out / "cells" / "000",
        None,
        out=out,
        index=0,
        options=ExploreOptions(guest_factory=Interrupting, full_every=1),
        doc=doc,
    )
    threads = threading.active_count()
    with pytest.raises(KeyboardInterrupt):
        explorer.explore(recorded(rec, recording))
    doc.finish(interrupted=True)
    saved = load_doc(out)
    assert saved.interrupted and not saved.complete and saved.ok is False
    states = saved.cells[0].states
    assert 5 <= len(states) < 300
    assert FakeGuest.instances[0].closed
    assert threading.active_count() == threads  # the host-side thread stopped
    # Its own scratch directories are gone (another run's, on this machine, are not ours).
    assert explorer.scratch_dirs and not any(d.exists() for d in explorer.scratch_dirs)


def test_ext4_host_and_guest_paths_on_real_ext4_traffic(recorder: Any, tmp_path: Path) -> None:
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("needs e2fsprogs")
    base = tmp_path / "ext4.img"
    with open(base, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(base)], check=True)
    rec = recorder(base=base)
    Ext4Traffic(
        rec.backend, rec.root / "base.img", seed=5, barriers=True, on_ack=lambda s: rec.ack(str(s))
    ).run(6)
    _e, doc = explore(
        tmp_path,
        rec,
        rec.finish(),
        guest=False,
        checkers=(ORACLE, "ack-records", "fsck"),
        spec=ExploreSpec(max_states=80, tear_unit=4096),
    )
    cell = doc["cells"][0]
    assert cell["verdict"] == "pass", cell["reason"]
    fsck = [c for s in cell["states"] for c in s["checks"] if c["checker"] == "e2fsck"]
    assert len(fsck) == cell["states_explored"] and all(c["ok"] for c in fsck)


def test_the_report_has_an_exploration_section_and_a_timeline_plot(
    recorder: Any, tmp_path: Path
) -> None:
    rec = recorder()
    acked_records(rec, 4, flush=False)
    _e, doc = explore(tmp_path, rec, rec.finish())
    html = render_explore(tmp_path / "out").read_text()
    assert "<h2>Exploration</h2>" in html and "data:image/png;base64," in html
    first = next(s for s in doc["cells"][0]["states"] if s["contract_broken"])
    assert first["id"] in html and "powercut explore replay" in html
    assert (tmp_path / "out" / "plots" / "explore-timeline.png").stat().st_size > 1000


def test_commands_go_to_the_guest_without_a_shell_when_a_shell_would_just_run_them() -> None:
    assert plain_argv("/usr/local/bin/ackrecords --check --size 4096 /mnt/records") == [
        "/usr/local/bin/ackrecords",
        "--check",
        "--size",
        "4096",
        "/mnt/records",
    ]
    assert plain_argv("prog 'a b'") == ["prog", "a b"]
    for command in ("cd /mnt && ls", "echo x", "ls *", "X=1 prog", "prog $HOME", "a | b", ""):
        assert plain_argv(command) is None, command


def test_mount_options_become_flags_and_filesystem_data() -> None:
    m = mount_request("ext4", "noatime,nobarrier,ro,data=journal")
    assert m["flags"] == 1 | 1024 and m["data"] == "nobarrier,data=journal"
    assert m["type"] == "ext4" and m["device"] == "/dev/vda" and m["dir"] == "/mnt"
    assert mount_request("xfs")["flags"] == 0 and mount_request("xfs")["data"] == ""


FIO_AND_RECORDS = """\
name = "mixed"
[[fault]]
model = "host-power-cut"
[[workload]]
kind = "ack-records"
[[workload]]
kind = "fio-verify"
[cut]
after-seconds = 2
"""


def test_the_command_lists_what_it_explores_and_refuses_bad_input_before_booting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "mixed.toml"
    scenario.write_text(FIO_AND_RECORDS)
    out = str(tmp_path / "out")
    assert main(["explore", str(scenario), "--out", out, "--list"]) == 0
    listed = capsys.readouterr().out
    assert "writeback/explore/ack-records/after-2s/r0" in listed
    assert "fio-verify/after-2s/r0 skipped: the fio-verify workload cannot be explored" in (
        " ".join(listed.split())
    )
    # A budget of zero, a scenario with nothing to explore, an unknown cell: errors, no VM.
    assert main(["explore", str(scenario), "--out", out, "--max-states", "0"]) == 1
    assert "budget must be at least 1 state" in capsys.readouterr().err
    only_fio = tmp_path / "fio.toml"
    only_fio.write_text(FIO_AND_RECORDS.replace('kind = "ack-records"\n[[workload]]\n', ""))
    assert main(["explore", str(only_fio), "--out", out]) == 1
    assert "no cell can be explored" in capsys.readouterr().err
    assert main(["explore", str(scenario), "--out", out, "--cell", "nope/"]) == 1
    assert "matches no cell" in capsys.readouterr().err
    scenario.write_text(FIO_AND_RECORDS + "[explore]\nmax-states = 0\n")
    assert main(["explore", str(scenario), "--out", out]) == 1
    assert "the exploration budget must be at least 1 state" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_exit_status_tells_a_broken_contract_from_a_cell_that_is_an_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def finished(*verdicts: Verdict, interrupted: bool = False) -> ExploreDocument:
        cells = tuple(
            CellRecord(i, f"c{i}", "s", CellStatus.DONE, v) for i, v in enumerate(verdicts)
        )
        ok = not interrupted and all(v is Verdict.PASS for v in verdicts)
        return ExploreDocument("test", "now", interrupted=interrupted, ok=ok, cells=cells)

    assert exit_status(finished(Verdict.PASS, Verdict.PASS)) == 0
    assert exit_status(finished(Verdict.PASS, Verdict.FAIL)) == 1
    assert exit_status(finished(Verdict.PASS, Verdict.ERROR)) == 2
    assert exit_status(finished(Verdict.ERROR, Verdict.FAIL)) == 1  # the finding comes first
    assert exit_status(finished(Verdict.PASS, interrupted=True)) == 130
    with pytest.raises(SystemExit) as done:
        main(["explore", "--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    assert "exit status:" in help_text and "unjudged-states" in help_text
    assert "\n  2    a cell is an error" in help_text


# -- what a user sees while it works, and when it fails -------------------------------------


def test_progress_reports_every_phase_with_its_states_checked_of_planned_and_failing(
    recorder: Any, tmp_path: Path
) -> None:
    rec = recorder()
    acked_records(rec, 4, flush=False)  # fails in the guest: minimized
    seen: list[Progress] = []
    cell = single_cell(AckRecords(records=6), checkers=(ORACLE, "ack-records"))
    out = tmp_path / "out"
    explorer = CellExplorer(
        cell,
        ExploreSpec(max_states=40, minimize=1),
        out / "cells" / "000",
        None,
        out=out,
        index=0,
        options=ExploreOptions(guest_factory=FakeGuest, full_every=1),
        on_progress=seen.append,
    )
    explorer.explore(recorded(rec, rec.finish()))
    final = explorer.snapshot().counts
    phases = [p.phase for p in seen]
    assert [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] is not p] == [
        Phase.HOST,
        Phase.GUEST,
        Phase.MINIMIZE,
        Phase.DONE,
    ]
    host = [p for p in seen if p.phase is Phase.HOST]
    assert host[0].checked == 0 and host[-1].checked == host[-1].planned == final.states_explored
    assert [p.checked for p in host] == sorted(p.checked for p in host)
    guest = [p for p in seen if p.phase is Phase.GUEST]
    assert guest[-1].checked == guest[-1].planned and guest[-1].failing == final.states_failing
    assert any(p.seconds_left is not None for p in host + guest)
    assert seen[-1].failing == final.states_failing > 0 and seen[-1].seconds_left == 0
    assert all(p.cell == "writeback/explore/ack-records/after-exit/r0" for p in seen)
    assert "states" in seen[-1].describe() and "failing" in seen[-1].describe()


class FakeRun(Run):
    """A workload that acknowledges one more record at every look, for `looks` looks."""

    def __init__(self, looks: int) -> None:
        super().__init__(FaultModel.HOST_POWER_CUT)
        self.looks = looks
        self.count = 0
        self.acks = 0

    def alive(self) -> bool:
        self.count += 1
        return self.count < self.looks

    def acked(self) -> int:
        self.acks += 1
        return self.acks


class FakeDisk:
    def requests(self, kind: str) -> int:
        return 7 if kind == "OUT" else 0


def test_a_recording_reports_the_acknowledgements_and_writes_so_far_and_the_time_left(
    tmp_path: Path,
) -> None:
    seen: list[Progress] = []
    image = GuestImage(tmp_path, "fake", *[tmp_path / "x"] * 7, "console=ttyS0", 22, 8765)
    for cut, left in (
        (CutSpec(TriggerKind.AFTER_EXIT), False),
        (CutSpec(TriggerKind.AFTER_SECONDS, 60), True),
    ):
        cell = single_cell(AckRecords(records=6), cut=cut)
        runner = RecordingRunner(cell, tmp_path / "r", image, accel=None, on_progress=seen.append)
        runner.PROGRESS_EVERY = 0.0
        run = FakeRun(looks=5)
        run.started = time.monotonic()
        if cut.kind is TriggerKind.AFTER_SECONDS:
            run.alive = lambda: True  # type: ignore[method-assign]
            run.started -= 59.9  # the cut comes within a few looks
        runner._wait_for_cut(FakeDisk(), run)
        reports = [p for p in seen if p.phase is Phase.RECORD]
        assert reports and reports[-1].writes == 7 and reports[-1].acks >= 1
        assert (reports[-1].seconds_left is not None) is left
        assert "acks" in reports[-1].describe() and "writes recorded" in reports[-1].describe()
        seen.clear()


def test_a_failed_recording_names_the_consoles_and_the_workload_output_it_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fails(self: RecordingRunner) -> Any:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "console.log").write_text("[    1.0] etcd[212]: waiting for peers\n")
        (self.directory / "acks.txt").write_text("ack 1\n")
        (self.directory / "workload.stderr").write_text("etcd: member never came up\n")
        raise GuestError("the workload failed before the end of the recording: exit 1")

    monkeypatch.setattr(RecordingRunner, "record", fails)
    image = GuestImage(tmp_path, "fake", *[tmp_path / "x"] * 7, "console=ttyS0", 22, 8765)
    cell = single_cell(AckRecords(records=6))
    directory = tmp_path / "out" / "cells" / "000"
    result = CellExplorer(
        cell,
        ExploreSpec(),
        directory,
        image,
        out=tmp_path / "out",
        index=0,
        options=ExploreOptions(),
    ).run()
    reason = result.reason
    assert result.record.verdict is Verdict.ERROR and reason.startswith("GuestError: the workload")
    for name in ("console.log", "acks.txt", "workload.stderr"):
        assert str(directory.resolve() / name) in reason
    assert "the recording guest's console" in reason and "its stderr" in reason


def test_the_workload_stderr_is_kept_line_by_line_as_it_arrives(tmp_path: Path) -> None:
    class Talking:
        def run(self, command: str, timeout: float = 60, **kw: Any) -> CommandResult:
            kw["on_stdout"]("1")
            kw["on_stderr"]("etcd: member never came up")
            return CommandResult(command, 3, "1\n", "etcd: member never came up\n")

    stream = GuestStream(
        Talking(),  # type: ignore[arg-type]
        "etcd-workload",
        "w",
        tmp_path / ACKS_FILE,
        stderr_file=tmp_path / STDERR_FILE,
    ).start()
    stream.join(30)
    assert (tmp_path / ACKS_FILE).read_text() == "1\n" and stream.acked == 1
    assert (tmp_path / STDERR_FILE).read_text() == "etcd: member never came up\n"
    assert "exited 3: etcd: member never came up" in (stream.failure() or "")


def _fake_cell_run(self: CellExplorer) -> CellExploration:
    """A cell's run without guests: the progress it would report, then a verdict."""
    cell = self.record.id
    self.on_progress(Progress(cell, Phase.RECORD, acks=3, writes=41, seconds_left=12.0))
    self.on_progress(Progress(cell, Phase.HOST, checked=5, planned=10, failing=1))
    self.record = dataclasses.replace(
        self.record, status=CellStatus.DONE, verdict=Verdict.PASS, reason="fake: passed"
    )
    return CellExploration(self.snapshot(), self.out)


@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
def test_progress_is_drawn_on_a_terminal_and_nothing_but_the_results_elsewhere(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    terminal: bool,
) -> None:
    image = GuestImage(tmp_path, "fake", *[tmp_path / "x"] * 7, "console=ttyS0", 22, 8765)
    monkeypatch.setattr(CellImages, "prepare", lambda self, cells, on_build=None: None)
    monkeypatch.setattr(CellImages, "__call__", lambda self, cell: image)
    monkeypatch.setattr(explore_command, "choose_accel", lambda *a: "tcg")
    monkeypatch.setattr(CellExplorer, "run", _fake_cell_run)
    screen = io.StringIO()
    if terminal:
        monkeypatch.setattr(
            explore_command,
            "make_console",
            lambda: Console(file=screen, force_terminal=True, width=200),
        )
    scenario = tmp_path / "records.toml"
    scenario.write_text(FIO_AND_RECORDS.replace('[[workload]]\nkind = "fio-verify"\n', ""))
    assert main(["explore", str(scenario), "--out", str(tmp_path / "out")]) == 0
    shown = screen.getvalue() if terminal else capsys.readouterr().out
    assert "PASS" in shown and "fake: passed" in shown and "states explored" in shown
    progress = ("3 acks, 41 writes recorded", "12 s left", "5/10 states")
    if terminal:
        assert all(p in shown for p in progress), shown
    else:
        assert not any(p in shown for p in progress), shown
        assert "\x1b" not in shown  # no cursor movement or colour either
    # Off a terminal nothing is even drawn (rich would hide it; the command never starts it).
    with explore_command.progress_display(Console(file=io.StringIO())) as bar:
        assert bar is None
    with explore_command.progress_display(Console(file=screen, force_terminal=True)) as bar:
        assert bar is not None


def test_a_failing_pytest_exploration_attaches_what_the_guests_and_the_workload_said(
    tmp_path: Path,
) -> None:
    image = GuestImage(tmp_path, "fake", *[tmp_path / "x"] * 7, "console=ttyS0", 22, 8765)
    helper = PowerCutHelper(image, None, tmp_path)
    out = tmp_path / "explore0"
    cell = out / "cells" / "000"
    (cell / "checker").mkdir(parents=True)
    for name in ("console.log", "workload.stderr", "checker/check-errors.log"):
        (cell / name).write_text("said\n")
    helper.explorations.append(CellExploration(CellRecord.skipped(0, "c", "s", "r"), out))
    attached = helper.all_logs()
    assert attached["explore0 its stderr"] == cell / "workload.stderr"
    assert attached["explore0 the checks that could not run"] == cell / "checker/check-errors.log"
    assert "explore0 the recording guest's console" in attached
    assert "explore0 the workload's stdout" not in attached  # never written: not attached
