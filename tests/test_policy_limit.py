"""limit.py: max_requests active, a FIFO queue of max_pending_requests, then UNAVAILABLE (as Envoy's overflow)."""

from __future__ import annotations

import asyncio

import pytest

from aivo_mesh.config.model import LimitsSpec
from aivo_mesh.policy import bind
from aivo_mesh.policy.core import Call, Handler, LocalReason, Reply
from aivo_mesh.policy.limit import ConcurrencyLimit, LimitLayer, LimitParams
from aivo_mesh.policy.testing import FakeClock, RecordingListener

SVC, METHOD = "auth-svc", "/aivo.auth.v1.AuthService/ValidateToken"


class Gated:
    """An upstream whose calls wait until released one by one; records the order calls started."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}

    async def __call__(self, call: Call) -> Reply:
        name = str(call.request)
        self.started.append(name)
        gate = self.gates.setdefault(name, asyncio.Event())
        await gate.wait()
        return Reply("OK", value=name)

    def release(self, name: str) -> None:
        self.gates.setdefault(name, asyncio.Event()).set()


def setup(max_requests: int, max_pending: int) -> tuple[ConcurrencyLimit, Handler, Gated, RecordingListener,
                                                         FakeClock]:
    clock, listener, up = FakeClock(), RecordingListener(), Gated()
    limit = ConcurrencyLimit(SVC, LimitParams(max_requests=max_requests, max_pending_requests=max_pending))
    return limit, LimitLayer(limit, clock=clock, listener=listener).wrap(up), up, listener, clock


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_max_requests_pending_queue_and_overflow() -> None:
    limit, handler, up, listener, _ = setup(max_requests=2, max_pending=1)
    tasks = [asyncio.ensure_future(handler(Call(SVC, METHOD, name))) for name in ("a", "b", "c")]
    await settle()
    assert up.started == ["a", "b"]
    assert (limit.active, limit.pending) == (2, 1)
    overflow = await handler(Call(SVC, METHOD, "d"))
    assert (overflow.code, overflow.local) == ("UNAVAILABLE", LocalReason.MAX_PENDING_REQUESTS)
    assert "max_pending_requests" in overflow.details
    assert listener.named("limit_rejected") == [(SVC, METHOD, "max_pending_requests")]
    up.release("a")
    await settle()
    assert up.started == ["a", "b", "c"]  # the waiter got a's slot
    for name in ("b", "c"):
        up.release(name)
    assert [(await t).value for t in tasks] == ["a", "b", "c"]
    assert (limit.active, limit.pending) == (0, 0)


async def test_waiters_are_served_in_fifo_order_and_newcomers_queue_behind() -> None:
    limit, handler, up, _, _ = setup(max_requests=1, max_pending=3)
    tasks = [asyncio.ensure_future(handler(Call(SVC, METHOD, name))) for name in ("a", "b", "c", "d")]
    await settle()
    for name in ("a", "b", "c", "d"):
        up.release(name)
        await settle()
    await asyncio.gather(*tasks)
    assert up.started == ["a", "b", "c", "d"]
    assert limit.active == 0


async def test_no_queue_rejects_at_once() -> None:
    _limit, handler, up, _, _ = setup(max_requests=1, max_pending=0)
    first = asyncio.ensure_future(handler(Call(SVC, METHOD, "a")))
    await settle()
    reply = await handler(Call(SVC, METHOD, "b"))
    assert reply.code == "UNAVAILABLE"
    up.release("a")
    await first


async def test_waiting_respects_the_deadline() -> None:
    limit, handler, up, listener, clock = setup(max_requests=1, max_pending=5)
    first = asyncio.ensure_future(handler(Call(SVC, METHOD, "a")))
    await settle()
    passed = await handler(Call(SVC, METHOD, "late", deadline=clock() - 1.0))
    assert (passed.code, passed.local) == ("DEADLINE_EXCEEDED", LocalReason.MAX_REQUESTS)
    # A short real wait (the queue uses a loop timer): the slot never frees in time.
    short = await handler(Call(SVC, METHOD, "short", deadline=clock() + 0.01))
    assert (short.code, short.local) == ("DEADLINE_EXCEEDED", LocalReason.MAX_REQUESTS)
    assert "waiting for a request slot" in short.details
    assert limit.pending == 0
    assert [e[2] for e in listener.named("limit_rejected")] == ["max_requests", "max_requests"]
    up.release("a")
    await first
    assert limit.active == 0


async def test_cancelled_waiter_leaves_the_queue_and_cancelled_holder_frees_its_slot() -> None:
    limit, handler, up, _, _ = setup(max_requests=1, max_pending=2)
    holder = asyncio.ensure_future(handler(Call(SVC, METHOD, "a")))
    waiter = asyncio.ensure_future(handler(Call(SVC, METHOD, "b")))
    await settle()
    assert limit.pending == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limit.pending == 0
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    assert limit.active == 0
    up.release("c")
    assert (await handler(Call(SVC, METHOD, "c"))).ok


async def test_slot_handed_over_to_a_waiter_cancelled_before_it_ran_is_passed_on() -> None:
    limit = ConcurrencyLimit(SVC, LimitParams(max_requests=1, max_pending_requests=2))
    assert limit.try_acquire()
    first = asyncio.create_task(limit.acquire(None))
    second = asyncio.create_task(limit.acquire(None))
    await settle()
    limit.release()  # hands the slot to `first` ...
    first.cancel()  # ... which is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second  # the slot went on to the next waiter
    assert limit.active == 1
    limit.release()
    assert limit.active == 0


def test_params_from_spec() -> None:
    p = bind.limit_params(LimitsSpec(max_requests=7, max_pending_requests=1))
    assert (p.max_requests, p.max_pending_requests) == (7, 1)
    with pytest.raises(ValueError, match="max_requests"):
        LimitParams(max_requests=0)
