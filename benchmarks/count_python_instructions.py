"""Instructions per call of the client and the server process: the mesh as shipped against plain grpc.aio.

    .venv/bin/python benchmarks/count_python_instructions.py [--calls 1500] [--warmup 300] [--concurrency 32]

Requests per second on this 2-vCPU VM move by +-10 % from round to round (docs/benchmarks.md), more
than the mesh's own cost per call; instruction counts barely move. So, as count_envoy_instructions.py
does for Envoy, this counts what each process executes per call, under `valgrind --tool=callgrind`:
both processes of a case run under it; --warmup calls at --concurrency, counters zeroed
(`callgrind_control -z`), --calls calls, a dump; then the same time idle, subtracted. Cases:
    plain     a grpc.aio client and server, both on asyncio's default loop (bench_shipped.py's baseline)
    shipped   MeshClient (get_channel + stub, full policy stack) and MeshServer on `aivo_mesh.run`'s loop
    raw       a grpc.aio client on that same loop, calling the same MeshServer: the client's baseline
Counts are user-space instructions of every thread of the process (grpc core's included), and of its
event loop thread alone (the one that runs all of the Python). The kernel's share (sockets, wake-ups)
is not in them, nor are cache misses, so a ratio of counts is not a ratio of requests per second: it
is what the mesh's Python costs, without the noise. Writes
benchmarks/results/python_instructions.json. Needs valgrind; about three minutes.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).parent))
from bench_client import ROOT, SERVER, die_with_parent, mesh_state, stop_all, write_results
from bench_shipped import PLAIN_SERVER
from count_envoy_instructions import callgrind, dump_counts, require_valgrind, zero_counts

from aivo_mesh.benchfigures import Figure
from aivo_mesh.runtime.local import free_ports

# The client of one case: warms up, says "warm", waits for a line on stdin, makes the counted calls,
# says "done", waits for a line again (the idle window) and exits. `plain` and `raw` load grpc before
# aivo_mesh, as an application without the mesh would; `mesh` loads aivo_mesh first, as the docs say.
CLIENT = """
import asyncio, sys
kind, port, certs_root, mesh_file, loop, calls, warmup, concurrency = sys.argv[1:9]
if kind != "mesh":
    import grpc
import aivo_mesh
import grpc
from pathlib import Path
from aivo_mesh.pki import CertLayout
from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc

async def main():
    certs = CertLayout(Path(certs_root))
    req = auth_pb2.ValidateTokenRequest(token="x" * 100)
    client = None
    if kind == "mesh":
        from aivo_mesh import MeshClient, MeshConfig
        from aivo_mesh.config import load_mesh
        client = MeshClient(MeshConfig.for_identity("learner-svc", certs, load_mesh(mesh_file),
                                                    endpoints={"auth-svc": [f"127.0.0.1:{port}"]}))
        await client.warm(["auth-svc"])
        channel = await client.get_channel("auth-svc")
    else:
        cert, key = certs.identity_paths("learner-svc")
        creds = grpc.ssl_channel_credentials(certs.ca_cert.read_bytes(), key.read_bytes(), cert.read_bytes())
        channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=[("grpc.default_authority", "auth-svc")])
    stub = auth_pb2_grpc.AuthServiceStub(channel)

    async def batch(n, warming=False):
        left = [n]
        async def worker():
            while left[0] > 0:
                left[0] -= 1
                try:
                    await stub.ValidateToken(req, timeout=30)
                except grpc.aio.AioRpcError:
                    # Valgrind translates each code path on its first run: an early call can outlast the
                    # route's deadline. Warm-up is not counted, so such a call only needs to end.
                    if not warming:
                        raise
        await asyncio.gather(*(worker() for _ in range(int(concurrency))))

    async def line():
        return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    await batch(int(warmup), warming=True)
    print("warm", flush=True)
    await line()
    await batch(int(calls))
    print("done", flush=True)
    await line()
    if client is not None:
        await client.close()

aivo_mesh.run(main(), loop=loop, scheduling=None if kind == "mesh" else "inherit")  # as each side would run
"""


class Case(NamedTuple):
    client: str  # "plain" | "mesh"
    client_loop: str
    server: str  # "plain" | "mesh"
    server_loop: str


CASES = {
    "plain": Case("plain", "asyncio", "plain", "asyncio"),
    "shipped": Case("mesh", "auto", "mesh", "auto"),
    "raw": Case("plain", "auto", "mesh", "auto"),
}


MAIN_THREAD = "01"


def count(case: Case, calls: int, warmup: int, concurrency: int) -> dict[str, Any]:
    """Instructions per call of the client and the server of one case."""
    tmp, state = mesh_state("aivo-count-python-")
    # The repository's mesh.yaml with its short deadlines (1 s, 500 ms per try) raised: under valgrind a call
    # takes tens of times longer. Every call still has a deadline, so the same code runs.
    state.mesh_file.write_text(re.sub(r"(timeout: )\d+m?s\b", r"\g<1>60s", (ROOT / "mesh.yaml").read_text()))
    port = free_ports(1)[0]
    cg = callgrind(tmp, separate_threads=True)
    procs: list[subprocess.Popen[str]] = []
    try:
        server = subprocess.Popen(
            [*cg, sys.executable, "-c", PLAIN_SERVER if case.server == "plain" else SERVER, str(state.mesh_file),
             str(state.certs.root), str(port), case.server_loop],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, preexec_fn=die_with_parent)
        procs.append(server)
        assert server.stdout is not None
        server.stdout.readline()  # "ready"
        client = subprocess.Popen(
            [*cg, sys.executable, "-c", CLIENT, case.client, str(port), str(state.certs.root), str(state.mesh_file),
             case.client_loop, str(calls), str(warmup), str(concurrency)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=die_with_parent)
        procs.append(client)
        assert client.stdin is not None and client.stdout is not None
        if client.stdout.readline().strip() != "warm":
            assert client.stderr is not None
            raise RuntimeError(f"the {case.client} client exited before warming up: {client.stderr.read()[-2000:]}")
        pids = {"client": client.pid, "server": server.pid}
        for pid in pids.values():
            zero_counts(pid)
        started = time.monotonic()
        client.stdin.write("go\n")
        client.stdin.flush()
        if client.stdout.readline().strip() != "done":
            raise RuntimeError(f"the {case.client} client exited during the counted calls")
        elapsed = time.monotonic() - started
        busy = {who: dump_counts(pid, tmp) for who, pid in pids.items()}
        for pid in pids.values():
            zero_counts(pid)
        time.sleep(elapsed)
        idle = {who: dump_counts(pid, tmp) for who, pid in pids.items()}
        client.stdin.write("exit\n")
        client.stdin.flush()
        client.wait(120)
        if any(MAIN_THREAD not in counts for counts in busy.values()):
            raise RuntimeError("callgrind wrote no dump of a main thread")

        def per_call(who: str, thread: str | None = None) -> int:
            threads = [thread] if thread else busy[who]
            return round(sum(busy[who].get(t, 0) - idle[who].get(t, 0) for t in threads) / calls)

        per = {who: per_call(who) for who in pids}
        # Thread 1 is the main thread: the one running the event loop, and with it all of the Python.
        loop = {who: per_call(who, MAIN_THREAD) for who in pids}
        return {**per, "total": per["client"] + per["server"], "event_loop_thread": loop, "busy": busy,
                "idle": idle, "calls": calls, "seconds": round(elapsed, 1)}
    finally:
        stop_all(procs, 60)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1500)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    require_valgrind()
    cases: dict[str, Any] = {}
    for name, case in CASES.items():
        cases[name] = {**case._asdict(), **count(case, args.calls, args.warmup, args.concurrency)}
        r = cases[name]
        loop = r["event_loop_thread"]
        print(f"{name:8s} client {r['client']:>9,} ({loop['client']:>9,} event loop)  server {r['server']:>9,} "
              f"({loop['server']:>9,} event loop)  total {r['total']:>9,} instructions/call", flush=True)
    plain, shipped, raw = cases["plain"], cases["shipped"], cases["raw"]
    where = f"c={args.concurrency}"
    ratios = {
        f"plain grpc.aio client and server / MeshClient + MeshServer as shipped, instructions per call, {where}":
            plain["total"] / shipped["total"],
        f"plain grpc.aio server / MeshServer as shipped, instructions per call, {where}":
            plain["server"] / shipped["server"],
        f"raw grpc.aio client / MeshClient (same loop, same MeshServer), instructions per call, {where}":
            raw["client"] / shipped["client"],
        f"plain grpc.aio server / MeshServer as shipped, the event loop thread's instructions per call, {where}":
            plain["event_loop_thread"]["server"] / shipped["event_loop_thread"]["server"],
    }
    summary: dict[str, Any] = {"concurrency": args.concurrency, "cases": cases,
                               "ratios": {k: round(v, 3) for k, v in ratios.items()},
                               "mesh_client_extra_instructions_per_call": shipped["client"] - raw["client"]}
    # One count per case, exact for its run: no spread (a case counts within about 2 % from run to run).
    summary["figures"] = [Figure("client", name, round(r, 3), round(r, 3), round(r, 3), "x", spread="-").to_dict()
                          for name, r in ratios.items()]
    print(json.dumps(summary["ratios"], indent=2))
    write_results("python_instructions", summary)


if __name__ == "__main__":
    main()
