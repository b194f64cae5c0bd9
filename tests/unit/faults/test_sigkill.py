"""A backend process SIGKILLed mid-workload: nothing it completed is lost, and the
journal and log it leaves are readable and still describe a later power cut."""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

from harness.durability.contract import CacheMode
from harness.durability.cut import apply_cut
from harness.durability.journal import read_journal
from harness.durability.oracle import check
from harness.durability.writelog import read_log
from harness.errors import JournalError
from harness.proc import ManagedProcess

from .stack import make_paths

S = 512


def _completed(log: Path) -> int:
    try:
        return sum(1 for r in read_log(log).requests if r.status == 0)
    except (OSError, JournalError):  # not created yet / header not written yet
        return 0


def test_sigkilled_backend_leaves_readable_journal_and_log(tmp_path: Path) -> None:
    paths = make_paths(tmp_path, 4 << 20, fill=0x5A)
    spec = (
        f"driver=log-writes,log={paths.log},file.driver=powerfail,"
        f"file.journal={paths.journal},file.file.driver=file,"
        f"file.file.filename={paths.image}"
    )
    rng = random.Random(2026)

    def write(i: int) -> str:
        size = rng.choice(["512", "4k", "64k"])
        return f"write -q -P {i % 250 + 1} {rng.randrange(0, 60) * 64 * 1024} {size}"

    # A first part with flushes (the journal empties and starts over), then a
    # part with none: once a write of the second part has completed, the
    # journal is guaranteed to hold pre-images when the kill lands.
    first = []
    for i in range(300):
        first.append(write(i))
        if i % 7 == 6:
            first.append("flush")
    second = [write(i) for i in range(300, 3000)]
    read_fd, write_fd = os.pipe()
    proc = ManagedProcess(
        [sys.executable, "-m", "harness.cli", "io", "--image-opts", spec],
        name="powercut-io",
        log_path=tmp_path / "io.log",
        stdin=read_fd,
    )
    with proc:
        os.close(read_fd)
        with os.fdopen(write_fd, "w") as pipe:
            pipe.write("\n".join(first) + "\n")
            pipe.flush()
            proc.wait_for(lambda: _completed(paths.log) >= 200, 60, "200 requests done")
            pipe.write("\n".join(second) + "\n")
            pipe.flush()
            proc.wait_for(
                lambda: _completed(paths.log) > len(first), 60, "a write after the last flush"
            )
            # powercut io waits on its stdin for more commands, so it is still running.
            assert proc.running, proc.log_tail()
            proc.kill()
    wlog = read_log(paths.log)
    state, data = read_journal(paths.journal)
    del data
    done = [r for r in wlog.requests if r.status == 0]
    assert len(done) >= 200
    assert len(state.preimages) > 0

    # A process crash reverts nothing: every completed write is on the image.
    after_kill = paths.image.read_bytes()
    report = check(paths.image, wlog, CacheMode.WRITETHROUGH)
    assert report.ok, report.violations

    # keep-all is the image as it was.
    keep_img, keep_j = tmp_path / "keep.img", tmp_path / "keep.journal"
    shutil.copy(paths.image, keep_img)
    shutil.copy(paths.journal, keep_j)
    apply_cut(keep_img, keep_j, "keep-all", 0)
    assert keep_img.read_bytes() == after_kill

    # A host power cut afterwards still honours the writeback contract.
    for policy in ("lose-all", "random", "torn"):
        img, j = tmp_path / f"{policy}.img", tmp_path / f"{policy}.journal"
        shutil.copy(paths.image, img)
        shutil.copy(paths.journal, j)
        apply_cut(img, j, policy, 7)
        report = check(img, wlog, CacheMode.WRITEBACK)
        assert report.ok, (policy, report.violations)
