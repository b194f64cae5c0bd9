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
from collections.abc import Mapping
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

    def close(self) -> None:
        self.root.close()


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
    root = _open_node(flat, _Inherited(read_only, direct, no_flush, unmap), nodes, "")
    return Graph(root, nodes)


def _open_node(
    flat: dict[str, Any], parent: _Inherited, nodes: dict[str, BlockNode], path: str
) -> BlockNode:
    where = f"node at {path.rstrip('.')!r}" if path else "the root node"
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
    if child_opts is not None:
        if not cls.has_child:
            raise ConfigError(f"driver {cls.driver!r} ({where}) takes no 'file' child")
        child = _open_node(child_opts, inherited, nodes, path + "file.")
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
