"""The one exception hierarchy of powercut.

Every message says what went wrong and, where there is one, what to do about it.
Errors that reach a guest are turned into a virtio status by the vhost layer;
these classes carry the errno that decides which status.
"""

from __future__ import annotations

import errno as _errno


class PowercutError(Exception):
    """Base of every error powercut raises on purpose."""


class ConfigError(PowercutError):
    """A bad option, scenario field or command-line argument."""


class BlockError(PowercutError):
    """An I/O request failed; `errno` is what the guest is told (EIO, ENOSPC, ...)."""

    def __init__(self, message: str, errno: int = _errno.EIO) -> None:
        super().__init__(message)
        self.errno = errno


class BlockRangeError(BlockError):
    """A request reaches beyond the end of the device, or has a negative offset/length.

    EIO, not EINVAL: it is what QEMU's blk_check_byte_request returns and qemu-io prints.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, _errno.EIO)


class ReadOnlyError(BlockError):
    """A modifying request was sent to a read-only node or backend."""

    def __init__(self, message: str) -> None:
        super().__init__(message, _errno.EPERM)


class UnsupportedError(BlockError):
    """The node cannot do this operation at all (maps to VIRTIO_BLK_S_UNSUPP)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, _errno.ENOTSUP)


class BackendStoppedError(BlockError):
    """The backend was stopped by a werror/rerror=stop policy and must be resumed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, _errno.EIO)


class ProtocolError(PowercutError):
    """A peer (a vhost-user frontend, an NBD client) sent something its protocol does not allow."""


class NbdProtocolError(ProtocolError):
    """An NBD client broke the protocol in a way that ends its connection (not the server)."""


class GuestError(PowercutError):
    """The guest misbehaved (ring layout, descriptor chain) in a way the device must report."""


class ProcessError(PowercutError):
    """A managed child process (QEMU, a daemon, fio) failed to start or died unexpectedly."""


class MachineError(PowercutError):
    """A virtual machine could not be started, reached or stopped."""


class TimeoutExpired(PowercutError):
    """Something we waited for did not happen in time; the message names what and how long."""


class CommandError(PowercutError):
    """A command run in the guest exited non-zero."""

    def __init__(self, command: str, exit_code: int, stdout: str, stderr: str) -> None:
        tail = stderr.strip().splitlines()[-5:] if stderr.strip() else []
        detail = ("; stderr: " + " | ".join(tail)) if tail else ""
        super().__init__(f"guest command {command!r} exited {exit_code}{detail}")
        self.command = command
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr


class ImageBuildError(PowercutError):
    """The guest image recipe could not be built (a missing tool or package, a failed step)."""


class JournalError(PowercutError):
    """A powerfail journal or write log is unreadable (bad magic, version, checksum)."""


class ScenarioError(ConfigError):
    """A scenario file is invalid; the message names the field and the line."""
