"""mesh.yaml -> `infra/mesh/docker-compose.yaml` (and the `Dockerfile` of the service image).

The sidecar model, one "pod" per service:

    <svc>          the app (image aivo-mesh:latest): `meshctl serve <svc> --insecure --port <local_port>`,
                   plaintext on 127.0.0.1:<local_port>; owns the pod's network namespace and so
                   publishes the pod's ports
    <svc>-envoy    its Envoy sidecar (network_mode service:<svc>): mTLS inbound on 0.0.0.0:50051 ->
                   127.0.0.1:<local_port>, outbound 127.0.0.1:15001, admin 127.0.0.1:9901, Prometheus
                   listener 0.0.0.0:15090; bootstrap ./envoy/<svc>/envoy.yaml, SDS ./envoy/<svc>/sds,
                   certificates ../../certs (the `meshctl certs` layout), all read-only

Sharing the namespace is what makes the app's 127.0.0.1 the sidecar's. Then consul (agent -dev,
service definitions from ./consul), jaeger (all-in-one, OTLP on 4317, UI on 16686), prometheus
(./prometheus) and grafana (./grafana), all on the network `mesh-network`.

The app calls its peers through the sidecar (`--sidecar-outbound 127.0.0.1:15001`, plaintext h2 on
the pod's loopback, or mTLS with the app's own certificate where mesh.yaml sets `sidecar.outbound_tls`);
the sidecar dials `<peer>:50051` over mTLS.

Published ports (host side, per pod): the mTLS port as the service's mesh port from mesh.yaml
(auth-svc 50051, learner-svc 50052, ...); the sidecar admin port from mesh.yaml (9901, 9902, ...)
-> the sidecar's read-only `GET /stats/prometheus` listener (15090), because Envoy's admin API stays
on the pod's loopback (reach it with `docker compose exec <svc> python -c ...`, the pods share a
network namespace); and the aivo-mesh admin endpoint (9101, ...). Admin and stats ports are
published on 127.0.0.1 only.

Pure and deterministic: no I/O. Paths are relative to infra/mesh/, where the file lives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aivo_mesh.config.model import MeshSpec, ServiceSpec
from aivo_mesh.config.ports import POD_ADMIN_PORT, POD_INBOUND_PORT, POD_OUTBOUND_PORT, POD_STATS_PORT
from aivo_mesh.pki.layout import IMAGE_CERTS_DIR, CertLayout
from aivo_mesh.render import HEADER, Document
from aivo_mesh.render.envoy import POD_CERT_DIR, POD_SDS_DIR

IMAGE = "aivo-mesh:latest"
ENVOY_IMAGE = "envoyproxy/envoy:v1.40-latest"
CONSUL_IMAGE = "hashicorp/consul:1.22"
JAEGER_IMAGE = "jaegertracing/all-in-one:1.62.0"
PROMETHEUS_IMAGE = "prom/prometheus:v3.5.0"
GRAFANA_IMAGE = "grafana/grafana:11.6.0"
NETWORK = "mesh-network"
CERTS = "../../certs"  # the repository's certs/ (meshctl certs init/issue --certs-dir certs)
APP_CERTS = CertLayout(Path(IMAGE_CERTS_DIR))

DOCKERFILE = f"""\
# {HEADER}
# The aivo-mesh service image (aivo-mesh:latest): every mesh service runs `meshctl serve <svc>`.
# Build from the repository root:  docker build -f infra/mesh/Dockerfile -t aivo-mesh:latest .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \\
    PIP_NO_CACHE_DIR=1 \\
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . && mkdir -p /var/lib/aivo-mesh
COPY mesh.yaml ./mesh.yaml
# Runs as root inside the container: the certificates are bind-mounted from the host with their
# keys 0600 (the PKI loader refuses group/other-readable keys), owned by whoever issued them.

ENV AIVO_MESH_CONFIG=/app/mesh.yaml
ENTRYPOINT ["meshctl"]
CMD ["--help"]
"""


def _app_env(mesh: MeshSpec, svc: ServiceSpec) -> dict[str, str]:
    cert, key = APP_CERTS.service_paths(svc.name)
    return {
        "SERVICE_NAME": svc.name,
        "SERVICE_VERSION": svc.version,
        "GRPC_PORT": str(POD_INBOUND_PORT),
        "LOCAL_SERVICE_PORT": str(svc.local_port),
        "CA_CERT_PATH": APP_CERTS.ca_cert.as_posix(),
        "CLIENT_CERT_PATH": cert.as_posix(),
        "CLIENT_KEY_PATH": key.as_posix(),
        "JAEGER_HOST": "jaeger",
        # Prometheus scrapes <svc>:<admin_port>: the admin endpoint must listen beyond loopback.
        "METRICS_HOST": "0.0.0.0",
    }


def _app_healthcheck(svc: ServiceSpec) -> dict[str, Any]:
    if svc.admin_port is not None:
        probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{svc.admin_port}/ready', timeout=3)"
    else:
        probe = ("import grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; "
                 f"s = g.HealthStub(grpc.insecure_channel('127.0.0.1:{svc.local_port}')); "
                 f"assert s.Check(h.HealthCheckRequest(service='{svc.grpc_service}'), timeout=3).status == 1")
    return {"test": ["CMD", "python", "-c", probe], "interval": "10s", "timeout": "5s", "retries": 5,
            "start_period": "10s"}


def app_service(mesh: MeshSpec, svc: ServiceSpec) -> dict[str, Any]:
    command = ["serve", svc.name, "--insecure", "--port", str(svc.local_port),
               "--sidecar-outbound", f"127.0.0.1:{POD_OUTBOUND_PORT}", "--certs", IMAGE_CERTS_DIR,
               "--data-dir", "/var/lib/aivo-mesh"]
    ports = [f"{svc.port}:{POD_INBOUND_PORT}"]
    if svc.sidecar.admin_port is not None:
        # The Envoy admin API stays on the pod's loopback (unauthenticated, mutating endpoints); the
        # per-service admin port publishes the sidecar's read-only Prometheus listener instead.
        ports.append(f"127.0.0.1:{svc.sidecar.admin_port}:{POD_STATS_PORT}")
    if svc.admin_port is not None:
        command += ["--admin-port", str(svc.admin_port)]
        ports.append(f"127.0.0.1:{svc.admin_port}:{svc.admin_port}")
    return {
        "image": IMAGE,
        "build": {"context": "../..", "dockerfile": "infra/mesh/Dockerfile"},
        "command": command,
        "environment": _app_env(mesh, svc),
        "volumes": [f"{CERTS}:{IMAGE_CERTS_DIR}:ro"],
        "ports": ports,
        "networks": [NETWORK],
        "healthcheck": _app_healthcheck(svc),
        "depends_on": {"consul": {"condition": "service_healthy"}, "jaeger": {"condition": "service_started"}},
        "restart": "unless-stopped",
    }


def sidecar_service(mesh: MeshSpec, svc: ServiceSpec) -> dict[str, Any]:
    ready = (f"exec 3<>/dev/tcp/127.0.0.1/{POD_ADMIN_PORT} && "
             "printf 'GET /ready HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && "
             "grep -q LIVE <&3")
    return {
        "image": ENVOY_IMAGE,
        "network_mode": f"service:{svc.name}",
        "command": ["envoy", "-c", "/etc/envoy/envoy.yaml", "--service-cluster", svc.name,
                    "--service-node", f"{svc.name}-sidecar", "--log-level", "info"],
        "volumes": [f"./envoy/{svc.name}/envoy.yaml:/etc/envoy/envoy.yaml:ro",
                    f"./envoy/{svc.name}/sds:{POD_SDS_DIR}:ro",
                    f"{CERTS}:{POD_CERT_DIR}:ro"],
        "healthcheck": {"test": ["CMD", "bash", "-c", ready], "interval": "10s", "timeout": "5s", "retries": 5},
        "depends_on": {svc.name: {"condition": "service_healthy"}},
        "restart": "unless-stopped",
    }


def compose(mesh: MeshSpec) -> dict[str, Any]:
    services: dict[str, Any] = {
        "consul": {
            "image": CONSUL_IMAGE,
            "command": ["agent", "-dev", "-client=0.0.0.0"],
            # Keeps the entrypoint from chowning the read-only mounts and dropping to the consul user,
            # which could not read the mesh-client key (0600) the gRPC health checks present.
            "environment": {"CONSUL_DISABLE_PERM_MGMT": "true"},
            "volumes": ["./consul:/consul/config:ro", f"{CERTS}:/consul/certs:ro"],
            "ports": ["127.0.0.1:8500:8500", "127.0.0.1:8600:8600/udp"],
            "networks": [NETWORK],
            "healthcheck": {"test": ["CMD", "consul", "members"], "interval": "10s", "timeout": "5s", "retries": 5},
        },
        "jaeger": {
            "image": JAEGER_IMAGE,
            "environment": {"COLLECTOR_OTLP_ENABLED": "true"},
            "ports": ["127.0.0.1:16686:16686", "127.0.0.1:4317:4317"],
            "networks": [NETWORK],
        },
    }
    for svc in mesh.services:
        services[svc.name] = app_service(mesh, svc)
        services[f"{svc.name}-envoy"] = sidecar_service(mesh, svc)
    services["prometheus"] = {
        "image": PROMETHEUS_IMAGE,
        "command": ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus",
                    "--web.enable-lifecycle"],
        "volumes": ["./prometheus:/etc/prometheus:ro"],
        "ports": ["127.0.0.1:9090:9090"],
        "networks": [NETWORK],
        "healthcheck": {"test": ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:9090/-/ready"],
                        "interval": "10s", "timeout": "5s", "retries": 5},
        "depends_on": {s.name: {"condition": "service_started"} for s in mesh.services},
    }
    services["grafana"] = {
        "image": GRAFANA_IMAGE,
        "environment": {"GF_AUTH_ANONYMOUS_ENABLED": "true", "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
                        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH": "/etc/grafana/dashboards/mesh-dashboard.json"},
        "volumes": ["./grafana/provisioning:/etc/grafana/provisioning:ro",
                    "./grafana/dashboards:/etc/grafana/dashboards:ro"],
        "ports": ["127.0.0.1:3000:3000"],
        "networks": [NETWORK],
        "depends_on": {"prometheus": {"condition": "service_healthy"}},
    }
    return {"services": services,
            "networks": {NETWORK: {"name": NETWORK, "driver": "bridge"}}}


def render(mesh: MeshSpec) -> dict[str, Document]:
    return {"docker-compose.yaml": compose(mesh), "Dockerfile": DOCKERFILE}
