"""One run's results from several results directories: `powercut report --merge DIR... --out DIR`.

A run split with `powercut run --shard K/N` over N CI jobs leaves N
results directories; the merge makes one results.json (then junit.xml, the
report and the plots) as if one machine had run them all. It refuses what
would make a wrong report rather than a partial one:

* different results schema versions, or different scenario sets (by name
  and file content: a scenario edited between two shards is another
  scenario), or shards of different splits (`--shard K/2` with `K/3`);
* a cell in two directories (shards that overlap), or a cell of the run's
  plan that no directory was given (a shard missing, or a split that
  lost a cell).

A shard that died part-way is not an error: its unrun cells stay in the
plan, and the merged report names them as never ran.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.jsonfile import load_json_object
from harness.report.results import (
    RESULTS_FILE,
    RESULTS_WHAT,
    SCHEMA,
    CellKey,
    CellResult,
    RunResults,
    ScenarioRef,
    key_of,
    load_results,
    utc_now,
)

_SHOW = 8  # cells named in an error message before "..."


def _names(keys: Sequence[CellKey]) -> str:
    shown = ", ".join(str(k) for k in keys[:_SHOW])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _SHOW else "")


def _version(directory: Path) -> Any:
    path = directory / RESULTS_FILE if directory.is_dir() else directory
    try:
        data = load_json_object(path, RESULTS_WHAT)
    except ConfigError:
        return None  # load_results says what is wrong with it
    return data.get("version") if data.get("schema") == SCHEMA else None


def _scenario_set(results: RunResults) -> frozenset[tuple[str, str | None]]:
    if results.scenarios:
        return frozenset((r.name, r.sha256) for r in results.scenarios)
    # A file from before `scenarios` was recorded: what its cells name.
    return frozenset((c.scenario, None) for c in results.cells)


def _rebase(cell: CellResult, source: Path, out: Path) -> CellResult:
    """Artifact paths relative to the merged directory (they were relative to the shard's)."""
    artifacts = {
        name: path
        if Path(path).is_absolute()
        else os.path.relpath(source.resolve() / path, out.resolve())
        for name, path in cell.artifacts.items()
    }
    return dataclasses.replace(cell, artifacts=artifacts)


def merge_results(directories: Sequence[Path | str], out: Path | str) -> RunResults:
    """The merged `RunResults` of `directories` (not written: `render_all` does that)."""
    dirs = [Path(d) for d in directories]
    if not dirs:
        raise ConfigError("--merge needs at least one results directory")
    if len({d.resolve() for d in dirs}) != len(dirs):
        raise ConfigError("--merge names the same directory twice")
    versions = {str(d): _version(d) for d in dirs}
    if len({v for v in versions.values() if v is not None}) > 1:
        listed = ", ".join(f"{d} is version {v}" for d, v in versions.items())
        raise ConfigError(
            f"cannot merge results of different schema versions ({listed}); "
            "run every shard with the same powercut"
        )
    runs = [(d, load_results(d)) for d in dirs]

    first_dir, first = runs[0]
    for d, r in runs[1:]:
        if _scenario_set(r) != _scenario_set(first):
            mine = sorted(n for n, _ in _scenario_set(first))
            theirs = sorted(n for n, _ in _scenario_set(r))
            detail = (
                f"{first_dir} has {', '.join(mine)}; {d} has {', '.join(theirs)}"
                if mine != theirs
                else "the same names, but a scenario file's content differs"
            )
            raise ConfigError(
                f"cannot merge: {first_dir} and {d} ran different scenario sets ({detail})"
            )

    sharded = [r.shard is not None for _, r in runs]
    if any(sharded) and not all(sharded):
        plain = next(d for d, r in runs if r.shard is None)
        raise ConfigError(f"cannot merge shards with a run that was not sharded ({plain})")
    plan: tuple[CellKey, ...]
    if all(sharded):
        splits = {(r.shard.count, r.shard.plan) for _, r in runs if r.shard is not None}
        if len(splits) > 1:
            labels = ", ".join(f"{d}: {r.shard.label}" for d, r in runs if r.shard is not None)
            raise ConfigError(
                f"cannot merge shards of different splits ({labels}): every shard must come "
                "from the same `powercut run ... --shard K/N` command line with the same N"
            )
        count, plan = next(iter(splits))
        seen: dict[int, Path] = {}
        for d, r in runs:
            assert r.shard is not None
            if r.shard.index in seen:
                raise ConfigError(
                    f"shard {r.shard.label} is given twice: {seen[r.shard.index]}, {d}"
                )
            seen[r.shard.index] = d
    else:
        plan = tuple(k for _, r in runs for k in r.planned_keys)

    owner: dict[CellKey, Path] = {}
    overlap: list[CellKey] = []
    for d, r in runs:
        for key in r.planned_keys:
            if key in owner:
                overlap.append(key)
            owner.setdefault(key, d)
    if overlap:
        raise ConfigError(
            f"cannot merge: {len(overlap)} cells are in more than one directory "
            f"(shards overlap): {_names(overlap)}"
        )
    uncovered = [k for k in plan if k not in owner]
    if uncovered:
        hint = ""
        if all(sharded):
            indexes = {r.shard.index for _, r in runs if r.shard is not None}
            count = next(r.shard.count for _, r in runs if r.shard is not None)
            absent = [f"{i}/{count}" for i in range(1, count + 1) if i not in indexes]
            hint = f"; shards not given: {', '.join(absent)}" if absent else ""
        raise ConfigError(
            f"cannot merge: {len(uncovered)} cells of the run are in no directory given "
            f"(a shard is missing){hint}: {_names(uncovered)}"
        )
    extra = [k for k in owner if k not in set(plan)]
    if extra:
        raise ConfigError(f"cannot merge: cells outside the run's plan: {_names(extra)}")

    out_dir = Path(out)
    by_key: dict[CellKey, CellResult] = {}
    for d, r in runs:
        for cell in r.cells:
            by_key[key_of(cell)] = _rebase(cell, d, out_dir)
    cells = tuple(by_key[k] for k in plan if k in by_key)
    hosts = [dict(r.host) for _, r in runs]
    accels = {h.get("accel") for h in hosts}
    return RunResults(
        cells=cells,
        started=min((r.started for _, r in runs if r.started), default=""),
        finished=max((r.finished for _, r in runs if r.finished), default=utc_now()),
        command=" ".join(
            ["powercut report --merge", *(str(d) for d in dirs), "--out", str(out_dir)]
        ),
        host={
            "hostname": ", ".join(dict.fromkeys(str(h.get("hostname", "")) for h in hosts)),
            "cores": max((int(h.get("cores") or 0) for h in hosts), default=0),
            "accel": accels.pop() if len(accels) == 1 else "mixed",
            "merged_from": [str(d) for d in dirs],
        },
        powercut_version=first.powercut_version,
        scenarios=first.scenarios
        or tuple(ScenarioRef(n, "", None) for n, _ in sorted(_scenario_set(first))),
        planned=plan,
        shard=None,
        complete=all(r.complete for _, r in runs),
    )
