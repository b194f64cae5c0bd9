"""QemuMachine's start, stopped part way: the QEMU it started never outlives it.

A stand-in for qemu-system (a script that creates its QMP socket's path and
waits) lets the test interrupt the start where a Ctrl-C lands in a real run:
after QEMU is up and its disks connected, before QMP has answered.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from harness.proc import live_processes
from harness.vm import qemu
from harness.vm.qemu import QemuMachine
from harness.vm.spec import Accel, MachineSpec

# Creates the path given to -qmp unix:PATH,... and sleeps until killed.
_FAKE_QEMU = """#!{python}
import sys, time
for a in sys.argv:
    if a.startswith("unix:") and "qmp.sock" in a:
        open(a[len("unix:"):].split(",")[0], "w").close()
time.sleep(600)
"""


def _machine(tmp_path: Path, spec: MachineSpec) -> QemuMachine:
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text(_FAKE_QEMU.format(python=sys.executable))
    fake.chmod(0o755)
    return QemuMachine(spec, workdir=tmp_path / "vm", accel=Accel.TCG, qemu=str(fake))


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, SystemExit])
def test_a_start_interrupted_before_qmp_answers_leaves_no_qemu_running(
    tmp_path: Path,
    bare_spec: MachineSpec,
    monkeypatch: pytest.MonkeyPatch,
    interruption: type[BaseException],
) -> None:
    started: list[int] = []

    class _Interrupted(qemu._Monitor):
        def connect_within(self, timeout: float) -> None:
            started.extend(p.pid for p in live_processes() if p.name.startswith("qemu-"))
            raise interruption()

    monkeypatch.setattr(qemu, "_Monitor", _Interrupted)
    machine = _machine(tmp_path, bare_spec)
    try:
        with pytest.raises(interruption):
            machine.start()
        assert len(started) == 1  # the stand-in was running when the start was interrupted
        assert not [p for p in live_processes() if p.pid in started]
        with pytest.raises(ProcessLookupError):
            os.kill(started[0], 0)  # gone and reaped, not a zombie
    finally:
        for leaked in [p for p in live_processes() if p.pid in started]:
            leaked.kill()  # only when the assertions above failed
        machine.close()
