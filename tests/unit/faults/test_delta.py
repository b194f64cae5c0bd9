"""The state delta format: what a checker guest is shown, read back exactly or refused.

A delta is written moments before the `crash-state` driver reads it, so a
reader that accepted a damaged one would show the guest a state nobody
enumerated, and the guest's verdict would be about that. Every kind of damage
the header, the runs table and the data can have is refused here; and any read
through `Delta.patch` shows exactly the base with the delta's sectors over it.
"""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.durability.delta import (
    DELTA_HEADER,
    DELTA_MAGIC,
    DELTA_RUN,
    read_delta,
    write_delta,
)
from harness.errors import JournalError

SS = 512
SECTORS = 64


def _delta(tmp_path: Path, sectors: list[int], seed: int = 0) -> tuple[Path, dict[int, bytes]]:
    rng = random.Random(seed)
    content = {s: rng.randbytes(SS) for s in sorted(set(sectors))}
    path = tmp_path / "d.delta"
    assert write_delta(path, SS, SECTORS * SS, sorted(content.items())) == len(content)
    return path, content


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    sectors=st.lists(st.integers(0, SECTORS - 1), max_size=20),
    reads=st.lists(st.tuples(st.integers(0, SECTORS * SS - 1), st.integers(1, 9 * SS)), max_size=8),
)
def test_any_read_through_a_delta_is_the_base_with_its_sectors_over_it(
    tmp_path_factory: pytest.TempPathFactory, sectors: list[int], reads: list[tuple[int, int]]
) -> None:
    path, content = _delta(tmp_path_factory.mktemp("d"), sectors)
    base = bytes(range(256)) * (SECTORS * SS // 256)
    want = bytearray(base)
    for s, data in content.items():
        want[s * SS : (s + 1) * SS] = data
    delta = read_delta(path)
    assert dict(delta.iter_sectors()) == content and delta.sectors == len(content)
    assert delta.image_size == SECTORS * SS and delta.sector_size == SS
    for offset, length in [*reads, (0, SECTORS * SS)]:
        length = min(length, SECTORS * SS - offset)
        buf = bytearray(base[offset : offset + length])
        delta.patch(offset, memoryview(buf))
        assert bytes(buf) == bytes(want[offset : offset + length]), (offset, length)


def _damaged(path: Path, at: int, data: bytes) -> Path:
    raw = bytearray(path.read_bytes())
    raw[at : at + len(data)] = data
    out = path.with_name("bad.delta")
    out.write_bytes(bytes(raw))
    return out


def _with_table(path: Path, runs: list[tuple[int, int]], data_sectors: int) -> Path:
    """A delta with this runs table (its CRC right) and this many sectors of data."""
    table = b"".join(DELTA_RUN.pack(first, count) for first, count in runs)
    header = DELTA_HEADER.pack(
        DELTA_MAGIC, 1, DELTA_HEADER.size, SS, SECTORS * SS, len(runs), zlib.crc32(table), 0
    )
    out = path.with_name("made.delta")
    out.write_bytes(header + table + bytes(data_sectors * SS))
    return out


def test_damage_anywhere_is_refused(tmp_path: Path) -> None:
    path, _content = _delta(tmp_path, [3, 4, 10])
    read_delta(path)
    version_at, hsize_at = 8, 10
    table_at = DELTA_HEADER.size
    cases = {
        "too short": path.read_bytes()[: DELTA_HEADER.size - 1],
        "not a powercut state delta": _damaged(path, 0, b"PCDELTB\0").read_bytes(),
        "not a powercut state delta (magic": _damaged(
            path, hsize_at, struct.pack("<H", 48)
        ).read_bytes(),
        "has version 2": _damaged(path, version_at, struct.pack("<H", 2)).read_bytes(),
        "runs table damaged": _damaged(path, table_at, b"\x07").read_bytes(),
    }
    for words, raw in cases.items():
        bad = tmp_path / "x.delta"
        bad.write_bytes(raw)
        with pytest.raises(JournalError, match=words.replace("(", r"\(")):
            read_delta(bad)
    # A table that is whole but says more runs than the file holds.
    short_table = path.read_bytes()[: DELTA_HEADER.size + DELTA_RUN.size]
    (tmp_path / "y.delta").write_bytes(short_table)
    with pytest.raises(JournalError, match="runs table damaged"):
        read_delta(tmp_path / "y.delta")
    with pytest.raises(JournalError, match="does not exist"):
        read_delta(tmp_path / "missing.delta")


@pytest.mark.parametrize(
    ("runs", "data", "words"),
    [
        ([(4, 2), (5, 1)], 3, "run 1 is out of order"),  # overlaps the run before
        ([(6, 1), (2, 1)], 2, "run 1 is out of order"),
        ([(SECTORS - 1, 2)], 2, "run 0 is out of order or beyond the image"),
        ([(SECTORS, 1)], 1, "run 0 is out of order or beyond the image"),
        ([(1, 2), (8, 2)], 3, "data of run 1 is truncated"),
    ],
)
def test_a_runs_table_that_cannot_be_true_is_refused(
    tmp_path: Path, runs: list[tuple[int, int]], data: int, words: str
) -> None:
    with pytest.raises(JournalError, match=words):
        read_delta(_with_table(tmp_path / "t", runs, data))


def test_runs_may_touch_and_may_end_at_the_last_sector(tmp_path: Path) -> None:
    delta = read_delta(_with_table(tmp_path / "t", [(0, 1), (1, 2), (SECTORS - 1, 1)], 4))
    assert [(first, count) for first, count, _d in delta.runs] == [(0, 1), (1, 2), (63, 1)]
