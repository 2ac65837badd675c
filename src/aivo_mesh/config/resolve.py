"""Effective policy: built-in defaults <- mesh `defaults` <- service <- route.

This is the one place where layering happens. A key written in an override replaces only that key;
keys left out keep the value from the level above (so `retry: {max_retries: 2}` on a service keeps
the mesh-wide back-off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel

from aivo_mesh.config.model import (
    BUILTIN_DEFAULTS,
    CircuitBreakerSpec,
    HealthCheckSpec,
    LimitsSpec,
    MeshSpec,
    OutlierDetectionSpec,
    RetryBudgetSpec,
    RetrySpec,
    RouteSpec,
    ServiceSpec,
)

M = TypeVar("M", bound=BaseModel)


def merge(base: M, override: M | None) -> M:
    """Return `base` with the keys explicitly set in `override` applied (recursively)."""
    if override is None:
        return base
    updates: dict[str, object] = {}
    for key in override.model_fields_set:
        value = getattr(override, key)
        current = getattr(base, key)
        if isinstance(value, BaseModel) and isinstance(current, BaseModel):
            updates[key] = merge(current, value)
        else:
            updates[key] = value
    return base.model_copy(update=updates)


def _pick(base: M, *overrides: M | None) -> M:
    result = base
    for o in overrides:
        result = merge(result, o)
    return result


@dataclass(frozen=True)
class ServicePolicy:
    """Everything a caller needs to know about one target service."""

    service: ServiceSpec
    timeout: float
    retry: RetrySpec
    retry_budget: RetryBudgetSpec
    circuit_breaker: CircuitBreakerSpec
    limits: LimitsSpec
    outlier_detection: OutlierDetectionSpec
    health_check: HealthCheckSpec


@dataclass(frozen=True)
class RoutePolicy:
    """The policy of one method of one service; `match` says which route supplied it."""

    service: str
    method: str
    match: str | None
    timeout: float
    retry: RetrySpec
    idempotent: bool
    streaming: bool


def service_policy(mesh: MeshSpec, name: str) -> ServicePolicy:
    svc = mesh.service(name)
    d, b = mesh.defaults, BUILTIN_DEFAULTS
    # The built-in defaults set every key; the asserts only narrow the Optional types for mypy.
    assert b.retry is not None
    assert b.retry_budget is not None
    assert b.circuit_breaker is not None
    assert b.limits is not None
    assert b.outlier_detection is not None
    assert b.health_check is not None
    return ServicePolicy(
        service=svc,
        timeout=svc.timeout or d.timeout or b.timeout or 5.0,
        retry=_pick(b.retry, d.retry, svc.retry),
        retry_budget=_pick(b.retry_budget, d.retry_budget, svc.retry_budget),
        circuit_breaker=_pick(b.circuit_breaker, d.circuit_breaker, svc.circuit_breaker),
        limits=_pick(b.limits, d.limits, svc.limits),
        outlier_detection=_pick(b.outlier_detection, d.outlier_detection, svc.outlier_detection),
        health_check=_pick(b.health_check, d.health_check, svc.health_check),
    )


def longest_timeout(mesh: MeshSpec, service: str) -> float:
    """The longest any call to `service` may take: its own timeout or its longest route's."""
    sp = service_policy(mesh, service)
    return max([sp.timeout, *(r.timeout for r in sp.service.routes if r.timeout)])


def match_route(routes: tuple[RouteSpec, ...], method: str) -> RouteSpec | None:
    """Most specific route wins: an exact method beats a service prefix; longer prefix beats shorter."""
    best: RouteSpec | None = None
    for r in routes:
        exact = not r.match.endswith("/")
        matches = (exact and r.match == method) or (not exact and method.startswith(r.match))
        better = best is None or len(r.match) > len(best.match) or (exact and best.match.endswith("/"))
        if matches and better:
            best = r
    return best


def route_policy(mesh: MeshSpec, service: str, method: str) -> RoutePolicy:
    sp = service_policy(mesh, service)
    route = match_route(sp.service.routes, method)
    if route is None:
        return RoutePolicy(service, method, None, sp.timeout, sp.retry, idempotent=False, streaming=False)
    return RoutePolicy(
        service=service,
        method=method,
        match=route.match,
        timeout=route.timeout or sp.timeout,
        retry=merge(sp.retry, route.retry),
        idempotent=route.idempotent,
        streaming=route.streaming,
    )
