"""Reading one TOML table of a scenario, with errors that name the file, line and field.

`Table` takes the keys it is asked for, checks their types and values, and
then (`finish`) rejects every other key, listing the valid ones. Workloads
read their own fields through it (it is the `FieldReader` of
`harness.workloads.base`).
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from harness.block.options import parse_size
from harness.durability.contract import CacheMode, cache_mode_names
from harness.errors import ConfigError, ScenarioError
from harness.scenario.tomlines import LineIndex, PathElem
from harness.workloads.base import OptionValue

E = TypeVar("E", bound=enum.Enum)


def num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class Table:
    """One TOML table being validated: takes known keys, then rejects the rest."""

    def __init__(self, ctx: Context, data: Mapping[str, Any], path: tuple[PathElem, ...]) -> None:
        self.ctx = ctx
        self.data = data
        self.path = path
        self.known: list[str] = []

    def where(self, key: str | None = None) -> str:
        return self.ctx.where((*self.path, key) if key else self.path)

    def fieldname(self, key: str | None = None) -> str:
        parts = (*self.path, key) if key else self.path
        return ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in parts).replace(
            ".[", "["
        )

    def error(self, key: str, message: str) -> ScenarioError:
        return ScenarioError(f"{self.where(key)}: field {self.fieldname(key)!r} {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = None) -> Any:
        if key not in self.known:
            self.known.append(key)
        return self.data.get(key, default)

    def typed(self, key: str, kind: type | tuple[type, ...], default: Any, what: str) -> Any:
        value = self.raw(key, default)
        if key not in self.data:
            return value
        ok = isinstance(value, kind) and not (
            isinstance(value, bool) and bool not in _as_tuple(kind)
        )
        if not ok:
            raise self.error(key, f"must be {what}, not {describe(value)}")
        return value

    def string(self, key: str, default: str | None = None) -> str:
        value = self.typed(key, str, default, "a string")
        if value is None:
            raise self.error(key, "is required (a string)")
        return str(value)

    def integer(self, key: str, default: int, minimum: int | None = None) -> int:
        value = int(self.typed(key, int, default, "an integer"))
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be an integer >= {minimum}, not {value}")
        return value

    def number(self, key: str, default: float, minimum: float | None = None) -> float:
        value = float(self.typed(key, (int, float), default, "a number"))
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be a number >= {minimum}, not {num(value)}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        return bool(self.typed(key, bool, default, "true or false"))

    def optional_string(self, key: str) -> str | None:
        value = self.typed(key, str, None, "a string")
        return None if value is None else str(value)

    def size(self, key: str, default: int, minimum: int = 1) -> int:
        value = self.raw(key, default)
        if not isinstance(value, int | str) or isinstance(value, bool):
            raise self.error(
                key, f"must be a size in bytes or with a k/M/G suffix, not {describe(value)}"
            )
        try:
            size = parse_size(value, key)
        except ConfigError as exc:
            raise self.error(
                key, f"must be a size in bytes or with a k/M/G suffix: {exc}"
            ) from None
        if size < minimum:
            raise self.error(key, f"must be at least {minimum} bytes, not {size}")
        return size

    def choice(
        self,
        key: str,
        enum_type: type[E],
        default: E | None = None,
        parse: Callable[[str], E] | None = None,
    ) -> E:
        value = self.raw(key)
        if value is None:
            if default is None:
                raise self.error(key, f"is required; one of: {choices_text(enum_type)}")
            return default
        return self._one(key, value, enum_type, parse)

    def _one(self, key: str, value: Any, enum_type: type[E], parse: Callable[[str], E] | None) -> E:
        if isinstance(value, str):
            try:
                return parse(value) if parse else enum_type(value)
            except ValueError:
                pass
        raise self.error(key, f"must be one of: {choices_text(enum_type)}; got {value!r}")

    def choices(
        self,
        key: str,
        enum_type: type[E],
        default: Sequence[E],
        parse: Callable[[str], E] | None = None,
    ) -> tuple[E, ...]:
        """A value or a list of values (a matrix dimension); duplicates are an error."""
        value = self.raw(key)
        if value is None:
            return tuple(default)
        items = value if isinstance(value, list) else [value]
        if not items:
            raise self.error(key, f"must not be empty; one or more of: {choices_text(enum_type)}")
        result = tuple(self._one(key, item, enum_type, parse) for item in items)
        if len(set(result)) != len(result):
            raise self.error(key, f"lists a value twice: {[r.value for r in result]}")
        return result

    def table(self, key: str) -> Table | None:
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(key, f"must be a table, not {describe(value)}")
        return Table(self.ctx, value, (*self.path, key))

    def tables(self, key: str) -> list[Table]:
        """A table or an array of tables."""
        value = self.raw(key)
        if value is None:
            return []
        if isinstance(value, dict):
            return [Table(self.ctx, value, (*self.path, key))]
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return [Table(self.ctx, v, (*self.path, key, i)) for i, v in enumerate(value)]
        raise self.error(key, f"must be a table or an array of tables, not {describe(value)}")

    def options(
        self, key: str, reserved: Sequence[str] = (), reason: str = "is reserved"
    ) -> tuple[tuple[str, OptionValue], ...]:
        """A table of free-form options (a tool's own names): strings, numbers or booleans."""
        table = self.table(key)
        if table is None:
            return ()
        options: list[tuple[str, OptionValue]] = []
        for name, value in table.data.items():
            table.raw(name)
            if not isinstance(value, str | int | float | bool):
                raise table.error(
                    name, f"must be a string, number or boolean, not {describe(value)}"
                )
            if name in reserved:
                raise table.error(name, reason)
            options.append((name, value))
        return tuple(options)

    def finish(self) -> None:
        for key in self.data:
            if key not in self.known:
                valid = ", ".join(sorted(self.known))
                near = difflib.get_close_matches(key.lower(), self.known, 1, 0.8)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise self.error(key, f"is unknown here; valid fields: {valid}{hint}")


@dataclass
class Context:
    path: str
    lines: LineIndex
    extra: dict[str, Any] = field(default_factory=dict)

    def where(self, path: Sequence[PathElem]) -> str:
        line = self.lines.line_of(path)
        return f"{self.path}:{line}" if line else self.path


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def choices_text(enum_type: type[enum.Enum]) -> str:
    if enum_type is CacheMode:
        return ", ".join(cache_mode_names())
    return ", ".join(m.value for m in enum_type)
