"""The NBD handshake: fixed newstyle negotiation up to the chosen export.

The server speaks fixed newstyle only (as QEMU's and nbdkit's servers do) and
answers NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_EXPORT_NAME, NBD_OPT_LIST and
NBD_OPT_ABORT; everything else (STARTTLS, structured replies, metadata
contexts) gets NBD_REP_ERR_UNSUP or _POLICY, after which a client carries on
without it — QEMU's NBD client then uses simple replies.

A malformed option gets an error reply and the haggling goes on, as the spec
asks ("simply error inbound options"). The connection is dropped only where
the spec says the server must or may: bad magic, unknown client flags, an
NBD_OPT_EXPORT_NAME for an export that does not exist (that option has no
error reply), an option too long to be anything but abuse, or too many
options. The caller bounds the whole handshake with a socket timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from harness.errors import NbdProtocolError
from harness.nbd.channel import Channel
from harness.nbd.export import NbdExport
from harness.nbd.protocol import (
    EXPORT_NAME_PADDING,
    IHAVEOPT,
    MAX_STRING,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_OPT_REPLY_MAGIC,
    NBDMAGIC,
    NbdClientFlags,
    NbdExportNameReply,
    NbdInfo,
    NbdInfoBlockSize,
    NbdInfoExport,
    NbdNewstyleHandshake,
    NbdOpt,
    NbdOptionHeader,
    NbdOptionReplyHeader,
    NbdRep,
    NbdU16,
    NbdU32,
    option_name,
)

log = logging.getLogger(__name__)

# The longest option that can be valid: an NBD_OPT_GO/INFO with a 4096-byte name and all
# 65535 information requests. Anything longer is abuse, and the client is dropped.
MAX_OPTION_LENGTH = 4 + MAX_STRING + 2 + 2 * 0xFFFF
# Option haggling that goes on longer than this is a client going round in circles.
MAX_OPTIONS = 256

ExportLookup = Callable[[str], NbdExport | None]


@dataclass(frozen=True)
class Negotiated:
    """The outcome of a successful handshake: the export to serve."""

    export: NbdExport
    option: NbdOpt  # GO or EXPORT_NAME


class _OptionError(Exception):
    """An option that gets an error reply (the haggling continues)."""

    def __init__(self, rep: NbdRep, message: str) -> None:
        super().__init__(message)
        self.rep = rep


def negotiate(
    channel: Channel, find: ExportLookup, names: Callable[[], Iterable[NbdExport]]
) -> Negotiated | None:
    """Run the handshake on `channel`; the export chosen, or None after NBD_OPT_ABORT.

    `find` maps a requested name to an export (None: unknown); `names` lists the
    exports for NBD_OPT_LIST. Raises NbdProtocolError (ClientGone included) when the
    connection is to be dropped.
    """
    channel.send(
        NbdNewstyleHandshake.pack(NBDMAGIC, IHAVEOPT, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)
    )
    (client_flags,) = NbdClientFlags.unpack(channel.read(NbdClientFlags.size))
    known = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
    if client_flags & ~known:
        # "the server MUST drop the TCP connection if the client sets an unknown flag"
        raise NbdProtocolError(f"unknown client flags {client_flags:#x}")
    no_zeroes = bool(client_flags & NBD_FLAG_C_NO_ZEROES)
    # A client without NBD_FLAG_C_FIXED_NEWSTYLE gets fixed newstyle anyway (the spec
    # allows it): it only ever sends NBD_OPT_EXPORT_NAME, which works the same.
    for _ in range(MAX_OPTIONS):
        magic, opt, length = NbdOptionHeader.unpack(channel.read(NbdOptionHeader.size))
        if magic != IHAVEOPT:
            raise NbdProtocolError(f"option magic {magic:#x} is not IHAVEOPT")
        if length > MAX_OPTION_LENGTH:
            raise NbdProtocolError(
                f"{option_name(opt)} carries {length} bytes (at most {MAX_OPTION_LENGTH})"
            )
        data = channel.read(length)
        if opt == NbdOpt.EXPORT_NAME:
            return Negotiated(_export_name(channel, find, data, no_zeroes), NbdOpt.EXPORT_NAME)
        try:
            if opt in (NbdOpt.GO, NbdOpt.INFO):
                export = _info(channel, opt, find, data)
                if opt == NbdOpt.GO:
                    return Negotiated(export, NbdOpt.GO)
            elif opt == NbdOpt.ABORT:
                # Data with ABORT is to be ignored, not refused.
                _reply(channel, opt, NbdRep.ACK)
                return None
            elif opt == NbdOpt.LIST:
                if data:
                    raise _OptionError(NbdRep.ERR_INVALID, "NBD_OPT_LIST takes no data")
                for export in names():
                    name = export.name.encode()
                    _reply(channel, opt, NbdRep.SERVER, NbdU32.pack(len(name)) + name)
                _reply(channel, opt, NbdRep.ACK)
            elif opt == NbdOpt.STARTTLS:
                raise _OptionError(NbdRep.ERR_POLICY, "this server does not offer TLS")
            else:
                raise _OptionError(NbdRep.ERR_UNSUP, f"{option_name(opt)} is not supported")
        except _OptionError as exc:
            log.debug("%s: %s refused: %s", channel.peer, option_name(opt), exc)
            _reply(channel, opt, exc.rep, str(exc).encode()[:MAX_STRING])
    raise NbdProtocolError(f"more than {MAX_OPTIONS} options without choosing an export")


def _reply(channel: Channel, opt: int, rep: NbdRep, payload: bytes = b"") -> None:
    channel.send(NbdOptionReplyHeader.pack(NBD_OPT_REPLY_MAGIC, opt, rep, len(payload)) + payload)


def _decode_name(raw: bytes) -> str:
    if len(raw) > MAX_STRING:
        raise _OptionError(NbdRep.ERR_INVALID, f"export name of {len(raw)} bytes (at most 4096)")
    try:
        name = raw.decode()
    except UnicodeDecodeError:
        raise _OptionError(NbdRep.ERR_INVALID, "export name is not UTF-8") from None
    if "\0" in name:
        raise _OptionError(NbdRep.ERR_INVALID, "export name contains NUL")
    return name


def _export_name(channel: Channel, find: ExportLookup, data: bytes, no_zeroes: bool) -> NbdExport:
    try:
        name = _decode_name(data)
    except _OptionError as exc:
        raise NbdProtocolError(f"NBD_OPT_EXPORT_NAME: {exc}") from None
    export = find(name)
    if export is None:
        # The option has no error reply: "the server MUST terminate the session".
        raise NbdProtocolError(f"NBD_OPT_EXPORT_NAME for unknown export {name!r}")
    reply = NbdExportNameReply.pack(export.size, export.transmission_flags)
    channel.send(reply if no_zeroes else reply + bytes(EXPORT_NAME_PADDING))
    return export


def _info(channel: Channel, opt: int, find: ExportLookup, data: bytes) -> NbdExport:
    """NBD_OPT_INFO / NBD_OPT_GO: the NBD_REP_INFO replies and the final ACK."""
    if len(data) < NbdU32.size + NbdU16.size:
        raise _OptionError(NbdRep.ERR_INVALID, f"{option_name(opt)} data too short")
    (name_len,) = NbdU32.unpack_from(data, 0)
    if name_len > len(data) - NbdU32.size - NbdU16.size:
        raise _OptionError(NbdRep.ERR_INVALID, "export name length runs past the option")
    name = _decode_name(data[4 : 4 + name_len])
    (count,) = NbdU16.unpack_from(data, 4 + name_len)
    rest = data[6 + name_len :]
    if len(rest) != 2 * count:
        raise _OptionError(
            NbdRep.ERR_INVALID, f"{count} information requests announced, {len(rest) // 2} sent"
        )
    requests = {NbdU16.unpack_from(rest, 2 * i)[0] for i in range(count)}
    export = find(name)
    if export is None:
        raise _OptionError(NbdRep.ERR_UNKNOWN, f"no export named {name!r}")
    _reply(
        channel,
        opt,
        NbdRep.INFO,
        NbdInfoExport.pack(NbdInfo.EXPORT, export.size, export.transmission_flags),
    )
    if NbdInfo.NAME in requests:
        _reply(channel, opt, NbdRep.INFO, NbdU16.pack(NbdInfo.NAME) + export.name.encode())
    if NbdInfo.DESCRIPTION in requests and export.description:
        _reply(
            channel,
            opt,
            NbdRep.INFO,
            NbdU16.pack(NbdInfo.DESCRIPTION) + export.description.encode(),
        )
    # Sent whether asked for or not, as QEMU's server does: it is only a hint here
    # (requests of any alignment and up to the maximum payload are served).
    _reply(
        channel, opt, NbdRep.INFO, NbdInfoBlockSize.pack(NbdInfo.BLOCK_SIZE, *export.block_sizes)
    )
    _reply(channel, opt, NbdRep.ACK)
    return export
