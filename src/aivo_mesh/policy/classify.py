"""Classify: one table from a gRPC status name to what that outcome means for retries and health.

Why one table: the retry layer, the circuit breaker and outlier detection must agree on what
"failed" means (Finagle's ResponseClassifier feeds both retries and failure accrual). If retries
treated a code as transient while the breaker ignored it, a sick upstream would be hammered with
retries that never trip anything.

    SUCCESS    the upstream answered: OK, or a business error (NOT_FOUND, INVALID_ARGUMENT, ...).
               Resets consecutive-failure counters; never retried. SUCCESS means "the upstream is
               healthy", not "the call returned OK".
    RETRYABLE  the upstream failed (a failure code) and this route may retry the code; counts as a
               failure.
    TRANSIENT  a code this route may retry that is not a failure code (RESOURCE_EXHAUSTED, unless
               failure_codes lists it: the upstream shedding load is not a sick upstream): retried,
               and a success for the breaker and outlier detection, as Envoy's consecutive_5xx
               ignores the 429 it maps to. So both planes count the same failures.
    FAILURE    the upstream failed (a code in CircuitBreakerSpec.failure_codes); counts for the
               breaker and outlier detection; not retried.
    IGNORED    says nothing about the upstream: the caller's own CANCELLED, and every local reply
               (breaker, limit, budget, deadline rejections). Never counted, never retried.

A rate limiter's refusal (RESOURCE_EXHAUSTED with a `grpc-retry-pushback-ms` trailer: MeshServer's and the
Envoy sidecars' inbound rate limits send one) says the upstream is healthy and busy with this caller: it is
never a failure, even where failure_codes lists RESOURCE_EXHAUSTED (TRANSIENT if the route retries it, else
SUCCESS), so a caller over its limit never opens the breaker or ejects the endpoint. Envoy's outlier
detection agrees: it reads the status as HTTP 429, never a 5xx.

Retryable codes are the route's `retry_on`, filtered by gRFC A6's advice: only UNAVAILABLE means
"not processed", so it is always allowed when listed. Any other code (INTERNAL, an attempt's
DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, ...) may follow side effects on the server and is
retried only on routes marked idempotent. Whether a code is a failure is failure_codes' call alone,
the same for every method of a service (its breaker is shared by them all).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from aivo_mesh.policy.backoff import PUSHBACK_HEADER
from aivo_mesh.policy.core import Reply
from aivo_mesh.status import DEFAULT_FAILURE_CODES, GRPC_STATUS_NAMES


class Outcome(enum.Enum):
    SUCCESS = "success"
    RETRYABLE = "retryable"
    TRANSIENT = "transient"
    FAILURE = "failure"
    IGNORED = "ignored"

    # Members are singletons: hash by identity. Enum's own __hash__ is a Python call (hash of the name),
    # paid on every `outcome in RETRIED` of every call.
    __hash__ = object.__hash__


SUCCESS = Outcome.SUCCESS
RETRYABLE = Outcome.RETRYABLE
TRANSIENT = Outcome.TRANSIENT
FAILURE = Outcome.FAILURE
IGNORED = Outcome.IGNORED
# What the retry layer may retry; what health (breaker, outlier detection) counts as a success.
RETRIED: frozenset[Outcome] = frozenset({RETRYABLE, TRANSIENT})
HEALTHY: frozenset[Outcome] = frozenset({SUCCESS, TRANSIENT})

_COUNTED: frozenset[Outcome] = frozenset({RETRYABLE, FAILURE})
RATE_LIMITED_CODE = "RESOURCE_EXHAUSTED"


def is_rate_limited(reply: Reply) -> bool:
    """Whether `reply` is a rate limiter's refusal: RESOURCE_EXHAUSTED with a pushback trailer."""
    return reply.code == RATE_LIMITED_CODE and any(k.lower() == PUSHBACK_HEADER for k, _ in reply.trailers)


# Codes that say the server did not process the call (gRFC A6): safe to retry on any route.
NOT_PROCESSED: frozenset[str] = frozenset({"UNAVAILABLE"})
# Codes that never describe the upstream's health, whatever a route lists.
ALWAYS_IGNORED: frozenset[str] = frozenset({"CANCELLED"})


def retryable_codes(retry_on: Iterable[str], *, idempotent: bool) -> frozenset[str]:
    """The codes a route may retry: `retry_on`, minus non-"not processed" codes unless idempotent."""
    codes = frozenset(retry_on) - ALWAYS_IGNORED - {"OK"}
    return codes if idempotent else codes & NOT_PROCESSED


@dataclass(frozen=True, slots=True, eq=False)
class Classifier:
    """The table for one route: every status name -> Outcome. Build with `for_route`.

    `table` is a plain dict for lookup speed (it is on every attempt's path); treat it as read-only.
    """

    table: Mapping[str, Outcome]
    _unknown: Outcome = field(init=False, repr=False, default=FAILURE)  # the outcome of "UNKNOWN"

    def __post_init__(self) -> None:
        object.__setattr__(self, "_unknown", self.table.get("UNKNOWN", FAILURE))

    @classmethod
    def for_route(cls, retry_on: Iterable[str], *, idempotent: bool,
                  failure_codes: Iterable[str] = DEFAULT_FAILURE_CODES) -> Classifier:
        retryable = retryable_codes(retry_on, idempotent=idempotent)
        failures = frozenset(failure_codes)
        table: dict[str, Outcome] = {}
        for code in GRPC_STATUS_NAMES:
            if code == "OK":
                table[code] = SUCCESS
            elif code in ALWAYS_IGNORED:
                table[code] = IGNORED
            elif code in retryable:
                table[code] = RETRYABLE if code in failures else TRANSIENT
            elif code in failures:
                table[code] = FAILURE
            else:
                table[code] = SUCCESS
        return cls(table)

    def classify(self, reply: Reply) -> Outcome:
        """A local reply is IGNORED whatever its code; an unknown code is treated as UNKNOWN; a rate
        limiter's refusal is never a failure (module docstring)."""
        if reply.local:
            return IGNORED
        outcome = self.table.get(reply.code) or self._unknown
        if reply.code == RATE_LIMITED_CODE and outcome in _COUNTED and is_rate_limited(reply):
            return TRANSIENT if outcome is RETRYABLE else SUCCESS
        return outcome

    def of(self, code: str) -> Outcome:
        """The outcome of a code received from the upstream (not a local reply)."""
        return self.table.get(code) or self._unknown

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Classifier) and dict(self.table) == dict(other.table)

    def __hash__(self) -> int:
        return hash(frozenset(self.table.items()))

    @property
    def retryable(self) -> frozenset[str]:
        return frozenset(c for c, o in self.table.items() if o in RETRIED)


# The classifier of a route with the built-in retry policy (retry UNAVAILABLE only).
DEFAULT_CLASSIFIER = Classifier.for_route(("UNAVAILABLE",), idempotent=False)
