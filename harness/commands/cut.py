"""`powercut cut`: apply a host power cut to an image offline, from its powerfail journal."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness.durability.cut import CutPolicy, apply_cut

NAME = "cut"
HELP = "apply a host power cut to an image from its powerfail undo journal"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, help="the image below the powerfail node")
    parser.add_argument(
        "--journal", type=Path, required=True, help="the powerfail node's journal= file"
    )
    parser.add_argument(
        "--policy",
        required=True,
        choices=[p.value for p in CutPolicy],
        help="which writes that were not durable are lost",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for random, prefix and torn (same seed, same image)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="OUT",
        help="also write what was reverted as JSON to OUT ('-' for stdout)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="report what would be reverted; change neither image nor journal",
    )
    parser.add_argument(
        "--keep-journal", action="store_true", help="do not empty the journal after the cut"
    )


def run(args: argparse.Namespace) -> int:
    result = apply_cut(
        args.image,
        args.journal,
        args.policy,
        args.seed,
        dry_run=args.dry_run,
        reset=not args.keep_journal,
    )
    document = json.dumps(result.to_json(), indent=2)
    if args.json is not None and str(args.json) == "-":
        print(document)
        return 0
    if args.json is not None:
        args.json.write_text(document + "\n")
    print(("would cut " if args.dry_run else "cut ") + f"{args.image}: {result.summary()}")
    for w in result.reverted[:20]:
        state = "in flight" if w.completion is None else f"completion {w.completion}"
        print(
            f"  seq {w.seq} {w.kind} offset {w.offset} length {w.length} ({state}): "
            f"{w.blocks_reverted}/{w.blocks_total} blocks reverted"
        )
    if len(result.reverted) > 20:
        print(f"  ... {len(result.reverted) - 20} more (see --json)")
    return 0
