"""Versioned JSON files, read one way: one line says what is wrong, never a traceback.

results.json (`powercut report`, `--merge`, `--durations`), explore.json
(`powercut explore replay`) and a recording's recording.json are given on
the command line or found in a directory, so anything may be there: a
binary file, a half-written one, an array, another tool's JSON, a file of
another version. Each becomes a `ConfigError` that names the file and what
it is instead of what was expected. `load_json_object` reads the file;
`check_document` refuses a document without its format's marker or of
another version, in the same words for every format, whether the document
came from a file or from elsewhere (a result sent between pytest workers).

It sits on the floor of the layers (docs/architecture.md), beside `proc`
and `sockets`, so the exploration engine reads its files the way the report
reads its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.errors import ConfigError

_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def load_json(path: Path | str, what: str, *, missing: str | None = None) -> Any:
    """The JSON document in `path`; `what` (e.g. "a powercut results file") names the expected.

    `missing`, when given, is the whole message for a file that does not exist.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(missing or f"{path} does not exist; expected {what}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}; expected {what}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\0" in text:
        raise ConfigError(f"{path} is a binary file, not {what} (JSON text)")
    if not text.strip():
        raise ConfigError(f"{path} is empty, not {what}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            f"expected {what}"
        ) from None


def load_json_object(path: Path | str, what: str, *, missing: str | None = None) -> dict[str, Any]:
    """`load_json`, and the document must be an object (every powercut file is one)."""
    data = load_json(path, what, missing=missing)
    if not isinstance(data, dict):
        kind = "null" if data is None else _KINDS.get(type(data), type(data).__name__)
        raise ConfigError(f"{path} holds {kind}, not {what} (a JSON object)")
    return data


def check_document(
    data: Mapping[str, Any],
    source: Path | str,
    what: str,
    *,
    version: int,
    marker: str,
    schema: str | None = None,
    hint: str = "",
) -> None:
    """Refuse a document that is not `what` or is of another version than `version`.

    `marker` is the field every such document has; with `schema`, the value
    it must have (results.json's `"schema": "powercut-results"`). `hint`
    ends the version message (what to do about it).
    """
    if marker not in data or (schema is not None and data.get(marker) != schema):
        shown = f'"{marker}": "{schema}"' if schema is not None else f"{marker!r} field"
        raise ConfigError(f"{source} is not {what} (no {shown})")
    found = data.get("version")
    if found != version:
        raise ConfigError(
            f"{source} has schema version {found!r}; this powercut reads version {version}"
            + (f" ({hint})" if hint else "")
        )


def load_document(
    path: Path | str,
    what: str,
    *,
    version: int,
    marker: str,
    schema: str | None = None,
    missing: str | None = None,
    hint: str = "",
    document: str | None = None,
) -> dict[str, Any]:
    """A versioned powercut file: `load_json_object`, then `check_document`.

    `what` names the file expected ("an exploration file"); `document`, when
    the words differ, what a JSON object without the marker is not.
    """
    data = load_json_object(path, what, missing=missing)
    check_document(
        data,
        path,
        document or what,
        version=version,
        marker=marker,
        schema=schema,
        hint=hint,
    )
    return data
