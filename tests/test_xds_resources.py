"""The control plane's typed resources (xds/resources.py, xds/parse.py).

A sidecar's snapshot is its rendered bootstrap taken apart, whatever is built once per peer and shared by
its callers; the fast parse reads every rendered resource as json_format.ParseDict does, and leaves
everything else to ParseDict itself; every Any payload, and so every version, does not depend on the
process; a version is never stale.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from google.protobuf import any_pb2, descriptor_pool, json_format
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from aivo_mesh.config import MeshSpec, parse_mesh
from aivo_mesh.config.model import HealthCheckSpec
from aivo_mesh.discovery.snapshot import Endpoint
from aivo_mesh.render import envoy
from aivo_mesh.render.envoy import EnvoyProfile, bootstrap, callable_peers
from aivo_mesh.xds.cache import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, InconsistentSnapshot, Snapshot
from aivo_mesh.xds.parse import ParseMemo, canonicalize, parse
from aivo_mesh.xds.resources import (
    HCM,
    Trust,
    _split_routes,
    _types,
    load_assignment,
    mesh_ca_secret,
    mesh_snapshots,
    sidecar_snapshot,
    typed,
)

ROOT = Path(__file__).resolve().parents[1]
MESH_DATA: dict[str, Any] = yaml.safe_load((ROOT / "mesh.yaml").read_text())
TRUST = Trust(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", ("A" * 43 + "=",), b"crl")
ADS = {"ads": {}, "resource_api_version": "V3"}


def _variant() -> MeshSpec:
    """Everything the renderer can put in a sidecar's resources: tracing, StatsD, per-method stats, a fault,
    rate limits (per caller, with an override, and a route's own), callers by `*` and by SPIFFE ID, a
    streaming prefix route, endpoints, a revocation."""
    data = copy.deepcopy(MESH_DATA)
    data["observability"]["tracing"]["enabled"] = True
    data["observability"]["statsd"]["enabled"] = True
    data["observability"]["metrics"]["envoy_outbound_grpc_stats"] = True
    data["observability"]["metrics"]["envoy_inbound_grpc_stats"] = True
    data["services"][0]["fault"] = {"abort_status": "UNAVAILABLE", "abort_percent": 12.5, "delay": "100ms",
                                    "delay_percent": 50}
    data["services"][0]["rate_limit"] = {"requests_per_second": 50, "burst": 100, "per_caller": True,
                                         "callers": {"analytics-svc": {"requests_per_second": 5}}}
    data["services"][0]["routes"][0]["rate_limit"] = {"requests_per_second": 20}
    data["services"][1]["allow"].append({"from": ["*"]})
    data["services"][2]["allow"].append({"from": ["spiffe://aivo.local/ns/default/sa/auth-svc"]})
    data["services"][3]["routes"] = [{"match": "/aivo.analytics.v1.AnalyticsService/", "streaming": True,
                                      "timeout": "7s"}]
    data["services"][3]["endpoints"] = ["10.0.0.1:50054", "10.0.0.2:50054"]
    data["certificates"] = {"revoked": [{"serial": "3af4"}]}
    return parse_mesh(yaml.safe_dump(data), "variant.yaml")


def _generated() -> MeshSpec:
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import meshgen

    return parse_mesh(meshgen.mesh_yaml(7), "meshgen-7.yaml")


MESHES = {"repo": lambda: parse_mesh(yaml.safe_dump(MESH_DATA)), "variant": _variant, "generated": _generated}


def _profile(service: str) -> EnvoyProfile:
    """As `meshctl up` gives each sidecar its own: its SDS folder, its sockets, spans to the collector."""
    return EnvoyProfile.local("/state/certs", f"/state/envoy/{service}/sds", ("127.0.0.1", 4317),
                              app_pipe=f"/run/mesh/{service}.app.sock", outbound_pipe=f"/run/mesh/{service}.out.sock")


def _as_data(message: Message) -> dict[str, Any]:
    # Any payloads unpacked, map entries as dict keys: what the message says, however its bytes are ordered.
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _parsedict(type_url: str, doc: dict[str, Any]) -> Message:
    message = _types()[type_url]()
    json_format.ParseDict(copy.deepcopy(doc), message)
    return message


def _to_ads(node: Any) -> Any:
    """The rendered configuration with the trust (`mesh_ca`) taken over ADS instead of from a file."""
    if isinstance(node, dict):
        out = {k: _to_ads(v) for k, v in node.items()}
        ref = out.get("validation_context_sds_secret_config")
        if isinstance(ref, dict) and ref.get("name") == "mesh_ca":
            out["validation_context_sds_secret_config"] = {"name": "mesh_ca", "sds_config": ADS}
        return out
    if isinstance(node, list):
        return [_to_ads(v) for v in node]
    return node


def _expected_docs(mesh: MeshSpec, service: str, profile: EnvoyProfile,
                   endpoints: dict[str, list[Endpoint]] | None) -> dict[str, list[dict[str, Any]]]:
    """The snapshot's documents as the whole bootstrap (peers and all) says them, taken apart in one
    piece, the trust moved to ADS by a walk over it."""
    static = _to_ads(bootstrap(mesh, service, profile))["static_resources"]
    routes: list[dict[str, Any]] = []
    listeners = [_split_routes(doc, routes) for doc in static["listeners"]]
    clusters, assignments = [], []
    for doc in static["clusters"]:
        if doc["name"] in ("envoy_admin", "otlp_collector", "statsd_sink"):
            continue
        if doc["name"] != "local_app":
            cla = doc.pop("load_assignment")
            if endpoints is not None and doc["name"] in endpoints:
                cla = load_assignment(doc["name"], endpoints[doc["name"]])
            doc.pop("dns_lookup_family", None)
            doc.pop("respect_dns_ttl", None)
            doc["type"] = "EDS"
            doc["eds_cluster_config"] = {"eds_config": ADS}
            doc["ignore_health_on_host_removal"] = True
            assignments.append(cla)
        clusters.append(doc)
    return {LISTENER: listeners, ROUTE: routes, CLUSTER: clusters, ENDPOINT: assignments}


def _expected(mesh: MeshSpec, service: str, profile: EnvoyProfile,
              endpoints: dict[str, list[Endpoint]] | None) -> dict[str, dict[str, Any]]:
    """`_expected_docs` parsed by json_format itself: what sidecar_snapshot assembles from its shared parts
    must be exactly this."""
    expected = {t: {doc.get("name") or doc["cluster_name"]: _as_data(_parsedict(t, doc)) for doc in docs}
                for t, docs in _expected_docs(mesh, service, profile, endpoints).items()}
    return {**expected, SECRET: {"mesh_ca": _as_data(mesh_ca_secret(TRUST))}}


def _discovered(mesh: MeshSpec) -> dict[str, list[Endpoint]]:
    first = mesh.service_names[0]
    return {first: [Endpoint("10.1.1.1", 7001, weight=3), Endpoint("10.1.1.2", 7002, healthy=False)]}


@pytest.mark.parametrize("name", sorted(MESHES))
def test_a_snapshot_is_the_bootstrap_taken_apart(name: str) -> None:
    mesh = MESHES[name]()
    for service in mesh.service_names:
        for endpoints in (None, _discovered(mesh)):
            profile = _profile(service)
            snap = sidecar_snapshot(mesh, service, profile, TRUST, endpoints)
            got = {t: {n: _as_data(r) for n, r in snap.get(t).items()}
                   for t in (LISTENER, ROUTE, CLUSTER, ENDPOINT, SECRET)}
            assert got == _expected(mesh, service, profile, endpoints), (service, endpoints)
            assert not snap.problems()


@pytest.mark.parametrize("name", sorted(MESHES))
def test_mesh_snapshots_are_each_sidecar_s_own(name: str) -> None:
    # Built together (sharing each peer's parts) or one at a time: the same versions.
    mesh = MESHES[name]()
    endpoints = _discovered(mesh)
    built = mesh_snapshots(mesh, lambda m, s: _profile(s), TRUST, endpoints)
    assert list(built) == list(mesh.service_names)
    for service, snap in built.items():
        assert snap.versions == sidecar_snapshot(mesh, service, _profile(service), TRUST, endpoints).versions


def test_what_is_shared_between_callers_comes_from_their_own_mesh() -> None:
    mesh = MESHES["repo"]()
    caller = "analytics-svc"
    assert "auth-svc" in callable_peers(mesh, caller)
    before = mesh_snapshots(mesh, lambda m, s: _profile(s), TRUST)[caller]
    # auth-svc's routes and health check change: every caller's copy of them must follow, in the new mesh
    # only (a cache of the first mesh's results answering for its copy would keep the old ones).
    auth = mesh.service("auth-svc")
    changed_auth = auth.model_copy(update={
        "routes": (auth.routes[0].model_copy(update={"timeout": 0.25}),),
        "health_check": HealthCheckSpec(interval=7.0)})
    changed = mesh.model_copy(update={"services": tuple(changed_auth if s.name == "auth-svc" else s
                                                        for s in mesh.services)})
    after = mesh_snapshots(changed, lambda m, s: _profile(s), TRUST)[caller]
    assert after.versions[ROUTE] != before.versions[ROUTE]
    assert after.versions[CLUSTER] != before.versions[CLUSTER]
    assert after.versions[LISTENER] == before.versions[LISTENER]
    cluster = after.get(CLUSTER)["auth-svc"]
    assert isinstance(cluster, cluster_pb2.Cluster)
    assert cluster.health_checks[0].interval.seconds == 7
    outbound = after.get(ROUTE)["outbound"]
    assert isinstance(outbound, route_pb2.RouteConfiguration)
    deadlines = {r.name: r.route.max_stream_duration.max_stream_duration.ToMilliseconds()
                 for r in outbound.virtual_hosts[0].routes}
    assert deadlines["auth-svc/ValidateToken"] == 250
    # The first mesh's snapshot is as it was.
    assert mesh_snapshots(mesh, lambda m, s: _profile(s), TRUST)[caller].versions == before.versions


def test_each_caller_s_cluster_names_its_own_certificate() -> None:
    mesh = MESHES["repo"]()
    built = mesh_snapshots(mesh, lambda m, s: _profile(s), TRUST)
    paths = set()
    for caller in ("learner-svc", "analytics-svc"):
        tls = _as_data(built[caller].get(CLUSTER)["auth-svc"])["transport_socket"]["typed_config"]
        paths.add(tls["common_tls_context"]["tls_certificate_sds_secret_configs"][0]["sds_config"][
            "path_config_source"]["path"])
    assert paths == {"/state/envoy/learner-svc/sds/tls_cert.yaml", "/state/envoy/analytics-svc/sds/tls_cert.yaml"}


def test_mesh_snapshots_checks_each_and_gives_nothing_when_one_is_inconsistent() -> None:
    mesh = MESHES["repo"]()
    # The pod profile's Prometheus listener routes to the admin cluster, which stays in the bootstrap.
    with pytest.raises(InconsistentSnapshot, match="envoy_admin, which is missing") as exc:
        mesh_snapshots(mesh, lambda m, s: EnvoyProfile.pod(m), TRUST)
    assert exc.value.group == mesh.service_names[0]


def test_a_listener_s_routes_move_to_rds() -> None:
    mesh = MESHES["repo"]()
    snap = sidecar_snapshot(mesh, "learner-svc", _profile("learner-svc"), TRUST)
    for listener in snap.get(LISTENER).values():
        hcm = _as_data(listener)["filter_chains"][0]["filters"][-1]["typed_config"]
        assert hcm["@type"] == HCM and "route_config" not in hcm
        assert hcm["rds"]["config_source"] == ADS


# --------------------------------------------------------------------------- versions


def _content_version(resources: dict[str, Message]) -> str:
    """A type's version worked out from scratch (xds/cache.py)."""
    h = hashlib.sha256()
    for name in sorted(resources):
        h.update(name.encode() + b"\0" + resources[name].SerializeToString(deterministic=True) + b"\0")
    return h.hexdigest()[:16]


def test_a_version_is_never_a_stale_one() -> None:
    # Versions are remembered by the identity of the messages hashed: messages made and dropped one after
    # another (whose ids the interpreter hands out again) each get the version of their own content.
    seen = set()
    for i in range(50):
        cluster = typed(CLUSTER, {"name": "c", "connect_timeout": f"{i + 1}s"})
        snap = Snapshot.of({CLUSTER: [cluster]})
        assert snap.versions[CLUSTER] == _content_version({"c": cluster})
        seen.add(snap.versions[CLUSTER])
        del snap, cluster
    assert len(seen) == 50
    # The same messages in two snapshots: one version, and the same as equal messages made apart.
    shared = mesh_ca_secret(TRUST)
    a, b = Snapshot.of({SECRET: [shared]}), Snapshot.of({SECRET: [shared]})
    assert a.versions == b.versions == Snapshot.of({SECRET: [mesh_ca_secret(TRUST)]}).versions


def test_problems_are_a_fresh_list_each_time() -> None:
    snap = Snapshot.of({CLUSTER: [typed(CLUSTER, {"name": "orphan", "type": "EDS"})]})
    problems = snap.problems()
    assert problems == ["cluster orphan takes its endpoints from EDS but has no assignment"]
    problems.clear()
    assert snap.problems() == ["cluster orphan takes its endpoints from EDS but has no assignment"]


# --------------------------------------------------------------------------- the parse


def _anys(message: Message) -> Iterator[any_pb2.Any]:
    """Every Any in `message`, nested ones included (unpacked to look inside)."""
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            items = list(value.values()) if field.message_type.fields_by_name["value"].message_type else []
        else:
            items = list(value) if field.is_repeated else [value]
        for item in items:
            if isinstance(item, any_pb2.Any):
                yield item
                yield from _anys(_unpacked(item))
            else:
                yield from _anys(item)


def _unpacked(packed: any_pb2.Any) -> Message:
    inner = GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(packed.type_url.rpartition("/")[2]))()
    packed.Unpack(inner)
    return inner


def _canonical(message: Message) -> bool:
    """Every Any in `message` holds the deterministic serialization of what it packs."""
    return all(a.value == _unpacked(a).SerializeToString(deterministic=True) for a in _anys(message))


def _rendered(mesh: MeshSpec) -> Iterator[tuple[str, dict[str, Any]]]:
    """(type URL, document) of every resource the renderer writes: each static bootstrap's listeners and
    clusters (pod and local profiles), their route configurations, their SDS files, and every resource of
    every sidecar's snapshot as the control plane assembles it."""
    profiles = [EnvoyProfile.pod(mesh), *(_profile(s) for s in mesh.service_names)]
    for service in mesh.service_names:
        for profile in profiles:
            static = bootstrap(mesh, service, profile)["static_resources"]
            for doc in static["listeners"]:
                yield LISTENER, doc
                for chain in doc["filter_chains"]:
                    for f in chain["filters"]:
                        if "route_config" in f.get("typed_config", {}):
                            yield ROUTE, f["typed_config"]["route_config"]
            for doc in static["clusters"]:
                yield CLUSTER, doc
        for sds in envoy.sds_files(mesh, service, profiles[0]).values():
            for doc in sds["resources"]:
                yield SECRET, {k: v for k, v in doc.items() if k != "@type"}
        # The pieces the control plane parses on their own: the bootstrap without peers, each peer's parts.
        static = _to_ads(bootstrap(mesh, service, profiles[1], with_peers=False))["static_resources"]
        routes: list[dict[str, Any]] = []
        for doc in static["listeners"]:
            yield LISTENER, _split_routes(doc, routes)
        for doc in routes:
            yield ROUTE, doc
        for peer in callable_peers(mesh, service):
            yield CLUSTER, envoy.peer_cluster_policy(mesh, peer, "local")
            yield CLUSTER, {"transport_socket": envoy.peer_tls(mesh, peer, profiles[1])}
            yield ROUTE, envoy.outbound_route_config(envoy.peer_routes(mesh, peer))
        yield ENDPOINT, load_assignment(service, _discovered(mesh)[mesh.service_names[0]])


@pytest.mark.parametrize("name", sorted(MESHES))
def test_parse_reads_every_rendered_resource_as_parsedict_does(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    mesh = MESHES[name]()
    docs = list(_rendered(mesh))
    assert {t for t, _ in docs} == {LISTENER, ROUTE, CLUSTER, ENDPOINT, SECRET}
    expected = [_as_data(_parsedict(t, doc)) for t, doc in docs]

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("fell back to json_format.ParseDict")

    monkeypatch.setattr(json_format, "ParseDict", refuse)  # what xds/parse.py falls back to: never, here
    for (type_url, doc), want in zip(docs, expected, strict=True):
        before = json.dumps(doc)
        message = parse(doc, _types()[type_url])
        assert _as_data(message) == want, doc
        assert _canonical(message)
        assert json.dumps(doc) == before  # the data read, never changed


@pytest.mark.parametrize("name", sorted(MESHES))
def test_any_payloads_are_deterministic(name: str) -> None:
    # json_format packs an Any with the map entries in the order of the process's hash table: the RBAC
    # policies of a route configuration came out differently from one process to the next, and with them
    # the content-hash versions a restarted control plane sends.
    from aivo_mesh.xds.proxyless import proxyless_snapshot

    mesh = MESHES[name]()
    for service, snap in mesh_snapshots(mesh, lambda m, s: _profile(s), TRUST).items():
        for built in (snap, proxyless_snapshot(mesh, service, snap)):  # gRPC's own clients' too
            for resources in built.resources.values():
                for resource in resources.values():
                    assert _canonical(resource)


def _both(doc: Any, cls: type[Message]) -> tuple[Any, Any]:
    """(parse's result or error, ParseDict's result or error), comparable."""
    def outcome(fn: Any) -> Any:
        try:
            return _as_data(fn())
        except json_format.ParseError as exc:
            return ("ParseError", str(exc))

    def by_parsedict() -> Message:
        message = cls()
        json_format.ParseDict(copy.deepcopy(doc), message)
        return message

    return outcome(lambda: parse(copy.deepcopy(doc), cls)), outcome(by_parsedict)


CLUSTER_DOCS = [
    # within the walk's subset
    {"name": "a", "type": "EDS", "connect_timeout": "1.5s", "per_connection_buffer_limit_bytes": 1024,
     "common_lb_config": {"healthy_panic_threshold": {"value": 0}}, "lb_policy": 1,
     "outlier_detection": {"consecutive_5xx": 5, "max_ejection_percent": 50},
     "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
         "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
         "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 7}}}}},
    {"name": "b", "metadata": {"filter_metadata": {"x": {"k": 1}}}},  # a Struct: ParseDict's own
    # outside it: each is ParseDict's to accept or refuse, with its own message
    {"name": "c", "connectTimeout": "2s"},  # a JSON (camelCase) name
    {"name": "d", "per_connection_buffer_limit_bytes": "1024"},  # a number as a string
    {"name": "e", "per_connection_buffer_limit_bytes": True},
    {"name": "f", "per_connection_buffer_limit_bytes": 1.0},
    {"name": "g", "per_connection_buffer_limit_bytes": 1.5},
    {"name": "h", "no_such_field": 1},
    {"name": "i", "type": "NO_SUCH_TYPE"},
    {"name": "j", "type": "EDS", "cluster_type": {"name": "custom"}},  # two fields of one oneof
    {"name": "k", "connect_timeout": None},
    {"name": "l", "connect_timeout": "soon"},
    {"name": "m", "circuit_breakers": {"thresholds": [{"max_connections": 2 ** 40}]}},
    {"name": "n", "transport_socket": {"name": "t", "typed_config": {"@type": "type.googleapis.com/nope.Nope"}}},
    {"name": "o", "transport_socket": {"name": "t", "typed_config": {}}},
    {"name": "p", "health_checks": [{"timeout": "1s", "interval": "1s", "grpc_health_check": {}},
                                    {"timeout": "1s", "interval": "2s", "http_health_check": {"path": "/"}}]},
    {"name": "q", "health_checks": ({"timeout": "1s", "interval": "1s"},)},  # a tuple: ParseDict takes it
    {"name": 5},
    {"name": "r", "lb_subset_config": {"subset_selectors": [{"keys": ["a", 5]}]}},
    {"name": "s", "load_assignment": {"cluster_name": "s", "policy": {"overprovisioning_factor": -1}}},
    {"name": "t", "dns_refresh_rate": "0.000000001s", "respect_dns_ttl": "yes"},
    {"name": "u", "transport_socket": {"name": "t", "typed_config": {
        "@type": "type.googleapis.com/google.protobuf.Duration", "value": "1s"}}},  # a well-known type in an Any
    {"name": "v", "transport_socket": {"name": "t", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", "sni": 5}}},
]


@pytest.mark.parametrize("doc", CLUSTER_DOCS, ids=lambda d: str(d["name"]))
def test_parse_gives_what_parsedict_gives(doc: dict[str, Any]) -> None:
    ours, theirs = _both(doc, cluster_pb2.Cluster)
    assert ours == theirs


def test_parse_reads_floats_bytes_and_timestamps_as_parsedict_does() -> None:
    from envoy.config.core.v3 import base_pb2
    from envoy.type.v3 import percent_pb2

    for value in (0.5, 3, float("nan"), float("inf"), "0.5", True, 1e39):
        ours, theirs = _both({"value": value}, percent_pb2.Percent)
        assert ours == theirs, value
    for text in ("aGVsbG8=", "aGVsbG8", "aGVs-G8_", "aGVs+G8/", "not base64!"):
        ours, theirs = _both({"inline_bytes": text}, base_pb2.DataSource)
        assert ours == theirs, text
    route = {"name": "r", "match": {"prefix": "/"}, "direct_response": {"status": 200},
             "typed_per_filter_config": {"f": {"@type": "type.googleapis.com/google.protobuf.Duration",
                                               "value": "1s"}}}
    ours, theirs = _both(route, route_components_pb2.Route)
    assert ours == theirs


def test_what_parsedict_reads_instead_is_packed_deterministically_too() -> None:
    # A route configuration whose RBAC policies (a map, inside an Any) ParseDict reads, because of one
    # field outside the walk's subset: its Any payloads are repacked, as the walk packs them.
    policies = {f"p{i}": {"permissions": [{"any": True}], "principals": [{"any": True}]} for i in range(12)}
    rbac = {"@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute",
            "rbac": {"rules": {"action": "ALLOW", "policies": policies}}}
    doc = {"name": "r", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
        {"match": {"prefix": "/"}, "direct_response": {"status": 200},
         "typed_per_filter_config": {"envoy.filters.http.rbac": rbac}}]}]}
    fast = parse(doc, route_pb2.RouteConfiguration)
    fallback = {**doc, "validateClusters": True}  # a JSON (camelCase) name: ParseDict's
    slow = parse(fallback, route_pb2.RouteConfiguration)
    assert _canonical(fast) and _canonical(slow)
    slow.ClearField("validate_clusters")
    assert slow.SerializeToString(deterministic=True) == fast.SerializeToString(deterministic=True)
    assert canonicalize(slow) is slow  # in place, and idempotent
    assert slow.SerializeToString(deterministic=True) == fast.SerializeToString(deterministic=True)


# --------------------------------------------------------------------------- the memoised parse (ParseMemo)


def _policies_mesh() -> MeshSpec:
    """The repository's mesh with what renders each sidecar differently: a canary split of auth-svc (its
    endpoints by version), a fault of a route's own for some callers, a rate limit, and the outbound
    listener over TLS for one caller."""
    data = copy.deepcopy(MESH_DATA)
    auth, learner, events = data["services"][0], data["services"][1], data["services"][2]
    auth["endpoints"] = [{"address": "10.0.0.1:50051", "version": "v1"}, {"address": "10.0.0.2:50051", "version": "v2"}]
    auth["canary"] = {"v1": 80, "v2": 20}
    auth["routes"][0]["fault"] = {"abort_status": "NOT_FOUND", "abort_percent": 30, "delay_percent": 0,
                                  "callers": ["mesh-client"]}
    events["rate_limit"] = {"requests_per_second": 10, "burst": 20}
    learner["sidecar"] = {**learner.get("sidecar", {}), "outbound_tls": True}
    return parse_mesh(yaml.safe_dump(data), "policies.yaml")


def _generated_policies() -> MeshSpec:
    """A generated mesh of 16 services, some with a rate limit (per caller, or a route's own), a fault
    (the service's, or a route's for some callers), canary weights or the outbound listener over TLS: most
    sidecars alike, some not, as in a real mesh."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import meshgen

    data = meshgen.mesh(16)
    for i, svc in enumerate(data["services"]):
        if i % 5 == 1:
            svc["rate_limit"] = {"requests_per_second": 10 + i, "burst": 20, "per_caller": i % 2 == 0}
        if i % 5 == 4:
            svc["routes"][0]["rate_limit"] = {"requests_per_second": 5}
            svc["rate_limit"] = {"requests_per_second": 50}
        if i % 6 == 2:
            svc["fault"] = {"abort_status": "UNAVAILABLE", "abort_percent": 12.5 + i, "delay_percent": 0}
        if i % 6 == 3:
            svc["routes"][0]["fault"] = {"delay": "100ms", "delay_percent": 50, "callers": ["mesh-client"]}
        if i % 7 == 5:
            host, port = "10.0.0.1", svc["port"]
            svc["endpoints"] = [{"address": f"{host}:{port}", "version": "v1"},
                                {"address": f"10.0.0.2:{port}", "version": "v2"}]
            svc["canary"] = {"v1": 90 - i, "v2": 10 + i}
        if i % 4 == 2:
            svc["sidecar"]["outbound_tls"] = True
    return parse_mesh(yaml.safe_dump(data, sort_keys=False), "meshgen-16-policies.yaml")


MEMO_MESHES = {**MESHES, "policies": _policies_mesh, "generated-policies": _generated_policies}


@pytest.mark.parametrize("name", sorted(MEMO_MESHES))
def test_mesh_snapshots_hold_the_bytes_a_parse_of_each_rendered_document_gives(name: str) -> None:
    # A build parses most documents from the first of their kind (ParseMemo); each resource must still be,
    # byte for byte, what parsing its document on its own gives.
    mesh = MEMO_MESHES[name]()
    canary = {s.name for s in mesh.services if s.canary}
    discovered = None if mesh.service_names[0] in canary else _discovered(mesh)
    for endpoints in (None, discovered):
        built = mesh_snapshots(mesh, lambda m, s: _profile(s), TRUST, endpoints)
        for service, snap in built.items():
            expected = _expected_docs(mesh, service, _profile(service), endpoints)
            for type_url, docs in expected.items():
                want = {doc.get("name") or doc["cluster_name"]: typed(type_url, doc).SerializeToString(
                    deterministic=True) for doc in docs}
                got = {n: r.SerializeToString(deterministic=True) for n, r in snap.get(type_url).items()}
                assert got == want, (service, type_url)


def _outcome(fn: Any) -> Any:
    try:
        return fn().SerializeToString(deterministic=True)
    except json_format.ParseError as exc:
        return ("ParseError", str(exc))


def _cluster(name: str, **changes: Any) -> dict[str, Any]:
    doc = {"name": name, "type": "STATIC", "connect_timeout": "1s", "per_connection_buffer_limit_bytes": 1024,
           "common_lb_config": {"update_merge_window": "0s", "healthy_panic_threshold": {"value": 0.0}},
           "circuit_breakers": {"thresholds": [{"max_connections": 10, "track_remaining": True}]},
           "transport_socket": {"name": "tls", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
               "sni": name, "common_tls_context": {"alpn_protocols": ["h2"]}}}}
    for path, value in changes.items():
        *parents, last = path.split(".")
        node: Any = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value
    return doc


MEMO_DOCS = [
    _cluster("a"),
    _cluster("b"),  # a name and an SNI inside an Any: places learnt
    _cluster("c", per_connection_buffer_limit_bytes=2048),  # another place
    _cluster("d", **{"circuit_breakers.thresholds.0.track_remaining": 1}),  # 1 == True: ParseDict refuses it
    _cluster("e", per_connection_buffer_limit_bytes=True),  # True == 1, at a place
    _cluster("f", **{"common_lb_config.healthy_panic_threshold": {"value": -0.0}}),  # -0.0 == 0.0: not the same
    _cluster("g", **{"circuit_breakers.thresholds.0.max_connections": 10.0}),  # 10.0 == 10: ParseDict takes it
    _cluster("h", **{"common_lb_config.update_merge_window": "0.5s"}),
    _cluster("i", type="EDS"),  # an enum
    _cluster("j", connect_timeout="soon"),  # refused
    _cluster("k", **{"transport_socket.typed_config.sni": 5}),  # refused, within an Any
    _cluster("l", **{"transport_socket.typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}),  # another type
    _cluster("m", **{"circuit_breakers.thresholds": [{"max_connections": 1}, {"max_connections": 2}]}),  # longer
    _cluster("n", lb_policy="RANDOM"),  # another key
    _cluster("o", **{"transport_socket.typed_config.sni": "o", "transport_socket.typed_config.common_tls_context": {
        "alpnProtocols": ["h2"]}}),  # a JSON name: ParseDict's
    _cluster("p", per_connection_buffer_limit_bytes=2 ** 40),  # out of range, at a place
    _cluster("q", per_connection_buffer_limit_bytes=7),
    _cluster("r", **{"circuit_breakers.thresholds.0.track_remaining": False}),
]


def test_the_memoised_parse_gives_what_parse_gives_document_after_document(monkeypatch: pytest.MonkeyPatch) -> None:
    memo = ParseMemo()
    for doc in MEMO_DOCS:
        before = copy.deepcopy(doc)
        got = _outcome(lambda d=doc: memo.parse(d, cluster_pb2.Cluster, "cluster"))
        assert got == _outcome(lambda d=before: parse(copy.deepcopy(d), cluster_pb2.Cluster)), doc["name"]
        assert doc == before  # the data read, never changed (ParseDict puts an Any's `@type` last)
    # One that differs at places learnt comes from the first one's message, not from a parse of its own.
    from aivo_mesh.xds import parse as parse_module

    monkeypatch.setattr(parse_module, "parse", lambda *args: pytest.fail("parsed"))
    doc = _cluster("z", per_connection_buffer_limit_bytes=3, **{"common_lb_config.update_merge_window": "2s"})
    message = memo.parse(doc, cluster_pb2.Cluster, "cluster")
    assert message.SerializeToString(deterministic=True) == _outcome(lambda: parse(doc, cluster_pb2.Cluster))


def test_a_memoised_message_is_the_caller_s_own() -> None:
    memo = ParseMemo()
    first = memo.parse(_cluster("a"), cluster_pb2.Cluster, "cluster")
    first.name, first.per_connection_buffer_limit_bytes.value = "changed", 1
    second = memo.parse(_cluster("b"), cluster_pb2.Cluster, "cluster")
    second.circuit_breakers.thresholds[0].max_connections.value = 99
    third = memo.parse(_cluster("c"), cluster_pb2.Cluster, "cluster")
    assert third.SerializeToString(deterministic=True) == parse(_cluster("c"), cluster_pb2.Cluster).SerializeToString(
        deterministic=True)


def test_typed_names_the_field_it_refuses() -> None:
    with pytest.raises(json_format.ParseError, match="no_such_field"):
        typed(CLUSTER, {"name": "x", "no_such_field": 1})


def test_the_trust_moves_to_ads_only_in_the_control_plane_s_profile(mesh: MeshSpec) -> None:
    profile = _profile("auth-svc")
    over_ads = dataclasses.replace(profile, ca_over_ads=True)
    assert _to_ads(bootstrap(mesh, "auth-svc", profile)) == bootstrap(mesh, "auth-svc", over_ads)
    assert bootstrap(mesh, "auth-svc", profile) != bootstrap(mesh, "auth-svc", over_ads)


@pytest.mark.parametrize("name", sorted(MESHES))
def test_every_static_bootstrap_is_a_typed_bootstrap(name: str) -> None:
    # `meshctl render envoy` writes the renderer's data; the same data, typed, is a valid Bootstrap message
    # (unknown fields, wrong types and misspelt enums would raise here, naming the field).
    mesh = MESHES[name]()
    for service in mesh.service_names:
        for profile in (EnvoyProfile.pod(mesh), _profile(service)):
            doc = bootstrap(mesh, service, profile)
            message = typed("bootstrap", doc)
            listeners = message.static_resources.listeners  # type: ignore[attr-defined]
            assert [x.name for x in listeners] == [d["name"] for d in doc["static_resources"]["listeners"]]
