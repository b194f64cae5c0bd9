"""The one writer of a results directory: written when the plan is known and after every cell."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from harness.report.recorder import ResultsRecorder
from harness.report.results import CellKey, ScenarioRef, Shard, key_of, load_results

from .conftest import synthetic_results


def test_the_plan_is_on_disk_before_any_cell_and_results_keep_its_order(tmp_path: Path) -> None:
    cells = synthetic_results().cells[:3]
    keys = [key_of(c) for c in cells]
    ref = ScenarioRef("matrix", "scenarios/matrix.toml", "abc")
    recorder = ResultsRecorder(tmp_path, "powercut run matrix", accel="tcg")
    recorder.plan(keys, [ref, ref])
    written = load_results(tmp_path)
    assert written.cells == () and written.planned == tuple(keys) and not written.complete
    assert written.scenarios == (ref,) and written.host["accel"] == "tcg"
    recorder.record(cells[2])
    recorder.record(cells[0])
    assert [c.id for c in load_results(tmp_path).cells] == [cells[0].id, cells[2].id]
    stray = dataclasses.replace(cells[1], id="writeback/x/y/z/r0")
    recorder.record(stray)  # a cell nobody planned joins the plan at its end
    assert load_results(tmp_path).planned == (*keys, key_of(stray))


def test_finish_gives_every_unrun_cell_a_result_and_renders_the_reports(tmp_path: Path) -> None:
    cells = synthetic_results().cells[:2]
    keys = [key_of(c) for c in cells]
    shard = Shard(1, 2, tuple(keys))
    recorder = ResultsRecorder(tmp_path, "powercut run matrix --shard 1/2", shard=shard)
    recorder.plan(keys)
    recorder.record(cells[0])
    unrun: list[CellKey] = []

    def skipped(key: CellKey) -> object:
        unrun.append(key)
        return dataclasses.replace(cells[1], verdict="skipped", reason="not run")

    results, rendered = recorder.finish(unrun=skipped)  # type: ignore[arg-type]
    assert unrun == [keys[1]]
    assert [c.verdict for c in results.cells] == [cells[0].verdict, "skipped"]
    assert results.complete and results.shard == shard
    assert load_results(tmp_path).cells == results.cells and load_results(tmp_path).complete
    assert rendered.html.exists() and rendered.junit.exists() and rendered.markdown.exists()
