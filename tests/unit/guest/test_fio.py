"""fio job files and result parsing, checked against the host's real fio."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from harness.errors import ConfigError
from harness.guest.fio import RW, FioJob, job_file, parse_fio_json

needs_fio = pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")


def test_job_file_has_one_section_per_job_with_fio_option_names():
    jobs = [
        FioJob(
            "w",
            "/dev/vda",
            RW.RANDWRITE,
            bs="8k",
            size="16M",
            iodepth=4,
            verify="crc32c",
            do_verify=False,
            verify_state_save=True,
            extra=(("rate_iops", "100"),),
        ),
        FioJob("r", "/dev/vdb", RW.READ, direct=False),
    ]
    text = job_file(jobs, {"group_reporting": "1"})
    assert text.startswith("[global]\ngroup_reporting=1\n")
    w = text.split("[w]\n")[1].split("\n\n")[0].splitlines()
    assert "rw=randwrite" in w and "bs=8k" in w and "iodepth=4" in w
    assert "verify=crc32c" in w and "do_verify=0" in w and "verify_state_save=1" in w
    assert "rate_iops=100" in w and "verify_fatal=1" in w
    r = text.split("[r]\n")[1].splitlines()
    assert "direct=0" in r and not any(line.startswith("verify") for line in r)


def test_verifier_reads_back_up_to_the_saved_state():
    job = FioJob(
        "w",
        "/dev/vda",
        verify="md5",
        do_verify=False,
        verify_state_save=True,
        runtime=60,
        time_based=True,
    )
    opts = job.verifier().options()
    assert opts["verify_only"] == "1" and opts["verify_state_load"] == "1"
    assert opts["do_verify"] == "1"
    assert "runtime" not in opts and "time_based" not in opts and "verify_state_save" not in opts
    with pytest.raises(ConfigError):
        FioJob("plain", "/dev/vda").verifier()


def test_job_names_that_break_the_ini_format_are_rejected():
    with pytest.raises(ConfigError):
        job_file([FioJob("a]b", "/dev/vda")])


@needs_fio
def test_results_of_a_real_fio_run_are_parsed(tmp_path):
    target = tmp_path / "f.img"
    jobs = [
        FioJob(
            "wv",
            str(target),
            RW.RANDWRITE,
            size="2M",
            ioengine="psync",
            direct=False,
            verify="crc32c",
        )
    ]
    (tmp_path / "j.fio").write_text(job_file(jobs))
    out = subprocess.run(
        ["fio", "--output-format=json", str(tmp_path / "j.fio")],
        cwd=tmp_path,  # fio saves the job's verify state in its working directory
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    result = parse_fio_json("note: some warning first\n" + out)
    assert result.version.startswith("fio-")
    (job,) = result.jobs
    assert job.name == "wv" and job.error == 0 and result.errors == 0
    assert job.write.io_bytes == 2 << 20 and job.write.total_ios == 512
    assert job.read.io_bytes == 2 << 20  # the verify pass
    assert result.write_iops > 0 and job.write.bw_bytes > 0
    assert job.write.clat.p(99.0) >= job.write.clat.p(50.0) > 0


def test_client_output_lists_jobs_under_client_stats():
    data = {
        "fio version": "fio-3.33",
        "client_stats": [
            {
                "jobname": "pc",
                "error": 0,
                "read": {"io_bytes": 4096, "iops": 1.0},
                "write": {"io_bytes": 0},
                "trim": {},
            },
            {"jobname": "All clients", "error": 0, "read": {}, "write": {}, "trim": {}},
        ],
    }
    result = parse_fio_json("<powercut> pc: starting\n" + json.dumps(data))
    assert [j.name for j in result.jobs] == ["pc"]
    assert result.jobs[0].read.io_bytes == 4096


def test_output_without_json_is_a_clear_error():
    with pytest.raises(ConfigError, match="no JSON"):
        parse_fio_json("fio: failed to connect\n")
