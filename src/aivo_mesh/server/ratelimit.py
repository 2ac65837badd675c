"""A server's inbound rate limits: which scope a method is in (mesh.yaml's routes), and its buckets.

The buckets are the policy core's (policy/ratelimit.py); this adds what mesh.yaml says: the service's
`config.resolve.inbound_rate_limits`, from its file or from the control plane (xds/policies.py), each
method looked up once. Health checks and reflection are in no scope: never limited.
"""

from __future__ import annotations

from collections.abc import Sequence

from aivo_mesh.config.resolve import ScopedRateLimit, rate_limit_for, rate_limit_scopes
from aivo_mesh.policy.bind import rate_limit_params
from aivo_mesh.policy.core import Clock, monotonic
from aivo_mesh.policy.ratelimit import Limited, RateLimiter

_MAX_METHODS = 4096  # bounded: a caller's typos must not grow the cache without end


class InboundRateLimits:
    def __init__(self, limits: Sequence[ScopedRateLimit] = (), *, clock: Clock = monotonic) -> None:
        self.limits: tuple[ScopedRateLimit, ...] = ()
        self.limiter = RateLimiter(clock=clock)
        self._scope_of: dict[str, tuple[str | None] | None] = {}
        self.set(limits)

    def set(self, limits: Sequence[ScopedRateLimit]) -> bool:
        """Limit calls from the next one on by `limits`; True if they differ from those in force. Buckets
        whose size is unchanged keep their tokens (RateLimiter.update)."""
        limits = tuple(limits)
        if limits == self.limits:
            return False
        self.limits = limits
        self._scope_of = {}
        self.limiter.update(rate_limit_params(limit) for limit in rate_limit_scopes(limits).values())
        return True

    def admit(self, method: str, caller: str | None) -> Limited | None:
        """None if a call of `method` by `caller` (its SPIFFE ID) may go on, else why not."""
        if not self.limits:
            return None
        if method in self._scope_of:
            scope = self._scope_of[method]
        else:
            limit = rate_limit_for(self.limits, method)
            scope = None if limit is None else (limit.scope,)
            if len(self._scope_of) < _MAX_METHODS:
                self._scope_of[method] = scope
        if scope is None:
            return None
        return self.limiter.admit(scope[0], caller)
