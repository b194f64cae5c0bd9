"""The results of a run: one `CellResult` per cell, and `results.json`, their on-disk form.

Everything else under `harness.report` (JUnit, Markdown, HTML, plots) is
rendered from a `RunResults` alone, so `powercut report DIR` can render them
again from `DIR/results.json`. This package never judges: the runner
(`harness.crash.record`) builds each `CellResult` from its verdict, and the
report only renders what it is given.

results.json, schema "powercut-results" version 1
-------------------------------------------------

A JSON object:

``schema``            "powercut-results"
``version``           1 (a reader accepts the same major version; fields may be added)
``powercut_version``  the harness version that ran
``started``/``finished``  ISO 8601 UTC timestamps
``command``           the command line that ran
``host``              object: ``hostname``, ``cores``, ``accel`` (kvm/tcg), free-form extras
``scenarios``         array: ``name``, ``path``, ``sha256`` (of the file) of every scenario
                      the run read — what `powercut report --merge` compares
``planned``           array of ``{"scenario", "id"}``: every cell this run was asked to run,
                      in order; a cell here but not in ``cells`` never ran (the run died)
``shard``             null, or ``{"index": K, "count": N, "plan": [{"scenario", "id"}...]}``
                      for `powercut run --shard K/N`: ``plan`` is the whole run before the split
``complete``          false while the run is going (results.json is rewritten after every
                      cell), true once it ended, interrupted or not
``cells``             array of cell objects, in run order:

  ``id``              cell id, ``mode/fault[.policy]/workload/cut/rN``
  ``scenario``, ``scenario_path``
  ``mode``            writeback | none | writethrough | directsync | unsafe
  ``fault``           guest-power-cut | host-power-cut | backend-crash
  ``policy``          lose-all | keep-all | random | prefix | torn | null
  ``policy_seed``     integer or null
  ``workload``, ``workload_kind``  name and fio-verify | ack-records | ext4-metadata
  ``cut``, ``cut_at`` trigger label and its resolved threshold
  ``repetition``, ``seed``  repetition index and the cell's own seed
  ``expected``        "contract" or "loss detected" (negative controls)
  ``promise``         what the mode promises across this fault, in words
  ``verdict``         pass | fail | error | skipped
  ``reason``          one line saying why
  ``writes_acknowledged``  completed writes the guest was told about (block level)
  ``writes_durable``  of those, durable by the contract
  ``lost``, ``corrupt``  what was missing / never written; ``loss_unit`` says in
                      what: "sectors" (the oracle) or "records"/"files" (workload)
  ``checkers``        array: ``name``, ``expected`` (intact | loss-allowed |
                      loss-expected), ``verdict``, ``loss_detected``, ``reason``,
                      ``details`` (the checker's raw counts)
  ``timings``         object: phase name → seconds (boot, workload, cut, recover,
                      check, total, ...)
  ``artifacts``       object: name → path relative to the results directory
                      (console_log, backend_log, write_log, journal, ...)
  ``reproduce``       the one command line that runs this cell again
  ``explanation``     when a workload found acknowledged data missing: whether the disk
                      kept its contract (then the application acknowledged what it never
                      made durable) or broke it, with the figures ("" otherwise)
  ``trace``           a traced command workload: "N calls traced with tracefs" (or strace,
                      and why), or "not traced: why" ("" when tracing was off)
  ``causes``          when a traced workload's check lost something: the explanation
                      (``harness.explore.causes.Explanation``: the boundary, each cause's
                      property, calls, fix and evidence, or why none is named), else null

``scenarios``, ``planned``, ``shard`` and ``complete`` came later within version 1:
a file without them reads as a complete run of exactly its cells.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import __version__
from harness.durability.contract import Verdict
from harness.errors import ConfigError
from harness.explore.causes import Explanation
from harness.jsonfile import check_document, load_json_object

SCHEMA = "powercut-results"
SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
RESULTS_WHAT = "a powercut results file"


@dataclass(frozen=True)
class CheckerResult:
    name: str
    expected: str
    verdict: str
    loss_detected: bool
    reason: str
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeResult:
    """One node of a cluster cell: its disk's mode, whether it lost power and its verdict."""

    name: str
    mode: str
    cut: bool  # lost power in this cell's fault
    verdict: str  # its disk's verdict ("pass", "fail", "error"), or "not cut"
    reason: str
    cut_at: float | None = None  # seconds since the cell began, when it lost power
    policy_seed: int | None = None
    artifacts: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TimelineEvent:
    """One instant of a cluster cell, on the cell's clock: a boot, an acknowledgement, a cut."""

    at: float  # seconds since the cell began
    node: str  # the node it happened on ("" : the whole cluster)
    event: str


@dataclass(frozen=True)
class CellResult:
    id: str
    scenario: str
    scenario_path: str
    mode: str
    fault: str
    policy: str | None
    policy_seed: int | None
    workload: str
    workload_kind: str
    cut: str
    cut_at: float
    repetition: int
    seed: int
    expected: str
    promise: str
    verdict: str
    reason: str
    writes_acknowledged: int = 0
    writes_durable: int = 0
    lost: int = 0
    corrupt: int = 0
    loss_unit: str = "sectors"
    checkers: tuple[CheckerResult, ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)
    artifacts: Mapping[str, str] = field(default_factory=dict)
    reproduce: str = ""
    # Who lost the data, in words, when a workload found acknowledged data missing.
    explanation: str = ""
    # The workload's traced calls (a command workload under a power cut): how it was traced,
    # and, when its check lost something, the calls and the durability each relied on.
    trace: str = ""
    causes: Explanation | None = None

    def cause_lines(self) -> list[str]:
        """A traced cell's explanation as a person reads it: one line per cause (or why none
        is named), what the filesystem kept though it was never made durable."""
        e = self.causes
        if e is None:
            return []
        out = [f"cause: {c.relied_on.value}: {c.fix} ({c.evidence})" for c in e.causes]
        if e.unexplained:
            out.append("cause: none named: " + "; ".join(e.evidence[:4]))
        out += [f"kept: {k}" for k in e.kept[:3]]
        return out

    # A cluster cell: each node side by side, and one time line of the whole cluster.
    nodes: tuple[NodeResult, ...] = ()
    timeline: tuple[TimelineEvent, ...] = ()

    @property
    def fault_label(self) -> str:
        return f"{self.fault} {self.policy}" if self.policy else self.fault

    @property
    def passed(self) -> bool:
        return self.verdict == Verdict.PASS.value

    @property
    def negative_control(self) -> bool:
        return self.expected == "loss detected"

    @property
    def total_seconds(self) -> float:
        if "total" in self.timings:
            return float(self.timings["total"])
        return float(sum(self.timings.values()))


@dataclass(frozen=True, order=True)
class CellKey:
    """A cell's identity across runs, shards and merges: its scenario's name and its id."""

    scenario: str
    id: str

    def __str__(self) -> str:
        return f"{self.scenario}: {self.id}"

    def to_json(self) -> dict[str, str]:
        return {"scenario": self.scenario, "id": self.id}


@dataclass(frozen=True)
class ScenarioRef:
    """A scenario file a run read: merges compare these (name and content, not the path)."""

    name: str
    path: str
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "sha256": self.sha256}


@dataclass(frozen=True)
class Shard:
    """`--shard K/N`: this run is share K (1-based) of N of `plan`."""

    index: int
    count: int
    plan: tuple[CellKey, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"


def key_of(cell: CellResult) -> CellKey:
    return CellKey(cell.scenario, cell.id)


@dataclass(frozen=True)
class RunResults:
    cells: tuple[CellResult, ...]
    started: str = ""
    finished: str = ""
    command: str = ""
    host: Mapping[str, Any] = field(default_factory=dict)
    powercut_version: str = __version__
    scenarios: tuple[ScenarioRef, ...] = ()
    # None: exactly the cells there are (a file from before these fields).
    planned: tuple[CellKey, ...] | None = None
    shard: Shard | None = None
    complete: bool = True

    @property
    def planned_keys(self) -> tuple[CellKey, ...]:
        if self.planned is None:
            return tuple(key_of(c) for c in self.cells)
        return self.planned

    @property
    def missing(self) -> tuple[CellKey, ...]:
        """Cells the run was asked for that have no result: they never ran."""
        done = {key_of(c) for c in self.cells}
        return tuple(k for k in self.planned_keys if k not in done)

    def count(self, verdict: Verdict) -> int:
        return sum(1 for c in self.cells if c.verdict == verdict.value)

    @property
    def ok(self) -> bool:
        """True when every cell passed (or was skipped) and none is missing: the exit status."""
        passed = all(c.verdict in (Verdict.PASS.value, Verdict.SKIPPED.value) for c in self.cells)
        return passed and not self.missing

    @property
    def summary(self) -> str:
        parts = [f"{len(self.cells)} cells", f"{self.count(Verdict.PASS)} passed"]
        for v in (Verdict.FAIL, Verdict.ERROR, Verdict.SKIPPED):
            if self.count(v):
                parts.append(f"{self.count(v)} {'failed' if v is Verdict.FAIL else v.value}")
        if missing := len(self.missing):
            parts.append(f"{missing} never ran")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "powercut_version": self.powercut_version,
            "started": self.started,
            "finished": self.finished,
            "command": self.command,
            "host": dict(self.host),
            "scenarios": [r.to_json() for r in self.scenarios],
            "planned": [k.to_json() for k in self.planned_keys],
            "shard": None
            if self.shard is None
            else {
                "index": self.shard.index,
                "count": self.shard.count,
                "plan": [k.to_json() for k in self.shard.plan],
            },
            "complete": self.complete,
            "cells": [_cell_json(c) for c in self.cells],
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "results.json") -> RunResults:
        if not isinstance(data, dict):
            raise ConfigError(f"{source} is not {RESULTS_WHAT} (not a JSON object)")
        check_document(
            data,
            source,
            RESULTS_WHAT,
            version=SCHEMA_VERSION,
            marker="schema",
            schema=SCHEMA,
            hint="re-run, or use the powercut that wrote it",
        )
        cells_data = data.get("cells")
        if not isinstance(cells_data, list):
            raise ConfigError(f"{source}: field 'cells' must be an array")
        cells = tuple(_cell_from_json(c, f"{source}: cells[{i}]") for i, c in enumerate(cells_data))
        planned = data.get("planned")
        shard = data.get("shard")
        return cls(
            cells=cells,
            started=str(data.get("started", "")),
            finished=str(data.get("finished", "")),
            command=str(data.get("command", "")),
            host=dict(data.get("host") or {}),
            powercut_version=str(data.get("powercut_version", "")),
            scenarios=tuple(
                _scenario_from_json(s, f"{source}: scenarios[{i}]")
                for i, s in enumerate(_array(data, "scenarios", source))
            ),
            planned=_planned(planned, cells, source),
            shard=None if shard is None else _shard_from_json(shard, f"{source}: shard"),
            complete=bool(data.get("complete", True)),
        )


def _planned(value: Any, cells: tuple[CellResult, ...], source: str) -> tuple[CellKey, ...] | None:
    if value is None:
        return None
    keys = _keys(value, f"{source}: planned")
    # Exactly the cells there are: the same as saying nothing.
    return None if keys == tuple(key_of(c) for c in cells) else keys


def _array(data: dict[str, Any], name: str, source: str) -> list[Any]:
    value = data.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{source}: field {name!r} must be an array")
    return value


def _keys(value: Any, where: str) -> tuple[CellKey, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be an array of {{scenario, id}} objects")
    keys = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not {"scenario", "id"} <= item.keys():
            raise ConfigError(f"{where}[{i}] must be an object with 'scenario' and 'id'")
        keys.append(CellKey(str(item["scenario"]), str(item["id"])))
    return tuple(keys)


def _scenario_from_json(value: Any, where: str) -> ScenarioRef:
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(f"{where} must be an object with 'name', 'path' and 'sha256'")
    sha = value.get("sha256")
    return ScenarioRef(str(value["name"]), str(value.get("path", "")), str(sha) if sha else None)


def _shard_from_json(value: Any, where: str) -> Shard:
    try:
        index, count = int(value["index"]), int(value["count"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where} must be an object with integer 'index' and 'count'") from None
    return Shard(index, count, _keys(value.get("plan", []), f"{where}.plan"))


def _cell_json(cell: CellResult) -> dict[str, Any]:
    out = dataclasses.asdict(cell)
    out["checkers"] = [dataclasses.asdict(c) | {"details": dict(c.details)} for c in cell.checkers]
    out["timings"] = dict(cell.timings)
    out["artifacts"] = dict(cell.artifacts)
    out["causes"] = cell.causes.to_json() if cell.causes is not None else None
    if cell.nodes or cell.timeline:
        out["nodes"] = [
            dataclasses.asdict(n) | {"artifacts": dict(n.artifacts)} for n in cell.nodes
        ]
        out["timeline"] = [dataclasses.asdict(e) for e in cell.timeline]
    else:  # a single guest's cell reads as it did before clusters
        del out["nodes"], out["timeline"]
    return out


_CELL_FIELDS = {f.name: f for f in dataclasses.fields(CellResult)}
_REQUIRED = [
    n
    for n, f in _CELL_FIELDS.items()
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
]


def _cell_from_json(data: Any, where: str) -> CellResult:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be an object")
    missing = [n for n in _REQUIRED if n not in data]
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)}")
    known = {k: v for k, v in data.items() if k in _CELL_FIELDS}  # newer minor fields are ignored
    try:
        checkers = tuple(
            CheckerResult(
                name=str(c["name"]),
                expected=str(c["expected"]),
                verdict=str(c["verdict"]),
                loss_detected=bool(c["loss_detected"]),
                reason=str(c["reason"]),
                details=dict(c.get("details") or {}),
            )
            for c in known.get("checkers", [])
        )
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{where}: a checker entry lacks {exc}") from exc
    known["checkers"] = checkers
    try:
        known["nodes"] = tuple(
            NodeResult(**{**n, "artifacts": dict(n.get("artifacts") or {})})
            for n in known.get("nodes", [])
        )
        known["timeline"] = tuple(TimelineEvent(**e) for e in known.get("timeline", []))
    except TypeError as exc:
        raise ConfigError(f"{where}: a node or timeline entry is malformed: {exc}") from exc
    known["timings"] = {str(k): float(v) for k, v in dict(known.get("timings") or {}).items()}
    known["artifacts"] = {str(k): str(v) for k, v in dict(known.get("artifacts") or {}).items()}
    causes = known.get("causes")
    try:
        known["causes"] = Explanation.from_json(causes) if causes else None
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: its causes cannot be read: {exc}") from exc
    return CellResult(**known)


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def host_info(accel: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"hostname": socket.gethostname(), "cores": os.cpu_count() or 0, "accel": accel, **extra}


def write_results(results: RunResults, directory: Path | str) -> Path:
    """Write DIR/results.json atomically (a reader never sees half a file)."""
    path = Path(directory) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(results.to_json(), indent=2, sort_keys=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_results(directory_or_file: Path | str) -> RunResults:
    """DIR/results.json (or the file itself); anything else is one `ConfigError` naming it."""
    path = Path(directory_or_file)
    if path.is_dir():
        path = path / RESULTS_FILE
    data = load_json_object(
        path,
        RESULTS_WHAT,
        missing=f"{path} does not exist; is it a `powercut run --out` directory?",
    )
    return RunResults.from_json(data, str(path))


def run_results(
    cells: Sequence[CellResult],
    *,
    started: str,
    command: str,
    host: Mapping[str, Any],
    scenarios: Sequence[ScenarioRef] = (),
    planned: Sequence[CellKey] | None = None,
    shard: Shard | None = None,
    complete: bool = True,
) -> RunResults:
    return RunResults(
        cells=tuple(cells),
        started=started,
        finished=utc_now() if complete else "",
        command=command,
        host=dict(host),
        scenarios=tuple(scenarios),
        planned=None if planned is None else tuple(planned),
        shard=shard,
        complete=complete,
    )
