"""Fakes for testing code built on the policy core: a clock you move, a sleep that moves it, a recorder.

With these, a 60 s breaker recovery or a back-off schedule is tested in microseconds and
deterministically (the style of Finagle's `nowMillis` and tenacity's `sleep=` argument).
"""

from __future__ import annotations

import asyncio

from aivo_mesh.policy.core import LocalReason
from aivo_mesh.policy.events import PolicyListener


class FakeClock:
    """Monotonic seconds that only move when told to."""

    __slots__ = ("now",)

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self.now += seconds


class FakeSleep:
    """An async sleep that advances `clock` by the requested time and records it.

    It still yields to the event loop once, so cancellation and other tasks behave as with a real sleep.
    """

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.clock.advance(max(seconds, 0.0))
        await asyncio.sleep(0)


class RecordingListener(PolicyListener):
    """Records every event as a tuple `(event, *args)` in `events`."""

    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def named(self, event: str) -> list[tuple[object, ...]]:
        return [e[1:] for e in self.events if e[0] == event]

    def call_started(self, service: str, method: str) -> None:
        self.events.append(("call_started", service, method))

    def call_finished(self, service: str, method: str, code: str, seconds: float, attempts: int,
                      local: LocalReason | None) -> None:
        self.events.append(("call_finished", service, method, code, seconds, attempts, local))

    def retry(self, service: str, method: str, attempt: int, code: str, delay: float) -> None:
        self.events.append(("retry", service, method, attempt, code, delay))

    def retry_budget_exhausted(self, service: str, method: str) -> None:
        self.events.append(("retry_budget_exhausted", service, method))

    def breaker_state(self, service: str, old: str, new: str) -> None:
        self.events.append(("breaker_state", service, old, new))

    def breaker_failure(self, service: str, code: str) -> None:
        self.events.append(("breaker_failure", service, code))

    def breaker_rejected(self, service: str, method: str) -> None:
        self.events.append(("breaker_rejected", service, method))

    def limit_rejected(self, service: str, method: str, limit: str) -> None:
        self.events.append(("limit_rejected", service, method, limit))

    def endpoint_ejected(self, service: str, endpoint: str, seconds: float) -> None:
        self.events.append(("endpoint_ejected", service, endpoint, seconds))

    def endpoint_restored(self, service: str, endpoint: str) -> None:
        self.events.append(("endpoint_restored", service, endpoint))
