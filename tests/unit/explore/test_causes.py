"""The explanation engine on hand-made traces and views: each cause, its fix, and the case
where no call explains the loss.

Every faulty program below has a fixed twin (the call that makes it durable
added); the same lost effect in the twin must not be blamed on a call, so
each test fails if the engine names a cause without the missing durability.
"""

from __future__ import annotations

import re

from harness.explore.causes import (
    AckTime,
    Property,
    ack_guest_times,
    at_risk,
    explain,
    group,
)
from harness.explore.clock import ClockBounds
from harness.explore.fileview import EntryType, FileEntry, FileView
from harness.explore.syscalls import Trace, parse_strace

ACK = re.compile(r"^ack (\S+)$")
CLOCK = ClockBounds(0, 0)  # the tests' guest times are the host's


def pattern(line: str) -> str | None:
    m = ACK.match(line)
    return m.group(1) if m else None


def trace(*calls: str) -> Trace:
    """`calls` one per millisecond, each taking 0.1 ms: `openat(...) = 3</mnt/x>`."""
    lines = []
    for n, call in enumerate(calls, start=1):
        lines.append(f"100 1.{n:03d}000000 {call} <0.000100>")
    return parse_strace("\n".join(lines) + "\n")


def view(*entries: tuple[str, int, str]) -> FileView:
    return FileView(
        "/mnt",
        "ext4",
        tuple(FileEntry(p, EntryType.FILE, size, md5=md5) for p, size, md5 in entries),
    )


def acks(t: Trace, *tokens: str) -> dict[str, tuple[int, int]]:
    # Received 50 ms after the last call: only the trace's own write can place them well.
    host = [AckTime(tok, 2_000_000_000) for tok in tokens]
    return ack_guest_times(t, host, CLOCK, pattern)


REPLACE = [
    'openat(-100</mnt>, "x.tmp", 0x241, 0644) = 3</mnt/x.tmp>',
    'write(3</mnt/x.tmp>, "v2", 2) = 2',
    "fsync(3</mnt/x.tmp>) = 0",
    "close(3</mnt/x.tmp>) = 0",
    'renameat2(-100</mnt>, "x.tmp", -100</mnt>, "x", 0) = 0',
]
ACK1 = 'write(1<pipe:[1]>, "ack 1\\n", 6) = 6'
DIRSYNC = [
    'openat(-100</mnt>, ".", 0x10000) = 4</mnt>',
    "fsync(4</mnt>) = 0",
]


def test_a_rename_without_the_directorys_fsync_is_the_entry_not_synced() -> None:
    t = trace(*REPLACE, ACK1)
    recovered = view(("x", 2, "old"), ("x.tmp", 2, "new"))
    reference = view(("x", 2, "new"))
    e = explain(
        "p3-lose-all-0",
        t,
        recovered,
        reference,
        lost_tokens=["1"],
        ack_times=acks(t, "1"),
        existing=["/mnt/x"],
    )
    assert [c.relied_on for c in e.causes] == [Property.ENTRY_NOT_SYNCED]
    (cause,) = e.causes
    assert cause.fix == "fsync the directory /mnt after renameat2(/mnt/x.tmp, /mnt/x)"
    assert cause.calls[0].name == "renameat2" and e.boundary == "ack 1"


def test_a_rename_that_left_both_names_on_one_file_is_not_atomic() -> None:
    t = trace(*REPLACE, *DIRSYNC[:1], ACK1)
    both = FileView(
        "/mnt",
        "ext4",
        (
            FileEntry("x", EntryType.FILE, 2, inode=12, nlink=2, md5="new"),
            FileEntry("x.tmp", EntryType.FILE, 2, inode=12, nlink=2, md5="new"),
        ),
    )
    e = explain(
        "s", t, both, view(("x", 2, "new")), lost_tokens=[], ack_times=acks(t, "1"),
        point_guest_ns=(1_010_000_000, 1_010_000_000), existing=["/mnt/x"],
    )  # fmt: skip
    assert [c.relied_on for c in e.causes] == [Property.NOT_ATOMIC]
    assert e.causes[0].evidence == (
        "both /mnt/x.tmp and /mnt/x name one file after renameat2(/mnt/x.tmp, /mnt/x)"
    )
    assert e.boundary == "the state's point"


def test_the_same_loss_after_the_directorys_fsync_is_not_blamed_on_a_call() -> None:
    t = trace(*REPLACE, *DIRSYNC, ACK1)
    e = explain(
        "s",
        t,
        view(("x", 2, "old"), ("x.tmp", 2, "new")),
        view(("x", 2, "new")),
        lost_tokens=["1"],
        ack_times=acks(t, "1"),
        existing=["/mnt/x"],
    )
    assert e.unexplained
    assert any("not the application's doing" in line for line in e.evidence), e.evidence
    assert any("fsync(/mnt)" in line for line in e.evidence)


def test_a_replaced_file_whose_temporary_was_never_fsynced_is_data_not_synced() -> None:
    t = trace(*[c for c in REPLACE if not c.startswith("fsync")], *DIRSYNC, ACK1)
    e = explain(
        "s",
        t,
        view(("x", 0, "empty")),
        view(("x", 2, "new")),
        lost_tokens=["1"],
        ack_times=acks(t, "1"),
        existing=["/mnt/x"],
    )
    (cause,) = e.causes
    assert cause.relied_on is Property.DATA_NOT_SYNCED
    assert cause.fix == (
        "fsync /mnt/x.tmp after write(/mnt/x.tmp, 2 bytes) and before renameat2(/mnt/x.tmp, /mnt/x)"
    )


APPEND = [
    'openat(-100</mnt>, "log", 0x441, 0644) = 3</mnt/log>',
    'write(3</mnt/log>, "rec1\\n", 5) = 5',
    ACK1,
    'write(3</mnt/log>, "rec2\\n", 5) = 5',
    'write(1<pipe:[1]>, "ack 2\\n", 6) = 6',
]


def test_appends_acknowledged_without_fdatasync_are_data_not_synced() -> None:
    t = trace(*APPEND)
    e = explain(
        "s",
        t,
        view(("log", 0, "empty")),
        view(("log", 10, "both")),
        lost_tokens=["1", "2"],
        ack_times=acks(t, "1", "2"),
    )
    (cause,) = e.causes
    assert cause.relied_on is Property.DATA_NOT_SYNCED and e.boundary == "ack 1"
    # Only the write before ack 1 is blamed: the second came after the promise.
    assert [c.describe() for c in cause.calls] == ["write(/mnt/log, 5 bytes)"]
    assert cause.fix == (
        "fdatasync /mnt/log after write(/mnt/log, 5 bytes) and before the acknowledgement"
    )


def test_appends_with_fdatasync_are_not_blamed() -> None:
    t = trace(
        APPEND[0], APPEND[1], "fdatasync(3</mnt/log>) = 0", ACK1, APPEND[3],
        "fdatasync(3</mnt/log>) = 0", APPEND[4],
    )  # fmt: skip
    e = explain(
        "s",
        t,
        view(("log", 0, "empty")),
        view(("log", 10, "both")),
        lost_tokens=["1", "2"],
        ack_times=acks(t, "1", "2"),
    )
    assert e.unexplained and not e.causes


def test_a_write_through_o_dsync_is_durable_when_it_returns() -> None:
    t = trace('openat(-100</mnt>, "log", 0x1441, 0644) = 3</mnt/log>', APPEND[1], ACK1)
    e = explain(
        "s",
        t,
        view(("log", 0, "e")),
        view(("log", 5, "r")),
        lost_tokens=["1"],
        ack_times=acks(t, "1"),
    )
    assert e.unexplained and any("O_SYNC/O_DSYNC" in line for line in e.evidence)


ORDERED = [
    'openat(-100</mnt>, "data", 0x441, 0644) = 3</mnt/data>',
    'openat(-100</mnt>, "commit", 0x241, 0644) = 4</mnt/commit>',
    'write(3</mnt/data>, "row 1\\n", 6) = 6',
    'write(4</mnt/commit>, "1\\n", 2) = 2',
    "fsync(4</mnt/commit>) = 0",
    ACK1,
]


def test_a_commit_record_synced_before_its_data_is_order_assumed() -> None:
    t = trace(*ORDERED)
    e = explain(
        "s",
        t,
        view(("data", 0, "e"), ("commit", 2, "c")),
        view(("data", 6, "d"), ("commit", 2, "c")),
        lost_tokens=["1"],
        ack_times=acks(t, "1"),
        existing=["/mnt/data", "/mnt/commit"],
    )
    (cause,) = e.causes
    assert cause.relied_on is Property.ORDER_ASSUMED
    assert [c.path for c in cause.calls] == ["/mnt/data", "/mnt/commit"]
    assert cause.fix == (
        "fdatasync /mnt/data after write(/mnt/data, 6 bytes) and before write(/mnt/commit, 2 bytes)"
    )


def test_the_commit_record_after_the_datas_fdatasync_is_not_blamed() -> None:
    fixed = [*ORDERED[:3], "fdatasync(3</mnt/data>) = 0", *ORDERED[3:]]
    t = trace(*fixed)
    e = explain(
        "s",
        t,
        view(("data", 0, "e"), ("commit", 2, "c")),
        view(("data", 6, "d"), ("commit", 2, "c")),
        lost_tokens=["1"],
        ack_times=acks(t, "1"),
        existing=["/mnt/data", "/mnt/commit"],
    )
    assert e.unexplained


def test_a_torn_overwrite_in_place_is_a_single_call_not_atomic() -> None:
    t = trace(
        'openat(-100</mnt>, "db", 0x2, 0) = 3</mnt/db>',
        'pwrite64(3</mnt/db>, "page", 4096, 8192) = 4096',
        ACK1,
    )
    # The file's bytes 8192.. sit at disk byte 1 MiB + 8192; the state tore 512 of them.
    extent = (0, 1 << 20, 16384, 0)
    entry = FileEntry("db", EntryType.FILE, 16384, md5="torn")
    ref_entry = FileEntry("db", EntryType.FILE, 16384, md5="whole")
    from harness.explore.fileview import Extent

    recovered = FileView("/mnt", "ext4", (entry,))
    reference = FileView(
        "/mnt", "ext4", (FileEntry(**{**ref_entry.__dict__, "extents": (Extent(*extent),)}),)
    )
    e = explain(
        "s",
        t,
        recovered,
        reference,
        lost_tokens=["1"],
        ack_times=acks(t, "1"),
        torn_writes=[((1 << 20) + 8192 + 512, 512)],
        existing=["/mnt/db"],
    )
    (cause,) = e.causes
    assert cause.relied_on is Property.NOT_ATOMIC and cause.calls[0].name == "pwrite64"
    assert e.writes == (
        f"torn write at disk byte {(1 << 20) + 8704} (512 bytes): /mnt/db bytes 8704-9216",
    )
    # Without the torn write's evidence it is only data not synced.
    plain = explain(
        "s", t, recovered, reference, lost_tokens=["1"], ack_times=acks(t, "1"),
        existing=["/mnt/db"],
    )  # fmt: skip
    assert [c.relied_on for c in plain.causes] == [Property.DATA_NOT_SYNCED]


def test_a_loss_no_call_touched_is_unexplained_with_the_evidence() -> None:
    t = trace(APPEND[0], APPEND[1], "fdatasync(3</mnt/log>) = 0", ACK1)
    e = explain(
        "s",
        t,
        view(("log", 5, "r"), ("other", 0, "e")),
        view(("log", 5, "r"), ("other", 9, "o")),
        lost_tokens=["1"],
        ack_times=acks(t, "1"),
        existing=["/mnt/other"],
    )
    assert e.unexplained
    assert "/mnt/other: 0 bytes where the reference has 9" in e.evidence
    assert "no traced call before the boundary changed /mnt/other" in e.evidence


def test_without_the_acks_write_in_the_trace_the_clock_bounds_decide() -> None:
    t = trace(APPEND[0], APPEND[1])
    times = ack_guest_times(t, [AckTime("1", 10_000)], ClockBounds(-2_000, 3_000), pattern)
    assert times == {"1": (12_000, 7_000)}


def test_at_every_ack_what_is_not_yet_durable_and_since_which_call() -> None:
    t = trace(*REPLACE, ACK1, *DIRSYNC, 'write(1<pipe:[1]>, "ack 2\\n", 6) = 6')
    risks = {r.token: r for r in at_risk(t, acks(t, "1", "2"), "/mnt", existing=["/mnt/x"])}
    assert [x.describe() for x in risks["1"].risks] == [
        "entry of /mnt/x.tmp since openat(/mnt/x.tmp, O_WRONLY|O_CREAT|O_TRUNC)",
        "entry of /mnt/x since renameat2(/mnt/x.tmp, /mnt/x)",
    ]
    assert risks["2"].risks == ()


def test_states_group_by_cause_with_the_smallest_and_its_replay() -> None:
    t = trace(*REPLACE, ACK1)
    recovered = view(("x", 2, "old"), ("x.tmp", 2, "new"))
    reference = view(("x", 2, "new"))
    times = acks(t, "1")
    es = [
        explain(s, t, recovered, reference, lost_tokens=["1"], ack_times=times,
                existing=["/mnt/x"])
        for s in ("p3-keep-all-0", "p3-lose-all-0")
    ]  # fmt: skip
    odd = view(("x", 2, "new"), ("y", 1, "e"))
    es.append(
        explain("p9-x", t, odd, view(("x", 2, "new"), ("y", 2, "f")), lost_tokens=["1"],
                ack_times=times, existing=["/mnt/x", "/mnt/y"])
    )  # fmt: skip
    sizes = {"p3-keep-all-0": 5, "p3-lose-all-0": 2, "p9-x": 1}
    groups = group(es, sizes.__getitem__, lambda s: f"powercut explore replay out --state {s}")
    assert [(g.fix, len(g.states), g.smallest) for g in groups] == [
        ("fsync the directory /mnt after renameat2(/mnt/x.tmp, /mnt/x)", 2, "p3-lose-all-0"),
        ("none named: see each state's evidence", 1, "p9-x"),
    ]
    assert groups[0].line().endswith("replay: powercut explore replay out --state p3-lose-all-0")


# -- the tree the calls left, as the reference (what `powercut explore` and `run` compare) ----


def listed(*entries: tuple[str, int, str | None]) -> FileView:
    """A view as the guest lists it: `lost+found` too, which no call made."""
    files = tuple(FileEntry(p, EntryType.FILE, size, md5=md5) for p, size, md5 in entries)
    return FileView("/mnt", "ext4", (FileEntry("lost+found", EntryType.DIR, 4096), *files))


def test_without_a_reference_the_calls_say_what_the_rename_left() -> None:
    t = trace(*REPLACE, ACK1)
    before = listed(("x", 1, "old"))
    # What the disk had at the acknowledgement: the rename never left the page cache, so no
    # view of the disk holds it; the calls do (x is the 2-byte file that was x.tmp).
    recovered = listed(("x", 1, "old"), ("x.tmp", 2, "new"))
    e = explain("s", t, recovered, lost_tokens=["1"], ack_times=acks(t, "1"), existing=before)
    assert [c.relied_on for c in e.causes] == [Property.ENTRY_NOT_SYNCED], e.evidence
    assert e.causes[0].fix == "fsync the directory /mnt after renameat2(/mnt/x.tmp, /mnt/x)"
    assert "/mnt/x: 1 bytes where the calls before it left 2" in e.evidence
    assert any(
        line.startswith("/mnt/x.tmp: present (a file), though renameat2") for line in e.evidence
    )
    fixed = trace(*REPLACE, *DIRSYNC, ACK1)
    twin = explain("s", fixed, recovered, lost_tokens=["1"], ack_times=acks(fixed, "1"),
                   existing=before)  # fmt: skip
    assert twin.unexplained and any("not the application's doing" in x for x in twin.evidence)


def test_appends_the_page_cache_never_wrote_back_are_data_not_synced() -> None:
    t = trace(*APPEND)
    empty = listed(("log", 0, "e"))
    e = explain("s", t, empty, lost_tokens=["1", "2"], ack_times=acks(t, "1", "2"),
                existing=listed())  # fmt: skip
    (cause,) = e.causes
    assert cause.relied_on is Property.DATA_NOT_SYNCED
    assert [c.describe() for c in cause.calls] == ["write(/mnt/log, 5 bytes)"]
    assert "/mnt/log: 0 bytes where the calls before it left 5" in e.evidence
    synced = trace(
        APPEND[0], APPEND[1], "fdatasync(3</mnt/log>) = 0", ACK1, APPEND[3],
        "fdatasync(3</mnt/log>) = 0", APPEND[4],
    )  # fmt: skip
    twin = explain("s", synced, empty, lost_tokens=["1", "2"], ack_times=acks(synced, "1", "2"),
                   existing=listed())  # fmt: skip
    assert twin.unexplained


def test_an_unsynced_commit_before_its_data_is_order_assumed_from_the_calls_alone() -> None:
    t = trace(*ORDERED)
    e = explain("s", t, listed(("data", 0, None), ("commit", 2, None)), lost_tokens=["1"],
                ack_times=acks(t, "1"), existing=listed())  # fmt: skip
    (cause,) = e.causes
    assert cause.relied_on is Property.ORDER_ASSUMED
    assert [c.path for c in cause.calls] == ["/mnt/data", "/mnt/commit"]


def test_sizes_follow_seeks_and_stop_where_reads_may_move_the_position() -> None:
    seeks = trace(
        'openat(-100</mnt>, "f", 0x241, 0644) = 3</mnt/f>',
        'write(3</mnt/f>, "header", 100) = 100',
        "lseek(3</mnt/f>, 0, 0) = 0",
        'write(3</mnt/f>, "h", 10) = 10',
        ACK1,
    )
    e = explain("s", seeks, listed(("f", 100, None)), lost_tokens=["1"],
                ack_times=acks(seeks, "1"), existing=listed())  # fmt: skip
    assert not any(line.startswith("/mnt/f:") for line in e.evidence), e.evidence
    shorter = explain("s", seeks, listed(("f", 10, None)), lost_tokens=["1"],
                      ack_times=acks(seeks, "1"), existing=listed())  # fmt: skip
    assert "/mnt/f: 10 bytes where the calls before it left 100" in shorter.evidence
    # Read-write, no O_APPEND: an untraced read may have moved the position; no size is claimed.
    rdwr = trace(
        'openat(-100</mnt>, "f", 0x42, 0644) = 3</mnt/f>',
        'write(3</mnt/f>, "x", 100) = 100',
        ACK1,
    )
    e = explain("s", rdwr, listed(("f", 10, None)), lost_tokens=["1"],
                ack_times=acks(rdwr, "1"), existing=listed())  # fmt: skip
    assert not any(line.startswith("/mnt/f:") for line in e.evidence), e.evidence


def test_a_size_the_tree_after_the_run_contradicts_is_not_claimed() -> None:
    t = trace(*APPEND)
    after = listed(("log", 4096, "mapped"))  # something the trace does not show wrote it
    e = explain("s", t, listed(("log", 0, "e")), lost_tokens=["1"], ack_times=acks(t, "1"),
                existing=listed(), final=after)  # fmt: skip
    assert not any(line.startswith("/mnt/log:") for line in e.evidence), e.evidence
    agrees = explain("s", t, listed(("log", 0, "e")), lost_tokens=["1"], ack_times=acks(t, "1"),
                     existing=listed(), final=listed(("log", 10, "both")))  # fmt: skip
    assert [c.relied_on for c in agrees.causes] == [Property.DATA_NOT_SYNCED]


def test_other_content_is_claimed_only_for_a_file_no_call_changed_after_the_ack() -> None:
    calls = [
        'openat(-100</mnt>, "cfg", 0x1, 0) = 3</mnt/cfg>',
        'pwrite64(3</mnt/cfg>, "v2", 2, 0) = 2',
        ACK1,
    ]
    t = trace(*calls)
    before, after = listed(("cfg", 2, "v1")), listed(("cfg", 2, "v2"))
    e = explain("s", t, listed(("cfg", 2, "v1")), lost_tokens=["1"], ack_times=acks(t, "1"),
                existing=before, final=after)  # fmt: skip
    assert "/mnt/cfg: other content than the calls before it left" in e.evidence
    assert [c.relied_on for c in e.causes] == [Property.DATA_NOT_SYNCED]
    later = trace(*calls, 'pwrite64(3</mnt/cfg>, "v3", 2, 0) = 2')
    e = explain("s", later, listed(("cfg", 2, "v1")), lost_tokens=["1"],
                ack_times=acks(later, "1"), existing=before, final=after)  # fmt: skip
    assert e.unexplained and not any("other content" in x for x in e.evidence)


def test_an_unlinked_file_that_came_back_is_the_entry_not_synced() -> None:
    t = trace('unlinkat(-100</mnt>, "old", 0) = 0', ACK1)
    e = explain("s", t, listed(("old", 3, None)), lost_tokens=["1"], ack_times=acks(t, "1"),
                existing=listed(("old", 3, None)))  # fmt: skip
    (cause,) = e.causes
    assert cause.relied_on is Property.ENTRY_NOT_SYNCED
    assert cause.fix == "fsync the directory /mnt after unlinkat(/mnt/old)"


def test_an_entry_never_synced_that_the_filesystem_kept_is_named_with_the_next_sync() -> None:
    t = trace(*REPLACE, 'write(1<pipe:[1]>, "ack 1\\n", 6) = 6', *APPEND[:2],
              "fsync(3</mnt/log>) = 0", 'write(1<pipe:[1]>, "ack 2\\n", 6) = 6')  # fmt: skip
    # Ack 2 is lost for another reason; x was renamed (not promised) and is there.
    recovered = listed(("x", 2, None))
    e = explain("s", t, recovered, lost_tokens=["2"], ack_times=acks(t, "1", "2"),
                existing=listed(("x", 1, None)))  # fmt: skip
    assert any(
        k.startswith("renameat2(/mnt/x.tmp, /mnt/x): the entry /mnt/x was not promised")
        and k.endswith("the first sync after it: fsync(/mnt/log)")
        for k in e.kept
    ), e.kept


def test_a_new_file_that_is_missing_relied_on_its_entry_and_its_data() -> None:
    t = trace(*APPEND)
    e = explain("s", t, listed(), lost_tokens=["1"], ack_times=acks(t, "1"), existing=listed())
    assert [c.relied_on for c in e.causes] == [Property.ENTRY_NOT_SYNCED, Property.DATA_NOT_SYNCED]
    assert e.causes[0].fix == (
        "fsync the directory /mnt after openat(/mnt/log, O_WRONLY|O_CREAT|O_APPEND)"
    )
    # Synced data, unsynced entry: the entry alone.
    synced = trace(APPEND[0], APPEND[1], "fdatasync(3</mnt/log>) = 0", ACK1)
    e = explain("s", synced, listed(), lost_tokens=["1"], ack_times=acks(synced, "1"),
                existing=listed())  # fmt: skip
    assert [c.relied_on for c in e.causes] == [Property.ENTRY_NOT_SYNCED]


def test_a_state_that_kept_unsynced_appends_says_so_and_one_that_lost_them_does_not() -> None:
    from harness.explore.causes import kept_at

    t = trace(*APPEND)
    times = acks(t, "1", "2")
    kept = kept_at(t, listed(("log", 10, None)), times["2"], existing=listed(("log", 0, None)))
    assert kept == [
        "write(/mnt/log, 5 bytes): the data of /mnt/log was not promised (no fdatasync) and "
        "the filesystem kept it; no call synced anything after it"
    ]
    assert kept_at(t, listed(("log", 5, None)), times["2"], existing=listed(("log", 0, None))) == []


def test_a_synced_file_its_directory_names_but_cannot_read_is_not_the_applications() -> None:
    # f2fs under torn writes: the name is there, lstat fails; the data was fdatasync'ed.
    t = trace(APPEND[0], APPEND[1], "fdatasync(3</mnt/log>) = 0", ACK1)
    broken = FileView("/mnt", "f2fs", (FileEntry("log", EntryType.GONE, error="lstat: EIO"),))
    e = explain("s", t, broken, lost_tokens=["1"], ack_times=acks(t, "1"), existing=listed())
    assert e.unexplained
    assert "/mnt/log: named by its directory but unreadable: lstat: EIO" in e.evidence
    assert any(
        x.startswith("write(/mnt/log, 5 bytes) was durable before the boundary "
                     "(by fdatasync(/mnt/log))") and x.endswith("not the application's doing")
        for x in e.evidence
    ), e.evidence  # fmt: skip
    assert any(
        x.startswith("openat(/mnt/log, O_WRONLY|O_CREAT|O_APPEND) was not made durable") and
        x.endswith("yet its entry /mnt/log is in the recovered tree")
        for x in e.evidence
    ), e.evidence  # fmt: skip
