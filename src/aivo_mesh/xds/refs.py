"""What typed xDS resources refer to: the names a snapshot's consistency check follows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf.message import Message

HCM_TYPE = "type.googleapis.com/" + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name


def eds_clusters(clusters: Iterable[Message]) -> set[str]:
    """The assignment names the EDS clusters wait for (`service_name`, else the cluster's name)."""
    names: set[str] = set()
    for c in clusters:
        assert isinstance(c, cluster_pb2.Cluster)
        if c.type == cluster_pb2.Cluster.EDS:
            names.add(c.eds_cluster_config.service_name or c.name)
    return names


def _hcms(listener: listener_pb2.Listener) -> Iterator[hcm_pb2.HttpConnectionManager]:
    for chain in listener.filter_chains:
        for f in chain.filters:
            if f.typed_config.type_url == HCM_TYPE:
                hcm = hcm_pb2.HttpConnectionManager()
                f.typed_config.Unpack(hcm)
                yield hcm
    if listener.HasField("api_listener") and listener.api_listener.api_listener.type_url == HCM_TYPE:
        hcm = hcm_pb2.HttpConnectionManager()
        listener.api_listener.api_listener.Unpack(hcm)
        yield hcm


def rds_names(listeners: Iterable[Message]) -> list[tuple[str, list[str]]]:
    """(listener, the route configurations it takes from RDS) per listener."""
    out = []
    for listener in listeners:
        assert isinstance(listener, listener_pb2.Listener)
        out.append((listener.name, [h.rds.route_config_name for h in _hcms(listener) if h.HasField("rds")]))
    return out


def _route_clusters(config: route_pb2.RouteConfiguration) -> set[str]:
    names: set[str] = set()
    for vh in config.virtual_hosts:
        for r in vh.routes:
            if r.HasField("route"):
                if r.route.cluster:
                    names.add(r.route.cluster)
                for w in r.route.weighted_clusters.clusters:
                    names.add(w.name)
    return names


def cluster_refs(resources: Iterable[Message]) -> list[tuple[str, set[str]]]:
    """(resource, the clusters it sends to) for route configurations and for listeners' inline routes."""
    out: list[tuple[str, set[str]]] = []
    for r in resources:
        if isinstance(r, route_pb2.RouteConfiguration):
            out.append((r.name, _route_clusters(r)))
        elif isinstance(r, listener_pb2.Listener):
            names: set[str] = set()
            for hcm in _hcms(r):
                if hcm.HasField("route_config"):
                    names |= _route_clusters(hcm.route_config)
            out.append((r.name, names))
    return out
