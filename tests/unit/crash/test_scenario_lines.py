"""Line numbers for TOML keys (tomllib gives none): the map behind every scenario error."""

from __future__ import annotations

import tomllib

from harness.scenario.tomlines import LineIndex

DOC = '''\
# comment
name = "x"
modes = [
  "writeback",   # a comment with = sign
  "none",
]
description = """
fake = "not a key"
[not.a.table]
"""
"quoted key" = 1

[[fault]]
model = "host-power-cut"

[[fault]]
model = "guest-power-cut"
inline = { a = 1, b = [1, 2] }

[[workload]]
kind = "fio-verify"
[workload.fio]
bs = "4k"

[[workload]]
kind = "ack-records"
[[workload.cut]]
after-seconds = 1
[[workload.cut]]
window = [
  1,
  2,
]
[workload.extra]
dotted.key = 3
'''


def test_the_document_is_valid_toml() -> None:
    tomllib.loads(DOC)


def test_keys_tables_and_array_entries_map_to_their_lines() -> None:
    idx = LineIndex(DOC)
    assert idx.line_of(("name",)) == 2
    assert idx.line_of(("modes",)) == 3
    assert idx.line_of(("description",)) == 7
    assert idx.line_of(("quoted key",)) == 11
    assert idx.line_of(("fault", 0)) == 13
    assert idx.line_of(("fault", 1, "model")) == 17
    assert idx.line_of(("fault", 1, "inline")) == 18
    assert idx.line_of(("workload", 0, "fio", "bs")) == 23
    assert idx.line_of(("workload", 1, "kind")) == 26
    assert idx.line_of(("workload", 1, "cut", 0, "after-seconds")) == 28
    assert idx.line_of(("workload", 1, "cut", 1, "window")) == 30
    assert idx.line_of(("workload", 1, "extra", "dotted", "key")) == 35


def test_lines_inside_strings_and_arrays_are_not_keys() -> None:
    idx = LineIndex(DOC)
    assert idx.line_of(("fake",)) is None
    assert idx.line_of(("not", "a", "table")) is None


def test_unlocated_paths_fall_back_to_the_nearest_ancestor() -> None:
    idx = LineIndex(DOC)
    assert idx.line_of(("fault", 1, "inline", "a")) == 18  # inside an inline table
    assert idx.line_of(("modes", 1)) == 3  # an array element
    assert idx.line_of(("workload", 0, "fio", "iodepth")) == 22  # absent key: its table
    assert idx.line_of(("nothing",)) is None
