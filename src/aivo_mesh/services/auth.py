"""auth-svc: issues and validates short-lived HMAC-SHA256 bearer tokens.

Token format (compact, JWS-like, but deliberately not JWT)::

    base64url(payload_json) "." base64url(HMAC-SHA256(key, base64url(payload_json)))

with ``payload_json = {"exp": ..., "iat": ..., "jti": <random>, "sub": <learner_id>}`` (sorted
keys, no padding in either segment). Tokens live :data:`TOKEN_TTL_SECONDS` (15 minutes).

The signing key is 32 random bytes. It comes from ``$AIVO_AUTH_HMAC_KEY`` (hex) when set,
otherwise from ``<state_dir>/auth-hmac.key`` (hex, mode 0600), which is created on first
start. Every auth-svc replica must share the key, or tokens issued by one are rejected by
another.

DEMO CREDENTIAL POLICY: there is no user store. ``Authenticate`` accepts ANY ``learner_id``
whose password is at least :data:`MIN_PASSWORD_LENGTH` (8) characters long and rejects
everything else with UNAUTHENTICATED. Replace :meth:`AuthServicer.check_credentials` before
using this for anything real.

Tokens and keys are never logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from aivo_mesh.errors import PkiError
from aivo_mesh.services.base import ServiceContext, abort, ensure_state_dir
from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc

log = logging.getLogger(__name__)

TOKEN_TTL_SECONDS = 15 * 60
MIN_PASSWORD_LENGTH = 8
MAX_LEARNER_ID_LENGTH = 128
MAX_TOKEN_LENGTH = 4096
KEY_BYTES = 32
KEY_FILE = "auth-hmac.key"
KEY_ENV = "AIVO_AUTH_HMAC_KEY"
#: Tolerated clock skew for ``iat`` in the future (another replica's clock may run ahead).
CLOCK_SKEW_SECONDS = 60


class AuthKeyError(PkiError):
    """The HMAC key (file or environment) is unusable: `source` is the file or `$AIVO_AUTH_HMAC_KEY`.
    A PkiError, so `meshctl serve` reports it in one line and exits 2. The message never contains the key."""


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _parse_hex_key(text: str, source: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise AuthKeyError(source, "not a hex-encoded key") from None
    if len(key) < KEY_BYTES:
        raise AuthKeyError(source, f"key must be at least {KEY_BYTES} bytes, got {len(key)}")
    return key


def _read_key_file(path: Path) -> bytes:
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):
            raise AuthKeyError(str(path), "not a regular file")
        if st.st_mode & 0o077:
            log.warning("%s was readable by group/others (mode %o); tightening to 0600", path, st.st_mode & 0o777)
            path.chmod(0o600)
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:  # e.g. another user's 0600 file
        raise AuthKeyError(str(path), f"cannot read: {exc.strerror}") from None
    return _parse_hex_key(text, str(path))


def load_or_create_key(state_dir: Path, environ: Mapping[str, str] | None = None) -> bytes:
    """The HMAC key: ``$AIVO_AUTH_HMAC_KEY`` (hex) or ``state_dir/auth-hmac.key`` (created 0600)."""
    env = os.environ if environ is None else environ
    from_env = env.get(KEY_ENV, "").strip()
    if from_env:
        return _parse_hex_key(from_env, f"${KEY_ENV}")

    ensure_state_dir(state_dir)
    path = state_dir / KEY_FILE
    if path.exists():
        return _read_key_file(path)

    # Write to a private temporary file, then link it into place: the key file appears
    # atomically, complete and 0600, and a concurrent creator cannot be overwritten.
    key = secrets.token_bytes(KEY_BYTES)
    tmp = state_dir / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key.hex().encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return _read_key_file(path)  # somebody else won the race: use their key
    finally:
        tmp.unlink(missing_ok=True)
    log.info("created a new auth HMAC key at %s", path)
    return key


@dataclass(frozen=True)
class TokenCheck:
    valid: bool
    subject: str = ""
    expires_at: int = 0
    reason: str = ""


class TokenSigner:
    """Issues and verifies tokens with one HMAC-SHA256 key."""

    def __init__(
        self,
        key: bytes,
        ttl_seconds: int = TOKEN_TTL_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(key) < KEY_BYTES:
            raise AuthKeyError("TokenSigner", f"key must be at least {KEY_BYTES} bytes")
        self._key = key
        self.ttl_seconds = ttl_seconds
        self._clock = clock

    def __repr__(self) -> str:  # never show the key
        return f"TokenSigner(ttl_seconds={self.ttl_seconds})"

    def _sign(self, payload_segment: str) -> str:
        return _b64e(hmac.new(self._key, payload_segment.encode("utf-8"), hashlib.sha256).digest())

    def issue(self, subject: str) -> tuple[str, int]:
        """A new token for ``subject`` and its expiry (unix seconds)."""
        iat = int(self._clock())
        exp = iat + self.ttl_seconds
        payload = {"exp": exp, "iat": iat, "jti": secrets.token_urlsafe(16), "sub": subject}
        segment = _b64e(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8"))
        return f"{segment}.{self._sign(segment)}", exp

    def verify(self, token: str) -> TokenCheck:
        if not token:
            return TokenCheck(False, reason="missing token")
        if len(token) > MAX_TOKEN_LENGTH or token.count(".") != 1:
            return TokenCheck(False, reason="malformed token")
        segment, signature = token.split(".")
        if not segment or not signature:
            return TokenCheck(False, reason="malformed token")
        # Compare the encoded signatures: constant time, and no base64 malleability.
        if not hmac.compare_digest(self._sign(segment).encode("utf-8"), signature.encode("utf-8")):
            return TokenCheck(False, reason="bad signature")
        try:
            payload = json.loads(_b64d(segment))
        except (binascii.Error, ValueError):
            return TokenCheck(False, reason="malformed token")
        if not isinstance(payload, dict):
            return TokenCheck(False, reason="malformed token")
        sub, exp, iat = payload.get("sub"), payload.get("exp"), payload.get("iat")
        if not isinstance(sub, str) or not sub or type(exp) is not int or type(iat) is not int:
            return TokenCheck(False, reason="malformed token")
        now = self._clock()
        if now >= exp:
            return TokenCheck(False, reason="token expired")
        if iat > now + CLOCK_SKEW_SECONDS:
            return TokenCheck(False, reason="token issued in the future")
        return TokenCheck(True, subject=sub, expires_at=exp)


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, signer: TokenSigner) -> None:
        self.signer = signer

    @staticmethod
    def check_credentials(learner_id: str, password: str) -> bool:
        """DEMO ONLY: any learner_id with a password of at least 8 characters is accepted."""
        return len(password) >= MIN_PASSWORD_LENGTH

    async def Authenticate(
        self, request: auth_pb2.AuthenticateRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AuthenticateResponse:
        learner_id = request.learner_id
        if not learner_id:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "learner_id is required")
        if len(learner_id) > MAX_LEARNER_ID_LENGTH or not learner_id.isprintable():
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "learner_id is invalid")
        if not self.check_credentials(learner_id, request.password):
            log.info("authentication rejected for subject=%r", learner_id)
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, "invalid credentials")
        token, expires_at = self.signer.issue(learner_id)
        log.info("issued token for subject=%r, expires_at=%d", learner_id, expires_at)
        return auth_pb2.AuthenticateResponse(token=token, expires_at=expires_at, subject=learner_id)

    async def ValidateToken(
        self, request: auth_pb2.ValidateTokenRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ValidateTokenResponse:
        check = self.signer.verify(request.token)
        if not check.valid:
            log.debug("token rejected: %s", check.reason)
        return auth_pb2.ValidateTokenResponse(
            valid=check.valid, subject=check.subject, expires_at=check.expires_at, reason=check.reason
        )

    async def close(self) -> None:
        """Nothing to release (the key lives in memory only)."""


def register(server: grpc.aio.Server, ctx: ServiceContext) -> AuthServicer:
    servicer = AuthServicer(TokenSigner(load_or_create_key(ctx.state_dir)))
    auth_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server)
    return servicer
