"""Property: any concurrent workload through log-writes over powerfail, cut by any
policy, leaves an image the oracle finds inside the contract of its cache mode."""

from __future__ import annotations

import random
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.block import BlockBackend
from harness.durability.contract import CacheMode
from harness.durability.cut import CutPolicy, apply_cut
from harness.durability.oracle import check

from .conftest import crash
from .stack import make_paths, open_stack

S = 512
SECTORS = 64  # a small device, so requests overlap a lot

op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, SECTORS - 1), st.integers(1, 16), st.booleans()),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(False)),
    st.tuples(st.just("zeroes"), st.integers(0, SECTORS - 1), st.integers(1, 8), st.booleans()),
    st.tuples(st.just("discard"), st.integers(0, SECTORS - 1), st.integers(1, 8), st.just(False)),
)
# Batches of requests submitted together (concurrently, on 4 threads).
workload = st.lists(st.lists(op, min_size=1, max_size=4), min_size=1, max_size=8)


def _submit(
    pool: ThreadPoolExecutor,
    be: BlockBackend,
    rng: random.Random,
    request: tuple[str, int, int, bool],
) -> Future[None]:
    kind, sector, count, fua = request
    count = min(count, SECTORS - sector)
    if kind == "write":
        return pool.submit(be.write, sector * S, rng.randbytes(count * S), fua=fua)
    if kind == "zeroes":
        return pool.submit(be.write_zeroes, sector * S, count * S, fua=fua)
    if kind == "discard":
        return pool.submit(be.discard, sector * S, count * S)
    return pool.submit(be.flush)


@pytest.mark.parametrize("policy", [p.value for p in CutPolicy])
@pytest.mark.parametrize("mode", ["writeback", "none", "writethrough", "directsync", "unsafe"])
@settings(
    max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(batches=workload, seed=st.integers(0, 2**16), compact=st.booleans())
def test_random_concurrent_workload_cut_stays_inside_the_contract(
    mode: str,
    policy: str,
    batches: list[list[tuple[str, int, int, bool]]],
    seed: int,
    compact: bool,
) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="powercut-prop-") as tmp:
        paths = make_paths(Path(tmp), SECTORS * S, fill=0x5A)
        # compact: the journal is emptied or rewritten at every durable flush.
        be = open_stack(paths, mode, powerfail={"journal-compact": 0} if compact else None)
        try:
            with ThreadPoolExecutor(4) as pool:
                for batch in batches:
                    for future in [_submit(pool, be, rng, r) for r in batch]:
                        future.result()
        finally:
            crash(be)
        apply_cut(paths.image, paths.journal, policy, seed)
        report = check(paths.image, paths.log, CacheMode(mode))
        assert report.ok, (report.summary(), report.violations)
        discards = any(r[0] == "discard" for b in batches for r in b)
        if mode in ("writethrough", "directsync") and not discards:
            # Every completed write is durable: nothing optional can be left on the image
            # (a discard's content is unspecified, so it may leave either).
            assert report.may == 0, report.summary()
