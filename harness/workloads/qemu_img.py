"""The `qemu-img-check` checker: is a qcow2 image that lost its host's volatile cache still sound?

It judges any workload on a qcow2 disk (like the filesystem's `FSCK`), on
the host, on the image file as the power cut left it — after the offline
cut and before the reboot, because QEMU changes the image when it opens it:
an image with lazy refcounts whose dirty bit is set is repaired on open
(`qcow2_do_open` runs the check with BDRV_FIX_ERRORS | BDRV_FIX_LEAKS
unless the opener asked for BDRV_O_CHECK, as `qemu-img check` does).

How it classifies (`qemu-img check --output=json`, exit codes 0 clean,
1 not completed, 2 corrupted, 3 leaks only):

* leaked clusters are allowed: clusters with a refcount but no reference,
  which QEMU itself calls "waste of disk space, but no harm to data" — a
  crash between a refcount update and the L2 update that would have used
  the cluster leaves them, and qcow2 orders its metadata writes so that is
  the only harm an interrupted allocation may do;
* corruptions (a referenced cluster whose refcount is too low, overlapping
  metadata), check errors, an image QEMU marked corrupt, or a check that
  could not run are damage;
* with lazy refcounts and the dirty bit set, refcounts are stale by design
  and QEMU repairs them on the next open; the checker then does what that
  open would do, `qemu-img check -r all`, on a scratch copy, and judges the
  repaired copy (the image itself stays as the cut left it, for the
  oracle and for the reboot, where QEMU repairs it for real).

The header fields come from the qcow2 specification (docs/interop/qcow2.txt).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from harness.errors import ConfigError
from harness.workloads.base import QEMU_IMG_CHECK, Observation

__all__ = ["QEMU_IMG_CHECK", "QemuImgObservation", "check_image", "create_qcow2", "parse_check"]

QEMU_IMG = "qemu-img"

# qcow2.txt, "Header": the version 2 part (bytes 0-71), then version 3's additions (72-103).
Qcow2HeaderV2 = struct.Struct(">4sIQIIQIIQQIIQ")
Qcow2HeaderV3 = struct.Struct(">QQQII")  # incompatible, compatible, autoclear features, ...
QCOW2_MAGIC = b"QFI\xfb"
INCOMPAT_DIRTY = 1 << 0  # refcounts may be stale (lazy refcounts, not closed cleanly)
INCOMPAT_CORRUPT = 1 << 1  # QEMU found corrupt metadata and refuses to write
COMPAT_LAZY_REFCOUNTS = 1 << 0

# `qemu-img check` exit codes (qemu-img.texi, "check").
EXIT_CLEAN = 0
EXIT_NOT_COMPLETED = 1
EXIT_CORRUPT = 2
EXIT_LEAKS = 3
EXIT_UNSUPPORTED = 63


@dataclass(frozen=True)
class Qcow2Header:
    version: int
    cluster_bits: int
    size: int
    incompatible: int = 0
    compatible: int = 0

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible & INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible & COMPAT_LAZY_REFCOUNTS)


def read_header(data: bytes) -> Qcow2Header | None:
    """The fields of a qcow2 header this checker needs; None if `data` is not one."""
    if len(data) < Qcow2HeaderV2.size:
        return None
    magic, version, _bfo, _bfs, cluster_bits, size, *_ = Qcow2HeaderV2.unpack_from(data)
    if magic != QCOW2_MAGIC:
        return None
    if version < 3 or len(data) < Qcow2HeaderV2.size + Qcow2HeaderV3.size:
        return Qcow2Header(version, cluster_bits, size)
    incompatible, compatible, _autoclear, _order, _length = Qcow2HeaderV3.unpack_from(
        data, Qcow2HeaderV2.size
    )
    return Qcow2Header(version, cluster_bits, size, incompatible, compatible)


@dataclass(frozen=True)
class CheckResult:
    """One `qemu-img check --output=json` run."""

    exit_code: int
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    allocated_clusters: int = 0
    total_clusters: int = 0
    error: str = ""  # why the check did not complete (stderr), if it did not

    @property
    def completed(self) -> bool:
        return self.exit_code in (EXIT_CLEAN, EXIT_CORRUPT, EXIT_LEAKS) and not self.error

    @property
    def sound(self) -> bool:
        """Completed with no corruption and no check error (leaks are harmless)."""
        return self.completed and self.corruptions == 0 and self.check_errors == 0


def parse_check(stdout: str, exit_code: int, stderr: str = "") -> CheckResult:
    """`qemu-img check --output=json`'s answer; a missing or garbled report is an incomplete check.

    With `-r`, the counts are those left after the repair (QEMU reports what it
    fixed separately, as `corruptions-fixed` and `leaks-fixed`).
    """
    try:
        report: Any = json.loads(stdout) if stdout.strip() else None
    except json.JSONDecodeError:
        report = None
    if not isinstance(report, dict):
        reason = stderr.strip() or stdout.strip() or f"qemu-img check exited {exit_code}"
        return CheckResult(exit_code, error=reason.splitlines()[-1][:500])

    def count(key: str) -> int:
        value = report.get(key, 0)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    error = ""
    if exit_code not in (EXIT_CLEAN, EXIT_CORRUPT, EXIT_LEAKS):
        error = (stderr.strip() or f"qemu-img check exited {exit_code}").splitlines()[-1][:500]
    return CheckResult(
        exit_code=exit_code,
        corruptions=count("corruptions"),
        leaks=count("leaks"),
        check_errors=count("check-errors"),
        corruptions_fixed=count("corruptions-fixed"),
        leaks_fixed=count("leaks-fixed"),
        allocated_clusters=count("allocated-clusters"),
        total_clusters=count("total-clusters"),
        error=error,
    )


@dataclass(frozen=True)
class QemuImgObservation(Observation):
    """What `qemu-img check` found on the image the cut left (and after QEMU's repair, if dirty)."""

    check: CheckResult
    dirty: bool = False  # lazy refcounts, not closed cleanly: QEMU repairs it on open
    marked_corrupt: bool = False  # QEMU had flagged the image corrupt while running
    repaired: CheckResult | None = None  # `check -r all` on a copy, when dirty

    @property
    def judged(self) -> CheckResult:
        """The check that decides: after QEMU's repair on open when dirty, else the plain one."""
        return self.repaired if self.repaired is not None else self.check

    @property
    def loss(self) -> bool:
        return self.marked_corrupt or not self.judged.sound

    def summary(self) -> str:
        c = self.check
        if self.marked_corrupt:
            return "QEMU marked the image corrupt (incompatible feature bit 1)"
        if not c.completed:
            return f"qemu-img check did not complete (exit {c.exit_code}): {c.error}"
        plain = f"{c.corruptions} corruptions, {c.leaks} leaked clusters"
        if self.repaired is not None:
            r = self.repaired
            if not r.sound:
                what = r.error or f"{r.corruptions} corruptions, {r.check_errors} check errors"
                return f"dirty image ({plain}); after QEMU's repair on open still damaged: {what}"
            return (
                f"dirty image with lazy refcounts ({plain}); QEMU's repair on open fixed "
                f"{r.corruptions_fixed} corruptions and {r.leaks_fixed} leaks, leaving it sound"
            )
        if c.corruptions or c.check_errors:
            return f"qemu-img check: {plain}, {c.check_errors} check errors: the image is corrupt"
        if c.leaks:
            return f"qemu-img check: {c.leaks} leaked clusters (harmless), no corruption"
        return "qemu-img check: no errors"


def _run_check(image: Path, repair: bool, out: TextIO | None) -> CheckResult:
    argv = [QEMU_IMG, "check", "-f", "qcow2", "--output=json"]
    if repair:
        argv += ["-r", "all"]
    argv.append(str(image))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    except FileNotFoundError:
        raise ConfigError(f"{QEMU_IMG} is not installed on the host; run ci/bootstrap") from None
    if out is not None:
        out.write(f"$ {' '.join(argv)}  (exit {proc.returncode})\n{proc.stdout}{proc.stderr}\n")
    return parse_check(proc.stdout, proc.returncode, proc.stderr)


def check_image(image: Path, scratch: Path, out: TextIO | None = None) -> QemuImgObservation:
    """`qemu-img check` on `image` (read-only); a dirty one is also repaired as a copy in `scratch`.

    The image itself is never written: the oracle and the reboot need it as
    the cut left it.
    """
    with open(image, "rb") as f:
        header = read_header(f.read(Qcow2HeaderV2.size + Qcow2HeaderV3.size))
    if header is None:
        return QemuImgObservation(
            CheckResult(EXIT_NOT_COMPLETED, error=f"{image} has no qcow2 header any more")
        )
    plain = _run_check(image, False, out)
    repaired: CheckResult | None = None
    if header.dirty and not header.corrupt:
        scratch.parent.mkdir(parents=True, exist_ok=True)
        try:
            copy = subprocess.run(
                ["cp", "--sparse=always", str(image), str(scratch)],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            if copy.returncode != 0:  # cp without sparse support: a plain copy will do
                shutil.copyfile(image, scratch)
            repaired = _run_check(scratch, True, out)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(scratch)
    return QemuImgObservation(plain, header.dirty, header.corrupt, repaired)


def _qemu_img(argv: list[str], what: str) -> str:
    try:
        proc = subprocess.run(
            [QEMU_IMG, *argv], capture_output=True, text=True, timeout=300, check=False
        )
    except FileNotFoundError:
        raise ConfigError(f"{QEMU_IMG} is not installed on the host; run ci/bootstrap") from None
    if proc.returncode != 0:
        raise ConfigError(
            f"{QEMU_IMG} {' '.join(argv)} failed ({proc.returncode}): "
            f"{proc.stderr.strip()[-500:]} ({what})"
        )
    return proc.stdout


# Room beyond `qemu-img measure`'s fully allocated size, for refcount blocks a fragmented
# allocation may add.
ROOM = 4 << 20


def create_qcow2(raw: Path, target: Path, options: tuple[tuple[str, str], ...] = ()) -> int:
    """`qemu-img convert` a raw image (a filesystem made on the host) into a new qcow2 `target`.

    `options` go to `-o` as `qemu-img create` takes them (`lazy_refcounts=on`).
    Zero ranges stay unallocated, so the guest's first writes there allocate
    clusters: the metadata updates a power cut is about. The file is then
    extended (sparse) to the size a fully allocated image needs: served over
    NBD it cannot grow, and qcow2 allocates new clusters in the free space
    inside it. `raw` is removed; returns the file's size.
    """
    virtual = raw.stat().st_size
    opts = ["-o", ",".join(f"{k}={v}" for k, v in options)] if options else []
    _qemu_img(
        ["convert", "-f", "raw", "-O", "qcow2", *opts, str(raw), str(target)],
        "check format-options",
    )
    raw.unlink(missing_ok=True)
    measured = json.loads(
        _qemu_img(
            ["measure", "--output=json", "-O", "qcow2", *opts, "--size", str(virtual)],
            "measuring the image",
        )
    )
    size = max(target.stat().st_size, int(measured["fully-allocated"]) + ROOM)
    os.truncate(target, size)
    return size
