"""Fault control over `powercut serve`'s control socket, while the guest runs.

    {"cmd": "blkdebug-rules"}                        -> [{"id": 0, "op": ..., "fired": 3}]
    {"cmd": "blkdebug-add", "rule": "write:errno=ENOSPC:once"}  -> rule id
    {"cmd": "blkdebug-add", "rule": {"op": "flush", "action": "lying-flush"}}
    {"cmd": "blkdebug-remove", "id": 0}
    {"cmd": "blkdebug-clear"}
    {"cmd": "log-mark", "label": "before-commit"}           (a named point in the write log)
    {"cmd": "state-switch", "delta": "/x/p3-lose-all-0.delta"}  (crash-state: the next state;
                                                     what the guest wrote is discarded)

Each takes an optional "node" (the node-name) and needs it only when the graph
has more than one node of that driver. A graph without such a node answers
with an error naming the drivers it has.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness.block.backend import BlockBackend
from harness.block.drivers.blkdebug import BlkdebugNode, Rule
from harness.block.drivers.crash_state import CrashStateNode
from harness.block.drivers.log_writes import LogWritesNode
from harness.block.node import BlockNode
from harness.control import ControlServer
from harness.errors import ConfigError


def _pick(backend: BlockBackend, kind: type[BlockNode], request: Mapping[str, Any]) -> Any:
    nodes = {n.node_name: n for n in backend.graph.nodes.values() if isinstance(n, kind)}
    wanted = request.get("node")
    if wanted is not None:
        if wanted not in nodes:
            raise ConfigError(
                f"no {kind.driver} node {wanted!r}; {kind.driver} nodes: {sorted(nodes) or 'none'}"
            )
        return nodes[wanted]
    if len(nodes) == 1:
        return next(iter(nodes.values()))
    if not nodes:
        drivers = sorted({n.driver for n in backend.graph.nodes.values()})
        raise ConfigError(
            f"the served graph has no {kind.driver} node (its drivers: {', '.join(drivers)}); "
            f"serve a --blockdev graph with driver={kind.driver}"
        )
    raise ConfigError(f'several {kind.driver} nodes ({sorted(nodes)}); name one with "node"')


def _rule(request: Mapping[str, Any]) -> Rule:
    rule = request.get("rule")
    if isinstance(rule, str):
        return Rule.parse(rule)
    if isinstance(rule, Mapping):
        return Rule.from_json(rule)
    raise ConfigError('blkdebug-add needs "rule": a rule string or a JSON object')


def register_fault_commands(control: ControlServer, backend: BlockBackend) -> None:
    def blkdebug(req: Mapping[str, Any]) -> BlkdebugNode:
        node: BlkdebugNode = _pick(backend, BlkdebugNode, req)
        return node

    def remove(req: Mapping[str, Any]) -> None:
        blkdebug(req).remove_rule(int(req["id"]))

    def mark(req: Mapping[str, Any]) -> None:
        node: LogWritesNode = _pick(backend, LogWritesNode, req)
        node.mark(str(req["label"]))

    def switch_state(req: Mapping[str, Any]) -> dict[str, Any]:
        node: CrashStateNode = _pick(backend, CrashStateNode, req)
        return node.switch(req.get("delta"))

    control.register("blkdebug-rules", lambda req: blkdebug(req).rules())
    control.register("blkdebug-add", lambda req: blkdebug(req).add_rule(_rule(req)))
    control.register("blkdebug-remove", remove)
    control.register("blkdebug-clear", lambda req: blkdebug(req).clear_rules())
    control.register("log-mark", mark)
    control.register("state-switch", switch_state)
