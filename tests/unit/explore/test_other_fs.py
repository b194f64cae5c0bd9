"""The host-side checkers of xfs, btrfs and f2fs: read-only, so they judge without undo."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from harness.errors import ConfigError
from harness.explore.hostcheck import Ext4Checker, ReadOnlyChecker, checker_for

CASES = [("xfs", "mkfs.xfs", 320), ("btrfs", "mkfs.btrfs", 128), ("f2fs", "mkfs.f2fs", 64)]


@pytest.mark.parametrize(("fstype", "mkfs", "mib"), CASES)
def test_a_fresh_filesystem_passes_and_is_left_as_it_was(
    tmp_path: Path, fstype: str, mkfs: str, mib: int
) -> None:
    if shutil.which(mkfs) is None:
        pytest.skip(f"{mkfs} is not installed")
    img = tmp_path / f"{fstype}.img"
    with open(img, "wb") as f:
        f.truncate(mib << 20)
    subprocess.run([mkfs, "-q", str(img)], check=True, capture_output=True)
    before = img.read_bytes()
    checker = checker_for(fstype, tmp_path)
    assert checker is not None
    outcome = checker.check(img)
    assert outcome.ok is True, outcome.detail
    assert img.read_bytes() == before


def test_a_damaged_superblock_fails(tmp_path: Path) -> None:
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is not installed")
    img = tmp_path / "xfs.img"
    with open(img, "wb") as f:
        f.truncate(320 << 20)
    subprocess.run(["mkfs.xfs", "-q", str(img)], check=True)
    with open(img, "r+b") as f:
        f.write(b"\xff" * 512)
    checker = checker_for("xfs", tmp_path)
    assert checker is not None
    assert checker.check(img).ok is False


def test_checker_names(tmp_path: Path) -> None:
    assert checker_for(None, tmp_path) is None
    assert isinstance(checker_for("ext4", tmp_path), Ext4Checker)
    with pytest.raises(ConfigError, match="no host-side checker"):
        checker_for("zfs", tmp_path)


def test_the_dirty_log_marker_is_read_in_english_whatever_the_locale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in for xfs_repair -n that, like a translated one, says the marker in English
    # only under the C locale; LC_ALL set by the user wins over a LANG=C of ours.
    tool = tmp_path / "fake-xfs-repair"
    tool.write_text(
        '#!/bin/sh\nif [ "$LC_ALL" = C ]; then echo "valuable metadata changes in a log"; '
        'else echo "wertvolle Metadatenänderungen in einem Protokoll"; fi\nexit 1\n'
    )
    tool.chmod(0o755)
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    checker = ReadOnlyChecker("xfs_repair", [str(tool)], "valuable metadata changes in a log")
    outcome = checker.check(tmp_path / "unused.img")
    assert outcome.ok is None and "log needs replay" in outcome.detail
