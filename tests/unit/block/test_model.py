"""Property: any sequence of requests, in any cache mode, reads back like a plain byte array.

This is the "loses nothing" check for every code path at once: misaligned
O_DIRECT requests through bounce buffers, write-zeroes with and without
unmap, discards (which punch holes, so read as zeroes), FUA writes, flushes
and write-cache toggles in between.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.block import open_backend

SIZE = 64 << 10

_range = st.integers(0, SIZE - 1).flatmap(
    lambda off: st.tuples(st.just(off), st.integers(1, min(SIZE - off, 9000)))
)
_op = st.one_of(
    st.tuples(st.just("write"), _range, st.integers(1, 255), st.booleans()),
    st.tuples(st.just("zeroes"), _range, st.booleans()),
    st.tuples(st.just("discard"), _range),
    st.tuples(st.just("flush")),
    st.tuples(st.just("write-cache"), st.booleans()),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(["writeback", "none", "writethrough", "directsync", "unsafe"]),
    ops=st.lists(_op, max_size=25),
)
def test_any_request_sequence_reads_back_like_a_byte_array(mode: str, ops: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.img"
        initial = os.urandom(SIZE)
        path.write_bytes(initial)
        model = bytearray(initial)
        with open_backend(str(path), cache=mode) as backend:
            for op in ops:
                kind = op[0]
                if kind == "write":
                    (off, length), byte, fua = op[1], op[2], op[3]
                    backend.write(off, bytes([byte]) * length, fua=fua)
                    model[off : off + length] = bytes([byte]) * length
                elif kind == "zeroes":
                    (off, length), unmap = op[1], op[2]
                    backend.write_zeroes(off, length, may_unmap=unmap)
                    model[off : off + length] = bytes(length)
                elif kind == "discard":
                    off, length = op[1]
                    backend.discard(off, length)
                    model[off : off + length] = bytes(length)
                elif kind == "flush":
                    backend.flush()
                else:
                    backend.set_write_cache(op[1])
            assert backend.read(0, SIZE) == bytes(model)
            assert backend.length == SIZE
        assert path.read_bytes() == bytes(model)
