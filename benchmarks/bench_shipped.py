"""The mesh as shipped against what a user would write with grpc.aio alone, c=32, in the same run.

    .venv/bin/python benchmarks/bench_shipped.py [--rounds 12] [--warmup 0.5] [--window 2] [--concurrency 32]

Method: as benchmarks/bench_client.py (one unary method, ~100-byte payload, N coroutines each with one
call in flight, figures over the calls inside the window), but every case has its own server process
and each window its own client process, since a process runs one event loop. Cases:
    plain     a grpc.aio client and a grpc.aio server, mTLS, both on asyncio's default loop: what a user
              writes without the mesh (the baseline)
    asyncio   MeshClient (get_channel + stub, full policy stack) and MeshServer, both on asyncio's loop
              under the default scheduling policy: the mesh as it ran before `aivo_mesh.run` chose uvloop
              and SCHED_BATCH
    shipped   the same pair as `aivo_mesh.run` runs it, as `meshctl serve` runs services: uvloop where it
              is installed, and SCHED_BATCH where Linux has it (aivo_mesh.scheduling) (target: >= 1.05x plain)
    plain-uv  the plain pair on that same loop: what the loop alone gives
    plain-rt  the plain pair as `aivo_mesh.run` runs it (uvloop, SCHED_BATCH): what the runtime alone gives,
              so the most a mesh run by it could read if its own work cost nothing
Every round runs every case once, starting from another case each round; a case's figure is the median
over rounds of its requests/s over plain's in the same round (quartiles, min and max reported). Each
window is metered (loadmeter.py: client and server CPU, its kernel part and context switches, foreign
load); a round whose windows saw more than --max-foreign cores of foreign load is rerun. Writes
benchmarks/results/shipped.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench_client import SERVER, die_with_parent, mesh_state, quartiles, run_case, stop_all, write_results
from loadmeter import LoadMeter, quiet_rounds

import aivo_mesh
from aivo_mesh.benchfigures import from_rounds
from aivo_mesh.eventloop import LoopChoice
from aivo_mesh.scheduling import SchedulingChoice

ROOT = Path(__file__).resolve().parents[1]
CASES = ("plain", "asyncio", "shipped", "plain-uv", "plain-rt")
LOOPS: dict[str, LoopChoice] = {"plain": "asyncio", "asyncio": "asyncio", "shipped": "auto", "plain-uv": "auto",
                                "plain-rt": "auto"}
SCHEDULING: dict[str, SchedulingChoice] = {"plain": "inherit", "asyncio": "inherit", "shipped": "auto",
                                           "plain-uv": "inherit", "plain-rt": "auto"}
PLAIN = ("plain", "plain-uv", "plain-rt")  # the cases of a plain grpc.aio client and server

PLAIN_SERVER = """
import sys
from pathlib import Path
import grpc
from aivo_mesh.pki import CertLayout
from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc

class Echo(auth_pb2_grpc.AuthServiceServicer):
    async def ValidateToken(self, request, context):
        return auth_pb2.ValidateTokenResponse(valid=True, subject=request.token)

async def main():
    certs = CertLayout(Path(sys.argv[2]))
    cert, key = certs.identity_paths("auth-svc")
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())],
                                        root_certificates=certs.ca_cert.read_bytes(), require_client_auth=True)
    server = grpc.aio.server()
    auth_pb2_grpc.add_AuthServiceServicer_to_server(Echo(), server)
    server.add_secure_port(f"127.0.0.1:{sys.argv[3]}", creds)
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()

import aivo_mesh
# asyncio's loop, the policy it was started with: as asyncio.run(main())
aivo_mesh.run(main(), loop=sys.argv[4], scheduling=sys.argv[5] if len(sys.argv) > 5 else "inherit")
"""


async def client_window(args: argparse.Namespace) -> dict[str, Any]:
    """One window of one case, in this (client) process: its figures, metered."""
    import grpc

    from aivo_mesh import MeshClient, MeshConfig
    from aivo_mesh.config import load_mesh
    from aivo_mesh.pki import CertLayout
    from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc

    certs = CertLayout(Path(args.certs))
    req = auth_pb2.ValidateTokenRequest(token="x" * 100)
    client = None
    if args.client in PLAIN:
        cert, key = certs.identity_paths("learner-svc")
        creds = grpc.ssl_channel_credentials(certs.ca_cert.read_bytes(), key.read_bytes(), cert.read_bytes())
        channel = grpc.aio.secure_channel(f"127.0.0.1:{args.port}", creds,
                                          options=[("grpc.default_authority", "auth-svc")])
    else:
        mesh = load_mesh(args.mesh_file)
        client = MeshClient(MeshConfig.for_identity("learner-svc", certs, mesh,
                                                    endpoints={"auth-svc": [f"127.0.0.1:{args.port}"]}))
        await client.warm(["auth-svc"])
        channel = await client.get_channel("auth-svc")
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    meter = LoadMeter({"client": os.getpid(), "server": args.server_pid})
    try:
        for _ in range(3):
            await stub.ValidateToken(req, timeout=5)
        result = await run_case(lambda: stub.ValidateToken(req, timeout=5), args.concurrency, args.warmup,
                                args.window, meter)
    finally:
        if client is not None:
            await client.close()
        else:
            await channel.close()
    result["loop"] = aivo_mesh.eventloop.loop_name()
    return result


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    from aivo_mesh.runtime.local import free_ports

    tmp, state = mesh_state("aivo-shipped-")
    ports = dict(zip(CASES, free_ports(len(CASES)), strict=True))
    state.mesh_file.write_text((ROOT / "mesh.yaml").read_text())
    servers: dict[str, subprocess.Popen[str]] = {}
    try:
        for case in CASES:
            code = PLAIN_SERVER if case in PLAIN else SERVER
            servers[case] = subprocess.Popen(
                [sys.executable, "-c", code, str(state.mesh_file), str(state.certs.root), str(ports[case]),
                 LOOPS[case], SCHEDULING[case]], preexec_fn=die_with_parent, stdout=subprocess.PIPE, text=True)
            out = servers[case].stdout
            assert out is not None
            out.readline()  # "ready"

        async def window(case: str) -> dict[str, Any]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--client", case, "--port", str(ports[case]),
                "--certs", str(state.certs.root), "--mesh-file", str(state.mesh_file),
                "--server-pid", str(servers[case].pid),
                "--concurrency", str(args.concurrency), "--warmup", str(args.warmup), "--window", str(args.window),
                stdout=asyncio.subprocess.PIPE)
            out, _ = await proc.communicate()
            assert proc.returncode == 0, f"{case} client exited {proc.returncode}"
            return dict(json.loads(out.decode().splitlines()[-1]))

        async def one_round(order: list[str]) -> tuple[dict[str, dict[str, Any]], float, str]:
            rnd = {case: await window(case) for case in order}
            base = rnd["plain"]["rps"]
            line = "  ".join(f"{c} {rnd[c]['rps']:5.0f} rps ({rnd[c]['rps'] / base:.3f}, {rnd[c]['loop']})"
                             for c in CASES)
            if failed := {c: rnd[c]["error_codes"] for c in CASES if rnd[c]["errors"]}:
                line += f"  ERRORS {failed}"
            return rnd, max(r["foreign_cores"] for r in rnd.values()), line

        rounds, rerun = await quiet_rounds(args.rounds, list(CASES), one_round, max_foreign=args.max_foreign,
                                           max_reruns=args.max_reruns)
    finally:
        stop_all(servers.values(), 10)
        shutil.rmtree(tmp, ignore_errors=True)
    summary: dict[str, Any] = {"concurrency": args.concurrency, "window_s": args.window, "rounds": args.rounds,
                               "rounds_rerun": rerun, "max_foreign_cores": args.max_foreign, "cases": {}}
    foreign = sorted(r["foreign_cores"] for rnd in rounds for r in rnd.values())
    summary["foreign_cores"] = {"median": statistics.median(foreign), "max": foreign[-1]}
    for case in CASES:
        ratios = sorted(rnd[case]["rps"] / rnd["plain"]["rps"] for rnd in rounds)
        summary["cases"][case] = {
            "loop": rounds[0][case]["loop"],
            "rps_median": statistics.median(rnd[case]["rps"] for rnd in rounds),
            "rps_ratio_vs_plain": statistics.median(ratios), "rps_ratio_quartiles": quartiles(ratios),
            "rps_ratio_min": ratios[0], "rps_ratio_max": ratios[-1],
            "cpu_us_per_request": {p: statistics.median(rnd[case]["cpu_us"][p] for rnd in rounds)
                                   for p in ("client", "server")},
            # Of that CPU, the kernel's, and the context switches of every thread: grpc core's sockets and
            # wake-ups, the same under any Python (docs/benchmarks.md).
            "kernel_us_per_request": {p: statistics.median(rnd[case]["kernel_us"][p] for rnd in rounds)
                                      for p in ("client", "server")},
            "switches_per_request": {p: statistics.median(rnd[case]["switches"][p] for rnd in rounds)
                                     for p in ("client", "server")},
            "p50_ms_median": statistics.median(rnd[case]["p50_ms"] for rnd in rounds),
            "errors": sum(rnd[case]["errors"] for rnd in rounds),
        }
    where = f"c={args.concurrency}"
    for case, label, target in (("shipped", "MeshClient + MeshServer as shipped", 1.05),
                                ("asyncio", "MeshClient + MeshServer on asyncio's loop", None),
                                ("plain-uv", "plain grpc.aio client and server on the shipped loop", None),
                                ("plain-rt", "plain grpc.aio client and server on the shipped runtime "
                                             "(loop and scheduling)", None)):
        summary.setdefault("figures", []).extend([
            from_rounds("client", f"{label} / plain grpc.aio client and server, requests/s, {where}",
                  [rnd[case]["rps"] / rnd["plain"]["rps"] for rnd in rounds], target=target).to_dict(),
            from_rounds("client", f"{label}: plain grpc.aio's CPU per request / its own (client + server), {where}",
                  [_cpu(rnd["plain"]) / _cpu(rnd[case]) for rnd in rounds]).to_dict()])
    for case, label in (("plain", "plain grpc.aio client and server"),
                        ("shipped", "MeshClient + MeshServer as shipped")):
        summary["figures"].append(from_rounds(
            "client", f"{label}: the kernel's share of CPU per request (client + server), {where}",
            [_cpu(rnd[case], "kernel_us") / _cpu(rnd[case]) for rnd in rounds]).to_dict())
    return summary


def _cpu(window: dict[str, Any], of: str = "cpu_us") -> float:
    return float(window[of]["client"] + window[of]["server"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--window", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-foreign", type=float, default=0.35,
                    help="rerun a round when a window saw more foreign load (cores, steal included)")
    ap.add_argument("--max-reruns", type=int, default=12)
    # One window of one case (this script runs itself as each case's client process).
    ap.add_argument("--client", choices=CASES, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--certs", help=argparse.SUPPRESS)
    ap.add_argument("--mesh-file", help=argparse.SUPPRESS)
    ap.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client is not None:
        print(json.dumps(aivo_mesh.run(client_window(args), loop=LOOPS[args.client],
                                       scheduling=SCHEDULING[args.client])))
        return
    summary = aivo_mesh.run(bench(args), loop="asyncio", scheduling="inherit")
    foreign = summary["foreign_cores"]
    print(f"\n{summary['rounds_rerun']} rounds rerun; foreign load per window: median {foreign['median']:.2f}, "
          f"max {foreign['max']:.2f} cores")
    print(f"{'case':8s} {'loop':8s} {'rps':>7s} {'ratio':>6s} {'IQR':>13s} {'min-max':>13s} {'client us':>9s} "
          f"{'server us':>9s} {'kernel us':>9s} {'switches':>8s} {'p50 ms':>7s} {'errors':>6s}")
    for case, c in summary["cases"].items():
        lo, hi = c["rps_ratio_quartiles"]
        cpu, kernel, switches = c["cpu_us_per_request"], c["kernel_us_per_request"], c["switches_per_request"]
        print(f"{case:8s} {c['loop']:8s} {c['rps_median']:7.0f} {c['rps_ratio_vs_plain']:6.3f} {lo:6.3f}-{hi:6.3f} "
              f"{c['rps_ratio_min']:6.3f}-{c['rps_ratio_max']:6.3f} {cpu['client']:9.0f} {cpu['server']:9.0f} "
              f"{kernel['client'] + kernel['server']:9.0f} {switches['client'] + switches['server']:8.1f} "
              f"{c['p50_ms_median']:7.2f} {c['errors']:6d}")
    write_results("shipped", summary)


if __name__ == "__main__":
    main()
