"""`powercut setup`: what an installed powercut needs on its host, in step with ci/bootstrap."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from harness.commands import setup

ROOT = Path(__file__).parents[2]


def bootstrap_packages() -> set[str]:
    text = (ROOT / "ci" / "bootstrap").read_text()
    block = re.search(r"APT_PACKAGES=\((.*?)\n\)", text, re.S)
    assert block is not None
    words = []
    for line in block.group(1).splitlines():
        words += line.split("#", 1)[0].split()
    return set(words)


def test_every_package_setup_installs_is_one_bootstrap_installs() -> None:
    assert {p.package for p in setup.PARTS} <= bootstrap_packages()


def console() -> tuple[Console, Any]:
    import io

    buffer = io.StringIO()
    return Console(file=buffer, width=200), buffer


def lacking(*names: str) -> setup.Installed:
    return lambda packages: {p for p in packages if p not in names}


def test_check_names_what_is_missing_and_fails_only_for_required_parts() -> None:
    out, text = console()
    assert setup.check(out, lacking("xfsprogs")) == 0
    assert "missing (optional)" in text.getvalue() and "xfsprogs" in text.getvalue()
    out, text = console()
    assert setup.check(out, lacking("fio", "libvirt-daemon")) == 1
    assert "MISSING" in text.getvalue() and "1 required packages are missing" in text.getvalue()
    assert "KVM" in text.getvalue()


def test_without_root_setup_lists_the_packages_and_the_command() -> None:
    out, text = console()
    calls: list[Any] = []
    status = setup.install(
        out, installed=lacking("fio", "xfsprogs"), euid=lambda: 1000, runner=calls.append
    )
    assert status == 1 and not calls
    said = text.getvalue()
    assert "needs root" in said and "fio" in said and "xfsprogs" in said
    assert "sudo apt-get install -y -q --no-install-recommends fio xfsprogs" in said


def test_as_root_setup_runs_apt_get_for_what_is_missing() -> None:
    out, _ = console()
    calls: list[list[str]] = []
    present: set[str] = set()

    def installed(packages: Any) -> set[str]:
        return {p for p in packages if p not in ("fio",) or p in present}

    def apt(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        calls.append(argv)
        if argv[1] == "install":
            present.update(argv[5:])
        assert kw["env"]["DEBIAN_FRONTEND"] == "noninteractive"
        return subprocess.CompletedProcess(argv, 0)

    assert setup.install(out, installed=installed, euid=lambda: 0, runner=apt) == 0
    assert calls == [
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "fio"],
    ]


def test_nothing_missing_is_nothing_to_do() -> None:
    out, text = console()
    assert setup.install(out, installed=lambda p: set(p), euid=lambda: 1000) == 0
    assert "every package powercut needs is installed" in text.getvalue()


def test_the_check_runs_on_this_host() -> None:
    # This machine was set up by ci/bootstrap: nothing required may be missing.
    result = subprocess.run(
        [sys.executable, "-m", "harness.cli", "setup", "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "KVM" in result.stdout
