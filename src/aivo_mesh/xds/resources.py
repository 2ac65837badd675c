"""The typed xDS resources of one sidecar, from the same renderer as the static bootstraps.

`render/envoy.py` describes a sidecar once (`bootstrap`). For a sidecar on the control plane that
description is split, and every part parsed into its typed message (so a field that is not Envoy's fails
here, not in a proxy):

    listeners   as rendered, each HttpConnectionManager's route configuration moved to RDS
    routes      those route configurations
    clusters    peer clusters take their endpoints from EDS; local_app as rendered; a canary peer has
                one cluster per version (`learner-svc.v2`), as rendered
    endpoints   one ClusterLoadAssignment per peer cluster, from discovery (mesh.yaml's addresses by
                default); a version's cluster gets the instances of that version
    secrets     `mesh_ca`: what the sidecar trusts (the bundle, the vetted keys) travels over ADS; the
                sidecar's own certificate and key never do (file SDS on the node, as before)

What is the same for every caller of a peer (its routes, its assignment, its cluster but the transport
socket, which names the caller's own certificate) is built and parsed once per build (`mesh_snapshots`)
and shared by the snapshots of all its callers, as is `mesh_ca`: a message in a snapshot is never changed
(xds/cache.py). What differs from one sidecar (or peer) to the next is rendered for each, as the static
bootstraps are, and parsed through the build's `ParseMemo` (xds/parse.py): every sidecar's inbound
listener, say, differs from the first one's in a few values (names, ports, paths, the callers it allows),
so it is that first message with those fields set, byte for byte what parsing it would give.

`ads_bootstrap` is what such a sidecar starts with: its node identity, its admin listener, the node-local
helper clusters (collector, statsd, admin) and the ADS cluster, mTLS to the control plane's identity.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from aivo_mesh.config.model import MeshSpec
from aivo_mesh.config.ports import Kind
from aivo_mesh.discovery.snapshot import Endpoint
from aivo_mesh.gcpause import paused_gc
from aivo_mesh.render.envoy import (
    HELPER_CLUSTERS,
    LOCAL_APP_CLUSTER,
    OUTBOUND_ROUTES,
    XDS_CLUSTER,
    EnvoyProfile,
    ads_source,
    bootstrap,
    callable_peers,
    canary_versions,
    outbound_route_config,
    peer_cluster_policy,
    peer_routes,
    peer_tls,
    validation_secret,
)
from aivo_mesh.xds.cache import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SECRET,
    InconsistentSnapshot,
    Snapshot,
    resource_name,
)
from aivo_mesh.xds.parse import ParseMemo, parse

# The helper clusters a sidecar keeps in its bootstrap (admin, OTLP, statsd) rather than taking over CDS.
_STATIC_HELPERS = HELPER_CLUSTERS - {LOCAL_APP_CLUSTER, XDS_CLUSTER}
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"

@functools.cache
def _types() -> dict[str, type[Message]]:
    """The resource classes, after loading every Envoy v3 message into the descriptor pool: the rendered
    configuration packs extensions into Any fields (filters, retry predicates, transport sockets...), and
    json_format resolves them by name. About 0.3 s, once per process."""
    import pkgutil

    import envoy

    for mod in pkgutil.walk_packages(envoy.__path__, "envoy."):
        if mod.name.endswith("_pb2") and ".v3." in mod.name and ".service." not in mod.name:
            importlib.import_module(mod.name)
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_pb2
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

    return {LISTENER: listener_pb2.Listener, ROUTE: route_pb2.RouteConfiguration, CLUSTER: cluster_pb2.Cluster,
            ENDPOINT: endpoint_pb2.ClusterLoadAssignment, SECRET: secret_pb2.Secret,
            "bootstrap": bootstrap_pb2.Bootstrap}


def typed(type_url: str, doc: Mapping[str, Any]) -> Message:
    """A rendered resource as its typed message, as json_format.ParseDict reads it, every Any packed
    deterministically (xds/parse.py); ValueError (json_format.ParseError) names the field."""
    return parse(doc, _types()[type_url])


def as_dict(message: Message) -> dict[str, Any]:
    """A typed resource back as the plain data a YAML or JSON file holds (field names as in the API)."""
    return dict(json_format.MessageToDict(message, preserving_proto_field_name=True))


@dataclass(frozen=True)
class Trust:
    """What a sidecar trusts, as the control plane sends it (`mesh_ca`): the CA bundle itself (PEM), the
    keys the peer policy vetted (empty: every key the bundle signs), revoked serials as a CRL (PEM)."""

    bundle_pem: bytes
    spki_pins: tuple[str, ...] = ()
    crl_pem: bytes | None = None


def mesh_ca_secret(trust: Trust) -> Message:
    doc = validation_secret("", "", spki_pins=trust.spki_pins)["resources"][0]
    context = doc["validation_context"]
    context.pop("watched_directory", None)
    context["trusted_ca"] = {"inline_bytes": _b64(trust.bundle_pem)}
    if trust.crl_pem is not None:
        context["crl"] = {"inline_bytes": _b64(trust.crl_pem)}
        context["only_verify_leaf_cert_crl"] = True
    doc = {k: v for k, v in doc.items() if k != "@type"}
    return typed(SECRET, doc)


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def _split_routes(listener: dict[str, Any], routes: list[dict[str, Any]]) -> dict[str, Any]:
    for chain in listener.get("filter_chains", []):
        for f in chain.get("filters", []):
            cfg = f.get("typed_config", {})
            if cfg.get("@type") == HCM and "route_config" in cfg:
                rc = cfg.pop("route_config")
                routes.append(rc)
                cfg["rds"] = {"route_config_name": rc["name"], "config_source": ads_source()}
    return listener


# Each peer's instances from discovery: address, weight and health (Consul's checks, or healthy).
Endpoints = Mapping[str, Sequence[Endpoint]]


def load_assignment(cluster: str, endpoints: Sequence[Endpoint]) -> dict[str, Any]:
    """A ClusterLoadAssignment of discovered instances: an unhealthy one stays listed as UNHEALTHY (Envoy
    sends it nothing, and `meshctl status` shows why), weights as the source reports them."""
    return {"cluster_name": cluster, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": e.host, "port_value": e.port}}},
         "health_status": "HEALTHY" if e.healthy else "UNHEALTHY", "load_balancing_weight": max(1, e.weight)}
        for e in endpoints]}]}


ProfileFor = Callable[[MeshSpec, str], EnvoyProfile]


def mesh_snapshots(mesh: MeshSpec, profile_for: ProfileFor, trust: Trust,
                   endpoints: Endpoints | None = None) -> dict[str, Snapshot]:
    """Every sidecar's snapshot (`sidecar_snapshot`; each sidecar's profile from `profile_for`), each
    checked: InconsistentSnapshot for the first with problems (`Snapshot.problems`), so a mesh that does not
    build gives nothing. What the callers of a peer share is built once for all of them."""
    with paused_gc():  # a whole mesh's messages and data at once (aivo_mesh/gcpause.py)
        shared = _Shared(mesh, trust, endpoints)
        snapshots = {name: _snapshot(shared, name, profile_for(mesh, name)) for name in mesh.service_names}
        for name, snap in snapshots.items():
            if problems := snap.problems():
                raise InconsistentSnapshot(name, problems)
    return snapshots


def sidecar_snapshot(mesh: MeshSpec, service: str, profile: EnvoyProfile, trust: Trust,
                     endpoints: Endpoints | None = None) -> Snapshot:
    """Every resource `service`'s sidecar takes over ADS. `endpoints`: each peer's instances from
    discovery; a peer missing from it keeps the address the renderer gives (mesh.yaml)."""
    return _snapshot(_Shared(mesh, trust, endpoints), service, profile)


class _Shared:
    """The parts of a build that are the same for every sidecar (`mesh_ca`) or for every caller of a peer,
    typed once when first asked for and then handed to each: never changed (xds/cache.py)."""

    def __init__(self, mesh: MeshSpec, trust: Trust, endpoints: Endpoints | None) -> None:
        self.mesh, self.trust, self.endpoints = mesh, trust, endpoints
        self._secret: Message | None = None
        self._peers: dict[tuple[str, Kind, str | None], tuple[Message, Message]] = {}
        self._routes: dict[str, Message] = {}
        self.memo = ParseMemo()

    def typed(self, type_url: str, doc: Mapping[str, Any], like: str) -> Message:
        """`typed`, for a document much like the others of its kind (`like`) in this build: every
        sidecar's listener of one name, every peer's cluster... (`ParseMemo`: the same message)."""
        return self.memo.parse(doc, _types()[type_url], (type_url, like))

    def secret(self) -> Message:
        if self._secret is None:
            self._secret = mesh_ca_secret(self.trust)
        return self._secret

    def peer(self, name: str, kind: Kind, version: str | None = None) -> tuple[Message, Message]:
        """Peer `name`'s cluster (of one canary `version`, if given) but its transport socket
        (`peer_cluster_policy`), taking its endpoints from EDS, and its assignment: discovery's instances
        (of that version: `Endpoint.version_or` the peer's own), else the addresses the renderer gives."""
        found = self._peers.get((name, kind, version))
        if found is None:
            doc = peer_cluster_policy(self.mesh, name, kind, version)
            assignment = doc.pop("load_assignment")
            if self.endpoints is not None and name in self.endpoints:
                instances = self.endpoints[name]
                if version is not None:
                    own = self.mesh.service(name).version
                    instances = [e for e in instances if e.version_or(own) == version]
                assignment = load_assignment(doc["name"], instances)
            doc.pop("dns_lookup_family", None)
            doc.pop("respect_dns_ttl", None)
            doc["type"] = "EDS"
            doc["eds_cluster_config"] = {"eds_config": ads_source()}
            # An instance discovery dropped stops taking calls now, not once it fails health checks.
            doc["ignore_health_on_host_removal"] = True
            found = self._peers[(name, kind, version)] = (self.typed(CLUSTER, doc, "peer"),
                                                              self.typed(ENDPOINT, assignment, "peer"))
        return found

    def routes(self, name: str) -> Any:  # a RouteConfiguration
        """Peer `name`'s routes (`peer_routes`), in an outbound route configuration of their own."""
        found = self._routes.get(name)
        if found is None:
            found = self._routes[name] = self.typed(ROUTE, outbound_route_config(peer_routes(self.mesh, name)), "peer")
        return found


class _PeerTls:
    """A sidecar's transport sockets to its peers (`peer_tls`), which differ only in the peer's name (SNI)
    and SPIFFE ID: the caller's is parsed once, and each peer's is a copy with those two set, packed
    deterministically as xds/parse.py packs. A test holds it equal to parsing `peer_tls` itself."""

    def __init__(self, shared: _Shared, peer: str, profile: EnvoyProfile) -> None:
        from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

        doc = peer_tls(shared.mesh, peer, profile)
        self.name = doc["name"]
        self.type_url = doc["typed_config"]["@type"]
        body = {k: v for k, v in doc["typed_config"].items() if k != "@type"}
        self.template = shared.memo.parse(body, tls_pb2.UpstreamTlsContext, "peer tls")  # much as other callers'

        sans = self.template.common_tls_context.combined_validation_context.default_validation_context \
            .match_typed_subject_alt_names
        assert len(sans) == 1 and self.template.sni == peer, "peer_tls changed shape: update _PeerTls"

    def cluster(self, mesh: MeshSpec, peer: str) -> Any:  # a Cluster with only its transport socket set
        from envoy.config.cluster.v3 import cluster_pb2
        from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

        context = tls_pb2.UpstreamTlsContext()
        context.CopyFrom(self.template)
        context.sni = peer
        context.common_tls_context.combined_validation_context.default_validation_context \
            .match_typed_subject_alt_names[0].matcher.exact = mesh.spiffe_id(peer)
        cluster = cluster_pb2.Cluster()
        cluster.transport_socket.name = self.name
        cluster.transport_socket.typed_config.type_url = self.type_url
        cluster.transport_socket.typed_config.value = context.SerializeToString(deterministic=True)
        return cluster


def _snapshot(shared: _Shared, service: str, profile: EnvoyProfile) -> Snapshot:
    mesh = shared.mesh
    if not profile.ca_over_ads:  # the trust (`mesh_ca`) comes over ADS, not from a file
        profile = dataclasses.replace(profile, ca_over_ads=True)
    # Without what each peer's callers share, which comes typed from `shared`; built afresh (bootstrap's
    # promise), so taken apart in place.
    static = bootstrap(mesh, service, profile, with_peers=False)["static_resources"]
    route_docs: list[dict[str, Any]] = []
    listeners = [_split_routes(doc, route_docs) for doc in static["listeners"]]
    routes = [shared.typed(ROUTE, d, d["name"]) for d in route_docs]
    outbound: Any = next(r for r in routes if resource_name(r) == OUTBOUND_ROUTES)
    clusters = [shared.typed(CLUSTER, doc, doc["name"]) for doc in static["clusters"]
                if doc["name"] not in _STATIC_HELPERS]
    assignments = []
    tls: _PeerTls | None = None
    # The peers' routes go before the rendered one, `outbound_refusal`, which answers what none of them takes.
    refusals = [host.routes.pop() for host in outbound.virtual_hosts]
    for peer in callable_peers(mesh, service):
        for version in canary_versions(mesh.service(peer)) or (None,):
            policy, assignment = shared.peer(peer, profile.kind, version)
            if tls is None:
                tls = _PeerTls(shared, peer, profile)
            cluster = tls.cluster(mesh, peer)  # names this sidecar's certificate and the peer's identity
            cluster.MergeFrom(policy)
            clusters.append(cluster)
            assignments.append(assignment)
        # The peer's routes after those of the peers before it, as the rendered configuration lists them.
        for host, more in zip(outbound.virtual_hosts, shared.routes(peer).virtual_hosts, strict=True):
            host.routes.extend(more.routes)
    for host, refusal in zip(outbound.virtual_hosts, refusals, strict=True):
        host.routes.add().CopyFrom(refusal)
    return Snapshot.of({
        LISTENER: [shared.typed(LISTENER, d, d["name"]) for d in listeners],
        ROUTE: routes,
        CLUSTER: clusters,
        ENDPOINT: assignments,
        SECRET: [shared.secret()],
    })


def ads_bootstrap(mesh: MeshSpec, service: str, profile: EnvoyProfile, control_plane: tuple[str, int],
                  ca_file: str, cert_sds_file: str) -> dict[str, Any]:
    """The bootstrap of a sidecar on the control plane: node identity, admin, node-local helper clusters,
    and the ADS cluster (mTLS, TLS 1.3, the control plane's SPIFFE ID, trusting `ca_file`; its own
    certificate through the file SDS at `cert_sds_file`). Parsed as a typed Bootstrap before it is
    returned."""
    static = bootstrap(mesh, service, profile, with_peers=False)
    helpers = [c for c in static["static_resources"]["clusters"] if c["name"] in _STATIC_HELPERS]
    host, port = control_plane
    tls = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": mesh.control_plane.identity,
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
            "tls_certificate_sds_secret_configs": [{"name": "svc_cert", "sds_config": {
                "resource_api_version": "V3", "path_config_source": {"path": cert_sds_file}}}],
            "validation_context": {
                "trusted_ca": {"filename": ca_file},
                "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {
                    "exact": mesh.spiffe_id(mesh.control_plane.identity)}}],
            },
        },
    }
    xds_cluster = {
        "name": XDS_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": XDS_CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls},
    }
    doc: dict[str, Any] = {
        "node": {"id": mesh.spiffe_id(service), "cluster": service,
                 "metadata": {"aivo.plane": "sidecar", "aivo.service": service}},
        "admin": static["admin"],
        "static_resources": {"clusters": [*helpers, xds_cluster]},
        "dynamic_resources": {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3", "set_node_on_first_message_only": True,
                           "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}]},
            "cds_config": ads_source(),
            "lds_config": ads_source(),
        },
    }
    for key in ("stats_sinks",):
        if key in static:
            doc[key] = static[key]
    typed("bootstrap", doc)  # fails here, naming the field, if Envoy would refuse it
    return doc
