"""What a mesh process shows on its admin endpoint: its client targets and its server identity."""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health_pb2

from aivo_mesh.client import MeshClient
from aivo_mesh.server import MeshServer


class MeshAdminSource:
    """AdminSource (telemetry/admin.py) over a MeshClient and, for services, a MeshServer."""

    def __init__(self, client: MeshClient, server: MeshServer | None = None) -> None:
        self.client = client
        self.server = server

    def clusters(self) -> list[dict[str, Any]]:
        return [t.cluster() for _, t in sorted(self.client.targets().items())]

    def circuit_breakers(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, t in sorted(self.client.targets().items()):
            b = t.policy.breaker
            out[name] = {"state": b.state, "gauge": b.gauge, "next_probe_in": b.next_probe_in,
                         **t.policy.snapshot()["retry_budget"]}  # type: ignore[dict-item]
        return out

    def reset_circuit_breaker(self, service: str) -> bool:
        target = self.client.targets().get(service)
        if target is None:
            return False
        target.policy.breaker.reset()
        return True

    def ready(self) -> bool:
        if self.server is None:
            return True
        return self.server.health_status() == int(health_pb2.HealthCheckResponse.SERVING)

    def identity(self) -> dict[str, Any]:
        ident = self.server.credentials.identity if self.server and self.server.credentials else self.client.identity
        return {"spiffe_id": ident.spiffe_id, "dns_names": list(ident.dns_names),
                "not_after": ident.not_after.isoformat(), "seconds_left": round(ident.seconds_left()),
                "serial": f"{ident.serial:x}", "spki_pin": ident.spki_pin}
