"""Property: any valid scenario written as TOML parses back to exactly what was written."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from harness.block.cache import CacheMode
from harness.durability.contract import FaultModel
from harness.durability.cut import CutPolicy
from harness.scenario.cells import expand
from harness.scenario.model import TriggerKind
from harness.scenario.parse import parse_scenario
from harness.workloads.ackrecords import AckRecords, SyncMode
from harness.workloads.fio_verify import FioVerify
from harness.workloads.fsmeta import FsMeta
from harness.workloads.registry import ALIASES, workload_class


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


names = st.from_regex(r"[a-z][a-z0-9_-]{0,12}", fullmatch=True)
cuts = st.one_of(
    st.builds(lambda s: {"after-seconds": s}, st.integers(0, 600)),
    st.builds(lambda n: {"after-acked-writes": n}, st.integers(1, 10**6)),
    st.builds(lambda n: {"after-flushes": n}, st.integers(1, 10**4)),
    st.builds(lambda a, d: {"window": [a, a + d]}, st.integers(0, 60), st.integers(0, 60)),
)


@st.composite
def faults(draw: st.DrawFn) -> dict[str, Any]:
    model = draw(st.sampled_from(list(FaultModel)))
    out: dict[str, Any] = {"model": model.value}
    if model is FaultModel.HOST_POWER_CUT:
        out["policy"] = [
            p.value
            for p in draw(
                st.lists(st.sampled_from(list(CutPolicy)), min_size=1, max_size=5, unique=True)
            )
        ]
        if draw(st.booleans()):
            out["seed"] = draw(st.integers(0, 2**31))
    return out


def _checkers(kind: str) -> list[str]:
    cls = workload_class(kind)
    assert cls is not None
    return list(cls.checkers)


@st.composite
def workloads(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["fio-verify", "ack-records", "fs-metadata", "ext4-metadata"]))
    out: dict[str, Any] = {"kind": kind}
    if kind == "fio-verify":
        out["fio"] = draw(
            st.dictionaries(
                st.sampled_from(["bs", "iodepth", "fsync", "direct", "rw"]),
                st.one_of(st.integers(0, 64), names),
                max_size=4,
            )
        )
    elif kind == "ack-records":
        out["records"] = draw(st.integers(0, 10**6))
        out["record-size"] = draw(st.integers(64, 1 << 20))
        out["sync"] = draw(st.sampled_from([s.value for s in SyncMode]))
    else:
        out["ops"] = draw(st.integers(0, 10**5))
        out["files"] = draw(st.integers(1, 4096))
        out["max-size"] = draw(st.integers(1, 1 << 20))
    if draw(st.booleans()):
        applicable = _checkers(kind)
        out["checkers"] = draw(st.lists(st.sampled_from(applicable), min_size=1, unique=True))
    if draw(st.booleans()):
        out["cut"] = draw(cuts)
    return out


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": draw(names),
        "modes": [
            m.value
            for m in draw(st.lists(st.sampled_from(list(CacheMode)), min_size=1, unique=True))
        ],
        "repetitions": draw(st.integers(1, 5)),
        "seed": draw(st.integers(0, 2**32)),
        "expect": draw(st.sampled_from(["contract", "violation"])),
        "disk-size": draw(st.integers(1 << 20, 1 << 34)),
    }
    fault_list = draw(st.lists(faults(), min_size=1, max_size=3, unique_by=lambda f: f["model"]))
    work = draw(st.lists(workloads(), min_size=1, max_size=3))
    for i, w in enumerate(work):
        w["name"] = f"w{i}"
    return {
        **doc,
        "fault": fault_list,
        "workload": work,
        "cut": draw(st.lists(cuts, max_size=2, unique_by=str)),
    }


def render(doc: dict[str, Any]) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, list | dict)]
    lines.append(f"modes = {toml_value(doc['modes'])}")
    for fault in doc["fault"]:
        lines += ["", "[[fault]]", *(f"{k} = {toml_value(v)}" for k, v in fault.items())]
    for w in doc["workload"]:
        lines += ["", "[[workload]]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in w.items() if k not in ("fio", "cut")]
        if "fio" in w:
            lines += ["[workload.fio]", *(f"{k} = {toml_value(v)}" for k, v in w["fio"].items())]
        if "cut" in w:
            lines += ["[workload.cut]", *(f"{k} = {toml_value(v)}" for k, v in w["cut"].items())]
    for cut in doc["cut"]:
        lines += ["", "[[cut]]", *(f"{k} = {toml_value(v)}" for k, v in cut.items())]
    return "\n".join(lines) + "\n"


def cut_matches(spec: Any, raw: dict[str, Any]) -> bool:
    ((key, value),) = raw.items()
    if key == "window":
        return spec.kind is TriggerKind.WINDOW and spec.window == (float(value[0]), float(value[1]))
    return spec.kind.value == key and spec.value == float(value)


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_written_scenarios_parse_back_to_what_was_written(doc: dict[str, Any]) -> None:
    s = parse_scenario(render(doc), "gen.toml")
    assert s.name == doc["name"] and [m.value for m in s.modes] == doc["modes"]
    assert (s.repetitions, s.seed, s.expect.value, s.disk_size) == (
        doc["repetitions"],
        doc["seed"],
        doc["expect"],
        doc["disk-size"],
    )
    assert [f.model.value for f in s.faults] == [f["model"] for f in doc["fault"]]
    for fault, raw in zip(s.faults, doc["fault"], strict=True):
        assert [p.value for p in fault.policies] == raw.get("policy", [])
        assert fault.seed == raw.get("seed")
    for w, raw in zip(s.workloads, doc["workload"], strict=True):
        assert (w.name, w.kind) == (raw["name"], ALIASES.get(raw["kind"], raw["kind"]))
        if isinstance(w.workload, FioVerify):
            assert w.workload.as_dict() == raw.get("fio", {})
        elif isinstance(w.workload, AckRecords):
            assert (w.workload.records, w.workload.record_size, w.workload.sync.value) == (
                raw["records"],
                raw["record-size"],
                raw["sync"],
            )
        else:
            assert isinstance(w.workload, FsMeta)
            assert (w.workload.ops, w.workload.files, w.workload.max_size) == (
                raw["ops"],
                raw["files"],
                raw["max-size"],
            )
        expected_checkers = raw.get("checkers") or _checkers(w.kind)
        assert list(w.checkers) == expected_checkers
        assert len(w.cuts) == ("cut" in raw) and all(cut_matches(c, raw["cut"]) for c in w.cuts)
    if doc["cut"]:
        assert all(cut_matches(c, raw) for c, raw in zip(s.cuts, doc["cut"], strict=True))
    cells = expand(s)
    per_fault = sum(len(f.policies) or 1 for f in s.faults)
    per_workload = sum(len(w.cuts) or len(s.cuts) for w in s.workloads)
    assert len(cells) == len(s.modes) * per_fault * per_workload * s.repetitions
    assert len({c.id for c in cells}) == len(cells)
