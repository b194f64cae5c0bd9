"""The guest workload programs, compiled and run on the host against temp files.

They are built exactly as the image recipe builds them (gcc -O2 -static) plus
-Wall -Werror, then driven through the host-side parsers the runner uses.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.errors import GuestError
from harness.workloads import ackrecords, fsmeta
from harness.workloads.ackrecords import AckRecords, SyncMode
from harness.workloads.fsmeta import FsMeta
from harness.workloads.stream import AckStream

SRC = Path(__file__).parents[3] / "images" / "guest-src"
PROGRAMS = sorted(SRC.glob("*.c"))

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


@pytest.fixture(scope="module")
def bindir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("guest-bin")
    for source in PROGRAMS:
        subprocess.run(
            [
                "gcc",
                "-O2",
                "-static",
                "-Wall",
                "-Werror",
                "-o",
                str(out / source.stem),
                str(source),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    return out


def run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout


def test_every_guest_program_compiles_static_without_warnings(bindir: Path) -> None:
    assert {p.stem for p in PROGRAMS} >= {"ackrecords", "fsmeta"}
    for source in PROGRAMS:
        assert (bindir / source.stem).stat().st_size > 0


def test_ackrecords_acknowledges_every_record_and_check_finds_them(
    bindir: Path, tmp_path: Path
) -> None:
    spec = AckRecords(records=40, record_size=512, sync=SyncMode.FDATASYNC)
    path = tmp_path / "records"
    cmd = ackrecords.write_command(spec, str(path), seed=7, program=str(bindir / "ackrecords"))
    out = run(["sh", "-c", cmd])
    stream = AckStream("ackrecords")
    assert stream.feed(out) == list(range(1, 41))
    assert path.stat().st_size == 40 * 512
    check = ackrecords.parse_check(
        run(["sh", "-c", ackrecords.check_command(spec, str(path), 7, str(bindir / "ackrecords"))])
    )
    assert (check.highest_contiguous, check.valid, check.invalid_count) == (40, 40, 0)
    assert ackrecords.AckRecordsObservation(acked=stream.highest, check=check).missing == 0


def test_ackrecords_check_reports_corrupt_zeroed_and_torn_records(
    bindir: Path, tmp_path: Path
) -> None:
    spec = AckRecords(records=10, record_size=256, sync=SyncMode.NONE)
    path = tmp_path / "records"
    prog = str(bindir / "ackrecords")
    run(["sh", "-c", ackrecords.write_command(spec, str(path), seed=3, program=prog)])
    with path.open("r+b") as f:
        f.seek(3 * 256 + 100)
        f.write(b"\xff")  # record 4: one flipped byte
        f.seek(6 * 256)
        f.write(bytes(256))  # record 7: never reached the disk
        f.truncate(9 * 256 + 17)  # record 10: torn
    check = ackrecords.parse_check(
        run(["sh", "-c", ackrecords.check_command(spec, str(path), 3, prog)])
    )
    assert check.highest_contiguous == 3
    assert check.valid == 7
    assert [(r.seq, r.offset, r.reason) for r in check.invalid] == [
        (4, 768, "bad-checksum"),
        (7, 1536, "zero"),
        (10, 2304, "short"),
    ]
    obs = ackrecords.AckRecordsObservation(acked=10, check=check)
    assert obs.missing == 7
    assert check.first_invalid_after(3) == check.invalid[0]


def test_ackrecords_check_rejects_records_from_another_seed(bindir: Path, tmp_path: Path) -> None:
    spec = AckRecords(records=3, record_size=128, sync=SyncMode.NONE)
    path = tmp_path / "records"
    prog = str(bindir / "ackrecords")
    run(["sh", "-c", ackrecords.write_command(spec, str(path), seed=1, program=prog)])
    check = ackrecords.parse_check(
        run(["sh", "-c", ackrecords.check_command(spec, str(path), 2, prog)])
    )
    assert check.highest_contiguous == 0 and {r.reason for r in check.invalid} == {"bad-seed"}


def test_ackrecords_check_of_a_missing_file_finds_nothing(bindir: Path, tmp_path: Path) -> None:
    spec = AckRecords(record_size=128)
    out = run(
        [
            "sh",
            "-c",
            ackrecords.check_command(spec, str(tmp_path / "x"), 1, str(bindir / "ackrecords")),
        ]
    )
    check = ackrecords.parse_check(out)
    assert not check.exists and check.highest_contiguous == 0


def test_fsmeta_every_acknowledged_op_checks_out(bindir: Path, tmp_path: Path) -> None:
    spec = FsMeta(ops=300, files=24, max_size=2048)
    prog = str(bindir / "fsmeta")
    d = tmp_path / "meta"
    out = run(["sh", "-c", fsmeta.write_command(spec, str(d), seed=5, program=prog)])
    stream = AckStream("fsmeta")
    seqs = stream.feed(out)
    assert seqs == list(range(1, 301))
    kinds = {line.split()[1] for line in out.splitlines()}
    assert kinds == {"create", "write", "rename", "unlink"}
    check = fsmeta.parse_check(
        run(["sh", "-c", fsmeta.check_command(spec, str(d), 5, 300, program=prog)])
    )
    assert check.ok and check.checked == 24 and check.acked == 300


def test_fsmeta_tolerates_unacknowledged_ops_inside_the_window(
    bindir: Path, tmp_path: Path
) -> None:
    spec = FsMeta(ops=200, files=16, max_size=1024)
    prog = str(bindir / "fsmeta")
    d = tmp_path / "meta"
    run(["sh", "-c", fsmeta.write_command(spec, str(d), seed=8, program=prog)])
    # The host saw only 190 acks; ops 191..200 happened: inside a window of 16.
    check = fsmeta.parse_check(
        run(["sh", "-c", fsmeta.check_command(spec, str(d), 8, 190, window=16, program=prog)])
    )
    assert check.ok and check.uncertain > 0
    # With only 100 acks and a window of 16, ops 117..200 are unexplained changes.
    check = fsmeta.parse_check(
        run(["sh", "-c", fsmeta.check_command(spec, str(d), 8, 100, window=16, program=prog)])
    )
    assert not check.ok and check.failure_count == len(check.failures) > 0


def test_fsmeta_detects_a_lost_file_and_a_stray_one(bindir: Path, tmp_path: Path) -> None:
    spec = FsMeta(ops=120, files=8, max_size=512)
    prog = str(bindir / "fsmeta")
    d = tmp_path / "meta"
    run(["sh", "-c", fsmeta.write_command(spec, str(d), seed=2, program=prog)])
    victim = sorted(d.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00" if victim.stat().st_size > 1 else b"xx")
    (d / "stray").write_text("x")
    check = fsmeta.parse_check(
        run(["sh", "-c", fsmeta.check_command(spec, str(d), 2, 120, window=0, program=prog)])
    )
    names = {f.name for f in check.failures}
    assert names == {victim.name, "stray"}


def test_fsmeta_refuses_a_directory_that_is_not_empty(bindir: Path, tmp_path: Path) -> None:
    (tmp_path / "junk").write_text("x")
    proc = subprocess.run(
        [str(bindir / "fsmeta"), "--ops", "1", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "not empty" in proc.stderr


def test_ack_stream_keeps_partial_lines_and_rejects_gaps() -> None:
    stream = AckStream()
    assert stream.feed(b"1\n2\n3") == [1, 2]
    assert stream.feed(b"\n4 create f0001\n") == [3, 4]
    assert stream.highest == 4
    with pytest.raises(GuestError, match="after 4"):
        stream.feed("6\n")
    with pytest.raises(GuestError, match="does not start with a number"):
        AckStream().feed("hello\n")


def test_check_parsers_reject_garbage() -> None:
    with pytest.raises(GuestError):
        ackrecords.parse_check("Segmentation fault")
    with pytest.raises(GuestError):
        ackrecords.parse_check('{"exists": true}')
    with pytest.raises(GuestError):
        fsmeta.parse_check("[]")


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.integers(1, 40),
    st.lists(st.tuples(st.integers(0, 39), st.sampled_from(["zero", "flip"])), max_size=5),
)
def test_ackrecords_check_agrees_with_a_model_of_the_damage(
    bindir: Path, records: int, damage: list[tuple[int, str]]
) -> None:
    spec = AckRecords(records=records, record_size=128, sync=SyncMode.NONE)
    prog = str(bindir / "ackrecords")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r"
        run(["sh", "-c", ackrecords.write_command(spec, str(path), seed=11, program=prog)])
        bad: dict[int, str] = {}
        with path.open("r+b") as f:
            for index, kind in damage:
                if index >= records:
                    continue
                f.seek(index * 128)
                if kind == "zero":
                    f.write(bytes(128))
                    bad[index] = "zero"
                else:
                    f.seek(index * 128 + 50)
                    f.write(b"\xa5\x5a")
                    # Inside a zeroed record the magic is still gone.
                    bad[index] = (
                        "bad-magic" if bad.get(index) in ("zero", "bad-magic") else "bad-checksum"
                    )
        check = ackrecords.parse_check(
            run(["sh", "-c", ackrecords.check_command(spec, str(path), 11, prog)])
        )
    first_bad = min(bad, default=records)
    assert check.highest_contiguous == first_bad
    assert check.valid == records - len(bad)
    assert {r.seq - 1: r.reason for r in check.invalid} == bad
