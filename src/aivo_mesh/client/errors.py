"""Errors for calls the mesh answered locally, as both grpc.RpcError and aivo_mesh CallError.

Code written against plain grpc keeps working (`except grpc.RpcError`, `.code()`, `.details()`),
and code that wants to know *why* can catch the specific type. The breaker's contract is the
platform's documented one: UNAVAILABLE with "Circuit breaker OPEN" in the details.
"""

from __future__ import annotations

import grpc

from aivo_mesh.errors import CallError, CircuitOpen, DeadlineExceeded, Overloaded
from aivo_mesh.policy.core import Reply


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


def error_for(service: str, method: str, reply: Reply) -> BaseException:
    """The exception a failed reply raises: the server's own error, or a local one by kind."""
    if not reply.local and reply.error is not None:
        err: BaseException = reply.error
        return err
    if reply.code == "UNAVAILABLE" and "Circuit breaker OPEN" in reply.details:
        return CircuitOpenError(service, method, reply)
    if reply.code == "RESOURCE_EXHAUSTED":
        return OverloadedError(service, method, reply)
    if reply.code == "DEADLINE_EXCEEDED":
        return DeadlineExceededError(service, method, reply)
    return LocalRpcError(service, method, reply)
