from __future__ import annotations

from collections.abc import Callable

from rich.console import Console

from harness.report.console import print_results
from harness.report.results import RunResults


def test_terminal_output_shows_matrix_failures_and_reproduce_lines(
    synthetic: Callable[..., RunResults],
) -> None:
    results = synthetic()
    console = Console(record=True, width=200, color_system=None)
    print_results(results, console)
    text = console.export_text()
    assert "writethrough" in text and "unsafe" in text and "loss detected" in text
    broken = next(c for c in results.cells if c.verdict == "fail")
    assert f"FAIL {broken.id}" in text
    assert f"reproduce: {broken.reproduce}" in text  # one unbroken, copyable line
    assert text.rstrip().endswith("FAILED: 12 cells, 8 passed, 2 failed, 1 error, 1 skipped")
