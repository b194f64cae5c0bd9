"""The guest recipe and the image's cache key: every input, resolved and hashed.

An image is cached in `<cache>/images/<hash>/` under a key that covers the
recipe files (recipe.toml, init, rootinit, guest-files/**, guest-src/**),
the builder version, the kernel (Debian's package version, or the file's
digest and the modules tree's names, sizes and times), and the version of
every package in the root as apt resolves it. So a warm lookup needs no
download and no build, and anything that changes the output changes the
key. The key names every cached image on every machine: a change to how it
is computed rebuilds them all (tests/unit/vm/test_packages_and_kernel.py
pins it for a fixed recipe).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import ConfigError, ImageBuildError
from harness.vm import packages as pkgs
from harness.vm.image import cache_root
from harness.vm.tools import run

# Bump when the builder's output changes for the same inputs.
BUILDER_VERSION = 4

# The recipe, init scripts and guest sources: package data (harness/data/images, in
# the repository a link to the top-level images/), so an installed powercut builds
# guests too. The one place that says where they live.
REPO_IMAGES = Path(__file__).parents[1] / "data" / "images"


def recipe_dir() -> Path:
    """Where the guest recipe (recipe.toml, init, rootinit, guest-files, guest-src) lives."""
    return REPO_IMAGES


@dataclass(frozen=True)
class Recipe:
    """recipe.toml as read, and the directory its init scripts and guest files come from."""

    directory: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, directory: Path | None = None) -> Recipe:
        directory = directory or recipe_dir()
        path = directory / "recipe.toml"
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ImageBuildError(f"cannot read the image recipe {path}: {exc}") from exc
        return cls(directory, data)

    @property
    def root(self) -> dict[str, Any]:
        return dict(self.data.get("root", {}))

    @property
    def base_packages(self) -> tuple[str, ...]:
        return pkgs.normalize(self.root.get("packages", ()), "[root].packages in recipe.toml")

    def source_files(self) -> list[tuple[str, Path]]:
        """(name in the hash, path) of every recipe input file, sorted."""
        files = [("recipe.toml", self.directory / "recipe.toml")]
        for name in ("init", "rootinit"):
            files.append((name, self.directory / name))
        for sub in ("guest-files", "guest-src"):
            root = self.directory / sub
            if root.is_dir():
                for p in sorted(root.rglob("*")):
                    if p.is_file() or p.is_symlink():
                        files.append((f"{sub}/{p.relative_to(root)}", p))
        return files


def _sources_digest(recipe: Recipe) -> str:
    h = hashlib.sha256()
    for name, path in recipe.source_files():
        try:
            mode = path.lstat().st_mode
            body = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
        except OSError as exc:
            raise ImageBuildError(f"cannot read recipe file {path}: {exc}") from exc
        h.update(f"source {name} {mode:o} {len(body)}\n".encode())
        h.update(body)
    return h.hexdigest()


def resolve_kernel_package(meta: str) -> tuple[str, str]:
    """(package, version) of the kernel the metapackage `meta` depends on."""
    out = run(["apt-cache", "depends", "--important", meta], f"resolving the kernel package {meta}")
    pkg = next((m.group(1) for m in re.finditer(r"Depends: (linux-image-\S+)", out)), None)
    if pkg is None:
        raise ImageBuildError(f"{meta} depends on no linux-image package; run apt-get update")
    return pkg, candidate_version(pkg)


def candidate_version(pkg: str) -> str:
    """The version `apt-get download pkg` would fetch."""
    show = run(["apt-cache", "show", "--no-all-versions", pkg], f"reading {pkg}'s version")
    m = re.search(r"^Version: (\S+)", show, re.M)
    if m is None:
        raise ImageBuildError(f"apt-cache shows no version for {pkg}; run apt-get update")
    return m.group(1)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:24]


def _tree_digest(path: Path) -> str:
    """Names, sizes and times of every file under `path` (a modules tree)."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        with contextlib.suppress(OSError):
            st = p.lstat()
            h.update(
                f"{p.relative_to(path)} {st.st_mode:o} {st.st_size} {st.st_mtime_ns}\n".encode()
            )
    return h.hexdigest()[:24]


@dataclass(frozen=True)
class Plan:
    """Every input of one image, resolved, and the key they hash to (`recipe_hash`)."""

    recipe: Recipe
    extra: tuple[str, ...]  # packages beyond the recipe's
    resolution: pkgs.Resolution
    kernel_package: str | None  # Debian's kernel, when no kernel file is given
    kernel_version: str | None
    kernel_file: Path | None
    modules_dir: Path | None
    recipe_hash: str


def _kernel_key(
    recipe: Recipe, kernel: Path | None, modules: Path | None, memo: Path
) -> tuple[str, str | None, str | None]:
    """(hash input, Debian kernel package, version) for the kernel part of the image."""
    if kernel is None:
        if modules is not None:
            raise ConfigError("modules: a modules tree needs its kernel (kernel = PATH) too")
        meta = recipe.data["kernel"]["package"]
        key = f"{pkgs.lists_digest()} {meta}"
        try:
            d = json.loads(memo.read_text())
            if d["key"] == key:
                return f"deb {d['package']} {d['version']}", d["package"], d["version"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        kpkg, kver = resolve_kernel_package(meta)
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "package": kpkg, "version": kver}))
        os.replace(tmp, memo)
        return f"deb {kpkg} {kver}", kpkg, kver
    if not kernel.is_file():
        raise ConfigError(f"kernel: no kernel file {kernel}")
    text = f"file {_file_digest(kernel)}"
    if modules is not None:
        if not modules.is_dir():
            raise ConfigError(
                f"modules: {modules} is not a directory; give the kernel's lib/modules/RELEASE tree"
            )
        text += f" modules {_tree_digest(modules)}"
    return text, None, None


def plan(
    recipe: Recipe,
    cache: Path | None = None,
    *,
    packages: Iterable[str] = (),
    kernel: Path | None = None,
    modules: Path | None = None,
) -> Plan:
    """Resolve every input and hash them; raises ConfigError for an unknown package."""
    cache = cache or cache_root()
    extra = pkgs.normalize(packages, "packages")
    root = recipe.root
    wanted = tuple(sorted({*recipe.base_packages, *extra}))
    resolution = pkgs.resolve(wanted, memo_dir=cache / "plans", field="packages")
    kernel = kernel.resolve() if kernel is not None else None
    modules = modules.resolve() if modules is not None else None
    kernel_text, kpkg, kver = _kernel_key(recipe, kernel, modules, cache / "plans" / "kernel.json")
    h = hashlib.sha256()
    h.update(f"builder {BUILDER_VERSION}\n{kernel_text}\n".encode())
    h.update(f"root {root.get('suite')} {root.get('variant')} {root.get('format')}\n".encode())
    h.update(f"packages {resolution.digest()}\n".encode())
    h.update(_sources_digest(recipe).encode())
    return Plan(recipe, extra, resolution, kpkg, kver, kernel, modules, h.hexdigest()[:16])
