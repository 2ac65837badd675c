"""Client policies against fault-injecting servers over real mTLS on 127.0.0.1.

The unit tests in test_policy_*.py pin the rules with a fake clock; these show the same rules hold
end to end through grpc.aio: stubs from `get_channel` and `call_with_retry` alike.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from faults import FaultPlan, FaultyAuth, TcpProxy
from grpc_health.v1 import health_pb2
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from waiting import until

from aivo_mesh import CircuitOpen, MeshClient, MeshConfig, MeshServer, RetriesExhausted
from aivo_mesh.config import MeshSpec, parse_mesh
from aivo_mesh.config.model import TracingSpec
from aivo_mesh.config.resolve import longest_timeout
from aivo_mesh.discovery.snapshot import Endpoint, SnapshotStore
from aivo_mesh.errors import DeadlineExceeded, MeshError
from aivo_mesh.pki import CertLayout
from aivo_mesh.policy.core import ATTEMPT_HEADER
from aivo_mesh.policy.deadline import inbound_deadline
from aivo_mesh.policy.events import PolicyListener
from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc, events_pb2, events_pb2_grpc
from aivo_mesh.telemetry.tracing import ClientTracingLayer, Tracing, current_trace_ids

ROOT = Path(__file__).resolve().parents[1]

TEST_POLICY = """
  retry: {max_retries: 3, backoff: {base: 10ms, max: 50ms}, retry_on: [UNAVAILABLE]}
  circuit_breaker: {consecutive_failures: 5, first_probe: 100ms, recovery_time: 400ms, half_open_max_calls: 1}
  outlier_detection: {consecutive_failures: 5, base_ejection_time: 60s, max_ejection_time: 60s,
                      max_ejection_percent: 50}
  health_check: {interval: 60s, timeout: 1s}
"""


def _mesh(timeout: str = "2s", health_check: str = "{interval: 60s, timeout: 1s}", extra: str = "") -> MeshSpec:
    """mesh.yaml with short back-off and breaker recovery so the real clock can be used; `extra` adds
    lines to `defaults`."""
    text = (ROOT / "mesh.yaml").read_text()
    head, _, rest = text.partition("defaults:\n")
    _, _, tail = rest.partition("\nkeepalive:")
    policy = TEST_POLICY.replace("{interval: 60s, timeout: 1s}", health_check) + extra
    text = f"{head}defaults:\n  timeout: {timeout}{policy}\nkeepalive:{tail}"
    return parse_mesh(text, "mesh.yaml")


async def _serve(mesh: MeshSpec, certs: CertLayout, plan: FaultPlan, name: str,
                 service: str = "auth-svc") -> MeshServer:
    server = MeshServer.for_service(mesh, service, certs, port=0)
    faulty = FaultyAuth(plan, name)
    auth_pb2_grpc.add_AuthServiceServicer_to_server(faulty, server.grpc_server)
    events_pb2_grpc.add_EventCollectorServiceServicer_to_server(faulty, server.grpc_server)
    server.add_service_name("aivo.auth.v1.AuthService")
    await server.start()
    return server


class Recorder(PolicyListener):
    def __init__(self) -> None:
        self.retries: list[tuple[int, str]] = []
        self.breaker: list[tuple[str, str]] = []
        self.budget_exhausted = 0

    def retry(self, service: str, method: str, attempt: int, code: str, delay: float) -> None:
        self.retries.append((attempt, code))

    def breaker_state(self, service: str, old: str, new: str) -> None:
        self.breaker.append((old, new))

    def retry_budget_exhausted(self, service: str, method: str) -> None:
        self.budget_exhausted += 1


ClientFactory = Callable[..., MeshClient]


@pytest.fixture
async def make_client(mesh_certs: CertLayout) -> AsyncIterator[ClientFactory]:
    clients: list[MeshClient] = []

    def make(mesh: MeshSpec, endpoints: list[str], identity: str = "mesh-client", **kwargs: object) -> MeshClient:
        config = MeshConfig.for_identity(identity, mesh_certs, mesh, endpoints={"auth-svc": endpoints})
        c = MeshClient(config, health_checks=False, **kwargs)  # type: ignore[arg-type]
        clients.append(c)
        return c

    yield make
    for c in clients:
        await c.close()


@pytest.fixture
async def servers(mesh_certs: CertLayout) -> AsyncIterator[Callable[..., object]]:
    started: list[MeshServer] = []

    async def start(plan: FaultPlan, name: str = "a", mesh: MeshSpec | None = None,
                    service: str = "auth-svc") -> MeshServer:
        s = await _serve(mesh or _mesh(), mesh_certs, plan, name, service)
        started.append(s)
        return s

    yield start
    for s in started:
        await s.stop(0.2)


def _req() -> auth_pb2.ValidateTokenRequest:
    return auth_pb2.ValidateTokenRequest(token="tok")


async def test_transient_failures_are_retried_to_success_with_attempt_numbers(servers, make_client):
    plan = FaultPlan(fail_first=2)
    s = await servers(plan)
    rec = Recorder()
    client = make_client(_mesh(), [f"127.0.0.1:{s.bound_port}"], listeners=[rec])
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    reply = await stub.ValidateToken(_req())
    assert reply.valid
    assert plan.attempts_seen == [1, 2, 3]  # the server saw x-mesh-attempt on every try
    assert [a for a, _ in rec.retries] == [2, 3]


async def test_only_retries_carry_the_attempt_header(servers, make_client):
    """docs/proxyless.md: a first attempt sends no x-mesh-attempt (its absence means 1), a retry sends
    its number; on both unary paths, and never on a stream (streams are not retried)."""
    assert ATTEMPT_HEADER == "x-mesh-attempt"  # the name docs/proxyless.md gives
    plan = FaultPlan(fail_first=1)
    s = await servers(plan)
    client = make_client(_mesh(), [f"127.0.0.1:{s.bound_port}"], identity="analytics-svc")
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    assert (await stub.ValidateToken(_req())).valid  # the first attempt fails, the retry answers
    assert (await stub.ValidateToken(_req())).valid  # answered at the first attempt
    assert (await client.call_with_retry(service_name="auth-svc", method_name="ValidateToken", request=_req(),
                                         timeout=2.0)).valid
    assert [m.get(ATTEMPT_HEADER) for m in plan.metadata_seen] == [None, "2", None, None]
    streams = FaultPlan()
    e = await servers(streams, service="event-collector-svc")
    client.config.endpoints = {**client.config.endpoints, "event-collector-svc": [f"127.0.0.1:{e.bound_port}"]}
    events = events_pb2_grpc.EventCollectorServiceStub(await client.get_channel("event-collector-svc"))
    assert [ev.event_id async for ev in events.ListEvents(events_pb2.ListEventsRequest())] == ["e1", "e2"]
    assert len(streams.metadata_seen) == 1 and ATTEMPT_HEADER not in streams.metadata_seen[0]


async def test_call_with_retry_documented_api(servers, make_client):
    plan = FaultPlan(fail_first=1)
    s = await servers(plan)
    client = make_client(_mesh(), [f"127.0.0.1:{s.bound_port}"])
    reply = await client.call_with_retry(service_name="auth-svc", method_name="ValidateToken",
                                         request=_req(), timeout=2.0)
    assert reply.valid and plan.calls == 2


async def test_non_retryable_codes_are_not_retried(servers, make_client):
    plan = FaultPlan(fail_first=10, status=grpc.StatusCode.INVALID_ARGUMENT)
    s = await servers(plan)
    client = make_client(_mesh(), [f"127.0.0.1:{s.bound_port}"])
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.ValidateToken(_req())
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert plan.calls == 1


async def test_internal_is_retried_only_on_idempotent_routes(servers, make_client):
    # mesh.yaml marks ValidateToken idempotent with INTERNAL in retry_on; Authenticate is not idempotent.
    plan = FaultPlan(fail_first=1, status=grpc.StatusCode.INTERNAL)
    s = await servers(plan)
    client = make_client(_mesh(), [f"127.0.0.1:{s.bound_port}"])
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    assert (await stub.ValidateToken(_req())).valid
    assert plan.calls == 2
    plan.calls, plan.fail_first = 0, 1
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.Authenticate(auth_pb2.AuthenticateRequest(learner_id="l", password="x" * 8))
    assert exc.value.code() == grpc.StatusCode.INTERNAL and plan.calls == 1


async def test_breaker_opens_after_exactly_five_failures_fails_fast_then_recovers(servers, make_client):
    plan = FaultPlan(fail_first=1000, status=grpc.StatusCode.UNAVAILABLE)
    s = await servers(plan)
    rec = Recorder()
    mesh = _mesh()
    client = make_client(mesh, [f"127.0.0.1:{s.bound_port}"], listeners=[rec])
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    auth = auth_pb2.AuthenticateRequest(learner_id="l", password="x" * 8)
    # Authenticate is retried on UNAVAILABLE (3 retries): each call makes 4 attempts and counts once
    # for the breaker; the 5th failed call opens it, and later calls never reach the server.
    for i in range(5):
        assert rec.breaker == []
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Authenticate(auth)
        assert not isinstance(exc.value, CircuitOpen), i
    assert plan.calls == 20
    assert rec.breaker == [("closed", "open")]
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.Authenticate(auth)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Circuit breaker OPEN" in exc.value.details()
    assert isinstance(exc.value, CircuitOpen)
    assert plan.calls == 20  # failed fast: the network was not touched
    # After the probe wait (100 ms first_probe here) one probe goes out; it succeeds and the breaker closes.
    plan.fail_first = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            await stub.Authenticate(auth)
            break
        except CircuitOpen:
            await asyncio.sleep(0.05)
    assert rec.breaker[-2:] == [("open", "half_open"), ("half_open", "closed")]


async def test_per_try_timeouts_of_a_call_that_retries_to_success_do_not_open_the_breaker(servers, make_client):
    # A stall: the server sits on the first 5 attempts past their per-try timeout. The first call's
    # 4 attempts all time out (one failed call); the second call's first attempt times out too, and
    # its retry succeeds. Counted per attempt, the 5th timeout opened the breaker and the retry was
    # refused ("Circuit breaker OPEN"); counted per call, there was one failure and the breaker stays closed.
    plan = FaultPlan(delay=0.6, slow_calls=5)
    text = _mesh().model_dump(mode="json", by_alias=True)
    auth = next(svc for svc in text["services"] if svc["name"] == "auth-svc")
    route = auth["routes"][0]
    assert route["match"] == "/aivo.auth.v1.AuthService/ValidateToken" and route["idempotent"]
    route["timeout"], route["retry"]["per_try_timeout"] = 3.0, 0.2
    mesh = MeshSpec.model_validate(text)
    s = await servers(plan, mesh=mesh)
    rec = Recorder()
    client = make_client(mesh, [f"127.0.0.1:{s.bound_port}"], listeners=[rec])
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.ValidateToken(_req())
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (await stub.ValidateToken(_req())).valid
    assert plan.attempts_seen == [1, 2, 3, 4, 1, 2]
    assert rec.breaker == []
    assert client.target("auth-svc").policy.breaker.state == "closed"


async def test_failure_storm_stays_within_the_retry_budget(servers, make_client):
    plan = FaultPlan(fail_first=10**9)
    s = await servers(plan)
    rec = Recorder()
    text = _mesh().model_dump(mode="json", by_alias=True)
    # No breaker in the way: this measures the budget alone.
    text["defaults"]["circuit_breaker"]["consecutive_failures"] = 10**6
    text["defaults"]["retry"]["backoff"] = {"base": 0.001, "max": 0.002}
    mesh = MeshSpec.model_validate(text)
    client = make_client(mesh, [f"127.0.0.1:{s.bound_port}"], listeners=[rec])
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    requests = 200

    async def one() -> None:
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Authenticate(auth_pb2.AuthenticateRequest(learner_id="l", password="x" * 8))

    for _ in range(requests // 20):
        await asyncio.gather(*(one() for _ in range(20)))
    ratio = plan.calls / requests
    # Without a budget 3 retries would mean 4 attempts per request.
    assert ratio <= 1.25 + 3 / requests * 20, ratio
    assert rec.budget_exhausted > 0


async def test_no_call_outlives_its_deadline_including_backoff(servers, make_client):
    plan = FaultPlan(fail_first=10**6, delay=0.05)
    s = await servers(plan)
    text = _mesh().model_dump(mode="json", by_alias=True)
    text["defaults"]["retry"] = {"max_retries": 10, "backoff": {"base": 0.2, "max": 0.5}, "retry_on": ["UNAVAILABLE"]}
    text["defaults"]["circuit_breaker"]["consecutive_failures"] = 1000
    client = make_client(MeshSpec.model_validate(text), [f"127.0.0.1:{s.bound_port}"])
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    for timeout in (0.3, 0.6):
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Authenticate(auth_pb2.AuthenticateRequest(learner_id="l", password="x" * 8), timeout=timeout)
        assert time.monotonic() - start < timeout + 0.5  # the deadline holds; the margin is scheduling


async def _always_unavailable(servers: Any, make_client: Any) -> tuple[FaultPlan, MeshClient]:
    """A server failing every call with UNAVAILABLE, and a client retrying it 10 times, 0.3 s apart."""
    plan = FaultPlan(fail_first=10**6)
    s = await servers(plan)
    text = _mesh().model_dump(mode="json", by_alias=True)
    text["defaults"]["retry"] = {"max_retries": 10, "backoff": {"base": 0.3, "max": 0.3}, "retry_on": ["UNAVAILABLE"]}
    return plan, make_client(MeshSpec.model_validate(text), [f"127.0.0.1:{s.bound_port}"])


async def _no_further_attempts(plan: FaultPlan) -> int:
    """The attempts that reached the server, once no more arrive for longer than two back-offs (a
    wait for something not to happen has no condition to wait on)."""
    seen = plan.calls
    await asyncio.sleep(0.7)
    assert plan.calls == seen, "an attempt after the call was cancelled"
    return seen


async def test_cancellation_stops_retries_at_once(servers, make_client):
    plan, client = await _always_unavailable(servers, make_client)
    task = asyncio.ensure_future(client.call_with_retry("auth-svc", "Authenticate",
                                                        auth_pb2.AuthenticateRequest(learner_id="l", password="x" * 8)))
    await until(lambda: plan.calls >= 1, what="the first attempt reached the server")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _no_further_attempts(plan) == 1


async def test_ejected_endpoint_gets_no_traffic_while_its_peer_serves(servers, make_client):
    bad = FaultPlan(fail_first=10**6, status=grpc.StatusCode.UNAVAILABLE)
    good = FaultPlan()
    sb, sg = await servers(bad, "bad"), await servers(good, "good")
    client = make_client(_mesh(), [f"127.0.0.1:{sb.bound_port}", f"127.0.0.1:{sg.bound_port}"])
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    for _ in range(20):  # retries route around the bad endpoint; each call ends OK
        assert (await stub.ValidateToken(_req())).subject == "good"
    assert bad.calls == 5  # ejected after exactly 5 consecutive failures, then no more traffic
    bad_calls = bad.calls
    for _ in range(20):
        assert (await stub.ValidateToken(_req())).subject == "good"
    assert bad.calls == bad_calls
    cluster = client.targets()["auth-svc"].cluster()
    ejected = {e["endpoint"]: e["ejected"] for e in cluster["endpoints"]}
    assert ejected == {f"127.0.0.1:{sb.bound_port}": True, f"127.0.0.1:{sg.bound_port}": False}


async def test_dropped_connections_are_retried(servers, make_client, mesh_certs):
    plan = FaultPlan(delay=0.3)
    s = await servers(plan)
    proxy = TcpProxy(s.bound_port)
    await proxy.start()
    try:
        client = make_client(_mesh(), [f"127.0.0.1:{proxy.port}"])
        stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
        assert (await stub.ValidateToken(_req())).valid
        first = asyncio.ensure_future(stub.ValidateToken(_req()))
        # the server is inside the call (before its delay)
        await until(lambda: len(plan.attempts_seen) >= 2, what="the second call reached the server")
        proxy.drop_all()  # the connection dies under an in-flight call: UNAVAILABLE, retried
        assert (await first).valid
        assert len(plan.attempts_seen) >= 3 and plan.attempts_seen[-1] == 2
    finally:
        await proxy.stop()


async def test_streams_are_not_retried_after_a_message(servers, make_client):
    plan = FaultPlan(stream_then_fail=True)
    s = await servers(plan, service="event-collector-svc")
    # analytics-svc may call ListEvents; the fault server serves it too: point event-collector-svc at it
    client = make_client(_mesh(), [f"127.0.0.1:{s.bound_port}"], identity="analytics-svc")
    client.config.endpoints = {**client.config.endpoints, "event-collector-svc": [f"127.0.0.1:{s.bound_port}"]}
    stub = events_pb2_grpc.EventCollectorServiceStub(await client.get_channel("event-collector-svc"))
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for ev in stub.ListEvents(events_pb2.ListEventsRequest()):
            got.append(ev.event_id)
    assert got == ["e1"], exc.value
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert plan.calls == 1


async def test_discovery_changes_move_traffic_without_failing_calls(servers, make_client):
    a, b = FaultPlan(delay=0.02), FaultPlan()
    sa, sb = await servers(a, "a"), await servers(b, "b")
    store = SnapshotStore()
    store.publish("auth-svc", [Endpoint("127.0.0.1", sa.bound_port)])
    client = make_client(_mesh(), [f"127.0.0.1:{sa.bound_port}"], discovery=store)
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    assert (await stub.ValidateToken(_req())).subject == "a"
    inflight = [asyncio.ensure_future(stub.ValidateToken(_req())) for _ in range(5)]
    store.publish("auth-svc", [Endpoint("127.0.0.1", sb.bound_port)])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if (await stub.ValidateToken(_req())).subject == "b":
            break
        await asyncio.sleep(0.01)
    assert all(r.valid for r in await asyncio.gather(*inflight))  # none failed by the swap
    for _ in range(10):
        assert (await stub.ValidateToken(_req())).subject == "b"


async def test_client_rebuilds_channels_when_its_certificate_rotates(servers, make_client, tmp_path, mesh_certs):
    import shutil

    from aivo_mesh.pki.issue import rotate

    certs = CertLayout(tmp_path / "certs")
    shutil.copytree(mesh_certs.root, certs.root)
    plan = FaultPlan(delay=0.2)
    s = await servers(plan)
    # ValidateToken's route with a deadline the rotation (key generation, on a loaded machine) cannot
    # outlast and no per-try timeout: the in-flight call must end because it finished, not in time.
    mesh = _mesh()
    auth = mesh.service("auth-svc")
    route = auth.routes[0]
    assert route.retry is not None
    slow = route.model_copy(update={"timeout": 30.0, "retry": route.retry.model_copy(update={"per_try_timeout": None})})
    mesh = mesh.model_copy(update={"services": tuple(
        svc.model_copy(update={"routes": (slow, *auth.routes[1:])}) if svc.name == "auth-svc" else svc
        for svc in mesh.services)})
    config = MeshConfig.for_identity("learner-svc", certs, mesh,
                                     endpoints={"auth-svc": [f"127.0.0.1:{s.bound_port}"]})
    async with MeshClient(config, health_checks=False, reload_interval=None) as client:
        stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
        first_serial = client.identity.serial
        inflight = asyncio.ensure_future(stub.ValidateToken(_req()))
        await until(lambda: plan.calls >= 1, what="the call reached the server")
        rotate(certs, _mesh(), ["learner-svc"])
        assert client.check_identity()
        assert client.identity.serial != first_serial
        assert (await inflight).valid  # the in-flight call finished on the old channel
        assert (await stub.ValidateToken(_req())).valid
        assert client.reloads == 1


async def test_plaintext_peers_mode_dials_peers_in_plaintext_and_leaves_retries_to_the_proxy(mesh_certs):
    # Linkerd's plane: the pod's proxy adds mTLS and retries, so the app must neither encrypt nor retry.
    plan = FaultPlan(fail_first=1)
    server = MeshServer(_mesh(), "auth-svc", insecure=True, port=0)
    auth_pb2_grpc.add_AuthServiceServicer_to_server(FaultyAuth(plan, "plain"), server.grpc_server)
    await server.start()
    try:
        config = MeshConfig.for_identity("mesh-client", mesh_certs, _mesh(), plaintext_peers=True,
                                         endpoints={"auth-svc": [f"127.0.0.1:{server.bound_port}"]})
        async with MeshClient(config, health_checks=False) as client:
            stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.ValidateToken(_req())
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and plan.calls == 1  # not retried
            assert (await stub.ValidateToken(_req())).subject == "plain"
    finally:
        await server.stop(0.2)


async def test_stub_path_sends_per_call_credentials_and_exposes_the_answering_attempts_metadata(
        servers, make_client):
    plan = FaultPlan(fail_first=1)  # the first attempt fails: metadata must come from the retry
    s = await servers(plan, "a")
    client = make_client(_mesh(), [f"127.0.0.1:{s.bound_port}"])
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    call = stub.ValidateToken(_req(), credentials=grpc.access_token_call_credentials("abc"))
    assert (await call).valid
    assert [m.get("authorization") for m in plan.metadata_seen] == ["Bearer abc", "Bearer abc"]
    assert ("x-served-by", "a") in tuple(await call.initial_metadata())
    assert ("x-answered-attempt", "2") in tuple(await call.trailing_metadata())
    assert await call.code() == grpc.StatusCode.OK


async def test_calls_grpc_refuses_to_send_do_not_open_the_breaker(servers, make_client):
    s = await servers(FaultPlan(), "a")
    client = make_client(_mesh(), [f"127.0.0.1:{s.bound_port}"])
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    for _ in range(8):  # more than the 5 consecutive failures that would open it
        # A caller bug (an invalid header name): grpc refuses to send it and raises its own error.
        with pytest.raises(Exception, match="execute_batch") as exc:
            await stub.ValidateToken(_req(), metadata=(("Bad Key", "x"),))
        assert not isinstance(exc.value, CircuitOpen)
    assert client.target("auth-svc").policy.breaker.state == "closed"
    assert client.target("auth-svc").policy.balancer.snapshot()[0]["consecutive_failures"] == 0
    assert (await stub.ValidateToken(_req())).valid


async def _events_client(servers, make_client, plan: FaultPlan, **kwargs: object) -> tuple[MeshClient, Any]:
    s = await servers(plan, service="event-collector-svc")
    client = make_client(_mesh(), [f"127.0.0.1:{s.bound_port}"], identity="analytics-svc", **kwargs)
    client.config.endpoints = {**client.config.endpoints, "event-collector-svc": [f"127.0.0.1:{s.bound_port}"]}
    return client, events_pb2_grpc.EventCollectorServiceStub(await client.get_channel("event-collector-svc"))


async def test_streams_get_a_client_span_and_carry_its_traceparent(servers, make_client):
    exporter = InMemorySpanExporter()
    tracing = Tracing.from_spec(TracingSpec(enabled=True, sample_ratio=1.0), "analytics-svc", "1",
                                exporter=exporter, batch=False, shutdown_on_exit=False)
    assert tracing is not None
    plan = FaultPlan()

    class OutcomeIds(PolicyListener):  # what the log line of the outcome is stamped with
        seen: list[tuple[str, str]] = []

        def call_finished(self, *args: object) -> None:
            self.seen.append(current_trace_ids())

    _, stub = await _events_client(servers, make_client, plan, outer_layers=[ClientTracingLayer(tracing)],
                                   listeners=[OutcomeIds()])
    try:
        with tracing.span("caller") as caller:  # the caller's own span must not stay current
            got = [ev.event_id async for ev in stub.ListEvents(events_pb2.ListEventsRequest())]
            assert current_trace_ids()[1] == format(caller.get_span_context().span_id, "016x")
        assert got == ["e1", "e2"]
        await until(lambda: len(exporter.get_finished_spans()) == 2, what="the stream's span ended")
        span = next(s for s in exporter.get_finished_spans() if s.name != "caller")
        assert span.name == "/aivo.events.v1.EventCollectorService/ListEvents"
        assert span.kind is SpanKind.CLIENT
        assert dict(span.attributes or {})["rpc.grpc.status_code"] == 0
        ctx = span.get_span_context()
        assert ctx is not None
        ids = (format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"))
        _, trace_id, span_id, _ = plan.metadata_seen[-1]["traceparent"].split("-")
        assert (trace_id, span_id) == ids
        await until(lambda: bool(OutcomeIds.seen), what="the stream's outcome was reported")
        assert OutcomeIds.seen == [ids]  # the outcome's log line carries the stream's span, not the caller's
    finally:
        tracing.shutdown()


async def test_a_stream_past_its_inherited_deadline_fails_locally_and_charges_nobody(servers, make_client):
    plan = FaultPlan()
    client, stub = await _events_client(servers, make_client, plan)

    async def while_serving_a_call_whose_deadline_passed() -> None:
        inbound_deadline.set(time.monotonic() - 0.5)
        async for _ in stub.ListEvents(events_pb2.ListEventsRequest()):
            pass

    for _ in range(6):  # more than the 5 consecutive failures that would open the breaker
        with pytest.raises(DeadlineExceeded):
            await asyncio.create_task(while_serving_a_call_whose_deadline_passed())
    assert plan.calls == 0  # nothing went out
    assert client.target("event-collector-svc").policy.breaker.state == "closed"
    assert [ev.event_id async for ev in stub.ListEvents(events_pb2.ListEventsRequest())] == ["e1", "e2"]


async def test_endpoints_failing_health_checks_are_skipped_after_the_threshold(servers, mesh_certs):
    mesh = _mesh(health_check="{interval: 20ms, timeout: 1s, unhealthy_threshold: 3, healthy_threshold: 2}")
    a, b = FaultPlan(), FaultPlan()
    sa, sb = await servers(a, "a", mesh), await servers(b, "b", mesh)
    config = MeshConfig.for_identity("mesh-client", mesh_certs, mesh, endpoints={
        "auth-svc": [f"127.0.0.1:{sa.bound_port}", f"127.0.0.1:{sb.bound_port}"]})
    async with MeshClient(config, health_checks=True, reload_interval=None) as client:
        stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
        assert {(await stub.ValidateToken(_req())).subject for _ in range(4)} == {"a", "b"}
        balancer = client.target("auth-svc").policy.balancer
        b_state = balancer.state(f"127.0.0.1:{sb.bound_port}")
        assert b_state is not None
        await sb.health.set("aivo.auth.v1.AuthService", health_pb2.HealthCheckResponse.NOT_SERVING)
        await until(lambda: b_state.check_streak <= -1, what="a failed check of b")
        assert b_state.healthy  # one failed check is not enough: unhealthy_threshold is 3
        await until(lambda: not b_state.healthy, what="b marked unhealthy")
        assert b_state.check_streak <= -3
        calls_b = b.calls
        assert {(await stub.ValidateToken(_req())).subject for _ in range(6)} == {"a"}
        assert b.calls == calls_b  # b got no traffic while unhealthy
        await sb.health.set("aivo.auth.v1.AuthService", health_pb2.HealthCheckResponse.SERVING)
        await until(lambda: b_state.healthy, what="b healthy again")
        assert b_state.check_streak >= 2  # healthy_threshold
        assert {(await stub.ValidateToken(_req())).subject for _ in range(4)} == {"a", "b"}


async def test_a_server_calling_another_service_passes_on_its_remaining_deadline(mesh_certs):
    """mesh-client -> learner-svc (timeout 0.25 s) -> auth-svc: auth-svc sees what remains of the 0.25 s,
    not its own route's 1 s (MeshServer sets `inbound_deadline`; the client's deadline layer reads it)."""
    mesh = _mesh()

    class Echo(auth_pb2_grpc.AuthServiceServicer):
        async def ValidateToken(self, request, context):
            return auth_pb2.ValidateTokenResponse(valid=True, reason=repr(context.time_remaining()))

    class Relay(auth_pb2_grpc.AuthServiceServicer):
        def __init__(self, client: MeshClient) -> None:
            self.client = client

        async def ValidateToken(self, request, context):
            stub = auth_pb2_grpc.AuthServiceStub(await self.client.get_channel("auth-svc"))
            return await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="x"))  # no timeout given

    back = MeshServer.for_service(mesh, "auth-svc", mesh_certs, port=0)
    auth_pb2_grpc.add_AuthServiceServicer_to_server(Echo(), back.grpc_server)
    async with back:
        relay_client = MeshClient(MeshConfig.for_identity("learner-svc", mesh_certs, mesh, endpoints={
            "auth-svc": [f"127.0.0.1:{back.bound_port}"]}), health_checks=False)
        front = MeshServer.for_service(mesh, "learner-svc", mesh_certs, port=0)
        auth_pb2_grpc.add_AuthServiceServicer_to_server(Relay(relay_client), front.grpc_server)
        async with relay_client, front:
            caller = MeshClient(MeshConfig.for_identity("mesh-client", mesh_certs, mesh, endpoints={
                "learner-svc": [f"127.0.0.1:{front.bound_port}"]}), health_checks=False)
            async with caller:
                stub = auth_pb2_grpc.AuthServiceStub(await caller.get_channel("learner-svc"))
                reply = await stub.ValidateToken(auth_pb2.ValidateTokenRequest(), timeout=0.25)
    remaining = float(reply.reason)
    assert 0 < remaining <= 0.25  # without propagation: about 1 s, the auth route's own timeout


def test_a_target_first_touched_outside_the_event_loop_starts_its_background_work_later(mesh_certs):
    # e.g. stubs built at import time: discovery and health checks must still start on first use.
    store = SnapshotStore()
    store.publish("auth-svc", [Endpoint("127.0.0.1", 1111)])
    loop = asyncio.new_event_loop()  # set but not running, as at import time before asyncio.run
    asyncio.set_event_loop(loop)
    client = MeshClient(MeshConfig.for_identity("mesh-client", mesh_certs, _mesh()), discovery=store,
                        health_checks=False, reload_interval=None)
    target = client.target("auth-svc")
    assert not target.started

    async def first_use() -> list[str]:
        await client.get_channel("auth-svc")
        assert target.started
        store.publish("auth-svc", [Endpoint("127.0.0.1", 2222)])
        await until(lambda: target.policy.balancer.endpoints == ["127.0.0.1:2222"], what="discovery applied")
        endpoints = target.policy.balancer.endpoints
        await client.close()
        return endpoints

    try:
        assert loop.run_until_complete(first_use()) == ["127.0.0.1:2222"]
    finally:
        loop.close()
        asyncio.set_event_loop(None)


async def test_retired_channels_outlive_the_longest_call_they_may_carry(mesh_certs):
    mesh = _mesh()
    longest = longest_timeout(mesh, "event-collector-svc")
    assert longest == 30.0  # CollectStream's route timeout
    async with MeshClient(MeshConfig.for_identity("analytics-svc", mesh_certs, mesh), health_checks=False,
                          reload_interval=None) as client:
        assert client.target("event-collector-svc").pool.drain_seconds > longest
        assert client.target("auth-svc").pool.drain_seconds == 30.0  # the floor
    async with MeshClient(MeshConfig.for_identity("analytics-svc", mesh_certs, mesh), health_checks=False,
                          reload_interval=None, drain_seconds=0.5) as explicit:
        assert explicit.target("event-collector-svc").pool.drain_seconds == 0.5


async def test_an_attempt_cut_by_the_per_try_timeout_is_retried_within_the_route_deadline(servers, make_client):
    # mesh.yaml: ValidateToken is idempotent, 1 s route timeout, per_try_timeout 500 ms, DEADLINE_EXCEEDED retried.
    plan = FaultPlan(delay=3.0, slow_calls=1)  # the first attempt hangs
    s = await servers(plan)
    client = make_client(_mesh(), [f"127.0.0.1:{s.bound_port}"])
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    started = time.monotonic()
    assert (await stub.ValidateToken(_req())).valid
    elapsed = time.monotonic() - started
    assert plan.attempts_seen == [1, 2]
    assert 0.5 <= elapsed < 1.0  # cut at the per-try timeout, answered before the route's deadline


async def test_no_endpoints_is_a_clear_error_and_health_checks_leave_removed_endpoints_closed(make_client):
    """Discovery may say "none" (every Consul instance critical): wait_ready and bare_channel say so
    instead of crashing. A health check round that began before an endpoint was removed does not
    reopen the removed endpoint's channel."""
    from aivo_mesh.errors import MeshError

    client = make_client(_mesh(), ["127.0.0.1:1", "127.0.0.1:2"])
    target = client.target("auth-svc")
    target.set_endpoints(["127.0.0.1:2"])  # discovery dropped :1
    await target._check("127.0.0.1:1")  # the round had listed it before the change
    assert "127.0.0.1:1" not in target.pool.states()
    target.set_endpoints([])
    with pytest.raises(MeshError, match="no endpoints"):
        await client.wait_ready("auth-svc", timeout=0.5)
    with pytest.raises(MeshError, match="no endpoints"):
        client.bare_channel("auth-svc")


# -- the stub path's channel and call objects (client/mesh_channel.py) ---------------------------------
def _awaiting_caller(stub: Any) -> tuple[asyncio.Future[int], list[Any]]:
    """A task that makes one stub call and awaits it. Its result is the task's own `cancelling()`
    count if the await raised CancelledError (0: the call was cancelled, not the task), else -1."""
    calls: list[Any] = []

    async def caller() -> int:
        call = stub.ValidateToken(_req())
        calls.append(call)
        try:
            await call
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            return task.cancelling()
        return -1

    return asyncio.ensure_future(caller()), calls


async def test_the_stub_channel_and_its_calls_are_grpc_aio_ones_and_report_the_final_status(servers, make_client):
    s = await servers(FaultPlan(), "a")
    client = make_client(_mesh(), [f"127.0.0.1:{s.bound_port}"])
    channel = await client.get_channel("auth-svc")
    assert isinstance(channel, grpc.aio.Channel)
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    call = stub.ValidateToken(_req(), timeout=5)
    assert isinstance(call, grpc.aio.UnaryUnaryCall)
    remaining = call.time_remaining()
    assert remaining is not None and 0 < remaining <= 5
    assert not call.done()
    assert (await call).valid
    assert call.done() and not call.cancelled()
    assert (await call).valid  # awaiting again gives the same response, as in grpc.aio
    assert await call.code() == grpc.StatusCode.OK
    assert await call.details() == ""
    seen: list[object] = []
    call.add_done_callback(seen.append)  # already done: called at once
    assert seen == [call]


async def test_a_failed_stub_call_reports_the_servers_status_on_the_call(servers, make_client):
    s = await servers(FaultPlan(fail_first=1, status=grpc.StatusCode.PERMISSION_DENIED), "a")
    client = make_client(_mesh(), [f"127.0.0.1:{s.bound_port}"])
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    call = stub.ValidateToken(_req())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await call.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await call.details() == err.value.details()
    assert call.done() and not call.cancelled()
    with pytest.raises(grpc.aio.AioRpcError):
        await call.wait_for_connection()


async def test_a_stub_call_made_but_not_awaited_starts_at_once_and_fires_its_callbacks(servers, make_client):
    plan = FaultPlan()
    s = await servers(plan, "a")
    client = make_client(_mesh(), [f"127.0.0.1:{s.bound_port}"])
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    done = asyncio.Event()
    call = stub.ValidateToken(_req())
    call.add_done_callback(lambda c: done.set())
    await until(lambda: plan.calls == 1, what="the call reached the server without being awaited")
    await asyncio.wait_for(done.wait(), 5)
    assert ("x-served-by", "a") in tuple(await call.initial_metadata())
    assert (await call).valid


async def test_calls_made_in_one_step_start_whether_or_not_they_are_awaited(servers, make_client):
    # One loop callback starts every call of a step that nobody awaited; the one awaited at once runs in
    # the awaiting task and is not started a second time.
    plan = FaultPlan()
    s = await servers(plan, "a")
    client = make_client(_mesh(), [f"127.0.0.1:{s.bound_port}"])
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    calls = [stub.ValidateToken(_req()) for _ in range(3)]
    assert (await calls[0]).valid
    await until(lambda: plan.calls == 3, what="the two calls nobody awaited reached the server")
    assert all([(await c).valid for c in calls[1:]])
    assert plan.calls == 3


async def test_cancelling_an_awaited_stub_call_stops_its_retries_and_leaves_the_caller_uncancelled(
        servers, make_client):
    plan, client = await _always_unavailable(servers, make_client)
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    task, calls = _awaiting_caller(stub)
    await until(lambda: plan.calls >= 1, what="the first attempt reached the server")
    assert calls[0].cancel()
    assert await task == 0
    assert calls[0].cancelled() and calls[0].done()
    assert await calls[0].code() == grpc.StatusCode.CANCELLED
    assert not calls[0].cancel()  # already over
    # A call cancelled before anyone awaited it, and one cancelled while it runs on its own.
    early = stub.ValidateToken(_req())
    assert early.cancel()
    with pytest.raises(asyncio.CancelledError):
        await early
    detached = stub.ValidateToken(_req())
    await until(lambda: plan.calls >= 2, what="the detached call's first attempt")
    detached.cancel()
    with pytest.raises(asyncio.CancelledError):
        await detached
    assert await _no_further_attempts(plan) == 2


async def test_a_timed_out_wait_for_cancels_the_stub_call(servers, make_client):
    plan = FaultPlan(delay=2.0)
    s = await servers(plan)
    client = make_client(_mesh(timeout="10s"), [f"127.0.0.1:{s.bound_port}"])
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    call = stub.ValidateToken(_req())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(call, 0.2)
    assert call.cancelled()
    assert plan.attempts_seen == [1]  # reached the server once, not retried


async def test_a_locally_refused_call_still_yields_to_the_event_loop(servers, make_client):
    """A caller retrying in a tight loop against an open breaker must not starve the loop (and the
    probe that would close the breaker): like any failed RPC, a refused one yields once."""
    s = await servers(FaultPlan())
    client = make_client(_mesh(), [f"127.0.0.1:{s.bound_port}"])
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    client.target("auth-svc").policy.breaker.force_open()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(ticker())
    try:
        for _ in range(10):
            with pytest.raises(CircuitOpen):
                await stub.ValidateToken(_req())
            with pytest.raises(CircuitOpen):
                await client.call_with_retry("auth-svc", "ValidateToken", _req())
    finally:
        other.cancel()
    assert ticks >= 10  # the other task ran while the refused calls were made


async def test_stub_call_edge_cases_match_grpc_aio(servers, make_client):
    """A second cancel() is refused (the caller's task is cancelled once, and uncancelled once); a
    detached call cancelled before its first step still finishes as CANCELLED; a failing done
    callback is reported to the loop and changes neither the outcome nor the other callbacks."""
    plan = FaultPlan(delay=5.0, slow_calls=1)
    s = await servers(plan)
    client = make_client(_mesh(timeout="10s"), [f"127.0.0.1:{s.bound_port}"])
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    task, calls = _awaiting_caller(stub)
    await until(lambda: len(plan.attempts_seen) >= 1, what="the slow call reached the server")
    assert calls[0].cancel()
    assert not calls[0].cancel()  # as grpc.aio: one cancel takes effect
    assert await task == 0

    detached = stub.ValidateToken(_req())
    await asyncio.sleep(0)  # its Task now exists but has not run a step
    assert detached.cancel()
    assert await asyncio.wait_for(detached.code(), 5) == grpc.StatusCode.CANCELLED
    assert detached.done() and detached.cancelled()

    reported: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        seen: list[object] = []
        call = stub.ValidateToken(_req())
        call.add_done_callback(lambda c: 1 / 0)
        call.add_done_callback(seen.append)
        assert (await call).valid  # the failing callback did not replace the response
        assert seen == [call]
        assert isinstance(reported[0]["exception"], ZeroDivisionError)
    finally:
        loop.set_exception_handler(previous)


async def test_the_stub_channel_is_pooled_and_reports_its_endpoints_connectivity(servers, make_client):
    s = await servers(FaultPlan())
    client = make_client(_mesh(), [f"127.0.0.1:{s.bound_port}"])
    channel = await client.get_channel("auth-svc")
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    assert channel.get_state() == grpc.ChannelConnectivity.IDLE  # nothing dialled yet
    changed = asyncio.ensure_future(channel.wait_for_state_change(grpc.ChannelConnectivity.IDLE))
    await asyncio.wait_for(channel.channel_ready(), 10)
    assert channel.get_state() == grpc.ChannelConnectivity.READY
    await asyncio.wait_for(changed, 10)
    async with channel:  # leaving the block must not close the shared channel
        assert (await stub.ValidateToken(_req())).valid
    await channel.close()
    assert (await stub.ValidateToken(_req())).valid
    assert channel.get_state() == grpc.ChannelConnectivity.READY


async def _drain(stream: Any) -> list[str]:
    return [ev.event_id async for ev in stream]


async def test_a_stream_holds_its_slot_until_it_ends_and_is_queued_and_refused_as_a_unary_call(servers,
                                                                                              make_client):
    mesh = _mesh(extra="  limits: {max_requests: 1, max_pending_requests: 1}\n")
    hold = asyncio.Event()
    plan = FaultPlan(hold=hold)
    s = await servers(plan, service="event-collector-svc", mesh=mesh)
    client = make_client(mesh, [], identity="analytics-svc")
    client.config.endpoints = {"event-collector-svc": [f"127.0.0.1:{s.bound_port}"]}
    stub = events_pb2_grpc.EventCollectorServiceStub(await client.get_channel("event-collector-svc"))
    limit = client.target("event-collector-svc").policy.limit
    first = stub.ListEvents(events_pb2.ListEventsRequest())
    assert (await first.read()).event_id == "e1"
    assert limit.active == 1  # open, and holding its slot
    second = asyncio.ensure_future(_drain(stub.ListEvents(events_pb2.ListEventsRequest())))
    await until(lambda: limit.pending == 1, what="the second stream queued for the slot")
    with pytest.raises(grpc.aio.AioRpcError) as stream_refused:
        await _drain(stub.ListEvents(events_pb2.ListEventsRequest()))
    with pytest.raises(grpc.aio.AioRpcError) as unary_refused:  # the same target, a unary method
        await stub.Collect(events_pb2.CollectRequest(), timeout=1)
    assert stream_refused.value.code() == unary_refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert stream_refused.value.details() == unary_refused.value.details()
    assert "max_requests=1, max_pending_requests=1" in (stream_refused.value.details() or "")
    hold.set()  # the first stream ends: its slot goes to the queued one
    assert [m.event_id async for m in first] == ["e2"]
    assert await second == ["e1", "e2"]
    await until(lambda: limit.active == 0, what="every slot back")


async def test_a_stream_counts_for_the_breaker_and_outlier_detection_when_it_ends(servers, make_client):
    plan = FaultPlan(stream_then_fail=True)  # each stream sends a message, then ends UNAVAILABLE
    client, stub = await _events_client(servers, make_client, plan)
    target = client.target("event-collector-svc")
    endpoint = target.policy.balancer.endpoints[0]
    for n in range(1, 6):
        with pytest.raises(grpc.aio.AioRpcError):
            await _drain(stub.ListEvents(events_pb2.ListEventsRequest()))
        # counted as the stream ends, not as it opens (it opened fine)
        def counted(n: int = n) -> bool:
            state = target.policy.balancer.state(endpoint)
            assert state is not None
            return state.consecutive_failures == n or target.policy.breaker.state == "open"

        await until(counted, what=f"stream {n}'s failure counted")
    await until(lambda: target.policy.breaker.state == "open", what="the breaker opened after 5 failed streams")
    with pytest.raises(CircuitOpen):
        await _drain(stub.ListEvents(events_pb2.ListEventsRequest()))
    assert plan.calls == 5  # the sixth never went out
    assert target.policy.limit.active == 0


async def test_a_call_that_failed_after_retries_raises_retries_exhausted_with_the_servers_error(servers,
                                                                                                make_client):
    plan = FaultPlan(fail_first=100)  # UNAVAILABLE every time: retried 3 times, then given up
    s = await servers(plan)
    stub = auth_pb2_grpc.AuthServiceStub(await make_client(_mesh(), [f"127.0.0.1:{s.bound_port}"])
                                         .get_channel("auth-svc"))
    with pytest.raises(RetriesExhausted) as exc:
        await stub.ValidateToken(_req())
    err = exc.value
    assert isinstance(err, grpc.aio.AioRpcError)  # code written for plain grpc sees the server's error
    assert err.code() == grpc.StatusCode.UNAVAILABLE and err.details() == "injected UNAVAILABLE by a"
    assert err.attempts == 4 == plan.calls
    assert isinstance(err.__cause__, grpc.aio.AioRpcError) and not isinstance(err.__cause__, RetriesExhausted)
    # Not retried (INVALID_ARGUMENT is not in retry_on): the server's error as it is.
    bad = FaultPlan(fail_first=100, status=grpc.StatusCode.INVALID_ARGUMENT)
    s2 = await servers(bad, "b")
    stub2 = auth_pb2_grpc.AuthServiceStub(await make_client(_mesh(), [f"127.0.0.1:{s2.bound_port}"])
                                          .get_channel("auth-svc"))
    with pytest.raises(grpc.aio.AioRpcError) as plain:
        await stub2.ValidateToken(_req())
    assert not isinstance(plain.value, RetriesExhausted) and bad.calls == 1


def test_local_replies_map_to_exception_types_by_reason_not_text() -> None:
    from aivo_mesh.client.errors import error_for
    from aivo_mesh.errors import Overloaded
    from aivo_mesh.policy.core import LocalReason, Reply

    # The breaker's text is the platform's contract, but the type comes from the reason alone.
    assert isinstance(error_for("s", "/p.S/M", Reply("UNAVAILABLE", details="anything",
                                                     local=LocalReason.CIRCUIT_OPEN)), CircuitOpen)
    assert not isinstance(error_for("s", "/p.S/M", Reply("UNAVAILABLE", details="Circuit breaker OPEN",
                                                         local=LocalReason.NO_ENDPOINTS)), CircuitOpen)
    assert isinstance(error_for("s", "/p.S/M", Reply("UNAVAILABLE",
                                                     local=LocalReason.MAX_PENDING_REQUESTS)), Overloaded)
    for reason in (LocalReason.MAX_REQUESTS, LocalReason.DEADLINE):
        assert isinstance(error_for("s", "/p.S/M", Reply("DEADLINE_EXCEEDED", local=reason)), DeadlineExceeded)


async def test_a_caller_s_own_serializers_are_used_on_the_stub_channel_as_on_a_plain_one(servers, make_client):
    # A caller passing its own (de)serializers for a protobuf method (here raw bytes, as a proxy or a test
    # would) has them used, retries included. They used to be replaced by the message classes' without a
    # word: the server received an empty request and the caller got None.
    plan = FaultPlan(fail_first=1)
    s = await servers(plan, "a")
    client = make_client(_mesh(), [f"127.0.0.1:{s.bound_port}"])
    channel = await client.get_channel("auth-svc")
    raw = channel.unary_unary("/aivo.auth.v1.AuthService/ValidateToken", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
    reply = await raw(_req().SerializeToString(), timeout=5)
    assert isinstance(reply, bytes) and auth_pb2.ValidateTokenResponse.FromString(reply).valid
    assert plan.attempts_seen == [1, 2]  # the retry went out with the caller's serializer too
    # The message classes' path on the same channel and endpoint is unaffected.
    assert (await auth_pb2_grpc.AuthServiceStub(channel).ValidateToken(_req(), timeout=5)).valid
    # Streams of a protobuf method go out with its message classes: other serializers are refused, not
    # silently replaced.
    with pytest.raises(MeshError, match="CollectStream: a stream of a protobuf method"):
        channel.stream_unary("/aivo.events.v1.EventCollectorService/CollectStream", request_serializer=lambda b: b)
