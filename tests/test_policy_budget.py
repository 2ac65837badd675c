"""budget.py: retries limited to a percentage of requests over a window, with a concurrency floor."""

from __future__ import annotations

import asyncio
from random import Random

import pytest

from aivo_mesh.config.model import BackoffSpec, LimitsSpec, RetryBudgetSpec, RetrySpec
from aivo_mesh.policy import bind
from aivo_mesh.policy.budget import UNLIMITED, RetryBudget, RetryBudgetParams
from aivo_mesh.policy.core import Call, Reply
from aivo_mesh.policy.retry import RetryLayer, RetryParams
from aivo_mesh.policy.testing import FakeClock, FakeSleep


async def storm(calls: int, params: RetryBudgetParams) -> tuple[int, RetryBudget]:
    """`calls` concurrent calls against an upstream that fails everything; returns the attempts made."""
    clock = FakeClock()
    budget = RetryBudget(params, clock)
    attempts = 0

    async def failing(call: Call) -> Reply:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0)  # in flight while others start and finish
        return Reply("UNAVAILABLE")

    retry = bind.retry_params(RetrySpec(max_retries=3, backoff=BackoffSpec(base=0.001, max=0.004)),
                                  idempotent=False)
    handler = RetryLayer(retry, budget=budget, rng=Random(1), sleep=FakeSleep(clock), clock=clock).wrap(failing)
    replies = await asyncio.gather(*(handler(Call("svc", "/m", None)) for _ in range(calls)))
    assert all(r.code == "UNAVAILABLE" for r in replies)
    assert budget.in_flight == 0
    return attempts, budget


async def test_failure_storm_adds_at_most_the_budgeted_percentage() -> None:
    n = 1000
    attempts, budget = await storm(n, RetryBudgetParams(percent=25, min_retry_concurrency=3))
    ratio = attempts / n
    assert ratio <= 1 + 0.25 + 0.02  # slack: the concurrency floor of 3
    assert ratio >= 1.2  # and the budget is actually spent
    assert budget.requests == n


async def test_failure_storm_without_a_budget_would_quadruple_the_load() -> None:
    # The point of the budget, shown: the same storm with a huge percentage.
    attempts, _ = await storm(200, RetryBudgetParams(percent=100, min_retry_concurrency=3))
    assert attempts > 2 * 200


async def test_without_a_budget_every_retry_max_retries_allows_is_made() -> None:
    """The default budget is the null object UNLIMITED: it refuses nothing and counts nothing."""
    assert RetryLayer(RetryParams()).budget is UNLIMITED
    assert UNLIMITED.try_withdraw() and UNLIMITED.try_withdraw()
    clock, attempts = FakeClock(), 0

    async def failing(call: Call) -> Reply:
        nonlocal attempts
        attempts += 1
        return Reply("UNAVAILABLE")

    handler = RetryLayer(RetryParams(max_retries=3), rng=Random(1), sleep=FakeSleep(clock), clock=clock).wrap(failing)
    await asyncio.gather(*(handler(Call("svc", "/m", None)) for _ in range(50)))
    assert attempts == 4 * 50


async def test_max_concurrent_retries_caps_the_storm() -> None:
    n = 1000
    attempts, _ = await storm(n, RetryBudgetParams(percent=25, min_retry_concurrency=3, max_concurrent_retries=10))
    assert attempts - n <= 10 * 3 + 3


def test_min_retry_concurrency_is_always_allowed() -> None:
    budget = RetryBudget(RetryBudgetParams(percent=25, min_retry_concurrency=3), FakeClock())
    assert budget.requests == 0
    assert [budget.try_withdraw() for _ in range(4)] == [True, True, True, False]
    budget.release()
    assert budget.try_withdraw()
    assert budget.in_flight == 3


def test_percentage_rule_over_requests_in_the_window() -> None:
    clock = FakeClock()
    budget = RetryBudget(RetryBudgetParams(percent=20, min_retry_concurrency=0), clock)
    for _ in range(50):
        budget.deposit()
    assert budget.balance == 10
    allowed = sum(budget.try_withdraw() for _ in range(20))
    assert allowed == 10
    assert budget.balance == 0
    for _ in range(10):
        budget.release()
    assert not budget.try_withdraw()  # releasing ends concurrency, not the count in the window


def test_window_expiry_by_buckets() -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(RetryBudgetParams(percent=100, min_retry_concurrency=0, window=10.0, buckets=10), clock)
    for _ in range(10):
        budget.deposit()
    clock.advance(5.0)
    for _ in range(4):
        budget.deposit()
    assert budget.requests == 14
    clock.advance(5.0)  # t=10: the first bucket [0, 1) left the window
    assert budget.requests == 4
    clock.advance(4.9)  # t=14.9: the second batch (bucket [5, 6)) is still inside
    assert budget.requests == 4
    clock.advance(0.2)  # t=15.1
    assert budget.requests == 0
    assert not budget.try_withdraw()
    clock.advance(1000.0)
    budget.deposit()
    assert (budget.requests, budget.retries) == (1, 0)


def test_max_concurrent_retries_beats_the_floor() -> None:
    budget = RetryBudget(RetryBudgetParams(min_retry_concurrency=5, max_concurrent_retries=2), FakeClock())
    assert [budget.try_withdraw() for _ in range(3)] == [True, True, False]


def test_from_spec_and_validation() -> None:
    p = bind.budget_params(RetryBudgetSpec(percent=10, min_retry_concurrency=1, window=30),
                                    LimitsSpec(max_retries=4))
    assert (p.percent, p.min_retry_concurrency, p.window, p.max_concurrent_retries) == (10, 1, 30, 4)
    with pytest.raises(ValueError, match=r"percent must be in \[0, 100\]"):
        RetryBudgetParams(percent=120)
    with pytest.raises(ValueError, match="window must be > 0"):
        RetryBudgetParams(window=0)


def test_release_never_goes_negative() -> None:
    budget = RetryBudget(clock=FakeClock())
    budget.release()
    assert budget.in_flight == 0
