"""How a MachineSpec becomes a QEMU command line and libvirt XML; backends; accel choice."""

from __future__ import annotations

import shlex
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from harness.block.cache import CacheMode
from harness.cli import build_parser
from harness.commands import vm as vm_command
from harness.errors import ConfigError
from harness.vm.accel import choose_accel, parse_accel
from harness.vm.backends import Backend, ProcessBackend, make_backend
from harness.vm.libvirt import QEMU_NS, domain_xml
from harness.vm.machine import free_port
from harness.vm.qemu import qemu_argv
from harness.vm.spec import Accel, FileDisk, MachineSpec, VhostUserDisk


def _spec(*disks) -> MachineSpec:
    return MachineSpec(
        kernel=Path("/k/vmlinux"),
        initramfs=Path("/k/initrd"),
        append="console=ttyS0 quiet",
        ssh_key=Path("/k/id"),
        host_public_key=None,
        disks=tuple(disks),
        forwards=(22, 8765),
        memory_mib=384,
        cpus=2,
    )


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_qemu_memory_is_shared_memfd_for_vhost_user(tmp_path):
    argv = qemu_argv(_spec(), Accel.TCG, {22: 2222, 8765: 3333}, tmp_path)
    assert "memory-backend-memfd,id=mem,size=384M,share=on" in _opt(argv, "-object")
    assert "pc,memory-backend=mem" in _opt(argv, "-M")
    assert _opt(argv, "-accel") == ["tcg"] and _opt(argv, "-smp") == ["2"]


def test_qemu_forwards_each_guest_port_on_localhost_only(tmp_path):
    argv = qemu_argv(_spec(), Accel.TCG, {22: 2222, 8765: 3333}, tmp_path)
    (netdev,) = _opt(argv, "-netdev")
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in netdev
    assert "hostfwd=tcp:127.0.0.1:3333-:8765" in netdev


def test_qemu_disks_keep_spec_order_cache_and_reconnect(tmp_path):
    spec = _spec(
        FileDisk(Path("/d/a.img"), CacheMode.DIRECTSYNC, read_only=True),
        VhostUserDisk(Path("/s/b.sock"), reconnect=3, num_queues=2),
    )
    argv = qemu_argv(spec, Accel.KVM, {22: 1}, tmp_path)
    (drive,) = _opt(argv, "-drive")
    assert "file=/d/a.img" in drive and "cache=directsync" in drive and "readonly=on" in drive
    assert "socket,id=vu1,path=/s/b.sock,reconnect=3" in _opt(argv, "-chardev")
    devices = _opt(argv, "-device")
    blk = [d for d in devices if d.startswith(("virtio-blk", "vhost-user-blk"))]
    assert blk[0].startswith("virtio-blk-pci,drive=disk0") and blk[0].endswith("addr=0x8")
    assert "num-queues=2" in blk[1] and blk[1].endswith("addr=0x9")
    assert _opt(argv, "-cpu") == ["host"]


def test_powercut_vm_accepts_qemu_cache_names(tmp_path):
    def served(cache: str) -> object:
        argv = ["vm", "--disk", str(tmp_path / "d.img"), "--cache", cache]
        return vm_command.disk_backend(build_parser(argv).parse_args(argv), tmp_path).start()

    assert served("off") == FileDisk(tmp_path / "d.img", CacheMode.NONE)
    with pytest.raises(ConfigError):
        served("fast")


def test_libvirt_xml_describes_vhostuser_disks_memfd_and_hostfwd(tmp_path):
    spec = _spec(
        VhostUserDisk(Path("/s/a.sock"), reconnect=2, num_queues=2),
        FileDisk(Path("/d/b.img"), CacheMode.NONE),
    )
    root = ET.fromstring(domain_xml(spec, "pc-test", Accel.TCG, {22: 2222}, tmp_path / "c.log"))
    assert root.get("type") == "qemu"
    assert root.find("memoryBacking/source").get("type") == "memfd"
    assert root.find("memoryBacking/access").get("mode") == "shared"
    assert root.find("features/acpi") is not None
    disks = root.findall("devices/disk")
    assert [d.get("type") for d in disks] == ["vhostuser", "file"]
    assert disks[0].find("source").get("path") == "/s/a.sock"
    assert disks[0].find("source/reconnect").get("timeout") == "2"
    assert disks[0].find("driver").get("queues") == "2"
    assert disks[1].find("driver").get("cache") == "none"
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb"]
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    assert any("hostfwd=tcp:127.0.0.1:2222-:22" in a for a in args)


def test_libvirt_uses_a_kvm_domain_only_for_kvm(tmp_path):
    root = ET.fromstring(domain_xml(_spec(), "x", Accel.KVM, {}, tmp_path / "c"))
    assert root.get("type") == "kvm"


def _served(kind: Backend, tmp_path: Path, **settings) -> ProcessBackend:
    backend = make_backend(kind, tmp_path / "d.img", tmp_path, **settings)
    assert isinstance(backend, ProcessBackend)
    return backend


def test_qemu_storage_daemon_export_follows_the_cache_mode(tmp_path):
    qsd = _served(Backend.QSD, tmp_path, cache=CacheMode.DIRECTSYNC, num_queues=2)
    words = " ".join(qsd.argv())
    assert words.startswith("qemu-storage-daemon --blockdev driver=file,")
    assert "cache.direct=on" in words and "cache.no-flush=off" in words
    assert "writethrough=on" in words and "num-queues=2" in words
    assert f"addr.path={tmp_path / 'disk0.sock'}" in words
    unsafe = " ".join(_served(Backend.QSD, tmp_path, cache=CacheMode.UNSAFE).argv())
    assert "cache.no-flush=on" in unsafe and "writethrough=off" in unsafe
    assert qsd.logs() == {"disk0 qemu-storage-daemon": tmp_path / "disk0-qemu-storage-daemon.log"}


def test_powercut_backend_runs_powercut_serve(tmp_path):
    argv = _served(Backend.POWERCUT, tmp_path, cache=CacheMode.NONE).argv()
    assert argv[1:5] == ["-m", "harness.cli", "serve", str(tmp_path / "d.img")]
    assert shlex.join(argv).endswith(f"--socket {tmp_path / 'disk0.sock'} --queues 1 --cache none")


def test_unknown_backend_names_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="qemu, qemu-storage-daemon, builtin"):
        make_backend("nbd", tmp_path / "d.img", tmp_path)
    assert make_backend(Backend.QEMU, tmp_path / "d.img", tmp_path).start() == FileDisk(
        tmp_path / "d.img"
    )


def test_builtin_is_another_name_for_qemus_own_block_layer(tmp_path):
    assert Backend.parse("builtin") is Backend.QEMU is Backend.parse("qemu")
    disk = make_backend("builtin", tmp_path / "d.img", tmp_path, cache=CacheMode.NONE).start()
    assert disk == FileDisk(tmp_path / "d.img", CacheMode.NONE)


def test_accel_request_and_environment_override_the_probe(monkeypatch, tmp_path):
    kernel = tmp_path / "no-kernel"
    assert choose_accel(parse_accel("tcg"), kernel, cache=tmp_path) is Accel.TCG
    monkeypatch.setenv("POWERCUT_ACCEL", "kvm")
    assert choose_accel(parse_accel("auto"), kernel, cache=tmp_path) is Accel.KVM
    with pytest.raises(ConfigError, match="kvm, tcg or auto"):
        parse_accel("hvf")
    monkeypatch.setenv("POWERCUT_ACCEL", "hvf")
    with pytest.raises(ConfigError, match="kvm, tcg or auto"):
        choose_accel(None, kernel, cache=tmp_path)


def test_accel_verdict_is_cached_per_host_boot(monkeypatch, tmp_path):
    monkeypatch.delenv("POWERCUT_ACCEL", raising=False)
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    (tmp_path / "accel.json").write_text(f'{{"boot_id": "{boot_id}", "accel": "kvm"}}')
    assert choose_accel(None, tmp_path / "no-kernel", cache=tmp_path) is Accel.KVM


def test_free_port_is_bindable_on_localhost():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_tcg_guests_default_to_qemu64_and_a_model_can_be_chosen(tmp_path):
    import dataclasses

    assert _opt(qemu_argv(_spec(), Accel.TCG, {}, tmp_path), "-cpu") == ["qemu64"]
    spec = dataclasses.replace(_spec(), cpu_model="max")
    assert _opt(qemu_argv(spec, Accel.TCG, {}, tmp_path), "-cpu") == ["max"]
    root = ET.fromstring(domain_xml(spec, "x", Accel.TCG, {}, tmp_path / "c"))
    assert root.find("cpu/model").text == "max"
    assert (
        ET.fromstring(domain_xml(_spec(), "x", Accel.TCG, {}, tmp_path / "c")).find("cpu") is None
    )


def test_the_root_disk_comes_last_read_only_with_its_serial_in_qemu_and_libvirt(tmp_path):
    import dataclasses

    spec = dataclasses.replace(
        _spec(FileDisk(Path("/d/a.img")), VhostUserDisk(Path("/s/b.sock"))),
        root_disk=Path("/img/root.img"),
    )
    argv = qemu_argv(spec, Accel.TCG, {22: 1}, tmp_path)
    drives = _opt(argv, "-drive")
    assert drives[-1].startswith("file=/img/root.img,") and "readonly=on" in drives[-1]
    blk = [d for d in _opt(argv, "-device") if d.startswith(("virtio-blk", "vhost-user-blk"))]
    assert blk[0].endswith("addr=0x8") and blk[1].endswith("addr=0x9")
    assert blk[-1] == "virtio-blk-pci,drive=rootdisk,serial=powercut-root,addr=0x1e"

    root = ET.fromstring(domain_xml(spec, "x", Accel.TCG, {22: 1}, tmp_path / "c"))
    disks = root.findall("devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb", "vdc"]
    last = disks[-1]
    assert last.find("source").get("file") == "/img/root.img"
    assert last.find("readonly") is not None and last.find("serial").text == "powercut-root"
    assert last.find("address").get("slot") == "0x1e"


def _image(tmp_path, **fields):
    """A built image's record (nothing on disk but its host key), `fields` over the defaults."""
    from harness.vm.image import GuestImage

    key = tmp_path / "host_key.pub"
    key.write_text("ssh-ed25519 AAAA\n")
    return GuestImage(
        directory=tmp_path,
        recipe_hash="h",
        kernel=tmp_path / "vmlinux",
        bzimage=tmp_path / "bzImage",
        initramfs=tmp_path / "initramfs.cpio",
        ssh_key=tmp_path / "id",
        ssh_public_key=tmp_path / "id.pub",
        host_public_key=key,
        manifest=tmp_path / "manifest.json",
        cmdline="console=ttyS0",
        ssh_port=22,
        fio_server_port=8765,
        **fields,
    )


def test_a_spec_from_an_image_attaches_its_root_disk(tmp_path):

    image = _image(tmp_path, root_disk=tmp_path / "root.img")
    assert MachineSpec.from_image(image).root_disk == tmp_path / "root.img"
    assert MachineSpec.from_image(image).extra_append == ""


def test_needs_refuse_a_known_missing_feature_and_send_unknown_ones_to_init(tmp_path):
    import dataclasses

    from harness.errors import ConfigError

    image = _image(
        tmp_path, kernel_features={"ext4": "built in", "xfs": "module", "f2fs": "missing"}
    )
    # Built in: nothing to say. A module: loaded in the background while the guest comes up.
    assert MachineSpec.from_image(image, needs=("ext4",)).extra_append == ""
    assert MachineSpec.from_image(image, needs=("ext4", "xfs")).extra_append == "powercut.load=xfs"
    with pytest.raises(ConfigError, match="lacks f2fs"):
        MachineSpec.from_image(image, needs=("f2fs",))
    unknown = dataclasses.replace(image, kernel_features={})
    spec = MachineSpec.from_image(unknown, needs=("btrfs", "xfs"))
    assert spec.cmdline == "console=ttyS0 powercut.needs=btrfs,xfs"


@pytest.mark.parametrize(("filesystem", "expected"), [("xfs", "powercut.load=xfs"), (None, "")])
def test_a_cell_guest_is_told_the_filesystem_it_will_mount(tmp_path, filesystem, expected):
    # The session asks the image for its disk's filesystem, so a module one loads while the
    # guest boots (and a kernel that cannot have it is refused before the boot).
    from harness.crash.session import DiskSession
    from harness.scenario.model import DiskSpec
    from harness.vm.spec import FileDisk

    session = object.__new__(DiskSession)
    session.guest_image = _image(tmp_path, kernel_features={"ext4": "built in", "xfs": "module"})
    session.spec = DiskSpec(filesystem=filesystem)
    session.rundir = tmp_path
    session._start_machine(FileDisk(tmp_path / "disk.img"), None, 512, "cell")
    assert session.machine.spec.extra_append == expected
