"""infra/mesh/scripts/test-mesh.py against a real proxyless mesh on loopback: all green while the
services run, a clear failing row (and exit 1) once one is stopped."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from binaries import needs, tool
from helpers import meshctl, serving_local_mesh

from aivo_mesh.runtime.state import StateDir

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "infra" / "mesh" / "scripts" / "test-mesh.py"
SERVICES = ["auth-svc", "learner-svc", "event-collector-svc"]


def test_mesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)


test_mesh.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def rows(out: subprocess.CompletedProcess[str]) -> dict[tuple[str, str], dict[str, str]]:
    data = json.loads(out.stdout)
    return {(r["service"], r["check"]): r for r in data["rows"]}


def test_all_checks_pass_then_a_stopped_service_fails_clearly(tmp_path):
    state = StateDir(tmp_path / "state")
    services = ",".join(SERVICES)

    async def scenario() -> tuple[subprocess.CompletedProcess[str], ...]:
        async with serving_local_mesh(state) as (mesh, sup, _):
            green = await asyncio.to_thread(test_mesh, "--services", services, "--state-dir", str(state.root),
                                            "--json")
            table = await asyncio.to_thread(test_mesh, "--services", services, "--state-dir", str(state.root))
            # stop auth-svc; describe the mesh with a runtime.json as `meshctl up` writes it
            auth = next(m for m in sup.procs if m.name == "auth-svc")
            assert auth.process is not None
            auth.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(auth.process.wait(), 15)
            runtime = {"plane": "proxyless", "services": {
                s.name: {"address": f"{s.host}:{s.port}", "admin": f"127.0.0.1:{s.admin_port}",
                         "sidecar_admin": None} for s in mesh.services}}
            (state.root / "runtime.json").write_text(json.dumps(runtime))
            red = await asyncio.to_thread(test_mesh, "--services", services, "--state-dir", str(state.root),
                                          "--json")
            red_table = await asyncio.to_thread(test_mesh, "--services", services, "--state-dir", str(state.root))
            return green, table, red, red_table

    green, table, red, red_table = asyncio.run(scenario())

    assert green.returncode == 0, green.stdout + green.stderr
    got = rows(green)
    assert {r["result"] for r in got.values()} == {"PASS"}, [r for r in got.values() if r["result"] != "PASS"]
    for svc in SERVICES:
        for check in ("health", "server identity", "plaintext", "no client cert", "authorization", "metrics",
                      "admin"):
            assert (svc, check) in got, (svc, check)
    assert "SERVING" in got[("auth-svc", "health")]["detail"]
    assert "PERMISSION_DENIED" in got[("auth-svc", "authorization")]["detail"]
    # one row per mesh.yaml route, each answered within its deadline
    assert ("auth-svc", "route ValidateToken") in got
    assert {("event-collector-svc", f"route {m}") for m in ("Collect", "CollectStream", "ListEvents")} <= set(got)
    assert "deadline 1s" in got[("auth-svc", "route ValidateToken")]["detail"]
    # ListEvents is open to analytics-svc only: the route is called with that identity
    assert "as analytics-svc" in got[("event-collector-svc", "route ListEvents")]["detail"]
    assert not any(svc == "analytics-svc" for svc, _ in got)

    assert table.returncode == 0
    assert "test-mesh: proxyless mesh" in table.stdout
    assert "0 failed" in table.stdout

    assert red.returncode == 1, red.stdout + red.stderr
    assert "Traceback" not in red.stderr
    down = rows(red)
    health = down[("auth-svc", "health")]
    assert health["result"] == "FAIL"
    assert "UNAVAILABLE" in health["detail"]
    assert down[("auth-svc", "plaintext")]["result"] == "SKIP"  # never "passes" against a dead server
    assert down[("auth-svc", "metrics")]["result"] == "FAIL"
    assert {r["result"] for (svc, _), r in down.items() if svc != "auth-svc"} == {"PASS"}
    assert red_table.returncode == 1
    assert "Traceback" not in red_table.stdout + red_table.stderr
    assert next(line for line in red_table.stdout.splitlines() if "auth-svc" in line and "health" in line)
    assert "FAIL" in red_table.stdout


def test_bad_arguments_exit_2_with_a_message(tmp_path):
    out = test_mesh("--state-dir", str(tmp_path / "nothing"))
    assert out.returncode == 2
    assert "start the mesh first" in out.stderr
    state = StateDir(tmp_path / "s")
    from aivo_mesh.runtime.local import prepare

    prepare(state, str(ROOT / "mesh.yaml"), free_ports=True)
    out = test_mesh("--state-dir", str(state.root), "--services", "nope-svc")
    assert out.returncode == 2
    assert "unknown service(s) nope-svc" in out.stderr


@needs("envoy")
def test_sidecar_plane_started_by_meshctl_up(tmp_path):
    """The same checks through Envoy sidecars, reading the runtime.json `meshctl up` writes."""
    state = tmp_path / "state"
    up = meshctl("up", "--plane", "sidecar", "--free-ports", "--config", str(ROOT / "mesh.yaml"),
                 "--state-dir", str(state), "--timeout", "60")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        out = test_mesh("--services", "auth-svc,event-collector-svc", "--state-dir", str(state), "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        got = rows(out)
        assert json.loads(out.stdout)["plane"] == "sidecar"
        assert {r["result"] for r in got.values()} == {"PASS"}, [r for r in got.values() if r["result"] != "PASS"]
        assert got[("auth-svc", "envoy admin")]["detail"].endswith("200 LIVE")
        assert "PERMISSION_DENIED" in got[("event-collector-svc", "authorization")]["detail"]  # Envoy's RBAC
        legs = got[("auth-svc", "local legs")]["detail"]  # the plaintext legs: private Unix sockets only
        assert "app auth-svc.app.sock, outbound auth-svc.out.sock: 0600 in a 0700 folder" in legs, legs
    finally:
        meshctl("down", "--state-dir", str(state), timeout=60)


# -- deploy-mesh.py ----------------------------------------------------------------------------------

DEPLOY = ROOT / "infra" / "mesh" / "scripts" / "deploy-mesh.py"


def deploy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(DEPLOY), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, check=False, env=env)


def path_of(folder: Path, **programs: str) -> dict[str, str]:
    """This environment with a PATH of only `programs`: name -> the shell script's body. The script's own
    checks then see exactly these, whatever this machine has installed."""
    folder.mkdir()
    for name, body in programs.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return {**os.environ, "PATH": str(folder)}


def test_deploy_dry_run_without_docker_plans_the_local_runtime_and_says_what_it_skips(tmp_path):
    out = deploy("--components", "envoy,consul,jaeger,prometheus", "--state-dir", str(tmp_path / "s"),
                 "--docker", "no", "--dry-run")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "render      checked" in out.stdout  # `meshctl render all --check`, nothing written
    assert "aivo_mesh up --plane" in out.stdout
    assert not (tmp_path / "s" / "runtime.json").exists()
    if tool("consul").path is None:
        assert "consul      skipped    no consul binary and no Docker engine" in out.stdout
    assert "jaeger      skipped" in out.stdout
    assert "skipped:" in out.stdout


DRY_DOCKER = ("--components", "envoy,prometheus", "--docker", "yes", "--dry-run", "--skip-render")


@pytest.mark.parametrize("programs", [
    pytest.param({"docker-compose": "exit 0"}, id="docker-compose"),
    pytest.param({"docker": 'test "$1" = compose || exit 1'}, id="docker-compose-plugin"),
    pytest.param({"docker": "exit 1", "docker-compose": "exit 0"}, id="docker-without-plugin-and-docker-compose"),
])
def test_deploy_dry_run_with_docker_plans_compose_up(tmp_path, programs):
    bin_dir = tmp_path / "bin"
    out = deploy(*DRY_DOCKER, env=path_of(bin_dir, **programs))
    assert out.returncode == 0, out.stdout + out.stderr
    line = next(line for line in out.stdout.splitlines() if line.strip().startswith("compose"))
    compose = f"{bin_dir / 'docker-compose'} -f" if "docker-compose" in programs else "docker compose -f"
    assert compose in line, line
    assert "up -d --build" in line
    for svc in ("auth-svc", "auth-svc-envoy", "analytics-svc-envoy", "prometheus"):
        assert f" {svc}" in line
    assert " consul" not in line
    assert " jaeger" not in line


def test_deploy_with_docker_but_no_compose_fails_saying_so(tmp_path):
    # The docker CLI without the Compose plugin, and no docker-compose: nothing can run the Compose file.
    out = deploy(*DRY_DOCKER, env=path_of(tmp_path / "bin", docker="exit 1"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "compose     FAILED     --docker yes, but neither `docker compose` (the Compose plugin) nor " \
           "docker-compose is installed" in out.stdout
    assert "engine answers" not in out.stdout  # --docker yes: no engine was asked
    assert "Traceback" not in out.stderr


def test_deploy_rejects_unknown_components():
    out = deploy("--components", "envoy,istio", "--dry-run")
    assert out.returncode == 2
    assert "unknown component(s) istio" in out.stderr


@needs("envoy", "prometheus")
def test_deploy_without_docker_runs_sidecars_and_prometheus_then_down(tmp_path):
    state = tmp_path / "state"
    from aivo_mesh.runtime.local import free_port

    port = free_port()
    try:
        out = deploy("--components", "envoy,prometheus,jaeger", "--state-dir", str(state), "--docker", "no",
                     "--free-ports", "--skip-render", "--prometheus-port", str(port))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "services    started    meshctl up --plane sidecar" in out.stdout
        assert "prometheus  started" in out.stdout
        config = (state / "prometheus" / "prometheus.yml").read_text()
        runtime = json.loads((state / "runtime.json").read_text())
        for ep in runtime["services"].values():
            assert ep["admin"] in config
            assert ep["sidecar_admin"] in config
        check = test_mesh("--state-dir", str(state), "--services", "auth-svc", "--json")
        assert check.returncode == 0, check.stdout + check.stderr
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5) as resp:
            groups = json.loads(resp.read())["data"]["groups"]
        assert sum(len(g["rules"]) for g in groups) > 5  # the rendered alert rules are loaded
    finally:
        stopped = deploy("--down", "--state-dir", str(state))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "prometheus  stopped" in stopped.stdout
    assert not (state / "deploy.json").exists()


def _script_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("test_mesh_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_local_legs_fail_on_a_loopback_listener_where_the_app_would_listen(tmp_path: Path) -> None:
    import socket

    from aivo_mesh.config import load_mesh
    from aivo_mesh.runtime.local import free_ports

    script = _script_module()
    mesh = load_mesh(ROOT / "mesh.yaml")
    port = free_ports(1)[0]
    svc = mesh.service("auth-svc").model_copy(update={"local_port": port})
    folder = tmp_path / "legs"
    folder.mkdir(mode=0o700)
    legs = []
    for name in ("app.sock", "outbound.sock"):
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(folder / name))
        os.chmod(folder / name, 0o600)
        legs.append(sock)
    ep = script.Endpoints("127.0.0.1:1", None, None, app=f"unix:{folder / 'app.sock'}",
                          outbound=f"unix:{folder / 'outbound.sock'}")
    try:
        ok, detail = script.local_legs(mesh, svc, ep)
        assert ok, detail  # private sockets and nothing on the TCP port
        with socket.create_server(("127.0.0.1", port)):
            ok, detail = script.local_legs(mesh, svc, ep)
        assert not ok and f"app: 127.0.0.1:{port} accepts connections" in detail
    finally:
        for sock in legs:
            sock.close()
