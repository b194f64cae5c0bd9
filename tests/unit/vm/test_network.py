"""The private network's plan, its QEMU arguments, and the guest command that configures a node.

The guest command is never run on the host (it changes network settings):
its syntax is checked with `sh -n`, its effects in tests/vm/test_network.py.
"""

from __future__ import annotations

import ipaddress
import shlex
import subprocess
from dataclasses import replace

import pytest

from harness.errors import ConfigError, MachineError
from harness.vm.libvirt import domain_xml
from harness.vm.network import ENV_FILE, NetworkPlan, PrivateNetwork
from harness.vm.qemu import qemu_argv
from harness.vm.spec import Accel, StreamNic


def _opts(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_nodes_get_consecutive_addresses_and_distinct_macs():
    plan = NetworkPlan.of(3)
    assert plan.names == ("n1", "n2", "n3")
    assert [str(n.address) for n in plan.nodes] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
    macs = [n.mac for n in plan.nodes]
    assert len(set(macs)) == 3
    # Locally administered unicast, and never the user-mode NIC's 52:54:00:12:34:56.
    for mac in macs:
        first = int(mac.split(":")[0], 16)
        assert first & 0x02 and not first & 0x01
        assert mac != "52:54:00:12:34:56"


def test_named_nodes_on_another_subnet():
    plan = NetworkPlan.of(["etcd-a", "etcd-b"], subnet="192.168.50.0/28")
    assert plan.node("etcd-b").address == ipaddress.IPv4Address("192.168.50.2")
    with pytest.raises(ConfigError, match="no node 'etcd-c'"):
        plan.node("etcd-c")


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        ([], "at least one node"),
        (["n1", "n1"], "must differ"),
        (["N1"], "host name"),
        (["n 1"], "host name"),
        (["a/b"], "host name"),
    ],
)
def test_bad_node_names_are_refused(nodes, message):
    with pytest.raises(ConfigError, match=message):
        NetworkPlan.of(nodes)


def test_more_nodes_than_the_subnet_holds_are_refused():
    with pytest.raises(ConfigError, match="do not fit"):
        NetworkPlan.of(7, subnet="10.1.0.0/29")  # 6 host addresses


def test_the_environment_names_the_node_and_every_node():
    env = NetworkPlan.of(3).environment("n2")
    assert env == {
        "POWERCUT_NODE": "n2",
        "POWERCUT_NODE_ADDRESS": "10.77.0.2",
        "POWERCUT_NODES": "n1=10.77.0.1,n2=10.77.0.2,n3=10.77.0.3",
    }


def test_exports_give_a_shell_the_environment():
    plan = NetworkPlan.of(2)
    out = subprocess.run(
        ["sh", "-c", plan.exports("n1") + 'echo "$POWERCUT_NODE $POWERCUT_NODES"'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == "n1 n1=10.77.0.1,n2=10.77.0.2\n"


def test_the_hosts_file_resolves_every_node_to_its_private_address():
    hosts = NetworkPlan.of(2).hosts_file()
    assert "10.77.0.1\tn1\n" in hosts and "10.77.0.2\tn2\n" in hosts
    assert hosts.startswith("127.0.0.1\tlocalhost\n")


def test_the_configure_command_is_valid_shell_and_names_mac_address_and_files():
    plan = NetworkPlan.of(3)
    command = plan.configure_command("n3")
    subprocess.run(["sh", "-n", "-c", command], check=True)
    node = plan.node("n3")
    assert node.mac in command
    assert f"ip addr add {node.address}/24" in command
    assert "hostname n3" in command
    assert ENV_FILE in command and "/etc/hosts" in command
    # No route beyond the subnet: nothing to reach but the nodes.
    assert "route" not in command and "gateway" not in command


def test_qemu_gets_one_stream_netdev_per_nic_and_an_isolated_user_net(tmp_path, bare_spec):
    nics = (StreamNic(tmp_path / "n1.sock", "52:54:00:77:00:01"),)
    spec = bare_spec
    plain = qemu_argv(spec, Accel.TCG, {22: 2222}, tmp_path)
    assert "restrict=on" not in " ".join(plain)
    assert not any(o.startswith("stream") for o in _opts(plain, "-netdev"))
    argv = qemu_argv(spec.with_nics(*nics), Accel.TCG, {22: 2222}, tmp_path)
    netdevs = _opts(argv, "-netdev")
    assert netdevs[0].startswith("user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22")
    assert netdevs[1] == f"stream,id=net1,server=off,addr.type=unix,addr.path={tmp_path}/n1.sock"
    devices = [d for d in _opts(argv, "-device") if d.startswith("virtio-net-pci")]
    assert devices[1] == "virtio-net-pci,netdev=net1,mac=52:54:00:77:00:01,romfile=,addr=0x5"


def test_the_tcg_translation_buffer_is_sized_only_when_asked_and_only_under_tcg(
    tmp_path, bare_spec
):
    spec = bare_spec
    assert _opts(qemu_argv(spec, Accel.TCG, {}, tmp_path), "-accel") == ["tcg"]
    sized = replace(spec, tcg_tb_mib=64)
    assert _opts(qemu_argv(sized, Accel.TCG, {}, tmp_path), "-accel") == ["tcg,tb-size=64"]
    assert _opts(qemu_argv(sized, Accel.KVM, {}, tmp_path), "-accel") == ["kvm"]


def test_a_socket_path_with_a_comma_is_escaped_for_qemu(tmp_path, bare_spec):
    nic = StreamNic(tmp_path / "a,b.sock", "52:54:00:77:00:01")
    argv = qemu_argv(bare_spec.with_nics(nic), Accel.TCG, {}, tmp_path)
    assert f"addr.path={tmp_path}/a,,b.sock" in _opts(argv, "-netdev")[1]


def test_at_most_three_private_nics_fit_before_the_disks(tmp_path, bare_spec):
    nics = [StreamNic(tmp_path / f"{i}.sock", f"52:54:00:77:00:0{i}") for i in range(4)]
    with pytest.raises(MachineError, match="at most 3"):
        qemu_argv(bare_spec.with_nics(*nics), Accel.TCG, {}, tmp_path)


def test_libvirt_machines_refuse_a_private_network(tmp_path, bare_spec):
    spec = bare_spec.with_nics(StreamNic(tmp_path / "n1.sock", "52:54:00:77:00:01"))
    with pytest.raises(MachineError, match="QemuMachine"):
        domain_xml(spec, "d", Accel.TCG, {22: 2222}, tmp_path / "console.log")


def test_a_node_spec_carries_its_nic_name_and_isolation(tmp_path, bare_spec):
    net = PrivateNetwork(NetworkPlan.of(2), tmp_path / "net")
    spec = net.spec_for(bare_spec, "n2")
    assert spec.name == "n2" and spec.isolated
    assert spec.nics == (StreamNic(tmp_path / "net" / "n2.sock", "52:54:00:77:00:02"),)
    # The argv QEMU gets for it names the switch's port for n2.
    argv = " ".join(shlex.quote(a) for a in qemu_argv(spec, Accel.TCG, {}, tmp_path))
    assert str(tmp_path / "net" / "n2.sock") in argv
