"""Envoy sidecar renderer (aivo_mesh.render.envoy): structure, drift, and proof with the real Envoy.

The real-Envoy tests run the Envoy `meshctl up` would (tests/binaries.py: skipped only where the
envoy extra is not installed and no envoy is on PATH).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from binaries import needs, optional, require
from cryptography import x509
from helpers import (
    auth_app,
    on_free_ports,
    start_envoy,
    start_envoy_async,
    stop_process,
    wait_envoy_live,
    write_sidecar,
)
from waiting import until

from aivo_mesh.cli import main
from aivo_mesh.config import MeshSpec, load_mesh, parse_mesh
from aivo_mesh.config.ports import EnvoyPorts, local_ports, sidecar_ports
from aivo_mesh.config.resolve import service_policy
from aivo_mesh.errors import ConfigError
from aivo_mesh.pki import CertLayout
from aivo_mesh.pki.issue import rotate
from aivo_mesh.render import TARGETS, render_target, serialize
from aivo_mesh.render.envoy import (
    GRPC_RETRY_TOKENS,
    OPEN_METHODS,
    OPEN_PREFIXES,
    POD_CERT_DIR,
    POD_SDS_DIR,
    VALID_RETRY_ON,
    EnvoyProfile,
    bootstrap,
    callable_peers,
    outbound_refusal,
    peer_address,
    relocate,
    render,
    retry_on_tokens,
    sds_files,
    stats_methods,
)
from aivo_mesh.runtime.local import free_ports
from aivo_mesh.runtime.status import envoy_hosts

ROOT = Path(__file__).resolve().parents[1]
MESH_FILE = ROOT / "mesh.yaml"
OUT_DIR = ROOT / TARGETS["envoy"].output_dir
# The team's reference files live next to the checkout (../shared), never copied into it.
REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "envoy"
SERVICES = ("auth-svc", "learner-svc", "event-collector-svc", "analytics-svc")


needs_envoy = needs("envoy")


# --- helpers ----------------------------------------------------------------------------------------
def _write_pod_relocated(mesh: MeshSpec, service: str, certs: Path, root: Path) -> Path:
    """The shipped pod files with /etc/envoy re-rooted at `root` (certs copied to root/certs)."""
    mapping = {"/etc/envoy": str(root)}
    if not (root / "certs").exists():
        shutil.copytree(certs, root / "certs")
    svc_dir = root / service
    (svc_dir / "sds").mkdir(parents=True, exist_ok=True)
    profile = EnvoyProfile.pod(mesh)
    for name, doc in sds_files(mesh, service, profile).items():
        # Each service gets its own SDS directory: the pod's /etc/envoy/sds.
        (svc_dir / "sds" / name).write_text(serialize(name, relocate(doc, mapping)))
    config = relocate(bootstrap(mesh, service, profile), {POD_SDS_DIR: str(svc_dir / "sds"), **mapping})
    path = svc_dir / "envoy.yaml"
    path.write_text(serialize("envoy.yaml", config))
    return path


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require("envoy"), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
                          capture_output=True, text=True, timeout=30, check=False)


def _listener(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    return next(x for x in cfg["static_resources"]["listeners"] if x["name"] == name)


def _cluster(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    return next(x for x in cfg["static_resources"]["clusters"] if x["name"] == name)


def _hcm(listener: Mapping[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = listener["filter_chains"][0]["filters"][-1]["typed_config"]
    return cfg


def _routes(listener: Mapping[str, Any]) -> list[dict[str, Any]]:
    routes: list[dict[str, Any]] = _hcm(listener)["route_config"]["virtual_hosts"][0]["routes"]
    return routes


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _tls_contexts(cfg: Any) -> list[dict[str, Any]]:
    return [n for n in _walk(cfg) if str(n.get("@type", "")).endswith(("UpstreamTlsContext", "DownstreamTlsContext"))]


def _http(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _leaf_serial(cert_file: Path) -> int:
    return x509.load_pem_x509_certificates(cert_file.read_bytes())[0].serial_number


def _cert_serials(admin_port: int) -> set[int]:
    _, body = _http(admin_port, "/certs")
    return {int(c["cert_chain"][0]["serial_number"], 16)
            for c in json.loads(body)["certificates"] if c["cert_chain"]}


@pytest.fixture(scope="module")
def pod(mesh: MeshSpec) -> dict[str, dict[str, Any]]:
    profile = EnvoyProfile.pod(mesh)
    return {s: bootstrap(mesh, s, profile) for s in SERVICES}


# --- drift and determinism --------------------------------------------------------------------------
def test_checked_in_output_matches_mesh_yaml(mesh: MeshSpec, capsys: pytest.CaptureFixture[str]) -> None:
    files = render_target("envoy", mesh)
    on_disk = {str(p.relative_to(OUT_DIR)) for p in OUT_DIR.rglob("*") if p.is_file()}
    assert on_disk == set(files), "stale or missing files under infra/mesh/envoy: run `meshctl render envoy`"
    assert main(["render", "envoy", "--check", "--config", str(MESH_FILE)]) == 0, capsys.readouterr().err


def test_render_is_deterministic_and_complete(mesh: MeshSpec) -> None:
    a, b = render(mesh), render(mesh)
    assert {p: serialize(p, d) for p, d in a.items()} == {p: serialize(p, d) for p, d in b.items()}
    expected = {"README.md"} | {f"{s}/{f}" for s in SERVICES for f in
                                ("envoy.yaml", "sds/tls_cert.yaml", "sds/mesh_ca.yaml")}
    assert set(a) == expected
    readme = a["README.md"]
    assert isinstance(readme, str)
    assert "generated" in readme.lower()
    assert "15090" in readme


# --- ports and peers --------------------------------------------------------------------------------
def test_ports_pod_and_local(mesh: MeshSpec) -> None:
    for s in SERVICES:
        assert sidecar_ports(mesh, s, "pod") == EnvoyPorts(50051, 15001, 9901)
    assert sidecar_ports(mesh, "auth-svc", "local") == (50061, 15001, 9901)
    assert sidecar_ports(mesh, "analytics-svc", "local") == (50064, 15004, 9904)
    assert peer_address(mesh, "auth-svc", "pod") == ("auth-svc", 50051)
    assert peer_address(mesh, "auth-svc", "local") == ("127.0.0.1", 50061)


def test_local_ports_fill_gaps_deterministically() -> None:
    m = parse_mesh("""
services:
  - {name: a-svc, grpc_service: a.A, port: 50051, local_port: 8081, admin_port: 15001}
  - {name: b-svc, grpc_service: b.B, port: 50052, local_port: 8082, sidecar: {outbound_port: 15002}}
  - {name: c-svc, grpc_service: c.C, port: 50054, local_port: 8083, admin_port: 9901}
""", "t.yaml")
    ports = local_ports(m)
    # inbound: 50051/50052 are mesh ports -> 50053, then 50055 (50054 taken); outbound: 15001 is a-svc's
    # admin_port and 15002 b-svc's sidecar -> 15003, 15004; admin: 9901 taken -> 9902, 9903, 9904.
    assert ports == {"a-svc": (50053, 15003, 9902), "b-svc": (50055, 15002, 9903), "c-svc": (50056, 15004, 9904)}
    assert local_ports(m) == ports
    every = [p for t in ports.values() for p in t]
    assert len(set(every)) == len(every)
    assert not set(every) & {50051, 50052, 50054, 15001, 8081, 8082, 8083, 9901}


def test_outbound_peers_follow_allow_rules(mesh: MeshSpec) -> None:
    assert callable_peers(mesh, "auth-svc") == ()
    assert callable_peers(mesh, "learner-svc") == ("auth-svc", "event-collector-svc")
    assert callable_peers(mesh, "event-collector-svc") == ()
    assert callable_peers(mesh, "analytics-svc") == ("auth-svc", "learner-svc", "event-collector-svc")


# --- structure --------------------------------------------------------------------------------------
def test_tls_is_13_only_mutual_and_via_sds(pod: dict[str, dict[str, Any]]) -> None:
    for s, cfg in pod.items():
        contexts = _tls_contexts(cfg)
        assert len(contexts) == 1 + len(callable_peers(parse_mesh(MESH_FILE.read_text()), s))
        for ctx in contexts:
            common = ctx["common_tls_context"]
            assert common["tls_params"] == {"tls_minimum_protocol_version": "TLSv1_3",
                                            "tls_maximum_protocol_version": "TLSv1_3"}
            assert common["alpn_protocols"] == ["h2"]
            assert [c["name"] for c in common["tls_certificate_sds_secret_configs"]] == ["svc_cert"]
            sds = common["combined_validation_context"]["validation_context_sds_secret_config"]
            assert sds["name"] == "mesh_ca"
            assert sds["sds_config"]["path_config_source"] == {
                "path": "/etc/envoy/sds/mesh_ca.yaml", "watched_directory": {"path": "/etc/envoy/sds"}}
        inbound = _listener(cfg, "inbound_grpc")
        down = inbound["filter_chains"][0]["transport_socket"]["typed_config"]
        assert down["require_client_certificate"] is True
        assert down["common_tls_context"]["combined_validation_context"]["default_validation_context"] == {
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"prefix": "spiffe://aivo.local/"}}]}
        assert inbound["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 50051}
        assert _listener(cfg, "outbound_grpc")["address"]["socket_address"] == {"address": "127.0.0.1",
                                                                                 "port_value": 15001}
        assert cfg["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9901}


def test_sni_and_san_per_peer(mesh: MeshSpec, pod: dict[str, dict[str, Any]]) -> None:
    for s, cfg in pod.items():
        for peer in callable_peers(mesh, s):
            up = _cluster(cfg, peer)["transport_socket"]["typed_config"]
            assert up["sni"] == peer
            default = up["common_tls_context"]["combined_validation_context"]["default_validation_context"]
            assert default["match_typed_subject_alt_names"] == [
                {"san_type": "URI", "matcher": {"exact": f"spiffe://aivo.local/ns/default/sa/{peer}"}}]
            lb = _cluster(cfg, peer)["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
            assert lb["endpoint"]["address"]["socket_address"] == {"address": peer, "port_value": 50051}
            assert _cluster(cfg, peer)["type"] == "STRICT_DNS"


def _rbac_allows(policies: Mapping[str, Any], identity: str, path: str) -> bool:
    def perm(p: Mapping[str, Any]) -> bool:
        if p.get("any"):
            return True
        m = p["url_path"]["path"]
        return path == m["exact"] if "exact" in m else path.startswith(m["prefix"])

    def principal(p: Mapping[str, Any]) -> bool:
        m = p["authenticated"]["principal_name"]
        return identity == m["exact"] if "exact" in m else identity.startswith(m["prefix"])

    return any(any(perm(p) for p in pol["permissions"]) and any(principal(p) for p in pol["principals"])
               for pol in policies.values())


def test_rbac_matches_the_proxyless_authorizer(mesh: MeshSpec, pod: dict[str, dict[str, Any]]) -> None:
    from aivo_mesh.server.authz import OPEN_PREFIXES as AUTHZ_OPEN
    from aivo_mesh.server.authz import Authorizer

    assert OPEN_PREFIXES == AUTHZ_OPEN
    identities = [mesh.spiffe_id(n) for n in (*SERVICES, "mesh-client")] + ["spiffe://evil.local/ns/default/sa/x"]
    for s, cfg in pod.items():
        svc = mesh.service(s)
        hcm = _hcm(_listener(cfg, "inbound_grpc"))
        # The filter denies everything by itself; the allow-list rides in the route configuration, so that
        # a control-plane change of it reaches connections already open (RDS).
        base = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.rbac")["typed_config"]["rules"]
        assert base == {"action": "ALLOW", "policies": {}}
        per_route = hcm["route_config"]["virtual_hosts"][0]["typed_per_filter_config"]["envoy.filters.http.rbac"]
        rbac = per_route["rbac"]["rules"]
        assert rbac["action"] == "ALLOW"
        methods = {r.match for r in svc.routes} | {m for rule in svc.allow for m in rule.methods}
        methods |= {f"/{svc.grpc_service}/Other", "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", "/other.Svc/X"}
        authz = Authorizer(mesh, s)
        for ident in identities:
            for m in sorted(methods):
                assert _rbac_allows(rbac["policies"], ident, m) == authz.allows(ident, m), (s, ident, m)
    # Spot checks straight from mesh.yaml.
    auth = _hcm(_listener(pod["auth-svc"], "inbound_grpc"))["route_config"]["virtual_hosts"][0][
        "typed_per_filter_config"]["envoy.filters.http.rbac"]["rbac"]["rules"]["policies"]
    learner = mesh.spiffe_id("learner-svc")
    assert _rbac_allows(auth, learner, "/aivo.auth.v1.AuthService/ValidateToken")
    assert not _rbac_allows(auth, learner, "/aivo.auth.v1.AuthService/Authenticate")
    assert _rbac_allows(auth, mesh.spiffe_id("mesh-client"), "/aivo.auth.v1.AuthService/Authenticate")
    assert _rbac_allows(auth, mesh.spiffe_id("event-collector-svc"), "/grpc.health.v1.Health/Check")


def _with_metrics(mesh: MeshSpec, **update: bool) -> MeshSpec:
    metrics = mesh.observability.metrics.model_copy(update=update)
    return mesh.model_copy(update={"observability": mesh.observability.model_copy(update={"metrics": metrics})})


def test_per_method_grpc_stats_are_taken_only_where_asked_for(
        mesh: MeshSpec, pod: dict[str, dict[str, Any]], mesh_certs: CertLayout, tmp_path: Path) -> None:
    # By default on neither side: the app's MeshServer counts each call per method and status already.
    for cfg in pod.values():
        for listener in ("inbound_grpc", "outbound_grpc"):
            assert "envoy.filters.http.grpc_stats" not in [
                f["name"] for f in _hcm(_listener(cfg, listener))["http_filters"]]
    inbound_only = _with_metrics(mesh, envoy_inbound_grpc_stats=True)
    cfg = bootstrap(inbound_only, "learner-svc", EnvoyProfile.pod(inbound_only))
    assert [f["name"] for f in _hcm(_listener(cfg, "inbound_grpc"))["http_filters"]] == [
        "envoy.filters.http.rbac", "envoy.filters.http.grpc_stats", "envoy.filters.http.router"]
    assert [f["name"] for f in _hcm(_listener(cfg, "outbound_grpc"))["http_filters"]] == [
        "envoy.filters.http.router"]
    both = _with_metrics(mesh, envoy_outbound_grpc_stats=True)
    outbound = _hcm(_listener(bootstrap(both, "learner-svc", EnvoyProfile.pod(both)), "outbound_grpc"))
    assert [f["name"] for f in outbound["http_filters"]] == [
        "envoy.filters.http.grpc_stats", "envoy.filters.http.router"]
    assert outbound["http_filters"][0]["typed_config"]["enable_upstream_stats"] is True
    # The caller's sidecar counts per method the methods of the peers it may call.
    listed = {s["name"] for s in outbound["http_filters"][0]["typed_config"][
        "individual_method_stats_allowlist"]["services"]}
    assert {both.service(p).grpc_service for p in callable_peers(both, "learner-svc")} <= listed
    assert both.service("learner-svc").grpc_service not in listed
    if optional("envoy") is not None:
        res = _validate(_write_pod_relocated(both, "learner-svc", mesh_certs.root, tmp_path / "pod"))
        assert res.returncode == 0, res.stderr + res.stdout


def test_per_method_stats_cover_the_methods_mesh_yaml_knows_and_nothing_else(
        mesh: MeshSpec) -> None:
    counted = _with_metrics(mesh, envoy_inbound_grpc_stats=True)
    inbound = _hcm(_listener(bootstrap(counted, "auth-svc", EnvoyProfile.pod(counted)), "inbound_grpc"))[
        "http_filters"][1]["typed_config"]
    # Bounded stats: only the methods mesh.yaml knows get their own; no filter state nobody reads.
    assert "stats_for_all_methods" not in inbound and "emit_filter_state" not in inbound
    assert inbound["individual_method_stats_allowlist"]["services"] == [
        {"name": "aivo.auth.v1.AuthService", "method_names": ["Authenticate", "ValidateToken"]},
        {"name": "grpc.health.v1.Health", "method_names": ["Check", "List", "Watch"]},
        {"name": "grpc.reflection.v1alpha.ServerReflection", "method_names": ["ServerReflectionInfo"]},
        {"name": "grpc.reflection.v1.ServerReflection", "method_names": ["ServerReflectionInfo"]}]
    # A service aivo-mesh has no proto of: the methods its routes and allow rules name, and only those;
    # with prefixes only, it has no per-method stats (all its calls in the one grpc.* bucket).
    auth = mesh.service("auth-svc")
    foreign = auth.model_copy(update={"grpc_service": "acme.billing.v1.Billing", "routes": (
        auth.routes[0].model_copy(update={"match": "/acme.billing.v1.Billing/Charge"}),), "allow": (
        auth.allow[0].model_copy(update={"methods": ("/acme.billing.v1.Billing/Refund", "/acme.billing.v1.Billing/")}),
    )})
    assert stats_methods([foreign])["acme.billing.v1.Billing"] == ["Charge", "Refund"]
    prefixes_only = foreign.model_copy(update={"routes": (), "allow": (
        auth.allow[0].model_copy(update={"methods": ("/acme.billing.v1.Billing/",)}),)})
    assert "acme.billing.v1.Billing" not in stats_methods([prefixes_only])


def test_open_methods_are_the_open_prefixes_methods() -> None:
    from grpc_health.v1 import health_pb2

    assert {f"/{name}/" for name in OPEN_METHODS} == set(OPEN_PREFIXES)
    assert OPEN_METHODS["grpc.health.v1.Health"] == tuple(
        m.name for m in health_pb2.DESCRIPTOR.services_by_name["Health"].methods)


def test_http_filters_and_inbound_routes(pod: dict[str, dict[str, Any]]) -> None:
    for cfg in pod.values():
        inbound = _hcm(_listener(cfg, "inbound_grpc"))
        assert [f["name"] for f in inbound["http_filters"]] == ["envoy.filters.http.rbac", "envoy.filters.http.router"]
        # The inbound router's cluster stats would repeat the listener's own (every call goes to local_app).
        assert inbound["http_filters"][-1]["typed_config"]["dynamic_stats"] is False
        assert "dynamic_stats" not in _hcm(_listener(cfg, "outbound_grpc"))["http_filters"][-1]["typed_config"]
        # No filter matches on the caller: no x-forwarded-client-cert is set, and Envoy's default
        # (SANITIZE) strips one a caller sent.
        assert "forward_client_cert_details" not in inbound and "set_current_client_cert_details" not in inbound
        assert inbound["codec_type"] == "HTTP2"
        assert inbound["normalize_path"] is True
        assert inbound["http2_protocol_options"] == {"max_concurrent_streams": 1000,
                                                     "initial_stream_window_size": 1048576,
                                                     "initial_connection_window_size": 4194304}
        assert _listener(cfg, "inbound_grpc")["per_connection_buffer_limit_bytes"] == 1048576
        assert {o["description"] for o in _listener(cfg, "inbound_grpc")["socket_options"]} == {
            "SO_KEEPALIVE", "TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"}
        assert "tracing" not in inbound  # tracing is off in mesh.yaml
    backstop = {s: _routes(_listener(cfg, "inbound_grpc"))[-1]["route"] for s, cfg in pod.items()}
    assert {s: r["max_stream_duration"]["max_stream_duration"] for s, r in backstop.items()} == {
        "auth-svc": "5s", "learner-svc": "10s", "event-collector-svc": "2s", "analytics-svc": "20s"}
    events = {r["match"].get("path"): r["route"] for r in _routes(_listener(pod["event-collector-svc"],
                                                                            "inbound_grpc"))}
    for m, idle in (("CollectStream", "30s"), ("ListEvents", "10s")):
        route = events[f"/aivo.events.v1.EventCollectorService/{m}"]
        assert route["timeout"] == "0s"
        assert route["idle_timeout"] == idle
        assert "max_stream_duration" not in route


def test_outbound_timeouts_and_retries(pod: dict[str, dict[str, Any]]) -> None:
    *peer_routes, last = _routes(_listener(pod["analytics-svc"], "outbound_grpc"))
    assert last == outbound_refusal("analytics-svc")  # after every peer's routes: what none of them takes
    routes = {r["name"]: r for r in peer_routes}
    assert list(routes) == ["auth-svc/ValidateToken", "auth-svc/*", "learner-svc/GetProfile", "learner-svc/*",
                            "event-collector-svc/Collect", "event-collector-svc/CollectStream",
                            "event-collector-svc/ListEvents", "event-collector-svc/*"]
    deadlines = {n: r["route"].get("max_stream_duration", {}).get("max_stream_duration") for n, r in routes.items()}
    assert deadlines == {"auth-svc/ValidateToken": "1s", "auth-svc/*": "5s", "learner-svc/GetProfile": "10s",
                         "learner-svc/*": "10s", "event-collector-svc/Collect": "2s",
                         "event-collector-svc/CollectStream": None, "event-collector-svc/ListEvents": None,
                         "event-collector-svc/*": "2s"}
    for name, r in routes.items():
        action = r["route"]
        assert action["cluster"] == name.split("/")[0]
        msd = action.get("max_stream_duration")
        if msd is not None:  # unary: deadline and grpc-timeout cap, and never a (dead) timeout beside it
            assert "timeout" not in action
            assert msd["grpc_timeout_header_max"] == msd["max_stream_duration"]
        else:
            assert action["timeout"] == "0s"
            assert action["idle_timeout"] in ("30s", "10s")
        tokens = action["retry_policy"]["retry_on"].split(",")
        assert set(tokens) <= VALID_RETRY_ON
        assert {"connect-failure", "refused-stream"} <= set(tokens)
        assert action["retry_policy"]["retry_back_off"] == {"base_interval": "0.1s", "max_interval": "1s"}
    assert routes["auth-svc/ValidateToken"]["route"]["retry_policy"]["retry_on"] == (
        "unavailable,resource-exhausted,deadline-exceeded,internal,reset,connect-failure,refused-stream")
    assert routes["auth-svc/*"]["route"]["retry_policy"]["retry_on"] == "unavailable,connect-failure,refused-stream"
    # Per-try timeouts only on idempotent unary routes (config.resolve.per_try_not_applied), never on streams.
    per_try = {n: r["route"]["retry_policy"].get("per_try_timeout") for n, r in routes.items()}
    assert per_try == {"auth-svc/ValidateToken": "0.5s", "auth-svc/*": None, "learner-svc/GetProfile": "1s",
                       "learner-svc/*": None, "event-collector-svc/Collect": "1s",
                       "event-collector-svc/CollectStream": None, "event-collector-svc/ListEvents": None,
                       "event-collector-svc/*": None}
    assert routes["event-collector-svc/CollectStream"]["route"]["retry_policy"]["retry_on"] == (
        "connect-failure,refused-stream")
    assert routes["learner-svc/GetProfile"]["route"]["retry_policy"]["num_retries"] == 3
    assert routes["auth-svc/*"]["route"]["retry_policy"]["num_retries"] == 3
    # analytics-svc is nobody's peer; its own retry override (2) would apply to its callers.
    assert _routes(_listener(pod["auth-svc"], "outbound_grpc")) == [outbound_refusal("auth-svc")]


def test_peer_cluster_policy(mesh: MeshSpec, pod: dict[str, dict[str, Any]]) -> None:
    for s, cfg in pod.items():
        for peer in callable_peers(mesh, s):
            c = _cluster(cfg, peer)
            (t,) = c["circuit_breakers"]["thresholds"]
            assert t == {"priority": "DEFAULT", "max_connections": 1000, "max_pending_requests": 100,
                         "max_requests": 1000, "retry_budget": {"budget_percent": {"value": 25.0},
                                                                "min_retry_concurrency": 3},
                         "track_remaining": True}
            od = c["outlier_detection"]
            assert od["consecutive_5xx"] == od["consecutive_gateway_failure"] == 5
            assert od["enforcing_consecutive_5xx"] == od["enforcing_consecutive_gateway_failure"] == 100
            # 1 s after a stall, growing by 1 s per ejection in a row up to 60 s; the sweep that returns
            # a host runs every interval, so the first ejection lasts 1 to 2 s.
            assert (od["base_ejection_time"], od["max_ejection_time"], od["interval"]) == ("1s", "60s", "1s")
            assert "max_ejection_time_jitter" not in od
            assert od["max_ejection_percent"] == 50
            assert od["successful_active_health_check_uneject_host"] is False
            (hc,) = c["health_checks"]
            assert hc["interval"] == hc["no_traffic_healthy_interval"] == "30s"
            assert hc["no_traffic_interval"] == hc["unhealthy_interval"] == "2s"  # new or failing hosts
            assert hc["timeout"] == "5s"
            assert hc["grpc_health_check"] == {"service_name": mesh.service(peer).grpc_service, "authority": peer}
            h2 = c["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
            opts = h2["explicit_http_config"]["http2_protocol_options"]
            assert opts["max_concurrent_streams"] == 1000
            assert opts["connection_keepalive"] == {"interval": "30s", "timeout": "5s"}
            assert c["upstream_connection_options"]["tcp_keepalive"]["keepalive_time"] == 60
            assert c["lb_policy"] == "ROUND_ROBIN"
            assert c["per_connection_buffer_limit_bytes"] == 1048576
        app = _cluster(cfg, "local_app")
        sa = app["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        assert sa == {"address": "127.0.0.1", "port_value": mesh.service(s).local_port}
        assert "transport_socket" not in app


def test_sds_files_watch_the_rotation_directories(mesh: MeshSpec) -> None:
    files = sds_files(mesh, "auth-svc", EnvoyProfile.pod(mesh))
    (cert,) = files["tls_cert.yaml"]["resources"]
    assert cert["name"] == "svc_cert"
    assert cert["tls_certificate"] == {
        "certificate_chain": {"filename": f"{POD_CERT_DIR}/services/auth-svc.crt"},
        "private_key": {"filename": f"{POD_CERT_DIR}/services/auth-svc-key.pem"},
        "watched_directory": {"path": f"{POD_CERT_DIR}/services"}}
    (ca,) = files["mesh_ca.yaml"]["resources"]
    assert ca["name"] == "mesh_ca"
    assert ca["validation_context"] == {"trusted_ca": {"filename": f"{POD_CERT_DIR}/ca/ca.crt"},
                                        "watched_directory": {"path": f"{POD_CERT_DIR}/ca"}}
    # The layout is the PKI's own.
    layout = CertLayout(Path(POD_CERT_DIR))
    assert str(layout.service_paths("auth-svc")[0]) == cert["tls_certificate"]["certificate_chain"]["filename"]
    assert str(layout.ca_bundle) == ca["validation_context"]["trusted_ca"]["filename"]


def test_pod_stats_listener_only_serves_prometheus(pod: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    cfg = pod["auth-svc"]
    stats = _listener(cfg, "prometheus_stats")
    assert stats["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 15090}
    (route,) = _routes(stats)
    assert route["match"]["path"] == "/stats/prometheus"
    assert route["route"]["cluster"] == "envoy_admin"
    admin = _cluster(cfg, "envoy_admin")["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert admin["endpoint"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9901}
    local = bootstrap(parse_mesh(MESH_FILE.read_text()), "auth-svc",
                      EnvoyProfile.local(str(tmp_path / "c"), str(tmp_path / "s")))
    assert [x["name"] for x in local["static_resources"]["listeners"]] == ["inbound_grpc", "outbound_grpc"]
    assert _listener(local, "inbound_grpc")["address"]["socket_address"]["address"] == "127.0.0.1"


def test_retry_on_tokens() -> None:
    assert retry_on_tokens(["UNAVAILABLE"], idempotent=False).value == "unavailable,connect-failure,refused-stream"
    r = retry_on_tokens(["UNAVAILABLE", "INTERNAL", "UNKNOWN", "CANCELLED"], idempotent=True)
    assert r.tokens == ("unavailable", "internal", "reset", "connect-failure", "refused-stream")
    assert dict(r.skipped).keys() == {"UNKNOWN", "CANCELLED"}
    assert "no retry_on token" in dict(r.skipped)["UNKNOWN"]
    r = retry_on_tokens(["INTERNAL", "RESOURCE_EXHAUSTED"], idempotent=False)
    assert r.tokens == ("connect-failure", "refused-stream")
    assert len(r.skipped) == 2
    assert retry_on_tokens(["UNAVAILABLE"], idempotent=True, streaming=True).tokens == (
        "connect-failure", "refused-stream")
    assert set(GRPC_RETRY_TOKENS.values()) == {"cancelled", "deadline-exceeded", "internal", "resource-exhausted",
                                               "unavailable"}


FEATURES_MESH = """
mesh: {trust_domain: example.org, namespace: prod}
http2: {max_concurrent_streams: 64, initial_stream_window_size: 65535, per_connection_buffer_limit_bytes: 32768}
defaults:
  retry: {max_retries: 2, per_try_timeout: 300ms, retry_on: [UNAVAILABLE, DATA_LOSS]}
  outlier_detection: {base_ejection_time: 30s, max_ejection_time: 10s, max_ejection_percent: 12.5}
services:
  - name: front
    grpc_service: demo.Front
    port: 7001
    local_port: 7101
    fault: {abort_status: UNAVAILABLE, abort_percent: 12.5, delay: 200ms, delay_percent: 50}
  - name: back
    grpc_service: demo.Back
    port: 7002
    local_port: 7102
    timeout: 250ms
    routes:
      - {match: /demo.Back/, streaming: true, timeout: 1m}
      - {match: /demo.Back/Get, idempotent: true}
    allow:
      - from: ["*"]
observability:
  tracing: {enabled: true, sample_ratio: 0.25}
  statsd: {enabled: true, address: "statsd:9125", prefix: sidecars}
"""


def test_optional_features(tmp_path: Path) -> None:
    m = parse_mesh(FEATURES_MESH, "features.yaml")
    cfg = bootstrap(m, "front", EnvoyProfile.pod(m))
    inbound = _hcm(_listener(cfg, "inbound_grpc"))
    assert next(f for f in inbound["http_filters"] if f["name"] == "envoy.filters.http.fault")["typed_config"] == {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}  # the host's config decides
    fault = inbound["route_config"]["virtual_hosts"][0]["typed_per_filter_config"]["envoy.filters.http.fault"]
    assert fault["abort"] == {"grpc_status": 14, "percentage": {"numerator": 125000, "denominator": "MILLION"}}
    assert fault["delay"] == {"fixed_delay": "0.2s", "percentage": {"numerator": 50, "denominator": "HUNDRED"}}
    assert fault["headers"] == [{"name": ":path", "string_match": {"prefix": "/demo.Front/"}}]
    assert [f["name"] for f in inbound["http_filters"]][-2:] == ["envoy.filters.http.fault",
                                                                   "envoy.filters.http.router"]
    assert inbound["tracing"]["random_sampling"] == {"value": 25.0}
    otel = inbound["tracing"]["provider"]["typed_config"]
    assert otel["service_name"] == "front-sidecar"
    assert otel["grpc_service"]["envoy_grpc"]["cluster_name"] == (
        "otlp_collector")
    assert _hcm(_listener(cfg, "outbound_grpc"))["tracing"] == inbound["tracing"]
    otlp = _cluster(cfg, "otlp_collector")
    assert otlp["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
        "address": "jaeger", "port_value": 4317}
    (sink,) = cfg["stats_sinks"]
    assert sink["typed_config"]["tcp_cluster_name"] == "statsd_sink"  # a host name: TCP through a DNS cluster
    assert _cluster(cfg, "statsd_sink")["type"] == "STRICT_DNS"
    assert sink["typed_config"]["prefix"] == "sidecars"
    back = _cluster(cfg, "back")
    assert back["outlier_detection"]["max_ejection_time"] == "30s"  # never below base (Envoy rejects that)
    assert back["outlier_detection"]["max_ejection_percent"] == 12
    assert back["per_connection_buffer_limit_bytes"] == 32768
    routes = {r["name"]: r["route"] for r in _routes(_listener(cfg, "outbound_grpc"))[:-1]}  # [-1]: the refusal
    assert list(routes) == ["back/Get", "back/*"]
    assert routes["back/Get"]["max_stream_duration"]["max_stream_duration"] == "0.25s"
    assert "per_try_timeout" not in routes["back/Get"]["retry_policy"]  # 300ms >= 250ms: dropped
    assert routes["back/Get"]["retry_policy"]["retry_on"] == "unavailable,reset,connect-failure,refused-stream"
    assert routes["back/*"]["timeout"] == "0s"
    assert routes["back/*"]["idle_timeout"] == "60s"
    # back's inbound: the streaming prefix must not swallow the unary method.
    back_in = {r["name"]: r["route"] for r in _routes(_listener(bootstrap(m, "back", EnvoyProfile.pod(m)),
                                                                   "inbound_grpc"))}
    # Tracing is on here: probes get untraced routes of their own before the catch-all.
    assert list(back_in) == ["back/Get", "back/*", *(f"back/untraced{p.rstrip('/')}" for p in OPEN_PREFIXES),
                             "back/default"]
    assert "max_stream_duration" in back_in["back/Get"]
    assert back_in["back/*"]["timeout"] == "0s"
    if optional("envoy") is not None:  # the same features pass the real Envoy
        certs = tmp_path / "certs"
        from aivo_mesh.pki import init_ca, issue_all

        init_ca(CertLayout(certs), m.mesh.trust_domain)
        issue_all(CertLayout(certs), m)
        for s in ("front", "back"):
            res = _validate(_write_pod_relocated(m, s, certs, tmp_path / "pod"))
            assert res.returncode == 0, res.stderr + res.stdout


ROUTE_FAULTS_MESH = """
mesh: {trust_domain: example.org}
services:
  - name: front
    grpc_service: demo.Front
    port: 7001
    local_port: 7101
    fault: {delay: 200ms, delay_percent: 50, callers: [back]}
    routes:
      - {match: /demo.Front/Get, fault: {abort_status: UNAVAILABLE, abort_percent: 100, callers: [back, mesh-client]}}
      - {match: /demo.Front/Put, fault: {delay_percent: 0}}
      - {match: /demo.Front/List}
    allow:
      - from: ["*"]
  - name: back
    grpc_service: demo.Back
    port: 7002
    local_port: 7102
    allow:
      - from: ["*"]
"""


FAULT_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"


def test_route_faults_are_route_overrides_limited_to_their_callers(tmp_path: Path) -> None:
    """Each route carries its resolved fault as the fault filter's per-route config (key by key over the
    service's: Get keeps the service's delay), a route at 0 % an empty one that turns the service's off,
    a route without `fault` the service's; the virtual host holds the service's, for its own methods only
    (in the route configuration, so a change reaches open connections; the filter's own config is empty).
    Callers are matched on the sanitized x-forwarded-client-cert the inbound HCM sets."""
    from aivo_mesh.xds.resources import Trust, sidecar_snapshot

    m = parse_mesh(ROUTE_FAULTS_MESH, "faults.yaml")
    cfg = bootstrap(m, "front", EnvoyProfile.pod(m))
    inbound = _hcm(_listener(cfg, "inbound_grpc"))
    assert [f["name"] for f in inbound["http_filters"]] == [
        "envoy.filters.http.rbac", "envoy.filters.http.fault", "envoy.filters.http.router"]
    assert inbound["http_filters"][1]["typed_config"] == {"@type": FAULT_TYPE_URL}
    # What the callers are matched on: the verified caller's URI SAN, whatever the caller itself sent.
    assert inbound["forward_client_cert_details"] == "SANITIZE_SET"
    assert inbound["set_current_client_cert_details"] == {"uri": True}
    base = inbound["route_config"]["virtual_hosts"][0]["typed_per_filter_config"]["envoy.filters.http.fault"]
    back, client = "spiffe://example.org/ns/default/sa/back", "spiffe://example.org/ns/default/sa/mesh-client"
    assert base["headers"] == [{"name": ":path", "string_match": {"prefix": "/demo.Front/"}},
                               {"name": "x-forwarded-client-cert", "string_match": {"suffix": f";URI={back}"}}]
    assert "abort" not in base
    per_route = {r["name"]: r.get("typed_per_filter_config", {}).get("envoy.filters.http.fault")
                 for r in _routes(_listener(cfg, "inbound_grpc"))}
    assert list(per_route) == ["front/Get", "front/Put", "front/List", "front/default"]
    get = per_route["front/Get"]
    assert get is not None and get["abort"] == {"grpc_status": 14, "percentage": {"numerator": 100,
                                                                                  "denominator": "HUNDRED"}}
    assert get["delay"]["fixed_delay"] == "0.2s"
    (xfcc,) = get["headers"]
    regex = xfcc["string_match"]["safe_regex"]["regex"]
    import re

    for caller, faulted in ((back, True), (client, True), ("spiffe://example.org/ns/default/sa/other", False),
                            (back + "x", False)):
        assert bool(re.fullmatch(regex, f'By=spiffe://example.org/ns/default/sa/front;Hash=ab;URI={caller}')) is faulted
    assert per_route["front/Put"] == {"@type": FAULT_TYPE_URL}
    assert per_route["front/List"] is not None and per_route["front/List"]["delay"] == base["delay"]
    assert per_route["front/default"] is None  # the virtual host's: the service's fault
    # Without a fault anywhere, no filter at all.
    assert all(f["name"] != "envoy.filters.http.fault"
               for f in _hcm(_listener(bootstrap(m, "back", EnvoyProfile.pod(m)), "inbound_grpc"))["http_filters"])
    # The control plane's typed resources take the same (a field Envoy does not have fails here).
    snap = sidecar_snapshot(m, "front", EnvoyProfile.local("/certs", "/sds"), Trust(b"ca"))
    assert not snap.problems()
    inbound_routes: Any = snap.get("type.googleapis.com/envoy.config.route.v3.RouteConfiguration")["inbound"]
    typed_get = next(r for r in inbound_routes.virtual_hosts[0].routes if r.name == "front/Get")
    assert typed_get.typed_per_filter_config["envoy.filters.http.fault"].type_url.endswith(".HTTPFault")
    if optional("envoy") is not None:
        certs = tmp_path / "certs"
        from aivo_mesh.pki import init_ca, issue_all

        init_ca(CertLayout(certs), m.mesh.trust_domain)
        issue_all(CertLayout(certs), m)
        res = _validate(_write_pod_relocated(m, "front", certs, tmp_path / "pod"))
        assert res.returncode == 0, res.stderr + res.stdout


def test_pod_local_port_clash_is_a_config_error() -> None:
    """Checked when the mesh is loaded: the renderers take a valid model and never fail on it."""
    from aivo_mesh.errors import ConfigError

    with pytest.raises(ConfigError, match=r"services\[0\]\.local_port: port 15001 is a sidecar port in the pod"):
        parse_mesh("services:\n  - {name: a-svc, grpc_service: a.A, port: 7000, local_port: 15001}\n")


def test_no_free_sidecar_port_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from aivo_mesh.config import ports

    monkeypatch.setattr(ports, "POD_PORTS", ports.EnvoyPorts(65535, 65534, 65533))  # the search starts at the top
    with pytest.raises(ConfigError, match=r"services\[0\]\.sidecar: no free port left for the sidecar"):
        parse_mesh("services:\n  - {name: a-svc, grpc_service: a.A, port: 65535, local_port: 7000}\n")


def test_profile_rejects_relative_paths() -> None:
    with pytest.raises(ValueError, match="absolute"):
        EnvoyProfile.local("certs", "/tmp/sds")
    with pytest.raises(ValueError, match="outbound_pipe must be an absolute path"):
        EnvoyProfile.local("/c", "/tmp/sds", outbound_pipe="run/a.out.sock")


def test_pipes_carry_the_plaintext_legs_and_the_outbound_one_is_owner_only(mesh: MeshSpec) -> None:
    """`meshctl up`'s local profile: the app and the outbound listener on Unix sockets (runtime/sockets.py);
    the mesh leg (inbound, peers) stays TCP with mTLS. Without pipes, and always in the pod profile, both
    legs are loopback TCP as before."""
    app, out = "/run/m/learner-svc.app.sock", "/run/m/learner-svc.out.sock"
    cfg = bootstrap(mesh, "learner-svc", EnvoyProfile.local("/c", "/s", app_pipe=app, outbound_pipe=out))
    assert _listener(cfg, "outbound_grpc")["address"] == {"pipe": {"path": out, "mode": 0o600}}
    local_app = _cluster(cfg, "local_app")
    assert local_app["type"] == "STATIC"
    assert local_app["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "pipe": {"path": app}}
    assert _listener(cfg, "inbound_grpc")["address"] == {"socket_address": {
        "address": "127.0.0.1", "port_value": sidecar_ports(mesh, "learner-svc", "local").inbound}}
    assert "transport_socket" in _cluster(cfg, "auth-svc")
    assert "mode: 384" in serialize("envoy.yaml", cfg)  # 0o600 as Envoy's uint32 reads it
    tcp = bootstrap(mesh, "learner-svc", EnvoyProfile.local("/c", "/s"))
    assert _listener(tcp, "outbound_grpc")["address"]["socket_address"]["address"] == "127.0.0.1"
    for s in SERVICES:
        assert '"pipe"' not in json.dumps(bootstrap(mesh, s, EnvoyProfile.pod(mesh)))


# --- the shared reference bootstrap -----------------------------------------------------------------
def _key_paths(node: Any, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            p = f"{prefix}.{k}" if prefix else str(k)
            out.add(p)
            out |= _key_paths(v, p)
    elif isinstance(node, list):
        for v in node:
            out |= _key_paths(v, prefix + "[]")
    return out


@pytest.mark.skipif(not (REFERENCE / "sidecar-bootstrap.yaml").is_file(),
                    reason=f"the shared reference files are not at {REFERENCE} (../shared next to the checkout)")
def test_shape_matches_the_reference(pod: dict[str, dict[str, Any]], mesh: MeshSpec) -> None:
    ref = yaml.safe_load((REFERENCE / "sidecar-bootstrap.yaml").read_text())
    ours = pod["learner-svc"]
    # Peer cluster: everything the reference sets, we set, except max_retries (overridden by the budget).
    missing = _key_paths(_cluster(ref, "auth")) - _key_paths(_cluster(ours, "auth-svc"))
    assert missing == {"circuit_breakers.thresholds[].max_retries"}
    # Inbound TLS and listener-level settings.
    ref_in, our_in = _listener(ref, "inbound_grpc"), _listener(ours, "inbound_grpc")
    assert _key_paths(ref_in["filter_chains"][0]["transport_socket"]) <= _key_paths(
        our_in["filter_chains"][0]["transport_socket"])
    assert {"per_connection_buffer_limit_bytes", "socket_options", "traffic_direction"} <= set(our_in)
    # Outbound route: our unary deadline lives in max_stream_duration instead of timeout (documented).
    ref_route = _routes(_listener(ref, "outbound_auth"))[0]
    our_route = next(r for r in _routes(_listener(ours, "outbound_grpc")) if r["name"] == "auth-svc/*")
    assert _key_paths(ref_route) - _key_paths(our_route) == {"route.timeout", "route.retry_policy.per_try_timeout"}
    # SDS: same secret names and file names; ours add the watched directories.
    for name in ("tls_cert.yaml", "mesh_ca.yaml"):
        ref_sds = yaml.safe_load((REFERENCE / "sds" / name).read_text())
        our_sds = sds_files(mesh, "learner-svc", EnvoyProfile.pod(mesh))[name]
        assert [r["name"] for r in ref_sds["resources"]] == [r["name"] for r in our_sds["resources"]]
        assert _key_paths(ref_sds) <= _key_paths(our_sds)
    assert ref["admin"]["address"] == ours["admin"]["address"]


def test_inbound_probes_are_not_traced_when_tracing_is_on(mesh: MeshSpec, tmp_path: Path) -> None:
    """Every peer's sidecar health-checks this one: with tracing on, health and reflection routes
    come before the catch-all with all sampling at 0 (the app side skips them too); without tracing
    there is nothing to turn off and the routes are not rendered."""
    def inbound_routes(profile: EnvoyProfile) -> list[dict[str, Any]]:
        listener = next(x for x in bootstrap(mesh, "auth-svc", profile)["static_resources"]["listeners"]
                        if x["name"] == "inbound_grpc")
        hcm = listener["filter_chains"][0]["filters"][-1]["typed_config"]
        return list(hcm["route_config"]["virtual_hosts"][0]["routes"])

    traced = inbound_routes(EnvoyProfile.local("/c", str(tmp_path), otlp=("127.0.0.1", 4317)))
    untraced = [r for r in traced if "tracing" in r]
    assert [r["match"]["prefix"] for r in untraced] == list(OPEN_PREFIXES)
    assert all(r["tracing"][k] == {"numerator": 0} for r in untraced
               for k in ("client_sampling", "random_sampling", "overall_sampling"))
    assert all(r["route"]["cluster"] == "local_app" for r in untraced)
    assert traced.index(untraced[-1]) < traced.index(next(r for r in traced if r["name"] == "auth-svc/default"))
    assert not [r for r in inbound_routes(EnvoyProfile.local("/c", str(tmp_path))) if "tracing" in r]


# --- the real Envoy ---------------------------------------------------------------------------------
@needs_envoy
def test_real_envoy_validates_every_rendered_bootstrap(mesh: MeshSpec, mesh_certs: CertLayout,
                                                       tmp_path: Path) -> None:
    """Pod profile (as shipped, /etc/envoy re-rooted into tmp) and local profile (with tracing, StatsD
    and the Unix socket legs, as `meshctl up` runs it) for every service: `envoy --mode validate` must
    say OK."""
    files = [_write_pod_relocated(mesh, s, mesh_certs.root, tmp_path / "pod") for s in SERVICES]
    for s in SERVICES:
        profile = EnvoyProfile.local(str(mesh_certs.root), str(tmp_path / "local" / s / "sds"),
                                     otlp=("127.0.0.1", 4317), statsd=("127.0.0.1", 8125),
                                     app_pipe=str(tmp_path / f"{s}.app.sock"), outbound_pipe=str(tmp_path / f"{s}.o"))
        files.append(write_sidecar(mesh, s, profile, tmp_path / "local" / s / "envoy.yaml"))
    failures = {str(f): (r.stdout + r.stderr)[-2000:] for f in files if (r := _validate(f)).returncode != 0}
    assert not failures, failures
    # The re-rooted pod files are the shipped ones, byte for byte, apart from the paths.
    shipped = (OUT_DIR / "auth-svc" / "envoy.yaml").read_text()
    assert (tmp_path / "pod" / "auth-svc" / "envoy.yaml").read_text() == shipped.replace(
        "/etc/envoy/sds", str(tmp_path / "pod" / "auth-svc" / "sds")).replace("/etc/envoy", str(tmp_path / "pod"))


@pytest.mark.slow
@needs_envoy
def test_real_envoy_serves_auth_sidecar_and_reloads_rotated_cert(mesh: MeshSpec, mesh_certs: CertLayout,
                                                                 tmp_path: Path) -> None:
    """Local profile for auth-svc: LIVE, /certs shows its serial, /stats/prometheus answers; a
    `certs rotate` reaches Envoy through the SDS watched_directory without a restart."""
    m = on_free_ports(mesh)
    shutil.copytree(mesh_certs.root, tmp_path / "certs")
    layout = CertLayout(tmp_path / "certs")
    profile = EnvoyProfile.local(str(layout.root), str(tmp_path / "sds"))
    config = write_sidecar(m, "auth-svc", profile, tmp_path / "envoy.yaml")
    admin = sidecar_ports(m, "auth-svc", "local").admin
    proc = start_envoy(config, log_level="warn", stderr=subprocess.PIPE)
    try:
        wait_envoy_live(admin, proc)
        assert _leaf_serial(layout.service_paths("auth-svc")[0]) in _cert_serials(admin)
        status, body = _http(admin, "/stats/prometheus")
        assert status == 200
        assert "envoy_server_live" in body
        (issued,) = rotate(layout, mesh, ["auth-svc"])
        deadline = time.monotonic() + 3
        while issued.serial not in _cert_serials(admin):
            assert time.monotonic() < deadline, "rotated certificate never reached Envoy"
            time.sleep(0.05)
    finally:
        stop_process(proc, 5)
        assert proc.stderr is not None
        log = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    assert proc.returncode is not None, "envoy did not exit"
    assert proc.returncode == 0, log


@pytest.mark.slow
@needs_envoy
def test_real_envoy_pod_profile_exposes_only_prometheus(mesh: MeshSpec, mesh_certs: CertLayout,
                                                        tmp_path: Path) -> None:
    """The shipped auth-svc pod file (paths re-rooted, ports moved to free ones): the 15090 listener
    answers GET /stats/prometheus and nothing else of the admin API."""
    path = _write_pod_relocated(mesh, "auth-svc", mesh_certs.root, tmp_path)
    inbound, outbound, admin, stats, app = free_ports(5)
    moved = {50051: inbound, 15001: outbound, 9901: admin, 15090: stats, mesh.service("auth-svc").local_port: app}
    config = yaml.safe_load(path.read_text())
    for node in _walk(config):
        if node.get("port_value") in moved:
            node["port_value"] = moved[node["port_value"]]
    path.write_text(serialize("envoy.yaml", config))
    proc = start_envoy(path, log_level="warn")
    try:
        wait_envoy_live(admin, proc)
        status, body = _http(stats, "/stats/prometheus")
        assert status == 200
        assert "envoy_server_live" in body
        assert _http(stats, "/ready")[0] == 404
        assert _http(stats, "/quitquitquit", method="POST")[0] == 404
        assert _http(stats, "/stats/prometheus", method="POST")[0] == 404
    finally:
        proc.terminate()
        proc.wait(timeout=5)
    assert proc.returncode == 0


@pytest.mark.slow
@needs_envoy
async def test_real_envoys_carry_grpc_between_sidecars(mesh: MeshSpec, mesh_certs: CertLayout,
                                                       tmp_path: Path) -> None:
    """learner-svc's app -> its sidecar (plaintext) -> auth-svc's sidecar (mTLS 1.3) -> a grpc.aio app:
    the allow-list lets learner call ValidateToken only (else PERMISSION_DENIED), the route's 1 s
    deadline is enforced by Envoy, an UNAVAILABLE answer is retried by Envoy, and so is an attempt cut by
    the route's 0.5 s per-try timeout."""
    m = on_free_ports(mesh)
    calls = {"n": 0}

    async def validate(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        calls["n"] += 1
        if request == b"slow" or (request == b"hang-once" and calls["n"] == 1):
            await asyncio.sleep(3)
        if request == b"flaky" and calls["n"] == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return b"ok"

    async def authenticate(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return b"token"

    server, _ = await auth_app({"ValidateToken": validate, "Authenticate": authenticate},
                               port=m.service("auth-svc").local_port)
    procs = []
    try:
        for s in ("auth-svc", "learner-svc"):
            profile = EnvoyProfile.local(str(mesh_certs.root), str(tmp_path / s / "sds"))
            config = write_sidecar(m, s, profile, tmp_path / s / "envoy.yaml")
            procs.append(await start_envoy_async(config))
        for s, proc in zip(("auth-svc", "learner-svc"), procs, strict=True):
            await asyncio.to_thread(wait_envoy_live, sidecar_ports(m, s, "local").admin, proc)
        # LIVE is not enough: learner's sidecar may have health-checked auth's before that one listened,
        # and with panic routing off (docs/envoy.md) it fails calls fast until the next check (2 s).
        learner_admin = f"127.0.0.1:{sidecar_ports(m, 'learner-svc', 'local').admin}"
        def auth_healthy() -> bool:
            with contextlib.suppress(OSError):
                hosts = envoy_hosts(learner_admin).get("auth-svc", {})
                return bool(hosts) and all(f == "healthy" for f in hosts.values())
            return False

        await until(auth_healthy, 15, "learner's sidecar sees auth-svc healthy")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar_ports(m, 'learner-svc', 'local').outbound}") as ch:
            def ident(b: bytes) -> bytes:
                return b

            vt = ch.unary_unary("/aivo.auth.v1.AuthService/ValidateToken", request_serializer=ident,
                                response_deserializer=ident)
            au = ch.unary_unary("/aivo.auth.v1.AuthService/Authenticate", request_serializer=ident,
                                response_deserializer=ident)
            assert await vt(b"x", timeout=5) == b"ok"
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await au(b"x", timeout=5)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            start = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await vt(b"slow")  # no client deadline: the route's 1 s applies
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert 0.8 < time.monotonic() - start < 2.5
            calls["n"] = 0
            assert await vt(b"flaky", timeout=5) == b"ok"
            assert calls["n"] == 2  # the sidecar retried the UNAVAILABLE answer
            calls["n"] = 0
            start = time.monotonic()
            assert await vt(b"hang-once", timeout=5) == b"ok"  # within the route's 1 s:
            assert calls["n"] == 2 and time.monotonic() - start < 0.95  # the 0.5 s per-try timeout cut the hang
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            await proc.wait()
        await server.stop(0)
    assert [p.returncode for p in procs] == [0, 0]


def test_sidecar_port_errors_name_the_mesh_file_and_line(tmp_path: Path) -> None:
    text = (ROOT / "mesh.yaml").read_text()
    assert text.count("local_port: 8081") == 1
    path = tmp_path / "podclash.yaml"
    path.write_text(text.replace("local_port: 8081", "local_port: 15090"))
    line = 1 + path.read_text().splitlines().index("    local_port: 15090")
    with pytest.raises(ConfigError) as exc:
        load_mesh(path)
    assert str(exc.value).startswith(f"{path}:{line}: services[0].local_port: port 15090 is a sidecar port")


def test_the_inbound_app_cluster_caps_nothing_the_callers_hold_the_limits(mesh: MeshSpec) -> None:
    """`limits` are each caller's caps on its calls to a service (its sidecar's peer cluster, its MeshClient's
    limit layer); the service's own sidecar does not cap its app for all callers together, as a MeshServer
    does not (the overflow itself: the conformance suite's concurrency-limit scenario, on every plane)."""
    config = bootstrap(mesh, "auth-svc", EnvoyProfile.pod(mesh))
    local = next(c for c in config["static_resources"]["clusters"] if c["name"] == "local_app")
    (thresholds,) = local["circuit_breakers"]["thresholds"]
    assert {thresholds[k] for k in ("max_connections", "max_pending_requests", "max_requests", "max_retries")} == {
        2**32 - 1}
    peer = next(c for c in bootstrap(mesh, "learner-svc", EnvoyProfile.pod(mesh))["static_resources"]["clusters"]
                if c["name"] == "auth-svc")
    limits = service_policy(mesh, "auth-svc").limits
    assert peer["circuit_breakers"]["thresholds"][0]["max_requests"] == limits.max_requests
