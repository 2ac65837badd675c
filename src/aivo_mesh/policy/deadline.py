"""Deadline: one overall deadline per call; each attempt gets what remains.

The overall deadline is the smaller of the caller's timeout and the route's timeout. When the
caller is itself serving a request with a deadline (deadline propagation), that remaining time is
a third bound. Layers below (retry, back-off) read `call.deadline` and never outlive it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass

from aivo_mesh.policy.core import Call, Clock, Handler, LocalReason, Reply, monotonic, when_ended
from aivo_mesh.policy.events import PolicyListener


@dataclass(frozen=True, slots=True)
class DeadlineParams:
    route_timeout: float | None


def effective_timeout(caller: float | None, route: float | None, inherited: float | None) -> float | None:
    """The smallest of the given bounds (None = unbounded). On every call's path: no allocation."""
    best = caller
    if route is not None and (best is None or route < best):
        best = route
    if inherited is not None and (best is None or inherited < best):
        best = inherited
    return best


def attempt_timeout(call: Call, now: float, per_try: float | None) -> float | None:
    """Time the next attempt may take: what remains of the call, capped by the per-try timeout."""
    remaining = call.remaining(now)
    if per_try is None:
        return remaining
    return per_try if remaining is None else min(per_try, remaining)


class DeadlineLayer:
    """Sets `call.deadline` once; fails fast with DEADLINE_EXCEEDED when nothing remains.

    Being outermost, it is also where a logical call begins and ends: given a `listener`, it
    reports `call_started` and `call_finished` (code, seconds on the clock, attempts, local); a
    stream's when it ends.
    """

    name = "deadline"

    def __init__(
        self,
        params: DeadlineParams,
        inherited: Callable[[], float | None] | None = None,
        clock: Clock = monotonic,
        listener: PolicyListener | None = None,
    ) -> None:
        self.params = params
        self._inherited = inherited or (lambda: inherited_timeout(clock))
        self._from_inbound = inherited is None  # the default: read `inbound_deadline` inline (hot path)
        self._clock = clock
        self._listener = listener

    def wrap(self, inner: Handler) -> Handler:
        route_timeout, inherited, clock = self.params.route_timeout, self._inherited, self._clock
        listener = self._listener
        from_inbound, inbound = self._from_inbound, inbound_deadline

        def handle(call: Call) -> Awaitable[Reply]:
            # Not a coroutine: with nothing to do after the call, it hands back the inner layer's
            # awaitable, and the call's await chain is one frame shorter.
            now = clock()
            if from_inbound:
                d = inbound.get()
                left = None if d is None else d - now
            else:
                left = inherited()
            timeout = effective_timeout(call.timeout, route_timeout, left)
            if timeout is not None:
                if timeout <= 0:
                    return _passed()
                call.deadline = now + timeout
            return inner(call)

        if listener is None:
            return handle

        async def observed(call: Call) -> Reply:  # `handle` inlined: one frame less per call
            listener.call_started(call.service, call.method)
            start = clock()
            if from_inbound:
                d = inbound.get()
                left = None if d is None else d - start
            else:
                left = inherited()
            timeout = effective_timeout(call.timeout, route_timeout, left)
            try:
                if timeout is None:
                    reply = await inner(call)
                elif timeout <= 0:
                    reply = DEADLINE_PASSED
                else:
                    call.deadline = start + timeout
                    reply = await inner(call)
            except BaseException as e:
                cancelled = isinstance(e, asyncio.CancelledError)
                listener.call_finished(call.service, call.method, "CANCELLED" if cancelled else "UNKNOWN",
                                       clock() - start, call.attempt,
                                       LocalReason.CANCELLED if cancelled else LocalReason.ERROR)
                raise
            if reply.ended is None:
                listener.call_finished(call.service, call.method, reply.code, clock() - start, call.attempt,
                                       reply.local)
            else:  # a stream finishes when it ends, after all the time it was open
                when_ended(reply, lambda final: listener.call_finished(
                    call.service, call.method, final.code, clock() - start, call.attempt, final.local))
            return reply

        return observed


DEADLINE_PASSED = Reply("DEADLINE_EXCEEDED", details="deadline already passed", local=LocalReason.DEADLINE)


async def _passed() -> Reply:
    return DEADLINE_PASSED


# The absolute deadline (on `monotonic`) of the inbound request being served in this task, set by the
# server adapter so that a server calling another service passes on what remains of its own deadline.
inbound_deadline: ContextVar[float | None] = ContextVar("aivo_mesh_inbound_deadline", default=None)


def inherited_timeout(clock: Clock = monotonic) -> float | None:
    """Seconds left on the inbound request this task is serving, if any."""
    d = inbound_deadline.get()
    return None if d is None else d - clock()
