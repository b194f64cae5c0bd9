"""The worked example: a crash test of your own application with the `power_cut` fixture.

The "application" is a shell loop that appends a counter to a file on ext4
and `sync`s after each value — it acknowledges a value only once the sync
returned, the promise a database makes about a commit.
"""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.vm

APP = (
    "i=1; while [ $i -le 40 ]; do echo $i >> /mnt/counter && sync && echo ack $i; i=$((i+1)); done"
)


def acknowledged(output: str) -> list[str]:
    return [line.split()[1] for line in output.splitlines() if line.startswith("ack ")]


def test_synced_values_survive_a_host_power_cut_in_writeback(power_cut: Any) -> None:
    guest = power_cut.boot(mode="writeback", ext4=True)
    guest.check_output("mkdir -p /mnt && mount /dev/vda /mnt")
    acked = acknowledged(guest.check_output(APP, timeout=300))
    guest.check_output("echo never-synced >> /mnt/counter")  # the guest's page cache only

    cut = power_cut(fault="host", policy="lose-all", seed=7)
    assert cut.ok, cut.oracle.summary()  # the disk kept writeback's contract
    assert cut.oracle_mode == "writeback" and cut.oracle.writes_durable > 0

    guest = power_cut.reboot()
    guest.check_output("mount /dev/vda /mnt")  # journal replay
    found = guest.check_output("cat /mnt/counter").split()
    assert found[: len(acked)] == acked == [str(i) for i in range(1, 41)]


def test_unsafe_loses_synced_values_and_the_oracle_says_so(power_cut: Any) -> None:
    guest = power_cut.boot(mode="unsafe", ext4=True)
    guest.check_output("mkdir -p /mnt && mount /dev/vda /mnt")
    acked = acknowledged(guest.check_output(APP, timeout=300))
    assert len(acked) == 40

    cut = power_cut(fault="host", policy="lose-all", seed=7)
    # unsafe promises nothing: the oracle measures against what the syncs told the
    # application, and finds that lost.
    assert not cut.ok and cut.oracle.lost > 0, cut.oracle.summary()
    assert cut.cut is not None and cut.cut.writes_reverted > 0

    guest = power_cut.reboot()
    mounted = guest.run("mount /dev/vda /mnt && cat /mnt/counter", timeout=120)
    assert mounted.stdout.split() != acked  # the application sees the loss too
