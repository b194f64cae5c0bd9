"""Your software as the workload: any guest command that says what it made durable.

    [[workload]]
    kind = "command"
    setup = "sqlite3 db 'create table t(n)'"          # optional, once, after mkfs and mount
    run = "for i in $(seq 500); do sqlite3 db \\"insert into t values($i)\\" && echo ack $i; done"
    check = "sqlite3 db 'pragma integrity_check' >&2 && sqlite3 db 'select n from t'"

`run` prints one line `ack TOKEN` (or what the `ack` regex with one group
matches) for each unit the application promised is durable: a committed
transaction, a synced record. After the reboot, with the filesystem mounted
at /mnt (its journal replayed), `check` prints every token it finds, one per
line, and exits 0 when the application's own integrity check passed.

The verdict: every acknowledged token must be found wherever the fault's
promise covers what the guest flushed (every mode but `unsafe` under a host
power cut, every mode under a guest power cut or backend crash); a non-zero
`check` exit is damage. Commands run with /mnt as the working directory and
`POWERCUT_SEED` (the cell's seed) and `POWERCUT_MOUNT` in the environment.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from harness.durability.contract import FaultModel, Promise
from harness.errors import GuestError, TimeoutExpired
from harness.workloads.base import (
    FSCK,
    MOUNT,
    ORACLE,
    FieldReader,
    GuestContext,
    Observation,
    Run,
    Tally,
    Workload,
)
from harness.workloads.stream import StreamRun, TokenStream

DEFAULT_ACK = r"^ack (\S+)$"
PIDFILE = "/run/powercut-workload.pid"
SHOWN = 5  # lost tokens named in a summary


# A cluster node's environment (POWERCUT_NODE, POWERCUT_NODES, ...), where the harness
# wrote it: harness/vm/network.py's ENV_FILE (a unit test keeps the two equal).
NODE_ENV = "/etc/powercut/node.env"


def _environment(seed: int) -> str:
    return (
        f"{{ [ ! -r {NODE_ENV} ] || . {NODE_ENV}; }} && "
        f"cd {MOUNT} && export POWERCUT_SEED={seed} POWERCUT_MOUNT={MOUNT} && "
    )


@dataclass(frozen=True)
class CommandObservation(Observation):
    """The user's `check` against the tokens `run` acknowledged."""

    acked: tuple[str, ...]
    found: int  # acknowledged tokens the check printed
    lost: tuple[str, ...]  # acknowledged, not printed (all of them)
    exit_code: int
    stderr_tail: str = ""
    extra: int = 0  # tokens printed that were never acknowledged (allowed: maybe in flight)

    @property
    def damaged(self) -> bool:
        return self.exit_code != 0

    @property
    def loss(self) -> bool:
        return bool(self.lost) or self.damaged

    def summary(self) -> str:
        parts = []
        if self.lost:
            named = ", ".join(self.lost[:SHOWN]) + (", ..." if len(self.lost) > SHOWN else "")
            parts.append(
                f"{len(self.lost)} of {len(self.acked)} acknowledged tokens lost ({named})"
            )
        if self.damaged:
            why = f": {self.stderr_tail.splitlines()[-1]}" if self.stderr_tail.strip() else ""
            parts.append(f"the application's check exited {self.exit_code}{why}")
        if parts:
            return "; ".join(parts)
        return f"all {len(self.acked)} acknowledged tokens found; the check exited 0"

    def tally(self) -> Tally:
        return Tally(acknowledged=len(self.acked), lost=len(self.lost), unit="tokens")


@dataclass(frozen=True)
class Command(Workload):
    """`kind = "command"`: `run`, `check` (required), `setup`, `ack`, `check-timeout`, `trace`."""

    run_command: str
    check_command: str
    setup_command: str | None = None
    ack: str = DEFAULT_ACK
    check_timeout: float = 300.0
    trace: bool = True  # trace the run's system calls (the explanation of a loss)

    kind = "command"
    checker = "check"
    checkers = (ORACLE, "check", FSCK)

    @classmethod
    def parse(cls, fields: FieldReader) -> Command:
        if not fields.has("run"):
            raise fields.error("run", "is required: the guest command whose output acknowledges")
        if not fields.has("check"):
            raise fields.error("check", "is required: the guest command that prints what it finds")
        run = fields.string("run")
        check = fields.string("check")
        setup = fields.optional_string("setup")
        ack = fields.string("ack", DEFAULT_ACK)
        try:
            pattern = re.compile(ack)
        except re.error as exc:
            raise fields.error("ack", f"is not a regular expression: {exc}") from None
        if pattern.groups != 1:
            raise fields.error(
                "ack",
                f"must have exactly one group, the token (it has {pattern.groups}), "
                'e.g. "^committed (\\\\d+)$"',
            )
        for key, value in (("run", run), ("check", check), ("setup", setup)):
            if value is not None and not value.strip():
                raise fields.error(key, "must not be empty")
        timeout = fields.number("check-timeout", 300.0, minimum=1.0)
        trace = fields.boolean("trace", True)
        return cls(run, check, setup, ack, timeout, trace)

    @property
    def trace_pattern(self) -> str | None:
        return self.ack if self.trace else None

    def keeps_acknowledged(self, promise: Promise) -> bool:
        # An acknowledgement is the application's claim that the unit is durable.
        return promise is not Promise.NOTHING

    def start(self, ctx: GuestContext, seed: int, fault: FaultModel) -> Run:
        if self.setup_command is not None:
            result = ctx.ssh.run(_environment(seed) + self.setup_command, timeout=ctx.time_left())
            _log(ctx, "setup", self.setup_command, result.exit_code, result.stdout + result.stderr)
            if not result.ok:
                raise GuestError(
                    f"the workload's setup exited {result.exit_code}: "
                    f"{result.stderr.strip()[-300:] or result.stdout.strip()[-300:]}"
                )
        # In a session of its own, so that after a backend crash the whole tree can be stopped.
        inner = ctx.traced(_environment(seed) + self.run_command)
        command = f"setsid -w sh -c 'echo $$ > {PIDFILE}; exec sh -c \"$0\"' {shlex.quote(inner)}"
        stop = f"kill -TERM -- -$(cat {PIDFILE}) 2>/dev/null; true"
        stream = TokenStream(re.compile(self.ack), self.kind)
        return StreamRun(ctx, command, self.kind, fault, stream=stream, stop=stop)

    def check(self, ctx: GuestContext, seed: int, run: Run) -> Observation:
        assert isinstance(run, StreamRun) and isinstance(run.stream.stream, TokenStream)
        acked = tuple(run.stream.stream.tokens)
        try:
            result = ctx.ssh.run(
                _environment(seed) + self.check_command, timeout=self.check_timeout
            )
        except TimeoutExpired:
            raise GuestError(
                f"the workload's check did not finish within {self.check_timeout:.0f} s "
                "(field check-timeout): it must print the tokens it finds and exit"
            ) from None
        _log(ctx, "check", self.check_command, result.exit_code, result.stdout + result.stderr)
        if result.exit_code in (126, 127):
            raise GuestError(
                f"the workload's check could not run (exit {result.exit_code}): "
                f"{result.stderr.strip()[-300:]}"
            )
        printed = {line.strip() for line in result.stdout.splitlines() if line.strip()}
        lost = tuple(t for t in acked if t not in printed)
        return CommandObservation(
            acked=acked,
            found=len(acked) - len(lost),
            lost=lost,
            exit_code=result.exit_code,
            stderr_tail="\n".join(result.stderr.strip().splitlines()[-5:]),
            extra=len(printed - set(acked)),
        )


def _log(ctx: GuestContext, what: str, command: str, code: int, output: str) -> None:
    """The command's whole output, kept with the cell (checks.log, setup.log)."""
    name = "checks.log" if what == "check" else f"{what}.log"
    with open(ctx.directory / name, "a") as f:
        f.write(f"$ {command}  (exit {code})\n{output}\n")
