"""What every demo service shares: its context, peer channels, SQLite access and helpers.

A service module exposes ``register(server, ctx) -> Closeable``: it adds its servicer to a
``grpc.aio.Server`` and returns an object whose ``close()`` releases what the servicer holds
(database handles). The mesh server layer owns the server itself, TLS, caller identity and
authorization; servicers never look at client certificates.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import grpc

from aivo_mesh.errors import CallError, DeadlineExceeded

T = TypeVar("T")

#: What a failed call to a peer can raise: a gRPC status, or a mesh-side refusal
#: (circuit open, overloaded, ...) from the MeshClient behind PeerChannels.
PEER_ERRORS: tuple[type[Exception], ...] = (grpc.RpcError, CallError)

#: Default deadline for calls a servicer makes to its peers (seconds), further capped by
#: what is left of the incoming call's own deadline.
PEER_CALL_TIMEOUT = 5.0


class PeerChannels(Protocol):
    """Hands out channels to other mesh services (the mesh's MeshClient satisfies this)."""

    async def channel(self, service: str) -> grpc.aio.Channel: ...


class Closeable(Protocol):
    async def close(self) -> None: ...


@dataclass
class ServiceContext:
    name: str  # mesh service name, e.g. "learner-svc"
    state_dir: Path  # where this service keeps its SQLite db / secrets
    peers: PeerChannels


#: The shape of every service module's ``register``.
RegisterFn = Callable[[grpc.aio.Server, ServiceContext], Closeable]


def ensure_state_dir(path: Path) -> Path:
    """Create ``path`` (owner-only) if missing; existing directories are left as they are."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def now() -> int:
    """Current time, unix seconds."""
    return int(time.time())


async def abort(context: Any, code: grpc.StatusCode, details: str) -> NoReturn:
    """``context.abort`` with a ``NoReturn`` type (grpc ships no type information)."""
    await context.abort(code, details)
    raise AssertionError("context.abort returned")  # pragma: no cover


def bearer_token(context: Any) -> str | None:
    """The token from ``authorization: Bearer <token>`` metadata, or None."""
    for key, value in context.invocation_metadata() or ():
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = str(value).strip().partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            return token
        return None
    return None


def peer_timeout(context: Any, default: float = PEER_CALL_TIMEOUT) -> float:
    """Timeout for a call made while serving ``context``: never past the caller's deadline."""
    remaining = context.time_remaining()
    if remaining is None:
        return default
    return max(0.0, min(default, float(remaining)))


def peer_failure_status(exc: BaseException) -> grpc.StatusCode:
    """The status to report when a call to a peer failed with ``exc``.

    Deadline problems stay DEADLINE_EXCEEDED; everything else becomes UNAVAILABLE, so a
    peer's PERMISSION_DENIED / INVALID_ARGUMENT is never mistaken for the caller's own.
    """
    if isinstance(exc, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    code = getattr(exc, "code", None)
    if isinstance(exc, grpc.RpcError) and callable(code) and code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.UNAVAILABLE


def describe_peer_error(exc: BaseException) -> str:
    """A short, log-safe description of a peer failure (status name or exception class)."""
    code = getattr(exc, "code", None)
    if isinstance(exc, grpc.RpcError) and callable(code):
        status = code()
        return str(getattr(status, "name", status))
    return type(exc).__name__


class SqliteDB:
    """One sqlite3 connection used from worker threads, one statement batch at a time.

    ``await db.run(fn)`` runs ``fn(conn)`` in a thread (``asyncio.to_thread``) under a lock,
    so the event loop never blocks on disk I/O. Use ``with conn:`` inside ``fn`` for a
    transaction.
    """

    def __init__(self, path: Path, schema: str) -> None:
        ensure_state_dir(path.parent)
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = sqlite3.connect(path, check_same_thread=False, timeout=5.0)
        path.chmod(0o600)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        with self._conn:
            self._conn.executescript(schema)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            if self._conn is None:
                raise RuntimeError(f"{self.path.name}: database is closed")
            return fn(self._conn)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self._call, fn)

    def _close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    async def close(self) -> None:
        await asyncio.to_thread(self._close)
