"""What incremental (delta) xDS would save over state of the world, on a generated mesh of 1000 services.

    .venv/bin/python benchmarks/bench_xds_delta.py [--services 1000]

For each kind of change, the snapshots of the sidecars it touches are built before and after (the
control plane's own `sidecar_snapshot`), and for each touched node and each type whose version changed:

SotW   the DiscoveryResponse the ADS server sends (xds/server.py): every resource of that type the node
       holds (listeners and clusters: all of them; routes, endpoints, secrets: all it subscribed to);
delta  the DeltaDiscoveryResponse an incremental server would send: only the resources that were added
       or changed, and the names of those removed.

Both are real protobuf messages, serialized: bytes on the wire per change (summed over touched nodes),
and the time to serialize them (the server's share; Envoy's share, parsing and applying, grows with the
same bytes). The changes:

    route     one service's route timeout (its callers' outbound route configuration)
    cluster   one service's outlier detection (its callers' cluster for it)
    endpoint  one instance added to a service (its callers' assignment for it)
    allow     one more caller allowed into a service (that service's inbound listener, and the new
              caller's listener and clusters)
    hub-*     the same changes seen by a node allowed to call every service (an edge gateway): the node
              whose state of the world is largest. Its outbound routes are one route configuration
              (one virtual host per peer), so a route change resends all of it either way: delta xDS
              only helps per resource (Envoy's VHDS would split it further).

Writes benchmarks/results/xds_delta.json. No assertions.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import meshgen
import yaml
from bench_client import write_results
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from aivo_mesh.config.loader import parse_mesh
from aivo_mesh.config.model import MeshSpec
from aivo_mesh.config.resolve import callable_peers
from aivo_mesh.discovery.snapshot import Endpoint
from aivo_mesh.render.envoy import EnvoyProfile
from aivo_mesh.xds.cache import PUSH_ORDER, Snapshot, type_name
from aivo_mesh.xds.resources import Endpoints, Trust, sidecar_snapshot

PROFILE = EnvoyProfile.local("/certs", "/sds")
TRUST = Trust(b"-----BEGIN CERTIFICATE-----\nbench\n-----END CERTIFICATE-----\n")
HUB = "svc-0000"


def _any(type_url: str, message: Any) -> any_pb2.Any:
    return any_pb2.Any(type_url=type_url, value=message.SerializeToString(deterministic=True))


def sotw(type_url: str, snap: Snapshot) -> discovery_pb2.DiscoveryResponse:
    resources = snap.get(type_url)
    return discovery_pb2.DiscoveryResponse(
        version_info=snap.versions[type_url], type_url=type_url, nonce="1",
        resources=[_any(type_url, resources[n]) for n in sorted(resources)])


def delta(type_url: str, old: Snapshot, new: Snapshot) -> discovery_pb2.DeltaDiscoveryResponse:
    before, after = old.get(type_url), new.get(type_url)
    changed = [n for n in sorted(after) if n not in before or
               before[n].SerializeToString(deterministic=True) != after[n].SerializeToString(deterministic=True)]
    return discovery_pb2.DeltaDiscoveryResponse(
        system_version_info=new.versions[type_url], type_url=type_url, nonce="1",
        resources=[discovery_pb2.Resource(name=n, version=new.versions[type_url], resource=_any(type_url, after[n]))
                   for n in changed],
        removed_resources=sorted(set(before) - set(after)))


def _serialize_seconds(messages: list[Any], repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for m in messages:
            m.SerializeToString()
        best = min(best, time.perf_counter() - start)
    return best


def compare(old_mesh: MeshSpec, new_mesh: MeshSpec, nodes: Iterable[str],
            endpoints: tuple[Endpoints | None, Endpoints | None] = (None, None)) -> dict[str, Any]:
    """SotW against delta for one change, over the nodes it may touch."""
    full: list[Any] = []
    incremental: list[Any] = []
    types: dict[str, int] = {}
    touched = 0
    for node in nodes:
        old = sidecar_snapshot(old_mesh, node, PROFILE, TRUST, endpoints[0])
        new = sidecar_snapshot(new_mesh, node, PROFILE, TRUST, endpoints[1])
        changed = [t for t in PUSH_ORDER if old.versions[t] != new.versions[t]]
        touched += bool(changed)
        for t in changed:
            full.append(sotw(t, new))
            incremental.append(delta(t, old, new))
            types[type_name(t)] = types.get(type_name(t), 0) + 1
    sotw_bytes = sum(m.ByteSize() for m in full)
    delta_bytes = sum(m.ByteSize() for m in incremental)
    return {
        "nodes_touched": touched, "responses_per_type": types,
        "sotw_resources": sum(len(m.resources) for m in full),
        "delta_resources": sum(len(m.resources) for m in incremental),
        "sotw_bytes": sotw_bytes, "delta_bytes": delta_bytes,
        "sotw_over_delta": round(sotw_bytes / delta_bytes, 2) if delta_bytes else None,
        "sotw_serialize_us": round(_serialize_seconds(full) * 1e6, 1),
        "delta_serialize_us": round(_serialize_seconds(incremental) * 1e6, 1),
    }


def _load(doc: dict[str, Any]) -> MeshSpec:
    return parse_mesh(yaml.safe_dump(doc, sort_keys=False), "mesh.yaml")


def _changed(doc: dict[str, Any], edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    edit(out)
    return out


def _svc(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in doc["services"] if s["name"] == name)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--services", type=int, default=1000)
    args = parser.parse_args(argv)
    n = args.services
    target = meshgen.service_name(n // 2)
    base = meshgen.mesh(n)
    # The hub: allowed to call every service, as an edge gateway would be.
    for s in base["services"]:
        if s["name"] != HUB:
            s["allow"].append({"from": [HUB]})
    old = _load(base)
    callers = [s for s in old.service_names if target in callable_peers(old, s)]
    plain_callers = [c for c in callers if c != HUB]

    def route(doc: dict[str, Any]) -> None:
        _svc(doc, target)["routes"][0]["timeout"] = "2s"

    def outlier(doc: dict[str, Any]) -> None:
        _svc(doc, target)["outlier_detection"] = {"consecutive_failures": 7}

    newcomer = meshgen.service_name(n // 2 + 10)

    def allow(doc: dict[str, Any]) -> None:
        _svc(doc, target)["allow"].append({"from": [newcomer]})

    port = meshgen.PORT_BASES["port"] + n // 2
    one: Endpoints = {target: (Endpoint("127.0.0.1", port),)}
    two: Endpoints = {target: (Endpoint("127.0.0.1", port), Endpoint("127.0.0.2", port))}
    started = time.perf_counter()
    cases = {
        "route": compare(old, _load(_changed(base, route)), plain_callers),
        "cluster": compare(old, _load(_changed(base, outlier)), plain_callers),
        "endpoint": compare(old, old, plain_callers, (one, two)),
        "allow": compare(old, _load(_changed(base, allow)), [target, newcomer]),
        "hub-route": compare(old, _load(_changed(base, route)), [HUB]),
        "hub-cluster": compare(old, _load(_changed(base, outlier)), [HUB]),
        "hub-endpoint": compare(old, old, [HUB], (one, two)),
    }
    summary = {"services": n, "changed_service": target, "callers": len(callers), "hub": HUB,
               "hub_peers": len(callable_peers(old, HUB)), "cases": cases,
               "seconds": round(time.perf_counter() - started, 1)}
    print(f"{n} services; {target} has {len(callers)} callers (one is {HUB}, which may call "
          f"{summary['hub_peers']} services)")
    print(f"{'change':<14}{'nodes':>6}{'SotW res':>10}{'delta res':>10}{'SotW bytes':>12}{'delta bytes':>12}"
          f"{'ratio':>8}{'SotW us':>9}{'delta us':>9}")
    for name, c in cases.items():
        print(f"{name:<14}{c['nodes_touched']:>6}{c['sotw_resources']:>10}{c['delta_resources']:>10}"
              f"{c['sotw_bytes']:>12}{c['delta_bytes']:>12}{c['sotw_over_delta'] or '-':>8}"
              f"{c['sotw_serialize_us']:>9}{c['delta_serialize_us']:>9}")
    write_results("xds_delta", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
