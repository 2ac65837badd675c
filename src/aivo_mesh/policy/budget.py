"""Retry budget: retries may add at most a fixed fraction of load to a target service.

Why a budget and not only max-attempts: with 3 retries per call, an upstream that fails everything
receives 4x its normal load exactly when it can least take it, and every caller up the chain
multiplies that again. A budget caps the extra load at `percent` of requests however many attempts a
route allows (Finagle's RetryBudget, tower's Budget, Linkerd's retryBudget, Envoy's retry_budget).

The rule (Envoy's, counted over a window as Finagle does). A retry is allowed iff

    retries in flight < max_concurrent_retries                (LimitsSpec.max_retries: a hard cap)
    and (   retries in flight < min_retry_concurrency         (a floor: a quiet service can retry)
         or retries in window + 1 <= percent/100 * requests in window)

The window is the last `window` seconds (RetryBudgetSpec.window, default 10 s) on the injected
clock, counted in `buckets` time buckets (default 10, so 1 s each): a request or retry counts for
between window - window/buckets and window seconds after it happened, then expires with its bucket.
Each operation is O(1) amortized (a bucket is cleared at most once per rotation).

Verbs (Finagle): `deposit()` once per logical call, `try_withdraw()` before each retry,
`release()` when that retry attempt ends, `balance` for introspection. One budget per target
service, shared by all its methods: the upstream's spare capacity is per service. Where no budget
applies, `UNLIMITED` (a null object with the same verbs) stands in, so the retry layer never checks
for None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from aivo_mesh.policy.core import Clock, monotonic


@dataclass(frozen=True, slots=True)
class RetryBudgetParams:
    percent: float = 25.0
    min_retry_concurrency: int = 3
    window: float = 10.0
    # Envoy's circuit_breakers.max_retries: never more retries than this in flight. None = no cap.
    max_concurrent_retries: int | None = None
    buckets: int = 10

    def __post_init__(self) -> None:
        if not 0.0 <= self.percent <= 100.0:
            raise ValueError(f"retry budget percent must be in [0, 100], got {self.percent!r}")
        if self.min_retry_concurrency < 0:
            raise ValueError(f"min_retry_concurrency must be >= 0, got {self.min_retry_concurrency!r}")
        if not self.window > 0:
            raise ValueError(f"retry budget window must be > 0 seconds, got {self.window!r}")
        if self.max_concurrent_retries is not None and self.max_concurrent_retries < 0:
            raise ValueError(f"max_concurrent_retries must be >= 0, got {self.max_concurrent_retries!r}")
        if self.buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {self.buckets!r}")


class Budget(Protocol):
    """What the retry layer needs of a budget: `RetryBudget`, or `UNLIMITED`."""

    def deposit(self) -> None: ...

    def try_withdraw(self) -> bool: ...

    def release(self) -> None: ...


class UnlimitedBudget:
    """The null budget: allows every retry (max_retries still bounds them) and counts nothing."""

    __slots__ = ()

    def deposit(self) -> None:
        pass

    def try_withdraw(self) -> bool:
        return True

    def release(self) -> None:
        pass


UNLIMITED = UnlimitedBudget()


class RetryBudget:
    __slots__ = ("_bucket_end", "_buckets", "_clock", "_epoch", "_idx", "_in_flight", "_inv_width",
                 "_max_in_flight", "_min_concurrency", "_percent", "_req", "_requests", "_ret", "_retries",
                 "_width", "params")

    def __init__(self, params: RetryBudgetParams = RetryBudgetParams(), clock: Clock = monotonic) -> None:
        self.params = params
        self._clock = clock
        n = params.buckets
        self._buckets = n
        self._inv_width = n / params.window
        self._width = params.window / n
        self._req = [0] * n
        self._ret = [0] * n
        self._requests = 0  # sum of _req
        self._retries = 0  # sum of _ret
        self._epoch = int(clock() * self._inv_width)
        self._idx = self._epoch % n
        self._bucket_end = (self._epoch + 1) * self._width  # the hot path compares floats only
        self._in_flight = 0
        self._percent = params.percent
        self._min_concurrency = params.min_retry_concurrency
        cap = params.max_concurrent_retries
        self._max_in_flight = 1 << 62 if cap is None else cap

    # -- the verbs ----------------------------------------------------------------------------
    def deposit(self) -> None:
        """Count one logical call (once, however many attempts it makes)."""
        now = self._clock()
        if now >= self._bucket_end:
            self._roll(int(now * self._inv_width))
        self._req[self._idx] += 1
        self._requests += 1

    def try_withdraw(self) -> bool:
        """Reserve one retry; True if the budget allows it. Pair every True with one `release()`."""
        if self._in_flight >= self._max_in_flight:
            return False
        now = self._clock()
        if now >= self._bucket_end:
            self._roll(int(now * self._inv_width))
        if self._in_flight < self._min_concurrency or (self._retries + 1) * 100 <= self._percent * self._requests:
            self._ret[self._idx] += 1
            self._retries += 1
            self._in_flight += 1
            return True
        return False

    def release(self) -> None:
        """A retry attempt reserved by `try_withdraw` has finished (in any way)."""
        if self._in_flight > 0:
            self._in_flight -= 1

    # -- introspection ------------------------------------------------------------------------
    @property
    def balance(self) -> int:
        """Retries the percentage rule would still allow now (the concurrency floor aside)."""
        self._refresh()
        return max(0, int(self._percent * self._requests // 100) - self._retries)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def requests(self) -> int:
        """Logical calls counted in the current window."""
        self._refresh()
        return self._requests

    @property
    def retries(self) -> int:
        """Retries counted in the current window."""
        self._refresh()
        return self._retries

    # -- the window ---------------------------------------------------------------------------
    def _refresh(self) -> None:
        now = self._clock()
        if now >= self._bucket_end:
            self._roll(int(now * self._inv_width))

    def _roll(self, epoch: int) -> None:
        """Move to bucket `epoch`, expiring the buckets that left the window."""
        n = self._buckets
        steps = epoch - self._epoch
        req, ret = self._req, self._ret
        if steps <= 0:  # float rounding at a bucket edge: same bucket
            self._bucket_end = (self._epoch + 1) * self._width
            return
        if steps >= n:  # the whole window expired
            for i in range(n):
                req[i] = ret[i] = 0
            self._requests = self._retries = 0
        else:
            idx = self._idx
            for _ in range(steps):
                idx = idx + 1 if idx + 1 < n else 0
                self._requests -= req[idx]
                self._retries -= ret[idx]
                req[idx] = ret[idx] = 0
        self._epoch = epoch
        self._idx = epoch % n
        self._bucket_end = (epoch + 1) * self._width
