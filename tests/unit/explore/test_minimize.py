"""ddmin over synthetic predicates, and over a real state's losses."""

from __future__ import annotations

import random

import pytest

from harness.durability.contract import CutPolicy
from harness.explore.minimize import ddmin, losses_of, minimize_state
from harness.explore.states import Point, PointKind, State


def test_finds_the_one_item_that_fails() -> None:
    found, checks = ddmin(list(range(100)), lambda s: 37 in s)
    assert found == [37]
    assert checks < 30


def test_finds_a_pair_that_fails_only_together() -> None:
    found, _ = ddmin(list(range(64)), lambda s: 5 in s and 50 in s)
    assert sorted(found) == [5, 50]


@pytest.mark.parametrize("seed", range(20))
def test_result_fails_and_is_one_minimal(seed: int) -> None:
    rng = random.Random(seed)
    items = list(range(rng.randint(2, 40)))
    needed = set(rng.sample(items, rng.randint(1, min(4, len(items)))))
    alt = set(rng.sample(items, rng.randint(1, min(4, len(items)))))

    def fails(s: list[int]) -> bool:
        return needed <= set(s) or alt <= set(s)

    found, _ = ddmin(items, fails)
    assert fails(found)
    for i in range(len(found)):
        assert not fails(found[:i] + found[i + 1 :])


def test_a_predicate_that_fails_on_nothing_gives_the_empty_set() -> None:
    found, _ = ddmin([1, 2, 3], lambda s: True)
    assert found == []


def test_the_check_budget_bounds_the_work_and_keeps_a_failing_set() -> None:
    calls = []

    def fails(s: list[int]) -> bool:
        calls.append(s)
        return {3, 77, 140} <= set(s)

    found, checks = ddmin(list(range(200)), fails, max_checks=10)
    assert checks <= 10 and len(calls) <= 10
    assert fails(found)


def test_checks_are_cached_by_subset() -> None:
    seen = []

    def fails(s: list[int]) -> bool:
        seen.append(frozenset(s))
        return 1 in s

    ddmin([0, 1, 2, 3], fails)
    assert len(seen) == len(set(seen))


def test_minimize_state_shrinks_lost_and_torn_writes() -> None:
    point = Point(3, 100, (PointKind.FLUSH,), ("flush 9",), 2)
    state = State(
        "p3-torn-1", point, CutPolicy.TORN, (2, 4, 6, 8, 10), ((5, (40, 41)), (7, (60,))), 8
    )

    def fails(s: State) -> bool:
        return 6 in s.lost and any(seq == 7 for seq, _sec in s.torn)

    m = minimize_state(state, fails)
    assert m.state.lost == (6,)
    assert m.state.torn == ((7, (60,)),)
    assert m.state.id == "p3-torn-1-min"
    assert m.state.point == point
    assert m.checks > 0
    assert m.losses == [("lost", 6, ()), ("torn", 7, (60,))]
    assert len(losses_of(state)) == 7
