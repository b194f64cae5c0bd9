"""`backend`, `format` and `format-options`: QEMU's own block layer as the system under test."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from harness.block.cache import CacheMode
from harness.crash.qemu_session import (
    DISK_CACHE,
    FORMAT_NODE,
    SESSIONS,
    QemuSession,
    qemu_blockdevs,
    session_for,
)
from harness.crash.session import CrashSession
from harness.errors import ScenarioError
from harness.scenario.cells import expand
from harness.scenario.model import ImageFormat
from harness.scenario.parse import load_scenario, parse_scenario
from harness.vm.backends import Backend
from harness.vm.daemons import ServeOptions
from harness.workloads.base import FSCK, ORACLE, QEMU_IMG_CHECK

SCENARIOS = Path(__file__).parents[3] / "scenarios"

BASE = """\
name = "t"
modes = ["writeback"]
{top}
[[fault]]
model = "host-power-cut"

[[workload]]
kind = "ack-records"
{tail}"""


def scenario(top: str = "", tail: str = "") -> str:
    return BASE.format(top=top, tail=tail)


def error_of(text: str) -> str:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, "s.toml")
    return str(info.value)


def test_the_default_backend_is_powercut_on_raw() -> None:
    s = parse_scenario(scenario())
    assert (s.disk.backend, s.disk.format, s.disk.format_options) == (
        Backend.POWERCUT,
        ImageFormat.RAW,
        (),
    )
    assert QEMU_IMG_CHECK not in s.workloads[0].checkers
    (cell,) = expand(s)
    assert session_for(cell) is CrashSession


def test_every_backend_has_its_crash_session() -> None:
    assert set(SESSIONS) == set(Backend)
    assert SESSIONS[Backend.POWERCUT] is CrashSession
    assert SESSIONS[Backend.QEMU] is SESSIONS[Backend.QSD] is QemuSession


def test_builtin_is_no_scenario_backend() -> None:
    # `builtin` is an alias `powercut vm` keeps; a scenario names QEMU's block layer "qemu".
    msg = error_of(scenario('backend = "builtin"'))
    assert "field 'backend'" in msg and "powercut, qemu, qemu-storage-daemon" in msg


@pytest.mark.parametrize("backend", ["qemu", "qemu-storage-daemon"])
def test_qcow2_on_a_qemu_backend_adds_qemu_img_check_to_every_workload(backend: str) -> None:
    top = f'backend = "{backend}"\nformat = "qcow2"\n[format-options]\nlazy_refcounts = "on"'
    s = parse_scenario(scenario(top))
    assert s.disk.backend is Backend(backend)
    assert s.disk.format is ImageFormat.QCOW2
    assert s.disk.format_options == (("lazy_refcounts", "on"),)
    assert s.workloads[0].checkers == (ORACLE, "ack-records", FSCK, QEMU_IMG_CHECK)
    (cell,) = expand(s)
    assert cell.checkers[-1] == QEMU_IMG_CHECK
    factory = session_for(cell)
    assert isinstance(factory, functools.partial) and factory.func is QemuSession
    assert factory.keywords == {"host_checkers": cell.checkers}
    assert (cell.disk.backend, cell.disk.format, cell.disk.format_options) == (
        Backend(backend),
        ImageFormat.QCOW2,
        (("lazy_refcounts", "on"),),
    )


def test_raw_on_qemu_has_no_qemu_img_check() -> None:
    s = parse_scenario(scenario('backend = "qemu"'))
    assert s.disk.format is ImageFormat.RAW
    assert QEMU_IMG_CHECK not in s.workloads[0].checkers


def test_qcow2_on_powercut_is_an_error_that_says_why() -> None:
    msg = error_of(scenario('format = "qcow2"'))
    assert msg.startswith("s.toml:3: field 'format'")
    assert 'needs backend = "qemu" or "qemu-storage-daemon"' in msg
    assert "raw images only" in msg


@pytest.mark.parametrize(
    ("top", "field", "words"),
    [
        ('backend = "libvirt"', "backend", "must be one of: powercut, qemu, qemu-storage-daemon"),
        ('backend = "qemu"\nformat = "vmdk"', "format", "must be one of: raw, qcow2"),
        (
            'backend = "qemu"\n[format-options]\nlazy_refcounts = "on"',
            "format-options",
            'apply to format = "qcow2" only',
        ),
        (
            'backend = "qemu"\nformat = "qcow2"\n[format-options]\nbacking_file = "x"',
            "format-options.backing_file",
            "is not a qcow2 option a scenario may set; valid: cluster_size",
        ),
        (
            'backend = "qemu"\nformat = "qcow2"\n[format-options]\nlazy_refcounts = ["on"]',
            "format-options.lazy_refcounts",
            "must be a string, number or boolean",
        ),
    ],
)
def test_bad_backend_fields_name_the_line_and_the_field(top: str, field: str, words: str) -> None:
    msg = error_of(scenario(top))
    assert f"field '{field}'" in msg and words in msg, msg
    key = field.split(".")[-1]
    lines = scenario(top).splitlines()
    expected = next(i for i, x in enumerate(lines) if x.startswith((f"{key} =", f"[{key}]"))) + 1
    assert msg.startswith(f"s.toml:{expected}: "), msg


def test_a_backend_crash_needs_the_powercut_backend() -> None:
    text = scenario('backend = "qemu"').replace("host-power-cut", "backend-crash")
    msg = error_of(text)
    assert "field 'fault[0].model'" in msg and 'needs backend = "powercut"' in msg


def test_qemu_img_check_is_a_known_checker_only_where_qcow2_is() -> None:
    listed = 'checkers = ["oracle", "qemu-img-check"]'
    s = parse_scenario(scenario(f'backend = "qemu"\nformat = "qcow2"\n{listed}'))
    assert s.workloads[0].checkers == (ORACLE, QEMU_IMG_CHECK)
    msg = error_of(scenario(f'backend = "qemu"\n{listed}'))
    assert "field 'checkers'" in msg and "qemu-img-check" in msg
    own = error_of(scenario("", 'checkers = ["qemu-img-check"]'))
    assert "cannot judge the ack-records workload" in own


def test_the_shipped_qcow2_scenarios_run_qemu_on_qcow2_and_check_the_image() -> None:
    for name in ("qcow2", "qcow2-lazy-refcounts", "qcow2-lying-flush"):
        s = load_scenario(SCENARIOS / f"{name}.toml")
        assert (s.disk.backend, s.disk.format) == (Backend.QEMU, ImageFormat.QCOW2)
        assert all(QEMU_IMG_CHECK in w.checkers for w in s.workloads)
    lazy = load_scenario(SCENARIOS / "qcow2-lazy-refcounts.toml")
    assert lazy.disk.format_options == (("lazy_refcounts", "on"),)
    # unsafe is no negative control over NBD (see the file): the four other modes.
    assert CacheMode.UNSAFE not in load_scenario(SCENARIOS / "qcow2.toml").modes


def test_the_differential_scenario_is_raw_on_powercut_with_all_five_modes() -> None:
    s = load_scenario(SCENARIOS / "differential.toml")
    assert (s.disk.backend, s.disk.format) == (Backend.POWERCUT, ImageFormat.RAW)
    assert set(s.modes) == set(CacheMode)


@pytest.mark.parametrize("mode", list(CacheMode))
def test_qemus_graph_carries_the_cache_mode_on_both_nodes(mode: CacheMode) -> None:
    nbd = ServeOptions(blockdev="driver=null-co", nbd="/r/nbd.sock")
    protocol, top = qemu_blockdevs(ImageFormat.QCOW2, mode, nbd)
    direct = "on" if mode in (CacheMode.NONE, CacheMode.DIRECTSYNC) else "off"
    no_flush = "on" if mode is CacheMode.UNSAFE else "off"
    for node in (protocol, top):
        assert f"cache.direct={direct}" in node and f"cache.no-flush={no_flush}" in node
    assert protocol.startswith("driver=nbd,node-name=proto0,server.type=unix,")
    assert "server.path=/r/nbd.sock" in protocol and "export=disk" in protocol
    assert top.startswith(f"driver=qcow2,node-name={FORMAT_NODE},file=proto0")


def test_the_disk_under_qemu_is_served_as_a_disk_with_a_volatile_cache() -> None:
    # Write cache on (no FUA emulation of its own), flushes honoured, no page cache.
    from harness.block.cache import cache_settings

    s = cache_settings(DISK_CACHE)
    assert (s.write_cache, s.no_flush, s.direct) == (True, False, True)
