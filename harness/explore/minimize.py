"""Shrink a failing crash state to the few lost or torn writes that make it fail.

Delta debugging (ddmin, Zeller and Hildebrandt): the items are the state's
losses — each write it loses, and each write it tears (with the sectors it
loses of it) — and the test is "a state at the same point that loses only
these still fails". Every such state is inside the contract too (it loses a
subset of what was allowed to be lost), so the result is a real crash state,
replayable like any other. Results of the test are cached by subset, and the
count of distinct checks is returned so a report can say what it cost.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from harness.explore.states import State

T = TypeVar("T", bound=Hashable)


def ddmin(
    items: Sequence[T], fails: Callable[[list[T]], bool], *, max_checks: int | None = None
) -> tuple[list[T], int]:
    """A 1-minimal failing subset of `items` (every item of it is needed), and the checks made.

    `fails(items)` must be true. With `max_checks`, the smallest failing subset
    found when the budget runs out is returned (still failing, maybe not minimal).
    """
    cache: dict[frozenset[T], bool] = {}
    checks = 0

    def test(subset: list[T]) -> bool:
        nonlocal checks
        key = frozenset(subset)
        if key not in cache:
            if max_checks is not None and checks >= max_checks:
                return False
            checks += 1
            cache[key] = fails(subset)
        return cache[key]

    current = list(items)
    n = 2
    while len(current) >= 2:
        chunks = _split(current, n)
        reduced = False
        for chunk in chunks:
            if test(chunk):
                current, n, reduced = chunk, 2, True
                break
        if not reduced and n > 2:
            for i in range(len(chunks)):
                complement = [x for j, c in enumerate(chunks) if j != i for x in c]
                if test(complement):
                    current, n, reduced = complement, max(n - 1, 2), True
                    break
        if not reduced:
            if n >= len(current):
                break
            n = min(len(current), 2 * n)
        if max_checks is not None and checks >= max_checks:
            break
    if len(current) == 1 and test([]):
        current = []
    return current, checks


def _split(items: list[T], n: int) -> list[list[T]]:
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        if end > start:
            out.append(items[start:end])
        start = end
    return out


# A loss: ("lost", seq, ()) or ("torn", seq, sectors lost).
Loss = tuple[str, int, tuple[int, ...]]


@dataclass(frozen=True)
class Minimized:
    state: State  # the smallest failing state found (id: the original's + "-min")
    original: State
    checks: int

    @property
    def losses(self) -> list[Loss]:
        return losses_of(self.state)


def losses_of(state: State) -> list[Loss]:
    return [("lost", seq, ()) for seq in state.lost] + [
        ("torn", seq, sectors) for seq, sectors in state.torn
    ]


def state_with(state: State, losses: Sequence[Loss], suffix: str = "-min") -> State:
    lost = [seq for kind, seq, _s in losses if kind == "lost"]
    torn = [(seq, s) for kind, seq, s in losses if kind == "torn"]
    return state.with_loss(lost, torn, suffix)


def minimize_state(
    state: State, fails: Callable[[State], bool], *, max_checks: int | None = 200
) -> Minimized:
    """The fewest losses of `state` that still fail `fails` (which must fail on `state`)."""
    n = [0]

    def test(subset: list[Loss]) -> bool:
        n[0] += 1
        return fails(state_with(state, subset, f"-try{n[0]}"))

    smallest, checks = ddmin(losses_of(state), test, max_checks=max_checks)
    return Minimized(state_with(state, smallest), state, checks)
