"""A built guest image: what QEMU or libvirt boots, as its manifest describes it.

A guest image is three things QEMU boots:

- the kernel: Debian's (`[kernel].package`), or your own (`kernel=PATH`, a
  bzImage or vmlinux, with `modules=PATH`, its lib/modules/RELEASE tree),
  booted through its PVH entry when it has one;
- a small initramfs (static busybox, `images/init`, the handful of modules
  that reach the root disk);
- `root.img`: a read-only erofs disk holding a real Debian root made by
  mmdebstrap with the recipe's packages plus any `packages=` you ask for, each
  with its whole dependency closure, from the archive the host's apt uses
  (the host installs none of them). The guest mounts it under a RAM overlay
  and runs `images/rootinit` from it: SSH, then your commands.

They live in `<cache>/images/<hash>/`: `vmlinux` (or `bzImage`),
`initramfs.cpio`, `root.img`, `id_ed25519`(+`.pub`), `host_key.pub`,
`manifest.json`. `harness.vm.build` makes them, `harness.vm.recipe` computes
the hash; everything that boots or checks a guest needs only this model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ConfigError, ImageBuildError
from harness.vm import kernel as kern


def cache_root() -> Path:
    """`$POWERCUT_CACHE`, or `~/.cache/powercut`."""
    env = os.environ.get("POWERCUT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "powercut"


@dataclass(frozen=True)
class GuestImage:
    """A built image: everything needed to boot it with any QEMU or libvirt."""

    directory: Path
    recipe_hash: str
    kernel: Path  # what QEMU's -kernel gets: the PVH ELF, or a bzImage
    bzimage: Path  # the compressed kernel (Debian's, or yours), for comparison boots
    initramfs: Path
    ssh_key: Path  # client private key, OpenSSH format
    ssh_public_key: Path
    host_public_key: Path  # the guest's SSH host key, one "ssh-ed25519 AAAA..." line
    manifest: Path
    cmdline: str
    ssh_port: int
    fio_server_port: int
    # The read-only root disk; attached last (serial powercut-root) by MachineSpec.from_image.
    root_disk: Path | None = None
    packages: tuple[str, ...] = ()  # the packages asked for beyond the recipe's
    kernel_release: str = ""
    # Feature name → "built in" | "module" | "missing" | "unknown" (see harness.vm.kernel).
    kernel_features: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: Path) -> GuestImage:
        manifest = directory / "manifest.json"
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise ImageBuildError(
                f"cannot read image manifest {manifest}: {exc}; rebuild with `powercut image build`"
            ) from exc
        files = data.get("files", {})
        root = files.get("root_disk")
        return cls(
            directory=directory,
            recipe_hash=data["recipe_hash"],
            kernel=directory / files.get("kernel", "vmlinux"),
            bzimage=directory / files.get("bzimage", "vmlinuz"),
            initramfs=directory / "initramfs.cpio",
            ssh_key=directory / "id_ed25519",
            ssh_public_key=directory / "id_ed25519.pub",
            host_public_key=directory / "host_key.pub",
            manifest=manifest,
            cmdline=data["cmdline"],
            ssh_port=data["ssh_port"],
            fio_server_port=data["fio_server_port"],
            root_disk=directory / root if root else None,
            packages=tuple(data.get("extra_packages", ())),
            kernel_release=data.get("kernel", {}).get("release", ""),
            kernel_features=dict(data.get("kernel_features", {})),
        )

    def check_features(self, needs: Iterable[str], *, field_name: str = "kernel") -> None:
        """Raise ConfigError if this image's kernel lacks a feature in `needs` (no boot).

        Features the build could not check (a kernel without a config or a
        modules tree) pass here; the guest's init reports them at boot.
        """
        missing = [
            n for n in needs if self.kernel_features.get(n, "unknown") == kern.State.MISSING.value
        ]
        unknown_names = [n for n in needs if n not in kern.FEATURES]
        if unknown_names:
            raise ConfigError(
                f"unknown kernel feature {unknown_names[0]!r}; known: {', '.join(kern.FEATURES)}"
            )
        if missing:
            whys = ", ".join(
                f"{n} ({kern.FEATURES[n].why}: {kern.FEATURES[n].config})" for n in missing
            )
            raise ConfigError(
                f"{field_name}: the kernel of image {self.recipe_hash} ({self.kernel_release}) "
                f"lacks {whys}; build it in or as a module and pass its modules tree"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "recipe_hash": self.recipe_hash,
            "kernel": str(self.kernel),
            "bzimage": str(self.bzimage),
            "initramfs": str(self.initramfs),
            "root_disk": str(self.root_disk) if self.root_disk else None,
            "ssh_key": str(self.ssh_key),
            "ssh_public_key": str(self.ssh_public_key),
            "host_public_key": str(self.host_public_key),
            "manifest": str(self.manifest),
            "cmdline": self.cmdline,
            "ssh_port": self.ssh_port,
            "fio_server_port": self.fio_server_port,
            "packages": list(self.packages),
            "kernel_release": self.kernel_release,
            "kernel_features": self.kernel_features,
        }
