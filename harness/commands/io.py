"""`powercut io`: drive any node graph from the shell, in the spirit of qemu-io.

    powercut io -f raw -t writethrough -c 'write -P 0xab 0 4k' -c flush disk.img
    powercut io --image-opts -c stats 'driver=raw,file.driver=file,file.filename=disk.img'

Output and exit status follow qemu-io (0 when every command worked, 1 when
any failed or the image could not be opened), so scripts written for one
read the other. Beyond qemu-io: `stats` (the backend's statistics as JSON)
and `write-cache on|off` (the guest's run-time write-cache toggle).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable

from harness.block import BlockBackend, open_backend
from harness.block.options import parse_bool, parse_dotted, parse_size
from harness.block.throttle import ThrottleLimits, create_group, delete_group
from harness.errors import BlockError, ConfigError, PowercutError

NAME = "io"
HELP = "run qemu-io style commands (read, write, discard, flush, info, stats) on an image"

_FORMATS = ("raw", "file")


class _Usage(Exception):
    """A command line inside -c that does not parse; qemu-io prints it and goes on."""


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f",
        "--format",
        choices=_FORMATS,
        default=None,
        help="image format (default raw): raw, or file for no format node",
    )
    parser.add_argument(
        "-t",
        "--cache",
        default="writeback",
        metavar="MODE",
        help="cache mode: writeback (default), none, writethrough, directsync, unsafe",
    )
    parser.add_argument("-n", "--nocache", action="store_true", help="same as -t none (as qemu-io)")
    parser.add_argument(
        "-d",
        "--discard",
        default="unmap",
        choices=("ignore", "off", "unmap", "on"),
        help="discard mode (default unmap, as qemu-io)",
    )
    parser.add_argument("-r", "--read-only", action="store_true", help="open read-only")
    parser.add_argument(
        "-c",
        "--cmd",
        action="append",
        default=[],
        metavar="CMD",
        help="a command to run (repeatable); without -c, commands are read from standard input",
    )
    parser.add_argument(
        "--image-opts",
        action="store_true",
        help="IMAGE is a --blockdev option string, e.g. "
        "driver=raw,file.driver=file,file.filename=d.img",
    )
    parser.add_argument(
        "--object",
        action="append",
        default=[],
        metavar="SPEC",
        help="create an object first, as qemu-io: throttle-group,id=ID,limits.iops-total=N,... "
        "(or x-iops-total=N)",
    )
    parser.add_argument("image", metavar="IMAGE", help="image file (or options with --image-opts)")


def run(args: argparse.Namespace) -> int:
    cache = "none" if args.nocache else args.cache
    if args.image_opts:
        if args.format is not None:
            raise ConfigError(
                "--image-opts and -f are mutually exclusive; put driver= in the options"
            )
        options: str | dict[str, object] = args.image
        if "discard=" not in args.image:
            options = f"{args.image},discard={args.discard}"
    else:
        file_node = {"driver": "file", "filename": args.image}
        if (args.format or "raw") == "raw":
            options = {"driver": "raw", "file": file_node, "discard": args.discard}
        else:
            options = {**file_node, "discard": args.discard}
    groups: list[str] = []
    try:
        for spec in args.object:
            groups.append(_create_object(spec))
    except PowercutError:
        for group in groups:
            delete_group(group)
        raise
    try:
        backend = open_backend(options, cache=cache, read_only=args.read_only)
    except PowercutError as exc:
        print(f"powercut io: can't open device {args.image}: {exc}", file=sys.stderr)
        for group in groups:
            delete_group(group)
        return 1
    failed = False
    try:
        lines: Iterable[str] = args.cmd if args.cmd else sys.stdin
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line in ("quit", "q", "exit"):
                break
            if not run_command(backend, line):
                failed = True
    finally:
        backend.close()
        for group in groups:
            delete_group(group)
    return 1 if failed else 0


def _create_object(spec: str) -> str:
    """`--object throttle-group,id=tg0,limits.iops-total=100`, the one object this needs."""
    kind, _, rest = spec.partition(",")
    if kind != "throttle-group":
        raise ConfigError(f"--object {kind!r} is not supported; the only object is throttle-group")
    props = parse_dotted(rest) if rest else {}
    group_id = props.pop("id", None)
    if not group_id:
        raise ConfigError("--object throttle-group needs id=NAME")
    limits: dict[str, str] = {}
    for key, value in props.items():
        for prefix in ("limits.", "x-"):
            if key.startswith(prefix):
                limits[key[len(prefix) :]] = value
                break
        else:
            raise ConfigError(
                f"--object throttle-group: unknown property {key!r}; use limits.<limit> "
                "(e.g. limits.iops-total=100) or x-<limit>"
            )
    create_group(group_id, ThrottleLimits.parse(limits, ""))
    return group_id


def run_command(backend: BlockBackend, line: str) -> bool:
    """Run one command line; print what qemu-io would. False when it failed."""
    try:
        argv = shlex.split(line)
    except ValueError as exc:
        print(f"cannot parse {line!r}: {exc}")
        return False
    name, rest = argv[0], argv[1:]
    handler = _COMMANDS.get(name)
    if handler is None:
        print(f'command "{name}" not found; commands: {", ".join(sorted(_COMMANDS))}')
        return False
    try:
        return handler(backend, rest)
    except _Usage as exc:
        print(f"{name}: {exc}")
        return False
    except BlockError as exc:
        print(f"{name} failed: {os.strerror(exc.errno)} ({exc})")
        return False
    except ConfigError as exc:
        print(f"{name}: {exc}")
        return False


# -- argument helpers ----------------------------------------------------------


def _num(text: str) -> int:
    try:
        return parse_size(text, "number")
    except ConfigError:
        raise _Usage(
            f"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {text}"
        ) from None


def _pattern(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise _Usage(f"invalid pattern {text!r}; give a byte, e.g. 0xab") from None
    if not 0 <= value <= 255:
        raise _Usage(f"invalid pattern {text!r}; give a byte, e.g. 0xab")
    return value


def _split(
    argv: list[str], flags: str, with_value: str, positional: int
) -> tuple[dict[str, str | bool], list[str]]:
    """getopt for qemu-io style commands: -P 0xab -z -q OFF LEN."""
    opts: dict[str, str | bool] = {}
    pos: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-") and len(arg) == 2 and not arg[1].isdigit():
            letter = arg[1]
            if letter in with_value:
                if i + 1 >= len(argv):
                    raise _Usage(f"option -{letter} needs a value")
                opts[letter] = argv[i + 1]
                i += 2
                continue
            if letter in flags:
                opts[letter] = True
                i += 1
                continue
            raise _Usage(f"invalid option -- '{letter}'")
        pos.append(arg)
        i += 1
    if len(pos) != positional:
        raise _Usage(f"expected {positional} arguments (offset and length), got {len(pos)}")
    return opts, pos


def _cvtstr(value: float) -> str:
    suffix = "bytes"
    for unit, scale in (
        ("EiB", 1 << 60),
        ("PiB", 1 << 50),
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ):
        if value >= scale:
            value /= scale
            suffix = unit
            break
    text = f"{value:.3f}"
    if text.endswith(".000"):
        text = text[:-4]
    return f"{text} {suffix}"


def _report(verb: str, offset: int, length: int, elapsed: float) -> None:
    print(f"{verb} {length}/{length} bytes at offset {offset}")
    rate = length / elapsed if elapsed > 0 else 0.0
    ops = 1 / elapsed if elapsed > 0 else 0.0
    print(
        f"{_cvtstr(length)}, 1 ops; {elapsed:05.2f} sec ({_cvtstr(rate)}/sec and {ops:.4f} ops/sec)"
    )


def _dump(offset: int, data: bytes) -> None:
    for i in range(0, len(data), 16):
        chunk = data[i : i + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        print(f"{offset + i:08x}:  {hexes:<47}  {text}")


# -- commands ------------------------------------------------------------------


def _read(backend: BlockBackend, argv: list[str]) -> bool:
    opts, (off_s, len_s) = _split(argv, "qv", "P", 2)
    offset, length = _num(off_s), _num(len_s)
    start = time.perf_counter()
    data = backend.read(offset, length)
    elapsed = time.perf_counter() - start
    ok = True
    if "P" in opts:
        pattern = _pattern(str(opts["P"]))
        if data != bytes([pattern]) * length:
            print(f"Pattern verification failed at offset {offset}, {length} bytes")
            ok = False
    if opts.get("v"):
        _dump(offset, data)
    if not opts.get("q"):
        _report("read", offset, length, elapsed)
    return ok


def _write(backend: BlockBackend, argv: list[str]) -> bool:
    opts, (off_s, len_s) = _split(argv, "qzuf", "P", 2)
    offset, length = _num(off_s), _num(len_s)
    if opts.get("z") and "P" in opts:
        raise _Usage("-z and -P cannot be specified at the same time")
    if opts.get("u") and not opts.get("z"):
        raise _Usage("-u requires -z to be specified")
    fua = bool(opts.get("f"))
    start = time.perf_counter()
    if opts.get("z"):
        backend.write_zeroes(offset, length, may_unmap=bool(opts.get("u")), fua=fua)
    else:
        pattern = _pattern(str(opts["P"])) if "P" in opts else 0xCD
        backend.write(offset, bytes([pattern]) * length, fua=fua)
    elapsed = time.perf_counter() - start
    if not opts.get("q"):
        _report("wrote", offset, length, elapsed)
    return True


def _discard(backend: BlockBackend, argv: list[str]) -> bool:
    opts, (off_s, len_s) = _split(argv, "q", "", 2)
    offset, length = _num(off_s), _num(len_s)
    start = time.perf_counter()
    backend.discard(offset, length)
    elapsed = time.perf_counter() - start
    if not opts.get("q"):
        _report("discard", offset, length, elapsed)
    return True


def _flush(backend: BlockBackend, argv: list[str]) -> bool:
    if argv:
        raise _Usage("flush takes no arguments")
    backend.flush()
    return True


def _info(backend: BlockBackend, argv: list[str]) -> bool:
    info = backend.describe()
    root = info["nodes"][0]
    print(f"format name: {root['driver']}")
    print(f"length: {info['length']} bytes")
    print(f"cache mode: {info['cache-mode']}")
    print(f"write cache: {'on' if info['write-cache'] else 'off'}")
    print(f"cache.direct: {'on' if info['cache.direct'] else 'off'}")
    print(f"cache.no-flush: {'on' if info['cache.no-flush'] else 'off'}")
    for node in info["nodes"]:
        extra = ", ".join(f"{k}={v}" for k, v in node.items() if k not in ("node-name", "driver"))
        print(f"node {node['node-name']}: driver {node['driver']} ({extra})")
    return True


def _stats(backend: BlockBackend, argv: list[str]) -> bool:
    print(json.dumps(backend.stats().to_dict(), indent=2, sort_keys=True))
    return True


def _write_cache(backend: BlockBackend, argv: list[str]) -> bool:
    if len(argv) != 1:
        raise _Usage("usage: write-cache on|off")
    backend.set_write_cache(parse_bool(argv[0], "write-cache"))
    return True


_USAGE = {
    "read": "read [-P pattern] [-v] [-q] OFF LEN -- read, optionally verify a byte pattern, dump",
    "write": "write [-P pattern | -z [-u]] [-f] [-q] OFF LEN -- write a pattern or zeroes; "
    "-u may unmap, -f FUA",
    "discard": "discard [-q] OFF LEN -- discard (punch a hole)",
    "flush": "flush -- flush the write cache to the disk",
    "info": "info -- the node graph and the cache settings",
    "stats": "stats -- the backend's statistics, as JSON",
    "write-cache": "write-cache on|off -- switch the device's write cache (as a guest can)",
    "help": "help -- this list",
}


def _help(backend: BlockBackend, argv: list[str]) -> bool:
    for line in _USAGE.values():
        print(line)
    print("OFF and LEN take the suffixes k, M, G, T (powers of 1024)")
    return True


_COMMANDS: dict[str, Callable[[BlockBackend, list[str]], bool]] = {
    "read": _read,
    "write": _write,
    "discard": _discard,
    "flush": _flush,
    "info": _info,
    "stats": _stats,
    "write-cache": _write_cache,
    "help": _help,
}


def main(argv: list[str] | None = None) -> int:
    """`python -m harness.commands.io ...`: the command alone, without loading every other one."""
    parser = argparse.ArgumentParser(prog="powercut io", description=HELP)
    register(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except PowercutError as exc:
        print(f"powercut io: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
