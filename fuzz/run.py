"""Run every atheris target for N seconds each; `tox -e fuzz -- [SECONDS] [--record FILE]`.

The committed seeds in fuzz/corpus/<target>/ are read, never written: new
inputs go to a work corpus (default .fuzz/, or --work), crashes to
<work>/crashes/. With --record, a JSON summary (executions, crashes, the
command) is written for benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = {"vhost_messages": 8192, "virtqueue": 4096}  # target: -max_len


def run_target(name: str, seconds: int, work: Path) -> dict[str, object]:
    corpus = work / name
    crashes = work / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    before = set(crashes.iterdir())
    argv = [
        sys.executable,
        str(HERE / f"{name}.py"),
        str(corpus),
        str(HERE / "corpus" / name),
        f"-max_total_time={seconds}",
        f"-max_len={TARGETS[name]}",
        f"-artifact_prefix={crashes}/{name}-",
        "-print_final_stats=1",
    ]
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - t0
    out = proc.stderr + proc.stdout
    (work / f"{name}.log").write_text(out)
    done = re.findall(r"Done (\d+) runs", out) or re.findall(
        r"stat::number_of_executed_units:\s*(\d+)", out
    )
    cov = re.findall(r"cov: (\d+) ft: (\d+)", out)
    found = sorted(str(p) for p in set(crashes.iterdir()) - before)
    return {
        "target": name,
        "seconds": round(elapsed, 1),
        "executions": int(done[-1]) if done else None,
        "coverage_edges": int(cov[-1][0]) if cov else None,
        "features": int(cov[-1][1]) if cov else None,
        "corpus_files": len(list(corpus.iterdir())),
        "crashes": len(found),
        "crash_files": found,
        "exit_code": proc.returncode,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seconds", nargs="?", type=int, default=120, help="per target")
    parser.add_argument("--work", type=Path, default=Path(".fuzz"))
    parser.add_argument("--record", type=Path, help="write the JSON summary here")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS))
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results = []
    for name in args.target or sorted(TARGETS):
        result = run_target(name, args.seconds, args.work)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.record:
        summary = {
            "command": " ".join(["python", *sys.argv]),
            "started_utc": started,
            "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
            "targets": results,
        }
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(summary, indent=1) + "\n")
    return 1 if any(r["crashes"] or r["exit_code"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
