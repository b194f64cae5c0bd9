"""The guest image's mechanism, measured: boot to SSH and image builds, side by side.

    python -m benchmarks guest_image [-- --runs 5 --baseline 62a68fa --heavy postgresql]

Boot to SSH (QEMU start to an authenticated SSH session, TCG, the same
machine shape) for, alternating run by run so drift hits all alike:

- `today`: the RAM-only initramfs of the builder at --baseline (a git
  revision; built with that revision's own code, from this checkout's git);
- `grown`: that same initramfs grown with what the new default adds
  (mkfs.xfs, xfs_repair, mkfs.btrfs, btrfs, mkfs.f2fs, fsck.f2fs and the
  xfs, btrfs and f2fs modules) — the "just add it to the initramfs" candidate;
- `erofs`: the new default: small initramfs + mmdebstrap root as an
  uncompressed erofs disk (the recipe as committed);
- `erofs-lz4`, `squashfs`: the same root packed compressed;
- `heavy`: the new default plus --heavy packages (a database server).

Figures: the median per variant and each one's ratio to `today` (goal: the
default ≤ 1.25). Then image builds with --extra packages: cold (an empty
cache: every .deb downloaded) and warm (a cache hit; goal ≤ 1 s).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import machine_info
from harness.vm.build import build
from harness.vm.image import GuestImage
from harness.vm.qemu import QemuMachine
from harness.vm.recipe import recipe_dir
from harness.vm.spec import Accel, FileDisk, MachineSpec

GOAL_RATIO = 1.25
GOAL_WARM_SECONDS = 1.0
REPO = Path(__file__).resolve().parents[1]
# What the "grown initramfs" candidate adds to the baseline recipe.
GROWN_BINARIES = [
    "/usr/sbin/mkfs.xfs",
    "/usr/sbin/xfs_repair",
    "/usr/sbin/mkfs.btrfs",
    "/usr/bin/btrfs",
    "/usr/sbin/mkfs.f2fs",
    "/usr/sbin/fsck.f2fs",
]
GROWN_MODULES = ["xfs", "btrfs", "f2fs"]


def _baseline_image(rev: str, work: Path, *, grown: bool) -> Path:
    """Build the image of git revision `rev` with that revision's builder; its directory."""
    src = work / f"src-{rev}"
    if not src.exists():
        src.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", rev, "harness", "images"],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    recipe = src / "images"
    if grown:
        recipe = work / "grown-recipe"
        if not recipe.exists():
            shutil.copytree(src / "images", recipe)
            text = (recipe / "recipe.toml").read_text()
            extra = "".join(f'    "{b}",\n' for b in GROWN_BINARIES)
            text = text.replace('    "/bin/busybox",\n]', '    "/bin/busybox",\n' + extra + "]")
            text = text.replace(
                '"crc32c_generic", "ext4"]',
                '"crc32c_generic", "ext4", ' + ", ".join(f'"{m}"' for m in GROWN_MODULES) + "]",
            )
            (recipe / "recipe.toml").write_text(text)
    code = (
        "import sys; from pathlib import Path; from harness.vm.build import build; "
        "print(build(Path(sys.argv[1])).image.directory)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(recipe)],
        capture_output=True,
        text=True,
        check=True,
        cwd=src,
        env={**os.environ, "PYTHONPATH": str(src)},
    ).stdout
    return Path(out.strip().splitlines()[-1])


def _variant_recipe(fmt: str, work: Path) -> Path:
    """A copy of the recipe whose root is packed as `fmt`."""
    recipe = work / f"recipe-{fmt}"
    if not recipe.exists():
        shutil.copytree(recipe_dir(), recipe)
        text = (recipe / "recipe.toml").read_text()
        (recipe / "recipe.toml").write_text(text.replace('format = "erofs"', f'format = "{fmt}"'))
    return recipe


PROBED: dict[str, dict[str, object]] = {}


def _boot_once(spec: MachineSpec, accel: Accel, probe: str | None) -> tuple[float, float | None]:
    """(seconds to SSH ready, guest uptime when init printed ready); runs `probe` once."""
    with QemuMachine(spec, accel=accel) as machine:
        machine.boot(timeout=300)
        seconds = machine.boot_seconds
        uptime = None
        for line in machine.console_log.text.splitlines():
            if "ready after" in line:
                uptime = float(line.rsplit(" ", 1)[1].rstrip("s"))
        if probe:
            t0 = time.monotonic()
            r = machine.ssh.run(probe, timeout=300)
            PROBED[spec.name] = {
                "command": probe,
                "exit_code": r.exit_code,
                "output": (r.stdout + r.stderr)[-500:],
                "seconds": round(time.monotonic() - t0, 2),
            }
        machine.shutdown()
    assert seconds is not None
    return seconds, uptime


def _builds(extra: list[str]) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="powercut-bench-cache-") as tmp:
        cold = build(cache=Path(tmp), packages=extra)
        warm = build(cache=Path(tmp), packages=extra)
        t0 = time.monotonic()
        # What a new process pays: the import and a cache hit.
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; from harness.vm.build import build; "
                "assert build(cache=Path(sys.argv[1]), packages=sys.argv[2:]).cache_hit",
                tmp,
                *extra,
            ],
            check=True,
            cwd=REPO,
        )
        warm_process = time.monotonic() - t0
        root_bytes = cold.image.root_disk.stat().st_size if cold.image.root_disk else 0
    assert not cold.cache_hit and warm.cache_hit
    return {
        "packages": extra,
        "cold_seconds": round(cold.seconds, 2),
        "warm_seconds": round(warm.seconds, 4),
        "warm_new_process_seconds": round(warm_process, 3),
        "root_bytes": root_bytes,
        "goal_warm_met": warm_process <= GOAL_WARM_SECONDS,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks guest_image", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--accel", default="tcg", choices=("tcg", "kvm"))
    parser.add_argument("--baseline", default="62a68fa", help="git revision of today's image")
    parser.add_argument("--heavy", action="append", default=None, metavar="PKG")
    parser.add_argument("--extra", action="append", default=None, metavar="PKG")
    parser.add_argument(
        "--variants",
        default="today,grown,erofs,erofs-lz4,squashfs,heavy",
        help="comma-separated subset of the boot variants",
    )
    parser.add_argument("--skip-build", action="store_true", help="do not time image builds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    accel = Accel(args.accel)
    heavy = args.heavy or ["postgresql"]
    extra = args.extra or ["sqlite3", "redis-server"]
    wanted = args.variants.split(",")
    probes = {"heavy": "pg_ctlcluster 15 main start && su postgres -c 'psql -tAc \"select 1\"'"}

    images: dict[str, GuestImage] = {}
    with tempfile.TemporaryDirectory(prefix="powercut-bench-guest-") as tmp:
        work = Path(tmp)
        for name in wanted:
            print(f"image {name} ...", file=sys.stderr, flush=True)
            if name == "today":
                images[name] = GuestImage.load(_baseline_image(args.baseline, work, grown=False))
            elif name == "grown":
                images[name] = GuestImage.load(_baseline_image(args.baseline, work, grown=True))
            elif name == "erofs":
                images[name] = build().image
            elif name in ("erofs-lz4", "squashfs"):
                images[name] = build(_variant_recipe(name, work)).image
            elif name == "heavy":
                images[name] = build(packages=heavy).image
            else:
                parser.error(f"unknown variant {name}")
        disk = work / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
        specs = {
            name: MachineSpec.from_image(image, disks=(FileDisk(disk),), name=name)
            for name, image in images.items()
        }
        times: dict[str, list[float]] = {n: [] for n in specs}
        uptimes: dict[str, list[float]] = {n: [] for n in specs}
        for i in range(args.runs):
            for name, spec in specs.items():
                probe = probes.get(name) if i == 0 else None
                seconds, uptime = _boot_once(spec, accel, probe)
                times[name].append(round(seconds, 3))
                if uptime is not None:
                    uptimes[name].append(uptime)
                print(
                    f"run {i + 1}/{args.runs} {name}: {seconds:.2f}s to SSH (ready at {uptime}s)",
                    file=sys.stderr,
                    flush=True,
                )
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med.get("today")
    results: dict[str, object] = {
        "boot_to_ssh_seconds": times,
        "guest_uptime_at_ready_seconds": uptimes,
        "median_seconds": {k: round(v, 3) for k, v in med.items()},
        "ratio_to_today": {k: round(v / base, 3) for k, v in med.items()} if base else {},
        "sizes": {
            name: {
                "initramfs_bytes": img.initramfs.stat().st_size,
                "root_disk_bytes": img.root_disk.stat().st_size if img.root_disk else 0,
            }
            for name, img in images.items()
        },
        "probes": PROBED,
    }
    if base and "erofs" in med:
        results["goal"] = f"erofs (the default) / today <= {GOAL_RATIO}"
        results["goal_met"] = med["erofs"] / base <= GOAL_RATIO
    if not args.skip_build:
        results["image_build"] = _builds(extra)
    now = datetime.datetime.now(datetime.UTC)
    record = {
        "benchmark": "guest_image",
        "command": "python -m benchmarks guest_image -- " + " ".join(argv),
        "date": now.isoformat(timespec="seconds"),
        "machine": machine_info(accel=accel.value),
        "method": "alternating boots of each variant, median of --runs; QEMU start to an "
        "authenticated SSH session; one 64 MiB scratch disk as /dev/vda",
        "settings": {
            "runs": args.runs,
            "baseline": args.baseline,
            "heavy": heavy,
            "extra": extra,
            "images": {name: img.recipe_hash for name, img in images.items()},
            "memory_mib": 512,
            "cpus": 1,
        },
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"guest-image-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"recorded in {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
