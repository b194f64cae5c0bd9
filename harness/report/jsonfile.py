"""A JSON file a user points powercut at: one line says what is wrong, never a traceback.

results.json (`powercut report`, `--merge`, `--durations`) and explore.json
(`powercut explore replay`) are given on the command line, so anything may be
there: a binary file, a half-written one, an array, another tool's JSON. Each
becomes a `ConfigError` that names the file and what it is instead of what was
expected; the schema (its marker, version and fields) is the caller's to check.
"""

from __future__ import annotations

import json
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
