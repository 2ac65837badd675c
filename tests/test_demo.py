"""The demo mesh end to end: four real processes over mTLS on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from binaries import needs
from helpers import meshctl, serving_local_mesh

from aivo_mesh.config import load_mesh
from aivo_mesh.config.resolve import callable_peers
from aivo_mesh.runtime.state import StateDir, pid_alive

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("plane", [pytest.param("sidecar", marks=needs("envoy")), "proxyless"])
def test_demo_runs_the_flow_prints_the_table_and_leaves_nothing_behind(tmp_path, plane):
    state = tmp_path / "state"
    out = meshctl("demo", "--duration", "3", "--free-ports", "--state-dir", str(state), "--plane", plane,
                  "--timeout", "90")  # generous: tests assert behaviour, not timings
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert f"all 4 services SERVING over mTLS ({plane} plane)" in out.stdout
    assert "a learner -> auth trace" in out.stdout
    header = out.stdout.split("a learner -> auth trace", 1)[1].splitlines()[1]
    if plane == "sidecar":  # the demo waits for the sidecars' batched spans: the trace shows all four
        assert {"learner-svc-sidecar", "auth-svc-sidecar", "learner-svc", "auth-svc"} <= set(
            header.split("  ")[-1].split(", ")), header
    for svc in ("auth-svc", "learner-svc", "event-collector-svc", "analytics-svc"):
        row = next(line for line in out.stdout.splitlines() if line.startswith(f"│ {svc} "))
        cells = [c.strip() for c in row.strip("│").split("│")]
        assert cells[2] == f"spiffe://aivo.local/ns/default/sa/{svc}"
        assert int(cells[3]) > 0, row  # calls
        assert cells[4] == "0", row  # errors
    assert "all processes stopped" in out.stdout
    # The sidecar plane's app / outbound sockets (state/run, 0700) go with the processes; proxyless has none.
    assert not (state / "run").exists()
    # No orphans: the registry is gone and every pid the run logged is dead.
    assert not (state / "processes.json").exists()
    services = ("auth-svc", "learner-svc", "event-collector-svc", "analytics-svc")
    logs = {p.stem for p in (state / "logs").glob("*.log")}
    # Both planes run the control plane (the Envoys, or the services themselves, take their configuration
    # over ADS); the sidecar plane also runs the Envoys.
    sidecars = {f"{s}-envoy" for s in services} if plane == "sidecar" else set()
    assert logs == {*services, "collector", "control-plane", *sidecars}
    # Each service drained and stopped on SIGTERM (graceful shutdown logged).
    for svc in services:
        assert "draining" in (state / "logs" / f"{svc}.log").read_text(), svc


def test_status_reports_running_services(tmp_path):
    import asyncio

    state = StateDir(tmp_path / "state")

    async def scenario() -> tuple[dict[str, Any], list[int]]:
        async with serving_local_mesh(state):
            out = await asyncio.to_thread(meshctl, "status", "--json", "--state-dir", str(state.root))
            assert out.returncode == 0, out.stderr
            pids = [r.pid for r in state.read_processes()]
            return json.loads(out.stdout), pids

    report, pids = asyncio.run(scenario())
    rows = {r["name"]: r for r in report["processes"]}
    assert set(rows) == {"auth-svc", "learner-svc", "event-collector-svc", "analytics-svc"}
    assert all(r["health"] == "SERVING" and r["process"] == "running" for r in rows.values())
    assert not any(pid_alive(p) for p in pids)
    empty = meshctl("status", "--json", "--state-dir", str(state.root))
    assert json.loads(empty.stdout)["processes"] == []


def test_status_shows_breakers_and_upstream_health_from_admin_endpoints(tmp_path):
    import asyncio

    state = StateDir(tmp_path / "state")

    async def scenario() -> dict[str, Any]:
        from aivo_mesh.runtime.driver import drive

        async with serving_local_mesh(state) as (_, _, client):
            stats = await drive(client, 0.5, workers=1)  # learner -> auth, analytics -> events
            assert stats.total_errors == 0
            out = await asyncio.to_thread(meshctl, "status", "--json", "--state-dir", str(state.root))
            assert out.returncode == 0, out.stderr
            report: dict[str, Any] = json.loads(out.stdout)
            return report

    report = asyncio.run(scenario())
    rows = {r["name"]: r for r in report["processes"]}
    # Each service warmed its channels to every peer mesh.yaml lets it call before it served.
    mesh = load_mesh(state.mesh_file)
    learner_peers = callable_peers(mesh, "learner-svc")
    assert "auth-svc" in learner_peers
    assert rows["learner-svc"]["breakers"] == dict.fromkeys(learner_peers, "closed")
    assert rows["learner-svc"]["upstreams"] == dict.fromkeys(learner_peers, "1/1 healthy")
    assert rows["analytics-svc"]["breakers"] == dict.fromkeys(callable_peers(mesh, "analytics-svc"), "closed")
