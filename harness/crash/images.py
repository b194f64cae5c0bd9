"""The guest image each cell boots, built (or found in the cache) before any cell runs.

A cell's image is the default recipe plus its scenario's `packages`, booted
on its `kernel` if it names one, and that kernel must carry what the cell
needs (virtio, and the cell's filesystem when its workload has one). Every
image a plan needs is made first, so an unknown package or a kernel without
xfs is an error before any guest boots.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from harness.scenario.cells import Cell
from harness.vm.build import ensure_image
from harness.vm.image import GuestImage
from harness.vm.kernel import BASE_NEEDS

Key = tuple[tuple[str, ...], str | None, str | None, tuple[str, ...]]
Build = Callable[..., GuestImage]


def needs_of(cell: Cell) -> tuple[str, ...]:
    """What the cell's kernel must have."""
    fs = cell.disk.filesystem
    return (*BASE_NEEDS, fs) if fs is not None else BASE_NEEDS


def key_of(cell: Cell) -> Key:
    return (cell.guest.packages, cell.guest.kernel, cell.guest.modules, needs_of(cell))


class CellImages:
    """One image per distinct (packages, kernel, modules, needs), built once."""

    def __init__(self, build: Build = ensure_image, default: GuestImage | None = None) -> None:
        self._build = build
        self._default = default  # a prebuilt image for cells that ask nothing special
        self._images: dict[Key, GuestImage] = {}

    def prepare(self, cells: Iterable[Cell], on_build: Callable[[str], None] | None = None) -> None:
        """Build every image `cells` need, before any of them boots."""
        for cell in cells:
            key = key_of(cell)
            if key not in self._images:
                if on_build is not None:
                    on_build(cell.guest.label)
                self._images[key] = self._make(cell)

    def __call__(self, cell: Cell) -> GuestImage:
        key = key_of(cell)
        if key not in self._images:
            self._images[key] = self._make(cell)
        return self._images[key]

    def _make(self, cell: Cell) -> GuestImage:
        plain = not cell.guest.packages and cell.guest.kernel is None
        if plain and self._default is not None:
            return self._default
        return self._build(
            packages=cell.guest.packages,
            kernel=Path(cell.guest.kernel) if cell.guest.kernel else None,
            modules=Path(cell.guest.modules) if cell.guest.modules else None,
            needs=needs_of(cell),
        )
