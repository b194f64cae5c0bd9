"""Three guests on a private network: they reach each other by name and nothing else.

One cluster for the module (three boots cost seconds each under TCG); the
tests run in order, the last ones cutting power to one node and to all.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from harness.vm.clock import host_tsc_khz
from harness.vm.cluster import Cluster
from harness.vm.network import ENV_FILE, NetworkPlan
from harness.vm.spec import Accel

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def cluster(guest_image: Any, powercut_accel: Any) -> Iterator[Cluster]:
    with Cluster(guest_image, NetworkPlan.of(3), accel=powercut_accel) as c:
        c.boot()
        yield c


def _reaches(cluster: Cluster, node: str, address: str) -> bool:
    return cluster[node].ssh.run(f"ping -c 1 -W 2 {address}", timeout=30).ok


def test_every_node_reaches_every_other_by_name(cluster):
    for name, machine in cluster.machines.items():
        for peer in cluster.plan.names:
            if peer != name:
                out = machine.ssh.check_output(f"ping -c 1 -W 2 {peer}")
                assert f"from {cluster.plan.node(peer).address}" in out
        assert machine.ssh.check_output("hostname").strip() == name
        env = machine.ssh.check_output(f". {ENV_FILE} && echo $POWERCUT_NODE $POWERCUT_NODES")
        assert env.split() == [name, "n1=10.77.0.1,n2=10.77.0.2,n3=10.77.0.3"]


def test_every_node_is_told_the_tsc_frequency_and_its_clock_keeps_time(cluster):
    if cluster.accel is not Accel.TCG:
        pytest.skip("kvm-clock under KVM")
    khz = host_tsc_khz()
    for machine in cluster.machines.values():
        assert f"tsc_early_khz={khz}" in machine.ssh.check_output("cat /proc/cmdline")
        kernel = machine.ssh.check_output("dmesg | grep 'tsc: Detected'")
        assert f"tsc: Detected {khz // 1000}.{khz % 1000:03d} MHz" in kernel
    # The guest's clock runs at the host's speed (it ran 7.6 times fast when left to guess).
    ssh = cluster["n1"].ssh
    t0, g0 = time.monotonic(), float(ssh.check_output("cut -d' ' -f1 /proc/uptime"))
    time.sleep(3)
    t1, g1 = time.monotonic(), float(ssh.check_output("cut -d' ' -f1 /proc/uptime"))
    assert 0.7 < (g1 - g0) / (t1 - t0) < 1.3


def test_nothing_but_the_nodes_is_reachable(cluster):
    # An address on the subnet that no node has: no answer.
    assert not _reaches(cluster, "n1", "10.77.0.9")
    # The host, through the user-mode NIC (10.0.2.2 is the host's 127.0.0.1 there):
    # a listener the test opens on 127.0.0.1 sees no connection from an isolated guest.
    accepted: list[object] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(8)
        port = listener.getsockname()[1]

        def accept() -> None:
            with contextlib.suppress(OSError):  # the timeout: nobody came
                accepted.append(listener.accept()[0])

        waiter = threading.Thread(target=accept)
        waiter.start()
        result = cluster["n2"].ssh.run(
            f"timeout 5 bash -c 'echo hi > /dev/tcp/10.0.2.2/{port}'", timeout=30
        )
        waiter.join()
    for conn in accepted:
        conn.close()  # type: ignore[attr-defined]
    assert not result.ok and not accepted
    # No route but the subnet's on the private NIC; the switch saw only the nodes' MACs.
    routes = cluster["n3"].ssh.check_output("ip route")
    assert "default via 10.0.2.2 dev eth0" in routes and "10.77.0.0/24 dev eth1" in routes
    ports = cluster.network.stats()["ports"]
    for node in cluster.plan.nodes:
        assert ports[node.name]["macs"] == [node.mac]


def test_a_node_cut_and_rebooted_is_back_on_the_network(cluster):
    cluster.power_cut(["n2"])
    assert not cluster["n2"].running
    assert cluster["n1"].running and cluster["n3"].running
    assert not _reaches(cluster, "n1", "n2")
    cluster.boot(["n2"])
    assert _reaches(cluster, "n1", "n2") and _reaches(cluster, "n2", "n3")
    port = cluster.network.stats()["ports"]["n2"]
    assert (port["connects"], port["disconnects"], port["connected"]) == (2, 1, True)


def test_a_rack_cut_and_reboot_of_every_node(cluster):
    cluster.power_cut()
    assert not any(m.running for m in cluster.machines.values())
    # Every SIGKILL went out before the first reap.
    assert cluster.kill_skew is not None and cluster.kill_skew < 0.05
    assert not any(p["connected"] for p in cluster.network.stats()["ports"].values())
    cluster.boot()
    for name in ("n1", "n2", "n3"):
        assert all(_reaches(cluster, name, peer) for peer in cluster.plan.names if peer != name)
