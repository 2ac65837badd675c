"""Probing mesh services over grpc.health.v1 with a mesh identity (normally `mesh-client`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aivo_mesh.client import MeshClient

STATUS_NAMES = {v: k for k, v in health_pb2.HealthCheckResponse.ServingStatus.items()}


async def check(client: MeshClient, service: str, timeout: float = 1.0) -> str:
    """The service's overall health status name (SERVING, NOT_SERVING, ...) or UNREACHABLE.
    Probes go around the policy stack: a service still starting must not open its breaker."""
    channel = client.bare_channel(service)
    try:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.aio.AioRpcError as err:
        return "UNREACHABLE" if err.code() in (grpc.StatusCode.UNAVAILABLE,
                                               grpc.StatusCode.DEADLINE_EXCEEDED) else err.code().name
    return str(STATUS_NAMES.get(resp.status, resp.status))


async def wait_serving(client: MeshClient, services: Sequence[str], timeout: float,
                       interval: float = 0.1) -> dict[str, str]:
    """Poll until every service reports SERVING or `timeout` passes; returns the last statuses."""
    deadline = time.monotonic() + timeout
    status: dict[str, str] = {s: "UNKNOWN" for s in services}
    while True:
        pending = [s for s in services if status[s] != "SERVING"]
        if not pending:
            return status
        results = await asyncio.gather(*(check(client, s, timeout=min(1.0, interval * 10))
                                         for s in pending))
        status.update(zip(pending, results, strict=True))
        if all(v == "SERVING" for v in status.values()):
            return status
        if time.monotonic() >= deadline:
            return status
        await asyncio.sleep(interval)
