"""Structured logs: one JSON object per line, and one line per RPC outcome.

    configure_logging("INFO")                      # root logger -> stderr, JSON lines
    listeners.add(RpcLogListener())                # client side, from the policy stack
    MeshServer(..., observers=[RpcLogObserver()])  # server side

A line looks like (one line in the file, wrapped here):

    {"ts":"2025-01-01T12:00:00.123Z","level":"INFO","logger":"aivo_mesh.rpc","msg":"server auth-svc
     /aivo.auth.v1.AuthService/Login OK 3.2ms","event":"rpc","trace_id":"4bf9...","span_id":"00f0...",
     "side":"server","service":"auth-svc","method":"/aivo.auth.v1.AuthService/Login","status":"OK",
     "duration_ms":3.2,"attempt":1,"caller":"spiffe://aivo.local/ns/default/sa/api"}

Secrets never reach a log line: extras whose key looks sensitive (authorization, cookie, x-api-key,
`*-bin` metadata, anything with token/secret/password in its name) are replaced by "[REDACTED]",
and bearer tokens or PEM private keys inside messages are scrubbed (`redact`, `scrub_text`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import IO, Any

from aivo_mesh.policy.core import LocalReason, monotonic
from aivo_mesh.policy.events import PolicyListener, ServerCall
from aivo_mesh.telemetry.metrics import (
    local_status,
)

try:
    from opentelemetry import trace as otel_trace
except ImportError:  # pragma: no cover - opentelemetry-api is a dependency, but stay usable without it
    otel_trace = None  # type: ignore[assignment]

__all__ = [
    "REDACTED",
    "JsonFormatter",
    "RpcLogListener",
    "RpcLogObserver",
    "configure_logging",
    "current_trace_ids",
    "is_sensitive_key",
    "redact",
    "redact_metadata",
    "scrub_text",
]

REDACTED = "[REDACTED]"
RPC_LOGGER = "aivo_mesh.rpc"

# Exact names (after lower-casing and "_" -> "-") that always hold credentials.
SENSITIVE_KEYS = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key", "apikey",
    "x-auth-token", "x-csrf-token", "x-xsrf-token", "x-amz-security-token", "password", "passwd",
    "secret", "token", "key", "private-key", "key-pem", "cert-chain-pem",
})
# Substrings that make any key sensitive.
SENSITIVE_PARTS = ("token", "secret", "password", "passwd", "authorization", "cookie", "api-key", "apikey",
                   "private", "credential", "session", "signature", "jwt", "assertion")

_BEARER_RE = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{4,}")
_PEM_KEY_RE = re.compile(r"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?(-----END \1PRIVATE KEY-----|$)", re.DOTALL)
# A bare JWT (header.payload[.signature], base64url; the header always starts {" = eyJ).
_JWT_RE = re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}(?:\.[A-Za-z0-9_-]*)?")


def is_sensitive_key(key: str) -> bool:
    """True for metadata/extra keys whose values must never be logged (`*-bin` included: binary
    metadata is opaque and may carry credentials)."""
    k = key.strip().lower().replace("_", "-")
    if k in SENSITIVE_KEYS or k.endswith("-bin") or k.endswith("-key"):
        return True
    return any(part in k for part in SENSITIVE_PARTS)


def scrub_text(text: str) -> str:
    """Remove bearer/basic credentials, bare JWTs and PEM private keys from free text."""
    text = _BEARER_RE.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _JWT_RE.sub(REDACTED, text)
    return _PEM_KEY_RE.sub(f"{REDACTED} PRIVATE KEY", text)


def redact(key: str, value: Any) -> Any:
    """`value` fit for a log line under `key`: sensitive keys masked, mappings and metadata pairs
    redacted recursively, strings scrubbed, bytes never written out."""
    if is_sensitive_key(key):
        return REDACTED
    if isinstance(value, Mapping):
        return {str(k): redact(str(k), v) for k, v in value.items()}
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, list | tuple):
        if value and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in value):
            return redact_metadata(value)
        return [redact(key, v) for v in value]
    return value


def redact_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> dict[str, str]:
    """gRPC metadata as a dict for a log line, every sensitive value replaced by "[REDACTED]"
    (a key sent twice keeps its values joined by ", ")."""
    out: dict[str, str] = {}
    for key, value in metadata:
        if is_sensitive_key(key):
            shown = REDACTED
        elif isinstance(value, bytes | bytearray):
            shown = f"<{len(value)} bytes>"
        else:
            shown = scrub_text(value)
        out[key] = shown if key not in out or shown == REDACTED else f"{out[key]}, {shown}"
    return out


def current_trace_ids() -> tuple[str, str]:
    """(trace_id, span_id) of the current OpenTelemetry span as lower-case hex, or ("", "")."""
    if otel_trace is None:
        return "", ""
    ctx = otel_trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return "", ""
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime",
                                                                                    "taskName"}


def _json_default(value: object) -> str:
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ms), level, logger, msg, then every `extra=` field
    (redacted), trace_id/span_id when a span is current, and exc/stack when present."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": scrub_text(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key in _RESERVED or key.startswith("_") or key in doc:
                continue
            doc[key] = redact(key, value)
        if "trace_id" not in doc:
            trace_id, span_id = current_trace_ids()
            if trace_id:
                doc["trace_id"], doc["span_id"] = trace_id, span_id
        if record.exc_info:
            doc["exc"] = scrub_text(self.formatException(record.exc_info))
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=_json_default, ensure_ascii=False, separators=(",", ":"))


_HANDLER_MARK = "_aivo_mesh_handler"


def configure_logging(level: int | str = "INFO", json: bool = True, *,
                      stream: IO[str] | None = None) -> logging.Handler:
    """Send the root logger to `stream` (stderr) as JSON lines (or plain text with json=False).
    Calling it again replaces the handler it installed before; other handlers are left alone."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _HANDLER_MARK, False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


def _rpc_message(side: str, service: str, method: str, status: str, duration_ms: float) -> str:
    return f"{side} {service} {method} {status} {duration_ms:g}ms"


class RpcLogListener(PolicyListener):
    """Client side: one line per finished call (INFO when OK, WARNING otherwise), plus a line per
    breaker transition and endpoint ejection/restoration. Retries are logged at DEBUG."""

    def __init__(self, logger: logging.Logger | None = None, *, ok_level: int = logging.INFO,
                 error_level: int = logging.WARNING) -> None:
        self.logger = logger or logging.getLogger(RPC_LOGGER)
        self.ok_level = ok_level
        self.error_level = error_level

    def call_finished(self, service: str, method: str, code: str, seconds: float, attempts: int,
                      local: LocalReason | None) -> None:
        status = local_status(code, local)
        level = self.ok_level if status == "OK" else self.error_level
        if not self.logger.isEnabledFor(level):
            return
        trace_id, span_id = current_trace_ids()
        duration_ms = round(seconds * 1000.0, 3)
        self.logger.log(level, _rpc_message("client", service, method, status, duration_ms), extra={
            "event": "rpc", "trace_id": trace_id, "span_id": span_id, "side": "client", "service": service,
            "method": method, "status": status, "local": local is not None, "duration_ms": duration_ms,
            **({"local_reason": str(local)} if local is not None else {}),
            # `attempt` as on server lines (the platform's field: the attempt that ended the call, i.e.
            # how many were made); `attempts` kept for queries written against it.
            "attempt": attempts, "attempts": attempts})

    def retry(self, service: str, method: str, attempt: int, code: str, delay: float) -> None:
        self.logger.debug("retry %s %s attempt %d after %s", service, method, attempt, code, extra={
            "event": "retry", "service": service, "method": method, "attempt": attempt, "status": code,
            "delay_ms": round(delay * 1000.0, 3)})

    def retry_budget_exhausted(self, service: str, method: str) -> None:
        self.logger.info("retry budget of %s exhausted", service, extra={
            "event": "retry_budget_exhausted", "service": service, "method": method})

    def breaker_state(self, service: str, old: str, new: str) -> None:
        self.logger.warning("circuit breaker %s: %s -> %s", service, old.upper(), new.upper(), extra={
            "event": "breaker_state", "service": service, "old": old, "new": new})

    def endpoint_ejected(self, service: str, endpoint: str, seconds: float) -> None:
        self.logger.warning("endpoint %s of %s ejected for %gs", endpoint, service, seconds, extra={
            "event": "endpoint_ejected", "service": service, "endpoint": endpoint, "seconds": seconds})

    def endpoint_restored(self, service: str, endpoint: str) -> None:
        self.logger.info("endpoint %s of %s restored", endpoint, service, extra={
            "event": "endpoint_restored", "service": service, "endpoint": endpoint})


class RpcLogObserver:
    """Server side (a ServerCallObserver): one line per handled call, with the caller's identity.
    `metadata_keys` lists request metadata worth logging (e.g. "x-request-id"); sensitive keys stay
    redacted even when listed. The trace ids are read at finish, else as they were at start, so
    the line carries the server span whichever order the tracing observer was registered in."""

    def __init__(self, logger: logging.Logger | None = None, *, metadata_keys: Iterable[str] = (),
                 ok_level: int = logging.INFO, error_level: int = logging.WARNING) -> None:
        self.logger = logger or logging.getLogger(RPC_LOGGER)
        self.metadata_keys = frozenset(k.lower() for k in metadata_keys)
        self.ok_level = ok_level
        self.error_level = error_level

    def start(self, call: ServerCall) -> object:
        return current_trace_ids()

    def finish(self, token: object, call: ServerCall, code: str, error: BaseException | None) -> None:
        level = self.ok_level if code == "OK" else self.error_level
        if not self.logger.isEnabledFor(level):
            return
        trace_id, span_id = current_trace_ids()
        if not trace_id and isinstance(token, tuple):
            trace_id, span_id = token
        duration_ms = round((monotonic() - call.started) * 1000.0, 3)
        extra: dict[str, Any] = {
            "event": "rpc", "trace_id": trace_id, "span_id": span_id, "side": "server", "service": call.service,
            "method": call.method, "status": code, "duration_ms": duration_ms, "attempt": call.attempt,
            "caller": call.caller or ""}
        if error is not None and code != "OK":
            extra["error"] = type(error).__name__  # never the message: it may quote request data
        if self.metadata_keys:
            extra["metadata"] = redact_metadata((k, v) for k, v in call.metadata if k.lower() in self.metadata_keys)
        self.logger.log(level, _rpc_message("server", call.service, call.method, code, duration_ms), extra=extra)
