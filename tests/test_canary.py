"""Canary weights (mesh.yaml `canary`) on the Envoy sidecars and in MeshClient: which endpoint is which
version, the weighted pick, the config errors, the renders, the control plane's resources, and a split
measured end to end through a real MeshClient and a real Envoy on 127.0.0.1.

Statistical bounds: n picks with probability p land on a version Binomial(n, p) times, standard deviation
sqrt(n p (1 - p)). Every split is checked within 5 of those deviations of n p: a correct split fails that
about once in 1.7 million runs, and one off by a few points fails it (10 000 picks at 80/20: 5 sd = 200, so
a 78/22 split is caught; 1000 calls: 5 sd = 63).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from random import Random
from typing import Any

import grpc
import pytest
import yaml
from binaries import needs
from helpers import on_free_ports, start_envoy_async, wait_envoy_live, write_sidecar
from test_envoy_render import _validate
from test_xds_grpc_client import AUTH, VALIDATE, _service, start_instance
from waiting import until

from aivo_mesh.client import MeshClient, MeshConfig
from aivo_mesh.config import MeshSpec, parse_mesh
from aivo_mesh.config.ports import sidecar_ports
from aivo_mesh.discovery.snapshot import Endpoint
from aivo_mesh.errors import ConfigError
from aivo_mesh.pki import CertLayout
from aivo_mesh.policy.balancer import Balancer, BalancerLayer, Split
from aivo_mesh.policy.core import Call, LocalReason, Reply
from aivo_mesh.render.envoy import EnvoyProfile, bootstrap, peer_cluster_names
from aivo_mesh.runtime.status import envoy_hosts
from aivo_mesh.xds.cache import CLUSTER, ENDPOINT, ROUTE
from aivo_mesh.xds.policies import decode_config
from aivo_mesh.xds.proxyless import proxyless_snapshot
from aivo_mesh.xds.resources import Trust, sidecar_snapshot

ROOT = Path(__file__).resolve().parents[1]


def within(count: int, n: int, p: float, sds: float = 5.0) -> bool:
    """`count` of `n` Bernoulli(p) draws lies within `sds` standard deviations of n p (module docstring)."""
    return abs(count - n * p) <= sds * math.sqrt(n * p * (1 - p))


def mesh_doc(**auth: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "mesh.yaml").read_text())
    _service(doc, "auth-svc").update(auth)
    return doc


def canary_mesh(a: str = "10.0.0.1:50051", b: str = "10.0.0.2:50051", weights: tuple[int, int] = (80, 20)) -> MeshSpec:
    """The repository's mesh.yaml with auth-svc split v1/v2 between two endpoints."""
    return parse_mesh(yaml.safe_dump(mesh_doc(
        endpoints=[{"address": a, "version": "v1"}, {"address": b, "version": "v2"}],
        canary={"v1": weights[0], "v2": weights[1]})), "mesh.yaml")


# -- the weighted pick ----------------------------------------------------------------------------------

def test_split_draws_each_version_by_its_weight() -> None:
    split = Split((("v1", 80), ("v2", 20)))
    rng = Random(20240611)
    counts = Counter(split.pick(rng) for _ in range(10_000))
    assert set(counts) == {"v1", "v2"}
    assert within(counts["v2"], 10_000, 0.2), counts  # 2000 +- 200
    # A weight of 0 is never drawn; weights are relative, as Envoy's.
    assert {Split((("a", 0), ("b", 3))).pick(rng) for _ in range(1000)} == {"b"}
    thirds = Counter(Split((("a", 1), ("b", 2))).pick(rng) for _ in range(10_000))
    assert within(thirds["a"], 10_000, 1 / 3), thirds
    for bad in ((), (("a", 0),), (("a", -1), ("b", 2))):
        with pytest.raises(ValueError, match="canary split needs"):
            Split(bad)


def test_split_is_deterministic_given_the_random_source() -> None:
    split = Split((("v1", 90), ("v2", 10)))
    assert [split.pick(Random(7)) for _ in range(5)] == [split.pick(Random(7)) for _ in range(5)]


async def test_each_call_draws_a_version_once_and_its_retries_stay_in_it() -> None:
    balancer = Balancer("auth-svc", ["a1:1", "a2:1", "b1:1"], versions={"b1:1": "v2"}, default_version="v1",
                        split=Split((("v1", 80), ("v2", 20))), rng=Random(3))
    seen: list[tuple[str | None, str | None]] = []

    async def terminal(call: Call) -> Reply:
        seen.append((call.version, call.endpoint))
        return Reply("OK")  # (a failure would feed outlier detection; the pick is what is tested here)

    handle = BalancerLayer(balancer).wrap(terminal)
    for _ in range(2000):
        call = Call("auth-svc", "/m", b"")
        await handle(call)  # first attempt
        call.attempt = 2
        await handle(call)  # a retry: the same version, another endpoint where it has one
    versions = [v for v, _ in seen[::2]]
    assert [v for v, _ in seen[1::2]] == versions  # each retry in its call's version
    assert all(ep in ("a1:1", "a2:1") if v == "v1" else ep == "b1:1" for v, ep in seen)
    assert within(versions.count("v2"), 2000, 0.2), Counter(versions)
    # Round robin within a version: v1's two endpoints take turns.
    v1_endpoints = Counter(ep for v, ep in seen if v == "v1")
    assert abs(v1_endpoints["a1:1"] - v1_endpoints["a2:1"]) <= 1, v1_endpoints


async def test_a_version_without_endpoints_gets_its_share_and_those_calls_fail_unavailable() -> None:
    balancer = Balancer("auth-svc", ["a1:1"], default_version="v1", split=Split((("v1", 50), ("v2", 50))),
                        rng=Random(1))

    async def terminal(call: Call) -> Reply:
        return Reply("OK")

    handle = BalancerLayer(balancer).wrap(terminal)
    replies = [await handle(Call("auth-svc", "/m", b"")) for _ in range(1000)]
    failed = [r for r in replies if r.code != "OK"]
    assert within(len(failed), 1000, 0.5), len(failed)  # as Envoy: the version is chosen regardless
    assert {(r.code, r.local) for r in failed} == {("UNAVAILABLE", LocalReason.NO_ENDPOINTS)}
    assert "no endpoints of version v2 for auth-svc" in failed[0].details
    # Every endpoint of a version unhealthy: panic within the version, never a move to another version.
    balancer.update(["a1:1", "b1:1"], {"b1:1": "v2"})
    balancer.set_health("b1:1", False)
    assert {balancer.pick("v2").address for _ in range(10)} == {"b1:1"}  # type: ignore[union-attr]
    assert [e["version"] for e in balancer.snapshot()] == ["v1", "v2"]


# -- config ---------------------------------------------------------------------------------------------

def test_endpoints_carry_versions_plain_strings_are_the_services_own() -> None:
    mesh = parse_mesh(yaml.safe_dump(mesh_doc(version="1.4.0", endpoints=[
        "10.0.0.1:1", {"address": "10.0.0.2:1"}, {"address": "10.0.0.3:1", "version": "v2"}])), "mesh.yaml")
    auth = mesh.service("auth-svc")
    assert auth.endpoint_addresses == ("10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1")
    assert auth.endpoint_versions == (("10.0.0.1:1", "1.4.0"), ("10.0.0.2:1", "1.4.0"), ("10.0.0.3:1", "v2"))
    assert Endpoint("h", 1, metadata={"version": "v2"}).version_or("1.0.0") == "v2"
    assert Endpoint("h", 1).version_or("1.0.0") == "1.0.0"


@pytest.mark.parametrize(("auth", "where", "expected"), [
    ({"endpoints": [{"address": "10.0.0.1:1", "version": "v1"}], "canary": {"v1": 90, "v2": 10}},
     "services[0].canary.v2", "no endpoint of version 'v2'"),
    ({"endpoints": ["10.0.0.1:1"], "canary": {"1.0.0": 50, "v2": 50}}, "services[0].canary.v2",
     "no endpoint of version 'v2'"),
    ({"endpoints": [{"address": "10.0.0.1", "version": "v1"}]}, "services[0].endpoints[0]", "expected host:port"),
    ({"endpoints": [{"address": "10.0.0.1:1", "version": "v 2"}]}, "services[0].endpoints[0]", "version"),
])
def test_canary_endpoint_errors_are_located(auth: dict[str, Any], where: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_mesh(yaml.safe_dump(mesh_doc(**auth)), "mesh.yaml")
    assert "mesh.yaml:" in str(err.value) and where in str(err.value) and expected in str(err.value), str(err.value)


def test_a_canary_without_static_endpoints_or_with_a_weightless_missing_version_is_valid() -> None:
    parse_mesh(yaml.safe_dump(mesh_doc(canary={"v1": 90, "v2": 10})), "mesh.yaml")  # discovery finds them
    parse_mesh(yaml.safe_dump(mesh_doc(endpoints=[{"address": "10.0.0.1:1", "version": "v1"}],
                                       canary={"v1": 100, "v2": 0})), "mesh.yaml")


# -- Envoy renders --------------------------------------------------------------------------------------

def _without_auth(doc: Any, drop: set[str]) -> Any:
    """`doc` with every cluster and route to auth-svc taken out (compared apart)."""
    if isinstance(doc, dict):
        if doc.get("name") in drop:
            return None
        return {k: v for k, v in ((k, _without_auth(v, drop)) for k, v in doc.items()) if v is not None}
    if isinstance(doc, list):
        return [v for v in (_without_auth(x, drop) for x in doc) if v is not None]
    return doc


def _auth_parts(cfg: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    clusters = [c for c in cfg["static_resources"]["clusters"] if c["name"].startswith("auth-svc")]
    outbound = next(x for x in cfg["static_resources"]["listeners"] if x["name"] == "outbound_grpc")
    hcm = outbound["filter_chains"][0]["filters"][-1]["typed_config"]
    routes = [r for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if r["name"].startswith("auth-svc/")]
    return clusters, routes


@pytest.mark.parametrize("kind", ["pod", "local"])
def test_the_canary_render_differs_exactly_in_auth_svcs_clusters_and_route_targets(kind: str) -> None:
    plain = parse_mesh(yaml.safe_dump(mesh_doc(endpoints=["10.0.0.1:50051", "10.0.0.2:50051"])), "mesh.yaml")
    canary = canary_mesh()
    profile = EnvoyProfile.pod(plain) if kind == "pod" else EnvoyProfile.local("/certs", "/sds")
    before, after = bootstrap(plain, "learner-svc", profile), bootstrap(canary, "learner-svc", profile)
    names = {"auth-svc", "auth-svc.v1", "auth-svc.v2"}
    route_names = {r["name"] for r in _auth_parts(before)[1]}
    # Nothing else changes: other peers, listeners, the local app.
    assert _without_auth(before, names | route_names) == _without_auth(after, names | route_names)

    (cluster,), routes = _auth_parts(before)
    clusters, canary_routes = _auth_parts(after)
    assert [c["name"] for c in clusters] == ["auth-svc.v1", "auth-svc.v2"] == list(
        peer_cluster_names(canary.service("auth-svc")))
    hosts = {c["name"]: [e["endpoint"]["address"]["socket_address"] for e in c["load_assignment"]["endpoints"][0][
        "lb_endpoints"]] for c in clusters}
    if kind == "pod":  # the per-version Services `meshctl render linkerd` names
        assert hosts == {"auth-svc.v1": [{"address": "auth-svc-v1", "port_value": 50051}],
                         "auth-svc.v2": [{"address": "auth-svc-v2", "port_value": 50051}]}
    else:  # mesh.yaml's endpoints of each version
        assert hosts == {"auth-svc.v1": [{"address": "10.0.0.1", "port_value": 50051}],
                         "auth-svc.v2": [{"address": "10.0.0.2", "port_value": 50051}]}
    for c in clusters:  # the same policy, TLS (SNI, the peer's SPIFFE ID) and health check per version
        same = {k: v for k, v in c.items() if k not in ("name", "load_assignment", "type", "dns_lookup_family")}
        assert same == {k: v for k, v in cluster.items()
                        if k not in ("name", "load_assignment", "type", "dns_lookup_family")}
    # Each route keeps its deadline and retry policy; only its target becomes weighted.
    assert len(routes) == len(canary_routes) >= 2
    for old, new in zip(routes, canary_routes, strict=True):
        assert old["route"].pop("cluster") == "auth-svc"
        assert new["route"].pop("weighted_clusters") == {"clusters": [{"name": "auth-svc.v1", "weight": 80},
                                                                       {"name": "auth-svc.v2", "weight": 20}]}
        assert old == new


@needs("envoy")
@pytest.mark.parametrize("kind", ["pod", "local"])
def test_envoy_validates_the_canary_render(kind: str, mesh_certs: CertLayout, tmp_path: Path) -> None:
    mesh = canary_mesh()
    if kind == "pod":  # the pod's layout, with the test's certificates
        profile = EnvoyProfile("pod", str(mesh_certs.root), str(tmp_path / "sds"))
    else:
        profile = EnvoyProfile.local(str(mesh_certs.root), str(tmp_path / "sds"))
    path = write_sidecar(mesh, "learner-svc", profile, tmp_path / "envoy.yaml")
    done = _validate(path)
    assert done.returncode == 0, done.stdout + done.stderr


# -- the control plane -----------------------------------------------------------------------------------

def test_the_control_plane_sends_a_cluster_and_assignment_per_version_and_proxyless_decodes_the_split() -> None:
    mesh = canary_mesh()
    # Discovery's instances (Consul: Meta `version`), an unversioned one being of auth-svc's own (1.0.0).
    found = {"auth-svc": (Endpoint("10.0.0.1", 1, metadata={"version": "v1"}),
                          Endpoint("10.0.0.2", 1, metadata={"version": "v2"}),
                          Endpoint("10.0.0.3", 1, metadata={"version": "v2"}))}
    profile = EnvoyProfile.local("/certs", "/sds")
    snap = sidecar_snapshot(mesh, "learner-svc", profile, Trust(b"-"), found)
    assert snap.problems() == []
    assert {"auth-svc.v1", "auth-svc.v2"} <= set(snap.get(CLUSTER)) and "auth-svc" not in snap.get(CLUSTER)
    assignments: dict[str, Any] = dict(snap.get(ENDPOINT))
    hosts = {name: sorted(e.endpoint.address.socket_address.address for loc in cla.endpoints
                          for e in loc.lb_endpoints)
             for name, cla in assignments.items() if name.startswith("auth-svc")}
    assert hosts == {"auth-svc.v1": ["10.0.0.1"], "auth-svc.v2": ["10.0.0.2", "10.0.0.3"]}
    outbound: Any = snap.get(ROUTE)["outbound"]
    weights = {tuple((w.name, w.weight.value) for w in r.route.weighted_clusters.clusters)
               for vh in outbound.virtual_hosts for r in vh.routes if r.name.startswith("auth-svc/")}
    assert weights == {(("auth-svc.v1", 80), ("auth-svc.v2", 20))}

    cut = proxyless_snapshot(mesh, "learner-svc", snap)
    assert cut.problems() == []
    config = decode_config(mesh, cut.resources)
    target = config.targets["auth-svc"]
    assert target.policy.canary == (("v1", 80), ("v2", 20))
    assert {(e.address, e.metadata["version"]) for e in target.endpoints} == {
        ("10.0.0.1:1", "v1"), ("10.0.0.2:1", "v2"), ("10.0.0.3:1", "v2")}
    assert config.targets["event-collector-svc"].policy.canary == ()


# -- end to end: 1000 calls through MeshClient, 1000 through a real Envoy ---------------------------------

def _raw(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(VALIDATE, request_serializer=lambda b: b, response_deserializer=lambda b: b)


async def _split_of(call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes], n: int) -> Counter[bytes]:
    counts: Counter[bytes] = Counter()
    for i in range(0, n, 50):  # 50 at a time: fast, and never more than the default limits
        counts.update(await asyncio.gather(*(call(b"who", timeout=10) for _ in range(min(50, n - i)))))
    return counts


@contextlib.contextmanager
def _certs(mesh_certs: CertLayout, tmp_path: Path) -> Iterator[CertLayout]:
    shutil.copytree(mesh_certs.root, tmp_path / "certs")
    yield CertLayout(tmp_path / "certs")


@needs("envoy")
async def test_an_80_20_split_holds_through_meshclient_and_through_a_real_envoy(mesh_certs: CertLayout,
                                                                               tmp_path: Path) -> None:
    base = parse_mesh((ROOT / "mesh.yaml").read_text(), "mesh.yaml")
    with _certs(mesh_certs, tmp_path) as certs:
        v1 = await start_instance(base, certs, "auth-svc", "v1", AUTH, "ValidateToken")
        v2 = await start_instance(base, certs, "auth-svc", "v2", AUTH, "ValidateToken")
        proc = None
        try:
            mesh = on_free_ports(canary_mesh(v1.address, v2.address))
            # Proxyless: learner-svc's MeshClient, with a seeded random source.
            async with MeshClient(MeshConfig.for_identity("learner-svc", certs, mesh), rng=Random(11),
                                  health_checks=False) as client:
                counts = await _split_of(_raw(await client.channel("auth-svc")), 1000)
                assert set(counts) == {b"v1", b"v2"} and sum(counts.values()) == 1000
                assert within(counts[b"v2"], 1000, 0.2), counts  # 200 +- 63
                # New weights (as `meshctl apply` or an edited mesh.yaml bring them) change the split live.
                assert "canary" in client.apply_policies(on_free_ports(canary_mesh(v1.address, v2.address,
                                                                                    (20, 80))))["auth-svc"]
                flipped = await _split_of(_raw(await client.channel("auth-svc")), 1000)
                assert within(flipped[b"v2"], 1000, 0.8), flipped

            # The sidecar plane: learner-svc's Envoy (the static local render) calls both instances over mTLS.
            profile = EnvoyProfile.local(str(certs.root), str(tmp_path / "sds"))
            proc = await start_envoy_async(write_sidecar(mesh, "learner-svc", profile, tmp_path / "envoy.yaml"))
            ports = sidecar_ports(mesh, "learner-svc", "local")
            await asyncio.to_thread(wait_envoy_live, ports.admin, proc)
            admin = f"127.0.0.1:{ports.admin}"

            def both_versions_healthy() -> bool:
                with contextlib.suppress(OSError):
                    hosts = envoy_hosts(admin)
                    return all(set(hosts.get(f"auth-svc.{v}", {}).values()) == {"healthy"} for v in ("v1", "v2"))
                return False

            # `meshctl status` reads these: one upstream per version.
            await until(both_versions_healthy, 15, "learner's sidecar sees both versions healthy")
            assert {k: list(v) for k, v in envoy_hosts(admin).items() if k.startswith("auth-svc")} == {
                "auth-svc.v1": [v1.address], "auth-svc.v2": [v2.address]}
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports.outbound}") as channel:
                counts = await _split_of(_raw(channel), 1000)
            assert set(counts) == {b"v1", b"v2"} and sum(counts.values()) == 1000
            assert within(counts[b"v2"], 1000, 0.2), counts
        finally:
            if proc is not None:
                proc.terminate()
                await proc.wait()
            await v1.server.stop(0)
            await v2.server.stop(0)


def test_lint_warns_of_a_canary_version_discovery_must_find() -> None:
    from aivo_mesh.lint.envoy import lint_mesh

    mesh = parse_mesh(yaml.safe_dump(mesh_doc(version="v1", canary={"v1": 90, "v2": 10, "v3": 0})), "mesh.yaml")
    issues = [i for i in lint_mesh(mesh) if ".canary." in i.path]
    assert [(i.path, i.severity) for i in issues] == [("services[0].canary.v2", "warning")]
    assert "10 %" in issues[0].message and "auth-svc-v2" in issues[0].message
    assert not [i for i in lint_mesh(canary_mesh()) if ".canary." in i.path]  # static endpoints: checked at load
