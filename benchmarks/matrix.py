"""The time of the durability matrix (scenarios/matrix.toml) or of some of its cells, per phase.

    python -m benchmarks.matrix [--out DIR] [--accel tcg] [--scenario scenarios/matrix.toml]
    python -m benchmarks.matrix --vs REV [--cell ID]... [--rounds 3] [--accel tcg]

Runs `powercut run SCENARIO [--cell ID]... --out DIR` as a user would (a
subprocess, the real CLI), then reads DIR/results.json: the wall time of the
run, its CPU time (every process of it: the CLI, QEMU, the backend), and per
cell its total and its phases (prepare, boot, workload, cut, reboot, check).

With `--vs REV` the same run is made at this tree and at REV (a commit checked
out in a temporary `git worktree`, its own `harness` first on PYTHONPATH and
its own copy of the scenario), alternating A B, B A, ... `--rounds` times
each, and each cell's phases are compared as medians over the rounds and as
the ratio this tree / REV, and so are the runs' wall and CPU times. This
machine is shared and noisy: only the ratios taken within one such run mean
anything, so a phase that slides (issue 19: the check phase of the
ack-records cells went from 0.4 s to 5 s unnoticed) shows here as a ratio far
from 1 next to phases that stayed put; the CPU time moves less with the
machine's other load than any wall time does.

Goals (issue 6, TCG on this machine): a cell in <= 20 s, the matrix in
<= 5 minutes. Recorded in benchmarks/results/matrix-<UTC time>.json (a
side-by-side run in matrix-vs-<UTC time>.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from statistics import median
from typing import Any

from benchmarks import machine_info

ROOT = Path(__file__).parents[1]
DEFAULT_SCENARIO = "scenarios/matrix.toml"
CELL_GOAL_S = 20.0
MATRIX_GOAL_S = 300.0


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def describe(tree: Path) -> dict[str, Any]:
    """The commit a tree is at, and whether its working files differ from it."""
    return {
        "rev": _git("rev-parse", "HEAD", cwd=tree),
        "subject": _git("log", "-1", "--format=%s", cwd=tree)[:120],
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", cwd=tree)),
    }


@contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """`rev` checked out in a temporary detached worktree, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="powercut-bench-vs-")) / "tree"
    _git("worktree", "add", "--detach", "--quiet", str(path), rev)
    try:
        yield path
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(path)],
            cwd=ROOT,
            check=False,
            capture_output=True,
        )
        shutil.rmtree(path.parent, ignore_errors=True)


def run_once(
    tree: Path, scenario: str, cells: Sequence[str], out: Path, accel: str
) -> dict[str, Any]:
    """`powercut run` from `tree` (its own harness and scenario); wall time and every cell."""
    command = [sys.executable, "-m", "harness.cli", "run", str(tree / scenario)]
    for cell in cells:
        command += ["--cell", cell]
    command += ["--out", str(out), "--accel", accel]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.run(command, cwd=tree, env=env, check=False, capture_output=True, text=True)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # Every process of the run (the CLI, QEMU, the backend) is reaped within it, so
    # the children's CPU time covers them all: a figure far less at the mercy of
    # the machine's other load than the wall time.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    try:
        results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        results = {"cells": [], "host": {}}
    return {
        "command": shlex.join(["powercut", *command[3:]]),
        "exit_status": proc.returncode,
        "seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "accel": results.get("host", {}).get("accel"),
        "cells": [
            {
                "id": c["id"],
                "verdict": c["verdict"],
                "timings": c["timings"],
                **({"reason": c["reason"]} if c["verdict"] != "pass" else {}),
            }
            for c in results["cells"]
        ],
    }


def phase_medians(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per cell id: the median of each phase over the runs where the cell reached a verdict.

    A cell that errored (a guest that did not boot, say) has no phases worth
    comparing: it is counted in `errors`, not in the medians.
    """
    by_cell: dict[str, dict[str, list[float]]] = {}
    errors: dict[str, int] = {}
    for run in runs:
        for cell in run["cells"]:
            if cell["verdict"] == "error":
                errors[cell["id"]] = errors.get(cell["id"], 0) + 1
                continue
            phases = by_cell.setdefault(cell["id"], {})
            for name, seconds in cell["timings"].items():
                phases.setdefault(name, []).append(float(seconds))
    out: dict[str, dict[str, Any]] = {}
    for cell_id in sorted(set(by_cell) | set(errors)):
        phases = by_cell.get(cell_id, {})
        out[cell_id] = {
            "runs": len(phases.get("total", [])),
            "errors": errors.get(cell_id, 0),
            "median_seconds": {k: round(median(v), 3) for k, v in phases.items()},
            "min_seconds": {k: round(min(v), 3) for k, v in phases.items()},
            "max_seconds": {k: round(max(v), 3) for k, v in phases.items()},
        }
    return out


def ratios(new: dict[str, Any], old: dict[str, Any]) -> dict[str, float]:
    """new / old per phase, for the phases both sides have (and old's median is above 0)."""
    a, b = new["median_seconds"], old["median_seconds"]
    return {k: round(a[k] / b[k], 2) for k in a if k in b and b[k] > 0}


def side_by_side(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="powercut-bench-matrix-vs-"))
    runs: dict[str, list[dict[str, Any]]] = {"new": [], "old": []}
    try:
        with worktree(args.vs) as old_tree:
            trees = {"new": ROOT, "old": old_tree}
            sides = {name: describe(tree) for name, tree in trees.items()}
            for r in range(args.rounds):
                for name in ("new", "old") if r % 2 == 0 else ("old", "new"):
                    run = run_once(
                        trees[name], args.scenario, args.cell, work / f"r{r}-{name}", args.accel
                    )
                    runs[name].append(run)
                    totals = ", ".join(
                        f"{c['verdict']} {c['timings'].get('total', 0):.1f} s" for c in run["cells"]
                    )
                    print(f"round {r} {name}: {run['seconds']:.1f} s ({totals})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: phase_medians(runs[name]) for name in runs}
    cells = {}
    for cell_id in sorted(set(medians["new"]) & set(medians["old"])):
        new, old = medians["new"][cell_id], medians["old"][cell_id]
        cells[cell_id] = {"new": new, "old": old, "ratio_new_over_old": ratios(new, old)}
    walls = {name: median(r["seconds"] for r in runs[name]) for name in runs}
    cpus = {name: median(r["cpu_seconds"] for r in runs[name]) for name in runs}
    return {
        "benchmark": "matrix-vs",
        "command": shlex.join(["python", "-m", "benchmarks.matrix", *argv]),
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(accel=runs["new"][0]["accel"] if runs["new"] else None),
        "scenario": args.scenario,
        "selected_cells": list(args.cell),
        "rounds": args.rounds,
        "order": "alternating: new old, old new, ...",
        "sides": {
            "new": {"tree": "this tree", **sides["new"]},
            "old": {"vs": args.vs, **sides["old"]},
        },
        "wall_median_seconds": {k: round(v, 2) for k, v in walls.items()},
        "wall_ratio_new_over_old": round(walls["new"] / walls["old"], 2) if walls["old"] else None,
        "cpu_median_seconds": {k: round(v, 2) for k, v in cpus.items()},
        "cpu_ratio_new_over_old": round(cpus["new"] / cpus["old"], 2) if cpus["old"] else None,
        "cells": cells,
        "runs": runs,
    }


def whole_run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    out = Path(args.out or tempfile.mkdtemp(prefix="powercut-bench-matrix-"))
    run = run_once(ROOT, args.scenario, args.cell, out, args.accel)
    cells = run["cells"]
    totals = [c["timings"].get("total", 0.0) for c in cells]
    phases: dict[str, list[float]] = {}
    for c in cells:
        for name, seconds in c["timings"].items():
            phases.setdefault(name, []).append(seconds)
    return {
        "benchmark": "matrix",
        "command": shlex.join(["python", "-m", "benchmarks.matrix", *argv]),
        "run_command": run["command"],
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(accel=run["accel"]),
        "tree": describe(ROOT),
        "exit_status": run["exit_status"],
        "matrix_seconds": round(run["seconds"], 1),
        "cpu_seconds": run["cpu_seconds"],
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
        "per_cell": cells,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.matrix")
    parser.add_argument("--out", help="results directory of the run (default: a temp dir)")
    parser.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    parser.add_argument(
        "--scenario",
        default=DEFAULT_SCENARIO,
        help="relative to each tree compared (default: %(default)s)",
    )
    parser.add_argument("--cell", action="append", default=[], help="only this cell (repeatable)")
    parser.add_argument("--vs", metavar="REV", help="compare with REV, side by side")
    parser.add_argument("--rounds", type=int, default=3, help="runs per side with --vs")
    parser.add_argument("--record", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.vs and args.out:
        parser.error("--out is for a single run; --vs runs in temporary directories")
    record = side_by_side(args, argv) if args.vs else whole_run(args, argv)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.record) / f"{record['benchmark']}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    if args.vs:
        for cell_id, cell in record["cells"].items():
            new, old = cell["new"]["median_seconds"], cell["old"]["median_seconds"]
            print(f"{cell_id}:")
            for phase, ratio in cell["ratio_new_over_old"].items():
                print(f"  {phase:9} {new[phase]:7.2f} s vs {old[phase]:7.2f} s  {ratio:.2f}x")
        wall, cpu = record["wall_median_seconds"], record["cpu_median_seconds"]
        print(
            f"wall {wall['new']} s vs {wall['old']} s ({record['wall_ratio_new_over_old']}x); "
            f"CPU {cpu['new']} s vs {cpu['old']} s ({record['cpu_ratio_new_over_old']}x); "
            f"recorded in {path}"
        )
    else:
        print(
            f"matrix: {record['matrix_seconds']} s for {record['cells']} cells "
            f"(median cell {record['cell_seconds']['median']} s); recorded in {path}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
