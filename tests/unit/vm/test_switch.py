"""The private network's switch, as a process, driven by clients that speak QEMU's stream netdev.

Each client connects to a port's unix socket as `-netdev stream,server=off`
does and sends frames with their 4-byte big-endian length.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.errors import ConfigError, PowercutError, ProtocolError
from harness.proc import live_processes
from harness.vm.switch import (
    MAX_FRAME,
    QUEUE_LIMIT,
    FrameReader,
    StreamFrameHeader,
    SwitchProcess,
    encode_frame,
)

BROADCAST = "ff:ff:ff:ff:ff:ff"
MACS = {name: f"52:54:00:77:00:0{i}" for i, name in enumerate(("n1", "n2", "n3"), start=1)}
WAIT = 10.0


def mac(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


def frame(dst: str, src: str, payload: bytes = b"hello") -> bytes:
    return mac(dst) + mac(src) + struct.pack("!H", 0x88B5) + payload


class Node:
    """One guest's NIC: a client of its port."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.reader = FrameReader()
        self.frames: list[bytes] = []

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(encode_frame(f) for f in frames))

    def receive(self, count: int = 1, timeout: float = WAIT) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.frames) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{len(self.frames)} of {count} frames after {timeout}s")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise AssertionError("the switch closed the connection")
            self.frames += self.reader.feed(data)
        got, self.frames = self.frames[:count], self.frames[count:]
        return got

    def nothing(self, within: float = 0.3) -> None:
        """No frame arrives within `within` seconds."""
        self.sock.settimeout(within)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected data from the switch: {data[:40]!r}")

    def closed_by_switch(self, timeout: float = WAIT) -> bool:
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def switch(tmp_path: Path) -> Iterator[SwitchProcess]:
    with SwitchProcess(tmp_path / "net", list(MACS), log_path=tmp_path / "switch.log") as sw:
        yield sw


@pytest.fixture
def nodes(switch: SwitchProcess) -> Iterator[dict[str, Node]]:
    connected = {name: Node(switch.socket_path(name)) for name in MACS}
    wait_until(lambda: all(p["connected"] for p in switch.stats()["ports"].values()))
    yield connected
    for node in connected.values():
        node.close()


def wait_until(condition, timeout: float = WAIT) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_a_broadcast_reaches_every_other_port_and_a_reply_only_its_sender(switch, nodes):
    n1, n2, n3 = nodes["n1"], nodes["n2"], nodes["n3"]
    arp = frame(BROADCAST, MACS["n1"], b"who has n2")
    n1.send(arp)
    assert n2.receive() == [arp]
    assert n3.receive() == [arp]
    n1.nothing()
    # n2 answers n1 by its MAC, which the switch learned from the broadcast.
    reply = frame(MACS["n1"], MACS["n2"], b"n2 is here")
    n2.send(reply)
    assert n1.receive() == [reply]
    n3.nothing()
    stats = switch.stats()
    assert stats["mac_table"] == {MACS["n1"]: "n1", MACS["n2"]: "n2"}
    assert stats["ports"]["n1"]["frames_in"] == 1 and stats["ports"]["n1"]["frames_out"] == 1
    assert stats["ports"]["n3"]["frames_out"] == 1 and stats["ports"]["n3"]["frames_in"] == 0


def test_an_unknown_destination_is_flooded_and_order_is_kept(switch, nodes):
    n1, n2, n3 = nodes["n1"], nodes["n2"], nodes["n3"]
    frames = [frame(MACS["n3"], MACS["n1"], bytes([i]) * (i * 100 + 1)) for i in range(20)]
    n1.send(*frames)
    # n3's MAC is not known yet: both other ports get every frame, in order.
    assert n3.receive(20) == frames
    assert n2.receive(20) == frames


def test_frames_cut_anywhere_by_the_stream_arrive_whole(switch, nodes):
    n1, n2 = nodes["n1"], nodes["n2"]
    big = frame(BROADCAST, MACS["n1"], bytes(range(256)) * 200)  # 51 KiB
    small = frame(BROADCAST, MACS["n1"], b"x")
    wire = encode_frame(big) + encode_frame(small)
    for i in range(0, len(wire), 997):  # header and payload split at odd places
        n1.sock.sendall(wire[i : i + 997])
        time.sleep(0.001)
    assert n2.receive(2) == [big, small]


def test_a_node_power_cut_and_reboot_reconnects_on_its_port(switch, nodes):
    n1, n2, n3 = nodes["n1"], nodes["n2"], nodes["n3"]
    n2.send(frame(BROADCAST, MACS["n2"]))
    n1.receive()
    n3.receive()
    # QEMU of n2 is killed: the switch sees EOF and forgets where n2 lived.
    n2.close()
    wait_until(lambda: not switch.stats()["ports"]["n2"]["connected"])
    stats = switch.stats()
    assert MACS["n2"] not in stats["mac_table"]
    # Frames for n2 while it is down go nowhere (flooded to who is there), nothing breaks.
    lost = frame(MACS["n2"], MACS["n1"], b"while n2 is down")
    n1.send(lost)
    assert n3.receive() == [lost]
    # n2 boots again and connects to the same port: traffic flows both ways.
    again = Node(switch.socket_path("n2"))
    try:
        hello = frame(BROADCAST, MACS["n2"], b"back")
        again.send(hello)
        assert n1.receive() == [hello]
        assert n3.receive() == [hello]
        reply = frame(MACS["n2"], MACS["n1"], b"welcome back")
        n1.send(reply)
        assert again.receive() == [reply]
        n3.nothing()
        port = switch.stats()["ports"]["n2"]
        assert (port["connects"], port["disconnects"], port["connected"]) == (2, 1, True)
    finally:
        again.close()


def test_a_new_connection_on_a_port_replaces_the_old_one(switch, nodes):
    # A rebooted node's QEMU may connect before the switch has seen the old one's EOF.
    old = nodes["n1"]
    new = Node(switch.socket_path("n1"))
    try:
        assert old.closed_by_switch()
        wait_until(lambda: switch.stats()["ports"]["n1"]["replaced"] == 1)
        hello = frame(BROADCAST, MACS["n2"])
        nodes["n2"].send(hello)
        assert new.receive() == [hello]
    finally:
        new.close()


@pytest.mark.parametrize("length", [0, MAX_FRAME + 1, 0xFFFFFFFF])
def test_a_malformed_length_drops_only_that_connection(switch, nodes, length):
    n1, n2, n3 = nodes["n1"], nodes["n2"], nodes["n3"]
    n1.sock.sendall(StreamFrameHeader.pack(length) + b"garbage" * 10)
    assert n1.closed_by_switch()
    wait_until(lambda: switch.stats()["ports"]["n1"]["malformed"] == 1)
    assert n2.frames == [] and n3.frames == []
    n2.nothing()
    # The others still talk, and n1's port takes its next connection.
    hello = frame(BROADCAST, MACS["n2"])
    n2.send(hello)
    assert n3.receive() == [hello]
    again = Node(switch.socket_path("n1"))
    try:
        n3.send(hello)
        assert again.receive() == [hello]
    finally:
        again.close()


def test_a_frame_shorter_than_an_ethernet_header_is_counted_and_dropped(switch, nodes):
    n1, n2 = nodes["n1"], nodes["n2"]
    n1.send(b"short")
    n1.send(frame(BROADCAST, MACS["n1"], b"after"))
    assert n2.receive() == [frame(BROADCAST, MACS["n1"], b"after")]
    assert switch.stats()["ports"]["n1"]["runts"] == 1


def test_a_port_that_does_not_read_loses_frames_but_never_stalls_the_others(switch, nodes):
    n1, n2 = nodes["n1"], nodes["n2"]
    # n3 learns nothing and reads nothing; n1 floods it (and n2) with broadcasts.
    big = frame(BROADCAST, MACS["n1"], b"\0" * 60000)
    count = (QUEUE_LIMIT // len(big)) * 3
    for _ in range(count):
        n1.send(big)
        n2.receive()
    wait_until(lambda: switch.stats()["ports"]["n3"]["dropped"] > 0)
    hello = frame(MACS["n1"], MACS["n2"], b"still here")
    n2.send(hello)
    assert n1.receive() == [hello]


def test_stop_removes_the_sockets_and_leaves_no_process(tmp_path):
    sw = SwitchProcess(tmp_path / "net", ["a", "b"], log_path=tmp_path / "switch.log")
    sw.start()
    assert sw.running and sw.socket_path("a").exists()
    sw.stop()
    assert not sw.running
    assert not list((tmp_path / "net").iterdir())
    assert sw.proc not in live_processes()


def test_a_second_switch_on_the_same_sockets_is_refused(switch, tmp_path):
    other = SwitchProcess(switch.directory, ["n1"], log_path=tmp_path / "other.log")
    with pytest.raises(PowercutError, match="in use"):
        other.start()
    other.stop()
    assert switch.running


def test_a_switch_needs_ports_and_knows_its_own(tmp_path):
    with pytest.raises(ConfigError):
        SwitchProcess(tmp_path, [], log_path=tmp_path / "log")
    sw = SwitchProcess(tmp_path, ["a"], log_path=tmp_path / "log")
    with pytest.raises(ConfigError, match="no port 'b'"):
        sw.socket_path("b")


# -- the framing on its own ----------------------------------------------------------


@given(
    st.lists(st.binary(min_size=1, max_size=3000), max_size=8),
    st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=20),
)
def test_any_split_of_the_stream_gives_back_the_frames(frames, cuts):
    wire = b"".join(encode_frame(f) for f in frames)
    reader = FrameReader()
    out: list[bytes] = []
    i = 0
    for step in cuts * (len(wire) // max(1, sum(cuts)) + 1):
        out += reader.feed(wire[i : i + step])
        i += step
        if i >= len(wire):
            break
    out += reader.feed(wire[i:])
    assert out == frames
    assert reader.pending == 0


def test_the_reader_refuses_a_length_qemu_would_refuse():
    reader = FrameReader()
    assert reader.feed(StreamFrameHeader.pack(MAX_FRAME)[:3]) == []
    assert reader.feed(StreamFrameHeader.pack(MAX_FRAME)[3:] + b"\0" * 10) == []
    assert reader.pending == 4 + 10
    with pytest.raises(ProtocolError, match="out of step"):
        FrameReader().feed(StreamFrameHeader.pack(MAX_FRAME + 1))
