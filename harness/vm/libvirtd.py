"""Make sure a libvirt daemon answers on qemu:///system, starting one if needed.

Containers and CI runners often have libvirt installed but no systemd to
start it. Then we configure the QEMU driver for running as root without
cgroups, namespaces or a security driver, and run `virtlogd` and `libvirtd`
in the foreground as ManagedProcesses, so they stop with the harness. A
daemon that was already running is used as is and never stopped.
"""

from __future__ import annotations

import atexit
import logging
import os
import pwd
import socket
import subprocess
import threading
from pathlib import Path

from harness.errors import MachineError
from harness.proc import ManagedProcess

log = logging.getLogger(__name__)

SOCKET = Path("/run/libvirt/libvirt-sock")
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
LOG_DIR = Path("/var/log/libvirt")
_BEGIN = "# BEGIN powercut"
_END = "# END powercut"
# libvirt 9.0 without systemd, running guests as root (see facts in issue 3).
_SETTINGS = """user = "root"
group = "root"
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
"""

_lock = threading.Lock()
_started: list[ManagedProcess] = []


def daemon_answers(path: Path = SOCKET) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def configure_qemu_driver(conf: Path = QEMU_CONF) -> bool:
    """Add our settings block to qemu.conf unless present; True if the file changed."""
    text = conf.read_text() if conf.exists() else ""
    if _BEGIN in text:
        return False
    conf.parent.mkdir(parents=True, exist_ok=True)
    block = (
        f"{_BEGIN}: settings for running QEMU guests as root without systemd\n{_SETTINGS}{_END}\n"
    )
    conf.write_text(text + ("\n" if text and not text.endswith("\n") else "") + block)
    log.info("configured the libvirt QEMU driver in %s", conf)
    return True


def _ensure_user(name: str = "libvirt-qemu") -> None:
    # libvirt 9.0 looks this user up even when qemu.conf says root.
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        log.info("created the %s user", name)


def ensure_libvirtd(workdir: Path | None = None, timeout: float = 30.0) -> bool:
    """Make qemu:///system answer; True if we started the daemon (and will stop it)."""
    with _lock:
        if daemon_answers():
            return bool(_started)
        if os.geteuid() != 0:
            raise MachineError(
                "no libvirt daemon answers on qemu:///system and starting one "
                "needs root; start libvirtd or pass another --libvirt URI"
            )
        configure_qemu_driver()
        _ensure_user()
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        logs = workdir or LOG_DIR
        virtlogd = ManagedProcess(
            ["virtlogd"], name="virtlogd", log_path=logs / "powercut-virtlogd.log"
        )
        libvirtd = ManagedProcess(
            ["libvirtd"], name="libvirtd", log_path=logs / "powercut-libvirtd.log"
        )
        virtlogd.start()
        _started.append(virtlogd)
        try:
            virtlogd.wait_for(
                lambda: Path("/run/libvirt/virtlogd-sock").exists(), timeout, "virtlogd's socket"
            )
            libvirtd.start()
            _started.append(libvirtd)
            libvirtd.wait_for(daemon_answers, timeout, "libvirtd's socket")
        except BaseException:
            stop_started_daemons()
            raise
        log.info("started libvirtd (pid %d) and virtlogd (pid %d)", libvirtd.pid, virtlogd.pid)
        return True


def stop_started_daemons() -> None:
    """Stop the daemons this process started (never one it found running)."""
    with _lock:
        while _started:
            _started.pop().stop()


atexit.register(stop_started_daemons)
