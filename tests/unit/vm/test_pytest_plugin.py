"""The pytest plugin, run in an inner pytest session (pytester): hygiene, logs, soak."""

from __future__ import annotations

import os
import pwd
import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]


def test_a_leaked_process_fails_the_session_loudly(pytester):
    pytester.makepyfile(
        """
        from harness.proc import ManagedProcess

        def test_leaks(tmp_path):
            ManagedProcess(["sleep", "60"], name="leaky", log_path=tmp_path / "l.log").start()
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*hygiene check FAILED*", "*process <ManagedProcess leaky*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    from harness.proc import live_processes

    assert not [p for p in live_processes() if p.name == "leaky"], "the check must reap it"


def test_a_clean_session_passes_the_hygiene_check(pytester):
    pytester.makepyfile(
        """
        from harness.proc import managed

        def test_clean(tmp_path):
            with managed(["sleep", "60"], name="tidy", log_path=tmp_path / "l.log") as p:
                assert p.running
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.OK
    assert "hygiene check FAILED" not in result.stdout.str()


def test_soak_tests_are_skipped_unless_asked_for(pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.soak
        def test_long():
            pass
        """
    )
    pytester.makeini("[pytest]\nmarkers =\n    soak: long\n")
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(skipped=1)
    pytester.runpytest_inprocess("-p", "no:cacheprovider", "--soak").assert_outcomes(passed=1)


def test_a_failing_test_carries_the_logs_registered_with_its_factory(pytester, monkeypatch):
    # pytester moves HOME; keep using the real image cache instead of building anew.
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    monkeypatch.setenv(
        "POWERCUT_CACHE", os.environ.get("POWERCUT_CACHE", str(home / ".cache/powercut"))
    )
    # A factory that boots nothing still reports the logs registered with it.
    pytester.makepyfile(
        """
        def test_fails(vm_factory, tmp_path):
            log = vm_factory.tmpdir / "backend.log"
            log.write_text("backend said: flush lost\\n")
            vm_factory.add_log("backend", log)
            assert False, "scenario failed"
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--accel", "tcg")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*powercut backend*", "*backend said: flush lost*"])


def test_keep_failed_keeps_the_work_dir_of_a_failed_test(pytester, monkeypatch):
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    monkeypatch.setenv(
        "POWERCUT_CACHE", os.environ.get("POWERCUT_CACHE", str(home / ".cache/powercut"))
    )
    pytester.makepyfile(
        """
        def test_fails(vm_factory):
            (vm_factory.tmpdir / "evidence").write_text("x")
            print("WORKDIR", vm_factory.tmpdir)
            assert False
        """
    )
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "--accel", "tcg", "--keep-failed", "-s"
    )
    result.assert_outcomes(failed=1)
    (kept,) = {Path(m.group(1)) for m in re.finditer(r"WORKDIR (\S+)", result.stdout.str())}
    try:
        assert (kept / "evidence").read_text() == "x"
        assert "hygiene check FAILED" not in result.stdout.str()
    finally:
        import shutil

        shutil.rmtree(kept, ignore_errors=True)
