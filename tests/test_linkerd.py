"""Linkerd/Kubernetes renderer: every resource checked against the upstream CRD schemas, typed models
of the fields we rely on, the never-both rule for retries/timeouts, canaries, and authorization that
decides exactly like MeshServer's Authorizer."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field

from aivo_mesh.config.loader import load_mesh
from aivo_mesh.config.model import MeshSpec, format_duration
from aivo_mesh.config.resolve import route_policy
from aivo_mesh.render import linkerd, render_target
from aivo_mesh.server.authz import Authorizer

ROOT = Path(__file__).resolve().parents[1]
# The shared CRDs live next to the repository (../shared/schemas/linkerd); they are data, never copied here.
SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "linkerd"
CRD_KINDS = {"ServiceProfile", "Server", "AuthorizationPolicy", "MeshTLSAuthentication", "NetworkAuthentication",
             "GRPCRoute", "HTTPRoute", "TrafficSplit", "HTTPLocalRateLimitPolicy"}
ANNOTATION_PREFIXES = ("retry.linkerd.io/", "timeout.linkerd.io/", "balancer.linkerd.io/")


# -- fixtures ----------------------------------------------------------------------------------------

@functools.cache
def base_mesh() -> MeshSpec:
    return load_mesh(ROOT / "mesh.yaml")


def variant(*, model: str = "serviceprofile", canary: dict[str, int] | None = None,
            rate_limit: dict[str, Any] | None = None) -> MeshSpec:
    """mesh.yaml with another linkerd_model and, optionally, canary weights on learner-svc and a rate
    limit on auth-svc."""
    data = yaml.safe_load((ROOT / "mesh.yaml").read_text())
    data["linkerd_model"] = model
    if canary is not None:
        next(s for s in data["services"] if s["name"] == "learner-svc")["canary"] = canary
    if rate_limit is not None:
        next(s for s in data["services"] if s["name"] == "auth-svc")["rate_limit"] = rate_limit
    return MeshSpec.model_validate(data)


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_PARSED: dict[str, dict[str, list[dict[str, Any]]]] = {}


def documents(mesh: MeshSpec) -> dict[str, list[dict[str, Any]]]:
    """Rendered files parsed back from their text (what kubectl would read); a fresh copy each call."""
    key = mesh.model_dump_json()
    if key not in _PARSED:
        _PARSED[key] = {path: [d for d in yaml.load_all(text, Loader=_LOADER) if d is not None]
                        for path, text in render_target("linkerd", mesh).items()}
    return copy.deepcopy(_PARSED[key])


def all_docs(mesh: MeshSpec) -> list[dict[str, Any]]:
    return [d for path, docs in documents(mesh).items() if path != "kustomization.yaml" for d in docs]


MESHES = {
    "serviceprofile": lambda: variant(model="serviceprofile"),
    "annotations": lambda: variant(model="annotations"),
    "serviceprofile+canary": lambda: variant(model="serviceprofile", canary={"v1": 90, "v2": 10}),
    "annotations+canary": lambda: variant(model="annotations", canary={"v1": 90, "v2": 10}),
    "rate-limited": lambda: variant(rate_limit={"requests_per_second": 10, "per_caller": True, "callers": {
        "analytics-svc": {"requests_per_second": 2},
        "spiffe://aivo.local/ns/tools/sa/probe": {"requests_per_second": 1}}}),
}


# -- CRD schemas -------------------------------------------------------------------------------------

def _strip(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _strip(v) for k, v in o.items() if not k.startswith("x-kubernetes-")}
    if isinstance(o, list):
        return [_strip(v) for v in o]
    return o


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema of every *served* version in ../shared/schemas/linkerd."""
    if not SCHEMAS.is_dir():
        pytest.skip(f"Linkerd CRD schemas not found at {SCHEMAS} (the shared schemas directory next to the repo)")
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(SCHEMAS.glob("*.yaml")):
        crd = next(d for d in yaml.load_all(path.read_text(), Loader=_LOADER)
                   if d and d.get("kind") == "CustomResourceDefinition")
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            if v.get("served"):  # smi-sdk-go's TrafficSplit does not serve v1alpha2: linkerd-smi's does
                out[(f"{group}/{v['name']}", kind)] = _strip(v["schema"]["openAPIV3Schema"])
    return out


def validator_for(doc: dict[str, Any]) -> Any:
    return _validator(doc["apiVersion"], doc["kind"])


@functools.cache
def _validator(api_version: str, kind: str) -> Any:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is needed to validate against the CRDs")
    schema = crd_schemas().get((api_version, kind))
    assert schema is not None, f"no served CRD version for {api_version} {kind}"
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("name", list(MESHES))
def test_every_linkerd_resource_validates_against_its_crd_schema(name):
    docs = [d for d in all_docs(MESHES[name]()) if d["kind"] in CRD_KINDS]
    kinds = {d["kind"] for d in docs}
    assert {"Server", "AuthorizationPolicy", "MeshTLSAuthentication", "NetworkAuthentication", "GRPCRoute"} <= kinds
    problems = []
    for doc in docs:
        for err in validator_for(doc).iter_errors(doc):
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {'/'.join(map(str, err.path))}: {err.message}")
    assert not problems, "\n".join(problems)


def test_the_schema_check_is_live():
    """A ServiceProfile missing retryBudget fields and a Server with two selectors are refused."""
    profile = next(d for d in all_docs(base_mesh()) if d["kind"] == "ServiceProfile")
    profile["spec"]["retryBudget"] = {"retryRatio": 0.2}
    messages = sorted(e.message for e in validator_for(profile).iter_errors(profile))
    assert "'minRetriesPerSecond' is a required property" in messages
    assert "'ttl' is a required property" in messages
    authz = next(d for d in all_docs(base_mesh()) if d["kind"] == "AuthorizationPolicy")
    del authz["spec"]["requiredAuthenticationRefs"]
    assert list(validator_for(authz).iter_errors(authz))


# -- typed models of the fields we rely on -----------------------------------------------------------

class _M(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Meta(_M):
    name: str
    namespace: str
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class Condition(_M):
    method: Literal["POST"]
    path_regex: str = Field(alias="pathRegex")


class ProfileRoute(_M):
    name: str
    condition: Condition
    timeout: str
    is_retryable: bool = Field(False, alias="isRetryable")


class RetryBudget(_M):
    retry_ratio: float = Field(alias="retryRatio", ge=0, le=1)
    min_retries_per_second: int = Field(alias="minRetriesPerSecond", ge=0)
    ttl: str


class ProfileSpec(_M):
    routes: list[ProfileRoute]
    retry_budget: RetryBudget = Field(alias="retryBudget")


class ServiceProfile(_M):
    api_version: Literal["linkerd.io/v1alpha2"] = Field(alias="apiVersion")
    metadata: Meta
    spec: ProfileSpec


class ServerSpec(_M):
    pod_selector: dict[str, dict[str, str]] = Field(alias="podSelector")
    port: str | int
    proxy_protocol: Literal["unknown", "HTTP/1", "HTTP/2", "gRPC", "opaque", "TLS"] = Field(alias="proxyProtocol")
    access_policy: Literal["deny"] = Field(alias="accessPolicy")


class Server(_M):
    api_version: Literal["policy.linkerd.io/v1beta3"] = Field(alias="apiVersion")
    metadata: Meta
    spec: ServerSpec


class EnvVar(_M):
    name: str
    value: str


class GrpcProbe(_M):
    grpc: dict[str, Any]


class VolumeMount(_M):
    name: str
    mount_path: str = Field(alias="mountPath")
    read_only: bool = Field(False, alias="readOnly")


class Container(_M):
    name: str
    image: str
    env: list[EnvVar]
    readiness_probe: GrpcProbe = Field(alias="readinessProbe")
    liveness_probe: GrpcProbe = Field(alias="livenessProbe")
    resources: dict[str, dict[str, str]]
    volume_mounts: list[VolumeMount] = Field(alias="volumeMounts")
    ports: list[dict[str, Any]]


class PodSpec(_M):
    service_account_name: str = Field(alias="serviceAccountName")
    containers: list[Container]
    volumes: list[dict[str, Any]]


class PodTemplate(_M):
    metadata: dict[str, dict[str, str]]
    spec: PodSpec


class DeploymentSpec(_M):
    selector: dict[str, dict[str, str]]
    template: PodTemplate


class Deployment(_M):
    api_version: Literal["apps/v1"] = Field(alias="apiVersion")
    metadata: Meta
    spec: DeploymentSpec


class ServicePort(_M):
    name: str
    port: int
    target_port: str | int = Field(alias="targetPort")
    app_protocol: str = Field(alias="appProtocol")


class K8sService(_M):
    api_version: Literal["v1"] = Field(alias="apiVersion")
    metadata: Meta
    spec: dict[str, Any]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_service_profiles_carry_route_timeouts_retryability_and_the_budget():
    mesh = base_mesh()
    files = documents(mesh)
    for svc in mesh.services:
        profile = ServiceProfile.model_validate(by_kind(files[f"{svc.name}.yaml"], "ServiceProfile")[0])
        assert profile.metadata.name == f"{svc.name}.default.svc.cluster.local"
        routes = {r.name: r for r in profile.spec.routes}
        for r in svc.routes:  # every explicit route is there, with its own timeout
            rp = route_policy(mesh, svc.name, r.match)
            assert routes[r.match].timeout == format_duration(rp.timeout)
            assert routes[r.match].is_retryable == (r.idempotent and not r.streaming)
        catch_all = routes[f"/{svc.grpc_service}/"]
        assert catch_all.condition.path_regex == "/" + svc.grpc_service.replace(".", r"\.") + "/[^/]+"
        assert profile.spec.routes[-1] is catch_all  # first match wins: the catch-all comes last
        assert [r.is_retryable for r in profile.spec.routes].count(True) == sum(
            1 for r in svc.routes if r.idempotent and not r.streaming)
        assert profile.spec.retry_budget.retry_ratio == 0.25
        assert profile.spec.retry_budget.min_retries_per_second == 3
        assert profile.spec.retry_budget.ttl == "10s"
    auth = {r.name: r for r in ServiceProfile.model_validate(
        by_kind(files["auth-svc.yaml"], "ServiceProfile")[0]).spec.routes}
    validate = auth["/aivo.auth.v1.AuthService/ValidateToken"]
    assert validate.condition.path_regex == r"/aivo\.auth\.v1\.AuthService/ValidateToken"
    assert (validate.timeout, validate.is_retryable) == ("1s", True)
    assert (auth["/aivo.auth.v1.AuthService/Authenticate"].timeout,
            auth["/aivo.auth.v1.AuthService/Authenticate"].is_retryable) == ("5s", False)


def test_workloads_servers_and_services_apply_as_typed():
    mesh = base_mesh()
    files = documents(mesh)
    for svc in mesh.services:
        docs = files[f"{svc.name}.yaml"]
        server = Server.model_validate(by_kind(docs, "Server")[0])
        assert server.spec.proxy_protocol == "gRPC"
        assert server.spec.port == "grpc"
        assert server.spec.pod_selector == {"matchLabels": {"app": svc.name}}
        service = K8sService.model_validate(next(d for d in by_kind(docs, "Service")))
        port = ServicePort.model_validate(service.spec["ports"][0])
        assert (port.name, port.port, port.target_port) == ("grpc", 50051, "grpc")
        dep = Deployment.model_validate(by_kind(docs, "Deployment")[0])
        assert dep.spec.template.metadata["annotations"]["linkerd.io/inject"] == "enabled"
        assert dep.spec.template.spec.service_account_name == svc.name
        c = dep.spec.template.spec.containers[0]
        env = {e.name: e.value for e in c.env}
        assert set(env) >= {"SERVICE_NAME", "SERVICE_VERSION", "GRPC_PORT", "LOCAL_SERVICE_PORT", "CA_CERT_PATH",
                            "CLIENT_CERT_PATH", "CLIENT_KEY_PATH", "METRICS_HOST"}
        assert env["SERVICE_NAME"] == svc.name
        assert env["GRPC_PORT"] == str(svc.port)
        assert {p["name"]: p["containerPort"] for p in c.ports}["grpc"] == svc.port
        mounts = {m.name: m for m in c.volume_mounts}
        assert mounts["mesh-certs"].read_only
        for var in ("CA_CERT_PATH", "CLIENT_CERT_PATH", "CLIENT_KEY_PATH"):
            assert env[var].startswith(mounts["mesh-certs"].mount_path + "/")
        secret = next(v for v in dep.spec.template.spec.volumes if v["name"] == "mesh-certs")["secret"]
        assert secret["secretName"] == f"{svc.name}-mesh-certs"
        assert secret["defaultMode"] == 0o400
        assert c.readiness_probe.grpc == {"port": svc.port, "service": svc.grpc_service}
        assert c.liveness_probe.grpc["port"] == svc.port
        assert c.resources["requests"]
        assert c.resources["limits"]
        sa = by_kind(docs, "ServiceAccount")[0]
        assert sa["metadata"]["name"] == svc.name


def test_kustomization_lists_every_file_and_the_cluster_mesh_loads():
    mesh = base_mesh()
    files = documents(mesh)
    kust = files["kustomization.yaml"][0]
    assert sorted(kust["resources"]) == sorted(p for p in files if p != "kustomization.yaml")
    cm = files["mesh-config.yaml"][0]
    inside = MeshSpec.model_validate(yaml.safe_load(cm["data"]["mesh.yaml"]))
    for svc in inside.services:
        assert svc.host == "0.0.0.0"
        assert svc.endpoints == (f"{svc.name}.default.svc.cluster.local:50051",)
        orig = mesh.service(svc.name)
        assert (svc.port, svc.admin_port) == (orig.port, orig.admin_port)
        assert (svc.routes, svc.allow) == (orig.routes, orig.allow)
        for r in orig.routes:  # the effective policy is unchanged by the round trip
            assert route_policy(inside, svc.name, r.match) == route_policy(mesh, svc.name, r.match)
    assert {d["metadata"]["name"] for d in files["mesh-clients.yaml"]} == set(mesh.mesh.clients)


def test_rendering_is_deterministic():
    assert render_target("linkerd", base_mesh()) == render_target("linkerd", load_mesh(ROOT / "mesh.yaml"))
    assert all("&id" not in text for text in render_target("linkerd", variant(model="annotations")).values())


# -- never both retry/timeout models for one service -------------------------------------------------

def _annotation_keys(doc: dict[str, Any]) -> set[str]:
    keys = set(doc.get("metadata", {}).get("annotations", {}))
    tmpl = doc.get("spec", {}).get("template", {}) if isinstance(doc.get("spec"), dict) else {}
    return keys | set(tmpl.get("metadata", {}).get("annotations", {}))


def _outbound(doc: dict[str, Any]) -> bool:
    return doc["kind"] == "GRPCRoute" and any(p.get("kind") == "Service" for p in doc["spec"]["parentRefs"])


@pytest.mark.parametrize("model", ["serviceprofile", "annotations"])
@pytest.mark.parametrize("canary", [None, {"v1": 90, "v2": 10}])
def test_a_service_gets_a_service_profile_or_annotations_never_both(model, canary):
    mesh = variant(model=model, canary=canary)
    files = documents(mesh)
    for svc in mesh.services:
        docs = files[f"{svc.name}.yaml"]
        profiles = by_kind(docs, "ServiceProfile")
        annotated = [d for d in docs if any(k.startswith(ANNOTATION_PREFIXES) for k in _annotation_keys(d))]
        outbound = [d for d in docs if _outbound(d)]
        splits = by_kind(docs, "TrafficSplit")
        if model == "serviceprofile":
            assert len(profiles) == 1
            assert not annotated
            assert not outbound
        else:
            assert not profiles
            assert not splits
            assert annotated
            assert outbound
        assert not (profiles and (annotated or outbound)), svc.name


def test_annotation_model_maps_retries_timeouts_and_failure_accrual():
    mesh = variant(model="annotations")
    docs = documents(mesh)["auth-svc.yaml"]
    service = next(d for d in by_kind(docs, "Service") if d["metadata"]["name"] == "auth-svc")
    ann = service["metadata"]["annotations"]
    assert ann["timeout.linkerd.io/request"] == "5s"
    assert ann["retry.linkerd.io/grpc"] == "unavailable"
    assert ann["retry.linkerd.io/limit"] == "3"
    assert "retry.linkerd.io/timeout" not in ann  # the defaults' per-try timeout: idempotent routes only
    assert ann["balancer.linkerd.io/failure-accrual"] == "consecutive"
    assert ann["balancer.linkerd.io/failure-accrual-consecutive-max-failures"] == "5"
    assert ann["balancer.linkerd.io/failure-accrual-consecutive-min-penalty"] == "1s"  # first_probe
    assert ann["balancer.linkerd.io/failure-accrual-consecutive-max-penalty"] == "60s"
    routes = {d["metadata"]["name"]: d for d in docs if _outbound(d)}
    validate = routes["auth-svc-route-validatetoken"]
    assert validate["metadata"]["annotations"]["timeout.linkerd.io/request"] == "1s"
    # idempotent: INTERNAL and RESOURCE_EXHAUSTED may be retried, with the names Linkerd parses
    assert validate["metadata"]["annotations"]["retry.linkerd.io/grpc"] == (
        "deadline-exceeded,internal,resource-exhausted,unavailable")
    assert validate["metadata"]["annotations"]["retry.linkerd.io/timeout"] == "500ms"
    match = validate["spec"]["rules"][0]["matches"][0]["method"]
    assert match == {"type": "Exact", "service": "aivo.auth.v1.AuthService", "method": "ValidateToken"}
    default = routes["auth-svc-route-default"]["spec"]["rules"][0]["matches"][0]["method"]
    assert default == {"type": "Exact", "service": "aivo.auth.v1.AuthService"}
    events = {d["metadata"]["name"]: d for d in documents(mesh)["event-collector-svc.yaml"] if _outbound(d)}
    stream = events["event-collector-svc-route-collectstream"]["metadata"]["annotations"]
    assert stream["retry.linkerd.io/limit"] == "0"
    assert stream["timeout.linkerd.io/request"] == "30s"
    allowed = {"cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"}
    for d in all_docs(mesh):
        value = d["metadata"].get("annotations", {}).get("retry.linkerd.io/grpc")
        if value:
            assert set(value.split(",")) <= allowed, value


# -- canaries ----------------------------------------------------------------------------------------

def test_canary_weights_become_a_traffic_split_with_backend_services():
    mesh = variant(model="serviceprofile", canary={"v1": 90, "v2": 10})
    docs = documents(mesh)["learner-svc.yaml"]
    (split,) = by_kind(docs, "TrafficSplit")
    assert split["apiVersion"] == "split.smi-spec.io/v1alpha2"
    assert split["spec"] == {"service": "learner-svc", "backends": [{"service": "learner-svc-v1", "weight": 90},
                                                                     {"service": "learner-svc-v2", "weight": 10}]}
    services = {d["metadata"]["name"]: d for d in by_kind(docs, "Service")}
    assert services["learner-svc"]["spec"]["selector"] == {"app": "learner-svc"}
    assert services["learner-svc-v2"]["spec"]["selector"] == {"app": "learner-svc", "version": "v2"}
    deployments = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    assert set(deployments) == {"learner-svc-v1", "learner-svc-v2"}
    assert deployments["learner-svc-v2"]["spec"]["template"]["metadata"]["labels"]["version"] == "v2"
    # services without canary weights get neither
    assert not by_kind(documents(mesh)["auth-svc.yaml"], "TrafficSplit")
    assert not by_kind(documents(base_mesh())["learner-svc.yaml"], "TrafficSplit")


def test_canary_weights_become_weighted_grpcroute_backends_in_the_annotation_model():
    mesh = variant(model="annotations", canary={"v1": 90, "v2": 10})
    docs = documents(mesh)["learner-svc.yaml"]
    for route in (d for d in docs if _outbound(d)):
        for rule in route["spec"]["rules"]:
            assert rule["backendRefs"] == [{"name": "learner-svc-v1", "port": 50051, "weight": 90},
                                           {"name": "learner-svc-v2", "port": 50051, "weight": 10}]


# -- authorization -----------------------------------------------------------------------------------

def linkerd_allows(docs: list[dict[str, Any]], identity: str, method: str) -> bool:
    """Linkerd's inbound decision as documented: the request matches ONE GRPCRoute of the Server (an
    exact service+method match beats a service-only match); it is allowed when a policy targeting
    that route (or the Server) requires only authentications the caller satisfies."""
    service, _, name = method.strip("/").partition("/")
    routes = [d for d in by_kind(docs, "GRPCRoute") if not _outbound(d)]
    exact = [r for r in routes if any(m["method"] == {"type": "Exact", "service": service, "method": name}
                                      for rule in r["spec"]["rules"] for m in rule["matches"])]
    whole = [r for r in routes if any(m["method"] == {"type": "Exact", "service": service}
                                      for rule in r["spec"]["rules"] for m in rule["matches"])]
    chosen = next(iter(exact or whole), None)
    if chosen is None:
        return False  # no route: Linkerd refuses the request
    authns = {d["metadata"]["name"]: d for d in by_kind(docs, "MeshTLSAuthentication")}
    targets = {("GRPCRoute", chosen["metadata"]["name"])} | {("Server", s["metadata"]["name"])
                                                             for s in by_kind(docs, "Server")}
    for pol in by_kind(docs, "AuthorizationPolicy"):
        target = pol["spec"]["targetRef"]
        if (target["kind"], target["name"]) not in targets:
            continue
        refs = pol["spec"]["requiredAuthenticationRefs"]
        if all(r["kind"] == "MeshTLSAuthentication" and (
                "*" in authns[r["name"]]["spec"]["identities"] or identity in authns[r["name"]]["spec"]["identities"])
               for r in refs):
            return True
    return False


@pytest.mark.parametrize("service", ["auth-svc", "learner-svc", "event-collector-svc", "analytics-svc"])
def test_linkerd_authorization_decides_like_the_mesh_authorizer(service):
    mesh = base_mesh()
    docs = documents(mesh)[f"{service}.yaml"]
    svc = mesh.service(service)
    authorizer = Authorizer(mesh, service)
    methods = [*linkerd.grpc_methods(svc.grpc_service), "/grpc.health.v1.Health/Check"]
    assert len(methods) > 1
    for caller in [*mesh.service_names, *mesh.mesh.clients]:
        ident = linkerd.linkerd_identity(caller, "default")
        for method in methods:
            assert linkerd_allows(docs, ident, method) == authorizer.allows(mesh.spiffe_id(caller), method), (
                caller, method)


def test_identities_spiffe_ids_and_wildcards():
    mesh = base_mesh()
    assert linkerd.caller_identity(mesh, "learner-svc") == \
        "learner-svc.default.serviceaccount.identity.linkerd.cluster.local"
    assert linkerd.caller_identity(mesh, "spiffe://aivo.local/ns/jobs/sa/nightly") == \
        "nightly.jobs.serviceaccount.identity.linkerd.cluster.local"
    assert linkerd.caller_identity(mesh, "*") == "*"
    data = yaml.safe_load((ROOT / "mesh.yaml").read_text())
    data["services"][3]["allow"] = [{"from": ["*"], "methods": ["/aivo.analytics.v1.AnalyticsService/"]}]
    wild = MeshSpec.model_validate(data)
    docs = documents(wild)["analytics-svc.yaml"]
    allow = next(d for d in by_kind(docs, "MeshTLSAuthentication") if d["metadata"]["name"] == "analytics-svc-allow-0")
    assert allow["spec"]["identities"] == ["*"]
    assert linkerd_allows(docs, "anyone.default.serviceaccount.identity.linkerd.cluster.local",
                          "/aivo.analytics.v1.AnalyticsService/RunReport")


def test_health_is_open_to_meshed_callers_and_kubelet_probes():
    docs = documents(base_mesh())["auth-svc.yaml"]
    policies = [p for p in by_kind(docs, "AuthorizationPolicy") if p["spec"]["targetRef"]["name"] == "auth-svc-health"]
    kinds = sorted(r["kind"] for p in policies for r in p["spec"]["requiredAuthenticationRefs"])
    assert kinds == ["MeshTLSAuthentication", "NetworkAuthentication"]


@pytest.mark.parametrize("tracing", [None, {"enabled": True, "otlp_endpoint": "http://otel-collector.observability:4317",
                                            "sample_ratio": 0.1}], ids=["tracing off", "tracing to a collector"])
def test_a_pod_traces_as_mesh_yaml_says_and_never_to_a_host_the_render_lacks(tracing):
    """The Deployment's variables, applied to the mounted mesh.yaml as `meshctl serve` does: a pod once
    got JAEGER_HOST=jaeger, a Service no manifest defines, so every pod logged export failures."""
    from aivo_mesh.config.env import EnvSettings, apply_env

    mesh = base_mesh()
    if tracing is not None:
        obs = mesh.observability.model_copy(update={"tracing": mesh.observability.tracing.model_copy(update=tracing)})
        mesh = mesh.model_copy(update={"observability": obs})
    docs = all_docs(mesh)
    defined = {d["metadata"]["name"] for d in by_kind(docs, "Service")}
    for dep in by_kind(docs, "Deployment"):
        env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        pod = apply_env(mesh, EnvSettings.from_environ(env))
        assert pod.observability.tracing == mesh.observability.tracing
        assert not {"JAEGER_HOST", "OTEL_EXPORTER_OTLP_ENDPOINT"} & set(env), env
    assert "jaeger" not in defined
