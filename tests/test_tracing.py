"""Tracing: the client policy layer, the server observer, and the embedded OTLP receiver.

Unit tests use an InMemorySpanExporter; the end-to-end test runs real grpc.aio servers on 127.0.0.1
(plaintext: mTLS is covered by test_mtls.py) exporting over OTLP/gRPC to an OtlpReceiver.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once

from aivo_mesh.config.model import TracingSpec
from aivo_mesh.policy.core import ATTEMPT_HEADER, Call, Handler, LocalReason, Reply, build_stack
from aivo_mesh.policy.events import ServerCall
from aivo_mesh.server.interceptors import MeshServerInterceptor
from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc, learner_pb2, learner_pb2_grpc
from aivo_mesh.telemetry.otlp_receiver import OtlpReceiver, SpanRecord, Trace, render_waterfall
from aivo_mesh.telemetry.tracing import (
    ClientTracingLayer,
    ServerTracingObserver,
    Tracing,
    current_trace_ids,
    split_method,
)

VALIDATE = "/aivo.auth.v1.AuthService/ValidateToken"
GET_PROFILE = "/aivo.learner.v1.LearnerService/GetProfile"
ENABLED = TracingSpec(enabled=True, sample_ratio=1.0)


# -- helpers ---------------------------------------------------------------------------------------

@pytest.fixture
def mem() -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    tracing = Tracing.from_spec(ENABLED, "learner-svc", "1.2.3", exporter=exporter, batch=False,
                                shutdown_on_exit=False)
    assert tracing is not None
    yield tracing, exporter
    tracing.shutdown()


def traceparent(metadata: tuple[tuple[str, str], ...]) -> tuple[str, str, str]:
    """(trace_id, parent span_id, flags) of the single traceparent header."""
    values = [v for k, v in metadata if k == "traceparent"]
    assert len(values) == 1, metadata
    _version, trace_id, span_id, flags = values[0].split("-")
    return trace_id, span_id, flags


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    ctx = span.get_span_context()
    assert ctx is not None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


class FakeRetry:
    """Retries UNAVAILABLE up to `attempts` times, bumping call.attempt like the real retry layer."""

    name = "retry"

    def __init__(self, attempts: int) -> None:
        self.attempts = attempts

    def wrap(self, inner: Handler) -> Handler:
        async def handle(call: Call) -> Reply:
            while True:
                reply = await inner(call)
                if reply.ok or call.attempt >= self.attempts:
                    return reply
                call.attempt += 1

        return handle


class Recorder:
    """Terminal that records what each attempt would put on the wire and replies from a script."""

    def __init__(self, *codes: str) -> None:
        self.codes = list(codes)
        self.seen: list[tuple[int, tuple[tuple[str, str], ...], tuple[str, str]]] = []

    async def __call__(self, call: Call) -> Reply:
        self.seen.append((call.attempt, call.metadata, current_trace_ids()))
        code = self.codes.pop(0) if self.codes else "OK"
        return Reply(code, value="v" if code == "OK" else None, details="" if code == "OK" else "boom")


# -- (a) unit --------------------------------------------------------------------------------------

def test_disabled_spec_returns_none() -> None:
    assert Tracing.from_spec(TracingSpec(enabled=False), "learner-svc", "1") is None


def test_split_method() -> None:
    assert split_method(VALIDATE) == ("aivo.auth.v1.AuthService", "ValidateToken")
    assert split_method("odd") == ("", "odd")


async def test_client_span_name_kind_attributes(mem: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, exporter = mem
    terminal = Recorder("OK")
    stack = build_stack([ClientTracingLayer(tracing)], terminal)
    reply = await stack(Call("auth-svc", VALIDATE, object(), metadata=(("x-user", "u1"),)))
    assert reply.ok
    (span,) = exporter.get_finished_spans()
    assert span.name == VALIDATE
    assert span.kind is SpanKind.CLIENT
    assert dict(span.attributes or {}) == {
        "rpc.system": "grpc", "rpc.service": "aivo.auth.v1.AuthService", "rpc.method": "ValidateToken",
        "peer.service": "auth-svc", "rpc.grpc.status_code": 0,
    }
    assert span.status.status_code is StatusCode.UNSET
    assert span.parent is None
    assert span.resource.attributes["service.name"] == "learner-svc"
    assert span.resource.attributes["service.version"] == "1.2.3"
    # the caller's metadata is kept, and the traceparent names this span
    (_, md, ids_inside), = terminal.seen
    assert ("x-user", "u1") in md
    trace_id, parent_id, flags = traceparent(md)
    assert (trace_id, parent_id) == hex_ids(span)
    assert int(flags, 16) & 1  # sampled
    assert ids_inside == hex_ids(span)  # the client span is current while the inner layers run
    assert current_trace_ids() == ("", "")


async def test_traceparent_on_every_attempt_and_retry_events(mem: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, exporter = mem
    terminal = Recorder("UNAVAILABLE", "UNAVAILABLE", "OK")
    stack = build_stack([ClientTracingLayer(tracing), FakeRetry(3)], terminal)
    # a stale traceparent from the caller is replaced, never duplicated
    stale = (("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"),)
    reply = await stack(Call("auth-svc", VALIDATE, object(), metadata=stale))
    assert reply.ok
    (span,) = exporter.get_finished_spans()
    assert [a for a, _, _ in terminal.seen] == [1, 2, 3]
    headers = {traceparent(md) for _, md, _ in terminal.seen}
    assert {h[:2] for h in headers} == {hex_ids(span)}
    assert [(e.name, dict(e.attributes or {})) for e in span.events] == [
        ("retry", {"aivo.attempt": 2}), ("retry", {"aivo.attempt": 3})]
    assert (span.attributes or {})["aivo.attempts"] == 3
    assert span.status.status_code is StatusCode.UNSET


async def test_error_status(mem: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, exporter = mem
    stack = build_stack([ClientTracingLayer(tracing)], Recorder("UNAVAILABLE"))
    reply = await stack(Call("auth-svc", VALIDATE, object()))
    assert reply.code == "UNAVAILABLE"
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "UNAVAILABLE: boom"
    assert (span.attributes or {})["rpc.grpc.status_code"] == 14


async def test_local_reply_and_exception(mem: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, exporter = mem

    async def breaker_open(call: Call) -> Reply:
        return Reply("UNAVAILABLE", details="circuit open", local=LocalReason.CIRCUIT_OPEN)

    async def broken(call: Call) -> Reply:
        raise RuntimeError("layer bug")

    await build_stack([ClientTracingLayer(tracing)], breaker_open)(Call("auth-svc", VALIDATE, None))
    with pytest.raises(RuntimeError):
        await build_stack([ClientTracingLayer(tracing)], broken)(Call("auth-svc", VALIDATE, None))
    local, failed = exporter.get_finished_spans()
    assert (local.attributes or {})["aivo.local"] is True
    assert (failed.attributes or {})["rpc.grpc.status_code"] == 2
    assert failed.status.status_code is StatusCode.ERROR
    assert [e.name for e in failed.events] == ["exception"]
    assert current_trace_ids() == ("", "")


async def test_parent_is_current_span(mem: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, exporter = mem
    stack = build_stack([ClientTracingLayer(tracing)], Recorder("OK"))
    with tracing.span("handler.work", learner="l-1") as outer:
        assert current_trace_ids() == (format(outer.get_span_context().trace_id, "032x"),
                                       format(outer.get_span_context().span_id, "016x"))
        await stack(Call("auth-svc", VALIDATE, None))
    client, custom = exporter.get_finished_spans()
    assert custom.name == "handler.work"
    assert custom.kind is SpanKind.INTERNAL
    assert (custom.attributes or {})["learner"] == "l-1"
    assert client.parent is not None
    assert client.parent.span_id == custom.get_span_context().span_id  # type: ignore[union-attr]
    assert hex_ids(client)[0] == hex_ids(custom)[0]


async def test_unsampled_still_propagates() -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing.from_spec(TracingSpec(enabled=True, sample_ratio=0.0), "learner-svc", "1",
                                exporter=exporter, batch=False, shutdown_on_exit=False)
    assert tracing is not None
    terminal = Recorder("OK")
    await build_stack([ClientTracingLayer(tracing)], terminal)(Call("auth-svc", VALIDATE, None))
    (_, md, _), = terminal.seen
    assert not int(traceparent(md)[2], 16) & 1  # the "not sampled" decision travels to the server
    assert exporter.get_finished_spans() == ()
    tracing.shutdown()


async def test_server_observer_parent_caller_context_and_baggage(
        mem: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, exporter = mem
    observer = ServerTracingObserver(tracing)
    terminal = Recorder("OK")
    token = otel_context.attach(baggage.set_baggage("tenant", "t-1"))
    try:
        await build_stack([ClientTracingLayer(tracing)], terminal)(Call("auth-svc", VALIDATE, None))
    finally:
        otel_context.detach(token)
    (_, md, _), = terminal.seen

    call = ServerCall("auth-svc", VALIDATE, "spiffe://aivo.mesh/learner-svc", md, 0.0, attempt=2)
    state = observer.start(call)
    inside = current_trace_ids()
    assert baggage.get_baggage("tenant") == "t-1"
    observer.finish(state, call, "PERMISSION_DENIED", None)
    assert current_trace_ids() == ("", "")
    assert baggage.get_baggage("tenant") is None

    client, server = exporter.get_finished_spans()
    assert server.kind is SpanKind.SERVER
    assert server.name == VALIDATE
    assert inside == hex_ids(server)
    assert server.parent is not None
    assert server.parent.is_remote
    assert server.parent.span_id == client.get_span_context().span_id  # type: ignore[union-attr]
    assert hex_ids(server)[0] == hex_ids(client)[0]
    attrs = dict(server.attributes or {})
    assert attrs["aivo.caller"] == "spiffe://aivo.mesh/learner-svc"
    assert attrs["rpc.grpc.status_code"] == 7
    assert attrs["aivo.attempt"] == 2
    assert attrs["rpc.service"] == "aivo.auth.v1.AuthService"
    assert server.status.status_code is StatusCode.ERROR


async def test_server_observer_root_and_exception(mem: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, exporter = mem
    observer = ServerTracingObserver(tracing)
    call = ServerCall("auth-svc", VALIDATE, None, (), 0.0)
    with tracing.span("unrelated"):  # whatever context the server task inherited is not the parent
        state = observer.start(call)
        observer.finish(state, call, "UNKNOWN", ValueError("bad token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZGEifQ"))
    server, _ = exporter.get_finished_spans()
    assert server.parent is None
    assert "aivo.caller" not in (server.attributes or {})
    # The class only, as in the logs: the message (here quoting a token) never leaves the process.
    assert server.status.description == "UNKNOWN: ValueError"
    assert [(e.name, dict(e.attributes or {})) for e in server.events] == [
        ("exception", {"exception.type": "ValueError"})]
    assert "eyJ" not in str(server.to_json())


def test_install_global(mem: tuple[Tracing, InMemorySpanExporter], monkeypatch: pytest.MonkeyPatch) -> None:
    tracing, exporter = mem
    # reset OTel's set-once global for this test only (monkeypatch restores it)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    assert tracing.install_global()
    with trace.get_tracer("app").start_as_current_span("app.span"):
        pass
    assert [s.name for s in exporter.get_finished_spans()] == ["app.span"]


# -- (b) end to end over real grpc -----------------------------------------------------------------

async def wire(call: Call) -> Reply:
    """Terminal: one attempt on the wire, sending call.metadata (call.transport is the multicallable)."""
    try:
        value = await call.transport(call.request, metadata=(*call.metadata, (ATTEMPT_HEADER, str(call.attempt))),
                                     timeout=5.0)
    except grpc.aio.AioRpcError as err:
        return Reply(err.code().name, error=err, details=err.details() or "")
    return Reply("OK", value=value)


class Auth(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing

    async def ValidateToken(self, request: auth_pb2.ValidateTokenRequest,
                            context: grpc.aio.ServicerContext) -> auth_pb2.ValidateTokenResponse:
        with self.tracing.span("auth.lookup", token_length=len(request.token)):
            valid = request.token == "good"
        if not valid:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")
        return auth_pb2.ValidateTokenResponse(valid=True, subject="Ada")


class Learner(learner_pb2_grpc.LearnerServiceServicer):
    def __init__(self, tracing: Tracing, auth_channel: grpc.aio.Channel) -> None:
        self.validate = auth_pb2_grpc.AuthServiceStub(auth_channel).ValidateToken
        self.auth = build_stack([ClientTracingLayer(tracing)], wire)

    async def GetProfile(self, request: learner_pb2.GetProfileRequest,
                         context: grpc.aio.ServicerContext) -> learner_pb2.Profile:
        token = "bad" if request.learner_id == "denied" else "good"
        reply = await self.auth(Call("auth-svc", VALIDATE, auth_pb2.ValidateTokenRequest(token=token),
                                     transport=self.validate))
        if not reply.ok:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"auth said {reply.code}")
        return learner_pb2.Profile(learner_id=request.learner_id, display_name=reply.value.subject)


async def serve(service: str, tracing: Tracing, add: Any) -> tuple[grpc.aio.Server, str]:
    guard = MeshServerInterceptor(None, service=service, require_tls=False,
                                  observers=[ServerTracingObserver(tracing)])
    server = grpc.aio.server(interceptors=[guard])
    add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    async with OtlpReceiver() as r:
        yield r


async def test_end_to_end_one_trace_across_services(receiver: OtlpReceiver) -> None:
    spec = TracingSpec(enabled=True, otlp_endpoint=receiver.endpoint, sample_ratio=1.0)
    tracings = [Tracing.from_spec(spec, name, "0.1.0", shutdown_on_exit=False)
                for name in ("edge", "learner-svc", "auth-svc")]
    assert all(t is not None for t in tracings)
    edge_t, learner_t, auth_t = (t for t in tracings if t is not None)
    auth_server, auth_addr = await serve("auth-svc", auth_t,
                                         lambda s: auth_pb2_grpc.add_AuthServiceServicer_to_server(Auth(auth_t), s))
    auth_channel = grpc.aio.insecure_channel(auth_addr)
    learner_server, learner_addr = await serve(
        "learner-svc", learner_t,
        lambda s: learner_pb2_grpc.add_LearnerServiceServicer_to_server(Learner(learner_t, auth_channel), s))
    learner_channel = grpc.aio.insecure_channel(learner_addr)
    get_profile = learner_pb2_grpc.LearnerServiceStub(learner_channel).GetProfile
    edge = build_stack([ClientTracingLayer(edge_t)], wire)
    try:
        ok = await edge(Call("learner-svc", GET_PROFILE, learner_pb2.GetProfileRequest(learner_id="l-1"),
                             transport=get_profile))
        assert ok.ok
        assert ok.value.display_name == "Ada"
        denied = await edge(Call("learner-svc", GET_PROFILE, learner_pb2.GetProfileRequest(learner_id="denied"),
                                 transport=get_profile))
        assert denied.code == "PERMISSION_DENIED"
        await asyncio.gather(*(t.aflush() for t in (edge_t, learner_t, auth_t)))
        await receiver.wait_for(lambda spans: len(spans) >= 10, timeout=3.0)
    finally:
        await asyncio.gather(*(t.aclose() for t in (edge_t, learner_t, auth_t)))
        await learner_channel.close()
        await auth_channel.close()
        await learner_server.stop(None)
        await auth_server.stop(None)

    traces = receiver.traces(last=10)
    assert len(traces) == 2
    denied_trace, ok_trace = traces  # newest first
    assert ok_trace.services == ["edge", "learner-svc", "auth-svc"]

    def one(t: Trace, service: str, kind: str, name: str) -> SpanRecord:
        (span,) = [s for s in t.spans if (s.service, s.kind, s.name) == (service, kind, name)]
        return span

    edge_client = one(ok_trace, "edge", "CLIENT", GET_PROFILE)
    learner_server_span = one(ok_trace, "learner-svc", "SERVER", GET_PROFILE)
    learner_client = one(ok_trace, "learner-svc", "CLIENT", VALIDATE)
    auth_server_span = one(ok_trace, "auth-svc", "SERVER", VALIDATE)
    lookup = one(ok_trace, "auth-svc", "INTERNAL", "auth.lookup")
    assert ok_trace.root == edge_client
    assert edge_client.parent_span_id == ""
    assert learner_server_span.parent_span_id == edge_client.span_id
    assert learner_client.parent_span_id == learner_server_span.span_id
    assert auth_server_span.parent_span_id == learner_client.span_id
    assert lookup.parent_span_id == auth_server_span.span_id
    assert lookup.attributes == {"token_length": 4}
    assert auth_server_span.attributes == {
        "rpc.system": "grpc", "rpc.service": "aivo.auth.v1.AuthService", "rpc.method": "ValidateToken",
        "rpc.grpc.status_code": 0}
    assert learner_client.attributes["peer.service"] == "auth-svc"
    assert ok_trace.errors == 0

    # the failing call: codes recorded on every hop, all spans ERROR
    codes = {(s.service, s.kind): (s.attributes["rpc.grpc.status_code"], s.status)
             for s in denied_trace.spans if s.kind != "INTERNAL"}
    assert codes == {("edge", "CLIENT"): (7, "ERROR"), ("learner-svc", "SERVER"): (7, "ERROR"),
                     ("learner-svc", "CLIENT"): (16, "ERROR"), ("auth-svc", "SERVER"): (16, "ERROR")}

    text = render_waterfall(ok_trace)
    lines = text.splitlines()
    assert lines[0].startswith(f"trace {ok_trace.trace_id}  5 spans")
    assert [line.split()[0] for line in lines[1:]] == [GET_PROFILE, GET_PROFILE, VALIDATE, VALIDATE, "auth.lookup"]
    assert [len(line) - len(line.lstrip()) for line in lines[1:]] == [0, 2, 4, 6, 8]
    assert [line.split()[1:3] for line in lines[1:]] == [
        ["edge", "CLIENT"], ["learner-svc", "SERVER"], ["learner-svc", "CLIENT"], ["auth-svc", "SERVER"],
        ["auth-svc", "INTERNAL"]]
    assert "ERROR" in render_waterfall(denied_trace)


def test_render_waterfall_layout() -> None:
    ms = 1_000_000

    def rec(span_id: str, parent: str, name: str, start: int, end: int, status: str = "UNSET") -> SpanRecord:
        return SpanRecord("ab" * 16, span_id, parent, name, "SERVER" if not parent else "CLIENT", "svc",
                          start * ms, end * ms, status)

    t = Trace("ab" * 16, (
        rec("01", "", "root", 0, 100),
        rec("02", "01", "first", 0, 50),
        rec("04", "02", "grandchild", 10, 20),
        rec("03", "01", "second", 50, 100, "ERROR"),
        rec("05", "99", "orphan", 90, 100),  # parent never received: shown as a root
    ))
    lines = render_waterfall(t, width=10, ascii_only=True).splitlines()
    assert lines[0] == f"trace {'ab' * 16}  5 spans  100.00ms  svc  1 error"
    assert lines[1].startswith("root ")
    assert "|##########|" in lines[1]
    assert lines[1].endswith("100.00ms")
    assert lines[2].startswith("  first ")
    assert "|#####.....|" in lines[2]
    assert lines[3].startswith("    grandchild ")
    assert "|.#........|" in lines[3]
    assert "+10.00ms" in lines[3]
    assert lines[4].startswith("  second ")
    assert "|.....#####|" in lines[4]
    assert lines[4].endswith("ERROR")
    assert lines[5].startswith("orphan ")
    assert "|.........#|" in lines[5]
    assert len({line.index("|") for line in lines[1:]}) == 1  # bars are aligned


def test_render_waterfall_names_envoy_spans_by_their_grpc_method() -> None:
    """Envoy names its spans `ingress`/`egress` only; the waterfall adds the `grpc.path` tag."""
    def rec(span_id: str, parent: str, name: str, attributes: dict[str, str]) -> SpanRecord:
        return SpanRecord("cd" * 16, span_id, parent, name, "SERVER", "auth-svc-sidecar", 0, 1000, "UNSET",
                          attributes=attributes)

    t = Trace("cd" * 16, (rec("01", "", "egress", {"grpc.path": "/aivo.auth.v1.AuthService/ValidateToken"}),
                          rec("02", "01", "egress auth-svc", {"grpc.path": "/p.S/M"}),
                          rec("04", "02", "ingress", {}),
                          rec("03", "04", "/aivo.auth.v1.AuthService/ValidateToken", {"grpc.path": "/x/Y"})))
    lines = render_waterfall(t, ascii_only=True).splitlines()
    assert lines[1].startswith("egress /aivo.auth.v1.AuthService/ValidateToken ")
    assert lines[2].startswith("  egress auth-svc /p.S/M ")
    assert lines[3].startswith("    ingress ")  # no tag: the name as Envoy sent it
    assert lines[4].startswith("      /aivo.auth.v1.AuthService/ValidateToken ")  # an app span keeps its name


def test_render_waterfall_marks_envoy_spans_of_failed_grpc_calls() -> None:
    """Envoy leaves a gRPC failure's span status UNSET (the HTTP status is 200); its grpc.status_code
    tag tells, and the waterfall shows it as an error like an app span's."""
    def rec(span_id: str, code: str) -> SpanRecord:
        return SpanRecord("ef" * 16, span_id, "", "ingress", "SERVER", "auth-svc-sidecar", 0, 1000, "UNSET",
                          attributes={"grpc.status_code": code, "grpc.path": "/p.S/M"})

    denied = render_waterfall(Trace("ef" * 16, (rec("01", "7"),))).splitlines()
    assert denied[0].endswith("1 error")
    assert denied[1].endswith("ERROR PERMISSION_DENIED")
    ok = render_waterfall(Trace("ef" * 16, (rec("01", "0"),))).splitlines()
    assert "error" not in ok[0].lower() and "ERROR" not in ok[1]


def test_meshctl_traces_filters_by_service_errors_and_trace_id(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from aivo_mesh.cli import main
    from aivo_mesh.runtime.collector import SpanLog

    def span(tid: str, t0: int, service: str, status: str = "UNSET", **attributes: str) -> SpanRecord:
        return SpanRecord(tid * 16, tid * 8, "", "/p.S/M", "SERVER", service, t0, t0 + 10, status,
                          attributes=dict(attributes))

    SpanLog(tmp_path / "traces.jsonl").append([
        span("a1", 0, "learner-svc"),
        span("b2", 100, "auth-svc-sidecar", **{"grpc.status_code": "7"}),  # Envoy: failed, status UNSET
        span("c3", 200, "auth-svc", status="ERROR"),
        span("d4", 300, "event-collector-svc"),
    ])

    def shown(*args: str) -> list[str]:
        assert main(["traces", "--state-dir", str(tmp_path), *args]) == 0
        return [line.split()[1][:2] for line in capsys.readouterr().out.splitlines() if line.startswith("trace ")]

    assert shown() == ["d4", "c3", "b2", "a1"]  # newest first
    assert shown("--last", "2") == ["d4", "c3"]
    assert shown("--service", "auth-svc") == ["c3", "b2"]  # the app and its sidecar
    assert shown("--errors") == ["c3", "b2"]
    assert shown("--errors", "--service", "auth-svc", "--last", "1") == ["c3"]
    assert shown("--trace-id", "A1A1") == ["a1"]
    assert shown("--service", "analytics-svc") == []
    assert main(["traces", "--state-dir", str(tmp_path), "--service", "analytics-svc"]) == 0
    assert "no matching traces" in capsys.readouterr().out


async def test_demo_shows_a_trace_with_the_sidecars_spans_once_they_arrive(tmp_path: Path) -> None:
    """Exporters batch: the demo prefers a learner -> auth trace with both apps' spans and both
    sidecars', and shows the fullest one found when none is complete in time."""
    from aivo_mesh.runtime.collector import SpanLog
    from aivo_mesh.runtime.demo import sample_trace

    def flow(tid: str, t0: int, *services: str) -> list[SpanRecord]:
        names = ["/aivo.learner.v1.LearnerService/GetProfile", "/aivo.auth.v1.AuthService/ValidateToken",
                 "/aivo.auth.v1.AuthService/ValidateToken", "egress", "ingress"]
        return [SpanRecord(tid * 16, f"{i:016x}", "", names[i], "SERVER", svc, t0 + i, t0 + i + 1, "UNSET")
                for i, svc in enumerate(services)]

    log = SpanLog(tmp_path / "traces.jsonl")
    log.append(flow("ab", 0, "learner-svc", "learner-svc", "auth-svc"))
    app_only = await sample_trace(log, sidecars=True, wait=0.2)
    assert app_only is not None and app_only.trace_id == "ab" * 16  # the fallback, after the wait
    log.append(flow("cd", 10, "learner-svc", "learner-svc", "auth-svc", "learner-svc-sidecar", "auth-svc-sidecar"))
    log.append(flow("ef", 20, "learner-svc", "learner-svc", "auth-svc"))  # newer, but without the sidecars
    # Newer still, with both sidecars but not yet auth's own span: incomplete too.
    log.append(flow("12", 30, "learner-svc", "learner-svc", "learner-svc-sidecar", "auth-svc-sidecar"))
    complete = await sample_trace(log, sidecars=True, wait=0.2)
    assert complete is not None and complete.trace_id == "cd" * 16
    proxyless = await sample_trace(log, sidecars=False, wait=0.2)
    assert proxyless is not None and proxyless.trace_id == "ef" * 16  # the newest with both apps


# -- (c) forwarding --------------------------------------------------------------------------------

async def test_forwarding_to_upstream_and_failing_upstream(receiver: OtlpReceiver) -> None:
    upstream = receiver
    async with OtlpReceiver(forward_to=upstream.endpoint) as local, \
            OtlpReceiver(forward_to="127.0.0.1:1", forward_timeout=1.0) as dead_end:
        for target in (local, dead_end):
            spec = TracingSpec(enabled=True, otlp_endpoint=target.endpoint)
            tracing = Tracing.from_spec(spec, "learner-svc", "1", shutdown_on_exit=False)
            assert tracing is not None
            try:
                with tracing.span("work", target=target.address):
                    pass
            finally:
                await tracing.aclose()
        # both receivers keep what they got; only `local` reaches the upstream
        await local.wait_for(lambda spans: len(spans) == 1, timeout=3.0)
        await dead_end.wait_for(lambda spans: len(spans) == 1, timeout=3.0)
        forwarded = await upstream.wait_for(lambda spans: len(spans) == 1, timeout=3.0)
    assert forwarded[0].name == "work"
    assert forwarded[0].attributes == {"target": local.address}
    assert forwarded[0].service == "learner-svc"
    assert local.forwarded == 1
    assert local.forward_errors == 0
    assert dead_end.forwarded == 0
    assert dead_end.forward_errors == 1


# -- the standard OTEL_* variables, as config/env.py applies them ----------------------------------

@pytest.mark.parametrize(("name", "description"), [
    ("parentbased_traceidratio", "ParentBased{root:TraceIdRatioBased{0.25},"),
    ("parentbased_always_on", "ParentBased{root:AlwaysOnSampler,"),
    ("parentbased_always_off", "ParentBased{root:AlwaysOffSampler,"),
    ("traceidratio", "TraceIdRatioBased{0.25}"),
    ("always_on", "AlwaysOnSampler"),
    ("always_off", "AlwaysOffSampler"),
])
def test_the_sampler_is_the_one_otel_traces_sampler_names(name: str, description: str) -> None:
    spec = TracingSpec(enabled=True, sampler=name, sample_ratio=0.25)  # type: ignore[arg-type]
    tracing = Tracing.from_spec(spec, "auth-svc", "1.0.0", exporter=InMemorySpanExporter(), batch=False,
                                shutdown_on_exit=False)
    assert tracing is not None
    try:
        assert tracing.provider.sampler.get_description().startswith(description)
    finally:
        tracing.shutdown()


def test_otel_service_name_names_the_process_in_its_spans(mesh) -> None:
    from aivo_mesh.config.env import EnvSettings, apply_env
    from aivo_mesh.telemetry.process import ProcessTelemetry

    env = EnvSettings.from_environ({"OTEL_SERVICE_NAME": "auth-api", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"})
    telemetry = ProcessTelemetry.for_service(apply_env(mesh, env), "auth-svc", otel_service_name=env.otel_service_name)
    assert telemetry.tracing is not None
    try:
        attributes = telemetry.tracing.provider.resource.attributes
        assert (attributes["service.name"], attributes["service.version"]) == ("auth-api", "1.0.0")
    finally:
        telemetry.tracing.shutdown()
    default = ProcessTelemetry.for_service(apply_env(mesh, env), "auth-svc")
    assert default.tracing is not None
    try:
        assert default.tracing.provider.resource.attributes["service.name"] == "auth-svc"
    finally:
        default.tracing.shutdown()


def test_local_runs_forward_to_otel_exporter_otlp_endpoint_and_keep_it_from_the_processes(mesh) -> None:
    """`meshctl up`/`demo`: processes export to the local collector, which forwards to the configured
    endpoint; the variable is unset for the processes, or `serve` would export past the collector."""
    from aivo_mesh.runtime.mesh import LOCAL_UNSET, forward_target

    assert forward_target(mesh, 4317, otlp_endpoint="https://tempo.example.com:4317") == "https://tempo.example.com:4317"
    assert forward_target(mesh, 4317, "jaeger", otlp_endpoint="http://jaeger:4317") == "http://jaeger:4317"
    assert forward_target(mesh, 4317) is None  # mesh.yaml has tracing off
    assert {"JAEGER_HOST", "OTEL_EXPORTER_OTLP_ENDPOINT"} <= set(LOCAL_UNSET)
