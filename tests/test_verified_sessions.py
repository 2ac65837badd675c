"""MeshServer checks a client connection's certificate once, not on every call (server.authz.VerifiedSessions),
over real mTLS on loopback TCP and on a Unix socket: what a session is bound to, and when it is checked again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from aivo_mesh import MeshClient, MeshConfig, MeshServer
from aivo_mesh.client import endpoints
from aivo_mesh.client.endpoints import USER_AGENT, EndpointPool, with_session
from aivo_mesh.config import MeshSpec, parse_mesh
from aivo_mesh.pki import CertLayout, load_identity
from aivo_mesh.pki.peer import PeerPolicy
from aivo_mesh.policy.core import SESSION_AGENT
from aivo_mesh.policy.events import ServerCall
from aivo_mesh.runtime.local import free_port
from aivo_mesh.server import current_caller
from aivo_mesh.server import interceptors as interceptors_mod
from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
TRUST = "spiffe://aivo.local/ns/default/sa/"
REQ = auth_pb2.ValidateTokenRequest(token="x")


class WhoCalls(auth_pb2_grpc.AuthServiceServicer):
    """Answers with the caller the guard admitted and the peer address grpc gives the handler."""

    async def ValidateToken(self, request: Any, context: Any) -> auth_pb2.ValidateTokenResponse:
        return auth_pb2.ValidateTokenResponse(valid=True, subject=current_caller.get() or "", reason=context.peer())


class Calls:
    """A ServerCallObserver that keeps every call it is shown."""

    def __init__(self) -> None:
        self.seen: list[ServerCall] = []

    def start(self, call: ServerCall) -> object:
        self.seen.append(call)
        return None

    def finish(self, token: object, call: ServerCall, code: str, error: BaseException | None) -> None:
        pass


@pytest.fixture
def auth_mesh() -> MeshSpec:
    text = (ROOT / "mesh.yaml").read_text().replace("port: 50051", f"port: {free_port()}")
    return parse_mesh(text, "mesh.yaml")


@pytest.fixture
def full_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """One entry per full check of a caller's certificate (PeerPolicy.check_pem for a client) from here on:
    the role checked ("client"). The client's own checks of the server are not counted."""
    made: list[str] = []
    check = PeerPolicy.check_pem

    def counted(self: PeerPolicy, pem: bytes, role: Any, expect: str | None = None) -> str:
        if role == "client":
            made.append(role)
        return check(self, pem, role, expect)

    monkeypatch.setattr(PeerPolicy, "check_pem", counted)
    return made


async def _serve(mesh: MeshSpec, certs: CertLayout, **kwargs: Any) -> MeshServer:
    server = MeshServer.for_service(mesh, "auth-svc", certs, **kwargs)
    auth_pb2_grpc.add_AuthServiceServicer_to_server(WhoCalls(), server.grpc_server)
    server.add_service_name("aivo.auth.v1.AuthService")
    await server.start()
    return server


@pytest.fixture
async def auth_server(auth_mesh: MeshSpec, mesh_certs: CertLayout) -> AsyncIterator[MeshServer]:
    server = await _serve(auth_mesh, mesh_certs)
    yield server
    await server.stop(0.5)


def _plain_channel(certs: CertLayout, identity: str, target: str, token: str | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel with `identity`'s certificate and nothing of the mesh but, if given, `token` as its
    session token (in its user agent, where MeshClient's channels carry theirs)."""
    cert, key = certs.identity_paths(identity)
    creds = grpc.ssl_channel_credentials(certs.ca_cert.read_bytes(), key.read_bytes(), cert.read_bytes())
    options: list[tuple[str, object]] = [("grpc.default_authority", "auth-svc")]
    return grpc.aio.secure_channel(target, creds, options=options if token is None else with_session(options, token))


async def test_a_mesh_clients_connection_is_checked_once_not_on_every_call(auth_server, auth_mesh, mesh_certs,
                                                                          full_checks):
    async with MeshClient(MeshConfig.for_identity("learner-svc", mesh_certs, auth_mesh)) as client:
        stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
        replies = [await stub.ValidateToken(REQ) for _ in range(20)]
    assert {r.subject for r in replies} == {TRUST + "learner-svc"}
    # One connection, one check: the first call's. (Without sessions this is 20.)
    assert full_checks == ["client"]
    assert len(auth_server.guard._sessions) == 1


async def test_a_caller_without_a_session_token_is_checked_on_every_call(auth_server, mesh_certs, full_checks):
    async with _plain_channel(mesh_certs, "learner-svc", f"127.0.0.1:{auth_server.bound_port}") as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        replies = [await stub.ValidateToken(REQ) for _ in range(5)]
    assert {r.subject for r in replies} == {TRUST + "learner-svc"}
    assert full_checks == ["client"] * 5
    assert len(auth_server.guard._sessions) == 0


async def test_a_new_peer_policy_checks_a_verified_connection_again(auth_server, auth_mesh, mesh_certs, full_checks):
    cert, key = mesh_certs.identity_paths("learner-svc")
    learner = load_identity(cert, key, mesh_certs.ca_cert)
    async with MeshClient(MeshConfig.for_identity("learner-svc", mesh_certs, auth_mesh)) as client:
        stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
        assert (await stub.ValidateToken(REQ)).valid
        assert (await stub.ValidateToken(REQ)).valid
        assert full_checks == ["client"]
        # mesh.yaml now revokes the certificate this very connection presented: its next call is refused.
        auth_server.set_peer_policy(PeerPolicy("aivo.local", revoked_serials=frozenset({learner.serial})))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ValidateToken(REQ, timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in (refused.value.details() or "")
    assert full_checks == ["client", "client"]


async def test_a_known_token_on_another_connection_is_checked_again(auth_server, mesh_certs, full_checks):
    token = "a-token-the-server-has-verified-before"
    target = f"127.0.0.1:{auth_server.bound_port}"
    async with _plain_channel(mesh_certs, "learner-svc", target, token) as first, \
            _plain_channel(mesh_certs, "learner-svc", target, token) as second:
        for channel in (first, second):
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            for _ in range(3):
                assert (await stub.ValidateToken(REQ)).subject == TRUST + "learner-svc"
    # The same secret from a second connection (another address) is a new session: one check each.
    assert full_checks == ["client", "client"]
    assert len(auth_server.guard._sessions) == 2


async def test_on_one_address_a_token_does_not_lend_its_identity_to_another_certificate(auth_mesh, mesh_certs,
                                                                                       tmp_path, full_checks):
    # On a Unix socket every client connection has the same peer address, and this caller even sends
    # another connection's secret: the certificate's names keep the sessions apart.
    sock = tmp_path / "auth.sock"
    server = await _serve(auth_mesh, mesh_certs, unix_socket=sock)
    token = "one-secret-two-certificates"
    try:
        seen = {}
        for identity in ("learner-svc", "mesh-client", "learner-svc"):
            async with _plain_channel(mesh_certs, identity, f"unix:{sock}", token) as channel:
                stub = auth_pb2_grpc.AuthServiceStub(channel)
                replies = [await stub.ValidateToken(REQ) for _ in range(2)]
            assert {r.subject for r in replies} == {TRUST + identity}
            seen[identity] = {r.reason for r in replies}
    finally:
        await server.stop(0.5)
    assert len(set().union(*seen.values())) == 1, "each connection had the same peer address"
    # learner-svc: checked, then remembered (its second connection too: same secret, same names);
    # mesh-client: checked under its own names, never served from learner-svc's entry.
    assert full_checks == ["client", "client"]


async def test_observers_never_see_the_session_token(auth_mesh, mesh_certs):
    calls = Calls()
    server = await _serve(auth_mesh, mesh_certs, observers=[calls])
    try:
        async with MeshClient(MeshConfig.for_identity("learner-svc", mesh_certs, auth_mesh)) as client:
            stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
            await stub.ValidateToken(REQ, metadata=(("x-request-tag", "seen"),))
            await stub.ValidateToken(REQ)
    finally:
        await server.stop(0.5)
    mine = [c for c in calls.seen if c.method.startswith("/aivo.auth.v1.")]  # not the client's health checks
    assert [dict(c.metadata).get("x-request-tag") for c in mine] == ["seen", None]
    agents = {dict(c.metadata).get("user-agent") for c in calls.seen}
    assert all(a and a.startswith("grpc-python") for a in agents), agents  # grpc's own products, kept
    assert not any(SESSION_AGENT in v for c in calls.seen for _, v in c.metadata)
    assert all(c.caller == TRUST + "learner-svc" for c in calls.seen)


async def test_each_mtls_channel_has_a_secret_of_its_own_and_a_plaintext_one_none(mesh_certs, monkeypatch):
    opened: list[tuple[str, str | None]] = []  # (endpoint, the session token of its channel's user agent)
    real_open = endpoints.open_channel

    def recording_open(target: str, credentials: Any, options: Any, interceptors: Any = ()) -> grpc.aio.Channel:
        agent = dict(options).get(USER_AGENT)
        opened.append((target, None if agent is None else interceptors_mod._split_agent(str(agent))[0]))
        return real_open(target, credentials, options, interceptors)

    monkeypatch.setattr(endpoints, "open_channel", recording_open)
    cert, key = mesh_certs.identity_paths("learner-svc")
    creds = grpc.ssl_channel_credentials(mesh_certs.ca_cert.read_bytes(), key.read_bytes(), cert.read_bytes())
    pool = EndpointPool("auth-svc", creds, [(USER_AGENT, "billing/2.1")])
    pool.channel("127.0.0.1:1"), pool.channel("127.0.0.2:2"), pool.channel("127.0.0.1:1")
    assert [e for e, _ in opened] == ["127.0.0.1:1", "127.0.0.2:2"]  # one per channel, for every call on it
    (_, a), (_, b) = opened
    assert a and b and a != b
    assert len(a) >= 22  # 128 random bits, base64url: one user-agent product
    pool.rebuild(creds)  # a rotated certificate: new channels, new secrets
    pool.channel("127.0.0.1:1")
    assert opened[-1][0] == "127.0.0.1:1" and opened[-1][1] not in (None, a, b)
    plain = EndpointPool("auth-svc", None, [])  # the plaintext hop to a local sidecar
    plain.channel("127.0.0.1:3")
    assert opened[-1] == ("127.0.0.1:3", None)
    await pool.close()
    await plain.close()


def test_the_session_token_goes_first_in_the_user_agent_and_a_callers_own_agent_stays():
    options = with_session([("grpc.default_authority", "auth-svc"), (USER_AGENT, "billing/2.1")], "tok")
    assert options == [("grpc.default_authority", "auth-svc"), (USER_AGENT, f"{SESSION_AGENT}/tok billing/2.1")]
    assert with_session([], "tok") == [(USER_AGENT, f"{SESSION_AGENT}/tok")]


async def test_a_caller_may_not_pass_the_session_token_as_metadata(auth_server, mesh_certs, full_checks):
    # Only the channel's user agent names a session: a header of that name is an ordinary header.
    target = f"127.0.0.1:{auth_server.bound_port}"
    async with _plain_channel(mesh_certs, "learner-svc", target) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        for _ in range(3):
            await stub.ValidateToken(REQ, metadata=((SESSION_AGENT, "x"),))
    assert full_checks == ["client"] * 3


class LookedUp(auth_pb2_grpc.AuthServiceServicer):
    """Answers with whether the guard's metadata (from the handler lookup) is this call's own."""

    async def ValidateToken(self, request: Any, context: Any) -> auth_pb2.ValidateTokenResponse:
        looked = interceptors_mod._looked_up.get()
        own = looked is not None and looked[0] == "/aivo.auth.v1.AuthService/ValidateToken" \
            and tuple(looked[1]) == tuple(context.invocation_metadata())
        return auth_pb2.ValidateTokenResponse(valid=own, subject=dict(context.invocation_metadata()).get("x-tag", ""))


class PassThrough(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        return await continuation(details)


@pytest.mark.parametrize("interceptors_of_its_own", [False, True])
async def test_the_guard_reads_each_calls_metadata_from_its_own_handler_lookup(auth_mesh, mesh_certs, full_checks,
                                                                             interceptors_of_its_own):
    # grpc.aio looks a call's handler up in the task that runs it; the guard relies on that to skip
    # rebuilding the metadata. A grpc that looked handlers up elsewhere fails here (each reply says
    # whether the handler's task held its own call's metadata), not silently.
    calls = Calls()
    server = MeshServer.for_service(auth_mesh, "auth-svc", mesh_certs, observers=[calls],
                                    interceptors=[PassThrough()] if interceptors_of_its_own else ())
    auth_pb2_grpc.add_AuthServiceServicer_to_server(LookedUp(), server.grpc_server)
    server.add_service_name("aivo.auth.v1.AuthService")
    await server.start()
    try:
        async with MeshClient(MeshConfig.for_identity("learner-svc", mesh_certs, auth_mesh)) as client:
            stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
            replies = await asyncio.gather(*(stub.ValidateToken(REQ, metadata=(("x-tag", str(i)),)) for i in range(40)))
    finally:
        await server.stop(0.5)
    assert all(r.valid for r in replies)
    assert sorted(r.subject for r in replies) == sorted(str(i) for i in range(40))
    # 40 calls at once: every observer saw its own call's metadata, none another's.
    mine = [c for c in calls.seen if c.method.startswith("/aivo.auth.v1.")]
    assert sorted(dict(c.metadata)["x-tag"] for c in mine) == sorted(str(i) for i in range(40))
    assert full_checks == ["client"]  # and the session held: one check of the one connection
