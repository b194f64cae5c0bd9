"""Seeded fuzzing of the NBD server with malformed negotiation and transmission messages.

Each input either gets an NBD error (an option error reply, a request error
value) or costs the client its connection; the server keeps serving the next
client; and the image never changes outside the ranges the fuzzer's own
modifying requests named, nor grows (a canary image, compared byte for
byte). Seeded, so a failure names the seed and the step that reproduce it.
"""

from __future__ import annotations

import logging
import random
import socket
import struct

import pytest

from harness.nbd.client import NbdClient
from harness.nbd.export import MAX_PAYLOAD
from harness.nbd.protocol import (
    IHAVEOPT,
    NBD_OPT_REPLY_MAGIC,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NbdCmd,
    NbdOpt,
    NbdOptionHeader,
    NbdOptionReplyHeader,
    NbdRep,
    NbdRequest,
    NbdSimpleReply,
    NbdU16,
    NbdU32,
)

from .conftest import IMAGE_SIZE, Served, canary

SEEDS = [1, 2, 3, 4, 5, 6, 7, 8]
NBD_ERRORS = {0, 1, 5, 12, 22, 28, 75, 95, 108}
MODIFYING = {NbdCmd.WRITE, NbdCmd.TRIM, NbdCmd.WRITE_ZEROES}


class Dropped(Exception):
    """The server closed this connection (allowed for some inputs)."""


def _recv(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        try:
            chunk = sock.recv(n - len(out))
        except (ConnectionError, TimeoutError) as exc:
            raise Dropped(str(exc)) from exc
        if not chunk:
            raise Dropped(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def _connected_client(s: Served) -> NbdClient:
    c = NbdClient(s.socket, timeout=10)
    c.handshake("disk")
    return c


def _pick_offset(rng: random.Random) -> int:
    return rng.choice(
        [
            rng.randrange(0, IMAGE_SIZE, 512),
            rng.randrange(0, IMAGE_SIZE),
            IMAGE_SIZE - rng.randrange(0, 4096),
            IMAGE_SIZE,
            IMAGE_SIZE + rng.randrange(1, 1 << 20),
            (1 << 63) + rng.randrange(0, 1 << 20),
            (1 << 64) - rng.randrange(1, 4096),
        ]
    )


def _pick_length(rng: random.Random) -> int:
    return rng.choice(
        [0, 1, 512, rng.randrange(1, 65536), 1 << 20, MAX_PAYLOAD, MAX_PAYLOAD + 1, (1 << 32) - 1]
    )


def _pick_flags(rng: random.Random) -> int:
    return rng.choice([0, 1, 2, 1 << 4, rng.randrange(0, 1 << 16), 1 << rng.randrange(16)])


def _fuzz_request(
    s: Served, c: NbdClient, rng: random.Random, touched: list[tuple[int, int]]
) -> bool:
    """One fuzzed request on `c`; False when the connection is gone (and that was allowed)."""
    cmd = rng.choice([*range(10), rng.randrange(1 << 16)])
    if cmd == NbdCmd.DISC:
        cmd = NbdCmd.READ
    flags, offset, length = _pick_flags(rng), _pick_offset(rng), _pick_length(rng)
    if cmd == NbdCmd.READ and length > 1 << 20 and offset + length <= IMAGE_SIZE:
        length = 1 << 20  # a valid big read is just slow; the invalid ones stay invalid
    mode = rng.choice(["ok"] * 6 + ["bad magic", "truncated", "garbage"])
    if cmd in MODIFYING and length <= MAX_PAYLOAD:
        start, end = min(offset, IMAGE_SIZE), min(offset + length, IMAGE_SIZE)
        if start < end:
            touched.append((start, end))
    if mode == "bad magic":
        c.send(NbdRequest.pack(NBD_REQUEST_MAGIC ^ (1 << rng.randrange(32)), 0, 0, 1, 0, 512))
        return _expect_drop(c)
    if mode == "truncated":
        raw = NbdRequest.pack(NBD_REQUEST_MAGIC, flags, cmd & 0xFFFF, 7, offset, length)
        c.send(raw[: rng.randrange(1, len(raw))])
        c.close()
        return False
    if mode == "garbage":
        c.send(rng.randbytes(rng.randrange(1, 200)))
        c.close()  # whatever it made of it, this connection is done
        return False
    handle = rng.randrange(1 << 64)
    c.send(NbdRequest.pack(NBD_REQUEST_MAGIC, flags, cmd & 0xFFFF, handle, offset, length))
    if cmd == NbdCmd.WRITE:
        if length > MAX_PAYLOAD:
            return _expect_drop(c)  # the payload would have to be read to stay in step
        c.send(rng.randbytes(length))
    magic, error, got = NbdSimpleReply.unpack(_recv(c.sock, NbdSimpleReply.size))
    assert magic == NBD_SIMPLE_REPLY_MAGIC
    assert got == handle
    assert error in NBD_ERRORS, error
    if cmd == NbdCmd.READ and not error:
        _recv(c.sock, length)
    if error == 0:
        # Anything the server accepted must have been valid.
        assert cmd in (NbdCmd.READ, NbdCmd.WRITE, NbdCmd.FLUSH, NbdCmd.TRIM, NbdCmd.WRITE_ZEROES)
        assert offset + length <= IMAGE_SIZE or cmd == NbdCmd.FLUSH
    return True


def _expect_drop(c: NbdClient) -> bool:
    assert c.closed_by_server(timeout=10), "the server kept a connection it could not follow"
    c.close()
    return False


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzzed_requests_get_errors_or_drop_the_client_and_touch_only_their_ranges(
    served: Served, seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="harness.nbd")
    rng = random.Random(seed)
    touched: list[tuple[int, int]] = []
    c = _connected_client(served)
    try:
        for step in range(150):
            try:
                alive = _fuzz_request(served, c, rng, touched)
            except (AssertionError, Dropped) as exc:
                raise AssertionError(f"seed {seed} step {step}: {exc}") from exc
            if not alive:
                c = _connected_client(served)  # ... and the server serves the next client
    finally:
        c.close()
    _check_image(served, touched, seed)
    _no_internal_errors(caplog)


def _check_image(s: Served, touched: list[tuple[int, int]], seed: int) -> None:
    with _connected_client(s) as c:  # still serving, and in step
        c.flush()
    data = s.image_bytes()
    assert len(data) == IMAGE_SIZE, f"seed {seed}: the image changed size"
    mask = bytearray(IMAGE_SIZE)
    for start, end in touched:
        mask[start:end] = b"\x01" * (end - start)
    want = canary()
    bad = [
        i
        for i in range(0, IMAGE_SIZE, 512)
        if not any(mask[i : i + 512]) and data[i : i + 512] != want[i : i + 512]
    ]
    assert not bad, f"seed {seed}: sectors changed outside any request's range: {bad[:5]}"


def _no_internal_errors(caplog: pytest.LogCaptureFixture) -> None:
    internal = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert not internal, internal[0].getMessage()


def _option_data(rng: random.Random, opt: int) -> bytes:
    kind = rng.randrange(6)
    if opt in (NbdOpt.GO, NbdOpt.INFO) and kind < 4:
        name = rng.choice([b"disk", b"", b"nope", rng.randbytes(rng.randrange(0, 20)), b"\xff"])
        name_len = rng.choice([len(name), len(name) + rng.randrange(1, 10), 1 << 31, 0])
        count = rng.choice([0, 1, 3, 0xFFFF])
        reqs = b"".join(NbdU16.pack(rng.randrange(6)) for _ in range(rng.choice([count, 1, 0])))
        return NbdU32.pack(name_len % (1 << 32)) + name + NbdU16.pack(count) + reqs
    return rng.randbytes(rng.choice([0, 1, 6, rng.randrange(0, 300)]))


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzzed_negotiations_get_error_replies_or_drop_and_the_server_lives_on(
    served: Served, seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="harness.nbd")
    rng = random.Random(seed)
    for step in range(40):
        try:
            _fuzz_negotiation(served, rng)
        except (AssertionError, Dropped) as exc:
            raise AssertionError(f"seed {seed} step {step}: {exc}") from exc
    _check_image(served, [], seed)
    _no_internal_errors(caplog)


def _fuzz_negotiation(s: Served, rng: random.Random) -> None:
    c = NbdClient(s.socket, timeout=10)
    try:
        _recv(c.sock, 18)
        flags = rng.choice([1, 3, 0, rng.randrange(1 << 32)])
        c.send(struct.pack(">I", flags))
        if flags & ~3:
            assert c.closed_by_server(), f"client flags {flags:#x} accepted"
            return
        for _ in range(rng.randrange(1, 8)):
            opt = rng.choice([*range(1, 12), rng.randrange(1 << 32)])
            data = _option_data(rng, opt)
            action = rng.choice(["ok"] * 8 + ["bad magic", "huge", "cut"])
            if action == "bad magic":
                c.send(NbdOptionHeader.pack(IHAVEOPT ^ 0x100, opt, len(data)) + data)
                assert c.closed_by_server(), "bad option magic accepted"
                return
            if action == "huge":
                c.send(NbdOptionHeader.pack(IHAVEOPT, opt, rng.randrange(1 << 20, 1 << 32)))
                assert c.closed_by_server(), "a huge option was waited for"
                return
            if action == "cut":
                raw = NbdOptionHeader.pack(IHAVEOPT, opt, len(data)) + data
                c.send(raw[: rng.randrange(0, len(raw))])
                return
            c.send(NbdOptionHeader.pack(IHAVEOPT, opt, len(data)) + data)
            if opt == NbdOpt.EXPORT_NAME:
                if data in (b"disk", b""):
                    _recv(c.sock, 10 + (0 if flags & 2 else 124))
                    _serves_requests(c)
                else:
                    assert c.closed_by_server(), "EXPORT_NAME of an unknown export continued"
                return
            while True:  # the option's replies, up to its final one
                magic, got, rep, length = NbdOptionReplyHeader.unpack(_recv(c.sock, 20))
                assert magic == NBD_OPT_REPLY_MAGIC and got == opt
                _recv(c.sock, length)
                if rep == NbdRep.ACK or rep & (1 << 31):
                    break
                assert rep in (NbdRep.SERVER, NbdRep.INFO)
            if opt == NbdOpt.ABORT:
                assert c.closed_by_server()
                return
            if opt == NbdOpt.GO and rep == NbdRep.ACK:
                _serves_requests(c)
                return
    finally:
        c.close()
    with _connected_client(s) as ok:  # the next client is served
        ok.read(0, 512)


def _serves_requests(c: NbdClient) -> None:
    assert c.read(IMAGE_SIZE - 512, 512) == canary()[-512:]
