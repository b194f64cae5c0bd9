"""The private network of a cluster's guests: addresses, NICs, and each guest's side of it.

A cluster's guests talk to each other on a second NIC, QEMU's `-netdev
stream` on a port of a host-side switch (harness/vm/switch.py); the first NIC
stays user-mode networking with the forwarded SSH port. The private network
touches nothing outside this machine: no tap device, no bridge, no address
bound on the host, and the guests' user-mode NIC is isolated
(`restrict=on`), so from inside a node the other nodes are all there is.

`NetworkPlan` is the value: node names, their addresses on one /24 and the
MAC address of each node's private NIC (locally administered, in QEMU's
52:54:00 range). The guest's side is set up over SSH after boot by one
shell command (`configure_command`), not by the image's init: the image
stays the same for every cluster (no rebuild, no per-node image), the
addresses are the harness's to choose, and the same command runs again
after every power cut and reboot (the guest's /etc is in RAM). It finds the
NIC by its MAC, gives it the node's address (no gateway: nothing to route
to), sets the host name, writes /etc/hosts with every node's name, and
`/etc/powercut/node.env` with the environment a workload's commands get
(`environment`):

    POWERCUT_NODE=n2  POWERCUT_NODE_ADDRESS=10.77.0.2
    POWERCUT_NODES=n1=10.77.0.1,n2=10.77.0.2,n3=10.77.0.3

(POWERCUT_NODES is one word per node, `name=address`, comma-separated: `tr , ' '`
makes a shell list of it, `sed` an etcd `--initial-cluster`.)

`PrivateNetwork` owns the switch process for the plan and hands out what a
MachineSpec and a booted guest need.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from harness.errors import ConfigError, GuestError
from harness.guest.ssh import SSHSession
from harness.vm.spec import MachineSpec, StreamNic
from harness.vm.switch import SwitchProcess

DEFAULT_SUBNET = ipaddress.IPv4Network("10.77.0.0/24")
# QEMU's OUI (locally administered); the user-mode NIC keeps QEMU's 52:54:00:12:34:56.
_MAC_PREFIX = "52:54:00:77"
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
ENV_FILE = "/etc/powercut/node.env"


@dataclass(frozen=True)
class NetworkNode:
    name: str
    address: ipaddress.IPv4Address
    mac: str


@dataclass(frozen=True)
class NetworkPlan:
    """Who is on the private network, at which address and MAC."""

    nodes: tuple[NetworkNode, ...]
    subnet: ipaddress.IPv4Network = DEFAULT_SUBNET

    @classmethod
    def of(
        cls, nodes: int | Sequence[str], subnet: ipaddress.IPv4Network | str = DEFAULT_SUBNET
    ) -> NetworkPlan:
        """`nodes` names (or a count: n1, n2, ...), addressed in order from the subnet's first."""
        names = [f"n{i}" for i in range(1, nodes + 1)] if isinstance(nodes, int) else list(nodes)
        net = ipaddress.IPv4Network(subnet)
        if not names:
            raise ConfigError("a private network needs at least one node")
        for name in names:
            if not _NAME.match(name):
                raise ConfigError(
                    f"node name {name!r} must be a host name: a lower-case letter, then up to 30 "
                    "lower-case letters, digits or '-'"
                )
        if len(set(names)) != len(names):
            raise ConfigError(f"node names must differ: {names}")
        hosts = list(net.hosts())
        if len(names) > min(len(hosts), 255):
            raise ConfigError(
                f"{len(names)} nodes do not fit the private subnet {net} "
                f"({min(len(hosts), 255)} addresses)"
            )
        return cls(
            tuple(
                NetworkNode(name, hosts[i], f"{_MAC_PREFIX}:00:{i + 1:02x}")
                for i, name in enumerate(names)
            ),
            net,
        )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes)

    def node(self, name: str) -> NetworkNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise ConfigError(
            f"no node {name!r} on the private network; it has {', '.join(self.names)}"
        )

    def hosts_file(self) -> str:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        lines += [f"{n.address}\t{n.name}" for n in self.nodes]
        return "\n".join(lines) + "\n"

    def environment(self, name: str) -> dict[str, str]:
        """What a workload's commands on node `name` see."""
        node = self.node(name)
        return {
            "POWERCUT_NODE": node.name,
            "POWERCUT_NODE_ADDRESS": str(node.address),
            "POWERCUT_NODES": ",".join(f"{n.name}={n.address}" for n in self.nodes),
        }

    def exports(self, name: str) -> str:
        """`export ...;` of `environment(name)`, to put before a command."""
        pairs = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.environment(name).items())
        return f"export {pairs}; "

    def configure_command(self, name: str) -> str:
        """One guest shell command that puts node `name` on the network; prints the NIC's name."""
        node = self.node(name)
        env = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.environment(name).items())
        prefix = self.subnet.prefixlen
        return (
            "set -e\n"
            "dev=\n"
            "for d in /sys/class/net/*; do\n"
            f'  [ "$(cat "$d/address")" = {node.mac} ] && dev=${{d##*/}}\n'
            "done\n"
            f'[ -n "$dev" ] || {{ echo "no NIC with MAC {node.mac}: is the private NIC '
            'attached (MachineSpec.nics)?" >&2; exit 1; }\n'
            'ip addr flush dev "$dev"\n'
            f'ip addr add {node.address}/{prefix} dev "$dev"\n'
            'ip link set "$dev" up\n'
            f"hostname {node.name}\n"
            f"cat > /etc/hosts <<'EOF'\n{self.hosts_file()}EOF\n"
            f"mkdir -p {Path(ENV_FILE).parent}\n"
            f"cat > {ENV_FILE} <<'EOF'\n{env}EOF\n"
            'echo "$dev"\n'
        )


class PrivateNetwork:
    """The switch of a `NetworkPlan`, and each node's part of it.

        with PrivateNetwork(NetworkPlan.of(3), rundir) as net:
            spec = net.spec_for(base_spec, "n1")       # + the NIC, user-mode net isolated
            ...boot...
            net.configure(machine.ssh, "n1")
            net.wait_connected(machine.ssh, "n1")

    `directory` holds the switch's sockets: keep it short (unix socket paths
    have 107 bytes) and private.
    """

    def __init__(self, plan: NetworkPlan, directory: Path, *, log_path: Path | None = None) -> None:
        self.plan = plan
        self.directory = Path(directory)
        self.switch = SwitchProcess(
            self.directory, plan.names, log_path=log_path or self.directory / "switch.log"
        )

    def start(self) -> PrivateNetwork:
        self.switch.start()
        return self

    def stop(self) -> None:
        self.switch.stop()

    def nic(self, name: str) -> StreamNic:
        return StreamNic(self.switch.socket_path(name), self.plan.node(name).mac)

    def spec_for(self, spec: MachineSpec, name: str) -> MachineSpec:
        """`spec` as node `name`: its private NIC, its name, and user-mode networking isolated."""
        return replace(spec, nics=(self.nic(name),), isolated=True, name=name)

    def configure(self, ssh: SSHSession, name: str, timeout: float = 30.0) -> str:
        """Put the booted guest on the network as `name`; returns its NIC's name in the guest."""
        result = ssh.run(self.plan.configure_command(name), timeout=timeout)
        if not result.ok:
            raise GuestError(
                f"node {name}: the private network's setup exited {result.exit_code}: "
                f"{result.stderr.strip()[-300:]}"
            )
        return result.stdout.strip()

    def wait_connected(
        self,
        ssh: SSHSession,
        name: str,
        timeout: float = 30.0,
        peers: Iterable[str] | None = None,
    ) -> None:
        """Until node `name` has an answer from every other node of `peers` (all of them).

        ARP and ICMP through the switch: the first answer also proves the peer
        has its address, so a workload started next finds every node there.
        """
        wanted = set(self.plan.names if peers is None else peers) - {name}
        waiting = [n for n in self.plan.nodes if n.name in wanted]
        deadline = time.monotonic() + timeout
        while waiting:
            command = "; ".join(
                f"ping -c 1 -W 1 {n.address} >/dev/null && echo {n.name}" for n in waiting
            )
            answered = set(ssh.run(command, timeout=timeout).stdout.split())
            waiting = [n for n in waiting if n.name not in answered]
            if waiting and time.monotonic() > deadline:
                raise GuestError(
                    f"node {name} cannot reach {', '.join(n.name for n in waiting)} on the "
                    f"private network after {timeout:.0f}s; switch: {self.stats()['ports']}"
                )

    def stats(self) -> dict[str, Any]:
        return self.switch.stats()

    def __enter__(self) -> PrivateNetwork:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
