"""`powercut io`: qemu-io's commands, output and exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main


def io(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["io", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_write_then_verify_a_pattern(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = io(
        capsys,
        "-f",
        "raw",
        "-t",
        "writeback",
        "-c",
        "write -P 0xab 4k 8k",
        "-c",
        "read -P 0xab 4k 8k",
        str(image),
    )
    assert status == 0
    assert "wrote 8192/8192 bytes at offset 4096" in out
    assert "read 8192/8192 bytes at offset 4096" in out
    assert "8 KiB, 1 ops;" in out
    with open(image, "rb") as f:
        f.seek(4096)
        assert f.read(8192) == b"\xab" * 8192


def test_pattern_mismatch_fails_with_status_one(
    image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = io(capsys, "-c", "read -P 0x11 0 512", str(image))
    assert status == 1
    assert "Pattern verification failed at offset 0, 512 bytes" in out


def test_read_beyond_the_end_fails_and_later_commands_still_run(
    image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = io(capsys, "-c", "read 16M 4k", "-c", "write -q 0 1", str(image))
    assert status == 1
    assert "read failed: Input/output error" in out
    assert image.read_bytes()[:1] == b"\xcd"  # qemu-io's default write pattern


def test_write_zeroes_discard_flush_and_quiet(
    image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = io(
        capsys,
        "-c",
        "write -P 1 0 64k",
        "-c",
        "write -z -q 0 4k",
        "-c",
        "write -z -u 4k 4k",
        "-c",
        "discard 8k 4k",
        "-c",
        "flush",
        "-c",
        "read -q -P 0 0 12k",
        "-c",
        "read -P 1 12k 4k",
        str(image),
    )
    assert status == 0, out
    assert "discard 4096/4096 bytes at offset 8192" in out
    assert "wrote 4096/4096 bytes at offset 0" not in out


def test_sizes_with_bad_suffixes_are_refused(
    image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = io(capsys, "-c", "read 2x 1", str(image))
    assert status == 1
    assert "non-numeric argument, or extraneous/unrecognized suffix -- 2x" in out


def test_unknown_command_lists_the_commands(
    image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = io(capsys, "-c", "bogus", str(image))
    assert status == 1
    assert 'command "bogus" not found' in out and "discard" in out


def test_read_only_refuses_writes(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = io(capsys, "-r", "-c", "write 0 4k", str(image))
    assert status == 1
    assert "write failed: Operation not permitted" in out
    assert image.read_bytes() == bytes(len(image.read_bytes()))


def test_missing_image_fails_to_open(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = io(capsys, "-c", "flush", str(tmp_path / "none.img"))
    assert status == 1
    assert "can't open device" in err and "No such file" in err


def test_bad_cache_mode_lists_the_modes(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = io(capsys, "-t", "direct", "-c", "flush", str(image))
    assert status == 1
    assert "invalid cache mode 'direct'" in err and "directsync" in err


def test_image_opts_drive_any_graph(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = f"driver=raw,offset=1M,size=1M,file.driver=file,file.filename={image}"
    status, out, _ = io(capsys, "--image-opts", "-c", "write -P 7 0 512", "-c", "info", spec)
    assert status == 0
    assert "format name: raw" in out and "length: 1048576 bytes" in out
    assert image.read_bytes()[1 << 20 : (1 << 20) + 512] == b"\x07" * 512


def test_stats_prints_json(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = io(
        capsys, "-c", "write -q 0 4k", "-c", "flush", "-c", "flush", "-c", "stats", str(image)
    )
    assert status == 0
    stats = json.loads(out[out.index("{") :])
    assert stats["ops"]["write"]["count"] == 1
    assert (stats["flushes_issued"], stats["flushes_elided"]) == (1, 1)


def test_commands_from_standard_input(image: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "harness.commands.io", str(image)],
        input="write -P 5 0 1k\nread -P 5 0 1k\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "read 1024/1024 bytes at offset 0" in proc.stdout


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io not installed")
def test_output_matches_qemu_io_line_for_line(image: Path) -> None:
    commands = [
        "write -P 0xab 0 4k",
        "read -P 0xab 0 4k",
        "discard 0 4k",
        "write -z 4k 4k",
        "read -v 0 32",
        "read 16M 4k",
    ]
    argv: list[str] = []
    for c in commands:
        argv += ["-c", c]

    def lines(cmd: list[str]) -> tuple[int, list[str]]:
        proc = subprocess.run([*cmd, *argv, str(image)], capture_output=True, text=True, timeout=60)
        # Timings differ run to run; the rest must not.
        kept = [ln for ln in proc.stdout.splitlines() if " ops; " not in ln]
        return proc.returncode, [ln.split(" (")[0] for ln in kept]

    ours = lines([sys.executable, "-m", "harness.commands.io", "-f", "raw"])
    theirs = lines(["qemu-io", "-f", "raw"])
    assert ours[0] == theirs[0]
    assert [ln.rstrip() for ln in ours[1]] == [ln.rstrip() for ln in theirs[1]]


def test_help_lists_every_command(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = io(capsys, "-c", "help", str(image))
    assert status == 0
    for name in ("read", "write", "discard", "flush", "info", "stats", "write-cache"):
        assert f"\n{name} " in f"\n{out}"


def test_object_creates_a_throttle_group_a_filter_can_name(
    image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    spec = f"driver=throttle,throttle-group=tgio,file.driver=file,file.filename={image}"
    reads = [arg for _ in range(12) for arg in ("-c", "read -q 0 512")]
    start = time.monotonic()
    status, out, err = io(
        capsys,
        "--object",
        "throttle-group,id=tgio,limits.iops-total=20",
        "--image-opts",
        *reads,
        spec,
    )
    elapsed = time.monotonic() - start
    assert status == 0, out + err
    # 20 IOPS with a bucket of 2: ten of the twelve reads wait 50 ms each.
    assert 0.4 <= elapsed <= 1.5, elapsed
    status, _, err = io(
        capsys, "--object", "throttle-group,id=tgio,limits.iops-totl=1", "-c", "flush", str(image)
    )
    assert status == 1 and "throttling option" in err
    status, _, err = io(capsys, "--object", "memory-backend-ram,id=m", "-c", "flush", str(image))
    assert status == 1 and "only object is throttle-group" in err
