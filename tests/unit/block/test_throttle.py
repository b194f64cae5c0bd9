"""Throttling as QEMU does it: leaky buckets, bursts, groups shared between backends.

Rates are measured over a couple of seconds on the null driver (so the only
thing limiting them is the throttle) and must be within 10% of the limit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from harness.block import BlockBackend, open_backend
from harness.block.throttle import LeakyBucket, ThrottleLimits, create_group, delete_group


def run_for(
    backend: BlockBackend, op: Callable[[], None], seconds: float, threads: int = 4
) -> list[float]:
    """Issue requests from several threads for `seconds`; the completion times."""
    done: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker() -> None:
        while time.monotonic() < deadline:
            op()
            with lock:
                done.append(time.monotonic())

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sorted(done)


def rate_between(times: list[float], first: int, last: int) -> float:
    return (last - first) / (times[last] - times[first])


def test_bucket_without_burst_allows_a_tenth_of_a_second() -> None:
    b = LeakyBucket(avg=100)
    b.account(10)
    assert b.wait_ns() == 0
    b.account(1)
    assert 9_000_000 <= b.wait_ns() <= 11_000_000  # 1 unit over at 100/s: 10 ms
    b.leak(10_000_000)
    assert b.wait_ns() == 0


def test_bucket_with_burst_allows_max_times_length() -> None:
    b = LeakyBucket(avg=10, max=100, burst_length=1)
    b.account(100)
    assert b.wait_ns() == 0
    b.account(1)
    assert b.wait_ns() > 0


def test_iops_limit_is_kept_within_ten_percent() -> None:
    with open_backend("driver=null,size=1M,throttling.iops-total=200") as backend:
        times = run_for(backend, lambda: backend.read(0, 512), 2.5)
    rate = rate_between(times, 50, len(times) - 1)
    assert 180 <= rate <= 220, rate


def test_bandwidth_limit_is_kept_within_ten_percent() -> None:
    data = bytes(64 << 10)
    with open_backend("driver=null,size=16M,throttling.bps-write=2M") as backend:
        times = run_for(backend, lambda: backend.write(0, data), 2.5)
        reads = time.monotonic()
        for _ in range(100):
            backend.read(0, 65536)  # reads are not limited by a write limit
        assert time.monotonic() - reads < 0.5
    rate = rate_between(times, 8, len(times) - 1) * len(data)
    assert 0.9 * (2 << 20) <= rate <= 1.1 * (2 << 20), rate


def test_iops_size_counts_large_requests_as_several() -> None:
    data = bytes(64 << 10)
    spec = "driver=null,size=16M,throttling.iops-total=100,throttling.iops-size=16k"
    with open_backend(spec) as backend:
        times = run_for(backend, lambda: backend.write(0, data), 2.0)
    rate = rate_between(times, 5, len(times) - 1)
    assert 22.5 <= rate <= 27.5, rate  # each 64k write counts as four 16k operations


def test_burst_is_served_at_once_then_the_average_rate() -> None:
    spec = (
        "driver=null,size=1M,throttling.iops-total=50,throttling.iops-total-max=300,"
        "throttling.iops-total-max-length=1"
    )
    with open_backend(spec) as backend:
        start = time.monotonic()
        for _ in range(300):
            backend.read(0, 512)
        burst = time.monotonic() - start
        times = run_for(backend, lambda: backend.read(0, 512), 2.0, threads=2)
    assert burst < 0.5, burst
    rate = rate_between(times, 5, len(times) - 1)
    assert 45 <= rate <= 55, rate


def test_long_burst_runs_at_the_max_rate_for_max_length_seconds() -> None:
    spec = (
        "driver=null,size=1M,throttling.iops-total=20,throttling.iops-total-max=200,"
        "throttling.iops-total-max-length=2"
    )
    with open_backend(spec) as backend:
        times = run_for(backend, lambda: backend.read(0, 512), 1.5)
    # The burst bucket keeps the burst at iops-total-max, not unlimited.
    rate = rate_between(times, 30, len(times) - 1)
    assert 180 <= rate <= 220, rate


def test_backends_in_one_group_share_the_limit_fairly() -> None:
    spec = "driver=null,size=1M,throttling.group=shared,throttling.iops-total=200"
    results: dict[str, list[float]] = {}
    with open_backend(spec, name="a") as a, open_backend(spec, name="b") as b:
        assert a.throttle_group is b.throttle_group

        def drive(name: str, backend: BlockBackend) -> None:
            results[name] = run_for(backend, lambda: backend.read(0, 512), 2.5, threads=2)

        ts = [
            threading.Thread(target=drive, args=("a", a)),
            threading.Thread(target=drive, args=("b", b)),
        ]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    start = min(results["a"][0], results["b"][0]) + 0.5
    end = start + 1.8
    counts = {k: sum(1 for t in v if start <= t < end) for k, v in results.items()}
    total = (counts["a"] + counts["b"]) / 1.8
    assert 180 <= total <= 220, counts
    assert abs(counts["a"] - counts["b"]) <= 0.3 * max(counts.values()), counts


def test_throttle_filter_nodes_share_a_named_group() -> None:
    create_group("tg0", ThrottleLimits.parse({"iops-total": "100"}, ""))
    try:
        spec = "driver=throttle,throttle-group=tg0,file.driver=null,file.size=1M"
        with open_backend(spec) as a, open_backend(spec) as b:
            assert a.root.group is b.root.group  # type: ignore[attr-defined]

            def both() -> None:
                a.read(0, 512)
                b.read(0, 512)

            times = run_for(a, both, 2.0, threads=2)
        rate = 2 * rate_between(times, 5, len(times) - 1)
        # Shared: at most the one limit (two private buckets would allow 200/s).
        # The floor is loose because load only slows threads down; a group that
        # charged each request twice would still fall below it (50/s).
        assert 65 <= rate <= 110, rate
    finally:
        delete_group("tg0")


def test_flushes_are_not_throttled() -> None:
    with open_backend("driver=null,size=1M,throttling.iops-total=10") as backend:
        start = time.monotonic()
        for _ in range(100):
            backend.flush()
        assert time.monotonic() - start < 0.5


@pytest.mark.parametrize("rate", [100, 400])
def test_reads_and_writes_have_separate_limits(rate: int) -> None:
    spec = f"driver=null,size=1M,throttling.iops-read={rate},throttling.iops-write=1"
    with open_backend(spec) as backend:
        times = run_for(backend, lambda: backend.read(0, 512), 1.5)
    measured = rate_between(times, rate // 5, len(times) - 1)
    assert 0.9 * rate <= measured <= 1.1 * rate, measured
