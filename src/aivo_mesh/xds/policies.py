"""The mesh's policies in and out of xDS resources, for processes that apply them themselves.

A proxyless process (MeshClient, MeshServer) takes the same kinds of typed resources as an Envoy sidecar
and must arrive at the very policies `config.resolve` gives from mesh.yaml, so that one mesh.yaml means
the same on both planes. What a resource's own fields say exactly is read from them:

    route     its match (`path`: one method, `prefix`: a service or package) and its deadline
              (`max_stream_duration.grpc_timeout_header_max` on unary routes, `idle_timeout` on streams)
    endpoints each instance's address, weight and health status; a canary version's cluster
              (`learner-svc.v2`) says the version of its instances
    split     a canary's weights: the routes' weighted_clusters, one cluster per version
    allow     the RBAC HTTP filter's ALLOW policies (gRFC A41): principals and url paths
    limits    the local rate limit filter's configurations on the server listener's virtual host (the
              service's buckets) and routes (a route's own, or the filter turned off): token buckets and
              the callers' descriptors, exactly as the sidecar applies them

What no Envoy field says, or says only as Envoy applies it, travels as plain data under the metadata key
"aivo.mesh" (`filter_metadata`), written as mesh.yaml writes it (durations as `5s`):

    route     the retry policy as the mesh resolves it (Envoy's retry_on has no token for some gRPC
              statuses, and leaves out a per-try timeout it would ignore), `idempotent`, `streaming`
    cluster   the service's own timeout and retry (its catch-all), retry budget, circuit breaker (Envoy's
              has no consecutive-failure mode), limits, outlier detection, health checks
    server    (the service's own server listener) its faults per route as `config.resolve.fault_policies`
              gives them, callers as SPIFFE IDs (Envoy's fault filter says them only as header matchers)

`decode_*` raise PolicyError for a resource that does not carry what they need: the subscriber NACKs
it and keeps what it had.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import duration_pb2, json_format
from google.protobuf.message import Message
from pydantic import BaseModel, ValidationError

from aivo_mesh.config.model import (
    CircuitBreakerSpec,
    FaultSpec,
    HealthCheckSpec,
    LimitsSpec,
    MeshSpec,
    OutlierDetectionSpec,
    RetryBudgetSpec,
    RetrySpec,
    ServiceSpec,
    format_duration,
    parse_duration,
    to_data,
)
from aivo_mesh.config.patterns import service_prefix
from aivo_mesh.config.resolve import (
    Bucket,
    FaultPolicy,
    RateLimit,
    RoutePolicy,
    ScopedRateLimit,
    ServicePolicy,
    route_retry,
)
from aivo_mesh.discovery.snapshot import VERSION, Endpoint
from aivo_mesh.render.envoy import CALLER_KEY, RATE_LIMIT_FILTER, cluster_service, cluster_version, version_cluster
from aivo_mesh.xds.cache import CLUSTER, ENDPOINT, LISTENER, ROUTE

METADATA_KEY = "aivo.mesh"
M = TypeVar("M", bound=BaseModel)


class PolicyError(ValueError):
    """A resource lacks, or holds a wrong, part of a policy (the message says which resource and what)."""


# -- plain data in metadata ------------------------------------------------------------------------

def set_metadata(metadata: base_pb2.Metadata, data: Mapping[str, Any]) -> None:
    """`data` (JSON-like) under "aivo.mesh" in `metadata`."""
    metadata.filter_metadata[METADATA_KEY].update(dict(data))


def metadata_of(metadata: base_pb2.Metadata, where: str) -> dict[str, Any]:
    """The "aivo.mesh" data of `metadata`. A Struct holds every number as a double: integral ones are
    read back as ints, which every field of the model takes (an int field refuses 3.0)."""
    if METADATA_KEY not in metadata.filter_metadata:
        raise PolicyError(f"{where}: no {METADATA_KEY!r} metadata")
    data: dict[str, Any] = _ints(json_format.MessageToDict(metadata.filter_metadata[METADATA_KEY]))
    return data


def _ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


def _model(cls: type[M], data: Any, where: str) -> M:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        at = ".".join(str(p) for p in first["loc"])
        raise PolicyError(f"{where}: {cls.__name__} {at}: {first['msg']}") from None


def route_metadata(rp: RoutePolicy) -> dict[str, Any]:
    """What a route carries besides its own fields (the module docstring)."""
    return {"retry": to_data(rp.retry), "idempotent": rp.idempotent, "streaming": rp.streaming,
            "match": rp.match}


def cluster_metadata(sp: ServicePolicy) -> dict[str, Any]:
    """What a peer's cluster carries besides its own fields (the module docstring)."""
    return {"timeout": format_duration(sp.timeout), "retry": to_data(sp.retry),
            "retry_budget": to_data(sp.retry_budget), "circuit_breaker": to_data(sp.circuit_breaker),
            "limits": to_data(sp.limits), "outlier_detection": to_data(sp.outlier_detection),
            "health_check": to_data(sp.health_check)}


def fault_metadata(policies: tuple[FaultPolicy, ...]) -> dict[str, Any]:
    """What a server listener carries of its service's faults (the module docstring)."""
    return {"faults": [{"pattern": p.pattern, "match": p.match,
                        "fault": to_data(p.fault),
                        "callers": None if p.callers is None else list(p.callers)} for p in policies]}


def decode_faults(data: Mapping[str, Any], where: str) -> tuple[FaultPolicy, ...]:
    """`fault_metadata`, read back."""
    entries = data.get("faults")
    if not isinstance(entries, list):
        raise PolicyError(f"{where}: {METADATA_KEY} metadata: expected a list under 'faults'")
    out = []
    for i, entry in enumerate(entries):
        try:
            pattern, match, callers = entry["pattern"], entry["match"], entry["callers"]
            fault = _model(FaultSpec, entry["fault"], f"{where} faults[{i}]")
        except (KeyError, TypeError) as exc:
            raise PolicyError(f"{where}: {METADATA_KEY} metadata faults[{i}]: missing or wrong {exc}") from None
        if not isinstance(pattern, str) or not (callers is None or all(isinstance(c, str) for c in callers)):
            raise PolicyError(f"{where}: {METADATA_KEY} metadata faults[{i}]: expected a pattern and SPIFFE IDs")
        out.append(FaultPolicy(pattern, match, fault, None if callers is None else tuple(callers)))
    return tuple(out)


# -- decoding --------------------------------------------------------------------------------------

def decode_service(spec: ServiceSpec, cluster: cluster_pb2.Cluster) -> ServicePolicy:
    """The policy of the peer `spec` (mesh.yaml's service, which names it) from its cluster."""
    where = f"cluster {cluster.name}"
    data = metadata_of(cluster.metadata, where)
    try:
        timeout = parse_duration(data["timeout"])
        parts = {key: data[key] for key in ("retry", "retry_budget", "circuit_breaker", "limits",
                                            "outlier_detection", "health_check")}
    except (KeyError, ValueError, TypeError) as exc:
        raise PolicyError(f"{where}: {METADATA_KEY} metadata: missing or wrong {exc}") from None
    return ServicePolicy(
        service=spec, timeout=timeout, retry=_model(RetrySpec, parts["retry"], where),
        retry_budget=_model(RetryBudgetSpec, parts["retry_budget"], where),
        circuit_breaker=_model(CircuitBreakerSpec, parts["circuit_breaker"], where),
        limits=_model(LimitsSpec, parts["limits"], where),
        outlier_detection=_model(OutlierDetectionSpec, parts["outlier_detection"], where),
        health_check=_model(HealthCheckSpec, parts["health_check"], where))


def decode_route(service: str, route: route_components_pb2.Route) -> RoutePolicy:
    """One route's policy: match and deadline from its fields, the rest from its metadata."""
    where = f"route {route.name or '(unnamed)'}"
    which = route.match.WhichOneof("path_specifier")
    if which not in ("path", "prefix"):
        raise PolicyError(f"{where}: expected a path or prefix match, got {which}")
    pattern = getattr(route.match, which)
    data = metadata_of(route.metadata, where)
    try:
        streaming, idempotent, match = bool(data["streaming"]), bool(data["idempotent"]), data["match"]
    except KeyError as exc:
        raise PolicyError(f"{where}: {METADATA_KEY} metadata: missing {exc}") from None
    action = route.route
    if streaming:
        if not action.HasField("idle_timeout"):
            raise PolicyError(f"{where}: a streaming route without idle_timeout")
        timeout = _seconds(action.idle_timeout)
    else:
        if not action.max_stream_duration.HasField("grpc_timeout_header_max"):
            raise PolicyError(f"{where}: a unary route without max_stream_duration.grpc_timeout_header_max")
        timeout = _seconds(action.max_stream_duration.grpc_timeout_header_max)
    if match is not None and match != pattern:
        raise PolicyError(f"{where}: metadata names route {match!r} but the route matches {pattern!r}")
    return RoutePolicy(service=service, pattern=pattern, match=match, timeout=timeout,
                       retry=_model(RetrySpec, data.get("retry"), where), idempotent=idempotent,
                       streaming=streaming)


def _seconds(d: duration_pb2.Duration) -> float:
    """A Duration (nanoseconds) in seconds. Whole milliseconds are read as mesh.yaml's `700ms` is, so the
    float is the resolver's own; a finer duration is exact to the nanosecond."""
    nanos = d.seconds * 1_000_000_000 + d.nanos
    return parse_duration(f"{nanos // 1_000_000}ms") if nanos % 1_000_000 == 0 else nanos / 1e9


def decode_routes(policy: ServicePolicy, routes: Any) -> tuple[RoutePolicy, ...]:
    """Every route of the peer `policy` is of (its virtual host's routes, in match order), then its
    catch-all, as `config.resolve.route_policies` gives them. Where a route covers the whole service,
    the catch-all is not rendered (nothing would reach it: `per_pattern`), and is made here from the
    service's own policy, as the resolver makes it."""
    service = policy.service.name
    decoded = tuple(decode_route(service, r) for r in routes)
    for rp in decoded[:-1]:
        if rp.match is None:
            raise PolicyError(f"routes of {service}: the catch-all route must come last")
    if decoded and decoded[-1].match is None:
        return decoded
    catch_all = RoutePolicy(service=service, pattern=service_prefix(policy.service.grpc_service), match=None,
                            timeout=policy.timeout,
                            retry=route_retry(policy.retry, idempotent=False, streaming=False),
                            idempotent=False, streaming=False)
    return (*decoded, catch_all)


def decode_endpoints(cla: endpoint_pb2.ClusterLoadAssignment, version: str | None = None) -> tuple[Endpoint, ...]:
    """The instances of an assignment, with weight and health (UNHEALTHY and the like: not healthy); with
    `version` (the assignment of a canary version's cluster), each carries it in its metadata."""
    healthy = (health_check_pb2.HEALTHY, health_check_pb2.UNKNOWN)
    metadata = {VERSION: version} if version is not None else {}
    out = []
    for locality in cla.endpoints:
        for lb in locality.lb_endpoints:
            address = lb.endpoint.address.socket_address
            out.append(Endpoint(address.address, address.port_value,
                                weight=lb.load_balancing_weight.value or 1,
                                healthy=lb.health_status in healthy, metadata=metadata))
    return tuple(out)


def decode_split(service: str, routes: Sequence[route_components_pb2.Route]) -> tuple[tuple[str, int], ...]:
    """The canary split of peer `service` from its routes: () when they send to its cluster, else each
    version's weight from their weighted_clusters (`<service>.<version>`), which every route must agree
    on (mesh.yaml splits a service, not a method)."""
    splits: set[tuple[tuple[str, int], ...]] = set()
    for route in routes:
        action = route.route
        if action.cluster:
            if action.cluster != service:
                raise PolicyError(f"route {route.name}: sends to cluster {action.cluster}, not {service}")
            splits.add(())
            continue
        split = []
        for w in action.weighted_clusters.clusters:
            version = cluster_version(w.name)
            if cluster_service(w.name) != service or version is None:
                raise PolicyError(f"route {route.name}: weighted cluster {w.name} is not a version of {service}")
            split.append((version, w.weight.value))
        if not split:
            raise PolicyError(f"route {route.name}: neither a cluster nor weighted clusters")
        splits.add(tuple(sorted(split)))
    if len(splits) > 1:
        raise PolicyError(f"routes of {service}: different canary splits per route ({sorted(splits)})")
    return splits.pop() if splits else ()


def decode_allow(rbac: rbac_pb2.RBAC, trust_domain: str) -> tuple[tuple[frozenset[str], tuple[str, ...]], ...]:
    """The allow rules of an ALLOW RBAC, as (callers, methods) in the order of the mesh's rules
    (policies `allow-0`, `allow-1`, ...; `mesh-open`, the health and reflection methods every mesh
    identity may call, is the server's own rule and is skipped). Callers are SPIFFE IDs, "*" for any
    identity of the trust domain; methods exact or prefixes, () for every method."""
    if rbac.action != rbac_pb2.RBAC.ALLOW:
        raise PolicyError("RBAC: expected an ALLOW policy set")
    trust_prefix = f"spiffe://{trust_domain}/"
    numbered = []
    for name, policy in rbac.policies.items():
        if name == "mesh-open":
            continue
        if not name.startswith("allow-") or not name[6:].isdigit():
            raise PolicyError(f"RBAC: unexpected policy {name!r}")
        callers = set()
        for p in policy.principals:
            matcher = p.authenticated.principal_name
            if matcher.exact:
                callers.add(matcher.exact)
            elif matcher.prefix == trust_prefix:
                callers.add("*")
            else:
                raise PolicyError(f"RBAC {name}: a principal that is neither a SPIFFE ID nor the trust domain")
        methods = []
        for perm in policy.permissions:
            if perm.any:
                continue
            path = perm.url_path.path
            if not (path.exact or path.prefix):
                raise PolicyError(f"RBAC {name}: a permission that is neither a method nor a prefix")
            methods.append(path.exact or path.prefix)
        numbered.append((int(name[6:]), (frozenset(callers), tuple(methods))))
    return tuple(rule for _, rule in sorted(numbered))


# -- a proxyless node's whole configuration ------------------------------------------------------------

# The listener of a proxyless server is named as gRPC's xDS servers name theirs (gRFC A36's default
# `server_listener_resource_name_template`), with the address the server listens on.
SERVER_LISTENER_PREFIX = "grpc/server?xds.resource.listening_address="
RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"

Rules = tuple[tuple[frozenset[str], tuple[str, ...]], ...]


@dataclass(frozen=True)
class TargetConfig:
    """One peer as a MeshClient applies it."""

    policy: ServicePolicy
    routes: tuple[RoutePolicy, ...]
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True)
class ProxylessConfig:
    """What a proxyless node holds, decoded: its peers (API listeners, gRFC A27) and, if it serves, the
    allow rules, rate limits and faults of its server listener (None: no server listener)."""

    targets: Mapping[str, TargetConfig]
    allow: Rules | None
    rate_limits: tuple[ScopedRateLimit, ...] | None = None
    faults: tuple[FaultPolicy, ...] | None = None


def decode_config(mesh: MeshSpec, resources: Mapping[str, Mapping[str, Message]]) -> ProxylessConfig:
    """A complete set of a proxyless node's resources (xds/subscriber.py), decoded. Peers are named by
    their API listeners; `mesh` (the process's mesh.yaml) says what each peer is (its name and gRPC
    service), since the set of services does not change while the mesh runs. Raises PolicyError."""
    listeners, routes = resources.get(LISTENER, {}), resources.get(ROUTE, {})
    clusters, assignments = resources.get(CLUSTER, {}), resources.get(ENDPOINT, {})
    targets: dict[str, TargetConfig] = {}
    allow: Rules | None = None
    rate_limits: tuple[ScopedRateLimit, ...] | None = None
    faults: tuple[FaultPolicy, ...] | None = None
    for name, listener in sorted(listeners.items()):
        assert isinstance(listener, listener_pb2.Listener)
        if name.startswith(SERVER_LISTENER_PREFIX):
            allow = _server_rules(mesh, listener)
            rate_limits = decode_rate_limits(_server_hcm(listener))
            faults = decode_faults(metadata_of(listener.metadata, f"listener {name}"), f"listener {name}")
            continue
        if not listener.HasField("api_listener"):
            raise PolicyError(f"listener {name}: neither an API listener nor a server listener")
        try:
            spec = mesh.service(name)
        except KeyError:
            raise PolicyError(f"listener {name}: not a service of this mesh") from None
        hcm = hcm_pb2.HttpConnectionManager()
        if not listener.api_listener.api_listener.Unpack(hcm) or not hcm.HasField("rds"):
            raise PolicyError(f"listener {name}: expected an HttpConnectionManager taking its routes over RDS")
        config = routes.get(hcm.rds.route_config_name)
        if config is None:
            raise PolicyError(f"listener {name}: its route configuration is missing")
        assert isinstance(config, route_pb2.RouteConfiguration)
        mine = [r for vh in config.virtual_hosts for r in vh.routes]
        split = decode_split(name, mine)
        policy: ServicePolicy | None = None
        endpoints: list[Endpoint] = []
        # A canary peer's versions each have a cluster (the same policy in each) and an assignment.
        for cluster_name in [version_cluster(name, v) for v, _ in split] or [name]:
            cluster = clusters.get(cluster_name)
            if cluster is None:
                raise PolicyError(f"listener {name}: its cluster {cluster_name} is missing")
            assert isinstance(cluster, cluster_pb2.Cluster)
            policy = policy or decode_service(spec, cluster)
            cla = assignments.get(cluster.eds_cluster_config.service_name or cluster_name)
            if cla is None:
                raise PolicyError(f"cluster {cluster_name}: its assignment is missing")
            assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
            endpoints += decode_endpoints(cla, cluster_version(cluster_name))
        assert policy is not None
        policy = dataclasses.replace(policy, canary=split)
        targets[name] = TargetConfig(policy, decode_routes(policy, mine), tuple(endpoints))
    return ProxylessConfig(targets, allow, rate_limits, faults)


def _server_hcm(listener: listener_pb2.Listener) -> hcm_pb2.HttpConnectionManager:
    for chain in listener.filter_chains:
        for f in chain.filters:
            hcm = hcm_pb2.HttpConnectionManager()
            if f.typed_config.Unpack(hcm):
                return hcm
    raise PolicyError(f"listener {listener.name}: no HttpConnectionManager")


def _server_rules(mesh: MeshSpec, listener: listener_pb2.Listener) -> Rules:
    for http_filter in _server_hcm(listener).http_filters:
        if http_filter.typed_config.type_url == RBAC_TYPE:
            rbac = rbac_filter_pb2.RBAC()
            http_filter.typed_config.Unpack(rbac)
            return decode_allow(rbac.rules, mesh.mesh.trust_domain)
    raise PolicyError(f"listener {listener.name}: no RBAC filter (a server without allow rules would refuse "
                      "everything; refusing the listener instead)")


RATE_LIMIT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
FILTER_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.FilterConfig"


def decode_rate_limits(hcm: hcm_pb2.HttpConnectionManager) -> tuple[ScopedRateLimit, ...]:
    """A server listener's rate limits as `config.resolve.inbound_rate_limits` gives them: each route in
    order with the limit of its methods (its own configuration, else the virtual host's, the service's
    block; a route that turns the filter off is not one of the service's and is left out). () when the
    listener has no local rate limit filter."""
    if not any(f.typed_config.type_url == RATE_LIMIT_TYPE for f in hcm.http_filters):
        return ()
    vhosts = hcm.route_config.virtual_hosts
    if len(vhosts) != 1:
        raise PolicyError(f"{hcm.stat_prefix}: expected one virtual host, got {len(vhosts)}")
    vhost = vhosts[0]
    shared = (_rate_limit(None, vhost.typed_per_filter_config[RATE_LIMIT_FILTER], f"{vhost.name} virtual host")
              if RATE_LIMIT_FILTER in vhost.typed_per_filter_config else None)
    out = []
    for route in vhost.routes:
        which = route.match.WhichOneof("path_specifier")
        if which not in ("path", "prefix"):
            raise PolicyError(f"route {route.name}: expected a path or prefix match, got {which}")
        pattern = getattr(route.match, which)
        config = route.typed_per_filter_config.get(RATE_LIMIT_FILTER)
        if config is None:
            out.append(ScopedRateLimit(pattern, shared))
        elif config.type_url != FILTER_CONFIG_TYPE:
            out.append(ScopedRateLimit(pattern, _rate_limit(pattern, config, f"route {route.name}")))
        elif not _turned_off(config):
            raise PolicyError(f"route {route.name}: a FilterConfig for the rate limit that does not turn it off")
    return tuple(out)


def _turned_off(packed: Any) -> bool:
    config = route_components_pb2.FilterConfig()
    return bool(packed.Unpack(config) and config.disabled)


def _rate_limit(scope: str | None, packed: Any, where: str) -> RateLimit:
    """One LocalRateLimit (render/envoy.py `local_rate_limit`) as the buckets it stands for."""
    config = local_rate_limit_pb2.LocalRateLimit()
    if not packed.Unpack(config):
        raise PolicyError(f"{where}: expected a LocalRateLimit, got {packed.type_url}")

    def bucket(tb: Any, what: str) -> Bucket:
        if tb.fill_interval.ToMilliseconds() != 1000 or tb.tokens_per_fill.value < 1 or tb.max_tokens < 1:
            raise PolicyError(f"{where}: {what}: expected tokens_per_fill >= 1 per fill_interval 1s and "
                              "max_tokens >= 1, as the mesh renders a bucket")
        return Bucket(tb.tokens_per_fill.value, tb.max_tokens)

    callers = []
    for d in config.descriptors:
        if len(d.entries) != 1 or d.entries[0].key != CALLER_KEY or not d.entries[0].value:
            raise PolicyError(f"{where}: expected descriptors of one `caller` entry (a SPIFFE ID)")
        callers.append((d.entries[0].value, bucket(d.token_bucket, f"caller {d.entries[0].value}")))
    return RateLimit(scope, bucket(config.token_bucket, "token_bucket"), tuple(sorted(callers)))
