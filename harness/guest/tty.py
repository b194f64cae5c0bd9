"""Attach the local terminal to a guest shell (for `powercut vm` without a command)."""

from __future__ import annotations

import os
import select
import shutil
import sys
import termios
import tty
from typing import Any

import paramiko


def attach(chan: paramiko.Channel) -> int:
    """Raw-mode copy between stdin/stdout and `chan` until the remote shell exits."""
    size = shutil.get_terminal_size()
    chan.get_pty(term=os.environ.get("TERM", "vt100"), width=size.columns, height=size.lines)
    chan.invoke_shell()
    stdin = sys.stdin.fileno()
    interactive = os.isatty(stdin)
    saved = termios.tcgetattr(stdin) if interactive else None
    inputs: list[Any] = [chan, stdin]
    try:
        if interactive:
            tty.setraw(stdin)
        while True:
            ready, _, _ = select.select(inputs, [], [])
            if chan in ready:
                data = chan.recv(65536)
                if not data:
                    break
                os.write(sys.stdout.fileno(), data)
            if stdin in ready:
                data = os.read(stdin, 4096)
                if not data:
                    chan.shutdown_write()
                    inputs.remove(stdin)
                    continue
                chan.sendall(data)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
    return chan.recv_exit_status()
