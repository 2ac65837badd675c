"""The sidecar plane's plaintext legs on Unix sockets (as `meshctl up` runs them) vs loopback TCP.

    .venv/bin/python benchmarks/bench_uds.py [--reps 12] [--warmup 0.5] [--window 2] [--window-c1 1.5]

Two pairs of rendered local-profile sidecars (learner-svc -> auth-svc, tracing off) in front of one
echo app: `tcp` with the app and the outbound listener on 127.0.0.1 ports (the profile without pipes),
`uds` with both on Unix sockets (`app_pipe` / `outbound_pipe`, mode 0600). The client dials each
outbound listener in plaintext; the mTLS hop between the sidecars is TCP in both. Interleaved rounds as
bench_sidecar.py (c=1 then c=32, another case first each round, a round with foreign load rerun);
reported: median p50 at c=1 and rps at c=32 per case, the per-round difference uds - tcp with its
interquartile range, and CPU us per request of every process. Writes benchmarks/results/uds.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import grpc

from aivo_mesh.config import load_mesh
from aivo_mesh.config.ports import sidecar_ports
from aivo_mesh.pki import CertLayout
from aivo_mesh.pki.issue import init_ca, issue_leaf
from aivo_mesh.render import serialize
from aivo_mesh.render.envoy import EnvoyProfile, bootstrap, sds_files
from aivo_mesh.runtime.local import free_ports, with_free_ports
from aivo_mesh.runtime.mesh import envoy_binary

sys.path.insert(0, str(Path(__file__).parent))
from bench_client import quartiles, run_case, stop_all, write_results
from bench_sidecar import echo, first_answer, start_envoy, start_server, wait_live
from loadmeter import LoadMeter, quiet_rounds

ROOT = Path(__file__).resolve().parents[1]
SERVER = """
import asyncio, os, sys
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

async def echo(request, context):
    return request

async def main():
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "aivo.auth.v1.AuthService", {"ValidateToken": grpc.unary_unary_rpc_method_handler(echo)}),))
    checker = health.aio.HealthServicer()
    await checker.set("aivo.auth.v1.AuthService", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
    server.add_insecure_port(f"unix:{sys.argv[2]}")
    os.chmod(sys.argv[2], 0o600)
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


def prepare(tmp: Path) -> tuple[list[str], dict[str, tuple[Path, int]], dict[str, str]]:
    """The echo app's argv, the four Envoys' bootstraps and admin ports, and each case's client target."""
    base = with_free_ports(load_mesh(ROOT / "mesh.yaml"))
    certs = CertLayout(tmp / "certs")
    init_ca(certs, base.mesh.trust_domain)
    for name in ("auth-svc", "learner-svc"):
        issue_leaf(certs, name, base)
    run = tmp / "run"
    run.mkdir(mode=0o700)
    app_sock, out_sock = run / "auth-svc.app.sock", run / "learner-svc.out.sock"
    (app_port,) = free_ports(1)
    envoys: dict[str, tuple[Path, int]] = {}
    targets: dict[str, str] = {}
    for case in ("tcp", "uds"):
        mesh = with_free_ports(base)  # each pair its own inbound/outbound/admin ports
        mesh = mesh.model_copy(update={"services": tuple(
            s.model_copy(update={"local_port": app_port}) if s.name == "auth-svc" else s for s in mesh.services)})
        for svc in ("auth-svc", "learner-svc"):
            d = tmp / case / svc
            (d / "sds").mkdir(parents=True)
            uds = case == "uds"
            profile = EnvoyProfile.local(str(certs.root), str(d / "sds"), app_pipe=str(app_sock) if uds else None,
                                         outbound_pipe=str(out_sock) if uds else None)
            for rel, doc in sds_files(mesh, svc, profile).items():
                (d / "sds" / rel).write_text(serialize(rel, doc))
            (d / "envoy.yaml").write_text(serialize("envoy.yaml", bootstrap(mesh, svc, profile)))
            envoys[f"{case}-{'in' if svc == 'auth-svc' else 'out'}"] = (d / "envoy.yaml",
                                                                         sidecar_ports(mesh, svc, "local").admin)
        targets[case] = (f"unix:{out_sock}" if case == "uds"
                         else f"127.0.0.1:{sidecar_ports(mesh, 'learner-svc', 'local').outbound}")
    return [sys.executable, "-c", SERVER, str(app_port), str(app_sock)], envoys, targets


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    server_argv, envoys, targets = prepare(Path(tempfile.mkdtemp(prefix="aivo-bench-uds-")))
    procs: list[Any] = [start_server(server_argv)]
    pids = {"client": os.getpid(), "app": procs[0].pid}
    envoy = envoy_binary()
    for label, (path, _) in envoys.items():
        procs.append(start_envoy(envoy, path))
        pids[label] = procs[-1].pid
    meter = LoadMeter(pids)
    for _, admin in envoys.values():
        wait_live(admin)
    channels = {case: grpc.aio.insecure_channel(t) for case, t in targets.items()}
    calls = {case: echo(ch) for case, ch in channels.items()}
    payload = b"x" * 100
    names = list(calls)
    results: dict[str, dict[int, list[dict[str, Any]]]] = {n: {1: [], 32: []} for n in names}
    try:
        deadline = time.monotonic() + 20  # each outbound sidecar waits for its first health check
        for call in calls.values():
            await first_answer(call, deadline, per_call=2)

        async def one_round(order: list[str]) -> tuple[dict[str, dict[int, dict[str, Any]]], float, str]:
            rnd: dict[str, dict[int, dict[str, Any]]] = {n: {} for n in names}
            for conc, window in ((1, args.window_c1), (32, args.window)):
                for name in order:
                    rnd[name][conc] = await run_case(partial(calls[name], payload, timeout=5), conc, args.warmup,
                                                     window, meter)
            line = ("c=1 p50 " + "  ".join(f"{n} {rnd[n][1]['p50_ms']:.3f}" for n in names) + " ms   c=32 "
                    + "  ".join(f"{n} {rnd[n][32]['rps']:5.0f}" for n in names) + " rps")
            return rnd, max(r["foreign_cores"] for c in rnd.values() for r in c.values()), line

        rounds, rerun = await quiet_rounds(args.reps, names, one_round, max_foreign=args.max_foreign,
                                           max_reruns=args.max_reruns)
        for rnd in rounds:
            for n in names:
                for conc in (1, 32):
                    results[n][conc].append(rnd[n][conc])
    finally:
        for ch in channels.values():
            await ch.close()
        stop_all(procs, 10)
    d_p50 = [u["p50_ms"] - t["p50_ms"] for u, t in zip(results["uds"][1], results["tcp"][1], strict=True)]
    r_rps = [u["rps"] / t["rps"] for u, t in zip(results["uds"][32], results["tcp"][32], strict=True)]

    def cpu(case: str, conc: int) -> dict[str, float]:
        on_path = ["client", "app", f"{case}-out", f"{case}-in"]
        return {p: statistics.median(x["cpu_us"][p] for x in results[case][conc]) for p in on_path}

    return {
        "rounds": args.reps, "rounds_rerun": rerun, "max_foreign_cores": args.max_foreign,
        "window_s": {"c1": args.window_c1, "c32": args.window},
        "p50_ms_c1": {n: statistics.median(x["p50_ms"] for x in v[1]) for n, v in results.items()},
        "rps_c32": {n: statistics.median(x["rps"] for x in v[32]) for n, v in results.items()},
        "p50_ms_c1_uds_minus_tcp": statistics.median(d_p50),
        "p50_ms_c1_uds_minus_tcp_quartiles": quartiles(d_p50),
        "rps_ratio_uds_vs_tcp_c32": statistics.median(r_rps),
        "rps_ratio_uds_vs_tcp_c32_quartiles": quartiles(r_rps),
        "cpu_us_per_request": {n: {f"c{c}": cpu(n, c) for c in (1, 32)} for n in names},
        "errors": sum(x["errors"] for v in results.values() for c in v.values() for x in c),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=12, help="rounds; each runs both cases at c=1 and c=32")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--window", type=float, default=2.0, help="seconds per case at c=32")
    ap.add_argument("--window-c1", type=float, default=1.5, help="seconds per case at c=1")
    ap.add_argument("--max-foreign", type=float, default=0.25,
                    help="rerun a round when a window saw more foreign load (cores, steal included)")
    ap.add_argument("--max-reruns", type=int, default=15, help="give up rerunning after this many")
    args = ap.parse_args()
    summary = asyncio.run(bench(args))
    print(json.dumps(summary, indent=2))
    write_results("uds", summary)


if __name__ == "__main__":
    main()
