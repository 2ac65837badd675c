"""mesh.yaml -> Linkerd 2.19 + Kubernetes resources: one multi-document `<svc>.yaml` per service.

What each service gets (apiVersions per notes/linkerd-consul.md §1, the storage versions of the CRDs):

    ServiceAccount            <svc>                 its Linkerd identity
                                                    <svc>.<ns>.serviceaccount.identity.linkerd.cluster.local
    Service                   <svc>                 port 50051 "grpc" -> the container's mesh port
    Deployment                <svc>                 linkerd.io/inject: enabled, grpc probes, certs Secret
    Server                    <svc>-grpc            policy.linkerd.io/v1beta3, proxyProtocol gRPC, deny
    GRPCRoute (inbound)       <svc>-...             one per method pattern of the allow list + health
    MeshTLSAuthentication     <svc>-allow-<i>       the callers of allow rule i
    AuthorizationPolicy       <svc>-...             (route, rule) pairs: who may call which method
    HTTPLocalRateLimitPolicy  <svc>-rate-limit      only for services with a `rate_limit` block (below)
    ServiceProfile            <svc>.<ns>.svc.cluster.local   linkerd_model: serviceprofile
      or Service annotations + outbound GRPCRoutes                   linkerd_model: annotations
    TrafficSplit / weighted backendRefs              only for services with `canary` weights

Retries and timeouts go either into a ServiceProfile or into `retry.linkerd.io/*` /
`timeout.linkerd.io/*` annotations, never both for one service: a ServiceProfile makes Linkerd
ignore the annotations, outbound GRPCRoutes and failure accrual altogether (notes §2). For the same
reason canary weights become a TrafficSplit (linkerd-smi turns it into ServiceProfile dstOverrides)
in the ServiceProfile model, and weighted GRPCRoute backendRefs in the annotation model.

Authorization mirrors MeshServer's Authorizer (server/authz.py): a method is allowed for a caller
when some allow rule lists the caller (or `*`) and a pattern covering the method (no patterns = all
methods). Linkerd matches a request to ONE route (Gateway API precedence: an exact method beats a
whole-service match), so there is one inbound GRPCRoute per distinct pattern, and every rule that
covers a route's pattern gets its own AuthorizationPolicy on that route. Health and reflection stay
open to every meshed identity, as in MeshServer; kubelet's grpc probes (unmeshed) may call health.

A service's `rate_limit` becomes an HTTPLocalRateLimitPolicy on its Server: `requests_per_second` as
`total` (one shared bucket) or, with `per_caller`, as `identity` (a bucket per identity), and each of
`callers` as an override naming its ServiceAccount. What Linkerd cannot say (docs/planes.md): `burst`
(its bucket holds `requestsPerSecond`), routes' own blocks (the policy targets a whole Server), callers
that are SPIFFE IDs of another trust domain (no ServiceAccount to name); and it limits health checks too
(they reach the same Server), and counts an override caller's calls against `total` as well.

Pure and deterministic: no I/O; the same mesh gives byte-identical files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from aivo_mesh.config.model import MeshSpec, RetrySpec, ServiceSpec, format_duration, known_methods
from aivo_mesh.config.patterns import covers_any, is_prefix, method_name, service_name, service_prefix
from aivo_mesh.config.ports import POD_INBOUND_PORT
from aivo_mesh.config.resolve import per_pattern, policy_for, route_policies, service_policy
from aivo_mesh.pki.layout import IMAGE_CERTS_DIR, CertLayout
from aivo_mesh.policy.classify import retryable_codes
from aivo_mesh.render import Document
from aivo_mesh.render.yamltext import YamlWriter

POD_GRPC_PORT = POD_INBOUND_PORT  # the Service port every mesh service is reached on in a cluster
IMAGE = "aivo-mesh:latest"
CERTS = CertLayout(Path(IMAGE_CERTS_DIR))
SECRET_ITEMS = CertLayout(Path())  # paths relative to the certs directory
CONFIG_DIR = "/etc/aivo-mesh/config"
DATA_DIR = "/var/lib/aivo-mesh"
CONFIG_MAP = "aivo-mesh-config"
# Kubelet's gRPC probes are not meshed: health is open to these networks (narrow to the node CIDRs).
PROBE_NETWORKS = ("0.0.0.0/0", "::/0")

# Server.spec.proxyProtocol values Linkerd accepts; the CRD schema only says `string` (notes §1).
PROXY_PROTOCOLS = frozenset({"unknown", "HTTP/1", "HTTP/2", "gRPC", "opaque", "TLS"})
# gRPC statuses `retry.linkerd.io/grpc` understands (notes §2); anything else fails to parse.
LINKERD_GRPC_RETRY = {"CANCELLED": "cancelled", "DEADLINE_EXCEEDED": "deadline-exceeded",
                      "INTERNAL": "internal", "RESOURCE_EXHAUSTED": "resource-exhausted",
                      "UNAVAILABLE": "unavailable"}
OPEN_SERVICES = {  # open to every meshed identity, as server/authz.py OPEN_PREFIXES
    "health": ("grpc.health.v1.Health",),
    "reflection": ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"),
}

SPLIT_API = "split.smi-spec.io/v1alpha2"
GATEWAY_API = "gateway.networking.k8s.io/v1"
POLICY_GROUP = "policy.linkerd.io"
GATEWAY_GROUP = "gateway.networking.k8s.io"


# -- helpers ---------------------------------------------------------------------------------------

def fqdn(mesh: MeshSpec, service: str) -> str:
    return f"{service}.{mesh.mesh.namespace}.svc.cluster.local"


def linkerd_identity(sa: str, namespace: str) -> str:
    return f"{sa}.{namespace}.serviceaccount.identity.linkerd.cluster.local"


def caller_identity(mesh: MeshSpec, caller: str) -> str:
    """An allow-list caller as a Linkerd mesh identity. Service and client names are ServiceAccounts
    of the mesh namespace; a SPIFFE ID of this trust domain (`spiffe://td/ns/N/sa/S`) becomes the
    identity of ServiceAccount S in namespace N; `*` stays `*` (any meshed client); other SPIFFE IDs
    are passed through (Linkerd matches SPIFFE identities of mesh-expansion workloads verbatim)."""
    if caller == "*":
        return "*"
    m = re.fullmatch(rf"spiffe://{re.escape(mesh.mesh.trust_domain)}/ns/([^/]+)/sa/([^/]+)", caller)
    if m:
        return linkerd_identity(m.group(2), m.group(1))
    if caller.startswith("spiffe://"):
        return caller
    return linkerd_identity(caller, mesh.mesh.namespace)


def path_regex(pattern: str) -> str:
    """`/pkg.Svc/Method` -> `/pkg\\.Svc/Method`; a prefix `/pkg.Svc/` matches any one method."""
    svc, method = re.escape(service_name(pattern)), method_name(pattern)
    return f"/{svc}/{re.escape(method)}" if method else f"/{svc}/[^/]+"


def grpc_methods(grpc_service: str) -> tuple[str, ...]:
    """Full method paths of a service in the protos aivo-mesh ships, in proto order; () if unknown."""
    return tuple(f"/{grpc_service}/{m}" for m in known_methods(grpc_service))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _meta(mesh: MeshSpec, name: str, labels: dict[str, str] | None = None,
          annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": mesh.mesh.namespace}
    if labels:
        meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def _labels(mesh: MeshSpec, svc: ServiceSpec, version: str | None = None) -> dict[str, str]:
    labels = {"app": svc.name, "app.kubernetes.io/name": svc.name, "app.kubernetes.io/part-of": mesh.mesh.name}
    if version is not None:
        labels["version"] = version
    return labels


def _go_duration(seconds: float) -> str:
    return format_duration(seconds)


def _linkerd_retry_statuses(retry: RetrySpec, idempotent: bool) -> list[str]:
    codes = retryable_codes(retry.retry_on, idempotent=idempotent)
    return [LINKERD_GRPC_RETRY[c] for c in sorted(codes) if c in LINKERD_GRPC_RETRY]


# -- Kubernetes workload ---------------------------------------------------------------------------

def service_account(mesh: MeshSpec, name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": _meta(mesh, name, {"app.kubernetes.io/part-of": mesh.mesh.name})}


def k8s_service(mesh: MeshSpec, svc: ServiceSpec, *, name: str | None = None, version: str | None = None,
                annotations: dict[str, str] | None = None) -> dict[str, Any]:
    selector = {"app": svc.name}
    if version is not None:
        selector["version"] = version
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(mesh, name or svc.name, _labels(mesh, svc, version), annotations),
        "spec": {
            "selector": selector,
            "ports": [{"name": "grpc", "port": POD_GRPC_PORT, "targetPort": "grpc", "protocol": "TCP",
                       "appProtocol": "kubernetes.io/h2c"}],
        },
    }


def deployment(mesh: MeshSpec, svc: ServiceSpec, *, version: str | None = None) -> dict[str, Any]:
    """The service's pods. The app serves plaintext gRPC on its mesh port inside the pod; the Linkerd
    proxy terminates mTLS and enforces the Server's policy. The mesh certificates are still mounted
    (read-only, from Secret `<svc>-mesh-certs`, in the `meshctl certs` layout) for the app's own
    MeshClient identity and for the deployment variables (CA_CERT_PATH, ...). Tracing follows the
    mounted mesh.yaml (see `env`)."""
    name = svc.name if version is None else f"{svc.name}-{version}"
    version_label = version or svc.version
    labels = _labels(mesh, svc, version_label)
    admin = svc.admin_port
    health = service_policy(mesh, svc.name).health_check
    cert, key = CERTS.service_paths(svc.name)
    cert_rel, key_rel = (p.as_posix() for p in SECRET_ITEMS.service_paths(svc.name))
    env = [
        {"name": "SERVICE_NAME", "value": svc.name},
        {"name": "SERVICE_VERSION", "value": version_label},
        {"name": "GRPC_PORT", "value": str(svc.port)},
        {"name": "LOCAL_SERVICE_PORT", "value": str(svc.local_port)},
        {"name": "CA_CERT_PATH", "value": CERTS.ca_cert.as_posix()},
        {"name": "CLIENT_CERT_PATH", "value": cert.as_posix()},
        {"name": "CLIENT_KEY_PATH", "value": key.as_posix()},
        # No JAEGER_HOST / OTEL_EXPORTER_OTLP_ENDPOINT: no collector is rendered for the cluster, so
        # tracing is what the mounted mesh.yaml says (off unless `observability.tracing` enables it,
        # to the cluster's collector), or what the platform sets with the standard OTEL_* variables.
        # Where the admin/metrics endpoint binds; a non-loopback host also needs the process to allow
        # remote admin access (the endpoint can reset breakers).
        {"name": "METRICS_HOST", "value": "0.0.0.0"},
    ]
    # The app speaks plaintext gRPC both ways so the Linkerd proxy can see it; the proxy adds mTLS.
    args = ["serve", svc.name, "--insecure", "--plaintext-peers", "--config", f"{CONFIG_DIR}/mesh.yaml",
            "--certs", IMAGE_CERTS_DIR, "--data-dir", DATA_DIR]
    if admin is not None:
        args += ["--admin-port", str(admin)]
    ports: list[dict[str, Any]] = [{"name": "grpc", "containerPort": svc.port, "protocol": "TCP"}]
    if admin is not None:
        ports.append({"name": "admin", "containerPort": admin, "protocol": "TCP"})
    probe_period = max(1, round(min(health.interval, 10.0)))
    probe_timeout = max(1, round(health.timeout))
    container = {
        "name": svc.name,
        "image": IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["meshctl"],
        "args": args,
        "ports": ports,
        "env": env,
        "readinessProbe": {"grpc": {"port": svc.port, "service": svc.grpc_service},
                           "periodSeconds": probe_period, "timeoutSeconds": probe_timeout, "failureThreshold": 3},
        "livenessProbe": {"grpc": {"port": svc.port}, "initialDelaySeconds": 10, "periodSeconds": 20,
                          "timeoutSeconds": probe_timeout, "failureThreshold": 3},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                      "limits": {"cpu": "1", "memory": "512Mi"}},
        # Root inside the pod so the 0400 key of the Secret volume is readable: kubelet's fsGroup
        # would make it group-readable (0440), which the PKI loader refuses. No capabilities, no
        # privilege escalation, read-only root filesystem.
        "securityContext": {"runAsUser": 0, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [
            {"name": "mesh-certs", "mountPath": IMAGE_CERTS_DIR, "readOnly": True},
            {"name": "mesh-config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "data", "mountPath": DATA_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(mesh, name, labels),
        "spec": {
            "replicas": 1,
            # The selector is immutable: only canary Deployments (one per version) select on version.
            "selector": {"matchLabels": {"app": svc.name} if version is None else {"app": svc.name,
                                                                                   "version": version}},
            "template": {
                "metadata": {"labels": labels, "annotations": {"linkerd.io/inject": "enabled"}},
                "spec": {
                    "serviceAccountName": svc.name,
                    "terminationGracePeriodSeconds": 30,
                    "containers": [container],
                    "volumes": [
                        {"name": "mesh-certs", "secret": {
                            "secretName": f"{svc.name}-mesh-certs", "defaultMode": 0o400,
                            "items": [{"key": "ca.crt", "path": SECRET_ITEMS.ca_cert.as_posix()},
                                      {"key": "tls.crt", "path": cert_rel},
                                      {"key": "tls.key", "path": key_rel}]}},
                        {"name": "mesh-config", "configMap": {"name": CONFIG_MAP}},
                        {"name": "data", "emptyDir": {}},
                        {"name": "tmp", "emptyDir": {"medium": "Memory"}},
                    ],
                },
            },
        },
    }


def cluster_mesh(mesh: MeshSpec) -> MeshSpec:
    """The mesh as the pods see it: every service binds all interfaces of its pod and is reached
    through its Kubernetes Service on port 50051. Ports stay those of mesh.yaml (unique mesh-wide)."""
    services = tuple(s.model_copy(update={"host": "0.0.0.0", "endpoints": (f"{fqdn(mesh, s.name)}:{POD_GRPC_PORT}",)})
                     for s in mesh.services)
    return mesh.model_copy(update={"services": services})


def config_map(mesh: MeshSpec) -> dict[str, Any]:
    data = cluster_mesh(mesh).model_dump(mode="json", by_alias=True, exclude_unset=True)
    for svc in data["services"]:  # model_copy marks the updated keys as set; say so explicitly anyway
        svc["host"], svc["endpoints"] = "0.0.0.0", [f"{fqdn(mesh, svc['name'])}:{POD_GRPC_PORT}"]
    text = "# mesh.yaml as seen inside the cluster (rendered by meshctl render linkerd)\n" + YamlWriter(
        literal_blocks=False).dump(data)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(mesh, CONFIG_MAP, {"app.kubernetes.io/part-of": mesh.mesh.name}),
            "data": {"mesh.yaml": text}}


# -- retries and timeouts: ServiceProfile model ------------------------------------------------------

def _profile_route(name: str, regex: str, timeout: float, retryable: bool) -> dict[str, Any]:
    route: dict[str, Any] = {"name": name, "condition": {"method": "POST", "pathRegex": regex},
                             "timeout": _go_duration(timeout)}
    if retryable:
        route["isRetryable"] = True
    return route


def service_profile(mesh: MeshSpec, svc: ServiceSpec) -> dict[str, Any]:
    """Routes in first-match order: every known method (its effective route policy), then the
    explicit prefix routes (longest first), then a catch-all for the rest of the service."""
    policies = route_policies(mesh, svc.name)
    methods = list(grpc_methods(svc.grpc_service))
    methods += [rp.pattern for rp in policies if rp.match is not None and not is_prefix(rp.pattern)
                and rp.pattern not in methods]
    routes: list[dict[str, Any]] = []
    for pattern, rp in [*((m, policy_for(policies, m)) for m in methods),
                        *((rp.pattern, rp) for rp in per_pattern(policies) if is_prefix(rp.pattern))]:
        routes.append(_profile_route(pattern, path_regex(pattern), rp.timeout, rp.idempotent and not rp.streaming))
    budget = service_policy(mesh, svc.name).retry_budget
    return {
        "apiVersion": "linkerd.io/v1alpha2", "kind": "ServiceProfile",
        "metadata": _meta(mesh, fqdn(mesh, svc.name)),
        "spec": {
            "routes": routes,
            "retryBudget": {"retryRatio": round(budget.percent / 100.0, 4),
                            "minRetriesPerSecond": budget.min_retry_concurrency,
                            "ttl": _go_duration(budget.window)},
        },
    }


def traffic_split(mesh: MeshSpec, svc: ServiceSpec) -> dict[str, Any]:
    return {
        "apiVersion": SPLIT_API, "kind": "TrafficSplit",
        "metadata": _meta(mesh, f"{svc.name}-canary"),
        "spec": {"service": svc.name,
                 "backends": [{"service": f"{svc.name}-{v}", "weight": w} for v, w in sorted(svc.canary.items())]},
    }


# -- retries and timeouts: annotation model ----------------------------------------------------------

def service_annotations(mesh: MeshSpec, svc: ServiceSpec) -> dict[str, str]:
    """`retry.linkerd.io/*`, `timeout.linkerd.io/*` and failure accrual on the Service (notes §2-3)."""
    catch_all = route_policies(mesh, svc.name)[-1]
    ann: dict[str, str] = {"timeout.linkerd.io/request": _go_duration(catch_all.timeout)}
    ann.update(_retry_annotations(catch_all.retry, idempotent=False))
    cb = service_policy(mesh, svc.name).circuit_breaker
    if cb.mode == "consecutive":  # the success-rate mode is alpha in Linkerd edge: not rendered
        # Linkerd's penalty backs off from min to max as the proxyless probe wait does (breaker.py);
        # its jitter is Linkerd's own (the jitter-ratio annotation is not rendered).
        ann.update({
            "balancer.linkerd.io/failure-accrual": "consecutive",
            "balancer.linkerd.io/failure-accrual-consecutive-max-failures": str(cb.consecutive_failures),
            "balancer.linkerd.io/failure-accrual-consecutive-min-penalty": _go_duration(
                min(cb.first_probe, cb.recovery_time)),
            "balancer.linkerd.io/failure-accrual-consecutive-max-penalty": _go_duration(cb.recovery_time),
        })
    return ann


def _retry_annotations(retry: RetrySpec, *, idempotent: bool, streaming: bool = False) -> dict[str, str]:
    statuses = [] if streaming else _linkerd_retry_statuses(retry, idempotent)
    if not statuses or retry.max_retries == 0:
        return {"retry.linkerd.io/limit": "0"}
    ann = {"retry.linkerd.io/grpc": ",".join(statuses), "retry.linkerd.io/limit": str(retry.max_retries)}
    if retry.per_try_timeout is not None:
        ann["retry.linkerd.io/timeout"] = _go_duration(retry.per_try_timeout)
    return ann


def _backends(svc: ServiceSpec) -> list[dict[str, Any]]:
    if svc.canary:
        return [{"name": f"{svc.name}-{v}", "port": POD_GRPC_PORT, "weight": w} for v, w in sorted(svc.canary.items())]
    return [{"name": svc.name, "port": POD_GRPC_PORT}]


def _method_match(pattern: str) -> dict[str, Any]:
    match: dict[str, Any] = {"type": "Exact", "service": service_name(pattern)}
    if method := method_name(pattern):
        match["method"] = method
    return {"method": match}


def outbound_routes(mesh: MeshSpec, svc: ServiceSpec) -> list[dict[str, Any]]:
    """One outbound GRPCRoute per explicit route (its own annotations) plus one for the whole
    service (the service timeout), all on the Service; the exact-method matches win over it."""
    parent = [{"group": "core", "kind": "Service", "name": svc.name, "port": POD_GRPC_PORT}]
    out: list[dict[str, Any]] = []
    policies = {rp.match: rp for rp in route_policies(mesh, svc.name)}
    for r in svc.routes:  # in mesh.yaml order
        rp = policies[r.match]
        ann = {"timeout.linkerd.io/request": _go_duration(rp.timeout),
               **_retry_annotations(rp.retry, idempotent=rp.idempotent, streaming=rp.streaming)}
        out.append({
            "apiVersion": GATEWAY_API, "kind": "GRPCRoute",
            "metadata": _meta(mesh, f"{svc.name}-route-{_slug(method_name(r.match) or service_name(r.match))}",
                              annotations=ann),
            "spec": {"parentRefs": parent,
                     "rules": [{"matches": [_method_match(r.match)], "backendRefs": _backends(svc)}]},
        })
    out.append({
        "apiVersion": GATEWAY_API, "kind": "GRPCRoute",
        "metadata": _meta(mesh, f"{svc.name}-route-default"),
        "spec": {"parentRefs": parent,
                 "rules": [{"matches": [_method_match(service_prefix(svc.grpc_service))],
                            "backendRefs": _backends(svc)}]},
    })
    names = [r["metadata"]["name"] for r in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{svc.name}: two routes map to the same GRPCRoute name: {names}")
    return out


# -- authorization ---------------------------------------------------------------------------------

def server(mesh: MeshSpec, svc: ServiceSpec) -> dict[str, Any]:
    protocol = "gRPC"
    if protocol not in PROXY_PROTOCOLS:  # the schema cannot catch a misspelling (notes §1)
        raise ValueError(f"proxyProtocol {protocol!r} is not one of {sorted(PROXY_PROTOCOLS)}")
    return {
        "apiVersion": "policy.linkerd.io/v1beta3", "kind": "Server",
        "metadata": _meta(mesh, f"{svc.name}-grpc", {"app": svc.name}),
        "spec": {"podSelector": {"matchLabels": {"app": svc.name}}, "port": "grpc", "proxyProtocol": protocol,
                 "accessPolicy": "deny"},
    }


def _covers(rule_methods: tuple[str, ...], pattern: str) -> bool:
    """Does an allow rule with these method patterns allow every method matched by `pattern`?"""
    return not rule_methods or covers_any(rule_methods, pattern)


def _route_patterns(svc: ServiceSpec) -> list[str]:
    """Distinct method patterns the allow list needs routes for; a rule without methods needs the
    whole service."""
    patterns: list[str] = []
    for rule in svc.allow:
        for p in rule.methods or (service_prefix(svc.grpc_service),):
            if p not in patterns:
                patterns.append(p)
    return patterns


def _inbound_route_name(svc: ServiceSpec, pattern: str) -> str:
    service, method = service_name(pattern), method_name(pattern)
    if service == svc.grpc_service:
        return f"{svc.name}-{_slug(method)}" if method else f"{svc.name}-all-methods"
    return f"{svc.name}-{_slug(pattern)}"


def _authn_ref(kind: str, name: str) -> dict[str, str]:
    return {"group": POLICY_GROUP, "kind": kind, "name": name}


def _authz(mesh: MeshSpec, name: str, target_kind: str, target: str, refs: list[dict[str, str]]) -> dict[str, Any]:
    group = POLICY_GROUP if target_kind == "Server" else GATEWAY_GROUP
    return {"apiVersion": "policy.linkerd.io/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": _meta(mesh, name),
            "spec": {"targetRef": {"group": group, "kind": target_kind, "name": target},
                     "requiredAuthenticationRefs": refs}}


def _inbound_route(mesh: MeshSpec, svc: ServiceSpec, name: str, patterns: list[str]) -> dict[str, Any]:
    return {"apiVersion": GATEWAY_API, "kind": "GRPCRoute",
            "metadata": _meta(mesh, name),
            "spec": {"parentRefs": [{"group": POLICY_GROUP, "kind": "Server", "name": f"{svc.name}-grpc"}],
                     "rules": [{"matches": [_method_match(p) for p in patterns]}]}}


def authorization(mesh: MeshSpec, svc: ServiceSpec) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    mesh_authn = f"{svc.name}-meshed"
    docs.append({"apiVersion": "policy.linkerd.io/v1alpha1", "kind": "MeshTLSAuthentication",
                 "metadata": _meta(mesh, mesh_authn), "spec": {"identities": ["*"]}})
    docs.append({"apiVersion": "policy.linkerd.io/v1alpha1", "kind": "NetworkAuthentication",
                 "metadata": _meta(mesh, f"{svc.name}-probes"),
                 "spec": {"networks": [{"cidr": c} for c in PROBE_NETWORKS]}})
    # health: meshed callers and kubelet probes; reflection: meshed callers (MeshServer's OPEN_PREFIXES)
    health = f"{svc.name}-health"
    docs.append(_inbound_route(mesh, svc, health, [f"/{s}/" for s in OPEN_SERVICES["health"]]))
    docs.append(_authz(mesh, f"{health}-meshed", "GRPCRoute", health,
                       [_authn_ref("MeshTLSAuthentication", mesh_authn)]))
    docs.append(_authz(mesh, f"{health}-probes", "GRPCRoute", health,
                       [_authn_ref("NetworkAuthentication", f"{svc.name}-probes")]))
    reflection = f"{svc.name}-reflection"
    docs.append(_inbound_route(mesh, svc, reflection, [f"/{s}/" for s in OPEN_SERVICES["reflection"]]))
    docs.append(_authz(mesh, f"{reflection}-meshed", "GRPCRoute", reflection,
                       [_authn_ref("MeshTLSAuthentication", mesh_authn)]))
    for i, rule in enumerate(svc.allow):
        identities = sorted({caller_identity(mesh, c) for c in rule.from_})
        docs.append({"apiVersion": "policy.linkerd.io/v1alpha1", "kind": "MeshTLSAuthentication",
                     "metadata": _meta(mesh, f"{svc.name}-allow-{i}"),
                     "spec": {"identities": ["*"] if "*" in identities else identities}})
    names: set[str] = set()
    for pattern in _route_patterns(svc):
        route = _inbound_route_name(svc, pattern)
        if route in names:
            raise ValueError(f"{svc.name}: method patterns collide on the GRPCRoute name {route!r}")
        names.add(route)
        docs.append(_inbound_route(mesh, svc, route, [pattern]))
        for i, rule in enumerate(svc.allow):
            if _covers(rule.methods, pattern):
                docs.append(_authz(mesh, f"{route}-allow-{i}", "GRPCRoute", route,
                                   [_authn_ref("MeshTLSAuthentication", f"{svc.name}-allow-{i}")]))
    return docs


# -- rate limits -----------------------------------------------------------------------------------

def _service_account_ref(mesh: MeshSpec, caller: str) -> dict[str, str] | None:
    """A rate-limit caller as the ServiceAccount Linkerd names it by; None for a SPIFFE ID of another
    form (Linkerd's clientRefs name Kubernetes objects only)."""
    m = re.fullmatch(rf"spiffe://{re.escape(mesh.mesh.trust_domain)}/ns/([^/]+)/sa/([^/]+)", caller)
    if m:
        return {"kind": "ServiceAccount", "namespace": m.group(1), "name": m.group(2)}
    if caller.startswith("spiffe://"):
        return None
    return {"kind": "ServiceAccount", "namespace": mesh.mesh.namespace, "name": caller}


def rate_limit_policy(mesh: MeshSpec, svc: ServiceSpec) -> dict[str, Any] | None:
    """The service's own `rate_limit` block as an HTTPLocalRateLimitPolicy on its Server (None without
    one; routes' blocks are not Linkerd's to express, see the module docstring)."""
    block = svc.rate_limit
    if block is None or block.requests_per_second is None:
        return None
    spec: dict[str, Any] = {"targetRef": {"group": POLICY_GROUP, "kind": "Server", "name": f"{svc.name}-grpc"},
                            ("identity" if block.per_caller else "total"): {"requestsPerSecond":
                                                                             block.requests_per_second}}
    overrides = [{"requestsPerSecond": limit.requests_per_second, "clientRefs": [ref]}
                 for caller, limit in sorted(block.callers.items())
                 if (ref := _service_account_ref(mesh, caller)) is not None]
    if overrides:
        spec["overrides"] = overrides
    return {"apiVersion": "policy.linkerd.io/v1alpha1", "kind": "HTTPLocalRateLimitPolicy",
            "metadata": _meta(mesh, f"{svc.name}-rate-limit"), "spec": spec}


# -- per service -----------------------------------------------------------------------------------

def service_documents(mesh: MeshSpec, svc: ServiceSpec) -> list[dict[str, Any]]:
    profile_model = mesh.linkerd_model == "serviceprofile"
    docs: list[dict[str, Any]] = [service_account(mesh, svc.name)]
    annotations = None if profile_model else service_annotations(mesh, svc)
    docs.append(k8s_service(mesh, svc, annotations=annotations))
    if svc.canary:
        for version in sorted(svc.canary):
            docs.append(k8s_service(mesh, svc, name=f"{svc.name}-{version}", version=version,
                                    annotations=annotations))
            docs.append(deployment(mesh, svc, version=version))
    else:
        docs.append(deployment(mesh, svc))
    docs.append(server(mesh, svc))
    docs.extend(authorization(mesh, svc))
    if (limit := rate_limit_policy(mesh, svc)) is not None:
        docs.append(limit)
    if profile_model:
        docs.append(service_profile(mesh, svc))
        if svc.canary:
            docs.append(traffic_split(mesh, svc))
    else:
        docs.extend(outbound_routes(mesh, svc))
    return docs


def render(mesh: MeshSpec) -> dict[str, Document]:
    files: dict[str, Document] = {}
    resources: list[str] = ["mesh-config.yaml", "mesh-clients.yaml"]
    files["mesh-config.yaml"] = [config_map(mesh)]
    files["mesh-clients.yaml"] = [service_account(mesh, c) for c in mesh.mesh.clients]
    for svc in mesh.services:
        files[f"{svc.name}.yaml"] = service_documents(mesh, svc)
        resources.append(f"{svc.name}.yaml")
    files["kustomization.yaml"] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": mesh.mesh.namespace,
        "resources": resources,
    }
    return files
