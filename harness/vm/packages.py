"""Which Debian packages go into the guest root, resolved against the host's archive.

A package set is resolved with apt's own solver, simulating an install into
an empty system (`apt-get install --simulate` with an empty dpkg status), so
the answer comes from the archive the host's apt is configured for
(/etc/apt/sources.list.d/*) and not from what the host has installed. That
gives, before anything is downloaded or booted:

- a clear error for a package the archive does not have (the scenario field
  `packages` or `--package`, named in the message);
- the exact version of every package in the closure, which is what the image
  is cached by: the same set from the same archive state is the same image.

Resolving takes seconds (apt reads its lists), so the answer is remembered,
keyed by the set and by the apt lists' names, sizes and times: `apt-get
update` that changes the archive's view resolves again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ConfigError, ImageBuildError

log = logging.getLogger(__name__)

APT_LISTS = Path("/var/lib/apt/lists")
# Debian policy 5.6.1: lowercase letters, digits, + - . ; at least two characters.
_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_INST = re.compile(r"^Inst (\S+) \((\S+) ")
# Bump when the memo's format or meaning changes.
_MEMO_VERSION = 1


def normalize(packages: Iterable[str], field: str = "packages") -> tuple[str, ...]:
    """The set as sorted unique names; a malformed name is a ConfigError naming `field`."""
    names: set[str] = set()
    for raw in packages:
        name = str(raw).strip()
        if not _NAME.match(name):
            raise ConfigError(
                f"{field}: {raw!r} is not a Debian package name (lowercase letters, digits, "
                "'+', '-', '.'; e.g. sqlite3, postgresql)"
            )
        names.add(name)
    return tuple(sorted(names))


def set_hash(packages: Iterable[str]) -> str:
    """A short stable digest of a package set (order and duplicates do not matter)."""
    text = "\n".join(normalize(packages)) + "\n"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def lists_digest(lists: Path = APT_LISTS) -> str:
    """A digest of the host's apt lists (names, sizes, times): the archive as apt sees it."""
    h = hashlib.sha256()
    try:
        entries = sorted(os.scandir(lists), key=lambda e: e.name)
    except OSError:
        entries = []
    for e in entries:
        if e.name in ("lock", "partial", "auxfiles") or not e.is_file():
            continue
        st = e.stat()
        h.update(f"{e.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Resolution:
    """The packages asked for and every package (name → version) they install."""

    requested: tuple[str, ...]
    closure: dict[str, str]

    def digest(self) -> str:
        h = hashlib.sha256()
        for name in self.requested:
            h.update(f"want {name}\n".encode())
        for name, version in sorted(self.closure.items()):
            h.update(f"inst {name} {version}\n".encode())
        return h.hexdigest()[:16]


def parse_simulation(stdout: str) -> dict[str, str]:
    """name → version from `apt-get --simulate` output ("Inst NAME (VERSION ...")."""
    closure: dict[str, str] = {}
    for line in stdout.splitlines():
        if m := _INST.match(line):
            closure[m.group(1)] = m.group(2)
    return closure


def explain_failure(stderr: str, requested: Iterable[str], field: str) -> ConfigError:
    """apt's complaint about a package set, as a ConfigError naming the field and package."""
    unknown = re.findall(r"Unable to locate package (\S+)", stderr)
    unknown += re.findall(r"Package '([^']+)' has no installation candidate", stderr)
    unknown += re.findall(r"Couldn't find any package by \S+ '([^']+)'", stderr)
    if unknown:
        names = ", ".join(sorted(set(unknown)))
        return ConfigError(
            f"{field}: no package {names} in the Debian archive this machine uses "
            f"(apt-cache policy {unknown[0]} shows nothing to install); check the name with "
            "`apt-cache search`, or run `apt-get update`"
        )
    tail = " | ".join(stderr.strip().splitlines()[-6:])
    return ConfigError(
        f"{field}: apt cannot install {', '.join(requested)} together: {tail}; "
        "remove the conflicting package"
    )


def _simulate(args: list[str]) -> subprocess.CompletedProcess[str]:
    argv = [
        "apt-get",
        "--simulate",
        "--quiet",
        # Resolve as if nothing were installed: the guest root starts empty.
        "-o",
        "Dir::State::status=/dev/null",
        "-o",
        "APT::Install-Recommends=false",
        "-o",
        "APT::Get::Show-Versions=false",
        *args,
    ]
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, check=False, env={**os.environ, "LC_ALL": "C"}
        )
    except FileNotFoundError as exc:
        raise ImageBuildError("apt-get is not installed; powercut needs a Debian host") from exc


def resolve(
    packages: Iterable[str],
    *,
    memo_dir: Path | None = None,
    field: str = "packages",
    essential: bool = True,
) -> Resolution:
    """Resolve `packages` (plus the Essential set mmdebstrap adds) against the archive.

    Raises ConfigError naming `field` for a package the archive lacks.
    """
    requested = normalize(packages, field)
    key = hashlib.sha256(
        f"{_MEMO_VERSION} {essential} {lists_digest()} {' '.join(requested)}".encode()
    ).hexdigest()[:24]
    memo = memo_dir / f"{key}.json" if memo_dir is not None else None
    if memo is not None:
        try:
            data = json.loads(memo.read_text())
            return Resolution(tuple(data["requested"]), dict(data["closure"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    proc = _simulate(["install", *requested])
    if proc.returncode != 0:
        raise explain_failure(proc.stderr, requested, field)
    closure = parse_simulation(proc.stdout)
    if essential:
        # mmdebstrap's essential variant installs every Essential: yes package too;
        # apt installs exactly those when asked to upgrade an empty system.
        ess = _simulate(["dist-upgrade"])
        if ess.returncode != 0:
            raise ImageBuildError(f"apt cannot resolve the Essential set: {ess.stderr.strip()}")
        closure.update(parse_simulation(ess.stdout))
    if not closure:
        raise ImageBuildError(
            f"apt resolved {', '.join(requested)} to nothing; is /etc/apt/sources.list.d "
            "set up, and has `apt-get update` run?"
        )
    result = Resolution(requested, closure)
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"requested": list(requested), "closure": closure}))
        os.replace(tmp, memo)
    return result


def check_available(packages: Iterable[str], field: str = "packages") -> tuple[str, ...]:
    """Raise ConfigError (naming `field`) unless every package resolves; returns the set."""
    return resolve(packages, field=field, essential=False).requested
