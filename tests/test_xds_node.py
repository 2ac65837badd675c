"""A proxyless process's node on the real control plane (in process, mTLS on 127.0.0.1): what it applies,
what it refuses, and what `apply` reports of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from test_xds_grpc_client import VALIDATE, _service, local_mesh

from aivo_mesh.config import parse_mesh
from aivo_mesh.config.resolve import fault_policies
from aivo_mesh.pki import CertLayout
from aivo_mesh.xds.cache import type_name
from aivo_mesh.xds.groups import group_name
from aivo_mesh.xds.node import ProxylessNode
from aivo_mesh.xds.policies import ProxylessConfig

GET_PROFILE = "/aivo.learner.v1.LearnerService/GetProfile"


def _node(env: Any, applied: list[ProxylessConfig]) -> ProxylessNode:
    cert, key = env.state.certs.identity_paths("learner-svc")
    return ProxylessNode(env.cp.mesh, "learner-svc", env.cp.mesh.control_plane.address, cert=cert, key=key,
                         ca=env.state.certs.ca_cert, apply=applied.append)


async def test_a_proxyless_node_applies_each_change_and_apply_reports_its_ack(mesh_certs: CertLayout,
                                                                              tmp_path: Path) -> None:
    async with local_mesh(mesh_certs, tmp_path) as env:
        applied: list[ProxylessConfig] = []
        node = _node(env, applied)
        # learner-svc has no proxyless process yet: the control plane builds its sidecar's group alone.
        assert env.cp.cache.get(group_name("learner-svc")) is None
        assert env.cp.cache.get("learner-svc") is not None
        node.start()
        try:
            assert await node.wait_applied(10), node.status()
            assert env.cp.cache.get(group_name("learner-svc")) is not None  # built when the node came
            assert env.cp.cache.get(group_name("auth-svc")) is None
            first = applied[-1]
            auth = first.targets["auth-svc"]
            assert auth.routes[0].pattern == VALIDATE and auth.routes[0].timeout == 4.0
            assert [e.address for e in auth.endpoints] == [env.a.address]
            assert first.allow is not None and any("spiffe://aivo.local/ns/default/sa/mesh-client" in callers
                                                   for callers, _ in first.allow)
            assert first.faults == ()  # its server's: none in mesh.yaml
            # One apply: a shorter route deadline, an endpoint swapped, an allow rule of learner-svc removed,
            # a fault on learner-svc's own server (one route's, for one caller).
            auth_doc = _service(env.doc, "auth-svc")
            auth_doc["routes"][0]["timeout"] = "2s"
            auth_doc["endpoints"] = [env.b.address]
            _service(env.doc, "learner-svc")["allow"] = [
                r for r in _service(env.doc, "learner-svc")["allow"] if "mesh-client" not in r["from"]]
            _service(env.doc, "learner-svc")["fault"] = {"delay": "1s", "delay_percent": 10}
            (get_profile,) = _service(env.doc, "learner-svc")["routes"]
            assert get_profile["match"] == GET_PROFILE
            get_profile["fault"] = {"abort_status": "UNAVAILABLE", "abort_percent": 50, "callers": ["analytics-svc"]}
            result = await env.cp.apply(yaml.safe_dump(env.doc, sort_keys=False))
            outcome = {n["service"]: n["outcome"] for n in result["nodes"]}
            assert outcome == {group_name("learner-svc"): "acked"}, result
            assert await node.subscription.wait_for(lambda: applied[-1] is not first and
                                                    applied[-1].targets["auth-svc"].routes[0].timeout == 2.0, 10)
            now = applied[-1]
            assert [e.address for e in now.targets["auth-svc"].endpoints] == [env.b.address]
            assert now.allow is not None
            assert not any("spiffe://aivo.local/ns/default/sa/mesh-client" in callers for callers, _ in now.allow)
            # The faults read back as mesh.yaml resolves them: what MeshServer.set_faults is given.
            assert now.faults == fault_policies(parse_mesh(yaml.safe_dump(env.doc), "mesh.yaml"), "learner-svc")
            assert now.faults is not None and [(p.pattern, p.callers, p.fault.abort_percent, p.fault.delay)
                                               for p in now.faults] == [
                (GET_PROFILE, ("spiffe://aivo.local/ns/default/sa/analytics-svc",), 50.0, 1.0),
                ("/aivo.learner.v1.LearnerService/", None, 0.0, 1.0)]
            # What the node holds is what the control plane last sent it, per type.
            held: Any = node.status()["types"]
            sent = env.cp.ads.nodes[f"{env.cp.mesh.spiffe_id('learner-svc')} {group_name('learner-svc')}"].types
            assert {type_name(t): s.acked for t, s in sent.items()} == {t: held[t]["version"] for t in held}
        finally:
            await node.stop()


async def test_what_the_node_cannot_read_is_nacked_and_the_last_good_stays(mesh_certs: CertLayout,
                                                                           tmp_path: Path) -> None:
    async with local_mesh(mesh_certs, tmp_path) as env:
        applied: list[ProxylessConfig] = []
        node = _node(env, applied)
        # A process that cannot apply one kind of policy (here: it refuses failure_rate breakers, as an older
        # build would refuse a key it does not know) NACKs the cluster that carries it.
        original = node._check

        def strict(type_url: str, resources: Any) -> None:
            original(type_url, resources)
            for cluster in resources.values() if type_url.endswith("Cluster") else ():
                meta = cluster.metadata.filter_metadata["aivo.mesh"]
                if meta["circuit_breaker"]["mode"] == "failure_rate":
                    from aivo_mesh.xds.policies import PolicyError

                    raise PolicyError(f"cluster {cluster.name}: this process has no failure_rate breaker")

        node.subscription._check = strict
        node.start()
        try:
            assert await node.wait_applied(10)
            count = len(applied)
            _service(env.doc, "auth-svc")["circuit_breaker"] = {"mode": "failure_rate", "failure_rate_threshold": 0.5,
                                                                "window_size": 10, "minimum_calls": 5}
            result = await env.cp.apply(yaml.safe_dump(env.doc, sort_keys=False))
            outcome = {n["service"]: n["outcome"] for n in result["nodes"]}
            nacked = "nacked: cluster auth-svc: this process has no"
            assert outcome[group_name("learner-svc")].startswith(nacked), result
            assert len(applied) == count  # the last good configuration stays in force
            assert node.status()["types"]["clusters"]["error"].startswith("cluster auth-svc")  # type: ignore[index]
        finally:
            await node.stop()
