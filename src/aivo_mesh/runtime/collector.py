"""The local runtime's trace collector: an OTLP/gRPC receiver that keeps spans on disk.

Services and Envoys export to it on 127.0.0.1; it appends every span as one JSON line to
`<state>/traces.jsonl` (rotated at `max_bytes`, keeping one previous file) so that
`meshctl traces` can read recent traces from another process, and forwards to Jaeger when asked.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from dataclasses import asdict
from pathlib import Path

from aivo_mesh.telemetry.otlp_receiver import OtlpReceiver, SpanRecord, Trace, group_traces

MAX_BYTES = 20 * 1024 * 1024


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


async def run_collector(host: str, port: int, path: Path, forward_to: str | None = None) -> None:
    log = SpanLog(path)
    receiver = OtlpReceiver(host=host, port=port, forward_to=forward_to, sink=log.append)
    await receiver.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"OTLP collector on {receiver.endpoint}, spans -> {path}", flush=True)
    try:
        await stop.wait()
    finally:
        await receiver.stop()
