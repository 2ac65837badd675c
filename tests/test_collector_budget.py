"""The trace collector's memory is bounded by bytes: held spans, one span, and requests waiting to be
forwarded, with what it let go counted by reason. Spans go through real OTLP/gRPC."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
from pathlib import Path

import grpc
import pytest
from helpers import checkout_env, meshctl
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from waiting import until

from aivo_mesh.runtime.collector import read_stats
from aivo_mesh.runtime.local import free_port
from aivo_mesh.runtime.supervisor import meshctl_argv
from aivo_mesh.telemetry.otlp_receiver import EXPORT_METHOD, MAX_VALUE_CHARS, OtlpReceiver, held_size

ROOT = Path(__file__).resolve().parents[1]
KIB, MIB = 1024, 1024 * 1024
_ids = iter(range(1, 10**9))


def _span(attributes: dict[str, str]) -> Span:
    n = next(_ids)
    return Span(trace_id=n.to_bytes(16, "big"), span_id=n.to_bytes(8, "big"), name=f"op-{n}",
                kind=Span.SPAN_KIND_SERVER, start_time_unix_nano=1_000 + n, end_time_unix_nano=2_000 + n,
                attributes=[KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in attributes.items()])


def _request(*spans: Span) -> ExportTraceServiceRequest:
    resource = Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="load-svc"))])
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(resource=resource,
                                                                   scope_spans=[ScopeSpans(spans=list(spans))])])


def oversized() -> Span:  # one 1 MB attribute: cut down to fit, still held
    return _span({"db.statement": "x" * 1_000_000})


def too_wide() -> Span:  # 100 values of 2000 characters: over 64 KiB even cut to 1024 each, dropped
    return _span({f"attr.{i}": "y" * 2000 for i in range(100)})


def ordinary() -> Span:  # about 16 KiB: held as received
    return _span({"payload": "z" * 16_000})


async def test_held_spans_stay_within_the_byte_budget_and_every_drop_is_counted() -> None:
    async with OtlpReceiver(max_bytes=1 * MIB, max_span_bytes=64 * KIB) as receiver, \
            grpc.aio.insecure_channel(receiver.address) as channel:
        export = channel.unary_unary(EXPORT_METHOD, request_serializer=ExportTraceServiceRequest.SerializeToString,
                                     response_deserializer=ExportTraceServiceResponse.FromString)
        await export(_request(oversized(), oversized(), oversized(), too_wide()), timeout=10)
        stats = receiver.stats()
        assert (stats["truncated"], stats["dropped"]["span_too_large"], stats["held_spans"]) == (3, 1, 3)
        big = receiver.spans()[0]
        assert held_size(big) <= 64 * KIB
        assert big.attributes["db.statement"].startswith("x" * MAX_VALUE_CHARS + "...[")
        for _ in range(20):  # 200 ordinary spans: about 3.5 MB against a 1 MiB budget
            await export(_request(*(ordinary() for _ in range(10))), timeout=10)
            assert receiver.held_bytes <= receiver.max_bytes
        stats = receiver.stats()
    held = receiver.spans()
    assert stats["held_bytes"] == sum(map(held_size, held)) <= 1 * MIB
    assert stats["received"] == 204
    assert stats["dropped"]["buffer_full"] == 203 - len(held) > 100  # the oldest left first
    assert [s.attributes["payload"] for s in held] == ["z" * 16_000] * len(held)
    assert stats["dropped"]["forward_queue_full"] == 0


async def test_requests_waiting_to_be_forwarded_are_bounded_by_bytes() -> None:
    # An upstream that accepts connections and never answers: every forward waits out its timeout.
    with socket.create_server(("127.0.0.1", 0)) as black_hole:
        target = f"127.0.0.1:{black_hole.getsockname()[1]}"
        async with OtlpReceiver(forward_to=target, forward_timeout=30, forward_max_bytes=100 * KIB) as receiver, \
                grpc.aio.insecure_channel(receiver.address) as channel:
            export = channel.unary_unary(EXPORT_METHOD,
                                         request_serializer=ExportTraceServiceRequest.SerializeToString,
                                         response_deserializer=ExportTraceServiceResponse.FromString)
            for _ in range(10):  # ten requests of ~32 KB: three fit in 100 KiB
                await export(_request(ordinary(), ordinary()), timeout=10)
            stats = receiver.stats()
            assert stats["forward_queued_bytes"] <= 100 * KIB
            assert (stats["forward_dropped"], stats["dropped"]["forward_queue_full"]) == (7, 14)
            assert stats["held_spans"] == 20  # held all the same
            await receiver.stop(grace=0)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
async def test_meshctl_collector_bounds_memory_and_tells_meshctl_traces_what_it_dropped(tmp_path: Path) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource as SdkResource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    port = free_port()
    env = checkout_env()
    out = tmp_path / "traces.jsonl"
    with (tmp_path / "collector.log").open("wb") as log:
        proc = subprocess.Popen(meshctl_argv("collector", "--port", str(port), "--out", str(out),
                                             "--max-bytes", "1MiB", "--max-span-bytes", "64KiB"),
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        await until(lambda: _accepts(port) or proc.poll() is not None, timeout=30, what="collector listening")
        assert proc.poll() is None, (tmp_path / "collector.log").read_text()
        provider = TracerProvider(resource=SdkResource.create({"service.name": "load-svc"}))
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"127.0.0.1:{port}", insecure=True)))
        tracer = provider.get_tracer("load")

        def send() -> None:
            for attrs in ([{"db.statement": "x" * 1_000_000}] * 2 + [{f"a{i}": "y" * 2000 for i in range(100)}]
                          + [{"payload": "z" * 16_000}] * 150):
                with tracer.start_as_current_span("op", attributes=attrs):
                    pass
            provider.shutdown()

        await asyncio.to_thread(send)
        await until(lambda: (read_stats(out) or {}).get("received") == 153, timeout=15, what="stats of 153 spans")
        stats = read_stats(out)
        assert stats is not None
        assert stats["held_bytes"] <= stats["max_bytes"] == 1 * MIB
        assert stats["truncated"] == 2
        assert stats["dropped"]["span_too_large"] == 1
        assert stats["dropped"]["buffer_full"] > 50
        traces = meshctl("traces", "--state-dir", str(tmp_path), "--last", "1", timeout=60)
        assert traces.returncode == 0, traces.stderr
        first = traces.stdout.splitlines()[0]
        assert first.startswith(f"collector: {stats['held_spans']} spans held (")
        assert "of 1.0 MiB); 2 cut to 64 KiB; dropped: buffer_full=" in first and "span_too_large=1" in first
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    logged = [json.loads(line) for line in (tmp_path / "collector.log").read_text().splitlines()
              if line.startswith("{")]
    assert any(r.get("event") == "spans_dropped" and r["level"] == "WARNING" for r in logged), logged
