"""Tracing a workload's system calls in the guest under TCG: the mechanisms, side by side.

    python -m benchmarks trace [-- --rounds 3 --fsyncs 200 --inserts 30]
    python -m benchmarks trace -- --mechanisms off,strace,strace-file,strace-all,\
tracefs-eprobes,perf --bpftrace-startup          # the comparison the choice was made on

One guest (Debian's kernel, the recipe's image plus linux-perf, bpftrace and
sqlite3), a 256 MiB ext4 disk (QEMU's virtio-blk, writeback: the tracer's
cost does not depend on the backend), two run phases:

- `fsync-loop`: one Perl process appends 4 KiB and fsyncs, `--fsyncs` times,
  printing an acknowledgement after each;
- `sqlite`: the shipped sqlite scenario's run (`scenarios/sqlite.toml`): one
  sqlite3 process per insert, WAL, synchronous=FULL, `--inserts` of them.

Each run phase is timed on the host (the SSH command, as the runner times
its run phase) with a fresh filesystem, under each mechanism, rounds
alternating so the machine's drift hits all alike:

- `off`: no tracing;
- `tracefs`: what powercut does by default (`harness.guest.tracefs` through
  `harness.guest.tracing.TraceStream`): the kernel's syscall tracepoints in
  an instance filtered to the tree, names from the getname kretprobes, read
  over a second SSH channel and parsed as they arrive;
- `strace`: powercut's fallback: strace -f --seccomp-bpf -y into a FIFO read
  by a second SSH channel, every call kind of `syscalls.TRACED`;
- `strace-file`: the same into a file in /run (what the streaming costs);
- `strace-all`: `strace` with mmap, fcntl and dup* too (`OPTIONAL_CALLS`);
- `tracefs-eprobes`: the first tracefs candidate: the top-level instance,
  paths through eprobes with `ustring` on the tracepoints' pointers (which
  fault when the page is not resident), no descriptor or cwd tracking;
- `perf`: `perf trace -e <the calls>` into a file in /run (no `vfs_getname`
  probe without the kernel's debug info: paths stay pointers);
- `bpftrace`: one tracepoint probe per call (strings with `str()`), the tree
  by a fork map; `--bpftrace-startup` times its start-up alone (compiling the
  script under TCG).

Completeness per mechanism: the fsyncs of the file it saw (each run does a
known number), whether paths came out absolute, strings that faulted. Figures:
the median per mechanism and its ratio to `off` (goal for the chosen one:
<= 1.5). Last, the clock, per mechanism: the offset between the tracer's guest
clock and the host's CLOCK_MONOTONIC, bounded by SSH round trips
(`harness.guest.clock`, `harness.explore.clock`) before and after a traced run, and tightened by the
trace lines' arrival times.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import machine_info
from harness.explore.clock import bounds_from_round_trips
from harness.explore.syscalls import (
    FILE_CALLS,
    OPTIONAL_CALLS,
    TRACED,
    CallKind,
    parse_strace,
    strace_command,
)
from harness.guest.clock import sample_round_trips
from harness.guest.ssh import SSHSession
from harness.guest.tracing import Mechanism, TraceStream
from harness.vm.image import ensure_image
from harness.vm.qemu import QemuMachine
from harness.vm.spec import Accel, FileDisk, MachineSpec

GOAL_RATIO = 1.5
PACKAGES = ["linux-perf", "bpftrace", "sqlite3"]
MECHANISMS = ("off", "tracefs", "strace")
# Measured once to choose (benchmarks/results/trace-20261206T022850Z.json), selectable with
# --mechanisms; `tracefs-eprobes` changes the top-level tracefs and must not share a run with
# `tracefs`.
OTHERS = ("strace-file", "strace-all", "tracefs-eprobes", "perf", "bpftrace")
TRACEFS = "/sys/kernel/tracing"

FSYNC_LOOP = (
    'perl -MIO::Handle -e \'open(my $f, ">>", "log") or die $!; '
    'for my $i (1..$ARGV[0]) { syswrite($f, "x" x 4096) == 4096 or die $!; '
    '$f->sync or die $!; print "ack $i\\n"; STDOUT->flush }\' {n}'
)
SQLITE_SETUP = "sqlite3 app.db 'pragma journal_mode=wal; create table t(n integer primary key)'"
SQLITE_RUN = (
    'for i in $(seq {n}); do sqlite3 app.db "insert into t values($i)" && echo ack $i; done'
)

# Generates, in the guest, one probe per traced call from the kernel's own tracepoint
# formats: `tracefs` (eprobe lines for calls with string arguments, plain event names
# for the others) or `bpftrace` (a script). String arguments are `const char *` fields.
GENERATOR = r"""
use strict;
my ($what, @calls) = @ARGV;
my $ev = "/sys/kernel/tracing/events/syscalls";
for my $c (@calls) {
    my $fmt = "$ev/sys_enter_$c/format";
    open(my $f, '<', $fmt) or next;
    my (@str, @num);
    while (<$f>) {
        next unless /field:(.*?);\s+offset:(\d+)/;
        my $decl = $1; next if $2 < 16;
        my ($name) = $decl =~ /(\w+)$/;
        if ($decl =~ /const char \*/) { push @str, $name } else { push @num, $name }
    }
    close $f;
    if ($what eq 'tracefs') {
        if (@str) {
            my $args = join(' ', (map { "$_=+0(\$$_):ustring" } @str), (map { "$_=\$$_" } @num));
            print "e:pc/$c syscalls.sys_enter_$c $args\n";
        } else {
            print "syscalls/sys_enter_$c\n";
        }
        print "syscalls/sys_exit_$c\n";
    } else {
        my $fmtstr = join(' ', map({ "%s" } @str), map({ "%ld" } @num));
        my $vals = join(', ', (map { "str(args->$_)" } @str), (map { "args->$_" } @num));
        $vals = ", $vals" if length $vals;
        my $in = "tracepoint:syscalls:sys_enter_$c /\@t[pid]/";
        my $out = "tracepoint:syscalls:sys_exit_$c /\@t[pid]/";
        print "$in { printf(\"%d %lld $c $fmtstr\\n\", pid, nsecs$vals); }\n";
        print "$out { printf(\"%d %lld $c = %ld\\n\", pid, nsecs, args->ret); }\n";
    }
}
if ($what eq 'bpftrace') {
    my $fork = "tracepoint:sched:sched_process_fork /\@t[args->parent_pid]/";
    print "$fork { \@t[args->child_pid] = 1; }\n";
    print "BEGIN { \@t[cpid] = 1; }\nEND { clear(\@t); }\n";
}
"""


def _q(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


class _Reader:
    """A guest command on its own channel whose stdout lines are counted (and kept)."""

    def __init__(self, ssh: SSHSession, command: str) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(
            target=lambda: ssh.run(command, timeout=3600, on_stdout=self.lines.append),
            daemon=True,
        )
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def _fresh_fs(ssh: SSHSession, workload: str) -> None:
    ssh.check_output(
        "umount /mnt 2>/dev/null; mkfs.ext4 -q -F /dev/vda && mount /dev/vda /mnt", timeout=120
    )
    if workload == "sqlite":
        ssh.check_output(f"cd /mnt && {SQLITE_SETUP} >/dev/null", timeout=120)


def _prepare(ssh: SSHSession) -> dict[str, Any]:
    """Once per guest: tracefs mounted, the probe definitions generated."""
    ssh.check_output(f"mountpoint -q {TRACEFS} || mount -t tracefs nodev {TRACEFS}")
    ssh.put_bytes(GENERATOR.encode(), "/run/gen.pl")
    calls = " ".join(TRACED)
    ssh.check_output(f"perl /run/gen.pl tracefs {calls} > /run/tracefs.list", timeout=120)
    ssh.check_output(f"perl /run/gen.pl bpftrace {calls} > /run/trace.bt", timeout=120)
    listed = ssh.check_output("cat /run/tracefs.list").split()
    return {
        "tracefs_events": len([x for x in listed if x.startswith(("e:", "syscalls/"))]),
        "kernel": ssh.check_output("uname -r").strip(),
    }


def _tracefs_on(ssh: SSHSession) -> None:
    script = f"""
T={TRACEFS}
echo 0 > $T/tracing_on; echo > $T/trace; echo 0 > $T/events/enable
echo > $T/dynamic_events; echo mono > $T/trace_clock; echo 8192 > $T/buffer_size_kb
echo 1 > $T/options/event-fork; echo > $T/set_event_pid
while read -r line; do
  case $line in
    e:*) echo "$line" >> $T/dynamic_events ;;
    *) echo 1 > $T/events/$line/enable ;;
  esac
done < /run/tracefs.list
echo 1 > $T/events/pc/enable
"""
    ssh.check_output(script, timeout=120)


def _command(mechanism: str, run: str) -> str:
    if mechanism == "off":
        return run
    if mechanism == "tracefs-eprobes":
        inner = (
            f"echo $$ > {TRACEFS}/set_event_pid; echo 1 > {TRACEFS}/tracing_on; "
            f"exec sh -c {_q(run)}"
        )
        return f"sh -c {_q(inner)}; echo 0 > {TRACEFS}/tracing_on"
    if mechanism == "perf":
        events = ",".join(TRACED)
        return f"perf trace -e {events} -o /run/perf.txt -- sh -c {_q(run)}"
    if mechanism == "bpftrace":
        # bpftrace splits -c at spaces, quotes or not: the run goes in a script.
        return (
            f"printf '%s\\n' {_q(run)} > /run/run.sh && "
            "bpftrace -o /run/bt.txt -c '/bin/sh /run/run.sh' /run/trace.bt >/dev/null"
        )
    raise ValueError(mechanism)


def _one(ssh: SSHSession, mechanism: str, workload: str, n: int, work: Path) -> dict[str, Any]:
    _fresh_fs(ssh, workload)
    run = (FSYNC_LOOP if workload == "fsync-loop" else SQLITE_RUN).replace("{n}", str(n))
    run = f"cd /mnt && {run}"
    out: dict[str, Any] = {}
    stream: TraceStream | None = None
    reader: _Reader | None = None
    text = work / "trace.txt"
    text.unlink(missing_ok=True)
    if mechanism in ("strace", "strace-all"):
        stream = TraceStream(ssh, text, Mechanism.STRACE).start()
        calls = TRACED + OPTIONAL_CALLS if mechanism == "strace-all" else TRACED
        command = strace_command(run, stream.fifo, calls=calls)
    elif mechanism == "tracefs":
        stream = TraceStream(ssh, text, Mechanism.TRACEFS).start()
        command = stream.command(run)
    elif mechanism == "strace-file":
        command = strace_command(run, "/run/strace.txt")
    elif mechanism == "tracefs-eprobes":
        _tracefs_on(ssh)
        reader = _Reader(ssh, f"exec cat {TRACEFS}/trace_pipe")
        command = _command(mechanism, run)
    else:
        command = _command(mechanism, run)
    acks: list[str] = []
    t0 = time.monotonic()
    result = ssh.run(command, timeout=3600, on_stdout=acks.append)
    seconds = time.monotonic() - t0
    out["seconds"] = round(seconds, 3)
    out["acks"] = sum(1 for a in acks if a.startswith("ack "))
    if result.exit_code != 0:
        out["error"] = f"exit {result.exit_code}: {result.stderr[-300:]}"
    target = "/mnt/log" if workload == "fsync-loop" else "/mnt/app.db-wal"
    if stream is not None:
        stream.finish()
        trace = stream.trace()
        syncs = [
            c
            for c in trace.calls
            if c.kind in (CallKind.FSYNC, CallKind.FDATASYNC) and c.path == target
        ]
        out.update(
            lines=stream.lines,
            calls=len(trace.calls),
            syncs_of_target=len(syncs),
            relative_paths=sum(
                1 for c in trace.calls if c.path is not None and not c.path.startswith("/")
            ),
            unparsed=trace.unparsed_count,
            unknown_events=stream.converter.unknown,
            acks_in_trace=sum(1 for c in trace.calls if c.data and c.data.startswith(b"ack ")),
            samples=stream.arrival_bounds(),
        )
    elif reader is not None:
        time.sleep(1.0)  # the last events reach trace_pipe's reader
        ssh.run("pkill -x cat; true", timeout=30)
        reader.join(30)
        lines = reader.lines
        out.update(
            lines=len(lines),
            fsync_events=sum(1 for x in lines if "sys_fsync(" in x or "sys_fdatasync(" in x),
            relative_paths=sum(1 for x in lines if re.search(r'="(?!/)[^"]', x) is not None),
            faulted_strings=sum(1 for x in lines if "(fault)" in x),
        )
        ssh.run(f"echo 0 > {TRACEFS}/events/enable; echo > {TRACEFS}/dynamic_events", timeout=60)
    elif mechanism == "strace-file":
        trace = parse_strace(ssh.run("cat /run/strace.txt; rm -f /run/strace.txt", 120).stdout)
        out.update(
            calls=len(trace.calls),
            syncs_of_target=sum(
                1
                for c in trace.calls
                if c.kind in (CallKind.FSYNC, CallKind.FDATASYNC) and c.path == target
            ),
        )
    elif mechanism in ("perf", "bpftrace"):
        path = "/run/perf.txt" if mechanism == "perf" else "/run/bt.txt"
        body = ssh.run(f"cat {path}; rm -f {path}", timeout=120).stdout.splitlines()
        word = "fsync(" if mechanism == "perf" else " fsync "
        word2 = "fdatasync(" if mechanism == "perf" else " fdatasync "
        out.update(
            lines=len(body),
            fsync_events=sum(1 for x in body if word in x or word2 in x),
            pointer_paths=sum(1 for x in body if "filename: 0x" in x),
        )
    return out


def _bpftrace_startup(ssh: SSHSession) -> float:
    t0 = time.monotonic()
    ssh.check_output("bpftrace -o /dev/null -c /bin/true /run/trace.bt >/dev/null", timeout=600)
    return round(time.monotonic() - t0, 3)


def _clock(ssh: SSHSession, text_dir: Path, mechanism: Mechanism) -> dict[str, Any]:
    """The offset's bound by round trips alone, and with a traced run's line arrivals."""
    trips_before = sample_round_trips(ssh, 20, clock_id=mechanism.clock_id)
    stream = TraceStream(ssh, text_dir / f"clock-{mechanism.value}.txt", mechanism).start()
    loop = FSYNC_LOOP.replace("{n}", "50")
    ssh.check_output(stream.command(f"cd /mnt && {loop}"), timeout=600)
    stream.finish()
    trips_after = sample_round_trips(ssh, 20, clock_id=mechanism.clock_id)
    before, after = bounds_from_round_trips(trips_before), bounds_from_round_trips(trips_after)
    rt = before.intersect(after)
    tight = rt.tighten_upper(stream.arrival_bounds())
    rtts = sorted((r - s) / 1e6 for s, _g, r in trips_before + trips_after)
    return {
        "guest_clock": "CLOCK_MONOTONIC" if mechanism is Mechanism.TRACEFS else "CLOCK_REALTIME",
        "round_trip_ms": {"min": rtts[0], "median": statistics.median(rtts), "max": rtts[-1]},
        "round_trip_before": before.to_json(),
        "round_trip_after": after.to_json(),
        "round_trips_together": rt.to_json(),
        "with_line_arrivals": tight.to_json(),
        "drift_ns": after.midpoint - before.midpoint,
        "trips": [list(t) for t in trips_before + trips_after],
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks trace")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fsyncs", type=int, default=200)
    parser.add_argument("--inserts", type=int, default=30)
    parser.add_argument("--mechanisms", default=",".join(MECHANISMS))
    parser.add_argument("--workloads", default="fsync-loop,sqlite")
    parser.add_argument("--bpftrace-startup", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    mechanisms = args.mechanisms.split(",")
    workloads = args.workloads.split(",")
    with tempfile.TemporaryDirectory(prefix="powercut-bench-trace-") as tmp:
        return _run(args, mechanisms, workloads, Path(tmp), argv)


def _run(
    args: argparse.Namespace,
    mechanisms: list[str],
    workloads: list[str],
    work: Path,
    argv: list[str],
) -> int:
    image = ensure_image(PACKAGES)
    disk = work / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(256 << 20)
    spec = MachineSpec.from_image(
        image, disks=(FileDisk(disk, "writeback"),), cpus=1, memory_mib=1024, name="trace"
    )
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        w: {m: [] for m in mechanisms} for w in workloads
    }
    report: dict[str, Any] = {
        "benchmark": "trace",
        "command": "python -m benchmarks trace -- " + " ".join(argv),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(accel="tcg", guest_cpus=1, guest_memory_mib=1024),
        "packages": PACKAGES,
        "traced_calls": list(TRACED),
        "file_calls": list(FILE_CALLS),
    }
    with QemuMachine(spec, workdir=work / "vm", accel=Accel.TCG) as machine:
        machine.boot()
        ssh = machine.ssh
        report["guest"] = _prepare(ssh)
        if args.bpftrace_startup:
            report["bpftrace_startup_seconds"] = _bpftrace_startup(ssh)
            print(f"bpftrace start-up: {report['bpftrace_startup_seconds']} s", flush=True)
        for r in range(args.rounds):
            for workload in workloads:
                n = args.fsyncs if workload == "fsync-loop" else args.inserts
                order = mechanisms if r % 2 == 0 else list(reversed(mechanisms))
                for mechanism in order:
                    one = _one(ssh, mechanism, workload, n, work)
                    samples = one.pop("samples", None)
                    runs[workload][mechanism].append(one)
                    print(f"round {r} {workload} {mechanism}: {one}", flush=True)
                    del samples
        report["clock"] = {}
        for mech in (Mechanism.TRACEFS, Mechanism.STRACE):
            try:
                _fresh_fs(ssh, "fsync-loop")
                report["clock"][mech.value] = _clock(ssh, work, mech)
            except Exception as exc:  # noqa: BLE001 - keep the runs' figures whatever happens here
                report["clock"][mech.value] = {"error": f"{type(exc).__name__}: {exc}"}
    summary: dict[str, Any] = {}
    for workload, per in runs.items():
        med = {m: statistics.median(x["seconds"] for x in v) for m, v in per.items() if v}
        summary[workload] = {
            "median_seconds": med,
            "ratio_to_off": {m: round(s / med["off"], 3) for m, s in med.items()}
            if "off" in med
            else {},
            # Round by round (the same round's off): how noisy the medians' ratio is.
            "round_ratios_to_off": {
                m: [
                    round(a["seconds"] / b["seconds"], 2)
                    for a, b in zip(v, per["off"], strict=True)
                ]
                for m, v in per.items()
            }
            if "off" in per
            else {},
        }
    report["runs"] = runs
    report["summary"] = summary
    report["goal_ratio"] = GOAL_RATIO
    report["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"trace-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    for mech, clock in report["clock"].items():
        print(mech, json.dumps({k: v for k, v in clock.items() if k != "trips"}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
