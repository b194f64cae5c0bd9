"""ddmin over synthetic predicates, and over a real state's losses."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    size=st.integers(1, 40),
    sets=st.lists(st.lists(st.integers(0, 39), min_size=1, max_size=4), min_size=1, max_size=3),
    budget=st.one_of(st.none(), st.integers(1, 40)),
)
def test_any_monotone_failure_is_shrunk_within_budget_to_a_failing_subset(
    size: int, sets: list[list[int]], budget: int | None
) -> None:
    items = list(range(size))
    causes = [set(s) for s in sets if set(s) <= set(items)] or [{size - 1}]
    calls: list[frozenset[int]] = []

    def fails(subset: list[int]) -> bool:
        calls.append(frozenset(subset))
        return any(c <= set(subset) for c in causes)

    found, checks = ddmin(items, fails, max_checks=budget)
    assert any(c <= set(found) for c in causes)  # it still fails, whatever the budget
    assert found == sorted(set(found)) and set(found) <= set(items)  # a subset, in order
    assert checks == len(calls) == len(set(calls))  # each distinct subset checked once
    if budget is not None:
        assert checks <= budget
    if budget is None or checks < budget:
        # 1-minimal: without any one of its items it no longer fails.
        for i in range(len(found)):
            assert not any(c <= set(found[:i] + found[i + 1 :]) for c in causes)


def test_minimize_state_names_its_tries_keeps_the_original_and_respects_its_budget() -> None:
    point = Point(1, 10, (PointKind.END,), ("end",), 0)
    state = State("p1-random-2", point, CutPolicy.RANDOM, tuple(range(1, 30)), (), 29)
    tried: list[str] = []

    def fails(s: State) -> bool:
        tried.append(s.id)
        return {3, 17} <= set(s.lost)

    m = minimize_state(state, fails)
    assert m.original is state and m.state.lost == (3, 17)
    assert tried == [f"p1-random-2-try{k}" for k in range(1, len(tried) + 1)]
    assert m.checks == len(tried)
    tried.clear()
    small = minimize_state(state, fails, max_checks=4)
    assert small.checks == len(tried) <= 4
    assert {3, 17} <= set(small.state.lost)  # shrunk as far as the budget went, still failing
