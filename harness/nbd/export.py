"""What one NBD export serves: a `BlockBackend`, its name, and what clients may do with it.

The export is the device's side of the contract, as a QEMU NBD export is:
the transmission flags it advertises decide what a client (QEMU's NBD block
driver, qemu-img, nbdkit's clients) sends. SEND_FUA and SEND_FLUSH are always
advertised, so a client passes FUA and flushes through instead of emulating
them, and the graph's write log and powerfail journal see each of them.
CAN_MULTI_CONN follows QEMU's `multi-conn` option (auto: only when read-only);
every connection shares one BlockBackend, so a flush on one covers writes
completed on all, and `on` is safe.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from harness.block import BlockBackend
from harness.errors import ConfigError
from harness.nbd.protocol import MAX_STRING, TransmissionFlag

# "Size constraints": the largest READ/WRITE payload accepted. 32 MiB is the size the
# spec says no client should be refused, and what QEMU's server advertises.
MAX_PAYLOAD = 32 << 20
PREFERRED_BLOCK = 4096
_MAX_MIN_BLOCK = 65536  # the spec's bound on an advertised minimum block size


class MultiConn(enum.Enum):
    """QEMU's NbdExportOptions `multi-conn`."""

    ON = "on"
    OFF = "off"
    AUTO = "auto"


@dataclass
class NbdExport:
    """One named export of a BlockBackend.

    `writable=False` refuses writes, trims and write-zeroes with EPERM even when the
    backend itself could write (as QEMU's `writable=off` export of a writable node).
    """

    name: str
    backend: BlockBackend
    writable: bool = False
    description: str = ""
    multi_conn: MultiConn = MultiConn.AUTO

    def __post_init__(self) -> None:
        if len(self.name.encode()) > MAX_STRING:
            raise ConfigError(f"NBD export name is {len(self.name)} bytes; at most 4096 allowed")
        if len(self.description.encode()) > MAX_STRING:
            raise ConfigError("NBD export description is longer than 4096 bytes")
        if self.writable and self.backend.read_only:
            raise ConfigError(
                f"NBD export {self.name!r} is writable but its node is opened read-only; "
                "drop writable=on or open the node read-write"
            )

    @property
    def read_only(self) -> bool:
        return not self.writable

    @property
    def size(self) -> int:
        return self.backend.length

    @property
    def transmission_flags(self) -> int:
        flags = (
            TransmissionFlag.HAS_FLAGS
            | TransmissionFlag.SEND_FLUSH
            | TransmissionFlag.SEND_FUA
            | TransmissionFlag.SEND_TRIM
            | TransmissionFlag.SEND_WRITE_ZEROES
            | TransmissionFlag.SEND_FAST_ZERO
        )
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
        if self.multi_conn is MultiConn.ON or (
            self.multi_conn is MultiConn.AUTO and self.read_only
        ):
            flags |= TransmissionFlag.CAN_MULTI_CONN
        return int(flags)

    @property
    def block_sizes(self) -> tuple[int, int, int]:
        """(minimum block, preferred block, maximum payload) for NBD_INFO_BLOCK_SIZE.

        The minimum is the graph's request alignment (512 or 4096 under O_DIRECT, else 1):
        a hint that spares the file node its bounce buffers. Smaller requests still work.
        """
        align = int(getattr(self.backend.root, "request_alignment", 1) or 1)
        if align & (align - 1) or align > _MAX_MIN_BLOCK:
            align = 1
        return align, max(PREFERRED_BLOCK, align), MAX_PAYLOAD
