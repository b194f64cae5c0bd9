"""Host-side vhost-user-blk backends, side by side: powercut vs qemu-storage-daemon.

    python -m benchmarks.vhost [--seconds 2] [--rounds 3] [--only 4k] [--out benchmarks/results]

See harness/testing/hostbench.py for the method. Goals: 4 KiB IOPS at least
0.8x qemu-storage-daemon's, 1 MiB bandwidth at least 0.9x. Each run is
recorded as benchmarks/results/vhost-host-<time>.json with the command and
the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

from benchmarks import machine_info
from harness.testing.hostbench import IMAGE_SIZE, run_host_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vhost", description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0, help="per slice")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--only",
        metavar="PREFIX",
        default="",
        help="run only the workloads whose name starts with PREFIX (e.g. 1m)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if shutil.which("qemu-storage-daemon") is None:
        print("qemu-storage-daemon is not installed (ci/bootstrap installs it)", file=sys.stderr)
        return 2
    results = run_host_bench(
        seconds=args.seconds,
        rounds=args.rounds,
        only=args.only,
        progress=lambda line: print(line, flush=True),
    )
    print(f"\n{'workload':<18} {'powercut':>12} {'qsd':>12} {'ratio':>7}  goal")
    for r in results:
        mb = r["block"] >= 1 << 20
        pc, qsd = (r["powercut_mbps"], r["qsd_mbps"]) if mb else (r["powercut_iops"], r["qsd_iops"])
        print(
            f"{r['workload']:<18} {pc:12.0f} {qsd:12.0f} {r['ratio']:7.2f}  >= {r['goal']} "
            f"{'ok' if r['met'] else 'MISSED'} ({'MB/s' if mb else 'IOPS'})"
        )
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    record = {
        "benchmark": "vhost-host",
        "command": "python -m benchmarks.vhost " + " ".join(sys.argv[1:] if argv is None else argv),
        "when": stamp,
        "machine": machine_info(accel="none (no guest)"),
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
    return 0 if all(r["met"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
