"""NBD exports side by side: powercut vs qemu-storage-daemon (and nbdkit's Python plugin).

    python -m benchmarks nbd [-- --rounds 5 --no-nbdkit --out benchmarks/results]

Each server exports the same page-cached 256 MiB raw file over a unix socket,
started with the same command line where they share one
(`--blockdev driver=file ... --blockdev driver=raw ... --nbd-server
addr.type=unix,... --export type=nbd,...`): qemu-storage-daemon, and
powercut-storage-daemon. When nbdkit and its Python plugin are installed, a
third column serves the same powercut BlockBackend through nbdkit
(benchmarks/_nbdkit_plugin.py): the "well-kept server with a Python plugin"
alternative to our own protocol server, measured so the choice rests on
numbers.

The client is the same for all: `qemu-img bench` over `nbd+unix://`, in
rounds that run every server in turn (A B C, A B C, ...), so drift on this
shared machine hits each alike. Figures are the median over rounds of
operations per second; the ratio is the median of the per-round ratios.
Goals: 4 KiB at least 0.5x qemu-storage-daemon's, 1 MiB at least 0.8x.
Each run is recorded as benchmarks/results/nbd-<time>.json with the command
and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import machine_info
from harness.proc import ManagedProcess

IMAGE_SIZE = 256 << 20
ROOT = Path(__file__).resolve().parent.parent
PLUGIN = Path(__file__).resolve().parent / "_nbdkit_plugin.py"
GOALS = {4096: 0.5, 1 << 20: 0.8}


@dataclass(frozen=True)
class Workload:
    name: str
    block: int
    depth: int
    write: bool
    count: int  # requests per qemu-img bench run (about 0.3-1 s each here)


WORKLOADS = [
    Workload("4k-qd1-read", 4096, 1, False, 20000),
    Workload("4k-qd1-write", 4096, 1, True, 20000),
    Workload("4k-qd16-read", 4096, 16, False, 30000),
    Workload("4k-qd16-write", 4096, 16, True, 30000),
    Workload("1m-qd1-read", 1 << 20, 1, False, 1000),
    Workload("1m-qd1-write", 1 << 20, 1, True, 1000),
    Workload("1m-qd16-read", 1 << 20, 16, False, 1000),
    Workload("1m-qd16-write", 1 << 20, 16, True, 1000),
]

_COMPLETED = re.compile(r"Run completed in ([0-9.]+) seconds")


def _daemon_args(image: Path, sock: Path) -> list[str]:
    return [
        "--blockdev",
        f"driver=file,filename={image},node-name=file0",
        "--blockdev",
        "driver=raw,file=file0,node-name=disk0",
        "--nbd-server",
        f"addr.type=unix,addr.path={sock}",
        "--export",
        "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on",
    ]


def _servers(image: Path, work: Path, with_nbdkit: bool) -> dict[str, tuple[list[str], Path]]:
    """name -> (argv, socket)."""
    servers = {
        "qsd": (
            ["qemu-storage-daemon", *_daemon_args(image, work / "qsd.sock")],
            work / "qsd.sock",
        ),
        "powercut": (
            [
                sys.executable,
                "-m",
                "harness.storage_daemon",
                *_daemon_args(image, work / "pc.sock"),
            ],
            work / "pc.sock",
        ),
    }
    if with_nbdkit:
        sock = work / "nbdkit.sock"
        servers["nbdkit-python"] = (
            [
                "nbdkit",
                "--foreground",
                "--unix",
                str(sock),
                "--exportname",
                "disk0",
                "python",
                str(PLUGIN),
                f"image={image}",
                f"root={ROOT}",
            ],
            sock,
        )
    return servers


def _prepare(path: Path) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(IMAGE_SIZE >> 20):
            f.write(chunk)
    with open(path, "rb") as f:  # page-cache it: nobody waits for the disk
        while f.read(8 << 20):
            pass


def _bench(sock: Path, w: Workload) -> float:
    """Operations per second of one qemu-img bench run."""
    argv = [
        "qemu-img",
        "bench",
        "-f",
        "raw",
        "-c",
        str(w.count),
        "-d",
        str(w.depth),
        "-s",
        str(w.block),
        *(["-w"] if w.write else []),
        f"nbd+unix:///disk0?socket={sock}",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    m = _COMPLETED.search(out.stdout)
    if out.returncode != 0 or m is None:
        raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {out.stdout}{out.stderr}")
    return w.count / float(m.group(1))


def run(
    rounds: int, with_nbdkit: bool, only: str, progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="pc-nbd-bench-"))
    procs: list[ManagedProcess] = []
    try:
        image = work / "disk.img"
        _prepare(image)
        servers = _servers(image, work, with_nbdkit)
        for name, (argv, sock) in servers.items():
            p = ManagedProcess(argv, name=name, log_path=work / f"{name}.log")
            procs.append(p)
            p.start()
            p.wait_for(sock.exists, 60, f"{name} socket")
        results = []
        for w in WORKLOADS:
            if only and not w.name.startswith(only):
                continue
            per: dict[str, list[float]] = {name: [] for name in servers}
            for _ in range(rounds):
                for name, (_argv, sock) in servers.items():
                    per[name].append(_bench(sock, w))
            ratios = [p / q for p, q in zip(per["powercut"], per["qsd"], strict=True)]
            goal = GOALS[w.block]
            row: dict[str, Any] = {
                "workload": w.name,
                "block": w.block,
                "depth": w.depth,
                "rw": "write" if w.write else "read",
                "requests_per_run": w.count,
                "ops_per_s": {n: round(statistics.median(v)) for n, v in per.items()},
                "mb_per_s": {
                    n: round(statistics.median(v) * w.block / 1e6, 1) for n, v in per.items()
                },
                "rounds": {n: [round(x) for x in v] for n, v in per.items()},
                "ratio": round(statistics.median(ratios), 2),
                "goal": goal,
                "met": statistics.median(ratios) >= goal,
            }
            if "nbdkit-python" in per:
                row["nbdkit_ratio"] = round(
                    statistics.median(
                        k / q for k, q in zip(per["nbdkit-python"], per["qsd"], strict=True)
                    ),
                    2,
                )
            results.append(row)
            progress(
                f"{w.name:<14} "
                + "  ".join(f"{n} {row['ops_per_s'][n]:>7}/s" for n in servers)
                + f"  powercut/qsd {row['ratio']:.2f}"
                + (f"  nbdkit/qsd {row['nbdkit_ratio']:.2f}" if "nbdkit_ratio" in row else "")
            )
        return results
    finally:
        for p in procs:
            p.stop()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks nbd", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-nbdkit", action="store_true", help="leave out nbdkit's column")
    parser.add_argument("--only", default="", metavar="PREFIX", help="e.g. 4k or 1m")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    for tool in ("qemu-img", "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (ci/bootstrap installs it)", file=sys.stderr)
            return 2
    with_nbdkit = not args.no_nbdkit and shutil.which("nbdkit") is not None
    if with_nbdkit:
        probe = subprocess.run(["nbdkit", "python", "--version"], capture_output=True, text=True)
        with_nbdkit = probe.returncode == 0
    load_before = machine_info()["loadavg"]
    results = run(args.rounds, with_nbdkit, args.only, lambda line: print(line, flush=True))
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    record = {
        "benchmark": "nbd",
        "command": "python -m benchmarks nbd"
        + (" -- " + " ".join(sys.argv[1:] if argv is None else argv) if argv else ""),
        "when": stamp,
        "machine": machine_info(accel="none (no guest)", loadavg_before=load_before),
        "settings": {
            "client": "qemu-img bench -f raw over nbd+unix:// (sequential offsets, no flushes)",
            "image_bytes": IMAGE_SIZE,
            "image": "raw file, page-cached, cache.direct=off, writeback",
            "rounds": args.rounds,
            "servers": {
                "qsd": "qemu-storage-daemon --nbd-server/--export type=nbd of file+raw nodes",
                "powercut": "powercut-storage-daemon, the same command line (harness.nbd)",
                "nbdkit-python": "nbdkit python plugin calling the same powercut BlockBackend"
                if with_nbdkit
                else "not run",
            },
            "versions": _versions(with_nbdkit),
        },
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"nbd-{stamp}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nrecorded {path}")
    return 0 if all(r["met"] for r in results) else 1


def _versions(with_nbdkit: bool) -> dict[str, str]:
    out = {}
    tools = [("qemu", ["qemu-img", "--version"])]
    if with_nbdkit:
        tools.append(("nbdkit", ["nbdkit", "--version"]))
    for name, argv in tools:
        proc = subprocess.run(argv, capture_output=True, text=True)
        out[name] = proc.stdout.splitlines()[0] if proc.stdout else "?"
    return out


if __name__ == "__main__":
    sys.exit(main())
