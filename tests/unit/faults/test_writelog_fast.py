"""The write log's per-write fast paths give exactly what the slow, general ones give."""

from __future__ import annotations

import os
import random
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.durability import writelog
from harness.durability.writelog import (
    aligned_sector_crcs,
    crc_bytes,
    read_log,
    sector_crcs,
    span_crc,
)

from .conftest import crash
from .stack import Paths, open_stack


@settings(deadline=None, derandomize=True)
@given(
    data=st.binary(min_size=0, max_size=64 * 512),
    sector_size=st.sampled_from([512, 1024, 4096]),
)
def test_span_crc_from_sector_crcs_is_the_crc_of_the_whole_span(
    data: bytes, sector_size: int
) -> None:
    data = data[: len(data) - len(data) % sector_size]
    crcs = sector_crcs(data, 0, sector_size)
    expected = zlib.crc32(data) if crcs else 0
    assert span_crc(crcs, sector_size) == expected


def test_span_crc_of_many_sectors_of_every_size_is_the_crc_of_the_span_from_fresh_tables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Generated examples are mostly shorter than two sectors; these combine up to 64. The
    # shift tables are built here, not taken from what an earlier test left in the memo.
    monkeypatch.setattr(writelog, "_shift_tables", {})
    data = random.Random(7).randbytes(64 * 4096)
    for sector_size in (512, 1024, 4096):
        for count in (2, 3, 64):
            span = data[: count * sector_size]
            crcs = sector_crcs(span, 0, sector_size)
            assert span_crc(crcs, sector_size) == zlib.crc32(span), (sector_size, count)


@settings(deadline=None, derandomize=True)
@given(data=st.binary(min_size=0, max_size=300 * 512))
def test_aligned_sector_crcs_pack_what_sector_crcs_computes(data: bytes) -> None:
    data = data[: len(data) - len(data) % 512]
    assert aligned_sector_crcs(memoryview(data), 512) == crc_bytes(sector_crcs(data, 0, 512))


def test_logged_writes_carry_a_span_crc_the_oracle_can_compare(paths: Paths) -> None:
    be = open_stack(paths)
    blocks = [os.urandom(4096), os.urandom(3 * 512)]
    be.write(0, blocks[0])
    be.write(8192 + 100, blocks[1])  # unaligned: the sectors fully inside count
    crash(be)
    first, second = read_log(paths.log).requests
    assert first.span_crc == zlib.crc32(blocks[0])
    whole = paths.image.read_bytes()[8192 + 512 : 8192 + 3 * 512]
    assert second.span_crc == zlib.crc32(whole)
    assert second.crcs is not None and len(second.crcs) == 2


@settings(deadline=None, derandomize=True, max_examples=200)
@given(
    data=st.binary(min_size=0, max_size=9 * 512),
    offset=st.integers(0, 3 * 4096),
    sector_size=st.sampled_from([512, 4096]),
)
def test_sector_crcs_are_those_of_the_whole_sectors_inside_the_buffer(
    data: bytes, offset: int, sector_size: int
) -> None:
    first = -(-offset // sector_size) * sector_size  # the first sector boundary at or after
    whole = [
        zlib.crc32(data[at - offset : at - offset + sector_size])
        for at in range(first, offset + len(data) - sector_size + 1, sector_size)
    ]
    assert list(sector_crcs(data, offset, sector_size)) == whole


@settings(deadline=None, derandomize=True, max_examples=50)
@given(count=st.integers(0, 300), sector_size=st.sampled_from([512, 1024, 4096]))
def test_aligned_sector_crcs_of_sizes_not_seen_before(count: int, sector_size: int) -> None:
    import harness.durability.writelog as writelog

    data = os.urandom(count * sector_size)
    saved = dict(writelog._sector_packers)
    writelog._sector_packers.clear()  # the packers are cached per size: make this one anew
    try:
        got = aligned_sector_crcs(data, sector_size)
    finally:
        writelog._sector_packers.update(saved)
    want = [zlib.crc32(data[i : i + sector_size]) for i in range(0, len(data), sector_size)]
    assert got == struct.pack(f"<{count}I", *want)


@settings(deadline=None, derandomize=True, max_examples=300)
@given(
    # Lengths and offsets drawn as numbers: drawn as bytes, a buffer is rarely a sector long.
    length=st.integers(min_value=0, max_value=10 * 512),
    offset=st.integers(min_value=0, max_value=9 * 512),
    sector_size=st.sampled_from([512, 1024, 4096]),
)
def test_sector_crcs_cover_exactly_the_whole_sectors_a_buffer_holds(
    length: int, offset: int, sector_size: int
) -> None:
    # Written out independently: device sector s is whole in the buffer when the buffer
    # holds all of its bytes; an unaligned head or tail holds part of one, which is no CRC.
    data = random.Random(length * 7919 + offset).randbytes(length)
    ss = sector_size
    expected = [
        zlib.crc32(data[s * ss - offset : (s + 1) * ss - offset])
        for s in range(offset // ss, (offset + len(data)) // ss + 1)
        if s * ss >= offset and (s + 1) * ss <= offset + len(data)
    ]
    assert sector_crcs(data, offset, ss).tolist() == expected
