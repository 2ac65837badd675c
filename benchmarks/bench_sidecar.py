"""What the Envoy sidecar plane costs, measured against baselines in the same run.

    .venv/bin/python benchmarks/bench_sidecar.py [--reps 15] [--warmup 0.5] [--window 2] [--window-c1 1.5]

Cases (unary echo of a 100-byte payload; one client process, one server process, Envoys with
--concurrency 1; the method is bench_client.py's):
    direct     client --mTLS--> grpc.aio server                                  (baseline for latency)
    minimal    client --> Envoy --mTLS--> Envoy --> server, a minimal hand-written two-hop config
    rendered   client --> learner sidecar --mTLS--> auth sidecar --> server, bootstraps rendered
               from mesh.yaml (RBAC, grpc_stats, retries, budgets, outlier detection, health checks)
Many short rounds (as bench_client.py): each round runs every case at c=1 then at c=32, starting from
another case each round, so drifting load on the shared cores hits every case alike. Reported, as the
median over rounds of the same round's figures: added p50 at concurrency 1 (rendered - direct, and
minimal - direct for scale) and the requests-per-second ratio rendered / minimal at concurrency 32,
with interquartile ranges, and the CPU us per request of every process on each path
(benchmarks/loadmeter.py; a round whose windows saw more than --max-foreign cores of foreign load is
rerun). Writes benchmarks/results/sidecar.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import yaml

from aivo_mesh.benchfigures import from_rounds
from aivo_mesh.config import MeshSpec, load_mesh
from aivo_mesh.config.ports import sidecar_ports
from aivo_mesh.pki import CertLayout
from aivo_mesh.pki.issue import init_ca, issue_leaf
from aivo_mesh.render import serialize
from aivo_mesh.render.envoy import EnvoyProfile, bootstrap, sds_files
from aivo_mesh.runtime.local import free_ports, with_free_ports
from aivo_mesh.runtime.mesh import envoy_binary

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from bench_client import die_with_parent, quartiles, run_case, stop_all, write_results
from loadmeter import LoadMeter, quiet_rounds

METHOD = "/aivo.auth.v1.AuthService/ValidateToken"
SERVER = """
import asyncio, sys
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

async def echo(request, context):
    return request

async def main():
    port, ca, cert, key = int(sys.argv[1]), *sys.argv[2:5]
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "aivo.auth.v1.AuthService", {"ValidateToken": grpc.unary_unary_rpc_method_handler(echo)}),))
    checker = health.aio.HealthServicer()
    await checker.set("aivo.auth.v1.AuthService", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    creds = grpc.ssl_server_credentials([(open(key, "rb").read(), open(cert, "rb").read())],
                                        root_certificates=open(ca, "rb").read(), require_client_auth=True)
    server.add_secure_port(f"127.0.0.1:{port + 1}", creds)
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


def minimal_two_hop(certs: CertLayout, outbound: int, inbound: int, app: int, admin: int, side: str) -> dict[str, Any]:
    """The smallest config that does the same job: plaintext h2 in, mTLS 1.3 between, h2 out."""
    h2 = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}
    cert, key = certs.identity_paths("auth-svc" if side == "in" else "learner-svc")
    tls_ctx = {"tls_certificates": [{"certificate_chain": {"filename": str(cert)},
                                     "private_key": {"filename": str(key)}}],
               "validation_context": {"trusted_ca": {"filename": str(certs.ca_cert)}},
               "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
               "alpn_protocols": ["h2"]}
    hcm = {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": side, "codec_type": "HTTP2",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "next", "timeout": "5s"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}
    listener: dict[str, Any] = {"name": side, "address": {"socket_address": {
        "address": "127.0.0.1", "port_value": inbound if side == "in" else outbound}},
        "filter_chains": [{"filters": [hcm]}]}
    cluster: dict[str, Any] = {"name": "next", "type": "STATIC", "connect_timeout": "1s",
                               "typed_extension_protocol_options": h2,
                               "load_assignment": {"cluster_name": "next", "endpoints": [{"lb_endpoints": [
                                   {"endpoint": {"address": {"socket_address": {
                                       "address": "127.0.0.1", "port_value": app if side == "in" else inbound}}}}]}]}}
    if side == "in":
        listener["filter_chains"][0]["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True, "common_tls_context": tls_ctx}}
    else:
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "auth-svc", "common_tls_context": tls_ctx}}
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {"listeners": [listener], "clusters": [cluster]}}


def wait_live(admin: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"envoy admin {admin} not ready")


class Paths(NamedTuple):
    """Everything on the three paths, written and ready to start: the server's argv, and per Envoy
    (`rendered-in`, `rendered-out`, `minimal-in`, `minimal-out`) its bootstrap and admin port."""

    mesh: MeshSpec
    certs: CertLayout
    server_argv: list[str]
    envoys: dict[str, tuple[Path, int]]
    direct: int  # the server's mTLS port
    minimal: int  # the minimal pair's outbound port
    rendered: int  # the learner sidecar's outbound port


def prepare(tmp: Path) -> Paths:
    """Certificates, the echo server's argv, and both Envoy pairs' bootstraps (rendered: tracing off)."""
    mesh = with_free_ports(load_mesh(ROOT / "mesh.yaml"))
    certs = CertLayout(tmp / "certs")
    init_ca(certs, mesh.mesh.trust_domain)
    for name in ("auth-svc", "learner-svc", "mesh-client"):
        issue_leaf(certs, name, mesh)
    # The plaintext app port comes from the OS (its +1 is the mTLS port, which could collide otherwise).
    app, spare_in, spare_out, spare_a1, spare_a2 = free_ports(5)
    mesh = mesh.model_copy(update={"services": tuple(
        s.model_copy(update={"local_port": app}) if s.name == "auth-svc" else s for s in mesh.services)})
    cert, key = certs.identity_paths("auth-svc")
    envoys: dict[str, tuple[Path, int]] = {}
    for svc in ("auth-svc", "learner-svc"):
        d = tmp / "rendered" / svc
        (d / "sds").mkdir(parents=True)
        profile = EnvoyProfile.local(str(certs.root), str(d / "sds"))
        for rel, doc in sds_files(mesh, svc, profile).items():
            (d / "sds" / rel).write_text(serialize(rel, doc))
        (d / "envoy.yaml").write_text(serialize("envoy.yaml", bootstrap(mesh, svc, profile)))
        side = "in" if svc == "auth-svc" else "out"
        envoys[f"rendered-{side}"] = (d / "envoy.yaml", sidecar_ports(mesh, svc, "local").admin)
    for side, admin in (("in", spare_a1), ("out", spare_a2)):
        path = tmp / f"minimal-{side}.yaml"
        path.write_text(yaml.safe_dump(minimal_two_hop(certs, spare_out, spare_in, app, admin, side)))
        envoys[f"minimal-{side}"] = (path, admin)
    return Paths(mesh, certs, [sys.executable, "-c", SERVER, str(app), str(certs.ca_cert), str(cert), str(key)],
                 envoys, app + 1, spare_out, sidecar_ports(mesh, "learner-svc", "local").outbound)


def start_server(argv: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, preexec_fn=die_with_parent)
    assert proc.stdout is not None
    proc.stdout.readline()  # "ready"
    return proc


def start_envoy(envoy: str, path: Path, *, wrapper: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """One Envoy as the sidecar plane runs it; it must pass `envoy --mode validate` first."""
    out = subprocess.run([envoy, "--mode", "validate", "-c", str(path)], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return subprocess.Popen([*wrapper, envoy, "-c", str(path), "--concurrency", "1", "--log-level", "warn",
                             "--disable-hot-restart"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=die_with_parent)


def client_credentials(certs: CertLayout) -> grpc.ChannelCredentials:
    cert, key = certs.identity_paths("learner-svc")
    return grpc.ssl_channel_credentials(certs.ca_cert.read_bytes(), key.read_bytes(), cert.read_bytes())


def echo(channel: grpc.aio.Channel) -> Any:
    return channel.unary_unary(METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)


async def first_answer(call: Any, deadline: float, *, per_call: float) -> None:
    """Call the echo until it answers (a sidecar routes once its first health check passed); the
    last error is raised after `deadline` (time.monotonic())."""
    while True:
        try:
            await call(b"x" * 100, timeout=per_call)
            return
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    paths = prepare(Path(tempfile.mkdtemp(prefix="aivo-bench-sidecar-")))
    procs: list[subprocess.Popen[Any]] = [start_server(paths.server_argv)]
    envoy = envoy_binary()
    pids = {"client": os.getpid(), "server": procs[0].pid}
    for label, (path, _) in paths.envoys.items():
        procs.append(start_envoy(envoy, path))
        pids[label] = procs[-1].pid
    meter = LoadMeter(pids)
    for _, admin in paths.envoys.values():
        wait_live(admin)
    channels = {
        "direct": grpc.aio.secure_channel(f"127.0.0.1:{paths.direct}", client_credentials(paths.certs),
                                          options=[("grpc.default_authority", "auth-svc")]),
        "minimal": grpc.aio.insecure_channel(f"127.0.0.1:{paths.minimal}"),
        "rendered": grpc.aio.insecure_channel(f"127.0.0.1:{paths.rendered}"),
    }
    payload = b"x" * 100
    calls = {name: echo(ch) for name, ch in channels.items()}
    results: dict[str, dict[int, list[dict[str, Any]]]] = {n: {1: [], 32: []} for n in calls}
    try:
        deadline = time.monotonic() + 20  # the rendered sidecar waits for its first health check
        for call in calls.values():
            await first_answer(call, deadline, per_call=2)
        names = list(calls)

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
    added = [r["p50_ms"] - d["p50_ms"] for r, d in zip(results["rendered"][1], results["direct"][1], strict=True)]
    added_min = [r["p50_ms"] - d["p50_ms"] for r, d in zip(results["minimal"][1], results["direct"][1], strict=True)]
    rps_ratios = [r["rps"] / m["rps"] for r, m in zip(results["rendered"][32], results["minimal"][32], strict=True)]

    def cpu(case: str, conc: int) -> dict[str, float]:
        """Median CPU us per request of the processes on `case`'s path (the other Envoys idle)."""
        on_path = ["client", "server", *([f"{case}-out", f"{case}-in"] if case != "direct" else [])]
        return {p: statistics.median(x["cpu_us"][p] for x in results[case][conc]) for p in on_path}

    return {
        "rounds": args.reps, "rounds_rerun": rerun, "max_foreign_cores": args.max_foreign,
        "window_s": {"c1": args.window_c1, "c32": args.window},
        "cpu_us_per_request": {n: {f"c{c}": cpu(n, c) for c in (1, 32)} for n in results},
        "added_p50_ms_rendered_vs_direct_quartiles": quartiles(added),
        "rps_ratio_rendered_vs_minimal_c32_quartiles": quartiles(rps_ratios),
        "p50_ms_c1": {n: statistics.median(x["p50_ms"] for x in v[1]) for n, v in results.items()},
        "rps_c32": {n: statistics.median(x["rps"] for x in v[32]) for n, v in results.items()},
        "added_p50_ms_rendered_vs_direct": statistics.median(added),
        "added_p50_ms_minimal_vs_direct": statistics.median(added_min),
        "rps_ratio_rendered_vs_minimal_c32": statistics.median(rps_ratios),
        "errors": sum(x["errors"] for v in results.values() for c in v.values() for x in c),
        "figures": [
            from_rounds("sidecar", "latency the rendered sidecars add to a direct mTLS call, p50 at c=1", added,
                        target=1.0, higher_is_better=False, unit="ms").to_dict(),
            from_rounds("sidecar", "latency a minimal two-hop Envoy adds to a direct mTLS call, p50 at c=1",
                        added_min, higher_is_better=False, unit="ms").to_dict(),
            from_rounds("sidecar", "rendered sidecars / a minimal two-hop Envoy, requests/s, c=32", rps_ratios,
                        target=0.95).to_dict(),
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15, help="rounds; each runs every case at c=1 and c=32")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--window", type=float, default=2.0, help="seconds per case at c=32")
    ap.add_argument("--window-c1", type=float, default=1.5, help="seconds per case at c=1")
    ap.add_argument("--max-foreign", type=float, default=0.25,
                    help="rerun a round when a window saw more foreign load (cores, steal included)")
    ap.add_argument("--max-reruns", type=int, default=15, help="give up rerunning after this many")
    args = ap.parse_args()
    summary = asyncio.run(bench(args))
    print(json.dumps(summary, indent=2))
    write_results("sidecar", summary)


if __name__ == "__main__":
    main()
