"""The one machine description that QEMU and libvirt machines both boot."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from harness.block.cache import CacheMode
from harness.vm import kernel as kern
from harness.vm.image import GuestImage

# The image's root disk: the last PCI slot before libvirt's network slot (0x1f),
# the same for QEMU and libvirt, so it always enumerates after the disks under test.
ROOT_DISK_SLOT = 0x1E
ROOT_DISK_SERIAL = "powercut-root"


class Accel(enum.Enum):
    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True)
class VhostUserDisk:
    """A vhost-user-blk-pci disk whose backend listens on a unix socket."""

    socket: Path
    # QEMU redials a restarted backend after this many seconds (0: never).
    reconnect: int = 1
    num_queues: int = 1


@dataclass(frozen=True)
class FileDisk:
    """QEMU's built-in virtio-blk on an image file, with a QEMU cache mode."""

    path: Path
    cache: CacheMode = CacheMode.WRITEBACK
    read_only: bool = False
    format: str = "raw"


@dataclass(frozen=True)
class BlockdevDisk:
    """QEMU's own block graph under a virtio-blk-pci device: QEMU as the system under test.

    `blockdevs` are `-blockdev` values (dotted, children before their parents),
    `node` the node the device attaches to; the cache mode is in the nodes'
    `cache.direct`/`cache.no-flush` and in the device's `write-cache`, as
    libvirt spells a `-drive cache=MODE` out.
    """

    blockdevs: tuple[str, ...]
    node: str
    write_cache: bool = True


Disk = VhostUserDisk | FileDisk | BlockdevDisk


@dataclass(frozen=True)
class StreamNic:
    """A virtio-net NIC on QEMU's `-netdev stream`, a client of a unix socket.

    The socket is a port of the private network's switch (harness/vm/switch.py);
    `mac` is how the guest tells this NIC from its user-mode one (eth0).
    """

    socket: Path
    mac: str


def needs_append(needs: Sequence[str], features: Mapping[str, str]) -> str:
    """The kernel command line's words for what the guest must have (images/rootinit reads them).

    `powercut.needs=` lists the features the build could not check against the
    kernel (the guest checks them at boot and stops if one is missing);
    `powercut.load=` lists those that are modules, which the guest loads in the
    background while it comes up, so the first mount does not wait for them.
    """
    unknown, module = kern.State.UNKNOWN.value, kern.State.MODULE.value
    unchecked = [n for n in needs if features.get(n, unknown) == unknown]
    modules = [n for n in needs if features.get(n) == module]
    words = []
    if unchecked:
        words.append(f"powercut.needs={','.join(unchecked)}")
    if modules:
        words.append(f"powercut.load={','.join(modules)}")
    return " ".join(words)


@dataclass(frozen=True)
class MachineSpec:
    """What to boot; host ports and paths of a running machine are not part of it."""

    kernel: Path
    initramfs: Path
    append: str
    ssh_key: Path
    host_public_key: str | None  # "ssh-ed25519 AAAA...", verified on connect
    cpus: int = 1
    memory_mib: int = 512
    disks: tuple[Disk, ...] = ()
    # Guest TCP ports reachable from the host; each gets a free 127.0.0.1 port at start.
    forwards: tuple[int, ...] = (22,)
    ssh_port: int = 22
    fio_server_port: int | None = None
    extra_append: str = ""
    name: str = "powercut"
    firmware: Path | None = field(default=Path("/usr/share/qemu/qboot.rom"))
    # None: "host" under KVM; "qemu64" under TCG, where the kernel then takes plain
    # code paths instead of emulated AVX ones and boots faster (measured: guest
    # ready ~15% sooner than with "max", fio IOPS no lower).
    cpu_model: str | None = None
    # The image's read-only root disk (erofs). Attached after every disk in
    # `disks`, at a fixed last PCI slot with serial "powercut-root" (the guest's
    # init finds it by serial), so the first disk under test stays /dev/vda.
    root_disk: Path | None = None
    # NICs beyond the user-mode one (which keeps the forwarded ports): a private
    # network between guests (harness/vm/network.py).
    nics: tuple[StreamNic, ...] = ()
    # User-mode networking with restrict=on: the guest reaches nothing through it
    # (not the host, not the outside), only the forwarded ports reach the guest.
    isolated: bool = False
    # TCG's translation buffer in MiB (-accel tcg,tb-size=N); None: QEMU's default,
    # which grows to hundreds of MiB of RSS in a guest that starts many programs
    # (benchmarks/cluster.py, part `memory`).
    tcg_tb_mib: int | None = None

    @classmethod
    def from_image(
        cls,
        image: GuestImage,
        *,
        disks: tuple[Disk, ...] = (),
        cpus: int = 1,
        memory_mib: int = 512,
        name: str = "powercut",
        needs: Iterable[str] = (),
    ) -> MachineSpec:
        """A machine booting `image`, with its root disk attached after `disks`.

        `needs` are kernel features the guest must have (a scenario's
        filesystem, e.g. "xfs"): one the image's kernel is known to lack is a
        ConfigError here, before boot; one that could not be checked at build
        time is checked by the guest's init, which stops with a FATAL line on
        the console naming it.
        """
        needs = tuple(needs)
        image.check_features(needs)
        return cls(
            kernel=image.kernel,
            initramfs=image.initramfs,
            append=image.cmdline,
            extra_append=needs_append(needs, image.kernel_features),
            ssh_key=image.ssh_key,
            host_public_key=image.host_public_key.read_text().strip(),
            cpus=cpus,
            memory_mib=memory_mib,
            disks=disks,
            forwards=(image.ssh_port, image.fio_server_port),
            ssh_port=image.ssh_port,
            fio_server_port=image.fio_server_port,
            name=name,
            root_disk=image.root_disk,
        )

    def with_disks(self, *disks: Disk) -> MachineSpec:
        return replace(self, disks=tuple(disks))

    def with_nics(self, *nics: StreamNic, isolated: bool = True) -> MachineSpec:
        return replace(self, nics=tuple(nics), isolated=isolated)

    @property
    def cmdline(self) -> str:
        return f"{self.append} {self.extra_append}".strip()
