"""`--blockdev` option syntax: nested dicts and the dotted key=value string.

Both forms are reduced to one flat mapping of dotted keys
(`{"driver": "raw", "file.driver": "file", "file.filename": "d.img"}`), the
shape QEMU's `qdict_flatten` gives, so every later step has one input to
handle. Values stay as given (strings from the command line, Python values
from dicts) until a driver's `Option` declaration converts them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from harness.block.node import Option
from harness.errors import ConfigError

_SIZE_SUFFIXES = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "p": 1 << 50,
    "e": 1 << 60,
}
# QEMU's size syntax (a number, a binary suffix), also spelt with a unit: "4KiB", "1 MiB", "4kB".
_SIZE_RE = re.compile(
    r"^\s*(0x[0-9a-fA-F]+|[0-9]+(?:\.[0-9]+)?)\s*(?:([kmgtpeKMGTPE])(?:i?[bB])?|([bB]))?\s*$"
)

_TRUE = {"on", "true", "yes", "y", "1"}
_FALSE = {"off", "false", "no", "n", "0"}


def parse_size(text: str | int, what: str = "size") -> int:
    """A byte count with an optional binary suffix: 4096, 4k, 1M, 1.5G, 2 GiB, 0x1000.

    The one size grammar of the harness: `--blockdev` options, `powercut io`
    and scenario files all read sizes here.
    """
    if isinstance(text, bool):
        raise ConfigError(f"{what}: expected a size, got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(text)
        if not match:
            raise ConfigError(
                f"{what}: {text!r} is not a size; use a number with an optional suffix "
                "k, M, G, T (powers of 1024), e.g. 4k or 1M"
            )
        number, unit, byte = match.groups()
        suffix = unit or byte or ""
        if number.startswith("0x"):
            if suffix:
                raise ConfigError(f"{what}: {text!r}: hexadecimal sizes take no suffix")
            value = int(number, 16)
        elif "." not in number:
            value = int(number) * _SIZE_SUFFIXES[suffix.lower()]
        else:
            scaled = float(number) * _SIZE_SUFFIXES[suffix.lower()]
            if scaled != int(scaled):
                raise ConfigError(f"{what}: {text!r} is not a whole number of bytes")
            value = int(scaled)
    if value < 0:
        raise ConfigError(f"{what}: {text!r} is negative")
    return value


def parse_bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE:
        return True
    if isinstance(value, str) and value.lower() in _FALSE:
        return False
    raise ConfigError(f"{what}: {value!r} is not a boolean; use on or off")


def parse_dotted(spec: str) -> dict[str, str]:
    """`driver=raw,file.filename=a,,b.img` -> flat dict; `,,` is an escaped comma."""
    result: dict[str, str] = {}
    i = 0
    n = len(spec)
    while i < n:
        eq = spec.find("=", i)
        comma = spec.find(",", i)
        if eq < 0 or (0 <= comma < eq):
            end = comma if comma >= 0 else n
            raise ConfigError(
                f"blockdev option {spec[i:end]!r} has no value; write key=value pairs "
                "separated by commas, e.g. driver=raw,file.driver=file,file.filename=d.img"
            )
        key = spec[i:eq]
        if not key:
            raise ConfigError(f"empty option name in {spec!r}")
        value_chars: list[str] = []
        j = eq + 1
        while j < n:
            if spec[j] == ",":
                if j + 1 < n and spec[j + 1] == ",":
                    value_chars.append(",")
                    j += 2
                    continue
                break
            value_chars.append(spec[j])
            j += 1
        if key in result:
            raise ConfigError(f"blockdev option {key!r} given twice in {spec!r}")
        result[key] = "".join(value_chars)
        i = j + 1
    return result


def flatten(options: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts (or already-dotted keys, or a mix) -> one flat dotted dict."""
    flat: dict[str, Any] = {}
    for key, value in options.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"blockdev option names must be non-empty strings, got {key!r}")
        full = prefix + key
        if isinstance(value, Mapping):
            flat.update(flatten(value, full + "."))
        else:
            if full in flat:
                raise ConfigError(f"blockdev option {full!r} given twice")
            flat[full] = value
    return flat


def escape_value(value: object) -> str:
    """A value inside QEMU's `key=value,...` syntax (QemuOpts and keyval): a comma doubled."""
    return str(value).replace(",", ",,")


def format_dotted(options: Mapping[str, Any]) -> str:
    """The dotted `--blockdev` form of nested (or flat) options; `parse_dotted` reads it back.

    Values are written as QEMU's keyval syntax wants them: a comma doubled,
    booleans as on/off; anything else in a value (`=`, spaces, quotes,
    brackets) needs no escaping, because a key ends at the first `=`.
    """
    parts = []
    for key, value in flatten(options).items():
        if "," in key or "=" in key:
            raise ConfigError(f"blockdev option name {key!r} cannot hold ',' or '='")
        if isinstance(value, bool):
            value = "on" if value else "off"
        parts.append(f"{key}={escape_value(value)}")
    return ",".join(parts)


def to_flat(options: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(options, str):
        return parse_dotted(options)
    return flatten(options)


def split_child(
    flat: Mapping[str, Any], child: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Separate `child.*` keys from a node's own keys.

    A plain string `file=NAME` is a file name, as in `-drive file=NAME`.
    """
    own: dict[str, Any] = {}
    sub: dict[str, Any] = {}
    prefix = child + "."
    direct_value: Any = None
    for key, value in flat.items():
        if key.startswith(prefix):
            sub[key[len(prefix) :]] = value
        elif key == child:
            direct_value = value
        else:
            own[key] = value
    if direct_value is not None:
        if sub:
            raise ConfigError(
                f"{child!r} is given both as a name ({direct_value!r}) and as options"
            )
        sub = {"driver": "file", "filename": str(direct_value)}
    return own, (sub or None)


def convert(driver: str, node_name: str, key: str, option: Option, value: Any) -> Any:
    what = f"option {key!r} of node {node_name!r} (driver {driver})"
    if option.type is bool:
        return parse_bool(value, what)
    if option.type is int:
        if option.size:
            return parse_size(value, what)
        if isinstance(value, bool):
            raise ConfigError(f"{what}: expected an integer, got {value!r}")
        try:
            return int(value, 0) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{what}: expected an integer, got {value!r}") from None
    if option.type is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{what}: expected a number, got {value!r}") from None
    text = str(value)
    if option.choices and text not in option.choices:
        raise ConfigError(
            f"{what}: invalid value {text!r}; valid values: {', '.join(option.choices)}"
        )
    return text
