"""Inbound rate limits (mesh.yaml `rate_limit`): the bucket, the config, the renderings, and both planes
for real: a MeshServer, and an Envoy sidecar's inbound listener.

What both planes must show: a burst of N+k calls from one caller into a full bucket of N gets exactly k
RESOURCE_EXHAUSTED with a `grpc-retry-pushback-ms` trailer, a second caller is unaffected under
`per_caller`, and the bucket refills at its rate.
"""

from __future__ import annotations

import asyncio
import copy
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from binaries import needs, require
from helpers import auth_app, start_envoy_async, wait_envoy_live

from aivo_mesh.client import MeshClient, MeshConfig
from aivo_mesh.config import MeshSpec, parse_mesh
from aivo_mesh.config.model import SidecarSpec
from aivo_mesh.config.ports import sidecar_ports
from aivo_mesh.config.resolve import Bucket, inbound_rate_limits, rate_limit_for
from aivo_mesh.errors import ConfigError
from aivo_mesh.gen.aivo.auth.v1 import auth_pb2, auth_pb2_grpc
from aivo_mesh.pki import CertLayout
from aivo_mesh.policy.backoff import PUSHBACK_HEADER
from aivo_mesh.policy.classify import FAILURE, SUCCESS, TRANSIENT, Classifier
from aivo_mesh.policy.core import Reply
from aivo_mesh.policy.events import PolicyListener
from aivo_mesh.policy.ratelimit import BucketParams, RateLimiter, RateLimitParams, TokenBucket
from aivo_mesh.policy.testing import FakeClock
from aivo_mesh.render import render_target, serialize
from aivo_mesh.render.envoy import RATE_LIMIT_FILTER, EnvoyProfile, bootstrap, sds_files
from aivo_mesh.runtime.local import free_ports
from aivo_mesh.server import MeshServer
from aivo_mesh.telemetry.metrics import MeshMetrics
from aivo_mesh.xds.cache import CLUSTER, ENDPOINT, LISTENER, ROUTE
from aivo_mesh.xds.policies import decode_config
from aivo_mesh.xds.proxyless import proxyless_snapshot
from aivo_mesh.xds.resources import Trust, sidecar_snapshot, typed

ROOT = Path(__file__).resolve().parents[1]
MESH_DATA: dict[str, Any] = yaml.safe_load((ROOT / "mesh.yaml").read_text())
AUTH = "/aivo.auth.v1.AuthService/"
VALIDATE, AUTHENTICATE = AUTH + "ValidateToken", AUTH + "Authenticate"
LEARNER, ANALYTICS = "spiffe://aivo.local/ns/default/sa/learner-svc", "spiffe://aivo.local/ns/default/sa/analytics-svc"


def _mesh(service_block: dict[str, Any] | None, route_block: dict[str, Any] | None = None,
          **cb: Any) -> MeshSpec:
    """The repository's mesh with auth-svc's rate limit (and its ValidateToken route's) set."""
    data = copy.deepcopy(MESH_DATA)
    auth = data["services"][0]
    if service_block is not None:
        auth["rate_limit"] = service_block
    if route_block is not None:
        auth["routes"][0]["rate_limit"] = route_block
    if cb:
        data["defaults"]["circuit_breaker"] = {**data["defaults"].get("circuit_breaker", {}), **cb}
    return parse_mesh(yaml.safe_dump(data), "mesh.yaml")


# -- the bucket ----------------------------------------------------------------------------------------

def test_a_full_bucket_admits_burst_then_refuses_with_the_time_to_the_next_token() -> None:
    clock = FakeClock()
    bucket = TokenBucket(BucketParams(rate=2, burst=3), clock())
    assert [bucket.take(clock()) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(clock()) == pytest.approx(0.5)  # one token at 2/s
    clock.advance(0.2)
    assert bucket.take(clock()) == pytest.approx(0.3)  # a refusal takes nothing: the wait shrinks
    clock.advance(0.3)
    assert bucket.take(clock()) == 0.0
    clock.advance(60)  # refills continuously, never beyond burst
    assert [bucket.take(clock()) for _ in range(4)][-1] > 0


def test_callers_with_their_own_bucket_do_not_touch_the_shared_one() -> None:
    clock = FakeClock()
    scope = RateLimitParams(None, BucketParams(1, 2), ((LEARNER, BucketParams(1, 1)),))
    limiter = RateLimiter([scope], clock=clock)
    assert limiter.admit(None, LEARNER) is None
    refused = limiter.admit(None, LEARNER)
    assert refused is not None and refused.caller == LEARNER and refused.pushback_ms == 1000
    assert [limiter.admit(None, ANALYTICS), limiter.admit(None, None)] == [None, None]  # shared: 2 tokens
    shared = limiter.admit(None, ANALYTICS)
    assert shared is not None and shared.caller is None


def test_an_update_that_leaves_a_bucket_alone_keeps_its_tokens() -> None:
    clock = FakeClock()
    old = RateLimitParams(None, BucketParams(1, 1), ((LEARNER, BucketParams(1, 1)),))
    limiter = RateLimiter([old], clock=clock)
    assert limiter.admit(None, LEARNER) is None and limiter.admit(None, ANALYTICS) is None
    resized = RateLimitParams(None, BucketParams(1, 1), ((LEARNER, BucketParams(1, 5)),))
    assert limiter.update([resized]) is True
    assert limiter.admit(None, ANALYTICS) is not None  # unchanged: still empty
    assert limiter.admit(None, LEARNER) is None  # resized: starts full
    assert limiter.update([resized]) is False


# -- the config ------------------------------------------------------------------------------------------

def test_per_caller_gives_each_admitted_identity_its_own_bucket_and_callers_override() -> None:
    mesh = _mesh({"requests_per_second": 10, "burst": 20, "per_caller": True,
                  "callers": {"analytics-svc": {"requests_per_second": 1}}})
    limit = rate_limit_for(inbound_rate_limits(mesh, "auth-svc"), AUTHENTICATE)
    assert limit is not None and limit.scope is None and limit.shared == Bucket(10, 20)
    assert dict(limit.callers) == {ANALYTICS: Bucket(1, 1), LEARNER: Bucket(10, 20),
                                   "spiffe://aivo.local/ns/default/sa/mesh-client": Bucket(10, 20)}
    assert rate_limit_for(inbound_rate_limits(mesh, "auth-svc"), "/grpc.health.v1.Health/Check") is None


def test_a_route_block_is_merged_over_the_service_s_and_has_buckets_of_its_own() -> None:
    mesh = _mesh({"requests_per_second": 10, "burst": 20}, {"requests_per_second": 2})
    limits = inbound_rate_limits(mesh, "auth-svc")
    route, service = rate_limit_for(limits, VALIDATE), rate_limit_for(limits, AUTHENTICATE)
    assert route is not None and route.scope == VALIDATE and route.shared == Bucket(2, 2)  # burst follows
    assert service is not None and service.scope is None
    assert inbound_rate_limits(_mesh(None), "auth-svc") == ()


@pytest.mark.parametrize(("service", "route", "where", "says"), [
    ({"requests_per_second": 5, "callers": {"analytcs-svc": {"requests_per_second": 1}}}, None,
     "services[0].rate_limit.callers.analytcs-svc", "unknown caller 'analytcs-svc'"),
    ({"burst": 5}, None, "services[0].rate_limit", "expected `requests_per_second`"),
    (None, {"burst": 5}, "services[0].routes[0].rate_limit", "the service has none"),
    ({"requests_per_second": 0}, None, "services[0].rate_limit.requests_per_second", "greater than or equal to 1"),
    ({"requests_per_second": 5, "per_caller": "yes"}, None, "services[0].rate_limit.per_caller",
     "expected true or false"),
])
def test_config_errors_name_the_key(service: dict[str, Any] | None, route: dict[str, Any] | None, where: str,
                                    says: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _mesh(service, route)
    text = str(exc.value)
    assert f": {where}: " in text and says in text and "mesh.yaml:" in text, text


# -- classify ----------------------------------------------------------------------------------------

def test_a_rate_limiter_s_refusal_is_never_a_failure() -> None:
    strict = Classifier.for_route(("UNAVAILABLE",), idempotent=False, failure_codes=("RESOURCE_EXHAUSTED",))
    retrying = Classifier.for_route(("RESOURCE_EXHAUSTED",), idempotent=True, failure_codes=("RESOURCE_EXHAUSTED",))
    limited = Reply("RESOURCE_EXHAUSTED", trailers=((PUSHBACK_HEADER, "250"),))
    assert strict.classify(limited) is SUCCESS and retrying.classify(limited) is TRANSIENT
    assert strict.classify(Reply("RESOURCE_EXHAUSTED")) is FAILURE  # no pushback: the server's own say


# -- renderings ------------------------------------------------------------------------------------------

def _inbound(mesh: MeshSpec) -> dict[str, Any]:
    cfg = bootstrap(mesh, "auth-svc", EnvoyProfile.pod(mesh))
    return next(x for x in cfg["static_resources"]["listeners"] if x["name"] == "inbound_grpc")


def test_envoy_limits_after_rbac_per_caller_and_never_health_checks() -> None:
    mesh = _mesh({"requests_per_second": 10, "per_caller": True}, {"requests_per_second": 2})
    hcm = _inbound(mesh)["filter_chains"][0]["filters"][1]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names.index("envoy.filters.http.rbac") + 1 == names.index(RATE_LIMIT_FILTER)
    vhost = hcm["route_config"]["virtual_hosts"][0]
    shared = vhost["typed_per_filter_config"][RATE_LIMIT_FILTER]
    assert shared["token_bucket"] == {"max_tokens": 10, "tokens_per_fill": 10, "fill_interval": "1s"}
    assert shared["rate_limited_as_resource_exhausted"] is True
    assert shared["always_consume_default_token_bucket"] is False
    assert {d["entries"][0]["value"] for d in shared["descriptors"]} == {
        LEARNER, ANALYTICS, "spiffe://aivo.local/ns/default/sa/mesh-client"}
    assert shared["response_headers_to_add"][0]["header"] == {"key": PUSHBACK_HEADER, "value": "100"}
    routes = {r["name"]: r.get("typed_per_filter_config", {}).get(RATE_LIMIT_FILTER) for r in vhost["routes"]}
    assert routes["auth-svc/ValidateToken"]["token_bucket"]["tokens_per_fill"] == 2
    assert routes["auth-svc/*"] is None  # shares the virtual host's buckets
    assert routes["auth-svc/untraced/grpc.health.v1.Health"]["disabled"] is True
    assert routes["auth-svc/default"]["disabled"] is True


@needs("envoy")
def test_real_envoy_validates_a_rate_limited_sidecar(mesh_certs: CertLayout, tmp_path: Path) -> None:
    mesh = _mesh({"requests_per_second": 10, "per_caller": True,
                  "callers": {"analytics-svc": {"requests_per_second": 1, "burst": 2}}}, {"requests_per_second": 2})
    profile = EnvoyProfile.local(str(mesh_certs.root), str(tmp_path / "sds"))
    path = _write_sidecar(mesh, "auth-svc", profile, tmp_path)
    res = subprocess.run([require("envoy"), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_filter_parses_into_typed_resources_and_the_proxyless_plane_reads_back_mesh_yaml_s_limits() -> None:
    mesh = _mesh({"requests_per_second": 10, "per_caller": True,
                  "callers": {"analytics-svc": {"requests_per_second": 1}}}, {"requests_per_second": 2})
    inbound = _inbound(mesh)
    assert typed(LISTENER, inbound).ByteSize() > 0  # the local rate limit filter parses
    sidecar = sidecar_snapshot(mesh, "auth-svc", EnvoyProfile.local("/certs", "/sds"), Trust(b"ca"))
    snap = proxyless_snapshot(mesh, "auth-svc", sidecar)
    config = decode_config(mesh, {t: snap.get(t) for t in (LISTENER, ROUTE, CLUSTER, ENDPOINT)})
    assert config.rate_limits == inbound_rate_limits(mesh, "auth-svc")
    unlimited = proxyless_snapshot(_mesh(None), "auth-svc", sidecar_snapshot(
        _mesh(None), "auth-svc", EnvoyProfile.local("/certs", "/sds"), Trust(b"ca")))
    assert decode_config(_mesh(None), {t: unlimited.get(t) for t in (LISTENER, ROUTE, CLUSTER, ENDPOINT)}
                         ).rate_limits == ()


def test_linkerd_gets_an_http_local_rate_limit_policy_on_the_server() -> None:
    mesh = _mesh({"requests_per_second": 10, "burst": 30, "per_caller": True,
                  "callers": {"analytics-svc": {"requests_per_second": 1}}}, {"requests_per_second": 2})
    docs = list(yaml.safe_load_all(render_target("linkerd", mesh)["auth-svc.yaml"]))
    policy = next(d for d in docs if d and d["kind"] == "HTTPLocalRateLimitPolicy")
    assert policy["spec"] == {
        "targetRef": {"group": "policy.linkerd.io", "kind": "Server", "name": "auth-svc-grpc"},
        "identity": {"requestsPerSecond": 10},
        "overrides": [{"requestsPerSecond": 1, "clientRefs": [
            {"kind": "ServiceAccount", "namespace": "default", "name": "analytics-svc"}]}]}
    shared = yaml.safe_load_all(render_target("linkerd", _mesh({"requests_per_second": 3}))["auth-svc.yaml"])
    assert next(d for d in shared if d and d["kind"] == "HTTPLocalRateLimitPolicy")["spec"]["total"] == {
        "requestsPerSecond": 3}


# -- both planes, for real --------------------------------------------------------------------------------

def _channel(certs: CertLayout, who: str, address: str) -> grpc.aio.Channel:
    cert, key = certs.identity_paths(who)
    creds = grpc.ssl_channel_credentials(certs.ca_cert.read_bytes(), key.read_bytes(), cert.read_bytes())
    return grpc.aio.secure_channel(address, creds, options=[("grpc.default_authority", "auth-svc")])


async def _burst(certs: CertLayout, who: str, address: str, n: int) -> list[grpc.aio.AioRpcError | None]:
    """`n` ValidateToken calls as `who`, one after the other: None for each that passed, else its error."""
    out: list[grpc.aio.AioRpcError | None] = []
    async with _channel(certs, who, address) as ch:
        stub = auth_pb2_grpc.AuthServiceStub(ch)
        for _ in range(n):
            try:
                await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="t"), timeout=5)
                out.append(None)
            except grpc.aio.AioRpcError as exc:
                out.append(exc)
    return out


def _pushback(exc: grpc.aio.AioRpcError) -> int:
    return int(dict(exc.trailing_metadata() or ())[PUSHBACK_HEADER])


async def _assert_the_behaviour(certs: CertLayout, address: str, max_pushback_ms: int) -> None:
    """burst 3 at 1/s per caller: 3+2 calls from learner-svc, 2 refused with a pushback; analytics-svc's
    bucket untouched; after the pushback learner-svc passes again."""
    learner = await _burst(certs, "learner-svc", address, 5)
    assert [e is None for e in learner] == [True, True, True, False, False]
    refused = [e for e in learner if e is not None]
    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused), refused
    assert all(0 < _pushback(e) <= max_pushback_ms for e in refused), [e.trailing_metadata() for e in refused]
    assert await _burst(certs, "analytics-svc", address, 3) == [None, None, None]
    # The refill is the behaviour under test: wait the pushback the server gave (one token at 1/s).
    await asyncio.sleep(_pushback(refused[-1]) / 1000)
    assert await _burst(certs, "learner-svc", address, 1) == [None]


class EchoAuth(auth_pb2_grpc.AuthServiceServicer):
    async def Authenticate(self, request: Any, context: Any) -> Any:
        return auth_pb2.AuthenticateResponse(token="t")

    async def ValidateToken(self, request: Any, context: Any) -> Any:
        return auth_pb2.ValidateTokenResponse(valid=True)


async def _mesh_server(mesh: MeshSpec, certs: CertLayout, metrics: MeshMetrics | None = None) -> MeshServer:
    server = MeshServer.for_service(mesh, "auth-svc", certs, port=0, metrics=metrics)
    auth_pb2_grpc.add_AuthServiceServicer_to_server(EchoAuth(), server.grpc_server)
    await server.start()
    return server


async def test_mesh_server_limits_per_caller_with_a_pushback_and_counts_it(mesh_certs: CertLayout) -> None:
    metrics = MeshMetrics()
    server = await _mesh_server(_mesh({"requests_per_second": 1, "burst": 3, "per_caller": True}), mesh_certs,
                                metrics)
    try:
        address = f"127.0.0.1:{server.bound_port}"
        await _assert_the_behaviour(mesh_certs, address, 1000)
        # event-collector-svc is not allowed: PERMISSION_DENIED, never a token (nor a rate-limit refusal)
        denied = await _burst(mesh_certs, "event-collector-svc", address, 5)
        assert {e.code() for e in denied if e is not None} == {grpc.StatusCode.PERMISSION_DENIED}
        limited = {(labels["caller"], labels["method"]): value for name, labels, value in metrics.samples()
                   if name == "grpc_rate_limited_total"}
        assert limited == {(LEARNER, VALIDATE): 2.0}
        assert "grpc_rate_limited_total{" in metrics.render().decode()
    finally:
        await server.stop(0)


async def test_health_checks_are_never_limited(mesh_certs: CertLayout) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = await _mesh_server(_mesh({"requests_per_second": 1, "burst": 1}), mesh_certs)
    try:
        async with _channel(mesh_certs, "learner-svc", f"127.0.0.1:{server.bound_port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for _ in range(5):
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        await server.stop(0)


class _Breaker(PolicyListener):
    def __init__(self) -> None:
        self.transitions: list[tuple[str, str]] = []
        self.retry_delays: list[float] = []

    def breaker_state(self, service: str, old: str, new: str) -> None:
        self.transitions.append((old, new))

    def retry(self, service: str, method: str, attempt: int, code: str, delay: float) -> None:
        self.retry_delays.append(delay)


async def test_mesh_client_waits_the_pushback_where_it_may_retry_and_fails_fast_where_not(
        mesh_certs: CertLayout) -> None:
    """ValidateToken's route retries RESOURCE_EXHAUSTED (idempotent): a refused call waits exactly the
    pushback and passes. Authenticate may not retry it: it fails at once with the pushback in its
    trailers. Neither opens the breaker, even with RESOURCE_EXHAUSTED among its failure codes."""
    mesh = _mesh({"requests_per_second": 5, "burst": 1}, consecutive_failures=2,
                 failure_codes=["UNAVAILABLE", "RESOURCE_EXHAUSTED"])
    server = await _mesh_server(mesh, mesh_certs)
    listener = _Breaker()
    config = MeshConfig.for_identity("mesh-client", mesh_certs, mesh,
                                     endpoints={"auth-svc": [f"127.0.0.1:{server.bound_port}"]})
    try:
        async with MeshClient(config, health_checks=False, listeners=[listener]) as client:
            stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
            await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="t"))
            await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="t"))  # refused once, then retried
            assert len(listener.retry_delays) == 1 and 0 < listener.retry_delays[0] <= 0.2
            for _ in range(4):
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await stub.Authenticate(auth_pb2.AuthenticateRequest())
                assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert 0 < _pushback(exc.value) <= 200
            assert listener.transitions == [] and len(listener.retry_delays) == 1
    finally:
        await server.stop(0)


def _stats(admin: int) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=http_local_rate_limit", timeout=5) as r:
        return dict(line.split(": ", 1) for line in r.read().decode().splitlines())


def _write_sidecar(mesh: MeshSpec, service: str, profile: EnvoyProfile, d: Path) -> Path:
    sds = Path(profile.sds_dir)
    sds.mkdir(parents=True, exist_ok=True)
    for name, doc in sds_files(mesh, service, profile).items():
        (sds / name).write_text(serialize(name, doc))
    path = d / f"{service}-envoy.yaml"
    path.write_text(serialize(path.name, bootstrap(mesh, service, profile)))
    return path


@pytest.mark.slow
@needs("envoy")
async def test_envoy_inbound_limits_per_caller_with_a_pushback_and_counts_it(mesh_certs: CertLayout,
                                                                              tmp_path: Path) -> None:
    mesh = _mesh({"requests_per_second": 1, "burst": 3, "per_caller": True})
    ports = iter(free_ports(4))
    auth = mesh.services[0].model_copy(update={"local_port": next(ports), "sidecar": SidecarSpec(
        inbound_port=next(ports), outbound_port=next(ports), admin_port=next(ports))})
    mesh = mesh.model_copy(update={"services": (auth, *mesh.services[1:])})
    certs = CertLayout(tmp_path / "certs")
    shutil.copytree(mesh_certs.root, certs.root)

    async def validate(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return auth_pb2.ValidateTokenResponse(valid=True).SerializeToString()

    app, _ = await auth_app({"ValidateToken": validate}, port=auth.local_port)
    path = _write_sidecar(mesh, "auth-svc", EnvoyProfile.local(str(certs.root), str(tmp_path / "sds")), tmp_path)
    proc = await start_envoy_async(path)
    try:
        envoy = sidecar_ports(mesh, "auth-svc", "local")
        await asyncio.to_thread(wait_envoy_live, envoy.admin, proc)
        # Envoy sends the refill period of the bucket, 1000 ms at 1/s (docs/envoy.md).
        await _assert_the_behaviour(certs, f"127.0.0.1:{envoy.inbound}", 1000)
        stats = await asyncio.to_thread(_stats, envoy.admin)
        assert stats["inbound_rate_limit.http_local_rate_limit.rate_limited"] == "2"
    finally:
        proc.terminate()
        await proc.wait()
        await app.stop(0)
