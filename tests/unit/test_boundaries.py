"""Values are read where they enter and carried typed after (docs/architecture.md).

A cache mode's name, an accelerator's word and "this cell's filesystem, or
none" are each turned into a value at a boundary — the scenario parser, a
command's argument handling, `powercut serve`'s parser (the child's own
command line), the block layer's `cache=` option, the pytest helpers users
call with strings — and nothing below reads them again. These checks read
the source (like tests/unit/test_layers.py) and name the file and line of a
new reading below the boundaries.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
HARNESS = ROOT / "harness"

# Where a cache mode's name may become a `CacheMode`.
CACHE_MODE_BOUNDARIES = {
    "harness/durability/contract.py",  # where parse_cache_mode is defined
    "harness/scenario/parse.py",  # the TOML parser
    "harness/commands/_cells.py",  # powercut run / explore: --mode
    "harness/commands/check.py",  # powercut check --mode
    "harness/commands/vm.py",  # powercut vm --cache
    "harness/commands/bench.py",  # powercut bench --cache
    "harness/commands/serve.py",  # the serve child's own command line
    "harness/block/backend.py",  # the block layer's cache= option (QEMU's syntax)
    "harness/crash/pytest_helpers.py",  # power_cut.boot/run/explore(mode="writeback")
    "harness/testing/disk.py",  # powercut_disk(cache="none")
}
# Where "auto" becomes an `Accel` or None, and where the request is resolved: once per run
# (powercut run, powercut explore, powercut bench, powercut vm through its machine), once
# per pytest session, and by a machine nobody resolved it for.
ACCEL_PARSE = {
    "harness/vm/accel.py",  # where parse_accel is defined; $POWERCUT_ACCEL
    "harness/vm/libvirt.py",  # a remote libvirt: $POWERCUT_ACCEL or KVM, no probe here
    "harness/commands/_cells.py",
    "harness/commands/vm.py",
    "harness/commands/bench.py",
    "harness/pytest_scenarios.py",
}
ACCEL_RESOLVE = {
    "harness/vm/accel.py",
    "harness/vm/machine.py",
    "harness/crash/runner.py",
    "harness/commands/explore.py",
    "harness/vm/cluster.py",  # a cluster: once for all its nodes
    "harness/commands/bench.py",
    "harness/pytest_scenarios.py",
}
# Where a workload's need of a filesystem is read: its own definition, and the one place
# a cell is built (its disk's filesystem is None when the workload needs none).
FILESYSTEM_DECIDED = {
    "harness/workloads/base.py",
    "harness/workloads/fio_verify.py",
    "harness/scenario/cells.py",
}


def occurrences(pattern: str) -> dict[str, list[int]]:
    """{file: [line, ...]} of every source line of harness/ matching `pattern`."""
    regex = re.compile(pattern)
    found: dict[str, list[int]] = {}
    for path in sorted(HARNESS.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if regex.search(line):
                found.setdefault(str(path.relative_to(ROOT)), []).append(number)
    return found


def outside(found: dict[str, list[int]], allowed: set[str]) -> list[str]:
    return [
        f"{file}:{line}" for file, lines in found.items() if file not in allowed for line in lines
    ]


@pytest.mark.parametrize(
    ("what", "pattern", "allowed"),
    [
        ("a cache mode parsed", r"\bparse_cache_mode\(", CACHE_MODE_BOUNDARIES),
        (
            "a cache mode taken as a string",
            r"CacheMode \| str\b|\bstr \| CacheMode\b",
            CACHE_MODE_BOUNDARIES,
        ),
        ("an accelerator's word read", r"\bparse_accel\(", ACCEL_PARSE),
        (
            '"auto" compared or taken as an accelerator',
            r"Accel \| str\b|== \"auto\"",
            {"harness/vm/accel.py"},
        ),
        ("an accelerator resolved", r"\bchoose_accel\(", ACCEL_RESOLVE),
        ("a workload's need of a filesystem read", r"\bneeds_filesystem\b", FILESYSTEM_DECIDED),
        ("a cell's disk arguments splatted", r"\*\*disk_arguments\(", set()),
    ],
)
def test_values_are_read_only_at_the_boundaries(what: str, pattern: str, allowed: set[str]) -> None:
    wrong = outside(occurrences(pattern), allowed)
    assert not wrong, f"{what} below the boundaries (docs/architecture.md): " + ", ".join(wrong)


def test_a_cell_is_made_in_one_place_and_its_fault_label_computed_in_one() -> None:
    made = occurrences(r"(?<![\w.])Cell\(")
    assert made == {"harness/scenario/cells.py": made.get("harness/scenario/cells.py", [])}
    assert len(made["harness/scenario/cells.py"]) == 1, made  # `_cell`; single_cell expands
    labels = occurrences(r"\{fault\.value\}|\{self\.fault\.value\}|\{cell\.fault\.value\}")
    assert sum(len(lines) for lines in labels.values()) == 1, labels  # `fault_label`


def test_every_boundary_named_here_still_exists() -> None:
    for name in (*CACHE_MODE_BOUNDARIES, *ACCEL_PARSE, *ACCEL_RESOLVE, *FILESYSTEM_DECIDED):
        assert (ROOT / name).is_file(), name


def test_the_check_names_a_reading_below_the_boundaries(tmp_path: Path) -> None:
    # The checker itself can fail: a reading in a module that is no boundary is named.
    found = {"harness/crash/session.py": [12], "harness/scenario/parse.py": [56]}
    assert outside(found, CACHE_MODE_BOUNDARIES) == ["harness/crash/session.py:12"]
    assert list(occurrences(r"\bdef parse_cache_mode\(")) == ["harness/durability/contract.py"]
