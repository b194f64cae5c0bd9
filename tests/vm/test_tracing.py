"""A workload's system calls traced in a real guest, and the file view on all four filesystems.

The tracing test runs a small program that replaces a file the careful way
(write a temporary, fsync it, rename it over the old one) and acknowledges,
under each mechanism (the kernel's tracepoints through tracefs, strace), and
checks the calls come back with their paths, in order, each placed on the
host's clock between the moment the host started the program and the moment
it had the acknowledgement. The file view test lists a tree on ext4, xfs,
btrfs and f2fs (one guest, four disks made on the host) and reads, on the
host, the disk bytes FIEMAP says each file lives at: they must be the file.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.block.cache import CacheMode
from harness.explore.clock import causal_upper
from harness.explore.fileview import EntryType
from harness.explore.syscalls import CallKind
from harness.guest.clock import sample_offset
from harness.guest.fileview import file_view
from harness.guest.tracing import Mechanism, TraceStream
from harness.vm.spec import FileDisk
from harness.workloads.filesystem import make_disk

pytestmark = pytest.mark.vm

PROGRAM = "cd /mnt && printf v1 > x && printf v2 > x.tmp && sync x.tmp && mv x.tmp x && echo ack 1"


@pytest.mark.parametrize("mechanism", [Mechanism.TRACEFS, Mechanism.STRACE], ids=lambda m: m.value)
def test_a_traced_program_gives_its_calls_in_order_on_the_hosts_clock(
    vm_factory: Any, mechanism: Mechanism
) -> None:
    disk = vm_factory.disk_file(64)
    make_disk(disk, 64 << 20, filesystem="ext4")
    machine = vm_factory(FileDisk(disk, CacheMode.WRITEBACK))
    ssh = machine.ssh
    ssh.check_output("mount /dev/vda /mnt")
    stream = TraceStream(ssh, vm_factory.tmpdir / "trace.txt", mechanism).start()
    vm_factory.add_log("trace", vm_factory.tmpdir / "trace.txt")
    before = sample_offset(ssh, 10, clock_id=mechanism.clock_id)
    started = time.monotonic_ns()
    acked: list[int] = []
    result = ssh.run(
        stream.command(PROGRAM),
        timeout=300,
        on_stdout=lambda line: acked.append(time.monotonic_ns()) if line == "ack 1" else None,
    )
    assert result.ok, result.stderr
    stream.finish()
    after = sample_offset(ssh, 10, clock_id=mechanism.clock_id)
    trace = stream.trace()
    assert trace.unparsed_count == 0, trace.unparsed

    mine = [c for c in trace.calls if c.ok and c.path is not None and c.path.startswith("/mnt/x")]
    steps = [
        (c.kind, c.path, c.path2)
        for c in mine
        if c.kind in (CallKind.OPEN, CallKind.WRITE, CallKind.FSYNC, CallKind.RENAME)
        and (c.kind is not CallKind.OPEN or (c.flags or 0) & 0o100)
    ]
    assert steps == [
        (CallKind.OPEN, "/mnt/x", None),
        (CallKind.WRITE, "/mnt/x", None),
        (CallKind.OPEN, "/mnt/x.tmp", None),
        (CallKind.WRITE, "/mnt/x.tmp", None),
        (CallKind.FSYNC, "/mnt/x.tmp", None),
        (CallKind.RENAME, "/mnt/x.tmp", "/mnt/x"),
    ], [c.describe() for c in mine]
    ack = next(c for c in trace.calls if c.data == b"ack 1\n")
    rename = next(c for c in mine if c.kind is CallKind.RENAME)
    assert rename.exit_ns is not None and rename.exit_ns <= ack.enter_ns

    # Every call falls, on the host's clock, between the start and the acknowledgement's arrival:
    # by the offset's bounds, and (also across a jump of the guest clock) by causality alone.
    samples = stream.arrival_bounds()
    bounds = before.intersect(after).tighten_upper(samples)
    why = (before, after, bounds, started, acked)
    for call in [*mine, ack]:
        earliest, latest = bounds.to_host(call.enter_ns)
        assert latest >= started, (call.describe(), latest - started, why)
        assert earliest <= acked[0], (call.describe(), earliest - acked[0], why)
        upper = causal_upper(samples, call.exit_ns or call.enter_ns)
        assert upper is not None and started <= upper, (call.describe(), why)
    if bounds.consistent:
        assert bounds.width_ns < 100_000_000, bounds


# Every call kind the explanation reads (x86_64 numbers through Perl's syscall(); msync needs
# a mapping Perl cannot make, and is covered by the parser's unit tests).
EVERY_CALL = r"""
use strict; use warnings; use Fcntl;
sub sys { my ($n, @a) = @_; my $r = syscall($n, @a); die "syscall $n: $!" if $r == -1; $r }
sysopen(my $f, "a", O_WRONLY|O_CREAT|O_TRUNC|O_SYNC) or die "a: $!";
my $fd = fileno($f);
syswrite($f, "x" x 10) == 10 or die;
my $two = "yy";
sys(18, $fd, $two, 2, 100);                                  # pwrite64
my $iov = pack("P2 Q", $two, 2);
sys(20, $fd, $iov, 1);                                       # writev
truncate("a", 50) or die; truncate($f, 60) or die;           # truncate, ftruncate
sys(285, $fd, 0, 0, 4096);                                   # fallocate
sys(74, $fd); sys(75, $fd); sys(162); sys(306, $fd);         # fsync fdatasync sync syncfs
sys(277, $fd, 0, 0, 2);                                      # sync_file_range
close($f);
rename("a", "b") or die; sys(316, -100, "b", -100, "c", 0);  # rename, renameat2
link("c", "d") or die; unlink("d") or die; symlink("c", "s") or die;
mkdir("e") or die; rmdir("e") or die;
my $g = sys(85, "g", 0644); sys(3, $g);                      # creat, close
print "ack 1
";
"""
KINDS = {
    ("openat", "/mnt/a"), ("write", "/mnt/a"), ("pwrite64", "/mnt/a"), ("writev", "/mnt/a"),
    ("truncate", "/mnt/a"), ("ftruncate", "/mnt/a"), ("fallocate", "/mnt/a"),
    ("fsync", "/mnt/a"), ("fdatasync", "/mnt/a"), ("sync", None), ("syncfs", "/mnt/a"),
    ("sync_file_range", "/mnt/a"), ("close", "/mnt/a"), ("rename", "/mnt/a"),
    ("renameat2", "/mnt/b"), ("link", "/mnt/c"), ("unlink", "/mnt/d"), ("symlink", "/mnt/s"),
    ("mkdir", "/mnt/e"), ("rmdir", "/mnt/e"), ("creat", "/mnt/g"), ("close", "/mnt/g"),
}  # fmt: skip


@pytest.mark.parametrize("mechanism", [Mechanism.TRACEFS, Mechanism.STRACE], ids=lambda m: m.value)
def test_every_call_kind_is_traced_with_its_path(vm_factory: Any, mechanism: Mechanism) -> None:
    disk = vm_factory.disk_file(64)
    make_disk(disk, 64 << 20, filesystem="ext4")
    machine = vm_factory(FileDisk(disk, CacheMode.WRITEBACK))
    ssh = machine.ssh
    ssh.check_output("mount /dev/vda /mnt")
    ssh.put_bytes(EVERY_CALL.encode(), "/run/every.pl")
    stream = TraceStream(ssh, vm_factory.tmpdir / "trace.txt", mechanism).start()
    vm_factory.add_log("trace", vm_factory.tmpdir / "trace.txt")
    result = ssh.run(stream.command("cd /mnt && perl /run/every.pl"), timeout=300)
    assert result.ok and result.stdout == "ack 1\n", result.stderr
    stream.finish()
    trace = stream.trace()
    seen = {(c.name, c.path) for c in trace.calls if c.ok}
    assert seen >= KINDS, sorted(KINDS - seen)
    opened = next(c for c in trace.calls if c.name == "openat" and c.path == "/mnt/a")
    assert opened.synchronous and "O_SYNC" in opened.describe()
    pwrite = next(c for c in trace.calls if c.name == "pwrite64")
    assert (pwrite.offset, pwrite.length) == (100, 2)
    writev = next(c for c in trace.calls if c.name == "writev")
    assert writev.length == 2
    rename = next(c for c in trace.calls if c.name == "renameat2")
    assert rename.path2 == "/mnt/c"


FILESYSTEMS = ("ext4", "xfs", "btrfs", "f2fs")
SIZES = {"ext4": 64 << 20, "xfs": 300 << 20, "btrfs": 128 << 20, "f2fs": 64 << 20}
BIG = bytes((i * 7 + i // 4096) % 251 for i in range(300_000))


@pytest.fixture(scope="module")
def four(module_vm_factory: Any) -> Iterator[tuple[Any, dict[str, Path]]]:
    disks = {}
    for fs in FILESYSTEMS:
        disks[fs] = module_vm_factory.disk_file(SIZES[fs] >> 20, f"{fs}.img")
        make_disk(disks[fs], SIZES[fs], filesystem=fs)
    machine = module_vm_factory(*(FileDisk(disks[fs], CacheMode.WRITEBACK) for fs in FILESYSTEMS))
    yield machine, disks


@pytest.mark.parametrize("fs", FILESYSTEMS)
def test_the_file_view_finds_each_files_bytes_on_the_disk(
    four: tuple[Any, dict[str, Path]], fs: str
) -> None:
    machine, disks = four
    ssh = machine.ssh
    device = f"/dev/vd{'abcd'[FILESYSTEMS.index(fs)]}"
    root = f"/mnt/{fs}"
    ssh.check_output(f"mkdir -p {root} && mount -t {fs} {device} {root} && mkdir {root}/d")
    ssh.put_bytes(BIG, f"{root}/d/big")
    ssh.put_bytes(b"small", f"{root}/small")
    ssh.check_output(f"ln -s small {root}/link && sync")
    view = file_view(ssh, root, fs, device=device)
    by = view.by_path()
    assert sorted(p for p in by if p != "lost+found") == ["d", "d/big", "link", "small"]
    assert by["d"].type is EntryType.DIR and by["link"].target == "small"
    big = by["d/big"]
    assert big.size == len(BIG) and big.md5 == hashlib.md5(BIG).hexdigest(), big
    assert by["small"].md5 == hashlib.md5(b"small").hexdigest()
    located = list(view.device_extents(big))
    assert located and sum(n for _o, _p, n in located) >= len(BIG), big.extents
    ssh.check_output(f"umount {root}")  # every block on the disk file, nothing in flight
    image = disks[fs].read_bytes()
    for logical, physical, length in located:
        n = min(length, len(BIG) - logical)
        assert image[physical : physical + n] == BIG[logical : logical + n], (fs, logical)
    hits = view.files_at(located[0][1] + 100, 10)
    assert hits == [("d/big", located[0][0] + 100, 10)]
