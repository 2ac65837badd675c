"""A fresh MeshClient's first call against its steady calls, with and without warming its channels.

    .venv/bin/python benchmarks/bench_first_call.py [--rounds 30] [--calls 200] [--loop auto]

Method: one MeshServer process (auth-svc, as benchmarks/bench_client.py starts it) and this client
process, both on `aivo_mesh.run`'s loop (`--loop`). Each round makes two fresh MeshClients (their
certificates loaded and mesh.yaml read outside the timings, as a service does at start-up), in
alternating order:
    cold    the first call goes out on a channel that has never connected: it pays for the TCP
            connection, the mTLS handshake and the server certificate's check (server_check.py)
    warm    `await client.warm(["auth-svc"])` first (what `meshctl serve` does before SERVING), then
            the first call
and then `--calls` more calls one after the other on the warm client: the steady latency of that
round (its p50). A case's figure per round is first call / steady p50 of the same round; the
summary gives the median, min and max over rounds (target: warm <= 2x). Latency is
`perf_counter` around `await stub.ValidateToken(req)`, c=1.
Writes benchmarks/results/first_call.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_client import SERVER, die_with_parent, mesh_state, write_results

from aivo_mesh import MeshClient, MeshConfig, run  # before grpc (bench_client): it sets grpc's TLS settings
from aivo_mesh.benchfigures import from_rounds
from aivo_mesh.config import load_mesh
from aivo_mesh.eventloop import loop_name
from aivo_mesh.runtime.local import free_ports
from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


async def first_and_steady(client: MeshClient, warm: bool, calls: int) -> tuple[float, list[float]]:
    """The first call's latency (s) through `client`, after warming it or not; then `calls` more."""
    req = auth_pb2.ValidateTokenRequest(token="x" * 100)
    if warm:
        ready = await client.warm(["auth-svc"])
        assert ready["auth-svc"], "auth-svc did not connect"
    stub = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    t = time.perf_counter()
    await stub.ValidateToken(req, timeout=5)
    first = time.perf_counter() - t
    steady = []
    for _ in range(calls):
        t = time.perf_counter()
        await stub.ValidateToken(req, timeout=5)
        steady.append(time.perf_counter() - t)
    return first, steady


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    tmp, state = mesh_state("aivo-first-")
    (port,) = free_ports(1)
    state.mesh_file.write_text((ROOT / "mesh.yaml").read_text().replace("port: 50051", f"port: {port}"))
    mesh = load_mesh(state.mesh_file)
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(state.mesh_file), str(state.certs.root),
                               str(port), args.loop], preexec_fn=die_with_parent, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    server.stdout.readline()  # "ready"
    rounds: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    try:
        # One client to start with, to load the protos and grpc's TLS library before the first round.
        async with MeshClient(MeshConfig.for_identity("learner-svc", state.certs, mesh)) as c:
            await first_and_steady(c, True, 10)
        for r in range(args.rounds):
            order = ["cold", "warm"] if r % 2 == 0 else ["warm", "cold"]
            line = []
            for case in order:
                client = MeshClient(MeshConfig.for_identity("learner-svc", state.certs, mesh), health_checks=False)
                try:
                    first, steady = await first_and_steady(client, case == "warm", args.calls)
                finally:
                    await client.close()
                p50 = statistics.median(steady)
                rounds[case].append({"first_ms": first * 1000, "p50_ms": p50 * 1000, "ratio": first / p50})
                line.append(f"{case} first {first * 1000:6.2f} ms p50 {p50 * 1000:5.2f} ms ({first / p50:5.2f}x)")
            print(f"round {r + 1:2d}  " + "  ".join(line), flush=True)
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    summary: dict[str, Any] = {"loop": loop_name(), "rounds": args.rounds, "calls": args.calls, "cases": {}}
    for case, rs in rounds.items():
        ratios = sorted(x["ratio"] for x in rs)
        summary["cases"][case] = {
            "first_ms_median": statistics.median(x["first_ms"] for x in rs),
            "p50_ms_median": statistics.median(x["p50_ms"] for x in rs),
            "ratio_median": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1],
            "ratio_quartiles": [statistics.quantiles(ratios, n=4)[0], statistics.quantiles(ratios, n=4)[2]],
        }
    summary["figures"] = [
        from_rounds("startup", "first call of a warmed MeshClient / its steady p50",
              [x["ratio"] for x in rounds["warm"]], target=2.0, higher_is_better=False).to_dict(),
        from_rounds("startup", "first call of a cold MeshClient / its steady p50", [x["ratio"] for x in rounds["cold"]],
              higher_is_better=False).to_dict(),
    ]
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=200, help="steady calls per round after the first")
    ap.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto")
    args = ap.parse_args()
    summary = run(bench(args), loop=args.loop)
    print(f"\nloop {summary['loop']}; first call / steady p50 of the same round, over {args.rounds} rounds:")
    for case, c in summary["cases"].items():
        lo, hi = c["ratio_quartiles"]
        print(f"{case:5s} first {c['first_ms_median']:6.2f} ms  steady p50 {c['p50_ms_median']:5.2f} ms  ratio median "
              f"{c['ratio_median']:5.2f} (IQR {lo:.2f}-{hi:.2f}, min {c['ratio_min']:.2f}, max {c['ratio_max']:.2f})")
    write_results("first_call", summary)


if __name__ == "__main__":
    main()
