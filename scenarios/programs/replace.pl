#!/usr/bin/perl
# Replace a file the careful way, N times: write the new version to a temporary,
# fsync it, rename it over the old one, then acknowledge. The file holds every
# token acknowledged so far, one per line, so the check prints them.
#
#   replace.pl N             never fsyncs the directory: the rename is not promised
#   replace.pl N --fsync-dir fsyncs the directory after each rename (the fix)
use strict;
use warnings;
use Fcntl qw(O_WRONLY O_CREAT O_TRUNC O_RDONLY O_DIRECTORY);
use IO::Handle;

my ($n, $fix) = (shift // 20, (shift // '') eq '--fsync-dir');
$| = 1;
for my $i (1 .. $n) {
    sysopen(my $tmp, "state.tmp", O_WRONLY | O_CREAT | O_TRUNC, 0644) or die "state.tmp: $!";
    my $text = join("", map { "$_\n" } 1 .. $i);
    syswrite($tmp, $text) == length($text) or die "write: $!";
    $tmp->sync or die "fsync: $!";
    close($tmp) or die "close: $!";
    rename("state.tmp", "state") or die "rename: $!";
    if ($fix) {
        sysopen(my $dir, ".", O_RDONLY | O_DIRECTORY) or die ".: $!";
        $dir->sync or die "fsync .: $!";
        close($dir);
    }
    print "ack $i\n";
}
