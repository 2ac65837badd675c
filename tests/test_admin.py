"""The admin endpoint over real HTTP on 127.0.0.1: every endpoint, the breaker reset, errors, limits."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from waiting import until

from aivo_mesh.errors import MeshError
from aivo_mesh.telemetry.admin import PROMETHEUS_CONTENT_TYPE, AdminServer, is_loopback
from aivo_mesh.telemetry.metrics import MeshMetrics, MetricsListener

LOGIN = "/aivo.auth.v1.AuthService/Authenticate"
SECRET = "s3cr3t-t0ken-value"


@dataclass
class FakeSource:
    is_ready: bool = True
    resets: list[str] = field(default_factory=list)
    breakers: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "auth-svc": {"state": "open", "failures": 5, "rejected": 12},
        "learner-svc": {"state": "closed", "failures": 0, "rejected": 0},
    })

    def clusters(self) -> list[dict[str, Any]]:
        return [{"service": "auth-svc", "endpoints": [
            {"endpoint": "127.0.0.1:50061", "healthy": True, "ejected": False, "ejected_until": None},
            {"endpoint": "127.0.0.1:50071", "healthy": True, "ejected": True, "ejected_until": 1029.5}]}]

    def circuit_breakers(self) -> dict[str, dict[str, Any]]:
        return self.breakers

    def reset_circuit_breaker(self, service: str) -> bool:
        self.resets.append(service)
        if service not in self.breakers:
            return False
        self.breakers[service] = {"state": "closed", "failures": 0, "rejected": self.breakers[service]["rejected"]}
        return True

    def ready(self) -> bool:
        return self.is_ready

    def identity(self) -> dict[str, Any]:
        return {"spiffe_id": "spiffe://aivo.local/ns/default/sa/auth-svc",
                "dns_names": ["auth-svc"], "not_after": "2030-01-01T00:00:00+00:00", "seconds_left": 1e8,
                "key_pem": SECRET, "private_key": SECRET}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.body)


async def raw(port: int, data: bytes, *, close_write: bool = False) -> Reply:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if close_write:
            writer.write_eof()
        response = await asyncio.wait_for(reader.read(), 3.0)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    assert int(headers["content-length"]) == len(body)
    return Reply(int(status), headers, body)


async def get(port: int, path: str, method: str = "GET", body: bytes = b"") -> Reply:
    length = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
    return await raw(port, f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{length}\r\n".encode() + body)


@pytest.fixture
def source() -> FakeSource:
    return FakeSource()


@pytest.fixture
def metrics() -> MeshMetrics:
    m = MeshMetrics()
    listener = MetricsListener(m)
    listener.call_finished("auth-svc", LOGIN, "OK", 0.01, 1, None)
    listener.breaker_state("auth-svc", "closed", "open")
    return m


@pytest.fixture
async def admin(source: FakeSource, metrics: MeshMetrics) -> AsyncIterator[AdminServer]:
    server = AdminServer(source, metrics, request_timeout=0.5)
    await server.start()
    yield server
    await server.stop()


async def test_index(admin: AdminServer) -> None:
    reply = await get(admin.port, "/")
    assert reply.status == 200
    endpoints = reply.json()["endpoints"]
    for key in ("GET /stats", "GET /clusters", "GET /circuit_breakers", "GET /metrics", "GET /ready",
                "POST /clusters/<service>/circuit_breakers/reset"):
        assert key in endpoints


async def test_ready(admin: AdminServer, source: FakeSource) -> None:
    reply = await get(admin.port, "/ready")
    assert (reply.status, reply.body) == (200, b"LIVE\n")
    source.is_ready = False
    reply = await get(admin.port, "/ready")
    assert reply.status == 503
    assert reply.body == b"NOT_READY\n"


async def test_stats_json_text_and_filter(admin: AdminServer) -> None:
    stats = (await get(admin.port, "/stats")).json()["stats"]
    by_name = {s["name"]: s for s in stats}
    key = f'grpc_requests_total{{method="{LOGIN}",service="auth-svc",side="client",status="OK"}}'
    assert by_name[key]["value"] == 1
    assert by_name[key]["labels"]["status"] == "OK"
    assert by_name['circuit_breaker_state{service="auth-svc"}']["value"] == 2
    assert not any(s["metric"].endswith("_bucket") for s in stats)
    text = await get(admin.port, "/stats?format=text")
    assert text.status == 200
    assert text.headers["content-type"].startswith("text/plain")
    assert 'circuit_breaker_state{service="auth-svc"}: 2\n' in text.body.decode()
    filtered = (await get(admin.port, "/stats?filter=%5Ecircuit_breaker")).json()["stats"]
    assert filtered
    assert all(s["name"].startswith("circuit_breaker") for s in filtered)
    assert (await get(admin.port, "/stats?filter=(")).status == 400
    assert (await get(admin.port, "/stats?format=xml")).status == 400


async def test_metrics_content_type(admin: AdminServer) -> None:
    for path in ("/metrics", "/stats/prometheus", "/stats?format=prometheus"):
        reply = await get(admin.port, path)
        assert reply.status == 200
        assert reply.headers["content-type"] == PROMETHEUS_CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
        names = {f.name for f in text_string_to_metric_families(reply.body.decode())}
        assert "grpc_requests" in names
        assert "circuit_breaker_state" in names


async def test_clusters_breakers_and_certs(admin: AdminServer) -> None:
    clusters = (await get(admin.port, "/clusters")).json()["clusters"]
    assert clusters[0]["service"] == "auth-svc"
    assert [e["ejected"] for e in clusters[0]["endpoints"]] == [False, True]
    breakers = (await get(admin.port, "/circuit_breakers")).json()["circuit_breakers"]
    assert breakers["auth-svc"] == {"state": "open", "failures": 5, "rejected": 12}
    certs = await get(admin.port, "/certs")
    cert = certs.json()["certificates"][0]
    assert cert["spiffe_id"] == "spiffe://aivo.local/ns/default/sa/auth-svc"
    assert SECRET.encode() not in certs.body
    assert cert["key_pem"] == "[REDACTED]"


async def test_reset_circuit_breaker(admin: AdminServer, source: FakeSource) -> None:
    reply = await get(admin.port, "/clusters/auth-svc/circuit_breakers/reset", "POST")
    assert reply.status == 200
    assert reply.json() == {"service": "auth-svc", "reset": True,
                            "circuit_breaker": {"state": "closed", "failures": 0, "rejected": 12}}
    assert source.resets == ["auth-svc"]
    unknown = await get(admin.port, "/clusters/nope-svc/circuit_breakers/reset", "POST")
    assert unknown.status == 404
    assert "nope-svc" in unknown.json()["error"]
    assert source.resets == ["auth-svc", "nope-svc"]
    wrong_method = await get(admin.port, "/clusters/auth-svc/circuit_breakers/reset")
    assert wrong_method.status == 405
    assert wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["error"] == "Method GET not allowed, POST required"
    bad_name = await get(admin.port, "/clusters/..%2Fx%20y/circuit_breakers/reset", "POST")
    assert bad_name.status == 404
    assert source.resets == ["auth-svc", "nope-svc"]  # never reached the source


async def test_reset_with_urllib_in_a_thread(admin: AdminServer, source: FakeSource) -> None:
    def post() -> tuple[int, bytes]:
        req = urllib.request.Request(f"{admin.url}/clusters/learner-svc/circuit_breakers/reset", data=b"",
                                     method="POST")
        with urllib.request.urlopen(req, timeout=3) as resp:
            return resp.status, resp.read()

    status, body = await asyncio.to_thread(post)
    assert status == 200
    assert json.loads(body)["reset"] is True
    assert source.resets == ["learner-svc"]

    def get_missing() -> int:
        try:
            urllib.request.urlopen(f"{admin.url}/nowhere", timeout=3)
        except urllib.error.HTTPError as exc:
            return exc.code
        return 200

    assert await asyncio.to_thread(get_missing) == 404


async def test_not_found_and_method_not_allowed(admin: AdminServer) -> None:
    missing = await get(admin.port, f"/config_dump?token={SECRET}")
    assert missing.status == 404
    assert "endpoints" in missing.json()
    assert SECRET.encode() not in missing.body  # the request is never echoed
    for path in ("/stats", "/metrics", "/clusters", "/ready"):
        reply = await get(admin.port, path, "POST")
        assert reply.status == 405, path
        assert reply.headers["allow"] == "GET", path
    assert (await get(admin.port, "/stats", "DELETE")).status == 405


@pytest.mark.parametrize("data", [
    b"hello\r\n\r\n",
    b"GET /stats\r\n\r\n",
    b"GET stats HTTP/1.1\r\n\r\n",
    b"GET /stats HTTP/2.0\r\n\r\n",
    b"get /stats HTTP/1.1\r\n\r\n",
    b"GET /stats HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET /stats HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"GET /st\xffats HTTP/1.1\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS ClientHello-ish prefix
    b"POST /clusters/a/circuit_breakers/reset HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc",  # short body
    b"GET /stats HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
])
async def test_garbage_gets_400(admin: AdminServer, data: bytes) -> None:
    reply = await raw(admin.port, data, close_write=True)
    assert reply.status == 400, reply.body


async def test_unsupported_body_framing(admin: AdminServer) -> None:
    chunked = await raw(admin.port, b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert chunked.status == 501
    huge = await raw(admin.port, b"POST /x HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n")
    assert huge.status == 413


async def test_empty_connection_is_just_closed(admin: AdminServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 2.0) == b""
    writer.close()
    await writer.wait_closed()


async def test_slow_client_times_out(admin: AdminServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
    writer.write(b"GET /stats HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 3.0)
    assert response.startswith(b"HTTP/1.1 408 ")
    writer.close()
    await writer.wait_closed()
    assert (await get(admin.port, "/ready")).status == 200  # the server is still fine


async def test_connection_limit(source: FakeSource, metrics: MeshMetrics) -> None:
    async with AdminServer(source, metrics, request_timeout=2.0, max_connections=1) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /ready HTTP/1.1\r\n")  # holds the only slot
        await writer.drain()
        await until(lambda: server.open_connections == 1, what="one open connection")
        assert (await get(server.port, "/ready")).status == 503
        writer.write(b"\r\n")
        assert (await asyncio.wait_for(reader.read(), 2.0)).startswith(b"HTTP/1.1 200 ")
        writer.close()
        await writer.wait_closed()


async def test_source_errors_are_500_without_details(metrics: MeshMetrics) -> None:
    class Broken(FakeSource):
        def clusters(self) -> list[dict[str, Any]]:
            raise RuntimeError(f"cannot read {SECRET}")

        def ready(self) -> bool:
            raise RuntimeError("boom")

    async with AdminServer(Broken(), metrics) as server:
        reply = await get(server.port, "/clusters")
        assert reply.status == 500
        assert SECRET.encode() not in reply.body
        assert (await get(server.port, "/ready")).status == 503


async def test_stop_closes_idle_connections_and_port(source: FakeSource, metrics: MeshMetrics) -> None:
    server = AdminServer(source, metrics, request_timeout=30.0)
    port = await server.start()
    assert await server.start() == port  # idempotent
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /")
    await writer.drain()
    # the server holds it, idle mid-request
    await until(lambda: server.open_connections == 1, what="one open connection")
    await asyncio.wait_for(server.stop(), 2.0)
    assert await asyncio.wait_for(reader.read(), 2.0) == b""
    writer.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    await server.stop()  # idempotent


def test_loopback_only_by_default(source: FakeSource, metrics: MeshMetrics) -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert is_loopback(host)
        AdminServer(source, metrics, host=host)
    for host in ("0.0.0.0", "::", "", "10.1.2.3", "admin.example.com"):
        assert not is_loopback(host)
        with pytest.raises(MeshError, match="allow_remote=True"):
            AdminServer(source, metrics, host=host)
    assert AdminServer(source, metrics, host="0.0.0.0", allow_remote=True).host == "0.0.0.0"
