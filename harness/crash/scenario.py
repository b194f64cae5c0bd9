"""Scenario files: what to run, under which cache modes and faults, and how to judge it.

A scenario is a TOML file (schema: `scenarios/README.md`). This module turns
one into a frozen `Scenario` value and rejects anything it does not know: an
unknown field, a wrong type or value gives a `ScenarioError` that names the
file, the line, the field and what is allowed. `harness.crash.matrix` then
expands a `Scenario` into cells.

Only the vocabulary lives here (fault models, cut policies, triggers,
workloads, checkers; cache modes are `harness.block.cache.CacheMode` and cut
policies `harness.durability.cut.CutPolicy`); what
each combination promises is `harness.crash.verdict`'s business.
"""

from __future__ import annotations

import dataclasses
import enum
import random
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from harness.block.drivers.blkdebug import BlkOp, Rule
from harness.crash.tomlines import LineIndex, PathElem
from harness.durability.contract import CacheMode, FaultModel, cache_mode_names, parse_cache_mode
from harness.durability.cut import CutPolicy
from harness.errors import ConfigError, ScenarioError

E = TypeVar("E", bound=enum.Enum)


def _parse_mode(name: str) -> CacheMode:
    """QEMU's mode names, aliases included (ValueError otherwise)."""
    try:
        return parse_cache_mode(name)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


class WorkloadKind(enum.Enum):
    FIO_VERIFY = "fio-verify"
    ACK_RECORDS = "ack-records"
    EXT4_METADATA = "ext4-metadata"


class TriggerKind(enum.Enum):
    AFTER_SECONDS = "after-seconds"
    AFTER_ACKED_WRITES = "after-acked-writes"
    AFTER_FLUSHES = "after-flushes"
    WINDOW = "window"  # seeded-random time in [a, b] seconds


class Checker(enum.Enum):
    ORACLE = "oracle"  # the durability oracle on the image, from the write log
    FIO_VERIFY = "fio-verify"  # fio verify with the saved verify state
    FSCK = "fsck"  # mount (journal replay) then e2fsck -fn
    ACK_RECORDS = "ack-records"  # ackrecords --check against the streamed acks
    FSMETA = "fsmeta"  # fsmeta --check against the streamed acks


class SyncMode(enum.Enum):
    FSYNC = "fsync"
    FDATASYNC = "fdatasync"
    NONE = "none"


class Expectation(enum.Enum):
    """What a scenario expects, when it differs from the mode's contract."""

    CONTRACT = "contract"  # observed must lie inside the contract (the default)
    VIOLATION = "violation"  # a negative control: passes only when the loss is detected


# Which checkers can judge which workload; the first ones are the default set.
APPLICABLE_CHECKERS: Mapping[WorkloadKind, tuple[Checker, ...]] = {
    WorkloadKind.FIO_VERIFY: (Checker.ORACLE, Checker.FIO_VERIFY),
    WorkloadKind.ACK_RECORDS: (Checker.ORACLE, Checker.ACK_RECORDS, Checker.FSCK),
    WorkloadKind.EXT4_METADATA: (Checker.ORACLE, Checker.FSMETA, Checker.FSCK),
}

OptionValue = str | int | float | bool


@dataclass(frozen=True)
class FaultSpec:
    """One fault model; a host power cut may list several policies (one cell each)."""

    model: FaultModel
    policies: tuple[CutPolicy, ...] = ()
    seed: int | None = None  # fixed policy seed; None derives it from the cell seed


@dataclass(frozen=True)
class CutSpec:
    """When to cut. `value` is seconds, acked writes or flushes; `window` is [a, b] seconds."""

    kind: TriggerKind
    value: float = 0.0
    window: tuple[float, float] | None = None

    @property
    def label(self) -> str:
        if self.kind is TriggerKind.WINDOW:
            assert self.window is not None
            return f"window-{_num(self.window[0])}-{_num(self.window[1])}s"
        if self.kind is TriggerKind.AFTER_SECONDS:
            return f"after-{_num(self.value)}s"
        if self.kind is TriggerKind.AFTER_ACKED_WRITES:
            return f"after-{int(self.value)}-acked"
        return f"after-{int(self.value)}-flushes"

    def resolve(self, seed: int) -> float:
        """The concrete threshold for one cell: the window draws a time from `seed`."""
        if self.window is not None:
            low, high = self.window
            return round(random.Random(seed).uniform(low, high), 3)
        return self.value


@dataclass(frozen=True)
class FioVerifySpec:
    """fio options (fio's own names) for the write phase; verify options are added by the runner."""

    options: tuple[tuple[str, OptionValue], ...] = ()

    def as_dict(self) -> dict[str, OptionValue]:
        return dict(self.options)

    @property
    def syncs_every_write(self) -> bool:
        """True when every completed fio write is also stable (so the contract covers it)."""
        opts = self.as_dict()
        for key in ("fsync", "fdatasync"):
            if str(opts.get(key, "0")) == "1":
                return True
        return str(opts.get("sync", "0")) in ("1", "sync", "dsync")


@dataclass(frozen=True)
class AckRecordsSpec:
    records: int = 0  # 0: until cut
    record_size: int = 4096
    sync: SyncMode = SyncMode.FSYNC


@dataclass(frozen=True)
class FsMetaSpec:
    ops: int = 0  # 0: until cut
    files: int = 32
    max_size: int = 16384


WorkloadParams = FioVerifySpec | AckRecordsSpec | FsMetaSpec


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    kind: WorkloadKind
    params: WorkloadParams
    checkers: tuple[Checker, ...]
    cuts: tuple[CutSpec, ...] = ()  # overrides the scenario's cuts for this workload


@dataclass(frozen=True)
class BlkdebugRule:
    """One blkdebug rule: the fields of `harness.block.drivers.blkdebug.Rule` (its JSON form)."""

    options: tuple[tuple[str, OptionValue], ...]

    def as_dict(self) -> dict[str, OptionValue]:
        return dict(self.options)

    def to_rule(self) -> Rule:
        return Rule.from_json(self.as_dict())


@dataclass(frozen=True)
class Scenario:
    path: str
    name: str
    description: str
    image: str
    disk_size: int
    modes: tuple[CacheMode, ...]
    faults: tuple[FaultSpec, ...]
    workloads: tuple[WorkloadSpec, ...]
    cuts: tuple[CutSpec, ...]
    repetitions: int = 1
    seed: int = 0
    expect: Expectation = Expectation.CONTRACT
    blkdebug: tuple[BlkdebugRule, ...] = ()
    timeout: float = 300.0
    filesystem: str = "ext4"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*$")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: str | int) -> int:
    """`4096`, `"64k"`, `"256M"`, `"2G"` → bytes (powers of two, like QEMU)."""
    if isinstance(value, bool):
        raise ValueError("a size, not a boolean")
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a size (use bytes or a k/M/G/T suffix)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class _Table:
    """One TOML table being validated: takes known keys, then rejects the rest."""

    def __init__(self, ctx: _Context, data: Mapping[str, Any], path: tuple[PathElem, ...]) -> None:
        self.ctx = ctx
        self.data = data
        self.path = path
        self.known: list[str] = []

    def where(self, key: str | None = None) -> str:
        return self.ctx.where((*self.path, key) if key else self.path)

    def fieldname(self, key: str | None = None) -> str:
        parts = (*self.path, key) if key else self.path
        return ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in parts).replace(
            ".[", "["
        )

    def error(self, key: str, message: str) -> ScenarioError:
        return ScenarioError(f"{self.where(key)}: field {self.fieldname(key)!r} {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = None) -> Any:
        if key not in self.known:
            self.known.append(key)
        return self.data.get(key, default)

    def typed(self, key: str, kind: type | tuple[type, ...], default: Any, what: str) -> Any:
        value = self.raw(key, default)
        if key not in self.data:
            return value
        ok = isinstance(value, kind) and not (
            isinstance(value, bool) and bool not in _as_tuple(kind)
        )
        if not ok:
            raise self.error(key, f"must be {what}, not {_describe(value)}")
        return value

    def string(self, key: str, default: str | None = None) -> str:
        value = self.typed(key, str, default, "a string")
        if value is None:
            raise self.error(key, "is required (a string)")
        return str(value)

    def integer(self, key: str, default: int, minimum: int | None = None) -> int:
        value = int(self.typed(key, int, default, "an integer"))
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be an integer >= {minimum}, not {value}")
        return value

    def number(self, key: str, default: float, minimum: float | None = None) -> float:
        value = float(self.typed(key, (int, float), default, "a number"))
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be a number >= {minimum}, not {_num(value)}")
        return value

    def size(self, key: str, default: int, minimum: int = 1) -> int:
        value = self.raw(key, default)
        try:
            size = parse_size(value)
        except (ValueError, TypeError) as exc:
            raise self.error(key, f"must be a size in bytes or with a k/M/G suffix: {exc}") from exc
        if size < minimum:
            raise self.error(key, f"must be at least {minimum} bytes, not {size}")
        return size

    def choice(
        self,
        key: str,
        enum_type: type[E],
        default: E | None = None,
        parse: Callable[[str], E] | None = None,
    ) -> E:
        value = self.raw(key)
        if value is None:
            if default is None:
                raise self.error(key, f"is required; one of: {_choices(enum_type)}")
            return default
        return self._one(key, value, enum_type, parse)

    def _one(self, key: str, value: Any, enum_type: type[E], parse: Callable[[str], E] | None) -> E:
        if isinstance(value, str):
            try:
                return parse(value) if parse else enum_type(value)
            except ValueError:
                pass
        raise self.error(key, f"must be one of: {_choices(enum_type)}; got {value!r}")

    def choices(
        self,
        key: str,
        enum_type: type[E],
        default: Sequence[E],
        parse: Callable[[str], E] | None = None,
    ) -> tuple[E, ...]:
        """A value or a list of values (a matrix dimension); duplicates are an error."""
        value = self.raw(key)
        if value is None:
            return tuple(default)
        items = value if isinstance(value, list) else [value]
        if not items:
            raise self.error(key, f"must not be empty; one or more of: {_choices(enum_type)}")
        result = tuple(self._one(key, item, enum_type, parse) for item in items)
        if len(set(result)) != len(result):
            raise self.error(key, f"lists a value twice: {[r.value for r in result]}")
        return result

    def table(self, key: str) -> _Table | None:
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(key, f"must be a table, not {_describe(value)}")
        return _Table(self.ctx, value, (*self.path, key))

    def tables(self, key: str) -> list[_Table]:
        """A table or an array of tables."""
        value = self.raw(key)
        if value is None:
            return []
        if isinstance(value, dict):
            return [_Table(self.ctx, value, (*self.path, key))]
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return [_Table(self.ctx, v, (*self.path, key, i)) for i, v in enumerate(value)]
        raise self.error(key, f"must be a table or an array of tables, not {_describe(value)}")

    def finish(self) -> None:
        for key in self.data:
            if key not in self.known:
                valid = ", ".join(sorted(self.known))
                raise self.error(key, f"is unknown here; valid fields: {valid}")


@dataclass
class _Context:
    path: str
    lines: LineIndex
    extra: dict[str, Any] = field(default_factory=dict)

    def where(self, path: Sequence[PathElem]) -> str:
        line = self.lines.line_of(path)
        return f"{self.path}:{line}" if line else self.path


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _choices(enum_type: type[enum.Enum]) -> str:
    if enum_type is CacheMode:
        return ", ".join(cache_mode_names())
    return ", ".join(m.value for m in enum_type)


def _parse_fault(t: _Table) -> FaultSpec:
    model = t.choice("model", FaultModel)
    if model is FaultModel.HOST_POWER_CUT:
        policies = t.choices("policy", CutPolicy, (CutPolicy.LOSE_ALL,))
        seed_value = t.raw("seed")
        if seed_value is not None and (
            not isinstance(seed_value, int) or isinstance(seed_value, bool)
        ):
            raise t.error("seed", f"must be an integer, not {_describe(seed_value)}")
        if seed_value is not None and seed_value < 0:
            raise t.error("seed", f"must be an integer >= 0, not {seed_value}")
        t.finish()
        return FaultSpec(model, policies, seed_value)
    for key in ("policy", "seed"):
        if t.has(key):
            raise t.error(key, f'only applies to model = "host-power-cut", not {model.value!r}')
    t.finish()
    return FaultSpec(model)


def _parse_cut(t: _Table) -> CutSpec:
    kinds = [k for k in TriggerKind if t.has(k.value)]
    for k in TriggerKind:
        t.raw(k.value)
    if len(kinds) != 1:
        t.finish()
        what = "none" if not kinds else " and ".join(k.value for k in kinds)
        raise ScenarioError(
            f"{t.where()}: table {t.fieldname()!r} needs exactly one of "
            f"{', '.join(k.value for k in TriggerKind)}; found {what}"
        )
    kind = kinds[0]
    if kind is TriggerKind.WINDOW:
        value = t.raw("window")
        ok = (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            and 0 <= value[0] <= value[1]
        )
        if not ok:
            raise t.error("window", "must be [a, b] seconds with 0 <= a <= b, e.g. [2, 8]")
        t.finish()
        return CutSpec(kind, window=(float(value[0]), float(value[1])))
    if kind is TriggerKind.AFTER_SECONDS:
        seconds = t.number(kind.value, 0.0, minimum=0.0)
        t.finish()
        return CutSpec(kind, value=seconds)
    count = t.integer(kind.value, 0, minimum=1)
    t.finish()
    return CutSpec(kind, value=float(count))


_FIO_RESERVED = ("verify_state_save", "verify_state_load", "do_verify", "verify_only", "trigger")


def _parse_workload(t: _Table, scenario_checkers: tuple[Checker, ...] | None) -> WorkloadSpec:
    kind = t.choice("kind", WorkloadKind)
    name = t.string("name", kind.value)
    if not _NAME.match(name):
        raise t.error("name", f"must be letters, digits, '.', '_' or '-', not {name!r}")
    params: WorkloadParams
    if kind is WorkloadKind.FIO_VERIFY:
        fio = t.table("fio")
        options: list[tuple[str, OptionValue]] = []
        if fio is not None:
            for key, value in fio.data.items():
                fio.raw(key)
                if not isinstance(value, str | int | float | bool):
                    raise fio.error(
                        key, f"must be a string, number or boolean, not {_describe(value)}"
                    )
                if key in _FIO_RESERVED:
                    raise fio.error(
                        key, "is set by the runner (verify state and trigger); remove it"
                    )
                options.append((key, value))
        params = FioVerifySpec(tuple(options))
    elif kind is WorkloadKind.ACK_RECORDS:
        params = AckRecordsSpec(
            records=t.integer("records", 0, minimum=0),
            record_size=t.size("record-size", 4096, minimum=64),
            sync=t.choice("sync", SyncMode, SyncMode.FSYNC),
        )
    else:
        params = FsMetaSpec(
            ops=t.integer("ops", 0, minimum=0),
            files=t.integer("files", 32, minimum=1),
            max_size=t.size("max-size", 16384, minimum=1),
        )
    applicable = APPLICABLE_CHECKERS[kind]
    own = t.choices("checkers", Checker, ()) if t.has("checkers") else t.raw("checkers")
    chosen = own if own is not None else scenario_checkers
    if chosen is None:
        checkers = applicable
    else:
        checkers = tuple(c for c in chosen if c in applicable)
        bad = [c.value for c in (own or ()) if c not in applicable]
        if bad:
            raise t.error(
                "checkers",
                f"lists {', '.join(bad)}, which cannot judge the {kind.value} workload; "
                f"use some of: {', '.join(c.value for c in applicable)}",
            )
        if not checkers:
            raise t.error(
                "checkers" if own is not None else "kind",
                f"leaves no checker for this {kind.value} workload; "
                f"applicable: {', '.join(c.value for c in applicable)}",
            )
    cuts = tuple(_parse_cut(c) for c in t.tables("cut"))
    t.finish()
    return WorkloadSpec(name, kind, params, checkers, cuts)


def _parse_blkdebug(t: _Table) -> BlkdebugRule:
    options: list[tuple[str, OptionValue]] = []
    for key, value in t.data.items():
        t.raw(key)
        if not isinstance(value, str | int | float | bool):
            raise t.error(key, f"must be a string, number or boolean, not {_describe(value)}")
        options.append((key, value))
    if not t.has("op"):
        raise ScenarioError(
            f"{t.where()}: table {t.fieldname()!r} needs an 'op' field "
            f"(one of: {', '.join(o.value for o in BlkOp)})"
        )
    known = {f.name for f in dataclasses.fields(Rule)}
    for key in t.data:
        if key not in known:
            raise t.error(key, f"is unknown here; valid fields: {', '.join(sorted(known))}")
    rule = BlkdebugRule(tuple(options))
    try:
        rule.to_rule()
    except ConfigError as exc:
        raise ScenarioError(f"{t.where()}: table {t.fieldname()!r}: {exc}") from None
    return rule


def parse_scenario(text: str, path: str = "<scenario>") -> Scenario:
    """Validate TOML text as a scenario; `path` is only used in messages and results."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from exc
    ctx = _Context(path, LineIndex(text))
    top = _Table(ctx, data, ())
    default_name = Path(path).stem if path != "<scenario>" else "scenario"
    name = top.string("name", default_name)
    if not _NAME.match(name):
        raise top.error("name", f"must be letters, digits, '.', '_' or '-', not {name!r}")
    description = top.string("description", "")
    image = top.string("image", "default")
    disk_size = top.size("disk-size", 256 << 20, minimum=1 << 20)
    modes = top.choices("modes", CacheMode, (CacheMode.WRITEBACK,), _parse_mode)
    if top.has("mode"):
        raise top.error("mode", "is spelled 'modes' (one mode or a list)")
    repetitions = top.integer("repetitions", 1, minimum=1)
    seed = top.integer("seed", 0, minimum=0)
    expect = top.choice("expect", Expectation, Expectation.CONTRACT)
    timeout = top.number("timeout", 300.0, minimum=1.0)
    filesystem = top.string("filesystem", "ext4")
    if filesystem != "ext4":
        raise top.error(
            "filesystem", f'must be "ext4" (the only one the guest image has), not {filesystem!r}'
        )
    scenario_checkers = (
        top.choices("checkers", Checker, ()) if top.has("checkers") else top.raw("checkers")
    )

    fault_tables = top.tables("fault")
    if not fault_tables:
        raise ScenarioError(
            f"{path}: a [[fault]] table is required (model = one of: {_choices(FaultModel)})"
        )
    faults = tuple(_parse_fault(t) for t in fault_tables)
    if len(set(faults)) != len(faults):
        raise top.error("fault", "lists the same fault twice")

    workload_tables = top.tables("workload")
    if not workload_tables:
        raise ScenarioError(
            f"{path}: a [[workload]] table is required (kind = one of: {_choices(WorkloadKind)})"
        )
    workloads = tuple(_parse_workload(t, scenario_checkers) for t in workload_tables)
    names = [w.name for w in workloads]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise workload_tables[i].error(
                "name", f"{n!r} is used by another workload; give each a unique name"
            )
    if scenario_checkers is not None:
        used = {c for w in workloads for c in w.checkers}
        unused = [c.value for c in scenario_checkers if c not in used]
        if unused:
            raise top.error(
                "checkers", f"lists {', '.join(unused)}, which no workload here can use"
            )

    cut_tables = top.tables("cut")
    cuts = tuple(_parse_cut(t) for t in cut_tables) or (CutSpec(TriggerKind.AFTER_SECONDS, 5.0),)
    labels = [c.label for c in cuts]
    if len(set(labels)) != len(labels):
        raise top.error("cut", f"lists the same cut twice: {labels}")

    blkdebug = tuple(_parse_blkdebug(t) for t in top.tables("blkdebug"))
    top.finish()
    return Scenario(
        path=path,
        name=name,
        description=description,
        image=image,
        disk_size=disk_size,
        modes=modes,
        faults=faults,
        workloads=workloads,
        cuts=cuts,
        repetitions=repetitions,
        seed=seed,
        expect=expect,
        blkdebug=blkdebug,
        timeout=timeout,
        filesystem=filesystem,
    )


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate one scenario file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{p}: cannot read the scenario file: {exc.strerror}") from exc
    return parse_scenario(text, str(p))
