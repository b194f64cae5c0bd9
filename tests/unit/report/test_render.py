"""junit.xml, report.md, report.html and the plots, rendered from synthetic results."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from harness.cli import main
from harness.report.html import render_html
from harness.report.junit import render_junit
from harness.report.markdown import render_markdown
from harness.report.render import render_all
from harness.report.results import RunResults, write_results

Synth = Callable[..., RunResults]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_junit_has_one_testcase_per_cell_with_reason_and_artifacts(synthetic: Synth) -> None:
    results = synthetic()
    root = ET.fromstring(render_junit(results, base=Path("/out")))
    cases = root.findall(".//testcase")
    assert len(cases) == len(results.cells)
    assert root.get("tests") == str(len(results.cells))
    assert (root.get("failures"), root.get("errors"), root.get("skipped")) == ("2", "1", "1")
    by_name = {c.get("name"): c for c in cases}
    broken = next(c for c in results.cells if c.verdict == "fail")
    failure = by_name[broken.id].find("failure")
    assert failure is not None and failure.get("message") == broken.reason
    assert broken.reproduce in (failure.text or "")
    out = by_name[broken.id].findtext("system-out") or ""
    assert f"console_log: /out/{broken.artifacts['console_log']}" in out
    assert f"[[ATTACHMENT|/out/{broken.artifacts['backend_log']}]]" in out
    assert by_name[results.cells[-2].id].find("error") is not None
    assert by_name[results.cells[-1].id].find("skipped") is not None
    passing = next(c for c in results.cells if c.passed)
    assert list(by_name[passing.id]) == [by_name[passing.id].find("system-out")]


def test_markdown_shows_the_matrix_expected_and_observed(synthetic: Synth) -> None:
    results = synthetic()
    md = render_markdown(results, ["plots/loss-by-mode.png"])
    assert md.startswith("# powercut results\n\n**FAILED**")
    matrix = md.split("## Matrix")[1].split("##")[0]
    rows = [line for line in matrix.splitlines() if line.startswith("| **")]
    assert [r.split("|")[1].strip() for r in rows] == [
        "**writethrough**",
        "**directsync**",
        "**writeback**",
        "**none**",
        "**unsafe**",
    ]
    unsafe = rows[-1]
    assert "expected: loss detected" in unsafe and "✅ pass" in unsafe
    assert "❌ FAIL" in rows[2] and "24 sectors lost" in rows[2]
    assert "![plots/loss-by-mode.png](plots/loss-by-mode.png)" in md
    failures = md.split("## Failures")[1]
    broken = next(c for c in results.cells if c.verdict == "fail")
    assert broken.reproduce in failures and broken.artifacts["backend_log"] in failures


def test_html_is_self_contained_and_escapes_text(synthetic: Synth, tmp_path: Path) -> None:
    results = synthetic()
    evil = replace(results.cells[0], reason="<script>alert(1)</script>")
    results = replace(results, cells=(evil, *results.cells[1:]))
    png = tmp_path / "p.png"
    png.write_bytes(PNG_MAGIC + b"0" * 10)
    page = render_html(results, [png])
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "data:image/png;base64," in page
    assert not re.search(r"""(src|href)=['"]https?://""", page)
    assert page.count("<td class='fail'") >= 2 and "negative control" in page


def test_render_all_writes_every_report_and_png_plots(synthetic: Synth, tmp_path: Path) -> None:
    rendered = render_all(synthetic(), tmp_path)
    for path in (rendered.results, rendered.junit, rendered.markdown, rendered.html):
        assert path is not None and path.stat().st_size > 0
    assert {p.name for p in rendered.plots} == {"loss-by-mode.png", "cell-timings.png"}
    for plot in rendered.plots:
        data = plot.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert not list(tmp_path.glob("*.tmp"))


def test_powercut_report_rerenders_from_results_json(
    synthetic: Synth, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    write_results(synthetic(), tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").exists() and (tmp_path / "junit.xml").exists()
    assert (tmp_path / "plots" / "loss-by-mode.png").exists()
    assert "12 cells, 8 passed, 2 failed" in capsys.readouterr().out
    assert main(["report", "--strict", str(tmp_path)]) == 1


def test_powercut_report_on_a_clean_run_is_strictly_ok(synthetic: Synth, tmp_path: Path) -> None:
    results = synthetic(broken_mode=None)
    results = replace(results, cells=tuple(c for c in results.cells if c.passed))
    write_results(results, tmp_path)
    assert main(["report", "--strict", str(tmp_path)]) == 0


def test_powercut_report_without_results_fails_with_a_message(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["report", str(tmp_path)]) == 1
    assert "results.json" in capsys.readouterr().err


def test_empty_run_renders(tmp_path: Path) -> None:
    rendered = render_all(RunResults(cells=()), tmp_path)
    assert rendered.plots == ()
    assert "0 cells" in rendered.markdown.read_text()
