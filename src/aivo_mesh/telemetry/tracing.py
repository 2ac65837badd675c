"""OpenTelemetry tracing for both sides of a mesh call (conventions: notes/grpc-python.md §8).

    tracing = Tracing.from_spec(mesh.observability.tracing, "learner-svc", __version__)
    if tracing is not None:                     # None when disabled: no layer, no observer, no cost
        layers = [ClientTracingLayer(tracing), *layers]          # outermost client layer
        server = MeshServer(..., observers=[ServerTracingObserver(tracing), ...])
    with tracing.span("score.recompute", learner="l-1"):         # custom application spans
        ...
    await tracing.aclose()                                       # flush + shut down (see below)

Spans follow the OTel gRPC conventions: named `/pkg.Service/Method`, kind CLIENT/SERVER, attributes
`rpc.system=grpc`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code` (numeric), plus
`peer.service` (the target mesh service) on client spans and `aivo.caller` (the caller's mesh
identity) on server spans. Context travels as W3C `traceparent`/`tracestate` and `baggage` metadata.

Every `Tracing` owns its TracerProvider (resource service.name/service.version, the sampler mesh.yaml's
`tracing.sampler` names, by default `ParentBased(TraceIdRatioBased(sample_ratio))`, BatchSpanProcessor
-> OTLP/gRPC); `install_global()` makes it the process-wide provider for application code that uses
`opentelemetry.trace.get_tracer`. The standard OTEL_* variables reach it through config/env.py.

Flushing blocks the calling thread until the exporter is done. When the collector is served by the
same event loop (the embedded OtlpReceiver, tests), use `aflush()`/`aclose()`, which flush in a
worker thread; blocking the loop there would deadlock the export.

This module imports no grpc at import time: the policy layer and the observer are pure Python (the
OTLP exporter, which uses grpc, is imported only when `from_spec` builds one).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import Token
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter, TextMapPropagator
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from aivo_mesh.config.model import GRPC_STATUS_NAMES, TracingSpec
from aivo_mesh.policy.core import Call, Handler, LocalReason, Reply
from aivo_mesh.policy.events import ServerCall
from aivo_mesh.telemetry.logs import current_trace_ids  # re-exported: one definition, in logs

__all__ = [
    "GRPC_STATUS_CODES",
    "ClientTracingLayer",
    "ServerTracingObserver",
    "Tracing",
    "current_trace_ids",
    "split_method",
]

INSTRUMENTATION_NAME = "aivo_mesh"

#: gRPC status name -> numeric code (the value of `rpc.grpc.status_code`), without importing grpc:
#: the position in mesh.yaml's table of names, which is in code order.
GRPC_STATUS_CODES: dict[str, int] = {name: code for code, name in enumerate(GRPC_STATUS_NAMES)}
_UNKNOWN_CODE = GRPC_STATUS_CODES["UNKNOWN"]

# The header names our propagator may write; stale copies are dropped from call.metadata before
# injecting, so a caller-supplied or re-used metadata tuple never carries two parents.
_PROPAGATION_KEYS = frozenset({"traceparent", "tracestate", "baggage"})


def w3c_propagator() -> TextMapPropagator:
    """W3C trace context + baggage: what the mesh speaks on the wire, whatever OTEL_PROPAGATORS says."""
    return CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])


@functools.lru_cache(maxsize=4096)
def split_method(method: str) -> tuple[str, str]:
    """'/pkg.Service/Method' -> ('pkg.Service', 'Method'); anything else -> ('', method)."""
    service, sep, name = method.lstrip("/").rpartition("/")
    return (service, name) if sep else ("", method)


class _MetadataGetter(Getter[Sequence[tuple[str, str]]]):
    """Reads W3C headers out of gRPC metadata (a sequence of (key, value) pairs, keys lowercase)."""

    def get(self, carrier: Sequence[tuple[str, str]], key: str) -> list[str] | None:
        key = key.lower()
        values = [v for k, v in carrier if k.lower() == key]
        return values or None

    def keys(self, carrier: Sequence[tuple[str, str]]) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _MetadataGetter()


def _rpc_attributes(method: str) -> dict[str, AttributeValue]:
    rpc_service, rpc_method = split_method(method)
    return {"rpc.system": "grpc", "rpc.service": rpc_service, "rpc.method": rpc_method}


def _set_outcome(span: trace.Span, code: str, description: str = "") -> None:
    span.set_attribute("rpc.grpc.status_code", GRPC_STATUS_CODES.get(code, _UNKNOWN_CODE))
    if code != "OK":
        span.set_status(Status(StatusCode.ERROR, f"{code}: {description}" if description else code))


class Tracing:
    """One service's tracer: its own TracerProvider, tracer and W3C propagator."""

    def __init__(self, provider: TracerProvider, service_name: str, service_version: str = "",
                 propagator: TextMapPropagator | None = None) -> None:
        self.provider = provider
        self.service_name = service_name
        self.service_version = service_version
        self.tracer: trace.Tracer = provider.get_tracer(INSTRUMENTATION_NAME, service_version or None)
        self.propagator: TextMapPropagator = propagator or w3c_propagator()
        self._closed = False
        self._close_lock = threading.Lock()

    @classmethod
    def from_spec(
        cls,
        spec: TracingSpec,
        service_name: str,
        service_version: str,
        *,
        exporter: SpanExporter | None = None,
        batch: bool = True,
        shutdown_on_exit: bool = True,
        resource_name: str | None = None,
    ) -> Tracing | None:
        """The service's Tracing, or None when `spec.enabled` is false.

        `resource_name` (OTEL_SERVICE_NAME) is the `service.name` its spans carry, when not the mesh
        service's name: Jaeger lists the process under it.

        Spans go to `exporter` when given (tests: InMemorySpanExporter), else over OTLP/gRPC to
        `spec.otlp_endpoint` (plaintext unless the endpoint starts with https://). `batch=False`
        exports each span as it ends (SimpleSpanProcessor; tests only).
        """
        if not spec.enabled:
            return None
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            endpoint = spec.otlp_endpoint
            exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.lower().startswith("https://"))
        resource = Resource.create({SERVICE_NAME: resource_name or service_name, SERVICE_VERSION: service_version})
        provider = TracerProvider(resource=resource, sampler=sampler(spec), shutdown_on_exit=shutdown_on_exit)
        provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
        return cls(provider, service_name, service_version)

    # -- wiring ------------------------------------------------------------------------------------
    def client_layer(self) -> ClientTracingLayer:
        return ClientTracingLayer(self)

    def server_observer(self) -> ServerTracingObserver:
        return ServerTracingObserver(self)

    def install_global(self) -> bool:
        """Make this provider the global one (`opentelemetry.trace.get_tracer`). OTel allows that
        once per process; returns whether this provider is now the global one."""
        if trace.get_tracer_provider() is not self.provider:
            trace.set_tracer_provider(self.provider)
        return trace.get_tracer_provider() is self.provider

    # -- application API ---------------------------------------------------------------------------
    @contextmanager
    def span(self, name: str, /, **attrs: AttributeValue) -> Iterator[trace.Span]:
        """A custom INTERNAL span, current inside the block, child of the current span. An exception
        leaving the block is recorded and sets status ERROR."""
        with self.tracer.start_as_current_span(name, attributes=attrs or None) as span:
            yield span

    # -- lifecycle ---------------------------------------------------------------------------------
    def flush(self, timeout: float = 10.0) -> bool:
        """Export everything ended so far (blocks this thread; see the module docstring)."""
        if self._closed:
            return True
        return self.provider.force_flush(int(timeout * 1000))

    def shutdown(self) -> None:
        """Flush and stop the exporter. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self.provider.shutdown()

    async def aflush(self, timeout: float = 10.0) -> bool:
        return await asyncio.to_thread(self.flush, timeout)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.shutdown)


def sampler(spec: TracingSpec) -> Sampler:
    """The OpenTelemetry sampler `spec.sampler` names (the OTEL_TRACES_SAMPLER values)."""
    kind = spec.sampler.removeprefix("parentbased_")
    root: Sampler = (ALWAYS_ON if kind == "always_on" else ALWAYS_OFF if kind == "always_off"
                     else TraceIdRatioBased(spec.sample_ratio))
    return ParentBased(root) if spec.sampler.startswith("parentbased_") else root


class ClientTracingLayer:
    """Policy layer: one CLIENT span per logical call, unary or streaming (a stream's ends when the
    stream does); must sit outermost (it sees every attempt's outcome only as the final reply, and the
    final `call.attempt`).

    The span is a child of the current context (a server handler's SERVER span when the call is made
    while serving), is current while the inner layers run, and its `traceparent`/`tracestate`/
    `baggage` are injected into `call.metadata` once, which the client adapter sends on every attempt.
    """

    name = "tracing"

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing

    def _start(self, call: Call) -> tuple[trace.Span, otel_context.Context]:
        """The CLIENT span of `call`, a child of the current context; its W3C headers go into
        `call.metadata`."""
        attributes = _rpc_attributes(call.method)
        attributes["peer.service"] = call.service
        span = self.tracing.tracer.start_span(call.method, kind=SpanKind.CLIENT, attributes=attributes)
        ctx = trace.set_span_in_context(span)
        carrier: dict[str, str] = {}
        self.tracing.propagator.inject(carrier, context=ctx)
        if carrier:
            kept = tuple((k, v) for k, v in call.metadata if k.lower() not in _PROPAGATION_KEYS)
            call.metadata = kept + tuple(carrier.items())
        return span, ctx

    def wrap(self, inner: Handler) -> Handler:
        start = self._start

        async def handle(call: Call) -> Reply:
            span, ctx = start(call)
            token = otel_context.attach(ctx)
            try:
                reply = await inner(call)
            except BaseException as exc:
                cancelled = isinstance(exc, asyncio.CancelledError)
                if not cancelled:
                    span.record_exception(exc)
                _finish_client(span, call, "CANCELLED" if cancelled else "UNKNOWN", type(exc).__name__)
                raise
            finally:
                otel_context.detach(token)
            if reply.ended is None:
                _finish_client(span, call, reply.code, reply.details, reply.local)
            else:  # a stream's span lasts until it ends
                reply.ended.add_done_callback(
                    lambda done: _finish_client(span, call, done.result().code, done.result().details,
                                                done.result().local))
            return reply

        return handle


def _finish_client(span: trace.Span, call: Call, code: str, details: str, local: LocalReason | None = None) -> None:
    if span.is_recording():
        if call.attempt > 1:
            span.set_attribute("aivo.attempts", call.attempt)
            for n in range(2, call.attempt + 1):
                span.add_event("retry", {"aivo.attempt": n})
        if local is not None:
            span.set_attribute("aivo.local", True)
            span.set_attribute("aivo.local_reason", str(local))
        _set_outcome(span, code, details)
    span.end()


@dataclass(slots=True)
class _ServerToken:
    span: trace.Span
    token: Token[otel_context.Context]


class ServerTracingObserver:
    """ServerCallObserver: a SERVER span per inbound call, parented by the caller's `traceparent`.

    `start` runs in the handler's task before the handler and attaches the span as the current
    context, so the handler's own client calls and custom spans become its children; `finish` (same
    task) ends the span with the final status and restores the previous context.
    """

    # Probes are not traced (nor by the rendered sidecars, render/envoy.py): a 30 s health check per
    # caller would bury the application's traces.
    UNTRACED_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing

    def start(self, call: ServerCall) -> object:
        if call.method.startswith(self.UNTRACED_PREFIXES):
            return None
        # Only the remote parent counts: whatever context the server's task inherited is ignored.
        parent = self.tracing.propagator.extract(call.metadata, context=otel_context.Context(), getter=_GETTER)
        attributes = _rpc_attributes(call.method)
        if call.caller:
            attributes["aivo.caller"] = call.caller
        if call.attempt > 1:
            attributes["aivo.attempt"] = call.attempt
        span = self.tracing.tracer.start_span(call.method, context=parent, kind=SpanKind.SERVER,
                                              attributes=attributes)
        return _ServerToken(span, otel_context.attach(trace.set_span_in_context(span, parent)))

    def finish(self, token: object, call: ServerCall, code: str, error: BaseException | None) -> None:
        if not isinstance(token, _ServerToken):
            return
        span = token.span
        try:
            if span.is_recording():
                failure = _failure(error)
                if failure is not None and code != "OK":
                    # The exception's class only, as in the logs (telemetry/logs.py): its message and
                    # traceback may quote a token or a request, and spans leave the process (Jaeger).
                    span.add_event("exception", {"exception.type": _error_text(failure)})
                _set_outcome(span, code, _error_text(failure))
            span.end()
        finally:
            otel_context.detach(token.token)


def _failure(error: BaseException | None) -> BaseException | None:
    """The exception worth recording: not a cancellation, and not grpc's AbortError (raised by
    `context.abort`, whose status code already tells the story)."""
    if error is None or isinstance(error, asyncio.CancelledError) or type(error).__name__ == "AbortError":
        return None
    return error


def _error_text(error: BaseException | None) -> str:
    """The exception's class name, never its message (see `finish`)."""
    return "" if error is None else type(error).__name__
