"""What gRPC's own xDS client takes from the control plane ("proxyless gRPC"), and its bootstrap.

A process that dials `xds:///auth-svc` with grpc's built-in xDS client (GRPC_XDS_BOOTSTRAP, gRFC A27)
asks the control plane for the listener named `auth-svc`, its route configuration, its cluster and the
cluster's assignment. Such a node says `"aivo.plane": "proxyless"` in its node metadata and belongs to
the node group `<service>/proxyless` (`group_name`), whose snapshot `proxyless_snapshot` builds.

It is cut from the same service's sidecar snapshot (xds/resources.py), so both planes mean the same
mesh.yaml and one piece of code does each job. Per peer the service may call:

    listeners  an API listener named as the target (`auth-svc`): an HttpConnectionManager with only the
               router filter, its routes over RDS (ADS)
    routes     the peer's routes from the sidecar's outbound route configuration, as they are (a canary's
               weighted_clusters included, gRFC A28): match order
               (exact methods, then prefixes, then the service), deadlines as
               max_stream_duration.grpc_timeout_header_max (A31), retry_policy (A44: the five gRPC codes,
               num_retries, retry_back_off; gRPC ignores the rest, per_try_timeout included); each with
               the route's policy as mesh.yaml resolves it in its metadata (xds/policies.py)
    clusters   the peer's sidecar cluster (a canary's: one per version) cut to what gRPC reads: EDS,
               lb_policy, circuit_breakers (max_requests, A32), outlier_detection (A50); mTLS from the
               bootstrap's certificate provider, checking the peer's SPIFFE ID (A29: gRPC does not speak
               SDS); and in the metadata the peer's policies (xds/policies.py), those gRPC does not apply
               among them (retry budget, the consecutive-failure breaker, limits, outlier rule, health
               checks)
    endpoints  the sidecar's assignment (discovery, else mesh.yaml `endpoints`, else the peer's default
               address) in one locality of weight 1: gRPC drops a locality without a weight

and, for the service's own server, a listener named as gRPC's xDS servers name theirs
(`grpc/server?xds.resource.listening_address=<host:port>`) carrying the sidecar's inbound allow rules as an
RBAC HTTP filter (gRFC A41); when mesh.yaml limits the service, the sidecar's inbound rate limits as
they are: the local rate limit HTTP filter, the service's buckets on the virtual host and a route's own on
that route, in the inbound routes' order (render/envoy.py `local_rate_limit`); and, in its metadata, the
service's faults (xds/policies.py). gRPC's clients never ask for it (they name their targets); MeshServer
does.

The metadata is what a MeshClient on the control plane reads (`xds.policies.decode_config`): the same
snapshot serves gRPC's own client and MeshClient. Nothing here imports grpc; `grpc_bootstrap` is plain
data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf.message import Message

from aivo_mesh.config.model import MeshSpec
from aivo_mesh.config.resolve import callable_peers, fault_policies, per_pattern, route_policies, service_policy
from aivo_mesh.render.envoy import (
    INBOUND_LISTENER,
    OUTBOUND_LISTENER,
    RATE_LIMIT_FILTER,
    RBAC_FILTER,
    cluster_service,
    peer_cluster_names,
)
from aivo_mesh.xds.cache import CLUSTER, ENDPOINT, LISTENER, ROUTE, InconsistentSnapshot, Snapshot
from aivo_mesh.xds.groups import PLANE_KEY, PROXYLESS, group_name
from aivo_mesh.xds.policies import (
    SERVER_LISTENER_PREFIX,
    cluster_metadata,
    fault_metadata,
    route_metadata,
    set_metadata,
)
from aivo_mesh.xds.refs import rds_names

# The certificate provider instance the bootstrap defines and every cluster's TLS names (A29).
CERT_PROVIDER = "aivo_mesh"
CERT_REFRESH = 5  # seconds between the file watcher's reads (MeshClient's own reload interval)


def _pack(field: Any, message: Message) -> None:
    """`message` into the Any `field`, serialized deterministically: versions hash the bytes as they are
    (xds/cache.py), so a map inside one (RBAC's policies) must not come out in this process's order."""
    field.Pack(message, deterministic=True)


def is_proxyless(node: Any) -> bool:
    """Whether a node (envoy.config.core.v3.Node) says it is gRPC's own xDS client of the mesh."""
    value = node.metadata.fields.get(PLANE_KEY)
    return value is not None and value.string_value == PROXYLESS


def proxyless_snapshot(mesh: MeshSpec, service: str, sidecar: Snapshot) -> Snapshot:
    """Every resource `service`'s gRPC processes take over ADS, cut from its sidecar snapshot `sidecar`
    (`sidecar_snapshot` of the same mesh and service). Raises InconsistentSnapshot."""
    outbound = _outbound_routes(sidecar)
    listeners: list[Message] = []
    routes: list[Message] = []
    clusters: list[Message] = []
    assignments: list[Message] = []
    for peer in callable_peers(mesh, service):
        listeners.append(_api_listener(peer))
        routes.append(_route_config(mesh, peer, outbound))
        for name in peer_cluster_names(mesh.service(peer)):  # a canary's versions: weighted_clusters (A28)
            clusters.append(_cluster(mesh, peer, sidecar.get(CLUSTER)[name]))
            assignments.append(_assignment(sidecar.get(ENDPOINT)[name]))
    listeners.append(_server_listener(mesh, service, sidecar))
    snap = Snapshot.of({LISTENER: listeners, ROUTE: routes, CLUSTER: clusters, ENDPOINT: assignments})
    if problems := snap.problems():
        raise InconsistentSnapshot(group_name(service), problems)
    return snap


def _outbound_routes(sidecar: Snapshot) -> list[route_pb2.Route]:
    """Every route of the sidecar's outbound listener, in its order (Envoy and gRPC take the first match)."""
    names = dict(rds_names(sidecar.get(LISTENER).values()))[OUTBOUND_LISTENER]
    config = sidecar.get(ROUTE)[names[0]]
    assert isinstance(config, route_pb2.RouteConfiguration)
    return [r for vh in config.virtual_hosts for r in vh.routes]


def server_listener_name(mesh: MeshSpec, service: str) -> str:
    """gRFC A36's default name of the listener of a gRPC server listening at the service's address."""
    svc = mesh.service(service)
    return f"{SERVER_LISTENER_PREFIX}{svc.host}:{svc.port}"


def _server_listener(mesh: MeshSpec, service: str, sidecar: Snapshot) -> listener_pb2.Listener:
    """The service's own server: who may call what, as the sidecar's inbound RBAC says it (gRFC A41's RBAC
    HTTP filter before the router, routes answering with a NonForwardingAction as A36 asks), mTLS from
    the certificate provider (A29), and the faults in its metadata. MeshServer reads the allow rules and
    the faults from it (`xds.policies.decode_config`); a grpc.aio server has no xDS serving of its own."""
    names = dict(rds_names(sidecar.get(LISTENER).values()))[INBOUND_LISTENER]
    inbound = sidecar.get(ROUTE)[names[0]]
    assert isinstance(inbound, route_pb2.RouteConfiguration)
    per_route = inbound.virtual_hosts[0].typed_per_filter_config[RBAC_FILTER]
    override = rbac_filter_pb2.RBACPerRoute()
    if not per_route.Unpack(override):
        raise InconsistentSnapshot(group_name(service), [f"{inbound.name}: no RBAC override on its virtual host"])
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=f"{service}_server")
    vhost = hcm.route_config.virtual_hosts.add(name=service, domains=["*"])
    limited = any(RATE_LIMIT_FILTER in r.typed_per_filter_config for r in inbound.virtual_hosts[0].routes)
    if limited:
        # The inbound routes' matches and rate limits, in their order; the rest of them (deadlines, the
        # app's cluster) is the sidecar's business.
        if RATE_LIMIT_FILTER in inbound.virtual_hosts[0].typed_per_filter_config:
            vhost.typed_per_filter_config[RATE_LIMIT_FILTER].CopyFrom(
                inbound.virtual_hosts[0].typed_per_filter_config[RATE_LIMIT_FILTER])
        for inbound_route in inbound.virtual_hosts[0].routes:
            route = vhost.routes.add(name=inbound_route.name)
            route.match.CopyFrom(inbound_route.match)
            route.non_forwarding_action.SetInParent()
            if RATE_LIMIT_FILTER in inbound_route.typed_per_filter_config:
                route.typed_per_filter_config[RATE_LIMIT_FILTER].CopyFrom(
                    inbound_route.typed_per_filter_config[RATE_LIMIT_FILTER])
    else:
        route = vhost.routes.add()
        route.match.prefix = "/"
        route.non_forwarding_action.SetInParent()
    _pack(hcm.http_filters.add(name=RBAC_FILTER).typed_config, override.rbac)
    if limited:
        _pack(hcm.http_filters.add(name=RATE_LIMIT_FILTER).typed_config,
              local_rate_limit_pb2.LocalRateLimit(stat_prefix=f"{service}_server_rate_limit"))
    _pack(hcm.http_filters.add(name="envoy.filters.http.router").typed_config, router_pb2.Router())
    context = tls_pb2.CommonTlsContext()
    context.tls_certificate_provider_instance.instance_name = CERT_PROVIDER
    context.validation_context.ca_certificate_provider_instance.instance_name = CERT_PROVIDER
    tls = tls_pb2.DownstreamTlsContext(common_tls_context=context)
    tls.require_client_certificate.value = True
    svc = mesh.service(service)
    listener = listener_pb2.Listener(name=server_listener_name(mesh, service))
    set_metadata(listener.metadata, fault_metadata(fault_policies(mesh, service)))
    listener.address.socket_address.address = svc.host
    listener.address.socket_address.port_value = svc.port
    chain = listener.filter_chains.add()
    _pack(chain.filters.add(name="envoy.filters.network.http_connection_manager").typed_config, hcm)
    chain.transport_socket.name = "envoy.transport_sockets.tls"
    _pack(chain.transport_socket.typed_config, tls)
    return listener


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                          resource_api_version=config_source_pb2.V3)


def _api_listener(peer: str) -> listener_pb2.Listener:
    # The router must be the last (here: the only) filter; any other filter gRPC does not know NACKs it.
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=peer)
    hcm.rds.route_config_name = peer
    hcm.rds.config_source.CopyFrom(_ads())
    _pack(hcm.http_filters.add(name="envoy.filters.http.router").typed_config, router_pb2.Router())
    listener = listener_pb2.Listener(name=peer)
    _pack(listener.api_listener.api_listener, hcm)
    return listener


def _route_config(mesh: MeshSpec, peer: str, outbound: list[route_pb2.Route]) -> route_pb2.RouteConfiguration:
    config = route_pb2.RouteConfiguration(name=peer)
    # The listener already names the peer: any authority the channel uses (`xds:///auth-svc`) matches.
    vhost = config.virtual_hosts.add(name=peer, domains=["*"])
    vhost.routes.extend(r for r in outbound if route_service(r) == peer)
    # The sidecar renders one route per pattern, in this order (render/envoy.py): each gets its policy.
    policies = per_pattern(route_policies(mesh, peer))
    assert [r.match.path or r.match.prefix for r in vhost.routes] == [rp.pattern for rp in policies], peer
    for route, rp in zip(vhost.routes, policies, strict=True):
        set_metadata(route.metadata, route_metadata(rp))
    return config


def route_service(route: route_pb2.Route) -> str:
    """The peer a rendered outbound route sends to: its cluster's, or its weighted clusters' (one service's
    versions)."""
    action = route.route
    return cluster_service(action.cluster or (action.weighted_clusters.clusters[0].name
                                              if action.weighted_clusters.clusters else ""))


def _cluster(mesh: MeshSpec, peer: str, sidecar: Message) -> cluster_pb2.Cluster:
    """The sidecar's cluster of `peer` (already on EDS; of one version of it for a canary), cut to what
    gRPC reads, with its own TLS."""
    assert isinstance(sidecar, cluster_pb2.Cluster)
    cluster = cluster_pb2.Cluster(name=sidecar.name, type=sidecar.type, lb_policy=sidecar.lb_policy)
    cluster.eds_cluster_config.CopyFrom(sidecar.eds_cluster_config)
    cluster.circuit_breakers.CopyFrom(sidecar.circuit_breakers)
    # gRPC ejects by success rate or failure percentage only; the consecutive_* fields stay as mesh.yaml
    # means them (and the sidecar reads them) but eject nothing here.
    cluster.outlier_detection.CopyFrom(sidecar.outlier_detection)
    cluster.transport_socket.name = "envoy.transport_sockets.tls"
    _pack(cluster.transport_socket.typed_config, upstream_tls(mesh, peer))
    set_metadata(cluster.metadata, cluster_metadata(service_policy(mesh, peer)))
    return cluster


def upstream_tls(mesh: MeshSpec, peer: str) -> tls_pb2.UpstreamTlsContext:
    """mTLS to `peer` from the bootstrap's certificate provider (A29), trusting only the peer's SPIFFE ID.

    No tls_params (gRPC NACKs them; TLS 1.3 is the servers' to insist on, as MeshServer does), no SPKI
    pins or CRL (NACKed too: a revoked or unpinned peer is the peer's own servers' and the CA's to
    refuse), no SDS (gRPC does not speak it)."""
    context = tls_pb2.CommonTlsContext()
    context.tls_certificate_provider_instance.instance_name = CERT_PROVIDER
    validation = context.validation_context
    validation.ca_certificate_provider_instance.instance_name = CERT_PROVIDER
    validation.match_subject_alt_names.add(exact=mesh.spiffe_id(peer))
    return tls_pb2.UpstreamTlsContext(common_tls_context=context)


def _assignment(sidecar: Message) -> endpoint_pb2.ClusterLoadAssignment:
    assert isinstance(sidecar, endpoint_pb2.ClusterLoadAssignment)
    cla = endpoint_pb2.ClusterLoadAssignment()
    cla.CopyFrom(sidecar)
    for locality in cla.endpoints:
        locality.locality.SetInParent()  # gRPC wants one, even empty
        if not locality.load_balancing_weight.value:
            locality.load_balancing_weight.value = 1
    return cla


def grpc_bootstrap(mesh: MeshSpec, service: str, server_uri: str, *, cert: Path, key: Path,
                   ca: Path) -> dict[str, Any]:
    """A gRPC xDS bootstrap (GRPC_XDS_BOOTSTRAP) for `service`'s processes: the control plane at
    `server_uri` over mTLS ("tls" channel credentials, gRFC A65: the service's certificate, trusting `ca`,
    the control plane's host name checked against its certificate), the node (its SPIFFE ID, which the
    control plane checks against the certificate, and `aivo.plane: proxyless`), and the `file_watcher`
    certificate provider every cluster's mTLS names (A29). Files are named by absolute path and re-read
    every CERT_REFRESH seconds, so a rotation needs no restart."""
    files = {"certificate_file": str(cert.resolve()), "private_key_file": str(key.resolve()),
             "ca_certificate_file": str(ca.resolve()), "refresh_interval": f"{CERT_REFRESH}s"}
    node = {"id": mesh.spiffe_id(service), "cluster": service, "locality": {},
            "metadata": {PLANE_KEY: PROXYLESS, "aivo.service": service}}
    return {
        "xds_servers": [{"server_uri": server_uri, "channel_creds": [{"type": "tls", "config": dict(files)}],
                         "server_features": ["xds_v3"]}],
        "node": node,
        "certificate_providers": {CERT_PROVIDER: {"plugin_name": "file_watcher", "config": dict(files)}},
    }
