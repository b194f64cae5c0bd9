"""Host-side comparison of vhost-user-blk backends, without a guest.

The in-process test frontend (harness.testing.vhost_frontend.RequestStream) drives
each backend over its socket with the same request stream: 4 KiB random
reads and writes at queue depth 1 and 16, 1 MiB sequential reads and writes
at depth 4, on a page-cached raw image with the write cache on (neither
side waits for the disk). Both backends stay connected and slices alternate
backend by backend inside each workload, round after round, so load from
other users of the machine lands on both alike; each figure is the median
over rounds and the ratio is powercut / qemu-storage-daemon.
Used by `powercut bench --host` and `python -m benchmarks.vhost`.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.durability.contract import CacheMode
from harness.proc import ManagedProcess
from harness.testing.vhost_frontend import RequestStream, VhostUserFrontend
from harness.vm.daemons import DaemonOptions, QsdOptions, ServeOptions

IMAGE_SIZE = 256 << 20
GOALS = {"4k": 0.8, "1m": 0.9}


@dataclass(frozen=True)
class Workload:
    name: str
    block: int
    depth: int
    write: bool
    sequential: bool = False

    @property
    def kind(self) -> str:
        return "1m" if self.block >= 1 << 20 else "4k"


WORKLOADS = (
    Workload("4k-randread-qd1", 4096, 1, False),
    Workload("4k-randread-qd16", 4096, 16, False),
    Workload("4k-randwrite-qd1", 4096, 1, True),
    Workload("4k-randwrite-qd16", 4096, 16, True),
    Workload("1m-seqread-qd4", 1 << 20, 4, False, True),
    Workload("1m-seqwrite-qd4", 1 << 20, 4, True, True),
)


def backend_options(name: str, image: Path, sock: Path) -> DaemonOptions:
    """The command line of the backend `name` on `image`: page-cached, write cache on."""
    if name == "powercut":
        extra = os.environ.get("POWERCUT_BENCH_SERVE_ARGS", "").split()
        return ServeOptions(image=image, socket=sock, control=False, extra_args=tuple(extra))
    return QsdOptions.on_image(image, sock, CacheMode.WRITEBACK)


@contextmanager
def connected(name: str, image: Path, workdir: Path) -> Iterator[VhostUserFrontend]:
    sock = workdir / f"{name}.sock"
    options = backend_options(name, image, sock)
    proc = ManagedProcess(options.argv(), name=name, log_path=workdir / f"{name}.log")
    with proc:
        proc.wait_for(lambda: all(p.exists() for p in options.sockets()), 30, f"{name} socket")
        fe = VhostUserFrontend(sock, memory_sizes=(64 << 20,))
        try:
            fe.negotiate(num_queues=1, queue_size=128)
            yield fe
        finally:
            fe.close()


def offsets(w: Workload, count: int, seed: int) -> list[int]:
    slots = IMAGE_SIZE // w.block
    if w.sequential:
        return [(i % slots) * w.block for i in range(count)]
    rng = random.Random(seed)
    return [rng.randrange(slots) * w.block for _ in range(count)]


def measure(fe: VhostUserFrontend, w: Workload, seconds: float, seed: int) -> float:
    """Requests per second for about `seconds` (calibrated by a short first pass)."""
    stream = RequestStream(fe, depth=w.depth, block=w.block)
    try:
        probe = offsets(w, 200 if w.block < 1 << 20 else 20, seed)
        rate = len(probe) / stream.run(probe, w.write)
        count = max(len(probe), int(rate * seconds))
        work = offsets(w, count, seed + 1)
        elapsed = stream.run(work, w.write)
        if stream.errors:
            raise RuntimeError(f"{w.name}: {stream.errors} requests failed")
        return count / elapsed
    finally:
        fe.queues[0].free_descs.extend(stream.descs)


def prepare(image: Path) -> None:
    chunk = os.urandom(1 << 20)
    with open(image, "wb") as f:
        for _ in range(IMAGE_SIZE >> 20):
            f.write(chunk)
    with open(image, "rb") as f:
        while f.read(8 << 20):
            pass


def run_host_bench(
    *,
    seconds: float = 2.0,
    rounds: int = 3,
    only: str = "",
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure every workload (whose name starts with `only`); one dict per workload."""
    backends = ("powercut", "qemu-storage-daemon")
    workloads = [w for w in WORKLOADS if w.name.startswith(only)]
    rates: dict[str, dict[str, list[float]]] = {
        w.name: {b: [] for b in backends} for w in workloads
    }
    with tempfile.TemporaryDirectory(prefix="powercut-bench-vhost-") as tmp:
        workdir = Path(tmp)
        image = workdir / "bench.img"
        prepare(image)
        with (
            connected(backends[0], image, workdir) as fe0,
            connected(backends[1], image, workdir) as fe1,
        ):
            fes = {backends[0]: fe0, backends[1]: fe1}
            for rnd in range(rounds):
                for i, w in enumerate(workloads):
                    order = backends if (rnd + i) % 2 == 0 else backends[::-1]
                    for name in order:
                        rate = measure(fes[name], w, seconds, seed=1000 * rnd + i)
                        rates[w.name][name].append(rate)
                        if progress is not None:
                            progress(
                                f"round {rnd + 1} {name:>20} {w.name:<18} {rate:10.0f} req/s "
                                f"{rate * w.block / 1e6:8.1f} MB/s"
                            )
    results = []
    for w in workloads:
        pc = statistics.median(rates[w.name]["powercut"])
        qsd = statistics.median(rates[w.name]["qemu-storage-daemon"])
        ratio = pc / qsd
        goal = GOALS[w.kind]
        results.append(
            {
                "workload": w.name,
                "block": w.block,
                "depth": w.depth,
                "write": w.write,
                "powercut_iops": round(pc, 1),
                "qsd_iops": round(qsd, 1),
                "powercut_mbps": round(pc * w.block / 1e6, 1),
                "qsd_mbps": round(qsd * w.block / 1e6, 1),
                "ratio": round(ratio, 3),
                "goal": goal,
                "met": ratio >= goal,
                "rounds": {b: [round(r, 1) for r in rates[w.name][b]] for b in backends},
            }
        )
    return results
