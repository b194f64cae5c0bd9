"""The NBD wire protocol: magic numbers, option, reply and command codes, message layouts.

Everything here follows the NBD protocol document (NetworkBlockDevice/nbd,
doc/proto.md); the section each layout comes from is named beside it. All
integers are big-endian ("network byte order"). Only what this server speaks
is defined: fixed newstyle negotiation, NBD_OPT_GO/INFO, simple replies.
"""

from __future__ import annotations

import enum
import errno
import struct

# "Newstyle negotiation": S: u64 'NBDMAGIC', u64 'IHAVEOPT', u16 handshake flags.
NbdNewstyleHandshake = struct.Struct(">QQH")
# "Newstyle negotiation": C: u32 client flags.
NbdClientFlags = struct.Struct(">I")
# "Newstyle negotiation": C: u64 'IHAVEOPT', u32 option, u32 length of option data.
NbdOptionHeader = struct.Struct(">QII")
# "Fixed newstyle negotiation": S: u64 reply magic, u32 option, u32 reply type, u32 length.
NbdOptionReplyHeader = struct.Struct(">QIII")
# "Newstyle negotiation", reply to NBD_OPT_EXPORT_NAME: u64 export size, u16
# transmission flags (then 124 zero bytes unless NBD_FLAG_C_NO_ZEROES).
NbdExportNameReply = struct.Struct(">QH")
# "Option types", NBD_OPT_INFO/NBD_OPT_GO data: u32 name length, name, u16 number of
# information requests, u16 each.
NbdU32 = struct.Struct(">I")
NbdU16 = struct.Struct(">H")
# "Option reply types", NBD_REP_INFO payloads, each led by its u16 information type:
# NBD_INFO_EXPORT: u64 export size, u16 transmission flags.
NbdInfoExport = struct.Struct(">HQH")
# NBD_INFO_BLOCK_SIZE: u32 minimum block size, u32 preferred block size, u32 maximum payload.
NbdInfoBlockSize = struct.Struct(">HIII")
# "Request message": u32 magic, u16 command flags, u16 type, u64 handle, u64 offset, u32 length.
NbdRequest = struct.Struct(">IHHQQI")
# "Simple reply message": u32 magic, u32 error, u64 handle.
NbdSimpleReply = struct.Struct(">IIQ")

NBDMAGIC = 0x4E42444D41474943  # 'NBDMAGIC' (INIT_PASSWD)
IHAVEOPT = 0x49484156454F5054  # 'IHAVEOPT'
NBD_OPT_REPLY_MAGIC = 0x3E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
EXPORT_NAME_PADDING = 124  # zero bytes after the NBD_OPT_EXPORT_NAME reply

# "Handshake flags" (server) and "Client flags".
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# "Strings": an export name or message MUST be no longer than 4096 bytes.
MAX_STRING = 4096


class TransmissionFlag(enum.IntFlag):
    """ "Transmission flags": what the export can do, sent with its size."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class NbdOpt(enum.IntEnum):
    """ "Option types"."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


NBD_REP_FLAG_ERROR = 1 << 31


class NbdRep(enum.IntEnum):
    """ "Option reply types"; errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
    ERR_POLICY = NBD_REP_FLAG_ERROR | 2
    ERR_INVALID = NBD_REP_FLAG_ERROR | 3
    ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
    ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
    ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
    ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
    ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
    ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9


class NbdInfo(enum.IntEnum):
    """ "Option reply types", NBD_REP_INFO: the information types."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class NbdCmd(enum.IntEnum):
    """ "Request types"."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    """ "Command flags"."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


# "Error values": the only errors a reply may carry; what an errno becomes.
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

_ERRNO_TO_NBD = {
    errno.EPERM: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EACCES: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC,
    errno.EDQUOT: NBD_ENOSPC,  # "SHOULD map EDQUOT and EFBIG to ENOSPC"
    errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def nbd_error(host_errno: int | None) -> int:
    """The NBD error value for a host errno (anything unlisted is EIO)."""
    return _ERRNO_TO_NBD.get(host_errno or errno.EIO, NBD_EIO)


def option_name(opt: int) -> str:
    try:
        return f"NBD_OPT_{NbdOpt(opt).name}"
    except ValueError:
        return f"option {opt}"


def command_name(cmd: int) -> str:
    try:
        return f"NBD_CMD_{NbdCmd(cmd).name}"
    except ValueError:
        return f"command {cmd}"
