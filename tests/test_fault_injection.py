"""mesh.yaml's `fault` on both planes, observed the same way: a real MeshServer over mTLS, and a real Envoy
sidecar's inbound listener in front of a plain app, called as different mesh identities on 127.0.0.1.

The mesh (FAULTS below): auth-svc delays mesh-client's calls by 300 ms at 100 %; its ValidateToken route
aborts mesh-client's calls with NOT_FOUND at 100 % and turns the delay off (0 %). So, on each plane:
mesh-client's Authenticate takes >= 300 ms and succeeds; its ValidateToken fails at once with NOT_FOUND
"fault filter abort"; learner-svc's ValidateToken (a caller not listed) and every health check are
untouched. Delays are asserted only as the lower bound they guarantee (the behaviour IS timing); an
untouched call is shown untouched by its answer and the plane's own fault counters.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from binaries import needs
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import auth_app, start_envoy_async, wait_envoy_live
from waiting import until

from aivo_mesh import MeshServer
from aivo_mesh.config import MeshSpec, parse_mesh
from aivo_mesh.config.model import SidecarSpec
from aivo_mesh.config.ports import sidecar_ports
from aivo_mesh.config.resolve import fault_policies
from aivo_mesh.pki import CertLayout
from aivo_mesh.render import serialize
from aivo_mesh.render.envoy import EnvoyProfile, bootstrap, sds_files
from aivo_mesh.runtime.local import free_ports
from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc
from aivo_mesh.telemetry.metrics import MeshMetrics

ROOT = Path(__file__).resolve().parents[1]
DELAY = 0.3
AUTHENTICATE = "/aivo.auth.v1.AuthService/Authenticate"
VALIDATE = "/aivo.auth.v1.AuthService/ValidateToken"


def _faulted(abort_percent: int = 100, delay_percent: int = 100) -> MeshSpec:
    text = (ROOT / "mesh.yaml").read_text()
    auth_routes = ("    routes:\n      - match: /aivo.auth.v1.AuthService/ValidateToken\n")
    assert text.count(auth_routes) >= 1
    text = text.replace(auth_routes, (
        f"    fault: {{delay: {int(DELAY * 1000)}ms, delay_percent: {delay_percent}, callers: [mesh-client]}}\n"
        + auth_routes
        + f"        fault: {{abort_status: NOT_FOUND, abort_percent: {abort_percent}, delay_percent: 0,"
          " callers: [mesh-client]}\n"), 1)
    return parse_mesh(text, "mesh.yaml")


def _channel(address: str, certs: CertLayout, identity: str) -> grpc.aio.Channel:
    cert, key = certs.identity_paths(identity)
    creds = grpc.ssl_channel_credentials(certs.ca_cert.read_bytes(), key.read_bytes(), cert.read_bytes())
    return grpc.aio.secure_channel(address, creds, options=[("grpc.default_authority", "auth-svc")])


async def _observe(address: str, certs: CertLayout) -> dict[str, tuple[str, float]]:
    """Each call of the scenario: its status (and details, when not OK) and how long it took."""
    out: dict[str, tuple[str, float]] = {}

    async def timed(name: str, call: object) -> None:
        start = time.monotonic()
        try:
            await call  # type: ignore[misc]
            status = "OK"
        except grpc.aio.AioRpcError as exc:
            status = f"{exc.code().name}: {exc.details()}"
        out[name] = (status, time.monotonic() - start)

    async with _channel(address, certs, "mesh-client") as ch:
        stub = auth_pb2_grpc.AuthServiceStub(ch)
        await timed("client.Authenticate", stub.Authenticate(
            auth_pb2.AuthenticateRequest(learner_id="ada", password="x" * 8), timeout=10))
        await timed("client.ValidateToken", stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="t"), timeout=10))
        await timed("client.health", health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="aivo.auth.v1.AuthService"), timeout=10))
    async with _channel(address, certs, "learner-svc") as ch:
        await timed("learner.ValidateToken", auth_pb2_grpc.AuthServiceStub(ch).ValidateToken(
            auth_pb2.ValidateTokenRequest(token="t"), timeout=10))
    return out


def _assert_the_scenario(seen: dict[str, tuple[str, float]]) -> None:
    assert seen["client.Authenticate"][0] == "OK"
    # Delayed, then served. Envoy's timers tick in whole milliseconds on its own clock: its 300 ms has
    # been measured here as 299.3 ms, so the bound allows 5 ms (undelayed, the call takes ~2 ms).
    assert seen["client.Authenticate"][1] >= DELAY - 0.005
    assert seen["client.ValidateToken"][0] == "NOT_FOUND: fault filter abort"  # aborted, not delayed (0 %)
    assert seen["client.health"][0] == "OK"
    assert seen["learner.ValidateToken"][0] == "OK"  # a caller the fault does not name


class Auth(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def Authenticate(self, request, context):
        self.calls.append("Authenticate")
        return auth_pb2.AuthenticateResponse(token="t", subject="s")

    async def ValidateToken(self, request, context):
        self.calls.append("ValidateToken")
        return auth_pb2.ValidateTokenResponse(valid=True)


@pytest.fixture
async def faulted_server(mesh_certs: CertLayout) -> AsyncIterator[tuple[MeshServer, Auth]]:
    app = Auth()
    server = MeshServer.for_service(_faulted(), "auth-svc", mesh_certs, port=0, metrics=MeshMetrics())
    auth_pb2_grpc.add_AuthServiceServicer_to_server(app, server.grpc_server)
    server.add_service_name("aivo.auth.v1.AuthService")
    await server.start()
    yield server, app
    await server.stop(0)


def _injected(server: MeshServer, method: str, fault: str) -> float:
    assert server.metrics is not None
    return server.metrics.registry.get_sample_value(
        "mesh_injected_faults_total", {"service": "auth-svc", "method": method, "fault": fault}) or 0.0


async def test_mesh_server_injects_the_faults_after_authorization(faulted_server, mesh_certs):
    server, app = faulted_server
    seen = await _observe(f"127.0.0.1:{server.bound_port}", mesh_certs)
    _assert_the_scenario(seen)
    assert app.calls == ["Authenticate", "ValidateToken"]  # the aborted call never reached the handler
    assert (_injected(server, AUTHENTICATE, "delay"), _injected(server, AUTHENTICATE, "abort")) == (1, 0)
    assert (_injected(server, VALIDATE, "delay"), _injected(server, VALIDATE, "abort")) == (0, 1)
    # The aborted call is counted with its status, as every other.
    assert server.metrics is not None and server.metrics.registry.get_sample_value("grpc_requests_total", {
        "side": "server", "service": "auth-svc", "method": VALIDATE, "status": "NOT_FOUND"}) == 1

    # A caller the allow-list refuses is refused, not faulted: authorization comes first.
    async with _channel(f"127.0.0.1:{server.bound_port}", mesh_certs, "event-collector-svc") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await auth_pb2_grpc.AuthServiceStub(ch).ValidateToken(auth_pb2.ValidateTokenRequest(token="t"), timeout=5)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # 0 %: untouched, from the next call on (what the control plane's `set_faults` does live).
    assert server.set_faults(fault_policies(_faulted(abort_percent=0, delay_percent=0), "auth-svc"))
    app.calls.clear()
    seen = await _observe(f"127.0.0.1:{server.bound_port}", mesh_certs)
    assert {name: status for name, (status, _) in seen.items()} == dict.fromkeys(seen, "OK")
    assert app.calls == ["Authenticate", "ValidateToken", "ValidateToken"]
    assert (_injected(server, AUTHENTICATE, "delay"), _injected(server, VALIDATE, "abort")) == (1, 1)  # unchanged
    assert server.guard.faults is None  # nothing can fault: no lookup per call


async def test_a_deadline_shorter_than_the_delay_ends_the_call_and_is_counted(faulted_server, mesh_certs):
    server, app = faulted_server
    async with _channel(f"127.0.0.1:{server.bound_port}", mesh_certs, "mesh-client") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await auth_pb2_grpc.AuthServiceStub(ch).Authenticate(
                auth_pb2.AuthenticateRequest(learner_id="ada", password="x" * 8), timeout=DELAY / 3)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert app.calls == []
    assert server.metrics is not None

    def counted() -> bool:
        assert server.metrics is not None
        return bool(server.metrics.registry.get_sample_value("grpc_requests_total", {
            "side": "server", "service": "auth-svc", "method": AUTHENTICATE, "status": "DEADLINE_EXCEEDED"}) == 1)

    await until(counted, timeout=5, what="the call cut during its delay is counted as DEADLINE_EXCEEDED")


async def test_a_plaintext_server_behind_a_sidecar_leaves_the_faults_to_it(mesh_certs: CertLayout) -> None:
    """`insecure` (the sidecar plane's app): the sidecar injects the faults; the app must not add its own."""
    server = MeshServer(_faulted(), "auth-svc", insecure=True, port=0)
    assert server.fault_policies and server.guard.faults is None
    secure = MeshServer.for_service(_faulted(), "auth-svc", mesh_certs, port=0)
    assert secure.guard.faults is not None


def _on_free_ports(mesh: MeshSpec) -> MeshSpec:
    ports = iter(free_ports(4 * len(mesh.services)))
    return mesh.model_copy(update={"services": tuple(
        s.model_copy(update={"local_port": next(ports), "sidecar": SidecarSpec(
            inbound_port=next(ports), outbound_port=next(ports), admin_port=next(ports))})
        for s in mesh.services)})


def _envoy_stat(admin: int, name: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=^{name}$", timeout=5) as r:
        body = r.read().decode()
    return int(body.split(":")[1]) if body.strip() else 0


@pytest.mark.slow
@needs("envoy")
async def test_envoy_inbound_injects_the_same_faults(mesh_certs: CertLayout, tmp_path: Path) -> None:
    m = _on_free_ports(_faulted())
    hits: list[str] = []

    def answer(name: str, body: bytes):
        async def method(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            hits.append(name)
            return body
        return method

    app, _ = await auth_app({"Authenticate": answer("Authenticate", auth_pb2.AuthenticateResponse(
        token="t").SerializeToString()), "ValidateToken": answer("ValidateToken", auth_pb2.ValidateTokenResponse(
            valid=True).SerializeToString())}, port=m.service("auth-svc").local_port)
    profile = EnvoyProfile.local(str(mesh_certs.root), str(tmp_path / "sds"))
    (tmp_path / "sds").mkdir()
    for name, doc in sds_files(m, "auth-svc", profile).items():
        (tmp_path / "sds" / name).write_text(serialize(name, doc))
    config = tmp_path / "envoy.yaml"
    config.write_text(serialize("envoy.yaml", bootstrap(m, "auth-svc", profile)))
    proc = await start_envoy_async(config)
    ports = sidecar_ports(m, "auth-svc", "local")
    try:
        await asyncio.to_thread(wait_envoy_live, ports.admin, proc)
        seen = await _observe(f"127.0.0.1:{ports.inbound}", mesh_certs)
        _assert_the_scenario(seen)
        assert hits == ["Authenticate", "ValidateToken"]
        assert _envoy_stat(ports.admin, "http.inbound_grpc.fault.delays_injected") == 1
        assert _envoy_stat(ports.admin, "http.inbound_grpc.fault.aborts_injected") == 1
    finally:
        proc.terminate()
        await proc.wait()
        await app.stop(0)
