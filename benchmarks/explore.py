"""Crash-state exploration, host side: states checked per second on a 64 MiB ext4 disk.

    python -m benchmarks explore [-- --steps 40 --states 600 --workers 2 --seed 1]

1. Record once: a 64 MiB ext4 image (mkfs defaults), `--steps` real ext4
   operations (`harness.testing.ext4traffic`: debugfs operations journalled
   the way jbd2 orders its writes, with barriers) through
   log-writes (with data) over powerfail over file, each step acknowledged by
   a mark in the log. No VM, no kernel mount.
2. Enumerate `--states` states (every policy, 8 per point).
3. Check each host-side, the oracle and `e2fsck -p -f` with journal recovery
   on the reusable scratch image (undone by e2undo), identical images once;
   with `--workers` scratch images in parallel, and with one. Goal: >= 100
   states/s.
4. The same host-side judgement made the way the runner makes it after a
   power cut, per state, in the same run: a sparse copy of the recorded image
   and journal, the offline cut (`apply_cut`), the whole oracle and `e2fsck`
   on the copy. (The runner adds two guest boots and the workload per cell on
   top: about 5.3-6.2 s per cell on this kind of machine, shared/facts.md.)
5. The negative control: the same operations without barriers; how many of
   the states fail e2fsck, the first failing state shrunk by ddmin, and what
   its writes hold (debugfs attribution).
6. In real guests (`--no-vm` skips it), one workload side by side in the same
   run: ack-records (fsync) on a 64 MiB ext4 under writeback, `--guest-states`
   states. Today's runner on its cell (boot, workload, host power cut, oracle,
   reboot, mount, check, fsck: one state per cell); `powercut explore` on the
   same cell (record once, host-side checks while the checker guest boots,
   in-guest checks: mount, `ackrecords --check` with the acks of the point,
   umount); and the host-side checks of that recording again with nothing else
   running. Rates are states per second; the ratios are against the runner's.
   Goals: host-side >= 100/s, in-guest >= 3/s, >= 500x and >= 15x the runner.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import machine_info
from harness.block import open_backend
from harness.durability.contract import CacheMode, CutPolicy, Promise
from harness.durability.cut import apply_cut
from harness.durability.oracle import check
from harness.durability.writelog import read_log
from harness.explore.attribute import attribute_extents
from harness.explore.doc import StateVerdict
from harness.explore.hostcheck import Ext4Checker, HostChecker, explore_host
from harness.explore.minimize import minimize_state
from harness.explore.recording import (
    Recording,
    acks_from_marks,
    open_recording,
    snapshot_base,
    sparse_copy,
    write_recording,
)
from harness.explore.states import Bounds, Timeline, enumerate_states
from harness.testing.ext4traffic import Ext4Traffic

IMAGE_SIZE = 64 << 20
GOAL = 100.0


def record(tmp: Path, steps: int, seed: int, barriers: bool) -> tuple[Recording, dict[str, Any]]:
    tmp.mkdir(parents=True, exist_ok=True)
    img = tmp / "disk.img"
    with open(img, "wb") as f:
        f.truncate(IMAGE_SIZE)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    root = tmp / "rec"
    snapshot_base(img, root)
    backend = open_backend(
        {
            "driver": "log-writes",
            "node-name": "lw",
            "log": str(root / "write.log"),
            "log-data": True,
            "file": {
                "driver": "powerfail",
                "journal": str(tmp / "disk.journal"),
                "file": {"driver": "file", "filename": str(img)},
            },
        },
        cache="writeback",
    )
    lw: Any = backend.node("lw")
    t0 = time.perf_counter()
    traffic = Ext4Traffic(
        backend,
        root / "base.img",
        seed=seed,
        barriers=barriers,
        on_ack=lambda step: lw.mark(f"ack {step}"),
    )
    traffic.run(steps)
    seconds = time.perf_counter() - t0
    backend.graph.close()  # the power cut: no final flush
    wlog = read_log(root / "write.log")
    write_recording(root, mode=CacheMode.WRITEBACK, acks=acks_from_marks(wlog))
    rec = open_recording(root)
    return rec, {
        "barriers": barriers,
        "steps": steps,
        "writes": traffic.writes,
        "flushes": traffic.flushes,
        "log_records": wlog.records,
        "log_bytes": rec.log.stat().st_size,
        "seconds": round(seconds, 2),
        "image": str(img),
        "journal": str(tmp / "disk.journal"),
    }


def explore(rec: Recording, states: int, workers: int, seed: int, tmp: Path) -> dict[str, Any]:
    tl = Timeline(rec.read_log(), Promise.FLUSHED, rec.acks)
    bounds = Bounds(max_states=states, per_point=8, seed=seed)
    t0 = time.perf_counter()
    todo = list(enumerate_states(tl, bounds))
    enum_s = time.perf_counter() - t0
    checkers = []
    with tempfile.TemporaryDirectory(prefix="explore-bench-", dir=_shm(tmp)) as shm:
        for w in range(workers):
            work = Path(shm) / str(w)
            work.mkdir()
            checkers.append(
                HostChecker(
                    tl, rec.log, rec.base, Promise.FLUSHED, fsck=Ext4Checker(work), workdir=work
                )
            )
        try:
            t0 = time.perf_counter()
            result = explore_host(checkers, todo)
            wall = time.perf_counter() - t0
        finally:
            for hc in checkers:
                hc.close()
    fsck = [o.seconds for r in result.results for o in r.findings if o.seconds]
    return {
        "workers": workers,
        "points": len(tl.points),
        "enumerate_seconds": round(enum_s, 3),
        "states_explored": result.explored,
        "states_unique": result.unique,
        "states_failing": len(result.failing),
        "failing_by_policy": _count(r.state.policy.value for r in result.failing),
        "check_seconds": round(wall, 3),
        "states_per_s": round(result.explored / wall, 1),
        "unique_states_per_s": round(result.unique / wall, 1),
        "e2fsck_runs": len(fsck),
        "e2fsck_with_undo_mean_ms": round(1000 * sum(fsck) / max(1, len(fsck)), 2),
        "_result": result,
    }


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def _shm(tmp: Path) -> str:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else str(tmp)


def runner_way(rec: Recording, info: dict[str, Any], n: int, tmp: Path) -> dict[str, Any]:
    """Per state, what the runner does host-side after a cut: copy, cut, oracle, fsck."""
    with tempfile.TemporaryDirectory(prefix="explore-bench-", dir=_shm(tmp)) as shm:
        return _runner_way(rec, info, n, Path(shm))


def _runner_way(rec: Recording, info: dict[str, Any], n: int, work: Path) -> dict[str, Any]:
    conf = work / "e2fsck.conf"
    conf.write_text("[options]\n\tbroken_system_clock = 1\n")
    env = {**os.environ, "E2FSCK_CONFIG": str(conf)}
    policies = [CutPolicy.LOSE_ALL, CutPolicy.KEEP_ALL, CutPolicy.RANDOM, CutPolicy.TORN]
    t0 = time.perf_counter()
    for i in range(n):
        img, jr = work / "cut.img", work / "cut.journal"
        sparse_copy(info["image"], img)
        sparse_copy(info["journal"], jr)
        apply_cut(img, jr, policies[i % len(policies)], seed=i)
        check(img, rec.log, Promise.FLUSHED)
        subprocess.run(["e2fsck", "-p", "-f", str(img)], capture_output=True, env=env, check=False)
    wall = time.perf_counter() - t0
    return {"states": n, "seconds": round(wall, 3), "states_per_s": round(n / wall, 2)}


def negative_control(
    rec: Recording, states: int, workers: int, seed: int, tmp: Path
) -> dict[str, Any]:
    out = explore(rec, states, workers, seed, tmp)
    result = out.pop("_result")
    first = next((r for r in result.results if r.verdict is StateVerdict.FAIL), None)
    out["first_failing_index"] = result.results.index(first) if first else None
    if first is None:
        return out
    tl = Timeline(rec.read_log(), Promise.FLUSHED, rec.acks)
    with (
        tempfile.TemporaryDirectory(prefix="explore-bench-", dir=_shm(tmp)) as work,
        HostChecker(
            tl, rec.log, rec.base, Promise.FLUSHED, fsck=Ext4Checker(work), workdir=work
        ) as hc,
    ):
        t0 = time.perf_counter()
        m = minimize_state(first.state, lambda s: hc.check(s).failed, max_checks=100)
        min_s = time.perf_counter() - t0
    seqs = [seq for seq in m.state.lost] + [seq for seq, _s in m.state.torn]
    extents = [(tl.by_seq[s].offset, tl.by_seq[s].length) for s in seqs]
    roles = attribute_extents(rec.base, extents)
    out["minimized"] = {
        "state": first.state.id,
        "losses_before": len(first.state.lost) + len(first.state.torn),
        "losses_after": len(seqs),
        "checks": m.checks,
        "seconds": round(min_s, 2),
        "writes": [
            {
                **tl.by_seq[s].to_json(),
                "holds": sorted({r.describe() for r in blocks}),
            }
            for s, blocks in zip(seqs, roles, strict=True)
        ],
        "fsck": first.findings[0].detail if first.findings else "",
    }
    return out


GUEST_SCENARIO = """\
name = "explore-bench"
modes = ["writeback"]
disk-size = "64M"
seed = {seed}

[[fault]]
model = "host-power-cut"
policy = "lose-all"

[[workload]]
kind = "ack-records"
records = {records}
sync = "fsync"

[cut]
after-exit = true

[explore]
max-states = {states}
minimize = 0
"""
GUEST_GOAL = 3.0
HOST_RATIO_GOAL = 500.0
GUEST_RATIO_GOAL = 15.0


def in_guests(tmp: Path, states: int, records: int, seed: int) -> dict[str, Any]:
    """Step 6: the runner and exploration on the same cell, in this run."""
    from harness.crash.explorer.cell import CellExplorer, ExploreOptions
    from harness.crash.explorer.record import recorded_run
    from harness.crash.explorer.run import ExploreDoc, exploration_cells, spec_for
    from harness.crash.plan import make_plan
    from harness.crash.runner import run_plan
    from harness.explore.recording import open_recording
    from harness.vm.build import ensure_image

    tmp.mkdir(parents=True, exist_ok=True)
    scenario = tmp / "explore-bench.toml"
    scenario.write_text(GUEST_SCENARIO.format(seed=seed, records=records, states=states))
    image = ensure_image()
    plan = make_plan([scenario], tmp / "runner")
    t0 = time.perf_counter()
    outcome = run_plan(plan, command="benchmark", image=image)
    runner_wall = time.perf_counter() - t0
    (cell_result,) = outcome.results.cells
    runner_cell = float(cell_result.timings.get("total", runner_wall))
    (cell,) = exploration_cells(plan.scenarios, plan.cells)
    spec = spec_for(cell, plan.scenarios)
    out = tmp / "explore"
    doc = ExploreDoc(out, "benchmark")
    t0 = time.perf_counter()
    result = CellExplorer(
        cell,
        spec,
        out / "cells" / "000",
        image,
        out=out,
        index=0,
        options=ExploreOptions(workers=1),
        doc=doc,
    ).run()
    explore_wall = time.perf_counter() - t0
    doc.finish()
    entry = result.record.to_json()  # as explore.json has it
    guest = entry.get("guest") or {}
    # The host side again on the same recording, alone on the machine.
    recorded = recorded_run(
        open_recording(out / "cells" / "000" / "recording"), out / "cells" / "000"
    )
    alone = CellExplorer(
        cell,
        spec,
        tmp / "alone",
        None,
        out=tmp / "alone",
        index=0,
        options=ExploreOptions(workers=1, guest=False),
        doc=ExploreDoc(tmp / "alone", "bench"),
    )
    t0 = time.perf_counter()
    alone.explore(recorded)
    host_wall = time.perf_counter() - t0
    alone_entry = alone.snapshot().to_json()
    host_rate = float(alone_entry["host_states_per_s"])
    runner_rate = 1.0 / runner_cell
    guest_rate = float(guest.get("states_per_s", 0.0))
    explored = int(entry["states_explored"])
    return {
        "workload": "ack-records, fsync, 64 MiB ext4, writeback, cut after exit",
        "records": records,
        "runner": {
            "verdict": cell_result.verdict,
            "cell_seconds": round(runner_cell, 2),
            "timings": cell_result.timings,
            "states_per_s": round(runner_rate, 4),
        },
        "explore": {
            "verdict": entry["verdict"],
            "reason": entry["reason"],
            "states_explored": explored,
            "states_unique": entry["states_unique"],
            "states_failing": entry["states_failing"],
            "acks": entry.get("acks"),
            "points_explored": len(entry.get("points", [])),
            "seconds": entry["seconds"],
            "wall_seconds": round(explore_wall, 2),
            "host_states_per_s_while_the_guest_boots": entry.get("host_states_per_s"),
            "guest": guest,
            "runner_cuts": entry.get("runner_cuts"),
            "end_to_end_states_per_s": round(explored / explore_wall, 2),
        },
        "host_side_alone": {
            "states": alone_entry["states_explored"],
            "seconds": round(host_wall, 3),
            "states_per_s": host_rate,
        },
        "ratios": {
            "host_side_vs_runner": round(host_rate / runner_rate, 1),
            "in_guest_vs_runner": round(guest_rate / runner_rate, 1),
            "in_guest_checks_vs_runner": round(
                float(guest.get("checks_per_s", 0.0)) / runner_rate, 1
            ),
            "end_to_end_vs_runner": round(explored / explore_wall / runner_rate, 1),
        },
        "goals": {
            "host_side_states_per_s": GOAL,
            "in_guest_states_per_s": GUEST_GOAL,
            "host_side_vs_runner": HOST_RATIO_GOAL,
            "in_guest_vs_runner": GUEST_RATIO_GOAL,
        },
        "goals_met": {
            "host_side": host_rate >= GOAL,
            "in_guest": guest_rate >= GUEST_GOAL,
            "host_side_vs_runner": host_rate / runner_rate >= HOST_RATIO_GOAL,
            "in_guest_vs_runner": guest_rate / runner_rate >= GUEST_RATIO_GOAL,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.explore",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=40, help="ext4 operations recorded")
    parser.add_argument("--states", type=int, default=600, help="states to explore")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runner-states", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory")
    parser.add_argument("--no-vm", action="store_true", help="skip step 6 (real guests)")
    parser.add_argument("--guest-states", type=int, default=300, help="step 6: states per cell")
    parser.add_argument("--guest-records", type=int, default=60, help="step 6: records written")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rec, recording = record(Path(tmp) / "barriers", args.steps, args.seed, barriers=True)
        print(
            f"recorded {recording['steps']} ext4 operations: {recording['writes']} writes, "
            f"{recording['flushes']} flushes in {recording['seconds']} s",
            flush=True,
        )
        many = explore(rec, args.states, args.workers, args.seed, Path(tmp))
        many.pop("_result")
        one = explore(rec, args.states, 1, args.seed, Path(tmp))
        one.pop("_result")
        for r in (many, one):
            print(
                f"{r['workers']} worker(s): {r['states_explored']} states "
                f"({r['states_unique']} unique, {r['states_failing']} failing) in "
                f"{r['check_seconds']} s = {r['states_per_s']} states/s "
                f"(e2fsck + e2undo {r['e2fsck_with_undo_mean_ms']} ms each)",
                flush=True,
            )
        runner = runner_way(rec, recording, args.runner_states, Path(tmp))
        ratio = many["states_per_s"] / runner["states_per_s"]
        print(
            f"the runner's host-side way: {runner['states_per_s']} states/s; "
            f"exploration {ratio:.1f}x that",
            flush=True,
        )
        nrec, nrecording = record(Path(tmp) / "nobarrier", args.steps, args.seed, barriers=False)
        neg = negative_control(nrec, min(args.states, 100), args.workers, args.seed, Path(tmp))
        print(
            f"nobarrier: {neg['states_failing']} of {neg['states_explored']} states fail "
            f"(first at #{neg['first_failing_index']}); minimized: "
            f"{json.dumps(neg.get('minimized', {}).get('writes', []))[:300]}",
            flush=True,
        )
        guests = None
        if not args.no_vm:
            guests = in_guests(Path(tmp) / "vm", args.guest_states, args.guest_records, args.seed)
            print(json.dumps({k: guests[k] for k in ("ratios", "goals_met")}), flush=True)
            print(
                f"in guests: runner {guests['runner']['cell_seconds']} s per cell; host side "
                f"{guests['host_side_alone']['states_per_s']} states/s; in-guest "
                f"{guests['explore']['guest'].get('states_per_s')} states/s "
                f"({guests['explore']['guest'].get('checks_per_s')} checks/s)",
                flush=True,
            )
    for rdict in (recording, nrecording):
        rdict.pop("image")
        rdict.pop("journal")
    report = {
        "benchmark": "explore",
        "command": " ".join(
            [
                os.path.basename(sys.executable),
                "-m",
                "benchmarks.explore",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {
            "image_size": IMAGE_SIZE,
            "steps": args.steps,
            "states": args.states,
            "workers": args.workers,
            "seed": args.seed,
            "per_point": 8,
            "checks": "oracle (pending sectors; whole log at 1 point in 32) + e2fsck -p -f "
            "with journal recovery, undone by e2undo",
        },
        "recording": recording,
        "host_side": many,
        "host_side_one_worker": one,
        "runner_way": runner,
        "ratio_vs_runner_way": round(ratio, 1),
        "goal_states_per_s": GOAL,
        "goal_met": many["states_per_s"] >= GOAL,
        "nobarrier": {"recording": nrecording, **neg},
        "in_guests": guests,
    }
    if guests is not None:
        report["goal_met"] = report["goal_met"] and all(guests["goals_met"].values())
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out / f"explore-{stamp}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"recorded {out}")
    return 0 if report["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
