"""The durability matrix with N workers against 1, side by side in one run.

    python -m benchmarks.parallel [--jobs 2] [--accel auto] [--scenario matrix] [--rounds 1]

Runs `powercut run SCENARIO --out DIR -j 1` and `... -j N` as a user would
(subprocesses, the real CLI), alternating, `--rounds` times each, and
records the wall times and their ratio (issue 14's target on this 2-core
machine: >= 1.4x with 2 workers). Recorded in
benchmarks/results/parallel-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

from benchmarks import machine_info

ROOT = Path(__file__).parents[1]
TARGET = 1.4


def _run(scenario: str, out: Path, jobs: int, accel: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "harness.cli", "run", scenario, "--out", str(out)]
    command += ["-j", str(jobs), "--accel", accel]
    t0 = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, check=False, capture_output=True, text=True)
    wall = time.monotonic() - t0
    results = json.loads((out / "results.json").read_text())
    cells = results["cells"]
    return {
        "jobs": jobs,
        "command": shlex.join(["powercut", *command[3:]]),
        "exit_status": proc.returncode,
        "seconds": round(wall, 1),
        "cells": len(cells),
        "verdicts": {
            v: sum(c["verdict"] == v for c in cells) for v in {c["verdict"] for c in cells}
        },
        "cell_seconds_median": round(median(c["timings"].get("total", 0.0) for c in cells), 1),
        "accel": results["host"].get("accel"),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.parallel")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    parser.add_argument("--scenario", default="matrix")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--record", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="powercut-bench-parallel-"))
    runs: list[dict[str, Any]] = []
    try:
        for r in range(args.rounds):
            for jobs in (1, args.jobs) if r % 2 == 0 else (args.jobs, 1):
                runs.append(_run(args.scenario, work / f"r{r}-j{jobs}", jobs, args.accel))
                print(f"-j {jobs}: {runs[-1]['seconds']} s {runs[-1]['verdicts']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one = median(r["seconds"] for r in runs if r["jobs"] == 1)
    many = median(r["seconds"] for r in runs if r["jobs"] == args.jobs)
    ratio = round(one / many, 2)
    record = {
        "benchmark": "parallel",
        "command": shlex.join(["python", "-m", "benchmarks.parallel", *argv]),
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(accel=runs[0]["accel"]),
        "scenario": args.scenario,
        "jobs": args.jobs,
        "seconds_j1": one,
        f"seconds_j{args.jobs}": many,
        "speedup": ratio,
        "target": TARGET,
        "runs": runs,
    }
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.record) / f"parallel-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{args.scenario}: -j 1 {one} s, -j {args.jobs} {many} s: {ratio}x; recorded in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
