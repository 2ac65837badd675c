"""Telemetry of a mesh process: Prometheus metrics, JSON logs, StatsD and the admin endpoint.

    metrics   MeshMetrics (own registry), MetricsListener (client), ServerMetricsObserver (server)
    logs      JsonFormatter, configure_logging, RpcLogListener, RpcLogObserver, redaction helpers
    statsd    StatsdClient.from_spec, StatsdListener, StatsdServerObserver
    admin     AdminServer (loopback HTTP, Envoy-shaped endpoints) fed by an AdminSource
    tracing   OpenTelemetry (its own module; import `aivo_mesh.telemetry.tracing` directly)

Listeners plug into the policy stack (`policy.events.PolicyListener`), observers into MeshServer
(`observers=`). docs/telemetry.md lists every metric, log field, StatsD name and endpoint.
"""

from aivo_mesh.telemetry.admin import PROMETHEUS_CONTENT_TYPE, AdminServer, AdminSource, is_loopback
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
from aivo_mesh.telemetry.metrics import (
    BREAKER_STATES,
    DURATION_BUCKETS,
    MeshMetrics,
    MetricsListener,
    ServerMetricsObserver,
    local_status,
    method_label,
)
from aivo_mesh.telemetry.statsd import StatsdClient, StatsdListener, StatsdServerObserver

__all__ = [
    "BREAKER_STATES",
    "DURATION_BUCKETS",
    "PROMETHEUS_CONTENT_TYPE",
    "REDACTED",
    "AdminServer",
    "AdminSource",
    "JsonFormatter",
    "MeshMetrics",
    "MetricsListener",
    "RpcLogListener",
    "RpcLogObserver",
    "ServerMetricsObserver",
    "StatsdClient",
    "StatsdListener",
    "StatsdServerObserver",
    "configure_logging",
    "current_trace_ids",
    "is_loopback",
    "is_sensitive_key",
    "local_status",
    "method_label",
    "redact",
    "redact_metadata",
    "scrub_text",
]
