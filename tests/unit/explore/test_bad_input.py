"""Bad input gets a clear error: no data in the log, a changed base, unknown state ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harness.durability.contract import CacheMode, Promise
from harness.errors import ConfigError, JournalError
from harness.explore.recording import (
    Ack,
    acks_from_times,
    fingerprint,
    open_recording,
    sparse_copy,
    write_recording,
)
from harness.explore.states import Bounds, State, Timeline, enumerate_states, find_state

from .conftest import pattern
from .test_states import workload


def test_a_log_without_data_is_refused_with_what_to_do(recorder: Any) -> None:
    rec = recorder(log_data=False)
    rec.write(0, pattern(1))
    with pytest.raises(JournalError, match=r"without data.*log-data=on"):
        rec.finish()


def test_a_base_image_changed_since_the_recording_is_refused(recorder: Any) -> None:
    rec = recorder()
    workload(rec)
    recording = rec.finish()
    open_recording(recording.root)  # fine as recorded
    with open(recording.base, "r+b") as f:
        f.seek(4096)
        f.write(b"x")
    with pytest.raises(ConfigError, match="changed since the recording"):
        open_recording(recording.root)


def test_a_missing_recording_or_base_is_a_clear_error(recorder: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a recording"):
        open_recording(tmp_path)
    rec = recorder()
    workload(rec)
    recording = rec.finish()
    recording.base.unlink()
    with pytest.raises(ConfigError, match="missing"):
        open_recording(recording.root)


def test_an_unknown_state_id_is_a_clear_error(recorder: Any) -> None:
    rec = recorder()
    workload(rec)
    tl = Timeline(rec.finish().read_log(), Promise.FLUSHED)
    states = list(enumerate_states(tl, Bounds()))
    assert find_state(states, states[3].id) == states[3]
    with pytest.raises(ConfigError, match=r"no state .p99-lose-all-0.*look like"):
        find_state(states, "p99-lose-all-0")


def test_a_state_from_another_recording_is_refused(recorder: Any) -> None:
    rec = recorder()
    workload(rec)
    tl = Timeline(rec.finish().read_log(), Promise.FLUSHED)
    raw = next(s for s in enumerate_states(tl, Bounds()) if s.lost).to_json()
    raw["lost"] = [9999]
    with pytest.raises(ConfigError, match="not pending"):
        State.from_json(raw, tl)
    raw["point"]["number"] = 999
    with pytest.raises(ConfigError, match="no persistence point 999"):
        State.from_json(raw, tl)


def test_an_ack_outside_the_log_is_refused(recorder: Any) -> None:
    rec = recorder()
    workload(rec)
    rec.finish()
    with pytest.raises(ConfigError, match="outside the log"):
        write_recording(rec.root, mode=CacheMode.WRITEBACK, acks=[Ack("x", 10**6)])


def test_acks_by_time_land_after_every_record_stamped_before(recorder: Any) -> None:
    rec = recorder()
    workload(rec)
    wlog = rec.finish().read_log()
    first_flush = next(r for r in wlog.requests if r.op.label == "flush")
    assert first_flush.complete_ns is not None
    (ack,) = acks_from_times(wlog, [("t", first_flush.complete_ns)])
    assert ack.index == first_flush.complete_index + 1
    (early,) = acks_from_times(wlog, [("t", 0)])
    assert early.index == 0


def test_fingerprints_see_content_not_holes(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with open(a, "wb") as f:
        f.truncate(8 << 20)
        f.seek(3 << 20)
        f.write(b"data")
    sparse_copy(a, b)
    assert a.read_bytes() == b.read_bytes()
    assert fingerprint(a) == fingerprint(b)
    with open(b, "r+b") as f:
        f.seek(5 << 20)
        f.write(b"\0\0")  # zeroes written over a hole: the same content
    assert fingerprint(a) == fingerprint(b)
    with open(b, "r+b") as f:
        f.seek(7 << 20)
        f.write(b"!")
    assert fingerprint(a) != fingerprint(b)


def test_recording_json_round_trips(recorder: Any) -> None:
    rec = recorder()
    workload(rec)
    recording = rec.finish(scenario="s")
    again = open_recording(recording.root)
    assert again == recording
    raw = json.loads((recording.root / "recording.json").read_text())
    assert raw["acks"] == [{"token": "a1", "index": recording.acks[0].index}, raw["acks"][1]]
