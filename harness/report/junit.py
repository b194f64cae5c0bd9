"""JUnit XML: one testcase per cell, so any CI shows the matrix as tests.

Failures carry the verdict's reason as the message and every checker's
reason plus the reproduce command as the text; `system-out` lists the
artifact paths (console log, backend log, write log, journal), also as
`[[ATTACHMENT|path]]` lines, which Jenkins and GitLab attach to the test.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

from harness.report.results import CellKey, CellResult, RunResults

NEVER_RAN = "never ran: the run stopped before this cell (see results.json 'planned')"


def _testcase(cell: CellResult, base: Path | None) -> ET.Element:
    case = ET.Element(
        "testcase",
        {
            "classname": f"powercut.{cell.scenario}.{cell.mode}",
            "name": cell.id,
            "file": cell.scenario_path,
            "time": f"{cell.total_seconds:.3f}",
        },
    )
    detail_lines = [
        f"{c.name} (expected {c.expected}): {c.verdict}: {c.reason}" for c in cell.checkers
    ]
    why = [cell.explanation] if cell.explanation else []
    detail_lines = why + cell.cause_lines() + detail_lines
    detail_lines += [f"seed {cell.seed}", f"reproduce: {cell.reproduce}"]
    detail = "\n".join(detail_lines)
    if cell.verdict == "fail":
        ET.SubElement(
            case, "failure", {"message": cell.reason, "type": "DurabilityViolation"}
        ).text = detail
    elif cell.verdict == "error":
        ET.SubElement(case, "error", {"message": cell.reason, "type": "HarnessError"}).text = detail
    elif cell.verdict == "skipped":
        ET.SubElement(case, "skipped", {"message": cell.reason})
    out = [f"verdict: {cell.verdict}: {cell.reason}", f"reproduce: {cell.reproduce}"]
    out += [f"{name}: {_path(path, base)}" for name, path in _sorted(cell.artifacts)]
    # Jenkins and GitLab attach files named this way to the test case.
    out += [f"[[ATTACHMENT|{_path(path, base)}]]" for _, path in _sorted(cell.artifacts)]
    ET.SubElement(case, "system-out").text = "\n".join(out) + "\n"
    return case


def _never_ran(key: CellKey) -> ET.Element:
    mode = key.id.split("/", 1)[0]
    case = ET.Element(
        "testcase", {"classname": f"powercut.{key.scenario}.{mode}", "name": key.id, "time": "0"}
    )
    ET.SubElement(case, "skipped", {"message": NEVER_RAN})
    return case


def _sorted(artifacts: Mapping[str, str]) -> list[tuple[str, str]]:
    return sorted(artifacts.items())


def _path(path: str, base: Path | None) -> str:
    return str(base / path) if base is not None and not Path(path).is_absolute() else path


def render_junit(results: RunResults, base: Path | None = None) -> str:
    """The JUnit XML text; artifact paths are made absolute under `base` when given."""
    root = ET.Element("testsuites", {"name": "powercut"})
    by_scenario: dict[str, list[CellResult]] = {}
    for cell in results.cells:
        by_scenario.setdefault(cell.scenario, []).append(cell)
    # Cells that never ran (the run died, or is still going) are skipped tests, so a
    # CI job killed at its time limit still shows every cell it was given.
    missing: dict[str, list[CellKey]] = {}
    for absent in results.missing:
        missing.setdefault(absent.scenario, []).append(absent)
        by_scenario.setdefault(absent.scenario, [])
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    total_time = 0.0
    for scenario, cells in by_scenario.items():
        unrun = missing.get(scenario, [])
        counts = {
            "tests": len(cells) + len(unrun),
            "failures": sum(c.verdict == "fail" for c in cells),
            "errors": sum(c.verdict == "error" for c in cells),
            "skipped": sum(c.verdict == "skipped" for c in cells) + len(unrun),
        }
        seconds = sum(c.total_seconds for c in cells)
        suite = ET.SubElement(
            root,
            "testsuite",
            {
                "name": f"powercut.{scenario}",
                **{k: str(v) for k, v in counts.items()},
                "time": f"{seconds:.3f}",
                "timestamp": results.started,
            },
        )
        props = ET.SubElement(suite, "properties")
        for key, value in (
            ("command", results.command),
            ("powercut_version", results.powercut_version),
            *((f"host.{k}", v) for k, v in results.host.items()),
        ):
            ET.SubElement(props, "property", {"name": key, "value": str(value)})
        for cell in cells:
            suite.append(_testcase(cell, base))
        for unrun_key in unrun:
            suite.append(_never_ran(unrun_key))
        for k, v in counts.items():
            totals[k] += v
        total_time += seconds
    root.attrib.update({k: str(v) for k, v in totals.items()})
    root.set("time", f"{total_time:.3f}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
