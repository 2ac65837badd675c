"""Concurrency limit: at most `max_requests` calls in flight to a target, a short FIFO queue behind.

Why: without a cap, a slow upstream turns into unbounded in-flight calls in the caller (memory,
sockets, and a thundering herd when it recovers). These are Envoy's `circuit_breakers.thresholds`
for one cluster, applied in the client: `max_requests` active calls; up to `max_pending_requests`
more wait in FIFO order for a slot; beyond that a call fails at once with a local
UNAVAILABLE (load shedding, tower's LoadShed) instead of queueing without end. UNAVAILABLE, not
RESOURCE_EXHAUSTED: it is what an Envoy sidecar answers on the same overflow (503, flag UO) and what
gRPC's own xDS client fails such a call with (gRFC A32: dropped with UNAVAILABLE, never retried), so a
caller sees one status whichever plane is in between (docs/planes.md). It is not retried here either:
the slot is taken outside the retry layer.

A slot is held for the life of the logical call, released in `finally` (cancellation included),
and handed directly to the oldest waiter, so a newcomer can never overtake the queue. Waiting
counts against the call's deadline: a waiter whose deadline passes leaves with a local
DEADLINE_EXCEEDED. The wait is a loop timer set to the remaining time on the injected clock (the
two agree in production, where the clock is time.monotonic like the event loop's).
`max_connections` has no meaning here (grpc multiplexes calls over one HTTP/2 connection per endpoint).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass

from aivo_mesh.policy.core import Call, Clock, Handler, LocalReason, Reply, monotonic
from aivo_mesh.policy.events import NOOP, PolicyListener

MAX_REQUESTS = str(LocalReason.MAX_REQUESTS)
MAX_PENDING_REQUESTS = str(LocalReason.MAX_PENDING_REQUESTS)


@dataclass(frozen=True, slots=True)
class LimitParams:
    max_requests: int = 1000
    max_pending_requests: int = 100

    def __post_init__(self) -> None:
        if self.max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {self.max_requests!r}")
        if self.max_pending_requests < 0:
            raise ValueError(f"max_pending_requests must be >= 0, got {self.max_pending_requests!r}")


def _expire(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)


class ConcurrencyLimit:
    """The slots of one target service. `try_acquire` / `acquire` then exactly one `release`."""

    __slots__ = ("_waiters", "active", "params", "service")

    def __init__(self, service: str, params: LimitParams = LimitParams()) -> None:
        self.service = service
        self.params = params
        self.active = 0
        self._waiters: deque[asyncio.Future[bool]] = deque()

    @property
    def pending(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a free slot now, unless others are already queued for one (FIFO)."""
        if self.active < self.params.max_requests and not self._waiters:
            self.active += 1
            return True
        return False

    def can_queue(self) -> bool:
        return len(self._waiters) < self.params.max_pending_requests

    async def acquire(self, timeout: float | None) -> bool:
        """Wait in FIFO order for a slot, at most `timeout` seconds (None: no bound). False on timeout."""
        if self.try_acquire():
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(fut)
        timer = loop.call_later(timeout, _expire, fut) if timeout is not None else None
        try:
            granted = await fut
        except BaseException:  # cancelled while waiting, maybe just after a slot was handed over
            if fut.done() and not fut.cancelled() and fut.result():
                self.release()
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if not (fut.done() and not fut.cancelled() and fut.result()):
                self._discard(fut)
        return granted

    def release(self) -> None:
        """Free a slot: hand it to the oldest live waiter, or return it to the pool."""
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(True)  # the slot moves to the waiter; `active` is unchanged
                return
        self.active -= 1

    def _discard(self, fut: asyncio.Future[bool]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)


class LimitLayer:
    """Admits a logical call into a slot (waiting if allowed), holds it across retries."""

    name = "limit"

    def __init__(self, limit: ConcurrencyLimit, *, clock: Clock = monotonic,
                 listener: PolicyListener = NOOP) -> None:
        self.limit = limit
        self.clock = clock
        self.listener = listener

    def wrap(self, inner: Handler) -> Handler:
        limit, clock, listener = self.limit, self.clock, self.listener
        p = limit.params
        full = Reply("UNAVAILABLE", local=LocalReason.MAX_PENDING_REQUESTS, details=(
            f"{limit.service}: {p.max_requests} requests in flight and {p.max_pending_requests} waiting "
            f"(max_requests={p.max_requests}, max_pending_requests={p.max_pending_requests})"))
        timed_out = Reply("DEADLINE_EXCEEDED", local=LocalReason.MAX_REQUESTS, details=(
            f"{limit.service}: deadline exceeded waiting for a request slot (max_requests={p.max_requests})"))

        async def handle(call: Call) -> Reply:
            if not limit.try_acquire():
                if not limit.can_queue():
                    listener.limit_rejected(call.service, call.method, MAX_PENDING_REQUESTS)
                    return full
                remaining = call.remaining(clock())
                if (remaining is not None and remaining <= 0) or not await limit.acquire(remaining):
                    listener.limit_rejected(call.service, call.method, MAX_REQUESTS)
                    return timed_out
            try:
                reply = await inner(call)
            except BaseException:
                limit.release()
                raise
            if reply.ended is None:
                limit.release()
            else:  # a stream holds its slot until it ends
                reply.ended.add_done_callback(lambda _: limit.release())
            return reply

        return handle
