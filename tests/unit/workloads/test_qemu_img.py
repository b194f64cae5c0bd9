"""The `qemu-img-check` checker: parsing `qemu-img check --output=json`, and real images judged."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from harness.crash.verdict import Outcome, _judge
from harness.report.results import Verdict
from harness.workloads.qemu_img import (
    INCOMPAT_CORRUPT,
    CheckResult,
    Qcow2HeaderV2,
    QemuImgObservation,
    check_image,
    create_qcow2,
    parse_check,
    read_header,
)

needs_qemu_img = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img and qemu-io are installed by ci/bootstrap",
)

# What qemu-img 7.2 printed for each case (tests below make the same images for real).
CLEAN = """{
    "image-end-offset": 1310720, "total-clusters": 4096, "check-errors": 0,
    "allocated-clusters": 15, "filename": "q.qcow2", "format": "qcow2"
}"""
LEAKS = """{
    "image-end-offset": 589824, "total-clusters": 1024, "check-errors": 0, "leaks": 2,
    "allocated-clusters": 2, "filename": "c.qcow2", "format": "qcow2"
}"""
CORRUPT = """{
    "image-end-offset": 458752, "total-clusters": 1024, "corruptions": 2, "check-errors": 0,
    "allocated-clusters": 3, "filename": "c2.qcow2", "format": "qcow2",
    "fragmented-clusters": 1
}"""
REPAIRED = """{
    "image-end-offset": 3342336, "total-clusters": 4096, "corruptions-fixed": 29,
    "check-errors": 0, "allocated-clusters": 44, "filename": "r.qcow2", "format": "qcow2"
}"""


def test_a_clean_report_is_sound() -> None:
    r = parse_check(CLEAN, 0)
    assert r.completed and r.sound
    assert (r.corruptions, r.leaks, r.allocated_clusters, r.total_clusters) == (0, 0, 15, 4096)


def test_leaked_clusters_are_harmless() -> None:
    r = parse_check(LEAKS, 3)
    assert (r.leaks, r.corruptions) == (2, 0) and r.sound
    obs = QemuImgObservation(r)
    assert not obs.loss and not obs.corruption
    assert "2 leaked clusters (harmless)" in obs.summary()


def test_corruptions_are_damage() -> None:
    r = parse_check(CORRUPT, 2)
    assert r.corruptions == 2 and r.completed and not r.sound
    obs = QemuImgObservation(r)
    assert obs.loss
    assert "2 corruptions" in obs.summary() and "corrupt" in obs.summary()


def test_the_counts_after_a_repair_are_what_is_left_and_what_was_fixed() -> None:
    r = parse_check(REPAIRED, 0)
    assert (r.corruptions, r.corruptions_fixed, r.leaks_fixed) == (0, 29, 0) and r.sound


@pytest.mark.parametrize(
    ("stdout", "code", "stderr"),
    [
        ("", 1, "qemu-img: Could not open 'x': Image is not in qcow2 format"),
        ("{not json", 2, ""),
        ("[1, 2]", 0, ""),
        (CLEAN, 1, "qemu-img: Check failed: Input/output error"),
        (CLEAN, 63, "qemu-img: This image format does not support checks"),
    ],
)
def test_a_check_that_did_not_complete_is_damage_with_its_reason(
    stdout: str, code: int, stderr: str
) -> None:
    r = parse_check(stdout, code, stderr)
    assert not r.completed and not r.sound and r.error
    if stderr:
        assert r.error == stderr
    assert QemuImgObservation(r).loss


def test_counts_of_the_wrong_type_count_as_zero() -> None:
    text = json.dumps({"corruptions": "7", "leaks": True, "check-errors": 0})
    r = parse_check(text, 0)
    assert (r.corruptions, r.leaks) == (0, 0)


def test_a_dirty_image_is_judged_after_the_repair_qemus_open_would_make() -> None:
    stale = parse_check(CORRUPT, 2)
    fixed = parse_check(REPAIRED, 0)
    obs = QemuImgObservation(stale, dirty=True, repaired=fixed)
    assert not obs.loss and obs.judged is fixed
    assert "QEMU's repair on open fixed 29 corruptions" in obs.summary()
    broken = QemuImgObservation(stale, dirty=True, repaired=parse_check(CORRUPT, 2))
    assert broken.loss and "still damaged" in broken.summary()


def test_an_image_qemu_marked_corrupt_is_damage_even_if_the_check_passes() -> None:
    obs = QemuImgObservation(parse_check(CLEAN, 0), marked_corrupt=True)
    assert obs.loss and "marked the image corrupt" in obs.summary()


def test_the_verdict_rule_fails_damage_where_the_image_must_be_intact_only() -> None:
    damaged = QemuImgObservation(parse_check(CORRUPT, 2))
    leaky = QemuImgObservation(parse_check(LEAKS, 3))
    assert _judge(Outcome.INTACT, damaged)[0] is Verdict.FAIL
    assert _judge(Outcome.INTACT, leaky)[0] is Verdict.PASS
    # unsafe promises nothing, and QEMU documents that its image may then be corrupt.
    assert _judge(Outcome.LOSS_ALLOWED, damaged)[0] is Verdict.PASS


def test_details_are_json_ready() -> None:
    obs = QemuImgObservation(parse_check(CORRUPT, 2), dirty=True, repaired=CheckResult(0))
    details = json.loads(json.dumps(obs.details()))
    assert details["check"]["corruptions"] == 2 and details["dirty"] is True


def test_read_header_knows_qcow2_and_nothing_else() -> None:
    assert read_header(b"") is None
    assert read_header(b"\0" * 200) is None
    v2 = Qcow2HeaderV2.pack(b"QFI\xfb", 2, 0, 0, 16, 1 << 30, 0, 0, 0, 0, 0, 0, 0)
    header = read_header(v2)
    assert header is not None and header.version == 2 and not header.dirty
    v3 = v2.replace(struct.pack(">I", 2), struct.pack(">I", 3), 1) + struct.pack(
        ">QQQII", INCOMPAT_CORRUPT | 1, 1, 0, 4, 104
    )
    header = read_header(v3)
    assert header is not None and header.dirty and header.corrupt and header.lazy_refcounts


# -- real images ---------------------------------------------------------------


def _qcow2(path: Path, *options: str) -> Path:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if options:
        argv += ["-o", ",".join(options)]
    subprocess.run([*argv, str(path), "64M"], check=True)
    return path


def _io(path: Path, *commands: str) -> None:
    argv = ["qemu-io"]
    for c in commands:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], capture_output=True, check=False)


def _clusters(path: Path) -> tuple[int, int, int]:
    """(cluster size, L1 table offset, first refcount block offset) of a fresh image."""
    data = path.read_bytes()[:104]
    fields = Qcow2HeaderV2.unpack_from(data)
    cluster_size = 1 << fields[4]
    l1_offset, refcount_table = fields[8], fields[9]
    (block,) = struct.unpack_from(">Q", path.read_bytes(), refcount_table)
    return cluster_size, l1_offset, block


@needs_qemu_img
def test_a_written_image_checks_clean_and_stays_untouched(tmp_path: Path) -> None:
    image = _qcow2(tmp_path / "a.qcow2")
    _io(image, "write -P 7 0 128k")
    before = image.read_bytes()
    with open(tmp_path / "log", "w") as out:
        obs = check_image(image, tmp_path / "scratch.qcow2", out)
    assert not obs.loss and obs.check.exit_code == 0 and obs.repaired is None
    assert image.read_bytes() == before
    assert "qemu-img check -f qcow2 --output=json" in (tmp_path / "log").read_text()


@needs_qemu_img
def test_a_leak_made_by_hand_is_allowed_and_a_dangling_reference_is_not(tmp_path: Path) -> None:
    image = _qcow2(tmp_path / "b.qcow2")
    _io(image, "write -P 7 0 128k")
    cluster, l1, refblock = _clusters(image)
    end = image.stat().st_size // cluster
    with open(image, "r+b") as f:  # a refcount for a cluster nothing references
        f.truncate((end + 1) * cluster)
        f.seek(refblock + 2 * end)
        f.write(struct.pack(">H", 1))
    obs = check_image(image, tmp_path / "s.qcow2")
    assert obs.check.leaks == 1 and not obs.loss, obs.summary()

    image = _qcow2(tmp_path / "c.qcow2")
    _io(image, "write -P 7 0 128k")
    cluster, l1, _ = _clusters(image)
    with open(image, "r+b") as f:  # an L2 entry pointing at a cluster with refcount 0
        f.seek(l1)
        (l2,) = struct.unpack(">Q", f.read(8))
        f.seek((l2 & 0x00FFFFFFFFFFFE00) + 2 * 8)
        f.write(struct.pack(">Q", (1 << 63) | (40 * cluster)))
    obs = check_image(image, tmp_path / "s.qcow2")
    assert obs.check.corruptions > 0 and obs.loss, obs.summary()


@needs_qemu_img
def test_a_lazy_refcount_image_killed_mid_write_is_dirty_and_sound_after_repair(
    tmp_path: Path,
) -> None:
    image = _qcow2(tmp_path / "d.qcow2", "lazy_refcounts=on")
    _io(image, "write -P 5 0 256k", "sigraise 9")  # killed before it could close the image
    before = image.read_bytes()
    obs = check_image(image, tmp_path / "scratch.qcow2")
    assert obs.dirty and obs.check.corruptions > 0  # stale refcounts, by design
    assert obs.repaired is not None and obs.repaired.sound
    assert obs.repaired.corruptions_fixed > 0
    assert not obs.loss, obs.summary()
    assert image.read_bytes() == before  # repaired as a copy; the copy is gone
    assert not (tmp_path / "scratch.qcow2").exists()


@needs_qemu_img
def test_garbage_where_the_image_was_is_damage(tmp_path: Path) -> None:
    image = tmp_path / "e.qcow2"
    image.write_bytes(b"\0" * 65536)
    obs = check_image(image, tmp_path / "s.qcow2")
    assert obs.loss and "no qcow2 header" in obs.summary()


@needs_qemu_img
def test_create_qcow2_converts_and_leaves_room_for_the_guest(tmp_path: Path) -> None:
    raw = tmp_path / "fs.raw"
    with open(raw, "wb") as f:
        f.truncate(32 << 20)
        f.seek(1 << 20)
        f.write(b"x" * 4096)
    target = tmp_path / "d.qcow2"
    size = create_qcow2(raw, target, (("lazy_refcounts", "on"), ("cluster_size", "65536")))
    assert not raw.exists()
    assert target.stat().st_size == size > 32 << 20  # over NBD the file cannot grow
    header = read_header(target.read_bytes()[:104])
    assert header is not None and header.lazy_refcounts and header.size == 32 << 20
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(target)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["format"] == "qcow2"
    read = subprocess.run(
        ["qemu-io", "-r", "-c", "read -P 0x78 1M 4k", str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "read 4096/4096" in read.stdout and "Pattern verification failed" not in read.stdout
    assert not check_image(target, tmp_path / "s.qcow2").loss
