"""An NBD export of any node graph: the block stack served to NBD clients.

QEMU (`-blockdev driver=nbd,server.type=unix,server.path=S,export=E`, or
`nbd+unix:///E?socket=S`), qemu-img, qemu-io and libnbd clients use an
export as the protocol layer under their own format driver and cache mode;
every write, FUA write, flush, trim and write-zeroes they send reaches the
served graph as the same block-stack request, so a log-writes node records
it and a powerfail node's journal follows it.

One job per module: `protocol` (the wire structures and codes), `channel`
(a connection's byte stream), `negotiation` (the fixed newstyle handshake),
`transmission` (requests to BlockBackend calls), `export` (what an export
advertises), `server` (listening, clients, lifetime), `client` (a small
client for tests and fuzzing), `process` (`powercut-storage-daemon` with an
NBD export, as a managed child process).

Depends only on harness.block, harness.errors and harness.proc. Why our own
protocol server rather than nbdkit with its Python plugin: see
benchmarks/nbd.py and the recorded comparison in benchmarks/results/.
"""

from harness.nbd.export import MAX_PAYLOAD, MultiConn, NbdExport
from harness.nbd.server import NbdServer

__all__ = ["MAX_PAYLOAD", "MultiConn", "NbdExport", "NbdServer"]
