"""MeshClient: mTLS channels to mesh services, pooled, with the policy stack on every call.

    config = MeshConfig(service_name="learner-svc", ca_cert_path=..., client_cert_path=...,
                        client_key_path=...)
    mesh_client = MeshClient(config)
    async with mesh_client.get_channel("auth-svc") as channel:     # or: await mesh_client.get_channel(...)
        reply = await AuthServiceStub(channel).ValidateToken(req)   # route deadline applied
    await mesh_client.close()
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from types import TracebackType
from typing import Any

import grpc

from aivo_mesh.client.channel import channel_credentials, channel_options
from aivo_mesh.client.config import MeshConfig
from aivo_mesh.client.interceptors import StackBinder, adapters, unary_terminal
from aivo_mesh.config.model import MeshSpec
from aivo_mesh.config.resolve import route_policy
from aivo_mesh.errors import MeshError
from aivo_mesh.pki import Identity, load_identity
from aivo_mesh.policy.core import Call, Handler, build_stack
from aivo_mesh.policy.deadline import DeadlineLayer, DeadlineParams


class UnknownService(MeshError):
    """The target is neither in mesh.yaml nor given explicit endpoints."""


class ChannelHandle:
    """What `get_channel` returns: awaitable (-> channel) and an async context manager.

    The channel is pooled: leaving the `async with` block does not close it; `MeshClient.close` does.
    """

    def __init__(self, client: MeshClient, service: str) -> None:
        self._client = client
        self._service = service

    def __await__(self) -> Generator[Any, None, grpc.aio.Channel]:
        return self._client._channel(self._service).__await__()

    async def __aenter__(self) -> grpc.aio.Channel:
        return await self._client._channel(self._service)

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None


class MeshClient:
    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.mesh: MeshSpec = config.mesh_spec()
        # Load and check our own identity now: a bad key or cert fails here, naming the file.
        self.identity: Identity = load_identity(
            config.client_cert_path, config.client_key_path, config.ca_cert_path)
        self._credentials = channel_credentials(self.identity)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._lock = asyncio.Lock()
        self._closed = False

    # -- public API ---------------------------------------------------------------------------
    def get_channel(self, service: str) -> ChannelHandle:
        return ChannelHandle(self, service)

    async def channel(self, service: str) -> grpc.aio.Channel:
        """The pooled channel to `service` (what demo services use to call their peers)."""
        return await self._channel(service)

    async def wait_ready(self, service: str, timeout: float | None = None) -> None:
        """Wait until the channel to `service` is connected (bounded by connection_timeout)."""
        channel = await self._channel(service)
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout or self.config.connection_timeout)
        except TimeoutError:
            raise MeshError(f"{service}: not connected within "
                            f"{timeout or self.config.connection_timeout:.1f}s") from None

    async def close(self) -> None:
        self._closed = True
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals ----------------------------------------------------------------------------
    def endpoints(self, service: str) -> list[str]:
        if service in self.config.endpoints:
            return list(self.config.endpoints[service])
        try:
            spec = self.mesh.service(service)
        except KeyError:
            raise UnknownService(f"unknown service {service!r}: mesh.yaml defines "
                                 f"{list(self.mesh.service_names)}") from None
        return list(spec.endpoints) or [f"{spec.host}:{spec.port}"]

    def _timeout_for(self, service: str) -> Any:
        known = service in self.mesh.service_names

        def timeout(method: str) -> float | None:
            if not known:
                return self.config.request_timeout
            return route_policy(self.mesh, service, method).timeout

        return timeout

    def _stack_for(self, service: str) -> Any:
        timeout_for = self._timeout_for(service)

        def stack(method: str) -> Handler:
            params = DeadlineParams(route_timeout=timeout_for(method))

            def params_for(_: Call) -> DeadlineParams:
                return params

            return build_stack([DeadlineLayer(params_for)], unary_terminal)

        return stack

    async def _channel(self, service: str) -> grpc.aio.Channel:
        if self._closed:
            raise MeshError("MeshClient is closed")
        ch = self._channels.get(service)
        if ch is not None:
            return ch
        async with self._lock:
            ch = self._channels.get(service)
            if ch is None:
                ch = self._channels[service] = self._new_channel(service)
        return ch

    def _new_channel(self, service: str) -> grpc.aio.Channel:
        target = self.endpoints(service)[0]
        binder = StackBinder(service, self._stack_for(service), self._timeout_for(service))
        return grpc.aio.secure_channel(
            target, self._credentials, options=channel_options(self.mesh.keepalive, service),
            interceptors=adapters(binder))
