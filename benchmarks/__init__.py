"""Benchmark definitions; `python -m benchmarks [NAME...]` runs them (see __main__)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info(**extra: Any) -> dict[str, Any]:
    """The `machine` record every result file carries; `extra` adds e.g. the accelerator.

    The load average matters: this is a shared 2-core machine, and only
    ratios measured within one run are comparable.
    """
    return {
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        **extra,
    }
