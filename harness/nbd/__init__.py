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
client for tests and fuzzing). An export in its own process is `powercut
serve --nbd`, run by `harness.vm.backends.ProcessBackend` on `ServeOptions`
(harness.vm.daemons).

Depends only on harness.block, harness.errors and harness.sockets.

Why our own protocol server rather than nbdkit with its Python plugin
(benchmarks/nbd.py; benchmarks/results/nbd-20261201T104704Z.json, one run,
qemu-img bench, ratios to qemu-storage-daemon's NBD export of the same file):
ours 1.54-2.05x at 4 KiB and 1.64-2.88x at 1 MiB; nbdkit calling the same
BlockBackend 0.26-0.64x at 4 KiB and 1.34-2.17x at 1 MiB. Every nbdkit
request crosses into the embedded interpreter from one of nbdkit's threads
(a GIL hand-off per request); here a connection's thread parses, runs and
answers it with no hand-off. Fit decided the rest: the graph, its control
socket (blkdebug rules, log marks, write cache) and its lifetime stay in one
Python process that ManagedProcess owns; errors come from the graph's own
errnos; and nothing beyond QEMU's packages is needed on a machine.
"""

from harness.nbd.export import MAX_PAYLOAD, MultiConn, NbdExport
from harness.nbd.server import NbdServer

__all__ = ["MAX_PAYLOAD", "MultiConn", "NbdExport", "NbdServer"]
