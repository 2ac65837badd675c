"""`meshctl up` / `status` / `traces` / `down` with real processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import meshctl

from aivo_mesh.config import MeshSpec, load_mesh
from aivo_mesh.runtime.mesh import RuntimeInfo, forward_target, mesh_for_clients, plan, with_tracing
from aivo_mesh.runtime.state import StateDir, pid_alive
from aivo_mesh.runtime.supervisor import Managed, Supervisor
from aivo_mesh.telemetry.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
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


class ThreadedReceiver:
    """An OtlpReceiver on its own event loop thread: a stand-in Jaeger while meshctl runs in a subprocess."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.receiver = OtlpReceiver()

    def __enter__(self) -> ThreadedReceiver:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.receiver.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.receiver.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def span_names(self) -> set[str]:
        return {s.name for s in list(self.receiver.spans())}


def test_up_proxyless_status_restart_traces_down(tmp_path):
    state = StateDir(tmp_path / "mesh")
    jaeger = ThreadedReceiver().__enter__()
    # mesh.yaml sends spans to "Jaeger": `up` keeps its own collector and has it forward there.
    config = tmp_path / "mesh.yaml"
    text = (ROOT / "mesh.yaml").read_text()
    assert "enabled: false\n    otlp_endpoint: http://127.0.0.1:4317" in text
    config.write_text(text.replace("enabled: false\n    otlp_endpoint: http://127.0.0.1:4317",
                                   f"enabled: true\n    otlp_endpoint: {jaeger.receiver.endpoint}"))
    # A previous run's restart counts (left by an older `down`) must not carry over.
    state.root.mkdir(parents=True)
    (state.root / "restarts.json").write_text('{"auth-svc": 7, "learner-svc": 2}\n')
    out = meshctl("up", "--plane", "proxyless", "--state-dir", str(state.root), "--free-ports", "--timeout", "90",
                  "--config", str(config))
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        assert "4 services healthy" in out.stdout
        info = RuntimeInfo.read(state)  # proxyless: every service on its mTLS port, no sidecar sockets
        assert info is not None and info.sockets is None and not (state.root / "run").exists()
        assert {ep.app for ep in info.services.values()} == {None}
        drive_one_flow(state)

        def status_rows() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
            status = json.loads(meshctl("status", "--json", "--state-dir", str(state.root)).stdout)
            return status, {r["name"]: r for r in status["services"]}

        # The observer samples every 2 s: its view shows learner-svc's upstream from the round after the flow.
        assert wait_until(lambda: bool(status_rows()[1]["learner-svc"]["upstreams"]), 30, interval=0.5)
        status, rows = status_rows()
        assert status["plane"] == "proxyless"
        assert {r["health"] for r in rows.values()} == {"healthy"}
        assert {r["process"]["restarts"] for r in rows.values()} == {0}
        # Every peer learner-svc may call, warmed before it served (as Envoy lists its clusters).
        upstreams = {u["service"]: u for u in rows["learner-svc"]["upstreams"]}
        assert set(upstreams) == {"auth-svc", "event-collector-svc"}
        upstream = upstreams["auth-svc"]
        assert (upstream["breaker"], upstream["state"]) == ("closed", "healthy")

        # A crashed service is restarted by the supervisor.
        victim = next(r for r in state.read_processes() if r.name == "auth-svc")
        os.kill(victim.pid, signal.SIGKILL)
        assert wait_until(lambda: any(r.name == "auth-svc" and r.pid != victim.pid and pid_alive(r.pid)
                                      for r in state.read_processes()), 60)
        assert wait_until(lambda: (state.root / "restarts.json").exists(), 10)
        assert json.loads((state.root / "restarts.json").read_text()) == {"auth-svc": 1}
        assert wait_until(lambda: json.loads(meshctl("status", "--json", "--state-dir", str(state.root),
                                                     "--interval", "0").stdout)["services"][0]["health"]
                          == "healthy", 60, interval=0.2)

        # Traces of the flow are in the collector's log: learner's span has auth's as a descendant.
        assert wait_until(lambda: "/aivo.auth.v1.AuthService/ValidateToken" in
                          meshctl("traces", "--state-dir", str(state.root), "--last", "20").stdout, 60, 0.3)
        # ... and the collector forwarded them to the configured endpoint.
        assert wait_until(lambda: "/aivo.auth.v1.AuthService/ValidateToken" in jaeger.span_names(), 30, 0.1)
    finally:
        pids = [r.pid for r in state.read_processes()]
        down = meshctl("down", "--state-dir", str(state.root))
        jaeger.__exit__()
    assert down.returncode == 0, down.stderr
    assert "mesh down (supervisor)" in down.stdout
    assert not any(pid_alive(p) for p in pids)
    assert not (state.root / "processes.json").exists()
    assert not (state.root / "supervisor.pid").exists()
    assert not (state.root / "restarts.json").exists()


async def test_the_health_wait_stops_once_a_process_it_needs_exited(mesh_certs) -> None:
    from aivo_mesh.client import MeshClient, MeshConfig
    from aivo_mesh.runtime.health import wait_serving
    from aivo_mesh.runtime.local import with_free_ports

    mesh = with_free_ports(load_mesh(ROOT / "mesh.yaml"))  # nothing listens there
    asked: list[int] = []

    def exited() -> bool:
        asked.append(1)
        return True

    async with MeshClient(MeshConfig.for_identity("mesh-client", mesh_certs, mesh), health_checks=False) as client:
        status = await wait_serving(client, ["auth-svc", "learner-svc"], timeout=60, given_up=exited)
    assert status == {"auth-svc": "UNREACHABLE", "learner-svc": "UNREACHABLE"}
    assert asked == [1]  # one round, not 60 s of them


def test_down_with_nothing_running_is_harmless(tmp_path):
    out = meshctl("down", "--state-dir", str(tmp_path / "none"))
    assert out.returncode == 0 and "nothing was running" in out.stdout


def _traced(endpoint: str, enabled: bool = True) -> MeshSpec:
    mesh = load_mesh(ROOT / "mesh.yaml")
    tracing = mesh.observability.tracing.model_copy(update={"enabled": enabled, "otlp_endpoint": endpoint})
    return mesh.model_copy(update={"observability": mesh.observability.model_copy(update={"tracing": tracing})})


def test_collector_forwards_to_the_configured_endpoint_unless_it_is_itself(tmp_path):
    assert forward_target(_traced("http://jaeger:4317"), 4317) == "http://jaeger:4317"
    assert forward_target(_traced("http://jaeger:4317", enabled=False), 4317) is None  # tracing off: nowhere
    assert forward_target(_traced("http://127.0.0.1:4317"), 4317) is None  # that is the collector itself
    assert forward_target(_traced("http://localhost:4317"), 4317) is None
    assert forward_target(_traced("http://127.0.0.1:4317"), 5555) == "http://127.0.0.1:4317"
    # JAEGER_HOST wins over mesh.yaml and enables tracing, as `apply_env` does for `meshctl serve`.
    assert forward_target(_traced("http://x:4317", enabled=False), 4317, "jaeger") == "http://jaeger:4317"
    assert forward_target(_traced("http://x:4317"), 4317, "http://tempo:4400") == "http://tempo:4400"
    # The collector gets the target; the services lose JAEGER_HOST (they export to the collector).
    mesh = with_tracing(_traced("http://jaeger:4317"), 5555)
    procs, _ = plan(StateDir(tmp_path), mesh, "proxyless", 5555, "http://jaeger:4317")
    collector = next(m for m in procs if m.role == "collector")
    assert collector.argv[-2:] == ["--forward-to", "http://jaeger:4317"]
    assert all("JAEGER_HOST" in m.unset for m in procs if m.role == "service")


def test_supervisor_children_do_not_inherit_unset_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("JAEGER_HOST", "jaeger")
    check = [sys.executable, "-c", "import os, sys; sys.exit(3 if 'JAEGER_HOST' in os.environ else 0)"]

    async def run(unset: tuple[str, ...]) -> int | None:
        sup = Supervisor(StateDir(tmp_path))
        m = Managed(name="child", role="service", argv=check, address="-", unset=unset)
        await sup.start(m)
        assert m.process is not None
        code = await asyncio.wait_for(m.process.wait(), 30)
        await sup.stop_all()
        return code

    assert asyncio.run(run(())) == 3
    assert asyncio.run(run(("JAEGER_HOST",))) == 0
