"""The buckets of the call-latency histogram (grpc_request_duration_seconds).

Shared by what records it (telemetry/metrics.py) and what reads it (the alert thresholds of
render/prometheus.py); a module of its own so that the renderer loads no metrics library.
"""

from __future__ import annotations

# OpenTelemetry's advisory buckets for rpc.{client,server}.call.duration (seconds).
DURATION_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                                       7.5, 10.0)
