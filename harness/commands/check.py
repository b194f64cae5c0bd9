"""`powercut check`: run the durability oracle on an image after a power cut."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness.durability.contract import cache_mode_names, parse_cache_mode
from harness.durability.oracle import check

NAME = "check"
HELP = "check an image after a power cut against a cache mode's durability contract"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, help="the image after `powercut cut`")
    parser.add_argument("--log", type=Path, required=True, help="the log-writes node's log= file")
    parser.add_argument(
        "--mode",
        required=True,
        choices=cache_mode_names(),
        help="the cache mode whose host-power-cut contract applies",
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="OUT",
        help="write the report as JSON to OUT (default: stdout)",
    )
    parser.add_argument(
        "--max-violations", type=int, default=20, help="how many violations to list (default 20)"
    )


def run(args: argparse.Namespace) -> int:
    report = check(
        args.image, args.log, parse_cache_mode(args.mode), max_violations=args.max_violations
    )
    if args.json is not None:
        document = json.dumps(report.to_json(), indent=2)
        if args.json == "-":
            print(document)
        else:
            Path(args.json).write_text(document + "\n")
    if args.json != "-":
        print(report.summary())
        for v in report.violations:
            expected = "initial content" if v.expected_seq is None else f"write {v.expected_seq}"
            found = {None: "no known content", 0: "the initial content"}.get(
                v.found_seq, f"write {v.found_seq}"
            )
            print(f"  sector {v.sector}: {v.kind}: expected {expected}, found {found}")
    return 0 if report.ok else 1
