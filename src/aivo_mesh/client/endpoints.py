"""One bare mTLS channel per endpoint of a target service, swappable without failing calls.

Python has no custom resolver/LB API (grpc#11685), so the mesh keeps its own channel per endpoint
and its own picker (policy.balancer). Channels here carry no interceptors: the policy stack runs
once per call in the target's front channel and sends each attempt on the endpoint it picked.

Swaps (discovery removed an endpoint, our certificate rotated) never close a channel under an
in-flight call: retired channels are closed after `drain_seconds`, by which time the calls that
were using them have finished or hit their own deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from aivo_mesh.policy.core import SESSION_AGENT

if TYPE_CHECKING:
    from aivo_mesh.client.methods import MethodInfo

DEFAULT_DRAIN_SECONDS = 30.0


USER_AGENT = "grpc.primary_user_agent"


def new_session() -> str:
    return secrets.token_urlsafe(16)  # 128 random bits


def with_session(options: Sequence[tuple[str, object]], token: str) -> list[tuple[str, object]]:
    """`options` with the session token first in the channel's user agent (a caller's own user agent
    kept after it): grpc sends it on every call of the channel, health checks included."""
    own = [str(v) for k, v in options if k == USER_AGENT]
    agent = " ".join((f"{SESSION_AGENT}/{token}", *own))
    return [*(o for o in options if o[0] != USER_AGENT), (USER_AGENT, agent)]


class EndpointPool:
    def __init__(
        self,
        authority: str,
        credentials: grpc.ChannelCredentials | None,
        options: Sequence[tuple[str, object]],
        drain_seconds: float = DEFAULT_DRAIN_SECONDS,
    ) -> None:
        self.authority = authority
        self._credentials = credentials
        self._options = list(options)
        self.drain_seconds = drain_seconds
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._callables: dict[tuple[Any, ...], Any] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self.generation = 0
        # Told when an endpoint's channel goes away, so its next connection is vetted afresh.
        self.on_forget: Callable[[str], None] = lambda endpoint: None

    def channel(self, endpoint: str) -> grpc.aio.Channel:
        ch = self._channels.get(endpoint)
        if ch is None:
            # An mTLS channel gets a session token of its own (server.authz.VerifiedSessions; a new channel,
            # a new secret) in its user agent; the plaintext hop to a local sidecar none.
            options = self._options if self._credentials is None else with_session(self._options, new_session())
            ch = self._channels[endpoint] = open_channel(endpoint, self._credentials, options)
        return ch

    def multicallable(self, endpoint: str, kind: str, info: MethodInfo) -> Any:
        """`channel.unary_unary(path, ...)` etc., cached: building one per call would cost more than
        the policy stack itself. Keyed by the caller's own (de)serializers too (None: the message
        classes'), since a caller may send a method's raw bytes."""
        key = (endpoint, kind, info.path, info.request_serializer, info.response_deserializer)
        mc = self._callables.get(key)
        if mc is None:
            factory = getattr(self.channel(endpoint), kind)
            # `_registered_method`, as generated stubs pass it: the channel resolves the method once
            # instead of on every call.
            mc = self._callables[key] = factory(info.path, request_serializer=info.serialize,
                                                response_deserializer=info.deserialize, _registered_method=True)
        return mc

    def retain(self, endpoints: Iterable[str]) -> None:
        """Keep only these endpoints' channels; retire the others after the drain delay."""
        keep = set(endpoints)
        gone = [e for e in self._channels if e not in keep]
        for e in gone:
            self.on_forget(e)
            self._retire(self._channels.pop(e))
        if gone:
            self._callables = {k: v for k, v in self._callables.items() if k[0] in keep}

    def rebuild(self, credentials: grpc.ChannelCredentials | None) -> None:
        """New credentials (rotated client certificate): new channels for new calls, old ones drain."""
        self._credentials = credentials
        old, self._channels, self._callables = self._channels, {}, {}
        self.generation += 1
        for endpoint, ch in old.items():
            self.on_forget(endpoint)
            self._retire(ch)

    def discard(self, endpoint: str) -> None:
        """Close an endpoint's channel now (its server was refused); the next call opens a new one."""
        ch = self._channels.pop(endpoint, None)
        self.on_forget(endpoint)
        if ch is None:
            return
        self._callables = {k: v for k, v in self._callables.items() if k[0] != endpoint}
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(_close_later(ch, 0.0))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _retire(self, ch: grpc.aio.Channel) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: nothing can be in flight either; the channel is garbage-collected
        task = loop.create_task(_close_later(ch, self.drain_seconds))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        channels, self._channels, self._callables = list(self._channels.values()), {}, {}
        for t in list(self._retiring):
            t.cancel()
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)

    def states(self) -> dict[str, str]:
        """Connectivity state per endpoint (for /clusters), without triggering a connection."""
        return {e: ch.get_state(try_to_connect=False).name for e, ch in self._channels.items()}


def open_channel(target: str, credentials: grpc.ChannelCredentials | None,
                 options: Sequence[tuple[str, object]], interceptors: Sequence[Any] = ()) -> grpc.aio.Channel:
    """mTLS channel; plaintext only for the sidecar plane's loopback hop to the local Envoy."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=list(options), interceptors=list(interceptors) or None)
    return grpc.aio.secure_channel(target, credentials, options=list(options),
                                   interceptors=list(interceptors) or None)


async def _close_later(ch: grpc.aio.Channel, delay: float) -> None:
    try:
        await asyncio.sleep(delay)
    finally:
        with contextlib.suppress(Exception):
            await ch.close(grace=None)
