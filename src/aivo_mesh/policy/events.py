"""The two event contracts between the mesh and its telemetry, free of grpc, metrics and logging.

PolicyListener: how client-side layers report what they decided. Every method has a no-op default
(pybreaker's listener model), so a subscriber overrides only what it needs. telemetry/ registers one
listener that turns these into Prometheus/StatsD series. Methods are called synchronously from the
call path: keep them O(1) and never raise.

ServerCallObserver: how the server adapter (server/interceptors.py) tells telemetry about each
inbound call (a ServerCall). It lives here, not beside the adapter, so that telemetry modules
implement it without importing grpc.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from aivo_mesh.policy.core import LocalReason

_log = logging.getLogger(__name__)


class PolicyListener:
    def call_started(self, service: str, method: str) -> None: ...

    def call_finished(self, service: str, method: str, code: str, seconds: float, attempts: int,
                      local: LocalReason | None) -> None:
        """A logical call ended (a stream: when it ended); `local` is why the client answered it itself,
        None when a server did."""

    def retry(self, service: str, method: str, attempt: int, code: str, delay: float) -> None: ...

    def retry_budget_exhausted(self, service: str, method: str) -> None: ...

    def breaker_state(self, service: str, old: str, new: str) -> None: ...

    def breaker_failure(self, service: str, code: str) -> None: ...

    def breaker_rejected(self, service: str, method: str) -> None: ...

    def limit_rejected(self, service: str, method: str, limit: str) -> None: ...

    def endpoint_ejected(self, service: str, endpoint: str, seconds: float) -> None: ...

    def endpoint_restored(self, service: str, endpoint: str) -> None: ...

    def peer_refused(self, service: str, endpoint: str, rule: str) -> None:
        """The server at `endpoint` presented a certificate the peer policy refuses (pki.peer.Rule)."""


def _failed(listener: PolicyListener, event: str) -> None:
    # Telemetry must never fail a call; log once per failure with the culprit's name.
    _log.exception("policy listener %s failed on %s", type(listener).__name__, event)


class Listeners(PolicyListener):
    """Fan-out to several listeners; a failing listener is logged and never breaks a call.

    One explicit method per event (no __getattribute__ magic): mypy checks the signatures and
    each event costs one loop, not a closure per attribute lookup.
    """

    def __init__(self, *listeners: PolicyListener) -> None:
        self.listeners: list[PolicyListener] = list(listeners)

    def add(self, listener: PolicyListener) -> None:
        self.listeners.append(listener)

    def call_started(self, service: str, method: str) -> None:
        for t in self.listeners:
            try:
                t.call_started(service, method)
            except Exception:
                _failed(t, "call_started")

    def call_finished(self, service: str, method: str, code: str, seconds: float, attempts: int,
                      local: LocalReason | None) -> None:
        for t in self.listeners:
            try:
                t.call_finished(service, method, code, seconds, attempts, local)
            except Exception:
                _failed(t, "call_finished")

    def retry(self, service: str, method: str, attempt: int, code: str, delay: float) -> None:
        for t in self.listeners:
            try:
                t.retry(service, method, attempt, code, delay)
            except Exception:
                _failed(t, "retry")

    def retry_budget_exhausted(self, service: str, method: str) -> None:
        for t in self.listeners:
            try:
                t.retry_budget_exhausted(service, method)
            except Exception:
                _failed(t, "retry_budget_exhausted")

    def breaker_state(self, service: str, old: str, new: str) -> None:
        for t in self.listeners:
            try:
                t.breaker_state(service, old, new)
            except Exception:
                _failed(t, "breaker_state")

    def breaker_failure(self, service: str, code: str) -> None:
        for t in self.listeners:
            try:
                t.breaker_failure(service, code)
            except Exception:
                _failed(t, "breaker_failure")

    def breaker_rejected(self, service: str, method: str) -> None:
        for t in self.listeners:
            try:
                t.breaker_rejected(service, method)
            except Exception:
                _failed(t, "breaker_rejected")

    def limit_rejected(self, service: str, method: str, limit: str) -> None:
        for t in self.listeners:
            try:
                t.limit_rejected(service, method, limit)
            except Exception:
                _failed(t, "limit_rejected")

    def endpoint_ejected(self, service: str, endpoint: str, seconds: float) -> None:
        for t in self.listeners:
            try:
                t.endpoint_ejected(service, endpoint, seconds)
            except Exception:
                _failed(t, "endpoint_ejected")

    def endpoint_restored(self, service: str, endpoint: str) -> None:
        for t in self.listeners:
            try:
                t.endpoint_restored(service, endpoint)
            except Exception:
                _failed(t, "endpoint_restored")

    def peer_refused(self, service: str, endpoint: str, rule: str) -> None:
        for t in self.listeners:
            try:
                t.peer_refused(service, endpoint, rule)
            except Exception:
                _failed(t, "peer_refused")


NOOP = PolicyListener()


@dataclass(slots=True)
class ServerCall:
    """What observers learn about one inbound call."""

    service: str
    method: str
    caller: str | None
    metadata: tuple[tuple[str, str], ...]
    started: float
    attempt: int = 1
    # The peer-policy rule the caller's certificate broke (pki.peer.Rule), when it was refused for one.
    refusal: str | None = None
    # Refused by the server's rate limit (RESOURCE_EXHAUSTED with a pushback), not by the handler.
    rate_limited: bool = False


class ServerCallObserver(Protocol):
    """Telemetry hook. `start` runs in the handler's task (so it may set context variables, e.g. the
    current span) and returns a token handed back to `finish` with the final status name."""

    def start(self, call: ServerCall) -> object: ...

    def finish(self, token: object, call: ServerCall, code: str, error: BaseException | None) -> None: ...
