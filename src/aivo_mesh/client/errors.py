"""Errors of failed mesh calls, as both grpc.RpcError and aivo_mesh CallError.

Code written against plain grpc keeps working (`except grpc.RpcError`, `.code()`, `.details()`),
and code that wants to know *why* can catch the specific type, chosen by the reply's LocalReason
(never by its text). The breaker's contract is the platform's documented one: UNAVAILABLE with
"Circuit breaker OPEN" in the details.
"""

from __future__ import annotations

import grpc

from aivo_mesh.errors import CallError, CircuitOpen, DeadlineExceeded, Overloaded, RetriesExhausted
from aivo_mesh.policy.core import LocalReason, Reply


class LocalRpcError(grpc.aio.AioRpcError, CallError):  # type: ignore[misc]
    """A call the client-side policy refused or cut short without a server reply."""

    def __init__(self, service: str, method: str, reply: Reply) -> None:
        code = getattr(grpc.StatusCode, reply.code, grpc.StatusCode.UNKNOWN)
        grpc.aio.AioRpcError.__init__(self, code, grpc.aio.Metadata(), grpc.aio.Metadata(*reply.trailers),
                                      reply.details or reply.code, None)
        self.service = service
        self.method = method
        self.reply = reply

    def __str__(self) -> str:
        return f"{self.service} {self.method}: {self.code().name}: {self.details()}"


class CircuitOpenError(LocalRpcError, CircuitOpen):
    pass


class OverloadedError(LocalRpcError, Overloaded):
    pass


class DeadlineExceededError(LocalRpcError, DeadlineExceeded):
    pass


class RetriesExhaustedError(grpc.aio.AioRpcError, RetriesExhausted):  # type: ignore[misc]
    """The server's last error after retries: its code, details and metadata, with the attempts made."""

    def __init__(self, service: str, method: str, last: grpc.aio.AioRpcError, attempts: int) -> None:
        grpc.aio.AioRpcError.__init__(self, last.code(), last.initial_metadata(), last.trailing_metadata(),
                                      last.details(), last.debug_error_string())
        self.service = service
        self.method = method
        self.attempts = attempts

    def __str__(self) -> str:
        return (f"{self.service} {self.method}: {self.code().name} after {self.attempts} attempts: "
                f"{self.details()}")


_LOCAL: dict[LocalReason | None, type[LocalRpcError]] = {
    LocalReason.CIRCUIT_OPEN: CircuitOpenError,
    LocalReason.MAX_PENDING_REQUESTS: OverloadedError,
    LocalReason.MAX_REQUESTS: DeadlineExceededError,  # its deadline passed while queued for a slot
    LocalReason.DEADLINE: DeadlineExceededError,
}


def error_for(service: str, method: str, reply: Reply, attempts: int = 1) -> BaseException:
    """The exception a failed reply raises: the server's own error (a RetriesExhaustedError caused by it
    when the call was retried), or a local one by its reason."""
    if reply.local is None and reply.error is not None:
        if attempts > 1 and isinstance(reply.error, grpc.aio.AioRpcError):
            exhausted = RetriesExhaustedError(service, method, reply.error, attempts)
            exhausted.__cause__ = reply.error
            return exhausted
        return reply.error
    return _LOCAL.get(reply.local, LocalRpcError)(service, method, reply)
