"""The `powercut` dispatcher: every command is reachable, and a run imports only its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness import cli


def test_help_lists_every_command_module() -> None:
    parser = cli.build_parser()
    help_text = parser.format_help()
    for name in cli._command_names():
        assert name in help_text


def test_running_one_command_does_not_import_the_others() -> None:
    # `powercut io` is run in shell loops; it must not pay for matplotlib or the vhost server.
    probe = (
        "import sys; from harness import cli; cli.build_parser(['io', '-c', 'info']); "
        "print(sorted(m for m in sys.modules if m.startswith(('matplotlib', 'harness.vhost', "
        "'harness.report'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "[]"


def test_unknown_command_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "harness.cli", "no-such-command"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_list_needs_no_out_and_anything_else_does(tmp_path: Path) -> None:
    def powercut(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "harness.cli", *argv],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
        )

    listed = powercut("run", "matrix", "--list")
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == 10 and listed.stdout.startswith("matrix: ")
    explored = powercut("explore", "matrix", "--list")
    assert explored.returncode == 0, explored.stderr
    assert "matrix: writeback/explore/ack-records" in explored.stdout
    assert list(tmp_path.iterdir()) == []  # a listing writes nothing
    for command in ("run", "explore"):
        refused = powercut(command, "matrix")
        assert refused.returncode == 1
        assert refused.stderr.startswith(f"powercut {command}: --out DIR is required")
        assert "only --list runs without one" in refused.stderr
