"""The peer-certificate policy on both planes, in both directions, against certificates the mesh's own
issuing CA signed (an attacker who can get anything signed, or kept a certificate rotated away):

    row                              MeshServer   Envoy inbound   MeshClient   Envoy outbound
    RSA-1024 leaf                    refused      refused         refused      refused
    SHA-1 signature                  refused      refused         refused      refused
    leaf with CA:TRUE                refused      refused         refused      refused
    two URI SANs                     refused      refused         refused      refused
    another trust domain, right DNS  -            -               refused      refused
    DNS SANs only, no SPIFFE ID      -            -               refused      refused
    TLS 1.2-only server              -            -               refused      refused
    rotated away 5 rotations ago     refused      refused         -            -

Each refusal is asserted with its reason (the rule on the proxyless plane, Envoy's own ssl stat on the
sidecar plane) and, where the refused peer is a server, that no request ever reached it. Real TLS, real
grpc, a real Envoy on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from binaries import needs, require
from helpers import auth_app, envoy_live, start_envoy_async
from rogue_certs import mint, needs_openssl
from waiting import until

from aivo_mesh import MeshClient, MeshConfig, MeshServer
from aivo_mesh.cli import main as meshctl
from aivo_mesh.config import MeshSpec, load_mesh
from aivo_mesh.pki import CertLayout
from aivo_mesh.render import serialize
from aivo_mesh.render.envoy import EnvoyProfile, bootstrap
from aivo_mesh.runtime.local import free_ports, with_free_ports
from aivo_mesh.runtime.sidecar_certs import for_local_mesh
from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc
from aivo_mesh.telemetry.metrics import MeshMetrics, MetricsListener, ServerMetricsObserver

pytestmark = [needs_openssl, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
AUTH = "spiffe://aivo.local/ns/default/sa/auth-svc"
CLIENT = "spiffe://aivo.local/ns/default/sa/mesh-client"

needs_envoy = needs("envoy")


@dataclass(frozen=True)
class Row:
    name: str
    kwargs: dict[str, object]
    rule: str  # pki.peer.Rule the proxyless plane names


# Rows that are certificates (both directions); the identity's own SPIFFE ID unless the row changes it.
CERT_ROWS = [
    Row("rsa-1024", {"key": "rsa:1024"}, "weak_key"),
    Row("sha1", {"digest": "sha1"}, "weak_signature"),
    Row("ca-true", {"ca": True}, "leaf_is_ca"),
]


def _two_uris(own: str) -> Row:
    return Row("two-uris", {"uris": [own, "spiffe://aivo.local/ns/default/sa/analytics-svc"]}, "uri_san_count")


SERVER_ONLY_ROWS = [
    Row("foreign-trust-domain", {"uris": ["spiffe://evil.example/ns/default/sa/auth-svc"]}, "trust_domain"),
    Row("dns-only", {"uris": []}, "uri_san_count"),
]


@pytest.fixture
def certs(mesh_certs: CertLayout, tmp_path: Path) -> CertLayout:
    shutil.copytree(mesh_certs.root, tmp_path / "certs")
    return CertLayout(tmp_path / "certs")


def _read(path: Path) -> bytes:
    return path.read_bytes()


# -- servers and clients used by the matrix -----------------------------------------------------------

class Hits:
    def __init__(self) -> None:
        self.count = 0


async def _auth_app(hits: Hits, *, credentials: grpc.ServerCredentials | None = None, port: int = 0
                    ) -> tuple[grpc.aio.Server, int]:
    """An auth-svc stand-in that counts every request that reached it (mTLS or h2c)."""
    async def validate(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        hits.count += 1
        return auth_pb2.ValidateTokenResponse(valid=True).SerializeToString()

    return await auth_app({"ValidateToken": validate}, port=port, credentials=credentials)


def _rogue_credentials(cert: Path, key: Path, certs: CertLayout) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(_read(key), _read(cert))], _read(certs.ca_cert), True)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def _tls12_front(certs: CertLayout, upstream: int, port: int = 0) -> tuple[asyncio.Server, int]:
    """A TLS 1.2-only terminator (auth-svc's own, valid certificate) in front of an h2c server."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(*certs.identity_paths("auth-svc"))
    ctx.load_verify_locations(certs.ca_cert)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=ctx)
    return server, server.sockets[0].getsockname()[1]


def _client_channel(address: str, certs: CertLayout, cert: Path, key: Path) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(_read(certs.ca_cert), _read(key), _read(cert))
    return grpc.aio.secure_channel(address, creds, options=[("grpc.default_authority", "auth-svc")])


async def _call_as(address: str, certs: CertLayout, cert: Path, key: Path) -> grpc.aio.AioRpcError:
    async with _client_channel(address, certs, cert, key) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await auth_pb2_grpc.AuthServiceStub(ch).ValidateToken(auth_pb2.ValidateTokenRequest(token="x"),
                                                                  timeout=5)
    return exc.value


def _rotated_away(certs: CertLayout, mesh_yaml: Path, tmp_path: Path) -> tuple[Path, Path]:
    """mesh-client's certificate as it was five rotations ago (each rotation revoking the one before)."""
    old = tmp_path / "old"
    old.mkdir()
    cert, key = certs.identity_paths("mesh-client")
    shutil.copy(cert, old / "mesh-client.crt")
    shutil.copy(key, old / "mesh-client-key.pem")
    for _ in range(5):
        assert meshctl(["certs", "rotate", "mesh-client", "--revoke-previous", "-d", str(certs.root),
                        "-c", str(mesh_yaml)]) == 0
    return old / "mesh-client.crt", old / "mesh-client-key.pem"


# -- MeshServer: the caller's certificate -----------------------------------------------------------

async def test_mesh_server_refuses_each_row_with_its_rule(certs: CertLayout, mesh: MeshSpec, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    mesh_yaml = tmp_path / "mesh.yaml"
    mesh_yaml.write_text((ROOT / "mesh.yaml").read_text())
    old_cert, old_key = _rotated_away(certs, mesh_yaml, tmp_path)
    capsys.readouterr()
    metrics = MeshMetrics()
    served = load_mesh(mesh_yaml)
    server = MeshServer.for_service(served, "auth-svc", certs, port=0,
                                    observers=[ServerMetricsObserver(metrics)])
    hits = Hits()

    class Auth(auth_pb2_grpc.AuthServiceServicer):
        async def ValidateToken(self, request, context):
            hits.count += 1
            return auth_pb2.ValidateTokenResponse(valid=True)

    auth_pb2_grpc.add_AuthServiceServicer_to_server(Auth(), server.grpc_server)
    port = await server.start()
    try:
        rows = [*CERT_ROWS, _two_uris(CLIENT)]
        cases = [(r.name, r.rule, *mint(certs, mesh, "mesh-client", tmp_path / r.name, **r.kwargs))  # type: ignore[arg-type]
                 for r in rows]
        cases.append(("rotated-away", "revoked", old_cert, old_key))
        for name, rule, cert, key in cases:
            err = await _call_as(f"127.0.0.1:{port}", certs, cert, key)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (name, err)
            assert f"client certificate refused: {rule}:" in (err.details() or ""), (name, err.details())
            assert metrics.registry.get_sample_value(
                "mesh_peer_certificate_refusals_total", {"side": "server", "service": "auth-svc", "rule": rule}), name
        # The current mesh-client certificate still gets in.
        cert, key = certs.identity_paths("mesh-client")
        async with _client_channel(f"127.0.0.1:{port}", certs, cert, key) as ch:
            await auth_pb2_grpc.AuthServiceStub(ch).ValidateToken(auth_pb2.ValidateTokenRequest(token="x"), timeout=5)
        assert hits.count == 1
    finally:
        await server.stop(0)


# -- MeshClient: the server's certificate -----------------------------------------------------------

def _client_mesh(mesh: MeshSpec, port: int) -> MeshSpec:
    auth = mesh.service("auth-svc").model_copy(update={"endpoints": (f"127.0.0.1:{port}",)})
    return mesh.model_copy(update={"services": tuple(auth if s.name == "auth-svc" else s for s in mesh.services)})


async def _mesh_client_call(mesh: MeshSpec, certs: CertLayout, port: int,
                            metrics: MeshMetrics) -> grpc.aio.AioRpcError:
    config = MeshConfig.for_identity("learner-svc", certs, _client_mesh(mesh, port))
    async with MeshClient(config, health_checks=False, listeners=[MetricsListener(metrics)]) as client:
        stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="x"), timeout=5)
    return exc.value


async def test_mesh_client_refuses_each_server_row_before_sending(certs: CertLayout, mesh: MeshSpec,
                                                                   tmp_path: Path) -> None:
    metrics = MeshMetrics()
    for row in [*CERT_ROWS, _two_uris(AUTH), *SERVER_ONLY_ROWS]:
        cert, key = mint(certs, mesh, "auth-svc", tmp_path / row.name, **row.kwargs)  # type: ignore[arg-type]
        hits = Hits()
        server, port = await _auth_app(hits, credentials=_rogue_credentials(cert, key, certs))
        try:
            err = await _mesh_client_call(mesh, certs, port, metrics)
        finally:
            await server.stop(0)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (row.name, err)
        assert f"server certificate of auth-svc at 127.0.0.1:{port} refused: {row.rule}:" in (err.details() or ""), \
            (row.name, err.details())
        assert hits.count == 0, f"{row.name}: a request reached the refused server"
        assert metrics.registry.get_sample_value(
            "mesh_peer_certificate_refusals_total", {"side": "client", "service": "auth-svc", "rule": row.rule})


async def test_mesh_client_refuses_a_tls12_server_at_the_handshake(certs: CertLayout, mesh: MeshSpec) -> None:
    hits = Hits()
    app, plain = await _auth_app(hits)
    front, port = await _tls12_front(certs, plain)
    try:
        err = await _mesh_client_call(mesh, certs, port, MeshMetrics())
    finally:
        front.close()
        await app.stop(0)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "Handshake" in (err.details() or ""), err.details()  # grpc core's own words: no TLS 1.2 suite left
    assert hits.count == 0


async def test_mesh_client_reaches_the_real_identity(certs: CertLayout, mesh: MeshSpec) -> None:
    # The control row: the same path with auth-svc's own certificate succeeds.
    cert, key = certs.identity_paths("auth-svc")
    hits = Hits()
    server, port = await _auth_app(hits, credentials=_rogue_credentials(cert, key, certs))
    try:
        config = MeshConfig.for_identity("learner-svc", certs, _client_mesh(mesh, port))
        async with MeshClient(config, health_checks=False) as client:
            stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
            await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="x"), timeout=5)
            await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="x"), timeout=5)
    finally:
        await server.stop(0)
    assert hits.count == 2


# -- Envoy: one sidecar under test, its SDS written by the local mesh's publisher --------------------

def _stats(admin: int) -> dict[str, int]:
    """Envoy's counters and gauges (histograms left out)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?format=json&type=Counters", timeout=5) as r:
        data = json.loads(r.read())
    return {s["name"]: int(s["value"]) for s in data["stats"] if isinstance(s.get("value"), int)}


@dataclass
class Sidecar:
    mesh: MeshSpec
    service: str
    process: asyncio.subprocess.Process
    admin: int
    inbound: int
    outbound: int

    def ssl_stat(self, prefix: str, name: str) -> int:
        """The sum of `<prefix>...<name>` counters (`ssl.fail_verify_san`, `upstream_cx_connect_fail`)."""
        return sum(v for k, v in _stats(self.admin).items() if k.startswith(prefix) and k.endswith(f".{name}"))


async def _start_sidecar(mesh: MeshSpec, service: str, certs: CertLayout, root: Path,
                         unchecked_peer: str | None = None) -> Sidecar:
    """`service`'s Envoy; with `unchecked_peer`, that peer's cluster has neither active health checks nor
    outlier ejection, so each request connects itself (and is refused by its own handshake, not skipped
    because a probe or earlier requests failed)."""
    d = root / service
    (d / "sds").mkdir(parents=True)
    profile = EnvoyProfile.local(str(certs.root.resolve()), str((d / "sds").resolve()))
    config = bootstrap(mesh, service, profile)
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == unchecked_peer:
            cluster.pop("health_checks", None)
            cluster.pop("outlier_detection", None)
    (d / "envoy.yaml").write_text(serialize("envoy.yaml", config))
    for_local_mesh(certs, mesh, root).publish()
    proc = await start_envoy_async(d / "envoy.yaml")
    svc = mesh.service(service)
    sidecar = Sidecar(mesh, service, proc, svc.sidecar.admin_port or 0, svc.sidecar.inbound_port or 0,
                      svc.sidecar.outbound_port or 0)
    await until(lambda: envoy_live(sidecar.admin), timeout=30, what="envoy LIVE")
    return sidecar


@pytest.fixture
async def auth_sidecar(certs: CertLayout, mesh: MeshSpec, tmp_path: Path) -> AsyncIterator[tuple[Sidecar, Hits]]:
    require("envoy")
    m = with_free_ports(mesh)
    hits = Hits()
    app, _ = await _auth_app(hits, port=m.service("auth-svc").local_port)
    sidecar = await _start_sidecar(m, "auth-svc", certs, tmp_path / "envoy")
    try:
        yield sidecar, hits
    finally:
        sidecar.process.terminate()
        await sidecar.process.wait()
        await app.stop(0)


@needs_envoy
async def test_envoy_inbound_refuses_each_row(auth_sidecar: tuple[Sidecar, Hits], certs: CertLayout,
                                              mesh: MeshSpec, tmp_path: Path) -> None:
    sidecar, hits = auth_sidecar
    address = f"127.0.0.1:{sidecar.inbound}"
    # The control row first: the current mesh-client certificate is served.
    cert, key = certs.identity_paths("mesh-client")
    async with _client_channel(address, certs, cert, key) as ch:
        await auth_pb2_grpc.AuthServiceStub(ch).ValidateToken(auth_pb2.ValidateTokenRequest(token="x"), timeout=5)
    assert hits.count == 1
    mesh_yaml = tmp_path / "mesh.yaml"
    mesh_yaml.write_text((ROOT / "mesh.yaml").read_text())
    old_cert, old_key = _rotated_away(certs, mesh_yaml, tmp_path)
    publisher = for_local_mesh(certs, sidecar.mesh, tmp_path / "envoy")
    publisher.publish()  # as the supervisor does after a rotation: the new key in, the 5-times-old one long out
    cases = [(r.name, *mint(certs, mesh, "mesh-client", tmp_path / r.name, **r.kwargs))  # type: ignore[arg-type]
             for r in [*CERT_ROWS, _two_uris(CLIENT)]] + [("rotated-away", old_cert, old_key)]
    for name, cert, key in cases:
        before = sidecar.ssl_stat("listener.", "ssl.fail_verify_cert_hash")
        err = await _call_as(address, certs, cert, key)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (name, err)
        # Envoy's reason: the key is not one the mesh vetted (verify_certificate_spki).
        def refused(b: int = before) -> bool:
            return sidecar.ssl_stat("listener.", "ssl.fail_verify_cert_hash") > b

        await until(refused, timeout=5, what=f"{name}: listener ssl.fail_verify_cert_hash")
    assert hits.count == 1


@needs_envoy
async def test_a_bad_certificate_swapped_in_keeps_the_sidecar_serving(
        auth_sidecar: tuple[Sidecar, Hits], certs: CertLayout, mesh: MeshSpec, tmp_path: Path) -> None:
    sidecar, hits = auth_sidecar
    address = f"127.0.0.1:{sidecar.inbound}"
    client_cert, client_key = certs.identity_paths("mesh-client")
    publisher = for_local_mesh(certs, sidecar.mesh, tmp_path / "envoy")
    publisher.publish()
    for bad in ({"ca": True}, {"eku": ["clientAuth"]}):
        cert, key = mint(certs, mesh, "auth-svc", tmp_path / f"bad-{len(bad)}-{next(iter(bad))}", **bad)
        shutil.copy(cert, certs.identity_paths("auth-svc")[0])
        shutil.copy(key, certs.identity_paths("auth-svc")[1])
        assert publisher.publish() is False  # refused: nothing written
        assert "auth-svc" in publisher.problems
        async with _client_channel(address, certs, client_cert, client_key) as ch:
            await auth_pb2_grpc.AuthServiceStub(ch).ValidateToken(auth_pb2.ValidateTokenRequest(token="x"), timeout=5)
    assert hits.count == 2


@needs_envoy
async def test_envoy_outbound_refuses_each_server_row(certs: CertLayout, mesh: MeshSpec, tmp_path: Path) -> None:
    m = with_free_ports(mesh)
    rogue_port = free_ports(1)[0]
    # learner-svc's sidecar, whose auth-svc peer (its "inbound port" on one machine) is the rogue server.
    auth = m.service("auth-svc")
    auth = auth.model_copy(update={"sidecar": auth.sidecar.model_copy(update={"inbound_port": rogue_port})})
    m = m.model_copy(update={"services": tuple(auth if s.name == "auth-svc" else s for s in m.services)})
    sidecar = await _start_sidecar(m, "learner-svc", certs, tmp_path / "envoy", unchecked_peer="auth-svc")
    cluster = "cluster.auth-svc."
    # Envoy checks the URI SAN before the key: those rows fail there. A TLS 1.2 server answers Envoy's
    # TLS 1.3-only hello with a protocol_version alert: a failed connect, with no ssl.* counter of its own.
    reasons = {"tls12": "upstream_cx_connect_fail", "foreign-trust-domain": "ssl.fail_verify_san",
               "dns-only": "ssl.fail_verify_san"}
    try:
        rows = [*CERT_ROWS, _two_uris(AUTH), *SERVER_ONLY_ROWS, Row("tls12", {}, "")]
        for row in rows:
            hits = Hits()
            close_front: Callable[[], None] | None = None
            if row.name == "tls12":
                app, plain = await _auth_app(hits)
                front, _ = await _tls12_front(certs, plain, port=rogue_port)
                close_front = front.close
            else:
                cert, key = mint(certs, mesh, "auth-svc", tmp_path / row.name, **row.kwargs)  # type: ignore[arg-type]
                app, _ = await _auth_app(hits, credentials=_rogue_credentials(cert, key, certs), port=rogue_port)
            stat = reasons.get(row.name, "ssl.fail_verify_cert_hash")
            before = sidecar.ssl_stat(cluster, stat)
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.outbound}") as ch:
                    with pytest.raises(grpc.aio.AioRpcError) as exc:
                        await auth_pb2_grpc.AuthServiceStub(ch).ValidateToken(
                            auth_pb2.ValidateTokenRequest(token="x"), timeout=5)
                assert exc.value.code() == grpc.StatusCode.UNAVAILABLE, (row.name, exc.value)
                def counted(b: int = before, s: str = stat) -> bool:
                    return sidecar.ssl_stat(cluster, s) > b

                await until(counted, timeout=5, what=f"{row.name}: {cluster}{stat}")
            finally:
                if close_front is not None:
                    close_front()
                await app.stop(0)
            assert hits.count == 0, f"{row.name}: a request reached the refused server"
        assert sidecar.ssl_stat(cluster, "ssl.handshake") == 0  # not one handshake with a refused server completed
    finally:
        sidecar.process.terminate()
        await sidecar.process.wait()


@needs_envoy
async def test_without_the_vetted_keys_envoy_still_refuses_what_its_validators_express(
        certs: CertLayout, mesh: MeshSpec, tmp_path: Path) -> None:
    """A static render (Kubernetes, Compose) has no key allow-list: Envoy refuses a second URI SAN inbound
    (the per-connection RBAC) and another identity outbound (URI SAN match); docs/certificates.md lists
    what it then cannot refuse."""
    m = with_free_ports(mesh)
    hits = Hits()
    app, _ = await _auth_app(hits, port=m.service("auth-svc").local_port)
    d = tmp_path / "static" / "auth-svc"
    (d / "sds").mkdir(parents=True)
    from aivo_mesh.render.envoy import sds_files

    profile = EnvoyProfile.local(str(certs.root.resolve()), str((d / "sds").resolve()))
    for rel, doc in sds_files(m, "auth-svc", profile).items():
        (d / "sds" / rel).write_text(serialize(rel, doc))
        assert "verify_certificate_spki" not in yaml.safe_dump(doc)
    (d / "envoy.yaml").write_text(serialize("envoy.yaml", bootstrap(m, "auth-svc", profile)))
    envoy = require("envoy")
    proc = await asyncio.create_subprocess_exec(
        envoy, "-c", str(d / "envoy.yaml"), "--disable-hot-restart", "--concurrency", "1", "--log-level", "error",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    admin = m.service("auth-svc").sidecar.admin_port
    try:
        def denied() -> int:
            try:
                return _stats(admin or 0).get("inbound_svid.rbac.denied", 0)
            except OSError:
                return -1

        await until(lambda: denied() >= 0, timeout=30, what="envoy admin")
        cert, key = mint(certs, mesh, "mesh-client", tmp_path / "two", uris=[CLIENT, AUTH])
        err = await _call_as(f"127.0.0.1:{m.service('auth-svc').sidecar.inbound_port}", certs, cert, key)
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        await until(lambda: denied() >= 1, timeout=5, what="inbound_svid.rbac.denied")
        assert hits.count == 0
    finally:
        proc.terminate()
        await proc.wait()
        await app.stop(0)

