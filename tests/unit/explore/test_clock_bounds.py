"""The guest clock's bounds on the host's: round trips, causality from above and below."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from harness.explore.clock import (
    ClockBounds,
    bounds_from_round_trips,
    causal_upper,
    fsync_samples,
)
from harness.explore.syscalls import Trace, parse_strace


@settings(deadline=None, derandomize=True)
@given(
    st.integers(-(10**12), 10**12),
    st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 10**7), st.floats(0, 1)), min_size=1),
)
def test_round_trips_always_contain_the_true_offset(
    offset: int, trips: list[tuple[int, int, float]]
) -> None:
    """Whatever the delays, the guest read its clock between send and receipt: d is inside."""
    made = []
    for sent, rtt, where in trips:
        guest_at_host = sent + int(rtt * where)  # when, on the host's clock, the guest read
        made.append((sent, guest_at_host - offset, sent + rtt))
    bounds = bounds_from_round_trips(made)
    assert bounds.consistent and bounds.lo_ns <= offset <= bounds.hi_ns
    assert bounds.width_ns <= min(rtt for _s, rtt, _w in trips)


def test_a_drifting_guest_clock_keeps_the_hull_and_says_so() -> None:
    bounds = bounds_from_round_trips([(0, 0, 10), (100, 200, 110)])  # d in [0,10] then [-100,-90]
    assert not bounds.consistent and (bounds.lo_ns, bounds.hi_ns) == (-100, 10)


def test_causality_tightens_both_sides_and_refuses_a_contradiction() -> None:
    b = ClockBounds(-50, 50)
    up = b.tighten_upper([(1000, 1020), (2000, 2030)])  # lines arrived 20 and 30 after
    assert (up.lo_ns, up.hi_ns) == (-50, 20)
    down = up.tighten_lower([(500, 490)])  # a flush completed at 490 before a return at 500
    assert (down.lo_ns, down.hi_ns) == (-10, 20) and down.consistent
    assert not down.tighten_upper([(0, -20)]).consistent  # would put hi below lo
    assert down.to_host(1000) == (990, 1020)
    assert ClockBounds.from_json(json.loads(json.dumps(down.to_json()))) == ClockBounds(
        -10, 20, down.samples, True
    )


def test_after_a_jump_only_causality_bounds_an_instant() -> None:
    before, after = ClockBounds(-10, 10), ClockBounds(-2010, -1990)  # the guest jumped 2 s ahead
    both = before.intersect(after)
    assert not both.consistent and (both.lo_ns, both.hi_ns) == (-2010, 10)
    late_lines = [(5000, 3005)]  # recorded after the jump: would say d <= -1995
    assert both.tighten_upper(late_lines) == both  # not applied across the jump
    assert causal_upper([(100, 120), (5000, 3005), (200, 230)], 150) == 230
    assert causal_upper([(100, 120)], 150) is None


def test_an_fsync_is_bounded_by_the_earliest_flush_that_can_be_its_own() -> None:
    bounds = ClockBounds(0, 100)
    flushes = [(50, 60), (1150, 1170), (1180, 1190), (5000, 5010)]
    # fsync entered at 1100 and returned at 1200 (guest): on the host between 1100 and 1300.
    samples = fsync_samples([(1100, 1200), (3000, 3010)], flushes, bounds)
    assert samples == [(1200, 1170)]  # the second fsync's window holds no flush: no sample
    assert bounds.tighten_lower(samples).lo_ns == 0  # 1170 - 1200 < 0: no news here
    late = fsync_samples([(1100, 1200)], [(1150, 1290)], bounds)
    assert bounds.tighten_lower(late).lo_ns == 90


def test_a_trace_survives_json() -> None:
    trace: Trace = parse_strace(
        '5 1.0 openat(-100</m>, "a", 0x241, 0644) = 3</m/a> <0.000001>\n'
        '5 1.1 write(3</m/a>, "\\303\\0x", 3) = 3 <0.000001>\n'
        "5 1.2 fsync(3</m/a> <unfinished ...>\n"
    )
    again = Trace.from_json(json.loads(json.dumps(trace.to_json())))
    assert again == trace and again.calls[1].data == b"\xc3\x00x"
