"""A cell's whole sequence on a fake machine, with a workload added in this one module.

The machine is fake (no QEMU, no SSH): a "guest" thread writes through the
real block stack (log-writes over [blkdebug over] powerfail over a file, as
`powercut serve` runs it), the power cut freezes it and applies the real
offline cut, and the real oracle judges the image. The workload, `counter`,
exists only here: a `Workload` subclass plus `register()` is all it takes for
a scenario file to name it, and the runner, verdict and record to handle it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness.block import BlockBackend, open_backend
from harness.crash.cell_run import CellRunner
from harness.crash.session import PowerCut, fault_graph
from harness.crash.verdict import Verdict
from harness.durability import oracle
from harness.durability.contract import (
    CacheMode,
    FaultModel,
    Promise,
    parse_fault,
    parse_policy,
    reference_promise,
)
from harness.durability.cut import apply_cut
from harness.errors import GuestError
from harness.guest.ssh import CommandResult
from harness.scenario.cells import Cell, expand
from harness.scenario.model import DiskSpec
from harness.scenario.parse import parse_scenario
from harness.workloads import registry
from harness.workloads.base import (
    ORACLE,
    FieldReader,
    GuestContext,
    Observation,
    Run,
    Tally,
    Workload,
)
from harness.workloads.stream import StreamRun

RECORD = 4096


# -- the new workload: one class, one registration ----------------------------------------


@dataclass(frozen=True)
class CounterObservation(Observation):
    acked: int
    found: int

    @property
    def loss(self) -> bool:
        return self.found < self.acked

    def summary(self) -> str:
        return f"{self.acked} records acknowledged, {self.found} found"

    def tally(self) -> Tally:
        return Tally(self.acked, max(0, self.acked - self.found), "records")


@dataclass(frozen=True)
class Counter(Workload):
    """Numbered 4 KiB records at increasing offsets, each flushed before its ack (`sync`)."""

    records: int = 40
    sync: bool = True

    kind = "counter"
    checker = "counter"
    checkers = (ORACLE, "counter")
    needs_filesystem = False

    @classmethod
    def parse(cls, fields: FieldReader) -> Counter:
        records = fields.integer("records", 40, minimum=1)
        sync = fields.string("sync", "yes")
        if sync not in ("yes", "no"):
            raise fields.error("sync", f'must be "yes" or "no", not {sync!r}')
        return cls(records, sync == "yes")

    def keeps_acknowledged(self, promise: Promise) -> bool:
        return self.sync and promise is not Promise.NOTHING

    def start(self, ctx: GuestContext, seed: int, fault: FaultModel) -> Run:
        command = f"counter write {self.records} {'sync' if self.sync else 'nosync'} {seed}"
        return StreamRun(ctx, command, self.kind, fault)

    def check(self, ctx: GuestContext, seed: int, run: Run) -> Observation:
        found = json.loads(ctx.ssh.check_output(f"counter check {seed}"))["found"]
        return CounterObservation(run.acked(), found)


@pytest.fixture
def counter() -> Iterator[type[Counter]]:
    registry.register(Counter)
    yield Counter
    registry.unregister(Counter.kind)


# -- the fake machine ---------------------------------------------------------------------


def record(seq: int, seed: int) -> bytes:
    head = f"counter {seq} {seed}\n".encode()
    return head + bytes([seq % 251]) * (RECORD - len(head))


class FakeGuest:
    """The guest's side: runs the `counter` commands against the disk it is given."""

    # The guest holds still after this many acknowledgements until the cut (or the
    # backend's restart) lets it go on: the cut lands at a known point, every time.
    HOLD_AFTER = 10

    def __init__(self, disk: Callable[[], BlockBackend | None]) -> None:
        self.disk = disk
        self.dead = threading.Event()  # the power is gone
        self.stopped = threading.Event()  # killall counter, or a clean shutdown
        self.resume = threading.Event()

    def run(
        self,
        command: str,
        timeout: float = 60.0,
        *,
        check: bool = False,
        on_stdout: Callable[[str], None] | None = None,
        **_: Any,
    ) -> CommandResult:
        argv = command.split()
        if argv[:2] == ["counter", "write"]:
            return self._write(command, int(argv[2]), argv[3] == "sync", int(argv[4]), on_stdout)
        if argv[:2] == ["counter", "check"]:
            return self._check(command, int(argv[2]))
        if argv[0] == "killall":
            self.stopped.set()
            return CommandResult(command, 0, "", "")
        if argv[0] == "dmesg":
            return CommandResult(command, 0, "", "")
        raise AssertionError(f"the fake guest cannot run {command!r}")

    def check_output(self, command: str, timeout: float = 60.0) -> str:
        return self.run(command, timeout, check=True).stdout

    def _write(
        self,
        command: str,
        records: int,
        sync: bool,
        seed: int,
        on_stdout: Callable[[str], None] | None,
    ) -> CommandResult:
        for seq in range(1, records + 1):
            if seq == self.HOLD_AFTER + 1:
                self.resume.wait(30)
            if self.dead.is_set():
                raise EOFError("the guest lost power")
            if self.stopped.is_set():
                return CommandResult(command, 137, "", "")
            disk = self.disk()
            assert disk is not None
            disk.write(seq * RECORD, record(seq, seed))
            if sync:
                disk.flush()
            if self.dead.is_set():
                raise EOFError("the guest lost power")
            if on_stdout is not None:
                on_stdout(str(seq))
        return CommandResult(command, 0, "", "")

    def _check(self, command: str, seed: int) -> CommandResult:
        disk = self.disk()
        assert disk is not None
        found = 0
        while disk.read((found + 1) * RECORD, RECORD) == record(found + 1, seed):
            found += 1
        return CommandResult(command, 0, json.dumps({"found": found}), "")


class FakeSession:
    """`CellSession` on the real block stack, with a `FakeGuest` for a machine."""

    instances: list[FakeSession] = []

    def __init__(
        self,
        directory: Path,
        image: Any,
        mode: CacheMode,
        spec: DiskSpec,
        **_: Any,
    ) -> None:
        self.directory = Path(directory)
        self.mode = mode
        self.disk_path = self.directory / "disk.img"
        self.journal = self.directory / "disk.journal"
        self.write_log = self.directory / "writes.log"
        with open(self.disk_path, "wb") as f:
            f.truncate(spec.size)
        rules = [r.to_rule().to_json() for r in spec.blkdebug]
        self.blkdebug = self.directory / "blkdebug.json" if rules else None
        if self.blkdebug is not None:
            self.blkdebug.write_text(json.dumps(rules))
        self.backend: BlockBackend | None = None
        self.guest = FakeGuest(lambda: self.backend)
        self.events: list[str] = []
        FakeSession.instances.append(self)

    def __enter__(self) -> FakeSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.guest.dead.set()
        self.guest.resume.set()
        self._close()

    def _close(self) -> None:
        """A clean stop: flush, as `powercut serve` does on SIGTERM."""
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def _kill(self) -> None:
        """SIGKILL: the nodes close without the flush a clean stop would do."""
        if self.backend is not None:
            self.backend.graph.close()
            self.backend = None

    def _open(self, faults: bool) -> None:
        graph: Any = (
            fault_graph(self.disk_path, self.journal, self.write_log, self.blkdebug)
            if faults
            else {"driver": "raw", "file": {"driver": "file", "filename": str(self.disk_path)}}
        )
        self.backend = open_backend(graph, cache=self.mode)

    def boot(self, timeout: float = 120.0) -> Any:
        self.events.append("boot")
        if self.backend is None:
            self._open(faults=True)
        return self.guest

    @property
    def ssh(self) -> Any:
        return self.guest

    def host_port(self, guest_port: int) -> int:
        raise AssertionError("the counter workload uses no forwarded port")

    @property
    def fio_server_port(self) -> int | None:
        return None

    def requests(self, kind: str) -> int:
        return -1

    def freeze_disk(self) -> None:
        self.events.append("freeze")

    def power_cut(self, fault: Any, policy: Any, seed: int = 0, *, check: bool = True) -> PowerCut:
        model, chosen = parse_fault(fault), parse_policy(policy)
        self.events.append(f"cut:{model.value}")
        self.guest.dead.set()  # both the guest and the backend stop at this instant
        self.guest.resume.set()
        if model is FaultModel.HOST_POWER_CUT:
            self._kill()
        else:
            self._close()  # the host stays up: the backend stops cleanly
        cut = None
        if model is FaultModel.HOST_POWER_CUT:
            cut = apply_cut(self.disk_path, self.journal, chosen, seed)
        else:
            chosen = None
        contract = reference_promise(self.mode, model, chosen)
        report = self.check_oracle(contract) if check else None
        return PowerCut(model, chosen, seed, contract.mode_name, cut, report, 0.0)

    def reboot(self, timeout: float = 120.0) -> Any:
        self.events.append("reboot")
        self.guest = FakeGuest(lambda: self.backend)
        self._open(faults=False)
        return self.guest

    def crash_backend(self, timeout: float = 60.0) -> float:
        self.events.append("crash-backend")
        self._kill()
        self._open(faults=True)  # the journal and the log go on, as a restarted serve does
        self.guest.resume.set()
        return 0.0

    def shutdown(self) -> None:
        self.events.append("shutdown")
        self.guest.stopped.set()
        self.guest.resume.set()
        self._close()

    def power_off(self) -> None:
        self.guest.dead.set()
        self.guest.resume.set()

    def check_oracle(self, contract: Promise) -> oracle.OracleReport:
        return oracle.check(self.disk_path, self.write_log, contract)

    def artifacts(self) -> dict[str, Path]:
        return {"write_log": self.write_log}


# -- running cells ------------------------------------------------------------------------

SCENARIO = """\
name = "counting"
modes = ["writethrough", "writeback", "unsafe"]
[[fault]]
model = "host-power-cut"
policy = "lose-all"
[[fault]]
model = "guest-power-cut"
[[fault]]
model = "backend-crash"
[[workload]]
kind = "counter"
records = 40
[[cut]]
after-acked-writes = 10
"""


def cells(text: str = SCENARIO) -> dict[str, Cell]:
    return {c.id: c for c in expand(parse_scenario(text, "counting.toml"))}


def run_cell(cell: Cell, tmp_path: Path) -> Any:
    runner = CellRunner(
        cell,
        tmp_path / cell.id.replace("/", "_"),
        image=None,  # type: ignore[arg-type]
        accel=None,
        out=tmp_path,
        reproduce=cell.reproduce_command(),
        session_factory=FakeSession,
    )
    return runner.run()


@pytest.fixture(autouse=True)
def _fresh_sessions() -> Iterator[None]:
    FakeSession.instances.clear()
    yield
    for s in FakeSession.instances:
        s.__exit__()
    FakeSession.instances.clear()


def test_a_workload_added_in_one_module_is_parsed_expanded_and_judged(
    counter: type[Counter], tmp_path: Path
) -> None:
    found = cells()
    assert len(found) == 9
    cell = found["writethrough/host-power-cut.lose-all/counter/after-10-acked/r0"]
    assert cell.workload.workload == Counter(records=40, sync=True)
    assert cell.checkers == (ORACLE, "counter")
    result = run_cell(cell, tmp_path)
    assert result.verdict == Verdict.PASS.value, result.reason
    assert result.workload_kind == "counter"
    names = [c.name for c in result.checkers]
    assert names == ["oracle", "counter"]
    counter_result = result.checkers[1]
    assert counter_result.details["acked"] >= 10
    assert counter_result.details["found"] >= counter_result.details["acked"]
    session = FakeSession.instances[-1]
    assert session.events == ["boot", "cut:host-power-cut", "reboot"]


def test_writeback_with_synced_acks_keeps_them_through_a_host_cut(
    counter: type[Counter], tmp_path: Path
) -> None:
    cell = cells()["writeback/host-power-cut.lose-all/counter/after-10-acked/r0"]
    result = run_cell(cell, tmp_path)
    assert result.verdict == Verdict.PASS.value, result.reason
    assert result.writes_acknowledged >= 10 and result.lost == 0


def test_unsafe_loses_synced_acks_and_the_negative_control_sees_it(
    counter: type[Counter], tmp_path: Path
) -> None:
    cell = cells()["unsafe/host-power-cut.lose-all/counter/after-10-acked/r0"]
    result = run_cell(cell, tmp_path)
    assert result.expected == "loss detected"
    assert result.verdict == Verdict.PASS.value, result.reason
    assert result.reason.startswith("loss detected as expected")
    by_name = {c.name: c for c in result.checkers}
    assert by_name["counter"].loss_detected and by_name["oracle"].loss_detected


def test_a_lying_flush_under_writeback_fails_the_cell(
    counter: type[Counter], tmp_path: Path
) -> None:
    text = (
        SCENARIO.replace('modes = ["writethrough", "writeback", "unsafe"]', 'modes = ["writeback"]')
        + '[[blkdebug]]\nop = "flush"\naction = "lying-flush"\n'
    )
    cell = cells(text)["writeback/host-power-cut.lose-all/counter/after-10-acked/r0"]
    result = run_cell(cell, tmp_path)
    assert result.verdict == Verdict.FAIL.value, result.reason
    assert "counter:" in result.reason or "oracle:" in result.reason
    assert result.lost > 0


def test_acks_without_sync_may_be_lost_under_writeback(
    counter: type[Counter], tmp_path: Path
) -> None:
    text = SCENARIO.replace("records = 40", 'records = 40\nsync = "no"')
    cell = cells(text)["writeback/host-power-cut.lose-all/counter/after-10-acked/r0"]
    result = run_cell(cell, tmp_path)
    assert result.verdict == Verdict.PASS.value, result.reason
    assert "allowed loss: counter" in result.reason
    assert result.checkers[1].expected == "loss-allowed"


def test_a_guest_power_cut_keeps_every_completed_write(
    counter: type[Counter], tmp_path: Path
) -> None:
    cell = cells()["unsafe/guest-power-cut/counter/after-10-acked/r0"]
    result = run_cell(cell, tmp_path)
    assert result.verdict == Verdict.PASS.value, result.reason
    assert FakeSession.instances[-1].events == ["boot", "cut:guest-power-cut", "reboot"]


def test_a_backend_crash_is_checked_in_the_same_boot(
    counter: type[Counter], tmp_path: Path
) -> None:
    cell = cells()["writeback/backend-crash/counter/after-10-acked/r0"]
    result = run_cell(cell, tmp_path)
    assert result.verdict == Verdict.PASS.value, result.reason
    assert FakeSession.instances[-1].events == ["boot", "crash-backend", "shutdown"]
    assert result.checkers[1].details["acked"] > 10  # the workload went on after the restart


def test_a_bad_field_of_the_new_workload_names_file_line_and_field(
    counter: type[Counter],
) -> None:
    from harness.errors import ScenarioError

    with pytest.raises(ScenarioError, match=r"counting.toml:13: field 'workload\[0\]\.sync'"):
        cells(SCENARIO.replace("records = 40", 'records = 40\nsync = "maybe"'))


def test_an_unregistered_kind_is_refused_with_the_known_ones() -> None:
    from harness.errors import ScenarioError

    with pytest.raises(ScenarioError, match=r"kind.*must be one of: fio-verify, ack-records"):
        cells()


def test_a_workload_that_fails_before_the_cut_is_an_error_of_the_cell(
    counter: type[Counter], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: FakeGuest, command: str, *a: Any, **k: Any) -> CommandResult:
        raise GuestError("counter: no space left on device")

    monkeypatch.setattr(FakeGuest, "_write", broken)
    cell = cells()["writeback/host-power-cut.lose-all/counter/after-10-acked/r0"]
    result = run_cell(cell, tmp_path)
    assert result.verdict == Verdict.ERROR.value
    assert "no space left on device" in result.reason
