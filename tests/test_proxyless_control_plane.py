"""The proxyless plane on the control plane, as `meshctl up --plane proxyless` runs it: each service takes its
peers' policies and endpoints and its own allow rules live, `meshctl apply` reaches every service and says
so, `status` and `config-dump` show what each holds, and the control plane can die without a call failing.

The calls go mesh-client -> learner-svc.GetProfile -> (learner-svc's MeshClient) auth-svc.ValidateToken: a
change at auth-svc's server (its allow rules) and one at learner-svc's client (auth-svc's endpoints) are each
seen in what GetProfile answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from helpers import meshctl
from waiting import until

from aivo_mesh.client import MeshClient, MeshConfig
from aivo_mesh.config import MeshSpec, load_mesh
from aivo_mesh.runtime.mesh import mesh_for_clients
from aivo_mesh.runtime.state import RuntimeInfo, StateDir
from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc, learner_pb2, learner_pb2_grpc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def proxyless_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StateDir, RuntimeInfo, MeshSpec]]:
    state = StateDir(tmp_path_factory.mktemp("proxyless") / "mesh")
    out = meshctl("up", "--plane", "proxyless", "--state-dir", str(state.root), "--free-ports", "--timeout", "90")
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        info = RuntimeInfo.read(state)
        assert info is not None and info.plane == "proxyless" and info.control_plane
        yield state, info, mesh_for_clients(load_mesh(state.mesh_file), info)
    finally:
        meshctl("down", "--state-dir", str(state.root))


class Learner:
    """mesh-client's calls of learner-svc.GetProfile with a valid token."""

    def __init__(self, client: MeshClient, token: str) -> None:
        self.client, self.token = client, token

    async def get(self) -> grpc.StatusCode:
        stub = learner_pb2_grpc.LearnerServiceStub(await self.client.channel("learner-svc"))
        try:
            await stub.GetProfile(learner_pb2.GetProfileRequest(learner_id="ada"), timeout=10,
                                  metadata=(("authorization", f"Bearer {self.token}"),))
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


@pytest.fixture
async def learner(proxyless_mesh: tuple[StateDir, RuntimeInfo, MeshSpec]) -> AsyncIterator[Learner]:
    state, _, view = proxyless_mesh
    async with MeshClient(MeshConfig.for_identity("mesh-client", state.certs, view), health_checks=False,
                          reload_interval=None) as client:
        auth = auth_pb2_grpc.AuthServiceStub(await client.channel("auth-svc"))
        token = (await auth.Authenticate(auth_pb2.AuthenticateRequest(learner_id="ada", password="x" * 8),
                                         timeout=10)).token
        yield Learner(client, token)


def apply(state: StateDir, doc: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    file = tmp_path / "mesh.yaml"
    file.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = meshctl("apply", str(file), "--state-dir", str(state.root), "-o", "json")
    assert out.returncode == 0, out.stdout + out.stderr
    return dict(json.loads(out.stdout))


def _service(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in doc["services"] if s["name"] == name)


def _status(state: StateDir) -> dict[str, Any]:
    out = meshctl("status", "--state-dir", str(state.root), "-o", "json", "--interval", "0")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


async def test_apply_changes_a_servers_allow_rules_and_a_clients_endpoints_live(proxyless_mesh, learner, tmp_path):
    state, _, _ = proxyless_mesh
    status = _status(state)
    assert status["control_plane"]["synced"] == 4, status["control_plane"]
    assert all(s["process"]["xds"].startswith("synced") for s in status["services"]), status["services"]
    assert await learner.get() == grpc.StatusCode.OK
    original: dict[str, Any] = yaml.safe_load(state.mesh_file.read_text())

    # auth-svc's server: learner-svc may no longer call ValidateToken. learner-svc gets PERMISSION_DENIED
    # from auth-svc and answers UNAVAILABLE (it never passes a peer's decision on as its own).
    doc = yaml.safe_load(state.mesh_file.read_text())
    auth = _service(doc, "auth-svc")
    auth["allow"] = [r for r in auth["allow"] if "learner-svc" not in r["from"]] + [
        {"from": ["analytics-svc"], "methods": ["/aivo.auth.v1.AuthService/ValidateToken"]}]
    result = await asyncio.to_thread(apply, state, doc, tmp_path)
    assert {n["service"]: n["outcome"] for n in result["nodes"]} == {
        f"{s}/proxyless": "acked" for s in ("analytics-svc", "auth-svc", "event-collector-svc", "learner-svc")}
    assert "auth-svc" in result["changed"], result
    assert await learner.get() == grpc.StatusCode.UNAVAILABLE
    # And back.
    await asyncio.to_thread(apply, state, original, tmp_path)
    assert await learner.get() == grpc.StatusCode.OK

    # learner-svc's client: auth-svc is now where nothing listens. Its calls fail there; back, they succeed.
    doc = yaml.safe_load(state.mesh_file.read_text())
    _service(doc, "auth-svc")["endpoints"] = ["127.0.0.1:1"]
    await asyncio.to_thread(apply, state, doc, tmp_path)
    dump = meshctl("config-dump", "learner-svc", "--type", "endpoints", "--state-dir", str(state.root), "-o", "json")
    assert dump.returncode == 0, dump.stderr
    held = json.loads(dump.stdout)["endpoints"]
    auth_cla = next(e["resource"] for e in held if e["name"] == "auth-svc")
    assert auth_cla["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] == 1
    assert await learner.get() == grpc.StatusCode.UNAVAILABLE
    await asyncio.to_thread(apply, state, original, tmp_path)
    await until_ok(learner)


async def test_apply_changes_a_servers_faults_live(proxyless_mesh, learner, tmp_path):
    """A fault on auth-svc's ValidateToken for learner-svc only: mesh-client's own call of ValidateToken is
    untouched, learner-svc's (inside GetProfile) is aborted by auth-svc's MeshServer, and learner-svc
    answers its caller UNAVAILABLE; removed, GetProfile works again."""
    state, _, _ = proxyless_mesh
    original: dict[str, Any] = yaml.safe_load(state.mesh_file.read_text())
    doc = yaml.safe_load(state.mesh_file.read_text())
    route = next(r for r in _service(doc, "auth-svc")["routes"] if r["match"].endswith("/ValidateToken"))
    route["fault"] = {"abort_status": "PERMISSION_DENIED", "abort_percent": 100, "callers": ["learner-svc"]}
    try:
        result = await asyncio.to_thread(apply, state, doc, tmp_path)
        assert "auth-svc" in result["changed"], result
        assert await learner.get() == grpc.StatusCode.UNAVAILABLE
        validate = auth_pb2_grpc.AuthServiceStub(await learner.client.channel("auth-svc")).ValidateToken
        assert (await validate(auth_pb2.ValidateTokenRequest(token=learner.token), timeout=10)).valid
    finally:
        await asyncio.to_thread(apply, state, original, tmp_path)
    await until_ok(learner)


async def until_ok(learner: Learner, timeout: float = 20) -> None:
    async def ok() -> None:
        while await learner.get() != grpc.StatusCode.OK:
            await asyncio.sleep(0.1)

    await asyncio.wait_for(ok(), timeout)


async def test_the_control_plane_killed_under_traffic_fails_no_call_and_its_restart_reapplies_nothing(
        proxyless_mesh, learner):
    state, _, _ = proxyless_mesh
    await until_ok(learner)

    def learner_updated() -> str:
        out = meshctl("config-dump", "learner-svc", "--type", "clusters", "--state-dir", str(state.root), "-o", "json")
        assert out.returncode == 0, out.stderr
        return str(json.loads(out.stdout)["clusters"][0]["last_updated"])

    before = await asyncio.to_thread(learner_updated)
    cp = next(r for r in state.read_processes() if r.role == "control-plane")
    failures: list[grpc.StatusCode] = []
    stop = asyncio.Event()

    async def traffic() -> int:
        calls = 0
        while not stop.is_set():
            code = await learner.get()
            calls += 1
            if code != grpc.StatusCode.OK:
                failures.append(code)
        return calls

    task = asyncio.create_task(traffic())
    os.kill(cp.pid, signal.SIGKILL)
    # The supervisor restarts it; every service reconnects and holds the same versions.
    await until(lambda: _restarted(state, cp.pid), timeout=30, what="the control plane restarted")
    await poll(lambda: _status(state)["control_plane"]["synced"] == 4, timeout=30, what="every service resynced")
    stop.set()
    calls = await task
    assert calls > 0 and failures == [], failures
    # Nothing was applied again: the resumed streams were sent nothing new.
    assert await asyncio.to_thread(learner_updated) == before


async def poll(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """`until` for a condition that blocks (it runs a command): in a thread, so the traffic keeps going."""
    async def loop() -> None:
        while not await asyncio.to_thread(condition):
            await asyncio.sleep(0.2)

    try:
        await asyncio.wait_for(loop(), timeout)
    except TimeoutError:
        raise AssertionError(f"not within {timeout:g}s: {what}") from None


def _restarted(state: StateDir, old_pid: int) -> bool:
    rec = next((r for r in state.read_processes() if r.role == "control-plane"), None)
    return rec is not None and rec.pid != old_pid
