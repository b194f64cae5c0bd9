"""Socket safety: owner-only sockets in owner-only directories; no taking over someone else's
path or a live backend's socket, with an error that says what to do."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import PowercutError
from harness.vhost.server import listen_unix

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def test_a_new_socket_directory_is_entered_only_by_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "deeper" / "vhost.sock"
    with listen_unix(path):
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700  # nobody else gets in
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert path.stat().st_uid == os.geteuid()


def test_the_socket_file_is_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with listen_unix(tmp_path / "s.sock"):
            assert stat.S_IMODE((tmp_path / "s.sock").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_a_live_backends_socket_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    with listen_unix(path):
        with pytest.raises(PowercutError, match="in use by a running backend"):
            listen_unix(path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(path))  # still the first backend's
        probe.close()


def test_a_path_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file.sock"
    path.write_text("precious")
    with pytest.raises(PowercutError, match="not a socket"):
        listen_unix(path)
    assert path.read_text() == "precious"


@as_root
def test_a_socket_path_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "theirs.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # nobody listens: ours would be replaced, theirs must not be
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(PowercutError, match=f"belongs to uid {NOBODY}"):
        listen_unix(path)
    assert path.lstat().st_uid == NOBODY


@as_root
def test_a_socket_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o700)
    os.chown(directory, NOBODY, NOBODY)
    with pytest.raises(PowercutError, match=f"directory .* belongs to uid {NOBODY}"):
        listen_unix(directory / "vhost.sock")
    assert not (directory / "vhost.sock").exists()


def test_a_socket_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o777)
    with pytest.raises(PowercutError, match="writable by others"):
        listen_unix(directory / "vhost.sock")


def test_a_sticky_shared_directory_like_tmp_is_allowed(tmp_path: Path) -> None:
    directory = tmp_path / "sticky"
    directory.mkdir()
    directory.chmod(0o1777)
    with listen_unix(directory / "vhost.sock"):
        assert stat.S_IMODE((directory / "vhost.sock").stat().st_mode) == 0o600


@as_root
def test_powercut_serve_on_another_users_path_exits_with_a_clear_error(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    path = tmp_path / "theirs.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    os.chown(path, NOBODY, NOBODY)
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "serve", str(image), "--socket", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert f"belongs to uid {NOBODY}" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
