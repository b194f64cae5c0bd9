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
import difflib
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
from harness.scenario.cluster import ClusterScope, ClusterSpec, NodeSpec
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
        raise ScenarioError(_toml_error(path, text, exc)) from exc
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
    mkfs_options = _mkfs_options(top)
    if len(filesystems) > 1 and mkfs_options:
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
    disk_checkers = (QEMU_IMG_CHECK,) if image_format is ImageFormat.QCOW2 else ()
    scenario_checkers = (
        _checker_names(top, "checkers") if top.has("checkers") else top.raw("checkers")
    )

    fault_tables = _required_tables(
        top, "fault", f"model = one of: {choices_text(FaultModel)}", path
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

    workload_tables = _required_tables(
        top, "workload", f"kind = one of: {', '.join(kinds())}", path
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
    disk = DiskSpec(
        filesystems[0],
        mkfs_options,
        _mount_options(top),
        backend=backend,
        format=image_format,
        format_options=format_options,
        size=disk_size,
        blkdebug=blkdebug,
    )
    explore_table = top.table("explore")
    explore = parse_explore(explore_table) if explore_table is not None else None
    cluster_table = top.table("cluster")
    cluster = None
    if cluster_table is not None:
        cluster = _parse_cluster(cluster_table)
        _check_cluster(fault_tables, faults, workload_tables)
        if backend is not Backend.POWERCUT:
            raise top.error(
                "backend",
                f'must be "powercut" in a cluster scenario, not {backend.value!r}: '
                "each node's disk is a powercut disk",
            )
    top.finish()
    return Scenario(
        path=path,
        name=name,
        description=description,
        image=image,
        modes=modes,
        faults=faults,
        workloads=workloads,
        cuts=cuts,
        repetitions=repetitions,
        seed=seed,
        expect=expect,
        timeout=timeout,
        disks=tuple(dataclasses.replace(disk, filesystem=f) for f in filesystems),
        guest=guest,
        guest_files=guest_files,
        explore=explore,
        cluster=cluster,
    )


_NODE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")  # a host name (harness/vm/network.py)


def _node_name(t: Table, key: str) -> str:
    name = t.string(key)
    if not _NODE_NAME.match(name):
        raise t.error(
            key,
            f"must be a host name (a lower-case letter, then up to 30 lower-case letters, "
            f"digits or '-'), not {name!r}",
        )
    return name


def _command(t: Table, key: str) -> str | None:
    value = t.optional_string(key)
    if value is not None and not value.strip():
        raise t.error(key, "must not be empty")
    return value


def _parse_cluster(t: Table) -> ClusterSpec:
    """The `[cluster]` table: nodes (a count, or one `[[cluster.node]]` table per node)."""
    node_tables = t.tables("node")
    count = t.integer("nodes", len(node_tables) or 0, minimum=1) if t.has("nodes") else None
    if count is None and not node_tables:
        raise t.error("nodes", "is required: a count (nodes = 3) or [[cluster.node]] tables")
    overrides: dict[str, NodeSpec] = {}
    for nt in node_tables:
        name = _node_name(nt, "name") if nt.has("name") else None
        if name is None:
            raise nt.error("name", "is required: the node this table describes (n1, n2, ...)")
        if name in overrides:
            raise nt.error("name", f"{name!r} is described twice")
        mode = nt.choice("mode", CacheMode, None, _parse_mode) if nt.has("mode") else None
        overrides[name] = NodeSpec(name, mode, _command(nt, "setup"))
        nt.finish()
    if count is not None:
        names = [f"n{i}" for i in range(1, count + 1)]
        for i, name in enumerate(overrides):
            if name not in names:
                raise node_tables[i].error(
                    "name",
                    f"must name one of the {count} nodes ({', '.join(names)}), not {name!r}",
                )
    else:
        names = list(overrides)
    if len(names) > 64:
        raise t.error("nodes", f"must be at most 64, not {len(names)}")
    nodes = tuple(overrides.get(n, NodeSpec(n)) for n in names)
    start = _command(t, "start")
    if start is None:
        raise t.error("start", "is required: the command that starts the system on every node")
    scopes = t.choices("scope", ClusterScope, (ClusterScope.RACK,))
    for scope in scopes:
        if len(names) < scope.minimum_nodes() or scope.size(len(names)) < 1:
            raise t.error(
                "scope", f"{scope.value!r} needs at least 3 nodes; the cluster has {len(names)}"
            )
    client = _node_name(t, "client") if t.has("client") else names[0]
    if client not in names:
        raise t.error("client", f"must name a node ({', '.join(names)}), not {client!r}")
    stagger = t.number("stagger", 1.0, minimum=0.0)
    if t.has("stagger") and ClusterScope.STAGGERED not in scopes:
        raise t.error("stagger", 'applies to scope = "staggered" only')
    spec = ClusterSpec(
        nodes=nodes,
        start=start,
        ready=_command(t, "ready"),
        ready_timeout=t.number("ready-timeout", 300.0, minimum=1.0),
        setup=_command(t, "setup"),
        client=client,
        scopes=scopes,
        stagger=stagger,
        memory_mib=t.integer("memory", 512, minimum=128),
    )
    t.finish()
    return spec


def _check_cluster(
    fault_tables: list[Table],
    faults: tuple[FaultSpec, ...],
    workload_tables: list[Table],
) -> None:
    """What a cluster cell cannot do, refused with the field that asks for it."""
    for ft, fault in zip(fault_tables, faults, strict=True):
        if fault.model is FaultModel.BACKEND_CRASH:
            raise ft.error(
                "model",
                '"backend-crash" is not built for a cluster; use "host-power-cut" or '
                '"guest-power-cut"',
            )
    for wt in workload_tables:
        kind = wt.data.get("kind")
        if kind != "command":
            raise wt.error(
                "kind",
                f'must be "command" in a cluster scenario (the client that prints `ack TOKEN` '
                f"for what the cluster acknowledged), not {kind!r}",
            )


# tomllib (3.11) puts the place in its message: "Unclosed array (at line 2, column 1)".
_TOML_AT = re.compile(r"^(?P<message>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)$")
_TOML_END = " (at end of document)"


def _toml_error(path: str, text: str, exc: tomllib.TOMLDecodeError) -> str:
    """`FILE:LINE: not valid TOML: what (column C)`, and the field the error is in or after."""
    message = str(exc)
    if (m := _TOML_AT.match(message)) is not None:
        line, message = int(m["line"]), f"{m['message']} (column {m['column']})"
    elif message.endswith(_TOML_END):
        line = max(1, len(text.splitlines()))
        message = message[: -len(_TOML_END)] + " (at the end of the file)"
    else:
        return f"{path}: not valid TOML: {message}"
    said = f"{path}:{line}: not valid TOML: {message}"
    found = LineIndex(text).key_before(line)
    if found is None:
        return said
    field = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in found[0])
    field = field.replace(".[", "[")
    if found[1] == line:
        return f"{said}, in field {field!r}"
    return f"{said}; the field before it is {field!r} on line {found[1]}"


def _required_tables(top: Table, name: str, needs: str, path: str) -> list[Table]:
    """The [[name]] tables; none is an error that names a misspelt one (`[[faults]]`)."""
    tables = top.tables(name)
    if tables:
        return tables
    required = f"[[{name}]] table is required ({needs})"
    spelt = {key.lower(): key for key in top.data if key != name}
    near = difflib.get_close_matches(name, list(spelt), 1, 0.8)
    if near:
        raise top.error(spelt[near[0]], f"is unknown here; did you mean [[{name}]]? A {required}")
    raise ScenarioError(f"{path}: a {required}")


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
