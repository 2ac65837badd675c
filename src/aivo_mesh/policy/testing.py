"""Fakes for testing code built on the policy core: a clock you move and a sleep that moves it.

With these, a 60 s breaker recovery or a back-off schedule is tested in microseconds and
deterministically (the style of Finagle's `nowMillis` and tenacity's `sleep=` argument).
"""

from __future__ import annotations

import asyncio


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
