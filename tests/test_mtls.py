"""MeshServer + MeshClient over real mTLS on 127.0.0.1: who gets in, who is refused, and why."""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from faults import TcpProxy
from grpc_health.v1 import health_pb2, health_pb2_grpc
from waiting import until

from aivo_mesh import MeshClient, MeshConfig, MeshServer, PkiError
from aivo_mesh.config import MeshSpec, parse_mesh
from aivo_mesh.pki import CertLayout
from aivo_mesh.pki.issue import init_ca, issue_leaf
from aivo_mesh.runtime.local import free_port
from aivo_mesh.server import current_caller
from aivo_mesh.server.server import MAX_CONNECTION_AGE_MS
from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc
from aivo_mesh.tls import tls13_enforced

ROOT = Path(__file__).resolve().parents[1]
# gRPC rounds a deadline up twice, each time to a whole millisecond: the client's deadline, then the
# grpc-timeout header it sends. A server can so see up to 2 ms more than the caller's timeout.
GRPC_ROUNDING = 0.002


class EchoAuth(auth_pb2_grpc.AuthServiceServicer):
    """A test double of the auth service: reports the caller and can be slow on demand."""

    async def Authenticate(self, request, context):
        return auth_pb2.AuthenticateResponse(token="t", subject=current_caller.get() or "")

    async def ValidateToken(self, request, context):
        if request.token.startswith("sleep:"):
            await asyncio.sleep(float(request.token.split(":")[1]))
        remaining = context.time_remaining()
        # Unrounded: rounding here could only push the figure further past the caller's timeout.
        return auth_pb2.ValidateTokenResponse(valid=True, reason=repr(remaining) if remaining else "none")


@pytest.fixture
def auth_mesh(mesh: MeshSpec) -> MeshSpec:
    """mesh.yaml with auth-svc on a free port and a short ValidateToken route timeout."""
    port = free_port()
    text = (ROOT / "mesh.yaml").read_text().replace("port: 50051", f"port: {port}")
    text = text.replace("timeout: 1s\n        idempotent: true", "timeout: 300ms\n        idempotent: true")
    return parse_mesh(text, "mesh.yaml")


@pytest.fixture
async def auth_server(auth_mesh: MeshSpec, mesh_certs: CertLayout) -> AsyncIterator[MeshServer]:
    server = MeshServer.for_service(auth_mesh, "auth-svc", mesh_certs)
    auth_pb2_grpc.add_AuthServiceServicer_to_server(EchoAuth(), server.grpc_server)
    server.add_service_name("aivo.auth.v1.AuthService")
    await server.start()
    yield server
    await server.stop(0.5)


def _client(mesh: MeshSpec, certs: CertLayout, name: str) -> MeshClient:
    return MeshClient(MeshConfig.for_identity(name, certs, mesh))


async def test_allowed_identity_reaches_the_service(auth_server, auth_mesh, mesh_certs):
    async with _client(auth_mesh, mesh_certs, "mesh-client") as client, client.get_channel("auth-svc") as channel:
        reply = await auth_pb2_grpc.AuthServiceStub(channel).Authenticate(
            auth_pb2.AuthenticateRequest(learner_id="l1", password="x" * 8))
    assert reply.subject == "spiffe://aivo.local/ns/default/sa/mesh-client"


async def test_disallowed_identity_gets_permission_denied_naming_the_caller(auth_server, auth_mesh, mesh_certs):
    # event-collector-svc is not in auth-svc's allow-list at all.
    async with _client(auth_mesh, mesh_certs, "event-collector-svc") as client:
        channel = await client.get_channel("auth-svc")
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await auth_pb2_grpc.AuthServiceStub(channel).ValidateToken(auth_pb2.ValidateTokenRequest(token="x"))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "spiffe://aivo.local/ns/default/sa/event-collector-svc" in exc.value.details()


async def test_allow_list_is_per_method(auth_server, auth_mesh, mesh_certs):
    # learner-svc may ValidateToken but not Authenticate.
    async with _client(auth_mesh, mesh_certs, "learner-svc") as client:
        stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
        assert (await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="x"))).valid
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Authenticate(auth_pb2.AuthenticateRequest(learner_id="l", password="x" * 8))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_an_allowed_method_is_matched_exactly(auth_mesh, mesh_certs):
    """learner-svc may call ValidateToken only: a method of the same service whose name merely starts
    with it (served here for the test) is denied. The sidecar plane: test_sidecar_e2e.py."""
    async def validate_many(request: auth_pb2.ValidateTokenRequest, context: grpc.aio.ServicerContext
                            ) -> auth_pb2.ValidateTokenResponse:
        return auth_pb2.ValidateTokenResponse(valid=True)

    server = MeshServer.for_service(auth_mesh, "auth-svc", mesh_certs)
    auth_pb2_grpc.add_AuthServiceServicer_to_server(EchoAuth(), server.grpc_server)
    server.grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("aivo.auth.v1.AuthService", {
        "ValidateTokens": grpc.unary_unary_rpc_method_handler(
            validate_many, request_deserializer=auth_pb2.ValidateTokenRequest.FromString,
            response_serializer=auth_pb2.ValidateTokenResponse.SerializeToString)}),))
    await server.start()
    cert, key = mesh_certs.identity_paths("learner-svc")
    creds = grpc.ssl_channel_credentials(mesh_certs.ca_cert.read_bytes(), key.read_bytes(), cert.read_bytes())
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.bound_port}", creds,
                                           options=[("grpc.default_authority", "auth-svc")]) as ch:
            assert (await auth_pb2_grpc.AuthServiceStub(ch).ValidateToken(
                auth_pb2.ValidateTokenRequest(token="x"), timeout=5)).valid
            many = ch.unary_unary("/aivo.auth.v1.AuthService/ValidateTokens",
                                  request_serializer=auth_pb2.ValidateTokenRequest.SerializeToString,
                                  response_deserializer=auth_pb2.ValidateTokenResponse.FromString)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await many(auth_pb2.ValidateTokenRequest(token="x"), timeout=5)
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED, exc.value
    finally:
        await server.stop(0)


class RecordingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """An interceptor of the service's own: notes each call its behaviour sees."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        inner = handler.unary_unary

        async def behaviour(request, context):
            self.seen.append(details.method)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(behaviour, handler.request_deserializer,
                                                   handler.response_serializer)


async def test_interceptors_of_the_service_run_behind_the_guard(auth_mesh, mesh_certs):
    """MeshServer(interceptors=...) keeps the guard first: a refused call never reaches them."""
    recording = RecordingInterceptor()
    server = MeshServer.for_service(auth_mesh, "auth-svc", mesh_certs, interceptors=[recording])
    auth_pb2_grpc.add_AuthServiceServicer_to_server(EchoAuth(), server.grpc_server)
    await server.start()
    try:
        async with _client(auth_mesh, mesh_certs, "learner-svc") as client:
            stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
            assert (await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="x"))).valid
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.Authenticate(auth_pb2.AuthenticateRequest(learner_id="l", password="x" * 8))
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # The client's health check, the allowed call; never the refused one.
        assert [m for m in recording.seen if "AuthService" in m] == ["/aivo.auth.v1.AuthService/ValidateToken"]
    finally:
        await server.stop(0)


async def test_each_method_is_guarded_once_not_per_call(auth_server, auth_mesh, mesh_certs):
    """The guard wraps a method's handler once (grpc.aio would rebuild it per call behind an interceptor);
    authorizer and faults are still read per call, so a changed allow-list applies to the next call."""
    guard = auth_server.guard
    async with _client(auth_mesh, mesh_certs, "learner-svc") as client:
        stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
        for _ in range(3):
            assert (await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="x"))).valid
        wrapped = {m for m, _ in guard._guarded}
        assert "/aivo.auth.v1.AuthService/ValidateToken" in wrapped
        assert len(guard._guarded) == len(wrapped)  # one wrapping per method, however many calls
        text = (ROOT / "mesh.yaml").read_text().replace("port: 50051", f"port: {auth_server.port}")
        text = text.replace("- from: [learner-svc, analytics-svc]", "- from: [analytics-svc]", 1)
        closed = parse_mesh(text, "mesh.yaml")
        assert auth_server.update_authorizer(closed)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="x"))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_whole_service_allow_rule_admits_every_method(mesh_certs):
    """`methods: [pkg.Service]` (docs/config.md) is the prefix `/pkg.Service/`: learner-svc, allowed only
    ValidateToken by mesh.yaml, may call Authenticate under it."""
    rule = "from: [learner-svc, analytics-svc]\n        methods: [{}]"
    text = (ROOT / "mesh.yaml").read_text().replace("port: 50051", f"port: {free_port()}")
    assert rule.format("/aivo.auth.v1.AuthService/ValidateToken") in text
    text = text.replace(rule.format("/aivo.auth.v1.AuthService/ValidateToken"), rule.format("aivo.auth.v1.AuthService"))
    whole = parse_mesh(text, "mesh.yaml")
    server = MeshServer.for_service(whole, "auth-svc", mesh_certs)
    auth_pb2_grpc.add_AuthServiceServicer_to_server(EchoAuth(), server.grpc_server)
    await server.start()
    try:
        async with _client(whole, mesh_certs, "learner-svc") as client:
            stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
            reply = await stub.Authenticate(auth_pb2.AuthenticateRequest(learner_id="l", password="x" * 8))
    finally:
        await server.stop(0.5)
    assert reply.subject == whole.spiffe_id("learner-svc")


async def test_health_answers_every_mesh_identity_check_and_watch(auth_server, auth_mesh, mesh_certs):
    # event-collector-svc may call no auth method, but health is open to every mesh identity.
    async with _client(auth_mesh, mesh_certs, "event-collector-svc") as client:
        stub = health_pb2_grpc.HealthStub(await client.get_channel("auth-svc"))
        for name in ("", "aivo.auth.v1.AuthService"):
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="aivo.auth.v1.AuthService"))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        await auth_server.health.set("aivo.auth.v1.AuthService", health_pb2.HealthCheckResponse.NOT_SERVING)
        second = await asyncio.wait_for(watch.read(), 5)
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()


async def test_client_without_certificate_is_refused(auth_server, mesh_certs):
    creds = grpc.ssl_channel_credentials(root_certificates=mesh_certs.ca_cert.read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{auth_server.bound_port}", creds,
                                       options=[("grpc.default_authority", "auth-svc")]) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_plaintext_client_is_refused(auth_server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{auth_server.bound_port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_certificate_from_a_foreign_ca_is_refused(auth_server, auth_mesh, tmp_path, mesh_certs):
    foreign = CertLayout(tmp_path / "foreign")
    init_ca(foreign, auth_mesh.mesh.trust_domain)  # same trust domain, different CA: still refused
    issue_leaf(foreign, "mesh-client", auth_mesh)
    cert, key = foreign.identity_paths("mesh-client")
    creds = grpc.ssl_channel_credentials(mesh_certs.ca_cert.read_bytes(), key.read_bytes(), cert.read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{auth_server.bound_port}", creds,
                                       options=[("grpc.default_authority", "auth-svc")]) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_client_verifies_the_server_under_the_target_service_name(auth_server, auth_mesh, mesh_certs):
    # Point "learner-svc" at auth-svc's port: auth-svc's certificate does not name learner-svc.
    config = MeshConfig.for_identity("mesh-client", mesh_certs, auth_mesh,
                                     endpoints={"learner-svc": [f"127.0.0.1:{auth_server.bound_port}"]})
    async with MeshClient(config) as client:
        stub = health_pb2_grpc.HealthStub(await client.get_channel("learner-svc"))
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_route_deadline_applies_when_the_caller_gives_none(auth_server, auth_mesh, mesh_certs):
    async with _client(auth_mesh, mesh_certs, "learner-svc") as client:
        stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
        # The server sees the route's 300 ms deadline.
        seen = float((await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="x"))).reason)
        assert 0 < seen <= 0.3 + GRPC_ROUNDING
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="sleep:3"))
        assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 2.0
        # A caller's smaller timeout wins over the route's.
        seen = float((await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="x"), timeout=0.1)).reason)
        assert 0 < seen <= 0.1 + GRPC_ROUNDING  # the caller's 100 ms, not the route's 300 ms


async def test_channels_are_pooled(auth_server, auth_mesh, mesh_certs):
    async with _client(auth_mesh, mesh_certs, "mesh-client") as client:
        a = await client.get_channel("auth-svc")
        async with client.get_channel("auth-svc") as b:
            assert a is b


def _h2_grpc_check_over_tls12(port: int, certs: CertLayout) -> dict[str, str]:
    """A gRPC Health/Check over HTTP/2 on a TLS 1.2 connection (grpcio cannot limit its own TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(certs.ca_cert)
    cert, key = certs.identity_paths("mesh-client")
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="auth-svc") as tls:
        assert tls.version() == "TLSv1.2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "POST"), (":scheme", "https"), (":authority", "auth-svc"),
                                (":path", "/grpc.health.v1.Health/Check"), ("content-type", "application/grpc"),
                                ("te", "trailers")])
        conn.send_data(sid, b"\x00\x00\x00\x00\x00", end_stream=True)
        tls.sendall(conn.data_to_send())
        headers: dict[str, str] = {}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            data = tls.recv(65535)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    headers.update({k.decode() if isinstance(k, bytes) else k:
                                    v.decode() if isinstance(v, bytes) else v for k, v in ev.headers})
                if isinstance(ev, h2.events.StreamEnded):
                    return headers
            tls.sendall(conn.data_to_send())
        return headers


async def test_tls12_client_fails_the_handshake(auth_server, mesh_certs):
    # aivo_mesh.tls leaves TLS 1.2 no cipher suite in grpc core: refused before any request is read.
    assert tls13_enforced()
    with pytest.raises(ssl.SSLError):
        await asyncio.to_thread(_h2_grpc_check_over_tls12, auth_server.bound_port, mesh_certs)


_GRPC_FIRST = """
import asyncio, grpc, sys                      # grpc first: aivo_mesh.tls comes too late for grpc core
sys.path.insert(0, {tests!r})
from aivo_mesh import MeshServer
from aivo_mesh.config import load_mesh
from aivo_mesh.pki import CertLayout
from aivo_mesh.tls import tls13_enforced
from test_mtls import _h2_grpc_check_over_tls12

async def main():
    certs = CertLayout({certs!r})
    server = MeshServer.for_service(load_mesh({mesh!r}), "auth-svc", certs, port=0)
    await server.start()
    headers = await asyncio.to_thread(_h2_grpc_check_over_tls12, server.bound_port, certs)
    print(tls13_enforced(), headers.get("grpc-status"), headers.get("grpc-message"))
    await server.stop(0)
asyncio.run(main())
"""


def test_without_the_handshake_refusal_a_tls12_call_is_still_refused_and_warned(mesh_certs, tmp_path):
    script = _GRPC_FIRST.format(tests=str(ROOT / "tests"), certs=str(mesh_certs.root), mesh=str(ROOT / "mesh.yaml"))
    env = {k: v for k, v in os.environ.items() if k != "GRPC_SSL_CIPHER_SUITES"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env,
                         check=False)
    assert out.returncode == 0, out.stderr
    enforced, status, message = out.stdout.split(" ", 2)
    assert enforced == "False"
    assert status == str(grpc.StatusCode.UNAUTHENTICATED.value[0])
    assert "TLSv1.3" in message
    assert "TLS 1.2 peers are not refused at the handshake" in out.stderr
    assert "grpc was imported before aivo_mesh" in out.stderr


@pytest.mark.parametrize("damage", ["garbage_cert", "garbage_key", "key_mismatch", "key_mode_0644", "missing"])
def test_bad_certificate_files_fail_before_bind_naming_the_file(damage, auth_mesh, mesh_certs, tmp_path):
    cert, key = mesh_certs.identity_paths("auth-svc")
    c, k = tmp_path / "auth.crt", tmp_path / "auth-key.pem"
    shutil.copy(cert, c)
    shutil.copy(key, k)
    os.chmod(k, 0o600)
    bad = {"garbage_cert": c, "garbage_key": k, "key_mismatch": k, "key_mode_0644": k, "missing": c}[damage]
    if damage == "garbage_cert":
        c.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    elif damage == "garbage_key":
        k.write_text("hello")
    elif damage == "key_mismatch":
        other = mesh_certs.identity_paths("learner-svc")[1]
        k.write_bytes(other.read_bytes())
    elif damage == "key_mode_0644":
        os.chmod(k, 0o644)
    elif damage == "missing":
        c.unlink()
    with pytest.raises(PkiError) as exc:
        MeshServer(auth_mesh, "auth-svc", cert=c, key=k, ca=mesh_certs.ca_cert)
    assert str(bad) in str(exc.value)


async def test_rotated_certificates_apply_to_new_connections_without_restart(auth_mesh, tmp_path):
    certs = CertLayout(tmp_path / "certs")
    init_ca(certs, auth_mesh.mesh.trust_domain)
    for n in ("auth-svc", "mesh-client"):
        issue_leaf(certs, n, auth_mesh)
    server = MeshServer.for_service(auth_mesh, "auth-svc", certs)
    await server.start()
    credentials = server.credentials
    assert credentials is not None
    try:
        first = credentials.identity.serial
        issue_leaf(certs, "auth-svc", auth_mesh)  # a new key and serial, same files
        async with _client(auth_mesh, certs, "mesh-client") as client:
            stub = health_pb2_grpc.HealthStub(await client.get_channel("auth-svc"))
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert credentials.reloads == 1
        assert credentials.identity.serial != first
    finally:
        await server.stop(0.5)


def test_documented_import_path_works_from_the_repo_root():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "from infra.mesh.python.mesh_client import MeshClient, MeshConfig; "
         "import aivo_mesh; assert MeshClient is aivo_mesh.MeshClient; print(MeshConfig.__name__)"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "MeshConfig"


def test_a_process_refuses_another_identitys_certificate(mesh: MeshSpec, mesh_certs: CertLayout) -> None:
    # learner-svc's files pass every TLS check; serving auth-svc with them would be authorized as learner-svc.
    cert, key = mesh_certs.identity_paths("learner-svc")
    with pytest.raises(PkiError, match=r"learner-svc.*expected spiffe://aivo\.local/ns/default/sa/auth-svc") as exc:
        MeshServer(mesh, "auth-svc", cert=cert, key=key, ca=mesh_certs.ca_cert, port=0)
    assert str(cert) in str(exc.value)
    swapped = MeshConfig(service_name="auth-svc", ca_cert_path=mesh_certs.ca_cert, client_cert_path=cert,
                         client_key_path=key, mesh=mesh)
    with pytest.raises(PkiError, match=r"expected spiffe://aivo\.local/ns/default/sa/auth-svc"):
        MeshClient(swapped)
    assert MeshClient(MeshConfig.for_identity("learner-svc", mesh_certs, mesh)).identity.spiffe_id == \
        mesh.spiffe_id("learner-svc")


def test_a_bad_rotation_is_parsed_once_not_on_every_handshake(mesh_certs, tmp_path, caplog):
    """grpc asks the server credentials for a new config on every handshake. While the files on disk
    are bad (here: auth's certificate with learner's key), the last good identity keeps serving and
    the bad files are read and logged once, not per connection; once they change, they load."""
    from aivo_mesh.server.credentials import ReloadingServerCredentials

    cert, key = tmp_path / "auth.crt", tmp_path / "auth-key.pem"
    good_cert, good_key = mesh_certs.service_paths("auth-svc")
    shutil.copy(good_cert, cert)
    shutil.copy(good_key, key)
    creds = ReloadingServerCredentials(cert, key, mesh_certs.ca_cert)
    assert creds._fetch() is None  # unchanged files: nothing to do

    def replace_key(pem: bytes, mode: int = 0o600) -> None:
        new = tmp_path / "new-key.pem"
        new.write_bytes(pem)
        new.chmod(mode)
        os.replace(new, key)  # atomic, as `certs rotate` writes

    replace_key(mesh_certs.service_paths("learner-svc")[1].read_bytes())  # not auth's key
    with caplog.at_level("WARNING", logger="aivo_mesh.server.credentials"):
        assert [creds._fetch() for _ in range(5)] == [None] * 5
        skipped = [r.getMessage() for r in caplog.records if "reload skipped" in r.getMessage()]
        assert len(skipped) == 1 and "does not match" in skipped[0], skipped
        assert creds.reloads == 0

        replace_key(good_key.read_bytes(), 0o644)  # the right key, but readable by others: refused
        assert creds._fetch() is None and creds.reloads == 0
        key.chmod(0o600)  # the fix the message asks for changes no mtime, size or inode: still noticed
        assert creds._fetch() is not None
        assert creds.reloads == 1


class CountingProxy(TcpProxy):
    """A loopback TCP forwarder that counts the connections it was asked for."""

    accepted = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        await super()._handle(reader, writer)


async def test_the_server_closes_a_connection_at_its_max_age_and_the_client_reconnects(auth_mesh, mesh_certs):
    """docs/certificates.md: connections are closed after a maximum age (5 minutes; 0.3 s here) so every
    client handshakes again, and so meets a rotated certificate, without a restart."""
    server = MeshServer.for_service(auth_mesh, "auth-svc", mesh_certs, max_connection_age_ms=300,
                                    max_connection_age_grace_ms=300)
    auth_pb2_grpc.add_AuthServiceServicer_to_server(EchoAuth(), server.grpc_server)
    await server.start()
    assert server.bound_port is not None
    proxy = CountingProxy(server.bound_port)
    await proxy.start()
    cert, key = mesh_certs.identity_paths("mesh-client")
    creds = grpc.ssl_channel_credentials(mesh_certs.ca_cert.read_bytes(), key.read_bytes(), cert.read_bytes())
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{proxy.port}", creds,
                                           options=[("grpc.default_authority", "auth-svc")]) as ch:
            stub = auth_pb2_grpc.AuthServiceStub(ch)
            assert (await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="x"), timeout=5)).valid
            assert ch.get_state() == grpc.ChannelConnectivity.READY
            # The server's GOAWAY at max age (±10 % jitter) ends the connection: the channel goes idle.
            await until(lambda: ch.get_state() != grpc.ChannelConnectivity.READY, timeout=10,
                        what="the server closed the connection at its max age")
            assert (await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="x"), timeout=5)).valid
        assert proxy.accepted == 2  # the second call came on a new connection, with a new handshake
    finally:
        await proxy.stop()
        await server.stop(0)


def test_the_documented_max_connection_age_is_the_default() -> None:
    assert inspect.signature(MeshServer).parameters["max_connection_age_ms"].default == MAX_CONNECTION_AGE_MS
    minutes = MAX_CONNECTION_AGE_MS / 60_000
    assert minutes == 5
    assert f"connections are closed after {minutes:g} minutes" in (ROOT / "docs" / "certificates.md").read_text()
