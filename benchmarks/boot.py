"""Guest boot to SSH-ready: our boot path against the plain one, in one run.

    python -m benchmarks boot [-- --runs 5 --accel tcg --out benchmarks/results]

"ours" is what QemuMachine boots: qboot firmware, the decompressed kernel
through its PVH entry, the stubbed initramfs. "plain" is the same initramfs
with SeaBIOS and Debian's compressed bzImage. The two alternate run by run,
so drift on a shared machine hits both alike; the figure is each one's median
time from QEMU's start to a working SSH session, and their ratio. Goal: ours
takes half the plain time or less, and 5 s or less. Also recorded: the image
build cold (empty cache, so it includes `apt-get download`) and warm (a cache hit).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks import machine_info
from harness.vm.build import build, ensure_image
from harness.vm.qemu import QemuMachine
from harness.vm.spec import Accel, FileDisk, MachineSpec

GOAL_RATIO = 0.5
GOAL_SECONDS = 5.0


def _boot_once(spec: MachineSpec, accel: Accel) -> tuple[float, float | None]:
    """(seconds to SSH ready, guest uptime when init printed ready)."""
    with QemuMachine(spec, accel=accel) as machine:
        machine.boot(timeout=180)
        seconds = machine.boot_seconds
        uptime = None
        for line in machine.console_log.text.splitlines():
            if "ready after" in line:
                uptime = float(line.rsplit(" ", 1)[1].rstrip("s"))
        machine.shutdown()
    assert seconds is not None
    return seconds, uptime


def _image_build_times() -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="powercut-bench-cache-") as tmp:
        cold = build(cache=Path(tmp))
        warm = build(cache=Path(tmp))
    assert not cold.cache_hit and warm.cache_hit
    return {"cold_seconds": round(cold.seconds, 2), "warm_seconds": round(warm.seconds, 2)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks boot", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--accel", default="tcg", choices=("tcg", "kvm"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--skip-build", action="store_true", help="do not time image builds")
    args = parser.parse_args(argv)
    accel = Accel(args.accel)

    image = ensure_image()
    with tempfile.TemporaryDirectory(prefix="powercut-bench-boot-") as tmp:
        disk = Path(tmp) / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
        ours = MachineSpec.from_image(image, disks=(FileDisk(disk),), name="ours")
        plain = dataclasses.replace(ours, kernel=image.bzimage, firmware=None, name="plain")
        times: dict[str, list[float]] = {"ours": [], "plain": []}
        uptimes: dict[str, list[float]] = {"ours": [], "plain": []}
        for i in range(args.runs):
            for name, spec in (("ours", ours), ("plain", plain)):
                seconds, uptime = _boot_once(spec, accel)
                times[name].append(round(seconds, 3))
                if uptime is not None:
                    uptimes[name].append(uptime)
                print(
                    f"run {i + 1}/{args.runs} {name}: {seconds:.2f}s to SSH "
                    f"(guest ready at {uptime}s)",
                    file=sys.stderr,
                    flush=True,
                )
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["ours"] / med["plain"]
    results: dict[str, object] = {
        "boot_to_ssh_seconds": times,
        "guest_uptime_at_ready_seconds": uptimes,
        "median_seconds": {k: round(v, 3) for k, v in med.items()},
        "ratio_ours_to_plain": round(ratio, 3),
        "goal": f"ratio <= {GOAL_RATIO} and ours <= {GOAL_SECONDS}s",
        "goal_met": ratio <= GOAL_RATIO and med["ours"] <= GOAL_SECONDS,
        "initramfs_bytes": image.initramfs.stat().st_size,
        "kernel_bytes": {
            "vmlinux": image.kernel.stat().st_size,
            "bzimage": image.bzimage.stat().st_size,
        },
    }
    if not args.skip_build:
        results["image_build"] = _image_build_times()
    now = datetime.datetime.now(datetime.UTC)
    record = {
        "benchmark": "boot",
        "command": "python -m benchmarks boot -- " + " ".join(argv),
        "date": now.isoformat(timespec="seconds"),
        "machine": machine_info(accel=accel.value),
        "method": "alternating boots of each variant, median of --runs; "
        "QEMU start to an authenticated SSH session",
        "settings": {
            "runs": args.runs,
            "memory_mib": ours.memory_mib,
            "cpus": ours.cpus,
            "ours": "qboot + vmlinux (PVH)",
            "plain": "SeaBIOS + bzImage",
            "cmdline": ours.cmdline,
            "image": image.recipe_hash,
        },
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"boot-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"recorded in {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
