"""The observer and `meshctl status/routes/edges` on a `meshctl up` mesh (proxyless plane, real processes on
127.0.0.1): golden metrics with one failing route, the caller's SPIFFE ID on edges, the observer's API, every
output validated against its JSON Schema (docs/schemas/) healthy, failing and stopped, and status's exit
code when a service stops answering."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
from helpers import meshctl

from aivo_mesh.runtime.mesh import RuntimeInfo, mesh_for_clients
from aivo_mesh.runtime.state import StateDir

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "docs" / "schemas"
AUTHENTICATE = "/aivo.auth.v1.AuthService/Authenticate"
LEARNER_ID = "spiffe://aivo.local/ns/default/sa/learner-svc"


def _valid(doc: dict[str, Any], command: str) -> dict[str, Any]:
    jsonschema.validate(doc, json.loads((SCHEMAS / f"{command}.schema.json").read_text()))
    return doc


def _json(*args: str) -> tuple[int, dict[str, Any]]:
    out = meshctl(*args, "-o", "json")
    assert out.stdout.strip(), out.stderr
    return out.returncode, json.loads(out.stdout)


def _traffic(state: StateDir, failing: int) -> None:
    """Demo flows (learner-svc validates each token with auth-svc) and `failing` Authenticate calls that
    auth-svc refuses (INVALID_ARGUMENT: no learner id)."""
    from aivo_mesh.client import MeshClient, MeshConfig
    from aivo_mesh.config import load_mesh
    from aivo_mesh.runtime.driver import drive
    from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc

    async def run() -> None:
        info = RuntimeInfo.read(state)
        assert info is not None
        view = mesh_for_clients(load_mesh(state.mesh_file), info)
        async with MeshClient(MeshConfig.for_identity("mesh-client", state.certs, view)) as client:
            stats = await drive(client, 0.5, workers=2)
            assert stats.flows > 0 and stats.total_errors == 0, stats.per_service
            auth = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
            for _ in range(failing):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await auth.Authenticate(auth_pb2.AuthenticateRequest(learner_id="", password="x"))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(run())


def _until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.3)


def test_golden_metrics_routes_edges_and_exit_codes_of_a_running_mesh(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    where = ("--state-dir", str(state.root))
    up = meshctl("up", "--plane", "proxyless", "--free-ports", "--timeout", "90", "--config",
                 str(ROOT / "mesh.yaml"), *where)
    stopped = False
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        info = RuntimeInfo.read(state)
        assert info is not None and info.observer is not None and info.observer.startswith("127.0.0.1:")
        assert f"http://{info.observer}/api/v1/mesh" in up.stdout  # `up`'s table names it
        assert any(r.role == "observer" for r in state.read_processes())

        _traffic(state, failing=5)

        def failing_route() -> dict[str, Any] | None:
            code, doc = _json("routes", "auth-svc", "--window", "1m", *where)
            assert code == 0
            rows = {(r["route"], r["side"]): r["golden"] for r in doc["routes"]}
            server = rows.get((AUTHENTICATE, "server"))
            return doc if server and server["success_rate"] is not None and server["success_rate"] < 1 else None

        # The observer samples every 2 s: the calls show up within a few rounds.
        routes = _valid(_until(failing_route, 30, "Authenticate's success rate below 1"), "routes")
        server = next(r["golden"] for r in routes["routes"] if (r["route"], r["side"]) == (AUTHENTICATE, "server"))
        assert server["requests"] >= 6 and server["rps"] > 0 and server["p99_ms"] is not None
        assert "observer" in routes["source"]
        validate = [r for r in routes["routes"] if r["route"].endswith("/ValidateToken") and r["side"] == "client"]
        assert validate and validate[0]["golden"]["success_rate"] == 1.0  # learner-svc's count of its calls

        code, edges = _json("edges", *where)
        _valid(edges, "edges")
        learner = [e for e in edges["edges"] if (e["from"], e["to"]) == ("learner-svc", "auth-svc")]
        assert learner and learner[0]["caller_identity"] == LEARNER_ID and learner[0]["golden"]["requests"] > 0

        code, status = _json("status", *where)
        _valid(status, "status")
        assert code == 0 and {s["health"] for s in status["services"]} == {"healthy"}, status["services"]
        auth = next(s for s in status["services"] if s["name"] == "auth-svc")
        assert auth["server"]["success_rate"] is not None and auth["server"]["success_rate"] < 1
        learner_row = next(s for s in status["services"] if s["name"] == "learner-svc")
        # learner-svc warmed its channel to each peer mesh.yaml lets it call before it served.
        assert "auth-svc" in [u["service"] for u in learner_row["upstreams"]]
        assert {u["breaker"] for u in learner_row["upstreams"]} == {"closed"}

        # The observer's own API: history points and a breaker reset through the caller's admin endpoint.
        with urllib.request.urlopen(f"http://{info.observer}/api/v1/history?service=auth-svc&window=60&step=10",
                                    timeout=5) as resp:
            hist = json.loads(resp.read())
        assert hist["schema"] == "aivo-mesh/history/v1" and len(hist["points"]) == 6
        assert any(p["rps"] > 0 for p in hist["points"])
        req = urllib.request.Request(f"http://{info.observer}/api/v1/breakers/reset", method="POST",
                                     data=json.dumps({"service": "learner-svc", "upstream": "auth-svc"}).encode(),
                                     headers={"Content-Type": "application/json"})  # else 415 (CSRF guard)
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert json.loads(resp.read())["reset"] is True

        # A stopped (SIGSTOP) auth-svc answers nothing: status says unreachable and exits 1, within 20 s
        # (two unanswered observer rounds of 2 s each with a 1.5 s health probe, and the CLI's start, generously).
        victim = next(r for r in state.read_processes() if r.name == "auth-svc")
        os.kill(victim.pid, signal.SIGSTOP)
        stopped = True

        def failing_status() -> dict[str, Any] | None:
            code, doc = _json("status", *where)
            return doc if code == 1 else None

        failing = _valid(_until(failing_status, 20, "status exits 1"), "status")
        assert next(s for s in failing["services"] if s["name"] == "auth-svc")["health"] == "unreachable"
        os.kill(victim.pid, signal.SIGCONT)
        stopped = False
    finally:
        if stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim.pid, signal.SIGCONT)
        down = meshctl("down", *where)
    assert down.returncode == 0, down.stderr
    assert not any(r.role == "observer" for r in state.read_processes())
    # Stopped: the same schemas, nothing running, exit 0.
    code, status = _json("status", *where)
    assert code == 0 and _valid(status, "status")["services"] == [] and status["plane"] is None
    code, edges = _json("edges", *where)
    assert code == 0 and _valid(edges, "edges")["edges"] == []
    code, routes = _json("routes", "auth-svc", *where)
    assert code == 0 and _valid(routes, "routes")["routes"] == []
