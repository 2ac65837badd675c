"""Business logic of the four demo servicers, on one plaintext grpc.aio server.

Plaintext is fine here: these are unit tests of the servicers. The mTLS mesh server, caller
identity and authorization are tested elsewhere.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from aivo_mesh.services import APPS, Closeable, ServiceContext, analytics, learner
from aivo_mesh.services.auth import KEY_ENV, KEY_FILE, AuthKeyError, TokenSigner, load_or_create_key
from aivo_mesh.services.protos import (
    analytics_pb2,
    analytics_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    learner_pb2,
    learner_pb2_grpc,
)

PASSWORD = "correct horse"


class LoopbackPeers:
    """PeerChannels for tests: every service lives at the same plaintext address."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._channel: grpc.aio.Channel | None = None
        self.asked: list[str] = []

    async def channel(self, service: str) -> grpc.aio.Channel:
        self.asked.append(service)
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.target)
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


@dataclass
class Mesh:
    state_dir: Path
    peers: LoopbackPeers
    channel: grpc.aio.Channel
    closers: dict[str, Closeable]

    @property
    def auth(self) -> auth_pb2_grpc.AuthServiceStub:
        return auth_pb2_grpc.AuthServiceStub(self.channel)

    @property
    def learner(self) -> learner_pb2_grpc.LearnerServiceStub:
        return learner_pb2_grpc.LearnerServiceStub(self.channel)

    @property
    def events(self) -> events_pb2_grpc.EventCollectorServiceStub:
        return events_pb2_grpc.EventCollectorServiceStub(self.channel)

    @property
    def analytics(self) -> analytics_pb2_grpc.AnalyticsServiceStub:
        return analytics_pb2_grpc.AnalyticsServiceStub(self.channel)

    async def token(self, learner_id: str) -> str:
        resp = await self.auth.Authenticate(
            auth_pb2.AuthenticateRequest(learner_id=learner_id, password=PASSWORD)
        )
        return resp.token


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    peers = LoopbackPeers(f"127.0.0.1:{port}")
    closers = {
        name: register(server, ServiceContext(name=name, state_dir=tmp_path / name, peers=peers))
        for name, register in APPS.items()
    }
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Mesh(tmp_path, peers, channel, closers)
    finally:
        await channel.close()
        await peers.close()
        await server.stop(None)
        for closer in closers.values():
            await closer.close()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def collect(learner_id: str, event_type: str, key: str, occurred_at: int = 0) -> events_pb2.CollectRequest:
    return events_pb2.CollectRequest(
        event=events_pb2.Event(
            learner_id=learner_id,
            event_type=event_type,
            payload_json=json.dumps({"k": key}),
            occurred_at=occurred_at,
        ),
        idempotency_key=key,
    )


async def list_events(
    mesh: Mesh, learner_id: str = "", event_type: str = "", since: int = 0
) -> list[events_pb2.Event]:
    request = events_pb2.ListEventsRequest(learner_id=learner_id, event_type=event_type, since=since)
    return [ev async for ev in mesh.events.ListEvents(request)]


# --------------------------------------------------------------------------- auth-svc


async def test_authenticate_issues_a_valid_token(mesh: Mesh) -> None:
    resp = await mesh.auth.Authenticate(auth_pb2.AuthenticateRequest(learner_id="ada", password=PASSWORD))
    assert resp.subject == "ada"
    assert resp.token.count(".") == 1
    check = await mesh.auth.ValidateToken(auth_pb2.ValidateTokenRequest(token=resp.token))
    assert check.valid
    assert check.subject == "ada"
    assert check.expires_at == resp.expires_at
    assert check.reason == ""
    payload = json.loads(base64.urlsafe_b64decode(resp.token.split(".")[0] + "=="))
    assert payload["exp"] - payload["iat"] == 15 * 60
    assert payload["jti"]


@pytest.mark.parametrize(
    ("learner_id", "password", "code"),
    [
        ("ada", "short", grpc.StatusCode.UNAUTHENTICATED),
        ("ada", "", grpc.StatusCode.UNAUTHENTICATED),
        ("", PASSWORD, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_authenticate_rejects(
    mesh: Mesh, learner_id: str, password: str, code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.auth.Authenticate(auth_pb2.AuthenticateRequest(learner_id=learner_id, password=password))
    assert err.value.code() == code


async def test_tampered_tokens_are_invalid_not_errors(mesh: Mesh) -> None:
    token = await mesh.token("ada")
    segment, sig = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(segment + "=="))
    forged_segment = (
        base64.urlsafe_b64encode(json.dumps({**payload, "sub": "mallory"}).encode()).rstrip(b"=").decode()
    )
    flipped_sig = sig[:-1] + ("A" if sig[-1] != "A" else "B")
    cases = {
        f"{forged_segment}.{sig}": "bad signature",
        f"{segment}.{flipped_sig}": "bad signature",
        f"{segment}.": "malformed token",
        "not-a-token": "malformed token",
        f"{token}.extra": "malformed token",
        "": "missing token",
    }
    for bad, reason in cases.items():
        check = await mesh.auth.ValidateToken(auth_pb2.ValidateTokenRequest(token=bad))
        assert not check.valid, bad
        assert check.reason == reason
        assert check.subject == ""


def test_token_expiry_and_key_separation() -> None:
    clock = [1_000_000.0]
    signer = TokenSigner(b"k" * 32, clock=lambda: clock[0])
    token, exp = signer.issue("ada")
    assert exp == 1_000_000 + 15 * 60
    assert signer.verify(token).valid
    clock[0] = exp - 1
    assert signer.verify(token).valid
    clock[0] = exp
    assert signer.verify(token).reason == "token expired"
    assert TokenSigner(b"x" * 32).verify(token).reason == "bad signature"
    assert "k" * 32 not in repr(signer)
    with pytest.raises(AuthKeyError):
        TokenSigner(b"short")


async def test_hmac_key_file_is_private_and_stable(mesh: Mesh) -> None:
    key_file = mesh.state_dir / "auth-svc" / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = load_or_create_key(key_file.parent, environ={})
    assert len(key) == 32
    assert key_file.read_text().strip() == key.hex()
    # A token signed before a restart still validates with the reloaded key.
    token = await mesh.token("ada")
    assert TokenSigner(key).verify(token).valid


def test_hmac_key_from_env_and_loose_file_mode(tmp_path: Path) -> None:
    hex_key = os.urandom(32).hex()
    assert load_or_create_key(tmp_path / "a", environ={KEY_ENV: hex_key}) == bytes.fromhex(hex_key)
    assert not (tmp_path / "a" / KEY_FILE).exists()
    with pytest.raises(AuthKeyError) as err:
        load_or_create_key(tmp_path / "a", environ={KEY_ENV: "abcd"})
    assert "abcd" not in str(err.value)
    with pytest.raises(AuthKeyError):
        load_or_create_key(tmp_path / "a", environ={KEY_ENV: "zz" * 32})

    key = load_or_create_key(tmp_path / "b", environ={})
    path = tmp_path / "b" / KEY_FILE
    path.chmod(0o644)
    assert load_or_create_key(tmp_path / "b", environ={}) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# --------------------------------------------------------------------------- learner-svc


async def test_profile_round_trip(mesh: Mesh) -> None:
    md = bearer(await mesh.token("ada"))
    profile = await mesh.learner.GetProfile(learner_pb2.GetProfileRequest(learner_id="ada"), metadata=md)
    assert profile.learner_id == "ada"
    assert profile.display_name == "ada"
    assert profile.grade_level == 0
    assert dict(profile.preferences) == {}
    assert profile.updated_at > 0
    assert mesh.peers.asked == ["auth-svc"]

    update = learner_pb2.Profile(
        learner_id="ada", display_name="Ada L.", grade_level=7, preferences={"theme": "dark", "lang": "en"}
    )
    updated = await mesh.learner.UpdateProfile(learner_pb2.UpdateProfileRequest(profile=update), metadata=md)
    assert (updated.display_name, updated.grade_level) == ("Ada L.", 7)
    again = await mesh.learner.GetProfile(learner_pb2.GetProfileRequest(learner_id="ada"), metadata=md)
    assert again == updated
    assert dict(again.preferences) == {"theme": "dark", "lang": "en"}


async def test_profile_access_control(mesh: Mesh) -> None:
    ada = bearer(await mesh.token("ada"))
    get_bob = learner_pb2.GetProfileRequest(learner_id="bob")
    update_bob = learner_pb2.UpdateProfileRequest(
        profile=learner_pb2.Profile(learner_id="bob", display_name="x")
    )
    no_token: tuple[tuple[str, str], ...] = ()
    basic = (("authorization", "Basic abc"),)

    async def get(md: tuple[tuple[str, str], ...]) -> object:
        return await mesh.learner.GetProfile(get_bob, metadata=md)

    async def update(md: tuple[tuple[str, str], ...]) -> object:
        return await mesh.learner.UpdateProfile(update_bob, metadata=md)

    cases = [
        (get, no_token, grpc.StatusCode.UNAUTHENTICATED),
        (get, basic, grpc.StatusCode.UNAUTHENTICATED),
        (get, bearer("garbage.token"), grpc.StatusCode.UNAUTHENTICATED),
        (get, ada, grpc.StatusCode.PERMISSION_DENIED),
        (update, no_token, grpc.StatusCode.UNAUTHENTICATED),
        (update, bearer("garbage.token"), grpc.StatusCode.UNAUTHENTICATED),
        (update, ada, grpc.StatusCode.PERMISSION_DENIED),
    ]
    for call, md, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(md)
        assert err.value.code() == code, (call.__name__, md)


async def test_update_profile_validation(mesh: Mesh) -> None:
    md = bearer(await mesh.token("ada"))
    for bad in (
        learner_pb2.UpdateProfileRequest(),
        learner_pb2.UpdateProfileRequest(profile=learner_pb2.Profile(learner_id="ada", grade_level=13)),
        learner_pb2.UpdateProfileRequest(
            profile=learner_pb2.Profile(learner_id="ada", preferences={"": "v"})
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.learner.UpdateProfile(bad, metadata=md)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --------------------------------------------------------------------------- event-collector-svc


async def test_collect_is_idempotent(mesh: Mesh) -> None:
    first = await mesh.events.Collect(collect("ada", "lesson_started", "key-1"))
    retry = await mesh.events.Collect(collect("ada", "lesson_started", "key-1"))
    assert not first.duplicate
    assert retry.duplicate
    assert retry.event_id == first.event_id
    stored = await list_events(mesh)
    assert [ev.event_id for ev in stored] == [first.event_id]
    assert json.loads(stored[0].payload_json) == {"k": "key-1"}
    assert stored[0].occurred_at > 0


async def test_collect_rejects_invalid_requests(mesh: Mesh) -> None:
    bad = [
        collect("ada", "lesson_started", ""),
        events_pb2.CollectRequest(idempotency_key="k"),
        collect("", "lesson_started", "k"),
        collect("ada", "", "k"),
        events_pb2.CollectRequest(
            event=events_pb2.Event(learner_id="ada", event_type="t", payload_json="{nope"),
            idempotency_key="k",
        ),
    ]
    for request in bad:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.events.Collect(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await list_events(mesh) == []


async def test_collect_stream_counts(mesh: Mesh) -> None:
    await mesh.events.Collect(collect("ada", "quiz_answered", "pre-existing"))

    def requests() -> Iterator[events_pb2.CollectRequest]:
        yield collect("ada", "lesson_started", "s-1")
        yield collect("bob", "lesson_started", "s-2")
        yield collect("ada", "quiz_answered", "s-3")
        yield collect("ada", "quiz_answered", "s-3")  # retried within the stream
        yield collect("ada", "quiz_answered", "pre-existing")  # stored by Collect

    resp = await mesh.events.CollectStream(requests())
    assert (resp.accepted, resp.duplicates) == (3, 2)
    again = await mesh.events.CollectStream(requests())
    assert (again.accepted, again.duplicates) == (0, 5)
    assert len(await list_events(mesh)) == 4

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.events.CollectStream(iter([collect("ada", "t", "ok"), collect("ada", "t", "")]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message 2" in (err.value.details() or "")


async def test_list_events_filters(mesh: Mesh) -> None:
    await mesh.events.CollectStream(
        iter(
            [
                collect("ada", "lesson_started", "1", occurred_at=100),
                collect("bob", "lesson_started", "2", occurred_at=200),
                collect("ada", "quiz_answered", "3", occurred_at=300),
            ]
        )
    )
    by_learner = await list_events(mesh, learner_id="ada")
    assert [e.occurred_at for e in by_learner] == [100, 300]
    by_type = await list_events(mesh, event_type="lesson_started")
    assert [e.learner_id for e in by_type] == ["ada", "bob"]
    assert [e.occurred_at for e in await list_events(mesh, since=200)] == [200, 300]
    assert [e.occurred_at for e in await list_events(mesh, learner_id="ada", since=200)] == [300]
    assert await list_events(mesh, learner_id="nobody") == []


# --------------------------------------------------------------------------- analytics-svc


async def test_analytics_reports_match_collected_events(mesh: Mesh) -> None:
    collected = [
        ("ada", "lesson_started"),
        ("ada", "quiz_answered"),
        ("ada", "quiz_answered"),
        ("bob", "lesson_started"),
        ("cy", "quiz_answered"),
    ]
    for i, (learner_id, event_type) in enumerate(collected):
        await mesh.events.Collect(collect(learner_id, event_type, f"e-{i}"))
    await mesh.events.Collect(collect("ada", "quiz_answered", "e-1"))  # a retry: not counted twice

    by_type = await mesh.analytics.RunReport(analytics_pb2.RunReportRequest(report="events_by_type"))
    assert by_type.report == "events_by_type"
    assert [(r.key, r.count) for r in by_type.rows] == [("quiz_answered", 3), ("lesson_started", 2)]
    assert by_type.total == len(collected)
    assert by_type.generated_at > 0
    assert "event-collector-svc" in mesh.peers.asked

    by_learner = await mesh.analytics.RunReport(analytics_pb2.RunReportRequest(report="events_by_learner"))
    expected = Counter(learner_id for learner_id, _ in collected)
    assert {r.key: r.count for r in by_learner.rows} == expected
    assert [r.key for r in by_learner.rows] == ["ada", "bob", "cy"]

    ada_only = await mesh.analytics.RunReport(
        analytics_pb2.RunReportRequest(report="events_by_type", learner_id="ada")
    )
    assert [(r.key, r.count) for r in ada_only.rows] == [("quiz_answered", 2), ("lesson_started", 1)]
    assert ada_only.total == 3

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.analytics.RunReport(analytics_pb2.RunReportRequest(report="top_secret"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --------------------------------------------------------------------------- peers down


async def test_unreachable_peers_are_unavailable(tmp_path: Path) -> None:
    """learner-svc / analytics-svc report UNAVAILABLE (not a decision) when a peer is down."""
    with socket.socket() as sock:  # a port nothing listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    peers = LoopbackPeers(f"127.0.0.1:{dead_port}")
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    closers: list[Closeable] = [
        learner.register(server, ServiceContext("learner-svc", tmp_path / "learner-svc", peers)),
        analytics.register(server, ServiceContext("analytics-svc", tmp_path / "analytics-svc", peers)),
    ]
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await learner_pb2_grpc.LearnerServiceStub(channel).GetProfile(
                    learner_pb2.GetProfileRequest(learner_id="ada"), metadata=bearer("a.b"), timeout=3
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await analytics_pb2_grpc.AnalyticsServiceStub(channel).RunReport(
                    analytics_pb2.RunReportRequest(report="events_by_type"), timeout=3
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)
        await peers.close()
        for closer in closers:
            await closer.close()
