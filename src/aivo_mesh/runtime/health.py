"""Probing mesh services over grpc.health.v1 with a mesh identity (normally `mesh-client`), and the one
wait for a local mesh to be healthy (`meshctl up`, `meshctl demo`, tests)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aivo_mesh.client import MeshClient, MeshConfig
from aivo_mesh.config.loader import load_mesh
from aivo_mesh.runtime.mesh import RuntimeInfo, mesh_for_clients
from aivo_mesh.runtime.state import StateDir
from aivo_mesh.runtime.status import envoy_ready, peers_healthy

STATUS_NAMES = {v: k for k, v in health_pb2.HealthCheckResponse.ServingStatus.items()}
SERVING = "SERVING"


async def check(client: MeshClient, service: str, timeout: float = 1.0) -> str:
    """The service's overall health status name (SERVING, NOT_SERVING, ...) or UNREACHABLE.
    Probes go around the policy stack: a service still starting must not open its breaker; and around a
    channel left in reconnect back-off by earlier failed probes (a service that has come up answers now)."""
    channel = client.bare_channel(service, reconnect=True)
    try:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.aio.AioRpcError as err:
        return "UNREACHABLE" if err.code() in (grpc.StatusCode.UNAVAILABLE,
                                               grpc.StatusCode.DEADLINE_EXCEEDED) else err.code().name
    return str(STATUS_NAMES.get(resp.status, resp.status))


def all_serving(statuses: Mapping[str, str]) -> bool:
    return all(v == SERVING for v in statuses.values())


async def _probe(client: MeshClient, service: str, sidecar_admin: str | None, timeout: float) -> str:
    """One service's readiness through its front door; on the sidecar plane its Envoy first."""
    if sidecar_admin is not None:
        if not await asyncio.to_thread(envoy_ready, sidecar_admin):
            return "sidecar not ready"
        # No panic routing: a peer not yet seen healthy by this sidecar fails every call to it.
        if not await asyncio.to_thread(peers_healthy, sidecar_admin):
            return "sidecar waiting for its peers' health checks"
    return await check(client, service, timeout=timeout)


async def wait_serving(client: MeshClient, services: Sequence[str], timeout: float, *,
                       sidecars: Mapping[str, str] | None = None,
                       progress: Callable[[str], None] | None = None,
                       given_up: Callable[[], bool] | None = None,
                       interval: float = 0.1) -> dict[str, str]:
    """Poll (bounded) until every service is SERVING through its front door, or `timeout` passes, or
    `given_up()` says waiting is pointless (a process it needs exited); returns the last statuses.

    `sidecars`: the Envoy admin address of each service behind a sidecar; such a service counts only
    once its Envoy is ready and sees all its peers healthy. A service seen SERVING is not probed again.
    `progress` is told "n/m services SERVING ..." after each round."""
    deadline = time.monotonic() + timeout
    sidecars = sidecars or {}
    status: dict[str, str] = {s: "UNKNOWN" for s in services}
    while True:
        pending = [s for s in services if status[s] != SERVING]
        results = await asyncio.gather(*(_probe(client, s, sidecars.get(s), min(1.0, interval * 10))
                                         for s in pending))
        status.update(zip(pending, results, strict=True))
        if progress is not None:
            progress(f"{sum(v == SERVING for v in status.values())}/{len(status)} services SERVING ...")
        if all_serving(status) or time.monotonic() >= deadline or (given_up is not None and given_up()):
            return status
        await asyncio.sleep(interval)


async def wait_supervised(state: StateDir, supervisor_exited: Callable[[], int | None], timeout: float,
                          progress: Callable[[str], None] | None = None) -> dict[str, str]:
    """`meshctl up`'s wait: until the supervisor wrote runtime.json, then `wait_serving` on every service
    of the running plane, all within `timeout`. `supervisor_exited()` is its exit code, None while it runs.
    A supervisor that exits or never starts is the one entry `supervisor`."""
    deadline = time.monotonic() + timeout
    while (info := RuntimeInfo.read(state)) is None:
        if (code := supervisor_exited()) is not None:
            return {"supervisor": f"exited with {code}"}
        if time.monotonic() > deadline:
            return {"supervisor": "did not start"}
        await asyncio.sleep(0.05)
    view = mesh_for_clients(load_mesh(state.mesh_file), info)
    sidecars = {name: ep.sidecar_admin for name, ep in info.services.items() if ep.sidecar_admin}
    async with MeshClient(MeshConfig.for_identity("mesh-client", state.certs, view), health_checks=False,
                          reload_interval=None) as client:
        return await wait_serving(client, list(info.services), max(0.0, deadline - time.monotonic()),
                                  sidecars=sidecars, progress=progress,
                                  given_up=lambda: supervisor_exited() is not None)
