"""The driver registry: `driver=NAME` in a blockdev description picks a class here.

Each driver is one module in `harness/block/drivers/` that decorates its
class with `@register_driver`; they are imported on first lookup so adding a
driver never touches a shared file.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TypeVar

from harness.block.node import BlockNode
from harness.errors import ConfigError

_DRIVERS: dict[str, type[BlockNode]] = {}
_loaded = False

N = TypeVar("N", bound=type[BlockNode])


def register_driver(cls: N) -> N:
    if not cls.driver:
        raise TypeError(f"{cls.__name__} has no driver name")
    _DRIVERS[cls.driver] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    import harness.block.drivers as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")
    _loaded = True


def driver_class(name: str) -> type[BlockNode]:
    _load_all()
    try:
        return _DRIVERS[name]
    except KeyError:
        raise ConfigError(
            f"unknown block driver {name!r}; valid drivers: {', '.join(sorted(_DRIVERS))}"
        ) from None


def driver_names() -> list[str]:
    _load_all()
    return sorted(_DRIVERS)
