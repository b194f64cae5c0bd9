"""Cluster crash states checked per second, against the runner's cells per second, in one run.

    python -m benchmarks cluster_explore [-- --max-states 3 --scenario scenarios/etcd-cluster.toml
                                            --no-runner]

The scenario's first cell is explored as `powercut explore` explores it
(`ClusterExplorer`: every node recorded once, then each cluster state
checked by booting every node on its crash-state overlay, `start`, `ready`
and the client's `check`), with shrinking off so every check is a sampled
state's. The figure is the cluster states checked per second of checking
(the recording apart, reported beside it); with the runner (the default)
the same cell also runs once through `ClusterCellRunner`, as `powercut run`
runs it, and the ratio of one explored state to one runner cell is given.

Results: benchmarks/results/cluster-explore-<time>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import machine_info
from harness.crash.cluster_run import ClusterCellRunner
from harness.crash.explorer.cluster import ClusterExplorer
from harness.crash.images import CellImages
from harness.explore.spec import ExploreSpec
from harness.scenario.cells import expand
from harness.scenario.parse import load_scenario
from harness.vm.spec import Accel

ROOT = Path(__file__).parents[1]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks cluster_explore", description=__doc__
    )
    parser.add_argument("--max-states", type=int, default=3)
    parser.add_argument("--scenario", type=Path, default=ROOT / "scenarios" / "etcd-cluster.toml")
    parser.add_argument("--no-runner", action="store_true", help="skip the runner's cell")
    parser.add_argument("--accel", default="tcg", choices=("tcg", "kvm"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    scenario = load_scenario(args.scenario)
    assert scenario.cluster is not None, f"{args.scenario} has no [cluster]"
    cell = expand(scenario)[0]
    spec = dataclasses.replace(scenario.explore or ExploreSpec(), minimize=0)
    images = CellImages()
    images.prepare([cell])
    accel = Accel(args.accel)
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="powercut-bench-cluster-explore-") as tmp:
        explorer = ClusterExplorer(
            cell,
            spec,
            Path(tmp) / "explore" / "cell",
            images(cell),
            out=Path(tmp) / "explore",
            index=0,
            max_states=args.max_states,
            accel=accel,
        )
        t0 = time.monotonic()
        record = explorer.run().record
        total = time.monotonic() - t0
        cluster = record.cluster
        assert cluster is not None
        checked = len(cluster.states)
        check_s = record.counts.check_seconds
        results["explore"] = {
            "verdict": record.verdict.value if record.verdict else None,
            "reason": record.reason,
            "record_s": record.seconds.record,
            "states_checked": checked,
            "states_unjudged": record.counts.states_unjudged,
            "check_s": check_s,
            "cluster_states_per_s": round(checked / check_s, 5) if check_s else None,
            "s_per_state": round(check_s / checked, 1) if checked else None,
            "total_s": round(total, 3),
            "states": [
                {"id": s.id, "verdict": s.verdict.value, "seconds": s.seconds, "client": s.client}
                for s in cluster.states
            ],
        }
        print(json.dumps(results["explore"]), file=sys.stderr)
        if not args.no_runner:
            out = Path(tmp) / "run"
            runner = ClusterCellRunner(
                cell, out / "cell", images(cell), accel=accel, out=out, reproduce="benchmark"
            )
            result = runner.run()
            results["runner"] = {
                "verdict": result.verdict,
                "reason": result.reason,
                "total_s": result.timings.get("total"),
                "timings": dict(result.timings),
            }
            per_state = results["explore"]["s_per_state"]  # type: ignore[index]
            if per_state and result.timings.get("total"):
                results["state_vs_cell"] = round(per_state / result.timings["total"], 3)
            print(json.dumps(results["runner"]), file=sys.stderr)
    now = datetime.datetime.now(datetime.UTC)
    entry = {
        "benchmark": "cluster-explore",
        "command": "python -m benchmarks cluster_explore -- " + " ".join(argv),
        "date": now.isoformat(timespec="seconds"),
        "machine": machine_info(accel=args.accel),
        "method": "one run; the scenario's first cell explored (shrinking off) and, unless "
        "--no-runner, run once by the runner; check seconds are the states' own",
        "settings": {
            "scenario": str(args.scenario.relative_to(ROOT))
            if args.scenario.is_relative_to(ROOT)
            else str(args.scenario),
            "cell": cell.id,
            "max_states": args.max_states,
        },
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cluster-explore-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(entry, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"recorded in {path}", file=sys.stderr)
    return 0 if results["explore"]["verdict"] == "pass" else 1  # type: ignore[index]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
