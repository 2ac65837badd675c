"""Endpoint discovery: snapshot store, static, DNS (against a fake DNS server) and Consul (against a
fake of the documented agent HTTP API; test_consul_real.py repeats the Consul part against a real
agent when one is installed).

Waits are condition-based with a bound (`store.newer_than(..., timeout=)`, the fakes' `wait_until`),
never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import dns.exception
import dns.rcode
import grpc
import pytest
from fakes.consul_agent import FakeConsulAgent, RequestRecord
from fakes.dns_server import FakeDnsServer

from aivo_mesh.config import MeshSpec, parse_mesh
from aivo_mesh.discovery import (
    ConsulDiscovery,
    ConsulError,
    ConsulRegistration,
    Discovery,
    DiscoveryNotReady,
    DnsOptions,
    DnsSource,
    DnsTarget,
    Endpoint,
    Snapshot,
    SnapshotStore,
    StaticSource,
    agent_service_definition,
    build_discovery,
    endpoints_from_health,
    next_index,
    refresh_delay,
    service_id,
    static_endpoints,
)
from aivo_mesh.discovery._util import TokenBucket
from aivo_mesh.discovery.consul_register import REGISTER_BACKOFF, go_duration
from aivo_mesh.errors import ConfigError

BOUND = 3.0  # upper bound of every condition wait; the happy path takes milliseconds
MESH_FILE = Path(__file__).resolve().parents[1] / "mesh.yaml"

MESH_YAML = """
version: 1
mesh: {trust_domain: aivo.local}
defaults:
  health_check: {interval: 10s, timeout: 2s}
services:
  - name: auth-svc
    version: 1.4.2
    grpc_service: aivo.auth.v1.AuthService
    port: 50051
    local_port: 8081
    host: auth.test
    tags: [auth, tier-1]
    metadata: {team: identity}
    health_check: {interval: 30s}
  - name: learner-svc
    grpc_service: aivo.learner.v1.LearnerService
    port: 50052
    local_port: 8082
    endpoints: ["10.0.0.1:50052", "[fd00::2]:50052"]
"""


@pytest.fixture
def small_mesh() -> MeshSpec:
    return parse_mesh(MESH_YAML, "test.yaml")


# ==================================================================================================
# Endpoint, Snapshot, SnapshotStore
# ==================================================================================================


def test_endpoint_address_brackets_ipv6_and_parse_round_trips() -> None:
    assert Endpoint("10.0.0.5", 50051).address == "10.0.0.5:50051"
    assert Endpoint("::1", 50051).address == "[::1]:50051"
    assert Endpoint("[fd00::5]", 1).host == "fd00::5"
    assert Endpoint.parse("auth.test:50051") == Endpoint("auth.test", 50051)
    assert Endpoint.parse("[fd00::5]:50051") == Endpoint("fd00::5", 50051)
    assert Endpoint.parse("fd00::5", default_port=7) == Endpoint("fd00::5", 7)
    assert Endpoint.parse("auth.test", default_port=7).address == "auth.test:7"
    for bad in ("auth.test", "auth.test:x", "[fd00::5", "[::1]x", ":50051"):
        with pytest.raises(ValueError, match="endpoint"):
            Endpoint.parse(bad)
    for port in (0, 65536, True):
        with pytest.raises(ValueError, match="port"):
            Endpoint("h", port)
    with pytest.raises(ValueError, match="weight"):
        Endpoint("h", 1, weight=-1)


def test_endpoint_is_frozen_and_hashable_with_read_only_metadata() -> None:
    ep = Endpoint("h", 1, metadata={"b": "2", "a": "1"})
    assert list(ep.metadata) == ["a", "b"]
    assert hash(ep) == hash(Endpoint("h", 1, metadata={"a": "1", "b": "2"}))
    assert ep == Endpoint("h", 1, metadata={"a": "1", "b": "2"})
    with pytest.raises(TypeError):
        ep.metadata["c"] = "3"  # type: ignore[index]
    with pytest.raises(AttributeError):
        ep.port = 2  # type: ignore[misc]


def test_snapshot_version_is_a_hash_of_canonical_content() -> None:
    a, b = Endpoint("10.0.0.5", 1, metadata={"x": "1"}), Endpoint("10.0.0.6", 1)
    s1, s2 = Snapshot.of([a, b]), Snapshot.of([b, a, a])
    assert s1 == s2
    assert s1.version == s2.version
    assert len(s1) == 2
    assert s1.endpoints == (a, b)
    assert Snapshot.of([a]).version != s1.version
    assert Snapshot.of([Endpoint("10.0.0.5", 1), b]).version != s1.version  # metadata counts
    assert Snapshot.of([a, Endpoint("10.0.0.6", 1, weight=2)]).version != s1.version
    assert Snapshot.of([]).endpoints == ()
    assert len(s1.version) == 16
    mixed = Snapshot.of([Endpoint("h1", 1, healthy=False), Endpoint("h2", 1)])
    assert mixed.addresses == ("h2:1",)


async def test_store_publish_is_a_noop_when_unchanged_and_notifies_subscribers() -> None:
    store = SnapshotStore()
    seen: list[tuple[str, str]] = []
    unsubscribe = store.subscribe(lambda svc, snap: seen.append((svc, snap.version)))
    assert store.get("auth") is None
    assert store.publish("auth", [Endpoint("a", 1), Endpoint("b", 1)]) is True
    first = store.get("auth")
    assert first is not None
    assert store.publish("auth", [Endpoint("b", 1), Endpoint("a", 1)]) is False  # same set, other order
    assert store.get("auth") is first
    assert store.publish("auth", [Endpoint("a", 1)]) is True
    assert [v for _, v in seen] == [first.version, store.get("auth").version]  # type: ignore[union-attr]
    unsubscribe()
    store.publish("auth", [Endpoint("c", 1)])
    assert len(seen) == 2
    assert store.services() == ("auth",)


async def test_store_survives_a_failing_subscriber() -> None:
    store = SnapshotStore()

    def boom(service: str, snap: Snapshot) -> None:
        raise RuntimeError("subscriber bug")

    store.subscribe(boom)
    assert store.publish("auth", [Endpoint("a", 1)]) is True
    assert store.get("auth") is not None


async def test_newer_than_waits_for_a_real_change() -> None:
    store = SnapshotStore()
    store.publish("auth", [Endpoint("a", 1)])
    current = store.get("auth")
    assert current is not None
    assert await store.newer_than("auth", None, timeout=BOUND) is current  # anything: returns at once
    assert await store.newer_than("auth", "stale-version", timeout=BOUND) is current

    waiter = asyncio.create_task(store.newer_than("auth", current.version, timeout=BOUND))
    await asyncio.sleep(0)  # let it park
    store.publish("auth", [Endpoint("a", 1)])  # no change: must not wake it
    await asyncio.sleep(0)
    assert not waiter.done()
    store.publish("auth", [Endpoint("a", 1), Endpoint("b", 1)])
    newer = await asyncio.wait_for(waiter, BOUND)
    assert newer.version != current.version
    assert newer is store.get("auth")


async def test_newer_than_times_out_and_waits_for_a_first_snapshot() -> None:
    store = SnapshotStore()
    with pytest.raises(TimeoutError):
        await store.newer_than("auth", None, timeout=0.05)
    waiter = asyncio.create_task(store.newer_than("auth", None, timeout=BOUND))
    await asyncio.sleep(0)
    store.publish("auth", [])  # an empty set is a snapshot too
    assert (await waiter).endpoints == ()
    assert not store._waiters  # waiters clean up after themselves


async def test_publish_from_another_thread_wakes_the_loop() -> None:
    store = SnapshotStore()
    waiter = asyncio.create_task(store.newer_than("auth", None, timeout=BOUND))
    await asyncio.sleep(0)
    t = threading.Thread(target=store.publish, args=("auth", [Endpoint("a", 1)]))
    t.start()
    snap = await waiter
    t.join()
    assert snap.addresses == ("a:1",)


# ==================================================================================================
# small rules: back-off, token bucket, refresh delay, Consul index
# ==================================================================================================


def test_every_retry_waits_by_the_policy_back_off_with_its_documented_timings() -> None:
    """Discovery retries and restarts, Consul registration and the supervisor share policy/backoff.py's
    equal jitter (the first three jittered, the last two its exact ceiling)."""
    from aivo_mesh.policy.backoff import EqualJitter
    from aivo_mesh.runtime.mesh import RESTART_BACKOFF

    dns_source = DnsSource("auth.internal:50051", min_ttl=0.5, max_ttl=8.0)
    assert dns_source.backoff == EqualJitter(0.5, 8.0)
    assert [dns_source.backoff.ceiling(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert ConsulDiscovery().backoff == EqualJitter(0.5, 30.0)
    assert Discovery(SnapshotStore(), {}).restart_backoff == EqualJitter(1.0, 30.0)
    # Exact, unjittered: 0.5 s doubling to 30 s.
    for fixed in (REGISTER_BACKOFF, RESTART_BACKOFF):
        assert [fixed.ceiling(n) for n in (1, 2, 3, 7, 8, 50)] == [0.5, 1.0, 2.0, 30.0, 30.0, 30.0]
    with pytest.raises(ValueError, match="cap must be >= base"):
        ConsulDiscovery(backoff_base=2.0, backoff_max=1.0)


def test_token_bucket_allows_a_burst_then_paces() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=2, clock=lambda: now[0])
    assert bucket.take() == 0.0
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(0.5)
    now[0] = 10.0  # long idle: refills only up to the burst
    assert bucket.take() == 0.0
    assert bucket.take() == 0.0
    assert bucket.take() > 0
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(rate=0)


def test_refresh_delay_honours_ttl_within_clamps() -> None:
    assert refresh_delay(30, 5, 300) == 30
    assert refresh_delay(0, 5, 300) == 5
    assert refresh_delay(86_400, 5, 300) == 300


def test_next_index_follows_consul_rules() -> None:
    assert next_index(0, 7) == 7  # first answer
    assert next_index(7, 7) == 7  # wait elapsed, nothing changed
    assert next_index(7, 9) == 9
    assert next_index(9, 3) == 0  # went backwards: start over with a non-blocking read
    assert next_index(0, 0) == 1  # never send an index below 1


# ==================================================================================================
# static
# ==================================================================================================


async def test_static_endpoints_from_mesh_yaml(small_mesh: MeshSpec) -> None:
    assert static_endpoints(small_mesh.service("auth-svc")) == (Endpoint("auth.test", 50051),)
    assert static_endpoints(small_mesh.service("learner-svc")) == (
        Endpoint("10.0.0.1", 50052), Endpoint("fd00::2", 50052))

    discovery = build_discovery(small_mesh, "static")
    async with discovery:
        await discovery.wait_ready(timeout=BOUND)
    auth, learner = discovery.snapshot("auth-svc"), discovery.snapshot("learner-svc")
    assert auth is not None
    assert auth.addresses == ("auth.test:50051",)
    assert learner is not None
    assert learner.addresses == ("10.0.0.1:50052", "[fd00::2]:50052")
    assert not discovery.running  # static sources publish once and finish


async def test_repository_mesh_yaml_builds_in_every_mode(mesh: MeshSpec) -> None:
    for mode in ("static", "dns", "consul"):
        d = build_discovery(mesh, mode)
        assert set(d.sources) == set(mesh.service_names)
    with pytest.raises(ValueError, match="unknown discovery mode"):
        build_discovery(mesh, "zookeeper")
    only = build_discovery(mesh, "static", services=["auth-svc"])
    assert list(only.sources) == ["auth-svc"]


# ==================================================================================================
# DNS (FakeDnsServer)
# ==================================================================================================


@pytest.fixture
def dns_server() -> Iterator[FakeDnsServer]:
    with FakeDnsServer() as server:
        yield server


def _dns(server: FakeDnsServer, target: str, **kwargs: Any) -> DnsSource:
    opts: dict[str, Any] = {"nameservers": ["127.0.0.1"], "port": server.port, "timeout": 1.0,
                            "min_ttl": 0.05, "max_ttl": 0.2}
    opts.update(kwargs)
    return DnsSource(target, **opts)


def test_dns_target_parsing() -> None:
    assert DnsTarget.parse("auth.test:50051") == DnsTarget("auth.test", 50051, False)
    assert DnsTarget.parse("auth.test", 7) == DnsTarget("auth.test", 7, False)
    assert DnsTarget.parse("[fd00::1]:9") == DnsTarget("fd00::1", 9, False)
    assert DnsTarget.parse("_grpc._tcp.auth.test") == DnsTarget("_grpc._tcp.auth.test", None, True)
    assert DnsTarget.parse("10.0.0.1:1").literal
    assert not DnsTarget.parse("a.test:1").literal
    with pytest.raises(ValueError, match="host:port"):
        DnsTarget.parse("auth.test")


async def test_dns_a_and_aaaa(dns_server: FakeDnsServer) -> None:
    dns_server.set("auth.test.", "A", ["10.0.0.5", "10.0.0.6"], ttl=42)
    dns_server.set("auth.test.", "AAAA", ["fd00::5"], ttl=30)
    endpoints, ttl = await _dns(dns_server, "auth.test:50051").resolve()
    assert sorted(e.address for e in endpoints) == ["10.0.0.5:50051", "10.0.0.6:50051", "[fd00::5]:50051"]
    assert ttl == 30  # the smallest TTL of the answers
    # Only A records: the missing AAAA (NODATA) is not an error.
    dns_server.delete("auth.test.", "AAAA")
    endpoints, ttl = await _dns(dns_server, "auth.test", default_port=9).resolve()
    assert sorted(e.address for e in endpoints) == ["10.0.0.5:9", "10.0.0.6:9"]
    assert ttl == 42


async def test_dns_srv_uses_glue_lowest_priority_and_weights(dns_server: FakeDnsServer) -> None:
    dns_server.set_srv("_grpc._tcp.auth.test.", [
        (10, 5, 50051, "a1.test."), (10, 0, 50061, "a2.test."), (20, 9, 50071, "backup.test."),
    ], ttl=20)
    dns_server.set("a1.test.", "A", ["10.1.0.1"], ttl=60)
    dns_server.set("a2.test.", "AAAA", ["fd00::2"], ttl=10)
    dns_server.set("backup.test.", "A", ["10.9.0.1"])
    source = _dns(dns_server, "_grpc._tcp.auth.test")
    endpoints, ttl = await source.resolve()
    by_addr = {e.address: e for e in endpoints}
    assert set(by_addr) == {"10.1.0.1:50051", "[fd00::2]:50061"}  # priority 20 is only a fallback
    assert by_addr["10.1.0.1:50051"].weight == 5
    assert by_addr["[fd00::2]:50061"].weight == 1  # weight 0 counts as 1
    assert by_addr["10.1.0.1:50051"].metadata["srv_target"] == "a1.test."
    assert ttl == 10
    queries_with_glue = len(dns_server.queries)
    assert queries_with_glue == 1  # everything came in one answer

    dns_server.glue = False  # a server that sends no additional section: targets are looked up
    endpoints2, _ = await source.resolve()
    assert set(endpoints2) == set(endpoints)
    assert ("a1.test.", "A") in dns_server.queries[queries_with_glue:]


async def test_dns_a_answer_survives_a_dropped_aaaa_query(dns_server: FakeDnsServer) -> None:
    """A resolver or middlebox that drops AAAA queries makes that query time out: the A answer must
    still be used. Only when no query type gives an address is the lookup a failure."""
    dns_server.set("auth.test.", "A", ["10.0.0.5"])
    dns_server.drop_types = {"AAAA"}
    endpoints, _ = await _dns(dns_server, "auth.test:50051", timeout=0.3).resolve()
    assert [e.address for e in endpoints] == ["10.0.0.5:50051"]
    dns_server.drop_types = {"A", "AAAA"}
    with pytest.raises(dns.exception.Timeout):
        await _dns(dns_server, "auth.test:50051", timeout=0.3).resolve()


async def test_dns_srv_falls_back_to_the_next_priority_when_no_target_resolves(dns_server: FakeDnsServer) -> None:
    """RFC 2782: a higher priority is the fallback for when the lower one's targets are unreachable."""
    dns_server.set_srv("_grpc._tcp.auth.test.", [(10, 1, 50051, "gone.test."), (20, 1, 50071, "backup.test.")])
    dns_server.set("backup.test.", "A", ["10.9.0.1"])
    endpoints, _ = await _dns(dns_server, "_grpc._tcp.auth.test").resolve()
    assert [e.address for e in endpoints] == ["10.9.0.1:50071"]
    dns_server.set("gone.test.", "A", ["10.1.0.1"])  # the preferred target is back
    endpoints, _ = await _dns(dns_server, "_grpc._tcp.auth.test").resolve()
    assert [e.address for e in endpoints] == ["10.1.0.1:50051"]


async def test_dns_srv_target_dot_means_unavailable(dns_server: FakeDnsServer) -> None:
    dns_server.set_srv("_grpc._tcp.gone.test.", [(0, 0, 0, ".")])
    store = SnapshotStore()
    source = _dns(dns_server, "_grpc._tcp.gone.test")
    with pytest.raises(Exception, match="unavailable"):
        await source.resolve()
    task = asyncio.create_task(source.watch("gone", store))
    try:
        assert await asyncio.to_thread(dns_server.wait_for_queries, 3, BOUND)
        assert store.get("gone") is None
    finally:
        task.cancel()


async def test_dns_watch_re_resolves_on_ttl_and_picks_up_a_change(dns_server: FakeDnsServer) -> None:
    dns_server.set("auth.test.", "A", ["10.0.0.5"], ttl=1)
    store = SnapshotStore()
    task = asyncio.create_task(_dns(dns_server, "auth.test:50051", record_types=["A"]).watch("auth-svc", store))
    try:
        first = await store.newer_than("auth-svc", None, timeout=BOUND)
        assert first.addresses == ("10.0.0.5:50051",)
        dns_server.set("auth.test.", "A", ["10.0.0.5", "10.0.0.7"], ttl=1)
        second = await store.newer_than("auth-svc", first.version, timeout=BOUND)
        assert second.addresses == ("10.0.0.5:50051", "10.0.0.7:50051")
    finally:
        task.cancel()


async def test_dns_errors_keep_the_last_good_snapshot(dns_server: FakeDnsServer) -> None:
    dns_server.set("auth.test.", "A", ["10.0.0.5"], ttl=0)
    store = SnapshotStore()
    published: list[str] = []
    store.subscribe(lambda _s, snap: published.append(snap.version))
    task = asyncio.create_task(_dns(dns_server, "auth.test:50051", record_types=["A"]).watch("auth-svc", store))
    try:
        good = await store.newer_than("auth-svc", None, timeout=BOUND)
        # SERVFAIL, then NXDOMAIN: several failed rounds, the snapshot stays.
        dns_server.rcode = dns.rcode.SERVFAIL
        n = len(dns_server.queries)
        assert await asyncio.to_thread(dns_server.wait_for_queries, n + 3, BOUND)
        dns_server.rcode = None
        dns_server.delete("auth.test.")
        n = len(dns_server.queries)
        assert await asyncio.to_thread(dns_server.wait_for_queries, n + 2, BOUND)
        assert store.get("auth-svc") is good
        assert published == [good.version]
        # Recovery: the next good answer is published.
        dns_server.set("auth.test.", "A", ["10.0.0.8"], ttl=0)
        recovered = await store.newer_than("auth-svc", good.version, timeout=BOUND)
        assert recovered.addresses == ("10.0.0.8:50051",)
    finally:
        task.cancel()


async def test_dns_ip_literal_needs_no_lookup(dns_server: FakeDnsServer) -> None:
    store = SnapshotStore()
    await asyncio.wait_for(_dns(dns_server, "[::1]:50051").watch("svc", store), BOUND)  # returns
    snap = store.get("svc")
    assert snap is not None
    assert snap.addresses == ("[::1]:50051",)
    assert dns_server.queries == []


async def test_build_discovery_dns_mode(dns_server: FakeDnsServer, small_mesh: MeshSpec) -> None:
    dns_server.set("auth-svc.default.test.", "A", ["10.0.0.5"])
    dns_server.set("learner.test.", "A", ["10.0.0.6"])
    opts = DnsOptions(nameservers=("127.0.0.1",), port=dns_server.port, template="{name}.{namespace}.test:{port}",
                      targets={"learner-svc": "learner.test:7000"}, min_ttl=0.05, max_ttl=0.2, timeout=1.0)
    async with build_discovery(small_mesh, "dns", dns=opts) as discovery:
        await discovery.wait_ready(timeout=BOUND)
        assert discovery.snapshot("auth-svc").addresses == ("10.0.0.5:50051",)  # type: ignore[union-attr]
        assert discovery.snapshot("learner-svc").addresses == ("10.0.0.6:7000",)  # type: ignore[union-attr]


async def test_wait_ready_names_services_without_endpoints(dns_server: FakeDnsServer, small_mesh: MeshSpec) -> None:
    dns_server.set("auth.test.", "A", ["10.0.0.5"])
    opts = DnsOptions(nameservers=("127.0.0.1",), port=dns_server.port, min_ttl=0.05, max_ttl=0.2, timeout=1.0,
                      targets={"learner-svc": "nowhere.test:1"})
    async with build_discovery(small_mesh, "dns", dns=opts) as discovery:
        with pytest.raises(DiscoveryNotReady, match="learner-svc") as err:
            await discovery.wait_ready(timeout=0.3)
        assert err.value.missing == ("learner-svc",)


# ==================================================================================================
# the facade's supervision
# ==================================================================================================


async def test_discovery_restarts_a_crashing_source() -> None:
    class Flaky:
        calls = 0

        async def watch(self, service: str, store: SnapshotStore) -> None:
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("bug in a source")
            store.publish(service, [Endpoint("a", 1)])
            await asyncio.Event().wait()

    discovery = Discovery(SnapshotStore(), {"auth": Flaky(), "static": StaticSource(["b:2"])},
                          restart_base=0.01, restart_max=0.02)
    await discovery.start()
    try:
        await discovery.wait_ready(timeout=BOUND)
        assert Flaky.calls == 2
        assert discovery.running
    finally:
        await discovery.stop()
    assert not discovery.running
    assert discovery.snapshot("auth") is not None


# ==================================================================================================
# Consul: the registration JSON (pure)
# ==================================================================================================


def test_agent_service_definition_exact_consul_json(small_mesh: MeshSpec) -> None:
    assert agent_service_definition(small_mesh, "auth-svc", "10.0.0.5", 50051) == {
        "ID": "auth-svc-10.0.0.5-50051",
        "Name": "auth-svc",
        "Tags": ["auth", "tier-1"],
        "Address": "10.0.0.5",
        "Port": 50051,
        "Meta": {"version": "1.4.2", "team": "identity"},
        "Check": {
            "Name": "auth-svc gRPC health",
            "GRPC": "10.0.0.5:50051/aivo.auth.v1.AuthService",
            "GRPCUseTLS": True,
            "TLSServerName": "auth-svc",
            "TLSSkipVerify": False,
            "Interval": "30s",  # the service's health_check.interval
            "Timeout": "2s",  # the mesh default's health_check.timeout (layered)
            "DeregisterCriticalServiceAfter": "1m",
        },
    }


def test_agent_service_definition_options_and_validation(small_mesh: MeshSpec) -> None:
    d = agent_service_definition(small_mesh, small_mesh.service("learner-svc"), "fd00::2", 50052,
                                 check_interval="500ms", check_timeout=0.25, deregister_critical_after="90m",
                                 tls_server_name="learner.mesh.local")
    assert d["ID"] == "learner-svc-fd00-2-50052"
    assert d["Address"] == "fd00::2"
    assert d["Check"]["GRPC"] == "[fd00::2]:50052/aivo.learner.v1.LearnerService"
    assert d["Check"]["TLSServerName"] == "learner.mesh.local"
    assert (d["Check"]["Interval"], d["Check"]["Timeout"]) == ("500ms", "250ms")
    assert d["Check"]["DeregisterCriticalServiceAfter"] == "90m"
    assert d["Meta"] == {"version": "1.0.0"}
    assert d["Tags"] == []
    plain = agent_service_definition(small_mesh, "auth-svc", "127.0.0.1", 50051, use_tls=False)
    assert plain["Check"]["GRPCUseTLS"] is False
    assert "TLSServerName" not in plain["Check"]
    assert "TLSSkipVerify" not in plain["Check"]

    with pytest.raises(ValueError, match="at least 1m"):
        agent_service_definition(small_mesh, "auth-svc", "10.0.0.5", 50051, deregister_critical_after="30s")
    with pytest.raises(ValueError, match="port"):
        agent_service_definition(small_mesh, "auth-svc", "10.0.0.5", 0)
    with pytest.raises(KeyError):
        agent_service_definition(small_mesh, "nope", "10.0.0.5", 1)
    # mesh.yaml with such a key is refused where it is written; a spec built without validation still
    # fails here, before any I/O.
    with pytest.raises(ConfigError, match=r"services\[0\]\.metadata\.consul-team: .*Consul Meta key"):
        parse_mesh(MESH_YAML.replace("{team: identity}", "{consul-team: x}"))
    auth = small_mesh.service("auth-svc").model_copy(update={"metadata": {"consul-team": "x"}})
    with pytest.raises(ValueError, match="Meta key"):
        agent_service_definition(small_mesh, auth, "10.0.0.5", 50051)
    assert service_id("auth-svc", "[::1]", 1) == "auth-svc--1-1"
    assert [go_duration(s) for s in (30, 60, 90, 3600, 0.1)] == ["30s", "1m", "90s", "1h", "100ms"]


def test_endpoints_from_health_follows_consul_fields() -> None:
    entries = [
        {"Node": {"Node": "n1", "Address": "10.0.0.1"},
         "Service": {"ID": "a-1", "Address": "", "Port": 50051, "Meta": {"version": "2"},
                     "Weights": {"Passing": 3, "Warning": 1}},
         "Checks": [{"Status": "passing"}, {"Status": "passing"}]},
        {"Node": {"Node": "n2", "Address": "10.0.0.2"},
         "Service": {"ID": "a-2", "Address": "10.0.0.22", "Port": 50051, "Weights": {"Passing": 3, "Warning": 1}},
         "Checks": [{"Status": "passing"}, {"Status": "warning"}]},
        {"Node": {"Node": "n3", "Address": "10.0.0.3"}, "Service": {"ID": "bad", "Port": 0}, "Checks": []},
    ]
    a1, a2 = endpoints_from_health(entries)
    assert a1 == Endpoint("10.0.0.1", 50051, weight=3, healthy=True,
                          metadata={"version": "2", "consul_id": "a-1", "consul_node": "n1"})
    assert (a2.host, a2.weight, a2.healthy) == ("10.0.0.22", 1, False)
    assert endpoints_from_health(None) == ()


# ==================================================================================================
# Consul: registration and watches against FakeConsulAgent
# ==================================================================================================


@pytest.fixture
def consul_agent() -> Iterator[FakeConsulAgent]:
    with FakeConsulAgent() as agent:
        yield agent


def _consul(agent: FakeConsulAgent, **kwargs: Any) -> ConsulDiscovery:
    opts: dict[str, Any] = {"wait": "1s", "rate": 200.0, "burst": 5, "backoff_base": 0.02, "backoff_max": 0.1}
    opts.update(kwargs)
    return ConsulDiscovery(agent.address, **opts)


@pytest.fixture
async def watching(consul_agent: FakeConsulAgent) -> AsyncIterator[tuple[SnapshotStore, list[asyncio.Task[None]]]]:
    """A store and a list the test appends watch tasks to; the tasks are cancelled afterwards."""
    store, tasks = SnapshotStore(), list[asyncio.Task[None]]()
    yield store, tasks
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _health_requests(agent: FakeConsulAgent, service: str) -> list[RequestRecord]:
    return agent.requests_to(f"/v1/health/service/{service}")


def _parked(service: str) -> Any:
    """Predicate: the watch's latest query is a blocking one that the agent is holding."""
    def parked(agent: FakeConsulAgent) -> bool:
        health = _health_requests(agent, service)
        return bool(health) and health[-1].status == 0 and health[-1].param("index") is not None
    return parked


async def _until(agent: FakeConsulAgent, predicate: Any) -> None:
    assert await asyncio.to_thread(agent.wait_until, predicate, BOUND), "condition not met in time"


async def test_register_and_deregister_send_the_exact_definition(
        consul_agent: FakeConsulAgent, small_mesh: MeshSpec) -> None:
    reg = ConsulRegistration(consul_agent.address)
    sid = await reg.register(small_mesh, "auth-svc", address="10.0.0.5", port=50051)
    assert sid == "auth-svc-10.0.0.5-50051"
    assert consul_agent.registrations[sid] == agent_service_definition(small_mesh, "auth-svc", "10.0.0.5", 50051)
    assert consul_agent.register_params[sid] == {"replace-existing-checks": ["true"]}
    listed = await reg.agent_services()
    assert listed[sid]["Service"] == "auth-svc"
    assert listed[sid]["Port"] == 50051
    assert reg.registered == [sid]

    assert await reg.deregister(sid) is True
    assert sid not in consul_agent.registrations
    assert consul_agent.requests_to(f"/v1/agent/service/deregister/{sid}", "PUT")[0].status == 200
    assert await reg.deregister(sid) is False  # 404 Unknown service ID
    assert reg.registered == []


async def test_registration_errors_raise_consul_error(consul_agent: FakeConsulAgent, small_mesh: MeshSpec) -> None:
    reg = ConsulRegistration(consul_agent.address)
    consul_agent.fail_next(1, status=500, path_prefix="/v1/agent/service/register")
    with pytest.raises(ConsulError, match=r"register auth-svc-10\.0\.0\.5-50051 failed"):
        await reg.register(small_mesh, "auth-svc", address="10.0.0.5", port=50051)
    closed = FakeConsulAgent().start()
    address = closed.address
    closed.stop()
    with pytest.raises(ConsulError, match="ConnectionError"):
        await ConsulRegistration(address, timeout=1.0).register(small_mesh, "auth-svc", address="h", port=1)


async def test_token_is_sent_and_required(small_mesh: MeshSpec) -> None:
    with FakeConsulAgent(acl_token="s3cret") as agent:
        with pytest.raises(ConsulError, match="Permission denied"):
            await ConsulRegistration(agent.address).register(small_mesh, "auth-svc", address="h", port=1)
        reg = ConsulRegistration(agent.address, token="s3cret")
        sid = await reg.register(small_mesh, "auth-svc", address="h", port=1)
        agent.set_check_status(sid, "passing")
        _, endpoints = await _consul(agent, token="s3cret", datacenter="dc1").query("auth-svc")
        assert [e.address for e in endpoints] == ["h:1"]
        assert all(r.token == "s3cret" for r in agent.requests if r.status == 200)


async def test_watch_picks_up_newly_passing_and_removed_instances(
        consul_agent: FakeConsulAgent, small_mesh: MeshSpec,
        watching: tuple[SnapshotStore, list[asyncio.Task[None]]]) -> None:
    store, tasks = watching
    reg = ConsulRegistration(consul_agent.address)
    sid = await reg.register(small_mesh, "auth-svc", address="127.0.0.1", port=50051)  # check starts critical
    tasks.append(asyncio.create_task(_consul(consul_agent).watch("auth-svc", store)))

    empty = await store.newer_than("auth-svc", None, timeout=BOUND)
    assert empty.endpoints == ()  # registered, but not passing yet

    consul_agent.set_check_status(sid, "passing")
    one = await store.newer_than("auth-svc", empty.version, timeout=BOUND)
    assert one.addresses == ("127.0.0.1:50051",)
    assert one.endpoints[0].metadata["version"] == "1.4.2"

    other = consul_agent.add_instance("auth-svc", "10.0.0.9", 50051)
    two = await store.newer_than("auth-svc", one.version, timeout=BOUND)
    assert two.addresses == ("10.0.0.9:50051", "127.0.0.1:50051")

    consul_agent.set_check_status(other, "critical")  # failing instances are filtered out (passing=1)
    back = await store.newer_than("auth-svc", two.version, timeout=BOUND)
    assert back.addresses == ("127.0.0.1:50051",)

    await reg.deregister(sid)
    gone = await store.newer_than("auth-svc", back.version, timeout=BOUND)
    assert gone.endpoints == ()

    # After the first read every query was a blocking one: index + wait, never an index below 1.
    health = _health_requests(consul_agent, "auth-svc")
    assert health[0].param("index") is None
    assert health[0].param("passing") == "1"
    assert all(r.param("wait") == "1s" and int(r.param("index") or 0) >= 1 for r in health[1:])


async def test_watch_ignores_returns_without_change(
        consul_agent: FakeConsulAgent, watching: tuple[SnapshotStore, list[asyncio.Task[None]]]) -> None:
    store, tasks = watching
    consul_agent.add_instance("auth-svc", "10.0.0.9", 50051)
    versions: list[str] = []
    store.subscribe(lambda _s, snap: versions.append(snap.version))
    tasks.append(asyncio.create_task(_consul(consul_agent, wait="50ms").watch("auth-svc", store)))
    # Several blocking queries time out (wait elapsed, same index): one snapshot, published once.
    await _until(consul_agent, lambda a: len(_health_requests(a, "auth-svc")) >= 5)
    assert len(versions) == 1
    # A change to another service does not disturb this one either.
    consul_agent.add_instance("learner-svc", "10.0.0.10", 50052)
    n = len(_health_requests(consul_agent, "auth-svc"))
    await _until(consul_agent, lambda a: len(_health_requests(a, "auth-svc")) >= n + 2)
    assert len(versions) == 1


async def test_watch_resets_the_index_when_it_goes_backwards(
        consul_agent: FakeConsulAgent, watching: tuple[SnapshotStore, list[asyncio.Task[None]]]) -> None:
    store, tasks = watching
    for _ in range(5):  # move the index well above 1
        consul_agent.add_instance("other", "10.0.0.1", 1)
    sid = consul_agent.add_instance("auth-svc", "10.0.0.9", 50051)
    tasks.append(asyncio.create_task(_consul(consul_agent, wait="200ms").watch("auth-svc", store)))
    first = await store.newer_than("auth-svc", None, timeout=BOUND)
    high = consul_agent.service_index("auth-svc")
    await _until(consul_agent, lambda a: any(r.param("index") == str(high) for r in _health_requests(a, "auth-svc")))

    consul_agent.reset_index(2)  # e.g. a snapshot restore: the index goes backwards
    n = len(_health_requests(consul_agent, "auth-svc"))
    # The held query times out with index 2 < high; the watch starts over with a non-blocking read...
    await _until(consul_agent, lambda a: any(r.param("index") is None for r in _health_requests(a, "auth-svc")[n:]))
    # ...then blocks again from the new, lower index, and still sees changes.
    await _until(consul_agent, lambda a: any(r.param("index") == "2" for r in _health_requests(a, "auth-svc")[n:]))
    consul_agent.set_check_status(sid, "critical")
    changed = await store.newer_than("auth-svc", first.version, timeout=BOUND)
    assert changed.endpoints == ()


async def test_watch_backs_off_on_agent_errors_and_keeps_the_last_good_snapshot(
        consul_agent: FakeConsulAgent, watching: tuple[SnapshotStore, list[asyncio.Task[None]]]) -> None:
    store, tasks = watching
    sid = consul_agent.add_instance("auth-svc", "10.0.0.9", 50051)
    consul_agent.fail_next(3, status=500)  # the agent is unwell from the start
    tasks.append(asyncio.create_task(_consul(consul_agent).watch("auth-svc", store)))
    good = await store.newer_than("auth-svc", None, timeout=BOUND)
    statuses = [r.status for r in _health_requests(consul_agent, "auth-svc")]
    assert statuses[:4] == [500, 500, 500, 200]

    # Now: a change arrives, then the agent fails again (500s, then a 403) and comes back.
    await _until(consul_agent, _parked("auth-svc"))
    consul_agent.fail_next(2, status=500)
    consul_agent.fail_next(1, status=403, body="Permission denied")
    consul_agent.add_instance("auth-svc", "10.0.0.10", 50051)  # wakes the held query: published
    two = await store.newer_than("auth-svc", good.version, timeout=BOUND)
    await _until(consul_agent, lambda a: [r.status for r in _health_requests(a, "auth-svc")][-4:] == [
        500, 500, 403, 0])  # 0: the retry after the errors is being held by the agent
    assert store.get("auth-svc") is two  # errors never touched the store
    # The retry kept the index: it is a blocking query again, not a full re-read.
    last = _health_requests(consul_agent, "auth-svc")[-1]
    assert last.param("index") == str(consul_agent.service_index("auth-svc"))

    consul_agent.set_check_status(sid, "critical")
    after = await store.newer_than("auth-svc", two.version, timeout=BOUND)
    assert after.addresses == ("10.0.0.10:50051",)


async def test_watch_survives_an_agent_that_is_down(small_mesh: MeshSpec) -> None:
    agent = FakeConsulAgent().start()
    address = agent.address
    agent.stop()  # nothing listens there any more
    store = SnapshotStore()
    source = ConsulDiscovery(address, wait="1s", rate=200, backoff_base=0.01, backoff_max=0.02, connect_timeout=1)
    task = asyncio.create_task(source.watch("auth-svc", store))
    with pytest.raises(TimeoutError):
        await store.newer_than("auth-svc", None, timeout=0.3)
    assert not task.done()  # still retrying
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_wrong_datacenter_is_an_error_not_an_empty_service(
        consul_agent: FakeConsulAgent, watching: tuple[SnapshotStore, list[asyncio.Task[None]]]) -> None:
    store, tasks = watching
    consul_agent.add_instance("auth-svc", "10.0.0.9", 50051)
    tasks.append(asyncio.create_task(_consul(consul_agent, datacenter="dc9").watch("auth-svc", store)))
    await _until(consul_agent, lambda a: len(_health_requests(a, "auth-svc")) >= 3)
    assert all(r.status == 500 and r.param("dc") == "dc9" for r in _health_requests(consul_agent, "auth-svc"))
    assert store.get("auth-svc") is None


async def test_build_discovery_consul_mode(consul_agent: FakeConsulAgent, small_mesh: MeshSpec) -> None:
    reg = ConsulRegistration(consul_agent.address)
    for name, port in (("auth-svc", 50051), ("learner-svc", 50052)):
        consul_agent.set_check_status(await reg.register(small_mesh, name, address="127.0.0.1", port=port), "passing")
    async with build_discovery(small_mesh, "consul", consul=_consul(consul_agent)) as discovery:
        await discovery.wait_ready(timeout=BOUND)
        assert discovery.snapshot("auth-svc").addresses == ("127.0.0.1:50051",)  # type: ignore[union-attr]
        assert discovery.snapshot("learner-svc").addresses == ("127.0.0.1:50052",)  # type: ignore[union-attr]
        before = discovery.snapshot("auth-svc")
        assert before is not None
        await reg.deregister_all()
        after = await discovery.store.newer_than("auth-svc", before.version, timeout=BOUND)
    assert after.endpoints == ()
    assert discovery.snapshot("auth-svc") is after


async def test_a_served_service_finds_its_peer_through_consul(consul_agent: FakeConsulAgent, mesh_certs: Any,
                                                              tmp_path: Any) -> None:
    """`meshctl serve --discovery consul`, in process: auth-svc registers itself in the (fake) agent;
    learner-svc reaches it at the registered port once its check passes, though mesh.yaml names a port
    where nothing listens. Before the check passes, the passing-only watch gives learner nothing."""
    from waiting import until

    from aivo_mesh import MeshClient, MeshConfig
    from aivo_mesh.config import load_mesh
    from aivo_mesh.runtime.local import free_ports, with_free_ports
    from aivo_mesh.runtime.serve import ServeOptions, serve_service
    from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc, learner_pb2, learner_pb2_grpc

    mesh = with_free_ports(load_mesh(MESH_FILE))
    (auth_port,) = free_ports(1)  # where auth really serves; mesh.yaml's auth port stays dead
    stops = {"auth-svc": asyncio.Event(), "learner-svc": asyncio.Event()}
    tasks = [asyncio.create_task(serve_service(mesh, "auth-svc", mesh_certs, tmp_path / "auth",
                                               ServeOptions(port=auth_port, consul=consul_agent.address, grace=0),
                                               stop=stops["auth-svc"]))]
    try:
        await until(lambda: bool(consul_agent.registrations), 10, "auth-svc registered in Consul")
        tasks.append(asyncio.create_task(serve_service(
            mesh, "learner-svc", mesh_certs, tmp_path / "learner",
            ServeOptions(grace=0, discovery="consul", consul_discovery=consul_agent.address),
            stop=stops["learner-svc"])))
        config = MeshConfig.for_identity("mesh-client", mesh_certs, mesh,
                                         endpoints={"auth-svc": [f"127.0.0.1:{auth_port}"]})
        async with MeshClient(config, health_checks=False) as client:
            await client.wait_ready("learner-svc", timeout=10)
            token = (await auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc")).Authenticate(
                auth_pb2.AuthenticateRequest(learner_id="ada", password="x" * 8), timeout=5)).token
            # A bare channel: the learner's answers while auth is unreachable must not open this test
            # client's own breaker for learner-svc.
            learner = learner_pb2_grpc.LearnerServiceStub(client.bare_channel("learner-svc"))
            bearer = (("authorization", f"Bearer {token}"),)
            with pytest.raises(grpc.aio.AioRpcError) as early:  # auth's check is critical: not reachable
                await learner.GetProfile(learner_pb2.GetProfileRequest(learner_id="ada"), metadata=bearer,
                                         timeout=5)
            assert early.value.code() == grpc.StatusCode.UNAVAILABLE
            consul_agent.set_check_status(next(iter(consul_agent.registrations)), "passing")
            profile = None
            deadline = asyncio.get_running_loop().time() + 15  # the watch sees it within a blocking query
            while profile is None and asyncio.get_running_loop().time() < deadline:
                try:
                    profile = await learner.GetProfile(learner_pb2.GetProfileRequest(learner_id="ada"),
                                                       metadata=bearer, timeout=5)
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)
            assert profile is not None and profile.learner_id == "ada"
    finally:
        for stop in stops.values():
            stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_served_service_keeps_trying_to_register_while_the_agent_fails(
        consul_agent: FakeConsulAgent, mesh_certs: Any, tmp_path: Any) -> None:
    """An agent that answers errors for a while (restarting) does not keep the service from starting:
    it serves at once and registers once the agent answers; it deregisters on stop."""
    from waiting import until

    from aivo_mesh import MeshClient, MeshConfig
    from aivo_mesh.config import load_mesh
    from aivo_mesh.runtime.local import with_free_ports
    from aivo_mesh.runtime.serve import ServeOptions, serve_service

    mesh = with_free_ports(load_mesh(MESH_FILE))
    consul_agent.fail_next(2, 500, path_prefix="/v1/agent/service/register")
    stop = asyncio.Event()
    task = asyncio.create_task(serve_service(mesh, "auth-svc", mesh_certs, tmp_path / "auth",
                                             ServeOptions(consul=consul_agent.address, grace=0), stop=stop))
    try:
        async with MeshClient(MeshConfig.for_identity("mesh-client", mesh_certs, mesh), health_checks=False) as c:
            await c.wait_ready("auth-svc", timeout=10)  # serving while the agent still fails
        await until(lambda: bool(consul_agent.registrations), 10, "registered after the agent recovered")
        (sid,) = consul_agent.registrations
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
    assert sid not in consul_agent.registrations  # deregistered on stop


async def test_a_register_applied_but_unanswered_at_stop_is_still_deregistered(consul_agent: FakeConsulAgent) -> None:
    """Stop arriving while a register is on the wire (the agent applied it, its answer is on the way)
    must not leave the instance behind: close() lets the answer arrive, then deregisters."""
    from waiting import until

    from aivo_mesh.config import load_mesh
    from aivo_mesh.discovery.consul_register import BackgroundRegistration, ConsulRegistration

    release = consul_agent.hold_answers("/v1/agent/service/register")
    reg = BackgroundRegistration(ConsulRegistration(consul_agent.address), load_mesh(MESH_FILE), "auth-svc",
                                 address="127.0.0.1", port=50051, settle=10)
    reg.start()
    try:
        await until(lambda: reg.service_id in consul_agent.registrations, 10, "register applied by the agent")
        assert not reg.registered  # its answer is held
        closing = asyncio.create_task(reg.close())
        await asyncio.sleep(0)  # let close() reach its wait on the attempt before the answer arrives
        release.set()
        await asyncio.wait_for(closing, 10)
    finally:
        release.set()
    assert reg.service_id not in consul_agent.registrations
    assert consul_agent.requests_to(f"/v1/agent/service/deregister/{reg.service_id}", "PUT")


async def test_closing_a_registration_that_never_reached_the_agent_sends_nothing(consul_agent: FakeConsulAgent) -> None:
    from aivo_mesh.config import load_mesh
    from aivo_mesh.discovery.consul_register import BackgroundRegistration, ConsulRegistration

    reg = BackgroundRegistration(ConsulRegistration(consul_agent.address), load_mesh(MESH_FILE), "auth-svc",
                                 address="127.0.0.1", port=50051)
    await reg.close()  # never started
    assert consul_agent.requests == []
