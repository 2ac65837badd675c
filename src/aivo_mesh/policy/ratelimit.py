"""Inbound rate limits: token buckets with the semantics of Envoy's local rate limit filter.

Why a token bucket: it allows short bursts (`burst` calls at once, after a quiet spell) while holding the
long-run rate to `rate` calls a second, and it needs no queue: a call either takes a token now or is
refused at once with the time until the next one (the caller's `grpc-retry-pushback-ms`).

The bucket is Envoy's (its AtomicTokenBucket, which the local rate limit filter uses): it starts full
(`burst` tokens, Envoy's `max_tokens`), refills continuously at `rate` tokens a second (Envoy's
`tokens_per_fill / fill_interval`, rendered as `rate` per 1 s) and never holds more than `burst`. A call
takes one token. So on both planes, N+k calls at once from one caller into a full bucket of N get exactly
k refusals, and after t seconds `rate * t` more calls pass.

Which bucket a call takes from: the caller's own when its scope gives it one (mesh.yaml `per_caller`,
`callers`), else the scope's shared bucket; a scope is a route with a block of its own, or the service's
block for every other method (which scope a method is in is the server's to say, from mesh.yaml: see
server/ratelimit.py). `RateLimiter.update` keeps the state of every bucket whose size did not change, so
a configuration push that leaves a limit alone does not refill it.

Pure: no grpc, the clock injected.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from aivo_mesh.policy.core import Clock, monotonic

# Tokens are counted in floats: a refill of `rate * elapsed` need not land on a whole number. A token
# short of 1 by less than this is a whole token (float error, not a real shortfall).
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class BucketParams:
    """`rate` tokens a second, refilled continuously, up to `burst` (Envoy's max_tokens)."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if not self.rate > 0 or self.burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got {self.rate!r}, {self.burst!r}")


@dataclass(frozen=True, slots=True)
class RateLimitParams:
    """The buckets of one scope (a route with a block of its own, or None: the service's block): each of
    `callers` (SPIFFE IDs) has its own, every other caller takes from `shared`."""

    scope: str | None
    shared: BucketParams
    callers: tuple[tuple[str, BucketParams], ...] = ()


class TokenBucket:
    """One bucket: `take(now)` takes a token if there is one."""

    __slots__ = ("params", "tokens", "updated")

    def __init__(self, params: BucketParams, now: float) -> None:
        self.params = params
        self.tokens = float(params.burst)  # starts full, as Envoy's
        self.updated = now

    def take(self, now: float) -> float:
        """0.0 when a token was taken; else the seconds until the next token (> 0), nothing taken."""
        if now > self.updated:
            self.tokens = min(float(self.params.burst), self.tokens + (now - self.updated) * self.params.rate)
            self.updated = now
        if self.tokens >= 1.0 - _EPSILON:
            self.tokens = max(0.0, self.tokens - 1.0)
            return 0.0
        return (1.0 - self.tokens) / self.params.rate


@dataclass(frozen=True, slots=True)
class Limited:
    """A refused call: the scope and bucket that refused it, and when its next token comes."""

    scope: str | None
    caller: str | None  # the caller whose own bucket was empty; None: the scope's shared bucket
    retry_after: float  # seconds

    @property
    def pushback_ms(self) -> int:
        """`grpc-retry-pushback-ms`: whole milliseconds, rounded up (never 0: a token is not there yet)."""
        return max(1, math.ceil(self.retry_after * 1000 - _EPSILON))


_SHARED = ""  # the key of a scope's shared bucket (callers are SPIFFE IDs, never empty)


class RateLimiter:
    """Every bucket of one server, by scope: `admit(params, caller)` -> None (admitted) or Limited."""

    def __init__(self, scopes: Iterable[RateLimitParams] = (), *, clock: Clock = monotonic) -> None:
        self.clock = clock
        self.scopes: dict[str | None, RateLimitParams] = {}
        self._own: dict[str | None, frozenset[str]] = {}
        self._buckets: dict[tuple[str | None, str], TokenBucket] = {}
        self.update(scopes)

    def update(self, scopes: Iterable[RateLimitParams]) -> bool:
        """Apply new scopes from the next call on; True if they differ from those in force. A bucket whose
        scope, caller and size are unchanged keeps its tokens; a new or resized one starts full (as a new
        Envoy configuration's do); the buckets of a scope that is gone are dropped."""
        new = {p.scope: p for p in scopes}
        if new == self.scopes:
            return False
        now = self.clock()
        buckets: dict[tuple[str | None, str], TokenBucket] = {}
        for scope, p in new.items():
            for caller, size in ((_SHARED, p.shared), *p.callers):
                old = self._buckets.get((scope, caller))
                buckets[scope, caller] = old if old is not None and old.params == size else TokenBucket(size, now)
        self._own = {scope: frozenset(c for c, _ in p.callers) for scope, p in new.items()}
        self._buckets = buckets
        self.scopes = new
        return True

    def admit(self, scope: str | None, caller: str | None) -> Limited | None:
        """Take a token of `scope` (one of those in force) for a call by `caller` (a SPIFFE ID; None when
        the caller has no identity: the shared bucket)."""
        key = caller if caller is not None and caller in self._own[scope] else _SHARED
        wait = self._buckets[scope, key].take(self.clock())
        return None if wait == 0.0 else Limited(scope, key or None, wait)
