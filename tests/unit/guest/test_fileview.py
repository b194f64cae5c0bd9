"""The file view: the Perl helper on the host's own filesystem, the parsing, btrfs's chunk map.

FIEMAP on ext4, xfs, btrfs and f2fs in a real guest is tests/vm/test_tracing.py;
here the helper runs on the host's Perl over a temporary tree (whatever the
host's filesystem is), so the walk, the digests, the bounds and the framing
are checked without a guest.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from harness.errors import GuestError
from harness.explore.fileview import (
    FIEMAP_EXTENT_DATA_INLINE,
    Chunk,
    EntryType,
    Extent,
    FileEntry,
    FileView,
    differences,
    parse_chunk_tree,
    parse_view,
)
from harness.guest.fileview import HELPER

pytestmark = pytest.mark.skipif(shutil.which("perl") is None, reason="needs perl")


def _view(root: Path, tmp_path: Path, max_entries: int = 100, max_bytes: int = 1 << 20) -> FileView:
    helper = tmp_path / "fileview.pl"
    helper.write_text(HELPER)
    run = subprocess.run(
        ["perl", str(helper), str(root), str(max_entries), str(max_bytes)],
        capture_output=True,
        check=True,
    )
    return parse_view(run.stdout.decode(), str(root), "ext4")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "mnt"
    (root / "d" / "e").mkdir(parents=True)
    (root / "a").write_bytes(b"hello")
    (root / "d" / "big").write_bytes(os.urandom(300_000))
    (root / "d" / "ü x").write_bytes(b"")
    (root / "l").symlink_to("a")
    os.link(root / "a", root / "d" / "hard")
    return root


def test_the_view_lists_every_entry_with_its_type_size_and_digest(
    tree: Path, tmp_path: Path
) -> None:
    view = _view(tree, tmp_path)
    by = view.by_path()
    assert sorted(by) == ["a", "d", "d/big", "d/e", "d/hard", "d/ü x", "l"]
    assert by["a"].type is EntryType.FILE and by["a"].size == 5
    assert by["a"].md5 == hashlib.md5(b"hello").hexdigest()
    assert by["d/big"].md5 == hashlib.md5((tree / "d" / "big").read_bytes()).hexdigest()
    assert by["l"].type is EntryType.SYMLINK and by["l"].target == "a"
    assert by["d"].type is EntryType.DIR and by["d/e"].type is EntryType.DIR
    assert by["a"].nlink == 2 and by["a"].inode == by["d/hard"].inode
    assert view.get(str(tree / "d" / "big")) == by["d/big"]
    assert not view.truncated


def test_fiemap_covers_a_file_that_has_blocks(tree: Path, tmp_path: Path) -> None:
    big = _view(tree, tmp_path).by_path()["d/big"]
    if big.error and "FIEMAP" in big.error:
        pytest.skip(f"the host's filesystem has no FIEMAP: {big.error}")
    assert sum(e.length for e in big.extents) >= 300_000
    assert big.extents[0].logical == 0


def test_the_view_is_bounded_in_entries_and_in_bytes_digested(tree: Path, tmp_path: Path) -> None:
    view = _view(tree, tmp_path, max_entries=3, max_bytes=1000)
    assert view.truncated and len(view.entries) == 3
    full = _view(tree, tmp_path, max_bytes=1000).by_path()["d/big"]
    assert full.partial
    assert full.md5 == hashlib.md5((tree / "d" / "big").read_bytes()[:1000]).hexdigest()


def test_a_walk_that_never_ended_is_an_error() -> None:
    with pytest.raises(GuestError, match="ended early after 1 entries"):
        parse_view('{"path": "a", "type": "file", "size": 1}\n', "/mnt", "ext4")


BTRFS_CHUNKS = """\
\titem 1 key (FIRST_CHUNK_TREE CHUNK_ITEM 13631488) itemoff 16105 itemsize 80
\t\tlength 8388608 owner 2 stripe_len 65536 type DATA|single
\t\tnum_stripes 1 sub_stripes 1
\t\t\tstripe 0 devid 1 offset 13631488
\titem 3 key (FIRST_CHUNK_TREE CHUNK_ITEM 298844160) itemoff 15881 itemsize 112
\t\tlength 33554432 owner 2 stripe_len 65536 type DATA|single
\t\tnum_stripes 1 sub_stripes 1
\t\t\tstripe 0 devid 1 offset 105906176
\t\t\tdev_uuid 5237990f-aedf-4c30-87a5-79b6c1f48adc
"""


def test_btrfs_extents_are_translated_through_the_chunk_map() -> None:
    chunks = parse_chunk_tree(BTRFS_CHUNKS)
    assert chunks == (Chunk(13631488, 8388608, 13631488), Chunk(298844160, 33554432, 105906176))
    entry = FileEntry(
        "f",
        EntryType.FILE,
        size=12288,
        extents=(
            Extent(0, 298844160 + 4096, 8192),
            Extent(8192, 0, 4096, FIEMAP_EXTENT_DATA_INLINE),  # in metadata: nowhere of its own
        ),
    )
    view = FileView("/mnt", "btrfs", (entry,), chunks=chunks)
    assert list(view.device_extents(entry)) == [(0, 105906176 + 4096, 8192)]
    assert view.files_at(105906176 + 4096 + 100, 10) == [("f", 100, 10)]
    assert view.files_at(298844160 + 4096, 10) == []  # a logical address is not on the device
    # The same extent on ext4 is where FIEMAP says.
    plain = FileView("/mnt", "ext4", (entry,))
    assert plain.files_at(298844160 + 4096, 10) == [("f", 0, 10)]


def test_differences_name_what_the_recovered_tree_lacks() -> None:
    def v(*entries: FileEntry) -> FileView:
        return FileView("/mnt", "ext4", entries)

    ref = v(
        FileEntry("x", EntryType.FILE, 4, md5="a"),
        FileEntry("log", EntryType.FILE, 100, md5="b"),
        FileEntry("d", EntryType.DIR),
    )
    got = v(
        FileEntry("x.tmp", EntryType.FILE, 4, md5="a"),
        FileEntry("log", EntryType.FILE, 60, md5="c"),
        FileEntry("d", EntryType.DIR),
    )
    assert differences(got, ref) == [
        ("log", "60 bytes where the reference has 100"),
        ("x", "missing (the reference has a file of 4 bytes)"),
        ("x.tmp", "present (a file), absent from the reference"),
    ]
    assert differences(ref, ref) == []


def test_a_listing_before_the_cut_leaves_every_atime_as_it_was(tree: Path, tmp_path: Path) -> None:
    # relatime updates an atime older than the mtime on the next read; the helper opens every
    # file and directory O_NOATIME (a listing of the live tree must add no change of its own).
    old = 1_000_000_000
    paths = [tree, tree / "d", tree / "a", tree / "d" / "big"]
    for p in paths:
        os.utime(p, (old, time.time()), follow_symlinks=False)
    os.listdir(tree / "d")
    (tree / "a").read_bytes()
    if os.stat(tree / "d").st_atime == old or os.stat(tree / "a").st_atime == old:
        pytest.skip("this filesystem does not update atimes on read (noatime)")
    for p in paths:
        os.utime(p, (old, time.time()), follow_symlinks=False)
    helper = tmp_path / "fileview.pl"
    helper.write_text(HELPER)
    subprocess.run(["perl", str(helper), str(tree), "100", str(1 << 20), "0"], check=True,
                   capture_output=True)  # fmt: skip
    assert [os.stat(p).st_atime for p in paths] == [old] * len(paths)
