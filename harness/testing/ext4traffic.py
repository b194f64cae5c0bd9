"""Real ext4 traffic through the block stack, without a VM or a kernel mount.

For benchmarks and tests of exploration on a real filesystem: each step is a
`debugfs -w` operation (create a file with data, make a directory, add a
symlink, rename, remove) applied to a *shadow* copy of the filesystem; the
blocks it changed are then written through a `BlockBackend` in the order a
journalling filesystem would write them (ext4 with `data=journal`, jbd2's
protocol):

1. the transaction into the journal (`debugfs journal_write`: descriptor,
   block copies, then the commit block) — with barriers, a flush before the
   commit and the commit written FUA, exactly what makes jbd2 crash-safe;
2. the acknowledgement (the step's "fsync" returned): `on_ack(step)`;
3. the checkpoint: the same blocks in place, left in the host's cache; every
   few steps a flush, then the journal is emptied (`e2fsck -E journal_only`
   on the shadow, the journal superblock written and flushed).

Without barriers (`barriers=False`: ext4 mounted `nobarrier` under a
write-back cache) the same writes go without flushes or FUA, so a power cut
may keep a commit block without its transaction, or checkpoint writes without
their commit: the negative control exploration must catch.
"""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.block import BlockBackend
from harness.errors import ProcessError
from harness.explore.recording import sparse_copy

CHUNK = 64 << 10


def fs_block_size(image: Path | str) -> int:
    with open(image, "rb") as f:
        f.seek(1024 + 24)
        return 1024 << int.from_bytes(f.read(4), "little")


def changed_blocks(a: Path | str, b: Path | str, block: int) -> list[int]:
    """Blocks whose content differs between two images of the same size."""
    out: list[int] = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        size = os.fstat(fa.fileno()).st_size
        if size == 0:
            return out
        ma = mmap.mmap(fa.fileno(), 0, access=mmap.ACCESS_READ)
        mb = mmap.mmap(fb.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            for pos in range(0, size, CHUNK):
                if ma[pos : pos + CHUNK] != mb[pos : pos + CHUNK]:
                    for p in range(pos, min(pos + CHUNK, size), block):
                        if ma[p : p + block] != mb[p : p + block]:
                            out.append(p // block)
        finally:
            ma.close()
            mb.close()
    return out


def _debugfs(image: Path, commands: list[str]) -> None:
    run = subprocess.run(
        ["debugfs", "-w", "-f", "-", str(image)],
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
        env={**os.environ, "LC_ALL": "C"},  # its messages are matched below: never translated
        check=False,
        close_fds=False,
    )
    if run.returncode != 0 or "debugfs: " not in run.stdout:
        raise ProcessError(f"debugfs {commands} failed: {run.stderr.strip()}")
    errors = [
        line
        for line in run.stderr.splitlines()
        if line.strip() and not line.startswith("debugfs ") and "Allocated inode" not in line
    ]
    if errors:
        raise ProcessError(f"debugfs {commands}: {' | '.join(errors)}")


@dataclass
class Ext4Traffic:
    """Drives `backend` (whose content equals `base`) through `steps` debugfs operations."""

    backend: BlockBackend
    base: Path
    seed: int = 0
    barriers: bool = True
    checkpoint_every: int = 4
    max_file: int = 24 << 10
    on_ack: Callable[[int], None] | None = None
    writes: int = 0
    flushes: int = 0

    def run(self, steps: int) -> None:
        with tempfile.TemporaryDirectory(prefix="powercut-ext4traffic-") as tmp:
            self._tmp = Path(tmp)
            shadow = self._tmp / "shadow.img"
            sparse_copy(self.base, shadow)
            self.block = fs_block_size(shadow)
            rng = random.Random(self.seed)
            self._mount(shadow)
            files: list[str] = []
            dirs = ["/"]
            for step in range(steps):
                self._step(shadow, step, rng, files, dirs)
                if (step + 1) % self.checkpoint_every == 0:
                    self._checkpoint(shadow)

    def _mount(self, shadow: Path) -> None:
        """What a mount does first: mark the journal in use (needs_recovery), stably."""
        before = self._tmp / "before.img"
        sparse_copy(shadow, before)
        _debugfs(shadow, ["feature needs_recovery"])
        self._write_blocks(shadow, changed_blocks(before, shadow, self.block))
        if self.barriers:
            self._flush()

    # -- one operation -------------------------------------------------------------

    def _operation(
        self, step: int, rng: random.Random, files: list[str], dirs: list[str]
    ) -> list[str]:
        kind = rng.choice(["write", "write", "write", "mkdir", "symlink", "rename", "rm"])
        parent = rng.choice(dirs).rstrip("/")
        if kind == "mkdir":
            path = f"{parent}/d{step}"
            dirs.append(path)
            return [f"mkdir {path}"]
        if kind == "symlink" and files:
            return [f"symlink {parent}/l{step} {rng.choice(files)}"]
        if kind == "rename" and files:
            old = files.pop(rng.randrange(len(files)))
            new = f"{parent}/r{step}"
            files.append(new)
            return [f"link {old} {new}", f"unlink {old}"]
        if kind == "rm" and len(files) > 2:
            return [f"rm {files.pop(rng.randrange(len(files)))}"]
        src = self._tmp / "data.bin"
        src.write_bytes(rng.randbytes(rng.randint(1, self.max_file)))
        path = f"{parent}/f{step}"
        files.append(path)
        return [f"write {src} {path}"]

    def _step(
        self, shadow: Path, step: int, rng: random.Random, files: list[str], dirs: list[str]
    ) -> None:
        op_img = self._tmp / "op.img"
        sparse_copy(shadow, op_img)
        _debugfs(op_img, self._operation(step, rng, files, dirs))
        blocks = changed_blocks(shadow, op_img, self.block)
        if not blocks:
            return
        payload = self._tmp / "tx.bin"
        with open(op_img, "rb") as f, open(payload, "wb") as out:
            for b in blocks:
                f.seek(b * self.block)
                out.write(f.read(self.block))
        before = self._tmp / "before.img"
        sparse_copy(shadow, before)
        _debugfs(shadow, ["jo", f"jw -b {','.join(map(str, blocks))} {payload}", "jc"])
        journal = changed_blocks(before, shadow, self.block)
        # The commit block ends the transaction: the journal block written last, i.e. the
        # highest one of this transaction (the journal is emptied before it could wrap).
        sb_blocks = {b for b in journal if b < 64}  # the fs superblock (needs_recovery)
        in_journal = [b for b in journal if b not in sb_blocks]
        commit = max(in_journal) if in_journal else None
        body = sorted(set(journal) - {commit} if commit is not None else set(journal))
        self._write_blocks(shadow, body)
        if self.barriers:
            self._flush()
        if commit is not None:
            self._write_blocks(shadow, [commit], fua=self.barriers)
        if self.on_ack is not None:
            self.on_ack(step)
        # The checkpoint: the blocks in place (into the shadow too).
        with open(op_img, "rb") as src, open(shadow, "r+b") as dst:
            for b in blocks:
                src.seek(b * self.block)
                dst.seek(b * self.block)
                dst.write(src.read(self.block))
        self._write_blocks(shadow, blocks)

    def _checkpoint(self, shadow: Path) -> None:
        if self.barriers:
            self._flush()  # the checkpointed blocks are stable before the journal forgets them
        before = self._tmp / "before.img"
        sparse_copy(shadow, before)
        run = subprocess.run(
            ["e2fsck", "-E", "journal_only", "-p", str(shadow)],
            capture_output=True,
            text=True,
            check=False,
            close_fds=False,
        )
        if run.returncode not in (0, 1):
            raise ProcessError(f"e2fsck -E journal_only on the shadow: {run.stdout}{run.stderr}")
        _debugfs(shadow, ["feature needs_recovery"])  # still mounted
        self._write_blocks(shadow, changed_blocks(before, shadow, self.block))
        if self.barriers:
            self._flush()

    # -- to the block stack -----------------------------------------------------------

    def _write_blocks(self, shadow: Path, blocks: list[int], fua: bool = False) -> None:
        bs = self.block
        runs: list[list[int]] = []
        for b in sorted(blocks):
            if runs and runs[-1][-1] + 1 == b and len(runs[-1]) * bs < (128 << 10):
                runs[-1].append(b)
            else:
                runs.append([b])
        with open(shadow, "rb") as f:
            for run in runs:
                f.seek(run[0] * bs)
                self.backend.write(run[0] * bs, f.read(len(run) * bs), fua=fua)
                self.writes += 1

    def _flush(self) -> None:
        self.backend.flush()
        self.flushes += 1
