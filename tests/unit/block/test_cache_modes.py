"""What each cache mode does at the host, observed with strace, against qemu-io.

The same command sequence runs through `powercut io` and `qemu-io`; the
number of fdatasync/fsync calls that reach the host and whether the image
was opened with O_DIRECT must match. The recorded figures are what qemu-io
7.2 does on this machine; when qemu-io is installed the test also compares
live, so a different QEMU version would show up here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.block import open_backend

pytestmark = pytest.mark.skipif(
    shutil.which("strace") is None, reason="needs strace (ci/bootstrap)"
)

# writes, a flush, a flush with nothing new, write-zeroes, a discard, a flush, an unmapping
# write-zeroes, and the flush every close does (bdrv_close).
SEQUENCE = [
    "write 0 4k",
    "write 4k 4k",
    "flush",
    "flush",
    "write -z 8k 4k",
    "discard 12k 4k",
    "flush",
    "write -z -u 64k 64k",
]

# mode -> (host syncs, opened O_DIRECT), as measured with qemu-io 7.2.
EXPECTED = {
    "writeback": (3, False),
    "none": (3, True),
    "off": (3, True),
    "writethrough": (5, False),
    "directsync": (5, True),
    "unsafe": (0, False),
}

_SYNC = re.compile(r"\b(fdatasync|fsync)\(")
_OPEN = re.compile(r"\bopenat\(AT_FDCWD, \"([^\"]+)\", ([A-Z_|]+)")


@dataclass(frozen=True)
class HostEffect:
    syncs: int
    direct: bool
    fallocates: tuple[str, ...]


def trace(argv: list[str], image: Path, tmp_path: Path) -> HostEffect:
    log = tmp_path / "strace.log"
    proc = subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=fdatasync,fsync,openat,fallocate",
            "-o",
            str(log),
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{argv[0]} failed: {proc.stdout}\n{proc.stderr}"
    text = log.read_text()
    syncs = len(_SYNC.findall(text))
    direct = any(
        "O_DIRECT" in flags for path, flags in _OPEN.findall(text) if Path(path).name == image.name
    )
    fallocates = tuple(re.findall(r"fallocate\(\d+, ([A-Z_|0-9]+),", text))
    log.unlink()
    return HostEffect(syncs, direct, fallocates)


def powercut_io(mode: str, commands: list[str], image: Path) -> list[str]:
    argv = [sys.executable, "-m", "harness.commands.io", "-f", "raw", "-t", mode]
    for c in commands:
        argv += ["-c", c]
    return [*argv, str(image)]


def qemu_io(mode: str, commands: list[str], image: Path) -> list[str]:
    argv = ["qemu-io", "-f", "raw", "-t", mode]
    for c in commands:
        argv += ["-c", c]
    return [*argv, str(image)]


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_host_syncs_and_o_direct_match_qemu(mode: str, image: Path, tmp_path: Path) -> None:
    ours = trace(powercut_io(mode, SEQUENCE, image), image, tmp_path)
    want_syncs, want_direct = EXPECTED[mode]
    assert (ours.syncs, ours.direct) == (want_syncs, want_direct)
    if shutil.which("qemu-io"):
        theirs = trace(qemu_io(mode, SEQUENCE, image), image, tmp_path)
        assert (ours.syncs, ours.direct) == (theirs.syncs, theirs.direct)
        # Discard and write-zeroes reach the host as the same fallocate calls, in order.
        assert ours.fallocates == theirs.fallocates


@pytest.mark.parametrize("mode", ["writethrough", "directsync"])
def test_writethrough_flushes_after_every_write(mode: str, image: Path, tmp_path: Path) -> None:
    five_writes = [f"write {i * 4}k 4k" for i in range(5)]
    ours = trace(powercut_io(mode, five_writes, image), image, tmp_path)
    assert ours.syncs == 5
    if shutil.which("qemu-io"):
        assert ours.syncs == trace(qemu_io(mode, five_writes, image), image, tmp_path).syncs


def test_repeated_flushes_reach_the_host_once(image: Path, tmp_path: Path) -> None:
    commands = ["write 0 4k", *["flush"] * 10]
    ours = trace(powercut_io("writeback", commands, image), image, tmp_path)
    assert ours.syncs == 1
    if shutil.which("qemu-io"):
        assert trace(qemu_io("writeback", commands, image), image, tmp_path).syncs == 1


def test_turning_the_write_cache_off_at_run_time_makes_writes_fua(
    image: Path, tmp_path: Path
) -> None:
    commands = [
        "write 0 4k",  # write cache on: nothing
        "write-cache off",
        "write 4k 4k",  # FUA -> flush -> fdatasync
        "write 8k 4k",  # again
        "flush",  # nothing new since the FUA flush: elided
        "write-cache on",
        "write 12k 4k",  # nothing
        "flush",  # fdatasync
    ]  # and the close flush finds nothing new
    ours = trace(powercut_io("writeback", commands, image), image, tmp_path)
    assert ours.syncs == 3


def test_turning_the_write_cache_on_in_writethrough_stops_the_syncs(image: Path) -> None:
    with open_backend(str(image), cache="writethrough") as backend:
        assert backend.enable_write_cache is False
        backend.write(0, b"x" * 4096)
        assert backend.stats().host_syncs == 1
        backend.set_write_cache(True)
        backend.write(4096, b"y" * 4096)
        backend.write(8192, b"z" * 4096)
        assert backend.stats().host_syncs == 1
        backend.flush()
        stats = backend.stats()
        assert stats.host_syncs == 2
        assert stats.fua_writes == 1


def test_unsafe_with_write_cache_off_still_never_syncs(image: Path) -> None:
    with open_backend(str(image), cache="unsafe") as backend:
        backend.set_write_cache(False)
        for i in range(3):
            backend.write(i * 4096, b"u" * 4096)
        backend.flush()
        stats = backend.stats()
        assert stats.host_syncs == 0
        assert stats.fua_writes == 3
        assert stats.flushes_elided == 1


def test_explicit_options_override_the_cache_mode(image: Path, tmp_path: Path) -> None:
    # cache=writeback, but the explicit options make it directsync.
    spec = f"driver=raw,file.driver=file,file.filename={image},cache.direct=on,write-cache=off"
    with open_backend(spec, cache="writeback") as backend:
        assert backend.root.open_flags.direct
        assert backend.enable_write_cache is False
        backend.write(0, b"d" * 4096)
        assert backend.stats().host_syncs == 1
    argv = [
        sys.executable,
        "-m",
        "harness.cli",
        "io",
        "--image-opts",
        "-c",
        "write 0 4k",
        f"driver=raw,file.driver=file,file.filename={image},cache.direct=on",
    ]
    effect = trace(argv, image, tmp_path)
    assert effect.direct
    assert effect.syncs == 1  # the close flush


def test_ignored_discards_neither_punch_nor_count_as_writes(image: Path, tmp_path: Path) -> None:
    commands = ["write 0 4k", "flush", "discard 0 4k", "flush"]
    argv = powercut_io("writeback", commands, image)
    argv[3:3] = ["-d", "ignore"]
    ours = trace(argv, image, tmp_path)
    assert (ours.syncs, ours.fallocates) == (1, ())
    if shutil.which("qemu-io"):
        theirs_argv = qemu_io("writeback", commands, image)
        theirs_argv[1:1] = ["-d", "ignore"]
        theirs = trace(theirs_argv, image, tmp_path)
        assert (ours.syncs, ours.fallocates) == (theirs.syncs, theirs.fallocates)


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io not installed")
def test_raw_window_writes_land_where_qemus_do(tmp_path: Path) -> None:
    images = []
    for tool in ("ours", "qemu"):
        path = tmp_path / f"{tool}.img"
        path.write_bytes(bytes(4 << 20))
        spec = f"driver=raw,offset=1M,size=2M,file.driver=file,file.filename={path}"
        commands = ["write -P 0x5a 0 4k", "write -P 0x6b 2044k 4k", "write -z 8k 4k", "read 2M 512"]
        argv = [sys.executable, "-m", "harness.commands.io"] if tool == "ours" else ["qemu-io"]
        for c in commands:
            argv += ["-c", c]
        proc = subprocess.run(
            [*argv, "--image-opts", spec], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 1  # the last read is past the window's end
        assert "read failed: Input/output error" in proc.stdout
        images.append(path.read_bytes())
    assert images[0] == images[1]


def test_fua_writes_in_writeback_are_followed_by_a_sync(image: Path, tmp_path: Path) -> None:
    # A FUA write (qemu-io's -f) in writeback: emulated by a flush, so later flushes with
    # nothing new are elided; write-zeroes with FUA likewise.
    commands = ["write -f 0 4k", "flush", "write 4k 4k", "write -f 8k 4k", "write -z -f 16k 4k"]
    ours = trace(powercut_io("writeback", commands, image), image, tmp_path)
    assert ours.syncs == 3
    if shutil.which("qemu-io"):
        assert trace(qemu_io("writeback", commands, image), image, tmp_path).syncs == ours.syncs


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io not installed")
@pytest.mark.parametrize("mode", ["none", "directsync"])
def test_misaligned_o_direct_requests_leave_the_image_as_qemus_do(
    mode: str, tmp_path: Path
) -> None:
    commands = [
        "write -P 1 0 8k",
        "write -P 2 100 3",
        "write -P 3 511 2",
        "write -P 4 4000 200",
        "write -z 1000 24",
        "discard 3000 100",
        "write -z -u 6000 10",
        "read -P 2 100 3",
    ]
    images = []
    for tool in ("ours", "qemu"):
        path = tmp_path / f"{tool}.img"
        path.write_bytes(bytes(64 << 10))
        argv = (
            powercut_io(mode, commands, path) if tool == "ours" else qemu_io(mode, commands, path)
        )
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        images.append(path.read_bytes())
    assert images[0] == images[1]
