"""The order of the client-side policy layers, stated once (outermost first, each sees the call first):

    deadline   sets the one deadline of the logical call. Outermost, because every layer below
               (waiting for a slot, backing off, each attempt) must live within it; also where the
               call is reported started and finished.
    limit      one concurrency slot per logical call, held across all its retries. Outside retry,
               so a call retrying 3 times still holds 1 slot (inside, retries would queue behind
               fresh calls and a storm could fill the queue with its own retries); its waiting time
               counts against the deadline set above. Its rejection is local, never retried.
    breaker    one admission and one outcome per logical call, before any attempt: while OPEN a call
               fails fast without reaching retry, budget or network. Outside retry, so it counts
               what the caller got after retries: an attempt that failed and was retried to
               success is no failure of the service (counting attempts let the per-try timeouts
               of a one-second stall open it for everyone, for a minute). A call admitted
               before it opened finishes its retries; the budget bounds them.
    retry      (+ budget) decides and sleeps; every attempt goes down through the balancer.
               The budget is deposited once per logical call here.
    balancer   picks an endpoint per attempt (a retry may land elsewhere) and feeds outlier
               detection with that attempt's outcome: a bad endpoint is judged per attempt and
               ejected, the service per call (breaker.py says how the two relate).
    terminal   one attempt on the wire (client/ adapts grpc.aio here).

`TargetPolicy` holds the stateful parts shared by all methods of one target service (budget,
breaker, limit, balancer) and builds one cached stack per method from that method's RoutePolicy
(turned into the layers' own parameters by bind.py): the client makes one TargetPolicy per service
and asks it for `stack_for(method)`. Layers that must see the whole logical call from outside
(telemetry's ClientTracingLayer) are passed as `outer` and sit before `deadline`.

A live policy change (`TargetPolicy.update`) replaces only the parts whose parameters changed and
names them (PARTS). The stacks hold the parts they were built with, so a call in flight finishes
under the policy it started with, while the next call gets a stack built from the new parts. A
replaced part starts afresh (a new breaker is closed); a kept one keeps its state (an open breaker
stays open, with its probe time). The outlier and health rules and the canary split change in place, so
the endpoints keep their ejections and health.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from random import Random
from typing import Any

from aivo_mesh.config.model import MeshSpec
from aivo_mesh.config.resolve import RoutePolicy, ServicePolicy, policy_for, route_policies, service_policy
from aivo_mesh.policy import bind
from aivo_mesh.policy.balancer import Balancer, BalancerLayer, Split
from aivo_mesh.policy.breaker import BreakerLayer, CircuitBreaker
from aivo_mesh.policy.budget import Budget, RetryBudget
from aivo_mesh.policy.classify import Classifier
from aivo_mesh.policy.core import Clock, Handler, Layer, build_stack, monotonic
from aivo_mesh.policy.deadline import DeadlineLayer, DeadlineParams
from aivo_mesh.policy.events import NOOP, PolicyListener
from aivo_mesh.policy.limit import ConcurrencyLimit, LimitLayer
from aivo_mesh.policy.retry import RetryLayer, RetryParams, Sleeper

__all__ = ["PARTS", "REBUILDS_STACKS", "Handler", "Layer", "MethodParams", "Routes", "TargetPolicy", "build_stack",
           "client_layers", "layer_names"]

CLIENT_ORDER: tuple[str, ...] = ("deadline", "limit", "breaker", "retry", "balancer")

# A target's routes: mesh.yaml's route table (`route_policies`, compared by value on an update), or a
# function from method to its policy (compared per method already used).
Routes = Sequence[RoutePolicy] | Callable[[str], RoutePolicy]

# The parts `TargetPolicy.update` names when it replaces them.
ROUTES = "routes"  # the per-method parameters: a route's timeout or retry, or the failure codes
BUDGET = "budget"  # retry_budget, or limits.max_retries
BREAKER = "breaker"  # circuit_breaker (its failure codes also change ROUTES)
LIMIT = "limit"  # limits.max_requests, limits.max_pending_requests
OUTLIER = "outlier"  # outlier_detection: the balancer's rule, in place
HEALTH = "health"  # health_check's thresholds, in place (the client also names interval and timeout)
CANARY = "canary"  # the canary split: the balancer's, in place (calls in flight keep the version they drew)
PARTS: tuple[str, ...] = (ROUTES, BUDGET, BREAKER, LIMIT, OUTLIER, HEALTH, CANARY)
# Replacing these rebuilds the stacks: each stack holds them (the outlier and health rules it reaches
# through the balancer, which stays).
REBUILDS_STACKS = frozenset({ROUTES, BUDGET, BREAKER, LIMIT})


def layer_names(layers: Sequence[Layer]) -> list[str]:
    return [layer.name for layer in layers]


@dataclass(frozen=True, slots=True)
class MethodParams:
    """The per-route slice every layer of one method needs, built once per method."""

    deadline: DeadlineParams
    retry: RetryParams
    classifier: Classifier


def client_layers(
    params: MethodParams, *, limit: ConcurrencyLimit, budget: Budget, breaker: CircuitBreaker,
    balancer: Balancer, clock: Clock = monotonic, rng: Random | None = None, sleep: Sleeper = asyncio.sleep,
    listener: PolicyListener = NOOP, inherited: Callable[[], float | None] | None = None,
) -> list[Layer]:
    """The layers of one method of one target service, in the order stated in this module's docstring."""
    return [
        DeadlineLayer(params.deadline, inherited, clock, listener=None if listener is NOOP else listener),
        LimitLayer(limit, clock=clock, listener=listener),
        BreakerLayer(breaker, params.classifier, listener),
        RetryLayer(params.retry, budget=budget, rng=rng, sleep=sleep, clock=clock, listener=listener),
        BalancerLayer(balancer, params.classifier),
    ]


class TargetPolicy:
    """The client-side policy of one target service: shared state + one cached stack per method.

        target = TargetPolicy.from_mesh(mesh, "auth-svc", terminal, max_retries=config.max_retries)
        handler = target.stack_for("/aivo.auth.v1.AuthService/ValidateToken")
        reply = await handler(Call("auth-svc", method, request, timeout=...))
    """

    def __init__(self, policy: ServicePolicy, routes: Routes, terminal: Handler, *,
                 endpoints: Sequence[str] | None = None, versions: Mapping[str, str] | None = None,
                 max_retries: int | None = None, clock: Clock = monotonic, rng: Random | None = None,
                 sleep: Sleeper = asyncio.sleep, listener: PolicyListener = NOOP,
                 inherited: Callable[[], float | None] | None = None, outer: Sequence[Layer] = (),
                 split: bool = True) -> None:
        """`endpoints`, with each one's version (`versions`; the service's own version for one it does not
        name): mesh.yaml's when not given. `split`: whether calls are split by the service's canary
        weights here (False when a sidecar behind the one endpoint does it)."""
        spec = policy.service
        self.service = spec.name
        self.policy = policy
        self.routes, self.route_for = _routes(routes)
        self.terminal = terminal
        self.max_retries = max_retries
        self.clock = clock
        self.rng = rng if rng is not None else Random()
        self.sleep = sleep
        self.listener = listener
        self.inherited = inherited
        self.outer = tuple(outer)
        # The shared, stateful parts: one per target service.
        self.budget = RetryBudget(bind.budget_params(policy.retry_budget, policy.limits), clock)
        self.breaker = self._new_breaker(policy)
        self.limit = ConcurrencyLimit(self.service, bind.limit_params(policy.limits))
        if endpoints is None:
            addresses = list(spec.endpoint_addresses) or [f"{spec.host}:{spec.port}"]
            versions = dict(spec.endpoint_versions)
        else:
            addresses = list(endpoints)
        self.splits = split
        self.balancer = Balancer(self.service, addresses, rule=bind.outlier_rule(policy.outlier_detection),
                                 health=bind.health_rule(policy.health_check), clock=clock, listener=listener,
                                 split=self._split(policy), versions=versions or {},
                                 default_version=spec.version, rng=self.rng)
        # Per method: the route policy its params were built from (what `update` compares), its params
        # and its stack. `update` swaps whole dicts, so a lookup never sees one half-changed.
        self._route_of: dict[str, RoutePolicy] = {}
        self._params: dict[str, MethodParams] = {}
        self._stacks: dict[str, Handler] = {}

    @classmethod
    def from_mesh(cls, mesh: MeshSpec, service: str, terminal: Handler, **kwargs: Any) -> TargetPolicy:
        """From mesh.yaml: the service's effective policy and its routes (config/resolve.py)."""
        return cls(service_policy(mesh, service), route_policies(mesh, service), terminal, **kwargs)

    def _split(self, policy: ServicePolicy) -> Split | None:
        return Split(policy.canary) if self.splits and policy.canary else None

    def _new_breaker(self, policy: ServicePolicy) -> CircuitBreaker:
        return CircuitBreaker(self.service, bind.breaker_params(policy.circuit_breaker), clock=self.clock,
                              listener=self.listener, rng=self.rng)

    def params_for(self, method: str) -> MethodParams:
        p = self._params.get(method)
        if p is None:
            route = self._route_of[method] = self.route_for(method)
            deadline, retry = bind.route_params(self.policy, route, self.max_retries)
            p = self._params[method] = MethodParams(deadline, retry, retry.classifier)
        return p

    def layers(self, method: str) -> list[Layer]:
        """`outer` layers, then the client layers in their stated order."""
        return [*self.outer, *client_layers(
            self.params_for(method), limit=self.limit, budget=self.budget, breaker=self.breaker,
            balancer=self.balancer, clock=self.clock, rng=self.rng, sleep=self.sleep, listener=self.listener,
            inherited=self.inherited)]

    def stack_for(self, method: str) -> Handler:
        """The handler for `method` (built on first use, then cached)."""
        h = self._stacks.get(method)
        if h is None:
            h = self._stacks[method] = build_stack(self.layers(method), self.terminal)
        return h

    def update(self, policy: ServicePolicy, routes: Routes) -> set[str]:
        """Apply a new policy of this service; the names (PARTS) of what it replaced, empty if nothing.

        Each part is compared by its own parameters (bind.py), so a change elsewhere in the service
        (an allow rule, `limits.max_connections`) replaces nothing, and an equal policy keeps every
        part and cached stack. Replaced: a new RetryBudget, CircuitBreaker (closed; the listeners
        are told it left the old one's state) or ConcurrencyLimit; the per-method parameters of the
        methods whose route policy changed (every method's when the failure codes did). The outlier
        and health rules change in the balancer itself. Stacks holding a replaced part are dropped
        and built anew on next use; calls in flight keep theirs, and with it the old parts: their
        concurrency slots go back to the old limit, their outcomes to the old breaker, which no
        longer reports (CircuitBreaker.retire).

        A new limit starts empty while the old one's calls finish, so for that while up to twice
        `max_requests` may be in flight: waiting for the old calls would hold up every new one.
        """
        old = self.policy
        changed: set[str] = set()
        new_routes, route_for = _routes(routes)
        codes_changed = old.circuit_breaker.failure_codes != policy.circuit_breaker.failure_codes
        stale = {m for m, route in self._route_of.items() if codes_changed or route_for(m) != route}
        if stale or codes_changed or (new_routes is not None and new_routes != self.routes):
            changed.add(ROUTES)
        budget = bind.budget_params(policy.retry_budget, policy.limits)
        if budget != self.budget.params:
            changed.add(BUDGET)
        if bind.breaker_params(policy.circuit_breaker) != self.breaker.params:
            changed.add(BREAKER)
        if bind.limit_params(policy.limits) != self.limit.params:
            changed.add(LIMIT)
        rule, health = bind.outlier_rule(policy.outlier_detection), bind.health_rule(policy.health_check)
        if rule != self.balancer.detector.rule:
            changed.add(OUTLIER)
        if health != self.balancer.health:
            changed.add(HEALTH)
        split = self._split(policy)
        if split != self.balancer.split:
            changed.add(CANARY)

        # One synchronous step (no await): a call gets a stack of old parts or of new ones, never a mix.
        self.policy, self.routes, self.route_for = policy, new_routes, route_for
        if BUDGET in changed:
            self.budget = RetryBudget(budget, self.clock)  # its window starts empty
        if BREAKER in changed:
            was = self.breaker.retire()
            self.breaker = self._new_breaker(policy)
            if was != self.breaker.state:  # the gauge (and any listener) follows the breaker in use
                self.listener.breaker_state(self.service, was, self.breaker.state)
        if LIMIT in changed:
            self.limit = ConcurrencyLimit(self.service, bind.limit_params(policy.limits))
        if OUTLIER in changed or HEALTH in changed:
            self.balancer.set_rules(rule, health)
        self.balancer.split = split
        if stale:
            self._route_of = {m: r for m, r in self._route_of.items() if m not in stale}
            self._params = {m: p for m, p in self._params.items() if m not in stale}
        if changed & {BUDGET, BREAKER, LIMIT}:
            self._stacks = {}
        elif stale:
            self._stacks = {m: h for m, h in self._stacks.items() if m not in stale}
        return changed

    def set_endpoints(self, endpoints: Sequence[str], versions: Mapping[str, str] | None = None) -> None:
        """Discovery changed the endpoint list, or their versions (state of remaining endpoints is kept)."""
        self.balancer.update(endpoints, versions or {})

    def snapshot(self) -> dict[str, object]:
        """For the admin endpoints: breaker state, budget, limit and endpoints of this target."""
        return {
            "service": self.service,
            "breaker": self.breaker.state,
            "retry_budget": {"balance": self.budget.balance, "in_flight": self.budget.in_flight,
                             "requests": self.budget.requests, "retries": self.budget.retries},
            "limit": {"active": self.limit.active, "pending": self.limit.pending},
            "endpoints": self.balancer.snapshot(),
            "canary": dict(self.balancer.split.weights) if self.balancer.split is not None else {},
        }


def _routes(routes: Routes) -> tuple[tuple[RoutePolicy, ...] | None, Callable[[str], RoutePolicy]]:
    """(the route table if given as one, the method -> policy lookup)."""
    if callable(routes):
        return None, routes
    table = tuple(routes)
    return table, partial(policy_for, table)  # resolved once, looked up per method
