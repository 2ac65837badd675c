"""mesh.yaml -> Consul agent configuration files (`infra/mesh/consul/`), loaded from the agent's
config directory (`/consul/config` in the Compose file):

    <svc>.json    {"service": <agent service definition>} for the service's pod/container
    agent.json    the agent's TLS settings, so its gRPC health checks present the mesh-client
                  certificate and verify the service under its own name

The service definition is `agent_service_definition` verbatim (the same JSON a service sends to
`PUT /v1/agent/service/register` when it registers itself), wrapped in `{"service": ...}` as agent
config files expect it (notes/linkerd-consul.md §5). In the pod profile every service is reached on
its host name (the Compose service / pod name) at the Envoy inbound port 50051, so:

    "Address": "auth-svc", "Port": 50051,
    "Check": {"GRPC": "auth-svc:50051/aivo.auth.v1.AuthService", "GRPCUseTLS": true,
              "TLSServerName": "auth-svc", "Interval": "30s", "Timeout": "5s",
              "DeregisterCriticalServiceAfter": "1m", ...}

Pure and deterministic: no I/O.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aivo_mesh.config.model import MeshSpec, ServiceSpec
from aivo_mesh.config.ports import POD_INBOUND_PORT
from aivo_mesh.discovery.consul_register import agent_service_definition
from aivo_mesh.pki.layout import CertLayout
from aivo_mesh.render import Document

CERTS = CertLayout(Path("/consul/certs"))  # the mesh PKI, mounted read-only into the Consul container
DEREGISTER_AFTER = "1m"


def service_definition(mesh: MeshSpec, svc: ServiceSpec, *, address: str | None = None,
                       port: int = POD_INBOUND_PORT) -> dict[str, Any]:
    """`{"service": ...}` for one instance; address defaults to the service's pod/Compose host name, port
    to where mTLS callers (and Consul's check) reach it there: its sidecar's inbound listener."""
    return {"service": agent_service_definition(mesh, svc, address or svc.name, port,
                                                deregister_critical_after=DEREGISTER_AFTER)}


def agent_config(mesh: MeshSpec) -> dict[str, Any]:
    """TLS material the agent uses for outgoing gRPC checks (GRPCUseTLS). The services require a
    client certificate, so the agent presents the mesh-client identity."""
    cert, key = CERTS.identity_paths("mesh-client")
    return {
        "tls": {
            "defaults": {
                "ca_file": CERTS.ca_cert.as_posix(),
                "cert_file": cert.as_posix(),
                "key_file": key.as_posix(),
                "tls_min_version": "TLSv1_3",
            },
        },
        "node_meta": {"mesh": mesh.mesh.name},
    }


def render(mesh: MeshSpec) -> dict[str, Document]:
    files: dict[str, Document] = {"agent.json": agent_config(mesh)}
    for svc in mesh.services:
        files[f"{svc.name}.json"] = service_definition(mesh, svc)
    return files
