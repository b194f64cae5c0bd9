"""The contract itself: every (mode, fault, policy) and what it must keep, written out here.

The table below is README's and docs/architecture.md's, typed in again rather
than read from `harness.durability.contract`, so a change to the code's table
(or to the parsers that reach it) fails here.
"""

from __future__ import annotations

import itertools

import pytest

from harness.durability.contract import (
    CacheMode,
    CutPolicy,
    FaultModel,
    Promise,
    cache_mode_names,
    host_cut_promise,
    parse_cache_mode,
    parse_fault,
    parse_policy,
    promise,
    reference_promise,
)
from harness.errors import ConfigError

EVERY, FLUSHED, NOTHING = Promise.EVERY_COMPLETED, Promise.FLUSHED, Promise.NOTHING
HOST_CUT = {
    "writeback": FLUSHED,
    "none": FLUSHED,
    "writethrough": EVERY,
    "directsync": EVERY,
    "unsafe": NOTHING,
}


@pytest.mark.parametrize(
    ("mode", "fault", "policy"),
    list(
        itertools.product(
            [*HOST_CUT, "off"],
            ["guest-power-cut", "host-power-cut", "backend-crash", "guest", "host", "backend"],
            [None, *(p.value for p in CutPolicy)],
        )
    ),
)
def test_every_mode_fault_and_policy_promises_what_the_table_says(
    mode: str, fault: str, policy: str | None
) -> None:
    host = fault in ("host-power-cut", "host")
    keep_all = policy == "keep-all"
    want = HOST_CUT["none" if mode == "off" else mode] if host and not keep_all else EVERY
    # The names are parsed at the boundary (the scenario file); the table takes the enums.
    m, f = parse_cache_mode(mode), parse_fault(fault)
    p = parse_policy(policy) if policy is not None else None
    assert promise(m, f, p) is want
    # Loss is measured against what the guest was told: unsafe's flushes.
    assert reference_promise(m, f, p) is (FLUSHED if want is NOTHING else want)


def test_host_cut_promise_and_the_parsers_names() -> None:
    for name, p in HOST_CUT.items():
        assert host_cut_promise(CacheMode(name)) is p
    assert parse_cache_mode("off") is CacheMode.NONE
    assert parse_fault("host-power-cut") is FaultModel.HOST_POWER_CUT
    assert parse_fault("backend") is FaultModel.BACKEND_CRASH
    assert parse_fault(FaultModel.GUEST_POWER_CUT) is FaultModel.GUEST_POWER_CUT
    assert (
        parse_policy("torn") is CutPolicy.TORN
        and parse_policy(CutPolicy.RANDOM) is CutPolicy.RANDOM
    )
    assert cache_mode_names() == [
        "writeback",
        "none",
        "writethrough",
        "directsync",
        "unsafe",
        "off",
    ]
    with pytest.raises(ConfigError, match=r"invalid cache mode 'wb'; valid modes: writeback, none"):
        parse_cache_mode("wb")
    with pytest.raises(
        ConfigError,
        match="unknown fault 'power'; valid: guest, host, backend, guest-power-cut, "
        "host-power-cut, backend-crash",
    ):
        parse_fault("power")
    with pytest.raises(ConfigError, match="unknown cut policy 'half'; valid policies: lose-all"):
        parse_policy("half")


@pytest.mark.parametrize(
    ("p", "completed", "fua", "flushed", "durable"),
    [
        (p, c, f, b, p is not NOTHING and c and (p is EVERY or f or b))
        for p, c, f, b in itertools.product(Promise, *[[False, True]] * 3)
    ],
)
def test_a_write_is_durable_when_completed_and_kept_by_its_promise(
    p: Promise, completed: bool, fua: bool, flushed: bool, durable: bool
) -> None:
    assert p.durable(completed=completed, fua=fua, before_last_flush=flushed) is durable


def test_each_promise_has_its_words_and_its_mode() -> None:
    assert [(p.label, p.mode_name) for p in Promise] == [
        ("keeps every completed write", "writethrough"),
        ("keeps flushed writes", "writeback"),
        ("may lose anything", "unsafe"),
    ]
