"""results.json: the schema round-trips and rejects what it cannot read."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.errors import ConfigError
from harness.report.results import (
    SCHEMA,
    SCHEMA_VERSION,
    CellResult,
    CheckerResult,
    RunResults,
    load_results,
    write_results,
)

Synth = Callable[..., RunResults]


def test_results_json_round_trips(tmp_path: Path, synthetic: Synth) -> None:
    results = synthetic()
    write_results(results, tmp_path)
    again = load_results(tmp_path)
    assert again == results
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["schema"] == SCHEMA and data["version"] == SCHEMA_VERSION


def test_cell_records_carry_what_the_issue_asks_for(synthetic: Synth) -> None:
    data = synthetic().to_json()["cells"][0]
    for key in (
        "mode",
        "fault",
        "policy",
        "workload",
        "seed",
        "writes_acknowledged",
        "writes_durable",
        "lost",
        "corrupt",
        "checkers",
        "timings",
        "artifacts",
        "reproduce",
        "verdict",
        "reason",
    ):
        assert key in data, key
    assert data["reproduce"].startswith("powercut run ")
    assert "scenarios/matrix.toml --out " in data["reproduce"]
    assert {c["name"] for c in data["checkers"]} == {"oracle", "fio-verify"}


def test_verdicts_follow_the_contract(synthetic: Synth) -> None:
    results = synthetic()
    by_id = {c.id: c for c in results.cells}
    assert by_id["writethrough/host-power-cut.lose-all/ack-records/after-200-acked/r0"].passed
    assert by_id["unsafe/host-power-cut.lose-all/ack-records/after-200-acked/r0"].passed
    broken = by_id["writeback/host-power-cut.lose-all/ack-records/after-200-acked/r0"]
    assert broken.verdict == "fail" and broken.reason.startswith("oracle: 24 sectors lost")
    assert not results.ok
    assert results.summary == "12 cells, 8 passed, 2 failed, 1 error, 1 skipped"


def test_only_the_broken_mode_fails(synthetic: Synth) -> None:
    results = synthetic(broken_mode=None)
    assert [c.verdict for c in results.cells if c.verdict not in ("pass",)] == ["error", "skipped"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"schema": "other"}, "not a powercut results file"),
        ({"schema": SCHEMA, "version": 99, "cells": []}, "schema version 99"),
        ({"schema": SCHEMA, "version": SCHEMA_VERSION, "cells": {}}, "'cells' must be an array"),
        ({"schema": SCHEMA, "version": SCHEMA_VERSION, "cells": [{"id": "x"}]}, "cells[0] lacks"),
    ],
)
def test_unreadable_results_name_the_problem(data: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        RunResults.from_json(data)


def test_missing_results_file_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="powercut run --out"):
        load_results(tmp_path)


def test_a_cells_causes_round_trip_and_a_bad_one_names_the_cell(
    tmp_path: Path, synthetic: Synth
) -> None:
    import dataclasses

    from harness.explore.causes import Cause, Explanation, Property
    from harness.explore.syscalls import Call, CallKind

    rename = Call(3, 7, "rename", CallKind.RENAME, 10, 11, "/mnt/x.tmp", "/mnt/x", result=0)
    why = Explanation(
        "the cell's cut",
        ("4",),
        "ack 4",
        (Cause(Property.ENTRY_NOT_SYNCED, "/mnt/x", (rename,), "fsync the directory /mnt", "e"),),
        evidence=("/mnt/x: missing",),
        seconds=0.5,
    )
    results = synthetic()
    first = dataclasses.replace(results.cells[0], trace="12 calls traced with tracefs", causes=why)
    results = dataclasses.replace(results, cells=(first, *results.cells[1:]))
    write_results(results, tmp_path)
    again = load_results(tmp_path)
    assert again == results and again.cells[0].causes == why
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["cells"][0]["causes"]["causes"][0]["property"] == "directory entry not synced"
    # Every rendering shows the cause, a passing negative control's too.
    from harness.report.junit import render_junit
    from harness.report.markdown import render_markdown

    line = "cause: directory entry not synced: fsync the directory /mnt (e)"
    assert first.cause_lines() == [line]
    assert f"- {line}" in render_markdown(results)
    assert line in render_junit(results)
    data["cells"][0]["causes"] = {"state": "x", "causes": [{"property": "lost in space"}]}
    with pytest.raises(ConfigError, match="causes cannot be read"):
        RunResults.from_json(data)


def test_newer_minor_fields_are_ignored(synthetic: Synth) -> None:
    data = synthetic().to_json()
    data["cells"][0]["future_field"] = 1
    assert RunResults.from_json(data).cells[0].id == data["cells"][0]["id"]


text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
cells = st.builds(
    CellResult,
    id=text,
    scenario=text,
    scenario_path=text,
    mode=st.sampled_from(["writeback", "unsafe", "none"]),
    fault=st.sampled_from(["host-power-cut", "guest-power-cut"]),
    policy=st.none() | text,
    policy_seed=st.none() | st.integers(0, 2**32),
    workload=text,
    workload_kind=text,
    cut=text,
    cut_at=st.floats(0, 1e6),
    repetition=st.integers(0, 9),
    seed=st.integers(0, 2**32),
    expected=st.sampled_from(["contract", "loss detected"]),
    promise=text,
    verdict=st.sampled_from(["pass", "fail", "error", "skipped"]),
    reason=text,
    writes_acknowledged=st.integers(0, 10**9),
    lost=st.integers(0, 10**6),
    checkers=st.lists(
        st.builds(
            CheckerResult,
            name=text,
            expected=text,
            verdict=text,
            loss_detected=st.booleans(),
            reason=text,
            details=st.dictionaries(text, st.integers()),
        ),
        max_size=3,
    ).map(tuple),
    timings=st.dictionaries(text, st.floats(0, 1e4)),
    artifacts=st.dictionaries(text, text),
    reproduce=text,
)


@settings(max_examples=50, deadline=None)
@given(st.lists(cells, max_size=6))
def test_any_results_round_trip_through_json(cell_list: list[CellResult]) -> None:
    results = RunResults(cells=tuple(cell_list), command="x")
    assert RunResults.from_json(json.loads(json.dumps(results.to_json()))) == results
