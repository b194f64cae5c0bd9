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


def _command_names() -> list[str]:
    return sorted(
        info.name
        for info in pkgutil.iter_modules(harness.commands.__path__)
        if not info.name.startswith("_")
    )


def _command_modules(only: str | None = None) -> list[ModuleType]:
    # Importing a command pulls in its whole stack (matplotlib for reports, the
    # vhost server, ...); `powercut io` is scripted in loops, so a run imports
    # only the command it runs, and --help imports them all.
    names = [only] if only is not None else _command_names()
    return [importlib.import_module(f"harness.commands.{name}") for name in names]


def _requested_command(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if arg in ("-h", "--help"):
            return None
        if not arg.startswith("-"):
            return arg if arg in _command_names() else None
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="powercut",
        description="Crash-consistency test harness for virtual disks.",
    )
    parser.add_argument("--version", action="version", version=f"powercut {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _command_modules(_requested_command(argv)):
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.register(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
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
