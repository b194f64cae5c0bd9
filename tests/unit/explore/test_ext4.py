"""Host-side checks on a real ext4 filesystem: e2fsck with journal recovery, ddmin, attribution.

The traffic is real ext4 (debugfs operations, journalled as jbd2 orders its
writes) through the fault stack; no VM and no kernel mount.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness.durability.contract import Promise
from harness.explore.attribute import attribute_extents, loss_report
from harness.explore.doc import StateVerdict
from harness.explore.hostcheck import Ext4Checker, HostChecker, explore_host
from harness.explore.minimize import minimize_state
from harness.explore.overlay import StateBuilder
from harness.explore.states import Bounds, PointKind, Timeline, enumerate_states
from harness.testing.ext4traffic import Ext4Traffic

pytestmark = pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs")

SIZE = 16 << 20


@pytest.fixture
def ext4_base(tmp_path: Path) -> Path:
    img = tmp_path / "ext4.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    return img


def _record(recorder: Any, base: Path, *, barriers: bool, steps: int = 8) -> Any:
    rec = recorder(base=base)
    traffic = Ext4Traffic(
        rec.backend,
        rec.root / "base.img",
        seed=5,
        barriers=barriers,
        on_ack=lambda s: rec.ack(str(s)),
    )
    traffic.run(steps)
    return rec.finish()


def _explore(recording: Any, tmp_path: Path, bounds: Bounds) -> Any:
    tl = Timeline(recording.read_log(), Promise.FLUSHED, recording.acks)
    with HostChecker(
        tl, recording.log, recording.base, Promise.FLUSHED, fsck=Ext4Checker(tmp_path)
    ) as hc:
        return tl, explore_host([hc], list(enumerate_states(tl, bounds)))


def test_ext4_with_barriers_recovers_every_whole_sector_state(
    recorder: Any, ext4_base: Path, tmp_path: Path
) -> None:
    recording = _record(recorder, ext4_base, barriers=True)
    bounds = Bounds(max_states=150, per_point=6, policies=_whole_writes())
    _tl, result = _explore(recording, tmp_path, bounds)
    assert result.explored > 50
    assert not result.failing, [(r.state.id, r.findings) for r in result.failing[:3]]
    assert any("recovered the journal" in r.findings[0].detail for r in result.results)
    assert result.unique < result.explored  # identical images were checked once
    assert sum(1 for r in result.results if r.duplicate_of) == result.explored - result.unique


def _whole_writes() -> Any:
    from harness.durability.contract import CutPolicy

    return (CutPolicy.LOSE_ALL, CutPolicy.KEEP_ALL, CutPolicy.PREFIX, CutPolicy.RANDOM)


def test_e2fsck_leaves_the_scratch_image_as_the_state(
    recorder: Any, ext4_base: Path, tmp_path: Path
) -> None:
    recording = _record(recorder, ext4_base, barriers=True, steps=3)
    tl = Timeline(recording.read_log(), Promise.FLUSHED, recording.acks)
    states = list(enumerate_states(tl, Bounds(max_states=20)))
    with (
        HostChecker(
            tl, recording.log, recording.base, Promise.FLUSHED, fsck=Ext4Checker(tmp_path)
        ) as hc,
        StateBuilder(tl, recording.log, recording.base) as builder,
    ):
        for state in states:
            result = hc.check(state)
            replayed = builder.replay(state, tmp_path / "r.img").read_bytes()
            assert hc.scratch.path.read_bytes() == replayed, result.findings


def test_nobarrier_ext4_fails_within_the_first_hundred_states_and_shrinks(
    recorder: Any, ext4_base: Path, tmp_path: Path
) -> None:
    recording = _record(recorder, ext4_base, barriers=False)
    bounds = Bounds(max_states=100, per_point=8, policies=_whole_writes(), seed=1)
    tl, result = _explore(recording, tmp_path, bounds)
    failing = [r for r in result.failing if r.verdict is StateVerdict.FAIL]
    assert failing, "ext4 without barriers under writeback must lose consistency somewhere"
    assert all(PointKind.FLUSH not in r.state.point.kinds for r in failing)
    worst = failing[0]

    with HostChecker(
        tl, recording.log, recording.base, Promise.FLUSHED, fsck=Ext4Checker(tmp_path)
    ) as hc:
        minimized = minimize_state(worst.state, lambda s: hc.check(s).failed, max_checks=60)
        assert hc.check(minimized.state).failed
    lost = minimized.state.lost + tuple(seq for seq, _s in minimized.state.torn)
    assert 0 < len(lost) <= len(worst.state.lost) + len(worst.state.torn)
    assert minimized.checks > 0

    extents = [(tl.by_seq[seq].offset, tl.by_seq[seq].length) for seq in lost]
    roles = attribute_extents(recording.base, extents)
    assert len(roles) == len(extents) and all(roles)
    assert all(r.describe() for blocks in roles for r in blocks)
    report = loss_report(tl, minimized.state, recording.base)
    assert [w.seq for w in report] == list(lost)
    assert all(w.holds and {"flush_epoch", "submit_index"} <= w.to_json().keys() for w in report)


def test_attribution_names_metadata_files_directories_and_the_journal(ext4_base: Path) -> None:
    root = ext4_base.parent
    data = root / "data.bin"
    data.write_bytes(b"x" * 5000)
    subprocess.run(
        ["debugfs", "-w", "-f", "-", str(ext4_base)],
        input=f"mkdir dir\nwrite {data} dir/file\n",
        text=True,
        check=True,
        capture_output=True,
    )
    out = subprocess.run(
        ["debugfs", "-R", "blocks dir/file", str(ext4_base)], capture_output=True, text=True
    ).stdout.split()
    dir_blocks = subprocess.run(
        ["debugfs", "-R", "blocks dir", str(ext4_base)], capture_output=True, text=True
    ).stdout.split()
    journal = subprocess.run(
        ["debugfs", "-R", "blocks <8>", str(ext4_base)], capture_output=True, text=True
    ).stdout.split()
    bs = 1024
    extents = [
        (1024, 1024),  # the superblock (1 KiB blocks: block 1)
        (int(out[0]) * bs, bs),
        (int(dir_blocks[0]) * bs, bs),
        (int(journal[3]) * bs, 2 * bs),
    ]
    roles = attribute_extents(ext4_base, extents)
    assert roles[0][0].kind == "superblock"
    assert roles[1][0].kind == "file" and roles[1][0].path == "/dir/file"
    assert roles[2][0].kind == "directory" and roles[2][0].path == "/dir"
    assert roles[1][0].describe() == "data of /dir/file"
    assert [r.kind for r in roles[3]] == ["journal", "journal"]


def test_attribution_of_a_non_ext4_image_is_empty(tmp_path: Path) -> None:
    img = tmp_path / "raw.img"
    img.write_bytes(bytes(1 << 20))
    assert attribute_extents(img, [(0, 4096)]) == [[]]
