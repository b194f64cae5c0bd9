"""Choose the accelerator: KVM when a short probe proves it runs guest code, else TCG.

/dev/kvm can exist and open fine while the guest kernel hangs (nested KVM on
some hosts; a few real-mode instructions still run there), so the probe boots
the guest kernel itself and waits a few seconds for its first console line.
Silence means TCG. The verdict is cached per host boot (the kernel's boot_id)
and can be forced with `--accel` or POWERCUT_ACCEL.

"auto" is a word of the command line and of pytest's `--accel` only
(`parse_accel`, where the option is read): below them the request is an
`Accel` or None, and `choose_accel` resolves it once per run or session
(docs/architecture.md); a machine given None resolves it itself.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
from pathlib import Path

from harness.errors import ConfigError, ProcessError, TimeoutExpired
from harness.proc import ManagedProcess
from harness.vm.image import cache_root
from harness.vm.spec import Accel

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
PROBE_TIMEOUT = 3.0
# The first line a booting Linux prints on its early console.
_MARKER = b"Linux version"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def probe_kvm(kernel: Path, timeout: float = PROBE_TIMEOUT) -> bool:
    """True if the guest kernel starts printing under KVM within `timeout` seconds.

    A probe that only runs a few real-mode or PVH instructions passes on this
    kind of host and the real kernel still hangs, so the probe boots the real
    kernel (without an initramfs) to its first early-console line.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        log.info("KVM unusable: /dev/kvm is missing or not accessible")
        return False
    with tempfile.TemporaryDirectory(prefix="powercut-kvm-probe-") as tmp:
        serial = Path(tmp) / "serial.log"
        proc = ManagedProcess(
            [
                QEMU,
                "-accel",
                "kvm",
                "-M",
                "pc",
                "-m",
                "128",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
                "-bios",
                "/usr/share/qemu/qboot.rom",
                "-kernel",
                str(kernel),
                "-append",
                "earlyprintk=ttyS0 console=ttyS0 panic=-1",
                "-serial",
                f"file:{serial}",
            ],
            name="kvm-probe",
            log_path=Path(tmp) / "qemu.log",
            stop_signal=signal.SIGKILL,
            stop_timeout=1.0,
        )

        def printed() -> bool:
            try:
                return _MARKER in serial.read_bytes()
            except OSError:
                return False

        with proc:
            try:
                proc.wait_for(printed, timeout, "the KVM probe's first console line")
            except TimeoutExpired:
                log.warning(
                    "KVM probe: the kernel printed nothing within %.1fs; using TCG", timeout
                )
                return False
            except ProcessError:
                log.info("KVM probe: QEMU failed: %s", proc.log_tail(5))
                return printed()
        return True


ACCEL_CHOICES = ("auto", "kvm", "tcg")  # --accel's words; "auto": KVM when a probe says it works


def parse_accel(name: str | None) -> Accel | None:
    """An `--accel` word (or $POWERCUT_ACCEL) as the accelerator asked for; None: auto."""
    if not name or name == "auto":
        return None
    try:
        return Accel(name)
    except ValueError:
        raise ConfigError(f"unknown accelerator {name!r}; use kvm, tcg or auto") from None


def choose_accel(requested: Accel | None, kernel: Path, *, cache: Path | None = None) -> Accel:
    """The accelerator to use: `requested`, else $POWERCUT_ACCEL, else the cached probe."""
    want = requested or parse_accel(os.environ.get("POWERCUT_ACCEL"))
    if want is not None:
        return want
    path = (cache or cache_root()) / "accel.json"
    boot = _boot_id()
    try:
        data = json.loads(path.read_text())
        if data.get("boot_id") == boot:
            return Accel(data["accel"])
    except (OSError, ValueError, KeyError):
        pass
    accel = Accel.KVM if probe_kvm(kernel) else Accel.TCG
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"boot_id": boot, "accel": accel.value}) + "\n")
    os.replace(tmp, path)
    log.info("accelerator: %s (probed; cached in %s)", accel.value, path)
    return accel
