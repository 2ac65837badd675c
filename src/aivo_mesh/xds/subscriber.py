"""A proxyless process's ADS stream to the control plane: state of the world, as Envoy speaks it.

    sub = Subscription(target, credentials, node, check=..., apply=..., server_check=...)
    sub.start()                         # connects, subscribes, reconnects; never raises
    await sub.wait_applied(timeout)     # until a complete configuration has been applied once
    await sub.stop()

The protocol rules it keeps (envoyproxy/envoy api/xds_protocol.rst), those the server (xds/server.py)
relies on:

- listeners and clusters by wildcard; route configurations and assignments by the names the held
  listeners and clusters use, asked again whenever those change;
- every response ACKed (its version and nonce) or NACKed (the version held before, the nonce, and an
  error_detail saying why): a type whose resources `check` refuses is NACKed and the held ones stay;
- a configuration is applied only when complete (every route configuration a listener names and every
  assignment a cluster waits for is held), as Envoy warms a listener or a cluster; `apply` raising
  PolicyError NACKs the response that completed it and the last good configuration stays in force;
- on a broken stream it reconnects with backoff and says what it holds (version and names per type),
  so a control plane holding the same versions sends nothing and nothing is re-applied;
- the control plane's certificate is checked as strictly as any server's (`server_check`: its SPIFFE
  ID, the peer policy) before the stream opens.

Nothing is lost while the control plane is away: the last applied configuration stays in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2

from aivo_mesh.client.server_check import ServerCheck
from aivo_mesh.xds.cache import CLUSTER, ENDPOINT, LISTENER, ROUTE, type_name
from aivo_mesh.xds.policies import PolicyError
from aivo_mesh.xds.refs import cluster_refs, eds_clusters, rds_names

log = logging.getLogger(__name__)

Resources = Mapping[str, Mapping[str, Message]]  # type URL -> name -> resource
# What the subscriber asks for, parents before children (the order Envoy warms in).
TYPES = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
WILDCARD = frozenset({CLUSTER, LISTENER})
BACKOFF_BASE, BACKOFF_MAX = 0.2, 5.0


def _resource_classes() -> dict[str, type[Message]]:
    from aivo_mesh.xds.resources import _types

    return _types()


@dataclass
class TypeState:
    """One type on this node: what it holds (ACKed), and the last response's nonce."""

    version: str = ""
    resources: dict[str, Message] = field(default_factory=dict)
    names: frozenset[str] = frozenset()  # subscribed names (named types)
    nonce: str = ""
    nacked: str | None = None  # the last version refused, and why
    error: str | None = None


class Subscription:
    def __init__(self, target: str, credentials: grpc.ChannelCredentials, node: base_pb2.Node, *,
                 check: Callable[[str, Mapping[str, Message]], None],
                 apply: Callable[[Resources], None],
                 options: list[tuple[str, object]] | None = None,
                 server_check: Callable[[Callable[[str], grpc.aio.Channel]], ServerCheck] | None = None,
                 rng: random.Random | None = None) -> None:
        """`check(type_url, resources)` raises PolicyError for resources this process cannot apply (the
        response is NACKed); `apply(resources)` puts a complete configuration in force (PolicyError: NACK).
        `server_check(channel_for)` makes the check of the control plane's certificate."""
        self.target = target
        self.node = node
        self.types = {t: TypeState() for t in TYPES}
        self.applied_version: dict[str, str] = {}  # per type, the versions last applied together
        self.applied_at = 0.0
        self.applies = 0
        self.connected = False
        self.last_error: str | None = None
        self._credentials = credentials
        self._options = options or []
        self._check = check
        self._apply = apply
        self._server_check = server_check
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None
        self._applied = asyncio.Event()
        self._changed = asyncio.Condition()

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"xds:{self.target}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait_applied(self, timeout: float) -> bool:
        """Until a complete configuration was applied once (False: not within `timeout`)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._applied.wait(), timeout)
        return self._applied.is_set()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Until `predicate()` holds after some response was handled (False: not within `timeout`)."""
        async def until() -> None:
            async with self._changed:
                await self._changed.wait_for(predicate)

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until(), timeout)
        return predicate()

    def status(self) -> dict[str, object]:
        """What this node holds, per type: for status views and CSDS-like dumps."""
        return {"target": self.target, "connected": self.connected, "applies": self.applies,
                "applied_at": self.applied_at, "last_error": self.last_error,
                "types": {type_name(t): {"version": s.version, "names": sorted(s.resources),
                                         "nacked": s.nacked, "error": s.error}
                          for t, s in self.types.items()}}

    # -- the stream -------------------------------------------------------------------------------
    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._stream()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken stream, a refused certificate: retry, keep the config
                self.last_error = str(exc) if not isinstance(exc, grpc.aio.AioRpcError) else (
                    f"{exc.code().name}: {exc.details()}")
                log.warning("xds stream to %s ended: %s", self.target, self.last_error)
            finally:
                self.connected = False
            failures += 1
            delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** min(failures, 8))
            await asyncio.sleep(self._rng.uniform(delay / 2, delay))

    async def _stream(self) -> None:
        async with grpc.aio.secure_channel(self.target, self._credentials, options=self._options) as channel:
            if self._server_check is not None:
                check = self._server_check(lambda _: channel)
                try:
                    refused = await check.vet(self.target, timeout=10.0)
                finally:
                    check.close()
                if refused is not None:
                    raise ConnectionError(f"control plane certificate refused: {refused}")
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            out: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()
            first = True
            for t in TYPES:
                state = self.types[t]
                if t in WILDCARD or state.names:
                    # Resume: the versions and names held, so a control plane with the same sends nothing.
                    out.put_nowait(self._request(t, version=state.version, nonce="", node=first))
                    first = False

            async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
                while True:
                    yield await out.get()

            call = stub.StreamAggregatedResources(requests())
            self.connected = True
            async for response in call:
                self.last_error = None
                for request in self._handle(response):
                    out.put_nowait(request)
                async with self._changed:
                    self._changed.notify_all()

    def _request(self, t: str, *, version: str, nonce: str, node: bool = False,
                 error: str | None = None) -> discovery_pb2.DiscoveryRequest:
        req = discovery_pb2.DiscoveryRequest(type_url=t, version_info=version, response_nonce=nonce,
                                             resource_names=sorted(self.types[t].names))
        if node:
            req.node.CopyFrom(self.node)
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                                        message=error))
        return req

    def _handle(self, response: discovery_pb2.DiscoveryResponse) -> list[discovery_pb2.DiscoveryRequest]:
        """The requests to send after `response`: its ACK or NACK, then any changed subscriptions."""
        t = response.type_url
        state = self.types.get(t)
        if state is None:
            return []  # a type this node never asked for
        state.nonce = response.nonce
        try:
            resources = self._unpack(t, response)
            self._check(t, resources)
        except PolicyError as exc:
            return [self._nack(t, response, str(exc))]
        before = state.resources, state.version
        state.resources, state.version = resources, response.version_info
        try:
            self._apply_if_complete()
        except PolicyError as exc:
            state.resources, state.version = before
            return [self._nack(t, response, str(exc))]
        state.nacked = state.error = None
        log.debug("xds %s ACK %s version %s (%d)", self.target, type_name(t), state.version, len(resources))
        return [self._request(t, version=state.version, nonce=response.nonce), *self._resubscribe()]

    def _nack(self, t: str, response: discovery_pb2.DiscoveryResponse, why: str) -> discovery_pb2.DiscoveryRequest:
        state = self.types[t]
        state.nacked, state.error = response.version_info, why
        log.warning("xds %s NACK %s version %s: %s", self.target, type_name(t), response.version_info, why)
        return self._request(t, version=state.version, nonce=response.nonce, error=why)

    @staticmethod
    def _unpack(t: str, response: discovery_pb2.DiscoveryResponse) -> dict[str, Message]:
        from aivo_mesh.xds.cache import resource_name

        cls = _resource_classes()[t]
        out: dict[str, Message] = {}
        for packed in response.resources:
            message = cls()
            if not packed.Unpack(message):
                raise PolicyError(f"a {packed.type_url} in a {type_name(t)} response")
            out[resource_name(message)] = message
        return out

    def _wanted(self) -> dict[str, frozenset[str]]:
        """The route configurations and assignments the held listeners and clusters use."""
        routes = {n for _, names in rds_names(self.types[LISTENER].resources.values()) for n in names}
        return {ROUTE: frozenset(routes), ENDPOINT: frozenset(eds_clusters(self.types[CLUSTER].resources.values()))}

    def _resubscribe(self) -> list[discovery_pb2.DiscoveryRequest]:
        requests = []
        for t, names in self._wanted().items():
            state = self.types[t]
            if names != state.names:
                state.names = names
                requests.append(self._request(t, version=state.version, nonce=state.nonce))
        return requests

    def _apply_if_complete(self) -> None:
        held = {t: s.resources for t, s in self.types.items()}
        if not (self.types[LISTENER].version and self.types[CLUSTER].version):
            return  # both wildcard sets not received yet
        wanted = self._wanted()
        if any(not names <= set(held[t]) for t, names in wanted.items()):
            return  # warming: a listener or cluster waits for its routes or assignment
        in_routes = {c for _, names in cluster_refs(held[ROUTE][n] for n in wanted[ROUTE]) for c in names}
        if not in_routes <= set(held[CLUSTER]):
            return  # a route names a cluster not received yet (a push in progress)
        versions = {t: s.version for t, s in self.types.items()}
        if versions == self.applied_version:
            return
        # Only what is in use: a route configuration or assignment no longer named is left out.
        in_use = {t: {n: r for n, r in held[t].items() if t not in wanted or n in wanted[t]} for t in held}
        self._apply(in_use)
        self.applied_version = versions
        self.applied_at = time.time()
        self.applies += 1
        self._applied.set()
