"""One control plane, a mixed mesh: two services on the sidecar plane, two on the proxyless plane, calling
across planes, and twenty live changes under steady traffic, each seen in behaviour on both planes.

    sidecar plane    auth-svc             its app (instance a) behind a real Envoy 1.40 taking its
                                          configuration over ADS; instance b (an mTLS server with
                                          auth-svc's certificate) added and removed by mesh.yaml endpoints
                     analytics-svc        its Envoy, likewise; the test plays its app, calling through the
                                          Envoy's outbound listener
    proxyless plane  learner-svc          a MeshServer and a MeshClient in this process, on the control
                                          plane by a ProxylessNode (what `meshctl serve --control-plane` runs)
                     event-collector-svc  likewise (its MeshClient calls nobody); a second instance ec-b,
                                          a MeshServer off the control plane, added and removed as b is

The control plane lists the proxyless services as `direct`: every node reaches them at their own address,
analytics-svc's Envoy included. Calls, all over mTLS (raw bytes: test_control_plane.Apps and
test_xds_grpc_client.Instance say what each payload does):

    analytics-svc's Envoy  -> auth-svc's Envoy inbound -> its app      sidecar   -> sidecar
    analytics-svc's Envoy  -> learner-svc's MeshServer                  sidecar   -> proxyless
    analytics-svc's Envoy  -> event-collector-svc's MeshServer          sidecar   -> proxyless
    learner-svc's MeshClient -> auth-svc's Envoy inbound -> its app    proxyless -> sidecar
    learner-svc's MeshClient -> event-collector-svc's MeshServer       proxyless -> proxyless

Steady traffic runs on all five for the whole test and must not fail once. Each change goes through
`ControlPlane.apply` (what `meshctl apply` posts), whose report must name all four nodes (two sidecars,
two proxyless processes) as having ACKed it; the next calls then show it on both planes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
import pytest
from binaries import needs
from test_control_plane import (
    AUTHENTICATE,
    Sidecars,
    Traffic,
    _raw,
    _service,
    apply,
    base_doc,
    running,
    sidecars,
    start_control_plane,
    start_envoys,
    until_answered_by,
)
from test_xds_grpc_client import COLLECT, EVENTS, Instance, start_instance
from waiting import until

from aivo_mesh.client import MeshClient, MeshConfig
from aivo_mesh.runtime.status import envoy_hosts
from aivo_mesh.xds.node import ProxylessNode, apply_to

pytestmark = [needs("envoy"), pytest.mark.slow]

SIDECARS = ("analytics-svc", "auth-svc")
PROXYLESS = ("learner-svc", "event-collector-svc")
LEARNER = "aivo.learner.v1.LearnerService"
GET_PROFILE = f"/{LEARNER}/GetProfile"
UPDATE_PROFILE = f"/{LEARNER}/UpdateProfile"
# ValidateToken's and Collect's route deadline (seconds), and what a change shortens it to: long enough that
# no steady call comes near it on a busy 2-core machine (one event loop serves every app, server and client
# here), short enough that a cut slow call ends well before the old deadline.
DEADLINE = 10.0
SHORT = 2.5
SLOW = b"slow:6000"  # answered within DEADLINE, cut at SHORT

Raw: TypeAlias = "grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]"


def mixed_doc() -> dict[str, Any]:
    """The repository's mesh.yaml with one route per called service easy to observe (ValidateToken as in
    test_control_plane, Collect alike: DEADLINE, two retries of UNAVAILABLE), analytics-svc allowed
    to call Collect, and one allow rule at each of auth-svc and learner-svc that a change can remove while
    the steady calls stay allowed."""
    doc = base_doc()
    auth = _service(doc, "auth-svc")
    auth["routes"][0]["timeout"] = auth["routes"][0]["retry"]["per_try_timeout"] = f"{DEADLINE:g}s"
    auth["allow"].append({"from": ["learner-svc", "analytics-svc"], "methods": [AUTHENTICATE]})
    events = _service(doc, "event-collector-svc")
    events["routes"] = [{"match": COLLECT, "timeout": f"{DEADLINE:g}s", "idempotent": True,
                         "retry": {"max_retries": 2, "retry_on": ["UNAVAILABLE"], "per_try_timeout": f"{DEADLINE:g}s"}},
                        *(r for r in events["routes"] if r["match"] != COLLECT)]
    next(r for r in events["allow"] if r["from"] == ["analytics-svc"])["methods"].append(COLLECT)
    _service(doc, "learner-svc")["allow"] = [{"from": ["mesh-client"]},
                                             {"from": ["analytics-svc"], "methods": [GET_PROFILE]},
                                             {"from": ["analytics-svc"], "methods": [UPDATE_PROFILE]}]
    return doc


# -- the proxyless plane -------------------------------------------------------------------------------

@dataclass
class Proxyless:
    """One proxyless service's process, in this one: its MeshServer (an Instance), its MeshClient and the
    ProxylessNode that applies what the control plane sends to both."""

    instance: Instance
    client: MeshClient
    node: ProxylessNode


@contextlib.asynccontextmanager
async def proxyless_service(env: Sidecars, service: str, name: str, grpc_service: str,
                            *methods: str) -> AsyncIterator[Proxyless]:
    """`service` at its own address on the control plane, as `meshctl serve SERVICE --control-plane` runs
    it (runtime/serve.py): the server listens, the node has applied a first configuration."""
    mesh, certs = env.mesh, env.state.certs
    instance = await start_instance(mesh, certs, service, name, grpc_service, *methods, port=mesh.service(service).port)
    client = MeshClient(MeshConfig.for_identity(service, certs, mesh))
    cert, key = certs.identity_paths(service)
    node = ProxylessNode(mesh, service, mesh.control_plane.address, cert=cert, key=key, ca=certs.ca_cert,
                         apply=apply_to(client, instance.server))
    node.start()
    try:
        assert await node.wait_applied(15), node.status()
        yield Proxyless(instance, client, node)
    finally:
        await node.stop()
        await client.close()
        await instance.server.stop(0)


def calls_made(instance: Instance) -> int:
    """The calls the test itself made to `instance` (not the steady ones, of which one may still be in
    flight to an instance as it is removed)."""
    return sum(n for payload, n in instance.attempts.items() if payload != b"steady")


# -- what each change must show ------------------------------------------------------------------------

@dataclass
class Caller:
    """One caller's calls: analytics-svc's app through its Envoy (the sidecar plane), or learner-svc's
    MeshClient (the proxyless plane)."""

    plane: str
    auth: Raw  # ValidateToken, auth-svc's route that changes
    authenticate: Raw  # Authenticate: the allow rule that goes and comes back
    events: Raw  # Collect, event-collector-svc's route that changes


async def cut(caller: Caller, call: Raw, payload: bytes) -> None:
    """A call that the old deadline would let finish is cut at the new one (the caller gives 10 s)."""
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(payload, timeout=10)
    elapsed = time.monotonic() - started
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (caller.plane, payload, err.value)
    assert elapsed < DEADLINE / 2, (caller.plane, payload, elapsed)  # well before the old deadline


async def fails(caller: Caller, call: Raw, payload: bytes, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(payload, timeout=10)
    assert err.value.code() == code, (caller.plane, payload, err.value)
    return str(err.value.details())


async def answers(caller: Caller, call: Raw, payload: bytes, who: bytes) -> None:
    assert await call(payload, timeout=10) == who, (caller.plane, payload)


async def each(*checks: Awaitable[Any]) -> list[Any]:
    """The checks of one change, at once (every one must hold)."""
    return list(await asyncio.gather(*checks))


async def reaches(calls: list[Raw], who: bytes) -> None:
    await each(*(until_answered_by(call, who) for call in calls))


async def never_reaches(calls: list[Raw], who: bytes, expected: bytes, count: int = 20) -> None:
    async def some(call: Raw) -> None:
        for _ in range(count):
            assert await call(b"who", timeout=10) == expected, who

    await each(*(some(call) for call in calls))


# -- the test ------------------------------------------------------------------------------------------

async def test_twenty_live_changes_under_steady_traffic_each_seen_on_both_planes(mesh, mesh_certs, tmp_path):
    doc = mixed_doc()
    async with sidecars(mesh, mesh_certs, tmp_path, doc=doc, names=SIDECARS, caller="analytics-svc",
                        proxyless=PROXYLESS) as env:
        cp = start_control_plane(env, direct=PROXYLESS)
        await cp.start()
        try:
            async with contextlib.AsyncExitStack() as stack:
                learner = await stack.enter_async_context(proxyless_service(
                    env, "learner-svc", "learner", LEARNER, "GetProfile", "UpdateProfile"))
                events = await stack.enter_async_context(proxyless_service(
                    env, "event-collector-svc", "ec-a", EVENTS, "Collect"))
                ec_b = await start_instance(env.mesh, env.state.certs, "event-collector-svc", "ec-b", EVENTS, "Collect")
                stack.push_async_callback(ec_b.server.stop, 0)
                # analytics-svc's Envoy reaches every peer: auth-svc's Envoy, the MeshServers at their own address.
                await start_envoys(env, healthy={"analytics-svc": ("auth-svc", "learner-svc", "event-collector-svc")})
                out = await stack.enter_async_context(grpc.aio.insecure_channel(env.outbound))
                to_auth = await learner.client.channel("auth-svc")
                to_events = await learner.client.channel("event-collector-svc")
                sidecar = Caller("sidecar", _raw(out), _raw(out, AUTHENTICATE), _raw(out, COLLECT))
                proxyless = Caller("proxyless", _raw(to_auth), _raw(to_auth, AUTHENTICATE), _raw(to_events, COLLECT))
                callers = (proxyless, sidecar)
                to_learner, update_learner = _raw(out, GET_PROFILE), _raw(out, UPDATE_PROFILE)
                # Where each caller finds each peer, by the control plane: auth-svc at its Envoy's inbound, the
                # proxyless services at their own address; and every path answers before anything changes.
                balancer = {peer: t.policy.balancer.endpoints for peer, t in learner.client.targets().items()}
                assert balancer == {"auth-svc": [env.auth_inbound], "event-collector-svc": [events.instance.address]}
                hosts = envoy_hosts(f"127.0.0.1:{env.admin('analytics-svc')}")
                assert {peer: sorted(hosts[peer]) for peer in ("auth-svc", "learner-svc", "event-collector-svc")} == {
                    "auth-svc": [env.auth_inbound], "learner-svc": [learner.instance.address],
                    "event-collector-svc": [events.instance.address]}, hosts
                await each(*(answers(c, c.auth, b"who", b"a") for c in callers),
                           *(answers(c, c.events, b"who", b"ec-a") for c in callers),
                           answers(sidecar, to_learner, b"who", b"learner"))

                steady = {"analytics -> auth (sidecar -> sidecar)": sidecar.auth,
                          "analytics -> learner (sidecar -> proxyless)": to_learner,
                          "analytics -> event-collector (sidecar -> proxyless)": sidecar.events,
                          "learner -> auth (proxyless -> sidecar)": proxyless.auth,
                          "learner -> event-collector (proxyless -> proxyless)": proxyless.events}
                traffic = {path: Traffic(pause=0.02) for path in steady}
                applied = 0

                async def change() -> None:
                    """Apply `doc` (every node ACKs), then until each path's steady traffic has been answered
                    since."""
                    nonlocal applied
                    await apply(cp, doc, env)
                    applied += 1
                    seen = {path: t.ok for path, t in traffic.items()}
                    await until(lambda: all(t.ok > seen[path] for path, t in traffic.items()), timeout=10,
                                what="a steady call answered on every path since the change")

                async with contextlib.AsyncExitStack() as flowing:
                    for path, call in steady.items():
                        await flowing.enter_async_context(running(traffic[path], [call]))
                    for cycle in range(2):
                        auth, ev = _service(doc, "auth-svc"), _service(doc, "event-collector-svc")
                        routes = (auth["routes"][0], ev["routes"][0])
                        # 1. Shorter deadlines on ValidateToken and Collect: the next slow call is cut, by
                        # learner-svc's MeshClient and by analytics-svc's Envoy, whichever plane serves it.
                        for route in routes:
                            route["timeout"] = route["retry"]["per_try_timeout"] = f"{SHORT:g}s"
                        await change()
                        await each(*(cut(c, call, SLOW) for c in callers for call in (c.auth, c.events)))
                        # 2. And back: a slow call within the old deadline is answered again.
                        for route in routes:
                            route["timeout"] = route["retry"]["per_try_timeout"] = f"{DEADLINE:g}s"
                        await change()
                        await each(*(answers(c, c.auth, b"slow:600", b"a") for c in callers),
                                   *(answers(c, c.events, b"slow:600", b"ec-a") for c in callers))
                        # 3. No retries: a call whose first attempt fails now fails, on both planes.
                        for route in routes:
                            route["retry"]["max_retries"] = 0
                        await change()
                        await each(*(fails(c, call, f"once:{cycle}-3-{c.plane}".encode(), grpc.StatusCode.UNAVAILABLE)
                                     for c in callers for call in (c.auth, c.events)))
                        # 4. Two retries again: the same kind of call succeeds on its second attempt.
                        for route in routes:
                            route["retry"]["max_retries"] = 2
                        await change()
                        await each(*(answers(c, c.auth, f"once:{cycle}-4-{c.plane}".encode(), b"a") for c in callers),
                                   *(answers(c, c.events, f"once:{cycle}-4-{c.plane}".encode(), b"ec-a")
                                     for c in callers))
                        # 5. An allow rule removed at auth-svc (refused at its Envoy's inbound, for callers of
                        # both planes) and one at learner-svc (refused by its MeshServer, for analytics-svc's
                        # Envoy, by the identity its certificate says).
                        auth["allow"].pop()
                        learner_rules = _service(doc, "learner-svc")["allow"]
                        update_rule = learner_rules.pop()
                        await change()
                        denied = grpc.StatusCode.PERMISSION_DENIED
                        *at_auth, at_learner = await each(*(fails(c, c.authenticate, b"x", denied) for c in callers),
                                                          fails(sidecar, update_learner, b"x", denied))
                        assert all("RBAC" in why for why in at_auth), at_auth  # Envoy's RBAC filter said no
                        assert f"{env.mesh.spiffe_id('analytics-svc')} is not allowed" in at_learner, at_learner
                        # 6. Both back.
                        auth["allow"].append({"from": ["learner-svc", "analytics-svc"], "methods": [AUTHENTICATE]})
                        learner_rules.append(update_rule)
                        await change()
                        await each(*(answers(c, c.authenticate, b"x", b"a") for c in callers),
                                   answers(sidecar, update_learner, b"x", b"learner"))
                        # 7. auth-svc (sidecar plane) gets a second instance: calls from both planes reach it.
                        auth["endpoints"] = [env.auth_inbound, env.b_address]
                        await change()
                        await reaches([c.auth for c in callers], b"b")
                        # 8. And loses it (back to its sidecar, the default): no call of either plane reaches it.
                        del auth["endpoints"]
                        await change()
                        b_calls = env.apps.test_hits["b"]
                        await never_reaches([c.auth for c in callers], b"b", b"a")
                        assert env.apps.test_hits["b"] == b_calls
                        # 9. event-collector-svc (proxyless plane) gets a second instance: both planes reach it.
                        ev["endpoints"] = [events.instance.address, ec_b.address]
                        await change()
                        await reaches([c.events for c in callers], b"ec-b")
                        # 10. And loses it (back to its own address, `direct`): neither plane reaches it.
                        del ev["endpoints"]
                        await change()
                        ec_b_calls = calls_made(ec_b)
                        await never_reaches([c.events for c in callers], b"ec-b", b"ec-a")
                        assert calls_made(ec_b) == ec_b_calls
                    assert applied == 20
                for path, t in traffic.items():
                    assert t.failures == [] and t.ok > 20, (path, t.ok, t.failures[:5])
        finally:
            await cp.stop()
