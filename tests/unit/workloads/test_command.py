"""The command workload, the scenario fields for your own software, and the words for a loss."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from harness.crash.verdict import (
    Observed,
    OracleObservation,
    Verdict,
    expected_for,
    judge,
)
from harness.durability.contract import CacheMode, CutPolicy, FaultModel, Promise
from harness.errors import GuestError, ScenarioError, TimeoutExpired
from harness.guest.ssh import CommandResult
from harness.scenario.model import TriggerKind, WorkloadSpec
from harness.scenario.parse import parse_scenario
from harness.workloads.base import Tally
from harness.workloads.command import DEFAULT_ACK, Command, CommandObservation
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


# -- the check itself, on a guest that answers from a script ---------------------------------


class ScriptedGuest:
    """`ctx.ssh`: the run prints `run_output`, the check answers with `check_result`."""

    def __init__(self, run_output: str, check: tuple[int, str, str] = (0, "", "")) -> None:
        self.run_output = run_output
        self.check = check
        self.commands: list[str] = []
        self.timeouts: list[float | None] = []

    def run(
        self,
        command: str,
        timeout: float | None = 60.0,
        *,
        on_stdout: Callable[[str], None] | None = None,
        **_: Any,
    ) -> CommandResult:
        self.commands.append(command)
        self.timeouts.append(timeout)
        if command.startswith("setsid "):
            for line in self.run_output.splitlines():
                if on_stdout is not None:
                    on_stdout(line)
            return CommandResult(command, 0, self.run_output, "")
        if "check-timeout" in command:
            raise TimeoutExpired(f"guest command {command!r} still running")
        code, stdout, stderr = self.check
        return CommandResult(command, code, stdout, stderr)


@dataclass
class Ctx:
    ssh: Any
    directory: Path

    def time_left(self, cap: float | None = None) -> float:
        return 123.0 if cap is None else cap

    def traced(self, command: str) -> str:
        return command  # nothing traces here


def checked(
    tmp_path: Path,
    run_output: str,
    check: tuple[int, str, str],
    workload: Command | None = None,
) -> CommandObservation:
    """Start the workload on the scripted guest, let it finish, and check it after the cut."""
    workload = workload or Command("my-app --commit", "my-app --list")
    guest = ScriptedGuest(run_output, check)
    ctx = Ctx(guest, tmp_path)
    run = workload.start(ctx, 7, FaultModel.HOST_POWER_CUT)  # type: ignore[arg-type]
    run.after_cut(10)
    obs = workload.check(ctx, 7, run)  # type: ignore[arg-type]
    assert isinstance(obs, CommandObservation)
    return obs


def test_every_acknowledged_token_found_is_no_loss(tmp_path: Path) -> None:
    obs = checked(tmp_path, "starting\nack 1\nack 2\nack 3\n", (0, "1\n2\n3\n4\n", ""))
    assert obs.acked == ("1", "2", "3") and obs.found == 3 and obs.lost == ()
    assert not obs.loss and not obs.damaged
    assert obs.extra == 1  # "4" was printed, never acknowledged: allowed (maybe in flight)
    assert obs.summary() == "all 3 acknowledged tokens found; the check exited 0"
    assert obs.tally() == Tally(acknowledged=3, lost=0, unit="tokens")


def test_an_acknowledged_token_the_check_does_not_print_is_lost(tmp_path: Path) -> None:
    obs = checked(tmp_path, "ack a\nack b\nack c\nack d\n", (0, "  a  \n\nc\nbb\n", ""))
    assert obs.lost == ("b", "d") and obs.found == 2
    assert obs.loss and not obs.damaged
    assert obs.summary() == "2 of 4 acknowledged tokens lost (b, d)"
    assert obs.tally() == Tally(acknowledged=4, lost=2, unit="tokens")
    e = expected_for(CacheMode.WRITEBACK, FaultModel.HOST_POWER_CUT, CutPolicy.LOSE_ALL, APP)
    v = judge(e, Observed(oracle=oracle(), check=obs, fsck=CLEAN_FSCK))
    assert v.verdict is Verdict.FAIL


def test_a_check_printing_nothing_loses_every_token(tmp_path: Path) -> None:
    obs = checked(tmp_path, "ack 1\nack 2\n", (0, "", ""))
    assert obs.lost == ("1", "2") and obs.found == 0 and obs.loss


def test_a_failing_check_is_damage_and_its_last_error_line_is_the_reason(
    tmp_path: Path,
) -> None:
    obs = checked(tmp_path, "ack 1\n", (1, "1\n", "warming up\nError: malformed\n"))
    assert obs.damaged and obs.loss and obs.lost == ()
    assert obs.summary() == "the application's check exited 1: Error: malformed"
    assert obs.stderr_tail == "warming up\nError: malformed"


@pytest.mark.parametrize("code", [126, 127])
def test_a_check_that_cannot_run_is_an_error_not_a_verdict(tmp_path: Path, code: int) -> None:
    with pytest.raises(GuestError, match=rf"could not run \(exit {code}\): sh: my-app: not found"):
        checked(tmp_path, "ack 1\n", (code, "", "sh: my-app: not found\n"))


@pytest.mark.parametrize("code", [2, 125, 128])
def test_other_check_exits_are_the_applications_verdict(tmp_path: Path, code: int) -> None:
    obs = checked(tmp_path, "ack 1\n", (code, "1\n", ""))
    assert obs.exit_code == code and obs.damaged


def test_a_custom_ack_pattern_and_the_checks_environment(tmp_path: Path) -> None:
    workload = Command("run-it", "list-it", ack=r"^committed txn=(\d+)")
    obs = checked(
        tmp_path, "committed txn=5\nack 9\ncommitted txn=6 ok\n", (0, "6\n", ""), workload
    )
    assert obs.acked == ("5", "6") and obs.lost == ("5",)
    log = (tmp_path / "checks.log").read_text()
    assert log.startswith("$ list-it  (exit 0)\n6\n")


def test_the_check_runs_in_the_mount_with_the_seed(tmp_path: Path) -> None:
    guest = ScriptedGuest("ack 1\n", (0, "1\n", ""))
    ctx = Ctx(guest, tmp_path)
    workload = Command(
        "my-app --commit", "my-app --list", setup_command="my-app --init", check_timeout=7
    )
    run = workload.start(ctx, 42, FaultModel.HOST_POWER_CUT)  # type: ignore[arg-type]
    run.after_cut(10)
    workload.check(ctx, 42, run)  # type: ignore[arg-type]
    setup, started, check = guest.commands
    env = (
        "{ [ ! -r /etc/powercut/node.env ] || . /etc/powercut/node.env; } && "
        "cd /mnt && export POWERCUT_SEED=42 POWERCUT_MOUNT=/mnt && "
    )
    assert setup == env + "my-app --init"
    assert check == env + "my-app --list"
    assert env + "my-app --commit" in started
    assert guest.timeouts[0] == 123.0  # the setup gets what is left of the cell's time
    assert guest.timeouts[2] == 7  # the check, its own check-timeout
    assert (tmp_path / "setup.log").read_text() == "$ my-app --init  (exit 0)\n1\n\n"
    assert run.stop_command == "kill -TERM -- -$(cat /run/powercut-workload.pid) 2>/dev/null; true"
    assert "echo $$ > /run/powercut-workload.pid" in started  # what the stop command reads


def test_check_timeout_is_read_and_must_be_at_least_a_second() -> None:
    s = parse_scenario(BASE + "check-timeout = 1\n")
    workload = s.workloads[0].workload
    assert isinstance(workload, Command) and workload.check_timeout == 1.0
    assert "check-timeout" in error_of(BASE + "check-timeout = 0.5\n")
    default = parse_scenario(BASE).workloads[0].workload
    assert isinstance(default, Command) and default.check_timeout == 300.0


def test_a_failed_check_without_output_says_only_its_exit() -> None:
    obs = CommandObservation(("1",), 1, (), 2, "")
    assert obs.summary() == "the application's check exited 2"
    many = CommandObservation(tuple("abcde"), 0, tuple("abcde"), 0)
    assert many.summary() == "5 of 5 acknowledged tokens lost (a, b, c, d, e)"  # all five named
    more = CommandObservation(tuple("abcdef"), 0, tuple("abcdef"), 1, "x\ny")
    assert more.summary() == (
        "6 of 6 acknowledged tokens lost (a, b, c, d, e, ...); the application's check exited 1: y"
    )


def test_a_check_that_never_finishes_is_an_error(tmp_path: Path) -> None:
    workload = Command("my-app --commit", "my-app check-timeout", check_timeout=5)
    with pytest.raises(GuestError, match="did not finish within 5 s"):
        checked(tmp_path, "ack 1\n", (0, "", ""), workload)


def test_a_failing_setup_stops_the_cell(tmp_path: Path) -> None:
    class FailingSetup(ScriptedGuest):
        def run(self, command: str, timeout: float = 60.0, **kw: Any) -> CommandResult:
            if command.endswith("my-app --init"):
                return CommandResult(command, 3, "", "no space left\n")
            return super().run(command, timeout, **kw)

    ctx = Ctx(FailingSetup(""), tmp_path)
    workload = Command("my-app --commit", "my-app --list", setup_command="my-app --init")
    with pytest.raises(GuestError, match="setup exited 3: no space left"):
        workload.start(ctx, 1, FaultModel.HOST_POWER_CUT)  # type: ignore[arg-type]


def test_only_unsafe_under_a_host_power_cut_may_lose_acknowledged_tokens() -> None:
    workload = Command("r", "c")
    assert workload.keeps_acknowledged(Promise.FLUSHED)
    assert workload.keeps_acknowledged(Promise.EVERY_COMPLETED)
    assert not workload.keeps_acknowledged(Promise.NOTHING)


def test_the_check_in_the_checker_guest_judges_only_the_tokens_acknowledged_by_its_point(
    tmp_path: Path,
) -> None:
    """Explore's run as of a point: tokens acknowledged later may be missing."""
    from harness.crash.explorer.record import RecordedRun
    from harness.explore.recording import Ack

    recording = SimpleNamespace(acks=(Ack("a", 3), Ack("b", 5), Ack("c", 9)))
    recorded = RecordedRun(
        recording, tmp_path, tmp_path, "tokens", "command", re.compile(DEFAULT_ACK), {}
    )  # type: ignore[arg-type]
    guest = ScriptedGuest("", (0, "a\n", ""))
    ctx = Ctx(guest, tmp_path)
    workload = Command("my-app --commit", "my-app --list")
    early = workload.check(ctx, 1, recorded.run_as_of(1, guest))  # type: ignore[arg-type]
    assert isinstance(early, CommandObservation) and not early.loss and early.acked == ("a",)
    late = workload.check(ctx, 1, recorded.run_as_of(3, guest))  # type: ignore[arg-type]
    assert isinstance(late, CommandObservation) and late.lost == ("b", "c")
