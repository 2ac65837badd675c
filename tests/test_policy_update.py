"""Live policy changes (TargetPolicy.update, Target.update, MeshClient.apply_policies): only what changed
is replaced, what did not keeps its state, calls in flight finish under the policy they started with.

The unit tests drive TargetPolicy with a fake clock and a fake terminal; the end-to-end ones run a real
MeshClient against a real MeshServer over mTLS on 127.0.0.1, whose allow rules change too."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from random import Random
from typing import Any

import grpc
import pytest
from waiting import until

from aivo_mesh import MeshClient, MeshConfig, MeshServer
from aivo_mesh.config import parse_mesh
from aivo_mesh.config.model import MeshSpec
from aivo_mesh.config.resolve import RoutePolicy, route_policies, service_policy
from aivo_mesh.pki import CertLayout
from aivo_mesh.policy.classify import FAILURE, SUCCESS
from aivo_mesh.policy.core import Call, LocalReason, Reply
from aivo_mesh.policy.deadline import attempt_timeout
from aivo_mesh.policy.stack import PARTS, TargetPolicy
from aivo_mesh.policy.testing import FakeClock, FakeSleep, RecordingListener
from aivo_mesh.runtime.local import free_port
from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc
from aivo_mesh.telemetry.metrics import MeshMetrics

SVC = "auth-svc"
GRPC = "demo.auth.v1.AuthService"
VALIDATE, LOGIN = f"/{GRPC}/ValidateToken", f"/{GRPC}/Login"
A, B = "10.0.0.1:50051", "10.0.0.2:50051"

BASE: dict[str, Any] = {
    "name": SVC, "grpc_service": GRPC, "port": 50051, "local_port": 50061, "endpoints": [A, B],
    "retry": {"max_retries": 3, "retry_on": ["UNAVAILABLE"], "backoff": {"base": "10ms", "max": "50ms"}},
    "retry_budget": {"percent": 20, "min_retry_concurrency": 3, "window": "10s"},
    "circuit_breaker": {"consecutive_failures": 5, "first_probe": "1s", "recovery_time": "60s"},
    "limits": {"max_requests": 1, "max_pending_requests": 1, "max_retries": 10},
    "outlier_detection": {"consecutive_failures": 3, "base_ejection_time": "30s", "max_ejection_time": "300s",
                          "max_ejection_percent": 50},
    "health_check": {"unhealthy_threshold": 3, "healthy_threshold": 2},
    "routes": [{"match": VALIDATE, "idempotent": True, "timeout": "1s",
                "retry": {"retry_on": ["UNAVAILABLE", "DEADLINE_EXCEEDED"], "per_try_timeout": "500ms"}}],
}


def spec(**edits: Any) -> dict[str, Any]:
    """BASE with some keys replaced: `spec(limits={...})`, or a route's keys with `route={...}`."""
    s = copy.deepcopy(BASE)
    route = edits.pop("route", None)
    if route is not None:
        s["routes"][0] = {**s["routes"][0], **route}
    s.update(edits)
    return s


def mesh(service: dict[str, Any] | None = None) -> MeshSpec:
    return MeshSpec.model_validate({"services": [service or spec()]})


class Upstream:
    """A fake terminal: answers `code` (per endpoint, else OK); while `gate` is set, every attempt
    waits for it first and is recorded in `waiting`."""

    def __init__(self, clock: FakeClock, codes: dict[str, str] | None = None) -> None:
        self.clock = clock
        self.codes = codes or {}
        self.gate: asyncio.Event | None = None
        self.seen: list[tuple[str, int, float | None]] = []  # (method, attempt, its timeout)
        self.waiting = 0

    async def __call__(self, call: Call) -> Reply:
        self.seen.append((call.method, call.attempt, attempt_timeout(call, self.clock(), call.per_try_timeout)))
        if self.gate is not None:
            self.waiting += 1
            try:
                await self.gate.wait()
            finally:
                self.waiting -= 1
        return Reply(self.codes.get(call.endpoint or "", "OK"))


def target(clock: FakeClock, up: Upstream, listener: RecordingListener | None = None,
           service: dict[str, Any] | None = None) -> TargetPolicy:
    return TargetPolicy.from_mesh(mesh(service), SVC, up, clock=clock, rng=Random(0), sleep=FakeSleep(clock),
                                  listener=listener or RecordingListener(), inherited=lambda: None)


def update(t: TargetPolicy, service: dict[str, Any]) -> set[str]:
    m = mesh(service)
    return t.update(service_policy(m, SVC), route_policies(m, SVC))


async def waiting(up: Upstream, n: int) -> None:
    """Until `n` attempts wait in the upstream (bounded: a broken test fails, it does not hang)."""
    async with asyncio.timeout(10.0):
        while up.waiting < n:
            await asyncio.sleep(0)


async def call(t: TargetPolicy, method: str = VALIDATE) -> Reply:
    return await t.stack_for(method)(Call(SVC, method, None, timeout=5.0))


async def open_breaker(t: TargetPolicy, up: Upstream) -> None:
    """5 failed calls: DATA_LOSS is a failure for the breaker and never retried."""
    up.codes = {A: "DATA_LOSS", B: "DATA_LOSS"}
    for _ in range(5):
        assert (await call(t, LOGIN)).code == "DATA_LOSS"
    up.codes = {}
    assert t.breaker.state == "open"


# -- comparing policies -----------------------------------------------------------------------
def test_policies_and_route_tables_compare_by_value() -> None:
    """Two parses of the same mesh give equal ServicePolicy and route tables (frozen dataclasses over
    pydantic models, which compare by value), so a fresh lookup of an equal mesh is seen as equal."""
    one, two = mesh(), mesh()
    assert service_policy(one, SVC) == service_policy(two, SVC)
    assert route_policies(one, SVC) == route_policies(two, SVC)
    assert route_policies(one, SVC) != route_policies(mesh(spec(route={"timeout": "2s"})), SVC)
    assert service_policy(one, SVC) != service_policy(mesh(spec(limits={"max_requests": 2})), SVC)


async def test_an_equal_update_changes_nothing_and_keeps_every_cached_stack() -> None:
    clock = FakeClock()
    t = target(clock, Upstream(clock))
    stacks = {m: t.stack_for(m) for m in (VALIDATE, LOGIN)}
    params = {m: t.params_for(m) for m in (VALIDATE, LOGIN)}
    def parts() -> list[int]:
        return [id(p) for p in (t.budget, t.breaker, t.limit, t.balancer, t.balancer.detector.rule,
                                t.balancer.health)]

    before = parts()
    assert update(t, spec()) == set()  # a fresh parse of the same mesh
    assert all(t.stack_for(m) is stacks[m] and t.params_for(m) is params[m] for m in stacks)
    assert parts() == before  # the same objects
    # A change outside the parts' parameters (an allow rule, max_connections) replaces nothing either.
    assert update(t, spec(allow=[{"from": ["mesh-client"]}],
                          limits={**BASE["limits"], "max_connections": 7})) == set()
    assert t.stack_for(VALIDATE) is stacks[VALIDATE]


# -- what each change replaces, and what it keeps ---------------------------------------------
async def test_an_open_breaker_stays_open_across_a_route_change_and_probes_at_its_own_time() -> None:
    clock = FakeClock()
    up = Upstream(clock)
    t = target(clock, up)
    await open_breaker(t, up)
    breaker, old_stack = t.breaker, t.stack_for(VALIDATE)
    probe_in = t.breaker.next_probe_in
    assert probe_in is not None and probe_in > 0.01

    assert update(t, spec(route={"timeout": "3s"})) == {"routes"}
    assert t.breaker is breaker and t.breaker.state == "open" and t.breaker.next_probe_in == probe_in
    assert t.stack_for(VALIDATE) is not old_stack
    assert t.params_for(VALIDATE).deadline.route_timeout == 3.0
    reply = await call(t)
    assert reply.local is LocalReason.CIRCUIT_OPEN  # the new stack holds the same open breaker
    clock.advance(probe_in - 0.01)
    assert (await call(t)).local is LocalReason.CIRCUIT_OPEN
    clock.advance(0.01)  # the time the probe was due before the update
    assert (await call(t)).ok
    assert t.breaker.state == "closed"


async def test_changing_the_breaker_resets_only_the_breaker() -> None:
    clock = FakeClock()
    up = Upstream(clock)
    listener = RecordingListener()
    t = target(clock, up, listener)
    for _ in range(4):
        assert (await call(t)).ok
    await open_breaker(t, up)
    t.balancer.set_health(B, False)
    budget, limit, balancer, old_breaker = t.budget, t.limit, t.balancer, t.breaker
    requests, balance = budget.requests, budget.balance
    assert requests == 9 and balance == 1
    ejected = [e["endpoint"] for e in balancer.snapshot() if e["ejected"]]
    assert ejected  # 5 failed attempts over 2 endpoints (3 in a row eject one)
    old_stack = t.stack_for(LOGIN)

    assert update(t, spec(circuit_breaker={"consecutive_failures": 2, "recovery_time": "30s"})) == {"breaker"}
    assert t.breaker is not old_breaker and t.breaker.state == "closed" and t.breaker.params.consecutive_failures == 2
    assert listener.named("breaker_state")[-1] == (SVC, "open", "closed")  # the gauge follows
    # Everything else is the same object with the same state.
    assert (t.budget, t.limit, t.balancer) == (budget, limit, balancer)
    assert (budget.requests, budget.balance) == (requests, balance)
    assert [e["endpoint"] for e in balancer.snapshot() if e["ejected"]] == ejected
    assert balancer.state(B) is not None and not balancer.state(B).healthy  # type: ignore[union-attr]
    # New calls run on the new breaker; the old stack still holds the old, open one, which no longer
    # reports anything (a late transition of it must not overwrite the gauge).
    assert t.stack_for(LOGIN) is not old_stack
    assert (await call(t, LOGIN)).ok
    events = len(listener.events)
    assert (await old_stack(Call(SVC, LOGIN, None, timeout=5.0))).local is LocalReason.CIRCUIT_OPEN
    clock.advance(120.0)
    assert (await old_stack(Call(SVC, LOGIN, None, timeout=5.0))).ok  # its probe closes it, silently
    assert old_breaker.state == "closed"
    assert not [e for e in listener.events[events:] if e[0] in ("breaker_state", "breaker_failure")]


async def test_the_budget_keeps_its_window_across_a_breaker_change_and_is_replaced_on_its_own() -> None:
    clock = FakeClock()
    up = Upstream(clock)
    t = target(clock, up)
    for _ in range(10):
        assert (await call(t)).ok
    budget = t.budget
    assert (budget.requests, budget.balance) == (10, 2)
    assert update(t, spec(circuit_breaker={"consecutive_failures": 9})) == {"breaker"}
    assert t.budget is budget and (budget.requests, budget.balance) == (10, 2)
    # limits.max_retries is the budget's cap on retries in flight: a new budget, the same limit.
    limit = t.limit
    assert update(t, spec(circuit_breaker={"consecutive_failures": 9},
                          limits={**BASE["limits"], "max_retries": 2})) == {"budget"}
    assert t.budget is not budget and t.budget.params.max_concurrent_retries == 2
    assert t.budget.requests == 0 and t.limit is limit
    assert update(t, spec(circuit_breaker={"consecutive_failures": 9}, limits={**BASE["limits"], "max_retries": 2},
                          retry_budget={"percent": 50})) == {"budget"}
    assert t.budget.params.percent == 50


async def test_failure_codes_rebuild_the_routes_classifiers_but_keep_the_breaker() -> None:
    clock = FakeClock()
    t = target(clock, Upstream(clock))
    breaker = t.breaker
    assert t.params_for(LOGIN).classifier.table["DATA_LOSS"] is FAILURE
    codes = ["UNAVAILABLE", "DEADLINE_EXCEEDED"]
    assert update(t, spec(circuit_breaker={**BASE["circuit_breaker"], "failure_codes": codes})) == {"routes"}
    assert t.breaker is breaker
    assert t.params_for(LOGIN).classifier.table["DATA_LOSS"] is SUCCESS  # no failure any more


async def test_a_route_change_rebuilds_only_the_methods_it_covers() -> None:
    clock = FakeClock()
    t = target(clock, Upstream(clock))
    validate, login = t.stack_for(VALIDATE), t.stack_for(LOGIN)
    assert update(t, spec(route={"timeout": "2s"})) == {"routes"}
    assert t.stack_for(VALIDATE) is not validate and t.stack_for(LOGIN) is login
    # A route for a method not used yet: the table changed, no stack did.
    login = t.stack_for(LOGIN)
    other = {"match": f"/{GRPC}/Refresh", "timeout": "9s"}
    assert update(t, spec(route={"timeout": "2s"}, routes=[*spec(route={"timeout": "2s"})["routes"], other])) \
        == {"routes"}
    assert t.stack_for(LOGIN) is login
    assert t.params_for(f"/{GRPC}/Refresh").deadline.route_timeout == 9.0


async def test_routes_given_as_a_function_are_compared_per_method_used() -> None:
    clock = FakeClock()
    base = service_policy(mesh(), SVC)

    def routes(timeout: float) -> Any:
        def route_for(method: str) -> RoutePolicy:  # a fresh function each time, as a client builds it
            return RoutePolicy(SVC, pattern=method, match=None, timeout=timeout, retry=base.retry,
                               idempotent=False, streaming=False)
        return route_for

    t = TargetPolicy(base, routes(1.0), Upstream(clock), clock=clock, inherited=lambda: None)
    stack = t.stack_for(LOGIN)
    assert t.update(base, routes(1.0)) == set() and t.stack_for(LOGIN) is stack
    assert t.update(base, routes(2.0)) == {"routes"} and t.stack_for(LOGIN) is not stack
    assert t.params_for(LOGIN).deadline.route_timeout == 2.0


async def test_a_new_limit_for_new_calls_while_calls_in_flight_release_into_the_old_one() -> None:
    clock = FakeClock()
    up = Upstream(clock)
    t = target(clock, up)
    up.gate = asyncio.Event()
    old_limit = t.limit
    first = asyncio.create_task(call(t))
    await waiting(up, 1)
    assert old_limit.active == 1
    queued = asyncio.create_task(call(t))
    await until(lambda: old_limit.pending == 1, what="a call queued in the old limit")
    assert (await call(t)).code == "UNAVAILABLE"  # max_requests 1, one waiting: overflow

    assert update(t, spec(limits={**BASE["limits"], "max_requests": 2, "max_pending_requests": 5})) == {"limit"}
    assert t.limit is not old_limit and t.limit.params.max_requests == 2
    second = asyncio.create_task(call(t))
    await waiting(up, 2)
    assert (old_limit.active, t.limit.active) == (1, 1)
    up.gate.set()
    assert (await first).ok and (await second).ok and (await queued).ok  # the queued call ran in the old limit
    assert (old_limit.active, t.limit.active) == (0, 0)


async def test_a_call_in_flight_keeps_its_retries_and_per_try_timeout_while_a_new_call_uses_the_new() -> None:
    clock = FakeClock()
    up = Upstream(clock, {A: "UNAVAILABLE", B: "UNAVAILABLE"})
    limits = {**BASE["limits"], "max_requests": 10}
    t = target(clock, up, service=spec(limits=limits))
    up.gate = asyncio.Event()
    old = asyncio.create_task(call(t))
    await waiting(up, 1)

    assert update(t, spec(limits=limits, route={"timeout": "1s", "retry": {
        "retry_on": ["UNAVAILABLE", "DEADLINE_EXCEEDED"], "per_try_timeout": "200ms", "max_retries": 1}})) == {"routes"}
    new = asyncio.create_task(call(t))
    await waiting(up, 2)
    up.gate.set()
    assert (await old).code == "UNAVAILABLE" and (await new).code == "UNAVAILABLE"
    # Each attempt records its own timeout: the old call's 4 attempts at most 500 ms each, the new
    # call's 2 at most 200 ms (interleaved, so told apart by their per-try timeout).
    first, second = up.seen[0], up.seen[1]
    assert (first[1], first[2]) == (1, 0.5) and (second[1], second[2]) == (1, 0.2)
    old_attempts = [a for _, a, timeout in up.seen if timeout is not None and timeout > 0.2]
    new_attempts = [a for _, a, timeout in up.seen if timeout is not None and timeout <= 0.2]
    assert old_attempts == [1, 2, 3, 4] and new_attempts == [1, 2]


async def test_outlier_and_health_rules_change_in_place_keeping_ejections_and_health() -> None:
    clock = FakeClock()
    up = Upstream(clock, {A: "UNAVAILABLE"})
    listener = RecordingListener()
    t = target(clock, up, listener)
    for _ in range(3):
        assert (await call(t)).ok  # each retried from A to B
    a = t.balancer.state(A)
    assert a is not None and a.ejected_until is not None
    until, times = a.ejected_until, a.times_ejected
    t.balancer.set_health(B, False)
    stack, balancer = t.stack_for(VALIDATE), t.balancer

    assert update(t, spec(outlier_detection={**BASE["outlier_detection"], "consecutive_failures": 4},
                          health_check={"unhealthy_threshold": 3, "healthy_threshold": 1})) == {"outlier", "health"}
    assert t.balancer is balancer and t.stack_for(VALIDATE) is stack  # nothing rebuilt
    assert (a.ejected_until, a.times_ejected) == (until, times)
    assert balancer.detector.rule is not None and balancer.detector.rule.consecutive_failures == 4
    assert not balancer.state(B).healthy  # type: ignore[union-attr]
    assert balancer.report_check(B, True)  # the new healthy_threshold (1) applies from the next check

    # A lower max_ejection_time ends a longer ejection no later than that from now.
    assert update(t, spec(outlier_detection={**BASE["outlier_detection"], "consecutive_failures": 4,
                                             "base_ejection_time": "5s", "max_ejection_time": "10s"},
                          health_check={"unhealthy_threshold": 3, "healthy_threshold": 1})) == {"outlier"}
    assert a.ejected_until == clock() + 10.0
    clock.advance(10.0)
    assert [e["ejected"] for e in balancer.snapshot()] == [False, False]
    assert listener.named("endpoint_restored") == [(SVC, A)]


def test_the_part_names_are_the_documented_ones() -> None:
    assert PARTS == ("routes", "budget", "breaker", "limit", "outlier", "health", "canary")


# -- MeshClient and Target: the Invoker's cache, a real server --------------------------------
class SlowOnDemand(auth_pb2_grpc.AuthServiceServicer):
    """ValidateToken answers at once, unless its token is "slow": then it waits for `release`."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.slow = 0  # slow calls that arrived

    async def ValidateToken(self, request: auth_pb2.ValidateTokenRequest, context: grpc.aio.ServicerContext
                            ) -> auth_pb2.ValidateTokenResponse:
        if request.token == "slow":
            self.slow += 1
            await self.release.wait()
        return auth_pb2.ValidateTokenResponse(valid=True)


def live_mesh(port: int, validate_timeout: str = "30s", learner_allowed: bool = True,
              health_interval: str = "30s") -> MeshSpec:
    """A mesh whose auth-svc listens on `port`; its ValidateToken route has `validate_timeout` and no
    per-try timeout or retries (a cut attempt is the caller's DEADLINE_EXCEEDED). Without
    `learner_allowed`, its allow rule for learner-svc is gone."""
    text = (Path(__file__).resolve().parents[1] / "mesh.yaml").read_text().replace("port: 50051", f"port: {port}")
    text = text.replace("timeout: 1s\n        idempotent: true\n        retry: {retry_on: [UNAVAILABLE, "
                        "RESOURCE_EXHAUSTED, INTERNAL, DEADLINE_EXCEEDED], per_try_timeout: 500ms}",
                        f"timeout: {validate_timeout}\n        idempotent: true\n        retry: {{max_retries: 0}}")
    assert f"timeout: {validate_timeout}\n        idempotent: true" in text
    text = text.replace("health_check:\n    interval: 30s", f"health_check:\n    interval: {health_interval}")
    if not learner_allowed:
        rule = "- from: [learner-svc, analytics-svc]"
        assert rule in text
        text = text.replace(rule, "- from: [analytics-svc]")
    return parse_mesh(text, "mesh.yaml")


@pytest.fixture
async def live(mesh_certs: CertLayout) -> AsyncIterator[tuple[MeshSpec, SlowOnDemand, MeshClient, MeshServer]]:
    m = live_mesh(free_port())
    server = MeshServer.for_service(m, "auth-svc", mesh_certs)
    servicer = SlowOnDemand()
    auth_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server.grpc_server)
    await server.start()
    client = MeshClient(MeshConfig.for_identity("learner-svc", mesh_certs, m), health_checks=False,
                        metrics=MeshMetrics())
    try:
        yield m, servicer, client, server
    finally:
        servicer.release.set()
        await client.close()
        await server.stop(0.5)


async def test_apply_policies_drops_the_invokers_stacks_only_when_something_changed(live, caplog) -> None:
    m, _, client, _ = live
    path = "/aivo.auth.v1.AuthService/ValidateToken"
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    assert (await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="t"))).valid
    target = client.target("auth-svc")
    methods = target.invoker._methods
    stack = next(iter(methods.values()))[2]
    assert client.apply_policies(live_mesh(m.service("auth-svc").port)) == {"auth-svc": set()}  # a fresh parse
    assert target.invoker._methods is methods and target.stack_for(path) is stack

    caplog.set_level(logging.DEBUG, logger="aivo_mesh.client.client")
    changed = client.apply_policies(live_mesh(m.service("auth-svc").port, validate_timeout="2s"))
    assert changed == {"auth-svc": {"routes"}}
    assert "policy update for auth-svc: routes" in caplog.text
    assert target.invoker._methods == {}  # rebuilt on the next call, from the new policy
    assert (await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="t"))).valid
    assert target.stack_for(path) is not stack and target.policy.params_for(path).deadline.route_timeout == 2.0

    # Parts that change in place keep the Invoker's stacks; endpoints follow mesh.yaml's.
    port = m.service("auth-svc").port
    methods = target.invoker._methods
    assert client.apply_policies(live_mesh(port, "2s", health_interval="20s")) == {"auth-svc": {"health"}}
    assert target.health_interval == 20.0 and target.invoker._methods is methods
    moved = free_port()
    assert client.apply_policies(live_mesh(moved, "2s", health_interval="20s")) == {"auth-svc": {"endpoints"}}
    assert [e.rsplit(":", 1)[1] for e in target.policy.balancer.endpoints] == [str(moved)]


async def test_a_shortened_route_timeout_applies_to_the_next_call_and_fails_none_of_the_steady_traffic(live) -> None:
    """Steady concurrent calls while the route's timeout drops from 30 s to 1 s: none fails; the slow
    call started before the update still ends OK under its 30 s, a slow call after it gets
    DEADLINE_EXCEEDED (the server holds slow calls until the end of the test)."""
    m, servicer, client, _ = live
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    stop = asyncio.Event()
    done: list[int] = []
    errors: list[BaseException] = []

    async def steady() -> None:
        while not stop.is_set():
            try:
                assert (await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="t"))).valid
            except Exception as exc:  # every failure is the test's failure
                errors.append(exc)
            done.append(1)

    workers = [asyncio.create_task(steady()) for _ in range(8)]
    slow_before = asyncio.ensure_future(stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="slow")))
    while len(done) < 40 or servicer.slow < 1:
        await asyncio.sleep(0.01)
    before = len(done)

    assert client.apply_policies(live_mesh(m.service("auth-svc").port, validate_timeout="1s")) == {
        "auth-svc": {"routes"}}
    while len(done) < before + 40:
        await asyncio.sleep(0.01)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="slow"))
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stop.set()
    await asyncio.gather(*workers)
    servicer.release.set()
    assert (await slow_before).valid  # in flight across the update: still under the old 5 s
    assert errors == []
    assert client.metrics is not None
    gauge = [v for name, labels, v in client.metrics.samples()
             if name == "circuit_breaker_state" and labels == {"service": "auth-svc"}]
    assert gauge == [0.0]


async def test_a_removed_allow_rule_denies_the_next_call_and_not_the_one_in_flight(live) -> None:
    m, servicer, client, server = live
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    assert (await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="t"))).valid  # learner-svc may
    in_flight = asyncio.ensure_future(stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="slow")))
    async with asyncio.timeout(10.0):
        while servicer.slow < 1:
            await asyncio.sleep(0.01)

    port = m.service("auth-svc").port
    assert server.update_authorizer(live_mesh(port)) is False  # the same rules: nothing to do
    assert server.update_authorizer(live_mesh(port, learner_allowed=False)) is True
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="t"))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "learner-svc" in (exc.value.details() or "")
    servicer.release.set()
    assert (await in_flight).valid  # admitted before the change: it keeps its decision
    assert server.update_authorizer(m) is True  # and back
    assert (await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="t"))).valid
