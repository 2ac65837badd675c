"""The sidecar plane end to end: `meshctl up` with a real Envoy per service on 127.0.0.1.

test_envoy_render.py covers route deadlines, Envoy retries and certificate rotation on single
sidecars; here the whole mesh runs as `meshctl up` starts it, and one test builds a two-endpoint
cluster to watch outlier ejection move traffic.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from binaries import needs, require
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import auth_app, meshctl, start_envoy_async, wait_envoy_live
from waiting import until

from aivo_mesh.client import MeshClient, MeshConfig
from aivo_mesh.config import MeshSpec, load_mesh
from aivo_mesh.config.ports import EnvoyPorts, sidecar_ports
from aivo_mesh.pki import CertLayout
from aivo_mesh.pki.issue import init_ca, issue_leaf
from aivo_mesh.render import serialize
from aivo_mesh.render.envoy import (
    HELPER_CLUSTERS,
    EnvoyProfile,
    bootstrap,
    callable_peers,
    sds_files,
)
from aivo_mesh.runtime.collector import SpanLog
from aivo_mesh.runtime.local import free_ports, with_free_ports
from aivo_mesh.runtime.mesh import RuntimeInfo, mesh_for_clients
from aivo_mesh.runtime.state import StateDir
from aivo_mesh.runtime.status import envoy_hosts, peer_breakers, peer_hosts
from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc, learner_pb2, learner_pb2_grpc
from aivo_mesh.xds.resources import ads_bootstrap

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

needs_envoy = needs("envoy")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


@pytest.fixture(scope="module")
def sidecar_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StateDir, RuntimeInfo, MeshSpec]]:
    require("envoy")
    root = tmp_path_factory.mktemp("sidecar")
    state = StateDir(root / "mesh")
    # mesh.yaml with the inbound sidecars' per-method gRPC stats on (off by default), which a test reads.
    doc = yaml.safe_load((ROOT / "mesh.yaml").read_text())
    doc["observability"]["metrics"]["envoy_inbound_grpc_stats"] = True
    (root / "mesh.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    out = meshctl("up", "--config", str(root / "mesh.yaml"), "--state-dir", str(state.root), "--free-ports",
                  "--timeout", "90")
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        info = RuntimeInfo.read(state)
        assert info is not None and info.plane == "sidecar"
        yield state, info, mesh_for_clients(load_mesh(state.mesh_file), info)
    finally:
        meshctl("down", "--state-dir", str(state.root))


def _channel(address: str, authority: str, root: bytes, key: bytes | None = None,
             chain: bytes | None = None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(root, key, chain)
    return grpc.aio.secure_channel(address, creds, options=[("grpc.default_authority", authority)])


async def test_inbound_refuses_a_client_without_certificate(sidecar_mesh):
    state, info, _ = sidecar_mesh
    async with _channel(info.services["auth-svc"].address, "auth-svc", state.certs.ca_cert.read_bytes()) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_inbound_refuses_a_certificate_from_a_foreign_ca(sidecar_mesh, tmp_path, mesh):
    state, info, _ = sidecar_mesh
    foreign = CertLayout(tmp_path / "foreign")
    init_ca(foreign, mesh.mesh.trust_domain)
    issue_leaf(foreign, "mesh-client", mesh)
    cert, key = foreign.identity_paths("mesh-client")
    async with _channel(info.services["auth-svc"].address, "auth-svc", state.certs.ca_cert.read_bytes(),
                        key.read_bytes(), cert.read_bytes()) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_envoy_denies_an_identity_mesh_yaml_does_not_allow(sidecar_mesh):
    state, _, view = sidecar_mesh
    async with MeshClient(MeshConfig.for_identity("event-collector-svc", state.certs, view),
                          health_checks=False) as client:
        stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="x"), timeout=5)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_envoy_rbac_matches_an_allowed_method_exactly(sidecar_mesh):
    """mesh.yaml lets learner-svc call auth-svc's ValidateToken only. A method whose path merely starts
    with it is denied by the sidecar's RBAC; a prefix match would pass it to the app, which answers
    UNIMPLEMENTED."""
    state, info, _ = sidecar_mesh
    cert, key = state.certs.identity_paths("learner-svc")
    async with _channel(info.services["auth-svc"].address, "auth-svc", state.certs.ca_cert.read_bytes(),
                        key.read_bytes(), cert.read_bytes()) as ch:
        reply = await auth_pb2_grpc.AuthServiceStub(ch).ValidateToken(auth_pb2.ValidateTokenRequest(token="x"),
                                                                      timeout=5)
        assert reply.valid is False  # allowed: the app itself answered
        for path in ("/aivo.auth.v1.AuthService/ValidateTokens", "/aivo.auth.v1.AuthService/ValidateToken2"):
            call = ch.unary_unary(path, request_serializer=auth_pb2.ValidateTokenRequest.SerializeToString,
                                  response_deserializer=auth_pb2.ValidateTokenResponse.FromString)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await call(auth_pb2.ValidateTokenRequest(token="x"), timeout=5)
            assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED, (path, exc.value)


async def test_learner_to_auth_through_two_sidecars_is_one_trace_with_app_and_envoy_spans(sidecar_mesh):
    state, _, view = sidecar_mesh
    async with MeshClient(MeshConfig.for_identity("mesh-client", state.certs, view)) as client:
        auth = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
        token = (await auth.Authenticate(auth_pb2.AuthenticateRequest(learner_id="ada", password="x" * 8))).token
        learner = learner_pb2_grpc.LearnerServiceStub(await client.get_channel("learner-svc"))
        await learner.GetProfile(learner_pb2.GetProfileRequest(learner_id="ada"),
                                 metadata=(("authorization", f"Bearer {token}"),))
    spans = SpanLog(state.root / "traces.jsonl")
    want = {"learner-svc-sidecar", "learner-svc", "auth-svc-sidecar", "auth-svc"}

    def found() -> Any:
        for t in spans.traces(50):
            services = {s.service for s in t.spans}
            if want <= services and any(s.name == "/aivo.auth.v1.AuthService/ValidateToken" for s in t.spans):
                return t
        return None

    deadline = time.monotonic() + 60
    while (trace := found()) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert trace is not None, "no trace spanning both apps and both sidecars"
    by_id = {s.span_id: s for s in trace.spans}
    auth_server = next(s for s in trace.spans if s.service == "auth-svc" and s.kind == "SERVER")
    chain = []
    s = auth_server
    while s.parent_span_id in by_id:
        s = by_id[s.parent_span_id]
        chain.append(s.service)
    # auth app <- auth sidecar <- learner sidecar (egress) <- learner app (client, server) <- learner sidecar
    assert chain[:3] == ["auth-svc-sidecar", "learner-svc-sidecar", "learner-svc"], chain
    # The sidecars health-checked each other from the start (before this call, so in the same or an
    # earlier export): none of those checks made a trace.
    envoy_paths = {str(sp.attributes.get("grpc.path")) for t in spans.traces(10_000) for sp in t.spans
                   if sp.service.endswith("-sidecar")}
    assert "/aivo.auth.v1.AuthService/ValidateToken" in envoy_paths
    assert not {p for p in envoy_paths if p.startswith("/grpc.health.v1.Health/")}, envoy_paths


async def test_sidecar_prometheus_stats_expose_cluster_retry_and_outlier_series(sidecar_mesh):
    _, info, _ = sidecar_mesh
    text = await asyncio.to_thread(_get, f"http://{info.services['learner-svc'].sidecar_admin}/stats/prometheus")
    for series in ('envoy_cluster_upstream_rq_total{envoy_cluster_name="auth-svc"}',
                   'envoy_cluster_upstream_rq_retry{envoy_cluster_name="auth-svc"}',
                   'envoy_cluster_outlier_detection_ejections_active{envoy_cluster_name="auth-svc"}',
                   'envoy_cluster_circuit_breakers_default_remaining_retries{envoy_cluster_name="auth-svc"}'):
        assert series in text, series


async def test_sidecar_counts_known_methods_apart_and_buckets_names_it_does_not_know(sidecar_mesh):
    """A caller allowed every method of a service may send any method name: those get no stats of their
    own (bounded memory), only the methods mesh.yaml and the service's proto know do."""
    state, info, _ = sidecar_mesh
    cert, key = state.certs.identity_paths("mesh-client")
    learner = info.services["learner-svc"]
    async with _channel(learner.address, "learner-svc", state.certs.ca_cert.read_bytes(), key.read_bytes(),
                        cert.read_bytes()) as ch:
        codes = []
        for method in ("GetProfile", "NoSuchMethodA", "NoSuchMethodB"):
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await ch.unary_unary(f"/aivo.learner.v1.LearnerService/{method}")(b"", timeout=5)
            codes.append(exc.value.code())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNIMPLEMENTED]
    text = await asyncio.to_thread(_get, f"http://{learner.sidecar_admin}/stats?filter=local_app%5C.grpc%5C.")
    stats = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    assert int(stats["cluster.local_app.grpc.aivo.learner.v1.LearnerService.GetProfile.total"]) >= 1
    assert int(stats["cluster.local_app.grpc.total"]) >= 2, stats
    assert not [name for name in stats if "NoSuchMethod" in name], stats


# -- the plaintext legs: private Unix sockets, no loopback TCP -----------------------------------

def _legs(info: RuntimeInfo) -> dict[str, Path]:
    """Every app and outbound socket of the running mesh, by "<svc> app" / "<svc> outbound"."""
    legs = {}
    for name, ep in info.services.items():
        for leg, address in (("app", ep.app), ("outbound", ep.outbound)):
            assert address is not None and address.startswith("unix:"), (name, leg, address)
            legs[f"{name} {leg}"] = Path(address.removeprefix("unix:"))
    return legs


def test_no_app_or_outbound_port_listens_on_loopback_tcp(sidecar_mesh):
    state, info, _ = sidecar_mesh
    mesh = load_mesh(state.mesh_file)  # the effective mesh: the ports these legs had before
    for name in mesh.service_names:
        for port in (mesh.service(name).local_port, sidecar_ports(mesh, name, "local").outbound):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
    # No other TCP port carries them either: the mesh's processes listen on the inbound (mTLS) and admin
    # ports, the collector's, the observer's (its API and dashboard, loopback) and the control plane's (ADS on
    # mTLS, its admin), nothing else.
    expected = {int(info.collector.rpartition(":")[2])}
    assert info.observer is not None
    expected.add(int(info.observer.rpartition(":")[2]))
    assert info.control_plane is not None
    expected |= {int(a.rpartition(":")[2]) for a in info.control_plane.values()}
    for ep in info.services.values():
        expected |= {int(a.rpartition(":")[2]) for a in (ep.address, ep.admin, ep.sidecar_admin) if a}
    pids = {r.pid for r in state.read_processes()}
    assert _tcp_listen_ports(pids) <= expected, _tcp_listen_ports(pids) - expected


def _tcp_listen_ports(pids: set[int]) -> set[int]:
    """Local ports of the TCP sockets in LISTEN state owned by `pids` (Linux /proc)."""
    inodes: set[str] = set()
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        for fd in fds.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: TCP_LISTEN
                ports.add(int(cols[1].rpartition(":")[2], 16))
    return ports


def test_sockets_are_0600_in_a_0700_folder_of_the_current_user(sidecar_mesh):
    _, info, _ = sidecar_mesh
    assert info.sockets is not None
    folder = Path(info.sockets)
    st = os.lstat(folder)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    legs = _legs(info)
    assert len(legs) == 2 * len(info.services)
    for what, path in legs.items():
        st = os.lstat(path)
        assert path.parent == folder, what
        assert stat.S_ISSOCK(st.st_mode), what
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, os.getuid()), (what, oct(st.st_mode))


async def test_the_owner_reaches_the_app_and_calls_through_the_outbound_socket(sidecar_mesh):
    """What the permissions below take away from everyone else: the app answers in plaintext, and the
    outbound socket calls a peer with the sidecar's mTLS identity."""
    _, info, _ = sidecar_mesh
    async with grpc.aio.insecure_channel(str(info.services["auth-svc"].app)) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    async with grpc.aio.insecure_channel(str(info.services["learner-svc"].outbound)) as ch:
        reply = await auth_pb2_grpc.AuthServiceStub(ch).ValidateToken(
            auth_pb2.ValidateTokenRequest(token="not-a-token"), timeout=5)
    assert not reply.valid  # auth-svc answered learner-svc's sidecar (RBAC allows it) over mTLS


PROBE = """
import errno, json, os, socket, sys
caps = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("CapEff:"))
out = {"uid": os.getuid(), "caps": int(caps, 16)}
for path in sys.argv[2:]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        out[path] = "connected"
    except OSError as exc:
        out[path] = errno.errorcode.get(exc.errno, str(exc.errno))
    finally:
        s.close()
tcp = socket.socket()
try:  # control: this user can reach the mesh's TCP front door, so a refusal above is the permissions
    tcp.connect(("127.0.0.1", int(sys.argv[1])))
    out["inbound"] = "connected"
except OSError as exc:
    out["inbound"] = errno.errorcode.get(exc.errno, str(exc.errno))
print(json.dumps(out))
"""
NOBODY = 65534


def test_another_user_can_neither_reach_an_app_nor_use_a_sidecar(sidecar_mesh):
    if os.geteuid() != 0:
        pytest.skip("needs root to run the probe as another user (nobody, uid 65534)")
    _, info, _ = sidecar_mesh

    def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
        # setpriv execs before its capabilities go, so an interpreter under a 0700 home still starts;
        # subprocess's own user= switch drops them first.
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            return subprocess.run([setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
                                  capture_output=True, text=True, timeout=30, check=False)
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False,
                              user=NOBODY, group=NOBODY, extra_groups=[])

    try:
        check = as_nobody(sys.executable, "-c", "import os; print(os.getuid())")
    except PermissionError as exc:
        pytest.skip(f"nobody cannot run {sys.executable}: {exc}")
    if check.returncode != 0:
        pytest.skip(f"nobody cannot run {sys.executable}: {check.stderr.strip()[-200:]}")
    legs = _legs(info)
    inbound = info.services["auth-svc"].address.rpartition(":")[2]
    out = as_nobody(sys.executable, "-c", PROBE, inbound, *map(str, legs.values()))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert (got["uid"], got["caps"], got["inbound"]) == (NOBODY, 0, "connected"), got
    denied = {errno.errorcode[errno.EACCES], errno.errorcode[errno.EPERM]}
    assert {what: got[str(path)] for what, path in legs.items() if got[str(path)] not in denied} == {}, got


def test_status_reports_sidecars_and_upstreams(sidecar_mesh):
    state, _, _ = sidecar_mesh
    out = meshctl("status", "--json", "--state-dir", str(state.root), "--interval", "0")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)["services"]}
    assert {r["process"]["sidecar"] for r in rows.values()} == {"LIVE"}
    assert {r["health"] for r in rows.values()} == {"healthy"}
    assert {u["service"] for u in rows["learner-svc"]["upstreams"]} == {"auth-svc", "event-collector-svc"}


async def test_a_killed_sidecar_is_restarted_and_reported(sidecar_mesh):
    import signal

    from aivo_mesh.runtime.state import pid_alive

    state, _, _ = sidecar_mesh
    victim = next(r for r in state.read_processes() if r.name == "auth-svc-envoy")
    os.kill(victim.pid, signal.SIGKILL)

    def restarted() -> bool:
        return any(r.name == "auth-svc-envoy" and r.pid != victim.pid and pid_alive(r.pid)
                   for r in state.read_processes())

    await until(restarted, 20, "the supervisor restarted auth-svc's Envoy")

    def row() -> dict[str, Any]:
        out = meshctl("status", "--json", "--state-dir", str(state.root), "--interval", "0")
        assert out.returncode in (0, 1), out.stderr  # 1 while a service is not healthy
        found: dict[str, Any] = {r["name"]: r for r in json.loads(out.stdout)["services"]}["auth-svc"]
        return found

    def settled(r: dict[str, Any]) -> bool:  # the observer's view lags the supervisor by up to one round
        return bool(r["health"] == "healthy" and r["process"]["restarts"] == 1)

    deadline = time.monotonic() + 20
    while not settled(r := await asyncio.to_thread(row)) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    p = r["process"]
    assert (p["state"], p["sidecar"], r["health"], p["restarts"]) == ("running", "LIVE", "healthy", 1), r
    assert json.loads((state.root / "restarts.json").read_text()) == {"auth-svc-envoy": 1}


def test_status_keeps_every_peer_and_drops_exactly_the_renderers_helper_clusters(mesh, tmp_path):
    # Every cluster the renderer can emit: pod profile (envoy_admin), tracing, StatsD by host name.
    statsd = mesh.observability.statsd.model_copy(update={"enabled": True, "address": "statsd.internal:8125"})
    m = mesh.model_copy(update={"observability": mesh.observability.model_copy(update={"statsd": statsd})})
    profile = EnvoyProfile("pod", "/etc/envoy/certs", "/etc/envoy/sds", otlp=("jaeger", 4317),
                           statsd=("statsd.internal", 8125))
    names = {c["name"] for c in bootstrap(m, "analytics-svc", profile)["static_resources"]["clusters"]}
    peers = set(callable_peers(m, "analytics-svc"))
    # The constant names every non-peer cluster, no more: these, and the ADS bootstrap's one cluster.
    ads = ads_bootstrap(m, "analytics-svc", profile, ("127.0.0.1", 15010), ca_file="/ca.crt",
                        cert_sds_file="/sds/tls_cert.yaml")
    names |= {c["name"] for c in ads["static_resources"]["clusters"]}
    assert names - peers == HELPER_CLUSTERS
    # Peers whose names start like a helper's (status used to drop anything starting with "local").
    names |= {"localizer-svc", "local-events-svc"}
    clusters = {"cluster_statuses": [
        {"name": n, "host_statuses": [{"address": {"socket_address": {"address": "127.0.0.1", "port_value": 7000 + i}},
                                       "health_status": {"eds_health_status": "HEALTHY"}}]}
        for i, n in enumerate(sorted(names))]}
    assert set(peer_hosts(clusters)) == peers | {"localizer-svc", "local-events-svc"}


def test_status_reads_the_sidecars_circuit_breaker_gauges_per_peer() -> None:
    # As Envoy 1.40's /stats?filter=circuit_breakers\.default\. prints them (one gauge per threshold).
    def gauges(cluster: str, **values: int) -> list[str]:
        return [f"cluster.{cluster}.circuit_breakers.default.{g}: {values.get(g, 0)}"
                for g in ("cx_open", "cx_pool_open", "rq_open", "rq_pending_open", "rq_retry_open",
                          "remaining_rq", "remaining_retries")]

    text = "\n".join([*gauges("auth-svc"), *gauges("event-collector-svc", rq_open=1, rq_retry_open=1),
                      *gauges("local_app", rq_open=1), *gauges("otlp_collector")])
    assert peer_breakers(text) == {"auth-svc": "closed",
                                   "event-collector-svc": "open (max_requests, max_retries)"}


# -- outlier ejection across two endpoints -------------------------------------------------------

async def _start_envoy(config: Path) -> asyncio.subprocess.Process:
    # The outlier event log is read while the test runs: flushed every 50 ms (default 10 s).
    return await start_envoy_async(config, extra=("--file-flush-interval-msec", "50"))


async def _stop(procs: list[asyncio.subprocess.Process]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        await p.wait()


async def _auth_app(port: int, fail: bool, hits: dict[str, int], name: str,
                    running: asyncio.Event | None = None) -> grpc.aio.Server:
    """auth-svc's ValidateToken, failing every call with UNAVAILABLE if `fail`; while `running` is
    clear the app stalls: each call waits and is answered once it is set again, as a stalled
    process answers late. Its health service stays SERVING: only outlier detection judges it."""

    async def validate(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        hits[name] += 1
        if running is not None:
            await running.wait()
        if fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{name} is broken")
        return name.encode()

    server, _ = await auth_app({"ValidateToken": validate}, port=port)
    return server


def _write_bootstrap(mesh: MeshSpec, service: str, certs: CertLayout, d: Path,
                     extra_auth_endpoint: int | None = None, outlier_log: Path | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    profile = EnvoyProfile.local(str(certs.root.resolve()), str((d / "sds").resolve()))
    (d / "sds").mkdir(exist_ok=True)
    for rel, doc in sds_files(mesh, service, profile).items():
        (d / "sds" / rel).write_text(serialize(rel, doc))
    config = bootstrap(mesh, service, profile)
    if extra_auth_endpoint is not None:
        cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "auth-svc")
        lb = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        lb.append({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                "port_value": extra_auth_endpoint}}}})
    if outlier_log is not None:  # one JSON line per ejection and per return
        config["cluster_manager"] = {"outlier_detection": {"event_log_path": str(outlier_log)}}
    path = d / "envoy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _outlier_events(log: Path, action: str, host: str | None = None) -> list[dict[str, Any]]:
    """The EJECT or UNEJECT events Envoy logged so far (oldest first), of `host` if given. An UNEJECT's
    secs_since_last_action is how long that ejection lasted, in whole seconds (rounded down)."""
    if not log.exists():
        return []
    events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [e for e in events if e["action"] == action and (host is None or e["upstream_url"] == host)]


def _host_flags(admin: int, cluster: str) -> dict[str, str]:
    return envoy_hosts(f"127.0.0.1:{admin}").get(cluster, {})  # what `meshctl status` reads


@needs_envoy
async def test_failing_endpoint_is_ejected_after_five_failures_and_traffic_moves(mesh, mesh_certs, tmp_path):
    m = with_free_ports(mesh)
    # A second auth-svc instance: same identity, its own app port, inbound and admin ports.
    used = {p for svc in m.services for p in (svc.port, svc.local_port, svc.admin_port, svc.sidecar.inbound_port,
                                              svc.sidecar.outbound_port, svc.sidecar.admin_port)}
    spare = [p for p in free_ports(20) if p not in used][:4]
    spec_b = m.service("auth-svc").model_copy(update={"local_port": spare[0], "sidecar": m.service(
        "auth-svc").sidecar.model_copy(update={"inbound_port": spare[1], "outbound_port": spare[2],
                                               "admin_port": spare[3]})})
    m_b = m.model_copy(update={"services": tuple(spec_b if s.name == "auth-svc" else s for s in m.services)})
    hits = {"good": 0, "bad": 0}
    good = await _auth_app(m.service("auth-svc").local_port, False, hits, "good")
    bad = await _auth_app(spec_b.local_port, True, hits, "bad")
    procs: list[asyncio.subprocess.Process] = []
    try:
        # The learner's sidecar starts first, so its first health checks of both auth hosts fail and
        # pass a couple of seconds later: the ejection below then follows a health transition closely,
        # the case Envoy's default update_merge_window (1 s) used to delay (the host kept serving).
        configs = [
            (_write_bootstrap(m, "learner-svc", mesh_certs, tmp_path / "learner",
                              extra_auth_endpoint=sidecar_ports(m_b, "auth-svc", "local").inbound,
                              outlier_log=tmp_path / "outlier.log"),
             sidecar_ports(m, "learner-svc", "local")),
            (_write_bootstrap(m, "auth-svc", mesh_certs, tmp_path / "auth-a"), sidecar_ports(m, "auth-svc", "local")),
            (_write_bootstrap(m_b, "auth-svc", mesh_certs, tmp_path / "auth-b"),
             sidecar_ports(m_b, "auth-svc", "local")),
        ]
        for i, (path, p) in enumerate(configs):
            procs.append(await _start_envoy(path))
            if i == 0:
                await asyncio.to_thread(wait_envoy_live, p.admin)
        for _, p in configs:
            await asyncio.to_thread(wait_envoy_live, p.admin)
        learner = configs[0][1]
        bad_addr = f"127.0.0.1:{sidecar_ports(m_b, 'auth-svc', 'local').inbound}"
        # Both hosts pass their (Envoy active) health checks first: the bad app is healthy, just failing calls.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            flags = await asyncio.to_thread(_host_flags, learner.admin, "auth-svc")
            if len(flags) == 2 and set(flags.values()) == {"healthy"}:
                break
            await asyncio.sleep(0.2)
        stats = await asyncio.to_thread(_get, f"http://127.0.0.1:{learner.admin}/stats")
        failed_checks = next(int(line.rsplit(":", 1)[1]) for line in stats.splitlines()
                             if line.startswith("cluster.auth-svc.health_check.network_failure:"))
        assert failed_checks > 0  # the first checks did fail: the sequence this test is about happened
        assert set(flags.values()) == {"healthy"}, (flags, [
            line for line in (await asyncio.to_thread(_get, f"http://127.0.0.1:{learner.admin}/stats")).splitlines()
            if "auth-svc.health_check" in line or "auth-svc.upstream_cx_connect_fail" in line
            or "ssl.connection_error" in line])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{learner.outbound}") as ch:
            vt = ch.unary_unary("/aivo.auth.v1.AuthService/ValidateToken", request_serializer=lambda b: b,
                                response_deserializer=lambda b: b)
            # Envoy retries UNAVAILABLE on the other host, so every call succeeds; meanwhile the bad host's
            # consecutive failures reach 5 and it is ejected. (Envoy's workers report outcomes to its main
            # thread asynchronously, so a few more requests may reach it before the ejection lands.)
            calls = 0
            while "failed_outlier_check" not in (await asyncio.to_thread(_host_flags, learner.admin,
                                                                        "auth-svc")).get(bad_addr, ""):
                assert await vt(b"x", timeout=5) == b"good"
                calls += 1
                assert calls < 300, (hits, await asyncio.to_thread(_get, f"http://127.0.0.1:{learner.admin}/stats"))
            assert hits["bad"] >= 5, hits
            stats = await asyncio.to_thread(_get, f"http://127.0.0.1:{learner.admin}/stats")
            assert "cluster.auth-svc.outlier_detection.ejections_enforced_total: 1" in stats
            assert "cluster.auth-svc.outlier_detection.ejections_detected_consecutive_gateway_failure: 1" in stats \
                or "cluster.auth-svc.outlier_detection.ejections_detected_consecutive_5xx: 1" in stats
            # No traffic reaches the ejected endpoint. It returns after 1 s (then 2 s, ...): a return may
            # fall within these calls, and costs the 5 failed attempts (+1 in flight) that eject it again.
            before, returned = hits["bad"], len(_outlier_events(tmp_path / "outlier.log", "UNEJECT", bad_addr))
            for _ in range(20):
                assert await vt(b"x", timeout=5) == b"good"
            returns = len(_outlier_events(tmp_path / "outlier.log", "UNEJECT", bad_addr)) - returned
            assert hits["bad"] - before <= 6 * returns, (hits, before, returns)
    finally:
        await _stop(procs)
        await good.stop(0)
        await bad.stop(0)


# -- one-host peers: a stall costs about a second, a peer failing every call fails fast ----------------
# Every rendered peer cluster has exactly one host, so its ejection fails every call to the peer: it is
# the sidecar's breaker. mesh.yaml ejects for 1 s, then 1 s longer each time the host fails again on its
# return, up to 60 s; Envoy returns a host only at its 1 s `interval` sweep.

RATE = 20.0  # calls per second, as tests/test_policy_stall.py
VALIDATE = "/aivo.auth.v1.AuthService/ValidateToken"  # idempotent: 1 s deadline, 500 ms per try


@dataclass(frozen=True)
class Outcome:
    call: int
    code: grpc.StatusCode
    details: str

    @property
    def no_healthy_upstream(self) -> bool:  # the caller's sidecar had no host to try (again)
        return self.code == grpc.StatusCode.UNAVAILABLE and "no healthy upstream" in self.details


async def _paced(call: Any, count: int, before: Mapping[int, Callable[[], object]] | None = None,
                 stop: Callable[[], bool] | None = None) -> list[Outcome]:
    """Start call i at i / RATE s, each on its own (steady traffic); `before[i]()` runs just before
    call i starts; no call starts once `stop()` holds. Returns the outcomes in call order."""

    async def one(i: int) -> Outcome:
        try:
            await call(b"x", timeout=5)
            return Outcome(i, grpc.StatusCode.OK, "")
        except grpc.aio.AioRpcError as exc:
            return Outcome(i, exc.code(), exc.details() or "")

    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for i in range(count):
        if stop is not None and stop():
            break
        await asyncio.sleep(max(0.0, start + i / RATE - loop.time()))  # the traffic's schedule
        if before and i in before:
            before[i]()
        tasks.append(asyncio.create_task(one(i)))
    return list(await asyncio.gather(*tasks))


async def _one_host_peer(m: MeshSpec, certs: CertLayout, d: Path,
                         procs: list[asyncio.subprocess.Process]) -> tuple[EnvoyPorts, str, Path]:
    """auth-svc's and learner-svc's sidecars, as rendered; returns the learner's ports, the address of its
    one auth-svc host and its outlier event log, once that host passed its health check."""
    log = d / "outlier.log"
    configs = [(_write_bootstrap(m, "auth-svc", certs, d / "auth-svc"), sidecar_ports(m, "auth-svc", "local")),
               (_write_bootstrap(m, "learner-svc", certs, d / "learner-svc", outlier_log=log),
                sidecar_ports(m, "learner-svc", "local"))]
    for path, p in configs:  # auth's sidecar first, so the learner sidecar's first health check passes
        procs.append(await _start_envoy(path))
        await asyncio.to_thread(wait_envoy_live, p.admin)
    learner, auth_addr = configs[1][1], f"127.0.0.1:{configs[0][1].inbound}"
    await until(lambda: _host_flags(learner.admin, "auth-svc").get(auth_addr) == "healthy", 30,
                "the learner sidecar sees auth-svc healthy")
    return learner, auth_addr, log


@needs_envoy
async def test_a_one_second_stall_of_a_one_host_peer_fails_calls_for_seconds_not_a_minute(mesh, mesh_certs,
                                                                                           tmp_path):
    # 20 calls/s of ValidateToken through learner-svc's sidecar; auth-svc's app stalls for 1 s (calls
    # 20-39 start while it stalls). Envoy counts attempts, so the stall's per-try timeouts (500 ms) eject
    # the host, and calls fail fast with "no healthy upstream" until Envoy returns it.
    warmup, stall, after = 20, 20, 120
    stall_until = warmup + stall
    m = with_free_ports(mesh)
    hits = {"auth": 0}
    running = asyncio.Event()
    running.set()
    app = await _auth_app(m.service("auth-svc").local_port, False, hits, "auth", running)
    procs: list[asyncio.subprocess.Process] = []
    try:
        learner, auth_addr, log = await _one_host_peer(m, mesh_certs, tmp_path, procs)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{learner.outbound}") as ch:
            vt = ch.unary_unary(VALIDATE, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            outcomes = await _paced(vt, warmup + stall + after, before={warmup: running.clear,
                                                                      stall_until: running.set})
        assert all(o.code == grpc.StatusCode.OK for o in outcomes[:warmup]), outcomes[:warmup]
        ejections = _outlier_events(log, "EJECT", auth_addr)
        assert ejections, "the stall did not eject the host: the case this test is about did not happen"
        late = [o for o in outcomes[stall_until:] if o.code != grpc.StatusCode.OK]
        # The bound: the host was ejected inside the stall (its first per-try timeouts come 500 ms into
        # it), for base_ejection_time (1 s), and returns at the first sweep after that (interval, 1 s):
        # calls begun after the stall fail for at most 2 s, 40 calls at 20/s. The flat 60 s ejection
        # with a 10 s sweep failed every call for 60-70 s: all 120 here, 1,200 to 1,400 in all.
        bound = int((1.0 + 1.0) * RATE)
        print(f"failed calls begun after the stall: {len(late)} (bound {bound}); "
              f"during it: {sum(o.code != grpc.StatusCode.OK for o in outcomes[warmup:stall_until])}; "
              f"ejections: {len(ejections)}")
        assert len(late) <= bound, late
        assert all(o.no_healthy_upstream for o in late), late  # failed fast by the sidecar, not timed out
        # One run of failures right after the stall, then every call succeeds.
        first_ok = next((o.call for o in outcomes[stall_until:] if o.code == grpc.StatusCode.OK), None)
        assert first_ok is not None, "no call succeeded after the stall"
        assert [o.call for o in late] == list(range(stall_until, first_ok))
        assert len(ejections) == 1
        assert _host_flags(learner.admin, "auth-svc")[auth_addr] == "healthy"
    finally:
        await _stop(procs)
        await app.stop(0)


@needs_envoy
async def test_a_peer_failing_every_call_is_ejected_after_five_failures_and_longer_each_time(mesh, mesh_certs,
                                                                                             tmp_path):
    m = with_free_ports(mesh)
    hits = {"bad": 0}
    bad = await _auth_app(m.service("auth-svc").local_port, True, hits, "bad")
    procs: list[asyncio.subprocess.Process] = []
    try:
        learner, auth_addr, log = await _one_host_peer(m, mesh_certs, tmp_path, procs)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{learner.outbound}") as ch:
            vt = ch.unary_unary(VALIDATE, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            details = []
            for _ in range(10):  # Envoy retries each up to 3 times: the 5th failed attempt ejects the host
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await vt(b"x", timeout=5)
                assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
                details.append(exc.value.details() or "")
                if "no healthy upstream" in details[-1]:
                    break
            assert "no healthy upstream" in details[-1], details
            # Outcomes reach Envoy's main thread asynchronously: allow one attempt in flight past the 5th.
            assert 5 <= hits["bad"] <= 6, (hits, details)
            stats = await asyncio.to_thread(_get, f"http://127.0.0.1:{learner.admin}/stats")
            assert "cluster.auth-svc.outlier_detection.ejections_enforced_total: 1" in stats
            assert "cluster.auth-svc.outlier_detection.ejections_overflow: 0" in stats
            # Steady traffic until the host has come back three times, and failed again each time.
            returns = 3
            outcomes = await _paced(vt, int(30 * RATE),
                                    stop=lambda: len(_outlier_events(log, "UNEJECT", auth_addr)) >= returns)
        ejected = [int(e["secs_since_last_action"]) for e in _outlier_events(log, "UNEJECT", auth_addr)]
        assert len(ejected) >= returns, (ejected, len(outcomes))
        ejections = len(_outlier_events(log, "EJECT", auth_addr))
        fast = sum(o.no_healthy_upstream for o in outcomes)
        print(f"{len(outcomes)} calls: {fast} ended 'no healthy upstream', {hits['bad']} attempts reached the app, "
              f"{ejections} ejections lasting {ejected} s (whole seconds)")
        assert all(o.no_healthy_upstream or o.details == "bad is broken" for o in outcomes), outcomes
        # What reaches the app is bounded by the ejections, not by the calls: each return costs the 5
        # failed attempts that eject the host again (plus one in flight); every other call fails fast.
        # (The last return may not have been judged yet when the traffic stopped.)
        assert 5 * ejections <= hits["bad"] <= 6 * (ejections + 1), (hits, ejections)
        # The n-th ejection in a row lasts at least n x base_ejection_time (1 s): 1, 2, 3 s ...
        assert all(seconds >= n for n, seconds in enumerate(ejected, start=1)), ejected
    finally:
        await _stop(procs)
        await bad.stop(0)


# -- the control plane through the command line ----------------------------------------------------------

def _xds_config(info: RuntimeInfo) -> dict[str, dict[str, str]]:
    assert info.control_plane is not None
    return dict(json.loads(_get(f"http://{info.control_plane['admin']}/xds/config")))


def test_status_and_config_dump_show_what_each_sidecar_holds_from_the_control_plane(sidecar_mesh):
    state, info, _ = sidecar_mesh
    out = meshctl("status", "--state-dir", str(state.root), "--interval", "0", "-o", "json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["control_plane"]["process"] == "running" and data["control_plane"]["synced"] == 4, data
    config = _xds_config(info)
    for row in data["services"]:
        assert row["process"]["xds"] == f"synced {config[row['name']]['version'][:8]}", row
    out = meshctl("config-dump", "learner-svc", "--state-dir", str(state.root), "-o", "json")
    assert out.returncode == 0, out.stderr
    dump = json.loads(out.stdout)
    # Every dynamic resource Envoy holds carries the control plane's version of its kind.
    for kind in ("listeners", "routes", "clusters", "secrets"):
        dynamic = [i for i in dump[kind] if i["source"] == "dynamic" and i["version"]]
        assert dynamic and {i["version"] for i in dynamic} == {config["learner-svc"][kind]}, (kind, dynamic)
    assert {i["name"] for i in dump["clusters"] if i["source"] == "dynamic"} == \
        {"auth-svc", "event-collector-svc", "local_app"}
    assert "private_key" not in out.stdout and "PRIVATE KEY" not in out.stdout
    out = meshctl("config-dump", "learner-svc", "--state-dir", str(state.root), "--type", "routes")
    assert out.returncode == 0 and "outbound" in out.stdout and "clusters" not in out.stdout, out.stdout


def test_apply_refuses_a_bad_file_with_its_location_and_pushes_nothing(sidecar_mesh, tmp_path):
    state, info, _ = sidecar_mesh
    before = _xds_config(info)
    bad = tmp_path / "mesh.yaml"
    bad.write_text((ROOT / "mesh.yaml").read_text().replace("timeout: 10s", "timeout: soon", 1))
    out = meshctl("apply", str(bad), "--state-dir", str(state.root))
    assert out.returncode == 2, out.stdout + out.stderr
    assert str(bad) in out.stderr and "services[1].timeout" in out.stderr and "Traceback" not in out.stderr
    # A valid file that adds a service cannot be applied live: said, and nothing changes.
    doc = yaml.safe_load((ROOT / "mesh.yaml").read_text())
    extra = dict(doc["services"][-1], name="reports-svc", port=50099, local_port=8099, admin_port=9199,
                 sidecar={"inbound_port": 50098, "outbound_port": 15098, "admin_port": 9998}, allow=[])
    doc["services"].append(extra)
    bad.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = meshctl("apply", str(bad), "--state-dir", str(state.root))
    assert out.returncode == 2 and "reports-svc" in out.stderr and "meshctl up" in out.stderr, out.stderr
    assert _xds_config(info) == before


def test_apply_changes_a_route_timeout_live_and_every_sidecar_acks(sidecar_mesh, tmp_path):
    state, info, _ = sidecar_mesh
    before = _xds_config(info)
    changed = tmp_path / "mesh.yaml"
    changed.write_text((ROOT / "mesh.yaml").read_text().replace("timeout: 10s", "timeout: 7s", 1))
    out = meshctl("apply", str(changed), "--state-dir", str(state.root), "-o", "json")
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    # learner-svc's timeout: its own inbound routes and the outbound routes of its callers change.
    assert result["changed"] == ["analytics-svc", "learner-svc"], result
    assert {n["service"]: n["outcome"] for n in result["nodes"]} == dict.fromkeys(info.services, "acked"), result
    after = _xds_config(info)
    assert after["learner-svc"]["routes"] != before["learner-svc"]["routes"]
    assert after["auth-svc"] == before["auth-svc"]  # untouched sidecars are sent nothing
    # Applying the same file again changes nothing.
    again = json.loads(meshctl("apply", str(changed), "--state-dir", str(state.root), "-o", "json").stdout)
    assert again["changed"] == [] and _xds_config(info) == after
    # And back, so the other tests see the repository's mesh.
    assert meshctl("apply", str(ROOT / "mesh.yaml"), "--state-dir", str(state.root)).returncode == 0
    assert _xds_config(info) == before
