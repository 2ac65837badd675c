"""The ADS server's protocol rules, driven by a small test client over real mTLS on 127.0.0.1:
ACK and NACK per type, stale nonces, wildcard and named subscriptions, push order, resume without churn,
content-hash versions, consistency checks, and who may ask for what."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2
from waiting import until

from aivo_mesh.config import MeshSpec
from aivo_mesh.pki import CertLayout, PeerPolicy
from aivo_mesh.pki.issue import init_ca, issue_leaf
from aivo_mesh.xds.cache import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SECRET,
    InconsistentSnapshot,
    Snapshot,
    SnapshotCache,
)
from aivo_mesh.xds.server import AdsServer


def _cluster(name: str) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.eds_cluster_config.eds_config.CopyFrom(config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource()))
    return c


def _assignment(name: str, port: int) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    ep = cla.endpoints.add().lb_endpoints.add().endpoint
    ep.address.socket_address.address = "127.0.0.1"
    ep.address.socket_address.port_value = port
    return cla


def _listener(name: str, route: str) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=name)
    hcm.rds.route_config_name = route
    hcm.rds.config_source.ads.SetInParent()
    listener = listener_pb2.Listener(name=name)
    listener.filter_chains.add().filters.add(name="envoy.filters.network.http_connection_manager").typed_config.Pack(hcm)
    return listener


def _route(name: str, cluster: str, timeout_s: int = 1) -> route_pb2.RouteConfiguration:
    rc = route_pb2.RouteConfiguration(name=name)
    r = rc.virtual_hosts.add(name="all", domains=["*"]).routes.add()
    r.match.prefix = "/"
    r.route.cluster = cluster
    r.route.timeout.seconds = timeout_s
    return rc


def snapshot(timeout_s: int = 1, port: int = 1001, secrets: tuple[str, ...] = ("mesh_ca",)) -> Snapshot:
    return Snapshot.of({
        CLUSTER: [_cluster("auth-svc")],
        ENDPOINT: [_assignment("auth-svc", port)],
        LISTENER: [_listener("outbound", "outbound")],
        ROUTE: [_route("outbound", "auth-svc", timeout_s)],
        SECRET: [secret_pb2.Secret(name=s) for s in secrets],
    })


@dataclass
class Client:
    """A test ADS client: one stream, requests sent by hand, responses collected."""

    stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub
    node_id: str
    requests: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = field(default_factory=asyncio.Queue)
    responses: list[discovery_pb2.DiscoveryResponse] = field(default_factory=list)
    error: grpc.aio.AioRpcError | None = None
    task: asyncio.Task[None] | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # node.metadata

    def start(self) -> None:
        async def gen() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
            while (req := await self.requests.get()) is not None:
                yield req

        async def run() -> None:
            try:
                async for resp in self.stub.StreamAggregatedResources(gen()):
                    self.responses.append(resp)
            except grpc.aio.AioRpcError as exc:
                self.error = exc

        self.task = asyncio.get_running_loop().create_task(run())

    def ask(self, type_url: str, names: tuple[str, ...] = (), version: str = "", nonce: str = "",
            error: str | None = None) -> None:
        req = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=list(names), version_info=version,
                                             response_nonce=nonce)
        req.node.id = self.node_id
        req.node.metadata.update(self.metadata)
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self.requests.put_nowait(req)

    def of(self, type_url: str) -> list[discovery_pb2.DiscoveryResponse]:
        return [r for r in self.responses if r.type_url == type_url]

    async def next_of(self, type_url: str, after: int) -> discovery_pb2.DiscoveryResponse:
        await until(lambda: len(self.of(type_url)) > after, timeout=5, what=f"response {after + 1} of {type_url}")
        return self.of(type_url)[after]

    def ack(self, resp: discovery_pb2.DiscoveryResponse, names: tuple[str, ...] = ()) -> None:
        self.ask(resp.type_url, names, resp.version_info, resp.nonce)

    async def close(self) -> None:
        self.requests.put_nowait(None)
        if self.task is not None:
            await asyncio.wait_for(self.task, 5)


@dataclass
class Plane:
    server: AdsServer
    cache: SnapshotCache
    port: int
    certs: CertLayout
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def client(self, identity: str, node_id: str | None = None, certs: CertLayout | None = None) -> Client:
        layout = certs or self.certs
        cert, key = layout.identity_paths(identity)
        creds = grpc.ssl_channel_credentials(self.certs.ca_cert.read_bytes(), key.read_bytes(), cert.read_bytes())
        ch = grpc.aio.secure_channel(f"127.0.0.1:{self.port}", creds,
                                     options=[("grpc.default_authority", "localhost")])
        self.channels.append(ch)
        c = Client(ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch),
                   node_id if node_id is not None else f"spiffe://aivo.local/ns/default/sa/{identity}")
        c.start()
        return c


@pytest.fixture
async def plane(mesh: MeshSpec, mesh_certs: CertLayout) -> AsyncIterator[Plane]:
    async with open_plane(mesh, mesh_certs) as p:
        yield p


@contextlib.asynccontextmanager
async def open_plane(mesh: MeshSpec, mesh_certs: CertLayout) -> AsyncIterator[Plane]:
    """An AdsServer on 127.0.0.1 (mTLS, serving with auth-svc's certificate) over a fresh cache."""
    cache = SnapshotCache()
    groups = {f"spiffe://aivo.local/ns/default/sa/{n}": n for n in (*mesh.service_names, "mesh-client")}
    ads = AdsServer(cache, lambda node: groups.get(node.id), PeerPolicy.from_mesh(mesh))
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    cert, key = mesh_certs.identity_paths("auth-svc")  # the control plane's own identity, for this test
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())], mesh_certs.ca_cert.read_bytes(), True))
    await server.start()
    p = Plane(ads, cache, port, mesh_certs)
    try:
        yield p
    finally:
        for ch in p.channels:
            await ch.close()
        await server.stop(0)


async def test_wildcard_and_named_subscriptions_ack_and_no_resend(plane: Plane) -> None:
    plane.cache.set("learner-svc", snapshot())
    c = plane.client("learner-svc")
    c.ask(CLUSTER)
    cds = await c.next_of(CLUSTER, 0)
    assert [r.type_url for r in cds.resources] == [CLUSTER]
    c.ack(cds)
    c.ask(ENDPOINT, ("auth-svc",))
    eds = await c.next_of(ENDPOINT, 0)
    assert len(eds.resources) == 1
    c.ack(eds, ("auth-svc",))
    await until(lambda: plane.server.nodes[c.node_id].types[ENDPOINT].acked == eds.version_info, what="EDS ACK")
    # The same snapshot again: versions are content hashes, nothing is pushed.
    assert plane.cache.set("learner-svc", snapshot()) is False
    c.ask(CLUSTER, version=cds.version_info, nonce=cds.nonce)  # a repeated ACK is not a reason to resend
    await asyncio.sleep(0.05)  # a negative: give a wrong push the time to show up
    assert len(c.of(CLUSTER)) == 1 and len(c.of(ENDPOINT)) == 1
    await c.close()


async def test_a_change_is_pushed_clusters_before_endpoints_listeners_before_routes(plane: Plane) -> None:
    plane.cache.set("learner-svc", snapshot())
    c = plane.client("learner-svc")
    for t, names in ((CLUSTER, ()), (ENDPOINT, ("auth-svc",)), (LISTENER, ()), (ROUTE, ("outbound",))):
        c.ask(t, names)
        c.ack(await c.next_of(t, 0), names)
    await until(lambda: all(plane.server.nodes[c.node_id].types[t].acked for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)),
                what="all ACKed")
    before = len(c.responses)
    plane.cache.set("learner-svc", snapshot(timeout_s=2, port=1002))  # route and endpoints change
    await until(lambda: len(c.responses) >= before + 2, what="the push")
    pushed = [r.type_url for r in c.responses[before:]]
    assert pushed == [ENDPOINT, ROUTE]  # only what changed, in warming order
    await c.close()


async def test_a_nack_is_recorded_not_resent_and_the_next_change_goes_out(plane: Plane) -> None:
    plane.cache.set("learner-svc", snapshot())
    c = plane.client("learner-svc")
    c.ask(ROUTE, ("outbound",))
    first = await c.next_of(ROUTE, 0)
    c.ack(first, ("outbound",))
    await until(lambda: plane.server.nodes[c.node_id].types[ROUTE].acked == first.version_info, what="the ACK")
    plane.cache.set("learner-svc", snapshot(timeout_s=7))
    bad = await c.next_of(ROUTE, 1)
    c.ask(ROUTE, ("outbound",), version=first.version_info, nonce=bad.nonce, error="refused: made up")
    status = plane.server.nodes[c.node_id].types[ROUTE]
    await until(lambda: status.nack_version == bad.version_info, what="the NACK recorded")
    assert (status.acked, status.nack_error) == (first.version_info, "refused: made up")
    verdicts = await plane.server.wait_settled(timeout=1)
    assert verdicts[c.node_id] == "nacked: refused: made up"
    await asyncio.sleep(0.05)
    assert len(c.of(ROUTE)) == 2  # the refused version is not sent again
    plane.cache.set("learner-svc", snapshot(timeout_s=3))
    fixed = await c.next_of(ROUTE, 2)
    c.ack(fixed, ("outbound",))
    assert (await plane.server.wait_settled(timeout=5))[c.node_id] == "acked"
    await c.close()


async def test_a_stale_nonce_is_ignored(plane: Plane) -> None:
    plane.cache.set("learner-svc", snapshot())
    c = plane.client("learner-svc")
    c.ask(ROUTE, ("outbound",))
    first = await c.next_of(ROUTE, 0)
    plane.cache.set("learner-svc", snapshot(timeout_s=5))
    second = await c.next_of(ROUTE, 1)
    # An answer to the first response arrives after the second was sent: stale, neither ACK nor NACK.
    c.ask(ROUTE, ("outbound",), version=first.version_info, nonce=first.nonce, error="late complaint")
    c.ack(second, ("outbound",))
    status = plane.server.nodes[c.node_id].types[ROUTE]
    await until(lambda: status.acked == second.version_info, what="the ACK of the second")
    assert status.nack_version == ""
    await c.close()


async def test_a_node_that_reconnects_with_what_it_holds_is_sent_nothing(plane: Plane) -> None:
    plane.cache.set("learner-svc", snapshot())
    c = plane.client("learner-svc")
    c.ask(CLUSTER)
    cds = await c.next_of(CLUSTER, 0)
    c.ack(cds)
    await c.close()
    again = plane.client("learner-svc")
    again.ask(CLUSTER, version=cds.version_info)  # a restarted stream: version, no nonce
    await asyncio.sleep(0.1)
    assert again.of(CLUSTER) == []
    plane.cache.set("learner-svc", Snapshot.of({**{t: list(m.values()) for t, m in snapshot().resources.items()},
                                                 CLUSTER: [_cluster("auth-svc"), _cluster("other")],
                                                 ENDPOINT: [_assignment("auth-svc", 1001),
                                                            _assignment("other", 1003)]}))
    assert len((await again.next_of(CLUSTER, 0)).resources) == 2
    await again.close()


async def test_a_reconnecting_node_that_holds_named_resources_is_sent_nothing(plane: Plane) -> None:
    # Envoy re-subscribes RDS/EDS by name with the version it holds: that is no reason to resend.
    plane.cache.set("learner-svc", snapshot())
    c = plane.client("learner-svc")
    c.ask(ROUTE, ("outbound",))
    rds = await c.next_of(ROUTE, 0)
    c.ack(rds, ("outbound",))
    await c.close()
    again = plane.client("learner-svc")
    again.ask(ROUTE, ("outbound",), version=rds.version_info)
    await asyncio.sleep(0.1)
    assert again.of(ROUTE) == []
    # A name it did not hold before is new to this stream too: that one is answered.
    again.ask(ROUTE, ("outbound", "other"), version=rds.version_info)
    assert (await again.next_of(ROUTE, 0)).version_info == rds.version_info
    await again.close()


def test_versions_are_content_hashes_the_same_on_every_replica() -> None:
    a, b = snapshot(), snapshot()
    assert a.versions == b.versions and a.version == b.version
    assert snapshot(timeout_s=2).versions[ROUTE] != a.versions[ROUTE]
    assert snapshot(timeout_s=2).versions[CLUSTER] == a.versions[CLUSTER]


_VERSIONS_SCRIPT = """
import json, sys
from aivo_mesh.config.loader import load_mesh
from aivo_mesh.render.envoy import EnvoyProfile
from aivo_mesh.xds.groups import group_name
from aivo_mesh.xds.proxyless import proxyless_snapshot
from aivo_mesh.xds.resources import Trust, mesh_snapshots
mesh = load_mesh(sys.argv[1])
profile = EnvoyProfile.local("/certs", "/sds")
sidecars = mesh_snapshots(mesh, lambda m, s: profile, Trust(b"ca"))
versions = {s: snap.versions for s, snap in sidecars.items()}
versions |= {group_name(s): proxyless_snapshot(mesh, s, snap).versions for s, snap in sidecars.items()}
print(json.dumps(versions))
"""


def test_versions_do_not_depend_on_the_process_that_built_them() -> None:
    # Two replicas are two processes: their hash tables (protobuf maps inside typed_config, Python sets)
    # iterate in different orders. The versions must not notice.
    import json
    import subprocess
    import sys
    from pathlib import Path

    from helpers import checkout_env

    mesh_file = str(Path(__file__).resolve().parents[1] / "mesh.yaml")
    seen = []
    for seed in ("1", "2", "3"):
        out = subprocess.run([sys.executable, "-c", _VERSIONS_SCRIPT, mesh_file], capture_output=True, text=True,
                             check=True, env=checkout_env(extra={"PYTHONHASHSEED": seed}))
        seen.append(json.loads(out.stdout))
    assert seen[0] == seen[1] == seen[2]
    assert len({v for versions in seen[0].values() for v in versions.values()}) > 5  # real, distinct hashes


def test_an_inconsistent_snapshot_is_refused_and_the_last_good_one_stays() -> None:
    cache = SnapshotCache()
    cache.set("g", snapshot())
    missing_assignment = Snapshot.of({CLUSTER: [_cluster("auth-svc"), _cluster("orphan")],
                                      ENDPOINT: [_assignment("auth-svc", 1)],
                                      LISTENER: [_listener("outbound", "gone")],
                                      ROUTE: [_route("other", "nowhere")]})
    with pytest.raises(InconsistentSnapshot) as exc:
        cache.set("g", missing_assignment)
    text = str(exc.value)
    for phrase in ("cluster orphan takes its endpoints from EDS but has no assignment",
                   "listener outbound uses route configuration gone",
                   "route configuration other sends to cluster nowhere"):
        assert phrase in text
    assert cache.get("g") == snapshot()


async def test_a_node_asking_as_another_identity_is_refused(plane: Plane) -> None:
    plane.cache.set("auth-svc", snapshot())
    c = plane.client("learner-svc", node_id="spiffe://aivo.local/ns/default/sa/auth-svc")
    c.ask(CLUSTER)
    await until(lambda: c.error is not None, what="the refusal")
    assert c.error is not None and c.error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "learner-svc" in (c.error.details() or "")
    assert c.responses == []


async def test_a_certificate_from_a_foreign_ca_is_refused(plane: Plane, mesh: MeshSpec, tmp_path) -> None:
    foreign = CertLayout(tmp_path / "foreign")
    init_ca(foreign, mesh.mesh.trust_domain)
    issue_leaf(foreign, "learner-svc", mesh)
    plane.cache.set("learner-svc", snapshot())
    c = plane.client("learner-svc", certs=foreign)
    c.ask(CLUSTER)
    await until(lambda: c.error is not None, what="the refusal")
    assert c.error is not None and c.error.code() == grpc.StatusCode.UNAVAILABLE  # the handshake
    assert c.responses == []


async def test_a_node_gets_only_its_own_groups_resources(plane: Plane) -> None:
    plane.cache.set("auth-svc", snapshot(secrets=("auth-only",)))
    plane.cache.set("learner-svc", snapshot(secrets=("mesh_ca",)))
    c = plane.client("learner-svc")
    c.ask(SECRET, ("auth-only", "mesh_ca"))  # asking for another group's secret by name
    resp = await c.next_of(SECRET, 0)
    got = []
    for a in resp.resources:
        s = secret_pb2.Secret()
        a.Unpack(s)
        got.append(s.name)
    assert got == ["mesh_ca"]
    await c.close()



def _two_clusters() -> Snapshot:
    return Snapshot.of({CLUSTER: [_cluster("auth-svc"), _cluster("event-collector-svc")],
                        ENDPOINT: [_assignment("auth-svc", 1001), _assignment("event-collector-svc", 1002)]})


async def test_a_client_that_names_its_clusters_is_answered_each_new_name_at_once(plane: Plane) -> None:
    # gRPC's clients name their listeners and clusters (state of the world still: each answer holds every
    # resource named). One that names another while the snapshot stays the same is answered at once.
    plane.cache.set("learner-svc", _two_clusters())
    c = plane.client("learner-svc")
    c.ask(CLUSTER, ("auth-svc",))
    first = await c.next_of(CLUSTER, 0)
    assert len(first.resources) == 1
    c.ack(first, ("auth-svc",))
    c.ask(CLUSTER, ("auth-svc", "event-collector-svc"), version=first.version_info, nonce=first.nonce)
    second = await c.next_of(CLUSTER, 1)
    names = [cluster_pb2.Cluster.FromString(a.value).name for a in second.resources]
    assert names == ["auth-svc", "event-collector-svc"] and second.version_info == first.version_info
    c.ack(second, ("auth-svc", "event-collector-svc"))
    await asyncio.sleep(0.05)  # a negative: the ACK is no reason to answer again
    assert len(c.of(CLUSTER)) == 2
    await c.close()


async def test_one_streams_nack_is_not_hidden_by_another_streams_ack(plane: Plane) -> None:
    # gRPC opens a stream per target channel, and a service runs several processes: one node, many
    # streams. A push one of them refuses is refused, whatever the others say.
    plane.cache.set("learner-svc", snapshot())
    one, two = plane.client("learner-svc"), plane.client("learner-svc")
    for c in (one, two):
        c.ask(ROUTE, ("outbound",))
        c.ack(await c.next_of(ROUTE, 0), ("outbound",))
    assert (await plane.server.wait_settled(timeout=5)) == {one.node_id: "acked"}
    node = plane.server.nodes[one.node_id]
    assert node.connected == 2
    plane.cache.set("learner-svc", snapshot(timeout_s=9))
    pushed = [await c.next_of(ROUTE, 1) for c in (one, two)]
    one.ask(ROUTE, ("outbound",), version=pushed[0].version_info, nonce=pushed[0].nonce)  # ACK
    two.ask(ROUTE, ("outbound",), version="old", nonce=pushed[1].nonce, error="no thanks")  # NACK
    assert (await plane.server.wait_settled(timeout=5)) == {one.node_id: "nacked: no thanks"}
    view = node.as_dict()["types"]["routes"]
    assert view["acked"] == "" and view["nack"] == {"version": pushed[1].version_info, "error": "no thanks"}
    await two.close()  # the refusing process goes away: the node is what the other one holds
    await until(lambda: node.connected == 1, what="one stream left")
    assert (await plane.server.wait_settled(timeout=5)) == {one.node_id: "acked"}
    await one.close()


async def test_a_sidecar_and_a_proxyless_process_of_one_identity_are_seen_apart(plane: Plane) -> None:
    # Same identity, same node.id, another group (xds/proxyless.py): neither replaces the other's status.
    def group_of(node: Any) -> str:
        name = node.id.rsplit("/", 1)[-1]
        return f"{name}/proxyless" if node.metadata.fields["aivo.plane"].string_value == "proxyless" else name

    plane.server.group_of = group_of
    plane.cache.set("learner-svc", snapshot())
    plane.cache.set("learner-svc/proxyless", _two_clusters())
    sidecar, grpc_client = plane.client("learner-svc"), plane.client("learner-svc")
    for c, plane_name in ((sidecar, "sidecar"), (grpc_client, "proxyless")):
        c.metadata = {"aivo.plane": plane_name}
        c.ask(CLUSTER)
        c.ack(await c.next_of(CLUSTER, 0))
    assert len(sidecar.of(CLUSTER)[0].resources) == 1 and len(grpc_client.of(CLUSTER)[0].resources) == 2
    node_id = sidecar.node_id
    assert set(plane.server.nodes) == {node_id, f"{node_id} learner-svc/proxyless"}
    assert [(n["node"], n["group"], n["connected"]) for n in plane.server.status()] == [
        (node_id, "learner-svc", True), (node_id, "learner-svc/proxyless", True)]
    await sidecar.close()
    await grpc_client.close()
