"""fio verify phases: the scenario's options win, except the ones the crash test depends on."""

from __future__ import annotations

from harness.crash.scenario import FioVerifySpec
from harness.crash.workloads import fio


def test_write_phase_saves_verify_state_and_seeds_the_layout() -> None:
    spec = FioVerifySpec((("bs", "8k"), ("runtime", 30), ("time_based", 1)))
    opts = fio.write_options(spec, "/dev/vda", seed=42)
    assert opts["bs"] == "8k" and opts["randseed"] == 42 and opts["filename"] == "/dev/vda"
    assert opts["verify_state_save"] == 1 and opts["do_verify"] == 0 and opts["verify"] == "crc32c"


def test_verify_phase_loads_state_and_only_verifies() -> None:
    spec = FioVerifySpec((("bs", "8k"), ("runtime", 30), ("time_based", 1)))
    opts = fio.verify_options(spec, "/dev/vda", seed=42)
    assert opts["verify_state_load"] == 1 and opts["verify_only"] == 1 and opts["do_verify"] == 1
    assert "runtime" not in opts and "time_based" not in opts
    assert opts["randseed"] == 42 and opts["bs"] == "8k"


def test_job_file_renders_one_section() -> None:
    text = fio.job_file("crash", {"rw": "randwrite", "direct": True})
    assert text == "[crash]\nrw=randwrite\ndirect=1\n"
