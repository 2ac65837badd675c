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
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from random import Random
from typing import Any

from aivo_mesh.config.model import MeshSpec
from aivo_mesh.config.resolve import RoutePolicy, ServicePolicy, policy_for, route_policies, service_policy
from aivo_mesh.policy import bind
from aivo_mesh.policy.balancer import Balancer, BalancerLayer
from aivo_mesh.policy.breaker import BreakerLayer, CircuitBreaker
from aivo_mesh.policy.budget import Budget, RetryBudget
from aivo_mesh.policy.classify import Classifier
from aivo_mesh.policy.core import Call, Clock, Handler, Layer, build_stack, monotonic
from aivo_mesh.policy.deadline import DeadlineLayer, DeadlineParams
from aivo_mesh.policy.events import NOOP, PolicyListener
from aivo_mesh.policy.limit import ConcurrencyLimit, LimitLayer
from aivo_mesh.policy.retry import RetryLayer, RetryParams, Sleeper

__all__ = ["Handler", "Layer", "MethodParams", "TargetPolicy", "build_stack", "client_layers", "layer_names"]

CLIENT_ORDER: tuple[str, ...] = ("deadline", "limit", "breaker", "retry", "balancer")


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
    deadline = params.deadline

    def deadline_for(_: Call) -> DeadlineParams:
        return deadline

    return [
        DeadlineLayer(deadline_for, inherited, clock, listener=None if listener is NOOP else listener),
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

    def __init__(self, policy: ServicePolicy, route_for: Callable[[str], RoutePolicy], terminal: Handler, *,
                 endpoints: Sequence[str] | None = None, max_retries: int | None = None,
                 clock: Clock = monotonic, rng: Random | None = None, sleep: Sleeper = asyncio.sleep,
                 listener: PolicyListener = NOOP, inherited: Callable[[], float | None] | None = None,
                 outer: Sequence[Layer] = ()) -> None:
        spec = policy.service
        self.service = spec.name
        self.policy = policy
        self.route_for = route_for
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
        self.breaker = CircuitBreaker(self.service, bind.breaker_params(policy.circuit_breaker), clock=clock,
                                      listener=listener, rng=self.rng)
        self.limit = ConcurrencyLimit(self.service, bind.limit_params(policy.limits))
        addresses = list(endpoints) if endpoints is not None else (
            list(spec.endpoints) or [f"{spec.host}:{spec.port}"])
        self.balancer = Balancer(self.service, addresses, rule=bind.outlier_rule(policy.outlier_detection),
                                 health=bind.health_rule(policy.health_check), clock=clock, listener=listener)
        self._params: dict[str, MethodParams] = {}
        self._stacks: dict[str, Handler] = {}

    @classmethod
    def from_mesh(cls, mesh: MeshSpec, service: str, terminal: Handler, **kwargs: Any) -> TargetPolicy:
        """From mesh.yaml: the service's effective policy and its routes (config/resolve.py)."""
        routes = partial(policy_for, route_policies(mesh, service))  # resolved once, looked up per method
        return cls(service_policy(mesh, service), routes, terminal, **kwargs)

    def params_for(self, method: str) -> MethodParams:
        p = self._params.get(method)
        if p is None:
            deadline, retry = bind.route_params(self.policy, self.route_for(method), self.max_retries)
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

    def set_endpoints(self, endpoints: Sequence[str]) -> None:
        """Discovery changed the endpoint list (state of remaining endpoints is kept)."""
        self.balancer.update(endpoints)

    def snapshot(self) -> dict[str, object]:
        """For the admin endpoints: breaker state, budget, limit and endpoints of this target."""
        return {
            "service": self.service,
            "breaker": self.breaker.state,
            "retry_budget": {"balance": self.budget.balance, "in_flight": self.budget.in_flight,
                             "requests": self.budget.requests, "retries": self.budget.retries},
            "limit": {"active": self.limit.active, "pending": self.limit.pending},
            "endpoints": self.balancer.snapshot(),
        }
