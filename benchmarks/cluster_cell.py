"""A 3-node rack cell against a 1-node cell of the same workload, in one run; memory per node.

    python -m benchmarks cluster_cell [-- --runs 1 --nodes 3 --scenario scenarios/etcd-cluster.toml]

Both cells are the shipped scenario's first cell (etcd, writeback, host power
cut lose-all, a rack cut after 20 acknowledged puts) run through
`ClusterCellRunner` exactly as `powercut run` does; the 1-node cell is the
same scenario with `nodes = 1` (a single etcd member: the same start, ready,
client and check). Sizes alternate run by run, and the ratio of the medians
of each cell's total seconds is the figure (goal: 3 nodes <= 3x one node, 2
cores, TCG). QEMU's RSS of every node is read from /proc/PID/status when the
cut moment comes (the cluster at work), and VmHWM then. Phase timings are
the cells' own (`timings` in results.json).

Results: benchmarks/results/cluster-cell-<time>.json.
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
from typing import Any

from benchmarks import machine_info
from harness.crash.cluster_run import ClusterCellRunner
from harness.crash.images import CellImages
from harness.crash.session import CrashSession
from harness.scenario.cells import expand
from harness.scenario.cluster import NodeSpec
from harness.scenario.parse import load_scenario
from harness.vm.spec import Accel
from harness.workloads.base import Run

GOAL_RATIO = 3.0
ROOT = Path(__file__).parents[1]


class MeasuredRunner(ClusterCellRunner):
    """A cluster cell that reads each node's QEMU RSS at the cut moment."""

    memory: dict[str, dict[str, float]]

    def _wait_for_cut(self, client: CrashSession, run: Run) -> None:
        super()._wait_for_cut(client, run)
        self.memory = {}
        for name, session in self.sessions.items():
            proc = session.machine.process
            if proc is not None:
                self.memory[name] = _status_mib(proc.pid)


def _status_mib(pid: int) -> dict[str, float]:
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks cluster_cell", description=__doc__)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--scenario", type=Path, default=ROOT / "scenarios" / "etcd-cluster.toml")
    parser.add_argument("--accel", default="tcg", choices=("tcg", "kvm"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    scenario = load_scenario(args.scenario)
    assert scenario.cluster is not None, f"{args.scenario} has no [cluster]"
    cells = {}
    for n in (args.nodes, 1):
        cluster = dataclasses.replace(
            scenario.cluster, nodes=tuple(NodeSpec(f"n{i}") for i in range(1, n + 1))
        )
        cells[n] = expand(dataclasses.replace(scenario, cluster=cluster))[0]
    images = CellImages()
    images.prepare(list(cells.values()))
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in cells}
    with tempfile.TemporaryDirectory(prefix="powercut-bench-cluster-cell-") as tmp:
        for run in range(args.runs):
            for n, cell in cells.items():
                out = Path(tmp) / f"r{run}-n{n}"
                runner = MeasuredRunner(
                    cell,
                    out / "cell",
                    images(cell),
                    accel=Accel(args.accel),
                    out=out,
                    reproduce="benchmark",
                )
                result = runner.run()
                row = {
                    "verdict": result.verdict,
                    "reason": result.reason,
                    "acknowledged": result.writes_acknowledged,
                    "lost": result.lost,
                    "timings": dict(result.timings),
                    "qemu_memory_mib_at_cut": getattr(runner, "memory", {}),
                }
                runs[n].append(row)
                print(f"run {run + 1}/{args.runs}, {n} node(s): {json.dumps(row)}", file=sys.stderr)
    medians = {
        n: statistics.median(r["timings"]["total"] for r in rows) for n, rows in runs.items()
    }
    ratio = medians[args.nodes] / medians[1]
    rss = [m["VmRSS"] for r in runs[args.nodes] for m in r["qemu_memory_mib_at_cut"].values()]
    results = {
        "runs": {f"{n}-node": rows for n, rows in runs.items()},
        "median_total_s": {f"{n}-node": round(v, 3) for n, v in medians.items()},
        "ratio": round(ratio, 3),
        "goal": f"{args.nodes} nodes / 1 node <= {GOAL_RATIO}",
        "goal_met": ratio <= GOAL_RATIO,
        "qemu_rss_mib_per_node_median": round(statistics.median(rss), 1) if rss else None,
    }
    now = datetime.datetime.now(datetime.UTC)
    record = {
        "benchmark": "cluster-cell",
        "command": "python -m benchmarks cluster_cell -- " + " ".join(argv),
        "date": now.isoformat(timespec="seconds"),
        "machine": machine_info(accel=args.accel),
        "method": "one run; the scenario's first cell with N nodes and with 1, alternating; "
        "each cell's own total seconds; QEMU RSS from /proc/PID/status at the cut moment",
        "settings": {
            "scenario": str(args.scenario.relative_to(ROOT))
            if args.scenario.is_relative_to(ROOT)
            else str(args.scenario),
            "cell": cells[args.nodes].id,
            "memory_mib_per_node": scenario.cluster.memory_mib,
            "runs": args.runs,
        },
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cluster-cell-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"recorded in {path}", file=sys.stderr)
    ok = all(r["verdict"] == "pass" for rows in runs.values() for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
