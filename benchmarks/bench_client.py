"""Throughput of the proxyless plane vs raw grpc.aio over mTLS, measured in the same run.

    .venv/bin/python benchmarks/bench_client.py [--reps 20] [--warmup 0.5] [--window 2] [--concurrency 32]
                                                [--no-tracing] [--no-xds] [--loop asyncio|uvloop]

Method: one unary method with a ~100-byte payload, one server process,
one client process holding N coroutines each with one call in flight. Many short rounds rather than
a few long windows: every round runs every case once (0.5 s warm-up, 2 s window), starting from a
different case each time, so load drifting on this shared 2-core machine hits all cases alike.
A case's figure is the median over rounds of its ratio to the raw case of the same round (the
interquartile range of those ratios is reported too). Cases:
    raw       grpc.aio secure_channel + stub, mTLS (the baseline)
    noop      as raw, plus one no-op UnaryUnaryClientInterceptor: the floor grpc.aio's interceptor
              machinery (a Task per call) sets for any interceptor-based stack
    mesh      MeshClient.get_channel + stub: full policy stack, tracing off (MeshChannel: the stack
              entered directly, no grpc.aio interceptor Task)
    xds       as mesh, on the control plane: a second MeshClient whose policy, routes and endpoints come
              from a live control plane (`meshctl control-plane`, its own process) through a
              ProxylessNode, connected, subscribed and applied before the first round and connected
              through every window; checked before the rounds to hold the node's configuration, and
              after each round to have stayed connected with that one configuration
    icpt      the same stack behind grpc.aio's interceptor machinery (the target's front channel,
              what get_channel returned before 2026-12-03)
    cwr       MeshClient.call_with_retry: the same stack, called without a grpc.aio interceptor
    traced    as mesh, tracing on (always sample, batch export to an in-process OTLP receiver)
`--loop` picks the event loop of the client process and the server alike (default asyncio's own;
uvloop is what `meshctl serve` and `aivo_mesh.run` use where it is installed).
Every window is metered (benchmarks/loadmeter.py): CPU us per request of the client and the server
process (and of the control plane, which is not counted as foreign load), and foreign load; a round
whose windows saw more than --max-foreign cores of it is rerun.
Prints a table and writes JSON next to this file (benchmarks/results/client.json).
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
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

# aivo_mesh before grpc, as in any mesh process: it sets what grpc core reads once, at import (aivo_mesh.tls).
import aivo_mesh  # noqa: F401  # isort: skip
import grpc

from aivo_mesh import run
from aivo_mesh.benchfigures import from_rounds
from aivo_mesh.client import MeshClient, MeshConfig
from aivo_mesh.config import load_mesh
from aivo_mesh.config.resolve import route_policies
from aivo_mesh.pki.issue import init_ca, issue_all
from aivo_mesh.runtime.local import free_ports
from aivo_mesh.runtime.state import StateDir
from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc

sys.path.insert(0, str(Path(__file__).parent))
from loadmeter import LoadMeter, Window, quiet_rounds

ROOT = Path(__file__).resolve().parents[1]
SERVER = """
import asyncio, sys
from pathlib import Path
from aivo_mesh.config import load_mesh
from aivo_mesh.pki import CertLayout
from aivo_mesh.server import MeshServer
from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc

class Echo(auth_pb2_grpc.AuthServiceServicer):
    async def ValidateToken(self, request, context):
        return auth_pb2.ValidateTokenResponse(valid=True, subject=request.token)

async def main():
    mesh = load_mesh(sys.argv[1])
    server = MeshServer.for_service(mesh, "auth-svc", CertLayout(Path(sys.argv[2])), port=int(sys.argv[3]))
    auth_pb2_grpc.add_AuthServiceServicer_to_server(Echo(), server.grpc_server)
    server.add_service_name("aivo.auth.v1.AuthService")  # else health checks say NOT_FOUND: panic mode
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()

import aivo_mesh
aivo_mesh.run(main(), loop=sys.argv[4] if len(sys.argv) > 4 else "asyncio",
              scheduling=sys.argv[5] if len(sys.argv) > 5 else None)
"""


def stop_all(procs: Iterable[subprocess.Popen[Any]], timeout: float) -> None:
    """SIGTERM every process still running, then wait for each (up to `timeout` seconds apiece): a
    benchmark's servers, Envoys or clients, in its `finally`."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        p.wait(timeout)


def die_with_parent() -> None:
    """`preexec_fn` for the benchmark's child processes (server, Envoys): the kernel sends them
    SIGTERM when this process dies, so an interrupted run leaves nothing behind (Linux only)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class NoopInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(client_call_details, request)


RESULTS = Path(__file__).parent / "results"


class ControlPlaneProcess:
    """`meshctl control-plane` in its own process (as `meshctl up --plane proxyless` runs it: every service
    reached at its own address), so that serving ADS never shares the client's event loop; and the
    ProxylessNode that feeds one MeshClient from it, on the client's loop, as `meshctl serve
    --control-plane` does."""

    def __init__(self, state: StateDir, mesh: Any, log: Path) -> None:
        self.state = state
        self.mesh = mesh
        self.log = log
        self.applied: list[Any] = []  # every ProxylessConfig the node applied
        with log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "aivo_mesh", "control-plane", "--state-dir", str(state.root),
                 "--log-level", "WARNING", *(a for name in mesh.service_names for a in ("--direct", name))],
                preexec_fn=die_with_parent, stdout=subprocess.DEVNULL, stderr=err)

    async def feed(self, client: MeshClient, identity: str, timeout: float = 30.0) -> Any:
        """Start the node of `client` (its identity's certificate) and wait until it applied the control
        plane's first configuration; the node, connected."""
        from aivo_mesh.xds.node import ProxylessNode

        cert, key = self.state.certs.identity_paths(identity)
        deadline = time.monotonic() + timeout
        while not await self._listening():  # else the node's first tries log refused connections
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the control plane did not start (exit {self.proc.poll()}): "
                                 f"{self.log.read_text()[-2000:]}")
            await asyncio.sleep(0.1)

        def apply(config: Any) -> None:
            client.apply_control_plane(config.targets)
            self.applied.append(config)

        node = ProxylessNode(self.mesh, identity, self.mesh.control_plane.address, cert=cert, key=key,
                             ca=self.state.certs.ca_cert, apply=apply)
        node.start()
        if not await node.wait_applied(timeout) or not node.subscription.connected:
            await node.stop()
            raise SystemExit(f"no configuration from the control plane within {timeout:.0f}s: {node.status()}\n"
                             f"control plane (exit {self.proc.poll()}): {self.log.read_text()[-2000:]}")
        return node

    async def _listening(self) -> bool:
        host, port = self.mesh.control_plane.host_port
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            return False
        writer.close()
        await writer.wait_closed()
        return True

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def check_on_control_plane(node: Any, cp: ControlPlaneProcess, client: MeshClient, service: str, mesh: Any) -> None:
    """`client`'s target `service` runs what the node applied (once): the control plane's policy, routes
    and endpoints; and those mean what mesh.yaml means, so `xds` measures the same stack as `mesh`."""
    assert node.subscription.applies == 1 and len(cp.applied) == 1, node.status()
    sent = cp.applied[0].targets[service]
    target = client.target(service)
    assert target.policy.policy is sent.policy and target.policy.routes is sent.routes, "not the node's config"
    assert target.policy.balancer.endpoints == [e.address for e in sent.endpoints if e.healthy], \
        (target.policy.balancer.endpoints, sent.endpoints)
    assert sent.routes == route_policies(mesh, service), "the control plane's routes differ from mesh.yaml's"


def still_on_control_plane(node: Any, cp: ControlPlaneProcess) -> str | None:
    """None while the node has stayed connected with its one configuration, else what went wrong. A broken
    stream leaves `last_error` set: a resumed stream gets no response from an unchanged control plane."""
    sub = node.subscription
    if not sub.connected or sub.last_error is not None or sub.applies != 1 or len(cp.applied) != 1:
        return f"node connected={sub.connected} applies={sub.applies} last_error={sub.last_error}"
    if cp.proc.poll() is not None:
        return f"control plane exited {cp.proc.returncode}"
    return None


def write_results(name: str, summary: dict[str, Any], out: Path = RESULTS) -> None:
    """benchmarks/results/<name>.json, the summary every benchmark script leaves behind."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")


def quartiles(xs: list[float]) -> list[float]:
    """First and third quartile (the interquartile range) of per-round figures."""
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return [q[0], q[2]]


async def run_case(call: Callable[[], Awaitable[Any]], concurrency: int, warmup: float,
                   window: float, meter: LoadMeter | None = None) -> dict[str, Any]:
    """One case for `warmup + window` seconds; figures over calls that started and ended in the window.
    With a meter, also the window's CPU per request per process and the foreign load."""
    start = time.monotonic()
    t0, t1 = start + warmup, start + warmup + window
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def worker() -> None:
        while True:
            s = time.monotonic()
            if s >= t1:
                return
            try:
                await call()
            except grpc.aio.AioRpcError as err:  # counted apart: a failed call is not throughput
                if s >= t0:
                    errors[err.code().name] = errors.get(err.code().name, 0) + 1
                continue
            e = time.monotonic()
            if s >= t0 and e <= t1:
                latencies.append(e - s)

    async def metered() -> Window | None:
        if meter is None:
            return None
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        meter.start()
        await asyncio.sleep(max(0.0, t1 - time.monotonic()))
        return meter.stop()

    *_, w = await asyncio.gather(*(worker() for _ in range(concurrency)), metered())
    latencies.sort()
    n = len(latencies)
    out: dict[str, Any] = {"rps": n / window, "p50_ms": latencies[n // 2] * 1000 if n else 0.0,
                           "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if n else 0.0,
                           "errors": sum(errors.values()), "error_codes": errors}
    if w is not None:
        out["cpu_us"] = w.cpu_us_per(n)
        out["kernel_us"] = w.kernel_us_per(n)
        out["switches"] = w.switches_per(n)
        out["foreign_cores"] = w.foreign_cores
        out["steal_cores"] = w.steal_cores
    return out


def mesh_state(prefix: str) -> tuple[Path, StateDir]:
    """A new temporary folder (removed by the caller) holding one state directory, as `meshctl up` keeps
    one: the mesh CA and a certificate for every identity of the repository's mesh.yaml (the control
    plane's too). The caller writes the mesh.yaml its processes read into it."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    state = StateDir(tmp / "state")
    state.ensure()
    mesh = load_mesh(ROOT / "mesh.yaml")
    init_ca(state.certs, mesh.mesh.trust_domain)
    issue_all(state.certs, mesh)
    return tmp, state


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    # auth-svc and the control plane on free ports, in the mesh.yaml every process of the run reads.
    tmp, state = mesh_state("aivo-bench-")
    certs = state.certs
    port, ads_port, cp_admin_port = free_ports(3)
    mesh_file = state.mesh_file
    cp_addresses = f"{{address: 127.0.0.1:{ads_port}, admin_address: 127.0.0.1:{cp_admin_port}}}"
    mesh_file.write_text((ROOT / "mesh.yaml").read_text().replace("port: 50051", f"port: {port}")
                         + f"\ncontrol_plane: {cp_addresses}\n")
    mesh = load_mesh(mesh_file)
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(mesh_file), str(certs.root), str(port), args.loop],
                              preexec_fn=die_with_parent,
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    server.stdout.readline()  # "ready": the server has bound and reports SERVING
    control_plane = ControlPlaneProcess(state, mesh, tmp / "control-plane.log") if args.xds else None
    payload = "x" * 100
    req = auth_pb2.ValidateTokenRequest(token=payload)
    cert, key = certs.identity_paths("learner-svc")
    raw_creds = grpc.ssl_channel_credentials(certs.ca_cert.read_bytes(), key.read_bytes(), cert.read_bytes())
    raw_channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", raw_creds,
                                          options=[("grpc.default_authority", "auth-svc")])
    raw_stub = auth_pb2_grpc.AuthServiceStub(raw_channel)
    noop_channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", raw_creds,
                                           options=[("grpc.default_authority", "auth-svc")],
                                           interceptors=[NoopInterceptor()])
    noop_stub = auth_pb2_grpc.AuthServiceStub(noop_channel)
    mesh_client = MeshClient(MeshConfig.for_identity("learner-svc", certs, mesh))
    mesh_stub = auth_pb2_grpc.AuthServiceStub(await mesh_client.get_channel("auth-svc"))
    icpt_stub = auth_pb2_grpc.AuthServiceStub(mesh_client.target("auth-svc").front)
    xds_client = node = xds_stub = None
    if control_plane is not None:  # the same client as `mesh`, on the control plane
        xds_client = MeshClient(MeshConfig.for_identity("learner-svc", certs, mesh))
        node = await control_plane.feed(xds_client, "learner-svc")
        xds_stub = auth_pb2_grpc.AuthServiceStub(await xds_client.get_channel("auth-svc"))
        check_on_control_plane(node, control_plane, xds_client, "auth-svc", mesh)
    traced_stub = None
    receiver = None
    if args.tracing:
        from aivo_mesh.telemetry.otlp_receiver import OtlpReceiver

        receiver = OtlpReceiver()
        await receiver.start()
        rport = receiver.port
        traced_mesh = mesh.model_copy(update={"observability": mesh.observability.model_copy(update={
            "tracing": mesh.observability.tracing.model_copy(update={
                "enabled": True, "otlp_endpoint": f"http://127.0.0.1:{rport}", "sample_ratio": 1.0})})})
        traced_client = MeshClient(MeshConfig.for_identity("learner-svc", certs, traced_mesh))
        traced_stub = auth_pb2_grpc.AuthServiceStub(await traced_client.get_channel("auth-svc"))
    cases: dict[str, Callable[[], Awaitable[Any]]] = {
        "raw": lambda: raw_stub.ValidateToken(req, timeout=5),
        "noop": lambda: noop_stub.ValidateToken(req, timeout=5),
        "mesh": lambda: mesh_stub.ValidateToken(req, timeout=5),
        **({"xds": lambda: xds_stub.ValidateToken(req, timeout=5)} if xds_stub is not None else {}),
        "icpt": lambda: icpt_stub.ValidateToken(req, timeout=5),
        "cwr": lambda: mesh_client.call_with_retry(service_name="auth-svc", method_name="ValidateToken",
                                                   request=req, timeout=5),
    }
    if traced_stub is not None:
        cases["traced"] = lambda: traced_stub.ValidateToken(req, timeout=5)
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    pids = {"client": os.getpid(), "server": server.pid}
    if control_plane is not None:  # its CPU is the run's own, not foreign load
        pids["control_plane"] = control_plane.proc.pid
    meter = LoadMeter(pids)
    try:
        for _ in range(3):  # connect and warm every path before measuring
            for c in cases.values():
                await c()
        names = list(cases)

        async def one_round(order: list[str]) -> tuple[dict[str, dict[str, Any]], float, str]:
            rnd = {name: await run_case(cases[name], args.concurrency, args.warmup, args.window, meter)
                   for name in order}
            base = rnd["raw"]["rps"]
            line = "  ".join(f"{n} {rnd[n]['rps']:5.0f} rps ({rnd[n]['rps'] / base:.3f})" for n in names)
            if failed := {n: rnd[n]["error_codes"] for n in names if rnd[n]["errors"]}:
                line += f"  ERRORS {failed}"
            if node is not None and control_plane is not None and (lost := still_on_control_plane(node, control_plane)):
                raise SystemExit(f"the xds case left the control plane during the round: {lost}")
            return rnd, max(r["foreign_cores"] for r in rnd.values()), line

        rounds, rerun = await quiet_rounds(args.reps, names, one_round, max_foreign=args.max_foreign,
                                           max_reruns=args.max_reruns)
        for rnd in rounds:
            for n in names:
                results[n].append(rnd[n])
    finally:
        await raw_channel.close()
        await noop_channel.close()
        await mesh_client.close()
        if node is not None:
            await node.stop()
        if xds_client is not None:
            await xds_client.close()
        if control_plane is not None:
            control_plane.stop()
        if receiver is not None:
            await receiver.stop()
        server.terminate()
        server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)  # the run's keys among it
    summary: dict[str, Any] = {"loop": args.loop, "concurrency": args.concurrency, "window_s": args.window,
                               "reps": args.reps, "max_foreign_cores": args.max_foreign, "rounds_rerun": rerun,
                               "cases": {}}
    if node is not None:
        summary["xds_node"] = {"applies": node.subscription.applies, "connected": node.subscription.connected}
    foreign = sorted(r["foreign_cores"] for reps in results.values() for r in reps)
    summary["foreign_cores"] = {"median": statistics.median(foreign), "max": foreign[-1]}
    if control_plane is not None:  # what serving ADS to one idle node costs, in every window alike
        summary["control_plane_cores"] = statistics.median(
            r["cpu_us"]["control_plane"] * r["rps"] / 1e6 for reps in results.values() for r in reps)
    for name, reps in results.items():
        ratios = [r["rps"] / b["rps"] for r, b in zip(reps, results["raw"], strict=True)]
        # Total CPU per request (client + server, all threads) of raw / of this case: the throughput
        # ratio a CPU-bound run converges to, and much less sensitive to steal than requests/s.
        cpu_ratios = [(b["cpu_us"]["client"] + b["cpu_us"]["server"]) / (r["cpu_us"]["client"] + r["cpu_us"]["server"])
                      for r, b in zip(reps, results["raw"], strict=True)]
        summary["cases"][name] = {
            "rps_median": statistics.median(r["rps"] for r in reps),
            "rps_ratio_quartiles": quartiles(ratios),
            "p50_ms_median": statistics.median(r["p50_ms"] for r in reps),
            "p99_ms_median": statistics.median(r["p99_ms"] for r in reps),
            "rps_ratio_vs_raw": statistics.median(ratios),
            "cpu_us_per_request": {p: statistics.median(r["cpu_us"][p] for r in reps) for p in meter.pids},
            "cpu_ratio_vs_raw": statistics.median(cpu_ratios),
            "cpu_ratio_quartiles": quartiles(cpu_ratios),
            "errors": sum(r["errors"] for r in reps),
        }
        if (what := CLIENT_FIGURES.get(name)) is not None:
            label, target = what
            where = f"c={args.concurrency}, client and server on {args.loop}"
            summary.setdefault("figures", []).extend([
                from_rounds("client", f"{label} / raw grpc.aio, requests/s, {where}", ratios,
                            target=target).to_dict(),
                from_rounds("client", f"{label}: raw grpc.aio's CPU per request / its own, {where}",
                            cpu_ratios).to_dict()])
    return summary


# The cases `meshctl bench client` reports, and their targets (requests/s over raw's in the same round).
CLIENT_FIGURES: dict[str, tuple[str, float | None]] = {
    "mesh": ("the stub path (MeshClient.get_channel + stub)", 0.95),
    "traced": ("the stub path, traced", 0.85),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20, help="rounds; each runs every case once")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--window", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--no-tracing", dest="tracing", action="store_false")
    ap.add_argument("--no-xds", dest="xds", action="store_false", help="leave out the case on the control plane")
    ap.add_argument("--max-foreign", type=float, default=0.25,
                    help="rerun a round when a window saw more foreign load (cores, steal included)")
    ap.add_argument("--max-reruns", type=int, default=20, help="give up rerunning after this many")
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                    help="the event loop of the client process and of the server (aivo_mesh.run)")
    args = ap.parse_args()
    summary = run(bench(args), loop=args.loop)
    print()
    foreign = summary["foreign_cores"]
    print(f"{summary['rounds_rerun']} rounds rerun for foreign load > {args.max_foreign} cores; foreign load "
          f"per window: median {foreign['median']:.2f}, max {foreign['max']:.2f} cores")
    print(f"{'case':8s} {'rps':>8s} {'ratio':>7s} {'ratio IQR':>13s} {'cpu ratio':>9s} {'client us':>9s} "
          f"{'server us':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>7s}")
    for name, c in summary["cases"].items():
        lo, hi = c["rps_ratio_quartiles"]
        cpu = c["cpu_us_per_request"]
        print(f"{name:8s} {c['rps_median']:8.0f} {c['rps_ratio_vs_raw']:7.3f} {lo:6.3f}-{hi:6.3f} "
              f"{c['cpu_ratio_vs_raw']:9.3f} {cpu['client']:9.0f} {cpu['server']:9.0f} "
              f"{c['p50_ms_median']:8.2f} {c['p99_ms_median']:8.2f} {c['errors']:7d}")
    if "control_plane_cores" in summary:
        print(f"control plane process: {summary['control_plane_cores']:.3f} cores (median over windows); the xds "
              f"node applied {summary['xds_node']['applies']} configuration(s) and stayed connected")
    write_results("client", summary)


if __name__ == "__main__":
    main()
