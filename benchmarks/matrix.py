"""The time of one cell and of the whole durability matrix (scenarios/matrix.toml).

    python -m benchmarks.matrix [--out DIR] [--accel tcg] [--scenario scenarios/matrix.toml]

Runs `powercut run SCENARIO --out DIR` as a user would (a subprocess, the
real CLI), then reads DIR/results.json: the wall time of the whole run, and
per cell its total and its phases (boot, workload, cut, reboot, check).
Goals (issue 6, TCG on this machine): a cell in <= 20 s, the matrix in
<= 5 minutes. Recorded in benchmarks/results/matrix-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

from benchmarks import machine_info

ROOT = Path(__file__).parents[1]
CELL_GOAL_S = 20.0
MATRIX_GOAL_S = 300.0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.matrix")
    parser.add_argument("--out", help="results directory of the run (default: a temp dir)")
    parser.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    parser.add_argument("--scenario", default=str(ROOT / "scenarios" / "matrix.toml"))
    parser.add_argument("--record", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="powercut-bench-matrix-"))
    command = [
        sys.executable,
        "-m",
        "harness.cli",
        "run",
        args.scenario,
        "--out",
        str(out),
        "--accel",
        args.accel,
    ]
    t0 = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, check=False)
    wall = time.monotonic() - t0
    results = json.loads((out / "results.json").read_text())
    cells = results["cells"]
    totals = [c["timings"].get("total", 0.0) for c in cells]
    phases: dict[str, list[float]] = {}
    for c in cells:
        for name, seconds in c["timings"].items():
            phases.setdefault(name, []).append(seconds)
    record: dict[str, Any] = {
        "benchmark": "matrix",
        "command": shlex.join(
            ["python", "-m", "benchmarks.matrix", *argv]
            if argv
            else ["python", "-m", "benchmarks.matrix"]
        ),
        "run_command": shlex.join(["powercut", *command[3:]]),
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(accel=results["host"].get("accel")),
        "exit_status": proc.returncode,
        "matrix_seconds": round(wall, 1),
        "matrix_goal_seconds": MATRIX_GOAL_S,
        "cells": len(cells),
        "verdicts": {
            v: sum(c["verdict"] == v for c in cells) for v in {c["verdict"] for c in cells}
        },
        "cell_seconds": {
            "median": round(median(totals), 1) if totals else None,
            "min": round(min(totals), 1) if totals else None,
            "max": round(max(totals), 1) if totals else None,
            "goal": CELL_GOAL_S,
        },
        "phase_median_seconds": {k: round(median(v), 2) for k, v in phases.items()},
        "per_cell": [
            {"id": c["id"], "verdict": c["verdict"], "timings": c["timings"]} for c in cells
        ],
    }
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.record) / f"matrix-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"matrix: {record['matrix_seconds']} s for {len(cells)} cells "
        f"(median cell {record['cell_seconds']['median']} s); recorded in {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
