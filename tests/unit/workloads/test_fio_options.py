"""fio verify phases: the scenario's options win, except the ones the crash test depends on."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from harness.errors import GuestError
from harness.guest.fio import RW, job_file
from harness.workloads import fio_verify as fio
from harness.workloads.fio_verify import FioVerify


def test_write_phase_saves_verify_state_and_seeds_the_layout() -> None:
    spec = FioVerify((("bs", "8k"), ("runtime", 30), ("time_based", 1)))
    opts = fio.write_options(spec, "/dev/vda", seed=42)
    assert opts["bs"] == "8k" and opts["randseed"] == 42 and opts["filename"] == "/dev/vda"
    assert opts["verify_state_save"] == 1 and opts["do_verify"] == 0 and opts["verify"] == "crc32c"


def test_verify_phase_loads_state_and_only_verifies() -> None:
    spec = FioVerify((("bs", "8k"), ("runtime", 30), ("time_based", 1)))
    opts = fio.verify_options(spec, "/dev/vda", seed=42)
    assert opts["verify_state_load"] == 1 and opts["verify_only"] == 1 and opts["do_verify"] == 1
    assert "runtime" not in opts and "time_based" not in opts
    assert opts["randseed"] == 42 and opts["bs"] == "8k"


def test_typed_jobs_carry_every_option() -> None:
    spec = FioVerify((("rw", "randrw"), ("fsync", 16), ("runtime", 30), ("zonemode", "none")))
    job = fio.write_job(spec, "/dev/vda", 5)
    assert (job.rw, job.fsync, job.runtime, job.direct, job.verify) == (
        RW.RANDRW,
        16,
        30.0,
        True,
        "crc32c",
    )
    assert dict(job.extra) == {"zonemode": "none", "randseed": "5"}
    opts = fio.verify_job(spec, "/dev/vda", 5).options()
    assert opts["verify_state_load"] == "1" and opts["continue_on_error"] == "verify"
    assert "verify_fatal" not in opts and "runtime" not in opts


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
def test_verify_phase_counts_every_bad_block_after_a_real_fio_run(tmp_path: Path) -> None:
    """Write with saved verify state, damage blocks as a lost cache would, verify, parse."""
    spec = FioVerify((("size", "2M"), ("ioengine", "psync"), ("direct", 0), ("iodepth", 1)))
    disk = tmp_path / "disk"
    (tmp_path / "w.fio").write_text(job_file([fio.write_job(spec, str(disk), 3)]))
    (tmp_path / "v.fio").write_text(job_file([fio.verify_job(spec, str(disk), 3)]))

    def run(job: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["fio", "--output-format=json", job],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    written = run("w.fio")
    assert written.returncode == 0, written.stderr
    assert list(tmp_path.glob("*verify.state"))
    clean = run("v.fio")
    assert fio.parse_verify(clean.stdout, clean.stderr) == fio.FioVerifyObservation(0, 512, 0, ())

    with disk.open("r+b") as f:
        f.seek(8192 + 100)
        f.write(b"garbage!")  # a torn block
        f.seek(1 << 20)
        f.write(bytes(8192))  # two blocks that never reached the disk
    damaged = run("v.fio")
    obs = fio.parse_verify(damaged.stdout, damaged.stderr)
    assert obs.verify_errors == 3
    assert sorted(obs.bad_offsets) == [8192, 1 << 20, (1 << 20) + 4096]


def test_parse_verify_reads_client_output_and_rejects_garbage() -> None:
    out = (
        "<guest> crc32c: verify failed at file /dev/vda offset 4096, length 4096 (requested ...)\n"
        '{"client_stats": [{"jobname": "crash", "total_err": 1, "error": 84, '
        '"read": {"io_bytes": 40960}}, {"jobname": "All clients", "total_err": 1}]}'
    )
    obs = fio.parse_verify(out, out)
    assert (obs.verify_errors, obs.blocks_verified, obs.bad_offsets) == (1, 10, (4096,))
    assert obs.block_size == 4096
    # The client prints the guest's failure lines in its output, before the JSON.
    assert fio.parse_verify(out, "").bad_offsets == (4096,)
    # A bad block's length comes from its line; a block named twice counts once.
    big = (
        "verify: bad magic header 0, wanted acca at file /dev/vda offset 65536, length 16384\n"
        "verify: bad magic header 0, wanted acca at file /dev/vda offset 65536, length 16384\n"
    )
    obs = fio.parse_verify("", big)
    assert (obs.verify_errors, obs.bad_offsets, obs.block_size) == (1, (65536,), 16384)
    with pytest.raises(GuestError):
        fio.parse_verify("fio: failed to connect", "")
