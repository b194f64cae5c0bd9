"""`blkdebug`: error and delay injection by rule, and a disk that lies about flushes.

A filter node. Each request is matched against the rules in order; a rule
that fires may delay it, fail it with an errno, or — for flushes —
acknowledge it without passing it down (`lying-flush`: the broken disk a
negative control must catch). Rules change at run time through `add_rule`,
`remove_rule`, `set_rules` and `clear_rules` (the `powercut serve` control
socket calls these).

Options: `rules` (text, below) and/or `config` (a JSON file: a list of
objects with the `Rule` field names). The text form is rules separated by
`;`, each an operation followed by `:`-separated settings:

    write:errno=EIO:sector=0-127:every=3      fail every 3rd write touching sectors 0..127
    flush:lying-flush                         acknowledge flushes, never pass them down
    read:errno=ENOSPC:once                    fail the next read, once
    any:delay=20:probability=0.1:seed=7       delay 10% of requests by 20 ms (seeded)

Operations: read, write, flush, discard, write-zeroes, any. Sectors are 512
bytes, ranges inclusive. Inside a `--blockdev` string write `;` as is and
`,` as `,,`.
"""

from __future__ import annotations

import enum
import errno as errno_mod
import json
import logging
import random
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from harness.block.node import BlockNode, IOVec, OpenFlags, Option, RequestFlags, iov_length
from harness.block.registry import register_driver
from harness.errors import BlockError, ConfigError

log = logging.getLogger(__name__)
SECTOR = 512


class BlkOp(enum.Enum):
    READ = "read"
    WRITE = "write"
    FLUSH = "flush"
    DISCARD = "discard"
    WRITE_ZEROES = "write-zeroes"
    ANY = "any"


class Action(enum.Enum):
    ERROR = "error"
    DELAY = "delay"  # delay only, then pass the request on
    LYING_FLUSH = "lying-flush"


@dataclass(frozen=True)
class Rule:
    op: BlkOp
    action: Action = Action.ERROR
    errno: int = errno_mod.EIO
    sector_start: int = 0
    sector_end: int | None = None  # inclusive; None: to the end of the device
    once: bool = False
    every: int = 1  # fire on every Nth matching request
    probability: float = 1.0
    seed: int = 0
    delay_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.action is Action.LYING_FLUSH and self.op not in (BlkOp.FLUSH, BlkOp.ANY):
            raise ConfigError(f"lying-flush applies to flushes, not {self.op.value}")
        if self.every < 1:
            raise ConfigError(f"every={self.every}: must be at least 1")
        if not 0.0 <= self.probability <= 1.0:
            raise ConfigError(f"probability={self.probability}: must be between 0 and 1")

    @classmethod
    def parse(cls, text: str) -> Rule:
        parts = [p.strip() for p in text.strip().split(":") if p.strip()]
        if not parts:
            raise ConfigError("empty blkdebug rule")
        try:
            op = BlkOp(parts[0])
        except ValueError:
            raise ConfigError(
                f"blkdebug rule {text!r}: unknown operation {parts[0]!r}; valid: "
                + ", ".join(o.value for o in BlkOp)
            ) from None
        kw: dict[str, Any] = {"op": op}
        action: Action | None = None
        for part in parts[1:]:
            key, _, value = part.partition("=")
            try:
                if key == "lying-flush":
                    action = Action.LYING_FLUSH
                elif key == "once":
                    kw["once"] = True
                elif key == "errno":
                    kw["errno"] = _errno_value(value)
                    action = action or Action.ERROR
                elif key == "sector":
                    lo, _, hi = value.partition("-")
                    kw["sector_start"] = int(lo)
                    kw["sector_end"] = int(hi) if hi else int(lo)
                elif key == "every":
                    kw["every"] = int(value)
                elif key == "probability":
                    kw["probability"] = float(value)
                elif key == "seed":
                    kw["seed"] = int(value)
                elif key == "delay":
                    kw["delay_ms"] = float(value)
                else:
                    raise ConfigError(
                        f"blkdebug rule {text!r}: unknown setting {key!r}; valid: errno, "
                        "sector, once, every, probability, seed, delay, lying-flush"
                    )
            except ValueError:
                raise ConfigError(f"blkdebug rule {text!r}: bad value in {part!r}") from None
        if action is None:
            action = Action.DELAY if kw.get("delay_ms") else Action.ERROR
        return cls(action=action, **kw)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Rule:
        data = dict(obj)
        try:
            data["op"] = BlkOp(data["op"])
            data["action"] = Action(data.get("action", "error"))
            if isinstance(data.get("errno"), str):
                data["errno"] = _errno_value(data["errno"])
            return cls(**data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad blkdebug rule {obj!r}: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["op"] = self.op.value
        out["action"] = self.action.value
        out["errno"] = errno_mod.errorcode.get(self.errno, self.errno)
        return out


def _errno_value(text: str) -> int:
    if text.isdigit():
        return int(text)
    value = getattr(errno_mod, text.upper(), None)
    if not isinstance(value, int):
        raise ConfigError(f"unknown errno {text!r}; use a name like EIO or ENOSPC, or a number")
    return value


def parse_rules(text: str) -> list[Rule]:
    return [Rule.parse(r) for r in text.split(";") if r.strip()]


@dataclass
class RuleState:
    rule: Rule
    rng: random.Random
    matched: int = 0
    fired: int = 0

    def to_json(self, rule_id: int) -> dict[str, Any]:
        return {"id": rule_id, **self.rule.to_json(), "matched": self.matched, "fired": self.fired}


@register_driver
class BlkdebugNode(BlockNode):
    driver: ClassVar[str] = "blkdebug"
    is_filter: ClassVar[bool] = True
    has_child: ClassVar[bool] = True
    options: ClassVar[Mapping[str, Option]] = {
        "rules": Option(str, "", help="rules, ';'-separated (see the driver's docstring)"),
        "config": Option(str, help="JSON file with a list of rules"),
    }

    def __init__(
        self, node_name: str, opts: Mapping[str, Any], file: BlockNode | None, flags: OpenFlags
    ) -> None:
        super().__init__(node_name, opts, file, flags)
        if file is None:
            raise ConfigError(f"blkdebug node {node_name!r} needs a file child")
        self.child: BlockNode = file
        self.supported_write_flags = RequestFlags.FUA
        self.supported_zero_flags = (
            RequestFlags.FUA | RequestFlags.MAY_UNMAP | RequestFlags.NO_FALLBACK
        )
        self.can_discard = True
        self.can_write_zeroes = True
        self.request_alignment = file.request_alignment
        self._lock = threading.Lock()
        self._rules: dict[int, RuleState] = {}
        self._next_id = 1
        self.flushes_lied = 0
        initial = parse_rules(str(opts.get("rules") or ""))
        config = opts.get("config")
        if config:
            try:
                items = json.loads(Path(str(config)).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"blkdebug config {config}: {exc}") from None
            if not isinstance(items, list):
                raise ConfigError(f"blkdebug config {config}: expected a JSON list of rules")
            initial.extend(Rule.from_json(i) for i in items)
        self.set_rules(initial)

    # -- the run-time API --------------------------------------------------------

    def add_rule(self, rule: Rule | str) -> int:
        if isinstance(rule, str):
            rule = Rule.parse(rule)
        with self._lock:
            rule_id = self._next_id
            self._next_id += 1
            self._rules[rule_id] = RuleState(rule, random.Random(rule.seed))
        log.info("blkdebug %s: rule %d added: %s", self.node_name, rule_id, rule)
        return rule_id

    def remove_rule(self, rule_id: int) -> None:
        with self._lock:
            if self._rules.pop(rule_id, None) is None:
                raise ConfigError(f"blkdebug node {self.node_name!r} has no rule {rule_id}")

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    def set_rules(self, rules: Iterable[Rule | str]) -> list[int]:
        self.clear_rules()
        return [self.add_rule(r) for r in rules]

    def rules(self) -> list[dict[str, Any]]:
        with self._lock:
            return [s.to_json(i) for i, s in self._rules.items()]

    # -- matching ----------------------------------------------------------------

    def _apply(self, op: BlkOp, offset: int = 0, length: int = 0) -> bool:
        """Run the rules for one request; raises on an injected error; True = lie (flush)."""
        delay = 0.0
        error: Rule | None = None
        lie = False
        first = offset // SECTOR
        last = (offset + max(length, 1) - 1) // SECTOR
        with self._lock:
            for state in self._rules.values():
                rule = state.rule
                if rule.op is not BlkOp.ANY and rule.op is not op:
                    continue
                if op is not BlkOp.FLUSH and (
                    last < rule.sector_start
                    or (rule.sector_end is not None and first > rule.sector_end)
                ):
                    continue
                if rule.action is Action.LYING_FLUSH and op is not BlkOp.FLUSH:
                    continue
                state.matched += 1
                if rule.once and state.fired:
                    continue
                if state.matched % rule.every:
                    continue
                if rule.probability < 1.0 and state.rng.random() >= rule.probability:
                    continue
                state.fired += 1
                delay += rule.delay_ms
                if rule.action is Action.LYING_FLUSH:
                    lie = True
                elif rule.action is Action.ERROR and error is None:
                    error = rule
        if delay:
            time.sleep(delay / 1000)
        if error is not None:
            raise BlockError(
                f"blkdebug {self.node_name!r}: injected {errno_mod.errorcode.get(error.errno)} "
                f"for {op.value} at sector {first}",
                error.errno,
            )
        return lie

    # -- requests ----------------------------------------------------------------

    def driver_preadv(self, offset: int, iov: IOVec) -> None:
        self._apply(BlkOp.READ, offset, iov_length(iov))
        self.child.preadv(offset, iov)

    def driver_pwritev(self, offset: int, iov: IOVec, flags: RequestFlags) -> None:
        self._apply(BlkOp.WRITE, offset, iov_length(iov))
        self.child.pwritev(offset, iov, flags)

    def driver_pdiscard(self, offset: int, length: int) -> None:
        self._apply(BlkOp.DISCARD, offset, length)
        self.child.pdiscard(offset, length)

    def driver_pwrite_zeroes(self, offset: int, length: int, flags: RequestFlags) -> None:
        self._apply(BlkOp.WRITE_ZEROES, offset, length)
        self.child.pwrite_zeroes(offset, length, flags)

    def driver_flush(self) -> None:
        if self._apply(BlkOp.FLUSH):
            self.flushes_lied += 1
            return  # acknowledged, never passed down
        self.child.flush()

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update({"rules": self.rules(), "flushes-lied": self.flushes_lied})
        return info
