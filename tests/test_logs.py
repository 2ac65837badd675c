"""JSON logs: one object per line, the per-RPC line's fields (with OpenTelemetry ids), and redaction."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from aivo_mesh.policy.core import ATTEMPT_HEADER, LocalReason, monotonic
from aivo_mesh.policy.events import ServerCall
from aivo_mesh.telemetry.logs import (
    REDACTED,
    JsonFormatter,
    RpcLogListener,
    RpcLogObserver,
    configure_logging,
    current_trace_ids,
    is_sensitive_key,
    redact,
    redact_metadata,
    scrub_text,
)

LOGIN = "/aivo.auth.v1.AuthService/Authenticate"
SECRET = "s3cr3t-t0ken-value"
PEM = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----"


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.aivo_mesh.logs")
    logger.handlers = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.handlers = []


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_one_json_object_per_line(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    logger.info("hello %s", "world", extra={"service": "auth-svc", "count": 3, "obj": object()})
    logger.warning("two\nlines")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("failed")
    first, second, third = lines(stream)
    assert first["msg"] == "hello world"
    assert first["level"] == "INFO"
    assert first["logger"] == "test.aivo_mesh.logs"
    assert first["ts"].endswith("Z")
    assert "T" in first["ts"]
    assert first["service"] == "auth-svc"
    assert first["count"] == 3
    assert first["obj"].startswith("<object")
    assert "trace_id" not in first  # no span: no ids on ordinary lines
    assert second["msg"] == "two\nlines"
    assert second["level"] == "WARNING"
    assert third["level"] == "ERROR"
    assert "RuntimeError: boom" in third["exc"]


def test_sensitive_keys() -> None:
    for key in ("authorization", "Authorization", "cookie", "set-cookie", "x-api-key", "X-Api-Key", "api_key",
                "grpc-status-details-bin", "custom-bin", "x-auth-token", "access_token", "refresh-token",
                "password", "client_secret", "private_key", "key_pem", "session", "x-session-id", "signing-key"):
        assert is_sensitive_key(key), key
    for key in ("x-request-id", "user-agent", "content-type", "service", "method", "caller", "trace_id",
                "span_id", "duration_ms", "status", ATTEMPT_HEADER, "grpc-timeout"):
        assert not is_sensitive_key(key), key


def test_redact_helpers() -> None:
    md = [("authorization", f"Bearer {SECRET}"), ("x-request-id", "r-1"), ("trace-bin", "YWJj"),
          ("x-api-key", SECRET), ("x-request-id", "r-2")]
    assert redact_metadata(md) == {"authorization": REDACTED, "x-request-id": "r-1, r-2", "trace-bin": REDACTED,
                                   "x-api-key": REDACTED}
    nested = redact("extra", {"headers": md, "token": SECRET, "deep": {"password": SECRET, "ok": 1},
                              "blob": b"\x00\x01"})
    assert SECRET not in json.dumps(nested)
    assert nested["deep"]["ok"] == 1
    assert nested["blob"] == "<2 bytes>"
    assert SECRET not in scrub_text(f"calling with Authorization: Bearer {SECRET} now")
    assert "BEGIN PRIVATE KEY" in scrub_text("BEGIN PRIVATE KEY is a header")  # only real blocks go
    assert "MIIEvQ" not in scrub_text(f"loaded {PEM} ok")
    assert "MIIEvQ" not in scrub_text("-----BEGIN EC PRIVATE KEY-----\nMIIEvQ truncated")
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZGEifQ.c2lnbmF0dXJlLWJ5dGVz"
    assert scrub_text(f"token {jwt} refused") == f"token {REDACTED} refused"  # a bare JWT, no Bearer
    assert redact_metadata([("x-jwt-assertion", jwt)]) == {"x-jwt-assertion": REDACTED}


def test_formatter_never_writes_secrets(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    logger.info("token is Bearer %s", SECRET, extra={
        "authorization": f"Bearer {SECRET}", "metadata": [("cookie", SECRET), ("x-request-id", "r-1")],
        "key_pem": PEM, "x_api_key": SECRET})
    try:
        raise ValueError(f"bad key {PEM}")
    except ValueError:
        logger.exception("load failed")
    out = stream.getvalue()
    assert SECRET not in out
    assert "MIIEvQ" not in out
    first = lines(stream)[0]
    assert first["authorization"] == REDACTED
    assert first["metadata"] == {"cookie": REDACTED, "x-request-id": "r-1"}


def test_client_rpc_line(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    listener = RpcLogListener(logger)
    listener.call_started("auth-svc", LOGIN)
    listener.call_finished("auth-svc", LOGIN, "OK", 0.0123456, 1, None)
    listener.call_started("auth-svc", LOGIN)
    listener.breaker_rejected("auth-svc", LOGIN)
    listener.call_finished("auth-svc", LOGIN, "UNAVAILABLE", 0.0001, 1, LocalReason.CIRCUIT_OPEN)
    listener.call_started("auth-svc", LOGIN)
    listener.call_finished("auth-svc", LOGIN, "UNAVAILABLE", 0.5, 3, None)
    ok, rejected, failed = lines(stream)
    assert ok == ok | {"event": "rpc", "side": "client", "service": "auth-svc", "method": LOGIN, "status": "OK",
                       "duration_ms": 12.346, "attempt": 1, "attempts": 1, "trace_id": "", "span_id": "",
                       "local": False,
                       "level": "INFO"}
    assert rejected["status"] == "CIRCUIT_OPEN"
    assert rejected["local"] is True
    assert rejected["local_reason"] == "circuit_open"
    assert rejected["level"] == "WARNING"
    assert failed["status"] == "UNAVAILABLE"
    assert failed["attempt"] == failed["attempts"] == 3  # `attempt`, the field server lines and the platform use
    assert ok["msg"] == f"client auth-svc {LOGIN} OK 12.346ms"


def test_rpc_line_carries_the_current_span(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    tracer = TracerProvider().get_tracer("test")  # not installed globally: only the context is used
    with tracer.start_as_current_span("client") as span:
        ctx = span.get_span_context()
        assert current_trace_ids() == (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
        RpcLogListener(logger).call_finished("auth-svc", LOGIN, "OK", 0.001, 1, None)
        logger.info("inside")  # ordinary lines get the ids too
    assert current_trace_ids() == ("", "")
    rpc, plain = lines(stream)
    assert rpc["trace_id"] == f"{ctx.trace_id:032x}"
    assert len(rpc["trace_id"]) == 32
    assert rpc["span_id"] == f"{ctx.span_id:016x}"
    assert len(rpc["span_id"]) == 16
    assert plain["trace_id"] == rpc["trace_id"]


def test_server_rpc_line(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    observer = RpcLogObserver(logger, metadata_keys=["x-request-id", "authorization"])
    md = (("authorization", f"Bearer {SECRET}"), ("x-request-id", "req-7"), ("cookie", SECRET))
    call = ServerCall("auth-svc", LOGIN, "spiffe://aivo.local/ns/default/sa/api", md, monotonic() - 0.004, 2)
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("server") as span:
        token = observer.start(call)
    # the tracing observer may have ended the span before this one finishes: ids from start are kept
    observer.finish(token, call, "PERMISSION_DENIED", RuntimeError(f"leaky {SECRET}"))
    (line,) = lines(stream)
    assert line["side"] == "server"
    assert line["service"] == "auth-svc"
    assert line["method"] == LOGIN
    assert line["status"] == "PERMISSION_DENIED"
    assert line["level"] == "WARNING"
    assert line["caller"] == "spiffe://aivo.local/ns/default/sa/api"
    assert line["attempt"] == 2
    assert line["duration_ms"] >= 4.0
    assert line["trace_id"] == f"{span.get_span_context().trace_id:032x}"
    assert line["error"] == "RuntimeError"
    assert line["metadata"] == {"authorization": REDACTED, "x-request-id": "req-7"}
    assert SECRET not in stream.getvalue()


def test_policy_event_lines(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    listener = RpcLogListener(logger)
    listener.breaker_state("auth-svc", "closed", "open")
    listener.endpoint_ejected("auth-svc", "10.0.0.1:50061", 30.0)
    listener.endpoint_restored("auth-svc", "10.0.0.1:50061")
    listener.retry("auth-svc", LOGIN, 2, "UNAVAILABLE", 0.025)
    events = [(d["event"], d["level"]) for d in lines(stream)]
    assert events == [("breaker_state", "WARNING"), ("endpoint_ejected", "WARNING"), ("endpoint_restored", "INFO"),
                      ("retry", "DEBUG")]
    assert "CLOSED -> OPEN" in lines(stream)[0]["msg"]


def test_configure_logging_replaces_its_own_handler() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        first, second = io.StringIO(), io.StringIO()
        configure_logging("debug", stream=first)
        configure_logging("INFO", stream=second)
        logging.getLogger("aivo_mesh.test").info("once", extra={"service": "x"})
        assert first.getvalue() == ""
        (line,) = lines(second)
        assert line["msg"] == "once"
        assert line["service"] == "x"
        plain = io.StringIO()
        configure_logging(logging.WARNING, json=False, stream=plain)
        logging.getLogger("aivo_mesh.test").warning("text")
        assert plain.getvalue().rstrip().endswith("WARNING aivo_mesh.test: text")
        assert sum(1 for h in root.handlers if h not in saved_handlers) == 1
    finally:
        root.handlers = saved_handlers
        root.setLevel(saved_level)
