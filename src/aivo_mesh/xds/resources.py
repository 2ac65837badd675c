"""The typed xDS resources of one sidecar, from the same renderer as the static bootstraps.

`render/envoy.py` describes a sidecar once (`bootstrap`). For a sidecar on the control plane that
description is split, and every part parsed into its typed message (so a field that is not Envoy's fails
here, not in a proxy):

    listeners   as rendered, each HttpConnectionManager's route configuration moved to RDS
    routes      those route configurations
    clusters    peer clusters take their endpoints from EDS; local_app as rendered
    endpoints   one ClusterLoadAssignment per peer, from discovery (mesh.yaml's addresses by default)
    secrets     `mesh_ca`: what the sidecar trusts (the bundle, the vetted keys) travels over ADS; the
                sidecar's own certificate and key never do (file SDS on the node, as before)

`ads_bootstrap` is what such a sidecar starts with: its node identity, its admin listener, the node-local
helper clusters (collector, statsd, admin) and the ADS cluster, mTLS to the control plane's identity.
"""

from __future__ import annotations

import copy
import functools
import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from aivo_mesh.config.model import MeshSpec
from aivo_mesh.discovery.snapshot import Endpoint
from aivo_mesh.render.envoy import (
    HELPER_CLUSTERS,
    LOCAL_APP_CLUSTER,
    SDS_CA,
    XDS_CLUSTER,
    EnvoyProfile,
    bootstrap,
    validation_secret,
)
from aivo_mesh.xds.cache import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, Snapshot

ADS = {"ads": {}, "resource_api_version": "V3"}
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
    """A rendered resource as its typed message; ValueError (json_format.ParseError) names the field."""
    message = _types()[type_url]()
    json_format.ParseDict(dict(doc), message)
    return message


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


def _to_ads(node: Any) -> Any:
    """The rendered configuration with the trust (`mesh_ca`) taken over ADS instead of from a file."""
    if isinstance(node, dict):
        out = {k: _to_ads(v) for k, v in node.items()}
        ref = out.get("validation_context_sds_secret_config")
        if isinstance(ref, dict) and ref.get("name") == SDS_CA:
            out["validation_context_sds_secret_config"] = {"name": SDS_CA, "sds_config": dict(ADS)}
        return out
    if isinstance(node, list):
        return [_to_ads(v) for v in node]
    return node


def _split_routes(listener: dict[str, Any], routes: list[dict[str, Any]]) -> dict[str, Any]:
    for chain in listener.get("filter_chains", []):
        for f in chain.get("filters", []):
            cfg = f.get("typed_config", {})
            if cfg.get("@type") == HCM and "route_config" in cfg:
                rc = cfg.pop("route_config")
                routes.append(rc)
                cfg["rds"] = {"route_config_name": rc["name"], "config_source": dict(ADS)}
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


def sidecar_snapshot(mesh: MeshSpec, service: str, profile: EnvoyProfile, trust: Trust,
                     endpoints: Endpoints | None = None) -> Snapshot:
    """Every resource `service`'s sidecar takes over ADS. `endpoints`: each peer's addresses from
    discovery; a peer missing from it keeps the address the renderer gives (mesh.yaml)."""
    static = _to_ads(copy.deepcopy(bootstrap(mesh, service, profile)))["static_resources"]
    route_docs: list[dict[str, Any]] = []
    listeners = [_split_routes(doc, route_docs) for doc in static["listeners"]]
    clusters, assignments = [], []
    for doc in static["clusters"]:
        if doc["name"] in _STATIC_HELPERS:
            continue  # node-local plumbing, in the bootstrap
        if doc["name"] != LOCAL_APP_CLUSTER and "load_assignment" in doc:
            cla = doc.pop("load_assignment")
            if endpoints is not None and doc["name"] in endpoints:
                cla = load_assignment(doc["name"], endpoints[doc["name"]])
            doc.pop("dns_lookup_family", None)
            doc.pop("respect_dns_ttl", None)
            doc["type"] = "EDS"
            doc["eds_cluster_config"] = {"eds_config": dict(ADS)}
            # An instance discovery dropped stops taking calls now, not once it fails health checks.
            doc["ignore_health_on_host_removal"] = True
            assignments.append(cla)
        clusters.append(doc)
    return Snapshot.of({
        LISTENER: [typed(LISTENER, d) for d in listeners],
        ROUTE: [typed(ROUTE, d) for d in route_docs],
        CLUSTER: [typed(CLUSTER, d) for d in clusters],
        ENDPOINT: [typed(ENDPOINT, d) for d in assignments],
        SECRET: [mesh_ca_secret(trust)],
    })


def ads_bootstrap(mesh: MeshSpec, service: str, profile: EnvoyProfile, control_plane: tuple[str, int],
                  ca_file: str, cert_sds_file: str) -> dict[str, Any]:
    """The bootstrap of a sidecar on the control plane: node identity, admin, node-local helper clusters,
    and the ADS cluster (mTLS, TLS 1.3, the control plane's SPIFFE ID, trusting `ca_file`; its own
    certificate through the file SDS at `cert_sds_file`). Parsed as a typed Bootstrap before it is
    returned."""
    static = bootstrap(mesh, service, profile)
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
            "cds_config": dict(ADS),
            "lds_config": dict(ADS),
        },
    }
    for key in ("stats_sinks",):
        if key in static:
            doc[key] = static[key]
    typed("bootstrap", doc)  # fails here, naming the field, if Envoy would refuse it
    return doc
