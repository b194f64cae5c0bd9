"""What tracing costs a cell's run phase, and what the explanation costs per failing state.

    python -m benchmarks explain [-- --rounds 3 --fsyncs 200 --inserts 30 --no-explore]

1. The same cell, traced and not, side by side (rounds alternate, so the
   shared machine's drift hits both alike), through the runner itself
   (`CellRunner`, trace on and off): boot, the workload, the cut after it
   exits, the reboot and the check. Two cells, writeback, 64 MiB ext4:
   `fsync-loop` (one Perl process appending 4 KiB and fsyncing, `--fsyncs`
   times, acknowledging each) and `sqlite` (the shipped sqlite scenario's
   run: one sqlite3 process per insert, `--inserts` of them). The run phase is
   the `run` timing: from the run command's start to its end, traced or not
   (the tracer's own work before and after it, `trace_prepare` and
   `trace_finish`, is reported apart, as is the whole cell). The issue's
   budget is a run phase at most 1.5x untraced.
2. `powercut explore` of the shipped faulty rename example (explain-rename,
   ext4): the explanation's time per failing state (the recovered tree listed
   in the checker guest once per image, and the engine), from explore.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import machine_info

ROOT = Path(__file__).resolve().parents[1]

CELLS = {
    "fsync-loop": """\
name = "fsync-loop"
modes = ["writeback"]
disk-size = "64M"
seed = 1
timeout = 900

[[fault]]
model = "host-power-cut"
policy = "lose-all"

[[workload]]
kind = "command"
run = '''perl -e 'use IO::Handle; $| = 1; open(my $f, ">>", "log") or die;
  for my $i (1 .. {n}) {{ syswrite($f, "x" x 4096); $f->sync or die; print "ack $i\\n" }}' '''
check = "test -f log && seq $(( $(stat -c %s log) / 4096 )); true"

[cut]
after-exit = true
""",
    "sqlite": """\
name = "sqlite"
modes = ["writeback"]
packages = ["sqlite3"]
disk-size = "64M"
seed = 1
timeout = 900

[[fault]]
model = "host-power-cut"
policy = "lose-all"

[[workload]]
kind = "command"
setup = "sqlite3 app.db 'pragma journal_mode=wal; create table t(n integer primary key)' >/dev/null"
run = '''for i in $(seq {n}); do
  sqlite3 app.db "pragma synchronous=full; insert into t values($i)" && echo ack $i; done'''
check = "sqlite3 app.db 'select n from t'"

[cut]
after-exit = true
""",
}


def _cell(name: str, n: int, tmp: Path) -> Any:
    from harness.crash.plan import make_plan

    tmp.mkdir(parents=True, exist_ok=True)
    scenario = tmp / f"{name}.toml"
    scenario.write_text(CELLS[name].format(n=n))
    plan = make_plan([scenario], tmp / "plan")
    (cell,) = plan.cells
    return cell, plan


def side_by_side(rounds: int, sizes: dict[str, int], tmp: Path) -> dict[str, Any]:
    """Part 1: each cell traced and untraced, rounds alternating."""
    from harness.crash.cell_run import CellRunner
    from harness.crash.images import CellImages
    from harness.vm.accel import choose_accel

    out: dict[str, Any] = {}
    for name, n in sizes.items():
        cell, plan = _cell(name, n, tmp / name)
        images = CellImages()
        images.prepare([cell])
        image = images(cell)
        wanted = None if plan.accel == "auto" else plan.accel
        accel = choose_accel(wanted, image.kernel)
        runs: dict[str, list[dict[str, Any]]] = {"off": [], "traced": []}
        for r in range(rounds):
            order = ("off", "traced") if r % 2 == 0 else ("traced", "off")
            for variant in order:
                directory = tmp / name / f"{variant}-{r}"
                t0 = time.perf_counter()
                result = CellRunner(
                    cell,
                    directory,
                    image,
                    accel=accel,
                    out=tmp / name,
                    reproduce="",
                    trace=variant == "traced",
                ).run()
                wall = time.perf_counter() - t0
                entry = {
                    "round": r,
                    "verdict": result.verdict,
                    "reason": result.reason,
                    "trace": result.trace,
                    "run_s": result.timings.get("run"),
                    "trace_prepare_s": result.timings.get("trace_prepare"),
                    "trace_finish_s": result.timings.get("trace_finish"),
                    "workload_s": result.timings.get("workload"),
                    "cell_s": round(wall, 3),
                    "load": [round(x, 2) for x in os.getloadavg()],
                }
                runs[variant].append(entry)
                print(f"{name} round {r} {variant}: {json.dumps(entry)}", flush=True)
        off = [e["run_s"] for e in runs["off"] if e["run_s"]]
        on = [e["run_s"] for e in runs["traced"] if e["run_s"]]
        per_round = [
            round(t["run_s"] / o["run_s"], 3)
            for o, t in zip(runs["off"], runs["traced"], strict=True)
            if o["run_s"] and t["run_s"]
        ]
        median_off = statistics.median(off) if off else None
        median_on = statistics.median(on) if on else None
        out[name] = {
            "n": n,
            "runs": runs,
            "run_median_s": {"off": median_off, "traced": median_on},
            "ratio_of_medians": round(median_on / median_off, 3)
            if median_off and median_on
            else None,
            "ratio_per_round": per_round,
            # Rounds pair a traced and an untraced run back to back: the median of their
            # ratios is what a load that moves between rounds disturbs least.
            "ratio_median_per_round": round(statistics.median(per_round), 3) if per_round else None,
            "cell_median_s": {
                v: statistics.median(e["cell_s"] for e in runs[v]) for v in ("off", "traced")
            },
        }
    return out


def explain_cost(tmp: Path) -> dict[str, Any]:
    """Part 2: the explanation's time per failing state, on the shipped faulty example."""
    from harness.crash.explorer.cell import CellExplorer, ExploreOptions
    from harness.crash.explorer.run import ExploreDoc, exploration_cells, spec_for
    from harness.crash.images import CellImages
    from harness.crash.plan import make_plan
    from harness.vm.accel import choose_accel

    plan = make_plan([ROOT / "scenarios" / "explain-rename.toml"], tmp / "plan")
    cells = [
        c for c in exploration_cells(plan.scenarios, plan.cells) if c.disk.filesystem == "ext4"
    ]
    (cell,) = cells
    images = CellImages()
    images.prepare([cell])
    image = images(cell)
    accel = choose_accel(None if plan.accel == "auto" else plan.accel, image.kernel)
    out = tmp / "explore"
    doc = ExploreDoc(out, "benchmark")
    result = CellExplorer(
        cell,
        spec_for(cell, plan.scenarios),
        out / "cells" / "000",
        image,
        out=out,
        index=0,
        options=ExploreOptions(workers=1),
        accel=accel,
        doc=doc,
    ).run()
    doc.finish()
    record = result.record
    failing = record.failing
    per_state = [s.explanation.seconds for s in failing if s.explanation is not None]
    explain_s = record.seconds.explain or 0.0
    return {
        "cell": record.id,
        "verdict": record.verdict.value if record.verdict else None,
        "states_explored": record.counts.states_explored,
        "states_failing": len(failing),
        "images_listed": len({s.digest for s in failing}),
        "explain_phase_s": explain_s,
        "per_failing_state_s": round(explain_s / len(failing), 3) if failing else None,
        "per_state_median_s": statistics.median(x for x in per_state if x is not None)
        if per_state
        else None,
        "per_state_max_s": max((x for x in per_state if x is not None), default=None),
        "causes": [g.line() for g in record.causes],
        "seconds": record.seconds.to_json(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks explain")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fsyncs", type=int, default=200)
    parser.add_argument("--inserts", type=int, default=30)
    parser.add_argument("--cells", default="fsync-loop,sqlite")
    parser.add_argument("--no-explore", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    load_before = os.getloadavg()
    sizes = {"fsync-loop": args.fsyncs, "sqlite": args.inserts}
    wanted = {name: sizes[name] for name in args.cells.split(",") if name}
    with tempfile.TemporaryDirectory(prefix="powercut-bench-explain-") as tmp:
        overhead = side_by_side(args.rounds, wanted, Path(tmp) / "overhead")
        explained = None if args.no_explore else explain_cost(Path(tmp) / "explain")
    ratios = [v["ratio_of_medians"] for v in overhead.values() if v["ratio_of_medians"]]
    report = {
        "benchmark": "explain",
        "command": " ".join(
            [
                os.path.basename(sys.executable),
                "-m",
                "benchmarks",
                "explain",
                "--",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {"rounds": args.rounds, **wanted},
        "run_phase_traced_vs_off": overhead,
        "explanation": explained,
        "budget": 1.5,
        "budget_met": bool(ratios) and all(r <= 1.5 for r in ratios),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"explain-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"recorded {path}")
    return 0 if report["budget_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
