"""learner-svc: learner profiles in SQLite (``<state_dir>/learner.db``).

Every call needs ``authorization: Bearer <token>`` metadata. The token is checked with
auth-svc's ``ValidateToken`` (over the mesh, via ``ctx.peers``); a missing or invalid token is
UNAUTHENTICATED, and a learner may only read or update their own profile (token subject ==
learner_id), otherwise PERMISSION_DENIED. If auth-svc cannot be reached the call fails with
UNAVAILABLE (or DEADLINE_EXCEEDED), never with a decision.

``GetProfile`` of a learner without a profile creates the default one. ``UpdateProfile``
replaces display_name, grade_level and preferences; the server sets updated_at.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from typing import Any

import grpc

from aivo_mesh.services.base import (
    PEER_ERRORS,
    PeerChannels,
    ServiceContext,
    SqliteDB,
    abort,
    bearer_token,
    describe_peer_error,
    now,
    peer_failure_status,
    peer_timeout,
)
from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc, learner_pb2, learner_pb2_grpc

log = logging.getLogger(__name__)

AUTH_SERVICE = "auth-svc"
DB_FILE = "learner.db"
MAX_ID_LENGTH = 128
MAX_DISPLAY_NAME_LENGTH = 200
MIN_GRADE, MAX_GRADE = 0, 12
MAX_PREFERENCES = 64
MAX_PREFERENCE_KEY_LENGTH = 64
MAX_PREFERENCE_VALUE_LENGTH = 1024

SCHEMA = """
CREATE TABLE IF NOT EXISTS profiles (
    learner_id       TEXT PRIMARY KEY,
    display_name     TEXT NOT NULL,
    grade_level      INTEGER NOT NULL,
    preferences_json TEXT NOT NULL,
    updated_at       INTEGER NOT NULL
);
"""

_COLUMNS = "learner_id, display_name, grade_level, preferences_json, updated_at"


def _to_profile(row: tuple[Any, ...]) -> learner_pb2.Profile:
    learner_id, display_name, grade_level, preferences_json, updated_at = row
    return learner_pb2.Profile(
        learner_id=learner_id,
        display_name=display_name,
        grade_level=grade_level,
        preferences=json.loads(preferences_json),
        updated_at=updated_at,
    )


def _get_or_create(conn: sqlite3.Connection, learner_id: str, ts: int) -> learner_pb2.Profile:
    with conn:
        conn.execute(
            f"INSERT OR IGNORE INTO profiles ({_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
            (learner_id, learner_id, MIN_GRADE, "{}", ts),
        )
        row = conn.execute(f"SELECT {_COLUMNS} FROM profiles WHERE learner_id = ?", (learner_id,)).fetchone()
    return _to_profile(row)


def _upsert(conn: sqlite3.Connection, profile: learner_pb2.Profile, ts: int) -> learner_pb2.Profile:
    prefs = json.dumps(dict(sorted(profile.preferences.items())), separators=(",", ":"))
    with conn:
        conn.execute(
            f"INSERT INTO profiles ({_COLUMNS}) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(learner_id) DO UPDATE SET display_name = excluded.display_name, "
            "grade_level = excluded.grade_level, preferences_json = excluded.preferences_json, "
            "updated_at = excluded.updated_at",
            (profile.learner_id, profile.display_name, profile.grade_level, prefs, ts),
        )
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM profiles WHERE learner_id = ?", (profile.learner_id,)
        ).fetchone()
    return _to_profile(row)


def _validation_error(profile: learner_pb2.Profile) -> str | None:
    if len(profile.display_name) > MAX_DISPLAY_NAME_LENGTH:
        return f"display_name is longer than {MAX_DISPLAY_NAME_LENGTH} characters"
    if not MIN_GRADE <= profile.grade_level <= MAX_GRADE:
        return f"grade_level must be between {MIN_GRADE} and {MAX_GRADE}"
    if len(profile.preferences) > MAX_PREFERENCES:
        return f"at most {MAX_PREFERENCES} preferences"
    for key, value in profile.preferences.items():
        if not key or len(key) > MAX_PREFERENCE_KEY_LENGTH:
            return f"preference keys must be 1 to {MAX_PREFERENCE_KEY_LENGTH} characters"
        if len(value) > MAX_PREFERENCE_VALUE_LENGTH:
            return f"preference values must be at most {MAX_PREFERENCE_VALUE_LENGTH} characters"
    return None


class LearnerServicer(learner_pb2_grpc.LearnerServiceServicer):
    def __init__(self, db: SqliteDB, peers: PeerChannels) -> None:
        self.db = db
        self._peers = peers

    async def _authenticated_subject(self, context: grpc.aio.ServicerContext) -> str:
        """The subject of the caller's bearer token, as vouched for by auth-svc."""
        token = bearer_token(context)
        if token is None:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
        try:
            channel = await self._peers.channel(AUTH_SERVICE)
            result = await auth_pb2_grpc.AuthServiceStub(channel).ValidateToken(
                auth_pb2.ValidateTokenRequest(token=token), timeout=peer_timeout(context)
            )
        except PEER_ERRORS as exc:
            log.warning("token validation via %s failed: %s", AUTH_SERVICE, describe_peer_error(exc))
            status = peer_failure_status(exc)
            await abort(context, status, f"{AUTH_SERVICE} unavailable: cannot validate the token")
        if not result.valid or not result.subject:
            await abort(
                context, grpc.StatusCode.UNAUTHENTICATED, f"invalid token: {result.reason or 'rejected'}"
            )
        return result.subject

    @staticmethod
    async def _check_learner_id(context: grpc.aio.ServicerContext, learner_id: str, subject: str) -> None:
        if not learner_id or len(learner_id) > MAX_ID_LENGTH:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "learner_id is required")
        if learner_id != subject:
            await abort(
                context, grpc.StatusCode.PERMISSION_DENIED, "a learner may only access their own profile"
            )

    async def GetProfile(
        self, request: learner_pb2.GetProfileRequest, context: grpc.aio.ServicerContext
    ) -> learner_pb2.Profile:
        subject = await self._authenticated_subject(context)
        await self._check_learner_id(context, request.learner_id, subject)
        learner_id, ts = request.learner_id, now()
        return await self.db.run(lambda conn: _get_or_create(conn, learner_id, ts))

    async def UpdateProfile(
        self, request: learner_pb2.UpdateProfileRequest, context: grpc.aio.ServicerContext
    ) -> learner_pb2.Profile:
        subject = await self._authenticated_subject(context)
        if not request.HasField("profile"):
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "profile is required")
        profile = request.profile
        await self._check_learner_id(context, profile.learner_id, subject)
        problem = _validation_error(profile)
        if problem is not None:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        ts = now()
        updated = await self.db.run(lambda conn: _upsert(conn, profile, ts))
        log.info("profile updated for learner=%r", profile.learner_id)
        return updated

    async def close(self) -> None:
        await self.db.close()


def register(server: grpc.aio.Server, ctx: ServiceContext) -> LearnerServicer:
    servicer = LearnerServicer(SqliteDB(ctx.state_dir / DB_FILE, SCHEMA), ctx.peers)
    learner_pb2_grpc.add_LearnerServiceServicer_to_server(servicer, server)
    return servicer
