"""What importing the client and starting `meshctl` cost, against `import grpc` measured in the same run.

    .venv/bin/python benchmarks/bench_startup.py [--rounds 15]

Method: every case is a fresh `python -X importtime -c CODE` process; its import time is the sum of
the cumulative times of the top-level imports it reports (what the interpreter spent importing, without
its own start-up). Each round runs every case once, starting from another case each round, so load
drifting on this shared machine hits all alike; a case's figure is the median over rounds of its ratio
to `grpc` of the same round (min and max reported too). Cases:
    grpc            import grpc (the baseline: what any grpc.aio client pays)
    client          from aivo_mesh import MeshClient, MeshConfig          (target: <= 1.6x grpc)
    grpc+protos     import grpc, plus the generated auth_pb2 / auth_pb2_grpc modules
    client+protos   the client, plus the same modules (what a service that calls auth-svc imports)
    cli             python -m aivo_mesh --help: the import time of meshctl's start
and the wall time of the `meshctl --help` command itself (a new process, as a shell runs it; target:
< 0.3 s). Writes benchmarks/results/startup.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_client import write_results

from aivo_mesh.benchfigures import from_rounds

PROTOS = "from aivo_mesh.gen.aivo.auth.v1 import auth_pb2, auth_pb2_grpc"
CASES = {
    "grpc": ["-c", "import grpc"],
    "client": ["-c", "from aivo_mesh import MeshClient, MeshConfig"],
    "grpc+protos": ["-c", f"import grpc; {PROTOS}"],
    "client+protos": ["-c", f"from aivo_mesh import MeshClient, MeshConfig; {PROTOS}"],
    "cli": ["-m", "aivo_mesh", "--help"],
}


def import_ms(args: list[str]) -> float:
    """The top-level imports' cumulative time (ms) `python -X importtime ARGS` reports."""
    out = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, check=True)
    total = 0
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|")
        if not name[1:].startswith(" "):  # a top-level import, not one nested in another
            total += int(cumulative)
    return total / 1000


def meshctl_help_s() -> float:
    """Wall time of `meshctl --help`, the installed command (else `python -m aivo_mesh --help`)."""
    exe = shutil.which("meshctl", path=str(Path(sys.executable).parent))
    argv = [exe, "--help"] if exe else [sys.executable, "-m", "aivo_mesh", "--help"]
    t = time.perf_counter()
    subprocess.run(argv, capture_output=True, check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    names = [*CASES, "meshctl --help"]
    rounds: list[dict[str, float]] = []
    for _ in range(2):  # warm the page cache and the bytecode caches
        for case in CASES.values():
            import_ms(case)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        rnd = {n: meshctl_help_s() * 1000 if n == "meshctl --help" else import_ms(CASES[n]) for n in order}
        rounds.append(rnd)
        print(f"round {r + 1:2d}  " + "  ".join(f"{n} {rnd[n]:6.1f} ms" for n in names), flush=True)
    summary: dict[str, object] = {"rounds": args.rounds, "cases": {}}
    print(f"\n{'case':15s} {'median ms':>9s} {'min':>7s} {'max':>7s}   vs grpc: {'median':>6s} {'min':>5s} {'max':>5s}")
    for n in names:
        xs = sorted(rnd[n] for rnd in rounds)
        ratios = sorted(rnd[n] / rnd["grpc"] for rnd in rounds)
        summary["cases"][n] = {"ms_median": statistics.median(xs), "ms_min": xs[0], "ms_max": xs[-1],  # type: ignore[index]
                               "ratio_median": statistics.median(ratios), "ratio_min": ratios[0],
                               "ratio_max": ratios[-1]}
        print(f"{n:15s} {statistics.median(xs):9.1f} {xs[0]:7.1f} {xs[-1]:7.1f}   {statistics.median(ratios):14.2f} "
              f"{ratios[0]:5.2f} {ratios[-1]:5.2f}")
    # Same-run ratios of the protos cases to their own baseline (a service imports its protos either way).
    with_protos = sorted(rnd["client+protos"] / rnd["grpc+protos"] for rnd in rounds)
    summary["client+protos_vs_grpc+protos"] = {"median": statistics.median(with_protos), "min": with_protos[0],
                                               "max": with_protos[-1]}
    print(f"client+protos / grpc+protos: median {statistics.median(with_protos):.2f} "
          f"(min {with_protos[0]:.2f}, max {with_protos[-1]:.2f})")
    summary["figures"] = [
        from_rounds("startup", "import MeshClient, MeshConfig / import grpc (same round)",
              [rnd["client"] / rnd["grpc"] for rnd in rounds], target=1.6, higher_is_better=False).to_dict(),
        from_rounds("startup", "import MeshClient + protos / import grpc + protos",
              [rnd["client+protos"] / rnd["grpc+protos"] for rnd in rounds]).to_dict(),
        from_rounds("startup", "meshctl --help", [rnd["meshctl --help"] / 1000 for rnd in rounds], target=0.3,
              higher_is_better=False, unit="s").to_dict(),
    ]
    write_results("startup", json.loads(json.dumps(summary)))


if __name__ == "__main__":
    main()
