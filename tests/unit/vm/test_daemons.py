"""The command lines of the processes that serve a disk, read back by their own parsers.

`ServeOptions.argv()` goes through `powercut`'s own parser and
`serve_options` back to the same options; `QsdOptions.argv()` through
`powercut-storage-daemon`'s (qemu-storage-daemon's command line) to the
graph and the export it says.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import cli
from harness.block.options import parse_dotted
from harness.commands.serve import graph_options, serve_options
from harness.durability.contract import CacheMode
from harness.errors import ConfigError
from harness.storage_daemon import ExportSpec, build_parser, parse_export
from harness.vm.daemons import THROTTLING_KEYS, ParallelIO, QsdOptions, ServeOptions, nbd_address

WORDS = st.text("abcdefghijklmnopqrstuvwxyz0123456789_.", min_size=1, max_size=12)
PATHS = st.builds(lambda a, b: Path("/run", a, b + ".sock"), WORDS, WORDS)
LIMITS = st.lists(
    st.tuples(st.sampled_from(THROTTLING_KEYS), st.integers(1, 10**6).map(str)),
    unique_by=lambda kv: kv[0],
    max_size=4,
).map(tuple)


def parsed(argv: list[str]) -> ServeOptions:
    """What `powercut serve` itself makes of the command line (after `python -m harness.cli`)."""
    words = argv[3:]
    return serve_options(cli.build_parser(words).parse_args(words))


@st.composite
def serve_settings(draw: st.DrawFn) -> ServeOptions:
    graph = draw(st.booleans())
    served = draw(st.sampled_from(["vhost-user", "nbd", "both"]))
    socket = draw(PATHS) if served != "nbd" else None
    nbd = (
        draw(st.sampled_from([str(draw(PATHS)), "127.0.0.1:10809"]))
        if served != "vhost-user"
        else None
    )
    control = draw(st.booleans())
    return ServeOptions(
        image=None if graph else draw(PATHS).with_suffix(".img"),
        blockdev=f"driver=raw,file.driver=file,file.filename=/d/{draw(WORDS)}" if graph else None,
        socket=socket,
        nbd=nbd,
        nbd_export=draw(WORDS),
        cache=draw(st.sampled_from(CacheMode)),
        queues=draw(st.integers(1, 16)),
        read_only=draw(st.booleans()),
        serial=draw(st.sampled_from(["", "PCSERIAL0001"])),
        logical_block_size=draw(st.sampled_from([512, 4096])),
        control=control,
        control_path=draw(st.none() | PATHS) if control else None,
        parallel_io=draw(st.sampled_from(ParallelIO)),
        throttling=draw(LIMITS),
        throttle_group=draw(st.sampled_from(["", "tg0"])),
        verbose=draw(st.integers(0, 2)),
    )


@settings(max_examples=200, deadline=None)
@given(serve_settings())
def test_serve_options_survive_their_own_command_line(options: ServeOptions) -> None:
    argv = options.argv()
    assert argv[1:3] == ["-m", "harness.cli"]
    assert parsed(argv) == options


def test_the_argv_is_built_of_what_was_asked_for() -> None:
    options = ServeOptions(image=Path("/d/disk.img"), socket=Path("/r/vda.sock"))
    assert options.argv()[3:] == [
        "serve",
        "/d/disk.img",
        "--socket",
        "/r/vda.sock",
        "--queues",
        "1",
        "--cache",
        "writeback",
    ]
    nbd = ServeOptions(blockdev="driver=null-co", nbd="/r/nbd.sock", verbose=1)
    assert nbd.argv()[3:] == [
        "-v",
        "serve",
        "--blockdev",
        "driver=null-co",
        "--nbd",
        "/r/nbd.sock",
        "--nbd-export",
        "disk",
        "--cache",
        "writeback",
    ]


def test_extra_args_come_last_and_mean_what_the_parser_says() -> None:
    plain = ServeOptions(image=Path("/d/disk.img"), socket=Path("/r/s"))
    extra = ServeOptions(
        image=Path("/d/disk.img"), socket=Path("/r/s"), extra_args=("--iops-total", "100")
    )
    assert extra.argv()[-2:] == ["--iops-total", "100"]
    assert parsed(extra.argv()) == ServeOptions(
        image=Path("/d/disk.img"), socket=Path("/r/s"), throttling=(("iops-total", "100"),)
    )
    assert parsed(plain.argv()) == plain


def test_the_control_socket_sits_beside_what_is_served() -> None:
    both = ServeOptions(image=Path("/d/i"), socket=Path("/r/v.sock"), nbd="/r/n.sock")
    assert both.control_socket == Path("/r/v.sock.ctl")
    assert both.sockets() == (Path("/r/v.sock"), Path("/r/n.sock"), Path("/r/v.sock.ctl"))
    nbd = ServeOptions(image=Path("/d/i"), nbd="/r/n.sock")
    assert nbd.control_socket == Path("/r/n.sock.ctl")
    assert nbd.nbd_uri == "nbd+unix:///disk?socket=/r/n.sock"
    tcp = ServeOptions(image=Path("/d/i"), nbd="127.0.0.1:10809")
    assert tcp.control_socket is None and tcp.sockets() == ()
    assert tcp.nbd_uri == "nbd://127.0.0.1:10809/disk"
    quiet = ServeOptions(image=Path("/d/i"), socket=Path("/r/v.sock"), control=False)
    assert quiet.sockets() == (Path("/r/v.sock"),) and "--no-control" in quiet.argv()


def test_the_graph_is_the_image_or_the_blockdev_with_its_limits() -> None:
    image = ServeOptions(
        image=Path("/d/a,b=c.img"), socket=Path("/r/s"), throttling=(("iops-total", "9"),)
    )
    assert graph_options(image) == {
        "driver": "raw",
        "file": {"driver": "file", "filename": "/d/a,b=c.img"},
        "throttling.iops-total": "9",
    }
    graph = ServeOptions(blockdev="driver=null-co", socket=Path("/r/s"), throttle_group="tg")
    assert graph_options(graph) == "driver=null-co,throttling.group=tg"


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"image": Path("/d/i")}, "nothing to serve"),
        ({"socket": Path("/r/s")}, "exactly one"),
        ({"image": Path("/d/i"), "blockdev": "x", "socket": Path("/r/s")}, "exactly one"),
        ({"image": Path("/d/i"), "socket": Path("/r/s"), "cache": "none"}, "CacheMode"),
        (
            {"image": Path("/d/i"), "socket": Path("/r/s"), "control": False, "control_path": "c"},
            "control socket",
        ),
        (
            {"image": Path("/d/i"), "socket": Path("/r/s"), "throttling": (("iops", "1"),)},
            "unknown throttling option(s) iops",
        ),
    ],
)
def test_options_that_cannot_be_served_are_refused(settings: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        ServeOptions(**settings)


def test_nbd_addresses_are_tcp_only_with_a_port() -> None:
    assert nbd_address("127.0.0.1:10809").describe() == "127.0.0.1:10809"
    assert nbd_address("[::1]:10809").host == "::1"
    assert nbd_address("/r/a:1").type == "unix"
    assert nbd_address("nbd.sock").path == "nbd.sock"


@pytest.mark.parametrize("mode", list(CacheMode))
def test_qsd_options_say_the_image_graph_and_the_export_to_the_daemons_parser(
    mode: CacheMode,
) -> None:
    options = QsdOptions.on_image(
        Path("/d/disk.img"), Path("/r/q.sock"), mode, queues=2, node_name="vdb"
    )
    argv = options.argv()
    assert argv[0] == "qemu-storage-daemon"
    args = build_parser().parse_args(argv[1:])
    file_node, raw = (parse_dotted(text) for text in args.blockdev)
    direct = mode in (CacheMode.NONE, CacheMode.DIRECTSYNC)
    assert file_node == {
        "driver": "file",
        "filename": "/d/disk.img",
        "node-name": "file0",
        "read-only": "off",
        "cache.direct": "on" if direct else "off",
        "cache.no-flush": "on" if mode is CacheMode.UNSAFE else "off",
    }
    assert raw == {"driver": "raw", "file": "file0", "node-name": "vdb", "read-only": "off"}
    (export,) = (parse_export(text) for text in args.export)
    assert export == ExportSpec(
        id="export0",
        node_name="vdb",
        addr_type="unix",
        addr="/r/q.sock",
        writable=True,
        writethrough=mode in (CacheMode.WRITETHROUGH, CacheMode.DIRECTSYNC),
        num_queues=2,
        logical_block_size=512,
        serial="",
    )
    assert options.sockets() == (Path("/r/q.sock"),) and options.control_socket is None


def test_a_read_only_qsd_export_is_not_writable() -> None:
    options = QsdOptions.on_image(Path("/d/i"), Path("/r/q"), CacheMode.NONE, read_only=True)
    args = build_parser().parse_args(options.argv()[1:])
    assert not parse_export(args.export[0]).writable
    assert all(parse_dotted(b)["read-only"] == "on" for b in args.blockdev)
