"""The control plane and the renderers on generated meshes: loading, every sidecar's snapshot, rendering, memory.

    .venv/bin/python benchmarks/bench_control_plane.py [--sizes 100 1000] [--rounds 3] [--baseline REF]
                                                       [--quick] [--results-dir DIR]

Each mesh.yaml comes from benchmarks/meshgen.py (N services, two routes each, three allowed callers each).
Every measurement runs in a process of its own, with this checkout's aivo_mesh or, with `--baseline REF`,
the source tree of that git commit (extracted from this repository): the same script, the same meshes and
the same rounds, so each figure has a baseline measured in the same run. The two trees alternate within
every round, and every round starts from the other tree.

In each process, after a warm-up on a mesh of 10 services (the first build in a process also plans its
message types), every case runs once on a mesh loaded for it (nothing derived from another case's mesh
is reused):

    load_mesh          the loader: libyaml, the YAML checks (duplicate keys...), the model
    snapshot build     what the control plane does first at start and at each apply: every sidecar's snapshot
                       (xds.resources.mesh_snapshots; the baseline tree: sidecar_snapshot per service, each
                       checked), each published to a SnapshotCache; every sidecar with the profile `meshctl
                       up` gives it (its SDS folder, its sockets, spans to the collector), trusting a CA
                       bundle and one SPKI pin per identity; no discovery (mesh.yaml's addresses)
    render TARGET      render.render_target(TARGET), for every target (envoy, linkerd, consul, compose,
                       prometheus, grafana): its files, as text
    proxyless          (a tree with xds/proxyless.py) the snapshots of every service's gRPC processes, which
                       the control plane cuts from the sidecars' snapshots after building them, published

Each case reports wall seconds and the process's CPU seconds (time.process_time), and the foreign load
during it (cores busy with other processes, benchmarks/loadmeter.py): the machine is shared, and CPU time
moves less than wall time when it is busy.

At the largest size, also: the `meshctl render TARGET` command of every target (a new Python process
writing every file into an empty directory; wall time), and the peak RSS (VmHWM) of a
process that loads the mesh and builds and keeps every sidecar's snapshot (then the proxyless ones), as
the control plane does.

Prints medians and interquartile ranges over rounds, the median of per-round ratios (this tree / the
baseline) and each case's cost per service at the largest size over the smallest (1.0: linear in
services). Writes benchmarks/results/control_plane.json. No assertions (targets: every snapshot of 1000
services in at most 1 s; so is every target's render).
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import meshgen
from loadmeter import LoadMeter

# bench_client (write_results, quartiles) loads grpc and the client: imported by the parent only, so the
# measuring processes hold only what they measure.

ROOT = Path(__file__).resolve().parents[1]
# The render targets, as aivo_mesh.render.TARGETS names them (not imported here: the parent runs either tree).
TARGETS = ("envoy", "linkerd", "consul", "compose", "prometheus", "grafana")
CASES = ("load_mesh", "snapshot build", *(f"render {t}" for t in TARGETS), "proxyless")
COMMANDS = TARGETS  # `meshctl render TARGET`, at the largest size
WARMUP_SERVICES = 10
CA_PEM = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bytes(range(256)) * 4) + b"-----END CERTIFICATE-----\n"


# -- in a measuring process (either tree) -------------------------------------------------------------------

def _peak_mb() -> float:
    """This process's peak RSS: VmHWM where /proc has it (a child's ru_maxrss starts from its parent's peak
    at fork on Linux), else ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _control_plane(mesh_file: Path) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
    """(load, build): the mesh from the file, and every sidecar's snapshot as the control plane builds and
    publishes them, with the API of whichever tree is imported."""
    from aivo_mesh.config.loader import load_mesh
    from aivo_mesh.runtime import mesh as runtime_mesh
    from aivo_mesh.runtime.state import StateDir
    from aivo_mesh.xds import resources
    from aivo_mesh.xds.cache import InconsistentSnapshot, SnapshotCache

    state, sockets = StateDir(mesh_file.parent / "state"), mesh_file.parent / "sockets"
    if hasattr(runtime_mesh, "local_profiles"):
        profile_for = runtime_mesh.local_profiles(state, 4317, sockets)
    else:  # the baseline tree's `meshctl control-plane`: a profile worked out at each call
        def profile_for(mesh: Any, name: str) -> Any:
            return runtime_mesh.local_profile(state, name, 4317, sockets)

    def build(mesh: Any) -> Any:
        identities = [*mesh.service_names, *mesh.mesh.clients, mesh.control_plane.identity]
        pins = tuple(base64.b64encode(hashlib.sha256(n.encode()).digest()).decode() for n in identities)
        trust = resources.Trust(CA_PEM, pins)
        if hasattr(resources, "mesh_snapshots"):
            snapshots = resources.mesh_snapshots(mesh, profile_for, trust, {})
        else:  # the baseline tree's ControlPlane._build
            snapshots = {n: resources.sidecar_snapshot(mesh, n, profile_for(mesh, n), trust, {})
                         for n in mesh.service_names}
            for name, snap in snapshots.items():
                if problems := snap.problems():
                    raise InconsistentSnapshot(name, problems)
        cache = SnapshotCache()
        for name, snap in snapshots.items():
            cache.set(name, snap)
        return cache

    return (lambda: load_mesh(mesh_file)), build


def _proxyless(build: Callable[[Any], Any]) -> Callable[[Any], Any] | None:
    """The control plane's second step where the tree has one: each service's proxyless snapshot, cut from
    its sidecar's (built first, untimed: `prepare`), published. None for a tree without it."""
    try:
        from aivo_mesh.xds.groups import group_name
        from aivo_mesh.xds.proxyless import proxyless_snapshot
    except ImportError:
        return None

    def cut(prepared: Any) -> Any:
        mesh, cache = prepared
        for name in mesh.service_names:
            sidecar = cache.get(name)
            cache.set(group_name(name), proxyless_snapshot(mesh, name, sidecar))
        return cache

    return cut


def _render(target: str, mesh: Any) -> dict[str, str]:
    from aivo_mesh.render import render_target

    files: dict[str, str] = render_target(target, mesh)
    return files


def child_timings(mesh_file: Path, warmup_file: Path, round_index: int) -> dict[str, dict[str, float]]:
    """{case: {wall_s, cpu_s, foreign_cores}} for one round."""
    from aivo_mesh.xds.resources import _types

    _types()  # the Envoy message types, once per process (the control plane loads them at start)
    cases: dict[str, Callable[[Any], object]] = {}

    def setup(path: Path) -> Callable[[], Any]:
        load, build = _control_plane(path)
        cases.update({"load_mesh": lambda _: load(), "snapshot build": build})
        cases.update({f"render {t}": functools.partial(_render, t) for t in TARGETS})
        if (cut := _proxyless(build)) is not None:
            cases["proxyless"] = cut
        return load

    def prepare(name: str, mesh: Any) -> Any:  # what a case starts from, untimed
        return (mesh, cases["snapshot build"](mesh)) if name == "proxyless" else mesh

    load = setup(warmup_file)
    names = [c for c in CASES if c in cases]
    for name in names:
        cases[name](prepare(name, load()))
    load = setup(mesh_file)
    meter = LoadMeter({"self": os.getpid()})
    out: dict[str, dict[str, float]] = {}
    k = round_index % len(names)
    for name in (*names[k:], *names[:k]):
        mesh = prepare(name, load())
        meter.start()
        cpu, wall = time.process_time(), time.perf_counter()
        result = cases[name](mesh)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        out[name] = {"wall_s": wall, "cpu_s": cpu, "foreign_cores": meter.stop().foreign_cores}
        del result, mesh
    return out


def child_memory(mesh_file: Path) -> dict[str, float]:
    """Peak RSS (MB) of a process doing what the control plane does, step by step."""
    import aivo_mesh.runtime.control_plane  # noqa: F401  # everything `meshctl control-plane` loads
    from aivo_mesh.xds.resources import _types

    _types()
    load, build = _control_plane(mesh_file)
    out = {"baseline": _peak_mb()}
    mesh = load()
    out["after load_mesh"] = _peak_mb()
    cache = build(mesh)
    out["after snapshot build"] = _peak_mb()
    if (cut := _proxyless(build)) is not None:
        cut((mesh, cache))
        out["after proxyless"] = _peak_mb()
    del cache
    return out


# -- the parent --------------------------------------------------------------------------------------------

def extract(ref: str, into: Path) -> Path:
    """The `src` tree of git commit `ref` of this repository, under `into`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref, "src"], check=True,
                             capture_output=True).stdout
    tar_path = into / "src.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree" / "src"


def _child(src: Path, *args: str) -> Any:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _command(src: Path, target: str, mesh_file: Path, tmp: Path) -> float:
    """Wall seconds of `meshctl render TARGET` writing into an empty directory."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    with tempfile.TemporaryDirectory(dir=tmp) as out:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "aivo_mesh", "render", target, "--config", str(mesh_file),
                        "--output-dir", out], check=True, capture_output=True, env=env)
        return time.perf_counter() - started


def _stats(xs: list[float]) -> dict[str, Any]:
    from bench_client import quartiles

    return {"median": statistics.median(xs), "iqr": quartiles(xs), "min": min(xs), "max": max(xs)}


def summarize(sizes: list[int], trees: list[str], timings: dict[str, dict[int, list[dict[str, Any]]]],
              commands: dict[str, dict[str, list[float]]], memory: dict[str, dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"sizes": {}}
    measured = {tree: [c for c in CASES if all(c in r for r in timings[tree][sizes[0]])] for tree in trees}
    for n in sizes:
        per_size: dict[str, Any] = {}
        for tree in trees:
            rounds = timings[tree][n]
            per_size[tree] = {case: {
                "wall_s": _stats([r[case]["wall_s"] for r in rounds]),
                "cpu_s": _stats([r[case]["cpu_s"] for r in rounds]),
                "foreign_cores_max": max(r[case]["foreign_cores"] for r in rounds),
                "wall_ms_per_service": statistics.median(r[case]["wall_s"] for r in rounds) / n * 1000,
            } for case in measured[tree]}
        if len(trees) == 2:
            new, old = timings[trees[0]][n], timings[trees[1]][n]
            per_size["ratio this / baseline"] = {case: {
                what: statistics.median(a[case][what] / b[case][what] for a, b in zip(new, old, strict=True))
                for what in ("wall_s", "cpu_s")} for case in CASES if case in measured[trees[0]] and case in
                measured[trees[1]]}
        out["sizes"][str(n)] = per_size
    small, large = str(min(sizes)), str(max(sizes))
    if small != large:
        out["per_service_cost_largest_over_smallest"] = {tree: {
            case: out["sizes"][large][tree][case]["wall_ms_per_service"]
            / out["sizes"][small][tree][case]["wall_ms_per_service"] for case in measured[tree]} for tree in trees}
    out["commands_at_largest_size"] = {tree: {f"meshctl render {t}": _stats(commands[tree][t]) for t in COMMANDS}
                                       for tree in trees}
    if len(trees) == 2:
        out["commands_at_largest_size"]["ratio this / baseline"] = {
            f"meshctl render {t}": statistics.median(
                a / b for a, b in zip(commands[trees[0]][t], commands[trees[1]][t], strict=True))
            for t in COMMANDS}
    out["peak_rss_mb_at_largest_size"] = memory
    out["figures"] = _figures(int(large), timings[trees[0]][int(large)], commands[trees[0]])
    return out


def _figures(n: int, rounds: list[dict[str, Any]], commands: dict[str, list[float]]) -> list[dict[str, Any]]:
    """`meshctl bench scale`'s figures: this tree's CPU seconds per case at the largest size (the work; wall
    time on a shared 2-core machine adds other processes' load), and each `meshctl render` command's wall."""
    from aivo_mesh.benchfigures import from_rounds

    out = [from_rounds("scale", f"{case}, {n} services, CPU", [r[case]["cpu_s"] for r in rounds], unit="s",
                       target=None if case == "proxyless" else 1.0, higher_is_better=False).to_dict()
           for case in CASES if all(case in r for r in rounds)]
    out += [from_rounds("scale", f"meshctl render {t}, {n} services, wall (the command, writing its files)",
                        commands[t], unit="s", higher_is_better=False).to_dict() for t in ("envoy", "prometheus")]
    return out


def _cell(case: dict[str, Any]) -> str:
    cpu = case["cpu_s"]
    return (f"{case['wall_s']['median']:7.3f} ({cpu['median']:6.3f}, {cpu['iqr'][0]:.3f}-{cpu['iqr'][1]:.3f}) "
            f"[{case['foreign_cores_max']:.2f}]")


def _print(summary: dict[str, Any], sizes: list[int], trees: list[str]) -> None:
    for n in sizes:
        s = summary["sizes"][str(n)]
        print(f"\n{n} services: median wall s (median cpu s, its IQR) [most foreign load, cores]")
        for case in CASES:
            cells = [_cell(s[t][case]) if case in s[t] else f"{'-':>38}" for t in trees]
            ratio = ""
            if case in s.get("ratio this / baseline", {}):
                r = s["ratio this / baseline"][case]
                ratio = f"  this/baseline {r['wall_s']:.3f} (cpu {r['cpu_s']:.3f})"
            print(f"  {case:<18}" + "  ".join(f"{t}: {c}" for t, c in zip(trees, cells, strict=True)) + ratio)
    if "per_service_cost_largest_over_smallest" in summary:
        print(f"\ncost per service, {max(sizes)} / {min(sizes)} services (1.0: linear)")
        for tree, ratios in summary["per_service_cost_largest_over_smallest"].items():
            print(f"  {tree}: " + ", ".join(f"{case} {r:.2f}" for case, r in ratios.items()))
    print(f"\n{max(sizes)} services, commands (median wall s, IQR)")
    for tree, figures in summary["commands_at_largest_size"].items():
        print(f"  {tree}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else
                                          f"{k} {v['median']:.3f} ({v['iqr'][0]:.3f}-{v['iqr'][1]:.3f})"
                                          for k, v in figures.items()))
    print(f"\n{max(sizes)} services, peak RSS (MB)")
    for tree, rss in summary["peak_rss_mb_at_largest_size"].items():
        print(f"  {tree}: " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items())
              + f" (loaded and every sidecar's built: +{rss['after snapshot build'] - rss['baseline']:.0f})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000], help="services per generated mesh")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", metavar="REF", help="also measure the source tree of this git commit")
    ap.add_argument("--quick", action="store_true", help="sizes 20 and 100, 2 rounds")
    ap.add_argument("--results-dir", type=Path, default=None, help="where control_plane.json goes")
    ap.add_argument("--timings", nargs=3, metavar=("MESH", "WARMUP", "ROUND"), help=argparse.SUPPRESS)
    ap.add_argument("--memory", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.timings is not None:  # a measuring process
        print(json.dumps(child_timings(Path(args.timings[0]), Path(args.timings[1]), int(args.timings[2]))))
        return 0
    if args.memory is not None:
        print(json.dumps(child_memory(args.memory)))
        return 0

    sizes, rounds = ([20, 100], 2) if args.quick else (sorted(args.sizes), args.rounds)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        srcs = {"this": ROOT / "src"}
        if args.baseline:
            srcs["baseline"] = extract(args.baseline, tmp)
        trees = list(srcs)
        files: dict[int, Path] = {}
        for n in {*sizes, WARMUP_SERVICES}:
            files[n] = tmp / f"mesh-{n}" / "mesh.yaml"
            files[n].parent.mkdir()
            files[n].write_text(meshgen.mesh_yaml(n), encoding="utf-8")
        timings: dict[str, dict[int, list[dict[str, Any]]]] = {t: {n: [] for n in sizes} for t in trees}
        commands: dict[str, dict[str, list[float]]] = {t: {c: [] for c in COMMANDS} for t in trees}
        for r in range(rounds):
            order = trees if r % 2 == 0 else trees[::-1]
            for n in sizes:
                for tree in order:
                    print(f"round {r + 1}/{rounds}: {n} services, {tree} ...", flush=True)
                    timings[tree][n].append(_child(srcs[tree], "--timings", str(files[n]),
                                                   str(files[WARMUP_SERVICES]), str(r)))
            for tree in order:
                for target in COMMANDS:
                    commands[tree][target].append(_command(srcs[tree], target, files[max(sizes)], tmp))
        memory = {}
        for tree in trees:
            print(f"peak RSS: {max(sizes)} services, {tree} ...", flush=True)
            memory[tree] = _child(srcs[tree], "--memory", str(files[max(sizes)]))
    from bench_client import RESULTS, write_results

    summary = summarize(sizes, trees, timings, commands, memory)
    print(f"\npython {platform.python_version()} on {platform.machine()}, {rounds} rounds"
          + (f"; baseline: {args.baseline}" if args.baseline else ""))
    _print(summary, sizes, trees)
    write_results("control_plane", {"python": platform.python_version(), "machine": platform.machine(),
                                    "rounds": rounds, "baseline": args.baseline, **summary},
                  args.results_dir or RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
