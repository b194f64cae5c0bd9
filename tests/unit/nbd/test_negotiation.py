"""The fixed newstyle handshake, option by option, against the real server."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from harness.nbd.client import NbdClient
from harness.nbd.export import MAX_PAYLOAD
from harness.nbd.protocol import (
    EXPORT_NAME_PADDING,
    IHAVEOPT,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NbdCmd,
    NbdExportNameReply,
    NbdInfo,
    NbdOpt,
    NbdOptionHeader,
    NbdRep,
    NbdU16,
    NbdU32,
    TransmissionFlag,
)

from .conftest import IMAGE_SIZE, Served, canary


def test_wire_structures_have_the_sizes_the_spec_gives() -> None:
    from harness.nbd import protocol as p

    assert p.NbdNewstyleHandshake.size == 18
    assert p.NbdOptionHeader.size == 16
    assert p.NbdOptionReplyHeader.size == 20
    assert p.NbdExportNameReply.size == 10
    assert p.NbdInfoExport.size == 12
    assert p.NbdInfoBlockSize.size == 14
    assert p.NbdRequest.size == 28
    assert p.NbdSimpleReply.size == 16
    assert p.NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert p.IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"


def test_go_reports_size_flags_name_and_block_sizes(served: Served) -> None:
    with NbdClient(served.socket) as c:
        flags = c.greeting()
        assert flags == NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
        info = c.info("disk", (NbdInfo.NAME, NbdInfo.BLOCK_SIZE), go=True)
        assert info.size == IMAGE_SIZE
        assert info.name == "disk"
        assert info.block_sizes == (1, 4096, MAX_PAYLOAD)
        want = (
            TransmissionFlag.HAS_FLAGS
            | TransmissionFlag.SEND_FLUSH
            | TransmissionFlag.SEND_FUA
            | TransmissionFlag.SEND_TRIM
            | TransmissionFlag.SEND_WRITE_ZEROES
            | TransmissionFlag.SEND_FAST_ZERO
        )
        assert info.flags == want
        assert c.read(0, 4096) == canary()[:4096]
        c.disconnect()


def test_read_only_export_advertises_read_only_and_multi_conn(
    serve: Callable[..., Served],
) -> None:
    ro = serve(writable=False)
    with NbdClient(ro.socket) as c:
        info = c.handshake("disk")
        assert info.flags & TransmissionFlag.READ_ONLY
        assert info.flags & TransmissionFlag.CAN_MULTI_CONN  # multi-conn=auto, as QEMU


def test_unknown_export_gets_an_error_and_the_haggling_goes_on(served: Served) -> None:
    with NbdClient(served.socket) as c:
        c.greeting()
        replies = c.option(NbdOpt.GO, NbdU32.pack(4) + b"nope" + NbdU16.pack(0))
        assert [r.rep for r in replies] == [NbdRep.ERR_UNKNOWN]
        assert b"nope" in replies[0].data
        assert c.list_exports() == ["disk"]
        assert c.info("disk").size == IMAGE_SIZE  # INFO does not end the haggling ...
        assert c.info("disk", go=True).size == IMAGE_SIZE  # ... GO does
        assert c.read(IMAGE_SIZE - 512, 512) == canary()[-512:]


def test_the_empty_name_finds_the_only_export(served: Served) -> None:
    with NbdClient(served.socket) as c:
        assert c.handshake("").size == IMAGE_SIZE


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_enters_transmission_with_or_without_the_zero_padding(
    served: Served, no_zeroes: bool
) -> None:
    with NbdClient(served.socket) as c:
        c.greeting(NBD_FLAG_C_FIXED_NEWSTYLE | (2 if no_zeroes else 0))
        c.send_option(NbdOpt.EXPORT_NAME, b"disk")
        size, flags = NbdExportNameReply.unpack(c.recv_exact(NbdExportNameReply.size))
        assert size == IMAGE_SIZE and flags & TransmissionFlag.SEND_FUA
        if not no_zeroes:
            assert c.recv_exact(EXPORT_NAME_PADDING) == bytes(EXPORT_NAME_PADDING)
        assert c.read(512, 512) == canary()[512:1024]


def test_export_name_of_an_unknown_export_ends_the_session(served: Served) -> None:
    with NbdClient(served.socket) as c:
        c.greeting()
        c.send_option(NbdOpt.EXPORT_NAME, b"nope")
        assert c.closed_by_server()
    with NbdClient(served.socket) as c:  # the next client is served
        assert c.handshake("disk").size == IMAGE_SIZE


@pytest.mark.parametrize(
    ("opt", "data", "rep"),
    [
        (NbdOpt.STARTTLS, b"", NbdRep.ERR_POLICY),
        (NbdOpt.STRUCTURED_REPLY, b"", NbdRep.ERR_UNSUP),
        (NbdOpt.LIST_META_CONTEXT, b"", NbdRep.ERR_UNSUP),
        (NbdOpt.SET_META_CONTEXT, b"", NbdRep.ERR_UNSUP),
        (NbdOpt.PEEK_EXPORT, b"", NbdRep.ERR_UNSUP),
        (0x7777, b"xyz", NbdRep.ERR_UNSUP),
        (NbdOpt.LIST, b"junk", NbdRep.ERR_INVALID),
        (NbdOpt.GO, b"\x00", NbdRep.ERR_INVALID),
        (NbdOpt.GO, NbdU32.pack(100) + b"disk" + NbdU16.pack(0), NbdRep.ERR_INVALID),
        (NbdOpt.GO, NbdU32.pack(4) + b"disk" + NbdU16.pack(3) + b"\x00\x01", NbdRep.ERR_INVALID),
        (NbdOpt.INFO, NbdU32.pack(2) + b"\xff\xfe" + NbdU16.pack(0), NbdRep.ERR_INVALID),
        (NbdOpt.INFO, NbdU32.pack(2) + b"a\x00" + NbdU16.pack(0), NbdRep.ERR_INVALID),
    ],
)
def test_options_it_does_not_serve_get_error_replies(
    served: Served, opt: int, data: bytes, rep: int
) -> None:
    with NbdClient(served.socket) as c:
        c.greeting()
        replies = c.option(opt, data)
        assert [r.rep for r in replies] == [rep]
        assert replies[0].option == opt
        assert c.handshake_flags and c.info("disk", go=True).size == IMAGE_SIZE


def test_abort_is_acknowledged_and_the_connection_closed(served: Served) -> None:
    with NbdClient(served.socket) as c:
        c.greeting()
        assert [r.rep for r in c.option(NbdOpt.ABORT, b"ignored")] == [NbdRep.ACK]
        assert c.closed_by_server()


@pytest.mark.parametrize(
    "bad",
    [
        "unknown client flags",
        "bad option magic",
        "option too long",
    ],
)
def test_a_client_breaking_the_handshake_is_dropped_and_others_are_served(
    served: Served, bad: str
) -> None:
    with NbdClient(served.socket) as c:
        if bad == "unknown client flags":
            c.greeting(client_flags=0x80)
        else:
            c.greeting()
            if bad == "bad option magic":
                c.send(NbdOptionHeader.pack(IHAVEOPT ^ 1, NbdOpt.LIST, 0))
            else:
                c.send(NbdOptionHeader.pack(IHAVEOPT, NbdOpt.GO, 1 << 30))
        assert c.closed_by_server()
    with NbdClient(served.socket) as c:
        c.handshake("disk")
        c.request(NbdCmd.FLUSH)
    assert served.server.stats()["dropped"] == 1


def test_a_silent_client_is_dropped_after_the_handshake_timeout(served: Served) -> None:
    served.server.handshake_timeout = 0.3
    with NbdClient(served.socket) as c:
        c.recv_exact(18)  # the greeting, then say nothing
        assert c.closed_by_server(timeout=10)
