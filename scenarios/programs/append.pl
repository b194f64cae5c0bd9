#!/usr/bin/perl
# Append N records to a log and acknowledge each one.
#
#   append.pl N              acknowledges what only the page cache holds
#   append.pl N --fdatasync  fdatasync(2)s the log before each acknowledgement (the fix)
use strict;
use warnings;
use Fcntl qw(O_WRONLY O_CREAT O_APPEND);

my $SYS_fdatasync = 75;    # x86_64
my ($n, $fix) = (shift // 20, (shift // '') eq '--fdatasync');
$| = 1;
sysopen(my $log, "log", O_WRONLY | O_CREAT | O_APPEND, 0644) or die "log: $!";
for my $i (1 .. $n) {
    my $record = "rec $i\n";
    syswrite($log, $record) == length($record) or die "write: $!";
    if ($fix) {
        syscall($SYS_fdatasync, fileno($log)) == 0 or die "fdatasync: $!";
    }
    print "ack $i\n";
}
