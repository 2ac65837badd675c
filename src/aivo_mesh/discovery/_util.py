"""Small pieces the sources share: a token bucket and a daemon-thread runner.

Their jittered back-off is the policy core's `EqualJitter` (policy/backoff.py). The bucket's rule is a
pure function of clock readings, so it tests without sleeping; only `TokenBucket.acquire` and
`in_daemon_thread` touch the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up. `take()` consumes a token and returns how
    long the caller must wait for it (0.0 if one was available)."""

    def __init__(self, rate: float, burst: int = 2, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("TokenBucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def take(self) -> float:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    async def acquire(self) -> None:
        delay = self.take()
        if delay > 0:
            await asyncio.sleep(delay)


async def in_daemon_thread(fn: Callable[..., T], /, *args: object, **kwargs: object) -> T:
    """Run a blocking call in a fresh daemon thread and await its result.

    Not `asyncio.to_thread`: a Consul blocking query may sit in its thread for `wait` (30 s or more)
    and the default executor is joined when the loop shuts down, so cancelling the watch would still
    hold up `asyncio.run()` (and a test's teardown) until the query returned. A daemon thread is
    simply abandoned; its late result is dropped.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: object) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)  # type: ignore[arg-type]
        else:
            assert isinstance(value, BaseException)
            fut.set_exception(value)

    def run() -> None:
        try:
            result: object = fn(*args, **kwargs)
            ok = True
        except BaseException as e:
            result, ok = e, False
        with contextlib.suppress(RuntimeError):  # loop closed meanwhile: nobody wants the result
            loop.call_soon_threadsafe(deliver, ok, result)

    threading.Thread(target=run, name=f"discovery-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return await fut
