"""`powercut bench`: fio in one guest against three disk backends, side by side.

    powercut bench --out DIR [--rounds 3] [--runtime 5] [--host]

One guest gets three disks of identical content: (a) this project's
vhost-user-blk backend (`powercut serve`), (b) qemu-storage-daemon's
vhost-user-blk export, (c) QEMU's built-in virtio-blk — all with the same
cache mode. fio runs 4 KiB random reads and writes at queue depth 1 and 16
and 1 MiB sequential reads and writes at depth 4 on each, slice by slice,
rotating which backend goes first, for `--rounds` rounds: guest figures
under TCG swing by a third from run to run, so only same-run medians and
their ratios mean anything. DIR/bench.json holds every slice and the
medians; the table shows powercut relative to the other two.
`--host` adds the guest-less comparison of the backends themselves
(harness.testing.hostbench).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import ConfigError, MachineError

NAME = "bench"
HELP = "compare powercut, qemu-storage-daemon and built-in virtio-blk with fio in one guest"

log = logging.getLogger(__name__)

BACKENDS = ("powercut", "qemu-storage-daemon", "builtin")
MIB = 1 << 20


@dataclass(frozen=True)
class GuestWorkload:
    name: str
    rw: str
    bs: str
    iodepth: int

    @property
    def big(self) -> bool:
        return self.bs == "1m"


WORKLOADS = (
    GuestWorkload("4k-randread-qd1", "randread", "4k", 1),
    GuestWorkload("4k-randread-qd16", "randread", "4k", 16),
    GuestWorkload("4k-randwrite-qd1", "randwrite", "4k", 1),
    GuestWorkload("4k-randwrite-qd16", "randwrite", "4k", 16),
    GuestWorkload("1m-read-qd4", "read", "1m", 4),
    GuestWorkload("1m-write-qd4", "write", "1m", 4),
)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-out"),
        metavar="DIR",
        help="where bench.json goes (default ./bench-out)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument(
        "--runtime", type=float, default=5.0, metavar="S", help="seconds per fio slice (default 5)"
    )
    parser.add_argument("--size-mib", type=int, default=256, help="disk size (default 256)")
    parser.add_argument(
        "--cache",
        default="writeback",
        metavar="MODE",
        help="cache mode for all three backends (default writeback)",
    )
    parser.add_argument(
        "--only",
        default="",
        metavar="PREFIX",
        help="only workloads whose name starts with PREFIX (e.g. 4k)",
    )
    parser.add_argument(
        "--host", action="store_true", help="also compare the backends without a guest (host-side)"
    )
    parser.add_argument("--no-guest", action="store_true", help="skip the guest comparison")
    parser.add_argument("--accel", default=None, help="kvm or tcg (default: probe)")


def _fill(path: Path, size: int) -> None:
    chunk = os.urandom(MIB)
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(chunk)


def _guest_disks(ssh: Any, sizes: dict[str, int]) -> dict[str, str]:
    """Backend name -> /dev/vdX, matched by disk size (each backend's image differs by 1 MiB)."""
    out = ssh.check_output("for d in /sys/block/vd*; do echo ${d##*/} $(cat $d/size); done")
    by_size = {
        int(sectors) * 512: dev
        for dev, sectors in (line.split() for line in out.splitlines() if line.strip())
    }
    found = {}
    for name, size in sizes.items():
        if size not in by_size:
            raise MachineError(f"the guest has no disk of {size} bytes for {name}: {out!r}")
        found[name] = f"/dev/{by_size[size]}"
    return found


def _fio(ssh: Any, dev: str, w: GuestWorkload, runtime: float, size_mib: int) -> dict[str, float]:
    from harness.guest.fio import RW, FioJob, run_fio

    job = FioJob(
        name=w.name,
        filename=dev,
        rw=RW(w.rw),
        bs=w.bs,
        iodepth=w.iodepth,
        size=f"{size_mib}m",
        runtime=runtime,
        time_based=True,
    )
    result = run_fio(ssh, [job], timeout=runtime * 10 + 120)
    j = result.jobs[0]
    d = j.read if w.rw.endswith("read") else j.write
    return {
        "iops": round(d.iops, 1),
        "mbps": round(d.bw_bytes / 1e6, 2),
        "clat_mean_us": round(d.clat.mean_us, 1),
    }


def run_guest(
    args: argparse.Namespace, workdir: Path, workloads: list[GuestWorkload], progress: Any
) -> dict[str, Any]:
    from harness.block.cache import parse_cache_mode
    from harness.vm.accel import choose_accel, parse_accel
    from harness.vm.backends import make_backend
    from harness.vm.build import ensure_image
    from harness.vm.qemu import QemuMachine
    from harness.vm.spec import MachineSpec

    image = ensure_image()
    accel = choose_accel(parse_accel(args.accel), image.kernel)
    cache = parse_cache_mode(args.cache)
    sizes = {name: (args.size_mib + i) * MIB for i, name in enumerate(BACKENDS)}
    backends = []
    for i, name in enumerate(BACKENDS):
        path = workdir / f"{name}.img"
        _fill(path, sizes[name])
        backends.append(
            make_backend(name, path, workdir / name, cache=cache, num_queues=1, name=f"disk{i}")
        )
    slices: list[dict[str, Any]] = []
    try:
        disks = [b.start() for b in backends]
        spec = MachineSpec.from_image(
            image, disks=tuple(disks), cpus=2, memory_mib=512, name="bench"
        )
        machine = QemuMachine(spec, workdir=workdir / "vm", accel=accel)
        try:
            machine.boot(timeout=300)
            devices = _guest_disks(machine.ssh, sizes)
            for rnd in range(args.rounds):
                for i, w in enumerate(workloads):
                    shift = (rnd + i) % len(BACKENDS)
                    for name in BACKENDS[shift:] + BACKENDS[:shift]:
                        figures = _fio(machine.ssh, devices[name], w, args.runtime, args.size_mib)
                        slices.append(
                            {"round": rnd + 1, "workload": w.name, "backend": name, **figures}
                        )
                        progress(
                            f"round {rnd + 1} {w.name:<18} {name:>20} "
                            f"{figures['iops']:9.0f} IOPS {figures['mbps']:8.1f} MB/s"
                        )
        finally:
            machine.close()
    finally:
        for b in backends:
            b.stop()
    summary = []
    for w in workloads:
        med = {
            name: statistics.median(
                s["iops"] for s in slices if s["workload"] == w.name and s["backend"] == name
            )
            for name in BACKENDS
        }
        summary.append(
            {
                "workload": w.name,
                "median_iops": {k: round(v, 1) for k, v in med.items()},
                "median_mbps": {
                    k: round(v * (MIB if w.big else 4096) / 1e6, 1) for k, v in med.items()
                },
                "ratio_vs_qsd": round(med["powercut"] / med["qemu-storage-daemon"], 3)
                if med["qemu-storage-daemon"]
                else None,
                "ratio_vs_builtin": round(med["powercut"] / med["builtin"], 3)
                if med["builtin"]
                else None,
            }
        )
    return {
        "accel": accel.value,
        "cache": args.cache,
        "runtime_s": args.runtime,
        "rounds": args.rounds,
        "slices": slices,
        "summary": summary,
    }


def run(args: argparse.Namespace) -> int:
    import tempfile

    from rich.console import Console
    from rich.table import Table

    if args.rounds < 1:
        raise ConfigError("--rounds must be at least 1")
    console = Console(width=None if Console().is_terminal else 110)
    workloads = [w for w in WORKLOADS if w.name.startswith(args.only)]
    record: dict[str, Any] = {
        "benchmark": "powercut bench",
        "command": "powercut bench "
        + " ".join(
            f"--{k.replace('_', '-')}={v}"
            for k, v in sorted(vars(args).items())
            if k in ("out", "rounds", "runtime", "size_mib", "cache", "only", "host", "no_guest")
        ),
        "when": datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ"),
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "load_average": os.getloadavg(),
        },
    }
    started = time.monotonic()
    if not args.no_guest:
        with tempfile.TemporaryDirectory(prefix="powercut-bench-") as tmp:
            guest = run_guest(args, Path(tmp), workloads, console.print)
        record["guest"] = guest
        table = Table(
            title=f"fio in one guest ({guest['accel']}, cache={args.cache}, "
            f"medians of {args.rounds} rounds)"
        )
        for col in ("workload", *BACKENDS, "vs qsd", "vs builtin"):
            table.add_column(col, justify="right")
        for s in guest["summary"]:
            big = s["workload"].startswith("1m")
            fig = s["median_mbps"] if big else s["median_iops"]
            unit = " MB/s" if big else ""
            table.add_row(
                s["workload"],
                *(f"{fig[b]:.0f}{unit}" for b in BACKENDS),
                f"{s['ratio_vs_qsd']:.2f}",
                f"{s['ratio_vs_builtin']:.2f}",
            )
        console.print(table)
    if args.host:
        from harness.testing.hostbench import run_host_bench

        host = run_host_bench(
            seconds=max(1.0, args.runtime / 2),
            rounds=args.rounds,
            only=args.only,
            progress=console.print,
        )
        record["host"] = host
        table = Table(title="host side, no guest: powercut / qemu-storage-daemon")
        for col in ("workload", "powercut", "qsd", "ratio", "goal"):
            table.add_column(col, justify="right")
        for r in host:
            big = r["block"] >= MIB
            pc, qsd = (
                (r["powercut_mbps"], r["qsd_mbps"]) if big else (r["powercut_iops"], r["qsd_iops"])
            )
            unit = " MB/s" if big else " IOPS"
            table.add_row(
                r["workload"],
                f"{pc:.0f}{unit}",
                f"{qsd:.0f}{unit}",
                f"{r['ratio']:.2f}",
                f">= {r['goal']} {'ok' if r['met'] else 'missed'}",
            )
        console.print(table)
    record["elapsed_s"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    console.print(f"recorded {path}")
    return 0
