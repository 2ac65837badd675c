"""Back-off: how long to wait before retry n, and what the server's pushback says.

Why full jitter: when an upstream hiccups, every client that saw the failure retries. Exponential
waits without jitter bunch those retries into synchronized waves; full jitter
`uniform(0, min(cap, base * 2**(n-1)))` spreads them over the whole interval and does the least
total work under contention (gRFC A6, which grpcio implements, and the AWS architecture blog
"Exponential Backoff and Jitter"). Decorrelated jitter `min(cap, uniform(base, previous * 3))` is
offered for callers waiting on a resource that is down rather than contended. Equal jitter
`uniform(c / 2, c)` with the same ceiling c is for a wait that must not shrink towards zero: the
circuit breaker's wait before its next probe (breaker.py), where an immediate probe would defeat
the point of opening, yet many clients that opened together must not probe together.

Back-offs are frozen values shared by thousands of concurrent calls: the retry number and the
previous delay live in the call's retry state, and the RNG is passed in (seeded in tests).

Pushback (gRFC A6): a `grpc-retry-pushback-ms` trailer of n >= 0 means "retry after exactly n ms";
a negative or unparsable value means "do not retry".
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from random import Random
from typing import Literal, Protocol

PUSHBACK_HEADER = "grpc-retry-pushback-ms"
_MAX_EXPONENT = 62  # 2**62 * any sane base is far above any cap; avoids float overflow


class Backoff(Protocol):
    def delay(self, retry: int, previous: float, rng: Random) -> float:
        """Seconds to wait before retry number `retry` (1-based); `previous` is the last wait (0 at first)."""
        ...


def _ceiling(base: float, cap: float, n: int) -> float:
    """`min(cap, base * 2**(n-1))`: the exponential ceiling shared by full and equal jitter."""
    exponent = min(max(n - 1, 0), _MAX_EXPONENT)
    return min(cap, base * float(1 << exponent))


def _check(base: float, cap: float) -> None:
    if not base > 0:
        raise ValueError(f"back-off base must be > 0 seconds, got {base!r}")
    if not cap >= base:
        raise ValueError(f"back-off cap must be >= base ({base}s), got {cap!r}")


@dataclass(frozen=True, slots=True)
class FullJitter:
    """`uniform(0, min(cap, base * 2**(n-1)))` for retry n (A6 / AWS full jitter). Pick for contention."""

    base: float = 0.1
    cap: float = 1.0

    def __post_init__(self) -> None:
        _check(self.base, self.cap)

    def ceiling(self, retry: int) -> float:
        """The upper bound of the wait before retry `retry`."""
        return _ceiling(self.base, self.cap, retry)

    def delay(self, retry: int, previous: float, rng: Random) -> float:
        return rng.uniform(0.0, self.ceiling(retry))


@dataclass(frozen=True, slots=True)
class DecorrelatedJitter:
    """`min(cap, uniform(base, previous * 3))` (AWS decorrelated jitter). Pick for a resource that is down."""

    base: float = 0.1
    cap: float = 1.0

    def __post_init__(self) -> None:
        _check(self.base, self.cap)

    def delay(self, retry: int, previous: float, rng: Random) -> float:
        upper = max(self.base, previous * 3.0)
        return min(self.cap, rng.uniform(self.base, upper))


@dataclass(frozen=True, slots=True)
class EqualJitter:
    """`uniform(c / 2, c)`, c = `min(cap, base * 2**(n-1))` (AWS equal jitter). Pick when the wait has
    a floor: never below half the ceiling, never above `cap`."""

    base: float = 1.0
    cap: float = 60.0

    def __post_init__(self) -> None:
        _check(self.base, self.cap)

    def ceiling(self, n: int) -> float:
        return _ceiling(self.base, self.cap, n)

    def delay(self, retry: int, previous: float, rng: Random) -> float:
        c = self.ceiling(retry)
        return rng.uniform(c / 2.0, c)


class Pushback(enum.Enum):
    STOP = "stop"


STOP: Literal[Pushback.STOP] = Pushback.STOP


def parse_pushback(trailers: Iterable[tuple[str, str | bytes]]) -> float | Literal[Pushback.STOP] | None:
    """Seconds the server asks us to wait, `STOP` (do not retry), or None (no pushback: back off).

    Only a plain decimal integer of milliseconds is valid; "-1", "1.5", "soon" all mean STOP.
    The first occurrence wins.
    """
    for key, value in trailers:
        if key.lower() != PUSHBACK_HEADER:
            continue
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        text = text.strip()
        if text.isascii() and text.isdigit():
            return int(text) / 1000.0
        return STOP
    return None
