"""The host programs the image builder runs, run one way.

The builder calls a dozen host tools (apt-cache, apt-get, dpkg-deb, depmod,
readelf, nm, gcc, chroot, cp) and wants the same thing from each: its
standard output, and when it is missing or fails an `ImageBuildError` that
says which step failed and how to fix it (usually: run ci/bootstrap).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from harness.errors import ImageBuildError

# Where a build says what step it is at (the CLI's progress line, or the log).
Progress = Callable[[str], None]


def run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    """Run `argv` for the step `what` and return its standard output."""
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ImageBuildError(
            f"{what}: {argv[0]} is not installed; run ci/bootstrap (Debian 12)"
        ) from exc
    if proc.returncode != 0:
        raise ImageBuildError(
            f"{what}: `{' '.join(argv)}` exited {proc.returncode}: {proc.stderr.strip()[-800:]}"
        )
    return proc.stdout
