"""Effective policy: built-in defaults <- mesh `defaults` <- service <- route.

This is the one place where layering happens. A key written in an override replaces only that key;
keys left out keep the value from the level above (so `retry: {max_retries: 2}` on a service keeps
the mesh-wide back-off). A route's `retry.per_try_timeout` applies only where an attempt it cuts is
retried by both planes (`per_try_not_applied`): never on streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel

from aivo_mesh.config.memo import per_mesh
from aivo_mesh.config.model import (
    BUILTIN_DEFAULTS,
    CircuitBreakerSpec,
    FaultSpec,
    HealthCheckSpec,
    LimitsSpec,
    MeshSpec,
    OutlierDetectionSpec,
    PolicySpec,
    RateLimitSpec,
    RetryBudgetSpec,
    RetrySpec,
    ServiceSpec,
)
from aivo_mesh.config.patterns import covers, in_match_order, service_prefix

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
    # The canary split, (version, weight) sorted by version: () for none. Apart from `service`, whose
    # `canary` it starts as, because a control plane sends it with the routes (weighted_clusters).
    canary: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class RoutePolicy:
    """The effective policy of one route of one service (see `route_policies`).

    `pattern` is what it covers (config/patterns.py); `match` is the mesh.yaml route that supplied it,
    None for the service's catch-all (its own policy, for every method no route covers)."""

    service: str
    pattern: str
    match: str | None
    timeout: float
    retry: RetrySpec
    idempotent: bool
    streaming: bool


@per_mesh
def service_policy(mesh: MeshSpec, name: str) -> ServicePolicy:
    """Computed once per mesh and service (config/memo.py): every caller of a service shares it."""
    svc = mesh.service(name)
    d, b = mesh.defaults, BUILTIN_DEFAULTS
    # The built-in defaults set every key; the asserts only narrow the Optional types for mypy.
    assert b.retry is not None
    assert b.retry_budget is not None
    assert b.circuit_breaker is not None
    assert b.limits is not None
    assert b.outlier_detection is not None
    assert b.health_check is not None
    breaker = _pick(b.circuit_breaker, d.circuit_breaker, svc.circuit_breaker)
    outlier = _pick(b.outlier_detection, d.outlier_detection, svc.outlier_detection)
    outlier = outlier.model_copy(update={"consecutive_failures": _ejection_threshold(
        b.circuit_breaker.consecutive_failures, d, svc)})
    return ServicePolicy(
        service=svc,
        timeout=svc.timeout or d.timeout or b.timeout or 5.0,
        retry=_pick(b.retry, d.retry, svc.retry),
        retry_budget=_pick(b.retry_budget, d.retry_budget, svc.retry_budget),
        circuit_breaker=breaker,
        limits=_pick(b.limits, d.limits, svc.limits),
        outlier_detection=outlier,
        health_check=_pick(b.health_check, d.health_check, svc.health_check),
        canary=tuple(sorted(svc.canary.items())),
    )


def _ejection_threshold(builtin: int, *levels: PolicySpec | ServiceSpec) -> int:
    """outlier_detection.consecutive_failures as both planes apply it: one failure threshold for the
    breaker and the ejection. Envoy's only breaker is its outlier detection, so the ejection follows
    circuit_breaker.consecutive_failures, level by level (defaults, then service), except where a level
    sets outlier_detection.consecutive_failures itself: the most specific level that sets either key
    decides, and a level setting both keeps its outlier_detection value."""
    threshold = builtin
    for level in levels:
        od, cb = level.outlier_detection, level.circuit_breaker
        if od is not None and "consecutive_failures" in od.model_fields_set:
            threshold = od.consecutive_failures
        elif cb is not None and "consecutive_failures" in cb.model_fields_set:
            threshold = cb.consecutive_failures
    return threshold


def longest_timeout(mesh: MeshSpec, service: str) -> float:
    """The longest any call to `service` may take: its own timeout or its longest route's."""
    return max(rp.timeout for rp in route_policies(mesh, service))


@dataclass(frozen=True)
class PerTryNotApplied:
    """Why a route's per-try timeout is left out on both planes (`str()` is the reason)."""

    why: str
    # The one reason that is probably a mistake: the route retries, but not the DEADLINE_EXCEEDED the
    # timeout produces. `meshctl lint` warns about it even where the timeout is only inherited.
    likely_mistake: bool = False

    def __str__(self) -> str:
        return self.why


def per_try_not_applied(retry: RetrySpec, *, idempotent: bool, streaming: bool) -> PerTryNotApplied | None:
    """Why `retry.per_try_timeout` does not apply to such a route (None: it applies, or there is none).

    A per-try timeout cuts an attempt so that another one can be made; both planes must agree on when
    that happens. Envoy retries an attempt it cut whenever the route has a retry policy with `reset`
    (idempotent routes only) and answers UNAVAILABLE "upstream request timeout" otherwise (a status
    callers take as "not processed", though the server may have done the work); the proxyless core
    (`policy.deadline.attempt_timeout`) retries the DEADLINE_EXCEEDED it gets when the route may retry
    that status. So it applies exactly where both retry it: unary, idempotent, retries left,
    DEADLINE_EXCEEDED in retry_on. On a stream it would cut the stream itself.
    """
    if retry.per_try_timeout is None:
        return None
    if streaming:
        return PerTryNotApplied("streaming route: a per-try timeout would cut the stream")
    if not idempotent:
        return PerTryNotApplied("not an idempotent route: the attempt it cuts is not retried "
                                "(Envoy would answer UNAVAILABLE)")
    if retry.max_retries == 0:
        return PerTryNotApplied("max_retries is 0: there is no other attempt to make")
    if "DEADLINE_EXCEEDED" not in retry.retry_on:
        return PerTryNotApplied("DEADLINE_EXCEEDED is not in retry_on: the proxyless plane would not retry "
                                "the attempt it cuts (Envoy would); list it", likely_mistake=True)
    return None


def route_retry(retry: RetrySpec, *, idempotent: bool, streaming: bool) -> RetrySpec:
    """`retry` as it applies to one route: without a per-try timeout where `per_try_not_applied`."""
    if per_try_not_applied(retry, idempotent=idempotent, streaming=streaming) is None:
        return retry
    return retry.model_copy(update={"per_try_timeout": None})


@per_mesh
def route_policies(mesh: MeshSpec, service: str) -> tuple[RoutePolicy, ...]:
    """Every route of `service` in match order (config.patterns.in_match_order: exact methods, then
    prefixes, longest first), each with its effective policy, then the catch-all: the service's own
    policy (`match` None, `pattern` the whole service) for every method no route covers. The first
    whose pattern covers a method is that method's policy (`policy_for`).

    Where a route covers the whole service (`/pkg.Svc/`), the catch-all behind it is left only the
    methods of other services (health checks, reflection); `per_pattern` leaves it out. Computed once per
    mesh and service (config/memo.py)."""
    sp = service_policy(mesh, service)
    routes = tuple(
        RoutePolicy(service=service, pattern=r.match, match=r.match, timeout=r.timeout or sp.timeout,
                    retry=route_retry(merge(sp.retry, r.retry), idempotent=r.idempotent, streaming=r.streaming),
                    idempotent=r.idempotent, streaming=r.streaming)
        for r in in_match_order(sp.service.routes, lambda r: r.match)
    )
    catch_all = RoutePolicy(service=service, pattern=service_prefix(sp.service.grpc_service), match=None,
                            timeout=sp.timeout, retry=route_retry(sp.retry, idempotent=False, streaming=False),
                            idempotent=False, streaming=False)
    return (*routes, catch_all)


def policy_for(policies: Sequence[RoutePolicy], method: str) -> RoutePolicy:
    """The policy of `method` (or of every method under a pattern) among `route_policies`: the first
    that covers it, else the catch-all."""
    return next((rp for rp in policies if covers(rp.pattern, method)), policies[-1])


def per_pattern(policies: Sequence[RoutePolicy]) -> list[RoutePolicy]:
    """`route_policies` one per pattern: without a catch-all that a whole-service route shadows."""
    explicit = {rp.pattern for rp in policies if rp.match is not None}
    return [rp for rp in policies if rp.match is not None or rp.pattern not in explicit]


def route_policy(mesh: MeshSpec, service: str, method: str) -> RoutePolicy:
    """The policy of one method of `service`. To look up many, take `route_policies` once and use
    `policy_for`."""
    return policy_for(route_policies(mesh, service), method)


@dataclass(frozen=True)
class FaultPolicy:
    """The fault injected into the calls of one route of one service (see `fault_policies`): `fault` as
    the route resolves it (the service's `fault` <- the route's, key by key) but its `callers`, which are
    `callers` here: the SPIFFE IDs it is limited to (None: every caller). `match` is the mesh.yaml route,
    None for the catch-all."""

    pattern: str
    match: str | None
    fault: FaultSpec
    callers: tuple[str, ...] | None

    @property
    def active(self) -> bool:
        """Whether it can fault a call at all (a status other than OK or a delay, at more than 0 %)."""
        f = self.fault
        return bool((f.abort_status not in (None, "OK") and f.abort_percent > 0) or (f.delay and f.delay_percent > 0))


@per_mesh
def fault_policies(mesh: MeshSpec, service: str) -> tuple[FaultPolicy, ...]:
    """The fault of every route of `service` in match order, then of the catch-all (the service's own),
    as `route_policies` orders them; () when neither the service nor a route sets `fault`. A route
    without `fault` has the service's: the first pattern covering a method decides, as for deadlines."""
    svc = mesh.service(service)
    if svc.fault is None and all(r.fault is None for r in svc.routes):
        return ()

    def policy(pattern: str, match: str | None, fault: FaultSpec) -> FaultPolicy:
        ids = tuple(dict.fromkeys(c if c.startswith("spiffe://") else mesh.spiffe_id(c) for c in fault.callers))
        # The callers live in `callers` only, resolved: `fault` is left with none of its own.
        return FaultPolicy(pattern, match, fault.model_copy(update={"callers": ()}),
                           None if not ids or "*" in fault.callers else ids)

    base = svc.fault or FaultSpec()
    routes = tuple(policy(r.match, r.match, merge(base, r.fault))
                   for r in in_match_order(svc.routes, lambda r: r.match))
    return (*routes, policy(service_prefix(svc.grpc_service), None, base))


@per_mesh
def callable_peers(mesh: MeshSpec, service: str) -> tuple[str, ...]:
    """Services (mesh.yaml order) whose allow-list lets `service` call at least one method: a rule naming
    it, its SPIFFE ID or `*`."""
    allowing = _allowing(mesh)
    found = set(allowing.get(service, ())) | set(allowing.get(mesh.spiffe_id(service), ())) | set(allowing.get("*", ()))
    return tuple(mesh.services[i].name for i in sorted(found) if mesh.services[i].name != service)


@per_mesh
def _allowing(mesh: MeshSpec) -> dict[str, tuple[int, ...]]:
    """Each caller as allow rules write it (name, SPIFFE ID, `*`) -> the positions of the services whose
    allow-list names it: one walk over every rule, instead of one per caller."""
    index: dict[str, list[int]] = {}
    for i, svc in enumerate(mesh.services):
        for rule in svc.allow:
            for caller in rule.from_:
                positions = index.setdefault(caller, [])
                if not positions or positions[-1] != i:
                    positions.append(i)
    return {caller: tuple(positions) for caller, positions in index.items()}


# -- inbound rate limits -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Bucket:
    """A token bucket's size: `rate` tokens a second, continuously, up to `burst` (it starts full)."""

    rate: int
    burst: int


@dataclass(frozen=True)
class RateLimit:
    """The buckets of one scope: the calls of `scope` (a route's pattern; None for the service's own block,
    which every method without a block of its own shares) from `callers` take a token from their own
    bucket, every other caller's from the one `shared` bucket. Callers are SPIFFE IDs, sorted. What both
    planes apply (policy/ratelimit.py, the sidecar's local rate limit filter)."""

    scope: str | None
    shared: Bucket
    callers: tuple[tuple[str, Bucket], ...] = ()

    @property
    def slowest(self) -> int:
        """The lowest rate among its buckets (tokens a second)."""
        return min([self.shared.rate, *(b.rate for _, b in self.callers)])


@dataclass(frozen=True)
class ScopedRateLimit:
    """One route pattern of a service in match order, with the rate limit its methods are under (None:
    not limited). `limit.scope == pattern` when the route has a block of its own."""

    pattern: str
    limit: RateLimit | None

    @property
    def own(self) -> bool:
        return self.limit is not None and self.limit.scope == self.pattern


def _merged_rate_limit(service: RateLimitSpec | None, route: RateLimitSpec | None) -> RateLimitSpec | None:
    """A route's block over the service's, key by key; `callers` merged per identity (the route's win).
    `burst` left out follows the `requests_per_second` written beside it."""
    if route is None or service is None:
        return route or service
    updates: dict[str, object] = {key: getattr(route, key) for key in route.model_fields_set}
    if "requests_per_second" in updates and "burst" not in updates:
        updates["burst"] = None
    updates["callers"] = {**service.callers, **route.callers}
    return service.model_copy(update=updates)


def admitted_callers(mesh: MeshSpec, service: str) -> tuple[str, ...]:
    """The SPIFFE IDs `service`'s allow rules admit, sorted: those named, and with `*` every identity
    mesh.yaml names (services, clients, SPIFFE IDs of allow rules and rate limits). Each gets a bucket of
    its own under `per_caller`; an identity mesh.yaml does not name shares the shared bucket."""
    svc = mesh.service(service)
    named = [c for rule in svc.allow for c in rule.from_]
    if "*" in named:
        named = [*mesh.service_names, *mesh.mesh.clients,
                 *(c for s in mesh.services for rule in s.allow for c in rule.from_ if c.startswith("spiffe://")),
                 *(c for s in mesh.services for block in (s.rate_limit, *(r.rate_limit for r in s.routes))
                   if block is not None for c in block.callers if c.startswith("spiffe://"))]
    return tuple(sorted({c if c.startswith("spiffe://") else mesh.spiffe_id(c) for c in named if c != "*"}))


def _rate_limit(mesh: MeshSpec, service: str, scope: str | None, spec: RateLimitSpec) -> RateLimit:
    assert spec.requests_per_second is not None  # the model requires a rate where a block applies
    shared = Bucket(spec.requests_per_second, spec.burst or spec.requests_per_second)
    own = {c: shared for c in admitted_callers(mesh, service)} if spec.per_caller else {}
    for caller, cs in spec.callers.items():
        own[caller if caller.startswith("spiffe://") else mesh.spiffe_id(caller)] = Bucket(
            cs.requests_per_second, cs.burst or cs.requests_per_second)
    return RateLimit(scope, shared, tuple(sorted(own.items())))


@per_mesh
def inbound_rate_limits(mesh: MeshSpec, service: str) -> tuple[ScopedRateLimit, ...]:
    """`service`'s route patterns in match order (`route_policies`, the catch-all last), each with the rate
    limit of its methods: the route's own block merged over the service's (buckets of its own), else the
    service's (one set of buckets for every such method), else None. () when nothing is limited. A method
    takes the first pattern that covers it (`rate_limit_for`); health checks and reflection none."""
    svc = mesh.service(service)
    if svc.rate_limit is None and all(r.rate_limit is None for r in svc.routes):
        return ()
    own_blocks = {r.match: r.rate_limit for r in svc.routes if r.rate_limit is not None}
    prefix = service_prefix(svc.grpc_service)
    shared = _rate_limit(mesh, service, None, svc.rate_limit) if svc.rate_limit is not None else None
    out = []
    for rp in per_pattern(route_policies(mesh, service)):
        block = own_blocks.get(rp.pattern) if rp.match is not None else None
        merged = _merged_rate_limit(svc.rate_limit, block) if block is not None else None
        limit = _rate_limit(mesh, service, rp.pattern, merged) if merged is not None else shared
        out.append(ScopedRateLimit(rp.pattern, limit))
    if not any(s.pattern == prefix for s in out):  # a whole-service route shadows the catch-all
        out.append(ScopedRateLimit(prefix, shared))
    return tuple(out)


def rate_limit_for(limits: Sequence[ScopedRateLimit], method: str) -> RateLimit | None:
    """The rate limit `method` is under among `inbound_rate_limits`: the first pattern covering it."""
    return next((s.limit for s in limits if covers(s.pattern, method)), None)


def rate_limit_scopes(limits: Sequence[ScopedRateLimit]) -> dict[str | None, RateLimit]:
    """Every distinct scope of `inbound_rate_limits` with its limit (the service's once)."""
    return {s.limit.scope: s.limit for s in limits if s.limit is not None}
