"""The Consul registration + watch path against a REAL `consul agent -dev`, when one is installed.

Skipped when the `consul` binary is not on PATH (the default in CI: test_discovery.py covers the
same code against tests/fakes/consul_agent.py). When it runs, it checks what the fake cannot: that a
real agent accepts `agent_service_definition`'s JSON (exact field names, durations), runs the gRPC
health check itself, and that the blocking watch sees the instance turn passing and go away.

The agent runs on free ports (HTTP, DNS, serf, server RPC, gRPC; gRPC-TLS off), and the test waits
for a leader via /v1/status/leader, bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from binaries import require
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from helpers import stop_process

from aivo_mesh.config import MeshSpec
from aivo_mesh.discovery import ConsulDiscovery, ConsulRegistration, SnapshotStore, agent_service_definition
from aivo_mesh.runtime.local import free_port

pytestmark = pytest.mark.slow

LEADER_BOUND = 30.0  # seconds for the dev agent to elect itself
CHECK_BOUND = 20.0  # seconds for the agent's gRPC check to pass / an instance to disappear


def _http_get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return int(resp.status), resp.read().decode()


@pytest.fixture(scope="module")
def consul_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `consul agent -dev` on free ports; yields its HTTP address (host:port)."""
    binary = require("consul")  # without it, test_discovery.py still covers this code against a fake agent
    http_port = free_port()
    ports = (f"ports {{ http = {http_port}, dns = {free_port()}, grpc = {free_port()}, grpc_tls = -1, "
             f"serf_lan = {free_port()}, serf_wan = {free_port()}, server = {free_port()} }}")
    log_path: Path = tmp_path_factory.mktemp("consul") / "consul.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [binary, "agent", "-dev", "-node", "aivo-test", "-bind", "127.0.0.1", "-client", "127.0.0.1",
             "-hcl", ports], stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + LEADER_BOUND
        while True:
            if proc.poll() is not None:
                pytest.fail(f"consul agent exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                status, body = _http_get(f"http://{address}/v1/status/leader")
                if status == 200 and json.loads(body):
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"consul agent elected no leader within {LEADER_BOUND:.0f}s:\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.1)  # an external process: nothing to wait on but its HTTP answer
        yield address
    finally:
        stop_process(proc, 10)


@pytest.fixture
async def health_server(mesh: MeshSpec) -> AsyncIterator[int]:
    """A plaintext grpc.health.v1 server reporting auth-svc's gRPC service SERVING; yields its port."""
    server = grpc.aio.server()
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    for name in ("", mesh.service("auth-svc").grpc_service):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    try:
        yield port
    finally:
        await server.stop(None)


async def test_real_agent_accepts_the_tls_definition(consul_dev: str, mesh: MeshSpec) -> None:
    reg = ConsulRegistration(consul_dev)
    sid = await reg.register(mesh, "auth-svc", address="127.0.0.1", port=free_port())
    try:
        services = await reg.agent_services()
        definition = agent_service_definition(mesh, "auth-svc", "127.0.0.1", services[sid]["Port"])
        assert services[sid]["Service"] == definition["Name"]
        assert services[sid]["Tags"] == definition["Tags"]
        assert services[sid]["Meta"] == definition["Meta"]
        _, body = await asyncio.to_thread(_http_get, f"http://{consul_dev}/v1/agent/checks")
        check = json.loads(body)[f"service:{sid}"]
        assert check["Type"] == "grpc"
        assert check["ServiceID"] == sid
    finally:
        assert await reg.deregister(sid) is True


async def test_real_agent_watch_sees_passing_then_removed(consul_dev: str, mesh: MeshSpec, health_server: int) -> None:
    reg = ConsulRegistration(consul_dev)
    store = SnapshotStore()
    watch = asyncio.create_task(ConsulDiscovery(consul_dev, wait="2s", rate=20).watch("auth-svc", store))
    try:
        sid = await reg.register(mesh, "auth-svc", address="127.0.0.1", port=health_server, use_tls=False,
                                 check_interval="1s", check_timeout="1s")
        want = f"127.0.0.1:{health_server}"
        snap = await store.newer_than("auth-svc", None, timeout=CHECK_BOUND)
        async with asyncio.timeout(CHECK_BOUND):  # the agent's own gRPC check must pass first
            while want not in snap.addresses:
                snap = await store.newer_than("auth-svc", snap.version)
        assert snap.endpoints[0].metadata["consul_id"] == sid

        await reg.deregister(sid)
        async with asyncio.timeout(CHECK_BOUND):
            while want in snap.addresses:
                snap = await store.newer_than("auth-svc", snap.version)
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await reg.deregister_all()
