"""The vhost-user-blk backend: one export, one frontend at a time, many queues.

`VhostUserBlkServer` owns a listening unix socket and a VirtioBlkDevice. It
serves one frontend connection at a time (vhost-user is point to point);
when that frontend goes away — QEMU shut down, killed, or the guest lost
power — the connection's queues are stopped after the request each is
running, its mappings dropped, and the next QEMU is accepted on the same
socket. The image and the BlockBackend stay open across connections.

Each started queue has its own thread that sleeps in poll() on the kick
eventfd. The block stack is thread-safe and drops the GIL in its syscalls,
so queues really run in parallel. The control thread (messages) and the
queue threads share only what the message ordering of the protocol makes
safe: a queue is always stopped before its ring state is changed.

Inflight tracking (INFLIGHT_SHMFD) makes this process restartable under a
running guest: see harness.vhost.inflight.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from harness.errors import GuestError, PowercutError, ProtocolError
from harness.sockets import AcceptLoop, listen_unix
from harness.vhost.blk import NoStatusByte, VirtioBlkDevice
from harness.vhost.inflight import InflightRegion
from harness.vhost.memory import MAX_MEM_SLOTS, GuestMemory, RegionDesc
from harness.vhost.protocol import (
    VHOST_MEMORY_BASELINE_NREGIONS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_VRING_IDX_MASK,
    VHOST_USER_VRING_NOFD_MASK,
    ConnectionClosed,
    Message,
    ProtocolFeature,
    VhostUserConfigHeader,
    VhostUserInflight,
    VhostUserMemoryHeader,
    VhostUserMemoryRegion,
    VhostUserMemRegMsg,
    VhostUserRequest,
    VhostUserU64,
    VhostVringAddr,
    VhostVringState,
    feature_mask,
    recv_message,
    reply_to,
    send_message,
)
from harness.vhost.virtio import (
    VIRTIO_BLK_CONFIG_WCE_OFFSET,
    VIRTQUEUE_MAX_SIZE,
    DeviceStatus,
    VirtioFeature,
)
from harness.vhost.virtqueue import (
    BrokenRing,
    DescChain,
    SplitVirtqueue,
    VringAddr,
    signal_eventfd,
)

log = logging.getLogger(__name__)

SUPPORTED_PROTOCOL_FEATURES = feature_mask(
    ProtocolFeature.MQ,
    ProtocolFeature.REPLY_ACK,
    ProtocolFeature.CONFIG,
    ProtocolFeature.INFLIGHT_SHMFD,
    ProtocolFeature.RESET_DEVICE,
    ProtocolFeature.CONFIGURE_MEM_SLOTS,
    ProtocolFeature.STATUS,
)


# Completions signalled together at most (the last ones of a batch always are).
NOTIFY_BATCH = 8
# With helper threads on (O_DIRECT images), data requests of at least this size run
# there, so that requests waiting for the device overlap as they would in QEMU.
PARALLEL_MIN = 4096
PARALLEL_THREADS = 8


class QueueWorker:
    """The thread serving one started queue.

    Requests run on this thread, in ring order, with no handoff — unless
    parallel I/O is on (by default for O_DIRECT images), when data requests
    go to helper threads so that those waiting for the device overlap
    (preadv/pwritev drop the GIL); completions then reach the used ring in
    any order, which virtio allows, under `_lock`. Flushes stay on this
    thread: they cover only writes already completed, as virtio-blk says.
    """

    def __init__(self, session: Session, vq: SplitVirtqueue) -> None:
        self.session = session
        self.vq = vq
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stopping = False
        self._lock = threading.Lock()  # the used ring, inflight region and signalling state
        self._unsignalled = 0
        self._pool: ThreadPoolExecutor | None = None
        self.parallel_min = session.server.parallel_min
        self.thread = threading.Thread(target=self._run, name=f"vhost-blk-q{vq.index}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Let the requests being served finish, then end the threads."""
        self._stopping = True
        signal_eventfd(self._stop_fd)
        self.thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        os.close(self._stop_fd)

    def _run(self) -> None:
        vq = self.vq
        poller = select.poll()
        poller.register(vq.kick_fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        try:
            self._process()  # requests made available while no backend listened
            while not self._stopping and not vq.broken:
                poller.poll()
                if self._stopping:
                    break
                with contextlib.suppress(BlockingIOError):
                    os.read(vq.kick_fd, 8)
                self._process()
        except (BrokenRing, NoStatusByte) as exc:
            self.session.needs_reset(vq, str(exc))
        except OSError as exc:
            log.warning("queue %d stopped: %s", vq.index, exc)
        except Exception:
            log.exception("queue %d stopped by an internal error", vq.index)
            self.session.needs_reset(vq, "internal error")

    def _complete(self, head: int, used_len: int, batch_end: bool) -> None:
        with self._lock:
            self.vq.push(head, used_len)
            self._unsignalled += 1
            # An interrupt costs the guest more than a request costs us: signal once
            # per batch, but not so late that a deep queue idles.
            if batch_end or self._unsignalled >= NOTIFY_BATCH:
                self.vq.notify()
                self._unsignalled = 0

    def _flush_signal(self) -> None:
        with self._lock:
            if self._unsignalled:
                self.vq.notify()
                self._unsignalled = 0

    def _in_pool(self, chain: DescChain, memory: GuestMemory) -> None:
        try:
            used_len = self.session.server.device.handle(chain, memory)
        except NoStatusByte as exc:
            self.session.needs_reset(self.vq, str(exc))
            return
        except Exception:
            log.exception("queue %d: request failed inside the backend", self.vq.index)
            self.session.needs_reset(self.vq, "internal error")
            return
        self._complete(chain.head, used_len, batch_end=True)

    def _process(self) -> None:
        vq = self.vq
        memory = self.session.memory
        device = self.session.server.device
        try:
            while not self._stopping and not vq.broken:
                vq.disable_notification()
                while not self._stopping and not vq.broken:
                    chain = vq.pop(memory)
                    if chain is None:
                        break
                    if self.parallel_min and chain.nbytes >= self.parallel_min:
                        if self._pool is None:
                            self._pool = ThreadPoolExecutor(
                                PARALLEL_THREADS, thread_name_prefix=f"vhost-blk-q{vq.index}-io"
                            )
                        self._pool.submit(self._in_pool, chain, memory)
                        continue
                    self._complete(chain.head, device.handle(chain, memory), batch_end=False)
                vq.enable_notification()
                if not vq.has_available():
                    return
        finally:
            self._flush_signal()


class Session:
    """One frontend connection: its features, memory, queues and inflight region."""

    def __init__(self, server: VhostUserBlkServer, conn: socket.socket) -> None:
        self.server = server
        self.conn = conn
        self.num_queues = server.num_queues
        self.features = 0
        self.protocol_features = 0
        self.status = 0
        self.memory = GuestMemory()
        self.vqs = [SplitVirtqueue(i) for i in range(self.num_queues)]
        self.workers: dict[int, QueueWorker] = {}
        self.inflight: InflightRegion | None = None
        self._spare_fds: list[int] = []  # replaced call/err fds: closed when queues stop
        self.messages = 0

    # -- the message loop ------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                try:
                    msg = recv_message(self.conn)
                except ConnectionClosed:
                    log.info("frontend disconnected")
                    return
                except OSError as exc:
                    log.info("frontend connection lost: %s", exc)
                    return
                except ProtocolError as exc:
                    log.warning("dropping the frontend connection: %s", exc)
                    return
                self.messages += 1
                self._dispatch(msg)
        finally:
            self.close()

    def _dispatch(self, msg: Message) -> None:
        handler = _HANDLERS.get(msg.request)
        ok = True
        reply: Message | None = None
        try:
            if handler is None:
                raise ProtocolError(f"unsupported vhost-user message {msg.name}")
            if log.isEnabledFor(logging.DEBUG):  # hex() of a memory table is not free
                log.debug("<- %s %s", msg.name, msg.payload.hex())
            reply = handler(self, msg)
        except (ProtocolError, GuestError, ValueError, OverflowError, struct.error) as exc:
            ok = False
            log.warning("vhost-user %s failed: %s", msg.name, exc)
        finally:
            msg.close_fds()
        if reply is None and msg.need_reply and self._has(ProtocolFeature.REPLY_ACK):
            reply = reply_to(msg, VhostUserU64.pack(0 if ok else 1))
        if reply is not None:
            try:
                send_message(self.conn, reply)
            finally:
                for fd in reply.fds:
                    if self.inflight is None or fd != self.inflight.fd:
                        os.close(fd)

    def _has(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & (1 << feature))

    def _vq(self, index: int) -> SplitVirtqueue:
        if not 0 <= index < self.num_queues:
            raise ProtocolError(
                f"queue index {index} out of range (the device has {self.num_queues} queues)"
            )
        return self.vqs[index]

    # -- queue lifecycle -------------------------------------------------------

    def start_queue(self, vq: SplitVirtqueue) -> None:
        if vq.index in self.workers or vq.kick_fd < 0 or vq.enabled is False or vq.broken:
            return
        if not self.memory.regions:
            return
        try:
            vq.map(self.memory)
        except GuestError as exc:
            self.needs_reset(vq, f"cannot map the ring: {exc}")
            return
        vq.event_idx = bool(self.features & (1 << VirtioFeature.RING_EVENT_IDX))
        vq.indirect = bool(self.features & (1 << VirtioFeature.RING_INDIRECT_DESC))
        if self.inflight is not None and vq.index < len(self.inflight.queues):
            vq.inflight = self.inflight.queues[vq.index]
            resubmit = vq.recover_inflight()
            if resubmit:
                log.info(
                    "queue %d: resubmitting %d requests left in flight by a previous backend",
                    vq.index,
                    resubmit,
                )
        else:
            vq.inflight = None
            vq.used_idx = vq.ring_used_idx()
        worker = QueueWorker(self, vq)
        self.workers[vq.index] = worker
        worker.start()
        # A completion may have been published by a backend that died before signalling.
        if vq.call_fd >= 0:
            signal_eventfd(vq.call_fd)
        log.debug(
            "queue %d started (size %d, avail %d, used %d)",
            vq.index,
            vq.num,
            vq.last_avail_idx,
            vq.used_idx,
        )

    def stop_queue(self, vq: SplitVirtqueue) -> None:
        worker = self.workers.pop(vq.index, None)
        if worker is not None:
            worker.stop()
        vq.unmap()

    def stop_all(self) -> None:
        for vq in self.vqs:
            self.stop_queue(vq)
        for fd in self._spare_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._spare_fds.clear()

    def needs_reset(self, vq: SplitVirtqueue, cause: str) -> None:
        """The guest broke the ring: stop the queue and tell it (virtio 2.1.2)."""
        vq.broken = True
        self.status |= DeviceStatus.DEVICE_NEEDS_RESET
        self.server.note_needs_reset()
        log.error("queue %d: %s; device needs reset", vq.index, cause)
        if vq.err_fd >= 0:
            signal_eventfd(vq.err_fd)
        if vq.call_fd >= 0:
            signal_eventfd(vq.call_fd)

    def reset(self) -> None:
        self.stop_all()
        for vq in self.vqs:
            for fd in (vq.kick_fd, vq.call_fd, vq.err_fd):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        self.vqs = [SplitVirtqueue(i) for i in range(self.num_queues)]
        self.status = 0
        # The rings the inflight entries refer to are gone; QEMU brings a fresh region.
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None

    def close(self) -> None:
        self.reset()
        self.memory.clear()
        with contextlib.suppress(OSError):
            self.conn.close()

    # -- handlers --------------------------------------------------------------

    def get_features(self, msg: Message) -> Message:
        return reply_to(msg, VhostUserU64.pack(self.server.device.features()))

    def set_features(self, msg: Message) -> None:
        features = msg.u64()
        unknown = features & ~self.server.device.features()
        if unknown:
            raise ProtocolError(f"frontend acked features 0x{unknown:x} that were not offered")
        self.features = features
        for vq in self.vqs:
            if vq.enabled is None and not features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
                vq.enabled = True

    def set_owner(self, msg: Message) -> None:
        return None

    def reset_owner(self, msg: Message) -> None:
        self.reset()

    def get_protocol_features(self, msg: Message) -> Message:
        return reply_to(msg, VhostUserU64.pack(SUPPORTED_PROTOCOL_FEATURES))

    def set_protocol_features(self, msg: Message) -> None:
        features = msg.u64()
        self.protocol_features = features & SUPPORTED_PROTOCOL_FEATURES
        if features & ~SUPPORTED_PROTOCOL_FEATURES:
            log.warning(
                "frontend asked for protocol features 0x%x we did not offer; ignored",
                features & ~SUPPORTED_PROTOCOL_FEATURES,
            )

    def get_queue_num(self, msg: Message) -> Message:
        return reply_to(msg, VhostUserU64.pack(self.num_queues))

    def get_max_mem_slots(self, msg: Message) -> Message:
        return reply_to(msg, VhostUserU64.pack(MAX_MEM_SLOTS))

    def set_mem_table(self, msg: Message) -> None:
        if len(msg.payload) < VhostUserMemoryHeader.size:
            raise ProtocolError("SET_MEM_TABLE payload too short")
        nregions, _ = VhostUserMemoryHeader.unpack_from(msg.payload)
        if not 0 < nregions <= VHOST_MEMORY_BASELINE_NREGIONS:
            raise ProtocolError(f"SET_MEM_TABLE with {nregions} regions")
        if len(msg.payload) < VhostUserMemoryHeader.size + nregions * VhostUserMemoryRegion.size:
            raise ProtocolError("SET_MEM_TABLE payload shorter than its regions")
        if len(msg.fds) != nregions:
            raise ProtocolError(f"SET_MEM_TABLE with {nregions} regions but {len(msg.fds)} fds")
        descs = [
            RegionDesc(
                *VhostUserMemoryRegion.unpack_from(
                    msg.payload, VhostUserMemoryHeader.size + i * VhostUserMemoryRegion.size
                )
            )
            for i in range(nregions)
        ]
        running = [vq for vq in self.vqs if vq.index in self.workers]
        for vq in running:
            self.stop_queue(vq)
        fds = [msg.take_fd() for _ in range(nregions)]
        self.memory.set_table(list(zip(descs, fds, strict=True)))
        for vq in running:
            self.start_queue(vq)

    def add_mem_reg(self, msg: Message) -> None:
        if len(msg.payload) < VhostUserMemRegMsg.size:
            raise ProtocolError("ADD_MEM_REG payload too short")
        _, *fields = VhostUserMemRegMsg.unpack_from(msg.payload)
        self.memory.add(RegionDesc(*fields), msg.take_fd())
        # Queues whose kick arrived before their memory can start now.
        for vq in self.vqs:
            self.start_queue(vq)

    def rem_mem_reg(self, msg: Message) -> None:
        if len(msg.payload) < VhostUserMemRegMsg.size:
            raise ProtocolError("REM_MEM_REG payload too short")
        _, *fields = VhostUserMemRegMsg.unpack_from(msg.payload)
        self.memory.remove(RegionDesc(*fields))

    def _stopped_vq(self, index: int, what: str) -> SplitVirtqueue:
        """The queue, which must not be running: its thread reads the ring's size, addresses
        and index without a lock (a size changed under it indexed past the mapped ring)."""
        vq = self._vq(index)
        if index in self.workers:
            raise ProtocolError(f"{what} for running queue {index}: stop it first (GET_VRING_BASE)")
        return vq

    def set_vring_num(self, msg: Message) -> None:
        index, num = VhostVringState.unpack_from(msg.payload)
        if not 0 < num <= VIRTQUEUE_MAX_SIZE:
            raise ProtocolError(f"queue {index}: size {num} (1..{VIRTQUEUE_MAX_SIZE})")
        self._stopped_vq(index, "SET_VRING_NUM").num = num

    def set_vring_addr(self, msg: Message) -> None:
        index, flags, desc, used, avail, log_addr = VhostVringAddr.unpack_from(msg.payload)
        self._stopped_vq(index, "SET_VRING_ADDR").addr = VringAddr(
            flags, desc, used, avail, log_addr
        )

    def set_vring_base(self, msg: Message) -> None:
        index, num = VhostVringState.unpack_from(msg.payload)
        self._stopped_vq(index, "SET_VRING_BASE").last_avail_idx = num & 0xFFFF

    def get_vring_base(self, msg: Message) -> Message:
        index, _ = VhostVringState.unpack_from(msg.payload)
        vq = self._vq(index)
        self.stop_queue(vq)
        for fd in (vq.kick_fd, vq.call_fd):
            if fd >= 0:
                os.close(fd)
        vq.kick_fd = vq.call_fd = -1
        vq.broken = False
        return reply_to(msg, VhostVringState.pack(index, vq.last_avail_idx))

    def _vring_fd(self, msg: Message) -> tuple[SplitVirtqueue, int]:
        value = msg.u64()
        vq = self._vq(value & VHOST_USER_VRING_IDX_MASK)
        if value & VHOST_USER_VRING_NOFD_MASK:
            return vq, -1
        fd = msg.take_fd()
        if not _is_eventfd(fd):
            # A pipe or file here would block or spin the queue thread forever.
            os.close(fd)
            raise ProtocolError(f"{msg.name} for queue {vq.index}: the fd is not an eventfd")
        return vq, fd

    def set_vring_kick(self, msg: Message) -> None:
        vq, fd = self._vring_fd(msg)
        self.stop_queue(vq)
        if vq.kick_fd >= 0:
            os.close(vq.kick_fd)
        vq.kick_fd = fd
        if fd < 0:
            log.warning(
                "queue %d: polling mode (no kick fd) is not supported; the queue stays stopped",
                vq.index,
            )
            return
        self.start_queue(vq)

    def set_vring_call(self, msg: Message) -> None:
        vq, fd = self._vring_fd(msg)
        if vq.call_fd >= 0:
            self._spare_fds.append(vq.call_fd)  # the queue thread may still be using it
        vq.call_fd = fd
        if fd >= 0 and vq.index in self.workers:
            # After a reconnect a completion may be in the used ring unsignalled.
            signal_eventfd(fd)

    def set_vring_err(self, msg: Message) -> None:
        vq, fd = self._vring_fd(msg)
        if vq.err_fd >= 0:
            self._spare_fds.append(vq.err_fd)
        vq.err_fd = fd

    def set_vring_enable(self, msg: Message) -> None:
        index, enable = VhostVringState.unpack_from(msg.payload)
        vq = self._vq(index)
        vq.enabled = bool(enable)
        if enable:
            self.start_queue(vq)
        else:
            self.stop_queue(vq)

    def get_config(self, msg: Message) -> Message:
        offset, size, flags = VhostUserConfigHeader.unpack_from(msg.payload)
        if size > 256 or offset + size > 256:
            raise ProtocolError(f"GET_CONFIG of {size} bytes at {offset}")
        data = self.server.device.read_config(offset, size)
        return reply_to(msg, VhostUserConfigHeader.pack(offset, size, flags) + data)

    def set_config(self, msg: Message) -> None:
        offset, size, _flags = VhostUserConfigHeader.unpack_from(msg.payload)
        data = msg.payload[VhostUserConfigHeader.size : VhostUserConfigHeader.size + size]
        if len(data) != size:
            raise ProtocolError(f"SET_CONFIG says {size} bytes but carries {len(data)}")
        if not self.server.device.write_config(offset, data):
            raise ProtocolError(f"config write at offset {offset} refused")

    def get_inflight_fd(self, msg: Message) -> Message:
        _, _, num_queues, queue_size = VhostUserInflight.unpack_from(msg.payload)
        if not 0 < queue_size <= VIRTQUEUE_MAX_SIZE or not 0 < num_queues <= self.num_queues:
            raise ProtocolError(f"GET_INFLIGHT_FD for {num_queues} queues of {queue_size}")
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = InflightRegion.create(num_queues, queue_size)
        payload = VhostUserInflight.pack(self.inflight.mmap_size, 0, num_queues, queue_size)
        return reply_to(msg, payload, [self.inflight.fd])

    def set_inflight_fd(self, msg: Message) -> None:
        mmap_size, mmap_offset, num_queues, queue_size = VhostUserInflight.unpack_from(msg.payload)
        fd = msg.take_fd()
        try:
            region = InflightRegion(fd, mmap_size, mmap_offset, num_queues, queue_size)
        except BaseException:
            os.close(fd)
            raise
        if self.inflight is not None and self.inflight is not region:
            self.inflight.close()
        self.inflight = region

    def reset_device(self, msg: Message) -> None:
        self.reset()

    def set_status(self, msg: Message) -> None:
        self.status = msg.u64() & 0xFF

    def get_status(self, msg: Message) -> Message:
        return reply_to(msg, VhostUserU64.pack(self.status))

    def set_log(self, msg: Message) -> None:
        raise ProtocolError("dirty logging (migration) is not supported")


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


_HANDLERS: dict[int, Any] = {
    VhostUserRequest.GET_FEATURES: Session.get_features,
    VhostUserRequest.SET_FEATURES: Session.set_features,
    VhostUserRequest.SET_OWNER: Session.set_owner,
    VhostUserRequest.RESET_OWNER: Session.reset_owner,
    VhostUserRequest.SET_MEM_TABLE: Session.set_mem_table,
    VhostUserRequest.SET_LOG_BASE: Session.set_log,
    VhostUserRequest.SET_LOG_FD: Session.set_log,
    VhostUserRequest.SET_VRING_NUM: Session.set_vring_num,
    VhostUserRequest.SET_VRING_ADDR: Session.set_vring_addr,
    VhostUserRequest.SET_VRING_BASE: Session.set_vring_base,
    VhostUserRequest.GET_VRING_BASE: Session.get_vring_base,
    VhostUserRequest.SET_VRING_KICK: Session.set_vring_kick,
    VhostUserRequest.SET_VRING_CALL: Session.set_vring_call,
    VhostUserRequest.SET_VRING_ERR: Session.set_vring_err,
    VhostUserRequest.GET_PROTOCOL_FEATURES: Session.get_protocol_features,
    VhostUserRequest.SET_PROTOCOL_FEATURES: Session.set_protocol_features,
    VhostUserRequest.GET_QUEUE_NUM: Session.get_queue_num,
    VhostUserRequest.SET_VRING_ENABLE: Session.set_vring_enable,
    VhostUserRequest.GET_CONFIG: Session.get_config,
    VhostUserRequest.SET_CONFIG: Session.set_config,
    VhostUserRequest.GET_INFLIGHT_FD: Session.get_inflight_fd,
    VhostUserRequest.SET_INFLIGHT_FD: Session.set_inflight_fd,
    VhostUserRequest.RESET_DEVICE: Session.reset_device,
    VhostUserRequest.GET_MAX_MEM_SLOTS: Session.get_max_mem_slots,
    VhostUserRequest.ADD_MEM_REG: Session.add_mem_reg,
    VhostUserRequest.REM_MEM_REG: Session.rem_mem_reg,
    VhostUserRequest.SET_STATUS: Session.set_status,
    VhostUserRequest.GET_STATUS: Session.get_status,
}


class VhostUserBlkServer:
    """A vhost-user-blk export of one device on one listening socket."""

    def __init__(
        self,
        device: VirtioBlkDevice,
        listener: socket.socket,
        *,
        num_queues: int = 1,
        path: str | Path | None = None,
        name: str = "",
        parallel_io: bool | None = None,
    ) -> None:
        """`parallel_io`: overlap data requests on helper threads. By default only
        for O_DIRECT images: there a request waits for the device and overlapping is
        the point; page-cache copies on one thread measured as fast or faster here."""
        if not 1 <= num_queues <= 64:
            raise PowercutError(f"num-queues must be 1..64, got {num_queues}")
        if parallel_io is None:
            root = getattr(device.backend, "root", None)
            parallel_io = bool(getattr(getattr(root, "open_flags", None), "direct", False))
        self.parallel_min = PARALLEL_MIN if parallel_io else 0
        self.device = device
        self.listener = listener
        self.num_queues = num_queues
        self.path = Path(path) if path is not None else None
        self.name = name or (str(path) if path else "vhost-user-blk")
        self.session: Session | None = None
        self.connections = 0
        self.needs_reset_count = 0
        self._accept = AcceptLoop(listener, self._serve, name=self.name)
        self.started_at = time.monotonic()

    @classmethod
    def on_path(
        cls,
        device: VirtioBlkDevice,
        path: str | Path,
        *,
        num_queues: int = 1,
        name: str = "",
        parallel_io: bool | None = None,
    ) -> VhostUserBlkServer:
        return cls(
            device,
            listen_unix(path),
            num_queues=num_queues,
            path=path,
            name=name,
            parallel_io=parallel_io,
        )

    def note_needs_reset(self) -> None:
        self.needs_reset_count += 1

    def start(self) -> VhostUserBlkServer:
        self._accept.start(f"vhost-{self.name}")
        return self

    def _serve(self, conn: socket.socket) -> None:
        """One frontend, served on the accept loop's thread until it goes away."""
        self.connections += 1
        log.info("%s: frontend connected (connection %d)", self.name, self.connections)
        self.session = Session(self, conn)
        try:
            self.session.run()
        finally:
            self.session = None

    def close(self) -> None:
        self._accept.stop()
        session = self.session
        if session is not None:
            with contextlib.suppress(OSError):
                session.conn.shutdown(socket.SHUT_RDWR)
        self._accept.join(timeout=30)
        self.listener.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def stats(self) -> dict[str, Any]:
        session = self.session
        queues = []
        if session is not None:
            for vq in session.vqs:
                queues.append(
                    {
                        "index": vq.index,
                        "size": vq.num,
                        "started": vq.index in session.workers,
                        "completed": vq.completed,
                        "broken": vq.broken,
                        "last_avail_idx": vq.last_avail_idx,
                        "used_idx": vq.used_idx,
                    }
                )
        out: dict[str, Any] = {
            "export": self.name,
            "socket": str(self.path) if self.path else None,
            "connected": session is not None,
            "connections": self.connections,
            "device_status": session.status if session is not None else 0,
            "needs_reset_events": self.needs_reset_count,
            "requests": dict(self.device.counts),
            "queues": queues,
            "write_cache": bool(self.device.config_space()[VIRTIO_BLK_CONFIG_WCE_OFFSET]),
        }
        backend_stats = getattr(self.device.backend, "stats", None)
        if callable(backend_stats):
            stats = backend_stats()
            out["block"] = stats.to_dict() if hasattr(stats, "to_dict") else stats
        return out
