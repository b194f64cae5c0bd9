"""The scenario format: shipped files validate, bad files name the field and the line."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.block.cache import CacheMode
from harness.block.options import parse_size
from harness.durability.contract import FaultModel
from harness.durability.cut import CutPolicy
from harness.errors import ScenarioError
from harness.scenario.model import Expectation, TriggerKind
from harness.scenario.parse import load_scenario, parse_scenario
from harness.workloads.ackrecords import AckRecords, SyncMode
from harness.workloads.fio_verify import FioVerify

SCENARIOS = sorted((Path(__file__).parents[3] / "scenarios").glob("*.toml"))

MINIMAL = """\
name = "t"
modes = ["writeback"]

[[fault]]
model = "host-power-cut"
policy = "lose-all"

[[workload]]
kind = "ack-records"
records = 10

[cut]
after-acked-writes = 5
"""


def error_of(text: str) -> str:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, "s.toml")
    return str(info.value)


def test_the_required_scenarios_are_shipped() -> None:
    names = {p.name for p in SCENARIOS}
    assert {
        "matrix.toml",
        "guest-crash.toml",
        "backend-crash.toml",
        "ext4-metadata.toml",
        "unsafe-loses-data.toml",
        "lying-flush.toml",
    } <= names


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_every_shipped_scenario_validates(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.name == path.stem
    assert scenario.modes and scenario.faults and scenario.workloads


def test_matrix_covers_all_modes_host_power_cut_fio_and_ack_records() -> None:
    matrix = load_scenario(Path(SCENARIOS[0]).parent / "matrix.toml")
    assert set(matrix.modes) == set(CacheMode)
    assert [f.model for f in matrix.faults] == [FaultModel.HOST_POWER_CUT]
    assert {w.kind for w in matrix.workloads} == {"fio-verify", "ack-records"}


def test_negative_controls_expect_a_violation() -> None:
    root = Path(SCENARIOS[0]).parent
    unsafe = load_scenario(root / "unsafe-loses-data.toml")
    lying = load_scenario(root / "lying-flush.toml")
    assert unsafe.expect is Expectation.VIOLATION and unsafe.modes == (CacheMode.UNSAFE,)
    assert lying.expect is Expectation.VIOLATION and lying.modes == (CacheMode.WRITEBACK,)
    rule = lying.blkdebug[0].to_rule()
    assert (rule.op.value, rule.action.value) == ("flush", "lying-flush")


def test_blkdebug_rules_are_validated_by_the_driver() -> None:
    ok = parse_scenario(MINIMAL + '\n[[blkdebug]]\nop = "write"\nerrno = "ENOSPC"\nonce = true\n')
    assert ok.blkdebug[0].to_rule().errno == 28
    msg = error_of(MINIMAL + '\n[[blkdebug]]\nop = "write"\naction = "lying-flush"\n')
    assert (
        msg.startswith("s.toml:15: table 'blkdebug[0]'") and "lying-flush applies to flushes" in msg
    )
    msg = error_of(MINIMAL + '\n[[blkdebug]]\nop = "flush"\nevent = "x"\n')
    assert "s.toml:17: field 'blkdebug[0].event' is unknown here" in msg and "sector_start" in msg
    assert "needs an 'op' field" in error_of(MINIMAL + '\n[[blkdebug]]\naction = "error"\n')


def test_minimal_scenario_parses_with_defaults() -> None:
    s = parse_scenario(MINIMAL, "s.toml")
    assert s.name == "t" and s.image == "default" and s.disk_size == 256 << 20
    assert s.repetitions == 1 and s.expect is Expectation.CONTRACT
    (workload,) = s.workloads
    assert workload.workload == AckRecords(records=10, record_size=4096, sync=SyncMode.FSYNC)
    assert workload.checkers == ("oracle", "ack-records", "fsck")
    assert s.faults[0].policies == (CutPolicy.LOSE_ALL,)
    assert s.cuts[0].kind is TriggerKind.AFTER_ACKED_WRITES and s.cuts[0].value == 5


def test_off_is_an_alias_of_none() -> None:
    s = parse_scenario(MINIMAL.replace('modes = ["writeback"]', 'modes = ["off", "unsafe"]'))
    assert s.modes == (CacheMode.NONE, CacheMode.UNSAFE)


def test_a_single_mode_may_be_a_string() -> None:
    s = parse_scenario(MINIMAL.replace('modes = ["writeback"]', 'modes = "directsync"'))
    assert s.modes == (CacheMode.DIRECTSYNC,)


def test_unknown_field_names_field_line_and_valid_fields() -> None:
    text = MINIMAL.replace("records = 10", "records = 10\nrecrods = 3")
    msg = error_of(text)
    assert "s.toml:11:" in msg
    assert "'workload[0].recrods'" in msg
    assert "valid fields: checkers, cut, kind, name, record-size, records, sync" in msg


def test_unknown_top_level_field_is_reported_at_its_line() -> None:
    msg = error_of("# comment\n\n" + MINIMAL.replace("modes =", "colour = 1\nmodes ="))
    assert msg.startswith("s.toml:4: field 'colour' is unknown")
    assert "modes" in msg and "workload" in msg


def test_bad_mode_lists_the_allowed_modes() -> None:
    msg = error_of(MINIMAL.replace('["writeback"]', '["writeback", "fast"]'))
    assert "s.toml:2:" in msg and "'modes'" in msg
    assert "writeback, none, writethrough, directsync, unsafe, off" in msg and "'fast'" in msg


def test_wrong_type_names_field_line_and_type() -> None:
    msg = error_of(MINIMAL.replace("records = 10", 'records = "ten"'))
    assert msg == "s.toml:10: field 'workload[0].records' must be an integer, not a string ('ten')"


def test_boolean_is_not_an_integer() -> None:
    msg = error_of(MINIMAL.replace('name = "t"', 'name = "t"\nrepetitions = true'))
    assert "s.toml:2:" in msg and "'repetitions' must be an integer, not a boolean" in msg


def test_bad_policy_names_the_policies() -> None:
    msg = error_of(MINIMAL.replace('policy = "lose-all"', 'policy = "lose-half"'))
    assert "s.toml:6:" in msg and "lose-all, keep-all, random, prefix, torn" in msg


def test_policy_on_a_guest_power_cut_is_rejected() -> None:
    text = MINIMAL.replace('"host-power-cut"', '"guest-power-cut"')
    msg = error_of(text)
    assert "s.toml:6:" in msg and 'only applies to model = "host-power-cut"' in msg


def test_cut_needs_exactly_one_trigger() -> None:
    msg = error_of(
        MINIMAL.replace("after-acked-writes = 5", "after-acked-writes = 5\nafter-seconds = 2")
    )
    assert "s.toml:12:" in msg and "exactly one of" in msg
    msg = error_of(MINIMAL.replace("after-acked-writes = 5", "window = [5, 2]"))
    assert "'cut.window'" in msg and "[a, b]" in msg


def test_checker_that_cannot_judge_the_workload_is_rejected() -> None:
    msg = error_of(MINIMAL.replace("records = 10", 'records = 10\ncheckers = ["fio-verify"]'))
    assert "s.toml:11:" in msg and "fio-verify" in msg and "oracle, ack-records, fsck" in msg


def test_scenario_checkers_restrict_each_workload() -> None:
    s = parse_scenario('checkers = ["oracle", "ack-records"]\n' + MINIMAL)
    assert s.workloads[0].checkers == ("oracle", "ack-records")


def test_missing_fault_and_workload_are_errors() -> None:
    assert "[[fault]] table is required" in error_of(
        'name = "x"\n[[workload]]\nkind = "ack-records"\n'
    )
    assert "[[workload]] table is required" in error_of(
        'name = "x"\n[[fault]]\nmodel = "backend-crash"\n'
    )


def test_duplicate_workload_names_are_rejected() -> None:
    text = MINIMAL + '\n[[workload]]\nkind = "ack-records"\n'
    assert "'ack-records' is used by another workload" in error_of(text)


def test_fio_options_pass_through_but_runner_options_are_reserved() -> None:
    text = MINIMAL.replace(
        'kind = "ack-records"\nrecords = 10',
        'kind = "fio-verify"\n[workload.fio]\nbs = "4k"\niodepth = 16\nfsync = 1',
    )
    s = parse_scenario(text)
    params = s.workloads[0].workload
    assert isinstance(params, FioVerify)
    assert params.as_dict() == {"bs": "4k", "iodepth": 16, "fsync": 1}
    assert params.syncs_every_write
    msg = error_of(text.replace("fsync = 1", "verify_state_save = 1"))
    assert "s.toml:13:" in msg and "set by the runner" in msg


def test_invalid_toml_is_a_scenario_error_that_names_the_line_and_the_field() -> None:
    assert error_of('name = "t"\nmodes = [writeback]\n') == (
        "s.toml:2: not valid TOML: Invalid value (column 10), in field 'modes'"
    )
    # An array left open: tomllib notices on the next line; the field is the one before.
    assert error_of('modes = ["writeback"\n[[fault]]\nmodel = "host-power-cut"\n') == (
        "s.toml:2: not valid TOML: Unclosed array (column 1); "
        "the field before it is 'modes' on line 1"
    )
    assert error_of(MINIMAL + "[explore]\nmax-states =").startswith(
        f"s.toml:{MINIMAL.count(chr(10)) + 2}: not valid TOML: Invalid value (at the end of the "
        "file), in field 'explore.max-states'"
    )


def test_a_misspelt_table_is_named_with_its_line() -> None:
    text = MINIMAL.replace("[[fault]]", "[[faults]]")
    assert error_of(text).startswith(
        "s.toml:4: field 'faults' is unknown here; did you mean [[fault]]? "
        "A [[fault]] table is required (model = one of:"
    )
    text = MINIMAL.replace("[[workload]]", "[[Workloads]]")
    assert error_of(text).startswith("s.toml:8: field 'Workloads' is unknown here; did you mean")
    msg = error_of(MINIMAL.replace("[cut]", "[cuts]"))
    assert msg.startswith("s.toml:12: field 'cuts' is unknown here; valid fields: ")
    assert msg.endswith("; did you mean 'cut'?")


def test_missing_file_is_a_scenario_error(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("text", "size"),
    [(4096, 4096), ("4k", 4096), ("256M", 256 << 20), ("2G", 2 << 30), ("1 MiB", 1 << 20)],
)
def test_sizes_use_binary_suffixes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@given(st.integers(min_value=0, max_value=1 << 40), st.sampled_from(["", "k", "M", "G"]))
def test_size_suffix_round_trip(n: int, suffix: str) -> None:
    unit = {"": 1, "k": 1 << 10, "M": 1 << 20, "G": 1 << 30}[suffix]
    assert parse_size(f"{n}{suffix}") == n * unit


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=12), st.from_regex(r"[a-z][a-z_]{2,10}", fullmatch=True))
def test_unknown_key_is_reported_at_the_line_it_was_inserted(position: int, key: str) -> None:
    """Insert an unknown key after any line of a valid file: the error names that key and line."""
    lines = MINIMAL.splitlines()
    known = {"name", "modes", "model", "policy", "kind", "records", "after_acked_writes"}
    if key in known or key.replace("_", "-") in known:
        return
    insert_at = min(position, len(lines))
    lines.insert(insert_at, f"{key} = 1")
    text = "\n".join(lines) + "\n"
    msg = error_of(text)
    match = re.match(r"s\.toml:(\d+): field '([^']+)'", msg)
    assert match, msg
    assert int(match.group(1)) == insert_at + 1
    assert match.group(2).endswith(key)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_gives_a_scenario_or_a_scenario_error(text: str) -> None:
    with contextlib.suppress(ScenarioError):
        parse_scenario(text)


@pytest.mark.parametrize(
    "text",
    [
        MINIMAL.replace('name = "t"', 'name = "t"\nzzz = 1'),
        MINIMAL.replace("records = 10", "records = 10\nzzz = 1"),
        MINIMAL.replace('policy = "lose-all"', 'policy = "lose-all"\nzzz = 1'),
        MINIMAL.replace('kind = "ack-records"\nrecords = 10', 'kind = "ext4-metadata"\nzzz = 1'),
        MINIMAL.replace("after-acked-writes = 5", "after-acked-writes = 5\nzzz = 1"),
    ],
)
def test_every_valid_field_is_documented(text: str) -> None:
    readme = (Path(__file__).parents[3] / "scenarios" / "README.md").read_text()
    fields = error_of(text).split("valid fields: ")[1].split(", ")
    forms = ("`{}", "[{}]", "[[{}]]", ".{}]")
    undocumented = [f for f in fields if not any(form.format(f) in readme for form in forms)]
    assert not undocumented
