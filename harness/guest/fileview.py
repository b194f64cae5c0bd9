"""A file view of a mounted tree: what each entry is, what it holds, and where on the disk.

For a failing crash state the explanation compares the workload's tree as
the filesystem recovered it with the tree at the same point with every write
kept (harness/explore/causes.py): a file that is missing, shorter, or holds
other bytes is the effect a call lacked. And to say which lost or torn
writes of the disk hit which file, each regular file's extents come from
FIEMAP (FS_IOC_FIEMAP), which ext4, xfs, btrfs and f2fs all answer, instead
of one filesystem's own tools (today's attribution, harness/explore/attribute.py,
reads ext4 with debugfs).

One Perl program (Perl is Essential in Debian; the checker guest's helper is
Perl for the same reason: no exec per file) walks the tree without following
symlinks or leaving the filesystem, and prints one JSON object per entry:
path (relative to the root), type, size, mode, inode, link count, an MD5 of
the content (of at most `max_bytes`; `partial` says so), a symlink's target,
and a file's extents (logical, physical, length in bytes, FIEMAP flags). It
stops after `max_entries` entries (`truncated`). A file it cannot open or map
says why (`error`) and the walk goes on.

FIEMAP's physical addresses are the filesystem's: byte offsets on the block
device for ext4, xfs and f2fs, but btrfs's own logical addresses, which its
chunk tree maps to the device. On btrfs the view carries that map
(`btrfs inspect-internal dump-tree -t chunk`, parsed by `parse_chunk_tree`)
and `device_extents` translates. Extents flagged inline (the data sits in
metadata), encoded (compressed) or unknown have no device location of their
own and are reported as such, never guessed.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

from harness.errors import GuestError
from harness.explore.fileview import (
    MAX_BYTES,
    MAX_ENTRIES,
    Chunk,
    FileView,
    parse_chunk_tree,
    parse_view,
)

if TYPE_CHECKING:
    from harness.guest.ssh import SSHSession

HELPER_PATH = "/run/powercut-fileview.pl"

# x86_64: FS_IOC_FIEMAP = _IOWR('f', 11, struct fiemap) with sizeof(struct fiemap) == 32;
# struct fiemap {u64 start, length; u32 flags, mapped_extents, extent_count, reserved;}
# then struct fiemap_extent {u64 logical, physical, length, reserved64[2]; u32 flags, reserved[3];}
# (56 bytes each). FIEMAP_FLAG_SYNC (1) writes dirty data first so it has a place.
HELPER = r"""
use strict;
use warnings;
use JSON::PP ();
use Digest::MD5 ();
use Fcntl qw(:mode O_RDONLY);

my ($root, $max_entries, $max_bytes, $sync) = @ARGV;
$sync //= 1;
my $FS_IOC_FIEMAP = 0xC020660B;
my $O_DIRECTORY = 0200000;
my $O_NOATIME = 01000000;
my $SYS_getdents64 = 217;
my $BATCH = 256;
my $json = JSON::PP->new->utf8->canonical;    # names are bytes: Latin-1 code points in JSON
my $count = 0;
my $truncated = 0;
my @root_stat = lstat($root) or die "lstat $root: $!\n";
$| = 0;

sub fiemap {
    my ($fh) = @_;
    my @extents;
    my $start = 0;
    while (1) {
        my $buf = pack("QQLLLL", $start, ~0 - $start, $sync ? 1 : 0, 0, $BATCH, 0)
            . ("\0" x (56 * $BATCH));
        ioctl($fh, $FS_IOC_FIEMAP, $buf) or return (undef, "FIEMAP: $!");
        my (undef, undef, undef, $mapped) = unpack('QQLL', $buf);
        my $last = 0;
        for my $i (0 .. $mapped - 1) {
            my ($log, $phys, $len, undef, undef, $flags) =
                unpack('QQQQQL', substr($buf, 32 + 56 * $i, 56));
            push @extents, [$log, $phys, $len, $flags];
            $start = $log + $len;
            $last = 1 if $flags & 1;
        }
        last if $last || $mapped == 0 || $mapped < $BATCH;
    }
    return (\@extents, undef);
}

sub entry {
    my ($path, $rel) = @_;
    my @st = lstat($path);
    return { path => $rel, type => 'gone', error => "lstat: $!" } unless @st;
    my $mode = $st[2];
    my %e = (path => $rel, size => $st[7] + 0, mode => $mode & 07777,
             inode => $st[1] + 0, nlink => $st[3] + 0);
    if (S_ISDIR($mode)) { $e{type} = 'dir'; }
    elsif (S_ISLNK($mode)) { $e{type} = 'symlink'; $e{target} = readlink($path) // ''; }
    elsif (S_ISREG($mode)) {
        $e{type} = 'file';
        if (sysopen(my $fh, $path, O_RDONLY | $O_NOATIME)) {
            binmode($fh);
            my $ctx = Digest::MD5->new;
            my ($left, $buf) = ($max_bytes, '');
            while ($left > 0) {
                my $n = sysread($fh, $buf, $left < 1048576 ? $left : 1048576);
                last unless $n;
                $ctx->add($buf);
                $left -= $n;
            }
            $e{md5} = $ctx->hexdigest;
            $e{partial} = JSON::PP::true if $st[7] > $max_bytes;
            my ($extents, $err) = fiemap($fh);
            if ($extents) { $e{extents} = $extents; } else { $e{error} = $err; }
            close $fh;
        } else {
            $e{error} = "open: $!";
        }
    } else { $e{type} = 'other'; }
    return \%e;
}

sub walk {
    my ($dir, $rel) = @_;
    my @names;
    # getdents64 on a descriptor opened O_NOATIME: readdir(3) would touch the directory's
    # atime, a change of its own that a listing made before the cut must not add.
    sysopen(my $dh, $dir, O_RDONLY | $O_DIRECTORY | $O_NOATIME) or do {
        print $json->encode({ path => $rel, type => 'dir', error => "opendir: $!" }), "\n";
        return;
    };
    while (1) {
        my $buf = "\0" x 65536;
        my $n = syscall($SYS_getdents64, fileno($dh), $buf, 65536);
        if ($n < 0) {
            print $json->encode({ path => $rel, type => 'dir', error => "getdents64: $!" }), "\n";
            return;
        }
        last if $n == 0;
        for (my $at = 0; $at < $n;) {
            my $reclen = unpack('S', substr($buf, $at + 16, 2));
            my $name = unpack('Z*', substr($buf, $at + 19, $reclen - 19));
            push @names, $name if $name ne '.' && $name ne '..';
            $at += $reclen;
        }
    }
    close($dh);
    @names = sort @names;
    for my $name (@names) {
        if ($count >= $max_entries) { $truncated = 1; return; }
        my $path = "$dir/$name";
        my $r = $rel eq '' ? $name : "$rel/$name";
        my $e = entry($path, $r);
        $count++;
        print $json->encode($e), "\n";
        my @st = lstat($path);
        walk($path, $r) if @st && S_ISDIR($st[2]) && $st[0] == $root_stat[0];
    }
}

walk($root, '');
print $json->encode({ end => JSON::PP::true, entries => $count,
                      truncated => $truncated ? JSON::PP::true : JSON::PP::false }), "\n";
"""


def view_command(
    root: str, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES, *, sync: bool = True
) -> str:
    """The guest command that prints the view of `root` (the helper must be installed).

    `sync` asks FIEMAP to write dirty data first so that it has a place on the
    disk; a listing of a live tree before a cut (`sync=False`) must not: it
    would make durable what the run left in the page cache. Files and
    directories are read with O_NOATIME either way.
    """
    flag = 1 if sync else 0
    return f"perl {HELPER_PATH} {shlex.quote(root)} {int(max_entries)} {int(max_bytes)} {flag}"


def install(ssh: SSHSession) -> None:
    ssh.put_bytes(HELPER.encode(), HELPER_PATH, mode=0o600)


def file_view(
    ssh: SSHSession,
    root: str,
    filesystem: str,
    *,
    device: str = "/dev/vda",
    max_entries: int = MAX_ENTRIES,
    max_bytes: int = MAX_BYTES,
    timeout: float = 300.0,
    sync: bool = True,
    chunk_map: bool = True,
) -> FileView:
    """List `root` in the guest (installing the helper first); on btrfs with its chunk map.

    A live tree listed before a cut takes `sync=False` (see `view_command`) and
    may skip btrfs's chunk map (`chunk_map=False`) when only names, sizes and
    digests are wanted.
    """
    install(ssh)
    result = ssh.run(view_command(root, max_entries, max_bytes, sync=sync), timeout=timeout)
    if result.exit_code != 0:
        raise GuestError(f"the file view of {root} failed: {result.stderr.strip()[-300:]}")
    chunks: tuple[Chunk, ...] = ()
    if filesystem == "btrfs" and chunk_map:
        dump = ssh.run(
            f"btrfs inspect-internal dump-tree -t chunk {shlex.quote(device)}", timeout=timeout
        )
        if dump.exit_code != 0:
            raise GuestError(f"btrfs's chunk tree of {device}: {dump.stderr.strip()[-300:]}")
        chunks = parse_chunk_tree(dump.stdout)
    return parse_view(result.stdout, root, filesystem, chunks)
