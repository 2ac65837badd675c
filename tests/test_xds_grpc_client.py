"""gRPC's own xDS client (grpcio's C-core, no sidecar, no aivo-mesh code in the caller) against the control
plane: the bootstrap `meshctl xds bootstrap` writes, the proxyless node group, and what grpcio 1.85
applies of mesh.yaml (docs/control-plane.md, "gRPC's built-in xDS client": each claim there that can be
seen in behaviour is checked here).

The caller is a fresh interpreter (GRPC_XDS_BOOTSTRAP must be set before grpc starts its xDS client) that
only imports grpc and dials `xds:///auth-svc` and `xds:///event-collector-svc` as learner-svc, with
fallback credentials that could reach no mesh server: every call that succeeds used the control plane's
mTLS. auth-svc's instances a and b are MeshServers with auth-svc's certificate (they check learner-svc's
identity and allow rules); c is event-collector-svc's. The control plane runs in this process on
127.0.0.1; every change goes through `ControlPlane.apply`, which returns once the gRPC node ACKed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import shutil
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from helpers import checkout_env, meshctl

from aivo_mesh.config import MeshSpec, parse_mesh
from aivo_mesh.config.resolve import callable_peers, fault_policies, route_policies, service_policy
from aivo_mesh.pki import CertLayout
from aivo_mesh.render.envoy import EnvoyProfile
from aivo_mesh.runtime.control_plane import ControlPlane
from aivo_mesh.runtime.local import dump_mesh, free_ports
from aivo_mesh.runtime.mesh import local_profile
from aivo_mesh.runtime.state import RuntimeInfo, StateDir
from aivo_mesh.runtime.status import control_plane_view
from aivo_mesh.server import MeshServer
from aivo_mesh.server.authz import Authorizer
from aivo_mesh.xds.cache import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, Snapshot
from aivo_mesh.xds.groups import group_name
from aivo_mesh.xds.policies import METADATA_KEY, decode_config, decode_endpoints
from aivo_mesh.xds.proxyless import CERT_PROVIDER, proxyless_snapshot, server_listener_name
from aivo_mesh.xds.resources import Trust, sidecar_snapshot

ROOT = Path(__file__).resolve().parents[1]
AUTH = "aivo.auth.v1.AuthService"
VALIDATE = f"/{AUTH}/ValidateToken"
EVENTS = "aivo.events.v1.EventCollectorService"
COLLECT = f"/{EVENTS}/Collect"
ROUTE_TIMEOUT = 4.0  # ValidateToken's deadline in the test's mesh.yaml (seconds): grpcio cuts it 1-2 s early
PER_TRY = 0.2  # and its per-try timeout, which gRPC does not apply


# -- the resources, without a client ---------------------------------------------------------------------

def _unpack(any_msg: Any, message: Any) -> Any:
    assert any_msg.Unpack(message)
    return message


def test_the_proxyless_snapshot_is_the_sidecars_cut_to_what_grpc_reads(mesh: MeshSpec) -> None:
    sidecar = sidecar_snapshot(mesh, "learner-svc", EnvoyProfile.local("/certs", "/sds"), Trust(b"ca"))
    snap = proxyless_snapshot(mesh, "learner-svc", sidecar)
    peers = ["auth-svc", "event-collector-svc"]  # whom learner-svc's allow rules let it call
    for t in (ROUTE, CLUSTER, ENDPOINT):
        assert sorted(snap.get(t)) == peers, t
    # A listener per peer, and the server's own (its allow rules, for MeshServer).
    server = server_listener_name(mesh, "learner-svc")
    assert server == f"grpc/server?xds.resource.listening_address={mesh.service('learner-svc').host}:" \
        f"{mesh.service('learner-svc').port}"
    assert sorted(snap.get(LISTENER)) == sorted([*peers, server])
    assert snap.get(SECRET) == {} and snap.problems() == []
    served = snap.get(LISTENER)[server]
    assert isinstance(served, listener_pb2.Listener)
    served_hcm = _unpack(served.filter_chains[0].filters[0].typed_config, hcm_pb2.HttpConnectionManager())
    assert [f.name for f in served_hcm.http_filters] == ["envoy.filters.http.rbac", "envoy.filters.http.router"]
    assert served_hcm.route_config.virtual_hosts[0].routes[0].HasField("non_forwarding_action")
    rules = decode_config(mesh, snap.resources).allow
    assert rules == tuple((r.callers, r.methods) for r in Authorizer(mesh, "learner-svc").rules)
    # An API listener per xds:/// target: HttpConnectionManager with the router alone, routes over ADS.
    listener = snap.get(LISTENER)["auth-svc"]
    assert isinstance(listener, listener_pb2.Listener) and not listener.filter_chains
    hcm = _unpack(listener.api_listener.api_listener, hcm_pb2.HttpConnectionManager())
    assert [f.name for f in hcm.http_filters] == ["envoy.filters.http.router"]
    assert hcm.rds.route_config_name == "auth-svc" and hcm.rds.config_source.HasField("ads")
    # The peer's routes of the sidecar's outbound route configuration, in order, as they are but for the
    # policy each carries in its metadata (and the sidecar's are left as they were).
    versions = dict(sidecar.versions)
    outbound = sidecar.get(ROUTE)["outbound"]
    assert isinstance(outbound, route_pb2.RouteConfiguration)
    mine = snap.get(ROUTE)["auth-svc"]
    assert isinstance(mine, route_pb2.RouteConfiguration)
    bare = []
    for r in mine.virtual_hosts[0].routes:
        assert METADATA_KEY in r.metadata.filter_metadata
        copy = route_components_pb2.Route()
        copy.CopyFrom(r)
        copy.ClearField("metadata")
        bare.append(copy)
    assert bare == [r for r in outbound.virtual_hosts[0].routes if r.route.cluster == "auth-svc"]
    assert sidecar_snapshot(mesh, "learner-svc", EnvoyProfile.local("/certs", "/sds"), Trust(b"ca")).versions \
        == versions
    validate = mine.virtual_hosts[0].routes[0]
    assert validate.match.path == VALIDATE  # exact methods before the service's prefix
    assert validate.route.max_stream_duration.grpc_timeout_header_max.ToTimedelta().total_seconds() == 1.0
    assert validate.route.retry_policy.num_retries.value == 3
    # The cluster: what gRPC reads of the sidecar's, and mTLS through the bootstrap's certificate provider.
    cluster = snap.get(CLUSTER)["auth-svc"]
    assert isinstance(cluster, cluster_pb2.Cluster)
    theirs = sidecar.get(CLUSTER)["auth-svc"]
    assert isinstance(theirs, cluster_pb2.Cluster)
    assert cluster.type == cluster_pb2.Cluster.EDS and cluster.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert cluster.circuit_breakers == theirs.circuit_breakers and cluster.outlier_detection == theirs.outlier_detection
    assert cluster.circuit_breakers.thresholds[0].max_requests.value == 1000
    assert not cluster.health_checks and not cluster.HasField("common_lb_config")  # Envoy's alone
    tls = _unpack(cluster.transport_socket.typed_config, tls_pb2.UpstreamTlsContext())
    common = tls.common_tls_context
    assert common.tls_certificate_provider_instance.instance_name == CERT_PROVIDER
    assert common.validation_context.ca_certificate_provider_instance.instance_name == CERT_PROVIDER
    assert [m.exact for m in common.validation_context.match_subject_alt_names] == [mesh.spiffe_id("auth-svc")]
    assert not common.HasField("tls_params") and not common.tls_certificate_sds_secret_configs  # gRPC NACKs them
    unapplied = cluster.metadata.filter_metadata[METADATA_KEY]
    assert unapplied["retry_budget"]["percent"] == 25 and unapplied["retry_budget"]["window"] == "10s"
    assert unapplied["circuit_breaker"]["consecutive_failures"] == 5
    # The sidecar's endpoints, in one locality of weight 1 (gRPC drops a locality without one).
    cla = snap.get(ENDPOINT)["auth-svc"]
    sidecar_cla = sidecar.get(ENDPOINT)["auth-svc"]
    assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
    assert isinstance(sidecar_cla, endpoint_pb2.ClusterLoadAssignment)
    assert [list(loc.lb_endpoints) for loc in cla.endpoints] == [list(loc.lb_endpoints)
                                                                  for loc in sidecar_cla.endpoints]
    assert [(loc.HasField("locality"), loc.load_balancing_weight.value) for loc in cla.endpoints] == [(True, 1)]


@pytest.mark.parametrize("service", ["learner-svc", "analytics-svc", "auth-svc"])
def test_the_proxyless_snapshot_reads_back_as_mesh_yaml_resolves_it(mesh: MeshSpec, service: str) -> None:
    # The same node group serves a MeshClient on the control plane: its decoder finds every peer's policy,
    # routes and endpoints as config.resolve and the sidecar give them.
    sidecar = sidecar_snapshot(mesh, service, EnvoyProfile.local("/certs", "/sds"), Trust(b"ca"))
    config = decode_config(mesh, proxyless_snapshot(mesh, service, sidecar).resources)
    assert sorted(config.targets) == sorted(callable_peers(mesh, service))
    assert config.allow == tuple((r.callers, r.methods) for r in Authorizer(mesh, service).rules)
    assert config.faults == fault_policies(mesh, service)
    for peer, target in config.targets.items():
        assert target.policy == service_policy(mesh, peer)
        # Deadlines travel as Durations: `0.7s` and `700ms` are one Duration, two floats.
        assert [dataclasses.replace(rp, timeout=round(rp.timeout, 9)) for rp in target.routes] == \
               [dataclasses.replace(rp, timeout=round(rp.timeout, 9)) for rp in route_policies(mesh, peer)]
        assignment = sidecar.get(ENDPOINT)[peer]
        assert isinstance(assignment, endpoint_pb2.ClusterLoadAssignment)
        assert target.endpoints == decode_endpoints(assignment)


async def test_grpcio_applies_a_service_config_deadline_one_to_two_seconds_early() -> None:
    # What makes xDS route timeouts short by 1-2 s in grpcio for Python: any timeout from a service config
    # (which is how A31 applies max_stream_duration) is measured from a start 1-2 s before the call; a timeout
    # the caller passes is exact. Here without xDS, so the control plane is not the cause.
    async def slow(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await asyncio.sleep(10)
        return request

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "S", {"M": grpc.unary_unary_rpc_method_handler(slow)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    config = json.dumps({"methodConfig": [{"name": [{}], "timeout": "3s"}]})
    elapsed: dict[str, float] = {}
    try:
        for name, options, timeout in (("service config", [("grpc.service_config", config)], None),
                                       ("caller", [], 3.0)):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as ch:
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as cut:
                    await ch.unary_unary("/S/M")(b"x", timeout=timeout)
                assert cut.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                elapsed[name] = time.monotonic() - started
    finally:
        await server.stop(0)
    # 3 s less 1 to 2 s from the service config (the bound leaves a loaded machine 0.5 s); 3 s from the caller.
    assert 0.95 < elapsed["service config"] < 2.5 and 2.95 < elapsed["caller"] < 3.5, elapsed


def test_grpcio_serves_xds_on_the_sync_server_only() -> None:
    # Why the control plane sends gRPC servers nothing (no server listeners, no RBAC filter for them):
    # MeshServer is a grpc.aio server, and grpc.aio has no xDS server.
    assert "xds" in inspect.signature(grpc.server).parameters
    assert "xds" not in inspect.signature(grpc.aio.server).parameters
    assert callable(grpc.xds_server_credentials) and callable(grpc.xds_channel_credentials)


# -- the mesh: a control plane, auth-svc's a and b, event-collector-svc's c ---------------------------------

def mesh_doc(a: str, c: str) -> dict[str, Any]:
    """The repository's mesh.yaml, auth-svc on instance a with a ValidateToken route easy to observe: a short
    deadline, retries of UNAVAILABLE, and a per-try timeout shorter than a call that still succeeds."""
    doc: dict[str, Any] = yaml.safe_load((ROOT / "mesh.yaml").read_text())
    auth = _service(doc, "auth-svc")
    auth["endpoints"] = [a]
    auth["routes"] = [{"match": VALIDATE, "timeout": f"{ROUTE_TIMEOUT:g}s", "idempotent": True,
                       "retry": {"max_retries": 2, "retry_on": ["UNAVAILABLE", "DEADLINE_EXCEEDED"],
                                 "per_try_timeout": f"{int(PER_TRY * 1000)}ms",
                                 "backoff": {"base": "20ms", "max": "50ms"}}}]
    _service(doc, "event-collector-svc")["endpoints"] = [c]
    return doc


def _service(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in doc["services"] if s["name"] == name)


@dataclass
class Instance:
    """One MeshServer answering raw bytes: `who` with its name, `slow:<ms>` late, `once:<id>` UNAVAILABLE on
    its first attempt, `pushback:<id>` UNAVAILABLE with `grpc-retry-pushback-ms: -1` on its first."""

    name: str
    server: MeshServer
    port: int = 0
    attempts: dict[bytes, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def handle(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        seen = self.attempts[request] = self.attempts.get(request, 0) + 1
        if request.startswith(b"slow:"):
            await asyncio.sleep(int(request[5:]) / 1000)
        elif request.startswith(b"once:") and seen == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "first attempt fails")
        elif request.startswith(b"pushback:") and seen == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "do not retry",
                                trailing_metadata=(("grpc-retry-pushback-ms", "-1"),))
        return self.name.encode()


async def start_instance(mesh: MeshSpec, certs: CertLayout, service: str, name: str, grpc_service: str,
                         *methods: str, port: int = 0) -> Instance:
    """A started MeshServer of `service` on 127.0.0.1:`port` (0: a free one) answering `methods` as
    `Instance.handle` does."""
    server = MeshServer.for_service(mesh, service, certs, host="127.0.0.1", port=port)
    instance = Instance(name, server)
    server.grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        grpc_service, {m: grpc.unary_unary_rpc_method_handler(instance.handle) for m in methods}),))
    server.add_service_name(grpc_service)
    instance.port = await server.start()
    return instance


# The caller: plain grpc, as any application would write it. One JSON line in (a target, a method and
# payloads, called concurrently, without a deadline: the route's applies), one JSON line out per line in.
CLIENT = r"""
import asyncio, json, sys, time
import grpc

async def main():
    # Fallback credentials no mesh server accepts (public roots, no client certificate): a call that
    # succeeds was secured as the control plane said.
    creds = grpc.xds_channel_credentials(fallback_credentials=grpc.ssl_channel_credentials())
    channels = {}
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def one(target, method, payload):
        if target not in channels:
            channels[target] = grpc.aio.secure_channel("xds:///" + target, creds)
        started = time.monotonic()
        try:
            reply = await channels[target].unary_unary(method)(payload.encode())
            return {"code": "OK", "reply": reply.decode(), "seconds": time.monotonic() - started}
        except grpc.aio.AioRpcError as exc:
            return {"code": exc.code().name, "details": exc.details(), "seconds": time.monotonic() - started}

    while line := await reader.readline():
        ask = json.loads(line)
        got = await asyncio.gather(*(one(ask["target"], ask["method"], p) for p in ask["payloads"]))
        print(json.dumps(got), flush=True)

asyncio.run(main())
"""


@dataclass
class GrpcClient:
    proc: asyncio.subprocess.Process
    stderr: Path

    async def call(self, *payloads: str, target: str = "auth-svc", method: str = VALIDATE,
                   timeout: float = 30) -> list[dict[str, Any]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"target": target, "method": method, "payloads": payloads}).encode() + b"\n")
        await self.proc.stdin.drain()
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise AssertionError(f"no answer in {timeout:g}s; its stderr: {self.stderr.read_text()[-3000:]}") from None
        assert line, f"the client exited; its stderr: {self.stderr.read_text()[-3000:]}"
        return list(json.loads(line))

    async def one(self, payload: str, **kw: Any) -> dict[str, Any]:
        return (await self.call(payload, **kw))[0]


@dataclass
class Mesh:
    state: StateDir
    doc: dict[str, Any]
    cp: ControlPlane
    a: Instance
    b: Instance
    c: Instance
    bootstrap: Path

    async def apply(self) -> dict[str, Any]:
        """`meshctl apply` of `doc`; returns once every node answered (here: the gRPC client ACKed)."""
        result = await self.cp.apply(yaml.safe_dump(self.doc, sort_keys=False))
        assert {n["service"]: n["outcome"] for n in result["nodes"]} == {group_name("learner-svc"): "acked"}, result
        return result


@contextlib.asynccontextmanager
async def local_mesh(mesh_certs: CertLayout, tmp_path: Path) -> AsyncIterator[Mesh]:
    state = StateDir(tmp_path / "state")
    state.ensure()
    shutil.copytree(mesh_certs.root, state.certs.root, dirs_exist_ok=True)
    base = parse_mesh((ROOT / "mesh.yaml").read_text(), "mesh.yaml")
    a = await start_instance(base, state.certs, "auth-svc", "a", AUTH, "ValidateToken")
    b = await start_instance(base, state.certs, "auth-svc", "b", AUTH, "ValidateToken")
    c = await start_instance(base, state.certs, "event-collector-svc", "c", EVENTS, "Collect")
    doc = mesh_doc(a.address, c.address)
    ads, admin = free_ports(2)
    cp_doc = doc | {"control_plane": {"address": f"127.0.0.1:{ads}", "admin_address": f"127.0.0.1:{admin}"}}
    state.mesh_file.write_text(dump_mesh(parse_mesh(yaml.safe_dump(cp_doc), "mesh.yaml")))
    cp = ControlPlane(state, lambda mesh, name: local_profile(state, name, None, None))
    await cp.start()
    try:
        yield Mesh(state, doc, cp, a, b, c, tmp_path / "learner-xds.json")
    finally:
        await cp.stop()
        for instance in (a, b, c):
            await instance.server.stop(0)


@contextlib.asynccontextmanager
async def grpc_client(bootstrap: Path, tmp_path: Path) -> AsyncIterator[GrpcClient]:
    stderr = tmp_path / "client.stderr"
    with stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
            env=checkout_env(unset=["GRPC_SSL_CIPHER_SUITES"], extra={"GRPC_XDS_BOOTSTRAP": str(bootstrap)}))
    try:
        yield GrpcClient(proc, stderr)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def write_bootstrap(env: Mesh) -> dict[str, Any]:
    done = await asyncio.to_thread(meshctl, "xds", "bootstrap", "learner-svc", "--state-dir", str(env.state.root),
                                   "--file", str(env.bootstrap))
    assert done.returncode == 0, done.stderr
    return dict(json.loads(env.bootstrap.read_text()))


async def answered_by(client: GrpcClient, who: str, *, in_a_row: int = 1, calls: int = 200) -> None:
    """Calls until `in_a_row` consecutive ones are answered by `who` (bounded by `calls`)."""
    streak = 0
    for _ in range(calls):
        got = await client.one("who")
        streak = streak + 1 if got.get("reply") == who else 0
        if streak >= in_a_row:
            return
    raise AssertionError(f"never {in_a_row} calls in a row answered by {who} in {calls}")


# -- the real thing ---------------------------------------------------------------------------------------

async def test_grpcs_own_xds_client_follows_the_control_plane(mesh_certs: CertLayout, tmp_path: Path) -> None:
    async with local_mesh(mesh_certs, tmp_path) as env:
        boot = await write_bootstrap(env)
        assert boot["xds_servers"][0]["server_uri"] == env.cp.mesh.control_plane.address
        assert boot["node"]["id"] == "spiffe://aivo.local/ns/default/sa/learner-svc"
        async with grpc_client(env.bootstrap, tmp_path) as client:
            # mTLS from the certificate provider (A29), routes (RDS), cluster (CDS) and endpoints (EDS): the
            # call reaches a, whose MeshServer checked learner-svc's certificate and allow rule.
            assert (await client.one("who"))["reply"] == "a"
            node = env.cp.ads.nodes[f"{env.cp.mesh.spiffe_id('learner-svc')} {group_name('learner-svc')}"]
            assert node.group == "learner-svc/proxyless" and node.connected == 1
            assert sorted(node.types) == sorted((LISTENER, ROUTE, CLUSTER, ENDPOINT))  # never SDS

            # The route's deadline, enforced by grpc core (A31): the caller set none. grpcio starts its clock
            # 1 to 2 s before the call (as for any service-config timeout: the test below).
            slow = await client.one("slow:10000")
            assert slow["code"] == "DEADLINE_EXCEEDED", slow
            elapsed = slow["seconds"]
            assert ROUTE_TIMEOUT - 2.05 < elapsed < ROUTE_TIMEOUT - 0.5, slow
            # The per-try timeout is not applied (A44 reads no per_try_timeout): a call longer than it, within
            # the route's deadline, succeeds on its one attempt.
            assert (await client.one("slow:600"))["reply"] == "a"
            assert env.a.attempts[b"slow:600"] == 1
            # Retries (A44): a first attempt that fails UNAVAILABLE is retried, and the call succeeds.
            assert (await client.one("once:1"))["reply"] == "a"
            assert env.a.attempts[b"once:1"] == 2
            # Server pushback (A6): `grpc-retry-pushback-ms: -1` stops the retries.
            pushed = await client.one("pushback:1")
            assert pushed["code"] == "UNAVAILABLE" and env.a.attempts[b"pushback:1"] == 1, pushed

            # A second target in the same process: grpcio opens an ADS stream per target, each naming what
            # it wants; both streams are this one node (identity and group).
            assert (await client.one("who", target="event-collector-svc", method=COLLECT))["reply"] == "c"
            assert node.connected == 2

            # Endpoints pushed by the control plane (EDS): round robin over a and b, then b alone.
            _service(env.doc, "auth-svc")["endpoints"] = [env.a.address, env.b.address]
            result = await env.apply()
            assert result["changed"] == ["analytics-svc", "learner-svc"]  # auth-svc's callers (services, as ever)
            assert result["nodes"][0]["changed"] is True  # and the gRPC node's own group
            await answered_by(client, "b")
            await answered_by(client, "a")
            _service(env.doc, "auth-svc")["endpoints"] = [env.b.address]
            await env.apply()
            await answered_by(client, "b", in_a_row=20)

            # An endpoint with another identity is refused by the client's SAN check (A29): c presents
            # event-collector-svc's certificate, and the calls fail before reaching it.
            _service(env.doc, "auth-svc")["endpoints"] = [env.c.address]
            await env.apply()
            await until_code(client, "UNAVAILABLE")
            before = dict(env.c.attempts)
            assert (await client.one("who"))["code"] == "UNAVAILABLE"
            assert env.c.attempts == before  # nothing reached c

            # max_requests (A32): one call at a time; a second one at once fails UNAVAILABLE, unretried.
            _service(env.doc, "auth-svc")["endpoints"] = [env.b.address]
            _service(env.doc, "auth-svc")["limits"] = {"max_requests": 1}
            await env.apply()
            await answered_by(client, "b")
            both = await client.call("slow:400", "slow:400")
            assert sorted(r["code"] for r in both) == ["OK", "UNAVAILABLE"], both
            assert env.b.attempts[b"slow:400"] == 1  # the refused one never left the client

            # What grpcio refuses it says (NACK), and it keeps calling with its last good configuration: an lb
            # policy it has no implementation of (least request, random), and the sidecar's TLS (tls_params,
            # SDS). Ring hash it takes.
            group = group_name("learner-svc")
            good = env.cp.cache.get(group)
            assert good is not None

            async def push(change: Callable[[cluster_pb2.Cluster], None]) -> str:
                cluster = cluster_pb2.Cluster()
                cluster.CopyFrom(good.get(CLUSTER)["auth-svc"])
                change(cluster)
                env.cp.cache.set(group, Snapshot.of({**{t: list(r.values()) for t, r in good.resources.items()},
                                                     CLUSTER: [cluster, good.get(CLUSTER)["event-collector-svc"]]}))
                (verdict,) = (await env.cp.ads.wait_settled(10)).values()
                assert (await client.one("who"))["reply"] == "b"
                return verdict

            def lb(policy: int) -> Callable[[cluster_pb2.Cluster], None]:
                return lambda c: setattr(c, "lb_policy", policy)

            sidecar = env.cp.cache.get("learner-svc")
            assert sidecar is not None
            sidecar_cluster = sidecar.get(CLUSTER)["auth-svc"]
            assert isinstance(sidecar_cluster, cluster_pb2.Cluster)

            def sidecar_tls(c: cluster_pb2.Cluster) -> None:
                c.transport_socket.CopyFrom(sidecar_cluster.transport_socket)
            assert "LB policy is not supported" in await push(lb(cluster_pb2.Cluster.LEAST_REQUEST))
            assert await push(lb(cluster_pb2.Cluster.RING_HASH)) == "acked"
            assert "LB policy is not supported" in await push(lb(cluster_pb2.Cluster.RANDOM))
            nack = await push(sidecar_tls)
            assert "tls_params" in nack and "tls_certificate_sds_secret_configs" in nack, nack
            env.cp.cache.set(group, good)
            assert set((await env.cp.ads.wait_settled(10)).values()) == {"acked"}
            # What `meshctl status` reads: the gRPC node synced, and no sidecar counted for it.
            sync, summary = await asyncio.to_thread(control_plane_view, f"127.0.0.1:{env.cp.admin_port}")
            assert sync == {group: f"synced {good.version[:8]}"} and summary["synced"] == 0, (sync, summary)


async def until_code(client: GrpcClient, code: str, calls: int = 100) -> None:
    for _ in range(calls):
        if (await client.one("who"))["code"] == code:
            return
    raise AssertionError(f"no call failed with {code} in {calls}")


async def test_a_node_claiming_anothers_proxyless_identity_is_refused(mesh_certs: CertLayout, tmp_path: Path) -> None:
    async with local_mesh(mesh_certs, tmp_path) as env:
        cert, key = env.state.certs.identity_paths("learner-svc")
        creds = grpc.ssl_channel_credentials(env.state.certs.ca_cert.read_bytes(), key.read_bytes(), cert.read_bytes())
        async with grpc.aio.secure_channel(env.cp.mesh.control_plane.address, creds,
                                           options=[("grpc.default_authority", "localhost")]) as ch:
            req = discovery_pb2.DiscoveryRequest(type_url=LISTENER, resource_names=["learner-svc"])
            req.node.id = env.cp.mesh.spiffe_id("auth-svc")
            req.node.metadata.update({"aivo.plane": "proxyless"})
            stream = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources(iter([req]))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stream:
                    raise AssertionError("a resource was sent")
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "learner-svc" in (refused.value.details() or "")
        assert env.cp.ads.nodes == {}


# -- the command ------------------------------------------------------------------------------------------

def test_bootstrap_takes_the_running_control_planes_address_and_refuses_bad_input(mesh_certs: CertLayout,
                                                                                tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    shutil.copytree(mesh_certs.root, state.certs.root)
    state.mesh_file.write_text((ROOT / "mesh.yaml").read_text())
    RuntimeInfo("sidecar", "127.0.0.1:4317", control_plane={"address": "127.0.0.1:41234",
                                                           "admin": "127.0.0.1:41235"}).write(state)
    done = meshctl("xds", "bootstrap", "auth-svc", "--state-dir", str(state.root))
    assert done.returncode == 0, done.stderr
    boot = json.loads(done.stdout)
    assert boot["xds_servers"][0]["server_uri"] == "127.0.0.1:41234"
    assert boot["xds_servers"][0]["channel_creds"][0]["type"] == "tls"
    assert boot["node"] == {"id": "spiffe://aivo.local/ns/default/sa/auth-svc", "cluster": "auth-svc", "locality": {},
                            "metadata": {"aivo.plane": "proxyless", "aivo.service": "auth-svc"}}
    provider = boot["certificate_providers"][CERT_PROVIDER]
    assert provider["plugin_name"] == "file_watcher"
    assert provider["config"]["certificate_file"] == str(state.certs.identity_paths("auth-svc")[0].resolve())
    # A service mesh.yaml does not have; a service without its certificate: exit 2, saying so.
    done = meshctl("xds", "bootstrap", "billing-svc", "--state-dir", str(state.root))
    assert done.returncode == 2 and "'billing-svc' is not a service of" in done.stderr, done.stderr
    state.certs.identity_paths("analytics-svc")[1].unlink()
    done = meshctl("xds", "bootstrap", "analytics-svc", "--state-dir", str(state.root), "--file", str(tmp_path / "x"))
    assert done.returncode == 2 and "analytics-svc-key.pem: missing" in done.stderr, done.stderr
    assert not (tmp_path / "x").exists()

