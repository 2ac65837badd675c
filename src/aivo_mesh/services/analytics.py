"""analytics-svc: aggregate reports over the events held by event-collector-svc.

``RunReport`` streams the matching events from event-collector-svc's ``ListEvents`` (over the
mesh, via ``ctx.peers``) and counts them:

* ``events_by_type``    -- one row per event_type
* ``events_by_learner`` -- one row per learner_id

Rows are sorted by count (descending), then key. ``learner_id`` in the request restricts the
report to that learner's events. An unknown report name is INVALID_ARGUMENT; if
event-collector-svc cannot be reached the call fails with UNAVAILABLE (or DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import grpc

from aivo_mesh.services.base import (
    PEER_ERRORS,
    PeerChannels,
    ServiceContext,
    abort,
    describe_peer_error,
    now,
    peer_failure_status,
    peer_timeout,
)
from aivo_mesh.services.protos import analytics_pb2, analytics_pb2_grpc, events_pb2, events_pb2_grpc

log = logging.getLogger(__name__)

EVENTS_SERVICE = "event-collector-svc"
#: Default budget for reading the events (capped by the caller's own deadline).
LIST_TIMEOUT = 10.0

REPORTS: dict[str, Callable[[events_pb2.Event], str]] = {
    "events_by_type": lambda ev: ev.event_type,
    "events_by_learner": lambda ev: ev.learner_id,
}


class AnalyticsServicer(analytics_pb2_grpc.AnalyticsServiceServicer):
    def __init__(self, peers: PeerChannels) -> None:
        self._peers = peers

    async def _count(
        self, context: grpc.aio.ServicerContext, key: Callable[[events_pb2.Event], str], learner_id: str
    ) -> Counter[str]:
        counts: Counter[str] = Counter()
        channel = await self._peers.channel(EVENTS_SERVICE)
        call = events_pb2_grpc.EventCollectorServiceStub(channel).ListEvents(
            events_pb2.ListEventsRequest(learner_id=learner_id),
            timeout=peer_timeout(context, LIST_TIMEOUT),
        )
        try:
            async for event in call:
                counts[key(event)] += 1
        finally:
            call.cancel()  # no-op once the stream has finished
        return counts

    async def RunReport(
        self, request: analytics_pb2.RunReportRequest, context: grpc.aio.ServicerContext
    ) -> analytics_pb2.Report:
        key = REPORTS.get(request.report)
        if key is None:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown report {request.report!r}; expected one of: {', '.join(sorted(REPORTS))}",
            )
        try:
            counts = await self._count(context, key, request.learner_id)
        except PEER_ERRORS as exc:
            log.warning("ListEvents via %s failed: %s", EVENTS_SERVICE, describe_peer_error(exc))
            status = peer_failure_status(exc)
            await abort(context, status, f"{EVENTS_SERVICE} unavailable: cannot read events")
        rows = [
            analytics_pb2.Row(key=k, count=c)
            for k, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        ]
        return analytics_pb2.Report(
            report=request.report, rows=rows, total=sum(counts.values()), generated_at=now()
        )

    async def close(self) -> None:
        """Nothing to release: peer channels belong to ctx.peers."""


def register(server: grpc.aio.Server, ctx: ServiceContext) -> AnalyticsServicer:
    servicer = AnalyticsServicer(ctx.peers)
    analytics_pb2_grpc.add_AnalyticsServiceServicer_to_server(servicer, server)
    return servicer
