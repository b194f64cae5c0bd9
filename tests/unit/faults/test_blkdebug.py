"""blkdebug: injected errors and delays by rule, lying flushes, rules changed at run time."""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.block import BlockBackend, open_backend
from harness.block.drivers.blkdebug import Action, BlkdebugNode, BlkOp, Rule, parse_rules
from harness.errors import BlockError, ConfigError

S = 512


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "d.img"
    path.write_bytes(bytes(64 * 1024))
    return path


def _open(image: Path, rules: str = "", **extra: object) -> BlockBackend:
    return open_backend(
        {
            "driver": "blkdebug",
            "node-name": "dbg",
            "rules": rules,
            **extra,
            "file": {"driver": "file", "node-name": "img", "filename": str(image)},
        },
        cache="writeback",
    )


@pytest.fixture
def dbg(image: Path) -> Iterator[tuple[BlockBackend, BlkdebugNode]]:
    be = _open(image)
    node = be.node("dbg")
    assert isinstance(node, BlkdebugNode)
    try:
        yield be, node
    finally:
        be.close()


def _fails(fn: object, *args: object) -> int | None:
    try:
        fn(*args)  # type: ignore[operator]
    except BlockError as exc:
        return exc.errno
    return None


def test_every_nth_write_fails_with_the_chosen_errno(
    dbg: tuple[BlockBackend, BlkdebugNode],
) -> None:
    be, node = dbg
    node.add_rule("write:errno=EIO:every=3")
    results = [_fails(be.write, i * S, b"x" * S) for i in range(9)]
    assert results == [None, None, errno.EIO] * 3


def test_once_rule_fires_a_single_time(dbg: tuple[BlockBackend, BlkdebugNode]) -> None:
    be, node = dbg
    node.add_rule("read:errno=EIO:once")
    assert _fails(be.read, 0, S) == errno.EIO
    assert _fails(be.read, 0, S) is None
    assert node.rules()[0]["fired"] == 1


def test_sector_range_limits_the_rule(dbg: tuple[BlockBackend, BlkdebugNode]) -> None:
    be, node = dbg
    node.add_rule("write:errno=EIO:sector=8-15")
    assert _fails(be.write, 0, b"x" * 4096) is None  # sectors 0..7
    assert _fails(be.write, 4096 + S, b"x" * S) == errno.EIO  # sector 9
    assert _fails(be.write, 7 * S, b"x" * 1024) == errno.EIO  # sectors 7..8 overlap
    assert _fails(be.write, 16 * S, b"x" * S) is None


def test_seeded_probability_is_reproducible(image: Path) -> None:
    patterns = []
    for _ in range(2):
        be = _open(image, "write:errno=EIO:probability=0.5:seed=11")
        patterns.append([_fails(be.write, 0, b"x" * S) is not None for _ in range(40)])
        be.close()
    assert patterns[0] == patterns[1]
    assert 5 < sum(patterns[0]) < 35


def test_delay_rule_slows_the_request(dbg: tuple[BlockBackend, BlkdebugNode]) -> None:
    be, node = dbg
    node.add_rule("flush:delay=150")
    t0 = time.monotonic()
    be.write(0, b"x" * S)
    be.flush()
    assert time.monotonic() - t0 >= 0.15


def test_lying_flush_never_reaches_the_disk(dbg: tuple[BlockBackend, BlkdebugNode]) -> None:
    be, node = dbg
    img = be.node("img")
    be.write(0, b"x" * S)
    be.flush()
    syncs = img.host_syncs  # type: ignore[attr-defined]
    rule_id = node.add_rule("flush:lying-flush")
    be.write(0, b"y" * S)
    be.flush()
    assert img.host_syncs == syncs  # type: ignore[attr-defined]
    assert node.flushes_lied == 1
    node.remove_rule(rule_id)
    be.write(0, b"z" * S)
    be.flush()
    assert img.host_syncs == syncs + 1  # type: ignore[attr-defined]


def test_rules_change_at_run_time(dbg: tuple[BlockBackend, BlkdebugNode]) -> None:
    be, node = dbg
    ids = node.set_rules(["write:errno=ENOSPC", "discard:errno=EIO"])
    assert [r["errno"] for r in node.rules()] == ["ENOSPC", "EIO"]
    node.remove_rule(ids[0])
    assert _fails(be.write, 0, b"x" * S) is None
    node.clear_rules()
    assert node.rules() == []
    with pytest.raises(ConfigError, match="no rule"):
        node.remove_rule(ids[0])


def test_rules_from_the_blockdev_string_and_a_json_config(image: Path, tmp_path: Path) -> None:
    config = tmp_path / "rules.json"
    config.write_text(json.dumps([{"op": "write-zeroes", "errno": "EIO"}]))
    spec = (
        f"driver=blkdebug,node-name=dbg,rules=flush:lying-flush;write:errno=EIO:once,"
        f"config={config},file.driver=file,file.filename={image}"
    )
    be = open_backend(spec)
    try:
        rules = be.node("dbg").rules()  # type: ignore[attr-defined]
        assert [(r["op"], r["action"]) for r in rules] == [
            ("flush", "lying-flush"),
            ("write", "error"),
            ("write-zeroes", "error"),
        ]
        assert _fails(be.write_zeroes, 0, 4096) == errno.EIO
    finally:
        be.close()


def test_rule_parsing() -> None:
    (rule,) = parse_rules("any:delay=20:probability=0.1:seed=7")
    assert rule == Rule(BlkOp.ANY, Action.DELAY, delay_ms=20, probability=0.1, seed=7)
    with pytest.raises(ConfigError, match="unknown operation"):
        parse_rules("wrote:errno=EIO")
    with pytest.raises(ConfigError, match="unknown errno"):
        parse_rules("write:errno=EWHAT")
    with pytest.raises(ConfigError, match="lying-flush applies to flushes"):
        parse_rules("write:lying-flush")
    with pytest.raises(ConfigError, match="unknown setting"):
        parse_rules("write:color=red")
