"""What the guest kernel said: I/O errors across a backend crash must be zero."""

from __future__ import annotations

import re

# Linux block-layer and filesystem messages that mean a request failed:
#   blk_update_request: I/O error, dev vda, sector 2048 op 0x1:(WRITE) ...
#   I/O error, dev vda, sector 2048 op 0x1:(WRITE) flags 0x0 ...   (5.x and later)
#   Buffer I/O error on dev vda1, logical block 0, lost async page write
#   EXT4-fs error (device vda): ...
#   EXT4-fs warning (device vda): ext4_end_bio:...: I/O error 10 writing to inode ...
_IO_ERROR = re.compile(
    r"I/O error, dev \w+|Buffer I/O error on dev|EXT4-fs error|EXT4-fs warning .*I/O error"
)


def count_io_errors(kernel_log: str, device: str | None = None) -> int:
    """Lines of `dmesg` (or the console log) reporting a failed I/O, optionally on one device."""
    count = 0
    for line in kernel_log.splitlines():
        if _IO_ERROR.search(line) and (device is None or device in line):
            count += 1
    return count
