"""N guests on one private network, booted in parallel: the machines of a cluster.

Every node is a `QemuMachine` of the same image with its own disks, its
own NIC on the network's switch (harness/vm/network.py) and an isolated
user-mode NIC for SSH. Booting is parallel by construction: every QEMU is
started first (each returns once QMP answers), then each is waited for, so
the boots overlap and the cluster is ready when its slowest node is. Each
node is then put on the network (its address, /etc/hosts, the node
environment) and the call returns once every node reaches every other.

Under TCG every guest's kernel is told the TSC frequency (harness/vm/clock.py,
applied where the command line is built): left to measure it on a loaded
host, one node's clock was seen running 7.6 times fast, and an etcd cluster
never settled.

A power cut of several nodes sends every SIGKILL before reaping any, so
the nodes die within microseconds of one another rather than one reap
apart (`power_cut`); `kill_skew` says how far apart the signals went.
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType

from harness.errors import ConfigError, MachineError
from harness.vm.accel import choose_accel
from harness.vm.image import GuestImage
from harness.vm.network import NetworkPlan, PrivateNetwork
from harness.vm.qemu import QemuMachine
from harness.vm.spec import Accel, Disk, MachineSpec

log = logging.getLogger(__name__)

# TCG's translation buffer per node: with QEMU's default, a node that starts many
# programs (the client's) grew to 0.8-1 GiB of RSS; capped at 64 MiB the same work
# left a guest at 274 MiB instead of 351 and ran no slower (benchmarks/cluster.py,
# part `memory`).
TCG_TB_MIB = 64

# A node's disks, by its name.
DisksFor = Callable[[str], Sequence[Disk]]


def node_spec(
    spec: MachineSpec,
    network: PrivateNetwork,
    name: str,
    tcg_tb_mib: int | None = TCG_TB_MIB,
) -> MachineSpec:
    """`spec` as node `name` of a cluster: its private NIC and its TCG buffer cap."""
    spec = replace(spec, tcg_tb_mib=tcg_tb_mib)
    return network.spec_for(spec, name)


def boot_nodes(
    machines: Mapping[str, QemuMachine],
    network: PrivateNetwork,
    names: Sequence[str],
    timeout: float = 180.0,
) -> float:
    """Boot `names` of `machines` at once, put them on the network; seconds until all reach all.

    Every QEMU is started first, then each waited for; then each is
    configured, and every running node must reach every other. The switch
    starts with the first boot and outlives power cuts.
    """
    if not network.switch.running:
        network.start()
    t0 = time.monotonic()
    for name in names:
        machines[name].start()
    deadline = t0 + timeout
    for name in names:
        machines[name].wait_ready(max(1.0, deadline - time.monotonic()))
    for name in names:
        network.configure(machines[name].ssh, name)
    up = [n for n in machines if machines[n].running]
    for name in up:
        network.wait_connected(
            machines[name].ssh, name, timeout=max(5.0, deadline - time.monotonic()), peers=up
        )
    seconds = time.monotonic() - t0
    log.info("cluster %s up and connected after %.2fs", ",".join(names), seconds)
    return seconds


def kill_at_once(machines: Mapping[str, QemuMachine], names: Sequence[str]) -> float | None:
    """SIGKILL the QEMU of every running node of `names`, then reap them: one instant.

    Returns how far apart the first and the last signal went (None: none sent).
    """
    chosen = [n for n in names if machines[n].running]
    sent: list[float] = []
    for name in chosen:
        proc = machines[name].process
        if proc is not None:
            proc.signal(signal.SIGKILL)
            sent.append(time.monotonic())
    for name in chosen:
        machines[name].power_cut()
    return (sent[-1] - sent[0]) if sent else None


class Cluster:
    """The machines of `plan`'s nodes on their private network; closed, nothing is left running.

    with Cluster(image, NetworkPlan.of(3), disks=lambda name: [FileDisk(...)]) as cluster:
        cluster.boot()
        cluster["n1"].ssh.run("...")
        cluster.power_cut()            # every node at one instant
        cluster.boot()                 # every node again, back on the network
    """

    def __init__(
        self,
        image: GuestImage,
        plan: NetworkPlan,
        *,
        disks: DisksFor = lambda _name: (),
        memory_mib: int = 512,
        tcg_tb_mib: int | None = TCG_TB_MIB,
        accel: Accel | None = None,
        directory: Path | None = None,
        keep: bool = False,
    ) -> None:
        self.plan = plan
        self.keep = keep
        self._own = directory is None
        # Sockets (the switch's ports, each QMP) need a short path.
        self.directory = Path(directory or tempfile.mkdtemp(prefix="pc-"))
        self.network = PrivateNetwork(plan, self.directory / "net")
        self.machines: dict[str, QemuMachine] = {}
        self.kill_skew: float | None = None
        self.accel = choose_accel(accel, image.kernel)
        for name in plan.names:
            spec = MachineSpec.from_image(
                image, disks=tuple(disks(name)), memory_mib=memory_mib, name=name
            )
            self.machines[name] = QemuMachine(
                node_spec(spec, self.network, name, tcg_tb_mib),
                workdir=self.directory / name,
                accel=self.accel,
                keep=True,
            )

    def __getitem__(self, name: str) -> QemuMachine:
        try:
            return self.machines[name]
        except KeyError:
            raise ConfigError(
                f"no node {name!r} in the cluster; it has {', '.join(self.machines)}"
            ) from None

    def _names(self, names: Iterable[str] | None) -> list[str]:
        chosen = list(self.machines) if names is None else list(names)
        for name in chosen:
            self[name]  # raises ConfigError for an unknown node
        return chosen

    # -- lifecycle -------------------------------------------------------------------

    def boot(self, names: Iterable[str] | None = None, timeout: float = 180.0) -> float:
        """Boot `names` (every node) at once, put them on the network; seconds until all reach all.

        The switch starts with the first boot and outlives power cuts.
        """
        return boot_nodes(self.machines, self.network, self._names(names), timeout)

    def power_cut(self, names: Iterable[str] | None = None) -> None:
        """Kill the QEMU of `names` (every node) at one instant: every signal before any reap."""
        self.kill_skew = kill_at_once(self.machines, self._names(names))

    def shutdown(self) -> None:
        for machine in self.machines.values():
            machine.shutdown()

    def close(self) -> None:
        errors: list[BaseException] = []
        for machine in self.machines.values():
            try:
                machine.close()
            except MachineError as exc:
                errors.append(exc)
        self.network.stop()
        if self._own and not self.keep:
            shutil.rmtree(self.directory, ignore_errors=True)
        if errors:
            raise errors[0]

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
