"""retry.py: next_step decisions and the RetryLayer shell (fake clock and sleep, no wall time)."""

from __future__ import annotations

import asyncio
from random import Random

import pytest

from aivo_mesh.config.model import BackoffSpec, RetrySpec
from aivo_mesh.policy import bind
from aivo_mesh.policy.backoff import FullJitter
from aivo_mesh.policy.budget import UNLIMITED, RetryBudget, RetryBudgetParams
from aivo_mesh.policy.core import Call, LocalReason, Reply, build_stack
from aivo_mesh.policy.deadline import DeadlineLayer, DeadlineParams, attempt_timeout
from aivo_mesh.policy.retry import (
    ATTEMPT,
    BUDGET,
    COMMITTED,
    DEADLINE,
    LOCAL,
    MAX_RETRIES,
    NOT_RETRYABLE,
    PUSHBACK,
    GiveUp,
    RetryLayer,
    RetryParams,
    RetryState,
    Sleep,
    next_step,
)
from aivo_mesh.policy.testing import FakeClock, FakeSleep, RecordingListener

SVC, METHOD = "auth-svc", "/aivo.auth.v1.AuthService/ValidateToken"


class Upstream:
    """A scripted terminal: replies in order (the last one repeats); each attempt takes `duration`
    seconds of fake time, or ends with DEADLINE_EXCEEDED when its timeout is shorter (as grpc does)."""

    def __init__(self, clock: FakeClock, *replies: str | Reply, duration: float = 0.0) -> None:
        self.clock = clock
        self.replies = [r if isinstance(r, Reply) else Reply(r) for r in replies]
        self.duration = duration
        self.attempts: list[int] = []
        self.started: list[float] = []

    async def __call__(self, call: Call) -> Reply:
        self.attempts.append(call.attempt)
        self.started.append(self.clock())
        timeout = attempt_timeout(call, self.clock(), call.per_try_timeout)
        if timeout is not None and self.duration >= timeout:
            self.clock.advance(max(timeout, 0.0))
            return Reply("DEADLINE_EXCEEDED", details="attempt timed out")
        self.clock.advance(self.duration)
        return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]


def params(max_retries: int = 3, retry_on: tuple[str, ...] = ("UNAVAILABLE",), idempotent: bool = False,
           base: float = 0.1, cap: float = 1.0, per_try: float | None = None) -> RetryParams:
    spec = RetrySpec(max_retries=max_retries, retry_on=retry_on,  # type: ignore[arg-type]
                     backoff=BackoffSpec(base=base, max=cap), per_try_timeout=per_try)
    return bind.retry_params(spec, idempotent=idempotent)


def call(clock: FakeClock, timeout: float | None = None) -> Call:
    c = Call(SVC, METHOD, b"req")
    if timeout is not None:
        c.deadline = clock() + timeout
    return c


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sleep(clock: FakeClock) -> FakeSleep:
    return FakeSleep(clock)


def layer(p: RetryParams, clock: FakeClock, sleep: FakeSleep, **kw: object) -> RetryLayer:
    return RetryLayer(p, rng=Random(3), sleep=sleep, clock=clock, **kw)  # type: ignore[arg-type]


# -- the decision -------------------------------------------------------------------------------
def test_next_step_decisions(clock: FakeClock) -> None:
    p, rng = params(max_retries=2), Random(0)
    c = call(clock, timeout=10.0)
    st = RetryState(Reply("UNAVAILABLE"))
    step = next_step(st, p, c, clock(), UNLIMITED, rng)
    assert isinstance(step, Sleep)
    assert 0.0 < step.seconds <= 0.1
    assert (st.retries, st.backoff_n, st.previous_delay) == (1, 1, step.seconds)
    step = next_step(st, p, c, clock(), UNLIMITED, rng)
    assert isinstance(step, Sleep)
    assert step.seconds <= 0.2
    assert next_step(st, p, c, clock(), UNLIMITED, rng) == GiveUp(MAX_RETRIES, st.reply)

    def reason(reply: Reply, c: Call = c) -> str:
        step = next_step(RetryState(reply), p, c, clock(), UNLIMITED, rng)
        assert isinstance(step, GiveUp)
        assert step.reply is reply
        return step.reason

    assert reason(Reply("UNAVAILABLE", local=LocalReason.NO_ENDPOINTS)) == LOCAL
    assert reason(Reply("INVALID_ARGUMENT")) == NOT_RETRYABLE
    assert reason(Reply("INTERNAL")) == NOT_RETRYABLE
    assert reason(Reply("UNAVAILABLE"), Call(SVC, METHOD, None, committed=True)) == COMMITTED
    assert reason(Reply("UNAVAILABLE", trailers=(("grpc-retry-pushback-ms", "-1"),))) == PUSHBACK
    nearly_over = call(clock, timeout=0.0001)
    assert reason(Reply("UNAVAILABLE", trailers=(("grpc-retry-pushback-ms", "1"),)), nearly_over) == DEADLINE


def test_pushback_zero_is_an_immediate_attempt_and_restarts_backoff(clock: FakeClock) -> None:
    st = RetryState(Reply("UNAVAILABLE"), retries=1, backoff_n=3, previous_delay=0.5)
    st.reply = Reply("UNAVAILABLE", trailers=(("grpc-retry-pushback-ms", "0"),))
    assert next_step(st, params(), call(clock), clock(), UNLIMITED, Random(0)) is ATTEMPT
    assert (st.retries, st.backoff_n) == (2, 0)


def test_budget_is_checked_last_and_reserved(clock: FakeClock) -> None:
    budget = RetryBudget(RetryBudgetParams(percent=0, min_retry_concurrency=1), clock)
    p, c = params(), call(clock)
    assert isinstance(next_step(RetryState(Reply("UNAVAILABLE")), p, c, clock(), budget, Random(0)), Sleep)
    assert budget.in_flight == 1
    step = next_step(RetryState(Reply("UNAVAILABLE")), p, c, clock(), budget, Random(0))
    assert isinstance(step, GiveUp)
    assert step.reason == BUDGET
    # A non-retryable reply never touches the budget.
    next_step(RetryState(Reply("NOT_FOUND")), p, c, clock(), budget, Random(0))
    assert budget.in_flight == 1


def test_params_from_spec_caps_max_retries_by_the_client() -> None:
    spec = RetrySpec(max_retries=5, per_try_timeout=0.2)
    assert bind.retry_params(spec, idempotent=False, client_max_retries=2).max_retries == 2
    assert bind.retry_params(spec, idempotent=False, client_max_retries=9).max_retries == 5
    p = bind.retry_params(spec, idempotent=False)
    assert p.per_try_timeout == 0.2
    assert isinstance(p.backoff, FullJitter)
    with pytest.raises(ValueError, match="max_retries"):
        RetryParams(max_retries=-1)


# -- the layer ----------------------------------------------------------------------------------
async def test_transient_failures_are_retried_to_success(clock: FakeClock, sleep: FakeSleep) -> None:
    up = Upstream(clock, "UNAVAILABLE", "UNAVAILABLE", "OK")
    listener = RecordingListener()
    reply = await layer(params(), clock, sleep, listener=listener).wrap(up)(call(clock))
    assert reply.ok
    assert up.attempts == [1, 2, 3]
    assert len(sleep.calls) == 2
    assert [e[2] for e in listener.named("retry")] == [2, 3]


async def test_attempt_numbers_run_from_one_to_n(clock: FakeClock, sleep: FakeSleep) -> None:
    up = Upstream(clock, "UNAVAILABLE")
    reply = await layer(params(max_retries=4), clock, sleep).wrap(up)(call(clock))
    assert reply.code == "UNAVAILABLE"
    assert up.attempts == [1, 2, 3, 4, 5]


async def test_client_wide_cap_on_retries(clock: FakeClock, sleep: FakeSleep) -> None:
    up = Upstream(clock, "UNAVAILABLE")
    p = bind.retry_params(RetrySpec(max_retries=5), idempotent=False, client_max_retries=1)
    await layer(p, clock, sleep).wrap(up)(call(clock))
    assert up.attempts == [1, 2]


@pytest.mark.parametrize("code", ["INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "CANCELLED", "UNKNOWN"])
async def test_non_retryable_codes_are_not_retried(clock: FakeClock, sleep: FakeSleep, code: str) -> None:
    up = Upstream(clock, code, "OK")
    reply = await layer(params(), clock, sleep).wrap(up)(call(clock))
    assert reply.code == code
    assert up.attempts == [1]
    assert sleep.calls == []


@pytest.mark.parametrize(("idempotent", "attempts"), [(False, [1]), (True, [1, 2])])
async def test_internal_is_retried_only_on_idempotent_routes(
    clock: FakeClock, sleep: FakeSleep, idempotent: bool, attempts: list[int]
) -> None:
    up = Upstream(clock, "INTERNAL", "OK")
    p = params(retry_on=("UNAVAILABLE", "INTERNAL"), idempotent=idempotent)
    await layer(p, clock, sleep).wrap(up)(call(clock))
    assert up.attempts == attempts


async def test_never_retried_once_committed(clock: FakeClock, sleep: FakeSleep) -> None:
    attempts: list[int] = []

    async def streaming_then_reset(c: Call) -> Reply:
        attempts.append(c.attempt)
        c.committed = True  # a response message arrived before the failure
        return Reply("UNAVAILABLE")

    reply = await layer(params(), clock, sleep).wrap(streaming_then_reset)(call(clock))
    assert reply.code == "UNAVAILABLE"
    assert attempts == [1]


async def test_local_replies_are_never_retried(clock: FakeClock, sleep: FakeSleep) -> None:
    up = Upstream(clock, Reply("UNAVAILABLE", details="Circuit breaker OPEN for auth-svc",
                               local=LocalReason.CIRCUIT_OPEN))
    reply = await layer(params(), clock, sleep).wrap(up)(call(clock))
    assert reply.local
    assert up.attempts == [1]


async def test_cancellation_during_backoff_stops_at_once(clock: FakeClock) -> None:
    up = Upstream(clock, "UNAVAILABLE")
    budget = RetryBudget(RetryBudgetParams(), clock)
    never = asyncio.Event()
    sleeping = asyncio.Event()

    async def blocking_sleep(seconds: float) -> None:
        sleeping.set()
        await never.wait()

    handler = RetryLayer(params(), budget=budget, rng=Random(0), sleep=blocking_sleep, clock=clock).wrap(up)
    task = asyncio.ensure_future(handler(call(clock)))
    await sleeping.wait()
    assert budget.in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert up.attempts == [1]
    assert budget.in_flight == 0  # the reserved retry went back


async def test_cancellation_during_an_attempt_propagates(clock: FakeClock, sleep: FakeSleep) -> None:
    attempts: list[int] = []
    in_attempt = asyncio.Event()

    async def hanging(c: Call) -> Reply:
        attempts.append(c.attempt)
        if c.attempt == 1:
            return Reply("UNAVAILABLE")
        in_attempt.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    task = asyncio.ensure_future(layer(params(), clock, sleep).wrap(hanging)(call(clock)))
    await in_attempt.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert attempts == [1, 2]


@pytest.mark.parametrize("seed", range(20))
async def test_no_call_outlives_its_deadline_including_backoff(seed: int) -> None:
    clock = FakeClock()
    sleep = FakeSleep(clock)
    up = Upstream(clock, "UNAVAILABLE", duration=0.07)
    retry = RetryLayer(params(max_retries=10, base=0.2, cap=0.6), rng=Random(seed), sleep=sleep, clock=clock)
    deadline = DeadlineLayer(DeadlineParams(route_timeout=1.0), inherited=lambda: None, clock=clock)
    c = Call(SVC, METHOD, None)
    start = clock()
    reply = await build_stack([deadline, retry], up)(c)
    assert c.deadline == start + 1.0
    assert clock() <= c.deadline
    assert all(t < c.deadline for t in up.started)
    assert reply.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


async def test_oversleeping_past_the_deadline_gives_deadline_exceeded(clock: FakeClock) -> None:
    async def oversleep(seconds: float) -> None:
        clock.advance(seconds + 10.0)

    up = Upstream(clock, "UNAVAILABLE")
    reply = await RetryLayer(params(), rng=Random(0), sleep=oversleep, clock=clock).wrap(up)(call(clock, 5.0))
    assert (reply.code, reply.local) == ("DEADLINE_EXCEEDED", LocalReason.DEADLINE)
    assert up.attempts == [1]


async def test_pushback_is_honoured_exactly(clock: FakeClock, sleep: FakeSleep) -> None:
    up = Upstream(clock, Reply("UNAVAILABLE", trailers=(("grpc-retry-pushback-ms", "250"),)), "OK")
    reply = await layer(params(), clock, sleep).wrap(up)(call(clock))
    assert reply.ok
    assert sleep.calls == [0.25]


async def test_invalid_pushback_stops_retrying(clock: FakeClock, sleep: FakeSleep) -> None:
    up = Upstream(clock, Reply("UNAVAILABLE", trailers=(("grpc-retry-pushback-ms", "-1"),)), "OK")
    reply = await layer(params(), clock, sleep).wrap(up)(call(clock))
    assert reply.code == "UNAVAILABLE"
    assert up.attempts == [1]


async def test_pushback_longer_than_the_deadline_gives_up_with_the_reply(clock: FakeClock, sleep: FakeSleep) -> None:
    up = Upstream(clock, Reply("UNAVAILABLE", trailers=(("grpc-retry-pushback-ms", "5000"),)), "OK")
    reply = await layer(params(), clock, sleep).wrap(up)(call(clock, timeout=1.0))
    assert reply.code == "UNAVAILABLE"
    assert sleep.calls == []


@pytest.mark.parametrize(("idempotent", "attempts"), [(False, [1]), (True, [1, 2, 3, 4])])
async def test_per_try_timeout(clock: FakeClock, sleep: FakeSleep, idempotent: bool, attempts: list[int]) -> None:
    up = Upstream(clock, "OK", duration=0.5)  # every attempt is slower than the per-try timeout
    p = params(retry_on=("UNAVAILABLE", "DEADLINE_EXCEEDED"), idempotent=idempotent, per_try=0.2, base=0.01)
    c = call(clock, timeout=5.0)
    reply = await layer(p, clock, sleep).wrap(up)(c)
    assert c.per_try_timeout == 0.2
    assert reply.code == "DEADLINE_EXCEEDED"
    assert up.attempts == attempts


async def test_budget_deposited_once_per_call_and_exhaustion_reported(clock: FakeClock, sleep: FakeSleep) -> None:
    budget = RetryBudget(RetryBudgetParams(percent=0, min_retry_concurrency=0), clock)
    listener = RecordingListener()
    up = Upstream(clock, "UNAVAILABLE")
    reply = await layer(params(), clock, sleep, budget=budget, listener=listener).wrap(up)(call(clock))
    assert reply.code == "UNAVAILABLE"
    assert up.attempts == [1]
    assert budget.requests == 1
    assert listener.named("retry_budget_exhausted") == [(SVC, METHOD)]


async def test_budget_released_after_each_retry(clock: FakeClock, sleep: FakeSleep) -> None:
    budget = RetryBudget(RetryBudgetParams(), clock)
    up = Upstream(clock, "UNAVAILABLE", "UNAVAILABLE", "OK")
    await layer(params(), clock, sleep, budget=budget).wrap(up)(call(clock))
    assert (budget.requests, budget.retries, budget.in_flight) == (1, 2, 0)
