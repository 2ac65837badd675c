"""A real Envoy 1.40 that starts with only its node identity, admin and the ADS cluster, and takes
everything else from aivo-mesh's ADS server: it comes up serving, and a changed allow rule applies to the
next call without a restart."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from binaries import needs, require
from envoy.service.discovery.v3 import ads_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from waiting import until

from aivo_mesh.config import MeshSpec, parse_mesh
from aivo_mesh.pki import CertLayout, PeerPolicy
from aivo_mesh.render.envoy import EnvoyProfile
from aivo_mesh.runtime.local import with_free_ports
from aivo_mesh.runtime.sidecar_certs import for_local_mesh
from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc
from aivo_mesh.xds.cache import SnapshotCache
from aivo_mesh.xds.resources import Trust, ads_bootstrap, sidecar_snapshot
from aivo_mesh.xds.server import AdsServer

pytestmark = [needs("envoy"), pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def _json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


async def _auth_app(port: int) -> tuple[grpc.aio.Server, list[str]]:
    calls: list[str] = []

    class Auth(auth_pb2_grpc.AuthServiceServicer):
        async def ValidateToken(self, request, context):
            calls.append(request.token)
            return auth_pb2.ValidateTokenResponse(valid=True, subject="app")

    server = grpc.aio.server()
    auth_pb2_grpc.add_AuthServiceServicer_to_server(Auth(), server)
    checker = health.aio.HealthServicer()
    await checker.set("aivo.auth.v1.AuthService", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, calls


@dataclass
class ControlPlane:
    cache: SnapshotCache
    ads: AdsServer
    port: int


@pytest.fixture
async def control_plane(mesh: MeshSpec, mesh_certs: CertLayout) -> AsyncIterator[ControlPlane]:
    cache = SnapshotCache()
    groups = {mesh.spiffe_id(s): s for s in mesh.service_names}
    ads = AdsServer(cache, lambda node: groups.get(node.id), PeerPolicy.from_mesh(mesh))
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    cert, key = mesh_certs.identity_paths(mesh.control_plane.identity)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())], mesh_certs.ca_cert.read_bytes(), True))
    await server.start()
    try:
        yield ControlPlane(cache, ads, port)
    finally:
        await server.stop(0)


def _without_mesh_client_on_validate(mesh: MeshSpec) -> MeshSpec:
    text = (ROOT / "mesh.yaml").read_text().replace(
        "      - from: [mesh-client]\n        methods: [/aivo.auth.v1.AuthService/Authenticate, "
        "/aivo.auth.v1.AuthService/ValidateToken]",
        "      - from: [mesh-client]\n        methods: [/aivo.auth.v1.AuthService/Authenticate]")
    return parse_mesh(text, "mesh.yaml")


def _same_ports(changed: MeshSpec, ports_from: MeshSpec) -> MeshSpec:
    services = []
    for svc in changed.services:
        old = ports_from.service(svc.name)
        services.append(svc.model_copy(update={"port": old.port, "local_port": old.local_port,
                                               "admin_port": old.admin_port, "sidecar": old.sidecar}))
    return changed.model_copy(update={"services": tuple(services)})


async def test_a_bootstrap_only_envoy_serves_from_ads_and_follows_a_changed_allow_rule(
        control_plane: ControlPlane, mesh: MeshSpec, mesh_certs: CertLayout, tmp_path: Path) -> None:
    envoy = require("envoy")
    m = with_free_ports(mesh)
    d = tmp_path / "envoy" / "auth-svc"
    (d / "sds").mkdir(parents=True)
    for_local_mesh(mesh_certs, m, tmp_path / "envoy").publish()  # the node-local certificate SDS file
    profile = EnvoyProfile.local(str(mesh_certs.root.resolve()), str((d / "sds").resolve()))
    trust = Trust(mesh_certs.ca_cert.read_bytes())
    control_plane.cache.set("auth-svc", sidecar_snapshot(m, "auth-svc", profile, trust))
    boot = ads_bootstrap(m, "auth-svc", profile, ("127.0.0.1", control_plane.port),
                         str(mesh_certs.ca_cert.resolve()), str((d / "sds" / "tls_cert.yaml").resolve()))
    assert set(boot["static_resources"]) == {"clusters"} and "listeners" not in boot["static_resources"]
    (d / "envoy.yaml").write_text(yaml.safe_dump(boot, sort_keys=False))
    app, calls = await _auth_app(m.service("auth-svc").local_port)
    proc = await asyncio.create_subprocess_exec(
        envoy, "-c", str(d / "envoy.yaml"), "--disable-hot-restart", "--concurrency", "1", "--log-level", "error",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    admin = m.service("auth-svc").sidecar.admin_port
    try:
        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                    return bool(r.read().decode().strip() == "LIVE")
            except OSError:
                return False

        await until(ready, timeout=30, what="Envoy LIVE from ADS alone")
        node = "spiffe://aivo.local/ns/default/sa/auth-svc"
        assert (await control_plane.ads.wait_settled(timeout=10))[node] == "acked"
        cert, key = mesh_certs.identity_paths("mesh-client")
        creds = grpc.ssl_channel_credentials(mesh_certs.ca_cert.read_bytes(), key.read_bytes(), cert.read_bytes())
        address = f"127.0.0.1:{m.service('auth-svc').sidecar.inbound_port}"
        async with grpc.aio.secure_channel(address, creds, options=[("grpc.default_authority", "auth-svc")]) as ch:
            stub = auth_pb2_grpc.AuthServiceStub(ch)
            assert (await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="1"), timeout=5)).valid
            # mesh.yaml changes: mesh-client may no longer call ValidateToken. Pushed, ACKed, in force.
            changed = _same_ports(_without_mesh_client_on_validate(m), m)
            control_plane.cache.set("auth-svc", sidecar_snapshot(changed, "auth-svc", profile, trust))
            assert (await control_plane.ads.wait_settled(timeout=10))[node] == "acked"
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="2"), timeout=5)
            assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert calls == ["1"]
        dump = _json(f"http://127.0.0.1:{admin}/config_dump")
        kinds = {c["@type"].rsplit(".", 1)[-1] for c in dump["configs"]}  # type: ignore[index]
        assert {"ListenersConfigDump", "RoutesConfigDump", "ClustersConfigDump"} <= kinds
    finally:
        proc.terminate()
        await proc.wait()
        await app.stop(0)
