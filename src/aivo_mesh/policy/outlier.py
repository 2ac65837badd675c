"""Outlier detection: take one bad endpoint out of rotation while its peers keep serving.

Why per endpoint: the breaker (breaker.py) judges a whole service, which is right when the
service is down, but one crashed or overloaded replica among healthy ones must not open it. This
is Envoy's passive outlier detection (`consecutive_5xx`) and Finagle's failure accrual: a rule
object says *whether and for how long* to eject; the machine (`OutlierDetector`) keeps the
per-endpoint counters and the ejections.

Rule (OutlierRule, from OutlierDetectionSpec):
  - `consecutive_failures` FAILURE/RETRYABLE outcomes in a row on an endpoint eject it
    (a SUCCESS or TRANSIENT resets the count; IGNORED outcomes never count);
  - for `base_ejection_time * times_ejected`, capped by max(max_ejection_time, base_ejection_time)
    (Envoy); `times_ejected` decays by one per `interval` the endpoint spends back in rotation, so a
    repeat offender stays out longer and a recovered one is forgiven. It stops growing at
    ceil(cap / base) + 1, where Envoy's multiplier stops, so both forgive a long offender alike.
    With mesh.yaml's defaults (1 s, 60 s, interval 1 s): 1, 2, 3, ... 60 s for an endpoint that
    fails again as soon as it returns, each second back in rotation forgiving one ejection;
  - never more than floor(max_ejection_percent * endpoints / 100) ejected at once (so 50 % of 2
    endpoints = 1 may be ejected; 10 % of 2 = 0: none);
  - an ejected endpoint returns when its time has passed (checked lazily, on the next pick or
    snapshot: no timers).

A new rule (a live policy change, `OutlierDetector.set_rule`) applies from the next failure; the
endpoints keep their failure runs, ejection counts and ejections (see there for the two exceptions).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from aivo_mesh.policy.core import Clock, monotonic
from aivo_mesh.policy.events import NOOP, PolicyListener


@dataclass(frozen=True, slots=True)
class OutlierRule:
    consecutive_failures: int = 5
    interval: float = 1.0
    base_ejection_time: float = 1.0
    max_ejection_time: float = 60.0
    max_ejection_percent: float = 50.0

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError(f"consecutive_failures must be >= 1, got {self.consecutive_failures!r}")
        if not (self.interval > 0 and self.base_ejection_time > 0 and self.max_ejection_time > 0):
            raise ValueError("interval, base_ejection_time and max_ejection_time must be > 0 seconds")
        if not 0.0 <= self.max_ejection_percent <= 100.0:
            raise ValueError(f"max_ejection_percent must be in [0, 100], got {self.max_ejection_percent!r}")

    def ejection_time(self, times_ejected: int) -> float:
        """Seconds out of rotation for the `times_ejected`-th ejection in a row."""
        cap = max(self.max_ejection_time, self.base_ejection_time)
        return min(cap, self.base_ejection_time * max(times_ejected, 1))

    def max_ejected(self, endpoints: int) -> int:
        """How many of `endpoints` may be ejected at once: floor(percent * n / 100)."""
        return math.floor(self.max_ejection_percent * endpoints / 100.0 + 1e-9)

    @property
    def max_times(self) -> int:
        """Where `times_ejected` stops: Envoy counts while times * base < max + base (ejectHost)."""
        cap = max(self.max_ejection_time, self.base_ejection_time)
        return math.ceil(cap / self.base_ejection_time - 1e-9) + 1

    def next_times(self, ep: EndpointState, now: float) -> int:
        """`ep.times_ejected` if ejected now: one more, after forgiving one per `interval` in rotation."""
        times = ep.times_ejected
        if times and ep.restored_at is not None:
            times = max(0, times - int((now - ep.restored_at) / self.interval))
        return min(times + 1, self.max_times)

    def on_failure(self, ep: EndpointState, now: float, ejected: int, endpoints: int) -> float | None:
        """After a counted failure on `ep`: seconds to eject it for, or None to keep it."""
        if ep.consecutive_failures < self.consecutive_failures or ejected + 1 > self.max_ejected(endpoints):
            return None
        return self.ejection_time(self.next_times(ep, now))


DEFAULT_RULE = OutlierRule()


class EndpointState:
    """What the balancer and outlier detection know about one endpoint ("host:port")."""

    __slots__ = ("address", "check_streak", "consecutive_failures", "ejected_until", "healthy", "removed",
                 "restored_at", "times_ejected")

    def __init__(self, address: str) -> None:
        self.address = address
        self.healthy = True  # set by health checks
        self.check_streak = 0  # health checks in a row: > 0 passed, < 0 failed
        self.consecutive_failures = 0
        self.ejected_until: float | None = None
        self.times_ejected = 0
        self.restored_at: float | None = None
        self.removed = False  # dropped by discovery while calls to it were in flight

    @property
    def ejected(self) -> bool:
        return self.ejected_until is not None

    @property
    def eligible(self) -> bool:
        return self.healthy and self.ejected_until is None

    def as_dict(self) -> dict[str, object]:
        return {"endpoint": self.address, "healthy": self.healthy, "ejected": self.ejected,
                "ejected_until": self.ejected_until, "consecutive_failures": self.consecutive_failures,
                "times_ejected": self.times_ejected}


class OutlierDetector:
    """The ejection machine over one target's endpoints (the pool is the balancer's list)."""

    __slots__ = ("_clock", "_listener", "ejected", "next_expiry", "rule", "service")

    def __init__(self, service: str, rule: OutlierRule | None = None, *, clock: Clock = monotonic,
                 listener: PolicyListener = NOOP) -> None:
        self.service = service
        self.rule = rule  # None: outlier detection off
        self._clock = clock
        self._listener = listener
        self.ejected = 0  # endpoints of the pool ejected now
        self.next_expiry = math.inf  # earliest ejected_until among them

    def on_failure(self, ep: EndpointState, pool: Sequence[EndpointState]) -> bool:
        """Count a failure on `ep`; True if that ejected it."""
        if ep.removed or ep.ejected_until is not None or self.rule is None:
            return False
        ep.consecutive_failures += 1
        if ep.consecutive_failures < self.rule.consecutive_failures:
            return False
        now = self._clock()
        self.sweep(pool, now)  # expired ejections must not count against max_ejection_percent
        seconds = self.rule.on_failure(ep, now, self.ejected, len(pool))
        if seconds is None:
            return False
        ep.times_ejected = self.rule.next_times(ep, now)
        ep.ejected_until = now + seconds
        ep.consecutive_failures = 0
        self.ejected += 1
        self.next_expiry = min(self.next_expiry, ep.ejected_until)
        self._listener.endpoint_ejected(self.service, ep.address, seconds)
        return True

    def sweep(self, pool: Iterable[EndpointState], now: float) -> None:
        """Return every endpoint whose ejection has expired (O(n), only when one is due)."""
        if now < self.next_expiry:
            return
        next_expiry = math.inf
        for ep in pool:
            until = ep.ejected_until
            if until is None:
                continue
            if until <= now:
                ep.ejected_until = None
                ep.restored_at = now
                self.ejected -= 1
                self._listener.endpoint_restored(self.service, ep.address)
            elif until < next_expiry:
                next_expiry = until
        self.next_expiry = next_expiry

    def set_rule(self, rule: OutlierRule | None, pool: Iterable[EndpointState]) -> None:
        """Judge by `rule` from now on (None: detection off), keeping the endpoints' state.

        Failure runs and `times_ejected` carry over: the next failure is judged by the new threshold,
        and the next ejection's length by the new times (capped by `max_times`). Ejections in progress
        stay, as they were decided, with two exceptions where keeping them would contradict the rule
        now in force:
          - detection turned off: nothing judges the endpoints any more, so none stays out;
          - an ejection longer than the new rule's longest (a lowered `max_ejection_time`): it ends
            no later than that from now, since an operator lowers the cap to get endpoints back.
        A lowered `max_ejection_percent` ejects no one back in: the ejections over it expire in
        their own time, and no new one is made until the count is under it again.
        """
        self.rule = rule
        pool = list(pool)
        now = self._clock()
        longest = None if rule is None else rule.ejection_time(rule.max_times)
        for ep in pool:
            until = ep.ejected_until
            if until is None:
                continue
            if longest is None:
                ep.ejected_until = now
            elif until > now + longest:
                ep.ejected_until = now + longest
        self.recount(pool)
        self.sweep(pool, now)  # returns (and reports) the ones ended now

    def recount(self, pool: Iterable[EndpointState]) -> None:
        """Recompute the counters after the pool changed (discovery update)."""
        ejected, next_expiry = 0, math.inf
        for ep in pool:
            if ep.ejected_until is not None:
                ejected += 1
                next_expiry = min(next_expiry, ep.ejected_until)
        self.ejected, self.next_expiry = ejected, next_expiry
