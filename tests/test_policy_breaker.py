"""breaker.py: CLOSED -> OPEN -> HALF_OPEN -> CLOSED on a fake clock; the probe back-off; operator
states; the layer."""

from __future__ import annotations

import asyncio
from random import Random

import pytest

from aivo_mesh.config.model import CircuitBreakerSpec
from aivo_mesh.policy import bind
from aivo_mesh.policy.breaker import (
    CLOSED,
    DISABLED,
    FORCED_OPEN,
    HALF_OPEN,
    OPEN,
    REJECTED,
    STATE_GAUGE,
    BreakerLayer,
    BreakerParams,
    CircuitBreaker,
)
from aivo_mesh.policy.classify import FAILURE, SUCCESS, TRANSIENT
from aivo_mesh.policy.core import Call, Handler, Reply
from aivo_mesh.policy.testing import FakeClock, RecordingListener

SVC = "auth-svc"


class Upstream:
    def __init__(self, code: str = "UNAVAILABLE") -> None:
        self.code = code
        self.calls = 0
        self.gate: asyncio.Event | None = None  # when set, calls wait for it

    async def __call__(self, call: Call) -> Reply:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        return Reply(self.code)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def listener() -> RecordingListener:
    return RecordingListener()


def make(clock: FakeClock, listener: RecordingListener, up: Upstream,
         **params: object) -> tuple[CircuitBreaker, Handler]:
    breaker = CircuitBreaker(SVC, BreakerParams(**params), clock=clock, listener=listener)  # type: ignore[arg-type]
    return breaker, BreakerLayer(breaker, listener=listener).wrap(up)


def c() -> Call:
    return Call(SVC, "/aivo.auth.v1.AuthService/ValidateToken", None)


async def test_opens_after_exactly_five_consecutive_failures(clock: FakeClock, listener: RecordingListener) -> None:
    up = Upstream()
    breaker, handler = make(clock, listener, up)
    for _ in range(4):
        assert not (await handler(c())).local
    assert breaker.state == CLOSED
    up.code = "OK"
    await handler(c())  # a success resets the count
    up.code = "UNAVAILABLE"
    for _ in range(4):
        await handler(c())
    assert breaker.state == CLOSED
    await handler(c())
    assert breaker.state == OPEN
    assert listener.named("breaker_state") == [(SVC, CLOSED, OPEN)]
    assert len(listener.named("breaker_failure")) == 9


async def test_open_fails_fast_without_calling_inner(clock: FakeClock, listener: RecordingListener) -> None:
    up = Upstream()
    _breaker, handler = make(clock, listener, up)
    for _ in range(5):
        await handler(c())
    calls = up.calls
    reply = await handler(c())
    assert up.calls == calls
    assert reply.code == "UNAVAILABLE"
    assert reply.local
    assert "Circuit breaker OPEN" in reply.details
    assert SVC in reply.details
    assert listener.named("breaker_rejected") == [(SVC, "/aivo.auth.v1.AuthService/ValidateToken")]


async def test_half_open_after_the_first_probe_wait_one_probe_then_closed(
    clock: FakeClock, listener: RecordingListener
) -> None:
    up = Upstream()
    breaker, handler = make(clock, listener, up)
    for _ in range(5):
        await handler(c())
    wait = breaker.next_probe_in
    assert wait is not None and 0.5 <= wait <= 1.0  # first_probe 1 s, equal jitter: [c/2, c]
    clock.advance(wait - 0.001)
    assert (await handler(c())).local
    assert breaker.state == OPEN
    clock.advance(0.001)
    up.code, up.gate = "OK", asyncio.Event()
    probe = asyncio.ensure_future(handler(c()))
    await asyncio.sleep(0)
    assert breaker.state == HALF_OPEN
    assert breaker.next_probe_in is None
    calls = up.calls
    second = await handler(c())  # only one probe at a time
    assert second.local
    assert "Circuit breaker OPEN" in second.details
    assert up.calls == calls
    up.gate.set()
    assert (await probe).ok
    assert breaker.state == CLOSED
    assert [s[1:] for s in listener.named("breaker_state")] == [(CLOSED, OPEN), (OPEN, HALF_OPEN),
                                                                (HALF_OPEN, CLOSED)]
    assert (await handler(c())).ok


def test_each_failed_probe_doubles_the_wait_up_to_recovery_time(clock: FakeClock) -> None:
    breaker = CircuitBreaker(SVC, BreakerParams(consecutive_failures=1), clock=clock, rng=Random(3))
    breaker.record(breaker.admit(), FAILURE)
    waits = []
    for n in range(1, 11):
        wait = breaker.next_probe_in
        assert wait is not None
        ceiling = min(60.0, 2.0 ** (n - 1))
        assert ceiling / 2 <= wait <= ceiling, (n, wait)
        waits.append(wait)
        clock.advance(wait)
        breaker.record(breaker.admit(), FAILURE)  # the probe fails: OPEN again, for longer
    assert max(waits) <= 60.0 < sum(waits[-3:])  # capped at recovery_time, and still probing
    # A successful probe closes the breaker and resets the back-off: the next opening waits ~1 s.
    clock.advance(breaker.next_probe_in or 0.0)
    breaker.record(breaker.admit(), SUCCESS)
    assert breaker.state == CLOSED
    breaker.record(breaker.admit(), FAILURE)
    assert 0.5 <= (breaker.next_probe_in or 0.0) <= 1.0


def test_probe_waits_are_jittered(clock: FakeClock) -> None:
    # Callers that opened together must not probe together.
    waits = set()
    for seed in range(20):
        breaker = CircuitBreaker(SVC, BreakerParams(consecutive_failures=1), clock=clock, rng=Random(seed))
        breaker.record(breaker.admit(), FAILURE)
        waits.add(round(breaker.next_probe_in or 0.0, 6))
    assert len(waits) == 20
    assert min(waits) >= 0.5 and max(waits) <= 1.0


def test_first_probe_is_capped_by_recovery_time(clock: FakeClock) -> None:
    # A lone short recovery_time under the default first_probe: every wait is within recovery_time.
    breaker = CircuitBreaker(SVC, BreakerParams(consecutive_failures=1, recovery_time=0.4), clock=clock)
    for _ in range(5):
        breaker.record(breaker.admit(), FAILURE)
        wait = breaker.next_probe_in or 0.0
        assert 0.2 <= wait <= 0.4
        clock.advance(wait)
    # first_probe == recovery_time: every wait in [recovery_time / 2, recovery_time].
    flat = BreakerParams(first_probe=60, recovery_time=60).probe_backoff
    assert (flat.ceiling(1), flat.ceiling(9)) == (60.0, 60.0)


async def test_half_open_needs_all_probes_to_succeed(clock: FakeClock, listener: RecordingListener) -> None:
    breaker = CircuitBreaker(SVC, BreakerParams(consecutive_failures=1, half_open_max_calls=3), clock=clock)
    breaker.record(breaker.admit(), FAILURE)
    clock.advance(60)
    tickets = [breaker.admit() for _ in range(4)]
    assert tickets[3] == REJECTED
    for t in tickets[:2]:
        breaker.record(t, SUCCESS)
    assert breaker.state == HALF_OPEN
    breaker.record(tickets[2], SUCCESS)
    assert breaker.state == CLOSED


async def test_cancellation_never_counts_and_frees_the_probe_slot(
    clock: FakeClock, listener: RecordingListener
) -> None:
    up = Upstream()
    up.gate = asyncio.Event()
    breaker, handler = make(clock, listener, up)
    for _ in range(7):
        task = asyncio.ensure_future(handler(c()))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert breaker.state == CLOSED
    assert listener.named("breaker_failure") == []
    up.gate = None
    for _ in range(5):
        await handler(c())
    clock.advance(60)
    up.gate = asyncio.Event()
    probe = asyncio.ensure_future(handler(c()))
    await asyncio.sleep(0)
    assert breaker.state == HALF_OPEN
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert breaker.state == HALF_OPEN
    up.gate, up.code = None, "OK"
    assert (await handler(c())).ok  # the slot was freed: a new probe went out
    assert breaker.state == CLOSED


async def test_ignored_outcomes_neither_count_nor_reset(clock: FakeClock, listener: RecordingListener) -> None:
    up = Upstream()
    breaker, handler = make(clock, listener, up)
    for _ in range(4):
        await handler(c())
    up.code = "CANCELLED"
    await handler(c())
    assert breaker.state == CLOSED
    up.code = "UNAVAILABLE"
    await handler(c())
    assert breaker.state == OPEN


async def test_business_errors_are_successes_for_the_breaker(clock: FakeClock, listener: RecordingListener) -> None:
    up = Upstream("NOT_FOUND")
    breaker, handler = make(clock, listener, up)
    for _ in range(20):
        await handler(c())
    assert breaker.state == CLOSED


async def test_exceptions_escaping_the_stack_count_nothing_and_free_the_probe(clock: FakeClock) -> None:
    # The terminal maps every answer and transport failure to a Reply; an exception is the caller's
    # (a request or metadata grpc refused to send): it must not open the breaker for every caller.
    up = Upstream()
    breaker = CircuitBreaker(SVC, BreakerParams(consecutive_failures=2, recovery_time=60.0), clock=clock)
    raising = True

    async def inner(call: Call) -> Reply:
        if raising:
            raise RuntimeError("caller bug")
        return await up(call)

    handler = BreakerLayer(breaker).wrap(inner)
    for _ in range(5):
        with pytest.raises(RuntimeError):
            await handler(c())
    assert breaker.state == CLOSED
    raising = False
    for _ in range(2):
        await handler(c())
    assert breaker.state == OPEN
    clock.advance(60)
    raising = True
    with pytest.raises(RuntimeError):
        await handler(c())  # the one probe slot is taken, then freed by the exception
    raising, up.code = False, "OK"
    assert not (await handler(c())).local  # so the next call is admitted as the probe
    assert breaker.state == CLOSED


def test_failure_rate_mode(clock: FakeClock) -> None:
    def breaker() -> CircuitBreaker:
        return CircuitBreaker(SVC, BreakerParams(mode="failure_rate", failure_rate_threshold=50, window_size=10,
                                                 minimum_calls=6, consecutive_failures=2), clock=clock)

    def outcomes(b: CircuitBreaker, pattern: str) -> None:
        for ch in pattern:
            b.record(b.admit(), FAILURE if ch == "F" else SUCCESS)

    b = breaker()
    outcomes(b, "FFFFF")  # 100 %, but fewer than minimum_calls (and consecutive_failures is not used)
    assert b.state == CLOSED
    outcomes(b, "F")
    assert b.state == OPEN

    b = breaker()
    outcomes(b, "SSSSSSSSSS" "FFFF")  # the window is the last 10 calls: 4 failures = 40 %
    assert b.state == CLOSED
    outcomes(b, "F")  # 5 of the last 10 = 50 %
    assert b.state == OPEN


def test_failure_rate_minimum_clamped_to_the_window(clock: FakeClock) -> None:
    breaker = CircuitBreaker(SVC, BreakerParams(mode="failure_rate", window_size=4, minimum_calls=100), clock=clock)
    for _ in range(4):
        breaker.record(breaker.admit(), FAILURE)
    assert breaker.state == OPEN


def test_stale_outcomes_are_dropped(clock: FakeClock) -> None:
    breaker = CircuitBreaker(SVC, BreakerParams(consecutive_failures=1), clock=clock)
    slow = breaker.admit()  # admitted while CLOSED
    breaker.record(breaker.admit(), FAILURE)
    clock.advance(60)
    probe = breaker.admit()
    assert breaker.state == HALF_OPEN
    breaker.record(slow, SUCCESS)  # must not count as the probe's success
    assert breaker.state == HALF_OPEN
    breaker.record(probe, SUCCESS)
    assert breaker.state == CLOSED


async def test_operator_states_and_reset(clock: FakeClock, listener: RecordingListener) -> None:
    up = Upstream()
    breaker, handler = make(clock, listener, up)
    breaker.force_open()
    assert breaker.state == FORCED_OPEN
    reply = await handler(c())
    assert "Circuit breaker OPEN" in reply.details
    assert up.calls == 0
    clock.advance(3600)
    assert breaker.state == FORCED_OPEN  # no recovery from an operator's decision
    breaker.disable()
    for _ in range(10):
        assert not (await handler(c())).local
    assert breaker.state == DISABLED
    breaker.reset()
    assert breaker.state == CLOSED
    for _ in range(5):
        await handler(c())
    assert breaker.state == OPEN
    breaker.reset()
    assert breaker.state == CLOSED
    assert not (await handler(c())).local


def test_gauge_values(clock: FakeClock) -> None:
    assert (STATE_GAUGE[CLOSED], STATE_GAUGE[HALF_OPEN], STATE_GAUGE[OPEN]) == (0, 1, 2)
    breaker = CircuitBreaker(SVC, BreakerParams(consecutive_failures=1), clock=clock)
    assert breaker.gauge == 0
    breaker.record(breaker.admit(), FAILURE)
    assert breaker.gauge == 2
    clock.advance(60)
    assert breaker.gauge == 1


def test_params_from_spec() -> None:
    p = bind.breaker_params(CircuitBreakerSpec(consecutive_failures=3, recovery_time=10, half_open_max_calls=2,
                                                   first_probe=0.25))
    assert (p.consecutive_failures, p.recovery_time, p.half_open_max_calls, p.first_probe) == (3, 10, 2, 0.25)
    assert (p.probe_backoff.base, p.probe_backoff.cap) == (0.25, 10)
    assert bind.breaker_params(CircuitBreakerSpec()).first_probe == 1.0
    with pytest.raises(ValueError, match="recovery_time"):
        BreakerParams(recovery_time=0)
    with pytest.raises(ValueError, match="first_probe"):
        BreakerParams(first_probe=0)


def test_a_transient_outcome_resets_the_count_like_a_success(clock: FakeClock) -> None:
    # RESOURCE_EXHAUSTED retried on an idempotent route is load shedding, not a sick upstream.
    breaker = CircuitBreaker(SVC, BreakerParams(consecutive_failures=5), clock=clock)
    for outcome in [FAILURE] * 4 + [TRANSIENT] + [FAILURE] * 4:
        breaker.record(breaker.admit(), outcome, "UNAVAILABLE")
    assert breaker.state == CLOSED
    breaker.record(breaker.admit(), FAILURE, "UNAVAILABLE")
    assert breaker.state == OPEN
