"""Demo traffic: the platform's main flow, driven through MeshClient, with per-service stats.

    authenticate (auth-svc) -> get profile (learner-svc, which validates the token with auth-svc)
    -> collect events (event-collector-svc) -> run a report (analytics-svc, which reads the collector)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from aivo_mesh.client import MeshClient
from aivo_mesh.services.protos import (
    analytics_pb2,
    analytics_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    learner_pb2,
    learner_pb2_grpc,
)

DEMO_PASSWORD = "demo-password"  # auth-svc's demo mode accepts any learner with >= 8 characters


@dataclass
class ServiceStats:
    calls: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    error_codes: dict[str, int] = field(default_factory=dict)

    def percentile(self, q: float) -> float | None:
        """Nearest-rank percentile in seconds."""
        if not self.latencies:
            return None
        data = sorted(self.latencies)
        rank = max(1, round(q / 100 * len(data)))
        return data[min(rank, len(data)) - 1]


@dataclass
class FlowStats:
    per_service: dict[str, ServiceStats] = field(default_factory=dict)
    flows: int = 0

    def timed(self, service: str) -> Callable[[Awaitable[Any]], Awaitable[Any]]:
        stats = self.per_service.setdefault(service, ServiceStats())

        async def run(aw: Awaitable[Any]) -> Any:
            start = time.perf_counter()
            try:
                return await aw
            except grpc.aio.AioRpcError as err:
                stats.errors += 1
                stats.error_codes[err.code().name] = stats.error_codes.get(err.code().name, 0) + 1
                raise
            finally:
                stats.calls += 1
                stats.latencies.append(time.perf_counter() - start)

        return run

    @property
    def total_errors(self) -> int:
        return sum(s.errors for s in self.per_service.values())


async def one_flow(client: MeshClient, stats: FlowStats, learner: str, report: bool) -> None:
    auth = auth_pb2_grpc.AuthServiceStub(await client.get_channel("auth-svc"))
    learners = learner_pb2_grpc.LearnerServiceStub(await client.get_channel("learner-svc"))
    events = events_pb2_grpc.EventCollectorServiceStub(await client.get_channel("event-collector-svc"))
    analytics = analytics_pb2_grpc.AnalyticsServiceStub(await client.get_channel("analytics-svc"))

    token = (await stats.timed("auth-svc")(auth.Authenticate(
        auth_pb2.AuthenticateRequest(learner_id=learner, password=DEMO_PASSWORD)))).token
    creds = (("authorization", f"Bearer {token}"),)
    await stats.timed("learner-svc")(learners.GetProfile(
        learner_pb2.GetProfileRequest(learner_id=learner), metadata=creds))
    event = events_pb2.Event(learner_id=learner, event_type="lesson_completed",
                             payload_json='{"lesson": "fractions-1"}', occurred_at=int(time.time()))
    await stats.timed("event-collector-svc")(events.Collect(
        events_pb2.CollectRequest(event=event, idempotency_key=str(uuid.uuid4()))))
    if report:
        await stats.timed("analytics-svc")(analytics.RunReport(
            analytics_pb2.RunReportRequest(report="events_by_type")))
    stats.flows += 1


async def drive(client: MeshClient, duration: float, workers: int = 4, learners: int = 20) -> FlowStats:
    """Run flows from `workers` concurrent tasks for `duration` seconds (at least one flow each)."""
    stats = FlowStats()
    stop_at = time.monotonic() + duration

    async def worker(w: int) -> None:
        i = 0
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):  # counted in stats; the flow goes on
                await one_flow(client, stats, f"learner-{(w * 7 + i) % learners}", report=i % 5 == 0)
            i += 1
            if time.monotonic() >= stop_at:
                return

    await asyncio.gather(*(worker(w) for w in range(workers)))
    return stats
