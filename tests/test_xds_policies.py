"""The proxyless plane reads back from xDS resources exactly the policies config.resolve gives from mesh.yaml."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2

from aivo_mesh.config.loader import load_mesh, parse_mesh
from aivo_mesh.config.model import MeshSpec
from aivo_mesh.config.resolve import (
    RoutePolicy,
    callable_peers,
    fault_policies,
    per_pattern,
    route_policies,
    service_policy,
)
from aivo_mesh.discovery.snapshot import Endpoint
from aivo_mesh.render.envoy import OUTBOUND_LISTENER, EnvoyProfile, _rbac
from aivo_mesh.server.authz import Authorizer
from aivo_mesh.xds.cache import CLUSTER, ENDPOINT, LISTENER, ROUTE
from aivo_mesh.xds.policies import (
    PolicyError,
    cluster_metadata,
    decode_allow,
    decode_endpoints,
    decode_faults,
    decode_routes,
    decode_service,
    fault_metadata,
    metadata_of,
    route_metadata,
    set_metadata,
)
from aivo_mesh.xds.refs import rds_names
from aivo_mesh.xds.resources import Trust, sidecar_snapshot

ROOT = Path(__file__).resolve().parents[1]

VARIED = """
version: 1
mesh: {name: t, trust_domain: t.local, namespace: ns, clients: [mesh-client]}
defaults:
  timeout: 3s
  retry: {max_retries: 2, retry_on: [UNAVAILABLE, RESOURCE_EXHAUSTED], backoff: {base: 50ms, max: 2s}}
  circuit_breaker: {consecutive_failures: 4, recovery_time: 1m}
services:
  - name: svc-a
    grpc_service: t.A
    port: 7001
    local_port: 7101
    allow: [{from: ["*"]}]
    retry_budget: {percent: 12.5, min_retry_concurrency: 1, window: 30s}
    outlier_detection: {consecutive_failures: 2}
    routes:
      - {match: /t.A/Get, timeout: 700ms, idempotent: true,
         retry: {retry_on: [UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL], per_try_timeout: 200ms}}
      - {match: /t.A/Watch, streaming: true, timeout: 1h}
      - {match: /t.A/Put, retry: {max_retries: 0}}
  - name: svc-b
    grpc_service: t.B
    port: 7002
    local_port: 7102
    allow:
      - {from: [svc-a, mesh-client], methods: [/t.B/One, /t.B/]}
      - {from: [spiffe://t.local/ns/ns/sa/svc-a], methods: [/t.B/Two]}
    circuit_breaker: {mode: failure_rate, failure_rate_threshold: 0.5, window_size: 20, minimum_calls: 5}
    limits: {max_requests: 7, max_pending_requests: 3}
    routes:
      - {match: /t.B/, timeout: 9s}
"""


def meshes() -> list[MeshSpec]:
    return [load_mesh(ROOT / "mesh.yaml"), parse_mesh(VARIED, "varied.yaml")]


Annotated = tuple[dict[str, cluster_pb2.Cluster], dict[str, list[route_components_pb2.Route]],
                  dict[str, Any]]


def _annotated(mesh: MeshSpec, service: str) -> Annotated:
    """A sidecar snapshot's peer clusters and outbound routes, annotated as the proxyless plane's are."""
    snap = sidecar_snapshot(mesh, service, EnvoyProfile.local("/certs", "/sds"), Trust(b"ca"))
    outbound = dict(rds_names(snap.get(LISTENER).values()))
    config = snap.get(ROUTE)[outbound[OUTBOUND_LISTENER][0]]
    assert isinstance(config, route_pb2.RouteConfiguration)
    clusters, routes, assignments = {}, {}, {}
    for peer in callable_peers(mesh, service):
        cluster = cluster_pb2.Cluster()
        cluster.CopyFrom(snap.get(CLUSTER)[peer])
        set_metadata(cluster.metadata, cluster_metadata(service_policy(mesh, peer)))
        clusters[peer] = cluster
        mine = [r for vh in config.virtual_hosts for r in vh.routes if r.route.cluster == peer]
        policies = per_pattern(route_policies(mesh, peer))  # the routes Envoy gets
        assert len(mine) == len(policies)
        for r, rp in zip(mine, policies, strict=True):
            set_metadata(r.metadata, route_metadata(rp))
        routes[peer] = mine
        assignments[peer] = snap.get(ENDPOINT)[peer]
    return clusters, routes, assignments


def _ns(routes: tuple[RoutePolicy, ...]) -> list[RoutePolicy]:
    return [dataclasses.replace(rp, timeout=round(rp.timeout, 9)) for rp in routes]


@pytest.mark.parametrize("mesh", meshes(), ids=["repo", "varied"])
def test_every_peer_policy_reads_back_as_mesh_yaml_resolves_it(mesh: MeshSpec) -> None:
    checked = 0
    for service in mesh.service_names:
        clusters, routes, _ = _annotated(mesh, service)
        for peer in callable_peers(mesh, service):
            policy = decode_service(mesh.service(peer), clusters[peer])
            assert policy == service_policy(mesh, peer)
            # Deadlines travel as Durations (nanoseconds): `0.7s` and `700ms` are one Duration, two floats.
            assert _ns(decode_routes(policy, routes[peer])) == _ns(route_policies(mesh, peer))
            checked += 1
    assert checked >= 2


@pytest.mark.parametrize("mesh", meshes(), ids=["repo", "varied"])
def test_allow_rules_read_back_from_the_rbac_the_sidecars_enforce(mesh: MeshSpec) -> None:
    for service in mesh.service_names:
        rendered = _rbac(mesh, mesh.service(service))["typed_config"]
        rbac = rbac_filter_pb2.RBAC()
        from google.protobuf import json_format

        json_format.ParseDict({k: v for k, v in rendered.items() if k != "@type"}, rbac)
        want = tuple((r.callers, r.methods) for r in Authorizer(mesh, service).rules)
        assert decode_allow(rbac.rules, mesh.mesh.trust_domain) == want


def test_endpoints_read_back_with_weight_and_health() -> None:
    from aivo_mesh.xds.resources import load_assignment, typed

    found = (Endpoint("10.0.0.1", 80, weight=3), Endpoint("10.0.0.2", 81, healthy=False))
    cla = typed(ENDPOINT, load_assignment("b", found))
    assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
    assert decode_endpoints(cla) == found


def test_a_route_without_the_mesh_metadata_is_refused_naming_it() -> None:
    mesh = parse_mesh(VARIED, "varied.yaml")
    route = route_components_pb2.Route(name="svc-b/One")
    route.match.path = "/t.B/One"
    with pytest.raises(PolicyError, match=r"route svc-b/One: no 'aivo\.mesh' metadata"):
        decode_routes(service_policy(mesh, "svc-b"), [route])


def test_a_wrong_value_in_the_metadata_is_refused_naming_the_field() -> None:
    mesh = parse_mesh(VARIED, "varied.yaml")
    clusters, _, _ = _annotated(mesh, "svc-a")
    cluster = clusters["svc-b"]
    cluster.metadata.filter_metadata["aivo.mesh"]["circuit_breaker"]["consecutive_failures"] = -1
    with pytest.raises(PolicyError, match="cluster svc-b: CircuitBreakerSpec consecutive_failures"):
        decode_service(mesh.service("svc-b"), cluster)


def test_a_catch_all_must_come_last() -> None:
    mesh = parse_mesh(VARIED, "varied.yaml")
    _, routes, _ = _annotated(mesh, "svc-b")
    reordered = [routes["svc-a"][-1], *routes["svc-a"][:-1]]
    with pytest.raises(PolicyError, match="catch-all route must come last"):
        decode_routes(service_policy(mesh, "svc-a"), reordered)


def test_an_rbac_that_is_not_the_mesh_s_is_refused() -> None:
    rbac = rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY)
    with pytest.raises(PolicyError, match="ALLOW"):
        decode_allow(rbac, "t.local")


def test_faults_read_back_from_the_server_listeners_metadata_and_a_wrong_one_is_refused() -> None:
    text = (ROOT / "mesh.yaml").read_text().replace(
        "    routes:\n      - match: /aivo.auth.v1.AuthService/ValidateToken\n",
        "    fault: {delay: 250ms, delay_percent: 12.5, callers: [learner-svc, '*']}\n"
        "    routes:\n      - match: /aivo.auth.v1.AuthService/ValidateToken\n"
        "        fault: {abort_status: INTERNAL, abort_percent: 100,"
        " callers: [spiffe://aivo.local/ns/default/sa/x]}\n", 1)
    policies = fault_policies(parse_mesh(text, "mesh.yaml"), "auth-svc")
    assert [p.callers for p in policies] == [("spiffe://aivo.local/ns/default/sa/x",), None]  # '*': everyone
    metadata = base_pb2.Metadata()
    set_metadata(metadata, fault_metadata(policies))
    assert decode_faults(metadata_of(metadata, "listener x"), "listener x") == policies
    wrong = fault_metadata(policies)
    wrong["faults"][0]["fault"]["abort_percent"] = 101
    with pytest.raises(PolicyError, match=r"listener x faults\[0\]: FaultSpec abort_percent"):
        decode_faults(wrong, "listener x")
    with pytest.raises(PolicyError, match="expected a list under 'faults'"):
        decode_faults({}, "listener x")
