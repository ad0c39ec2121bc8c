"""RateBudget follows the vendor's own count of a window when another instance has used it."""

from __future__ import annotations

import pytest

from connectors.http import RateBudget


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_a_fresh_budget_takes_the_vendors_remaining_count_and_frees_it_over_the_window() -> None:
    clock = FakeClock()
    budget = RateBudget([(10, 10.0)], sleep=clock.sleep, monotonic=clock.monotonic, slack=0.0)
    assert budget.remaining() == 10
    budget.observe(3)  # the vendor counts 7 calls made elsewhere in its window, when is unknown
    assert budget.remaining() == 3
    for _ in range(3):
        budget.acquire()
    assert clock.slept == []
    # The 7 unknown calls are taken as spread over the last 10 s (one every 1.25 s): the fourth call waits
    # for the oldest to leave the window, not for a whole window.
    budget.acquire()
    assert sum(clock.slept) == pytest.approx(1.25, abs=0.01)
    clock.now += 4.0
    assert budget.remaining() == 3  # 4 of the unknown calls have left the window; 3 of them and our 4 remain
    clock.now += 10.0
    assert budget.remaining() == 10


def test_observing_more_room_than_the_local_count_changes_nothing() -> None:
    clock = FakeClock()
    budget = RateBudget([(10, 10.0)], sleep=clock.sleep, monotonic=clock.monotonic, slack=0.0)
    for _ in range(6):
        budget.acquire()
    budget.observe(9)  # the vendor has seen fewer (some still in flight): the local count stands
    assert budget.remaining() == 4
    budget.observe(-5)  # nonsense from a header never frees more than the window
    assert budget.remaining() == 0
