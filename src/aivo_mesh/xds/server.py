"""The Aggregated Discovery Service: snapshots from the cache, streamed to Envoys (state of the world).

Per stream and type URL the server keeps what it last sent (version, nonce) and what the node has
(the version it ACKed, the names it subscribed to). The rules (envoyproxy/envoy api/xds_protocol.rst):

- a response goes out when the snapshot's version of a type differs from what the stream was last sent,
  or when a node subscribes to names it was not sent; never otherwise (resending costs every proxy);
- a request echoing the last nonce is an ACK (no `error_detail`) or a NACK (with one); a request echoing
  an older nonce is stale and ignored;
- a NACKed version is not sent again: the node keeps its last good config until the snapshot changes;
- LDS and CDS are wildcard (every resource) for Envoy; gRPC's own clients name the listeners and clusters
  they want, and a newly named one is answered at once, as for RDS, EDS and SDS, which are always by name;
- a node that reconnects with the versions it holds is sent nothing until something changes;
- after a snapshot change, types go out in `PUSH_ORDER` (clusters before endpoints, listeners before
  routes), as Envoy warms them.

Who may ask: the stream's client certificate must pass the peer policy, and the node's `node.id` must be
that certificate's SPIFFE ID; the node receives only its own node group's snapshot (`group_of`). The
status of a node is kept per identity and group (`node_key`): a service's sidecar and its gRPC processes
share the identity but not the group.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from aivo_mesh.pki.peer import PeerPolicy, PeerRefused
from aivo_mesh.server.authz import peer_identity
from aivo_mesh.xds.cache import CLUSTER, ENDPOINT, LISTENER, NAMED_TYPES, PUSH_ORDER, ROUTE, SnapshotCache, type_name

log = logging.getLogger(__name__)

# A pushed parent type -> the type its changed resources wait on while they warm.
WARMS = {CLUSTER: ENDPOINT, LISTENER: ROUTE}

GroupOf = Callable[[Any], str | None]  # node (envoy.config.core.v3.Node) -> its node group, or None


def node_key(node_id: str, group: str) -> str:
    """Where `AdsServer.nodes` keeps a node: its id; for a group of another plane than the sidecars'
    (`<service>/<plane>`, xds/proxyless.py) its id and group, so that plane's nodes never replace the
    status of the sidecar that has the same identity."""
    return node_id if "/" not in group else f"{node_id} {group}"


@dataclass
class TypeStatus:
    """One node's view of one type, for `meshctl status` and `meshctl apply`."""

    acked: str = ""  # the version the node ACKed last
    sent: str = ""  # the version sent last
    nack_version: str = ""  # the version the node refused last, and why
    nack_error: str = ""
    nack_at: float = 0.0


@dataclass
class NodeStatus:
    """One node (an identity in a group) by its streams' account. A node usually has one stream, whose view
    is `types` and outlives it (a reconnecting node resumes it). gRPC opens one stream per target channel,
    and a service may run several processes: each further stream keeps its own view (`more`), and `view`
    merges them, so that one stream's NACK is not hidden by another's ACK."""

    node_id: str
    group: str
    connected: int = 0  # open streams
    peer: str = ""
    types: dict[str, TypeStatus] = field(default_factory=dict)
    last_seen: float = 0.0
    types_open: bool = False  # an open stream is keeping `types`
    more: list[dict[str, TypeStatus]] = field(default_factory=list)  # the other open streams' views

    def open_view(self) -> dict[str, TypeStatus]:
        """The view a new stream keeps: `types` unless another open stream keeps it."""
        if not self.types_open:
            self.types_open = True
            return self.types
        self.more.append({})
        return self.more[-1]

    def close_view(self, view: dict[str, TypeStatus]) -> None:
        if view is self.types:
            self.types_open = False
        else:
            self.more = [v for v in self.more if v is not view]

    def view(self) -> dict[str, TypeStatus]:
        """Per type, what every open stream holds: a version all of them ACKed (else ""), the latest NACK."""
        if not self.more:
            return self.types
        views = [*([self.types] if self.types_open else []), *self.more]
        out: dict[str, TypeStatus] = {}
        for t in sorted({t for v in views for t in v}):
            have = [v[t] for v in views if t in v]
            acked, sent = {s.acked for s in have}, {s.sent for s in have}
            nack = max(have, key=lambda s: s.nack_at)
            out[t] = TypeStatus(acked=acked.pop() if len(acked) == 1 else "", sent=sent.pop() if len(sent) == 1 else "",
                                nack_version=nack.nack_version, nack_error=nack.nack_error, nack_at=nack.nack_at)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node_id, "group": self.group, "connected": self.connected > 0, "peer": self.peer,
                "types": {type_name(t): {"acked": s.acked, "sent": s.sent,
                                         **({"nack": {"version": s.nack_version, "error": s.nack_error}}
                                            if s.nack_version else {})}
                          for t, s in sorted(self.view().items())}}


@dataclass
class _TypeState:
    sent_version: str | None = None
    nonce: str = ""
    names: frozenset[str] = frozenset()
    subscribed: bool = False
    nacked: str | None = None  # a version this stream refused: not sent again
    # The parent of this type was just pushed (CDS for EDS, LDS for RDS): the node warms the changed
    # parents until it hears about their children, and asks again with the version it holds. That next
    # request is answered even though nothing changed (else the cluster warms until Envoy gives up).
    answer_next: bool = False


class XdsEvents:
    """What the server reports (metrics, logs); every method a no-op by default."""

    def pushed(self, group: str, type_url: str, resources: int) -> None: ...

    def acked(self, node: str, group: str, type_url: str, version: str) -> None: ...

    def nacked(self, node: str, group: str, type_url: str, version: str, error: str) -> None: ...

    def connected(self, node: str, group: str, streams: int) -> None:
        """A stream of `node` opened or closed: `streams` are its open ones now."""

    def refused(self, peer: str, reason: str) -> None: ...


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, cache: SnapshotCache, group_of: GroupOf, policy: PeerPolicy, *,
                 events: XdsEvents | None = None, require_identity: bool = True) -> None:
        self.cache = cache
        self.group_of = group_of
        self.policy = policy
        self.events = events or XdsEvents()
        self.require_identity = require_identity
        self.nodes: dict[str, NodeStatus] = {}  # by node_key
        self._nonces = itertools.count(1)
        self._nonce_prefix = os.urandom(4).hex()
        self._acked = asyncio.Condition()

    # -- identity ---------------------------------------------------------------------------------
    def _authenticate(self, node: Any, context: grpc.aio.ServicerContext) -> str:
        """The node's group, or abort: the certificate must pass the policy and name the node."""
        if self.require_identity:
            try:
                identity = peer_identity(context.auth_context(), self.policy)
            except PeerRefused as exc:
                self.events.refused(context.peer(), str(exc.rule))
                raise _Refuse(grpc.StatusCode.UNAUTHENTICATED, f"client certificate refused: {exc}") from None
            if identity is None:
                self.events.refused(context.peer(), "no_client_certificate")
                raise _Refuse(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
            if node.id != identity:
                self.events.refused(context.peer(), "node_id")
                raise _Refuse(grpc.StatusCode.PERMISSION_DENIED,
                              f"node.id {node.id!r} is not this certificate's identity {identity}")
        group = self.group_of(node)
        if group is None:
            raise _Refuse(grpc.StatusCode.PERMISSION_DENIED, f"node {node.id!r} belongs to no node group")
        return group

    # -- the stream -------------------------------------------------------------------------------
    async def StreamAggregatedResources(self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
                                        context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        out: asyncio.Queue[discovery_pb2.DiscoveryResponse | BaseException | None] = asyncio.Queue()
        stream = _Stream(self, context, out)
        reader = asyncio.get_running_loop().create_task(stream.read(request_iterator))
        try:
            while True:
                item = await out.get()
                if item is None:
                    return
                if isinstance(item, _Refuse):
                    await context.abort(item.code, item.details)
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            reader.cancel()
            stream.close()

    async def DeltaAggregatedResources(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "aivo-mesh serves state-of-the-world ADS only")

    # -- for operators and `meshctl apply` ----------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        return [n.as_dict() for n in sorted(self.nodes.values(), key=lambda n: (n.node_id, n.group))]

    def _node(self, node_id: str, group: str) -> NodeStatus:
        key = node_key(node_id, group)
        status = self.nodes.get(key)
        if status is None or status.group != group:
            status = self.nodes[key] = NodeStatus(node_id, group)
        return status

    async def _note_reply(self) -> None:
        async with self._acked:
            self._acked.notify_all()

    async def wait_settled(self, timeout: float) -> dict[str, str]:
        """Until every connected node has ACKed or NACKed the current snapshot of its group (bounded):
        {node_key: "acked" | "nacked: <error>" | "pending"} (`nodes[node_key]` says which node and group)."""
        deadline = time.monotonic() + timeout

        def verdicts() -> dict[str, str]:
            out: dict[str, str] = {}
            for key, node in self.nodes.items():
                if node.connected <= 0:
                    continue
                snap = self.cache.get(node.group)
                if snap is None:
                    out[key] = "pending"
                    continue
                verdict = "acked"
                for t, ts in node.view().items():
                    want = snap.versions.get(t)
                    if want is None or ts.acked == want:
                        continue
                    if ts.nack_version == want:
                        verdict = f"nacked: {ts.nack_error}"
                        break
                    verdict = "pending"
                out[key] = verdict
            return out

        async with self._acked:
            while True:
                v = verdicts()
                left = deadline - time.monotonic()
                if all(s != "pending" for s in v.values()) or left <= 0:
                    return v
                try:
                    await asyncio.wait_for(self._acked.wait(), left)
                except TimeoutError:
                    return verdicts()


class _Refuse(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details
        super().__init__(details)


class _Stream:
    def __init__(self, server: AdsServer, context: grpc.aio.ServicerContext,
                 out: asyncio.Queue[discovery_pb2.DiscoveryResponse | BaseException | None]) -> None:
        self.server = server
        self.context = context
        self.out = out
        self.types: dict[str, _TypeState] = {}
        self.group: str | None = None
        self.node: NodeStatus | None = None
        self.status: dict[str, TypeStatus] = {}  # this stream's view of its node (NodeStatus.open_view)
        self.watcher: asyncio.Task[None] | None = None

    async def read(self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest]) -> None:
        try:
            async for req in requests:
                if self.group is None:
                    self.group = self.server._authenticate(req.node, self.context)
                    self.node = self.server._node(req.node.id, self.group)
                    self.status = self.node.open_view()
                    self.node.connected += 1
                    self.node.peer = self.context.peer()
                    self.server.events.connected(self.node.node_id, self.node.group, self.node.connected)
                    self.watcher = asyncio.get_running_loop().create_task(
                        self.watch(self.server.cache.generation(self.group)))
                await self.handle(req)
            self.out.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.out.put_nowait(exc)

    async def handle(self, req: discovery_pb2.DiscoveryRequest) -> None:
        assert self.node is not None
        t = req.type_url
        ts = self.types.setdefault(t, _TypeState())
        status = self.status.setdefault(t, TypeStatus())
        self.node.last_seen = time.time()
        log.debug("%s asks %s version=%r nonce=%r names=%s error=%s", self.node.node_id, type_name(t),
                  req.version_info, req.response_nonce, list(req.resource_names), req.HasField("error_detail"))
        if req.response_nonce:
            if req.response_nonce != ts.nonce:
                return  # stale: an answer to a response this stream has since replaced
            if req.HasField("error_detail"):
                ts.nacked = ts.sent_version
                status.nack_version, status.nack_error, status.nack_at = (
                    ts.sent_version or "", req.error_detail.message, time.time())
                self.server.events.nacked(self.node.node_id, self.node.group, t, ts.sent_version or "",
                                          req.error_detail.message)
                log.warning("%s refused %s version %s: %s", self.node.node_id, type_name(t), ts.sent_version,
                            req.error_detail.message)
            else:
                status.acked = req.version_info
                self.server.events.acked(self.node.node_id, self.node.group, t, req.version_info)
            await self.server._note_reply()
        elif req.version_info and ts.sent_version is None:
            # A node that reconnects says what it holds, names included: nothing to send until that changes.
            ts.sent_version = req.version_info
            status.acked = req.version_info
            ts.names = frozenset(req.resource_names) - {"*"}
        names = frozenset(req.resource_names) - {"*"}
        new_names = names - ts.names
        ts.names = names
        ts.subscribed = True
        warming = ts.answer_next and not req.HasField("error_detail")
        # A newly named resource of any type (gRPC names its listeners and clusters too) is answered now.
        self.send(t, force=bool(new_names) or (warming and t in NAMED_TYPES))

    def send(self, t: str, force: bool = False) -> None:
        assert self.group is not None and self.node is not None
        snap = self.server.cache.get(self.group)
        ts = self.types.get(t)
        if snap is None or ts is None or not ts.subscribed:
            return
        version = snap.versions.get(t, "")
        if not force and (version == ts.sent_version or version == ts.nacked):
            return
        available = snap.get(t)
        if t in NAMED_TYPES:
            if not ts.names:
                return
            chosen = [available[n] for n in sorted(ts.names) if n in available]
        elif ts.names:  # gRPC clients name even their listeners and clusters
            chosen = [available[n] for n in sorted(ts.names) if n in available]
        else:
            chosen = [available[n] for n in sorted(available)]
        packed = []
        for r in chosen:
            a = any_pb2.Any()
            a.Pack(r)
            packed.append(a)
        ts.sent_version = version
        ts.answer_next = False
        if (child := WARMS.get(t)) is not None and (child_state := self.types.get(child)) is not None:
            child_state.answer_next = True
        ts.nonce = f"{self.server._nonce_prefix}-{next(self.server._nonces)}"
        self.status.setdefault(t, TypeStatus()).sent = version
        log.debug("%s sent %s version=%s nonce=%s (%d resources)", self.node.node_id, type_name(t), version,
                  ts.nonce, len(packed))
        self.out.put_nowait(discovery_pb2.DiscoveryResponse(version_info=version, resources=packed, type_url=t,
                                                            nonce=ts.nonce))
        self.server.events.pushed(self.group, t, len(packed))

    async def watch(self, generation: int) -> None:
        assert self.group is not None
        while True:
            generation = await self.server.cache.newer_than(self.group, generation)
            for t in PUSH_ORDER:
                self.send(t)

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
        if self.node is not None:
            self.node.close_view(self.status)
            self.node.connected -= 1
            self.server.events.connected(self.node.node_id, self.node.group, self.node.connected)
