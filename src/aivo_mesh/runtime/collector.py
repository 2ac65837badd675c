"""The local runtime's trace collector: an OTLP/gRPC receiver that keeps spans on disk.

Services and Envoys export to it on 127.0.0.1; it appends every span as one JSON line to
`<state>/traces.jsonl` (rotated at `max_bytes`, keeping one previous file) so that
`meshctl traces` can read recent traces from another process, and forwards to Jaeger when asked.

Its memory is bounded by bytes (OtlpReceiver's `max_bytes`, `max_span_bytes`, `forward_max_bytes`).
What it holds and what it dropped, by reason, is written to `<state>/traces.stats.json` (at most once
a second, and at exit) for `meshctl traces`, and a drop is logged (a WARNING at most every 10 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aivo_mesh.fsutil import write_atomic
from aivo_mesh.telemetry.otlp_receiver import (
    DEFAULT_FORWARD_MAX_BYTES,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_SPAN_BYTES,
    OtlpReceiver,
    SpanRecord,
    Trace,
    group_traces,
    select_traces,
)

MAX_BYTES = 20 * 1024 * 1024
STATS_EVERY = 1.0  # seconds between writes of the stats file (when something changed)
WARN_EVERY = 10.0  # seconds between two warnings about dropped spans

log = logging.getLogger("aivo_mesh.collector")


def stats_path(span_log: Path) -> Path:
    """<state>/traces.jsonl -> <state>/traces.stats.json"""
    return span_log.with_name(span_log.name.removesuffix(".jsonl") + ".stats.json")


def write_stats(path: Path, stats: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(stats, sort_keys=True) + "\n")


def read_stats(span_log: Path) -> dict[str, Any] | None:
    """The collector's last stats next to `span_log`, or None."""
    try:
        data = json.loads(stats_path(span_log).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _mib(n: float) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def stats_line(stats: dict[str, Any]) -> str:
    """One line for operators: what is held of the budget, what was cut and dropped."""
    dropped = {k: v for k, v in (stats.get("dropped") or {}).items() if v}
    parts = [f"{stats.get('held_spans', 0)} spans held ({_mib(stats.get('held_bytes', 0))} of "
             f"{_mib(stats.get('max_bytes', 0))})"]
    if stats.get("truncated"):
        parts.append(f"{stats['truncated']} cut to {stats.get('max_span_bytes', 0) // 1024} KiB")
    parts.append("dropped: " + (", ".join(f"{k}={v}" for k, v in sorted(dropped.items())) if dropped else "none"))
    return "collector: " + "; ".join(parts)


class SpanLog:
    def __init__(self, path: Path, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes

    def append(self, spans: list[SpanRecord]) -> None:
        if not spans:
            return
        lines = "".join(json.dumps(asdict(s), separators=(",", ":")) + "\n" for s in spans)
        if self.path.exists() and self.path.stat().st_size + len(lines) > self.max_bytes:
            os.replace(self.path, self.path.with_suffix(".jsonl.1"))
        with self.path.open("a") as f:
            f.write(lines)

    def read(self) -> list[SpanRecord]:
        spans: list[SpanRecord] = []
        for p in (self.path.with_suffix(".jsonl.1"), self.path):
            if not p.exists():
                continue
            for line in p.read_text().splitlines():
                try:
                    d = json.loads(line)
                    d["events"] = tuple(d.get("events", ()))
                    spans.append(SpanRecord(**d))
                except (ValueError, TypeError):
                    continue  # a line cut by a crash: skip it
        return spans

    def traces(self, last: int) -> list[Trace]:
        return group_traces(self.read(), last)


def recent_traces(log: SpanLog, last: int, *, service: str | None = None, errors: bool = False,
                  trace_id: str | None = None) -> list[Trace]:
    """The `last` most recent traces of `log` that pass every filter given (`select_traces`)."""
    filtered = service is not None or errors or trace_id is not None
    # The log keeps recent spans only (it is size-capped), so filtering all of it is cheap.
    return select_traces(log.traces(10**9) if filtered else log.traces(last), service=service, errors=errors,
                         trace_id=trace_id)[:last]


def trace_data(trace: Trace) -> dict[str, Any]:
    """One trace as `meshctl traces -o json` prints it."""
    return {"trace_id": trace.trace_id, "start_ns": trace.start_ns, "duration_ns": trace.duration_ns,
            "services": trace.services, "errors": trace.errors,
            "spans": [{**asdict(s), "events": list(s.events), "failed": s.failed} for s in trace.spans]}


def traces_document(span_log: Path, last: int, *, service: str | None = None, errors: bool = False,
                    trace_id: str | None = None) -> dict[str, Any]:
    """`meshctl traces -o json`'s document (also the observer's /api/v1/traces)."""
    log = SpanLog(span_log)
    found = recent_traces(log, last, service=service, errors=errors, trace_id=trace_id)
    return {"state_dir": str(span_log.parent), "span_log": str(span_log), "collector": read_stats(span_log),
            "traces": [trace_data(t) for t in found]}


async def run_collector(host: str, port: int, path: Path, forward_to: str | None = None, *,
                        max_bytes: int = DEFAULT_MAX_BYTES, max_span_bytes: int = DEFAULT_MAX_SPAN_BYTES,
                        forward_max_bytes: int = DEFAULT_FORWARD_MAX_BYTES) -> None:
    spans = SpanLog(path)
    receiver = OtlpReceiver(host=host, port=port, forward_to=forward_to, sink=spans.append, max_bytes=max_bytes,
                            max_span_bytes=max_span_bytes, forward_max_bytes=forward_max_bytes)
    await receiver.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"OTLP collector on {receiver.endpoint}, spans -> {path}", flush=True)
    reporter = asyncio.create_task(_report(receiver, stats_path(path), stop), name="collector-stats")
    try:
        await stop.wait()
    finally:
        await receiver.stop()
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        write_stats(stats_path(path), receiver.stats())


async def _report(receiver: OtlpReceiver, path: Path, stop: asyncio.Event) -> None:
    """Keep the stats file current; warn (rate-limited) when spans were dropped or cut."""
    written: dict[str, Any] | None = None
    warned: tuple[int, ...] = (0,) * (len(receiver.dropped) + 1)
    warned_at = -WARN_EVERY
    while not stop.is_set():
        stats = receiver.stats()
        if stats != written:
            write_stats(path, stats)
            written = stats
        losses = (*stats["dropped"].values(), stats["truncated"])
        if losses != warned and time.monotonic() - warned_at >= WARN_EVERY:
            log.warning("%s", stats_line(stats), extra={"event": "spans_dropped", "dropped": stats["dropped"],
                                                        "truncated": stats["truncated"],
                                                        "held_bytes": stats["held_bytes"],
                                                        "max_bytes": stats["max_bytes"]})
            warned, warned_at = losses, time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), STATS_EVERY)
