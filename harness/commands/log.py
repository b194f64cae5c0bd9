"""`powercut log`: read a log-writes write log, or export it for dm-log-writes tools."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness.durability.writelog import Op, WriteLog, export_dm_log_writes, read_log

NAME = "log"
HELP = "show a write log (log-writes node) or export it in dm-log-writes format"


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="log_command", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="list the requests in a write log")
    show.add_argument("log", type=Path)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.add_argument("--limit", type=int, default=0, help="show only the first N requests")
    export = sub.add_parser("export", help="write the log in another format")
    export.add_argument("log", type=Path)
    export.add_argument("--format", required=True, choices=["dm-log-writes"])
    export.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="the file to write (a dm-log-writes log device image)",
    )


def _summary(wlog: WriteLog) -> dict[str, object]:
    by_op: dict[str, int] = {}
    for r in wlog.requests:
        by_op[r.op.label] = by_op.get(r.op.label, 0) + 1
    return {
        "log": str(wlog.path),
        "version": 1,
        "sector_size": wlog.header.sector_size,
        "flags": [
            str(f.name).lower() for f in type(wlog.header.flags) if f and f in wlog.header.flags
        ],
        "records": wlog.records,
        "requests": len(wlog.requests),
        "by_op": by_op,
        "fua_writes": sum(1 for r in wlog.requests if r.fua),
        "in_flight": sum(1 for r in wlog.requests if r.status is None),
        "failed": sum(1 for r in wlog.requests if r.status not in (None, 0)),
        "opens": wlog.opens,
        "torn_tail_bytes": wlog.torn_bytes,
        "marks": [label for _i, label in wlog.marks],
    }


def run(args: argparse.Namespace) -> int:
    wlog = read_log(args.log)
    if args.log_command == "export":
        n = export_dm_log_writes(wlog, args.output)
        print(f"wrote {n} dm-log-writes entries to {args.output}")
        return 0
    requests = wlog.requests[: args.limit] if args.limit else wlog.requests
    if args.json:
        print(json.dumps({**_summary(wlog), "entries": [r.to_json() for r in requests]}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    summary = _summary(wlog)
    console = Console()
    console.print(
        f"{summary['log']}: {summary['requests']} requests {summary['by_op']}, "
        f"{summary['fua_writes']} FUA, {summary['in_flight']} in flight, "
        f"{summary['failed']} failed, torn tail {summary['torn_tail_bytes']} bytes"
    )
    table = Table("seq", "op", "offset", "length", "flags", "latency µs", "status")
    for r in requests:
        latency = (
            f"{(r.complete_ns - r.submit_ns) / 1000:.1f}" if r.complete_ns is not None else "-"
        )
        flags = ",".join(x for x, on in (("fua", r.fua), ("data", r.data_offset is not None)) if on)
        status = (
            "in flight" if r.status is None else ("ok" if r.status == 0 else f"errno {r.status}")
        )
        table.add_row(
            str(r.seq),
            r.op.label,
            "" if r.op == Op.FLUSH else str(r.offset),
            "" if r.op == Op.FLUSH else str(r.length),
            flags,
            latency,
            status,
        )
    console.print(table)
    return 0
