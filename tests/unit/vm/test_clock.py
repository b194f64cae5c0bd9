"""The host TSC frequency that keeps TCG guests' clocks true (harness/vm/clock.py)."""

from __future__ import annotations

import platform
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.vm.clock import clock_append, host_tsc_khz
from harness.vm.libvirt import domain_xml
from harness.vm.qemu import qemu_argv
from harness.vm.spec import Accel, MachineSpec

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="reads the x86 TSC")


def test_the_host_tsc_frequency_is_measured_once_and_plausible():
    khz = host_tsc_khz()
    assert khz is not None and 100_000 < khz < 10_000_000  # 100 MHz .. 10 GHz
    t0 = time.monotonic()
    assert host_tsc_khz() == khz  # cached: the second call does not measure again
    assert time.monotonic() - t0 < 0.05


def test_tcg_guests_get_the_frequency_and_kvm_guests_nothing():
    assert clock_append(Accel.TCG) == f"tsc_early_khz={host_tsc_khz()}"
    assert clock_append(Accel.KVM) == ""


def test_every_tcg_guest_boots_with_the_frequency_on_either_backend(
    tmp_path: Path, bare_spec: MachineSpec
) -> None:
    # Single guests too: a fio-verify cell's trigger fired against a clock running fast.
    spec = bare_spec
    word = f"tsc_early_khz={host_tsc_khz()}"
    for accel, wanted in ((Accel.TCG, f"console=ttyS0 {word}"), (Accel.KVM, "console=ttyS0")):
        argv = qemu_argv(spec, accel, {22: 2222}, tmp_path)
        assert argv[argv.index("-append") + 1] == wanted
        xml = ET.fromstring(domain_xml(spec, "x", accel, {}, tmp_path / "c"))
        assert xml.findtext("os/cmdline") == wanted
