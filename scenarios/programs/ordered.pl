#!/usr/bin/perl
# Two files whose recovery relies on their order: rows appended to `data`, then
# the number of rows written to `commit` and made durable, then the
# acknowledgement. Recovery trusts every row up to the number in `commit`.
#
#   ordered.pl N                 assumes data reaches the disk before commit does
#   ordered.pl N --fdatasync-data fdatasync(2)s data before writing commit (the fix)
use strict;
use warnings;
use Fcntl qw(O_WRONLY O_CREAT O_APPEND SEEK_SET);

my $SYS_fdatasync = 75;    # x86_64
my ($n, $fix) = (shift // 20, (shift // '') eq '--fdatasync-data');
$| = 1;
sysopen(my $data, "data", O_WRONLY | O_CREAT | O_APPEND, 0644) or die "data: $!";
sysopen(my $commit, "commit", O_WRONLY | O_CREAT, 0644) or die "commit: $!";
for my $i (1 .. $n) {
    my $row = "row $i\n";
    syswrite($data, $row) == length($row) or die "write data: $!";
    if ($fix) {
        syscall($SYS_fdatasync, fileno($data)) == 0 or die "fdatasync data: $!";
    }
    sysseek($commit, 0, SEEK_SET) or die "seek: $!";
    syswrite($commit, "$i\n") == length("$i\n") or die "write commit: $!";
    syscall($SYS_fdatasync, fileno($commit)) == 0 or die "fdatasync commit: $!";
    print "ack $i\n";
}
