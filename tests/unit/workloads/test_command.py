"""The command workload, the scenario fields for your own software, and the words for a loss."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.crash.verdict import (
    Observed,
    OracleObservation,
    Verdict,
    expected_for,
    judge,
)
from harness.durability.contract import CacheMode, CutPolicy, FaultModel
from harness.errors import ScenarioError
from harness.scenario.model import TriggerKind, WorkloadSpec
from harness.scenario.parse import parse_scenario
from harness.workloads.command import Command, CommandObservation
from harness.workloads.filesystem import FsckObservation
from harness.workloads.stream import TokenStream

BASE = """\
name = "app"
modes = ["writeback"]
[[fault]]
model = "host-power-cut"
[[workload]]
kind = "command"
run = "my-app --commit 100"
check = "my-app --list"
"""


def error_of(text: str, path: str = "s.toml") -> str:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, path)
    return str(info.value)


def test_a_command_workload_reads_its_fields() -> None:
    s = parse_scenario(
        BASE.replace('check = "my-app --list"', 'check = "my-app --list"\nsetup = "my-app --init"')
        + "[cut]\nafter-exit = true\n"
    )
    w = s.workloads[0]
    assert w.workload == Command("my-app --commit 100", "my-app --list", "my-app --init")
    assert w.checkers == ("oracle", "check", "fsck")
    assert s.cuts[0].kind is TriggerKind.AFTER_EXIT and s.cuts[0].label == "after-exit"


@pytest.mark.parametrize(
    ("edit", "field", "words"),
    [
        (('run = "my-app --commit 100"\n', ""), "workload[0].run", "is required"),
        (('check = "my-app --list"\n', ""), "workload[0].check", "is required"),
        (
            ('check = "my-app --list"', 'check = "x"\nack = "committed \\\\d+"'),
            "workload[0].ack",
            "exactly one group",
        ),
        (
            ('check = "my-app --list"', 'check = "x"\nack = "(a)(b)"'),
            "workload[0].ack",
            "exactly one group",
        ),
        (
            ('check = "my-app --list"', 'check = "x"\nack = "(unclosed"'),
            "workload[0].ack",
            "not a regular expression",
        ),
        (('check = "my-app --list"', 'check = "  "'), "workload[0].check", "must not be empty"),
        (
            ('check = "my-app --list"', 'check = "x"\ntrace = "no"'),
            "workload[0].trace",
            "true or false",
        ),
    ],
)
def test_bad_command_fields_name_the_file_line_and_field(
    edit: tuple[str, str], field: str, words: str
) -> None:
    msg = error_of(BASE.replace(*edit))
    assert re.match(rf"s\.toml:\d+: field '{re.escape(field)}'", msg), msg
    assert words in msg


def test_a_command_workload_is_traced_unless_its_table_says_trace_false() -> None:
    traced = parse_scenario(BASE).workloads[0].workload
    assert traced.trace_pattern == r"^ack (\S+)$"
    off = parse_scenario(BASE.replace('check = "my-app --list"', 'check = "x"\ntrace = false'))
    assert off.workloads[0].workload.trace_pattern is None


def test_after_exit_must_be_true() -> None:
    assert "must be true" in error_of(BASE + "[cut]\nafter-exit = false\n")


@pytest.mark.parametrize(
    ("line", "field", "words"),
    [
        ('packages = ["sqlite3", "Not_A_Package"]', "packages", "not a Debian package name"),
        ('packages = "sqlite3"', "packages", "must be a list"),
        ('filesystem = "zfs"', "filesystem", "ext4, xfs, btrfs, f2fs"),
        ('filesystem = "xfs"\ndisk-size = "128M"', "disk-size", "at least 300M for xfs"),
        ('kernel = "no-such-bzImage"', "kernel", "does not exist"),
        ('mount-options = "no barrier"', "mount-options", "comma-separated"),
        ("mkfs-options = 3", "mkfs-options", "a string or a list of strings"),
    ],
)
def test_bad_guest_and_disk_fields_name_the_field(line: str, field: str, words: str) -> None:
    msg = error_of(line + "\n" + BASE)
    assert f"field '{field}'" in msg and words in msg, msg
    assert msg.startswith("s.toml:1:") or msg.startswith("s.toml:2:"), msg


def test_modules_need_a_kernel(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    msg = error_of('modules = "lib"\n' + BASE, str(tmp_path / "s.toml"))
    assert "field 'modules'" in msg and "needs a kernel" in msg


def test_guest_and_disk_fields_reach_every_cell(tmp_path: Path) -> None:
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF")
    (tmp_path / "app.sh").write_text("#!/bin/sh\n")
    text = (
        'packages = ["sqlite3", "redis-server", "sqlite3"]\nkernel = "vmlinux"\n'
        'filesystem = "xfs"\nmkfs-options = "-m crc=1"\nmount-options = "nobarrier"\n'
        + BASE
        + '[guest-files]\n"/opt/app.sh" = "app.sh"\n'
    )
    s = parse_scenario(text, str(tmp_path / "s.toml"))
    assert s.guest.packages == ("sqlite3", "redis-server")
    assert s.guest.kernel == str(tmp_path / "vmlinux")
    assert s.disk.mkfs_options == ("-m", "crc=1") and s.disk.mount_options == "nobarrier"
    assert s.disk_size == 320 << 20  # xfs's minimum, rounded up, when disk-size is not given
    assert s.guest_files == (("/opt/app.sh", str(tmp_path / "app.sh")),)


def test_guest_files_must_exist_and_be_absolute_in_the_guest(tmp_path: Path) -> None:
    msg = error_of(BASE + '[guest-files]\n"/opt/x" = "missing.sh"\n', str(tmp_path / "s.toml"))
    assert "field 'guest-files./opt/x'" in msg and "not a file" in msg
    (tmp_path / "x").write_text("")
    msg = error_of(BASE + '[guest-files]\n"opt/x" = "x"\n', str(tmp_path / "s.toml"))
    assert "absolute path in the guest" in msg


def test_token_stream_takes_what_the_pattern_matches_once_each() -> None:
    stream = TokenStream(re.compile(r"^ack (\S+)$"))
    assert stream.feed(b"starting\nack a\nack b\nack a\nack c") == ["a", "b"]
    assert stream.count == 2  # "ack c" has no newline yet: not an acknowledgement
    assert stream.feed(b"\n") == ["c"]
    custom = TokenStream(re.compile(r"committed txn=(\d+)"))
    assert custom.feed("log: committed txn=17 at 12:00\nnoise\n") == ["17"]


# -- the verdict and its words -------------------------------------------------------------

APP = WorkloadSpec("app", Command("run", "check"), ("oracle", "check", "fsck"))
CLEAN_FSCK = FsckObservation(mounted=True, exit_code=0)


def oracle(lost: int = 0) -> OracleObservation:
    return OracleObservation(
        writes=120,
        writes_durable=100,
        sectors_checked=960,
        must=960 - lost,
        may=0,
        lost=lost,
        corrupt=0,
        contract="writeback",
        flushes=0,
        fua_writes=0,
    )


def app(acked: int, found: int, exit_code: int = 0) -> CommandObservation:
    tokens = tuple(str(i) for i in range(1, acked + 1))
    return CommandObservation(tokens, found, tokens[found:], exit_code)


def test_tokens_lost_on_a_disk_that_kept_its_contract_blame_the_application() -> None:
    e = expected_for(CacheMode.WRITEBACK, FaultModel.HOST_POWER_CUT, CutPolicy.LOSE_ALL, APP)
    v = judge(e, Observed(oracle=oracle(), check=app(60, 0), fsck=CLEAN_FSCK))
    assert v.verdict is Verdict.FAIL
    assert v.reason.startswith("check: 60 of 60 acknowledged tokens lost (1, 2, 3, 4, 5, ...)")
    assert v.explanation.startswith("the disk kept its contract, so the application")
    assert "the guest sent 0 flushes and 0 FUA writes" in v.explanation
    assert "60 tokens acknowledged, 0 found, 60 lost" in v.explanation


def test_tokens_lost_on_a_disk_that_broke_its_contract_blame_the_disk() -> None:
    e = expected_for(CacheMode.WRITEBACK, FaultModel.HOST_POWER_CUT, CutPolicy.LOSE_ALL, APP)
    v = judge(e, Observed(oracle=oracle(lost=16), check=app(60, 58), fsck=CLEAN_FSCK))
    assert v.verdict is Verdict.FAIL
    assert v.explanation.startswith("the disk broke its contract: 16 sectors lost")


def test_a_failing_integrity_check_is_damage_even_with_every_token_found() -> None:
    e = expected_for(CacheMode.WRITETHROUGH, FaultModel.HOST_POWER_CUT, CutPolicy.LOSE_ALL, APP)
    obs = CommandObservation(("1", "2"), 2, (), 1, "Error: database disk image is malformed")
    v = judge(e, Observed(oracle=oracle(), check=obs, fsck=CLEAN_FSCK))
    assert v.verdict is Verdict.FAIL
    assert "check exited 1: Error: database disk image is malformed" in v.reason


def test_unsafe_may_lose_acknowledged_tokens_and_nothing_is_blamed_on_a_pass() -> None:
    e = expected_for(CacheMode.UNSAFE, FaultModel.HOST_POWER_CUT, CutPolicy.RANDOM, APP)
    v = judge(e, Observed(oracle=oracle(), check=app(10, 3), fsck=CLEAN_FSCK))
    assert v.verdict is Verdict.PASS and "allowed loss: check" in v.reason
    assert "the disk kept its contract" in v.explanation  # the words are there all the same


def test_nothing_lost_needs_no_explanation() -> None:
    e = expected_for(CacheMode.WRITEBACK, FaultModel.HOST_POWER_CUT, CutPolicy.LOSE_ALL, APP)
    v = judge(e, Observed(oracle=oracle(), check=app(10, 10), fsck=CLEAN_FSCK))
    assert v.verdict is Verdict.PASS and v.explanation == ""


def test_unsafe_losing_flushed_data_is_what_unsafe_may_do_not_a_broken_contract() -> None:
    e = expected_for(CacheMode.UNSAFE, FaultModel.HOST_POWER_CUT, CutPolicy.LOSE_ALL, APP)
    v = judge(e, Observed(oracle=oracle(lost=40), check=app(10, 0), fsck=CLEAN_FSCK))
    assert v.verdict is Verdict.PASS and v.reason.startswith("loss detected as expected")
    assert v.explanation.startswith("the disk lost data the guest saw flushed, as cache=unsafe may")
