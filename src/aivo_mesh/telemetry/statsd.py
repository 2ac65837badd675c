"""Optional StatsD output: the same counters and timers as the Prometheus families, over UDP.

    client = StatsdClient.from_spec(mesh.observability.statsd)   # None when statsd.enabled is false
    if client:
        listeners.add(StatsdListener(client))
        observers.append(StatsdServerObserver(client))
    ...
    client.close()

Names (`<p>` = prefix; every other segment is sanitised to [A-Za-z0-9_-], the method path
`/aivo.auth.v1.AuthService/Login` becomes `aivo_auth_v1_AuthService_Login`):

    <p>.grpc.requests.<side>.<service>.<method>.<status>:1|c
    <p>.grpc.request_duration.<side>.<service>.<method>:<ms>|ms
    <p>.grpc.retries.<service>.<method>:1|c
    <p>.grpc.local_rejections.<service>.<reason>:1|c
    <p>.retry_budget.exhausted.<service>:1|c
    <p>.circuit_breaker.state.<service>:<0 closed|1 half_open|2 open>|g
    <p>.circuit_breaker.failures.<service>:1|c
    <p>.outlier.ejections.<service>:1|c
    <p>.outlier.ejected_endpoints.<service>:<n>|g

Sending never blocks and never raises: a plain non-blocking UDP socket, the address resolved once
at construction, lines of one event sent in one datagram, anything that fails dropped (counted in
`dropped`).
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Sequence
from typing import Any

from aivo_mesh.config.model import StatsdSpec
from aivo_mesh.errors import MeshError
from aivo_mesh.policy.core import LocalReason, monotonic
from aivo_mesh.policy.events import PolicyListener, ServerCall
from aivo_mesh.telemetry.metrics import (
    BREAKER_STATES,
    LIMIT_REASONS,
    local_status,
    method_label,
    status_label,
)

__all__ = ["StatsdClient", "StatsdListener", "StatsdServerObserver", "parse_address", "segment"]

log = logging.getLogger(__name__)

# Stay under a typical path MTU (1500 - IP/UDP headers) so datagrams are not fragmented.
MAX_PACKET = 1432
# Seconds between lookups of a StatsD address that did not resolve.
RESOLVE_RETRY = 30.0

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def segment(value: str) -> str:
    """One dot-free StatsD name segment."""
    return _UNSAFE.sub("_", value).strip("_") or "unknown"


def _method_segment(method: str) -> str:
    return segment(method_label(method).lstrip("/"))


def parse_address(address: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port)."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MeshError(f"statsd address {address!r}: expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class StatsdClient:
    """A fire-and-forget StatsD sender on a non-blocking UDP socket."""

    def __init__(self, address: str = "127.0.0.1:8125", prefix: str = "aivo_mesh") -> None:
        host, port = parse_address(address)
        self.address = address
        self.prefix = ".".join(segment(p) for p in prefix.split(".") if p)
        self.sent = 0
        self.dropped = 0
        self._host, self._port = host, port
        self._addr: Any = None
        self._sock: socket.socket | None = None
        self._retry_at = 0.0
        self._closed = False
        self._resolve()

    def _resolve(self) -> None:
        """Look the address up; on failure drop metrics and try again after RESOLVE_RETRY seconds (a
        StatsD host in Compose may start after the service, and its name resolves only then)."""
        self._retry_at = time.monotonic() + RESOLVE_RETRY
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_DGRAM)[0]
        except OSError as exc:
            log.warning("statsd address %s does not resolve (%s); metrics are dropped, retrying in %.0fs",
                        self.address, exc, RESOLVE_RETRY)
            return
        self._addr = sockaddr
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        log.info("statsd output to %s", self.address)

    @classmethod
    def from_spec(cls, spec: StatsdSpec) -> StatsdClient | None:
        return cls(spec.address, spec.prefix) if spec.enabled else None

    def name(self, *parts: str) -> str:
        return ".".join((self.prefix, *parts)) if self.prefix else ".".join(parts)

    def send(self, lines: Sequence[str]) -> None:
        """Send lines ("name:value|type"), as few datagrams as fit in MAX_PACKET bytes."""
        packet = b""
        for line in lines:
            data = line.encode()
            if packet and len(packet) + 1 + len(data) > MAX_PACKET:
                self._send(packet)
                packet = b""
            packet = packet + b"\n" + data if packet else data
        if packet:
            self._send(packet)

    def _send(self, packet: bytes) -> None:
        if self._sock is None and not self._closed and time.monotonic() >= self._retry_at:
            self._resolve()
        if self._sock is None:
            self.dropped += 1
            return
        try:
            self._sock.sendto(packet, self._addr)
            self.sent += 1
        except OSError:  # BlockingIOError (buffer full), ECONNREFUSED from an earlier ICMP, ...
            self.dropped += 1

    def counter(self, *parts: str, value: int = 1) -> str:
        return f"{self.name(*parts)}:{value}|c"

    def timer(self, *parts: str, ms: float) -> str:
        return f"{self.name(*parts)}:{max(0.0, ms):.3f}|ms"

    def gauge(self, *parts: str, value: float) -> str:
        # A leading sign means "adjust" to StatsD: only absolute, non-negative gauges are sent here.
        return f"{self.name(*parts)}:{max(0.0, value):g}|g"

    def close(self) -> None:
        self._closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> StatsdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _call_lines(client: StatsdClient, side: str, service: str, method: str, status: str,
                seconds: float) -> list[str]:
    s, m = segment(service), _method_segment(method)
    return [client.counter("grpc", "requests", side, s, m, segment(status_label(status))),
            client.timer("grpc", "request_duration", side, s, m, ms=seconds * 1000.0)]


class StatsdListener(PolicyListener):
    """Client-side policy events as StatsD counters, timers and gauges."""

    def __init__(self, client: StatsdClient) -> None:
        self.client = client
        self._ejected: dict[str, set[str]] = {}

    def call_finished(self, service: str, method: str, code: str, seconds: float, attempts: int,
                      local: LocalReason | None) -> None:
        status = local_status(code, local)
        self.client.send(_call_lines(self.client, "client", service, method, status, seconds))

    def retry(self, service: str, method: str, attempt: int, code: str, delay: float) -> None:
        self.client.send([self.client.counter("grpc", "retries", segment(service), _method_segment(method))])

    def retry_budget_exhausted(self, service: str, method: str) -> None:
        s = segment(service)
        self.client.send([self.client.counter("retry_budget", "exhausted", s),
                          self.client.counter("grpc", "local_rejections", s, "retry_budget")])

    def breaker_state(self, service: str, old: str, new: str) -> None:
        value = BREAKER_STATES.get(new.lower().replace("-", "_"))
        if value is not None:
            self.client.send([self.client.gauge("circuit_breaker", "state", segment(service), value=value)])

    def breaker_failure(self, service: str, code: str) -> None:
        self.client.send([self.client.counter("circuit_breaker", "failures", segment(service))])

    def breaker_rejected(self, service: str, method: str) -> None:
        self.client.send([self.client.counter("grpc", "local_rejections", segment(service), "circuit_open")])

    def limit_rejected(self, service: str, method: str, limit: str) -> None:
        reason = limit if limit in LIMIT_REASONS else "other"
        self.client.send([self.client.counter("grpc", "local_rejections", segment(service), reason)])

    def endpoint_ejected(self, service: str, endpoint: str, seconds: float) -> None:
        ejected = self._ejected.setdefault(service, set())
        ejected.add(endpoint)
        s = segment(service)
        self.client.send([self.client.counter("outlier", "ejections", s),
                          self.client.gauge("outlier", "ejected_endpoints", s, value=len(ejected))])

    def endpoint_restored(self, service: str, endpoint: str) -> None:
        ejected = self._ejected.setdefault(service, set())
        ejected.discard(endpoint)
        self.client.send([self.client.gauge("outlier", "ejected_endpoints", segment(service), value=len(ejected))])


class StatsdServerObserver:
    """Server-side calls (a ServerCallObserver): side="server", service = this server."""

    def __init__(self, client: StatsdClient) -> None:
        self.client = client

    def start(self, call: ServerCall) -> object:
        return None

    def finish(self, token: object, call: ServerCall, code: str, error: BaseException | None) -> None:
        self.client.send(_call_lines(self.client, "server", call.service, call.method, code,
                                     monotonic() - call.started))
