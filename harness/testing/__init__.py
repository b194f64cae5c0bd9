"""Test support, in one place, shipped with powercut (as Firecracker keeps tests/framework).

    disk.py            fixtures for users' tests: a `powercut serve` backend on a disk image
    vhost_frontend.py  an in-process vhost-user-blk frontend: QEMU's side of the socket
    hostbench.py       the host-side comparison of vhost-user-blk backends (`powercut bench --host`)
    ext4traffic.py     real ext4 traffic through the block stack, without a VM or a kernel mount

Only tests, benchmarks, fuzz targets and the commands use these; no product
package imports them (tests/unit/test_layers.py: `testing` sits on the crash row).
"""
