"""The proxyless side of ADS (xds/subscriber.py) against the real AdsServer over mTLS on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf.message import Message
from test_xds_protocol import Plane, open_plane, snapshot
from waiting import until

from aivo_mesh.client.server_check import ServerCheck
from aivo_mesh.config import MeshSpec
from aivo_mesh.pki import CertLayout, PeerPolicy
from aivo_mesh.policy.events import NOOP
from aivo_mesh.xds.cache import CLUSTER, ENDPOINT, LISTENER, ROUTE
from aivo_mesh.xds.policies import PolicyError
from aivo_mesh.xds.subscriber import Resources, Subscription

LEARNER = "spiffe://aivo.local/ns/default/sa/learner-svc"


@pytest.fixture
async def plane(mesh: MeshSpec, mesh_certs: CertLayout) -> AsyncIterator[Plane]:
    async with open_plane(mesh, mesh_certs) as p:
        yield p


class Recorder:
    """check/apply callbacks that keep what they saw; `refuse` makes them refuse a type or a port."""

    def __init__(self) -> None:
        self.applied: list[Resources] = []
        self.refuse_type: str | None = None
        self.refuse_port: int | None = None

    def check(self, type_url: str, resources: Mapping[str, Message]) -> None:
        if type_url == self.refuse_type:
            raise PolicyError(f"this process cannot apply these {type_url.rsplit('.', 1)[-1]}s")

    def apply(self, resources: Resources) -> None:
        cla: Any = resources[ENDPOINT].get("auth-svc")
        if cla is not None and cla.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value == \
                self.refuse_port:
            raise PolicyError("port refused by this process")
        self.applied.append({t: dict(r) for t, r in resources.items()})

    def port(self, i: int = -1) -> int:
        cla: Any = self.applied[i][ENDPOINT]["auth-svc"]
        return int(cla.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value)


def subscription(plane: Plane, rec: Recorder, expect: str = "auth-svc") -> Subscription:
    cert, key = plane.certs.identity_paths("learner-svc")
    creds = grpc.ssl_channel_credentials(plane.certs.ca_cert.read_bytes(), key.read_bytes(), cert.read_bytes())
    node = base_pb2.Node(id=LEARNER, cluster="learner-svc")
    policy: PeerPolicy = plane.server.policy

    def server_check(channel_for: Any) -> ServerCheck:
        return ServerCheck("control-plane", f"spiffe://aivo.local/ns/default/sa/{expect}", policy, NOOP,
                           channel_for, lambda _: None)

    return Subscription(f"127.0.0.1:{plane.port}", creds, node, check=rec.check, apply=rec.apply,
                        options=[("grpc.default_authority", "localhost")], server_check=server_check)


async def test_subscribes_to_everything_applies_once_complete_and_acks_each_type(plane: Plane) -> None:
    plane.cache.set("learner-svc", snapshot(port=1001))
    rec = Recorder()
    sub = subscription(plane, rec)
    sub.start()
    try:
        assert await sub.wait_applied(10), sub.last_error
        assert len(rec.applied) == 1 and rec.port() == 1001
        assert set(rec.applied[0][LISTENER]) == {"outbound"} and set(rec.applied[0][ROUTE]) == {"outbound"}
        want = plane.cache.get("learner-svc")
        assert want is not None
        await until(lambda: all(plane.server.nodes[LEARNER].types[t].acked == want.versions[t]
                                for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)), what="every type ACKed")
        # A change: applied as a whole, once.
        plane.cache.set("learner-svc", snapshot(port=1002))
        assert await sub.wait_for(lambda: rec.applied[-1] is not rec.applied[0] and rec.port() == 1002, 10)
        assert len(rec.applied) == 2
    finally:
        await sub.stop()


async def test_a_type_it_cannot_apply_is_nacked_with_the_reason_and_the_last_good_stays(plane: Plane) -> None:
    plane.cache.set("learner-svc", snapshot(port=1001))
    rec = Recorder()
    sub = subscription(plane, rec)
    sub.start()
    try:
        assert await sub.wait_applied(10), sub.last_error
        rec.refuse_port = 1003
        plane.cache.set("learner-svc", snapshot(port=1003))
        await until(lambda: plane.server.nodes[LEARNER].types[ENDPOINT].nack_error == "port refused by this process",
                    timeout=10, what="the EDS NACK at the control plane")
        assert rec.port() == 1001 and len(rec.applied) == 1
        assert sub.status()["types"]["endpoints"]["error"] == "port refused by this process"  # type: ignore[index]
        # The next good one goes in.
        plane.cache.set("learner-svc", snapshot(port=1004))
        assert await sub.wait_for(lambda: rec.port() == 1004, 10)
        assert sub.status()["types"]["endpoints"]["error"] is None  # type: ignore[index]
        # A check that refuses a whole type: NACKed at once, nothing applied.
        rec.refuse_type = ROUTE
        plane.cache.set("learner-svc", snapshot(port=1004, timeout_s=7))
        await until(lambda: bool(plane.server.nodes[LEARNER].types[ROUTE].nack_error), timeout=10, what="RDS NACK")
        assert len(rec.applied) == 2
    finally:
        await sub.stop()


async def test_a_new_stream_resumes_from_what_it_holds_and_reapplies_nothing(plane: Plane) -> None:
    plane.cache.set("learner-svc", snapshot(port=1001))
    rec = Recorder()
    sub = subscription(plane, rec)
    sub.start()
    try:
        assert await sub.wait_applied(10), sub.last_error
        await until(lambda: all(s.acked for s in plane.server.nodes[LEARNER].types.values()), what="ACKs")
        before = {t: s.nonce for t, s in sub.types.items()}
        await sub.stop()  # the stream ends (as when the control plane restarts); the state stays
        sub.start()
        await until(lambda: sub.connected and plane.server.nodes[LEARNER].connected == 1, timeout=10,
                    what="reconnected")
        await asyncio.sleep(0.2)  # a negative: give a wrong push the time to show up
        assert {t: s.nonce for t, s in sub.types.items()} == before, "the control plane sent something again"
        assert len(rec.applied) == 1
        plane.cache.set("learner-svc", snapshot(port=1005))
        assert await sub.wait_for(lambda: rec.port() == 1005, 10)
        assert len(rec.applied) == 2
    finally:
        await sub.stop()


async def test_a_control_plane_with_another_identity_is_refused_before_anything_is_asked(plane: Plane) -> None:
    plane.cache.set("learner-svc", snapshot(port=1001))
    rec = Recorder()
    sub = subscription(plane, rec, expect="control-plane")  # the plane serves with auth-svc's certificate
    sub.start()
    try:
        await until(lambda: sub.last_error is not None, timeout=10, what="the refusal")
        assert "control plane certificate refused" in str(sub.last_error)
        assert LEARNER not in plane.server.nodes and not rec.applied
    finally:
        await sub.stop()


def test_a_listener_waits_for_its_routes_before_anything_is_applied() -> None:
    from envoy.service.discovery.v3 import discovery_pb2
    from google.protobuf import any_pb2

    rec = Recorder()
    sub = Subscription("127.0.0.1:1", grpc.local_channel_credentials(), base_pb2.Node(id=LEARNER),
                       check=rec.check, apply=rec.apply)
    snap = snapshot(port=1001)

    def response(t: str, version: str) -> discovery_pb2.DiscoveryResponse:
        packed = []
        for r in snap.get(t).values():
            a = any_pb2.Any()
            a.Pack(r)
            packed.append(a)
        return discovery_pb2.DiscoveryResponse(type_url=t, version_info=version, nonce=f"n-{t}", resources=packed)

    # Clusters first: ACKed, and their assignment asked for by name; nothing applied yet.
    out = sub._handle(response(CLUSTER, "c1"))
    assert [(r.type_url, r.version_info, list(r.resource_names)) for r in out] == [
        (CLUSTER, "c1", []), (ENDPOINT, "", ["auth-svc"])]
    out = sub._handle(response(ENDPOINT, "e1"))
    assert [r.type_url for r in out] == [ENDPOINT]
    assert not rec.applied  # no listeners received yet
    # The listener: ACKed, its route configuration asked for; still nothing applied (it would route nowhere).
    out = sub._handle(response(LISTENER, "l1"))
    assert [(r.type_url, list(r.resource_names)) for r in out] == [(LISTENER, []), (ROUTE, ["outbound"])]
    assert not rec.applied
    sub._handle(response(ROUTE, "r1"))
    assert len(rec.applied) == 1
    assert set(rec.applied[0][ROUTE]) == {"outbound"} and set(rec.applied[0][CLUSTER]) == {"auth-svc"}
    assert sub.status()["types"]["routes"]["version"] == "r1"  # type: ignore[index]
