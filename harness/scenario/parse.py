"""Scenario files: what to run, under which cache modes and faults, and how to judge it.

A scenario is a TOML file (schema: `scenarios/README.md`). This module turns
one into a frozen `Scenario` value (`harness.scenario.model`) and rejects
anything it does not know: an unknown field, a wrong type or value gives a
`ScenarioError` that names the file, the line, the field and what is
allowed. Each `[[workload]]` table is read by its workload's own `parse`
(`harness.workloads.registry` knows the kinds). `harness.scenario.cells`
then expands a `Scenario` into cells. Nothing here boots a machine.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import tomllib
from pathlib import Path

from harness.block.drivers.blkdebug import BlkOp, Rule
from harness.durability.contract import (
    CacheMode,
    CutPolicy,
    FaultModel,
    parse_cache_mode,
)
from harness.errors import ConfigError, ScenarioError
from harness.scenario.explore import parse_explore
from harness.scenario.model import (
    BlkdebugRule,
    CutSpec,
    DiskSpec,
    Expectation,
    FaultSpec,
    GuestSpec,
    ImageFormat,
    Scenario,
    TriggerKind,
    WorkloadSpec,
)
from harness.scenario.table import Context, Table, choices_text, describe
from harness.scenario.tomlines import LineIndex
from harness.vm.backends import Backend
from harness.workloads import filesystem as fs
from harness.workloads.base import QEMU_IMG_CHECK, OptionValue
from harness.workloads.registry import kinds, workload_class

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.\-]+$")  # Debian Policy 5.6.1


def _parse_mode(name: str) -> CacheMode:
    """QEMU's mode names, aliases included (ValueError otherwise)."""
    try:
        return parse_cache_mode(name)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


def _parse_fault(t: Table) -> FaultSpec:
    model = t.choice("model", FaultModel)
    if model is FaultModel.HOST_POWER_CUT:
        policies = t.choices("policy", CutPolicy, (CutPolicy.LOSE_ALL,))
        seed_value = t.raw("seed")
        if seed_value is not None and (
            not isinstance(seed_value, int) or isinstance(seed_value, bool)
        ):
            raise t.error("seed", f"must be an integer, not {describe(seed_value)}")
        if seed_value is not None and seed_value < 0:
            raise t.error("seed", f"must be an integer >= 0, not {seed_value}")
        t.finish()
        return FaultSpec(model, policies, seed_value)
    for key in ("policy", "seed"):
        if t.has(key):
            raise t.error(key, f'only applies to model = "host-power-cut", not {model.value!r}')
    t.finish()
    return FaultSpec(model)


def _parse_cut(t: Table) -> CutSpec:
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
    if kind is TriggerKind.AFTER_EXIT:
        if t.raw(kind.value) is not True:
            raise t.error(kind.value, "must be true (cut right after the workload's run exits)")
        t.finish()
        return CutSpec(kind)
    count = t.integer(kind.value, 0, minimum=1)
    t.finish()
    return CutSpec(kind, value=float(count))


def _parse_workload(
    t: Table, scenario_checkers: tuple[str, ...] | None, disk_checkers: tuple[str, ...] = ()
) -> WorkloadSpec:
    kind = t.string("kind", None) if t.has("kind") else None
    if kind is None:
        raise t.error("kind", f"is required; one of: {', '.join(kinds())}")
    cls = workload_class(kind)
    if cls is None:
        raise t.error("kind", f"must be one of: {', '.join(kinds())}; got {kind!r}")
    name = t.string("name", kind)
    if not _NAME.match(name):
        raise t.error("name", f"must be letters, digits, '.', '_' or '-', not {name!r}")
    workload = cls.parse(t)
    applicable = cls.checkers + disk_checkers  # the disk's own (qemu-img-check on qcow2)
    own = _checker_names(t, "checkers") if t.has("checkers") else t.raw("checkers")
    chosen = own if own is not None else scenario_checkers
    if chosen is None:
        checkers = applicable
    else:
        checkers = tuple(c for c in chosen if c in applicable)
        bad = [c for c in (own or ()) if c not in applicable]
        if bad:
            raise t.error(
                "checkers",
                f"lists {', '.join(bad)}, which cannot judge the {kind} workload; "
                f"use some of: {', '.join(applicable)}",
            )
        if not checkers:
            raise t.error(
                "checkers" if own is not None else "kind",
                f"leaves no checker for this {kind} workload; applicable: {', '.join(applicable)}",
            )
    cuts = tuple(_parse_cut(c) for c in t.tables("cut"))
    t.finish()
    return WorkloadSpec(name, workload, checkers, cuts)


def _known_checkers() -> list[str]:
    names: list[str] = []
    for kind in kinds():
        cls = workload_class(kind)
        assert cls is not None
        names += [c for c in cls.checkers if c not in names]
    return [*names, QEMU_IMG_CHECK]


# `qemu-img create -o` options of qcow2 a scenario may set; the others name files
# (backing_file, data_file), secrets (encrypt.*) or the size, which the harness owns.
QCOW2_OPTIONS = (
    "cluster_size",
    "compat",
    "compression_type",
    "extended_l2",
    "lazy_refcounts",
    "preallocation",
    "refcount_bits",
)


def _disk_backend(top: Table) -> tuple[Backend, ImageFormat, tuple[tuple[str, OptionValue], ...]]:
    """`backend`, `format` and `format-options`: whose block layer serves the disk, and how."""
    backend = top.choice("backend", Backend, Backend.POWERCUT)
    image_format = top.choice("format", ImageFormat, ImageFormat.RAW)
    if image_format is not ImageFormat.RAW and backend is Backend.POWERCUT:
        raise top.error(
            "format",
            f'= "{image_format.value}" needs backend = "qemu" or "qemu-storage-daemon": '
            "powercut's own stack serves raw images only (QEMU's format driver is what "
            "such a scenario tests)",
        )
    options = top.options("format-options")
    if options and image_format is not ImageFormat.QCOW2:
        raise top.error("format-options", 'apply to format = "qcow2" only')
    table = top.table("format-options")
    for name, _value in options:
        if name not in QCOW2_OPTIONS:
            assert table is not None
            raise table.error(
                name,
                f"is not a qcow2 option a scenario may set; valid: {', '.join(QCOW2_OPTIONS)}",
            )
    return backend, image_format, options


def _checker_names(t: Table, key: str) -> tuple[str, ...]:
    """A checker name or a list of them (each known to some workload); duplicates are an error."""
    value = t.raw(key)
    items = value if isinstance(value, list) else [value]
    known = _known_checkers()
    if not items:
        raise t.error(key, f"must not be empty; one or more of: {', '.join(known)}")
    for item in items:
        if not isinstance(item, str) or item not in known:
            raise t.error(key, f"must be one of: {', '.join(known)}; got {item!r}")
    if len(set(items)) != len(items):
        raise t.error(key, f"lists a value twice: {items}")
    return tuple(items)


def _parse_blkdebug(t: Table) -> BlkdebugRule:
    options: list[tuple[str, OptionValue]] = []
    for key, value in t.data.items():
        t.raw(key)
        if not isinstance(value, str | int | float | bool):
            raise t.error(key, f"must be a string, number or boolean, not {describe(value)}")
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
    ctx = Context(path, LineIndex(text))
    top = Table(ctx, data, ())
    default_name = Path(path).stem if path != "<scenario>" else "scenario"
    name = top.string("name", default_name)
    if not _NAME.match(name):
        raise top.error("name", f"must be letters, digits, '.', '_' or '-', not {name!r}")
    description = top.string("description", "")
    image = top.string("image", "default")
    modes = top.choices("modes", CacheMode, (CacheMode.WRITEBACK,), _parse_mode)
    if top.has("mode"):
        raise top.error("mode", "is spelled 'modes' (one mode or a list)")
    repetitions = top.integer("repetitions", 1, minimum=1)
    seed = top.integer("seed", 0, minimum=0)
    expect = top.choice("expect", Expectation, Expectation.CONTRACT)
    timeout = top.number("timeout", 300.0, minimum=1.0)
    filesystems = _filesystems(top)
    largest = max(filesystems, key=lambda name: fs.get(name).min_size)
    disk_size = top.size("disk-size", fs.default_size(largest), minimum=1 << 20)
    if top.has("disk-size") and disk_size < fs.get(largest).min_size:
        raise top.error(
            "disk-size",
            f"must be at least {fs.get(largest).min_size >> 20}M for {largest}, not {disk_size}",
        )
    disk = DiskSpec(filesystems[0], _mkfs_options(top), _mount_options(top))
    if len(filesystems) > 1 and disk.mkfs_options:
        raise top.error(
            "mkfs-options", "apply to one filesystem; list a single filesystem to use them"
        )
    guest = GuestSpec(
        packages=_packages(top),
        kernel=_host_path(top, "kernel", path),
        modules=_host_path(top, "modules", path, directory=True),
    )
    if guest.modules and not guest.kernel:
        raise top.error("modules", "needs a kernel: give `kernel = PATH` too")
    guest_files = _guest_files(top, path)
    backend, image_format, format_options = _disk_backend(top)
    disk = dataclasses.replace(
        disk, backend=backend, format=image_format, format_options=format_options
    )
    disk_checkers = (QEMU_IMG_CHECK,) if image_format is ImageFormat.QCOW2 else ()
    scenario_checkers = (
        _checker_names(top, "checkers") if top.has("checkers") else top.raw("checkers")
    )

    fault_tables = top.tables("fault")
    if not fault_tables:
        raise ScenarioError(
            f"{path}: a [[fault]] table is required (model = one of: {choices_text(FaultModel)})"
        )
    faults = tuple(_parse_fault(t) for t in fault_tables)
    for table, fault in zip(fault_tables, faults, strict=True):
        if fault.model is FaultModel.BACKEND_CRASH and backend is not Backend.POWERCUT:
            raise table.error(
                "model",
                f'"backend-crash" needs backend = "powercut", not {backend.value!r}: a '
                "restart of the NBD disk under QEMU's NBD client is not built",
            )
    if len(set(faults)) != len(faults):
        raise top.error("fault", "lists the same fault twice")

    workload_tables = top.tables("workload")
    if not workload_tables:
        raise ScenarioError(
            f"{path}: a [[workload]] table is required (kind = one of: {', '.join(kinds())})"
        )
    workloads = tuple(_parse_workload(t, scenario_checkers, disk_checkers) for t in workload_tables)
    names = [w.name for w in workloads]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise workload_tables[i].error(
                "name", f"{n!r} is used by another workload; give each a unique name"
            )
    if scenario_checkers is not None:
        used = {c for w in workloads for c in w.checkers}
        unused = [c for c in scenario_checkers if c not in used]
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
    explore_table = top.table("explore")
    explore = parse_explore(explore_table) if explore_table is not None else None
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
        filesystems=filesystems,
        guest=guest,
        disk=disk,
        guest_files=guest_files,
        explore=explore,
    )


def _filesystems(top: Table) -> tuple[str, ...]:
    value = top.raw("filesystem", "ext4")
    items = value if isinstance(value, list) else [value]
    if not items:
        raise top.error("filesystem", f"must not be empty; one or more of: {', '.join(fs.NAMES)}")
    for item in items:
        if item not in fs.NAMES:
            raise top.error("filesystem", f"must be one of {', '.join(fs.NAMES)}, not {item!r}")
    if len(set(items)) != len(items):
        raise top.error("filesystem", f"lists a value twice: {items}")
    return tuple(items)


def _packages(top: Table) -> tuple[str, ...]:
    value = top.raw("packages")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise top.error(
            "packages", f"must be a list of Debian package names, not {describe(value)}"
        )
    bad = [v for v in value if not _PACKAGE.match(v)]
    if bad:
        raise top.error(
            "packages",
            f"holds {', '.join(map(repr, bad))}, which is not a Debian package name "
            "(lower-case letters, digits, + - . and at least two characters)",
        )
    return tuple(dict.fromkeys(value))


def _host_path(top: Table, key: str, scenario: str, *, directory: bool = False) -> str | None:
    """A path on the host, relative to the scenario file's directory; it must exist."""
    value = top.optional_string(key)
    if value is None:
        return None
    base = Path(scenario).parent if scenario != "<scenario>" else Path.cwd()
    path = (base / Path(value).expanduser()).resolve()
    if directory and not path.is_dir():
        raise top.error(key, f"must name a directory; {path} is not one")
    if not directory and not path.is_file():
        raise top.error(key, f"must name a file; {path} does not exist")
    return str(path)


def _mkfs_options(top: Table) -> tuple[str, ...]:
    value = top.raw("mkfs-options")
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            return tuple(shlex.split(value))
        except ValueError as exc:
            raise top.error("mkfs-options", f"does not parse as arguments: {exc}") from None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise top.error("mkfs-options", f"must be a string or a list of strings, not {describe(value)}")


def _mount_options(top: Table) -> str:
    value = top.optional_string("mount-options") or ""
    if any(c.isspace() for c in value) or value.startswith(","):
        raise top.error(
            "mount-options", f"must be mount's -o list (comma-separated, no spaces), not {value!r}"
        )
    return value


def _guest_files(top: Table, scenario: str) -> tuple[tuple[str, str], ...]:
    table = top.table("guest-files")
    if table is None:
        return ()
    base = Path(scenario).parent if scenario != "<scenario>" else Path.cwd()
    files: list[tuple[str, str]] = []
    for guest_path, value in table.data.items():
        table.raw(guest_path)
        if not guest_path.startswith("/"):
            raise table.error(
                guest_path, 'must be an absolute path in the guest (a key like "/opt/app.py")'
            )
        if not isinstance(value, str):
            raise table.error(
                guest_path, f"must be a path relative to the scenario file, not {describe(value)}"
            )
        host = (base / value).resolve()
        if not host.is_file():
            raise table.error(guest_path, f"names {host}, which is not a file")
        files.append((guest_path, str(host)))
    return tuple(files)


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate one scenario file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{p}: cannot read the scenario file: {exc.strerror}") from exc
    return parse_scenario(text, str(p))
