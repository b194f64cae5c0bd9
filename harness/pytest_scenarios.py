"""Scenario files as pytest tests: each cell of a scenario TOML is a test item.

    pytest scenarios/matrix.toml                     # every cell, its id the test's name
    pytest --collect-only -q scenarios/              # lists every cell, boots nothing
    pytest scenarios/ -k "writeback and ack" -x      # pytest's selection and control
    pytest scenarios/matrix.toml -n 2                # pytest-xdist: 2 cells at once
    pytest scenarios/matrix.toml --powercut-out out  # results.json, junit.xml, report.* in out

Which TOML files are collected: a file named on the command line, or one
whose path matches a pattern of the `powercut_scenarios` ini option (default
`scenarios/*.toml` and `*.scenario.toml`; fnmatch like `python_files`: a
pattern with a `/` matches the path's tail, else the file name) and that
looks like a scenario (`looks_like_scenario`: a top-level field only
scenarios have, such as `[[fault]]`, `[[workload]]`, `modes`, or a near
miss of one such as `[[faults]]`; for a file that is not valid TOML, such a
name anywhere in it) — so pyproject.toml and other TOML are never read as
scenarios, and a broken scenario is never skipped in silence. A collected
file that does not validate is a collection error with the scenario
parser's message (file, line, field), as `powercut run` gives it; a cell
whose verdict is fail or error is a failed test.

A cell runs as `powercut run` runs it (`harness.crash.cell_run.CellRunner`,
its image from `CellImages`, built for every collected cell before the
first boots); its verdict is the test's outcome — a negative control whose
loss is detected passes — and a failure shows the reason, the checkers, the
evidence files and the reproduce lines. Every cell's result also goes into
one results directory (`--powercut-out`, default `<basetemp>/powercut`):
results.json and junit.xml rewritten after every cell by one writer (the
xdist controller, which gets each worker's result with its test report),
and the Markdown, HTML and plots at the end of the session — the writer
`powercut run` uses too (`harness.report.recorder.ResultsRecorder`).
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import fnmatch
import logging
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from harness.errors import PowercutError
from harness.report.results import CellResult, RunResults, ScenarioRef

if TYPE_CHECKING:
    from harness.report.recorder import ResultsRecorder
    from harness.scenario.cells import Cell

# The run's modules (QEMU, SSH, the block stack) are imported when a cell is collected
# or runs, not when pytest loads the plugin in a project that has no scenario files.

log = logging.getLogger(__name__)

INI_PATTERNS = "powercut_scenarios"
DEFAULT_PATTERNS = ["scenarios/*.toml", "*.scenario.toml"]
KEEP_IMAGES = ("failed", "all", "none")  # harness.crash.runner.KeepImages
RESULT_ATTR = "powercut_result"  # on a cell's test report; JSON, so it crosses xdist
_STATE = pytest.StashKey["CellSession"]()


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("powercut")
    group.addoption(
        "--powercut-out",
        default=None,
        metavar="DIR",
        help="results directory for scenario cells collected as tests (results.json, "
        "junit.xml, report.html, report.md, plots, per-cell logs); default <basetemp>/powercut",
    )
    group.addoption(
        "--keep-images",
        default="failed",
        choices=KEEP_IMAGES,
        help="which scenario cells keep their disk images: failed (default), all, none",
    )
    parser.addini(
        INI_PATTERNS,
        type="linelist",
        default=DEFAULT_PATTERNS,
        help="glob patterns of scenario TOML files to collect as tests (each cell one test); "
        "files named on the command line are always collected (default: "
        + " ".join(DEFAULT_PATTERNS)
        + ")",
    )


# -- collection ----------------------------------------------------------------------------


def _matches(path: Path, patterns: list[str]) -> bool:
    for pattern in patterns:
        if "/" in pattern:
            if fnmatch.fnmatch(str(path), f"*/{pattern}") or fnmatch.fnmatch(str(path), pattern):
                return True
        elif fnmatch.fnmatch(path.name, pattern):
            return True
    return False


# Top-level fields of the scenario schema that other TOML (pyproject.toml, a tool's
# settings) does not have at its top level; `name`, `seed`, `timeout`, `image` and the
# like are left out for that reason. A unit test keeps this within the parser's fields.
SCENARIO_FIELDS = (
    "fault",
    "workload",
    "cut",
    "modes",
    "blkdebug",
    "explore",
    "repetitions",
    "expect",
    "checkers",
    "filesystem",
    "disk-size",
    "mkfs-options",
    "mount-options",
    "guest-files",
    "format-options",
)
_KEY_OR_TABLE = re.compile(r"^\s*\[{0,2}\s*[\"']?([A-Za-z][A-Za-z0-9_-]*)")


def _scenario_word(key: str) -> bool:
    """A scenario field, or a near miss of one (`[[faults]]`, `Workload`, `explor`)."""
    return bool(difflib.get_close_matches(key.lower(), SCENARIO_FIELDS, 1, 0.8))


def looks_like_scenario(path: Path) -> bool:
    """Whether a TOML file the patterns match is meant as a scenario.

    Yes when its top level has a scenario field or a near miss of one; a file
    that is not valid TOML (or not text) when any key or table named in it is
    one — so a broken scenario becomes a collection error that says what is
    wrong, never a file skipped in silence, while pyproject.toml and other
    TOML are left alone. A `*.scenario.toml` name says so by itself.
    """
    if path.name.endswith(".scenario.toml"):
        return True
    try:
        raw = path.read_bytes()
    except OSError:
        return False
    text = raw.decode("utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return any(
            (m := _KEY_OR_TABLE.match(line)) is not None and _scenario_word(m.group(1))
            for line in text.splitlines()
        )
    return any(_scenario_word(key) for key in data)


def collect_file(file_path: Path, parent: pytest.Collector) -> ScenarioFile | None:
    if file_path.suffix != ".toml":
        return None
    named = parent.session.isinitpath(file_path)
    if not named:
        patterns = parent.config.getini(INI_PATTERNS)
        if not _matches(file_path, patterns) or not looks_like_scenario(file_path):
            return None
    return ScenarioFile.from_parent(parent, path=file_path)


class ScenarioFile(pytest.File):
    """A scenario TOML; its cells are its items (no VM is needed to know them)."""

    def collect(self) -> Iterator[CellItem]:
        from harness.crash.plan import make_plan

        config = self.config
        kernel = config.getoption("--guest-kernel", None)
        modules = config.getoption("--guest-modules", None)
        try:
            plan = make_plan([self.path], "unused", kernel=kernel, modules=modules)
        except PowercutError as exc:
            raise self.CollectError(str(exc)) from None
        for cell in plan.cells:
            yield CellItem.from_parent(self, name=cell.id, cell=cell)

    class CollectError(Exception):
        pass

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, ScenarioFile.CollectError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)


class CellFailed(Exception):
    """A cell whose verdict is fail or error: the test fails with the cell's evidence."""

    def __init__(self, result: CellResult) -> None:
        super().__init__(result.reason)
        self.result = result


class CellItem(pytest.Item):
    """One cell: one boot, one cut, one verdict; the verdict is the test's outcome."""

    def __init__(self, *, cell: Cell, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cell = cell
        self.result: CellResult | None = None
        self.add_marker(pytest.mark.vm)
        for word in (cell.mode.value, cell.fault.value, cell.workload.kind, cell.scenario):
            self.keywords[word] = True

    def runtest(self) -> None:
        state = self.config.stash[_STATE]
        self.result = state.run(self)
        if self.result.verdict == "pass":
            return
        if self.result.verdict == "skipped":
            pytest.skip(self.result.reason)
        raise CellFailed(self.result)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, CellFailed):
            return describe(excinfo.value.result, self.config.stash[_STATE].out, self.nodeid)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"{self.cell.scenario}: {self.cell.id}"


def describe(result: CellResult, out: Path, nodeid: str) -> str:
    """A failed cell in a test report: why, what each checker saw, the evidence, how to rerun."""
    lines = [f"{result.verdict.upper()}: {result.reason}"]
    if result.explanation:
        lines.append(f"why: {result.explanation}")
    lines += [
        f"  {c.name} (expected {c.expected}): {c.verdict}: {c.reason}" for c in result.checkers
    ]
    if result.writes_acknowledged or result.lost or result.corrupt:
        lines.append(
            f"writes acknowledged {result.writes_acknowledged}, durable {result.writes_durable}; "
            f"lost {result.lost} {result.loss_unit}, corrupt {result.corrupt}"
        )
    lines.append("evidence:")
    lines += [
        f"  {name}: {path if Path(path).is_absolute() else out / path}"
        for name, path in sorted(result.artifacts.items())
    ]
    lines += [
        "reproduce:",
        f"  {result.reproduce}",
        f"  pytest {shlex.quote(nodeid)}",
    ]
    return "\n".join(lines)


# -- running cells -------------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """One process at a time (xdist workers share the KVM probe and its cached verdict)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_ACCEL = pytest.StashKey[Any]()


def choose_accel_once(config: pytest.Config, kernel: Path) -> Any:
    """The session's accelerator: `--accel` read, then resolved once (an `Accel`).

    Resolved under a lock, so parallel workers do not probe KVM side by side;
    the scenario cells and the fixtures of one session share the answer.
    """
    accel = config.stash.get(_ACCEL, None)
    if accel is None:
        from harness.vm.accel import choose_accel, parse_accel
        from harness.vm.image import cache_root

        with _file_lock(cache_root() / "accel.lock"):
            accel = choose_accel(parse_accel(config.getoption("--accel", None)), kernel)
        config.stash[_ACCEL] = accel
    return accel


class CellSession:
    """What the cells of one pytest process share: images, the accelerator, the results dir."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.images: Any = None  # harness.crash.images.CellImages, made on first use
        self.accel: Any = None
        self._out: Path | None = None
        self.recorder: ResultsRecorder | None = None
        self.prepared = False

    @property
    def out(self) -> Path:
        if self._out is None:
            self._out = results_dir(self.config)
        return self._out

    def _prepare(self, session: pytest.Session) -> None:
        """Every image this process's cells need, before the first boots."""
        if self.prepared:
            return
        from harness.crash.images import CellImages

        cells = [i.cell for i in session.items if isinstance(i, CellItem)]
        self.images = CellImages()
        self.images.prepare(cells)
        self.accel = choose_accel_once(self.config, self.images(cells[0]).kernel)
        self.prepared = True

    def run(self, item: CellItem) -> CellResult:
        from harness.crash.cluster_run import runner_for
        from harness.crash.plan import cell_slug
        from harness.crash.runner import KeepImages, prune_images

        self._prepare(item.session)
        cell = item.cell
        directory = self.out / "cells" / cell_slug(cell)
        runner = runner_for(
            cell,
            directory,
            self.images(cell),
            accel=self.accel,
            out=self.out,
            reproduce=cell.reproduce_command(out=str(self.out / "repro")),
        )
        result = runner.run()
        prune_images(
            runner.directory, result.verdict, KeepImages(self.config.getoption("--keep-images"))
        )
        return result


def results_dir(config: pytest.Config) -> Path:
    given = config.getoption("--powercut-out", None)
    if given:
        return Path(given).resolve()
    worker = getattr(config, "workerinput", None)
    if worker is not None and "powercut_out" in worker:
        return Path(worker["powercut_out"])
    factory: Any = config._tmp_path_factory  # type: ignore[attr-defined]
    return Path(factory.getbasetemp()) / "powercut"


def plan_results(recorder: ResultsRecorder, cells: list[Cell]) -> None:
    """The collected cells (and their scenario files) as the results directory's plan."""
    from harness.crash.plan import key, scenario_ref
    from harness.scenario.parse import load_scenario

    refs: dict[str, ScenarioRef] = {}
    for cell in cells:
        path = cell.scenario_path
        if path not in recorder.scenarios and path not in refs:
            refs[path] = scenario_ref(load_scenario(path))
    recorder.plan([key(c) for c in cells], refs.values())


def cells_of_nodeids(rootpath: Path, nodeids: list[str]) -> list[Cell]:
    """The cells an xdist worker collected, known to the controller by node id only."""
    wanted: dict[str, set[str]] = {}
    for nodeid in nodeids:
        path, _, name = nodeid.partition("::")
        if path.endswith(".toml") and name:
            wanted.setdefault(path, set()).add(name)
    from harness.crash.plan import make_plan

    cells: list[Cell] = []
    for path, names in wanted.items():
        try:
            plan = make_plan([rootpath / path], "unused")
        except PowercutError:
            continue
        cells += [c for c in plan.cells if c.id in names]
    return cells


def result_json(result: CellResult) -> dict[str, Any]:
    data: dict[str, Any] = RunResults(cells=(result,)).to_json()["cells"][0]
    return data


def result_from_json(data: dict[str, Any]) -> CellResult:
    wrapped = RunResults(cells=()).to_json()
    wrapped["cells"] = [data]
    return RunResults.from_json(wrapped).cells[0]


def _command(config: pytest.Config) -> str:
    return shlex.join(["pytest", *config.invocation_params.args])


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


# -- the hooks, called from harness.pytest_plugin ---------------------------------------------


def configure(config: pytest.Config) -> None:
    config.stash[_STATE] = CellSession(config)


def _recorder(config: pytest.Config) -> ResultsRecorder | None:
    """The results writer: this process's, unless it is an xdist worker (the controller writes)."""
    state = config.stash.get(_STATE, None)
    if state is None or _is_worker(config):
        return None
    if state.recorder is None:
        from harness.report.recorder import ResultsRecorder

        state.recorder = ResultsRecorder(state.out, _command(config))
    return state.recorder


def collection_finish(session: pytest.Session) -> None:
    cells = [i.cell for i in session.items if isinstance(i, CellItem)]
    if cells and not session.config.getoption("collectonly"):
        recorder = _recorder(session.config)
        if recorder is not None:
            plan_results(recorder, cells)


def attach_result(item: pytest.Item, report: pytest.TestReport) -> None:
    """The cell's result rides on its call report (xdist sends the report's dict over)."""
    if isinstance(item, CellItem) and item.result is not None and report.when == "call":
        setattr(report, RESULT_ATTR, result_json(item.result))


def log_report(config: pytest.Config, report: pytest.TestReport) -> None:
    data = getattr(report, RESULT_ATTR, None)
    if data is None:
        return
    recorder = _recorder(config)
    if recorder is not None:
        state = config.stash[_STATE]
        if state.accel is not None:
            recorder.accel = str(state.accel.value)
        recorder.record(result_from_json(data))


def session_finish(session: pytest.Session) -> RunResults | None:
    state = session.config.stash.get(_STATE, None)
    if state is None or state.recorder is None or _is_worker(session.config):
        return None
    if not state.recorder.planned:
        return None
    results, _rendered = state.recorder.finish()
    return results


class ReportHooks:
    """Hooks that need the config pytest does not pass them."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        log_report(self.config, report)


class XdistHooks:
    """Registered only when pytest-xdist is there: the controller's view of its workers."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_configure_node(self, node: Any) -> None:
        # Workers put their cells' directories where the controller writes the results.
        node.workerinput["powercut_out"] = str(self.config.stash[_STATE].out)

    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        if self.config.getoption("collectonly"):
            return
        cells = cells_of_nodeids(self.config.rootpath, list(ids))
        recorder = _recorder(self.config) if cells else None
        if recorder is not None and not recorder.planned:
            plan_results(recorder, cells)
