from __future__ import annotations

from harness.guest.kernel_log import count_io_errors

LOG = """\
[    1.0] virtio_blk virtio1: [vda] 524288 512-byte logical blocks (268 MB/256 MiB)
[   12.3] I/O error, dev vda, sector 2048 op 0x1:(WRITE) flags 0x800 phys_seg 1 prio class 2
[   12.4] blk_update_request: I/O error, dev vdb, sector 8 op 0x0:(READ) flags 0x0
[   12.5] Buffer I/O error on dev vda, logical block 256, lost async page write
[   12.6] EXT4-fs (vda): mounted filesystem with ordered data mode
"""


def test_counts_block_layer_io_errors() -> None:
    assert count_io_errors(LOG) == 3
    assert count_io_errors(LOG, "vda") == 2
    assert count_io_errors("[ 1.0] all quiet\n") == 0
