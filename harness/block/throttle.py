"""I/O throttling as QEMU's `util/throttle.c` and `block/throttle-groups.c` do it.

Each limit is a leaky bucket: a request pours its bytes (or its operation
count) into the bucket and the bucket leaks at the average rate. A request
may start while the bucket holds less than its size: `avg / 10` without a
burst limit (so short bursts do not stall every other request), or
`max * max-length` with one, in which case a second, small bucket also keeps
the burst itself at `max` per second. Backends in one throttle group share the
buckets; waiting requests are served in turn, one backend after another, as
QEMU's round robin does.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from harness.block.options import parse_size
from harness.errors import ConfigError

NS = 1_000_000_000
_MAX_LIMIT = 1_000_000_000_000_000  # THROTTLE_VALUE_MAX
_MAX_BURST_LENGTH = 86400  # seconds, as QEMU

# The option names of QEMU's -drive / throttle-group, in the `throttling.` namespace.
BUCKETS = ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write")
LIMIT_KEYS = (
    tuple(BUCKETS)
    + tuple(f"{b}-max" for b in BUCKETS)
    + tuple(f"{b}-max-length" for b in BUCKETS)
    + ("iops-size",)
)


@dataclass
class LeakyBucket:
    avg: float = 0.0  # units per second; 0 = no limit
    max: float = 0.0  # burst rate; 0 = no burst beyond avg / 10
    burst_length: int = 1  # seconds the burst may last
    level: float = 0.0
    burst_level: float = 0.0

    def leak(self, delta_ns: int) -> None:
        self.level = max(self.level - self.avg * delta_ns / NS, 0.0)
        if self.burst_length > 1:
            self.burst_level = max(self.burst_level - self.max * delta_ns / NS, 0.0)

    def wait_ns(self) -> int:
        """How long until a request may start (0: now)."""
        if not self.avg:
            return 0
        if not self.max:
            bucket_size = self.avg / 10
            burst_bucket_size = 0.0
        else:
            bucket_size = self.max * self.burst_length
            burst_bucket_size = self.max / 10
        extra = self.level - bucket_size
        if extra > 0:
            return int(extra * NS / self.avg) + 1
        if self.burst_length > 1:
            extra = self.burst_level - burst_bucket_size
            if extra > 0:
                return int(extra * NS / self.max) + 1
        return 0

    def account(self, units: float) -> None:
        self.level += units
        if self.burst_length > 1:
            self.burst_level += units


@dataclass(frozen=True)
class ThrottleLimits:
    """A validated set of limits (as `throttle_is_valid` accepts them)."""

    values: tuple[tuple[str, float], ...] = ()  # (LIMIT_KEY, value) for keys that were set

    def get(self, key: str) -> float:
        return dict(self.values).get(key, 0.0)

    @property
    def enabled(self) -> bool:
        return any(self.get(b) for b in BUCKETS)

    @classmethod
    def parse(cls, options: Mapping[str, Any], prefix: str = "throttling.") -> ThrottleLimits:
        """Limits from `throttling.*` keys (already stripped of other options)."""
        values: dict[str, float] = {}
        for key, raw in options.items():
            name = key[len(prefix) :] if key.startswith(prefix) else key
            if name not in LIMIT_KEYS:
                raise ConfigError(
                    f"unknown throttling option {key!r}; valid options: "
                    + ", ".join(prefix + k for k in LIMIT_KEYS)
                )
            try:
                if (name.startswith("bps") and not name.endswith("-length")) or name == "iops-size":
                    value = float(parse_size(raw, prefix + name))
                else:
                    value = float(raw)
            except (TypeError, ValueError):
                raise ConfigError(f"{prefix}{name}: {raw!r} is not a number") from None
            values[name] = value
        limits = cls(tuple(sorted(values.items())))
        limits.validate(prefix)
        return limits

    def validate(self, prefix: str = "throttling.") -> None:
        for kind in ("bps", "iops"):
            total = any(self.get(f"{kind}-total{s}") for s in ("", "-max"))
            split = any(self.get(f"{kind}-{d}{s}") for d in ("read", "write") for s in ("", "-max"))
            if total and split:
                raise ConfigError(
                    f"{prefix}{kind}-total and {prefix}{kind}-read/-write cannot be used "
                    "at the same time; give either the total or the per-direction limits"
                )
        for key, value in self.values:
            if value < 0 or value > _MAX_LIMIT:
                raise ConfigError(
                    f"{prefix}{key} must be between 0 and {_MAX_LIMIT}, got {value:g}"
                )
        for b in BUCKETS:
            avg, mx = self.get(b), self.get(f"{b}-max")
            length = self.get(f"{b}-max-length") or 1
            if mx and not avg:
                raise ConfigError(f"{prefix}{b}-max needs {prefix}{b} to be set too")
            if mx and mx < avg:
                raise ConfigError(
                    f"{prefix}{b}-max ({mx:g}) cannot be lower than {prefix}{b} ({avg:g})"
                )
            if length != int(length) or not 1 <= length <= _MAX_BURST_LENGTH:
                raise ConfigError(
                    f"{prefix}{b}-max-length must be a whole number of seconds "
                    f"between 1 and {_MAX_BURST_LENGTH}"
                )
            if length > 1 and not mx:
                raise ConfigError(f"{prefix}{b}-max-length needs {prefix}{b}-max to be set")

    def to_dict(self) -> dict[str, float]:
        return dict(self.values)


@dataclass
class ThrottleState:
    limits: ThrottleLimits
    buckets: dict[str, LeakyBucket] = field(default_factory=dict)
    last_leak_ns: int = field(default_factory=time.monotonic_ns)

    def __post_init__(self) -> None:
        self.configure(self.limits)

    def configure(self, limits: ThrottleLimits) -> None:
        self.limits = limits
        self.buckets = {
            b: LeakyBucket(
                avg=limits.get(b),
                max=limits.get(f"{b}-max"),
                burst_length=int(limits.get(f"{b}-max-length") or 1),
            )
            for b in BUCKETS
        }

    def leak(self, now_ns: int) -> None:
        delta = now_ns - self.last_leak_ns
        if delta <= 0:
            return
        self.last_leak_ns = now_ns
        for bucket in self.buckets.values():
            bucket.leak(delta)

    def wait_ns(self, is_write: bool) -> int:
        direction = "write" if is_write else "read"
        return max(
            self.buckets[f"{kind}-{d}"].wait_ns()
            for kind in ("bps", "iops")
            for d in ("total", direction)
        )

    def account(self, is_write: bool, size: int) -> None:
        direction = "write" if is_write else "read"
        op_size = self.limits.get("iops-size")
        units = size / op_size if op_size and size > op_size else 1.0
        for d in ("total", direction):
            self.buckets[f"bps-{d}"].account(size)
            self.buckets[f"iops-{d}"].account(units)


class ThrottleGroup:
    """Limits shared by every member; requests wait their turn, member by member."""

    def __init__(self, name: str, limits: ThrottleLimits) -> None:
        self.name = name
        self.state = ThrottleState(limits)
        self._cond = threading.Condition()
        # Per direction: member -> its waiting requests, in arrival order.
        self._waiting: tuple[dict[object, deque[object]], dict[object, deque[object]]] = ({}, {})
        self._last_served: list[object | None] = [None, None]
        self.members: list[object] = []

    @property
    def limits(self) -> ThrottleLimits:
        return self.state.limits

    def configure(self, limits: ThrottleLimits) -> None:
        with self._cond:
            self.state.configure(limits)
            self._cond.notify_all()

    def join(self, member: object) -> None:
        with self._cond:
            self.members.append(member)

    def leave(self, member: object) -> bool:
        """Remove a member; True when the group is now empty."""
        with self._cond:
            if member in self.members:
                self.members.remove(member)
            return not self.members

    def _head(self, is_write: bool) -> object | None:
        """The request whose turn it is: round robin over members with waiters."""
        waiting = self._waiting[is_write]
        order = [m for m in self.members if waiting.get(m)]
        if not order:
            return None
        last = self._last_served[is_write]
        if last in order:
            idx = (order.index(last) + 1) % len(order)
        elif last in self.members:
            pos = self.members.index(last)
            after = [m for m in order if self.members.index(m) > pos]
            idx = order.index(after[0]) if after else 0
        else:
            idx = 0
        return waiting[order[idx]][0]

    def intercept(self, member: object, is_write: bool, size: int) -> None:
        """Block until the limits let this request start, then account for it."""
        if not self.state.limits.enabled:
            return
        ticket = object()
        with self._cond:
            waiting = self._waiting[is_write]
            queue = waiting.setdefault(member, deque())
            queue.append(ticket)
            try:
                while True:
                    if self._head(is_write) is ticket:
                        self.state.leak(time.monotonic_ns())
                        wait = self.state.wait_ns(is_write)
                        if wait == 0:
                            self.state.account(is_write, size)
                            self._last_served[is_write] = member
                            return
                        self._cond.wait(wait / NS)
                    else:
                        self._cond.wait()
            finally:
                queue.remove(ticket)
                if not queue:
                    del waiting[member]
                self._cond.notify_all()


_groups: dict[str, ThrottleGroup] = {}
_groups_lock = threading.Lock()


def join_group(name: str, member: object, limits: ThrottleLimits | None) -> ThrottleGroup:
    """Join (creating if needed) the group `name`; given limits replace the group's, as in QEMU."""
    with _groups_lock:
        group = _groups.get(name)
        if group is None:
            group = _groups[name] = ThrottleGroup(name, limits or ThrottleLimits())
        elif limits is not None and limits.enabled:
            group.configure(limits)
        group.join(member)
        return group


def leave_group(group: ThrottleGroup, member: object) -> None:
    with _groups_lock:
        if group.leave(member) and _groups.get(group.name) is group:
            del _groups[group.name]


def create_group(name: str, limits: ThrottleLimits | Mapping[str, Any]) -> ThrottleGroup:
    """Like `-object throttle-group,id=NAME,...`: a group members can later name.

    The group lives until `delete_group`, even with no members.
    """
    parsed = limits if isinstance(limits, ThrottleLimits) else ThrottleLimits.parse(limits, "")
    with _groups_lock:
        if name in _groups:
            raise ConfigError(f"throttle group {name!r} already exists; pick another id")
        group = _groups[name] = ThrottleGroup(name, parsed)
        group.members.append(_OBJECT_REF)
        return group


def delete_group(name: str) -> None:
    with _groups_lock:
        group = _groups.get(name)
        if group is not None:
            group.leave(_OBJECT_REF)
            if not group.members:
                del _groups[name]


def get_group(name: str) -> ThrottleGroup | None:
    with _groups_lock:
        return _groups.get(name)


_OBJECT_REF = object()  # the reference an `-object throttle-group` holds
