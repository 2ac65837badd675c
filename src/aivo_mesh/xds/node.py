"""A proxyless process on the control plane: one ADS stream for the process, its resources decoded and
handed to what applies them (MeshClient's targets, MeshServer's allow rules).

    node = ProxylessNode(mesh, "learner-svc", "127.0.0.1:15010", cert=..., key=..., ca=...,
                         apply=apply_to(client, server))
    node.start()
    await node.wait_applied(5.0)     # bounded: until then, mesh.yaml's policies are in force
    ...
    await node.stop()

The node is the service's SPIFFE ID (the control plane checks it against the certificate) on the
proxyless plane (`aivo.plane: proxyless` in its metadata), so it receives the `<service>/proxyless` node
group: an API listener, routes, cluster and assignment per peer it may call, and its own server's
listener, with its allow rules and faults (xds/proxyless.py). Each type is checked as it arrives (a
resource this process cannot read is NACKed with the reason, nothing of it applied) and a complete set
is decoded (xds/policies.py) and applied as one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from envoy.config.core.v3 import base_pb2
from google.protobuf.message import Message

from aivo_mesh.config.model import MeshSpec
from aivo_mesh.pki import PeerPolicy, load_identity
from aivo_mesh.render.envoy import cluster_service
from aivo_mesh.xds.cache import CLUSTER, ENDPOINT, LISTENER, ROUTE
from aivo_mesh.xds.groups import PLANE_KEY, PROXYLESS
from aivo_mesh.xds.policies import PolicyError, ProxylessConfig, decode_config, decode_endpoints, decode_service
from aivo_mesh.xds.subscriber import Resources, Subscription

if TYPE_CHECKING:
    from aivo_mesh.client import MeshClient
    from aivo_mesh.server import MeshServer

log = logging.getLogger(__name__)


def apply_to(client: MeshClient, server: MeshServer | None = None) -> Callable[[ProxylessConfig], None]:
    """What a proxyless process does with each configuration: its peers' policies, routes and endpoints
    to its client (`MeshClient.apply_control_plane`), its own allow rules, rate limits and faults to its
    server (`MeshServer.set_allow_rules`, `MeshServer.set_rate_limits`: buckets whose limit is unchanged keep
    their tokens; `MeshServer.set_faults`). Both on the event loop the node runs on."""

    def apply(config: ProxylessConfig) -> None:
        client.apply_control_plane(config.targets)
        if server is not None and config.allow is not None:
            server.set_allow_rules(config.allow)
        if server is not None and config.rate_limits is not None:
            server.set_rate_limits(config.rate_limits)
        if server is not None and config.faults is not None:
            server.set_faults(config.faults)

    return apply


class ProxylessNode:
    def __init__(self, mesh: MeshSpec, service: str, control_plane: str, *, cert: str | Path, key: str | Path,
                 ca: str | Path, apply: Callable[[ProxylessConfig], None]) -> None:
        """`control_plane`: its ADS address (host:port). The identity files are the service's own (checked
        here: a bad one fails now, naming the file)."""
        from aivo_mesh.client.channel import channel_credentials
        from aivo_mesh.client.server_check import ServerCheck
        from aivo_mesh.policy.events import NOOP

        self.mesh = mesh
        self.service = service
        self.config: ProxylessConfig | None = None  # the last applied
        identity = load_identity(cert, key, ca, expect_spiffe_id=mesh.spiffe_id(service), roles=("client",))
        node = base_pb2.Node(id=mesh.spiffe_id(service), cluster=service)
        node.metadata.update({PLANE_KEY: PROXYLESS, "aivo.service": service})
        cp = mesh.control_plane.identity
        policy = PeerPolicy.from_mesh(mesh)

        def server_check(channel_for: Callable[[str], Any]) -> ServerCheck:
            # The control plane's certificate, as strictly as any server's: its own SPIFFE ID.
            return ServerCheck("control-plane", mesh.spiffe_id(cp), policy, NOOP, channel_for, lambda _: None)

        self._apply = apply
        self.subscription = Subscription(
            control_plane, channel_credentials(identity), node, check=self._check, apply=self._apply_resources,
            # TLS checks the control plane under its identity's DNS name while we dial an address.
            options=[("grpc.default_authority", cp)], server_check=server_check)

    def start(self) -> None:
        self.subscription.start()

    async def stop(self) -> None:
        await self.subscription.stop()

    async def wait_applied(self, timeout: float) -> bool:
        return await self.subscription.wait_applied(timeout)

    def status(self) -> dict[str, object]:
        return {"node": self.mesh.spiffe_id(self.service), "plane": PROXYLESS, **self.subscription.status()}

    def _check(self, type_url: str, resources: Mapping[str, Message]) -> None:
        """What can be read of one type alone, read before it is ACKed."""
        if type_url == CLUSTER:
            for name, cluster in resources.items():
                try:
                    spec = self.mesh.service(cluster_service(name))  # a canary version's: its service's
                except KeyError:
                    raise PolicyError(f"cluster {name}: not a service of this mesh") from None
                decode_service(spec, cluster)
        elif type_url == ENDPOINT:
            for cla in resources.values():
                decode_endpoints(cla)
        elif type_url not in (LISTENER, ROUTE):
            raise PolicyError(f"a type this node does not take: {type_url}")

    def _apply_resources(self, resources: Resources) -> None:
        config = decode_config(self.mesh, resources)
        self._apply(config)
        self.config = config
        log.info("control plane configuration applied", extra={
            "service": self.service, "peers": sorted(config.targets),
            "versions": {k: v["version"] for k, v in self.subscription.status()["types"].items()}})  # type: ignore[attr-defined]
