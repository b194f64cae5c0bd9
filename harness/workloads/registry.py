"""Every workload kind, by the name a scenario gives it (`kind = "..."`).

Adding a workload is one module with a `Workload` subclass and one line in
`BUILTIN` below; a user's own workload (or a test's) calls `register`.
"""

from __future__ import annotations

from harness.errors import ConfigError
from harness.workloads.ackrecords import AckRecords
from harness.workloads.base import Workload
from harness.workloads.command import Command
from harness.workloads.fio_verify import FioVerify
from harness.workloads.fsmeta import FsMeta

BUILTIN: tuple[type[Workload], ...] = (FioVerify, AckRecords, FsMeta, Command)

_KINDS: dict[str, type[Workload]] = {cls.kind: cls for cls in BUILTIN}
# Names a kind had before; scenarios may still use them.
ALIASES = {"ext4-metadata": FsMeta.kind}


def register(cls: type[Workload]) -> type[Workload]:
    """Make `cls` available to scenarios as `kind = cls.kind` (usable as a class decorator)."""
    existing = _KINDS.get(cls.kind)
    if existing is not None and existing is not cls:
        raise ConfigError(f"workload kind {cls.kind!r} is already {existing.__qualname__}")
    _KINDS[cls.kind] = cls
    return cls


def unregister(kind: str) -> None:
    """Forget a registered kind (tests that register their own clean up with this)."""
    if any(cls.kind == kind for cls in BUILTIN):
        raise ConfigError(f"workload kind {kind!r} is built in")
    _KINDS.pop(kind, None)


def workload_class(kind: str) -> type[Workload] | None:
    return _KINDS.get(ALIASES.get(kind, kind))


def kinds() -> list[str]:
    return list(_KINDS)
