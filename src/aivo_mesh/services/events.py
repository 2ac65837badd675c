"""event-collector-svc: learning events in SQLite (``<state_dir>/events.db``), exactly once.

Each event is stored under its client-chosen ``idempotency_key`` (a UNIQUE column), so a
retried ``Collect`` never stores an event twice: the retry gets the original ``event_id``
back with ``duplicate=true``. (A retry carrying a different payload under the same key is
also answered with the original event; the first write wins.)

``CollectStream`` applies the same rules to each message of a client stream, storing them
in batches. If a message is invalid the call fails with INVALID_ARGUMENT; batches stored
before that are kept, and because of the idempotency keys the client can simply retry the
whole stream.

``ListEvents`` streams stored events in storage order, filtered by learner_id, event_type
and ``occurred_at >= since`` when those are set, reading the table page by page.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator, Sequence
from functools import partial
from typing import Any

import grpc

from aivo_mesh.services.base import ServiceContext, SqliteDB, abort, now
from aivo_mesh.services.protos import events_pb2, events_pb2_grpc

log = logging.getLogger(__name__)

DB_FILE = "events.db"
MAX_KEY_LENGTH = 256
MAX_ID_LENGTH = 128
MAX_PAYLOAD_BYTES = 64 * 1024
#: Events stored per transaction by CollectStream.
STREAM_BATCH = 100
#: Rows read per query by ListEvents.
LIST_PAGE = 500

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT NOT NULL UNIQUE,
    idempotency_key TEXT NOT NULL UNIQUE,
    learner_id      TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    payload_json    TEXT NOT NULL,
    occurred_at     INTEGER NOT NULL,
    received_at     INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_learner ON events (learner_id, seq);
CREATE INDEX IF NOT EXISTS events_by_type ON events (event_type, seq);
"""


def validation_error(request: events_pb2.CollectRequest) -> str | None:
    """Why ``request`` cannot be stored, or None."""
    if not request.idempotency_key:
        return "idempotency_key is required"
    if len(request.idempotency_key) > MAX_KEY_LENGTH:
        return f"idempotency_key is longer than {MAX_KEY_LENGTH} characters"
    if not request.HasField("event"):
        return "event is required"
    ev = request.event
    if not ev.learner_id or len(ev.learner_id) > MAX_ID_LENGTH:
        return "event.learner_id is required"
    if not ev.event_type or len(ev.event_type) > MAX_ID_LENGTH:
        return "event.event_type is required"
    if ev.occurred_at < 0:
        return "event.occurred_at must not be negative"
    if ev.payload_json:
        if len(ev.payload_json.encode("utf-8")) > MAX_PAYLOAD_BYTES:
            return f"event.payload_json is larger than {MAX_PAYLOAD_BYTES} bytes"
        try:
            json.loads(ev.payload_json)
        except ValueError:
            return "event.payload_json is not valid JSON"
    return None


def _store(
    conn: sqlite3.Connection, requests: Sequence[events_pb2.CollectRequest], ts: int
) -> list[tuple[str, bool]]:
    """Store ``requests`` in one transaction; (event_id, duplicate) for each."""
    results: list[tuple[str, bool]] = []
    with conn:
        for req in requests:
            ev = req.event
            event_id = uuid.uuid4().hex
            cur = conn.execute(
                "INSERT INTO events (event_id, idempotency_key, learner_id, event_type, payload_json, "
                "occurred_at, received_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (idempotency_key) DO NOTHING",
                (
                    event_id,
                    req.idempotency_key,
                    ev.learner_id,
                    ev.event_type,
                    ev.payload_json or "{}",
                    ev.occurred_at or ts,
                    ts,
                ),
            )
            if cur.rowcount == 1:
                results.append((event_id, False))
            else:
                row = conn.execute(
                    "SELECT event_id FROM events WHERE idempotency_key = ?", (req.idempotency_key,)
                ).fetchone()
                results.append((row[0], True))
    return results


def _page(
    conn: sqlite3.Connection, request: events_pb2.ListEventsRequest, after_seq: int, limit: int
) -> list[tuple[Any, ...]]:
    where = ["seq > ?"]
    params: list[Any] = [after_seq]
    if request.learner_id:
        where.append("learner_id = ?")
        params.append(request.learner_id)
    if request.event_type:
        where.append("event_type = ?")
        params.append(request.event_type)
    if request.since > 0:
        where.append("occurred_at >= ?")
        params.append(request.since)
    params.append(limit)
    return conn.execute(
        "SELECT seq, event_id, learner_id, event_type, payload_json, occurred_at FROM events "
        f"WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?",
        params,
    ).fetchall()


class EventCollectorServicer(events_pb2_grpc.EventCollectorServiceServicer):
    def __init__(self, db: SqliteDB) -> None:
        self.db = db

    async def _store(self, requests: Sequence[events_pb2.CollectRequest]) -> list[tuple[str, bool]]:
        batch, ts = list(requests), now()
        return await self.db.run(lambda conn: _store(conn, batch, ts))

    async def Collect(
        self, request: events_pb2.CollectRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.CollectResponse:
        problem = validation_error(request)
        if problem is not None:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        [(event_id, duplicate)] = await self._store([request])
        return events_pb2.CollectResponse(event_id=event_id, duplicate=duplicate)

    async def CollectStream(
        self,
        request_iterator: AsyncIterator[events_pb2.CollectRequest],
        context: grpc.aio.ServicerContext,
    ) -> events_pb2.CollectStreamResponse:
        accepted = duplicates = 0
        batch: list[events_pb2.CollectRequest] = []

        async def flush() -> None:
            nonlocal accepted, duplicates
            for _, duplicate in await self._store(batch):
                if duplicate:
                    duplicates += 1
                else:
                    accepted += 1
            batch.clear()

        async for request in request_iterator:
            problem = validation_error(request)
            if problem is not None:
                await abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"message {accepted + duplicates + len(batch) + 1}: {problem}",
                )
            batch.append(request)
            if len(batch) >= STREAM_BATCH:
                await flush()
        if batch:
            await flush()
        return events_pb2.CollectStreamResponse(accepted=accepted, duplicates=duplicates)

    async def ListEvents(
        self, request: events_pb2.ListEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[events_pb2.Event]:
        after_seq = 0
        while True:
            rows = await self.db.run(partial(_page, request=request, after_seq=after_seq, limit=LIST_PAGE))
            for seq, event_id, learner_id, event_type, payload_json, occurred_at in rows:
                after_seq = seq
                yield events_pb2.Event(
                    event_id=event_id,
                    learner_id=learner_id,
                    event_type=event_type,
                    payload_json=payload_json,
                    occurred_at=occurred_at,
                )
            if len(rows) < LIST_PAGE:
                return

    async def close(self) -> None:
        await self.db.close()


def register(server: grpc.aio.Server, ctx: ServiceContext) -> EventCollectorServicer:
    servicer = EventCollectorServicer(SqliteDB(ctx.state_dir / DB_FILE, SCHEMA))
    events_pb2_grpc.add_EventCollectorServiceServicer_to_server(servicer, server)
    return servicer
