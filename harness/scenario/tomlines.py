"""Line numbers for TOML keys, which `tomllib` does not give.

A scenario error must name the line, so we scan the source text once and map
every key path to the line that defines it. The path uses the same shape as
the parsed document: table names and keys as strings, array-of-tables
entries as their index (`("workload", 1, "records")`). Lines inside
multi-line strings and arrays are skipped, so a value that looks like a key
does not confuse the map. Keys written inside inline tables are not located;
`line_of` then falls back to the nearest enclosing key or table.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

PathElem = str | int
Path = tuple[PathElem, ...]

_ARRAY_HEADER = re.compile(r"^\s*\[\[\s*(?P<name>[^\[\]]+?)\s*\]\]")
_TABLE_HEADER = re.compile(r"^\s*\[\s*(?P<name>[^\[\]]+?)\s*\]")
_KEY = re.compile(
    r"^\s*(?P<key>(?:[A-Za-z0-9_\-]+|\"[^\"]*\"|'[^']*')"
    r"(?:\s*\.\s*(?:[A-Za-z0-9_\-]+|\"[^\"]*\"|'[^']*'))*)\s*="
)


def _split_dotted(name: str) -> list[str]:
    parts: list[str] = []
    for match in re.finditer(r"\"([^\"]*)\"|'([^']*)'|([A-Za-z0-9_\-]+)", name):
        parts.append(next(g for g in match.groups() if g is not None))
    return parts


def _bracket_balance(value: str) -> int:
    """Net count of `[`/`{` minus `]`/`}` outside strings and comments."""
    depth = 0
    quote = ""
    i = 0
    while i < len(value):
        ch = value[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 2
                continue
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            break
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        i += 1
    return depth


class LineIndex:
    """Map from key paths to 1-based line numbers in one TOML source."""

    def __init__(self, text: str) -> None:
        self._lines: dict[Path, int] = {}
        self._scan(text)

    def _scan(self, text: str) -> None:
        array_counts: dict[tuple[str, ...], int] = {}
        table: Path = ()
        depth = 0
        in_multiline: str = ""
        for lineno, line in enumerate(text.splitlines(), start=1):
            if in_multiline:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = ""
                continue
            if depth > 0:
                depth += _bracket_balance(line)
                continue
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            match = _ARRAY_HEADER.match(line)
            if match:
                names = tuple(_split_dotted(match.group("name")))
                index = array_counts.get(names, -1) + 1
                array_counts[names] = index
                # A new entry resets the counts of arrays nested below it.
                for key in [
                    k for k in array_counts if len(k) > len(names) and k[: len(names)] == names
                ]:
                    del array_counts[key]
                table = (*self._resolve(names[:-1], array_counts), names[-1], index)
                self._lines.setdefault(table, lineno)
                self._lines.setdefault(table[:-1], lineno)
                continue
            match = _TABLE_HEADER.match(line)
            if match:
                table = self._resolve(tuple(_split_dotted(match.group("name"))), array_counts)
                self._lines.setdefault(table, lineno)
                continue
            match = _KEY.match(line)
            if match:
                path = (*table, *_split_dotted(match.group("key")))
                self._lines.setdefault(path, lineno)
                rest = line[match.end() :]
                for quote in ('"""', "'''"):
                    if rest.count(quote) % 2 == 1:
                        in_multiline = quote
                        break
                else:
                    depth = max(0, _bracket_balance(rest))

    @staticmethod
    def _resolve(names: Sequence[str], array_counts: dict[tuple[str, ...], int]) -> Path:
        path: list[PathElem] = []
        for i, name in enumerate(names):
            path.append(name)
            key = tuple(names[: i + 1])
            if key in array_counts:
                path.append(array_counts[key])
        return tuple(path)

    def key_before(self, line: int) -> tuple[Path, int] | None:
        """The key or table defined last at or before `line` (where a syntax error points)."""
        before = [(at, len(path), path) for path, at in self._lines.items() if at <= line]
        if not before:
            return None
        at, _depth, path = max(before, key=lambda entry: entry[:2])
        return path, at

    def line_of(self, path: Sequence[PathElem]) -> int | None:
        """The line that defines `path`, or of its nearest located ancestor."""
        candidate = tuple(path)
        while candidate:
            if candidate in self._lines:
                return self._lines[candidate]
            candidate = candidate[:-1]
        return None
