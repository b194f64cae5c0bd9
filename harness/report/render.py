"""Render every report of a run into its directory (`powercut run` and `powercut report`).

`write_progress` is what a run calls after every cell: results.json and
junit.xml, each replaced atomically, so a run killed at a CI time limit
leaves every verdict it reached (and names the cells it never ran);
`render_all` adds the Markdown, HTML and plots at the end.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from harness.report.html import render_html
from harness.report.junit import render_junit
from harness.report.markdown import render_markdown
from harness.report.plots import render_plots
from harness.report.results import RunResults, load_results, write_results

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"


@dataclass(frozen=True)
class Rendered:
    results: Path | None
    junit: Path
    markdown: Path
    html: Path
    plots: tuple[Path, ...]


def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def render_all(results: RunResults, directory: Path | str, *, write_json: bool = True) -> Rendered:
    """Write results.json (unless re-rendering), junit.xml, report.md, report.html and plots/."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_results(results, out) if write_json else None
    plots = tuple(render_plots(results, out / PLOTS_DIR))
    relative = [str(p.relative_to(out)) for p in plots]
    rendered = Rendered(
        results=json_path,
        junit=_write(out / "junit.xml", render_junit(results, base=out.resolve())),
        markdown=_write(out / "report.md", render_markdown(results, relative)),
        html=_write(out / "report.html", render_html(results, plots)),
        plots=plots,
    )
    log.info("reports written to %s (%s)", out, results.summary)
    return rendered


def write_progress(results: RunResults, directory: Path | str) -> None:
    """results.json and junit.xml as they stand now (cheap: no plots)."""
    out = Path(directory)
    write_results(results, out)
    _write(out / "junit.xml", render_junit(results, base=out.resolve()))


def rerender(directory: Path | str) -> tuple[RunResults, Rendered]:
    """Render the reports again from DIR/results.json."""
    results = load_results(directory)
    return results, render_all(results, directory, write_json=False)
