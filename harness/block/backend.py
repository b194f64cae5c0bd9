"""`BlockBackend`: the device-facing end of a node graph, as QEMU's block-backend.c.

It owns what belongs to the device rather than to the image: whether the
device has a volatile write cache (without one every write is FUA, which
the stack turns into a flush when no node can do FUA natively), the bounds
and read-only checks, the `rerror`/`werror` policies, throttle group
membership and statistics. A flush goes to the root node, whose generic
layer elides it when nothing was written since the last one.

Errors (all from harness.errors): a request outside the device raises
`BlockRangeError` with errno EIO (what `blk_check_byte_request` returns, and
what qemu-io prints); a modification of a read-only backend `ReadOnlyError`
(EPERM); a host error, after the `rerror`/`werror` policy, `BlockError` with
the host's errno (report, or enospc for anything but ENOSPC), nothing
(ignore), or `BackendStoppedError` (stop, or enospc on ENOSPC: every request
then fails the same way until `resume()`). Nothing is written by a request
that was refused.

Every method is synchronous and thread-safe: requests from several threads
run concurrently down to the host (no lock is held across I/O), and
`submit()` runs one on the backend's own I/O threads for callers that want
many in flight from one thread.
"""

from __future__ import annotations

import enum
import errno as errno_mod
import logging
import mmap
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from harness.block.cache import CacheMode, cache_settings, parse_cache_mode
from harness.block.graph import Graph, open_blockdev_graph, open_graph
from harness.block.node import BlockNode, IOVec, RequestFlags, iov_length
from harness.block.options import parse_bool, to_flat
from harness.block.throttle import (
    LIMIT_KEYS,
    ThrottleGroup,
    ThrottleLimits,
    join_group,
    leave_group,
)
from harness.errors import (
    BackendStoppedError,
    BlockError,
    BlockRangeError,
    ConfigError,
    ReadOnlyError,
    UnsupportedError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_perf_ns = time.perf_counter_ns
_NO_FLAGS = RequestFlags.NONE


class ErrorAction(enum.Enum):
    """What an I/O error does (QEMU's BlockdevOnError)."""

    REPORT = "report"  # the request fails with the error
    IGNORE = "ignore"  # the request "succeeds"; the error is only counted
    ENOSPC = "enospc"  # stop on ENOSPC, report anything else
    STOP = "stop"  # stop the backend; requests fail until resume()


class Op(enum.Enum):
    READ = "read"
    WRITE = "write"
    FLUSH = "flush"
    DISCARD = "discard"
    WRITE_ZEROES = "write-zeroes"


@dataclass(frozen=True)
class OpStats:
    count: int
    bytes: int
    errors: int
    total_ns: int
    histogram: tuple[
        tuple[int, int], ...
    ]  # (latency upper bound in ns, requests), non-empty buckets

    @property
    def mean_ns(self) -> float:
        return self.total_ns / self.count if self.count else 0.0

    def percentile_ns(self, q: float) -> int:
        """An upper bound on the q-th percentile latency (0 < q <= 100), from the histogram."""
        if not self.count:
            return 0
        rank = q / 100 * self.count
        seen = 0
        for le, n in self.histogram:
            seen += n
            if seen >= rank:
                return le
        return self.histogram[-1][0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "bytes": self.bytes,
            "errors": self.errors,
            "total_ns": self.total_ns,
            "mean_ns": round(self.mean_ns, 1),
            "p50_ns_at_most": self.percentile_ns(50),
            "p99_ns_at_most": self.percentile_ns(99),
            "histogram": [{"le_ns": le, "count": n} for le, n in self.histogram],
        }


@dataclass(frozen=True)
class BackendStats:
    ops: Mapping[str, OpStats]
    flushes_issued: int  # flush requests that made the host sync something
    flushes_elided: int  # flush requests that reached no host sync (nothing new written, or unsafe)
    host_syncs: int  # fdatasync calls made by the graph, including FUA emulation
    fua_writes: int  # writes (and write-zeroes) that carried FUA
    errors_ignored: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "ops": {name: s.to_dict() for name, s in self.ops.items()},
            "flushes_issued": self.flushes_issued,
            "flushes_elided": self.flushes_elided,
            "host_syncs": self.host_syncs,
            "fua_writes": self.fua_writes,
            "errors_ignored": self.errors_ignored,
        }


class _Counter:
    __slots__ = ("bytes", "errors", "hist", "total_ns")

    def __init__(self) -> None:
        self.bytes = 0
        self.errors = 0
        self.total_ns = 0
        self.hist = [0] * 65  # bucket b: latency < 2**b ns

    def add_to(self, total: _Counter) -> None:
        total.bytes += self.bytes
        total.errors += self.errors
        total.total_ns += self.total_ns
        for b, n in enumerate(self.hist):
            total.hist[b] += n

    def snapshot(self) -> OpStats:
        hist = tuple((1 << b, n) for b, n in enumerate(self.hist) if n)
        return OpStats(sum(self.hist), self.bytes, self.errors, self.total_ns, hist)


class _ThreadCounters:
    """One thread's counters: each thread only adds to its own, so the hot path takes no lock."""

    __slots__ = ("by_op", "read", "write")

    def __init__(self) -> None:
        self.by_op = {op: _Counter() for op in Op}
        self.read = self.by_op[Op.READ]
        self.write = self.by_op[Op.WRITE]


class BlockBackend:
    """The device's view of a node graph. Build one with `open_backend`."""

    def __init__(
        self,
        graph: Graph,
        *,
        name: str = "",
        write_cache: bool = True,
        rerror: ErrorAction = ErrorAction.REPORT,
        werror: ErrorAction = ErrorAction.ENOSPC,
        throttle_group: str | None = None,
        throttle_limits: ThrottleLimits | None = None,
        iothreads: int = 4,
        cache_mode: CacheMode | None = None,
    ) -> None:
        self.graph = graph
        self.root: BlockNode = graph.root
        self.name = name or self.root.node_name
        self.cache_mode = cache_mode
        self.read_only = self.root.open_flags.read_only
        self.rerror = rerror
        self.werror = werror
        self._write_cache = write_cache
        self.root.write_cache_changed(write_cache)
        self._length = self.root.length
        self._unmap = bool(getattr(self.root, "unmap", True))
        self._stats_lock = threading.Lock()
        self._tls = threading.local()
        self._thread_counters: list[_ThreadCounters] = []
        self._flushes_issued = 0
        self._flushes_elided = 0
        self._fua_writes = 0
        self._errors_ignored = 0
        self._stopped: str | None = None
        self._closed = False
        self._iothreads = iothreads
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._sync_nodes = [n for n in graph.nodes.values() if hasattr(n, "host_syncs")]
        self._throttle: ThrottleGroup | None = None
        if throttle_group is not None or (throttle_limits is not None and throttle_limits.enabled):
            self._throttle = join_group(
                throttle_group or f"#backend-{self.name}", self, throttle_limits
            )
        # Buffers for read() must suit O_DIRECT when any node below needs alignment.
        self._aligned_reads = self.root.request_alignment > 1
        # The hot path checks one bound per request: the end of the device for reads and
        # writes while all is well, -1 (every request takes the slow path, which says why)
        # when stopped, closed, or for writes to a read-only backend.
        self._read_limit = self._length
        self._write_limit = -1 if self.read_only else self._length
        self._preadv = self.root.preadv
        self._pwritev = self.root.pwritev

    # -- properties --------------------------------------------------------------

    @property
    def length(self) -> int:
        return self._length

    @property
    def enable_write_cache(self) -> bool:
        """Whether the device has a volatile write cache (QEMU's blk->enable_write_cache)."""
        return self._write_cache

    def set_write_cache(self, enabled: bool) -> None:
        """The guest toggled the write cache (virtio-blk `wce`): writes get FUA when off."""
        self._write_cache = bool(enabled)
        self.root.write_cache_changed(self._write_cache)
        log.info("backend %s: write cache %s", self.name, "on" if enabled else "off")

    @property
    def stopped(self) -> str | None:
        """Why a `stop` error policy stopped the backend, or None while it runs."""
        return self._stopped

    def resume(self) -> None:
        """Like QEMU's `cont` after a policy stop: requests are accepted again."""
        self._stopped = None
        self._set_limits()

    def _set_limits(self) -> None:
        running = self._stopped is None and not self._closed
        self._read_limit = self._length if running else -1
        self._write_limit = self._length if running and not self.read_only else -1

    @property
    def throttle_group(self) -> ThrottleGroup | None:
        return self._throttle

    def node(self, name: str) -> BlockNode:
        try:
            return self.graph.nodes[name]
        except KeyError:
            raise ConfigError(
                f"no node named {name!r}; nodes: {', '.join(sorted(self.graph.nodes))}"
            ) from None

    # -- requests ----------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        if self._aligned_reads:
            buf: Any = mmap.mmap(-1, max(length, mmap.PAGESIZE))
            try:
                view = memoryview(buf)[:length]
                self.readv(offset, [view])
                data = bytes(view)
                view.release()
                return data
            finally:
                buf.close()
        out = bytearray(length)
        self.readv(offset, [memoryview(out)])
        return bytes(out)

    def readv(self, offset: int, iov: IOVec) -> None:
        """Read into the caller's buffers (zero-copy for mapped guest memory)."""
        length = len(iov[0]) if len(iov) == 1 else iov_length(iov)
        if offset < 0 or offset + length > self._read_limit:
            self._check_request("read", offset, length)
        if self._throttle is not None:
            self._throttle.intercept(self, False, length)
        t0 = _perf_ns()
        try:
            self._preadv(offset, iov)
        except (OSError, BlockError) as exc:
            self._failed(Op.READ, exc, t0, offset, length)
            return
        elapsed = _perf_ns() - t0
        try:
            counter = self._tls.counters.read
        except AttributeError:
            counter = self._my_counters().read
        counter.bytes += length
        counter.total_ns += elapsed
        counter.hist[elapsed.bit_length()] += 1  # the count is the histogram's sum

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        self.writev(offset, [memoryview(data)], fua=fua)

    def writev(self, offset: int, iov: IOVec, *, fua: bool = False) -> None:
        length = len(iov[0]) if len(iov) == 1 else iov_length(iov)
        if offset < 0 or offset + length > self._write_limit:
            self._check_request("write", offset, length, modifies=True)
        if self._throttle is not None:
            self._throttle.intercept(self, True, length)
        flags = _NO_FLAGS
        if fua or not self._write_cache:
            # blk_co_pwritev_part: without a write cache every write is FUA.
            flags = RequestFlags.FUA
            with self._stats_lock:
                self._fua_writes += 1
        t0 = _perf_ns()
        try:
            self._pwritev(offset, iov, flags)
        except (OSError, BlockError) as exc:
            self._failed(Op.WRITE, exc, t0, offset, length)
            return
        elapsed = _perf_ns() - t0
        try:
            counter = self._tls.counters.write
        except AttributeError:
            counter = self._my_counters().write
        counter.bytes += length
        counter.total_ns += elapsed
        counter.hist[elapsed.bit_length()] += 1  # the count is the histogram's sum

    def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = False,
        fua: bool = False,
        no_fallback: bool = False,
    ) -> None:
        """`no_fallback`: fail with ENOTSUP rather than write a zeroed buffer
        (BDRV_REQ_NO_FALLBACK; what NBD's FAST_ZERO asks for)."""
        self._check_request("write-zeroes", offset, length, modifies=True)
        if self._throttle is not None:
            self._throttle.intercept(self, True, length)
        flags = RequestFlags.NONE
        if may_unmap and self._unmap:
            flags |= RequestFlags.MAY_UNMAP
        if no_fallback:
            flags |= RequestFlags.NO_FALLBACK
        if fua or not self._write_cache:
            flags |= RequestFlags.FUA
            with self._stats_lock:
                self._fua_writes += 1
        t0 = _perf_ns()
        try:
            self.root.pwrite_zeroes(offset, length, flags)
        except (OSError, BlockError) as exc:
            if no_fallback and isinstance(exc, UnsupportedError):
                raise  # the answer to "can it be done fast?", not an I/O error: no policy
            self._failed(Op.WRITE_ZEROES, exc, t0, offset, length)
            return
        self._account(Op.WRITE_ZEROES, length, t0)

    def discard(self, offset: int, length: int) -> None:
        """Advisory, as in QEMU: with discard=ignore, or a host that cannot, it does nothing."""
        self._check_request("discard", offset, length, modifies=True)
        t0 = _perf_ns()
        try:
            self.root.pdiscard(offset, length)
        except (OSError, BlockError) as exc:
            self._failed(Op.DISCARD, exc, t0, offset, length)
            return
        self._account(Op.DISCARD, length, t0)

    def flush(self) -> None:
        if self._stopped is not None:
            raise BackendStoppedError(self._stopped_message())
        self._check_open()
        before = self._host_syncs()
        t0 = _perf_ns()
        try:
            self.root.flush()
        except (OSError, BlockError) as exc:
            self._failed(Op.FLUSH, exc, t0, 0, 0)
            return
        issued = self._host_syncs() != before
        with self._stats_lock:
            if issued:
                self._flushes_issued += 1
            else:
                self._flushes_elided += 1
        self._account(Op.FLUSH, 0, t0)

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Run a request (e.g. `backend.readv`) on the backend's I/O threads."""
        self._check_open()
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    self._iothreads, thread_name_prefix=f"blk-{self.name}"
                )
            return self._executor.submit(fn, *args, **kwargs)

    # -- bookkeeping -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BlockError(f"backend {self.name!r} is closed", errno_mod.EIO)

    def _check_request(self, what: str, offset: int, length: int, modifies: bool = False) -> None:
        if self._stopped is not None:
            raise BackendStoppedError(self._stopped_message())
        if offset < 0 or length < 0 or offset + length > self._length:
            self._check_open()
            raise BlockRangeError(
                f"{what} of {length} bytes at offset {offset} is outside the device "
                f"{self.name!r} (length {self._length}); requests must lie within [0, length)"
            )
        if modifies and self.read_only:
            raise ReadOnlyError(f"{what} refused: backend {self.name!r} is read-only")
        if self._closed:
            self._check_open()

    def _account(self, op: Op, nbytes: int, t0: int) -> None:
        elapsed = _perf_ns() - t0
        counter = self._my_counters().by_op[op]
        counter.bytes += nbytes
        counter.total_ns += elapsed
        counter.hist[elapsed.bit_length()] += 1

    def _failed(self, op: Op, exc: OSError | BlockError, t0: int, offset: int, length: int) -> None:
        """Apply rerror/werror to an I/O error: raise it, swallow it or stop."""
        code = exc.errno if isinstance(exc, BlockError) else (exc.errno or errno_mod.EIO)
        reason = str(exc) if isinstance(exc, BlockError) else (exc.strerror or str(exc))
        action = self.rerror if op is Op.READ else self.werror
        if action is ErrorAction.ENOSPC:
            action = ErrorAction.STOP if code == errno_mod.ENOSPC else ErrorAction.REPORT
        elapsed = _perf_ns() - t0
        counter = self._my_counters().by_op[op]
        counter.errors += 1
        counter.total_ns += elapsed
        with self._stats_lock:
            if action is ErrorAction.IGNORE:
                self._errors_ignored += 1
        where = f" of {length} bytes at offset {offset}" if op is not Op.FLUSH else ""
        message = f"{op.value}{where} on {self.name!r} failed: {reason}"
        if action is ErrorAction.IGNORE:
            log.warning("%s (ignored: %s=ignore)", message, "rerror" if op is Op.READ else "werror")
            return
        if action is ErrorAction.STOP:
            self._stopped = message
            self._set_limits()
            log.error("%s; backend stopped until resume()", message)
            raise BackendStoppedError(f"{message}; the backend is stopped, resume() it") from exc
        raise BlockError(message, code) from exc

    def _stopped_message(self) -> str:
        return f"backend {self.name!r} is stopped after an I/O error ({self._stopped}); resume() it"

    def _my_counters(self) -> _ThreadCounters:
        try:
            counters: _ThreadCounters = self._tls.counters
        except AttributeError:
            counters = self._tls.counters = _ThreadCounters()
            with self._stats_lock:
                self._thread_counters.append(counters)
        return counters

    def _host_syncs(self) -> int:
        return sum(int(getattr(n, "host_syncs", 0)) for n in self._sync_nodes)

    def stats(self) -> BackendStats:
        with self._stats_lock:
            totals = {op: _Counter() for op in Op}
            for per_thread in self._thread_counters:
                for op, counter in per_thread.by_op.items():
                    counter.add_to(totals[op])
            ops = {op.value: c.snapshot() for op, c in totals.items()}
            return BackendStats(
                ops,
                self._flushes_issued,
                self._flushes_elided,
                self._host_syncs(),
                self._fua_writes,
                self._errors_ignored,
            )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "length": self._length,
            "cache-mode": self.cache_mode.value if self.cache_mode else None,
            "write-cache": self._write_cache,
            "read-only": self.read_only,
            "cache.direct": self.root.open_flags.direct,
            "cache.no-flush": self.root.open_flags.no_flush,
            "rerror": self.rerror.value,
            "werror": self.werror.value,
            "throttle-group": self._throttle.name if self._throttle else None,
            "nodes": [n.describe() for n in _walk(self.root)],
        }

    def close(self) -> None:
        """Flush (as bdrv_close does), then close every node. Safe to call twice."""
        if self._closed:
            return
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
        try:
            if not self.read_only:
                self.root.flush()
        except (OSError, BlockError) as exc:
            log.warning("backend %s: flush on close failed: %s", self.name, exc)
        finally:
            self._closed = True
            self._set_limits()
            if self._throttle is not None:
                leave_group(self._throttle, self)
            self.graph.close()

    def __enter__(self) -> BlockBackend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<BlockBackend {self.name!r} length={self._length}>"


def _walk(node: BlockNode) -> list[BlockNode]:
    out = [node]
    for child in node.children:
        out.extend(_walk(child))
    return out


# -- opening -------------------------------------------------------------------

_BACKEND_KEYS = ("write-cache", "rerror", "werror", "iothreads", "throttling.group")


def _parse_action(value: Any, what: str) -> ErrorAction:
    try:
        return ErrorAction(str(value))
    except ValueError:
        raise ConfigError(
            f"{what}: invalid error policy {value!r}; valid policies: "
            + ", ".join(a.value for a in ErrorAction)
        ) from None


@dataclass(frozen=True)
class _DeviceOptions:
    """The options that belong to the device (the BlockBackend), not to a node."""

    write_cache: bool
    rerror: ErrorAction
    werror: ErrorAction
    iothreads: int
    throttle_group: str | None
    throttle_limits: ThrottleLimits | None


def _device_options(flat: dict[str, Any], default_write_cache: bool) -> _DeviceOptions:
    """Take the device's options out of `flat` (what is left are node options)."""
    backend_opts = {k: flat.pop(k) for k in list(flat) if k in _BACKEND_KEYS}
    limit_opts = {
        k: flat.pop(k)
        for k in list(flat)
        if k.startswith("throttling.") and k[len("throttling.") :] in LIMIT_KEYS
    }
    bad = [k for k in flat if k.startswith("throttling.")]
    if bad:
        raise ConfigError(
            f"unknown throttling option {bad[0]!r}; valid options: "
            + ", ".join(f"throttling.{k}" for k in (*LIMIT_KEYS, "group"))
        )
    write_cache = default_write_cache
    wc = backend_opts.get("write-cache")
    if wc is not None and str(wc) != "auto":
        write_cache = parse_bool(wc, "option 'write-cache'")
    try:
        iothreads = int(backend_opts.get("iothreads", 4))
    except ValueError:
        raise ConfigError(f"iothreads: {backend_opts['iothreads']!r} is not a number") from None
    if iothreads < 1:
        raise ConfigError(f"iothreads must be at least 1, got {iothreads}")
    group = backend_opts.get("throttling.group")
    return _DeviceOptions(
        write_cache=write_cache,
        rerror=_parse_action(backend_opts.get("rerror", "report"), "rerror"),
        werror=_parse_action(backend_opts.get("werror", "enospc"), "werror"),
        iothreads=iothreads,
        throttle_group=str(group) if group is not None else None,
        throttle_limits=ThrottleLimits.parse(limit_opts) if limit_opts else None,
    )


def _backend_on(
    graph: Graph, device: _DeviceOptions, mode: CacheMode, name: str | None
) -> BlockBackend:
    try:
        return BlockBackend(
            graph,
            name=name or "",
            write_cache=device.write_cache,
            rerror=device.rerror,
            werror=device.werror,
            throttle_group=device.throttle_group,
            throttle_limits=device.throttle_limits,
            iothreads=device.iothreads,
            cache_mode=mode,
        )
    except BaseException:
        graph.close()
        raise


def open_backend(
    options: str | Mapping[str, Any],
    *,
    cache: str | CacheMode = "writeback",
    read_only: bool = False,
    name: str | None = None,
) -> BlockBackend:
    """Open a node graph and put a BlockBackend on it.

    `options` is a `--blockdev` description: a nested dict, the dotted string
    form, or a plain file name (a `raw` node over a `file` node). Besides the
    node options it takes the device's: `write-cache` (on/off/auto),
    `rerror`, `werror`, `iothreads`, `throttling.*` and `throttling.group`.
    `cache` sets the defaults for `write-cache`, `cache.direct` and
    `cache.no-flush`; explicit options win, as with QEMU's `-drive`.
    """
    if isinstance(options, str) and "=" not in options:
        options = {"driver": "raw", "file": {"driver": "file", "filename": options}}
    mode = parse_cache_mode(cache)
    settings = cache_settings(mode)
    flat = to_flat(options)
    device = _device_options(flat, settings.write_cache)
    graph = open_graph(
        flat, read_only=read_only, direct=settings.direct, no_flush=settings.no_flush
    )
    return _backend_on(graph, device, mode, name)


def open_blockdevs(
    blockdevs: Sequence[str | Mapping[str, Any]],
    node_name: str,
    *,
    device: str | Mapping[str, Any] | None = None,
    cache: str | CacheMode = "writeback",
    read_only: bool = False,
    name: str | None = None,
) -> BlockBackend:
    """A BlockBackend on node `node_name` of several `--blockdev` definitions.

    This is qemu-storage-daemon's shape: each definition has a node-name and
    may use an earlier one as its child (`file=NODE`). `device` holds the
    device's options (`write-cache`, `rerror`, `werror`, `throttling.*`, ...),
    which `--blockdev` does not take.
    """
    mode = parse_cache_mode(cache)
    settings = cache_settings(mode)
    device_flat = to_flat(device or {})
    opts = _device_options(device_flat, settings.write_cache)
    if device_flat:
        raise ConfigError(
            f"unknown device option {next(iter(device_flat))!r}; valid options: "
            + ", ".join((*_BACKEND_KEYS, "throttling.*"))
        )
    graph = open_blockdev_graph(
        blockdevs,
        node_name,
        read_only=read_only,
        direct=settings.direct,
        no_flush=settings.no_flush,
    )
    return _backend_on(graph, opts, mode, name)
