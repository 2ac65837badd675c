"""StatsD: names, values and packets as received by a real UDP socket on 127.0.0.1."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from aivo_mesh.config.model import StatsdSpec
from aivo_mesh.errors import MeshError
from aivo_mesh.policy.core import LocalReason, monotonic
from aivo_mesh.policy.events import ServerCall
from aivo_mesh.telemetry.statsd import (
    MAX_PACKET,
    StatsdClient,
    StatsdListener,
    StatsdServerObserver,
    parse_address,
    segment,
)

LOGIN = "/aivo.auth.v1.AuthService/Authenticate"
M = "aivo_auth_v1_AuthService_Authenticate"


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    yield sock
    sock.close()


@pytest.fixture
def client(receiver: socket.socket) -> Iterator[StatsdClient]:
    port = receiver.getsockname()[1]
    with StatsdClient(f"127.0.0.1:{port}", prefix="aivo_mesh") as c:
        yield c


def packets(sock: socket.socket, n: int) -> list[list[str]]:
    return [sock.recv(65535).decode().split("\n") for _ in range(n)]


def test_client_call_counter_and_timer(receiver: socket.socket, client: StatsdClient) -> None:
    listener = StatsdListener(client)
    listener.call_started("auth-svc", LOGIN)
    listener.call_finished("auth-svc", LOGIN, "OK", 0.0125, 1, None)
    (lines,) = packets(receiver, 1)
    assert lines == [f"aivo_mesh.grpc.requests.client.auth-svc.{M}.OK:1|c",
                     f"aivo_mesh.grpc.request_duration.client.auth-svc.{M}:12.500|ms"]


def test_local_rejections_have_their_own_status(receiver: socket.socket, client: StatsdClient) -> None:
    listener = StatsdListener(client)
    listener.call_started("auth-svc", LOGIN)
    listener.breaker_rejected("auth-svc", LOGIN)
    listener.call_finished("auth-svc", LOGIN, "UNAVAILABLE", 0.0, 1, LocalReason.CIRCUIT_OPEN)
    listener.call_started("auth-svc", LOGIN)
    listener.limit_rejected("auth-svc", LOGIN, "max_pending_requests")
    listener.call_finished("auth-svc", LOGIN, "UNAVAILABLE", 0.0, 1, LocalReason.MAX_PENDING_REQUESTS)
    got = packets(receiver, 4)
    assert got[0] == ["aivo_mesh.grpc.local_rejections.auth-svc.circuit_open:1|c"]
    assert got[1][0] == f"aivo_mesh.grpc.requests.client.auth-svc.{M}.CIRCUIT_OPEN:1|c"
    assert got[2] == ["aivo_mesh.grpc.local_rejections.auth-svc.max_pending_requests:1|c"]
    assert got[3][0] == f"aivo_mesh.grpc.requests.client.auth-svc.{M}.LOCAL_OVERFLOW:1|c"


def test_policy_events(receiver: socket.socket, client: StatsdClient) -> None:
    listener = StatsdListener(client)
    listener.retry("auth-svc", LOGIN, 2, "UNAVAILABLE", 0.1)
    listener.retry_budget_exhausted("auth-svc", LOGIN)
    listener.breaker_failure("auth-svc", "UNAVAILABLE")
    for state in ("open", "half_open", "closed"):
        listener.breaker_state("auth-svc", "x", state)
    listener.endpoint_ejected("auth-svc", "10.0.0.1:50061", 30.0)
    listener.endpoint_ejected("auth-svc", "10.0.0.2:50061", 30.0)
    listener.endpoint_restored("auth-svc", "10.0.0.1:50061")
    got = packets(receiver, 9)
    assert got == [
        [f"aivo_mesh.grpc.retries.auth-svc.{M}:1|c"],
        ["aivo_mesh.retry_budget.exhausted.auth-svc:1|c", "aivo_mesh.grpc.local_rejections.auth-svc.retry_budget:1|c"],
        ["aivo_mesh.circuit_breaker.failures.auth-svc:1|c"],
        ["aivo_mesh.circuit_breaker.state.auth-svc:2|g"],
        ["aivo_mesh.circuit_breaker.state.auth-svc:1|g"],
        ["aivo_mesh.circuit_breaker.state.auth-svc:0|g"],
        ["aivo_mesh.outlier.ejections.auth-svc:1|c", "aivo_mesh.outlier.ejected_endpoints.auth-svc:1|g"],
        ["aivo_mesh.outlier.ejections.auth-svc:1|c", "aivo_mesh.outlier.ejected_endpoints.auth-svc:2|g"],
        ["aivo_mesh.outlier.ejected_endpoints.auth-svc:1|g"],
    ]
    assert b"10.0.0" not in b"".join(line.encode() for p in got for line in p)


def test_server_observer(receiver: socket.socket, client: StatsdClient) -> None:
    call = ServerCall("learner-svc", LOGIN, "spiffe://aivo.local/ns/default/sa/api", (), monotonic() - 0.01)
    StatsdServerObserver(client).finish(None, call, "NOT_FOUND", None)
    (lines,) = packets(receiver, 1)
    assert lines[0] == f"aivo_mesh.grpc.requests.server.learner-svc.{M}.NOT_FOUND:1|c"
    name, _, rest = lines[1].partition(":")
    assert name == f"aivo_mesh.grpc.request_duration.server.learner-svc.{M}"
    assert rest.endswith("|ms")
    assert float(rest[:-3]) >= 10.0


def test_names_are_sanitised(receiver: socket.socket) -> None:
    port = receiver.getsockname()[1]
    with StatsdClient(f"127.0.0.1:{port}", prefix="team.my mesh") as c:
        StatsdListener(c).call_finished("auth.svc:1", "/bad path", "weird\nstatus", 0.001, 1, None)
    (lines,) = packets(receiver, 1)
    assert lines[0] == "team.my_mesh.grpc.requests.client.auth_svc_1.unknown.UNKNOWN:1|c"
    assert segment("...") == "unknown"


def test_no_prefix(receiver: socket.socket) -> None:
    port = receiver.getsockname()[1]
    with StatsdClient(f"127.0.0.1:{port}", prefix="") as c:
        StatsdListener(c).breaker_state("a", "closed", "open")
    assert packets(receiver, 1) == [["circuit_breaker.state.a:2|g"]]


def test_large_batches_split_below_mtu(receiver: socket.socket, client: StatsdClient) -> None:
    lines = [client.counter("grpc", "x", f"n{i:04d}") for i in range(200)]
    client.send(lines)
    received: list[str] = []
    while len(received) < len(lines):
        data = receiver.recv(65535)
        assert len(data) <= MAX_PACKET
        received += data.decode().split("\n")
    assert received == lines
    assert client.sent > 1
    assert client.dropped == 0


def test_socket_is_non_blocking_and_errors_are_dropped(client: StatsdClient) -> None:
    assert client._sock is not None
    assert client._sock.getblocking() is False
    client.close()
    StatsdListener(client).breaker_failure("a", "UNAVAILABLE")  # closed: dropped, never raises
    assert client.dropped == 1


def test_unreachable_port_never_raises() -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with StatsdClient(f"127.0.0.1:{port}") as c:
        listener = StatsdListener(c)
        for _ in range(5):
            listener.call_finished("a", LOGIN, "OK", 0.001, 1, None)
        assert c.sent + c.dropped == 5


def test_unresolvable_address_drops_output_until_it_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", fail)
    c = StatsdClient("statsd.invalid:8125")
    StatsdListener(c).breaker_failure("a", "UNAVAILABLE")
    assert c.dropped == 1
    assert c.sent == 0
    # The name resolves later (a StatsD container that started after the service): once the retry
    # interval has passed, output starts without a restart.
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, **kw: real("127.0.0.1", port, **kw))
    StatsdListener(c).breaker_failure("a", "UNAVAILABLE")
    assert (c.sent, c.dropped) == (0, 2)  # not before the interval: no lookup per metric
    c._retry_at = 0.0  # the interval has passed
    StatsdListener(c).breaker_failure("a", "UNAVAILABLE")
    assert (c.sent, c.dropped) == (1, 2)
    c.close()


def test_from_spec_and_addresses() -> None:
    assert StatsdClient.from_spec(StatsdSpec()) is None
    c = StatsdClient.from_spec(StatsdSpec(enabled=True, address="127.0.0.1:8125", prefix="p"))
    assert c is not None
    assert c.prefix == "p"
    c.close()
    assert parse_address("statsd:8125") == ("statsd", 8125)
    assert parse_address("[::1]:9125") == ("::1", 9125)
    for bad in ("statsd", ":8125", "host:0", "host:99999", "host:port"):
        with pytest.raises(MeshError):
            parse_address(bad)
