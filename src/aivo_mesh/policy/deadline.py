"""Deadline: one overall deadline per call; each attempt gets what remains.

The overall deadline is the smaller of the caller's timeout and the route's timeout. When the
caller is itself serving a request with a deadline (deadline propagation), that remaining time is
a third bound. Layers below (retry, back-off) read `call.deadline` and never outlive it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

from aivo_mesh.policy.core import Call, Clock, Handler, Reply, monotonic


@dataclass(frozen=True, slots=True)
class DeadlineParams:
    route_timeout: float | None
    per_try_timeout: float | None = None


def effective_timeout(caller: float | None, route: float | None, inherited: float | None) -> float | None:
    """The smallest of the given bounds (None = unbounded)."""
    bounds = [b for b in (caller, route, inherited) if b is not None]
    return min(bounds) if bounds else None


def attempt_timeout(call: Call, now: float, per_try: float | None) -> float | None:
    """Time the next attempt may take: what remains of the call, capped by the per-try timeout."""
    remaining = call.remaining(now)
    if per_try is None:
        return remaining
    return per_try if remaining is None else min(per_try, remaining)


class DeadlineLayer:
    """Sets `call.deadline` once; fails fast with DEADLINE_EXCEEDED when nothing remains."""

    name = "deadline"

    def __init__(
        self,
        params_for: Callable[[Call], DeadlineParams],
        inherited: Callable[[], float | None] | None = None,
        clock: Clock = monotonic,
    ) -> None:
        self._params_for = params_for
        self._inherited = inherited or (lambda: inherited_timeout(clock))
        self._clock = clock

    def wrap(self, inner: Handler) -> Handler:
        params_for, inherited, clock = self._params_for, self._inherited, self._clock

        async def handle(call: Call) -> Reply:
            now = clock()
            timeout = effective_timeout(call.timeout, params_for(call).route_timeout, inherited())
            if timeout is not None:
                if timeout <= 0:
                    return Reply("DEADLINE_EXCEEDED", details="deadline already passed", local=True)
                call.deadline = now + timeout
            return await inner(call)

        return handle


# The absolute deadline (on `monotonic`) of the inbound request being served in this task, set by the
# server adapter so that a server calling another service passes on what remains of its own deadline.
inbound_deadline: ContextVar[float | None] = ContextVar("aivo_mesh_inbound_deadline", default=None)


def inherited_timeout(clock: Clock = monotonic) -> float | None:
    """Seconds left on the inbound request this task is serving, if any."""
    d = inbound_deadline.get()
    return None if d is None else d - clock()
