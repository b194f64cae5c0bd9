"""results.json, explore.json and recording.json: whatever is there, one line says what.

A binary file, half a file, an array or another tool's JSON is a `ConfigError`
naming the file and what is wrong with it, in the library and at the CLI
(`--durations`, `powercut report`, `powercut explore replay`): no traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.errors import ConfigError
from harness.explore.doc import load_doc
from harness.explore.recording import open_recording
from harness.jsonfile import load_json, load_json_object
from harness.report.results import load_results

BINARY = bytes(range(256)) * 4  # not UTF-8
BAD = [
    (BINARY, "is a binary file, not"),
    (b'{"a": "\x00"}', "is a binary file, not"),  # UTF-8, but a NUL: not a text file
    (b"", "is empty, not"),
    (b'{"cells": [', "is not valid JSON (Expecting value at line 1, column 12)"),
    (b"[1, 2]", "holds an array, not"),
    (b'"results"', "holds a string, not"),
    (b"null", "holds null, not"),
]


READERS = [
    (load_results, "results.json", "a powercut results file"),
    (load_doc, "explore.json", "an exploration file"),
    (open_recording, "recording.json", "a recording"),
]


@pytest.mark.parametrize(("load", "name", "what"), READERS, ids=[r[1] for r in READERS])
@pytest.mark.parametrize(("content", "message"), BAD)
def test_a_file_that_is_not_one_is_named_with_what_is_wrong(
    tmp_path: Path,
    load: Callable[[Path], object],
    name: str,
    what: str,
    content: bytes,
    message: str,
) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / name} {message}"), info.value
    assert what in str(info.value) and "\n" not in str(info.value)


def test_the_wrong_schema_is_named_too(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps({"version": 1, "cells": []}))
    with pytest.raises(ConfigError, match=r"is not a powercut results file \(no \"schema\""):
        load_results(tmp_path)
    (tmp_path / "explore.json").write_text(json.dumps({"version": 1}))
    with pytest.raises(ConfigError, match=r"explore.json is not an exploration \(no 'cells'"):
        load_doc(tmp_path)
    with pytest.raises(ConfigError, match="holds no exploration"):
        load_doc(tmp_path / "elsewhere")


def test_load_json_reads_any_document_and_load_json_object_only_objects(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    assert load_json(path, "a list") == [1, 2]
    path.write_text('{"a": 1}')
    assert load_json_object(path, "an object") == {"a": 1}
    with pytest.raises(ConfigError, match=r"cannot read .*: Is a directory"):
        load_json(tmp_path, "a file")


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *argv], capture_output=True, text=True, timeout=120
    )


def test_the_cli_says_in_one_line_what_is_wrong_with_a_file_it_reads(tmp_path: Path) -> None:
    binary = tmp_path / "binary"
    listed = tmp_path / "listed"
    for directory, content in ((binary, BINARY), (listed, b"[]")):
        directory.mkdir()
        (directory / "results.json").write_bytes(content)
        (directory / "explore.json").write_bytes(content)
    out = str(tmp_path / "out")

    def durations(directory: Path) -> subprocess.CompletedProcess[str]:
        return _cli(
            "run", "matrix", "--out", out, "--shard", "1/2", "--durations", str(directory), "--list"
        )

    runs = {
        "--durations binary": (
            durations(binary),
            f"powercut run: {binary}/results.json is a binary file, not a powercut results file",
        ),
        "--durations list": (
            durations(listed),
            f"powercut run: {listed}/results.json holds an array, not a powercut results file",
        ),
        "report": (
            _cli("report", str(binary)),
            f"powercut report: {binary}/results.json is a binary file",
        ),
        "explore replay": (
            _cli("explore", "replay", str(listed), "--state", "p0", "--out", str(tmp_path / "i")),
            f"powercut explore: {listed}/explore.json holds an array, not an exploration file",
        ),
    }
    for name, (result, said) in runs.items():
        assert result.returncode == 1, (name, result.stderr)
        assert result.stderr.startswith(said), (name, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (name, result.stderr)


def test_every_versioned_file_names_another_version_in_the_same_words(tmp_path: Path) -> None:
    (tmp_path / "recording.json").write_text(json.dumps({"version": 99, "log": "write.log"}))
    (tmp_path / "explore.json").write_text(json.dumps({"version": 99, "cells": []}))
    (tmp_path / "results.json").write_text(
        json.dumps({"schema": "powercut-results", "version": 99, "cells": []})
    )
    for load, name in (
        (open_recording, "recording"),
        (load_doc, "explore"),
        (load_results, "results"),
    ):
        with pytest.raises(ConfigError) as info:
            load(tmp_path)
        said = f"{tmp_path / (name + '.json')} has schema version 99; this powercut reads version 1"
        assert str(info.value).startswith(said), info.value
    (tmp_path / "recording.json").write_text(json.dumps({"version": 1}))
    with pytest.raises(ConfigError, match=r"recording.json is not a recording \(no 'log' field\)"):
        open_recording(tmp_path)
