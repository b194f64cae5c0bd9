"""Mutation testing of the verdict's core: can the unit tests tell right code from wrong?

    python -m benchmarks.mutation [--max-children 2] [--keep DIR] [--out benchmarks/results]
        [--only MODULE...]
    python -m benchmarks.mutation --keep DIR --recheck
    python -m benchmarks.mutation --doc-from benchmarks/results/mutation-<time>.json

Runs mutmut (pinned: `MUTMUT_VERSION`; install it beside the project's
dependencies) over the modules whose mistakes change a verdict: the
durability contract, the write log, the journal, the offline cut and the
oracle (`harness/durability/`), the states a contract allows
(`harness/explore/states.py`), their minimization (`harness/explore/minimize.py`)
and the command workload's check with the acknowledgement streams it parses
(`harness/workloads/command.py`, `stream.py`). Each mutant (one small change:
an operator, a constant, a condition, a removed call) is run against the unit
tests that execute the function it changed, a property test's examples
unshrunk (`--hypothesis-profile=mutation`, tests/conftest.py); a mutant no test
fails on *survived*.

The run happens in a scratch copy of the tracked files (mutmut copies the
tree again into its `mutants/`), so the checkout is never mutated and nothing
of mutmut's is left in it. The figures per module — mutants, killed,
survived, timeout, no tests, not checked, score = (killed + timeout) / (all
but skipped and not checked) —
and every survivor's diff go to benchmarks/results/mutation-<UTC time>.json;
`--doc-from` writes docs/mutation.md from such a record: the figures and,
survivor by survivor, why the ones left cannot change a verdict.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks import machine_info

MUTMUT_VERSION = "3.8.1"
ROOT = Path(__file__).resolve().parent.parent

# What is mutated: the modules whose mistakes change a verdict.
TARGETS = (
    "harness/durability/contract.py",
    "harness/durability/cut.py",
    "harness/durability/delta.py",
    "harness/durability/journal.py",
    "harness/durability/mapped.py",
    "harness/durability/oracle.py",
    "harness/durability/writelog.py",
    "harness/explore/states.py",
    "harness/explore/minimize.py",
    "harness/workloads/command.py",
    "harness/workloads/stream.py",
)
# The tests each mutant may be judged by (mutmut runs, of these, the ones that execute the
# function it changed, fastest first): the unit tests of those modules and of what reads
# them, no VM. Tests that reach these modules only incidentally and slowly (real ext4, xfs
# and btrfs tools, the NBD server, fake cells end to end) are left out: a mutant that
# survives runs every test that reached it, so they cost hours and would judge nothing new.
TESTS = (
    "tests/unit/faults",
    "tests/unit/explore/test_states.py",
    "tests/unit/explore/test_concurrent.py",
    "tests/unit/explore/test_minimize.py",
    "tests/unit/explore/test_overlay.py",
    "tests/unit/explore/test_crash_state.py",
    "tests/unit/explore/test_bad_input.py",
    "tests/unit/explore/test_negative_controls.py",
    "tests/unit/explore/test_explore_run.py",
    "tests/unit/workloads/test_command.py",
    "tests/unit/workloads/test_stream.py",
    "tests/unit/workloads/test_stream_run.py",
    "tests/unit/workloads/test_guest_programs.py",
    "tests/unit/crash/test_verdict.py",
    "tests/unit/crash/test_verdict_stack.py",
    "tests/unit/crash/test_runner_oracle.py",
    "tests/unit/crash/test_explore_scenario.py",
    "tests/unit/crash/test_explore_record.py",
    "tests/unit/crash/test_cell_sequence.py",
    "tests/unit/crash/test_tracer.py",
    "tests/unit/crash/test_matrix.py",
    "tests/unit/crash/test_cluster.py",
    "tests/unit/explore/test_cluster_states.py",
    "tests/unit/explore/test_cluster_explore.py",
    "tests/unit/explore/test_explore_causes.py",
    "tests/unit/test_docs.py",
)
PYTEST_ARGS = ("--hypothesis-profile=mutation", "-p", "no:cacheprovider")
STATUSES = (
    "killed",
    "survived",
    "timeout",
    "no tests",
    "suspicious",
    "skipped",
    "segfault",
    "not checked",  # a run stopped before it reached them (--no-run records such a run)
)
_RESULT = re.compile(r"^\s+(?P<name>harness\.\S+): (?P<status>.+)$")


def _toml_list(items: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def mutmut_config(targets: tuple[str, ...] | list[str]) -> str:
    """The `[tool.mutmut]` table the scratch copy's pyproject.toml gets."""
    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["harness"]\n'
        f"only_mutate = {_toml_list(targets)}\n"
        f"pytest_add_cli_args_test_selection = {_toml_list(TESTS)}\n"
        f"pytest_add_cli_args = {_toml_list(PYTEST_ARGS)}\n"
        # The guest's sources, the shipped scenarios (harness/data links to them), the docs
        # tests/unit/test_docs.py reads.
        'also_copy = ["images", "scenarios", "harness/data", "docs", "README.md"]\n'
    )


def scratch_copy(dest: Path, *under: str) -> None:
    """The tracked files of this checkout (working-tree content), links kept as links;
    only those in the folders `under` when given."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", *under], cwd=ROOT, capture_output=True, check=True
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        src, dst = ROOT / name, dest / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)


def module_of(mutant: str) -> str:
    """harness.durability.oracle.x_check__mutmut_3 -> harness/durability/oracle.py."""
    parts = mutant.split(".")
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i]) + ".py"
        if path in TARGETS:
            return path
    return "/".join(parts[:-1]) + ".py"


def tally(results: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per module: each status's count and the score, as mutmut computes it."""
    per: dict[str, Counter[str]] = {}
    for name, status in results.items():
        per.setdefault(module_of(name), Counter())[status] += 1
    out: dict[str, dict[str, Any]] = {}
    for module in sorted(per):
        c = per[module]
        tested = sum(c.values()) - c["skipped"] - c["not checked"]
        out[module] = {
            "mutants": sum(c.values()),
            **{s.replace(" ", "_"): c[s] for s in STATUSES},
            "score": round((c["killed"] + c["timeout"]) / tested, 4) if tested else None,
        }
    return out


# -- judging the mutants no test kills -------------------------------------------------------
#
# A survivor is either killed by a new test or judged here: it cannot change a verdict, and the
# reason says why. A rule matches by module, function ("Class.method" or "function", fnmatch)
# and, when given, a regex over the lines the mutant removes ("removed => added": and one
# over the lines it adds); so it names the change, not
# mutmut's numbering, and a later run judges the same change the same way. A survivor no rule
# covers is "unjudged": a test must kill it, or a rule must say why it cannot matter.

MESSAGE = "message"  # the words of an error, a log line or a summary; never judged
REPORT = "report"  # output for people or other tools (JSON fields, tables); no verdict reads it
PERFORMANCE = "performance"  # how fast or how far a search goes, never what it finds
EQUIVALENT = "equivalent"  # the same behaviour for every input the code can be given
UNUSED = "unused"  # code or attributes nothing calls or reads
WAITING = "waiting"  # how long to wait for a guest or a thread, not what is judged
ORDER = "order"  # the order candidate states come out in at one point
PLATFORM = "platform"  # code another kind of host runs (big-endian); unreachable on this one

Rule = tuple[str, str, str | None, str, str]  # module, function, removed-line regex, kind, why

_DDMIN_ORDER = (
    "ddmin's granularity schedule (how many chunks, when to try complements): which subsets "
    "are tried in which order. Every run still ends with a pass at one item per chunk, so the "
    "result still fails, is 1-minimal and keeps the budget (test_minimize's 300-case property)"
)
RULES: tuple[Rule, ...] = (
    # contract.py
    (
        "harness/durability/contract.py",
        "parse_policy",
        r'valid = ", "\.join\(p\.value for p in CutPolicy\) => valid = "XX, XX"\.join\(',
        MESSAGE,
        "the list of valid policies in the error for an unknown one",
    ),
    # writelog.py
    (
        "harness/durability/writelog.py",
        "Request.to_json",
        None,
        REPORT,
        "`powercut log show --json`'s fields, for people and other tools; no verdict reads them",
    ),
    (
        "harness/durability/writelog.py",
        "export_dm_log_writes",
        r"^events\.sort",
        EQUIVALENT,
        "the events are (record index, request) pairs with distinct indexes: sorted the same",
    ),
    (
        "harness/durability/writelog.py",
        "export_dm_log_writes",
        r"zeroes = bytes",
        PERFORMANCE,
        "the size of the zero buffer a write-zeroes is exported in pieces of",
    ),
    (
        "harness/durability/writelog.py",
        "sector_crcs",
        r"stop - sector_size \+ 1, sector_size\) => stop - sector_size \+ 2, sector_size\)",
        EQUIVALENT,
        "`stop` and `first` are both the buffer's distance to a sector boundary (stop - first "
        "is a multiple of the sector size), so a range end one byte later adds no element",
    ),
    (
        "harness/durability/writelog.py",
        "sector_packer",
        r"_sector_packers\.get\(\(sector_size, count\)\) => get\(None\)|^entry = None$",
        PERFORMANCE,
        "the memo of packers and slices per (sector size, count): without it each call "
        "builds the same packer and slices again",
    ),
    (
        "harness/durability/writelog.py",
        "sector_packer",
        r"_sector_packers\[\(sector_size, count\)\] = entry => = None$",
        PERFORMANCE,
        "the memo of packers and slices per (sector size, count): an entry of None is a miss, "
        "and the call builds the same packer and slices again",
    ),
    (
        "harness/durability/writelog.py",
        "sector_packer",
        r"count <= _SECTOR_CACHE_MAX => count < _SECTOR_CACHE_MAX",
        PERFORMANCE,
        "the memo of packers and slices per (sector size, count): without it, or with one entry "
        "fewer, each call builds the same packer and slices again",
    ),
    (
        "harness/durability/writelog.py",
        "aligned_sector_crcs",
        r"mv = buf if isinstance\(buf, memoryview\) else memoryview\(buf\) => "
        r"\(isinstance\(buf, memoryview\)\) (and False|or True)",
        EQUIVALENT,
        "a memoryview of a memoryview, and bytes or a bytearray sliced directly, give the same "
        "sector slices: the CRCs are the same",
    ),
    (
        "harness/durability/writelog.py",
        "crc_bytes",
        r'array\("I", crcs\)',
        PLATFORM,
        "the byte swap of a big-endian host (`_CRC_BIG_ENDIAN_HOST`); the figures come from a "
        "little-endian one, where the branch never runs",
    ),
    (
        "harness/durability/writelog.py",
        "_parse_log_header",
        r"LogHeader\(sector_size, LogFlags\(flags\), created\) => LogFlags\(flags\), None\)$",
        UNUSED,
        "a write log header's created_ns: log_writes writes 0 there and nothing reads it back",
    ),
    (
        "harness/durability/writelog.py",
        "_shift_table",
        r"^tables = _shift_tables\.get\(sector_size\)$"
        r" => ^tables = (None|_shift_tables\.get\(None\))$",
        PERFORMANCE,
        "the memo of the shift tables per sector size: without it each span_crc builds the "
        "same four tables again",
    ),
    (
        "harness/durability/writelog.py",
        "_shift_table",
        r"for b in range\(256\)\] for k => for b in range\(257\)\] for k",
        EQUIVALENT,
        "a 257th table entry is never looked up: span_crc indexes the tables with bytes "
        "(& 255, and >> 24 of a 32-bit CRC)",
    ),
    (
        "harness/durability/writelog.py",
        "read_log",
        r'\.decode\("utf-8", "replace"\) => \.decode\("UTF-8", "replace"\)',
        EQUIVALENT,
        "codec names are looked up case-insensitively: the same codec",
    ),
    (
        "harness/durability/writelog.py",
        "read_log",
        r"^header = _parse_log_header\(data, path\)$ => _parse_log_header\(data, None\)$",
        MESSAGE,
        "the path only names the log in _parse_log_header's errors",
    ),
    (
        "harness/durability/writelog.py",
        "unacknowledged",
        r"for s in range\(offset // ss, -\(-\(offset \+ length\) // ss\)\)\}"
        r" => for s in range\(-\(-\(offset \+ length\) // ss\)\)\}",
        EQUIVALENT,
        "the sectors looked up then include those below each span: their newest requests are "
        "found as well, and the loop that decides reads only each span's own sectors",
    ),
    (
        "harness/durability/writelog.py",
        "unacknowledged",
        r"^hi = bisect\.bisect_left\(wanted, -\(-\(r\.offset \+ r\.length\) // ss\)\)$"
        r" => \(r\.offset \+ r\.length\) / ss\)\)$",
        EQUIVALENT,
        "`wanted` holds whole sector numbers: the first at or above end / ss is the first at or "
        "above its ceiling (the quotient of a power-of-two sector size is exact below 2**53)",
    ),
    (
        "harness/durability/writelog.py",
        "LogHeader.pack",
        r"^0,$ => ^1,$",
        EQUIVALENT,
        "the CRC field's placeholder, cut off by [:-4] before the real CRC is appended",
    ),
    (
        "harness/durability/writelog.py",
        "LogWriter.__init__",
        r"O_TRUNC \| os\.O_CLOEXEC, 0o644\) => O_TRUNC \| os\.O_CLOEXEC(, 421|, )\)$",
        EQUIVALENT,
        "the write log's permission bits (os.open's mode); the process that opens it owns it",
    ),
    (
        "harness/durability/writelog.py",
        "LogWriter.__init__",
        r"O_TRUNC \| os\.O_CLOEXEC, 0o644\) => O_TRUNC & os\.O_CLOEXEC, 0o644\)$",
        EQUIVALENT,
        "os.O_TRUNC & os.O_CLOEXEC is 0: this branch opens only a missing or empty file (nothing "
        "to truncate), and without O_CLOEXEC a child started by exec inherits a descriptor it "
        "never writes to",
    ),
    (
        "harness/durability/writelog.py",
        "LogWriter.__init__",
        r"MappedAppender\(self\.path, self\._fd, size\) => MappedAppender\(None, ",
        MESSAGE,
        "MappedAppender's path only names the file in its errors (it writes through the "
        "descriptor)",
    ),
    (
        "harness/durability/writelog.py",
        "LogWriter.append",
        r"_pack_body\(rtype, op, flags, 0, => _pack_body\(rtype, op, flags, 1, ",
        EQUIVALENT,
        "the record's reserved byte: read_log unpacks it and reads it nowhere (the record's CRC "
        "is computed over it as written)",
    ),
    (
        "harness/durability/writelog.py",
        "LogWriter.append",
        r"payload\[0\] if len\(payload\) == 1 else => \(len\(payload\) == 1\) and False",
        EQUIVALENT,
        'b"".join of one part gives that part\'s bytes',
    ),
    (
        "harness/durability/writelog.py",
        "LogWriter.close",
        r"^self\._fd = -1$ => ^self\._fd = -2$",
        EQUIVALENT,
        "any negative descriptor says closed (close tests >= 0)",
    ),
    (
        "harness/durability/writelog.py",
        "LogWriter.__init__",
        r"^self\.header = (old\.)?header$",
        UNUSED,
        "nothing read `LogWriter.header`; the attribute is gone since this run (1a9a9d9)",
    ),
    # journal.py
    (
        "harness/durability/journal.py",
        "JournalWriter.create",
        r"O_TRUNC \| os\.O_CLOEXEC, 0o644\) => O_TRUNC \| os\.O_CLOEXEC(, 421|, )\)",
        EQUIVALENT,
        "the journal file's permission bits (os.open's mode); the process that opens it owns it",
    ),
    (
        "harness/durability/journal.py",
        "compact_journal",
        r'"\.compact"',
        EQUIVALENT,
        "the temporary file's name beside the journal, replaced onto it before anything reads it",
    ),
    (
        "harness/durability/journal.py",
        "compact_journal",
        r"^if not isinstance\(data, bytes\):",
        EQUIVALENT,
        "read_journal returns bytes only for an empty file, which it refuses first (no "
        "header): `data` is always a mapping here, and one left unclosed is closed when the "
        "function returns and drops the last reference to it",
    ),
    (
        "harness/durability/journal.py",
        "_refuse_mid_file_damage",
        r"^limit = |finditer",
        PERFORMANCE,
        "the scan for good records after a damaged one is bounded (to 16 MiB and the "
        "last non-zero byte) for speed; another bound scans more or less of what is zeroes",
    ),
    (
        "harness/durability/journal.py",
        "JournalWriter.durable",
        r"DURABLE, int\(reason\), 0, index, => DURABLE, int\(reason\), 1, index,",
        UNUSED,
        "a DURABLE record's seq field: read_journal reads only its `a` and flags (seq is "
        "PREIMAGE's and COMPLETE's, the format says)",
    ),
    (
        "harness/durability/journal.py",
        "_refuse_mid_file_damage",
        r"^break$",
        EQUIVALENT,
        "the loop is the function's last statement: break and return leave it alike",
    ),
    (
        "harness/durability/journal.py",
        "_parse_header",
        r"JOURNAL_HEADER\.unpack_from\(data, 0\) => JOURNAL_HEADER\.unpack_from\(data, \)$",
        EQUIVALENT,
        "unpack_from's offset defaults to 0",
    ),
    (
        "harness/durability/journal.py",
        "read_journal",
        r'^with open\(path, "rb"\) as f: => ^with open\(path, \) as f:$',
        EQUIVALENT,
        "the file object serves only its descriptor (fstat and a read-only mmap); text mode "
        "opens the same descriptor read-only and nothing is read through the wrapper",
    ),
    (
        "harness/durability/journal.py",
        "read_journal",
        r"(_parse_header\(data, path\)|_records\(data, path, header\.record_seed\)) => "
        r"(_parse_header\(data, None\)|_records\(data, None, header\.record_seed\))",
        MESSAGE,
        "_parse_header, _records and _refuse_mid_file_damage use the path only in their "
        "error messages",
    ),
    (
        "harness/durability/journal.py",
        "JournalHeader.pack",
        r"^0,$ => ^1,$",
        UNUSED,
        "the header's reserved field (_parse_header unpacks it to `_r` and reads it no more), "
        "and the CRC's slot, which `[:-4]` cuts off before the real CRC is appended; the "
        "writer and the reader seed record CRCs with the same header CRC either way",
    ),
    (
        "harness/durability/journal.py",
        "JournalWriter.__init__",
        r"(MappedAppender\((Path\(path\)|self\.path), fd, size\)|^self\.path = Path\(path\)$) => "
        r"(MappedAppender\(None, fd, size\)|^self\.path = None$)",
        MESSAGE,
        "the path is only passed to MappedAppender, which uses it only in its error messages "
        "(the writer's own `path` attribute, which nothing read, is gone)",
    ),
    (
        "harness/durability/journal.py",
        "JournalWriter._encode",
        r"_pack_body\(rtype, flags, 0, => _pack_body\(rtype, flags, 1,",
        UNUSED,
        "a record's reserved field: read_journal unpacks it to `_r` and reads it no more",
    ),
    (
        "harness/durability/journal.py",
        "JournalWriter.close",
        r"^self\._fd = -1$ => ^self\._fd = -2$",
        EQUIVALENT,
        "any negative descriptor marks the writer closed (close tests `>= 0`)",
    ),
    (
        "harness/durability/journal.py",
        "JournalWriter.opened",
        r"_encode\(JournalRecordType\.OPEN, 0, 0, => "
        r"_encode\(JournalRecordType\.OPEN, (1, 0|0, 1),",
        UNUSED,
        "an OPEN record's flags and seq: read_journal only counts OPEN records by their type",
    ),
    # cut.py
    (
        "harness/durability/cut.py",
        "_choose",
        r"^never = 1 << 62 => ^never = (2 << 62|1 << 63)",
        EQUIVALENT,
        "`never` only has to sort after every completion index, and the indexes count one "
        "journal's writes (far below 2**62): a larger constant sorts the writes the same",
    ),
    (
        "harness/durability/cut.py",
        "_choose",
        r"rng\.random\(\) < 0\.5 => rng\.random\(\) <= 0\.5",
        EQUIVALENT,
        "differs only when random() draws exactly 0.5 (one of its 2**53 values), and then it "
        "only picks another state the same policy allows for that seed; the oracle judges "
        "whichever state the cut leaves",
    ),
    (
        "harness/durability/cut.py",
        "_choose",
        r"^first = p\.offset // granularity => ^first = p\.offset / granularity",
        EQUIVALENT,
        "pre-image offsets are aligned to the sector size (journal format), so the quotient "
        "is an integral float: equal to, and hashing as, the int block `survives` looks up",
    ),
    (
        "harness/durability/cut.py",
        "_writes",
        r"p\.offset, p\.offset \+ p\.length\)$ => p\.offset, p\.offset - p\.length\)$",
        EQUIVALENT,
        "the default span's end is replaced at once by max(end, offset + length), which is "
        "offset + length either way (a length is never negative)",
    ),
    (
        "harness/durability/cut.py",
        "apply_cut",
        r"sorted\(restores, key=lambda r: r\[0\]\) => sorted\(restores, (key=None)?\)",
        EQUIVALENT,
        "one restore per block, at block * sector size: the offsets differ, so the pairs sort "
        "by offset alone and never compare their buffers",
    ),
    (
        "harness/durability/cut.py",
        "apply_cut",
        r"^lost_blocks = reverted_blocks\.get\(w\.seq, 0\) => "
        r"^lost_blocks = reverted_blocks\.get\(w\.seq, (None|1|)\)$",
        EQUIVALENT,
        "lost_blocks is read only for a write reported reverted (lost, or torn short of a "
        "block); such a write has a block whose chain reverts past it, so reverted_blocks "
        "always holds its seq and the default is never used",
    ),
    (
        "harness/durability/cut.py",
        "apply_cut",
        r"^survived_any = chosen if isinstance\(chosen, bool\) else bool\(chosen\) => "
        r"\(isinstance\(chosen, bool\)\) (and False|or True) else bool\(chosen\)",
        EQUIVALENT,
        "survived_any is only tested for truth: a bool is its own bool(), a set's truth is "
        "bool(set)",
    ),
    (
        "harness/durability/cut.py",
        "apply_cut",
        r"^if not isinstance\(data, bytes\):$ => ^if isinstance\(data, bytes\):$",
        EQUIVALENT,
        "data is always a map here (read_journal gives bytes only for an empty file, whose "
        "header it rejects); not closing it leaves the map to CPython, which closes it when "
        "apply_cut returns, and nothing reads it in between",
    ),
    # mapped.py
    (
        "harness/durability/mapped.py",
        "last_nonzero",
        r"step",
        PERFORMANCE,
        "the step of the backwards search for the last non-zero byte",
    ),
    (
        "harness/durability/mapped.py",
        "MappedAppender.__init__",
        r"^self\.path = path$ => ^self\.path = None$",
        MESSAGE,
        "the path appears only in _grow's and restart's error messages",
    ),
    (
        "harness/durability/mapped.py",
        "MappedAppender.__init__",
        r"^(self\._capacity = 0|self\._grow\(size \+ 1\))$ => "
        r"^(self\._capacity = 1|self\._grow\(size (- 1|\+ 2)\))$",
        PERFORMANCE,
        "the first mapping's size (at least the records plus 32 KiB less a byte, in whole "
        "pages; a first preallocation from byte 1 still allocates byte 0's block): append "
        "grows the mapping before any store past it, so only how often it grows changes",
    ),
    (
        "harness/durability/mapped.py",
        "MappedAppender._grow",
        r"min\(2 \* self\._capacity, self\._capacity \+ _MAX_STEP\) => "
        r"min\((3 \* self\._capacity, self\._capacity \+|"
        r"2 \* self\._capacity, self\._capacity -) _MAX_STEP\)",
        PERFORMANCE,
        "how far the mapping grows past what is needed (always at least need + 32 KiB): "
        "only how often it grows changes",
    ),
    (
        "harness/durability/mapped.py",
        "MappedAppender._grow",
        r"cap - self\._capacity\)$ => cap \+ self\._capacity\)$",
        PERFORMANCE,
        "preallocates more zeroes past the mapping: the readers take an all-zero tail for "
        "padding and close() cuts it off; the blocks of the mapping are allocated either way",
    ),
    (
        "harness/durability/mapped.py",
        "MappedAppender.append",
        r"^if end > self\._capacity:$ => ^if end >= self\._capacity:$",
        PERFORMANCE,
        "grows the mapping when a record would fill it exactly, one record early",
    ),
    # delta.py
    (
        "harness/durability/delta.py",
        "Delta._starts",
        None,
        PERFORMANCE,
        "a cache of the runs' first sectors, recomputed when it is missing",
    ),
    (
        "harness/durability/delta.py",
        "_patch",
        r"bisect_right|^if lo >= end|^break$|^if a < b",
        EQUIVALENT,
        "runs start on whole sectors and patch nothing outside [offset, end): starting "
        "one run early, on a fraction, or going one run further copies the same bytes",
    ),
    (
        "harness/durability/delta.py",
        "write_delta",
        r"^0,$",
        UNUSED,
        "the header's reserved field, which no reader reads",
    ),
    # oracle.py
    (
        "harness/durability/oracle.py",
        "_classify",
        r"meta\[0\] > newest\[0\] => meta\[1\] > newest\[0\]|meta\[0\] >= newest\[0\]",
        EQUIVALENT,
        "a sector's versions come in submission order and no two share a submission index: "
        "the last durable one listed is the newest either way",
    ),
    (
        "harness/durability/oracle.py",
        "_classify",
        r"else -1$|meta\[1\] > horizon\] => else (\+1|-2)$|meta\[1\] >= horizon\]",
        EQUIVALENT,
        "a log's first record is its OPEN (index 0), so every request completes at index 2 or "
        "later, and a completion never shares its index with a submission",
    ),
    (
        "harness/durability/oracle.py",
        "_classify",
        r"return SectorState\.MUST, None, 0$ => return SectorState\.MUST, None, 1$",
        EQUIVALENT,
        "check reads the found seq only of a `may` verdict (the unflushed count) and of a "
        "lost or corrupt one (its violation): a `must` verdict's is dropped",
    ),
    (
        "harness/durability/oracle.py",
        "_classify",
        r"meta\[0\] < latest and crc == found => meta\[0\] <= latest and crc == found",
        EQUIVALENT,
        "the only version submitted at `latest` is the discard itself (submission indexes "
        "are distinct), whose CRC is the zeroes' (returned just above) or -1 (a sector it "
        "covers in part), which matches no CRC",
    ),
    (
        "harness/durability/oracle.py",
        "_durable_flags",
        r"completed_ok\), default=-1$ => completed_ok\), default=(\+1|-2)$",
        EQUIVALENT,
        "with no completed flush, last_flush is compared with completion indexes "
        "(`< last_flush`), which are 2 or more (the log's OPEN is record 0, a request's SUBMIT "
        "comes before its COMPLETE): -2, -1 and +1 are below them all",
    ),
    (
        "harness/durability/oracle.py",
        "_durable_flags",
        r"complete_index < last_flush,$ => complete_index <= last_flush,$",
        EQUIVALENT,
        "last_flush is a flush's SUBMIT record index, compared with completion indexes: "
        "another record's index, never equal",
    ),
    (
        "harness/durability/oracle.py",
        "check",
        r"^default=-1,$ => ^default=(\+1|-2),$",
        EQUIVALENT,
        "with no completed flush, `settle` is compared with completion indexes (`> settle`), "
        "which are 2 or more (the log's OPEN is record 0): -2, -1 and +1 are below them all",
    ),
    (
        "harness/durability/oracle.py",
        "check",
        r"wlog\.requests\), default=-1$ => wlog\.requests\), (default=(None|\+1|-2))?\)?$",
        EQUIVALENT,
        "the second `settle` is computed only when the log holds a flush still in flight, so "
        "the requests are never empty and max()'s default is never used",
    ),
    (
        "harness/durability/oracle.py",
        "check",
        r"complete_index or 0\) for => complete_index or 1\) for",
        EQUIVALENT,
        "the `or` stands in for a request in flight (no completion index), where max() takes "
        "its SUBMIT record index instead, 1 or more (the log's OPEN is record 0)",
    ),
    (
        "harness/durability/oracle.py",
        "check",
        r"zero_spans\[count\] = zlib\.crc32\(bytes\(count \* ss\)\) => = None$",
        PERFORMANCE,
        "a span's CRC is a shortcut: one CRC compares the whole span; without it the span's "
        "sectors are compared one CRC each, and decide the same",
    ),
    (
        "harness/durability/oracle.py",
        "check",
        r"^span_crc = (zero_spans\[count\]|r\.span_crc)$ => ^span_crc = None$",
        PERFORMANCE,
        "a span's CRC is a shortcut: one CRC compares the whole span; without it the span's "
        "sectors are compared one CRC each, and decide the same",
    ),
    (
        "harness/durability/oracle.py",
        "check",
        r"shared = multi_keys & range\(first, first \+ count\) if multi else _NONE => "
        r"if \(multi\) or True else|& range\(first \+ count\) if multi",
        PERFORMANCE,
        "which spans take the whole-span shortcut: a span that does not (here: also when "
        "nothing or a sector outside it was written twice) judges each of its own sectors on "
        "its own, with the same verdicts",
    ),
    (
        "harness/durability/oracle.py",
        "check",
        r"held = span_crc is not None and img\.span_crc\(first, count\) == span_crc",
        PERFORMANCE,
        "the whole-span CRC shortcut: when it is skipped or fails, the span's sector CRCs are "
        "read and compared, and decide the same",
    ),
    (
        "harness/durability/oracle.py",
        "check",
        r"^held = found == crcs$ => ^held = (None|False)$",
        PERFORMANCE,
        "the second whole-span shortcut (the sector CRCs compared as a list): without it each "
        "sector of the span is judged on its own below, with the same verdicts",
    ),
    (
        "harness/durability/oracle.py",
        "check",
        r"if offset % ss or length % ss: => if offset / ss or|or length / ss:",
        EQUIVALENT,
        "for a sector-aligned request the sectors it covers in part are none (its first and "
        "last sectors lie in its span), so entering the branch adds nothing",
    ),
    (
        "harness/durability/oracle.py",
        "check",
        r"\[-1\], partial, None\) => \[-2\], partial, None\)",
        EQUIVALENT,
        "the placeholder CRC of a sector covered in part must match no content: CRC-32s are "
        "unsigned, so neither -1 nor -2 is one (+1 is, and a test with that CRC kills it)",
    ),
    (
        "harness/durability/oracle.py",
        "check",
        r"pre_events\.sort\(key=lambda e: e\[0\], reverse=True\) => "
        r"pre_events\.sort\((key=None, )?reverse=True\)",
        EQUIVALENT,
        "pre-image events are (record index, first sector, CRCs), and no two share a record "
        "index: sorted as whole tuples they sort by their index",
    ),
    (
        "harness/durability/oracle.py",
        "check",
        r"zip\(range\(first, first \+ len\(pre\)\), pre, strict=False\)"
        r"|zip\(keys\[i:j\], img\.crcs\(keys\[i\], j - i\), strict=True\)",
        EQUIVALENT,
        "both zips pair lists of one length (a range of len(pre) with pre; j - i keys with "
        "the j - i CRCs read for them): strict or not, they pair the same",
    ),
    (
        "harness/durability/oracle.py",
        "check",
        r"keys\[j\] == keys\[j - 1\] \+ 1 and j - i < 8192 => keys\[j - 1\] - 1"
        r"|keys\[j - 2\] \+ 1|j \+ i < 8192|j - i <= 8192|j - i < 8193",
        PERFORMANCE,
        "how the sectors written more than once are grouped into reads: each group stays a "
        "run of contiguous sectors (shorter, single, or one longer), so each sector's CRC is "
        "read once and classified the same",
    ),
    (
        "harness/durability/oracle.py",
        "check",
        r"elif -s > worst\[0\]\[0\]: => elif -s >= worst\[0\]\[0\]:",
        EQUIVALENT,
        "each sector is classified once, so no two violations share a sector: never equal",
    ),
    (
        "harness/durability/oracle.py",
        "check",
        r"if c == crcs\[i\] and meta\[4\] != _ANY: => meta\[4\] == _ANY:",
        EQUIVALENT,
        "a shortcut for a sector holding its one version: _classify, given that version, "
        "decides the same (must when durable or unchanged, else may, unflushed by the same "
        "completion test); a placeholder of a sector covered in part never equals a CRC",
    ),
    (
        "harness/durability/oracle.py",
        "check",
        r"if r\.crcs is not None else \[\] => if \(r\.crcs is not None\) or True",
        EQUIVALENT,
        "read_log gives every write its sector CRCs (an empty array for a write inside one "
        "sector); only a Request built by hand lacks them, and check reads logs",
    ),
    (
        "harness/durability/oracle.py",
        "_Image.__enter__",
        r'open\(self\.path, "rb"\)',
        EQUIVALENT,
        "the file is only measured and mapped through its descriptor (fstat, mmap), which "
        "text and binary mode open alike",
    ),
    (
        "harness/durability/oracle.py",
        "_Image.__init__",
        r"^self\.size = 0$ => ^self\.size = (None|1)$",
        EQUIVALENT,
        "__enter__ sets the size before anything reads it",
    ),
    (
        "harness/durability/oracle.py",
        "_Image.__init__",
        r'^self\._view = memoryview\(b""\)$ => ^self\._view = memoryview\(b"XXXX"\)$',
        EQUIVALENT,
        "__enter__ sets the size, and replaces the view unless the file is empty; an empty "
        "file's reads all start at or past its end and never index the view",
    ),
    (
        "harness/durability/oracle.py",
        "_Image._bytes",
        r"^if end <= self\.size:$ => ^if end < self\.size:$",
        EQUIVALENT,
        "the padded path for a read that ends exactly at the file's end gives the same bytes: "
        "the whole slice, padded with no zeroes",
    ),
    (
        "harness/durability/oracle.py",
        "_Image._bytes",
        r'if start < self\.size else b""$ => if start <= self\.size|or True else',
        EQUIVALENT,
        "a read that starts at or past the file's end slices nothing from it: an empty head, "
        "padded with zeroes, either way",
    ),
    (
        "harness/durability/oracle.py",
        "_Image._bytes",
        r"head\.ljust\(end - start, => head\.ljust\(end \+ start,",
        PERFORMANCE,
        "a read past the file's end padded longer than asked: crcs() reads only the sectors "
        "asked for, and the span CRC over all of it then fails, so they are compared one by one",
    ),
    (
        "harness/durability/oracle.py",
        "OracleReport.summary",
        None,
        MESSAGE,
        "one line for people; the verdict reads `ok` and the counts",
    ),
    # states.py
    (
        "harness/explore/states.py",
        "_at_point",
        r"_prefixes\(point, pending",
        UNUSED,
        "`_prefixes` never read its point; the parameter is gone since this run (722c380)",
    ),
    (
        "harness/explore/states.py",
        "Timeline.__init__",
        r"^self\.keep = keep$",
        UNUSED,
        "nothing read `Timeline.keep`; the attribute is gone since this run (526e596)",
    ),
    (
        "harness/explore/states.py",
        "find_state",
        r"ids\.append|^sample = ",
        MESSAGE,
        "the state ids the error message shows as examples",
    ),
    (
        "harness/explore/states.py",
        "Write.to_json",
        None,
        REPORT,
        "explore.json's description of a write a state lost (attribution); read by people",
    ),
    (
        "harness/explore/states.py",
        "Timeline.__init__",
        r"NEVER if done is None else done\)$ => NEVER if \(done is None\) and False else done\)$",
        EQUIVALENT,
        "`flushes` holds only flushes that completed with status 0, and a request gets its "
        "status with its COMPLETE record's index (read_log): `done` is never None",
    ),
    (
        "harness/explore/states.py",
        "Timeline.__init__",
        r"f\.complete_index is not None\)$ => f\.complete_index is None\)$",
        REPORT,
        "flush_done counts flush epochs only (Write.epoch, Point.epoch), which explore.json and "
        "the report show (LostWrite.flush_epoch); no state, cut or verdict reads them",
    ),
    (
        "harness/explore/states.py",
        "Timeline.__init__",
        r"NEVER if done == NEVER else done \+ 1$ => \(done == NEVER\) and False",
        EQUIVALENT,
        "NEVER + 1 is as far beyond every record index as NEVER: durable_at is compared only "
        "with record indexes (point.at) and, in the overlay, with NEVER itself (`< 1 << 62`)",
    ),
    (
        "harness/explore/states.py",
        "Timeline.__init__",
        r"^r\.fua,$ => ^None,$",
        REPORT,
        "Write.fua is read only into LostWrite (explore.json and the report); when a write is "
        "durable is computed from the request's own fua",
    ),
    (
        "harness/explore/states.py",
        "Timeline._points",
        r'\(PointKind\.END, "end"\)',
        REPORT,
        "the end point's label, shown in explore.json and the report; only the ack labels are "
        "parsed (cell.py), and points are told apart by kind and record",
    ),
    ("harness/explore/states.py", "parse_point_kind", None, UNUSED, "nothing calls it"),
    ("harness/explore/states.py", "Timeline.submitted", None, UNUSED, "nothing calls it"),
    (
        "harness/explore/states.py",
        "Point.to_json",
        r'"(kinds|labels|flush_epoch)"',
        REPORT,
        "explore.json's words for a point; a state read back uses only its number and record",
    ),
    (
        "harness/explore/states.py",
        "Point.from_json",
        r'raw\.get\("(flush_epoch|kinds|labels)"',
        REPORT,
        "a point's epoch, kinds and labels read back (defaults for a file without them, which "
        "to_json never writes); nothing but explore.json and the report reads them, and a "
        "state checked against its recording takes the recording's own point",
    ),
    (
        "harness/explore/states.py",
        "Timeline.durable",
        r"submit_index < point.at",
        EQUIVALENT,
        "a write submitted at the point's record cannot be durable there (durable_at > submit)",
    ),
    (
        "harness/explore/states.py",
        "_random",
        r"^for k in range\(4 \* ",
        PERFORMANCE,
        "how many random candidates are drawn at a point before the policy stops",
    ),
    (
        "harness/explore/states.py",
        "_random",
        r"rng\.random\(\) < 0\.5",
        EQUIVALENT,
        "differs only when the generator returns exactly 0.5",
    ),
    (
        "harness/explore/states.py",
        "_torn",
        r"^for k in range\(4 \* ",
        PERFORMANCE,
        "how many torn candidates are drawn at a point before the policy stops",
    ),
    (
        "harness/explore/states.py",
        "_torn",
        r"rng\.random\(\) < 0\.5",
        EQUIVALENT,
        "differs only when the generator returns exactly 0.5",
    ),
    (
        "harness/explore/states.py",
        "_at_point",
        r"^if room <= 0:$|^while generators and room",
        EQUIVALENT,
        "room is positive whenever the loop is entered and checked after each state",
    ),
    (
        "harness/explore/states.py",
        "_at_point",
        r"^continue$",
        ORDER,
        "the round robin over the policies starts its next round early: the same candidates "
        "in another order, so a per-point budget may keep others of them; each is a state the "
        "contract allows, and every policy still contributes",
    ),
    (
        "harness/explore/states.py",
        "Timeline.pending",
        r"self\._pending\.get|len\(self\._pending\) > 256:",
        PERFORMANCE,
        "a cache of pending writes per point (and the size at which it is emptied), "
        "recomputed when it misses",
    ),
    (
        "harness/explore/states.py",
        "_prefixes",
        r"^count = min\(per_point, n - 1\)",
        EQUIVALENT,
        "the prefix lengths k are deduplicated: counts of n - 1 and n + 1 give the same set "
        "(checked for n < 80, per_point < 100)",
    ),
    # delta.py, mapped.py
    (
        "harness/durability/delta.py",
        "read_delta",
        r"^last_end = -1$",
        EQUIVALENT,
        "run starts are never negative",
    ),
    (
        "harness/durability/mapped.py",
        "MappedAppender.restart",
        r"^if old > self.size",
        EQUIVALENT,
        "zeroing an empty range changes nothing",
    ),
    # stream.py
    (
        "harness/workloads/stream.py",
        "*.__init__",
        r"^def __init__\(|^self\.name = name$",
        MESSAGE,
        "a stream's name appears only in its error messages",
    ),
    (
        "harness/workloads/stream.py",
        "*",
        r"self\.lines",
        UNUSED,
        "`lines` is counted and never read (explorer/record.py sets it on a copy)",
    ),
    (
        "harness/workloads/stream.py",
        "AckStream._line",
        r"split\(None, 1\)\[0\]",
        EQUIVALENT,
        "the first word is the same however many times the rest is split",
    ),
    (
        "harness/workloads/stream.py",
        "GuestStream.__init__",
        r"^self\.(stderr|started) = ",
        EQUIVALENT,
        "start() and the end of the run set them before anything reads them",
    ),
    (
        "harness/workloads/stream.py",
        "GuestStream.__init__",
        r"^self\.error: ",
        EQUIVALENT,
        "failure() asks whether the error is a GuestError; None and an empty string are not",
    ),
    (
        "harness/workloads/stream.py",
        "GuestStream.__init__",
        r"AckStream\(name\)",
        MESSAGE,
        "a stream's name appears only in its error messages",
    ),
    (
        "harness/workloads/stream.py",
        "GuestStream.__init__",
        r"threading\.Thread",
        WAITING,
        "the reader thread's name and whether it keeps the interpreter alive at exit",
    ),
    (
        "harness/workloads/stream.py",
        "GuestStream._run",
        r"^self\.ended = time\.monotonic\(\)",
        REPORT,
        "when the command's channel closed: the run's own time in the cell's notes "
        "(`run_seconds`), for people",
    ),
    (
        "harness/workloads/stream.py",
        "GuestStream._run",
        r"^self\.error = exc$",
        EQUIVALENT,
        "this branch holds errors that are not GuestErrors, which failure() does not report",
    ),
    (
        "harness/workloads/stream.py",
        "GuestStream._run",
        r"buffering=1",
        REPORT,
        "how often acks.txt (the cell's copy of the lines) is flushed to its file",
    ),
    (
        "harness/workloads/stream.py",
        "GuestStream.failure",
        r"\[-300:\]",
        MESSAGE,
        "how much of the run's stderr the failure message quotes",
    ),
    (
        "harness/workloads/stream.py",
        "*join",
        r"join\(timeout\)",
        WAITING,
        "how long to wait for the reader thread after the guest is gone",
    ),
    (
        "harness/workloads/stream.py",
        "StreamRun.after_cut",
        r"join\(timeout\)",
        WAITING,
        "how long to wait for the reader thread after the guest is gone",
    ),
    (
        "harness/workloads/stream.py",
        "StreamRun.after_backend_crash",
        r"RESUME_ACKS|RESUME_SECONDS|timeout=30|time_left\(60\)",
        WAITING,
        "how long the workload runs on after a backend crash before it is stopped",
    ),
    (
        "harness/workloads/stream.py",
        "StreamRun.__init__",
        r'rsplit\("/", 1\)\[-1\]',
        EQUIVALENT,
        "the last path component is the same however the path is split",
    ),
    (
        "harness/workloads/stream.py",
        "StreamRun.__init__",
        r"command, name, ctx\.directory",
        REPORT,
        "the run's name (messages, the thread) and the name of its acks.txt artifact",
    ),
    (
        "harness/workloads/stream.py",
        "StreamRun.__init__",
        r"super\(\).__init__\(fault\)",
        UNUSED,
        "Run.fault is stored and never read",
    ),
    # command.py
    (
        "harness/workloads/command.py",
        "Command.start",
        r"TokenStream\(re\.compile",
        MESSAGE,
        "a stream's name appears only in its error messages",
    ),
    (
        "harness/workloads/command.py",
        "Command.start",
        r"return StreamRun\(",
        UNUSED,
        "the run's name appears in messages and the thread's name; Run.fault is never read",
    ),
    (
        "harness/workloads/command.py",
        "Command.start",
        r"\[-300:\]",
        MESSAGE,
        "how much of the setup's output the error quotes",
    ),
    (
        "harness/workloads/command.py",
        "Command.parse",
        r'^for key, value in \(\("run"',
        MESSAGE,
        "the field an empty-command error names",
    ),
    (
        "harness/workloads/command.py",
        "Command.check",
        r"^assert isinstance",
        EQUIVALENT,
        "a type assertion: every run of this workload is a StreamRun over a TokenStream",
    ),
    (
        "harness/workloads/command.py",
        "Command.check",
        r"stderr_tail=|\[-300:\]",
        MESSAGE,
        "how much of the check's stderr the observation quotes",
    ),
    (
        "harness/workloads/command.py",
        "CommandObservation.summary",
        None,
        MESSAGE,
        "the observation in words; the verdict reads loss and the tally",
    ),
    (
        "harness/workloads/command.py",
        "_log",
        None,
        REPORT,
        "the name and text of the cell's checks.log and setup.log",
    ),
    # minimize.py
    (
        "harness/explore/minimize.py",
        "ddmin",
        r"^n = |, n, reduced = |n > 2|^reduced = False$",
        PERFORMANCE,
        _DDMIN_ORDER,
    ),
    (
        "harness/explore/minimize.py",
        "ddmin",
        r"^if max_checks is not None and checks >= max",
        EQUIVALENT,
        "past the budget every new subset tests as passing (test() refuses to check "
        "it), so going on only walks cached results: the result still fails, within budget",
    ),
    (
        "harness/explore/minimize.py",
        "_split",
        r"^end = start|^if end > start",
        PERFORMANCE,
        _DDMIN_ORDER,
    ),
    (
        "harness/explore/minimize.py",
        "minimize_state",
        r"max_checks: int \| None = 200",
        PERFORMANCE,
        "the default budget of checks",
    ),
)


def function_of(mutant: str) -> tuple[str, str]:
    """(module path, "Class.method" or "function") of a mutmut mutant name."""
    module = module_of(mutant)
    dotted = module[: -len(".py")].replace("/", ".")
    local = re.sub(r"__mutmut_\d+$", "", mutant[len(dotted) + 1 :])
    if local.startswith("x\u01c1"):
        return module, ".".join(p for p in local[1:].split("\u01c1") if p)
    return module, local[2:] if local.startswith("x_") else local


def changed(diff: str) -> tuple[list[str], list[str]]:
    """The lines a mutant's diff removes and adds, stripped."""
    minus = [
        line[1:].strip() for line in diff.splitlines() if line[:1] == "-" and line[:3] != "---"
    ]
    plus = [line[1:].strip() for line in diff.splitlines() if line[:1] == "+" and line[:3] != "+++"]
    return minus, plus


_message_cache: dict[tuple[str, str], set[str]] = {}


def message_lines(module: str, function: str, root: Path = ROOT) -> set[str]:
    """Lines of `function` that only build text: raise statements, log and warning calls."""
    key = (module, function)
    if key not in _message_cache:
        source = (root / module).read_text()
        tree = ast.parse(source)
        node: ast.AST = tree
        for part in function.split("."):
            node = next(
                n
                for n in ast.iter_child_nodes(node)
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                and n.name == part
            )
        lines = source.splitlines()
        found: set[str] = set()
        for n in ast.walk(node):
            text = isinstance(n, ast.Raise) or (
                isinstance(n, ast.Call)
                and isinstance(n.func, ast.Attribute)
                and isinstance(n.func.value, ast.Name)
                and n.func.value.id in ("log", "logging", "warnings")
            )
            if text and n.end_lineno is not None:
                found.update(x.strip() for x in lines[n.lineno - 1 : n.end_lineno])
        _message_cache[key] = found
    return _message_cache[key]


def judge(mutant: str, diff: str, root: Path = ROOT) -> tuple[str, str] | None:
    """(kind, why) for a survivor that cannot change a verdict; None: unjudged."""
    module, function = function_of(mutant)
    minus, plus = changed(diff)
    for r_module, r_function, pattern, kind, why in RULES:
        if r_module != module or not fnmatch.fnmatchcase(function, r_function):
            continue
        if pattern is None:
            return kind, why
        removed, _, added = pattern.partition(" => ")  # "removed => added": both must match
        if any(re.search(removed, line) for line in minus) and (
            not added or any(re.search(added, line) for line in plus)
        ):
            return kind, why
    try:
        texts = message_lines(module, function, root)
    except (OSError, StopIteration, SyntaxError):
        return None
    if minus and all(line in texts for line in minus):
        return MESSAGE, "only the words of an error or a log line change"
    return None


def _diff(scratch: Path, name: str) -> str:
    """`mutmut show NAME`: one mutant's diff. mutmut starts anew for each (seconds on a loaded
    machine), so diffs are kept in the scratch directory, by mutant and the module's source."""
    cache_path = scratch / "mutant-diffs.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    source = (scratch / module_of(name)).read_bytes()
    key = f"{name} {hashlib.sha256(source).hexdigest()}"
    if key not in cache:
        cache[key] = _mutmut(scratch, "show", name)
        cache_path.write_text(json.dumps(cache))
    diff: str = cache[key]
    return diff


def _mutmut(scratch: Path, *args: str, log: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the copy, not this tree
    cmd = [sys.executable, "-m", "mutmut", *args]
    if log is None:
        return subprocess.run(
            cmd, cwd=scratch, env=env, capture_output=True, text=True, check=True
        ).stdout
    with open(log, "a") as f:
        subprocess.run(cmd, cwd=scratch, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)
    return ""


_KIND_WORDS = {
    MESSAGE: "message text",
    REPORT: "report only",
    PERFORMANCE: "performance",
    EQUIVALENT: "equivalent",
    UNUSED: "unused",
    WAITING: "waiting",
    ORDER: "search order",
    PLATFORM: "other hosts only",
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


_SPAN = re.compile(r"(\d\d):(\d\d)-(\d\d):(\d\d) UTC")


def _minutes(report: dict[str, Any]) -> str:
    """How long the record's mutmut ran: the sum of its runs' spans when it was made in
    several (a kept run's own clock counts the hours between them too), else its time."""
    spans = [_SPAN.search(run) for run in report.get("runs", [])]
    if spans and all(spans):
        total = sum(
            (int(m[3]) * 60 + int(m[4]) - int(m[1]) * 60 - int(m[2])) % (24 * 60)
            for m in spans
            if m
        )
        return f"{total} minutes in {len(spans)} runs"
    return f"{report['seconds'] / 60:.0f} minutes"


def render_doc(report: dict[str, Any], source: str) -> str:
    """docs/mutation.md from a recorded run: the figures, then every survivor and why."""
    settings = report["settings"]
    lines = [
        "# Mutation testing of the verdict's core",
        "",
        "<!-- Written by `python -m benchmarks.mutation --doc-from "
        f"{source}`; do not edit by hand. -->",
        "",
        "Can the unit tests tell right code from wrong? mutmut makes one small change at a "
        "time (an operator, a constant, a condition, a removed call) in the modules whose "
        "mistakes change a verdict, and runs the unit tests that execute the changed "
        "function; a change no test fails on has *survived*. Every survivor is either "
        "killed by a test or judged here: it cannot change a verdict, and the reason says "
        "why (`RULES` in benchmarks/mutation.py, or, for a change only to the words of an "
        "error or a log line, found in the function's source).",
        "",
        f"Recorded in `{source}`: `{report['command']}`, mutmut {settings['mutmut']}, "
        f"{settings['max_children']} children, {report['date']}, "
        f"{_minutes(report)} (load average before "
        f"{report['load_average']['before'][0]}, after {report['load_average']['after'][0]}).",
        "Score = (killed + timeout) / (all but skipped and not checked). *No tests*: no "
        "unit test in the "
        "selection executes the function (mutmut's stats), so nothing could kill it.",
        "",
    ]
    if report.get("runs"):
        lines += ["How the record was made:", ""]
        lines += [f"- {_cell(run)}" for run in report["runs"]]
        lines.append("")
    if not report.get("complete", True):
        lines += [
            "**This run was stopped before it reached every mutant** (*not checked*); its "
            "score is over the mutants it checked. `--keep` on the same directory goes on "
            "where it stopped.",
            "",
        ]
    lines += [
        "| module | mutants | killed | survived | timeout | no tests | not checked | score "
        "| judged harmless | unjudged |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for module, row in report["modules"].items():
        lines.append(
            f"| `{module}` | {row['mutants']} | {row['killed']} | {row['survived']} "
            f"| {row['timeout']} | {row['no_tests']} | {row.get('not_checked', 0)} "
            f"| {row['score']} | {row.get('judged_harmless', 0)} | {row.get('unjudged', 0)} |"
        )
    t = report["total"]
    judged = sum(v for k, v in report.get("judged", {}).items() if k != "unjudged")
    lines += [
        f"| all | {t['mutants']} | {t['killed']} | {t['survived']} | {t['timeout']} "
        f"| {t['no_tests']} | {t.get('not_checked', 0)} | {t['score']} | {judged} "
        f"| {report.get('judged', {}).get('unjudged', 0)} |",
        "",
        "Kinds of harmless survivor: "
        + (
            "; ".join(
                f"{_KIND_WORDS.get(k, k)}: {v}"
                for k, v in report.get("judged", {}).items()
                if k != "unjudged"
            )
            or "none"
        )
        + ".",
        "",
    ]
    entries = [e for e in report["not_killed"] if "judged" in e]
    unjudged = [e for e in entries if e["judged"] == "unjudged"]
    if unjudged:
        lines += [
            "## Survivors not judged yet",
            "",
            "A test must kill each of these, or a rule must say why it cannot matter.",
            "",
        ]
        for e in unjudged:
            minus, plus = changed(e["diff"])
            lines.append(f"- `{e['name']}`: `{_cell(' '.join(minus))}` → `{_cell(' '.join(plus))}`")
        lines.append("")
    lines += [
        "## Survivors judged harmless",
        "",
        "Grouped by module and function; each row is one mutant (mutmut's number), the "
        "line it changes and what it changes it to.",
        "",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in entries:
        if e["judged"] != "unjudged":
            groups.setdefault(function_of(e["name"]), []).append(e)
    current = None
    for (module, function), items in sorted(groups.items()):
        if module != current:
            lines += [f"### {module}", ""]
            current = module
        lines.append(f"`{function}`:")
        lines.append("")
        for e in items:
            minus, plus = changed(e["diff"])
            number = e["name"].rsplit("__mutmut_", 1)[-1]
            lines.append(
                f"- {number} ({_KIND_WORDS.get(e['judged'], e['judged'])}): "
                f"`{_cell(' '.join(minus))[:110]}` → `{_cell(' '.join(plus))[:110]}`; {e['why']}"
            )
        lines.append("")
    others = [e for e in report["not_killed"] if "judged" not in e]
    if others:
        lines += [
            "## Timeouts",
            "",
            "A mutant whose tests ran past mutmut's time limit (a loop that no longer "
            "ends): counted as killed.",
            "",
        ]
        lines += [f"- `{e['name']}`" for e in others]
        lines.append("")
    return "\n".join(lines)


def _count_judged(report: dict[str, Any]) -> None:
    """Each module's judged_harmless and unjudged, and the kinds over all, from not_killed."""
    entries = [e for e in report["not_killed"] if "judged" in e]
    for row in report["modules"].values():
        row.pop("judged_harmless", None)
        row.pop("unjudged", None)
    for entry in entries:
        row = report["modules"][module_of(entry["name"])]
        key = "unjudged" if entry["judged"] == "unjudged" else "judged_harmless"
        row[key] = row.get(key, 0) + 1
    report["judged"] = {
        kind: sum(1 for e in entries if e["judged"] == kind)
        for kind in sorted({e["judged"] for e in entries})
    }


def judge_again(report: dict[str, Any]) -> bool:
    """Judge a record's survivors with today's rules (the run's figures stay); True: changed.

    Rules are written after a run has shown the survivors; the record then says when its
    survivors were last judged. The source judged against is this checkout's.
    """
    before = json.dumps(report["not_killed"])
    for entry in report["not_killed"]:
        if entry["status"] == "timeout":
            continue
        verdict = judge(entry["name"], entry["diff"], ROOT)
        entry["judged"] = verdict[0] if verdict else "unjudged"
        entry["why"] = verdict[1] if verdict else ""
    if json.dumps(report["not_killed"]) == before:
        return False
    _count_judged(report)
    now = datetime.datetime.now(datetime.UTC)
    report["settings"]["judged_again"] = now.isoformat(timespec="seconds")
    return True


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mutation", description=__doc__)
    parser.add_argument(
        "--doc-from", type=Path, metavar="JSON", help="only write docs/mutation.md from a record"
    )
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--only", nargs="+", metavar="MODULE", help="a subset of TARGETS")
    parser.add_argument("--keep", type=Path, help="run in (and keep) this scratch directory")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--recheck",
        action="store_true",
        help="with --keep: take this checkout's tests into the kept run and run again the "
        "survivors no rule judges (after adding tests that kill them)",
    )
    parser.add_argument(
        "--no-run",
        action="store_true",
        help="record what the --keep directory holds (a run stopped part way: its mutants "
        "not reached are 'not checked'); without it, a kept run goes on where it stopped",
    )
    args = parser.parse_args(argv)
    if args.recheck and args.keep is None:
        parser.error("--recheck needs the run it goes on with: --keep DIR")
    if args.doc_from is not None:
        report = json.loads(args.doc_from.read_text())
        if judge_again(report):
            args.doc_from.write_text(json.dumps(report, indent=2) + "\n")
        source = args.doc_from.resolve()
        shown = source.relative_to(ROOT) if source.is_relative_to(ROOT) else source
        (ROOT / "docs" / "mutation.md").write_text(render_doc(report, str(shown)))
        return 0
    try:
        from importlib.metadata import version

        got = version("mutmut")
    except Exception:  # noqa: BLE001 - PackageNotFoundError and anything a broken install raises
        print(f"mutmut is not installed; pip install mutmut=={MUTMUT_VERSION}", file=sys.stderr)
        return 2
    if got != MUTMUT_VERSION:
        print(f"note: mutmut {got}, the figures were recorded with {MUTMUT_VERSION}")
    targets = list(args.only or TARGETS)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        print(f"not a target: {unknown[0]}; targets: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="powercut-mutation-"))
    scratch.mkdir(parents=True, exist_ok=True)
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.monotonic()
    started = datetime.datetime.now(datetime.UTC)
    try:
        if not (scratch / "pyproject.toml").exists():
            scratch_copy(scratch)
            with open(scratch / "pyproject.toml", "a") as f:
                f.write(mutmut_config(targets))
        log = scratch / "mutmut.log"
        print(f"mutmut {got} in {scratch} (log: {log})", flush=True)
        if args.recheck and not args.no_run:
            # This checkout's tests go into the kept run, and the survivors no rule judges
            # run again, by name (mutmut also finds which functions the new tests reach).
            # Killed stays killed when tests are added, and a judged survivor would survive
            # again. The code stays the run's: a change to a target needs a new run.
            scratch_copy(scratch, "tests", "benchmarks")
            again = [
                m["name"]
                for line in _mutmut(scratch, "results", "--all", "true").splitlines()
                if (m := _RESULT.match(line))
                and m["status"] not in ("killed", "timeout", "not checked")
                and judge(m["name"], _diff(scratch, m["name"]), scratch) is None
            ]
            print(f"checking {len(again)} unjudged survivors again", flush=True)
            if again:
                _mutmut(scratch, "run", "--max-children", str(args.max_children), *again, log=log)
        elif not args.no_run:
            _mutmut(scratch, "run", "--max-children", str(args.max_children), log=log)
        results = {
            m["name"]: m["status"]
            for line in _mutmut(scratch, "results", "--all", "true").splitlines()
            if (m := _RESULT.match(line))
        }
        survivors = []
        for name in sorted(n for n, s in results.items() if s not in ("killed", "not checked")):
            diff = _diff(scratch, name)
            entry: dict[str, Any] = {"name": name, "status": results[name], "diff": diff.strip()}
            if results[name] not in ("timeout",):
                verdict = judge(name, diff, scratch)
                entry["judged"] = verdict[0] if verdict else "unjudged"
                entry["why"] = verdict[1] if verdict else ""
            survivors.append(entry)
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.monotonic() - t0
    if args.no_run:  # the run's time: from the scratch copy's making to now (just stopped)
        seconds = time.time() - (scratch / "pyproject.toml").stat().st_mtime
    modules = tally(results)
    total = Counter(results.values())
    tested = sum(total.values()) - total["skipped"] - total["not checked"]
    now = datetime.datetime.now(datetime.UTC)
    report = {
        "benchmark": "mutation",
        "command": "python -m benchmarks.mutation " + " ".join(argv),
        "date": now.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]},
        "settings": {
            "mutmut": got,
            "max_children": args.max_children,
            "targets": targets,
            "tests": list(TESTS),
            "pytest_args": list(PYTEST_ARGS),
        },
        "seconds": round(seconds, 1),
        "complete": total["not checked"] == 0,
        "total": {
            "mutants": sum(total.values()),
            **{s.replace(" ", "_"): total[s] for s in STATUSES},
            "score": round((total["killed"] + total["timeout"]) / tested, 4) if tested else None,
        },
        "modules": modules,
        "not_killed": survivors,
    }
    # How the kept run came about, invocation by invocation (resumed, rechecked, recorded).
    history = scratch / "runs.json"
    runs: list[str] = json.loads(history.read_text()) if history.exists() else []
    if not args.no_run:
        runs.append(
            f"{started:%Y-%m-%d %H:%M}-{now:%H:%M} UTC: "
            f"python -m benchmarks.mutation {' '.join(argv)}"
        )
        if args.keep is not None:
            history.write_text(json.dumps(runs, indent=1) + "\n")
    if runs:
        report["runs"] = runs
    _count_judged(report)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"mutation-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    for module, row in modules.items():
        print(
            f"{module:40} {row['mutants']:5} mutants {row['killed']:5} killed "
            f"{row['survived']:4} survived {row['timeout']:3} timeout  score {row['score']}"
            f"  unjudged {row.get('unjudged', 0)}"
        )
    print(f"recorded in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
