"""Host-side vhost-user-blk backends, side by side: powercut vs qemu-storage-daemon.

    python -m benchmarks.vhost [--seconds 2] [--rounds 3] [--out benchmarks/results]

No guest: the in-process test frontend (harness.vhost.frontend.RequestStream)
drives each backend over its socket with the same request stream — 4 KiB
random reads and writes at queue depth 1 and 16, 1 MiB sequential reads and
writes at depth 4 — on a page-cached 256 MiB raw image with the write cache
on (neither side waits for the disk). Backends alternate slice by slice within
each workload, round after round, so drift on the shared machine hits both alike; each
figure is the median over rounds, and the ratio is powercut / qsd. Goals:
4 KiB IOPS at least 0.8x qsd's, 1 MiB bandwidth at least 0.9x.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.proc import ManagedProcess
from harness.vhost.frontend import RequestStream, VhostUserFrontend

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


def backend_argv(name: str, image: Path, sock: Path) -> list[str]:
    if name == "powercut":
        return [
            sys.executable,
            "-m",
            "harness.cli",
            "serve",
            str(image),
            "--socket",
            str(sock),
            "--cache",
            "writeback",
            "--no-control",
        ]
    return [
        "qemu-storage-daemon",
        "--blockdev",
        f"driver=file,filename={image},node-name=file0,cache.direct=off",
        "--blockdev",
        "driver=raw,file=file0,node-name=disk0",
        "--export",
        f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock},writable=on",
    ]


@contextmanager
def connected(name: str, image: Path, workdir: Path) -> Iterator[VhostUserFrontend]:
    sock = workdir / f"{name}.sock"
    proc = ManagedProcess(
        backend_argv(name, image, sock), name=name, log_path=workdir / f"{name}.log"
    )
    with proc:
        proc.wait_for(sock.exists, 30, f"{name} socket")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vhost", description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0, help="per workload and backend")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--only",
        metavar="PREFIX",
        default="",
        help="run only the workloads whose name starts with PREFIX (e.g. 1m)",
    )
    args = parser.parse_args(argv)
    workloads = [w for w in WORKLOADS if w.name.startswith(args.only)]
    if shutil.which("qemu-storage-daemon") is None:
        print("qemu-storage-daemon is not installed (ci/bootstrap installs it)", file=sys.stderr)
        return 2
    backends = ("powercut", "qemu-storage-daemon")
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
            # Slices alternate backend by backend inside each workload, so load from
            # other users of the machine lands on both alike.
            for rnd in range(args.rounds):
                for i, w in enumerate(workloads):
                    order = backends if (rnd + i) % 2 == 0 else backends[::-1]
                    for name in order:
                        rate = measure(fes[name], w, args.seconds, seed=1000 * rnd + i)
                        rates[w.name][name].append(rate)
                        print(
                            f"round {rnd + 1} {name:>20} {w.name:<18} {rate:10.0f} req/s "
                            f"{rate * w.block / 1e6:8.1f} MB/s",
                            flush=True,
                        )
    results = []
    ok = True
    print(f"\n{'workload':<18} {'powercut':>12} {'qsd':>12} {'ratio':>7}  goal")
    for w in workloads:
        pc = statistics.median(rates[w.name]["powercut"])
        qsd = statistics.median(rates[w.name]["qemu-storage-daemon"])
        ratio = pc / qsd
        goal = GOALS[w.kind]
        ok &= ratio >= goal
        unit = "IOPS" if w.kind == "4k" else "MB/s"
        scale = 1.0 if w.kind == "4k" else w.block / 1e6
        print(
            f"{w.name:<18} {pc * scale:12.0f} {qsd * scale:12.0f} {ratio:7.2f}  >= {goal} "
            f"{'ok' if ratio >= goal else 'MISSED'} ({unit})"
        )
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
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    record = {
        "benchmark": "vhost-host",
        "command": "python -m benchmarks.vhost " + " ".join(argv or sys.argv[1:]),
        "when": stamp,
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "accel": "none (no guest)",
        },
        "settings": {
            "seconds": args.seconds,
            "rounds": args.rounds,
            "image_bytes": IMAGE_SIZE,
            "queues": 1,
            "queue_size": 128,
            "cache": "writeback, page-cached",
        },
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"vhost-host-{stamp}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nrecorded {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
