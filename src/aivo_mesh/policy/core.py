"""The two contracts of the policy core: a Handler answers a Call; a Layer wraps a Handler.

Nothing here imports grpc. Status codes are names ("OK", "UNAVAILABLE", ...) so the core can be
tested with plain async functions, and time comes from an injected Clock so a 60 s breaker
recovery is tested in microseconds. `client/` adapts grpc.aio to these types.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol


class Clock(Protocol):
    """Monotonic seconds. `time.monotonic` in production, a FakeClock in tests."""

    def __call__(self) -> float: ...


monotonic: Clock = time.monotonic

# The metadata key that carries `Call.attempt` on the wire: the client sends it on retries only (its
# absence means attempt 1), the server reads it for its observers. Here, grpc-free, for both sides.
ATTEMPT_HEADER = "x-mesh-attempt"
# The user-agent product that carries a client connection's session token ("aivo-mesh-session/<token>"): a
# random secret a MeshClient makes per mTLS channel, so the server can verify a connection's certificate
# once rather than on every call (server.authz.VerifiedSessions says why that is safe). In the user agent,
# which grpc core sends on every call of the channel from one prebuilt header, not in per-call metadata,
# which costs each call ~8 k instructions in the client and ~10 k in the server. Never logged: the server
# removes it from the metadata its observers see.
SESSION_AGENT = "aivo-mesh-session"


@dataclass(slots=True)
class Call:
    """One logical call as the policy layers see it (attempts share it)."""

    service: str
    method: str
    request: Any
    # Absolute deadline on the injected clock, or None for "no deadline".
    deadline: float | None = None
    # Timeout the caller asked for (seconds), before any layer narrowed it.
    timeout: float | None = None
    attempt: int = 1
    metadata: tuple[tuple[str, str], ...] = ()
    # No retry from here on: a response message arrived, or a stream was handed to its caller.
    committed: bool = False
    # The endpoint ("host:port") the balancer picked for the current attempt.
    endpoint: str | None = None
    # The canary version the balancer drew for this call (None: no split); every attempt stays in it.
    version: str | None = None
    # Opaque to the core: what the terminal handler needs to send an attempt (the adapter's business).
    transport: Any = None
    # The route's per-attempt timeout (set by the retry layer). The adapter gives an attempt
    # `deadline.attempt_timeout(call, now, call.per_try_timeout)`: min(remaining, per-try).
    per_try_timeout: float | None = None

    def remaining(self, now: float) -> float | None:
        return None if self.deadline is None else self.deadline - now


class LocalReason(enum.StrEnum):
    """Why a call ended without a server's answer: one value per cause. The client maps it to an
    exception type (client/errors.py), telemetry to its labels; nothing matches reply text."""

    CIRCUIT_OPEN = "circuit_open"  # the breaker is open (UNAVAILABLE, "Circuit breaker OPEN")
    MAX_PENDING_REQUESTS = "max_pending_requests"  # no slot and the queue is full (UNAVAILABLE, as Envoy)
    MAX_REQUESTS = "max_requests"  # queued for a slot until the deadline (DEADLINE_EXCEEDED)
    DEADLINE = "deadline"  # no time left: before the call, before an attempt, or during back-off
    NO_ENDPOINTS = "no_endpoints"  # discovery lists none, or every one is ejected or unhealthy
    CANCELLED = "cancelled"  # the caller cancelled
    ERROR = "error"  # the call raised on our side (a request or metadata grpc refused to send)


class Reply(NamedTuple):
    """The final outcome of one attempt: a status name, and the value or the error behind it.

    `error` is whatever the transport raised (kept so the adapter can re-raise it unchanged);
    `trailers` are the response trailing metadata (for grpc-retry-pushback-ms). Immutable, and a
    NamedTuple rather than a frozen dataclass: one is made on every attempt, and a frozen dataclass
    sets each field through `object.__setattr__` (0.9 us a reply against 0.3 us).
    """

    code: str
    value: Any = None
    error: BaseException | None = None
    details: str = ""
    trailers: tuple[tuple[str, str], ...] = ()
    # Set when a layer made the reply itself (breaker, limit, deadline, balancer): why. Such a reply
    # never looks like a server error in metrics or outlier detection.
    local: LocalReason | None = None
    # A stream: this reply says it opened ("OK", value = the stream); `ended` resolves to its final
    # reply. Layers that count outcomes or hold resources finish with `when_ended` (tower's "the
    # permit travels with the response").
    ended: asyncio.Future[Reply] | None = None

    @property
    def ok(self) -> bool:
        return self.code == "OK"


def when_ended(reply: Reply, finish: Callable[[Reply], None]) -> None:
    """Call `finish` with the call's final reply: now for a unary call, when the stream ends for a stream
    (in the context current here, so what it logs belongs to this call)."""
    if reply.ended is None:
        finish(reply)
    else:
        reply.ended.add_done_callback(lambda done: finish(done.result()))


Handler = Callable[[Call], Awaitable[Reply]]


class Layer(Protocol):
    """Wraps a handler in one policy. `name` is what tests and docs use to pin the stack order."""

    name: str

    def wrap(self, inner: Handler) -> Handler: ...


def build_stack(layers: Sequence[Layer], terminal: Handler) -> Handler:
    """Compose layers around `terminal`. layers[0] is outermost: it sees the call first."""
    handler = terminal
    for layer in reversed(layers):
        handler = layer.wrap(handler)
    return handler
