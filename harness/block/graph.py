"""Building a node graph from `--blockdev` options, as `bdrv_open` does.

Each node takes the options QEMU's nodes all take (`driver`, `node-name`,
`read-only`, `cache.direct`, `cache.no-flush`, `discard`) plus its driver's
own; its `file.*` options open its child first. Children inherit `read-only`,
`cache.*` and `discard` from their parent unless they set them themselves
(`bdrv_inherited_options`). Anything unknown is refused with the list of
what is valid, before a file is opened.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.block.node import BlockNode, OpenFlags, Option
from harness.block.options import convert, split_child, to_flat
from harness.block.registry import driver_class, driver_names
from harness.errors import ConfigError

COMMON_OPTIONS: dict[str, Option] = {
    "driver": Option(str, required=True, help="the driver of this node"),
    "node-name": Option(str, help="a unique name for this node"),
    "read-only": Option(bool, default=False),
    "cache.direct": Option(bool, default=False, help="open the host file with O_DIRECT"),
    "cache.no-flush": Option(bool, default=False, help="never flush to the disk (unsafe)"),
    # QEMU's --blockdev defaults to discard=ignore; qemu-io (and this stack) to unmap, so
    # that a discard the caller asked for happens. Pass discard=ignore for QEMU's default.
    "discard": Option(
        str,
        default="unmap",
        choices=("ignore", "off", "unmap", "on"),
        help="pass discard requests down (unmap) or drop them (ignore)",
    ),
}

_auto_names = itertools.count(1)


@dataclass
class Graph:
    root: BlockNode
    nodes: dict[str, BlockNode] = field(default_factory=dict)
    others: list[BlockNode] = field(default_factory=list)  # top-level nodes besides the root

    def close(self) -> None:
        self.root.close()
        for node in self.others:
            node.close()


@dataclass(frozen=True)
class _Inherited:
    read_only: bool
    direct: bool
    no_flush: bool
    unmap: bool


def open_graph(
    options: str | Mapping[str, Any],
    *,
    read_only: bool = False,
    direct: bool = False,
    no_flush: bool = False,
    unmap: bool = True,
) -> Graph:
    """Open the graph described by `options`; the keyword defaults apply where not explicit."""
    flat = to_flat(options)
    nodes: dict[str, BlockNode] = {}
    root = _open_node(flat, _Inherited(read_only, direct, no_flush, unmap), nodes, "", {})
    return Graph(root, nodes)


def open_blockdev_graph(
    blockdevs: Sequence[str | Mapping[str, Any]],
    root: str,
    *,
    read_only: bool = False,
    direct: bool = False,
    no_flush: bool = False,
    unmap: bool = True,
) -> Graph:
    """Several `--blockdev` definitions, as qemu-storage-daemon takes them.

    A later definition may name an earlier node as its child (`file=NODE`), as
    in `--blockdev driver=file,node-name=f0,filename=d.img --blockdev
    driver=raw,node-name=d0,file=f0`; `root` names the node the backend sits on.
    """
    nodes: dict[str, BlockNode] = {}
    top: dict[str, BlockNode] = {}  # opened and not (yet) anyone's child
    defaults = _Inherited(read_only, direct, no_flush, unmap)
    try:
        for spec in blockdevs:
            flat = to_flat(spec)
            if "node-name" not in flat:
                raise ConfigError(
                    f"--blockdev {spec!r} needs a node-name, so that it can be referred to"
                )
            node = _open_node(flat, defaults, nodes, "", top)
            top[node.node_name] = node
        if root not in top:
            where = "is the child of another node" if root in nodes else "is not defined"
            raise ConfigError(
                f"node {root!r} {where}; top-level nodes: {', '.join(sorted(top)) or 'none'}"
            )
    except BaseException:
        for node in top.values():
            node.close()
        raise
    root_node = top.pop(root)
    return Graph(root_node, nodes, list(top.values()))


def _open_node(
    flat: dict[str, Any],
    parent: _Inherited,
    nodes: dict[str, BlockNode],
    path: str,
    free: dict[str, BlockNode],
) -> BlockNode:
    where = f"node at {path.rstrip('.')!r}" if path else "the root node"
    ref = flat.get("file")
    ref_name = ref if isinstance(ref, str) and ref in free else None
    if ref_name is not None:
        # `file=NODE` names a node defined by an earlier --blockdev: it becomes the child.
        flat = {k: v for k, v in flat.items() if k != "file"}
    own, child_opts = split_child(flat, "file")
    driver = own.get("driver")
    if driver is None:
        raise ConfigError(
            f"{where} has no 'driver' option; valid drivers: {', '.join(driver_names())}"
        )
    cls = driver_class(str(driver))
    name = own.get("node-name")
    if name is None:
        name = f"#block{next(_auto_names):03d}"
    name = str(name)

    valid = {**COMMON_OPTIONS, **cls.options}
    values: dict[str, Any] = {}
    for key, raw in own.items():
        option = valid.get(key)
        if option is None:
            raise ConfigError(
                f"driver {cls.driver!r} ({where}) has no option {key!r}; valid options: "
                + ", ".join(sorted(valid) + (["file"] if cls.has_child else []))
            )
        values[key] = convert(cls.driver, name, key, option, raw)
    for key, option in cls.options.items():
        if key not in values:
            if option.required:
                raise ConfigError(f"driver {cls.driver!r} ({where}) needs option {key!r}")
            if option.default is not None:
                values[key] = option.default

    inherited = _Inherited(
        read_only=values.get("read-only", parent.read_only),
        direct=values.get("cache.direct", parent.direct),
        no_flush=values.get("cache.no-flush", parent.no_flush),
        unmap=values.get("discard", "unmap" if parent.unmap else "ignore") in ("unmap", "on"),
    )

    child: BlockNode | None = None
    if ref_name is not None:
        if not cls.has_child:
            raise ConfigError(f"driver {cls.driver!r} ({where}) takes no 'file' child")
        child = free.pop(ref_name)
    elif child_opts is not None:
        if not cls.has_child:
            raise ConfigError(f"driver {cls.driver!r} ({where}) takes no 'file' child")
        child = _open_node(child_opts, inherited, nodes, path + "file.", free)
    elif cls.has_child:
        raise ConfigError(
            f"driver {cls.driver!r} ({where}) needs a 'file' child, "
            "e.g. file.driver=file,file.filename=IMAGE"
        )
    if name in nodes:
        if child is not None:
            child.close()
        raise ConfigError(f"duplicate node-name {name!r}; every node needs its own name")
    driver_opts = {k: v for k, v in values.items() if k in cls.options}
    flags = OpenFlags(
        read_only=inherited.read_only, direct=inherited.direct, no_flush=inherited.no_flush
    )
    try:
        node = cls(name, driver_opts, child, flags)
    except BaseException:
        if child is not None:
            child.close()
        raise
    node.unmap = inherited.unmap  # type: ignore[attr-defined]
    if not inherited.unmap:
        node.can_discard = False  # discard=ignore: the generic layer drops them
    nodes[name] = node
    return node
