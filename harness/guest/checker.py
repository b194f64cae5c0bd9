"""A long-lived helper in the guest that mounts, checks and releases disk states on request.

Crash-state exploration checks hundreds of states in one guest. Measured under
TCG on this kind of machine (2 cores), the kernel's part of a state is small —
mount(2) with journal recovery 15-25 ms, umount(2) 10-20 ms, BLKFLSBUF 1 ms —
and the rest is process start-up: every exec of util-linux `mount`, `umount`,
`blockdev` (dynamic linking under emulation) costs 100-250 ms, and every SSH
command a channel and a shell of its own (~0.1 s). So one Perl process (Perl
is Essential in Debian; the image has it with its core modules) stays up on
one SSH channel and makes those system calls itself; the workload's check is
the only program started per state.

The protocol is one JSON object per line each way. A request may hold, done
in this order:

    digest   a device: the MD5 of its whole content, read before anything else
    mount    {device, dir, type, flags, data, options}: mount(2); with EINVAL and
             options, util-linux mount is tried too (its option parsing is the reference)
    command  a /bin/sh command, run (if the mount succeeded) with stdin from
             `stdin`, in $HOME, killed with its process group after `timeout` s;
             with `argv` (the same command as a word list) the program is executed
             directly, without a shell: one exec fewer, ~0.1 s under TCG
    release  {dir, device}: umount(2) (processes still using the mount are
             killed first), then BLKFLSBUF on the device: the block device's page
             cache goes, so the next state is read from the disk, never from memory
    after    another command, run after the release (a filesystem checker)

and the answer holds one object per step (`ok`/`error`, `exit`, `stdout`,
`stderr`, `ms`). Output bytes travel as Latin-1 code points (JSON strings)
and are decoded as UTF-8 here.
"""

from __future__ import annotations

import json
import logging
import select
import time
from typing import Any

from harness.errors import GuestError, TimeoutExpired
from harness.guest.ssh import SSHSession

log = logging.getLogger(__name__)

HELPER_PATH = "/run/powercut-checker.pl"

# x86_64 system call numbers and ioctls: the guest is always x86_64 (qemu-system-x86_64).
HELPER = r"""
use strict;
use warnings;
use JSON::PP ();
use POSIX ();
use Time::HiRes ();
use Digest::MD5 ();

my ($SYS_ioctl, $SYS_mount, $SYS_umount2) = (16, 165, 166);
my $BLKFLSBUF = 0x1261;
my ($ENOENT, $EBUSY, $EINVAL) = (2, 16, 22);
my $MAIN = $$;
# Named by this helper's PID: two helpers on one machine (the unit tests run it on the host,
# in parallel) must never read each other's output.
my ($OUT, $ERR, $IN) = map { "/run/powercut-checker.$$.$_" } qw(out err in);
END { unlink($OUT, $ERR, $IN) if $$ == $MAIN; }
my $json = JSON::PP->new->utf8->canonical;
my ($T, $F) = (JSON::PP::true, JSON::PP::false);
$| = 1;

sub ms { return int(1000 * (Time::HiRes::time() - $_[0]) + 0.5); }

sub slurp {
    open(my $f, '<:raw', $_[0]) or return "";
    local $/;
    my $d = <$f>;
    close $f;
    return defined $d ? $d : "";
}

sub octets { my $s = shift; utf8::encode($s) if defined $s; return $s; }

sub run_command {
    my ($cmd, $timeout, $stdin) = @_;    # $cmd: a /bin/sh command, or an argv (array ref)
    my $t0 = Time::HiRes::time();
    my $input = '/dev/null';
    if (defined $stdin) {
        open(my $f, '>:raw', $IN)
            or return { exit => -1, stdout => "", stderr => "$IN: $!", ms => 0 };
        print $f $stdin;
        close $f;
        $input = $IN;
    }
    my $pid = fork();
    return { exit => -1, stdout => "", stderr => "fork: $!", ms => 0 } unless defined $pid;
    if ($pid == 0) {
        setpgrp(0, 0);
        chdir($ENV{HOME} || '/');
        # Perl's STDIN has read requests ahead; closed now, or exec would seek fd 0
        # (by then the command's input) back to where Perl's reading stands.
        close(STDIN);
        my $w = POSIX::O_WRONLY() | POSIX::O_CREAT() | POSIX::O_TRUNC();
        my @fds = (POSIX::open($input, POSIX::O_RDONLY()),
                   POSIX::open($OUT, $w, 0600), POSIX::open($ERR, $w, 0600));
        for my $i (0 .. 2) {
            POSIX::_exit(126) unless defined $fds[$i];
            POSIX::dup2($fds[$i], $i);
        }
        if (ref $cmd) {
            exec { $cmd->[0] } @$cmd or POSIX::_exit(127);
        }
        exec('/bin/sh', '-c', $cmd) or POSIX::_exit(127);
    }
    my $late = 0;
    eval {
        local $SIG{ALRM} = sub { die "timeout\n" };
        alarm($timeout);
        waitpid($pid, 0);
        alarm(0);
    };
    if ($@) {
        $late = 1;
        kill('KILL', -$pid);
        waitpid($pid, 0);
    }
    my $status = $?;
    my $code = ($status & 127) ? 128 + ($status & 127) : $status >> 8;
    return {
        exit => $late ? -2 : $code, stdout => slurp($OUT), stderr => slurp($ERR),
        ms => ms($t0), timed_out => $late ? $T : $F,
    };
}

sub do_mount {
    my ($m) = @_;
    my $t0 = Time::HiRes::time();
    my ($dev, $dir, $type) = (octets($m->{device}), octets($m->{dir}), octets($m->{type}));
    my $data = octets($m->{data} // "");
    my $flags = ($m->{flags} // 0) + 0;
    mkdir $dir;
    my $r = length($data)
        ? syscall($SYS_mount, $dev, $dir, $type, $flags, $data)
        : syscall($SYS_mount, $dev, $dir, $type, $flags, 0);
    return { ok => $T, ms => ms($t0) } if $r == 0;
    my ($errno, $why) = ($! + 0, "$!");
    my $options = $m->{options} // "";
    if ($errno == $EINVAL && length($options)) {
        my $q = sub { my $s = shift; $s =~ s/'/'\\''/g; return "'$s'"; };
        my $c = run_command(
            "mount -t " . $q->($type) . " -o " . $q->(octets($options)) . " "
            . $q->($dev) . " " . $q->($dir), 120, undef);
        return { ok => $T, ms => ms($t0), via => "mount" } if $c->{exit} == 0;
        $why .= "; mount: $c->{stderr}";
    }
    return { ok => $F, errno => $errno, error => "mount $dev: $why", ms => ms($t0) };
}

sub kill_users {
    my ($dir) = @_;
    for my $p (glob('/proc/[0-9]*')) {
        my ($pid) = $p =~ m{(\d+)$};
        next if $pid == $$;
        for my $link ("$p/cwd", "$p/root", glob("$p/fd/*")) {
            my $to = readlink($link);
            if (defined $to && ($to eq $dir || index($to, "$dir/") == 0)) {
                kill('KILL', $pid);
                last;
            }
        }
    }
}

sub release {
    my ($r) = @_;
    my $t0 = Time::HiRes::time();
    my $err = "";
    if (defined $r->{dir}) {
        my $dir = octets($r->{dir});
        my $done = 0;
        for my $try (1 .. 100) {
            if (syscall($SYS_umount2, $dir, 0) == 0) { $done = 1; last; }
            my $errno = $! + 0;
            if ($errno == $EINVAL || $errno == $ENOENT) { $done = 1; last; }    # not mounted
            if ($errno != $EBUSY) { $err = "umount $dir: $!"; last; }
            kill_users($dir);
            Time::HiRes::sleep(0.05);
        }
        $err ||= "umount $dir: still busy" unless $done;
    }
    if (defined $r->{device}) {
        my $dev = octets($r->{device});
        if (open(my $fh, '<', $dev)) {
            if (syscall($SYS_ioctl, fileno($fh), $BLKFLSBUF, 0) == -1) {
                $err ||= "BLKFLSBUF $dev: $!";
            }
            close $fh;
        } else {
            $err ||= "open $dev: $!";
        }
    }
    return { ok => $err eq "" ? $T : $F, error => $err, ms => ms($t0) };
}

sub device_md5 {
    open(my $fh, '<:raw', octets($_[0])) or return "error: $!";
    my $ctx = Digest::MD5->new;
    $ctx->addfile($fh);
    close $fh;
    return $ctx->hexdigest;
}

print $json->encode({ ready => $T, pid => $$ }), "\n";
while (my $line = <STDIN>) {
    my $req = eval { $json->decode($line) };
    if (!$req) {
        print $json->encode({ error => "bad request: $@" }), "\n";
        next;
    }
    my %res = (id => $req->{id});
    my $timeout = $req->{timeout} || 300;
    $res{digest} = device_md5($req->{digest}) if defined $req->{digest};
    my $mounted = 1;
    if ($req->{mount}) {
        $res{mount} = do_mount($req->{mount});
        $mounted = $res{mount}{ok};
    }
    if (defined $req->{command} && $mounted) {
        my $cmd = $req->{argv} ? [map { octets($_) } @{ $req->{argv} }] : octets($req->{command});
        $res{command} = run_command($cmd, $timeout, octets($req->{stdin}));
    }
    $res{release} = release($req->{release}) if $req->{release};
    $res{after} = run_command(octets($req->{after}), $timeout, undef) if defined $req->{after};
    print $json->encode(\%res), "\n";
}
"""


def text(value: Any) -> str:
    """A helper output string (bytes as Latin-1 code points) as the text it was."""
    if not isinstance(value, str):
        return ""
    return value.encode("latin-1", "replace").decode("utf-8", "replace")


class CheckerLoop:
    """The helper on one SSH channel: `request` sends one request and waits for its answer."""

    def __init__(self, ssh: SSHSession, *, timeout: float = 120.0) -> None:
        ssh.put_bytes(HELPER.encode(), HELPER_PATH)
        self._chan = ssh.open_channel(f"exec perl {HELPER_PATH}")
        self._buf = bytearray()
        self._err = bytearray()
        self._next = 0
        self.requests = 0
        ready = json.loads(self._line(timeout))
        if not ready.get("ready"):
            raise GuestError(f"the checker helper did not start: {ready}")
        self.pid = int(ready.get("pid", 0))

    def request(self, req: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send `req`; wait up to `timeout` s for its answer (TimeoutExpired: the loop is done)."""
        self._next += 1
        body = {**req, "id": self._next}
        t0 = time.monotonic()
        self._chan.sendall(json.dumps(body).encode() + b"\n")
        answer: dict[str, Any] = json.loads(self._line(timeout))
        self.requests += 1
        if answer.get("id") != self._next:
            raise GuestError(f"the checker helper answered {answer!r} to request {self._next}")
        log.debug("checker request %d: %.3f s", self._next, time.monotonic() - t0)
        return answer

    def _line(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        chan = self._chan
        while (nl := self._buf.find(b"\n")) < 0:
            if chan.recv_ready():
                self._buf.extend(chan.recv(65536))
                continue
            if chan.recv_stderr_ready():
                self._err.extend(chan.recv_stderr(65536))
                continue
            if chan.exit_status_ready() or chan.closed:
                while chan.recv_stderr_ready():
                    self._err.extend(chan.recv_stderr(65536))
                why = self._err.decode(errors="replace").strip()[-500:]
                raise GuestError(f"the checker helper in the guest exited: {why or 'no message'}")
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise TimeoutExpired(f"the checker helper did not answer within {timeout:.0f}s")
            select.select([chan], [], [], min(left, 0.5))
        line = bytes(self._buf[:nl])
        del self._buf[: nl + 1]
        return line

    def close(self) -> None:
        self._chan.close()
