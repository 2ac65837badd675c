"""Everything one mesh process reports, assembled from mesh.yaml's `observability` in one place.

    telemetry = ProcessTelemetry.for_service(mesh, "learner-svc")
    client = MeshClient(config, listeners=telemetry.listeners(), outer_layers=telemetry.client_layers())
    server = MeshServer(..., observers=telemetry.observers())
Tracing is absent (no layer, no observer, no cost) unless `observability.tracing.enabled`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aivo_mesh.config.model import MeshSpec
from aivo_mesh.policy.core import Layer
from aivo_mesh.policy.events import PolicyListener, ServerCallObserver
from aivo_mesh.telemetry.logs import RpcLogListener, RpcLogObserver
from aivo_mesh.telemetry.metrics import MeshMetrics, MetricsListener, ServerMetricsObserver
from aivo_mesh.telemetry.statsd import StatsdClient, StatsdListener, StatsdServerObserver
from aivo_mesh.telemetry.tracing import Tracing


@dataclass
class ProcessTelemetry:
    service: str
    metrics: MeshMetrics = field(default_factory=MeshMetrics)
    tracing: Tracing | None = None
    statsd: StatsdClient | None = None
    rpc_logs: bool = True

    @classmethod
    def for_service(cls, mesh: MeshSpec, service: str, *, rpc_logs: bool = True,
                    otel_service_name: str | None = None) -> ProcessTelemetry:
        """`otel_service_name` (OTEL_SERVICE_NAME, config/env.py) names the process in its spans."""
        obs = mesh.observability
        try:
            version = mesh.service(service).version
        except KeyError:  # a non-service identity such as mesh-client
            version = ""
        return cls(service=service,
                   tracing=Tracing.from_spec(obs.tracing, service, version, resource_name=otel_service_name),
                   statsd=StatsdClient.from_spec(obs.statsd), rpc_logs=rpc_logs)

    def listeners(self) -> list[PolicyListener]:
        out: list[PolicyListener] = [MetricsListener(self.metrics)]
        if self.rpc_logs:
            out.append(RpcLogListener())
        if self.statsd is not None:
            out.append(StatsdListener(self.statsd))
        return out

    def client_layers(self) -> list[Layer]:
        return [self.tracing.client_layer()] if self.tracing is not None else []

    def observers(self) -> list[ServerCallObserver]:
        # Tracing first: its span is current while the others record (trace ids in log lines).
        out: list[ServerCallObserver] = []
        if self.tracing is not None:
            out.append(self.tracing.server_observer())
        out.append(ServerMetricsObserver(self.metrics))
        if self.rpc_logs:
            out.append(RpcLogObserver())
        if self.statsd is not None:
            out.append(StatsdServerObserver(self.statsd))
        return out

    async def close(self) -> None:
        if self.tracing is not None:
            await self.tracing.aclose()
        if self.statsd is not None:
            self.statsd.close()
