"""stack.py: the layer order, TargetPolicy per target service, and the layers working together."""

from __future__ import annotations

import asyncio
from random import Random

import pytest
from waiting import until

from aivo_mesh.config.model import MeshSpec
from aivo_mesh.policy import CLIENT_ORDER, layer_names
from aivo_mesh.policy.core import Call, Handler, LocalReason, Reply
from aivo_mesh.policy.deadline import DeadlineLayer, DeadlineParams, attempt_timeout, effective_timeout
from aivo_mesh.policy.events import Listeners, PolicyListener
from aivo_mesh.policy.stack import TargetPolicy
from aivo_mesh.policy.testing import FakeClock, FakeSleep, RecordingListener

SVC = "auth-svc"
GRPC = "demo.auth.v1.AuthService"  # no shipped proto: the policy core does not care which methods exist
VALIDATE, LOGIN, WATCH = f"/{GRPC}/ValidateToken", f"/{GRPC}/Login", f"/{GRPC}/Watch"
A, B = "10.0.0.1:50051", "10.0.0.2:50051"


def mesh(**service: object) -> MeshSpec:
    return MeshSpec.model_validate({"services": [{
        "name": SVC, "grpc_service": GRPC, "port": 50051, "local_port": 50061, "endpoints": [A, B],
        "retry": {"max_retries": 3, "retry_on": ["UNAVAILABLE", "INTERNAL"],
                  "backoff": {"base": "10ms", "max": "50ms"}},
        "circuit_breaker": {"consecutive_failures": 5, "recovery_time": "60s"},
        "limits": {"max_requests": 1, "max_pending_requests": 1},
        "outlier_detection": {"consecutive_failures": 3, "max_ejection_percent": 50},
        "routes": [{"match": VALIDATE, "idempotent": True, "timeout": "1s"},
                   {"match": WATCH, "streaming": True}],
        **service,
    }]})


class Upstream:
    def __init__(self, clock: FakeClock, codes: dict[str, str], duration: float = 0.01) -> None:
        self.clock = clock
        self.codes = codes  # endpoint -> code
        self.duration = duration
        self.seen: list[tuple[int, str | None]] = []

    async def __call__(self, call: Call) -> Reply:
        self.seen.append((call.attempt, call.endpoint))
        timeout = attempt_timeout(call, self.clock(), call.per_try_timeout)
        if timeout is not None and self.duration >= timeout:  # grpc ends the attempt at its deadline
            self.clock.advance(max(timeout, 0.0))
            return Reply("DEADLINE_EXCEEDED")
        self.clock.advance(self.duration)
        return Reply(self.codes.get(call.endpoint or "", "OK"))


def target(clock: FakeClock, up: Upstream, listener: PolicyListener | None = None, **kw: object) -> TargetPolicy:
    return TargetPolicy.from_mesh(mesh(), SVC, up, clock=clock, rng=Random(0), sleep=FakeSleep(clock),
                                  listener=listener or RecordingListener(), inherited=lambda: None, **kw)


def test_layer_order_is_pinned() -> None:
    clock = FakeClock()
    t = target(clock, Upstream(clock, {}))
    assert layer_names(t.layers(VALIDATE)) == ["deadline", "limit", "breaker", "retry", "balancer"]
    assert list(CLIENT_ORDER) == layer_names(t.layers(LOGIN))


def test_outer_layers_sit_before_deadline() -> None:
    class Tracing:
        name = "tracing"

        def wrap(self, inner: Handler) -> Handler:
            return inner

    clock = FakeClock()
    t = target(clock, Upstream(clock, {}), outer=[Tracing()])
    assert layer_names(t.layers(VALIDATE)) == ["tracing", *CLIENT_ORDER]


def test_stacks_are_cached_per_method_and_state_is_shared() -> None:
    clock = FakeClock()
    t = target(clock, Upstream(clock, {}))
    assert t.stack_for(VALIDATE) is t.stack_for(VALIDATE)
    assert t.stack_for(VALIDATE) is not t.stack_for(LOGIN)
    # Per-route params: the idempotent route may retry INTERNAL, the other may not.
    assert t.params_for(VALIDATE).classifier.retryable == {"UNAVAILABLE", "INTERNAL"}
    assert t.params_for(LOGIN).classifier.retryable == {"UNAVAILABLE"}
    assert t.params_for(VALIDATE).deadline.route_timeout == 1.0
    assert t.params_for(WATCH).retry.max_retries == 0  # streams are not retried by the core
    assert t.balancer.endpoints == [A, B]


def test_client_wide_max_retries_caps_routes() -> None:
    clock = FakeClock()
    assert target(clock, Upstream(clock, {}), max_retries=1).params_for(VALIDATE).retry.max_retries == 1


async def test_a_retry_lands_on_the_healthy_endpoint_and_the_bad_one_is_ejected() -> None:
    clock = FakeClock()
    up = Upstream(clock, {A: "UNAVAILABLE"})
    listener = RecordingListener()
    t = target(clock, up, listener)
    handler = t.stack_for(VALIDATE)
    for _ in range(6):
        reply = await handler(Call(SVC, VALIDATE, None, timeout=5.0))
        assert reply.ok
    # Every call that hit A was retried on B; A was ejected after 3 failures; the breaker, which
    # sees the whole service, never opened.
    assert listener.named("endpoint_ejected") == [(SVC, A, 1.0)]  # the first ejection: base_ejection_time
    assert t.breaker.state == "closed"
    assert up.seen[-1] == (1, B)
    finished = listener.named("call_finished")
    assert len(finished) == 6
    assert all(f[2] == "OK" and f[5] is None for f in finished)
    assert finished[0][4] == 2  # attempts


async def test_breaker_rejection_is_local_and_never_retried() -> None:
    clock = FakeClock()
    up = Upstream(clock, {})
    listener = RecordingListener()
    t = target(clock, up, listener)
    t.breaker.force_open()
    reply = await t.stack_for(VALIDATE)(Call(SVC, VALIDATE, None))
    assert (reply.code, reply.local) == ("UNAVAILABLE", LocalReason.CIRCUIT_OPEN)
    assert "Circuit breaker OPEN" in reply.details
    assert up.seen == []
    assert listener.named("retry") == []
    assert t.budget.requests == 0  # refused before retry: it never counted as a request


async def test_the_breaker_counts_calls_not_attempts() -> None:
    # Both endpoints down: each call makes 4 attempts (3 retries, within the budget's 3 concurrent
    # retries), but only its final outcome counts. 16 failed attempts in 4 calls leave the breaker
    # closed; the 5th failed call opens it; the 6th fails fast without an attempt.
    clock = FakeClock()
    up = Upstream(clock, {A: "UNAVAILABLE", B: "UNAVAILABLE"})
    listener = RecordingListener()
    t = TargetPolicy.from_mesh(mesh(outlier_detection={"consecutive_failures": 100}), SVC, up, clock=clock,
                               rng=Random(0), sleep=FakeSleep(clock), listener=listener, inherited=lambda: None)
    handler = t.stack_for(LOGIN)
    for _ in range(4):
        assert (await handler(Call(SVC, LOGIN, None))).code == "UNAVAILABLE"
    assert len(up.seen) == 16
    assert t.breaker.state == "closed"
    assert len(listener.named("breaker_failure")) == 4
    await handler(Call(SVC, LOGIN, None))
    assert t.breaker.state == "open"
    reply = await handler(Call(SVC, LOGIN, None))
    assert reply.local and "Circuit breaker OPEN" in reply.details
    assert len(up.seen) == 20


async def test_a_call_retried_to_success_is_a_success_for_the_breaker() -> None:
    # The first attempts of 10 calls in a row time out (a stalled endpoint's per-try timeouts) and
    # every retry succeeds. Counted per attempt that was 10 failures; per call it is none.
    clock = FakeClock()

    async def first_attempt_times_out(call: Call) -> Reply:
        return Reply("DEADLINE_EXCEEDED" if call.attempt == 1 else "OK")

    t = TargetPolicy.from_mesh(mesh(retry={"max_retries": 3, "retry_on": ["DEADLINE_EXCEEDED"]},
                                    outlier_detection={"consecutive_failures": 100}),
                               SVC, first_attempt_times_out, clock=clock, rng=Random(0), sleep=FakeSleep(clock),
                               inherited=lambda: None)
    for _ in range(10):
        assert (await t.stack_for(VALIDATE)(Call(SVC, VALIDATE, None))).ok
    assert t.breaker.state == "closed"


async def test_limit_slot_is_held_across_retries() -> None:
    clock = FakeClock()
    active: list[int] = []
    t: TargetPolicy

    async def flaky(call: Call) -> Reply:
        active.append(t.limit.active)
        return Reply("UNAVAILABLE" if call.attempt < 3 else "OK")

    t = TargetPolicy.from_mesh(mesh(), SVC, flaky, clock=clock, rng=Random(0), sleep=FakeSleep(clock),
                               inherited=lambda: None)
    assert (await t.stack_for(VALIDATE)(Call(SVC, VALIDATE, None))).ok
    assert active == [1, 1, 1]
    assert t.limit.active == 0


async def test_limit_rejection_reaches_the_caller_unretried() -> None:
    clock = FakeClock()
    gate = asyncio.Event()
    calls = 0

    async def slow(call: Call) -> Reply:
        nonlocal calls
        calls += 1
        await gate.wait()
        return Reply("OK")

    t = TargetPolicy.from_mesh(mesh(), SVC, slow, clock=clock, rng=Random(0), sleep=FakeSleep(clock),
                               inherited=lambda: None)
    first = asyncio.ensure_future(t.stack_for(VALIDATE)(Call(SVC, VALIDATE, None)))
    queued = asyncio.ensure_future(t.stack_for(VALIDATE)(Call(SVC, VALIDATE, None)))
    await until(lambda: t.limit.pending == 1, what="the second call queued for the one slot")
    # max_requests 1 and one waiting, one limit per service: UNAVAILABLE, as Envoy's overflow.
    third = await t.stack_for(LOGIN)(Call(SVC, LOGIN, None))
    assert (third.code, third.local) == ("UNAVAILABLE", LocalReason.MAX_PENDING_REQUESTS)
    gate.set()
    assert (await first).ok and (await queued).ok
    assert calls == 2  # the refused call was neither sent nor retried


async def test_deadline_and_call_events() -> None:
    clock = FakeClock()
    up = Upstream(clock, {A: "UNAVAILABLE", B: "UNAVAILABLE"}, duration=0.3)
    listener = RecordingListener()
    t = target(clock, up, listener)
    c = Call(SVC, VALIDATE, None, timeout=10.0)  # the route's 1 s wins
    start = clock()
    reply = await t.stack_for(VALIDATE)(c)
    assert reply.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    assert c.deadline == start + 1.0
    assert clock() <= c.deadline
    assert listener.named("call_started") == [(SVC, VALIDATE)]
    [(_, _, code, seconds, attempts, local)] = listener.named("call_finished")
    assert (code, attempts, local) == (reply.code, len(up.seen), reply.local)
    assert seconds == pytest.approx(clock() - start)


async def test_deadline_already_passed_is_local() -> None:
    clock = FakeClock()
    layer = DeadlineLayer(DeadlineParams(route_timeout=5.0), inherited=lambda: -1.0, clock=clock)

    async def never(call: Call) -> Reply:
        raise AssertionError("not called")

    reply = await layer.wrap(never)(Call(SVC, VALIDATE, None))
    assert (reply.code, reply.local) == ("DEADLINE_EXCEEDED", LocalReason.DEADLINE)


def test_effective_timeout() -> None:
    assert effective_timeout(None, None, None) is None
    assert effective_timeout(3.0, None, None) == 3.0
    assert effective_timeout(None, 2.0, 4.0) == 2.0
    assert effective_timeout(5.0, 2.0, 1.0) == 1.0


async def test_snapshot_and_endpoint_updates() -> None:
    clock = FakeClock()
    t = target(clock, Upstream(clock, {}))
    t.set_endpoints([B, "10.0.0.9:50051"])
    snap = t.snapshot()
    assert snap["breaker"] == "closed"
    assert [e["endpoint"] for e in snap["endpoints"]] == [B, "10.0.0.9:50051"]  # type: ignore[attr-defined]
    assert snap["limit"] == {"active": 0, "pending": 0}


def test_listeners_fan_out_and_survive_a_failing_listener(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(PolicyListener):
        def breaker_state(self, service: str, old: str, new: str) -> None:
            raise RuntimeError("boom")

    a, b = RecordingListener(), RecordingListener()
    fan = Listeners(a, Broken())
    fan.add(b)
    fan.breaker_state(SVC, "closed", "open")
    fan.retry(SVC, VALIDATE, 2, "UNAVAILABLE", 0.1)
    fan.call_finished(SVC, VALIDATE, "OK", 0.5, 1, None)
    for r in (a, b):
        assert r.events == [("breaker_state", SVC, "closed", "open"), ("retry", SVC, VALIDATE, 2, "UNAVAILABLE", 0.1),
                            ("call_finished", SVC, VALIDATE, "OK", 0.5, 1, None)]
    assert "Broken" in caplog.text


def test_listeners_implement_every_event() -> None:
    events = [name for name in vars(PolicyListener) if not name.startswith("_")]
    assert len(events) == 11
    for name in events:
        assert name in vars(Listeners), name
