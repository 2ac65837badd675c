"""`meshctl up` / `status` / `traces` / `down` with real processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aivo_mesh.runtime.mesh import RuntimeInfo, mesh_for_clients
from aivo_mesh.runtime.state import StateDir, pid_alive

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def meshctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aivo_mesh", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def drive_one_flow(state: StateDir) -> None:
    from aivo_mesh.client import MeshClient, MeshConfig
    from aivo_mesh.config import load_mesh
    from aivo_mesh.runtime.driver import drive

    async def run() -> None:
        info = RuntimeInfo.read(state)
        assert info is not None
        view = mesh_for_clients(load_mesh(state.mesh_file), info)
        async with MeshClient(MeshConfig.for_identity("mesh-client", state.certs, view)) as client:
            stats = await drive(client, 0.3, workers=1)
        assert stats.flows > 0 and stats.total_errors == 0, stats.per_service

    asyncio.run(run())


def test_up_proxyless_status_restart_traces_down(tmp_path):
    state = StateDir(tmp_path / "mesh")
    out = meshctl("up", "--plane", "proxyless", "--state-dir", str(state.root), "--free-ports", "--timeout", "90")
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        assert "4 services healthy" in out.stdout
        drive_one_flow(state)

        status = json.loads(meshctl("status", "--json", "--state-dir", str(state.root)).stdout)
        rows = {r["service"]: r for r in status["services"]}
        assert status["plane"] == "proxyless"
        assert {r["health"] for r in rows.values()} == {"SERVING"}
        assert rows["learner-svc"]["breakers"] == {"auth-svc": "closed"}
        assert rows["learner-svc"]["upstreams"] == {"auth-svc": "1/1 healthy"}

        # A crashed service is restarted by the supervisor.
        victim = next(r for r in state.read_processes() if r.name == "auth-svc")
        os.kill(victim.pid, signal.SIGKILL)
        assert wait_until(lambda: any(r.name == "auth-svc" and r.pid != victim.pid and pid_alive(r.pid)
                                      for r in state.read_processes()), 60)
        assert json.loads((state.root / "restarts.json").read_text())["auth-svc"] == 1
        assert wait_until(lambda: json.loads(meshctl("status", "--json", "--state-dir", str(state.root),
                                                     "--interval", "0").stdout)["services"][0]["health"]
                          == "SERVING", 60, interval=0.2)

        # Traces of the flow are in the collector's log: learner's span has auth's as a descendant.
        assert wait_until(lambda: "/aivo.auth.v1.AuthService/ValidateToken" in
                          meshctl("traces", "--state-dir", str(state.root), "--last", "20").stdout, 60, 0.3)
    finally:
        pids = [r.pid for r in state.read_processes()]
        down = meshctl("down", "--state-dir", str(state.root))
    assert down.returncode == 0, down.stderr
    assert "mesh down (supervisor)" in down.stdout
    assert not any(pid_alive(p) for p in pids)
    assert not (state.root / "processes.json").exists()
    assert not (state.root / "supervisor.pid").exists()


def test_down_with_nothing_running_is_harmless(tmp_path):
    out = meshctl("down", "--state-dir", str(tmp_path / "none"))
    assert out.returncode == 0 and "nothing was running" in out.stdout
