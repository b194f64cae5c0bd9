"""States as base + differing sectors: replay, the scratch image, deltas, reads."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from harness.durability.contract import Promise
from harness.durability.delta import read_delta, write_delta
from harness.explore.overlay import Scratch, StateBuilder
from harness.explore.states import Bounds, State, Timeline, enumerate_states

from .conftest import pattern
from .test_states import workload

KiB = 1024


def _expected(recording: Any, tl: Timeline, state: Any) -> bytes:
    """The state's image the slow, obvious way: base, then kept writes in submit order."""
    img = bytearray(recording.base.read_bytes())
    wlog = tl.wlog
    lost = set(state.lost)
    torn = {seq: set(s) for seq, s in state.torn}
    ss = tl.sector_size
    for r in wlog.requests:
        if r.op.label == "flush" or r.submit_index >= state.point.at or r.seq in lost:
            continue
        w = tl.by_seq[r.seq]
        data = wlog.data(r) if r.op.label == "write" else bytes(r.length)
        for i in range(r.length // ss):
            s = r.offset // ss + i
            if w.durable_at > state.point.at and s in torn.get(r.seq, ()):
                continue
            img[s * ss : (s + 1) * ss] = data[i * ss : (i + 1) * ss]
    return bytes(img)


def test_replay_and_the_scratch_image_hold_each_state_byte_for_byte(
    recorder: Any, tmp_path: Path
) -> None:
    rec = recorder()
    workload(rec)
    rec.backend.write_zeroes(28 * KiB, 4 * KiB)
    rec.backend.discard(8 * KiB, 4 * KiB)
    rec.write(100 * KiB, pattern(20, 4 * KiB))
    recording = rec.finish()
    tl = Timeline(recording.read_log(), Promise.FLUSHED, recording.acks)
    states = list(enumerate_states(tl, Bounds(max_states=10_000, per_point=16)))
    order = states + random.Random(1).sample(states, len(states))  # also backwards in time
    with (
        StateBuilder(tl, recording.log, recording.base) as builder,
        Scratch(
            StateBuilder(tl, recording.log, recording.base), tmp_path / "scratch.img"
        ) as scratch,
    ):
        for state in order:
            want = _expected(recording, tl, state)
            scratch.materialize(state)
            assert scratch.path.read_bytes() == want, state.id
            assert builder.replay(state, tmp_path / "r.img").read_bytes() == want, state.id
            view = builder.view(state)
            assert view.read(3 * KiB, 70 * KiB) == want[3 * KiB : 73 * KiB]
        # The scratch wrote only what differed: far less than a copy per state.
        assert scratch.sectors_written < len(order) * (recording.image_size // 512) // 20


def test_a_delta_file_rebuilds_the_state_over_the_base(recorder: Any, tmp_path: Path) -> None:
    rec = recorder()
    workload(rec)
    recording = rec.finish()
    tl = Timeline(recording.read_log(), Promise.FLUSHED, recording.acks)
    base = recording.base.read_bytes()
    with StateBuilder(tl, recording.log, recording.base) as builder:
        for state in enumerate_states(tl, Bounds(per_point=4)):
            n = builder.delta(state, tmp_path / "s.delta")
            delta = read_delta(tmp_path / "s.delta")
            assert delta.sectors == n
            img = bytearray(base)
            delta.patch(0, memoryview(img))
            assert bytes(img) == _expected(recording, tl, state)


def test_a_delta_patches_any_window(tmp_path: Path) -> None:
    sectors = [(2, b"a" * 512), (3, b"b" * 512), (9, b"c" * 512)]
    write_delta(tmp_path / "d", 512, 8192, sectors)
    delta = read_delta(tmp_path / "d")
    assert [(f, c) for f, c, _d in delta.runs] == [(2, 2), (9, 1)]
    buf = bytearray(1000)
    delta.patch(1500, memoryview(buf))  # bytes 1500..2500: the end of sector 2, sector 3, 4
    assert buf[:36] == b"a" * 36 and buf[36:548] == b"b" * 512 and buf[548:] == bytes(452)


def test_replay_rebuilds_a_recorded_state_from_its_json(recorder: Any, tmp_path: Path) -> None:
    from harness.explore.overlay import replay_state
    from harness.explore.recording import open_recording

    rec = recorder()
    workload(rec)
    recording = rec.finish()
    tl = Timeline(recording.read_log(), Promise.FLUSHED, recording.acks)
    state = next(s for s in enumerate_states(tl, Bounds()) if s.torn)
    read_back = State.from_json(state.to_json())  # as explore.json holds it
    out = replay_state(
        open_recording(recording.root), Promise.FLUSHED, read_back, tmp_path / "s.img"
    )
    assert out.read_bytes() == _expected(recording, tl, state)
