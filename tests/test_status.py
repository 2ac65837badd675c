"""`meshctl status`'s readers: Envoy's /clusters?format=json and a service's Prometheus /metrics."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from binaries import needs
from helpers import start_envoy
from waiting import until

from aivo_mesh.runtime.local import free_ports
from aivo_mesh.runtime.status import envoy_hosts, peer_hosts


def _host(address: dict[str, Any], **health: Any) -> dict[str, Any]:
    return {"address": address, "stats": [{"name": "cx_total"}], "health_status": health, "weight": 1}


def _sock(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


# Shaped as Envoy 1.40 answers /clusters?format=json (snake_case, false booleans left out).
CLUSTERS = {"cluster_statuses": [
    {"name": "local_app", "host_statuses": [_host({"pipe": {"path": "/run/app.sock"}}, eds_health_status="HEALTHY")]},
    {"name": "auth-svc", "host_statuses": [
        _host(_sock("10.0.0.5", 50051), eds_health_status="HEALTHY"),
        _host(_sock("10.0.0.6", 50051), failed_outlier_check=True, eds_health_status="HEALTHY"),
        _host(_sock("::1", 50051), failed_active_health_check=True, failed_outlier_check=True,
              eds_health_status="HEALTHY"),
    ]},
    {"name": "events-svc", "host_statuses": [_host(_sock("10.0.0.7", 50053), eds_health_status="UNHEALTHY")]},
    {"name": "empty-svc"},
]}


def test_peer_hosts_reads_the_json_document_with_envoys_text_flags() -> None:
    assert peer_hosts(CLUSTERS) == {
        "auth-svc": {"10.0.0.5:50051": "healthy", "10.0.0.6:50051": "/failed_outlier_check",
                     "[::1]:50051": "/failed_active_hc/failed_outlier_check"},
        "empty-svc": {},
        "events-svc": {"10.0.0.7:50053": "/failed_eds_health"},
    }  # local_app is the renderer's helper cluster, not a peer


@pytest.mark.parametrize("document", [[], {"cluster_statuses": "x"}, "auth-svc::10.0.0.5:50051::health_flags::healthy"])
def test_peer_hosts_refuses_what_is_not_the_json_document(document: Any) -> None:
    with pytest.raises(ValueError, match="format=json"):
        peer_hosts(document)


def _text_flags(admin: str) -> dict[str, dict[str, str]]:
    """Envoy's own text rendering of the same hosts, to compare with."""
    with urllib.request.urlopen(f"http://{admin}/clusters", timeout=5) as r:
        text = r.read().decode()
    hosts: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[2] == "health_flags" and parts[0] != "local_app":
            hosts.setdefault(parts[0], {})[parts[1]] = parts[3]
    return hosts


@needs("envoy")
async def test_envoy_hosts_agrees_with_envoys_text_clusters(tmp_path: Path) -> None:
    admin_port, dead1, dead2 = free_ports(3)
    config = tmp_path / "envoy.yaml"
    config.write_text(f"""
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}}}
static_resources:
  clusters:
  - name: auth-svc
    connect_timeout: 0.25s
    type: STATIC
    load_assignment:
      cluster_name: auth-svc
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {dead1}}}}}}}
        - endpoint: {{address: {{socket_address: {{address: "::1", port_value: {dead2}}}}}}}
    health_checks: [{{timeout: 0.2s, interval: 0.2s, unhealthy_threshold: 1, healthy_threshold: 1,
                      tcp_health_check: {{}}}}]
  - name: learner-svc
    connect_timeout: 0.25s
    type: STATIC
    load_assignment:
      cluster_name: learner-svc
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}}}
  - name: local_app
    connect_timeout: 0.25s
    type: STATIC
    load_assignment:
      cluster_name: local_app
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{pipe: {{path: {tmp_path}/app.sock}}}}}}
""")
    proc = start_envoy(config)
    admin = f"127.0.0.1:{admin_port}"
    try:
        def checked() -> bool:
            try:
                return set(envoy_hosts(admin).get("auth-svc", {}).values()) == {"/failed_active_hc"}
            except OSError:
                return False

        await until(checked, 15, "both auth-svc hosts fail their health check")
        hosts = await asyncio.to_thread(envoy_hosts, admin)
        assert hosts == {"auth-svc": {f"127.0.0.1:{dead1}": "/failed_active_hc", f"[::1]:{dead2}": "/failed_active_hc"},
                         "learner-svc": {f"127.0.0.1:{admin_port}": "healthy"}}
        # Envoy's text agrees, except that it separates fields with "::", which an IPv6 host contains:
        # splitting it (what status did before) loses every [::1] host.
        text = await asyncio.to_thread(_text_flags, admin)
        assert text == {"auth-svc": {f"127.0.0.1:{dead1}": "/failed_active_hc"},
                        "learner-svc": {f"127.0.0.1:{admin_port}": "healthy"}}
    finally:
        proc.terminate()
        proc.wait(10)


