"""`powercut image build` and `powercut vm` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

POWERCUT = [sys.executable, "-m", "harness.cli"]


def test_image_build_json_names_files_that_exist_and_is_cached(guest_image):
    out = subprocess.run(
        [*POWERCUT, "image", "build", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    data = json.loads(out)
    assert data["cache_hit"] is True  # the session fixture built it already
    assert data["recipe_hash"] == guest_image.recipe_hash
    for key in ("kernel", "initramfs", "root_disk", "ssh_key", "manifest"):
        assert Path(data[key]).is_file(), key
    manifest = json.loads(Path(data["manifest"]).read_text())
    assert manifest["kernel"]["package"].startswith("linux-image-")
    assert "fio" in manifest["packages"] and "busybox-static" in manifest["packages"]


def test_vm_command_streams_output_and_exits_with_the_command_status(tmp_path, powercut_accel):
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"")
    with open(disk, "r+b") as f:
        f.truncate(32 << 20)
    proc = subprocess.run(
        [
            *POWERCUT,
            "vm",
            "--disk",
            str(disk),
            "--backend",
            "qemu-storage-daemon",
            "--accel",
            powercut_accel.value,
            "--",
            "cat /sys/block/vda/cache_type; echo oops >&2; exit 7",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout.strip() == "write through"
    assert "oops" in proc.stderr


def test_vm_backend_powercut_or_a_clear_message(tmp_path, powercut_accel):
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(32 << 20)
    proc = subprocess.run(
        [
            *POWERCUT,
            "vm",
            "--disk",
            str(disk),
            "--backend",
            "powercut",
            "--cache",
            "writeback",
            "--accel",
            powercut_accel.value,
            "--",
            "cat /sys/block/vda/cache_type",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        assert "not available yet" in proc.stderr, proc.stderr
    else:
        assert proc.stdout.strip() == "write back"


def test_vm_rejects_a_missing_disk_with_advice(tmp_path):
    proc = subprocess.run(
        [*POWERCUT, "vm", "--disk", str(tmp_path / "nope.img"), "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "does not exist" in proc.stderr and "truncate" in proc.stderr
