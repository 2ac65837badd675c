"""The control plane's push path: `meshctl apply` to every Envoy's ACK, and one change fanned out to many nodes.

    .venv/bin/python benchmarks/bench_xds.py [--applies 30] [--nodes 500] [--rounds 5]

apply   `meshctl up --free-ports` (4 real Envoys on the control plane); then `--applies` applies that
        each change learner-svc's timeout (alternating two files), timed from the POST to the control
        plane's answer, which comes once every connected sidecar ACKed: p50 and max. Baseline in the same
        run: applies of an unchanged file (the same parse, check and build; nothing to push or wait for),
        so `changed - unchanged` is what the push and the ACKs cost. Also the wall time of the
        `meshctl apply` command itself (a new Python process: start-up and the POST; the control plane
        checks the file).
fan-out `--nodes` simulated ADS clients in this process (grpc.aio, mTLS with learner-svc's identity,
        each subscribed to all five types and ACKing every response) on one AdsServer; each round sets
        a changed snapshot and times until every node ACKed it. Baseline in the same run: the same
        change to 1 node, so the ratio shows how the push scales.

Writes benchmarks/results/xds.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from aivo_mesh.config import load_mesh
from aivo_mesh.pki import CertLayout, PeerPolicy
from aivo_mesh.pki.issue import init_ca, issue_all
from aivo_mesh.render.envoy import EnvoyProfile
from aivo_mesh.xds.cache import PUSH_ORDER, SnapshotCache
from aivo_mesh.xds.resources import Trust, sidecar_snapshot
from aivo_mesh.xds.server import AdsServer

sys.path.insert(0, str(Path(__file__).parent))
from bench_client import quartiles, write_results

ROOT = Path(__file__).resolve().parents[1]
MESHCTL = [sys.executable, "-m", "aivo_mesh"]


def _ms(xs: list[float]) -> dict[str, Any]:
    return {"p50_ms": round(statistics.median(xs) * 1000, 1), "max_ms": round(max(xs) * 1000, 1),
            "iqr_ms": [round(q * 1000, 1) for q in quartiles(xs)]}


# -- apply to 4 real Envoys -------------------------------------------------------------------------------

def _post(url: str, body: bytes) -> dict[str, Any]:
    req = urllib.request.Request(url, data=body, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return dict(json.loads(r.read()))


def bench_apply(applies: int) -> dict[str, Any]:
    base = (ROOT / "mesh.yaml").read_text()
    variants = [base.replace("timeout: 10s", "timeout: 9s", 1).encode(), base.encode()]
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        up = subprocess.run([*MESHCTL, "up", "--free-ports", "--state-dir", str(state), "--timeout", "120"],
                            capture_output=True, text=True)
        if up.returncode != 0:
            raise SystemExit(f"meshctl up failed:\n{up.stdout}{up.stderr}")
        try:
            admin = json.loads((state / "runtime.json").read_text())["control_plane"]["admin"]
            url = f"http://{admin}/apply"
            changed, unchanged, cli = [], [], []
            for i in range(applies):
                body = variants[i % 2]
                t0 = time.perf_counter()
                result = _post(url, body)
                changed.append(time.perf_counter() - t0)
                assert result["changed"] and all(n["outcome"] == "acked" for n in result["nodes"]), result
                assert len(result["nodes"]) == 4, result
                t0 = time.perf_counter()
                again = _post(url, body)
                unchanged.append(time.perf_counter() - t0)
                assert again["changed"] == [], again
            for i in range(max(3, applies // 5)):
                path = Path(tmp) / f"mesh-{i % 2}.yaml"
                path.write_bytes(variants[i % 2])
                t0 = time.perf_counter()
                done = subprocess.run([*MESHCTL, "apply", str(path), "--state-dir", str(state)], capture_output=True,
                                      text=True)
                cli.append(time.perf_counter() - t0)
                assert done.returncode == 0, done.stdout + done.stderr
        finally:
            subprocess.run([*MESHCTL, "down", "--state-dir", str(state)], capture_output=True)
    push = [c - u for c, u in zip(changed, unchanged, strict=True)]
    return {"applies": applies, "changed": _ms(changed), "unchanged_baseline": _ms(unchanged),
            "push_and_acks": _ms(push), "meshctl_apply_command": _ms(cli)}


# -- fan-out to simulated nodes ---------------------------------------------------------------------------

class SimNode:
    """One ADS client: subscribes to every type, ACKs every response, remembers the versions it holds."""

    def __init__(self, node_id: str, names: dict[str, list[str]]) -> None:
        self.node_id = node_id
        self.names = names
        self.held: dict[str, str] = {}
        self.out: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        self.changed = asyncio.Event()

    def request(self, t: str, version: str = "", nonce: str = "") -> discovery_pb2.DiscoveryRequest:
        req = discovery_pb2.DiscoveryRequest(type_url=t, version_info=version, response_nonce=nonce,
                                             resource_names=self.names.get(t, []))
        req.node.id = self.node_id
        return req

    async def requests(self) -> Any:
        for t in PUSH_ORDER:
            yield self.request(t)
        while (req := await self.out.get()) is not None:
            yield req

    async def run(self, channel: grpc.aio.Channel) -> None:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        async for resp in stub.StreamAggregatedResources(self.requests()):
            self.held[resp.type_url] = resp.version_info
            self.out.put_nowait(self.request(resp.type_url, resp.version_info, resp.nonce))
            self.changed.set()


async def bench_fanout(nodes: int, rounds: int) -> dict[str, Any]:
    mesh = load_mesh(ROOT / "mesh.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        certs = CertLayout(Path(tmp) / "certs")
        init_ca(certs, mesh.mesh.trust_domain)
        issue_all(certs, mesh)
        cache = SnapshotCache()
        ads = AdsServer(cache, lambda node: "learner-svc", PeerPolicy.from_mesh(mesh))
        server = grpc.aio.server()
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
        cert, key = certs.identity_paths(mesh.control_plane.identity)
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
            [(key.read_bytes(), cert.read_bytes())], certs.ca_cert.read_bytes(), True))
        await server.start()
        profile = EnvoyProfile.local("/certs", "/sds")
        trust = Trust(certs.ca_cert.read_bytes())
        timeouts = ["9s", "10s"]

        def snapshot(i: int) -> Any:
            text = (ROOT / "mesh.yaml").read_text().replace("timeout: 10s", f"timeout: {timeouts[i % 2]}", 1)
            from aivo_mesh.config.loader import parse_mesh

            return sidecar_snapshot(parse_mesh(text, "mesh.yaml"), "learner-svc", profile, trust)

        snaps = [snapshot(0), snapshot(1)]
        cache.set("learner-svc", snaps[1])
        first = snaps[1]
        names = {t: sorted(first.resources.get(t, {})) for t in PUSH_ORDER}
        for t in ("type.googleapis.com/envoy.config.cluster.v3.Cluster",
                  "type.googleapis.com/envoy.config.listener.v3.Listener"):
            names[t] = []  # wildcard
        ccert, ckey = certs.identity_paths("learner-svc")
        creds = grpc.ssl_channel_credentials(certs.ca_cert.read_bytes(), ckey.read_bytes(), ccert.read_bytes())
        node_id = mesh.spiffe_id("learner-svc")
        # A channel per 50 nodes: one HTTP/2 connection carries many streams, as Envoys sharing a
        # front proxy would; each node is its own stream with its own state on the server.
        channels = [grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) for _ in range((nodes + 49) // 50)]

        async def settle(sims: list[SimNode], version: dict[str, str]) -> None:
            while not all(all(s.held.get(t) == v for t, v in version.items()) for s in sims):
                for s in sims:
                    s.changed.clear()
                await asyncio.wait([asyncio.ensure_future(s.changed.wait()) for s in sims],
                                   return_when=asyncio.FIRST_COMPLETED, timeout=1)

        async def measure(sims: list[SimNode]) -> list[float]:
            tasks = [asyncio.create_task(s.run(channels[i // 50])) for i, s in enumerate(sims)]
            want = dict(first.versions)
            await asyncio.wait_for(settle(sims, want), 120)
            times = []
            for r in range(rounds):
                snap = snaps[r % 2]
                t0 = time.perf_counter()
                cache.set("learner-svc", snap)
                await asyncio.wait_for(settle(sims, dict(snap.versions)), 60)
                verdicts = await ads.wait_settled(30)  # the server has every ACK too
                times.append(time.perf_counter() - t0)
                assert sum(1 for v in verdicts.values() if v == "acked") == 1, verdicts  # one node id, all acked
            for s in sims:
                s.out.put_nowait(None)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Leave the cache where this measurement started, for the next one.
            cache.set("learner-svc", snaps[1])
            return times

        one = await measure([SimNode(node_id, names)])
        many = await measure([SimNode(node_id, names) for _ in range(nodes)])
        for ch in channels:
            await ch.close()
        await server.stop(0)
    return {"nodes": nodes, "rounds": rounds, "one_node_baseline": _ms(one), "all_nodes": _ms(many),
            "ratio_p50": round(statistics.median(many) / statistics.median(one), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--applies", type=int, default=30)
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-apply", action="store_true", help="only the fan-out (no Envoy needed)")
    args = parser.parse_args()
    summary: dict[str, Any] = {}
    if not args.skip_apply:
        summary["apply_4_envoys"] = bench_apply(args.applies)
        print(json.dumps({"apply_4_envoys": summary["apply_4_envoys"]}, indent=2))
    summary["fanout"] = asyncio.run(bench_fanout(args.nodes, args.rounds))
    print(json.dumps({"fanout": summary["fanout"]}, indent=2))
    write_results("xds", summary)


if __name__ == "__main__":
    main()
