"""The sidecar's outbound listener as an application dials it (docs/migration.md, docs/envoy.md).

The channel is docs/migration.md's `sidecar_channel`, taken from the page and run as written, against
real Envoys: learner-svc's sidecar with `sidecar.outbound_tls: true`, auth-svc's sidecar, and a grpc.aio
stand-in for auth-svc's app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from binaries import needs
from grpc._cython import cygrpc
from helpers import ROOT, auth_app, on_free_ports, start_envoy_async, wait_envoy_live, write_sidecar
from waiting import until

from aivo_mesh.client import MeshClient, MeshConfig
from aivo_mesh.config import MeshSpec
from aivo_mesh.config.ports import sidecar_ports
from aivo_mesh.pki import CertLayout
from aivo_mesh.render.envoy import OUTBOUND_LISTENER, EnvoyProfile, bootstrap, outbound_refusal
from aivo_mesh.runtime.status import envoy_hosts
from aivo_mesh.services.protos import analytics_pb2, analytics_pb2_grpc, auth_pb2, auth_pb2_grpc
from aivo_mesh.xds.cache import LISTENER, ROUTE
from aivo_mesh.xds.resources import Trust, as_dict, sidecar_snapshot

CALLER = "learner-svc"


def _with_outbound_tls(mesh: MeshSpec, service: str) -> MeshSpec:
    services = tuple(s.model_copy(update={"sidecar": s.sidecar.model_copy(update={"outbound_tls": True})})
                     if s.name == service else s for s in mesh.services)
    return mesh.model_copy(update={"services": services})


def _documented_channel_factory() -> Any:
    """`sidecar_channel` exactly as docs/migration.md writes it."""
    text = (ROOT / "docs" / "migration.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def sidecar_channel" in b]
    assert len(blocks) == 1, "docs/migration.md has one sidecar_channel example"
    namespace: dict[str, Any] = {}
    exec(compile(blocks[0], "docs/migration.md", "exec"), namespace)  # the page itself: run what it shows
    return namespace["sidecar_channel"]


def _outbound(cfg: dict[str, Any]) -> dict[str, Any]:
    return next(item for item in cfg["static_resources"]["listeners"] if item["name"] == OUTBOUND_LISTENER)


def _stats(admin: int, pattern: str) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?format=json&filter={pattern}", timeout=5) as r:
        return {s["name"]: int(s.get("value", 0)) for s in json.load(r)["stats"] if "value" in s}


def _keepalives_sent(target: str) -> int:
    """PINGs grpc sent on the sockets of this process's channels to `target` (channelz)."""
    sent = 0
    for ch in json.loads(cygrpc.channelz_get_top_channels(0)).get("channel", []):
        if not str(ch.get("data", {}).get("target", "")).endswith(target):
            continue
        for ref in ch.get("subchannelRef", []):
            sub = json.loads(cygrpc.channelz_get_subchannel(int(ref["subchannelId"])))["subchannel"]
            for sref in sub.get("socketRef", []):
                sock = json.loads(cygrpc.channelz_get_socket(int(sref["socketId"])))["socket"]
                sent += int(sock.get("data", {}).get("keepAlivesSent", 0))
    return sent


def _validate(channel: grpc.Channel, request: auth_pb2.ValidateTokenRequest) -> bool:
    """ValidateToken on a blocking channel, as the documented app calls it."""
    # The generated stub's types describe grpc.aio calls; on a blocking channel the call is the reply.
    reply = cast(auth_pb2.ValidateTokenResponse,
                 auth_pb2_grpc.AuthServiceStub(channel).ValidateToken(request, timeout=5))
    return reply.valid


# --- what is rendered ----------------------------------------------------------------------------------
def test_outbound_tls_requires_the_services_own_certificate_and_is_off_by_default(mesh: MeshSpec) -> None:
    profile = EnvoyProfile.pod(mesh)
    assert "transport_socket" not in _outbound(bootstrap(mesh, CALLER, profile))["filter_chains"][0]
    chain = _outbound(bootstrap(_with_outbound_tls(mesh, CALLER), CALLER, profile))["filter_chains"][0]
    tls = chain["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    common = tls["common_tls_context"]
    assert common["tls_params"] == {"tls_minimum_protocol_version": "TLSv1_3",
                                    "tls_maximum_protocol_version": "TLSv1_3"}
    assert common["alpn_protocols"] == ["h2"]
    assert common["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": mesh.spiffe_id(CALLER)}}]


def test_no_peer_route_is_the_last_one_rendered_and_over_the_control_plane(mesh: MeshSpec) -> None:
    """What no peer's route takes gets the refusal, after every peer route, in the static bootstrap and in
    the route configuration the control plane sends (which adds the peers' routes to the bootstrap's)."""
    m = _with_outbound_tls(mesh, CALLER)
    profile = EnvoyProfile.pod(m)
    hcm = _outbound(bootstrap(m, CALLER, profile))["filter_chains"][0]["filters"][0]["typed_config"]
    static = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert static[-1] == outbound_refusal(CALLER)
    assert static[-1]["direct_response"]["status"] == 403
    assert all("route" in r for r in static[:-1]) and len(static) > 1
    snap = sidecar_snapshot(m, CALLER, profile, Trust(b"unused"))
    sent = as_dict(snap.get(ROUTE)["outbound"])["virtual_hosts"][0]["routes"]
    assert [r["name"] for r in sent] == [r["name"] for r in static]
    assert sent[-1]["direct_response"]["body"]["inline_string"] == outbound_refusal(CALLER)[
        "direct_response"]["body"]["inline_string"]
    listener = as_dict(snap.get(LISTENER)[OUTBOUND_LISTENER])
    assert listener["filter_chains"][0]["transport_socket"]["typed_config"]["require_client_certificate"] is True


# --- with the real Envoy -----------------------------------------------------------------------------
@contextlib.contextmanager
def _identity_env(monkeypatch: pytest.MonkeyPatch, certs: CertLayout, identity: str) -> Iterator[None]:
    cert, key = certs.identity_paths(identity)
    with monkeypatch.context() as patch:
        patch.setenv("CA_CERT_PATH", str(certs.ca_cert))
        patch.setenv("CLIENT_CERT_PATH", str(cert))
        patch.setenv("CLIENT_KEY_PATH", str(key))
        yield


@pytest.mark.slow
@needs("envoy")
async def test_the_documented_channel_reaches_the_peer_its_stub_names(
        mesh: MeshSpec, mesh_certs: CertLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/migration.md's `sidecar_channel("localhost:<outbound>")` with learner-svc's certificate:
    AuthService's ValidateToken reaches auth-svc's app; AnalyticsService (learner-svc may not call
    analytics-svc) is PERMISSION_DENIED with the sidecar's message; keepalive PINGs every 100 ms leave the
    one connection up (no GOAWAY); MeshClient with `sidecar_outbound` (meshctl serve) calls through it too;
    another service's certificate, or plaintext, are refused."""
    m = on_free_ports(_with_outbound_tls(mesh, CALLER))
    seen: list[bytes] = []

    async def validate(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        seen.append(request)
        return auth_pb2.ValidateTokenResponse(valid=True).SerializeToString()

    server, _ = await auth_app({"ValidateToken": validate}, port=m.service("auth-svc").local_port)
    procs = []
    try:
        for s in ("auth-svc", CALLER):
            config = write_sidecar(m, s, EnvoyProfile.local(str(mesh_certs.root), str(tmp_path / s / "sds")),
                                   tmp_path / s / "envoy.yaml")
            procs.append(await start_envoy_async(config))
        for s, proc in zip(("auth-svc", CALLER), procs, strict=True):
            await asyncio.to_thread(wait_envoy_live, sidecar_ports(m, s, "local").admin, proc)
        ports = sidecar_ports(m, CALLER, "local")

        def auth_healthy() -> bool:
            with contextlib.suppress(OSError):
                hosts = envoy_hosts(f"127.0.0.1:{ports.admin}").get("auth-svc", {})
                return bool(hosts) and all(f == "healthy" for f in hosts.values())
            return False

        await until(auth_healthy, 15, "learner's sidecar sees auth-svc healthy")
        sidecar_channel = _documented_channel_factory()
        address = f"localhost:{ports.outbound}"
        request = auth_pb2.ValidateTokenRequest(token="t")

        with _identity_env(monkeypatch, mesh_certs, CALLER):
            channel = sidecar_channel(address, keepalive_ms=100)
        try:
            assert await asyncio.to_thread(_validate, channel, request) and seen == [request.SerializeToString()]
            with pytest.raises(grpc.RpcError) as denied:
                await asyncio.to_thread(analytics_pb2_grpc.AnalyticsServiceStub(channel).RunReport,
                                        analytics_pb2.RunReportRequest(), timeout=5)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert f"{CALLER}'s sidecar has no route for this method" in str(denied.value.details())
            # The app's keepalive, far more frequent than mesh.yaml's: Envoy answers the PINGs and keeps
            # the connection, where a grpc server would answer GOAWAY too_many_pings.
            await until(lambda: _keepalives_sent(address) >= 10, 30, "ten keepalive PINGs sent")
            assert await asyncio.to_thread(_validate, channel, request)
            hcm = _stats(ports.admin, rf"^http\.{OUTBOUND_LISTENER}\.downstream_cx_(total|destroy)$")
            assert hcm == {f"http.{OUTBOUND_LISTENER}.downstream_cx_total": 1,
                           f"http.{OUTBOUND_LISTENER}.downstream_cx_destroy": 0}, hcm
        finally:
            channel.close()

        # MeshClient as `meshctl serve --sidecar-outbound` builds it: mTLS to the listener, because mesh.yaml
        # says so, checking that the listener holds learner-svc's own identity.
        client_config = MeshConfig.for_identity(CALLER, mesh_certs, m, sidecar_outbound=f"127.0.0.1:{ports.outbound}")
        async with MeshClient(client_config) as client:
            stub = auth_pb2_grpc.AuthServiceStub(await client.channel("auth-svc"))
            assert (await stub.ValidateToken(request)).valid
        assert len(seen) == 3

        # Anything but learner-svc's own certificate is refused at the handshake.
        with _identity_env(monkeypatch, mesh_certs, "analytics-svc"):
            other = sidecar_channel(address)
        ssl = rf"^listener\.127\.0\.0\.1_{ports.outbound}\.ssl\.(fail_verify_san|fail_verify_no_cert|handshake)$"
        before = _stats(ports.admin, ssl)
        for ch in (other, grpc.insecure_channel(address)):
            with ch, pytest.raises(grpc.RpcError) as refused:
                _validate(ch, request)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        after = _stats(ports.admin, ssl)
        san = f"listener.127.0.0.1_{ports.outbound}.ssl.fail_verify_san"
        assert after[san] > before.get(san, 0), after
        assert len(seen) == 3  # nothing refused reached the app
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            await proc.wait()
        await server.stop(0)
    assert [p.returncode for p in procs] == [0, 0]
