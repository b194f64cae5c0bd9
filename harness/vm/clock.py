"""The guest's clock under TCG: tell its kernel the TSC frequency instead of letting it measure.

Under TCG the guest's TSC is the host's (QEMU's rdtsc helper reads the
host's counter), but Debian's kernel has no CPUID leaf to learn its
frequency from and measures it at boot against the emulated PIT. On a
loaded host the vCPU is descheduled in the middle of that measurement, and
the result can be far off. Measured here (2 cores, load 15): one node of
three booted at once logged "PIT calibration deviates from HPET: 343148
2595373 ... Using PIT calibration value" — a 2596 MHz TSC taken for
343 MHz, so its clock ran 7.6 times too fast (uptime 4013 s after 9 minutes).
The kernel's later refinement against the HPET gives up beyond a 1%
difference, and the image boots with `tsc=reliable`, so nothing corrects it.
A replicated system notices at once: that node's election and heartbeat
timers fire 7.6 times early and an etcd cluster never becomes healthy. One
guest notices too: a fio-verify cell's timed trigger fired against a clock
running fast (the console's "soft lockup", 418 s of guest time in a 14 s
boot) and the cell ended in "fio ended before its trigger fired". So every
TCG guest boots with the host's frequency (qemu.py and libvirt.py build the
command line through `kernel_cmdline`).

`tsc_early_khz=` (Linux 5.x and later) makes the kernel take the frequency
as given and skip both calibrations. The frequency is the host's TSC's,
measured here once per process: the counter read (through a few bytes of
machine code: `rdtsc`) against CLOCK_MONOTONIC over 0.1 s.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import platform
import time

from harness.vm.spec import Accel

log = logging.getLogger(__name__)

# rdtsc; shl rdx, 32; or rax, rdx; ret  (x86-64 System V: the result in rax)
_RDTSC = bytes([0x0F, 0x31, 0x48, 0xC1, 0xE2, 0x20, 0x48, 0x09, 0xD0, 0xC3])
_WINDOW = 0.1
# Keeps the code page mapped for the life of the process (ctypes calls into it).
_keep: list[object] = []


def _rdtsc() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, PermissionError) as exc:  # a hardened kernel may refuse W+X pages
        log.info("cannot map code to read the TSC (%s); the guest calibrates its own", exc)
        return None
    page.write(_RDTSC)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    _keep.append(page)
    return ctypes.CFUNCTYPE(ctypes.c_uint64)(address)


@functools.cache
def host_tsc_khz() -> int | None:
    """The host TSC's frequency in kHz, or None where it cannot be read (not x86-64)."""
    rdtsc = _rdtsc()
    if rdtsc is None:
        return None
    t0 = time.monotonic_ns()
    c0 = rdtsc()
    time.sleep(_WINDOW)
    t1 = time.monotonic_ns()
    c1 = rdtsc()
    if t1 <= t0 or c1 <= c0:
        return None
    khz = round((c1 - c0) * 1_000_000 / (t1 - t0))
    log.info("host TSC: %d kHz", khz)
    return khz


def kernel_cmdline(cmdline: str, accel: Accel) -> str:
    """A machine's kernel command line as booted: with the clock's words under TCG."""
    return f"{cmdline} {clock_append(accel)}".strip()


def clock_append(accel: Accel) -> str:
    """Kernel command-line words that keep a TCG guest's clock true; nothing under KVM."""
    if accel is not Accel.TCG:
        return ""  # kvm-clock
    khz = host_tsc_khz()
    return f"tsc_early_khz={khz}" if khz else ""
