"""Envoy sidecar bootstraps (Envoy v3 API, checked on 1.40) from mesh.yaml.

Pure functions, no I/O, deterministic: the same mesh gives the same dicts, key order included.
`render(mesh)` is the registry entry (`meshctl render envoy`): the pod profile of every service, i.e.
what Docker Compose / Kubernetes ship, under ``infra/mesh/envoy/<svc>/``. `bootstrap` and `sds_files`
render one service for any `EnvoyProfile` (tests and the one-machine demo use the local profile).

One sidecar per service::

    caller app --h2c--> 127.0.0.1:<outbound>  [outbound_grpc]  --mTLS h2--> peer's inbound
    (`sidecar.outbound_tls`: the app's leg is mTLS too, with the app's own certificate)
    peer Envoy --mTLS--> <inbound>           [inbound_grpc]   --h2c-->     127.0.0.1:<local_port> (app)
    (a profile with `app_pipe` / `outbound_pipe`, as `meshctl up` writes them: those two plaintext legs
    on Unix sockets instead, the outbound one created 0600; see runtime/sockets.py)
    admin on 127.0.0.1:<admin>; pod profile only: 0.0.0.0:15090 serves GET /stats/prometheus (Istio's
    layout) so Prometheus in another container can scrape without the admin API leaving loopback.

How mesh.yaml maps (docs/envoy.md has the full table; notes/envoy.md the sources):

- **Deadlines.** A unary route carries ``max_stream_duration{max_stream_duration: T,
  grpc_timeout_header_max: T}`` and *no* ``timeout``: Envoy then honours a shorter client
  ``grpc-timeout`` and caps it (and calls without one) at T, answering DEADLINE_EXCEEDED. Both fields
  together would be a trap: once ``max_stream_duration`` is present the router never reads
  ``route.timeout`` (notes §3, envoy#15530), so the linter rejects the pair. T covers every try and
  back-off, like mesh.yaml's `timeout`. Streaming routes get ``timeout: 0s`` plus
  ``idle_timeout: T``: never cut by a unary deadline (the caller's own deadline still applies end to
  end); a stream silent for its whole mesh.yaml deadline is reaped.
- **Retries.** ``retry_on`` lists only Envoy's gRPC tokens for the statuses the proxyless plane
  would retry (`policy.classify.retryable_codes`: CANCELLED never; anything but UNAVAILABLE only on
  idempotent routes), plus ``connect-failure,refused-stream`` (never processed) and ``reset`` on
  idempotent routes only. Statuses Envoy cannot express (UNKNOWN, ABORTED, ...) are left out and
  `lint.envoy.lint_mesh` warns. Streams retry only ``connect-failure,refused-stream``. Envoy maps
  grpc-status only from trailers-only responses (notes §3): the app's own client still owns the rest.
- **Limits vs breaker.** ``circuit_breakers`` are the concurrency caps (`limits`) plus the
  ``retry_budget``; ``max_retries`` is not emitted because a budget overrides it. The failure-count
  breaker is ``outlier_detection`` (per host, from mesh.yaml `outlier_detection`, as the proxyless
  OutlierRule): consecutive_5xx = consecutive_gateway_failure = `consecutive_failures`, both
  enforced at 100 %, success-rate ejection off, ``successful_active_health_check_uneject_host:
  false`` so a passing health check cannot end an ejection early (an app can answer its health
  check while failing every call), and ``common_lb_config.update_merge_window: 0s`` so an
  ejection reaches the load balancer at once (Envoy otherwise holds a health-only update for up to
  1 s after the previous one, e.g. a peer's first passing health check, and the ejected host keeps
  getting first attempts meanwhile).
  Every rendered peer cluster has one host, so ``always_eject_one_host: true`` (``max_ejection_percent``
  50 alone never ejects 1 of 1) and ``healthy_panic_threshold: 0`` (the default 50 % panic mode
  would route to the ejected host anyway): 5 failed attempts -> the peer fails fast for the ejection
  time. That is ``base_ejection_time`` x ejections in a row, capped at ``max_ejection_time`` (1 s,
  2 s, 3 s, ... 60 s with mesh.yaml's defaults), and Envoy returns a host only at its ``interval``
  sweep, so each ejection lasts up to one interval longer: with ``interval`` = ``base_ejection_time``
  = 1 s a one-second stall fails calls for at most 2 s after it (about 1 s measured), not 60-70 s.
  The proxyless breaker doubles its probe wait from `first_probe` instead of adding 1 s per
  ejection (docs/envoy.md, "A stall costs seconds"). No ``max_ejection_time_jitter``: Envoy adds
  it to every ejection, the 1 s ones included, and the sweep already returns a host at a moment
  set by each sidecar's own timer.
- **Identity.** Certificates arrive through file-based SDS (`sds_files`), so ``meshctl certs
  rotate`` (an atomic ``os.replace`` in ``<certs>/services/`` and ``<certs>/ca/``) is picked up
  without a restart: each secret's ``watched_directory`` is the directory those renames happen in.
  Upstream: SNI = peer name, peer SPIFFE URI SAN must match exactly. Inbound: client certificates
  required and limited to the trust domain; an RBAC filter mirrors `server.authz.Authorizer`
  (health/reflection open to every mesh identity, the allow-list for the rest, 403 ->
  PERMISSION_DENIED). TLS 1.3 minimum *and* maximum everywhere, ALPN h2.
- **Faults.** The inbound fault filter sits after RBAC (authorized calls only), its own config empty:
  mesh.yaml's `fault` is the virtual host's ``typed_per_filter_config`` (so `meshctl apply` reaches open
  connections, as the RBAC override does), limited to the service's own methods by a ``:path`` header
  match; a route's own `fault` is that route's override (every explicit route then gets an inbound route of its own, so
  the first route matching a method decides, as in `config.resolve.fault_policies`), and `callers` a
  header match on the sanitized ``x-forwarded-client-cert`` (`caller_header_match`). The proxyless
  server applies the same rules (policy/fault.py).
- **Outbound peers** are the services whose allow-list names this service (by name, SPIFFE ID or
  ``*``): routing to a service that would refuse every call only hides the mistake. The path's gRPC
  service picks the peer (one virtual host, any ``:authority``, rewritten to the peer's name); any
  other path is answered PERMISSION_DENIED by the sidecar (`outbound_refusal`). With mesh.yaml's
  ``sidecar.outbound_tls`` the outbound listener takes only TLS 1.3 with the service's own certificate.
"""

from __future__ import annotations

import ipaddress
import math
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aivo_mesh.config.model import MeshSpec, ServiceSpec, known_methods
from aivo_mesh.config.patterns import is_prefix, method_name, service_prefix
from aivo_mesh.config.ports import (
    POD_ADMIN_PORT,
    POD_INBOUND_PORT,
    POD_OUTBOUND_PORT,
    POD_STATS_PORT,
    Kind,
    local_ports,
    sidecar_ports,
)
from aivo_mesh.config.resolve import (
    FaultPolicy,
    RateLimit,
    RoutePolicy,
    callable_peers,
    fault_policies,
    inbound_rate_limits,
    per_pattern,
    route_policies,
    service_policy,
)
from aivo_mesh.pki.layout import CertLayout
from aivo_mesh.policy.backoff import PUSHBACK_HEADER
from aivo_mesh.policy.classify import retryable_codes
from aivo_mesh.render import Document
from aivo_mesh.status import GRPC_STATUS_NAMES

__all__ = [
    "GRPC_RETRY_TOKENS",
    "HELPER_CLUSTERS",
    "VALID_RETRY_ON",
    "XDS_CLUSTER",
    "EnvoyProfile",
    "RetryOn",
    "bootstrap",
    "callable_peers",
    "canary_versions",
    "cluster_service",
    "cluster_version",
    "outbound_refusal",
    "outbound_route_config",
    "peer_address",
    "peer_cluster",
    "peer_cluster_names",
    "peer_cluster_policy",
    "peer_routes",
    "peer_tls",
    "relocate",
    "render",
    "retry_on_tokens",
    "sds_files",
    "version_cluster",
    "version_hosts",
]

Config = dict[str, Any]

# --- conventions (the pod's ports: config/ports.py) -------------------------------------------------
POD_CERT_DIR = "/etc/envoy/certs"
POD_SDS_DIR = "/etc/envoy/sds"
POD_OTLP = ("jaeger", 4317)  # Jaeger >= 1.35 takes OTLP/gRPC on 4317

SDS_CERT = "svc_cert"  # secret names and files as in shared/reference/envoy
SDS_CA = "mesh_ca"
TLS_CERT_FILE = "tls_cert.yaml"
MESH_CA_FILE = "mesh_ca.yaml"

INBOUND_LISTENER = "inbound_grpc"
OUTBOUND_LISTENER = "outbound_grpc"
STATS_LISTENER = "prometheus_stats"
# Cluster names with an underscore can never clash with a service name (a DNS label).
LOCAL_APP_CLUSTER = "local_app"
ADMIN_CLUSTER = "envoy_admin"
OTLP_CLUSTER = "otlp_collector"
STATSD_CLUSTER = "statsd_sink"
XDS_CLUSTER = "xds_control_plane"  # the ADS bootstrap's one static cluster (xds/resources.py)
# Every cluster that is not a peer service (`meshctl status` leaves these out of a sidecar's upstreams).
HELPER_CLUSTERS: frozenset[str] = frozenset({LOCAL_APP_CLUSTER, ADMIN_CLUSTER, OTLP_CLUSTER, STATSD_CLUSTER,
                                             XDS_CLUSTER})

CONNECT_TIMEOUT = "1s"
# TCP keepalive (no mesh.yaml key: the h2 PING keepalive of mesh.yaml is the primary liveness check).
TCP_KEEPALIVE_TIME = 60
TCP_KEEPALIVE_INTERVAL = 10
TCP_KEEPALIVE_PROBES = 3
OTLP_TIMEOUT = "0.25s"

# Methods every authenticated mesh identity may call (mirrors aivo_mesh.server.authz.OPEN_PREFIXES;
# a test keeps the two equal without importing grpc here).
OPEN_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

# The methods under OPEN_PREFIXES, for per-method stats (their protos are not aivo-mesh's to load).
OPEN_METHODS: dict[str, tuple[str, ...]] = {
    "grpc.health.v1.Health": ("Check", "List", "Watch"),
    "grpc.reflection.v1alpha.ServerReflection": ("ServerReflectionInfo",),
    "grpc.reflection.v1.ServerReflection": ("ServerReflectionInfo",),
}

# The complete set of Envoy's gRPC retry_on tokens (retry_state_impl.cc parseRetryGrpcOn).
GRPC_RETRY_TOKENS: dict[str, str] = {
    "UNAVAILABLE": "unavailable",
    "RESOURCE_EXHAUSTED": "resource-exhausted",
    "DEADLINE_EXCEEDED": "deadline-exceeded",
    "INTERNAL": "internal",
    "CANCELLED": "cancelled",
}
HTTP_RETRY_TOKENS: frozenset[str] = frozenset({
    "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure", "envoy-ratelimited",
    "retriable-4xx", "refused-stream", "retriable-status-codes", "retriable-headers",
    "http3-post-connect-failure",
})
VALID_RETRY_ON: frozenset[str] = HTTP_RETRY_TOKENS | frozenset(GRPC_RETRY_TOKENS.values())
ALWAYS_SAFE_TOKENS: tuple[str, ...] = ("connect-failure", "refused-stream")  # request never processed

_TYPE = "type.googleapis.com/"
_TLS_PARAMS = {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"}


# --- profile and ports ------------------------------------------------------------------------------
@dataclass(frozen=True)
class EnvoyProfile:
    """Where a sidecar runs: one pod/container per service (`pod`) or every sidecar on one machine
    (`local`). `cert_dir` holds the mesh PKI layout (``ca/ca.crt``, ``services/<svc>.crt``,
    ``services/<svc>-key.pem``) as Envoy sees it; `sds_dir` holds `sds_files`' output. `otlp` is the
    OTLP/gRPC collector for spans (None: no tracing); `statsd` a StatsD sink (None: none).
    `app_pipe` / `outbound_pipe`: absolute Unix socket paths for the two plaintext legs (the app, and
    the outbound listener, bound with mode 0600) instead of loopback TCP; None keeps TCP (the pod profile
    always does: there the pod's own loopback is private). `ca_over_ads`: what the sidecar trusts
    (`mesh_ca`) comes from the control plane over ADS instead of the SDS file (xds/resources.py)."""

    kind: Kind
    cert_dir: str
    sds_dir: str
    otlp: tuple[str, int] | None = None
    statsd: tuple[str, int] | None = None
    app_pipe: str | None = None
    outbound_pipe: str | None = None
    ca_over_ads: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("pod", "local"):
            raise ValueError(f"kind must be 'pod' or 'local', got {self.kind!r}")
        for name in ("cert_dir", "sds_dir"):
            value = getattr(self, name)
            # Envoy resolves relative paths against its working directory: never what was meant.
            if not posixpath.isabs(value):
                raise ValueError(f"{name} must be an absolute path, got {value!r}")
            object.__setattr__(self, name, value.rstrip("/") or "/")
        for name in ("app_pipe", "outbound_pipe"):
            value = getattr(self, name)
            if value is not None and not posixpath.isabs(value):
                raise ValueError(f"{name} must be an absolute path, got {value!r}")

    @classmethod
    def pod(cls, mesh: MeshSpec | None = None) -> EnvoyProfile:
        """The container layout: certs in /etc/envoy/certs, SDS files in /etc/envoy/sds; spans to
        jaeger:4317 when mesh.yaml enables tracing; StatsD to mesh.yaml's address when enabled."""
        otlp = statsd = None
        if mesh is not None:
            if mesh.observability.tracing.enabled:
                otlp = POD_OTLP
            if mesh.observability.statsd.enabled:
                statsd = _host_port(mesh.observability.statsd.address)
        return cls("pod", POD_CERT_DIR, POD_SDS_DIR, otlp, statsd)

    @classmethod
    def local(cls, cert_dir: str, sds_dir: str, otlp: tuple[str, int] | None = None,
              statsd: tuple[str, int] | None = None, *, app_pipe: str | None = None,
              outbound_pipe: str | None = None) -> EnvoyProfile:
        """Every sidecar on one machine: loopback addresses, ports from mesh.yaml's `sidecar` blocks;
        with `app_pipe` / `outbound_pipe` the app and outbound legs on those Unix sockets."""
        return cls("local", str(cert_dir), str(sds_dir), otlp, statsd, app_pipe, outbound_pipe)


def peer_address(mesh: MeshSpec, peer: str, kind: Kind) -> tuple[str, int]:
    """Where `peer`'s sidecar accepts mesh traffic: ``<peer>:50051`` (its pod / compose service
    name, resolved by DNS) or ``127.0.0.1:<its inbound port>`` on one machine."""
    inbound = sidecar_ports(mesh, peer, kind).inbound
    return (peer, inbound) if kind == "pod" else ("127.0.0.1", inbound)


# --- canary versions --------------------------------------------------------------------------------
def canary_versions(peer: ServiceSpec) -> tuple[str, ...]:
    """The versions a caller splits `peer`'s calls between (mesh.yaml `canary`), sorted; () without one."""
    return tuple(sorted(peer.canary))


def version_cluster(service: str, version: str) -> str:
    """The cluster of one version of a canary service: `learner-svc.v2`. A service name is a DNS label
    (no '.'), so the name splits back at its first dot (`cluster_service`) and never clashes with a
    helper cluster (they have '_' and no '.')."""
    return f"{service}.{version}"


def cluster_service(cluster: str) -> str:
    """The service a peer cluster calls: `learner-svc` for `learner-svc` and `learner-svc.v2`."""
    return cluster.partition(".")[0]


def cluster_version(cluster: str) -> str | None:
    """The version a peer cluster calls (`v2` for `learner-svc.v2`), None for a whole service's cluster."""
    return cluster.partition(".")[2] or None


def peer_cluster_names(peer: ServiceSpec) -> tuple[str, ...]:
    """The clusters a caller calls `peer` through: one per canary version, else the peer's own."""
    return tuple(version_cluster(peer.name, v) for v in canary_versions(peer)) or (peer.name,)


def version_hosts(mesh: MeshSpec, peer: ServiceSpec, version: str, kind: Kind) -> list[tuple[str, int]]:
    """Where one version of `peer` is, for a rendering without discovery: in a pod, the per-version
    Service `<peer>-<version>` (as `meshctl render linkerd` names it: pods labelled `version`) on the
    mesh port; on one machine, mesh.yaml's `endpoints` of that version, else the peer's own sidecar for
    its own `version` (a local run starts one instance per service), else none."""
    if kind == "pod":
        return [(f"{peer.name}-{version}", sidecar_ports(mesh, peer.name, kind).inbound)]
    if peer.endpoints:
        return [_host_port(address) for address, v in peer.endpoint_versions if v == version]
    return [peer_address(mesh, peer.name, kind)] if version == peer.version else []


def _host_port(value: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port`, as the model has validated it (StatsdSpec.address)."""
    host, _, port = value.strip().rpartition(":")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --- small builders ---------------------------------------------------------------------------------
UNHEALTHY_RECHECK = 2.0  # seconds between health checks of a host marked unhealthy


def _dur(seconds: float) -> str:
    """Seconds as an Envoy (protobuf JSON) duration: 5.0 -> "5s", 0.1 -> "0.1s"."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds:.9f}".rstrip("0") + "s"


def _ms(ms: int) -> str:
    return _dur(ms / 1000)


def _percent(value: float) -> dict[str, Any]:
    """A FractionalPercent: exact for whole percents, else per million."""
    if value == int(value):
        return {"numerator": int(value), "denominator": "HUNDRED"}
    return {"numerator": round(value * 10_000), "denominator": "MILLION"}


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


PIPE_MODE = 0o600  # a listener's Unix socket: its owner only (Envoy chmods it right after bind)


def _pipe(path: str, *, listener: bool) -> dict[str, Any]:
    return {"pipe": {"path": path, "mode": PIPE_MODE} if listener else {"path": path}}


def _load_assignment(name: str, host: str, port: int, address: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address or _socket(host, port)}}]}]}


def _hosts_assignment(name: str, hosts: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """A ClusterLoadAssignment of `hosts` (none: a cluster every call to fails with no healthy upstream)."""
    if not hosts:
        return {"cluster_name": name, "endpoints": []}
    return {"cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(h, p)}} for h, p in hosts]}]}


def _typed(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": _TYPE + type_name, **fields}


def _h2_options(mesh: MeshSpec, *, keepalive: bool) -> dict[str, Any]:
    h2 = mesh.http2
    opts: dict[str, Any] = {
        "max_concurrent_streams": h2.max_concurrent_streams,
        "initial_stream_window_size": h2.initial_stream_window_size,
        "initial_connection_window_size": h2.initial_connection_window_size,
    }
    if keepalive:  # h2 PING, as the proxyless channels do (mesh.yaml `keepalive`)
        opts["connection_keepalive"] = {"interval": _ms(mesh.keepalive.time_ms),
                                        "timeout": _ms(mesh.keepalive.timeout_ms)}
    return opts


def _upstream_h2(mesh: MeshSpec, *, keepalive: bool) -> dict[str, Any]:
    name = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    return {name: _typed(name, explicit_http_config={"http2_protocol_options": _h2_options(mesh,
                                                                                         keepalive=keepalive)})}


def ads_source() -> dict[str, Any]:
    """A config source that is the ADS stream itself (the control plane's resources, xds/resources.py)."""
    return {"ads": {}, "resource_api_version": "V3"}


def _sds_ref(name: str, file: str, profile: EnvoyProfile) -> dict[str, Any]:
    if name == SDS_CA and profile.ca_over_ads:
        return {"name": name, "sds_config": ads_source()}
    # The watch on the SDS file's directory also catches a Kubernetes ConfigMap's `..data` swap.
    return {"name": name, "sds_config": {
        "resource_api_version": "V3",
        "path_config_source": {"path": posixpath.join(profile.sds_dir, file),
                               "watched_directory": {"path": profile.sds_dir}},
    }}


def _common_tls(profile: EnvoyProfile, san: dict[str, str]) -> dict[str, Any]:
    return {
        "alpn_protocols": ["h2"],
        "tls_params": dict(_TLS_PARAMS),
        "tls_certificate_sds_secret_configs": [_sds_ref(SDS_CERT, TLS_CERT_FILE, profile)],
        "combined_validation_context": {
            "default_validation_context": {"match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san}]},
            "validation_context_sds_secret_config": _sds_ref(SDS_CA, MESH_CA_FILE, profile),
        },
    }


def _downstream_tls(profile: EnvoyProfile, san: dict[str, str]) -> dict[str, Any]:
    """A listener's mTLS: TLS 1.3, ALPN h2, a client certificate of the mesh CA whose URI SAN is `san`."""
    return {"name": "envoy.transport_sockets.tls", "typed_config": _typed(
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        require_client_certificate=True, common_tls_context=_common_tls(profile, san))}


def _keepalive_socket_options() -> list[dict[str, Any]]:
    # Linux: SOL_SOCKET=1/SO_KEEPALIVE=9; IPPROTO_TCP=6/TCP_KEEPIDLE=4, TCP_KEEPINTVL=5, TCP_KEEPCNT=6.
    return [
        {"description": "SO_KEEPALIVE", "level": 1, "name": 9, "int_value": 1, "state": "STATE_PREBIND"},
        {"description": "TCP_KEEPIDLE", "level": 6, "name": 4, "int_value": TCP_KEEPALIVE_TIME,
         "state": "STATE_PREBIND"},
        {"description": "TCP_KEEPINTVL", "level": 6, "name": 5, "int_value": TCP_KEEPALIVE_INTERVAL,
         "state": "STATE_PREBIND"},
        {"description": "TCP_KEEPCNT", "level": 6, "name": 6, "int_value": TCP_KEEPALIVE_PROBES,
         "state": "STATE_PREBIND"},
    ]


def _router(*, dynamic_stats: bool = True) -> dict[str, Any]:
    cfg = _typed("envoy.extensions.filters.http.router.v3.Router")
    if not dynamic_stats:
        cfg["dynamic_stats"] = False
    return {"name": "envoy.filters.http.router", "typed_config": cfg}


def stats_methods(services: Iterable[ServiceSpec]) -> dict[str, list[str]]:
    """gRPC service -> the method names mesh.yaml knows for it: its proto's methods (for the services
    aivo-mesh ships protos of) and every method a route or allow rule names; then the open services.
    A service with neither (only prefixes, no proto here) is left out."""
    known: dict[str, list[str]] = {}
    for svc in services:
        named = {method_name(p) for p in (*(r.match for r in svc.routes),
                                          *(m for rule in svc.allow for m in rule.methods))}
        if methods := sorted((set(known_methods(svc.grpc_service)) | named) - {""}):
            known[svc.grpc_service] = methods
    return known | {name: list(methods) for name, methods in OPEN_METHODS.items()}


def _grpc_stats(services: Iterable[ServiceSpec], *, upstream: bool) -> dict[str, Any]:
    # Per-method stats for the methods mesh.yaml knows only; any other name a caller sends is counted in
    # the one `grpc.*` bucket. `stats_for_all_methods` would make stats of whatever names callers send:
    # unbounded (Envoy's docs: only safe when every client is trusted), and naming each call's stats at
    # run time costs the inbound hop about 4 % more instructions than the allowlist (docs/benchmarks.md).
    # No filter state: nothing here reads it (no access log uses it), and it costs every call.
    allow = [{"name": name, "method_names": methods} for name, methods in stats_methods(services).items()]
    cfg = _typed("envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
                 individual_method_stats_allowlist={"services": allow})
    if upstream:
        cfg["enable_upstream_stats"] = True
    return {"name": "envoy.filters.http.grpc_stats", "typed_config": cfg}


def _tracing(mesh: MeshSpec, service: str) -> dict[str, Any]:
    return {
        "random_sampling": {"value": round(mesh.observability.tracing.sample_ratio * 100, 6)},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": _typed(
                "envoy.config.trace.v3.OpenTelemetryConfig",
                grpc_service={"envoy_grpc": {"cluster_name": OTLP_CLUSTER}, "timeout": OTLP_TIMEOUT},
                # Distinct from the app's own spans (service.name = <svc>) in Jaeger's service list.
                service_name=f"{service}-sidecar",
            ),
        },
    }


def _hcm(mesh: MeshSpec, profile: EnvoyProfile, service: str, stat_prefix: str,
         route_config: dict[str, Any], http_filters: list[dict[str, Any]], *, inbound: bool) -> dict[str, Any]:
    cfg = _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix=stat_prefix,
        codec_type="HTTP2",
        http2_protocol_options=_h2_options(mesh, keepalive=False),
    )
    if inbound:
        # RBAC matches paths: normalise them first so `/grpc.health.v1.Health/../x` cannot pass as health.
        cfg["normalize_path"] = True
        cfg["merge_slashes"] = True
    if inbound and any(f["name"] in CALLER_FILTERS for f in http_filters):
        # The caller's SPIFFE ID, from its verified certificate, as `x-forwarded-client-cert` (whatever the
        # caller sent under that name is replaced): what per-caller policies (fault injection, rate limit
        # descriptors) match on, since only RBAC reads the connection's certificate itself. Only with those
        # filters: setting it costs 7 k instructions a call (docs/benchmarks.md), and without it Envoy's
        # default (SANITIZE) still strips any the caller sent. With the filters, not only when a policy
        # names callers: callers arrive in the route configuration, which reaches open connections, and
        # the header must be set there already.
        cfg["forward_client_cert_details"] = "SANITIZE_SET"
        cfg["set_current_client_cert_details"] = {"uri": True}
    if profile.otlp is not None:
        cfg["tracing"] = _tracing(mesh, service)
    cfg["route_config"] = route_config
    cfg["http_filters"] = http_filters
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": cfg}


# --- retries and timeouts ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryOn:
    """A route's Envoy retry_on tokens, and the mesh.yaml statuses left out with the reason."""

    tokens: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]
    # Of `skipped`, the statuses the proxyless plane retries but Envoy has no retry_on token for:
    # the one case where the two planes differ (`meshctl lint` warns about it).
    no_envoy_token: tuple[str, ...] = ()

    @property
    def value(self) -> str:
        return ",".join(self.tokens)


def retry_on_tokens(retry_on: Iterable[str], *, idempotent: bool, streaming: bool = False) -> RetryOn:
    """Envoy retry_on for a route whose mesh.yaml `retry_on` is `retry_on`.

    Status tokens follow the proxyless plane (`retryable_codes`), in a fixed order; then
    ``reset`` (idempotent unary routes only: the server may have done the work) and the always-safe
    ``connect-failure,refused-stream``. A stream commits on its first message, so it gets only the
    always-safe tokens.
    """
    wanted = tuple(dict.fromkeys(retry_on))
    skipped: list[tuple[str, str]] = []
    if streaming:
        skipped += [(c, "streaming route: only never-processed failures are retried") for c in wanted]
        return RetryOn(ALWAYS_SAFE_TOKENS, tuple(skipped))
    allowed = retryable_codes(wanted, idempotent=idempotent)
    for code in wanted:
        if code not in allowed:
            why = ("never retried (the caller gave up)" if code == "CANCELLED" else
                   "not a failure" if code == "OK" else
                   "retried only on idempotent routes")
            skipped.append((code, why))
        elif code not in GRPC_RETRY_TOKENS:
            skipped.append((code, "Envoy has no retry_on token for it (gRPC tokens: "
                                  + ", ".join(GRPC_RETRY_TOKENS.values()) + ")"))
    tokens = [tok for code, tok in GRPC_RETRY_TOKENS.items() if code in allowed]
    if idempotent:
        tokens.append("reset")
    tokens += ALWAYS_SAFE_TOKENS
    return RetryOn(tuple(tokens), tuple(skipped),
                   tuple(code for code in wanted if code in allowed and code not in GRPC_RETRY_TOKENS))


def _retry_policy(rp: RoutePolicy) -> dict[str, Any] | None:
    retry = rp.retry
    if retry.max_retries == 0:
        return None
    on = retry_on_tokens(retry.retry_on, idempotent=rp.idempotent, streaming=rp.streaming)
    policy: dict[str, Any] = {"retry_on": on.value, "num_retries": retry.max_retries}
    if not rp.streaming and retry.per_try_timeout is not None and retry.per_try_timeout < rp.timeout:
        policy["per_try_timeout"] = _dur(retry.per_try_timeout)  # Envoy ignores one >= the route's
    policy["retry_back_off"] = {"base_interval": _dur(retry.backoff.base),
                                "max_interval": _dur(max(retry.backoff.max, retry.backoff.base))}
    policy["retry_host_predicate"] = [{
        "name": "envoy.retry_host_predicates.previous_hosts",
        "typed_config": _typed("envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"),
    }]
    policy["host_selection_retry_max_attempts"] = 3
    return policy


def _deadline(timeout: float, *, streaming: bool) -> dict[str, Any]:
    """RouteAction deadline fields (see the module docstring: never `timeout` beside
    `max_stream_duration`)."""
    if streaming:
        return {"timeout": "0s", "idle_timeout": _dur(timeout)}
    return {"max_stream_duration": {"max_stream_duration": _dur(timeout),
                                    "grpc_timeout_header_max": _dur(timeout)}}


def _match(pattern: str) -> dict[str, Any]:
    return {"prefix" if is_prefix(pattern) else "path": pattern, "grpc": {}}


def _route_name(service: str, pattern: str) -> str:
    return f"{service}/{method_name(pattern) or '*'}"


# --- listeners --------------------------------------------------------------------------------------
RBAC_FILTER = "envoy.filters.http.rbac"


def _rbac_filter() -> dict[str, Any]:
    """The inbound RBAC filter itself denies everything (an ALLOW list with no policy); the allow-list is
    the virtual host's per-route override (`_rbac_per_route`). A route configuration is what Envoy swaps
    under open connections (RDS), while a listener change reaches new connections only: so an allow rule
    removed by the control plane refuses the next call on a connection already open, and a route that
    somehow lacked the override would fail closed."""
    return {"name": RBAC_FILTER, "typed_config": _typed("envoy.extensions.filters.http.rbac.v3.RBAC",
                                                        rules={"action": "ALLOW", "policies": {}})}


def _rbac_per_route(mesh: MeshSpec, svc: ServiceSpec) -> dict[str, Any]:
    rules = {k: v for k, v in _rbac(mesh, svc)["typed_config"].items() if k != "@type"}
    return {RBAC_FILTER: _typed("envoy.extensions.filters.http.rbac.v3.RBACPerRoute", rbac=rules)}


def _rbac(mesh: MeshSpec, svc: ServiceSpec) -> dict[str, Any]:
    """ALLOW policies mirroring server.authz.Authorizer; anything else is denied with 403."""
    trust_prefix = f"spiffe://{mesh.mesh.trust_domain}/"
    policies: dict[str, Any] = {
        "mesh-open": {  # health and reflection: every authenticated identity of the trust domain
            "permissions": [{"url_path": {"path": {"prefix": p}}} for p in OPEN_PREFIXES],
            "principals": [{"authenticated": {"principal_name": {"prefix": trust_prefix}}}],
        },
    }
    for i, rule in enumerate(svc.allow):
        principals: list[dict[str, Any]] = []
        for caller in rule.from_:
            if caller == "*":
                matcher = {"prefix": trust_prefix}
            else:
                matcher = {"exact": caller if caller.startswith("spiffe://") else mesh.spiffe_id(caller)}
            principal = {"authenticated": {"principal_name": matcher}}
            if principal not in principals:
                principals.append(principal)
        permissions: list[dict[str, Any]] = [
            {"url_path": {"path": {"prefix" if is_prefix(m) else "exact": m}}} for m in rule.methods
        ] or [{"any": True}]
        policies[f"allow-{i}"] = {"permissions": permissions, "principals": principals}
    return {"name": "envoy.filters.http.rbac",
            "typed_config": _typed("envoy.extensions.filters.http.rbac.v3.RBAC",
                                   rules={"action": "ALLOW", "policies": policies})}


def _one_spiffe_id() -> dict[str, Any]:
    """A network RBAC filter, evaluated once per connection: refuse a client certificate with more than
    one URI SAN. An X.509-SVID has exactly one; the HTTP RBAC's `authenticated` principal matches if
    *any* URI SAN does, so a certificate naming an allowed caller and another identity would pass it.
    Envoy's `UriSanInput` gives the URI SANs joined by commas: a comma means a second one."""
    def action(name: str, verdict: str) -> dict[str, Any]:
        return {"name": name, "typed_config": _typed("envoy.config.rbac.v3.Action", name=name, action=verdict)}

    uri_sans = {"name": "uri_san", "typed_config": _typed("envoy.extensions.matching.common_inputs.ssl.v3.UriSanInput")}
    return {"name": "envoy.filters.network.rbac", "typed_config": _typed(
        "envoy.extensions.filters.network.rbac.v3.RBAC", stat_prefix="inbound_svid.",
        matcher={"matcher_list": {"matchers": [{
            "predicate": {"single_predicate": {"input": uri_sans, "value_match": {"contains": ","}}},
            "on_match": {"action": action("more-than-one-uri-san", "DENY")}}]},
            "on_no_match": {"action": action("one-uri-san", "ALLOW")}})}


XFCC = "x-forwarded-client-cert"


def caller_header_match(spiffe_id: str) -> dict[str, Any]:
    """An Envoy HeaderMatcher true when the inbound call's verified caller is `spiffe_id`: the sanitized
    `x-forwarded-client-cert` the inbound HCM sets ends with `URI=<id>` (By=, Hash= come first, and a second URI
    SAN never gets this far: the network RBAC refuses it)."""
    return {"name": XFCC, "string_match": {"suffix": f";URI={spiffe_id}"}}


def callers_header_match(spiffe_ids: Sequence[str]) -> dict[str, Any]:
    """`caller_header_match` for any of several callers (one anchored RE2 alternation)."""
    if len(spiffe_ids) == 1:
        return caller_header_match(spiffe_ids[0])
    alternatives = "|".join(re.escape(i) for i in spiffe_ids)
    return {"name": XFCC, "string_match": {"safe_regex": {"regex": f".*;URI=(?:{alternatives})"}}}


FAULT_FILTER = "envoy.filters.http.fault"
FAULT_TYPE = "envoy.extensions.filters.http.fault.v3.HTTPFault"


def _fault(fp: FaultPolicy, *, only_under: str | None = None) -> dict[str, Any]:
    """An HTTPFault of one route's fault: the same draws as the proxyless plane (policy/fault.py), for the
    callers it names; `only_under` a path prefix the request must have too. Empty when `fp` cannot fault
    anything: as a route's override, that turns the service's fault off for the route."""
    fault, cfg = fp.fault, dict[str, Any]()
    if not fp.active:
        return _typed(FAULT_TYPE)
    if fault.abort_status not in (None, "OK") and fault.abort_percent > 0:
        cfg["abort"] = {"grpc_status": GRPC_STATUS_NAMES.index(fault.abort_status or "OK"),
                        "percentage": _percent(fault.abort_percent)}
    if fault.delay and fault.delay_percent > 0:
        cfg["delay"] = {"fixed_delay": _dur(fault.delay), "percentage": _percent(fault.delay_percent)}
    headers: list[dict[str, Any]] = [{"name": ":path", "string_match": {"prefix": only_under}}] if only_under else []
    if fp.callers is not None:
        headers.append(callers_header_match(fp.callers))
    if headers:
        cfg["headers"] = headers
    return _typed(FAULT_TYPE, **cfg)


RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
CALLER_FILTERS = (FAULT_FILTER, RATE_LIMIT_FILTER)  # the inbound filters that match on the caller (XFCC)
RATE_LIMIT_STATS = "inbound_rate_limit"  # <prefix>.http_local_rate_limit.rate_limited counts refusals


def route_rate_limit_stats(pattern: str) -> str:
    """The stat prefix of a route's own buckets: `inbound_rate_limit_<Method>` (`_all` for a service prefix).
    One token, no dot: Envoy's `envoy.local_http_ratelimit_prefix` tag takes a single-token prefix, so on
    /stats/prometheus every scope is one series name with the scope as a label (a dotted prefix would be
    a metric name of its own per route, which no dashboard query can sum)."""
    return f"{RATE_LIMIT_STATS}_{method_name(pattern) or 'all'}"
CALLER_KEY = "caller"  # the descriptor entry a caller's own bucket is keyed on: its SPIFFE ID
_ALL = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}


def local_rate_limit(limit: RateLimit, stat_prefix: str = RATE_LIMIT_STATS) -> dict[str, Any]:
    """One scope's buckets (config.resolve.RateLimit) as a LocalRateLimit, for a virtual host or a route.

    Each bucket is Envoy's continuously refilled token bucket: `burst` max_tokens, `rate` tokens per 1 s,
    full at start (policy/ratelimit.py is the same bucket). A caller with its own bucket is named by a
    header_value_match action on the sanitized `x-forwarded-client-cert` (`caller_header_match`): its one
    descriptor `caller=<SPIFFE ID>` takes from that bucket only (`always_consume_default_token_bucket:
    false`); any other caller makes no descriptor and takes from the shared bucket (`token_bucket`).
    A refusal is RESOURCE_EXHAUSTED (not the UNAVAILABLE a 429 maps to) with `grpc-retry-pushback-ms`:
    Envoy cannot say when the bucket that refused will have a token, so the header is the refill period
    of the slowest bucket, ceil(1000 / rate) ms, the longest wait for one token."""
    def bucket(rate: int, burst: int) -> dict[str, Any]:
        return {"max_tokens": burst, "tokens_per_fill": rate, "fill_interval": "1s"}

    cfg = _typed("envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                 stat_prefix=stat_prefix, token_bucket=bucket(limit.shared.rate, limit.shared.burst),
                 filter_enabled={"runtime_key": f"{RATE_LIMIT_STATS}_enabled", **_ALL},
                 filter_enforced={"runtime_key": f"{RATE_LIMIT_STATS}_enforced", **_ALL},
                 response_headers_to_add=[{
                     "header": {"key": PUSHBACK_HEADER, "value": str(math.ceil(1000 / limit.slowest))},
                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}])
    if limit.callers:
        cfg["descriptors"] = [{"entries": [{"key": CALLER_KEY, "value": caller}],
                               "token_bucket": bucket(b.rate, b.burst)} for caller, b in limit.callers]
    cfg["always_consume_default_token_bucket"] = False
    cfg["rate_limited_as_resource_exhausted"] = True
    if limit.callers:
        cfg["rate_limits"] = [{"actions": [{"header_value_match": {
            "descriptor_key": CALLER_KEY, "descriptor_value": caller, "headers": [caller_header_match(caller)]}}]}
            for caller, _ in limit.callers]
    return cfg


# A route the rate limit filter skips (health checks, reflection, anything outside the service).
_NOT_LIMITED = _typed("envoy.config.route.v3.FilterConfig", disabled=True)


def _inbound_routes(mesh: MeshSpec, svc: ServiceSpec, profile: EnvoyProfile) -> list[dict[str, Any]]:
    """The inbound route configuration's routes: the app's methods by pattern where a deadline (streams)
    or a rate limit of their own sets them apart, health and reflection, then everything else.

    With rate limits, every pattern of the service is a route in match order (as the proxyless plane
    looks a method up, `config.resolve.inbound_rate_limits`): a route with its own block carries it, the
    rest share the virtual host's (the service's block: one set of buckets for all of them, as a
    per-route configuration would get buckets of its own), and health, reflection and the catch-all turn
    the filter off."""
    policies = route_policies(mesh, svc.name)
    limits = inbound_rate_limits(mesh, svc.name)
    # Only a backstop: the callers' sidecars hold each method's own deadline.
    backstop = max(rp.timeout for rp in policies if not rp.streaming)
    streaming_prefix = any(rp.streaming and is_prefix(rp.pattern) for rp in policies)
    faults = fault_policies(mesh, svc.name)
    # A route's own fault is its route's override of the filter (the service's fault); every route then
    # gets one, so that the first route matching a method decides, as on the proxyless plane.
    route_faults = {fp.pattern: fp for fp in faults if fp.match is not None} if any(
        r.fault is not None for r in svc.routes) else {}
    if limits:
        patterns = per_pattern(policies)
    else:
        patterns = [rp for rp in policies if rp.match is not None and (
            rp.streaming or (streaming_prefix and not is_prefix(rp.pattern)) or rp.pattern in route_faults)]
    own = {s.pattern: s.limit for s in limits if s.own and s.limit is not None}
    routes: list[dict[str, Any]] = []
    for rp in patterns:
        route: dict[str, Any] = {"name": _route_name(svc.name, rp.pattern), "match": _match(rp.pattern),
                                 "route": {"cluster": LOCAL_APP_CLUSTER,
                                           **_deadline(rp.timeout if rp.streaming else backstop,
                                                       streaming=rp.streaming)}}
        per_route: dict[str, Any] = {}
        if (limit := own.get(rp.pattern)) is not None:
            per_route[RATE_LIMIT_FILTER] = local_rate_limit(limit, route_rate_limit_stats(rp.pattern))
        if rp.pattern in route_faults:
            per_route[FAULT_FILTER] = _fault(route_faults[rp.pattern])
        if per_route:
            route["typed_per_filter_config"] = per_route
        routes.append(route)
    not_limited = {"typed_per_filter_config": {RATE_LIMIT_FILTER: _NOT_LIMITED}} if limits else {}
    if profile.otlp is not None or limits:
        # Probes are not traced, as on the app side (telemetry.tracing): every peer's sidecar health-
        # checks this one, and a trace per check would bury the calls in `meshctl traces` and Jaeger.
        # Nor rate limited, as MeshServer does not limit them.
        untraced = {k: {"numerator": 0} for k in ("client_sampling", "random_sampling", "overall_sampling")}
        routes += [{"name": f"{svc.name}/untraced{p.rstrip('/')}", "match": {"prefix": p, "grpc": {}},
                    "route": {"cluster": LOCAL_APP_CLUSTER, **_deadline(backstop, streaming=False)},
                    **({"tracing": untraced} if profile.otlp is not None else {}), **not_limited}
                   for p in OPEN_PREFIXES]
    routes.append({"name": f"{svc.name}/default", "match": {"prefix": "/", "grpc": {}},
                   "route": {"cluster": LOCAL_APP_CLUSTER, **_deadline(backstop, streaming=False)}, **not_limited})
    return routes


def _inbound_listener(mesh: MeshSpec, svc: ServiceSpec, profile: EnvoyProfile, port: int) -> dict[str, Any]:
    limits = inbound_rate_limits(mesh, svc.name)
    faults = fault_policies(mesh, svc.name)
    # After RBAC: a caller it refuses never takes a token (PERMISSION_DENIED, as on the proxyless plane).
    filters = [_rbac_filter()]
    if limits:
        filters.append({"name": RATE_LIMIT_FILTER, "typed_config": _typed(
            "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit", stat_prefix=RATE_LIMIT_STATS)})
    if mesh.observability.metrics.envoy_inbound_grpc_stats:
        filters.append(_grpc_stats([svc], upstream=False))
    per_filter = _rbac_per_route(mesh, svc)
    if any(fp.active for fp in faults):  # after RBAC: only authorized calls are faulted, as by MeshServer
        # The filter's own config is empty: the faults are the virtual host's and the routes' overrides, in
        # the route configuration, which reaches open connections (RDS) as the RBAC override does.
        filters.append({"name": FAULT_FILTER, "typed_config": _typed(FAULT_TYPE)})
        # Only the service's own methods: health checks and reflection are never faulted.
        per_filter[FAULT_FILTER] = _fault(faults[-1], only_under=service_prefix(svc.grpc_service))
    # Every inbound call goes to local_app, so the router's per-code and timing stats of that one cluster
    # (`upstream_rq_<code>`, `upstream_rq_time`: what `dynamic_stats` adds) would repeat the listener's
    # own `downstream_rq_<class>xx` and `downstream_rq_time`, at 9 k instructions a call (docs/benchmarks.md).
    # The callers' sidecars keep theirs: there they are each peer's view.
    filters.append(_router(dynamic_stats=False))
    if (shared := next((s.limit for s in limits if s.limit is not None and s.limit.scope is None), None)) is not None:
        per_filter[RATE_LIMIT_FILTER] = local_rate_limit(shared)
    route_config = {"name": "inbound", "virtual_hosts": [
        {"name": "local_app", "domains": ["*"], "routes": _inbound_routes(mesh, svc, profile),
         "typed_per_filter_config": per_filter}]}
    tls = _downstream_tls(profile, {"prefix": f"spiffe://{mesh.mesh.trust_domain}/"})
    return {
        "name": INBOUND_LISTENER,
        "address": _socket("0.0.0.0" if profile.kind == "pod" else "127.0.0.1", port),
        "traffic_direction": "INBOUND",
        "per_connection_buffer_limit_bytes": mesh.http2.per_connection_buffer_limit_bytes,
        "socket_options": _keepalive_socket_options(),
        "filter_chains": [{
            "transport_socket": tls,
            "filters": [_one_spiffe_id(),
                        _hcm(mesh, profile, svc.name, INBOUND_LISTENER, route_config, filters, inbound=True)],
        }],
    }


def peer_routes(mesh: MeshSpec, name: str) -> list[dict[str, Any]]:
    """Peer `name`'s routes in a caller's outbound route configuration, in match order, ending with its
    whole service (Envoy takes the first match): the same for every caller."""
    peer = mesh.service(name)
    routes = []
    for rp in per_pattern(route_policies(mesh, peer.name)):
        action: dict[str, Any] = {**_route_target(peer), "host_rewrite_literal": peer.name,
                                  **_deadline(rp.timeout, streaming=rp.streaming)}
        if (retry := _retry_policy(rp)) is not None:
            action["retry_policy"] = retry
        routes.append({"name": _route_name(peer.name, rp.pattern), "match": _match(rp.pattern), "route": action})
    return routes


def _route_target(peer: ServiceSpec) -> dict[str, Any]:
    """Where a route to `peer` sends: its cluster, or with canary weights one cluster per version, picked per
    request by weight (retries stay in the version picked, as Envoy routes a request once)."""
    if not peer.canary:
        return {"cluster": peer.name}
    return {"weighted_clusters": {"clusters": [{"name": version_cluster(peer.name, v), "weight": w}
                                               for v, w in sorted(peer.canary.items())]}}


OUTBOUND_ROUTES = "outbound"  # the outbound listener's route configuration


def outbound_route_config(routes: Sequence[Any]) -> dict[str, Any]:
    """The outbound listener's route configuration: `routes`, each peer's `peer_routes` in turn."""
    return {"name": OUTBOUND_ROUTES, "virtual_hosts": [{"name": "mesh", "domains": ["*"], "routes": list(routes)}]}


NO_PEER_STATUS = 403  # gRPC clients see a local reply's 403 as PERMISSION_DENIED, its body as the message


def outbound_refusal(service: str) -> dict[str, Any]:
    """The outbound route configuration's last route: a call no peer's route takes (a service `service`
    may not call, or no service of the mesh serves) is answered by the sidecar itself, PERMISSION_DENIED
    with a message naming `service`, as the peer's own sidecar would answer a caller it does not allow.
    Envoy's default for an unmatched path is a bare 404, which gRPC reports as UNIMPLEMENTED."""
    message = (f"aivo-mesh: {service}'s sidecar has no route for this method: it calls only the services "
               f"whose mesh.yaml allow list names {service}, each by its gRPC service in the path")
    return {"name": f"{service}/no-peer", "match": {"prefix": "/"},
            "direct_response": {"status": NO_PEER_STATUS, "body": {"inline_string": message}}}


def _outbound_listener(mesh: MeshSpec, svc: ServiceSpec, profile: EnvoyProfile, port: int, *,
                       with_peers: bool) -> dict[str, Any]:
    peers = [mesh.service(p) for p in callable_peers(mesh, svc.name)]
    routes = [r for p in peers for r in peer_routes(mesh, p.name)] if with_peers else []
    route_config = outbound_route_config([*routes, outbound_refusal(svc.name)])
    # Per-method stats are taken once per call, at the server's inbound sidecar, unless asked for here too.
    filters = [_router()]
    if mesh.observability.metrics.envoy_outbound_grpc_stats:
        filters.insert(0, _grpc_stats(peers, upstream=True))
    chain: dict[str, Any] = {}
    if svc.sidecar.outbound_tls:
        # Calls leave under the service's certificate, so only a holder of that same certificate (the app)
        # may hand them over. The sidecar answers with it too: its DNS SANs name the service and localhost.
        chain["transport_socket"] = _downstream_tls(profile, {"exact": mesh.spiffe_id(svc.name)})
    chain["filters"] = [_hcm(mesh, profile, svc.name, OUTBOUND_LISTENER, route_config, filters, inbound=False)]
    return {
        "name": OUTBOUND_LISTENER,
        # The app's leg never leaves loopback; on a pipe, only the mesh's user can open it.
        "address": _pipe(profile.outbound_pipe, listener=True) if profile.outbound_pipe
        else _socket("127.0.0.1", port),
        "traffic_direction": "OUTBOUND",
        "per_connection_buffer_limit_bytes": mesh.http2.per_connection_buffer_limit_bytes,
        "filter_chains": [chain],
    }


def _stats_listener() -> dict[str, Any]:
    """GET /stats/prometheus -> the admin cluster; every other path or method gets a 404."""
    route_config = {"name": STATS_LISTENER, "virtual_hosts": [{"name": "stats", "domains": ["*"], "routes": [{
        "name": "prometheus",
        "match": {"path": "/stats/prometheus", "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
        "route": {"cluster": ADMIN_CLUSTER, "timeout": "5s"},
    }]}]}
    hcm = _typed("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                 stat_prefix=STATS_LISTENER, codec_type="AUTO", route_config=route_config,
                 http_filters=[_router()])
    return {"name": STATS_LISTENER, "address": _socket("0.0.0.0", POD_STATS_PORT),
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}


# --- clusters ---------------------------------------------------------------------------------------
def peer_cluster(mesh: MeshSpec, name: str, profile: EnvoyProfile, version: str | None = None) -> dict[str, Any]:
    """The cluster a sidecar calls peer `name` (or one `version` of it) through: `peer_cluster_policy`, the
    same for every caller of the peer, then the transport socket (`peer_tls`), which names the caller's own
    certificate."""
    return {**peer_cluster_policy(mesh, name, profile.kind, version),
            "transport_socket": peer_tls(mesh, name, profile)}


def peer_tls(mesh: MeshSpec, name: str, profile: EnvoyProfile) -> dict[str, Any]:
    """How a sidecar on `profile` calls peer `name`: mTLS with the caller's certificate, to the peer's
    identity only."""
    return {"name": "envoy.transport_sockets.tls", "typed_config": _typed(
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        sni=name,
        common_tls_context=_common_tls(profile, {"exact": mesh.spiffe_id(name)}),
    )}


def peer_cluster_policy(mesh: MeshSpec, name: str, kind: Kind, version: str | None = None) -> dict[str, Any]:
    """`peer_cluster` but its transport socket: where the peer is and how it is called (limits, outlier
    detection, health checks), the same for every caller (the control plane builds it once per peer,
    xds/resources.py). With `version`, the cluster of that canary version (`version_cluster`): the same
    policy, its own hosts (`version_hosts`), so limits and ejections count per version."""
    peer = mesh.service(name)
    sp = service_policy(mesh, peer.name)
    if version is None:
        cluster_name, hosts = peer.name, [peer_address(mesh, peer.name, kind)]
    else:
        cluster_name, hosts = version_cluster(peer.name, version), version_hosts(mesh, peer, version, kind)
    od, hc, lim, budget = sp.outlier_detection, sp.health_check, sp.limits, sp.retry_budget
    cluster: dict[str, Any] = {"name": cluster_name}
    if all(_is_ip(host) for host, _ in hosts):
        cluster["type"] = "STATIC"
    else:
        cluster["type"] = "STRICT_DNS"
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    cluster.update({
        "connect_timeout": CONNECT_TIMEOUT,
        "lb_policy": "ROUND_ROBIN",
        "common_lb_config": {
            # Envoy merges health-only host updates that come within 1 s (the default window) of the
            # previous one, so an ejection soon after a health-check transition would reach the load
            # balancer only when the window closes, and the ejected host keeps getting first attempts.
            "update_merge_window": "0s",
            # No panic routing: at the default 50 % a peer with one host (every rendered peer) that is
            # ejected or failing health checks keeps getting traffic, so the breaker never holds. With 0
            # such calls fail fast with UNAVAILABLE "no healthy upstream" (as Istio with outlier detection).
            "healthy_panic_threshold": {"value": 0},
        },
        "per_connection_buffer_limit_bytes": mesh.http2.per_connection_buffer_limit_bytes,
        "typed_extension_protocol_options": _upstream_h2(mesh, keepalive=True),
        "upstream_connection_options": {"tcp_keepalive": {
            "keepalive_time": TCP_KEEPALIVE_TIME, "keepalive_interval": TCP_KEEPALIVE_INTERVAL,
            "keepalive_probes": TCP_KEEPALIVE_PROBES}},
        "circuit_breakers": {"thresholds": [{  # concurrency caps + retry budget; no max_retries (overridden)
            "priority": "DEFAULT",
            "max_connections": lim.max_connections,
            "max_pending_requests": lim.max_pending_requests,
            "max_requests": lim.max_requests,
            "retry_budget": {"budget_percent": {"value": float(budget.percent)},
                             "min_retry_concurrency": budget.min_retry_concurrency},
            "track_remaining": True,
        }]},
        "outlier_detection": {  # the failure-count breaker, per host (module docstring: timing)
            "consecutive_5xx": od.consecutive_failures,
            "enforcing_consecutive_5xx": 100,
            "consecutive_gateway_failure": od.consecutive_failures,
            "enforcing_consecutive_gateway_failure": 100,  # Envoy's default 0 counts but never ejects
            "enforcing_success_rate": 0,  # not part of the platform's design
            "interval": _dur(od.interval),
            "base_ejection_time": _dur(od.base_ejection_time),
            "max_ejection_time": _dur(max(od.max_ejection_time, od.base_ejection_time)),
            "max_ejection_percent": math.floor(od.max_ejection_percent),
            # Else a percent below 100/hosts ejects nothing: 50 % of a one-host peer is ejections_overflow.
            "always_eject_one_host": True,
            "successful_active_health_check_uneject_host": False,
        },
        "health_checks": [{  # over the cluster's TLS transport socket (SNI, client cert) like any request
            "timeout": _dur(hc.timeout),
            "interval": _dur(hc.interval),
            "unhealthy_threshold": hc.unhealthy_threshold,
            "healthy_threshold": hc.healthy_threshold,
            # A host that is new or failing (e.g. a peer still starting) is re-checked every couple of
            # seconds, with or without traffic, so it joins within seconds instead of one interval
            # later; healthy hosts are checked at the mesh.yaml interval.
            "unhealthy_interval": _dur(min(hc.interval, UNHEALTHY_RECHECK)),
            "no_traffic_interval": _dur(min(hc.interval, UNHEALTHY_RECHECK)),
            "no_traffic_healthy_interval": _dur(hc.interval),
            "grpc_health_check": {"service_name": peer.grpc_service, "authority": peer.name},
        }],
        "load_assignment": _hosts_assignment(cluster_name, hosts),
    })
    return cluster


UNLIMITED = 4_294_967_295  # a circuit-breaker threshold that never trips (a uint32's maximum)


def _local_app_cluster(mesh: MeshSpec, svc: ServiceSpec, profile: EnvoyProfile) -> dict[str, Any]:
    return {
        "name": LOCAL_APP_CLUSTER,
        "type": "STATIC",
        "connect_timeout": CONNECT_TIMEOUT,
        "per_connection_buffer_limit_bytes": mesh.http2.per_connection_buffer_limit_bytes,
        # No h2 PING: the app is on loopback, and grpc servers answer frequent pings with GOAWAY.
        "typed_extension_protocol_options": _upstream_h2(mesh, keepalive=False),
        # No caps of its own, as Istio's inbound clusters (max uint32): `limits` are each caller's caps on its
        # calls to this service, held by the callers' sidecars and MeshClients. Here they would cap every
        # caller together, which a MeshServer does not do, and a cold connection to the app would overflow
        # its pending queue.
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT",
            "max_connections": UNLIMITED,
            "max_pending_requests": UNLIMITED,
            "max_requests": UNLIMITED,
            "max_retries": UNLIMITED,
            "track_remaining": True,
        }]},
        "load_assignment": _load_assignment(LOCAL_APP_CLUSTER, "127.0.0.1", svc.local_port,
                                            _pipe(profile.app_pipe, listener=False) if profile.app_pipe else None),
    }


def _plain_cluster(name: str, host: str, port: int, *, h2: bool, mesh: MeshSpec) -> dict[str, Any]:
    cluster: dict[str, Any] = {"name": name}
    if _is_ip(host):
        cluster["type"] = "STATIC"
    else:
        cluster["type"] = "STRICT_DNS"
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    cluster["connect_timeout"] = CONNECT_TIMEOUT
    if h2:
        cluster["typed_extension_protocol_options"] = _upstream_h2(mesh, keepalive=False)
    cluster["load_assignment"] = _load_assignment(name, host, port)
    return cluster


# --- the bootstrap and its SDS files ----------------------------------------------------------------
def bootstrap(mesh: MeshSpec, service: str, profile: EnvoyProfile, *, with_peers: bool = True) -> Config:
    """The Envoy bootstrap of `service`'s sidecar (a dict to dump as YAML or JSON), built afresh on every
    call (the caller may change it).

    `with_peers=False` leaves out what is the same for every caller of a peer (`callable_peers`): its
    cluster (`peer_cluster`) and its routes (`peer_routes`; the outbound route configuration is left
    without routes). For a caller that builds those once per peer and shares them: the control plane."""
    svc = mesh.service(service)
    ports = sidecar_ports(mesh, service, profile.kind)
    listeners = [_inbound_listener(mesh, svc, profile, ports.inbound),
                 _outbound_listener(mesh, svc, profile, ports.outbound, with_peers=with_peers)]
    clusters = [_local_app_cluster(mesh, svc, profile)]
    if with_peers:
        clusters += [peer_cluster(mesh, p, profile, v) for p in callable_peers(mesh, service)
                     for v in canary_versions(mesh.service(p)) or (None,)]
    if profile.kind == "pod":
        listeners.append(_stats_listener())
        clusters.append(_plain_cluster(ADMIN_CLUSTER, "127.0.0.1", ports.admin, h2=False, mesh=mesh))
    if profile.otlp is not None:
        clusters.append(_plain_cluster(OTLP_CLUSTER, *profile.otlp, h2=True, mesh=mesh))
    config: Config = {
        "node": {"id": f"{service}-sidecar", "cluster": service},
        "admin": {"address": _socket("127.0.0.1", ports.admin)},  # loopback only: the admin API mutates
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }
    if profile.statsd is not None:
        host, port = profile.statsd
        # StatsdSink.address must be an IP literal (UDP); a host name goes through a DNS cluster (TCP).
        if _is_ip(host):
            target: dict[str, Any] = {"address": _socket(host, port)}
        else:
            clusters.append(_plain_cluster(STATSD_CLUSTER, host, port, h2=False, mesh=mesh))
            target = {"tcp_cluster_name": STATSD_CLUSTER}
        config["stats_sinks"] = [{"name": "envoy.stat_sinks.statsd", "typed_config": _typed(
            "envoy.config.metrics.v3.StatsdSink", **target, prefix=mesh.observability.statsd.prefix)}]
    return config


SECRET_TYPE = "envoy.extensions.transport_sockets.tls.v3.Secret"


def tls_certificate_secret(cert_file: str, key_file: str, watched_dir: str) -> Config:
    """The SDS file of a sidecar's own certificate (`svc_cert`)."""
    return {"resources": [_typed(SECRET_TYPE, name=SDS_CERT, tls_certificate={
        "certificate_chain": {"filename": cert_file},
        "private_key": {"filename": key_file},
        "watched_directory": {"path": watched_dir},
    })]}


def validation_secret(ca_file: str, watched_dir: str, *, crl_file: str | None = None,
                      spki_pins: Sequence[str] = ()) -> Config:
    """The SDS file of what a sidecar trusts (`mesh_ca`), merged into every listener's and cluster's
    validation context (which adds the URI SAN match).

    `crl_file`: mesh.yaml's revoked serials, signed by the issuing CA (pki/revoke.py); only the leaf is
    looked up in it (the CA certificates have no CRL of their own). `spki_pins`: when given, the only
    keys a peer may present: the keys of the certificates that passed the mesh's peer policy (the local
    mesh publishes them, runtime/sidecar_certs.py), so Envoy refuses what its validator cannot check (key
    size, signature hash, CA:TRUE leaves, second URI SANs, rotated-away keys)."""
    context: dict[str, Any] = {"trusted_ca": {"filename": ca_file}}
    if crl_file is not None:
        context |= {"crl": {"filename": crl_file}, "only_verify_leaf_cert_crl": True}
    if spki_pins:
        context["verify_certificate_spki"] = sorted(spki_pins)
    context["watched_directory"] = {"path": watched_dir}
    return {"resources": [_typed(SECRET_TYPE, name=SDS_CA, validation_context=context)]}


def sds_files(mesh: MeshSpec, service: str, profile: EnvoyProfile) -> dict[str, Config]:
    """The SDS files `bootstrap` loads from `profile.sds_dir`, keyed by file name, reading the certs
    directory as it is (Kubernetes and Compose mount it; the local mesh vets it first, see
    runtime/sidecar_certs.py).

    ``watched_directory`` is the directory where rotation renames files: ``meshctl certs rotate``
    ``os.replace``s ``services/<svc>.crt`` and ``services/<svc>-key.pem`` (so the certificate's
    watch is ``<cert_dir>/services``) and a CA rollover replaces ``ca/ca.crt`` (``<cert_dir>/ca``).
    Envoy re-reads every file of the secret on each move into that directory and keeps the old
    credentials if the pair does not match yet (``sds.<name>.key_rotation_failed``). With revoked
    serials in mesh.yaml, the trust also reads ``ca/crl.pem`` (``meshctl certs revoke`` writes it).
    """
    mesh.service(service)
    certs = CertLayout(Path(profile.cert_dir))
    cert, key = certs.service_paths(service)
    revoked = any(r.serial is not None for r in mesh.certificates.revoked)
    return {
        TLS_CERT_FILE: tls_certificate_secret(cert.as_posix(), key.as_posix(), certs.services_dir.as_posix()),
        MESH_CA_FILE: validation_secret(certs.ca_cert.as_posix(), certs.ca_dir.as_posix(),
                                        crl_file=certs.crl.as_posix() if revoked else None),
    }


def relocate(doc: Any, mapping: Mapping[str, str]) -> Any:
    """A copy of `doc` with every string starting with a key of `mapping` re-rooted at its value
    (longest key first): ``relocate(cfg, {"/etc/envoy": str(tmp)})`` to run a pod file locally."""
    keys = sorted(mapping, key=len, reverse=True)
    if isinstance(doc, str):
        for k in keys:
            if doc == k or doc.startswith(k.rstrip("/") + "/"):
                return mapping[k].rstrip("/") + doc[len(k.rstrip("/")):]
        return doc
    if isinstance(doc, Mapping):
        return {key: relocate(value, mapping) for key, value in doc.items()}
    if isinstance(doc, list | tuple):
        return [relocate(v, mapping) for v in doc]
    return doc


def _readme(mesh: MeshSpec) -> str:
    local = local_ports(mesh)
    certs = CertLayout(Path(POD_CERT_DIR))
    cert, key = certs.service_paths("<svc>")
    rows = "\n".join(
        f"| `{s.name}` | {s.local_port} | {', '.join(callable_peers(mesh, s.name)) or '—'} | "
        f"{local[s.name].inbound} / {local[s.name].outbound} / {local[s.name].admin} |"
        for s in mesh.services
    )
    return f"""# Envoy sidecars (generated)

Generated by `meshctl render envoy` from mesh.yaml; do not edit by hand (`meshctl render envoy --check`
fails on drift). Mapping and choices: docs/envoy.md.

Each `<svc>/` holds the **pod profile** (one container/pod per service):

- `envoy.yaml`: the bootstrap. Inbound mTLS listener on `0.0.0.0:{POD_INBOUND_PORT}` -> the app on
  `127.0.0.1:<local_port>` (plaintext h2); outbound listener on `127.0.0.1:{POD_OUTBOUND_PORT}` (the app
  dials it in plaintext h2) -> peers at `<peer>:{POD_INBOUND_PORT}` over mTLS; admin on
  `127.0.0.1:{POD_ADMIN_PORT}`; `GET /stats/prometheus` on `0.0.0.0:{POD_STATS_PORT}` for Prometheus.
- `sds/{TLS_CERT_FILE}`, `sds/{MESH_CA_FILE}`: file-based SDS, mounted at `{POD_SDS_DIR}`. They name
  `{cert.as_posix()}`, `.../{key.relative_to(certs.root).as_posix()}` and `{certs.ca_cert.as_posix()}`: mount the
  certs directory's `services/` and `ca/` *directories* (not single files) so `meshctl certs rotate`
  reaches Envoy without a restart.

| service | app (local_port) | outbound peers | one-machine ports (inbound / outbound / admin) |
|---|---|---|---|
{rows}

Lint: `meshctl lint` (checks what `envoy --mode validate` accepts but is wrong).
"""


def render(mesh: MeshSpec) -> dict[str, Document]:
    """Registry entry: the pod profile of every service, plus a README."""
    profile = EnvoyProfile.pod(mesh)
    out: dict[str, Document] = {"README.md": _readme(mesh)}
    for name in mesh.service_names:
        out[f"{name}/envoy.yaml"] = bootstrap(mesh, name, profile)
        for file, doc in sds_files(mesh, name, profile).items():
            out[f"{name}/sds/{file}"] = doc
    return out
