"""The control plane with real Envoys 1.40 that start from the ADS bootstrap alone.

Two sidecars (learner-svc, auth-svc) and auth-svc's app run on loopback; the test plays learner-svc's app,
calling auth-svc through the learner sidecar's outbound listener, and `mesh-client` calling auth-svc's
inbound listener. A second auth-svc instance ("b", an mTLS server with auth-svc's certificate) is added
and removed through discovery. Every change goes through `ControlPlane.apply` (what `meshctl apply` posts)
and is checked in Envoy's behaviour: the next call is cut at a new deadline, retried or not, refused,
answered by the instance discovery added, kept away from an ejected one.

Its helpers (the state dir and apps, the Envoys, apply, steady traffic) also run the mixed mesh of
test_mixed_planes.py, where other services are on the sidecar plane and the rest on the proxyless one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from binaries import needs
from envoy.config.route.v3 import route_pb2
from faults import TcpProxy
from helpers import auth_app, checkout_env, start_envoy_async, wait_envoy_live
from waiting import until

from aivo_mesh.config import MeshSpec
from aivo_mesh.config.loader import load_mesh
from aivo_mesh.pki import CertLayout
from aivo_mesh.runtime.control_plane import ControlPlane
from aivo_mesh.runtime.local import dump_mesh, free_ports, with_free_ports
from aivo_mesh.runtime.mesh import local_profile, write_envoy_configs
from aivo_mesh.runtime.state import StateDir
from aivo_mesh.runtime.status import envoy_hosts, xds_sync
from aivo_mesh.xds.groups import group_name

pytestmark = [needs("envoy"), pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
VALIDATE = "/aivo.auth.v1.AuthService/ValidateToken"
AUTHENTICATE = "/aivo.auth.v1.AuthService/Authenticate"
SIDECARS = ("learner-svc", "auth-svc")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


# -- mesh.yaml as the user edits it -------------------------------------------------------------------------

def base_doc() -> dict[str, Any]:
    """The repository's mesh.yaml with auth-svc's ValidateToken route made easy to observe: a 2 s deadline,
    two retries of UNAVAILABLE, each try up to 2 s."""
    doc: dict[str, Any] = yaml.safe_load((ROOT / "mesh.yaml").read_text())
    auth = _service(doc, "auth-svc")
    auth["routes"] = [{"match": VALIDATE, "timeout": "2s", "idempotent": True,
                       "retry": {"max_retries": 2, "retry_on": ["UNAVAILABLE"], "per_try_timeout": "2s"}}]
    return doc


def _service(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in doc["services"] if s["name"] == name)


def text(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False)


# -- the apps ---------------------------------------------------------------------------------------------

@dataclass
class Apps:
    """auth-svc's instances. Requests are raw bytes (Envoy does not parse them): `slow:<ms>` answers late,
    `once:<id>` fails its first attempt (UNAVAILABLE) on whichever instance gets it, `fail-on-b:<id>` fails
    on b only; anything else is answered with the instance's name."""

    hits: dict[str, int] = field(default_factory=lambda: {"a": 0, "b": 0})
    # Per instance, the calls the test itself made (not the steady traffic, of which one call may still be in
    # flight to an instance when it is removed).
    test_hits: dict[str, int] = field(default_factory=lambda: {"a": 0, "b": 0})
    seen_once: set[bytes] = field(default_factory=set)
    failed_on_b: int = 0

    def method(self, name: str) -> Callable[[bytes, Any], Any]:
        async def validate(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            self.hits[name] += 1
            if request != b"steady":
                self.test_hits[name] += 1
            if request.startswith(b"slow:"):
                await asyncio.sleep(int(request[5:]) / 1000)
            elif request.startswith(b"once:") and request not in self.seen_once:
                self.seen_once.add(request)
                await context.abort(grpc.StatusCode.UNAVAILABLE, "first attempt fails")
            elif request.startswith(b"fail-on-b:") and name == "b":
                self.failed_on_b += 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, "b fails this")
            return name.encode()

        return validate


@dataclass
class Sidecars:
    state: StateDir
    mesh: MeshSpec  # the effective mesh (free ports)
    procs: dict[str, asyncio.subprocess.Process]
    apps: Apps
    b_address: str  # instance b: an mTLS server with auth-svc's identity
    names: tuple[str, ...] = SIDECARS  # the services with a sidecar
    caller: str = "learner-svc"  # the sidecar whose app the test plays (`outbound`)
    proxyless: tuple[str, ...] = ()  # services whose own processes are nodes too (their proxyless group)

    def admin(self, name: str) -> int:
        port = self.mesh.service(name).sidecar.admin_port
        assert port is not None
        return port

    @property
    def outbound(self) -> str:
        return f"127.0.0.1:{self.mesh.service(self.caller).sidecar.outbound_port}"

    @property
    def auth_inbound(self) -> str:
        return f"127.0.0.1:{self.mesh.service('auth-svc').sidecar.inbound_port}"

    def stats(self, name: str) -> dict[str, int]:
        out = {}
        for line in _get(f"http://127.0.0.1:{self.admin(name)}/stats").splitlines():
            key, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[key] = int(value)
        return out

    def warming(self, name: str) -> list[str]:
        """The clusters and listeners this sidecar is still warming (taken, not yet in force)."""
        dump = json.loads(_get(f"http://127.0.0.1:{self.admin(name)}/config_dump"))
        out = []
        for cfg in dump["configs"]:
            out += [c["cluster"]["name"] for c in cfg.get("dynamic_warming_clusters", [])]
            out += [v["name"] for v in cfg.get("dynamic_listeners", []) if "warming_state" in v]
        return out

    def config_versions(self, name: str) -> dict[str, str]:
        """What Envoy holds, by its own account: the version of every dynamic resource, per kind."""
        dump = json.loads(_get(f"http://127.0.0.1:{self.admin(name)}/config_dump?include_eds"))
        out: dict[str, str] = {}
        for cfg in dump["configs"]:
            kind = cfg["@type"].rsplit(".", 1)[-1]
            for key in ("version_info",):
                if key in cfg:
                    out[kind] = cfg[key]
            for section in ("dynamic_listeners", "dynamic_active_clusters", "dynamic_route_configs",
                            "dynamic_endpoint_configs", "dynamic_active_secrets"):
                for item in cfg.get(section, []):
                    name_ = item.get("name") or (item.get("active_state") or {}).get("listener", {}).get("name") \
                        or (item.get("cluster") or {}).get("name") or (item.get("route_config") or {}).get("name") \
                        or (item.get("endpoint_config") or {}).get("cluster_name") or "?"
                    version = item.get("version_info") or (item.get("active_state") or {}).get("version_info", "")
                    out[f"{section}/{name_}"] = version
        return out


@contextlib.asynccontextmanager
async def sidecars(mesh: MeshSpec, mesh_certs: CertLayout, tmp_path: Path,
                   control_plane: tuple[str, int] | None = None, *, doc: dict[str, Any] | None = None,
                   names: tuple[str, ...] = SIDECARS, caller: str = "learner-svc",
                   proxyless: tuple[str, ...] = ()) -> AsyncIterator[Sidecars]:
    """The state dir of a local mesh on free ports (its mesh.yaml, `doc` or `base_doc()`, certificates, ADS
    bootstraps), auth-svc's app and instance b (each answering ValidateToken and Authenticate). Envoys (of
    `names`) start with `start_envoys`, once a control plane serves."""
    m = with_free_ports(load_mesh_text(text(doc if doc is not None else base_doc())))
    if control_plane is not None:
        cp = m.control_plane.model_copy(update={"address": f"{control_plane[0]}:{control_plane[1]}"})
        m = m.model_copy(update={"control_plane": cp})
    state = StateDir(tmp_path / "state")
    state.ensure()
    shutil.copytree(mesh_certs.root, state.certs.root, dirs_exist_ok=True)
    state.mesh_file.write_text(dump_mesh(m))
    write_envoy_configs(state, m, None, None, control_plane=True)
    apps = Apps()
    a, _ = await auth_app({"ValidateToken": apps.method("a"), "Authenticate": apps.method("a")},
                          port=m.service("auth-svc").local_port)
    cert, key = state.certs.identity_paths("auth-svc")
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())], state.certs.ca_cert.read_bytes(),
                                        require_client_auth=True)
    b, b_port = await auth_app({"ValidateToken": apps.method("b"), "Authenticate": apps.method("b")},
                               credentials=creds)
    env = Sidecars(state, m, {}, apps, f"127.0.0.1:{b_port}", names, caller, proxyless)
    try:
        yield env
    finally:
        for proc in env.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            await proc.wait()
        await a.stop(0)
        await b.stop(0)


def load_mesh_text(source: str) -> MeshSpec:
    from aivo_mesh.config.loader import parse_mesh

    return parse_mesh(source, "mesh.yaml")


async def start_envoys(env: Sidecars, healthy: Mapping[str, Sequence[str]] | None = None) -> None:
    """Every sidecar of `env`, until each sidecar in `healthy` sees every host of the peers named there
    healthy (default: the caller's sidecar sees auth-svc's)."""
    for name in env.names:
        env.procs[name] = await start_envoy_async(env.state.root / "envoy" / name / "envoy.yaml")
    for name in env.names:
        await asyncio.to_thread(wait_envoy_live, env.admin(name), env.procs[name])
    wanted = healthy if healthy is not None else {env.caller: ("auth-svc",)}

    def all_healthy() -> bool:
        for sidecar, peers in wanted.items():
            known = envoy_hosts(f"127.0.0.1:{env.admin(sidecar)}")
            for peer in peers:
                hosts = known.get(peer, {})
                if not hosts or set(hosts.values()) != {"healthy"}:
                    return False
        return True

    await until(lambda: _quiet(all_healthy), timeout=60, what=f"sidecars see their peers healthy: {dict(wanted)}")


def _quiet(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except (OSError, ValueError):
        return False


def start_control_plane(env: Sidecars, **kw: Any) -> ControlPlane:
    return ControlPlane(env.state, lambda mesh, name: local_profile(env.state, name, None, None), **kw)


# -- callers --------------------------------------------------------------------------------------------

def _raw(channel: grpc.aio.Channel, method: str = VALIDATE) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)


def mesh_client_channel(env: Sidecars) -> grpc.aio.Channel:
    cert, key = env.state.certs.identity_paths("mesh-client")
    creds = grpc.ssl_channel_credentials(env.state.certs.ca_cert.read_bytes(), key.read_bytes(), cert.read_bytes())
    return grpc.aio.secure_channel(env.auth_inbound, creds, options=[("grpc.default_authority", "auth-svc")])


@dataclass
class Traffic:
    """Steady calls (`run`: one loop on one call); every failure is kept."""

    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    pause: float = 0.01  # seconds between one loop's calls

    async def run(self, call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]) -> None:
        while not self.stop.is_set():
            try:
                await call(b"steady", timeout=10)
                self.ok += 1
            except grpc.aio.AioRpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")
            await asyncio.sleep(self.pause)


@contextlib.asynccontextmanager
async def running(traffic: Traffic, calls: Sequence[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]],
                  ) -> AsyncIterator[Traffic]:
    """`traffic` on each of `calls` (a loop each) until the block ends."""
    tasks = [asyncio.create_task(traffic.run(call)) for call in calls]
    try:
        yield traffic
    finally:
        traffic.stop.set()
        await asyncio.gather(*tasks)


@contextlib.asynccontextmanager
async def steady_traffic(env: Sidecars, loops: int = 2) -> AsyncIterator[Traffic]:
    """Steady calls from the caller's app to auth-svc through its sidecar."""
    async with grpc.aio.insecure_channel(env.outbound) as ch, running(Traffic(), [_raw(ch)] * loops) as traffic:
        yield traffic


async def apply(cp: ControlPlane, doc: dict[str, Any], env: Sidecars) -> dict[str, Any]:
    """`meshctl apply`: every node (each sidecar, each proxyless service's process) answered it with an
    ACK, then until each sidecar has put it in force: Envoy ACKs a changed cluster or listener before it
    has warmed, and serves with the old one until then. A proxyless process ACKs once it has applied."""
    result = await cp.apply(text(doc))
    nodes = [*env.names, *(group_name(p) for p in env.proxyless)]
    assert sorted((n["service"], n["outcome"]) for n in result["nodes"]) == sorted(
        (n, "acked") for n in nodes), result
    await until(lambda: _quiet(lambda: not any(env.warming(n) for n in env.names)), timeout=15,
                what="the sidecars warmed")
    return result


# -- tests ------------------------------------------------------------------------------------------------

async def test_twenty_live_changes_under_steady_traffic_each_seen_in_envoys_behaviour(mesh, mesh_certs, tmp_path):
    async with sidecars(mesh, mesh_certs, tmp_path) as env:
        cp = start_control_plane(env)
        await cp.start()
        try:
            await start_envoys(env)
            doc = base_doc()
            async with grpc.aio.insecure_channel(env.outbound) as out, mesh_client_channel(env) as inbound, \
                    steady_traffic(env) as traffic:
                via_learner, as_client = _raw(out), _raw(inbound)
                changes = 0
                for cycle in range(2):
                    route = _service(doc, "auth-svc")["routes"][0]
                    # 1. A shorter deadline: the next slow call is cut by Envoy, not answered.
                    assert await via_learner(b"slow:600", timeout=10) == b"a"
                    route["timeout"], route["retry"]["per_try_timeout"] = "250ms", "250ms"
                    await apply(cp, doc, env)
                    started = time.monotonic()
                    with pytest.raises(grpc.aio.AioRpcError) as cut:
                        await via_learner(b"slow:600", timeout=10)
                    # The route's deadline, not the caller's 10 s: cut by Envoy (max_stream_duration,
                    # "downstream duration timeout") or by the app, to which Envoy passed the shorter
                    # grpc-timeout ("Deadline Exceeded"), whichever fires first.
                    assert cut.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, cut.value
                    assert time.monotonic() - started < 5
                    # 2. And back.
                    route["timeout"], route["retry"]["per_try_timeout"] = "2s", "2s"
                    await apply(cp, doc, env)
                    assert await via_learner(b"slow:600", timeout=10) == b"a"
                    # 3. No retries: a call whose first attempt fails now fails.
                    route["retry"]["max_retries"] = 0
                    await apply(cp, doc, env)
                    with pytest.raises(grpc.aio.AioRpcError) as once:
                        await via_learner(f"once:{cycle}-3".encode(), timeout=10)
                    assert once.value.code() == grpc.StatusCode.UNAVAILABLE
                    # 4. Retries again: the same kind of call succeeds on its second attempt.
                    route["retry"]["max_retries"] = 2
                    await apply(cp, doc, env)
                    assert await via_learner(f"once:{cycle}-4".encode(), timeout=10) == b"a"
                    # 5. mesh-client may no longer call ValidateToken: refused at auth's sidecar.
                    rules = _service(doc, "auth-svc")["allow"]
                    rules[0]["methods"] = ["/aivo.auth.v1.AuthService/Authenticate"]
                    await apply(cp, doc, env)
                    with pytest.raises(grpc.aio.AioRpcError) as denied:
                        await as_client(b"x", timeout=10)
                    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
                    # 6. Allowed again.
                    rules[0]["methods"] = ["/aivo.auth.v1.AuthService/Authenticate", VALIDATE]
                    await apply(cp, doc, env)
                    assert await as_client(b"x", timeout=10) == b"a"
                    # 7. A second instance: calls reach it.
                    _service(doc, "auth-svc")["endpoints"] = [env.auth_inbound, env.b_address]
                    await apply(cp, doc, env)
                    await until_answered_by(via_learner, b"b")
                    # 8. Outlier detection ejects after one failure now: b fails one call (Envoy retries it on
                    # a), and Envoy ejects it.
                    outlier = _service(doc, "auth-svc").setdefault("outlier_detection", {})
                    outlier.update({"consecutive_failures": 1, "base_ejection_time": "1s",
                                    "max_ejection_percent": 100})
                    await apply(cp, doc, env)
                    await until_answered_by(via_learner, b"b")  # b back in rotation after the new cluster warmed
                    ejected = _ejections(env)
                    await fail_once_on_b(via_learner, env)
                    await until_ejected(env, ejected)
                    # 9. Back to five: once b's ejection ended, one failure on b leaves it in rotation.
                    outlier.update({"consecutive_failures": 5, "base_ejection_time": "1s"})
                    await apply(cp, doc, env)
                    await until_answered_by(via_learner, b"b")
                    ejected = _ejections(env)
                    await fail_once_on_b(via_learner, env)
                    await until_answered_by(via_learner, b"b")
                    assert _ejections(env) == ejected
                    # 10. b removed from discovery: it gets nothing more.
                    _service(doc, "auth-svc")["endpoints"] = [env.auth_inbound]
                    await apply(cp, doc, env)
                    b_hits = env.apps.test_hits["b"]
                    for _ in range(20):
                        assert await via_learner(b"who", timeout=10) == b"a"
                    assert env.apps.test_hits["b"] == b_hits
                    changes += 10
                assert changes == 20
            assert traffic.failures == [] and traffic.ok > 100, (traffic.ok, traffic.failures[:5])
        finally:
            await cp.stop()


async def test_a_fault_applied_live_reaches_the_sidecar_and_its_changes_reach_open_connections(
        mesh, mesh_certs, tmp_path):
    """`meshctl apply` of a route's fault for mesh-client: its next call through auth-svc's sidecar is aborted,
    learner-svc's is not; a changed status and then 0 % reach the same open connection (the faults are in
    the route configuration, as the allow-list's RBAC override)."""
    async with sidecars(mesh, mesh_certs, tmp_path) as env:
        cp = start_control_plane(env)
        await cp.start()
        try:
            await start_envoys(env)
            doc = base_doc()
            fault: dict[str, Any] = {"abort_status": "NOT_FOUND", "abort_percent": 100, "callers": ["mesh-client"]}
            _service(doc, "auth-svc")["routes"][0]["fault"] = fault
            await apply(cp, doc, env)
            async with grpc.aio.insecure_channel(env.outbound) as out, mesh_client_channel(env) as inbound:
                via_learner, as_client = _raw(out), _raw(inbound)
                with pytest.raises(grpc.aio.AioRpcError) as aborted:
                    await as_client(b"x", timeout=10)
                assert (aborted.value.code(), aborted.value.details()) == (grpc.StatusCode.NOT_FOUND,
                                                                           "fault filter abort")
                assert await via_learner(b"who", timeout=10) == b"a"  # not a caller the fault names
                fault["abort_status"] = "FAILED_PRECONDITION"
                await apply(cp, doc, env)
                with pytest.raises(grpc.aio.AioRpcError) as changed:
                    await as_client(b"x", timeout=10)
                assert changed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                fault["abort_percent"] = 0
                await apply(cp, doc, env)
                assert await as_client(b"x", timeout=10) == b"a"
        finally:
            await cp.stop()


def _ejections(env: Sidecars) -> int:
    """Ejections Envoy enforced on auth-svc's hosts so far (a counter: an ejection of 1 s is not missed)."""
    return env.stats("learner-svc").get("cluster.auth-svc.outlier_detection.ejections_enforced_total", 0)


async def until_ejected(env: Sidecars, before: int) -> None:
    await until(lambda: _quiet(lambda: _ejections(env) > before), timeout=10, what="b ejected after one failure")


def _b_flags(env: Sidecars) -> str:
    return envoy_hosts(f"127.0.0.1:{env.admin('learner-svc')}").get("auth-svc", {}).get(env.b_address, "")


async def until_answered_by(call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes], who: bytes,
                            attempts: int = 200) -> None:
    """Round robin over two hosts: b answers within a few calls once Envoy routes to it."""
    for _ in range(attempts):
        if await call(b"who", timeout=10) == who:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no call answered by {who!r} in {attempts}")


async def fail_once_on_b(call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes], env: Sidecars) -> None:
    """Calls until one lands on b (which fails it; Envoy retries it on a): b has failed exactly once more."""
    before = env.apps.failed_on_b
    for i in range(200):
        assert await call(f"fail-on-b:{time.monotonic_ns()}-{i}".encode(), timeout=10) == b"a"
        if env.apps.failed_on_b > before:
            return
    raise AssertionError("no call reached b")


async def test_a_nacked_push_keeps_the_last_good_config_and_status_shows_it(mesh, mesh_certs, tmp_path):
    async with sidecars(mesh, mesh_certs, tmp_path) as env:
        cp = start_control_plane(env)
        await cp.start()
        try:
            await start_envoys(env)
            good = env.config_versions("learner-svc")
            # A route configuration Envoy refuses (an RE2 that does not compile) though every field is
            # Envoy's: what a control plane bug or a mesh.yaml the model let through would look like.
            from aivo_mesh.xds.cache import ROUTE, Snapshot

            snap = cp.cache.get("learner-svc")
            assert snap is not None
            routes = []
            for msg in snap.resources[ROUTE].values():
                bad = route_pb2.RouteConfiguration()
                bad.CopyFrom(msg)
                for vh in bad.virtual_hosts:
                    for r in vh.routes:
                        r.match.ClearField("prefix")
                        r.match.ClearField("path")
                        r.match.safe_regex.regex = "([unclosed"
                routes.append(bad)
            cp.cache.set("learner-svc", Snapshot.of({**{t: list(m.values()) for t, m in snap.resources.items()},
                                                     ROUTE: routes}))
            verdicts = await cp.ads.wait_settled(10)
            node = mesh.spiffe_id("learner-svc")
            assert verdicts[node].startswith("nacked: "), verdicts
            assert "missing ]: [unclosed" in verdicts[node], verdicts[node]  # RE2's own words, via Envoy
            # The sidecar keeps what it had, and keeps serving with it.
            assert env.config_versions("learner-svc") == good
            async with grpc.aio.insecure_channel(env.outbound) as ch:
                assert await _raw(ch)(b"who", timeout=10) == b"a"
            # What `meshctl status` prints for it.
            # (In threads: the control plane's admin is served by this test's event loop.)
            status = json.loads(await asyncio.to_thread(_get, f"http://127.0.0.1:{cp.admin_port}/xds/status"))
            config = json.loads(await asyncio.to_thread(_get, f"http://127.0.0.1:{cp.admin_port}/xds/config"))
            sync = xds_sync(status, config)
            assert sync["learner-svc"].startswith("NACK routes: "), sync
            assert sync["auth-svc"].startswith("synced "), sync
            metrics = await asyncio.to_thread(_get, f"http://127.0.0.1:{cp.admin_port}/metrics")
            assert 'xds_nacks_total{group="learner-svc",type="routes"} 1.0' in metrics
            # The next good snapshot goes out and is taken.
            cp.cache.set("learner-svc", snap)
            assert (await cp.ads.wait_settled(10))[node] == "acked"
        finally:
            await cp.stop()


def _control_plane_process(env: Sidecars, log: Path, port: int, admin_port: int) -> subprocess.Popen[bytes]:
    """`meshctl control-plane` on its own ports (a replica when two run)."""
    m = load_mesh(env.state.mesh_file)
    cp = m.control_plane.model_copy(update={"address": f"127.0.0.1:{port}", "admin_address": f"127.0.0.1:{admin_port}"})
    own = env.state.root / f"cp-{port}"
    own.mkdir(exist_ok=True)
    (own / "mesh.yaml").write_text(dump_mesh(m.model_copy(update={"control_plane": cp})))
    for sub in ("certs", "envoy"):
        target = own / sub
        if not target.exists():
            target.symlink_to(env.state.root / sub)
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "aivo_mesh", "control-plane", "--state-dir", str(own),
                                 "--log-level", "DEBUG"],
                                stdout=out, stderr=subprocess.STDOUT, env=checkout_env())


def _admin_answers(admin_port: int) -> bool:
    return _quiet(lambda: bool(json.loads(_get(f"http://127.0.0.1:{admin_port}/xds/config"))))


def _all_synced(admin_port: int, groups: tuple[str, ...] = SIDECARS) -> bool:
    def check() -> bool:
        status = json.loads(_get(f"http://127.0.0.1:{admin_port}/xds/status"))
        sync = xds_sync(status, json.loads(_get(f"http://127.0.0.1:{admin_port}/xds/config")))
        return all(sync.get(g, "").startswith("synced") for g in groups)

    return _quiet(check)


# Envoy's counters of accepted xDS updates: a resync that changes nothing leaves them where they were.
UPDATE_STATS = ("listener_manager.lds.update_success", "cluster_manager.cds.update_success")


def _churn(env: Sidecars, name: str) -> dict[str, int]:
    stats = env.stats(name)
    return {k: v for k, v in stats.items()
            if k in UPDATE_STATS or (k.endswith(".update_success") and (".rds." in k or ".eds." in k
                                                                       or "cluster.auth-svc" in k))}


async def test_control_plane_killed_under_traffic_then_restarted_resyncs_without_churn(mesh, mesh_certs, tmp_path):
    ports = free_ports(2)
    async with sidecars(mesh, mesh_certs, tmp_path, control_plane=("127.0.0.1", ports[0])) as env:
        log = tmp_path / "control-plane.log"
        proc = _control_plane_process(env, log, *ports)
        try:
            await until(lambda: _admin_answers(ports[1]), timeout=60, what="the control plane's admin")
            await start_envoys(env)
            await until(lambda: _all_synced(ports[1]), timeout=30, what="both sidecars synced")
            before = {n: (env.config_versions(n), _churn(env, n)) for n in SIDECARS}
            async with steady_traffic(env) as traffic:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                ok_at_kill = traffic.ok
                await until(lambda: traffic.ok > ok_at_kill + 50, timeout=30, what="calls with no control plane")
                proc = _control_plane_process(env, log, *ports)
                await until(lambda: _admin_answers(ports[1]), timeout=60, what="the control plane back")
                await until(lambda: _all_synced(ports[1]), timeout=60, what="both sidecars resynced")
                ok_at_resync = traffic.ok
                await until(lambda: traffic.ok > ok_at_resync + 20, timeout=30, what="calls after the resync")
            assert traffic.failures == [], traffic.failures[:5]
            status = json.loads(_get(f"http://127.0.0.1:{ports[1]}/xds/status"))
            assert {n["group"] for n in status["nodes"] if n["connected"]} == set(SIDECARS)
            for name in SIDECARS:
                versions, counters = before[name]
                assert env.config_versions(name) == versions, name  # the same version of everything
                assert _churn(env, name) == counters, name  # and nothing re-applied
        finally:
            proc.kill()
            proc.wait()


async def test_an_envoy_fails_over_between_two_replicas_without_churn(mesh, mesh_certs, tmp_path):
    # Two control planes behind one address (a TCP load balancer in front): same inputs, same versions.
    ports = free_ports(4)
    proxy = TcpProxy(ports[0])
    lb_port = await proxy.start()
    async with sidecars(mesh, mesh_certs, tmp_path, control_plane=("127.0.0.1", lb_port)) as env:
        log = tmp_path / "control-plane.log"
        first = _control_plane_process(env, log, ports[0], ports[1])
        second = _control_plane_process(env, log, ports[2], ports[3])
        try:
            await until(lambda: _admin_answers(ports[1]) and _admin_answers(ports[3]), timeout=60,
                        what="both replicas' admin")
            one = json.loads(_get(f"http://127.0.0.1:{ports[1]}/xds/config"))
            two = json.loads(_get(f"http://127.0.0.1:{ports[3]}/xds/config"))
            assert one == two  # content-hash versions: the replicas are interchangeable
            await start_envoys(env)
            await until(lambda: _all_synced(ports[1]), timeout=30, what="synced through the first replica")
            before = {n: (env.config_versions(n), _churn(env, n)) for n in SIDECARS}
            async with steady_traffic(env) as traffic:
                proxy.target_port = ports[2]
                first.send_signal(signal.SIGKILL)
                first.wait()
                proxy.drop_all()
                await until(lambda: _all_synced(ports[3]), timeout=60, what="both sidecars on the second replica")
                ok = traffic.ok
                await until(lambda: traffic.ok > ok + 20, timeout=30, what="calls after the failover")
            assert traffic.failures == [], traffic.failures[:5]
            for name in SIDECARS:
                versions, counters = before[name]
                assert env.config_versions(name) == versions, name
                assert _churn(env, name) == counters, name
        finally:
            for p in (first, second):
                p.kill()
                p.wait()
            proxy.drop_all()


async def test_endpoints_follow_consul_with_health(mesh, mesh_certs, tmp_path):
    from fakes.consul_agent import FakeConsulAgent

    from aivo_mesh.discovery import ConsulDiscovery, build_discovery

    with FakeConsulAgent() as agent:
        async with sidecars(mesh, mesh_certs, tmp_path) as env:
            for sid, address in (("auth-a", env.auth_inbound), ("auth-b", env.b_address)):
                host, port = address.rsplit(":", 1)
                agent.add_instance("auth-svc", host, int(port), service_id=sid)
            found = build_discovery(env.mesh, "consul", services=["auth-svc"],
                                    consul=ConsulDiscovery(agent.address, passing_only=False, wait="1s", rate=50))
            cp = start_control_plane(env, discovery=found)
            await cp.start()
            try:
                await start_envoys(env)
                async with grpc.aio.insecure_channel(env.outbound) as ch:
                    call = _raw(ch)
                    await until_answered_by(call, b"b")
                    # b's check goes critical: it stays listed, as UNHEALTHY, and gets nothing.
                    agent.set_check_status("auth-b", "critical")
                    await until(lambda: _quiet(lambda: "failed_eds_health" in _b_flags(env)), timeout=15,
                                what="b UNHEALTHY over EDS")
                    hits = env.apps.hits["b"]
                    for _ in range(20):
                        assert await call(b"who", timeout=10) == b"a"
                    assert env.apps.hits["b"] == hits
                    agent.set_check_status("auth-b", "passing")
                    await until_answered_by(call, b"b")
                    # Deregistered: gone from the cluster.
                    agent.remove_instance("auth-b")
                    await until(lambda: _quiet(lambda: env.b_address not in envoy_hosts(
                        f"127.0.0.1:{env.admin('learner-svc')}").get("auth-svc", {})), timeout=15, what="b removed")
                    hits = env.apps.hits["b"]
                    for _ in range(20):
                        assert await call(b"who", timeout=10) == b"a"
                    assert env.apps.hits["b"] == hits
            finally:
                await cp.stop()


def test_status_reads_the_control_planes_view_of_each_sidecar() -> None:
    config = {"auth-svc": {"listeners": "l1", "routes": "r1", "version": "v-auth"},
              "learner-svc": {"listeners": "l2", "routes": "r2", "version": "v-learner"},
              "analytics-svc": {"listeners": "l3", "version": "v-an"}}
    status: dict[str, Any] = {"nodes": [
        {"node": "a", "group": "auth-svc", "connected": True,
         "types": {"listeners": {"acked": "l1", "sent": "l1"}, "routes": {"acked": "r1", "sent": "r1"}}},
        {"node": "l", "group": "learner-svc", "connected": True,
         "types": {"listeners": {"acked": "l2", "sent": "l2"},
                   "routes": {"acked": "r0", "sent": "r2", "nack": {"version": "r2", "error": "bad regex"}}}},
        {"node": "an", "group": "analytics-svc", "connected": False, "types": {}},
    ]}
    assert xds_sync(status, config) == {"auth-svc": "synced v-auth", "learner-svc": "NACK routes: bad regex",
                                        "analytics-svc": "disconnected"}
    # Sent, not yet answered.
    status["nodes"][0]["types"]["routes"] = {"acked": "r0", "sent": "r1"}
    assert xds_sync(status, config)["auth-svc"] == "syncing"
    # An old NACK of a version since replaced is history, not the state.
    status["nodes"][1]["types"]["routes"] = {"acked": "r2", "sent": "r2", "nack": {"version": "r1", "error": "x"}}
    assert xds_sync(status, config)["learner-svc"] == "synced v-learne"  # versions shown to 8 characters
