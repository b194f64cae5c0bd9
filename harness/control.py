"""The backend's control socket: JSON lines, one request and one answer per line.

    {"cmd": "stats"}                 -> {"ok": true, "result": {...}}
    {"cmd": "write-cache", "enabled": false}
    {"cmd": "ping"}

Commands are a registry (`ControlServer.register`) so fault injection can add
its own without touching this file. An unknown command or a failing handler
answers {"ok": false, "error": "..."}; the connection stays open.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.errors import PowercutError
from harness.sockets import AcceptLoop, listen_unix

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Any]


class ControlServer:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._listener = listen_unix(self.path)
        self._handlers: dict[str, Handler] = {"ping": lambda _req: "pong"}
        self._accept = AcceptLoop(self._listener, self._connected, name=f"control {self.path}")

    def register(self, name: str, handler: Handler) -> None:
        self._handlers[name] = handler

    def start(self) -> ControlServer:
        self._accept.start("vhost-control")
        return self

    def _connected(self, conn: socket.socket) -> None:
        threading.Thread(
            target=self._client, args=(conn,), name="vhost-control-client", daemon=True
        ).start()

    def _client(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:
            for line in stream:
                if not line.strip():
                    continue
                answer = self.handle_line(line)
                try:
                    stream.write(json.dumps(answer).encode() + b"\n")
                    stream.flush()
                except OSError:
                    return

    def handle_line(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise ValueError('a request is a JSON object with a "cmd" string')
            handler = self._handlers.get(request["cmd"])
            if handler is None:
                raise ValueError(
                    f"unknown command {request['cmd']!r}; known: "
                    + ", ".join(sorted(self._handlers))
                )
            return {"ok": True, "result": handler(request)}
        except (ValueError, KeyError, TypeError, PowercutError) as exc:
            return {"ok": False, "error": str(exc)}

    def close(self) -> None:
        self._accept.stop()
        self._accept.join(timeout=5)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def control_request(path: str | Path, request: dict[str, Any], timeout: float = 10.0) -> Any:
    """Send one request to a control socket and return its result (raises on errors)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data)
    if not answer.get("ok"):
        raise PowercutError(f"control request {request.get('cmd')!r} failed: {answer.get('error')}")
    return answer.get("result")
