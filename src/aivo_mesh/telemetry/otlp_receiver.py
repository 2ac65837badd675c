"""An embedded OTLP/gRPC trace collector: what `meshctl traces` reads, and what tests assert on.

    async with OtlpReceiver(forward_to="http://jaeger:4317") as receiver:    # binds 127.0.0.1:<free>
        spec = TracingSpec(enabled=True, otlp_endpoint=receiver.endpoint)
        ...
        spans = await receiver.wait_for(lambda spans: len(spans) >= 4, timeout=5)
        for t in receiver.traces(last=5):
            print(render_waterfall(t))

It implements `opentelemetry.proto.collector.trace.v1.TraceService/Export` on a grpc.aio server and
keeps the most recent spans in a ring buffer as plain `SpanRecord`s. With `forward_to`, every Export
request is also sent on to an upstream OTLP endpoint (a real Jaeger or collector) from a background
task: a slow, down or failing upstream never fails, nor slows, the Export itself.

Memory is bounded by bytes, not only by span count (400 one-megabyte spans once took a collector from
95 to 481 MiB):

* held spans: at most `max_bytes` (default 64 MiB) by the receiver's own estimate of each record
  (`held_size`), and at most `capacity` spans; the oldest leave first (`dropped["buffer_full"]`);
* one span: above `max_span_bytes` (default 256 KiB) its string values (attributes, status message)
  are cut to MAX_VALUE_CHARS and its events to MAX_EVENTS (`truncated`); still above, it is not
  held nor handed to the sink (`dropped["span_too_large"]`);
* forwarding: requests waiting for the upstream hold at most `forward_max_bytes` (default 32 MiB)
  and `forward_queue` requests; beyond, a request is not forwarded (`dropped["forward_queue_full"]`
  counts its spans). Forwarded requests are sent as received, untruncated.

`stats()` reports all of it; `meshctl collector` writes it next to its span log for `meshctl traces`.

Security: the receiver speaks plaintext (like Jaeger's and the OTel Collector's default OTLP port) and
therefore binds 127.0.0.1 by default; bind another address only on a trusted network.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from aivo_mesh.config.model import GRPC_STATUS_NAMES
from aivo_mesh.errors import MeshError

__all__ = ["DROP_REASONS", "OtlpReceiver", "SpanRecord", "Trace", "held_size", "render_waterfall"]

log = logging.getLogger(__name__)

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
EXPORT_METHOD = f"/{SERVICE}/Export"
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_SPAN_BYTES = 256 * 1024
DEFAULT_FORWARD_MAX_BYTES = 32 * 1024 * 1024
MAX_VALUE_CHARS = 1024  # a string value of a span over max_span_bytes is cut to this many characters
MAX_EVENTS = 128
DROP_REASONS = ("span_too_large", "buffer_full", "forward_queue_full")


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """One received span, decoded from OTLP (ids as lowercase hex; times in Unix nanoseconds)."""

    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    name: str
    kind: str  # "SERVER", "CLIENT", "INTERNAL", "PRODUCER", "CONSUMER" or "UNSPECIFIED"
    service: str  # resource attribute service.name
    start_ns: int
    end_ns: int
    status: str  # "UNSET", "OK" or "ERROR"
    status_message: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    events: tuple[str, ...] = ()  # event names, in order
    scope: str = ""  # instrumentation scope name

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)

    @property
    def failed(self) -> bool:
        """An error span, or an Envoy span of a call that ended with a gRPC status other than OK:
        Envoy leaves a gRPC failure's span status UNSET (HTTP 200) and tags `grpc.status_code`."""
        return self.status == "ERROR" or self.envoy_grpc_status not in (None, "OK")

    @property
    def envoy_grpc_status(self) -> str | None:
        """The status name of Envoy's `grpc.status_code` tag, if the span has one."""
        code = self.attributes.get("grpc.status_code")
        if not (isinstance(code, str) and code.isdigit()):
            return None
        n = int(code)
        return GRPC_STATUS_NAMES[n] if n < len(GRPC_STATUS_NAMES) else code

    @property
    def display_name(self) -> str:
        """The name to show. Envoy names its spans by direction (`ingress`, `egress <host>`); the gRPC
        method it tags them with (`grpc.path`) is what a reader needs."""
        path = self.attributes.get("grpc.path") if self.name.split(" ", 1)[0] in ("ingress", "egress") else None
        return f"{self.name} {path}" if isinstance(path, str) and path else self.name


@dataclass(frozen=True, slots=True)
class Trace:
    """The received spans of one trace id, ordered by start time."""

    trace_id: str
    spans: tuple[SpanRecord, ...]

    @property
    def start_ns(self) -> int:
        return min((s.start_ns for s in self.spans), default=0)

    @property
    def end_ns(self) -> int:
        return max((s.end_ns for s in self.spans), default=0)

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)

    @property
    def services(self) -> list[str]:
        """Services in order of first appearance."""
        return list(dict.fromkeys(s.service for s in self.spans))

    @property
    def root(self) -> SpanRecord | None:
        """The earliest span whose parent is not in this trace (the true root when it was received)."""
        ids = {s.span_id for s in self.spans}
        return next((s for s in self.spans if s.parent_span_id not in ids), None)

    @property
    def errors(self) -> int:
        return sum(1 for s in self.spans if s.failed)

    def span(self, span_id: str) -> SpanRecord | None:
        return next((s for s in self.spans if s.span_id == span_id), None)

    def children(self, span_id: str) -> list[SpanRecord]:
        return [s for s in self.spans if s.parent_span_id == span_id]


# -- OTLP decoding ---------------------------------------------------------------------------------

def _any_value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, which)


def _attributes(kvs: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: _any_value(kv.value) for kv in kvs}


def _kind(kind: int) -> str:
    try:
        return str(Span.SpanKind.Name(kind)).removeprefix("SPAN_KIND_")  # type: ignore[arg-type]
    except ValueError:
        return "UNSPECIFIED"


def _status(code: int) -> str:
    try:
        return str(Status.StatusCode.Name(code)).removeprefix("STATUS_CODE_")  # type: ignore[arg-type]
    except ValueError:
        return "UNSET"


def decode(request: ExportTraceServiceRequest) -> list[SpanRecord]:
    """Every span of an Export request as a SpanRecord."""
    out: list[SpanRecord] = []
    for rs in request.resource_spans:
        resource = _attributes(rs.resource.attributes)
        service = str(resource.get("service.name") or "unknown_service")
        for ss in rs.scope_spans:
            scope = ss.scope.name
            for sp in ss.spans:
                out.append(SpanRecord(
                    trace_id=sp.trace_id.hex(),
                    span_id=sp.span_id.hex(),
                    parent_span_id=sp.parent_span_id.hex(),
                    name=sp.name,
                    kind=_kind(sp.kind),
                    service=service,
                    start_ns=sp.start_time_unix_nano,
                    end_ns=sp.end_time_unix_nano,
                    status=_status(sp.status.code),
                    status_message=sp.status.message,
                    attributes=_attributes(sp.attributes),
                    events=tuple(e.name for e in sp.events),
                    scope=scope,
                ))
    return out


# -- size accounting ------------------------------------------------------------------------------

# What a record costs beyond its strings on CPython 3.11 (the dataclass, its dict, a dict entry, a str
# header). Checked with tracemalloc: the estimate is 1.0 to 2.8 times the real size (the higher for
# small spans), never below it.
_RECORD_OVERHEAD = 500
_ITEM_OVERHEAD = 60
_STR_OVERHEAD = 49


def _value_size(value: Any) -> int:
    if isinstance(value, str):
        return _STR_OVERHEAD + len(value.encode("utf-8", "surrogatepass")) if not value.isascii() else \
            _STR_OVERHEAD + len(value)
    if isinstance(value, bytes):
        return _STR_OVERHEAD + len(value)
    if isinstance(value, list):
        return _ITEM_OVERHEAD + sum(_value_size(v) for v in value)
    if isinstance(value, dict):
        return _ITEM_OVERHEAD + sum(_value_size(k) + _value_size(v) for k, v in value.items())
    return 32


def held_size(span: SpanRecord) -> int:
    """Bytes one held record costs, by estimate (strings, containers and fixed overheads)."""
    return (_RECORD_OVERHEAD
            + sum(_value_size(v) for v in (span.trace_id, span.span_id, span.parent_span_id, span.name, span.kind,
                                           span.service, span.status, span.status_message, span.scope))
            + sum(_ITEM_OVERHEAD + _value_size(k) + _value_size(v) for k, v in span.attributes.items())
            + sum(_ITEM_OVERHEAD + _value_size(e) for e in span.events))


def _cut(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        return f"{value[:MAX_VALUE_CHARS]}...[{len(value) - MAX_VALUE_CHARS} more characters cut by the collector]"
    if isinstance(value, bytes) and len(value) > MAX_VALUE_CHARS:
        return value[:MAX_VALUE_CHARS]
    if isinstance(value, list):
        return [_cut(v) for v in value[:MAX_EVENTS]]
    if isinstance(value, dict):
        return {_cut(k): _cut(v) for k, v in list(value.items())[:MAX_EVENTS]}
    return value


def truncate(span: SpanRecord) -> SpanRecord:
    """`span` with every string value cut to MAX_VALUE_CHARS and at most MAX_EVENTS events."""
    return dataclasses.replace(
        span, name=_cut(span.name), status_message=_cut(span.status_message),
        attributes={_cut(k): _cut(v) for k, v in span.attributes.items()},
        events=tuple(_cut(e) for e in span.events[:MAX_EVENTS]))


def _grpc_target(endpoint: str) -> tuple[str, bool]:
    """('host:port', secure) from 'http://h:p', 'https://h:p' or 'h:p' (plaintext)."""
    lowered = endpoint.lower()
    for prefix, secure in (("https://", True), ("http://", False)):
        if lowered.startswith(prefix):
            return endpoint[len(prefix):].rstrip("/"), secure
    return endpoint, False


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- the receiver ----------------------------------------------------------------------------------

class OtlpReceiver:
    """A grpc.aio OTLP trace receiver with a ring buffer of recent spans and optional forwarding.

    Loop-bound: start it, wait on it and stop it from the same event loop.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, capacity: int = 10000,
                 forward_to: str | None = None, *, forward_timeout: float = 5.0,
                 forward_queue: int = 1000,
                 sink: Callable[[list[SpanRecord]], None] | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_span_bytes: int = DEFAULT_MAX_SPAN_BYTES,
                 forward_max_bytes: int = DEFAULT_FORWARD_MAX_BYTES) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if min(max_bytes, max_span_bytes, forward_max_bytes) < 1:
            raise ValueError("max_bytes, max_span_bytes and forward_max_bytes must be >= 1")
        self.max_bytes = max_bytes
        self.max_span_bytes = min(max_span_bytes, max_bytes)
        self.forward_max_bytes = forward_max_bytes
        self.host = host
        self.requested_port = port
        self.capacity = capacity
        self.forward_to = forward_to
        self.forward_timeout = forward_timeout
        # Called with each Export's decoded spans (e.g. to persist them for `meshctl traces`).
        self.sink = sink
        self._spans: deque[SpanRecord] = deque()
        self._sizes: deque[int] = deque()  # held_size of each of _spans
        self.held_bytes = 0
        self._forward_bytes = 0  # ByteSize of the requests queued for forwarding
        self._cond = asyncio.Condition()
        self._server: Any = None
        self._port: int | None = None
        self._forward_channel: Any = None
        self._forward_call: Any = None
        self._forward_queue: asyncio.Queue[tuple[ExportTraceServiceRequest, int]] = asyncio.Queue(
            maxsize=forward_queue)
        self._forward_task: asyncio.Task[None] | None = None
        #: Counters: Export requests and spans received; requests forwarded, failed, dropped (queue full).
        self.requests = 0
        self.received = 0
        self.forwarded = 0
        self.forward_errors = 0
        self.forward_dropped = 0
        #: Spans cut down to fit max_span_bytes, and spans dropped by reason (DROP_REASONS).
        self.truncated = 0
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._port is None:
            raise MeshError("OtlpReceiver is not started")
        return self._port

    @property
    def address(self) -> str:
        """'host:port' (what a grpc channel targets)."""
        return _hostport(self.host, self.port)

    @property
    def endpoint(self) -> str:
        """'http://host:port' (what TracingSpec.otlp_endpoint / OTLPSpanExporter take)."""
        return f"http://{self.address}"

    async def start(self) -> OtlpReceiver:
        if self._server is not None:
            return self
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ])
        handler = grpc.unary_unary_rpc_method_handler(
            self._export,
            request_deserializer=ExportTraceServiceRequest.FromString,
            response_serializer=ExportTraceServiceResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Export": handler}),))
        try:
            port = server.add_insecure_port(_hostport(self.host, self.requested_port))
        except RuntimeError as exc:
            raise MeshError(f"OTLP receiver cannot bind {_hostport(self.host, self.requested_port)}: {exc}") from exc
        if not port:
            raise MeshError(f"OTLP receiver cannot bind {_hostport(self.host, self.requested_port)}")
        await server.start()
        self._server, self._port = server, int(port)
        if self.forward_to:
            target, secure = _grpc_target(self.forward_to)
            self._forward_channel = (grpc.aio.secure_channel(target, grpc.ssl_channel_credentials()) if secure
                                     else grpc.aio.insecure_channel(target))
            self._forward_call = self._forward_channel.unary_unary(
                EXPORT_METHOD,
                request_serializer=ExportTraceServiceRequest.SerializeToString,
                response_deserializer=ExportTraceServiceResponse.FromString,
            )
            self._forward_task = asyncio.create_task(self._forward_loop(), name="otlp-forward")
        log.info("OTLP trace receiver listening on %s (plaintext)%s", self.address,
                 f", forwarding to {self.forward_to}" if self.forward_to else "")
        return self

    async def stop(self, grace: float = 1.0) -> None:
        """Stop accepting, then give queued forwards up to `grace` seconds to go out."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)
        task, self._forward_task = self._forward_task, None
        if task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._forward_queue.join(), grace)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        channel, self._forward_channel = self._forward_channel, None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> OtlpReceiver:
        return await self.start()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    # -- ingest ------------------------------------------------------------------------------------
    async def _export(self, request: ExportTraceServiceRequest, context: Any) -> ExportTraceServiceResponse:
        self.ingest(request)
        if self._forward_task is not None:
            size = request.ByteSize()
            if self._forward_bytes + size > self.forward_max_bytes or self._forward_queue.full():
                self.forward_dropped += 1
                self.dropped["forward_queue_full"] += sum(len(ss.spans) for rs in request.resource_spans
                                                          for ss in rs.scope_spans)
            else:
                self._forward_bytes += size
                self._forward_queue.put_nowait((request, size))
        async with self._cond:
            self._cond.notify_all()
        return ExportTraceServiceResponse()

    def ingest(self, request: ExportTraceServiceRequest) -> list[SpanRecord]:
        """Decode and store the spans of one Export request (also usable without the server).
        Waiters are woken by the next Export, or call `notify()`."""
        decoded = decode(request)
        self.requests += 1
        self.received += len(decoded)
        spans = [s for s in map(self._fit, decoded) if s is not None]
        for span in spans:
            self._hold(span)
        if self.sink is not None:
            self.sink(spans)
        return spans

    def _fit(self, span: SpanRecord) -> SpanRecord | None:
        """`span`, cut down when it is over max_span_bytes; None (counted) when even that is over."""
        if held_size(span) <= self.max_span_bytes:
            return span
        cut = truncate(span)
        if held_size(cut) > self.max_span_bytes:
            self.dropped["span_too_large"] += 1
            return None
        self.truncated += 1
        return cut

    def _hold(self, span: SpanRecord) -> None:
        size = held_size(span)
        self._spans.append(span)
        self._sizes.append(size)
        self.held_bytes += size
        while self.held_bytes > self.max_bytes or len(self._spans) > self.capacity:
            self._spans.popleft()
            self.held_bytes -= self._sizes.popleft()
            self.dropped["buffer_full"] += 1

    def stats(self) -> dict[str, Any]:
        """What the receiver holds and has let go, as plain JSON data."""
        return {
            "held_spans": len(self._spans), "held_bytes": self.held_bytes, "max_bytes": self.max_bytes,
            "max_span_bytes": self.max_span_bytes, "requests": self.requests, "received": self.received,
            "truncated": self.truncated, "dropped": dict(self.dropped), "forwarded": self.forwarded,
            "forward_errors": self.forward_errors, "forward_dropped": self.forward_dropped,
            "forward_queued_bytes": self._forward_bytes, "forward_max_bytes": self.forward_max_bytes,
        }

    async def notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def _forward_loop(self) -> None:
        while True:
            request, size = await self._forward_queue.get()
            try:
                await self._forward_call(request, timeout=self.forward_timeout)
                self.forwarded += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # forwarding is best effort by design
                self.forward_errors += 1
                log.debug("forwarding an Export request to %s failed: %s", self.forward_to, exc)
            finally:
                self._forward_bytes -= size
                self._forward_queue.task_done()

    # -- queries -----------------------------------------------------------------------------------
    def spans(self) -> list[SpanRecord]:
        """Every buffered span, oldest received first."""
        return list(self._spans)

    def clear(self) -> None:
        self._spans.clear()
        self._sizes.clear()
        self.held_bytes = 0

    def traces(self, last: int = 20) -> list[Trace]:
        """The `last` most recent traces (by start time of their earliest span), newest first."""
        return group_traces(self._spans, last)

    def trace(self, trace_id: str) -> Trace | None:
        spans = sorted((s for s in self._spans if s.trace_id == trace_id.lower()),
                       key=lambda s: (s.start_ns, s.end_ns))
        return Trace(trace_id.lower(), tuple(spans)) if spans else None

    async def wait_for(self, predicate: Callable[[list[SpanRecord]], bool], timeout: float) -> list[SpanRecord]:
        """Wait until `predicate(spans)` holds (re-checked on every Export); returns those spans.
        Raises TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout), self._cond:
            await self._cond.wait_for(lambda: predicate(list(self._spans)))
            return list(self._spans)


# -- rendering -------------------------------------------------------------------------------------

def group_traces(spans: Iterable[SpanRecord], last: int = 20) -> list[Trace]:
    """Group spans by trace id; the `last` most recent traces (by earliest start), newest first."""
    groups: dict[str, list[SpanRecord]] = {}
    for s in spans:
        groups.setdefault(s.trace_id, []).append(s)
    traces = [Trace(tid, tuple(sorted(group, key=lambda s: (s.start_ns, s.end_ns))))
              for tid, group in groups.items()]
    traces.sort(key=lambda t: t.start_ns, reverse=True)
    return traces[:max(0, last)]


def select_traces(traces: Iterable[Trace], *, service: str | None = None, errors: bool = False,
                  trace_id: str | None = None) -> list[Trace]:
    """The traces that pass every filter given, in the order given: with a span of `service` (its
    app or its sidecar, `<service>-sidecar`), with a failed span, or whose id starts with `trace_id`."""
    names = {service, f"{service}-sidecar"} if service else set()
    prefix = trace_id.lower() if trace_id else ""
    return [t for t in traces
            if (not names or names & set(t.services)) and (not errors or t.errors)
            and t.trace_id.startswith(prefix)]


def format_duration(ns: int) -> str:
    if ns < 1_000_000:
        return f"{ns / 1000:.0f}µs"
    if ns < 1_000_000_000:
        return f"{ns / 1_000_000:.2f}ms"
    return f"{ns / 1_000_000_000:.3f}s"


def _tree(trace: Trace) -> list[tuple[int, SpanRecord]]:
    """(depth, span) in display order: parents before children, siblings by start time. Spans whose
    parent was not received are shown as roots; a (corrupt) cycle cannot loop."""
    ids = {s.span_id for s in trace.spans}
    children: dict[str, list[SpanRecord]] = {}
    roots: list[SpanRecord] = []
    for s in trace.spans:  # already sorted by start
        if s.parent_span_id and s.parent_span_id in ids and s.parent_span_id != s.span_id:
            children.setdefault(s.parent_span_id, []).append(s)
        else:
            roots.append(s)
    rows: list[tuple[int, SpanRecord]] = []
    seen: set[str] = set()
    stack = [(0, s) for s in reversed(roots)]
    while stack:
        depth, s = stack.pop()
        if s.span_id in seen:
            continue
        seen.add(s.span_id)
        rows.append((depth, s))
        stack.extend((depth + 1, c) for c in reversed(children.get(s.span_id, [])))
    rows.extend((0, s) for s in trace.spans if s.span_id not in seen)  # members of a cycle
    return rows


def render_waterfall(trace: Trace, *, width: int = 40, max_name: int = 60, ascii_only: bool = False) -> str:
    """A text waterfall of one trace: one row per span, indented under its parent, with the span's
    service and kind, a bar placed by offset and duration on the trace's time line, the offset from
    the trace start, the duration, and ERROR for failed spans.

        trace 4bf9...4736  4 spans  12.31ms  learner-svc, auth-svc
        /aivo.learner.v1.LearnerService/GetProfile    learner-svc  SERVER  |████████████████| +0µs     12.31ms
          /aivo.auth.v1.AuthService/ValidateToken     learner-svc  CLIENT  |  ██████        | +1.20ms  5.00ms
    """
    full, empty = ("#", ".") if ascii_only else ("█", " ")
    width = max(width, 1)
    rows = _tree(trace)
    t0, total = trace.start_ns, max(trace.duration_ns, 1)
    header = (f"trace {trace.trace_id}  {len(trace.spans)} span{'s' if len(trace.spans) != 1 else ''}  "
              f"{format_duration(trace.duration_ns)}  {', '.join(trace.services)}")
    if trace.errors:
        header += f"  {trace.errors} error{'s' if trace.errors != 1 else ''}"
    if not rows:
        return header

    def label(depth: int, s: SpanRecord) -> str:
        text = "  " * depth + s.display_name
        return text if len(text) <= max_name else text[: max_name - 1] + "…"

    labels = [label(d, s) for d, s in rows]
    lw = max(len(x) for x in labels)
    sw = max(len(s.service) for _, s in rows)
    kw = max(len(s.kind) for _, s in rows)
    offsets = [f"+{format_duration(s.start_ns - t0)}" for _, s in rows]
    ow = max(len(x) for x in offsets)
    lines = [header]
    for (_, s), text, offset in zip(rows, labels, offsets, strict=True):
        begin = min(width - 1, max(0, math.floor((s.start_ns - t0) * width / total)))
        end = min(width, max(begin + 1, math.ceil((s.end_ns - t0) * width / total)))
        bar = empty * begin + full * (end - begin) + empty * (width - end)
        line = (f"{text:<{lw}}  {s.service:<{sw}}  {s.kind:<{kw}}  |{bar}|  {offset:<{ow}}  "
                f"{format_duration(s.duration_ns)}")
        if s.status == "ERROR":
            line += "  ERROR" + (f" {s.status_message}" if s.status_message else "")
        elif s.failed:
            line += f"  ERROR {s.envoy_grpc_status}"
        lines.append(line.rstrip())
    return "\n".join(lines)
