"""mesh.yaml -> the policy layers' own frozen parameters: the one place the two meet.

The layer modules (deadline, limit, breaker, retry, budget, balancer, outlier, classify, backoff) know
nothing of config/: each takes its own parameters, so it can be built, tested and reasoned about
without a mesh.yaml. This module reads the resolved specs (config/resolve.py) and builds those
parameters; stack.py uses it to build a target's stack.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from aivo_mesh.config.model import (
    BackoffSpec,
    CircuitBreakerSpec,
    HealthCheckSpec,
    LimitsSpec,
    OutlierDetectionSpec,
    RetryBudgetSpec,
    RetrySpec,
)
from aivo_mesh.config.resolve import FaultPolicy, RateLimit, RoutePolicy, ServicePolicy
from aivo_mesh.policy.backoff import Backoff, DecorrelatedJitter, FullJitter
from aivo_mesh.policy.balancer import HealthRule
from aivo_mesh.policy.breaker import BreakerParams
from aivo_mesh.policy.budget import RetryBudgetParams
from aivo_mesh.policy.classify import Classifier
from aivo_mesh.policy.deadline import DeadlineParams
from aivo_mesh.policy.fault import FaultRule
from aivo_mesh.policy.limit import LimitParams
from aivo_mesh.policy.outlier import OutlierRule
from aivo_mesh.policy.ratelimit import BucketParams, RateLimitParams
from aivo_mesh.policy.retry import RetryParams
from aivo_mesh.status import DEFAULT_FAILURE_CODES

__all__ = ["backoff", "breaker_params", "budget_params", "fault_rules", "health_rule", "limit_params",
           "outlier_rule", "rate_limit_params", "retry_params", "route_params"]


def backoff(spec: BackoffSpec, *, decorrelated: bool = False) -> Backoff:
    """Full jitter (or decorrelated) between `base` and `max`; a `max` below `base` is read as `base`."""
    cap = max(spec.max, spec.base)
    return DecorrelatedJitter(base=spec.base, cap=cap) if decorrelated else FullJitter(base=spec.base, cap=cap)


def retry_params(spec: RetrySpec, *, idempotent: bool, client_max_retries: int | None = None,
                 failure_codes: Iterable[str] = DEFAULT_FAILURE_CODES, decorrelated: bool = False) -> RetryParams:
    """`client_max_retries` (MeshConfig.max_retries) caps the route's own max_retries."""
    max_retries = spec.max_retries if client_max_retries is None else min(spec.max_retries, client_max_retries)
    return RetryParams(max_retries=max_retries, backoff=backoff(spec.backoff, decorrelated=decorrelated),
                       classifier=Classifier.for_route(spec.retry_on, idempotent=idempotent,
                                                       failure_codes=failure_codes),
                       per_try_timeout=spec.per_try_timeout)


def route_params(service: ServicePolicy, route: RoutePolicy,
                 client_max_retries: int | None = None) -> tuple[DeadlineParams, RetryParams]:
    """The deadline and retry parameters of one route of one target service."""
    retry = retry_params(route.retry, idempotent=route.idempotent, client_max_retries=client_max_retries,
                         failure_codes=service.circuit_breaker.failure_codes)
    if route.streaming:  # a stream commits on its first message: the core does not retry it
        retry = RetryParams(max_retries=0, backoff=retry.backoff, classifier=retry.classifier,
                            per_try_timeout=retry.per_try_timeout)
    return DeadlineParams(route_timeout=route.timeout), retry


def budget_params(spec: RetryBudgetSpec, limits: LimitsSpec | None = None, buckets: int = 10) -> RetryBudgetParams:
    """`limits.max_retries` caps the retries in flight at once (Envoy's circuit_breakers.max_retries)."""
    return RetryBudgetParams(percent=spec.percent, min_retry_concurrency=spec.min_retry_concurrency,
                             window=spec.window,
                             max_concurrent_retries=None if limits is None else limits.max_retries,
                             buckets=buckets)


def breaker_params(spec: CircuitBreakerSpec) -> BreakerParams:
    return BreakerParams(mode=spec.mode, consecutive_failures=spec.consecutive_failures,
                         recovery_time=spec.recovery_time, half_open_max_calls=spec.half_open_max_calls,
                         failure_rate_threshold=spec.failure_rate_threshold, window_size=spec.window_size,
                         minimum_calls=spec.minimum_calls, first_probe=spec.first_probe)


def limit_params(spec: LimitsSpec) -> LimitParams:
    return LimitParams(max_requests=spec.max_requests, max_pending_requests=spec.max_pending_requests)


def outlier_rule(spec: OutlierDetectionSpec) -> OutlierRule:
    return OutlierRule(consecutive_failures=spec.consecutive_failures, interval=spec.interval,
                       base_ejection_time=spec.base_ejection_time, max_ejection_time=spec.max_ejection_time,
                       max_ejection_percent=spec.max_ejection_percent)


def health_rule(spec: HealthCheckSpec) -> HealthRule:
    return HealthRule(spec.unhealthy_threshold, spec.healthy_threshold)


def rate_limit_params(limit: RateLimit) -> RateLimitParams:
    """One scope's buckets (config.resolve.inbound_rate_limits) as the rate limiter takes them."""
    return RateLimitParams(limit.scope, BucketParams(limit.shared.rate, limit.shared.burst),
                           tuple((c, BucketParams(b.rate, b.burst)) for c, b in limit.callers))


def fault_rules(policies: Sequence[FaultPolicy]) -> tuple[FaultRule, ...]:
    """A server's fault rules, in the match order of `config.resolve.fault_policies` (inactive ones kept:
    a route at 0 % still shadows the service's fault for its methods)."""
    return tuple(FaultRule(p.pattern, abort_code=p.fault.abort_status, abort_percent=p.fault.abort_percent,
                           delay=p.fault.delay or 0.0, delay_percent=p.fault.delay_percent,
                           callers=None if p.callers is None else frozenset(p.callers))
                 for p in policies)
