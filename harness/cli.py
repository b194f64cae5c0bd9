"""The `powercut` command: a thin dispatcher over `harness.commands`.

Each module in `harness/commands/` is one subcommand and defines
`NAME`, `HELP`, `register(parser)` and `run(args) -> int`. Discovering them
keeps this file out of every change that adds a command.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence
from types import ModuleType

import harness.commands
from harness import __version__
from harness.errors import PowercutError


def _command_modules() -> list[ModuleType]:
    modules = []
    for info in pkgutil.iter_modules(harness.commands.__path__):
        if info.name.startswith("_"):
            continue
        modules.append(importlib.import_module(f"harness.commands.{info.name}"))
    return sorted(modules, key=lambda m: m.NAME)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="powercut",
        description="Crash-consistency test harness for virtual disks.",
    )
    parser.add_argument("--version", action="version", version=f"powercut {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _command_modules():
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.register(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        status: int = args._run(args)
    except PowercutError as exc:
        print(f"powercut {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"powercut {args.command}: interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
