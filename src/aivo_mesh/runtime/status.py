"""A local mesh's services read from health checks and admin endpoints (`meshctl check`'s health rows;
Envoy's and the control plane's documents read for the observer, runtime/observer.py, too).

    health     grpc.health.v1 through the service's front door (Envoy inbound or MeshServer)
    sidecar    Envoy /ready (sidecar plane)
    upstreams  healthy/total endpoints per upstream, from Envoy /clusters?format=json (sidecar) or
               the aivo-mesh admin /clusters (proxyless), with ejected endpoints named
    breakers   the app's circuit breakers per upstream (aivo-mesh admin /circuit_breakers)
    envoy_breakers  (sidecar plane) the sidecar's circuit_breakers thresholds per peer cluster: "open
               (max_requests, ...)" while Envoy is refusing calls over a threshold, else "closed"
    xds        (a mesh with a control plane) the sidecar's configuration: "synced <version>" once it ACKed
               the control plane's current snapshot of every type, "NACK <type>: <Envoy's error>",
               "syncing", or "disconnected" (from the control plane's admin /xds/status and /xds/config)
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from aivo_mesh.render.envoy import HELPER_CLUSTERS
from aivo_mesh.runtime.mesh import RuntimeInfo, ServiceEndpoints, restarts_file
from aivo_mesh.runtime.state import StateDir, pid_alive
from aivo_mesh.xds.groups import is_proxyless_group, node_group


@dataclass
class ServiceStatus:
    service: str
    process: str = "-"
    health: str = "-"
    sidecar: str = "-"
    upstreams: dict[str, str] = field(default_factory=dict)
    breakers: dict[str, str] = field(default_factory=dict)
    envoy_breakers: dict[str, str] = field(default_factory=dict)
    restarts: int = 0
    xds: str = "-"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


# envoy.admin.v3.HostHealthStatus fields -> the flag Envoy's text `/clusters` prints for them, in
# Envoy's order (source/common/upstream/host_utility.cc), so rows read as they always did.
_HEALTH_FLAGS = (
    ("failed_active_health_check", "failed_active_hc"),
    ("failed_outlier_check", "failed_outlier_check"),
    ("failed_active_degraded_check", "degraded_active_hc"),
    ("pending_dynamic_removal", "pending_dynamic_removal"),
    ("pending_active_hc", "pending_active_hc"),
    ("excluded_via_immediate_hc_fail", "excluded_via_immediate_hc_fail"),
    ("active_hc_timeout", "active_hc_timeout"),
)
_EDS_FLAGS = {"UNHEALTHY": "failed_eds_health", "DEGRADED": "degraded_eds_health",
              "DRAINING": "eds_status_draining", "TIMEOUT": "eds_status_timeout"}


def _host_address(address: Any) -> str:
    """`127.0.0.1:50051`, `[::1]:50051` or a pipe's path, as Envoy's text `/clusters` writes it."""
    if not isinstance(address, dict):
        return "?"
    sock = address.get("socket_address")
    if isinstance(sock, dict):
        host = str(sock.get("address", ""))
        return f"[{host}]:{sock.get('port_value', 0)}" if ":" in host else f"{host}:{sock.get('port_value', 0)}"
    pipe = address.get("pipe")
    if isinstance(pipe, dict):
        return str(pipe.get("path", "?"))
    return "?"


def _health_flags(status: Any) -> str:
    """"healthy", or the failing flags as `/failed_active_hc/failed_outlier_check`."""
    if not isinstance(status, dict):
        return "healthy"
    flags = [text for field, text in _HEALTH_FLAGS if status.get(field) is True]
    if (eds := _EDS_FLAGS.get(str(status.get("eds_health_status")))) is not None:
        flags.append(eds)
    return "".join(f"/{f}" for f in flags) or "healthy"


def peer_hosts(clusters: Any) -> dict[str, dict[str, str]]:
    """Per peer cluster in Envoy's `/clusters?format=json` (parsed): each host's health flags
    ("healthy", "/failed_outlier_check", ...). The renderer's helper clusters are left out by name, so
    a peer called e.g. `localizer-svc` is kept. Raises ValueError when it is not that document."""
    if not isinstance(clusters, dict) or not isinstance(clusters.get("cluster_statuses", []), list):
        raise ValueError("expected Envoy's /clusters?format=json document")
    hosts: dict[str, dict[str, str]] = {}
    for cluster in clusters.get("cluster_statuses", []):
        name = str(cluster.get("name", "")) if isinstance(cluster, dict) else ""
        if not name or name in HELPER_CLUSTERS:
            continue
        flags = hosts.setdefault(name, {})
        for host in cluster.get("host_statuses", []) or []:
            if isinstance(host, dict):
                flags[_host_address(host.get("address"))] = _health_flags(host.get("health_status"))
    return dict(sorted(hosts.items()))


def envoy_hosts(admin: str) -> dict[str, dict[str, str]]:
    """`peer_hosts` of the sidecar whose admin endpoint is `admin` (OSError or ValueError when it
    cannot be read)."""
    return peer_hosts(json.loads(_get(f"http://{admin}/clusters?format=json")))


def envoy_upstreams(admin: str) -> dict[str, str]:
    """Per cluster: healthy/total hosts, naming hosts that are ejected or failing health checks."""
    out = {}
    for cluster, flags in envoy_hosts(admin).items():
        bad = {h: f for h, f in flags.items() if f != "healthy"}
        summary = f"{len(flags) - len(bad)}/{len(flags)} healthy"
        if bad:
            summary += " (" + ", ".join(f"{h} {f}" for h, f in sorted(bad.items())) + ")"
        out[cluster] = summary
    return out


# Envoy's gauges of a cluster's circuit_breakers thresholds: 1 while that threshold is reached and
# Envoy answers the overflow locally (`upstream_rq_pending_overflow`, 503 "overflow").
_BREAKER_GAUGES = {"rq_open": "max_requests", "rq_pending_open": "max_pending_requests",
                   "rq_retry_open": "max_retries", "cx_open": "max_connections"}
_BREAKER_STAT = re.compile(r"^cluster\.(.+)\.circuit_breakers\.default\.(\w+): (\d+)$")


def peer_breakers(stats_text: str) -> dict[str, str]:
    """Per peer cluster in Envoy's `/stats` text: "closed", or "open (<thresholds reached>)"."""
    reached: dict[str, list[str]] = {}
    for line in stats_text.splitlines():
        m = _BREAKER_STAT.match(line.strip())
        if not m or m.group(1) in HELPER_CLUSTERS or m.group(2) not in _BREAKER_GAUGES:
            continue
        names = reached.setdefault(m.group(1), [])
        if m.group(3) != "0":
            names.append(_BREAKER_GAUGES[m.group(2)])
    return {c: f"open ({', '.join(sorted(n))})" if n else "closed" for c, n in sorted(reached.items())}


def envoy_breakers(admin: str) -> dict[str, str]:
    """`peer_breakers` of the sidecar whose admin endpoint is `admin`."""
    return peer_breakers(_get(f"http://{admin}/stats?filter=circuit_breakers%5C.default%5C."))


def envoy_ready(admin: str) -> bool:
    """The sidecar's Envoy answers its admin /ready with 200 (LIVE)."""
    try:
        with urllib.request.urlopen(f"http://{admin}/ready", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def peers_healthy(admin: str) -> bool:
    """Every host of every peer cluster of this sidecar is healthy. Panic routing is off (docs/envoy.md),
    so until a peer's only host passes its first health check, calls to it fail fast: readiness waits."""
    try:
        return all(f == "healthy" for flags in envoy_hosts(admin).values() for f in flags.values())
    except (OSError, ValueError):
        return False


def mesh_upstreams(admin: str) -> tuple[dict[str, str], dict[str, str]]:
    breakers = {n: str(b.get("state")) for n, b in
                json.loads(_get(f"http://{admin}/circuit_breakers"))["circuit_breakers"].items()}
    upstreams = {}
    for c in json.loads(_get(f"http://{admin}/clusters"))["clusters"]:
        eps = c.get("endpoints", [])
        ok = [e for e in eps if e.get("healthy") and not e.get("ejected")]
        summary = f"{len(ok)}/{len(eps)} healthy"
        ejected = [str(e["endpoint"]) for e in eps if e.get("ejected")]
        if ejected:
            summary += f" (ejected: {', '.join(ejected)})"
        upstreams[str(c.get("service"))] = summary
    return breakers, upstreams


def xds_sync(status: Any, config: Any) -> dict[str, str]:
    """Per node group (service): where its sidecar stands against the control plane's current snapshot,
    from the control plane's /xds/status and /xds/config documents (parsed)."""
    out: dict[str, str] = {}
    for node in status.get("nodes", []):
        group = str(node.get("group"))
        want: dict[str, str] = dict(config.get(group, {}))
        version = want.pop("version", "?")
        if not node.get("connected"):
            out[group] = "disconnected"
            continue
        verdict = f"synced {version[:8]}"
        for type_, ts in sorted(node.get("types", {}).items()):
            target = want.get(type_)
            if target is None or ts.get("acked") == target:
                continue
            nack = ts.get("nack")
            if nack and nack.get("version") == target:
                verdict = f"NACK {type_}: {nack.get('error', '')}"
                break
            verdict = "syncing"
        # A later stream of the same node (a restart) replaces what an old one said.
        if out.get(group) in (None, "disconnected"):
            out[group] = verdict
    return out


# Envoy's config_dump sections per kind: (dump type, [(section, source, state)], how an entry names its resource)
_DUMP: dict[str, tuple[str, tuple[tuple[str, str, str], ...]]] = {
    "listeners": ("ListenersConfigDump", (("static_listeners", "static", "active"),
                                          ("dynamic_listeners", "dynamic", ""))),
    "routes": ("RoutesConfigDump", (("static_route_configs", "static", "active"),
                                    ("dynamic_route_configs", "dynamic", "active"))),
    "clusters": ("ClustersConfigDump", (("static_clusters", "static", "active"),
                                        ("dynamic_active_clusters", "dynamic", "active"),
                                        ("dynamic_warming_clusters", "dynamic", "warming"))),
    "endpoints": ("EndpointsConfigDump", (("static_endpoint_configs", "static", "active"),
                                          ("dynamic_endpoint_configs", "dynamic", "active"))),
    "secrets": ("SecretsConfigDump", (("static_secrets", "static", "active"),
                                      ("dynamic_active_secrets", "dynamic", "active"),
                                      ("dynamic_warming_secrets", "dynamic", "warming"))),
}


def config_entries(dump: Any, kinds: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """Per kind, each resource of an Envoy `/config_dump?include_eds` document (parsed): name, source
    (static, dynamic), state (active, warming, error), version, last_updated and the resource itself,
    with any private key dropped. ValueError when it is not such a document."""
    if not isinstance(dump, dict) or not isinstance(dump.get("configs"), list):
        raise ValueError("expected Envoy's /config_dump document")
    by_type = {str(c.get("@type", "")).rsplit(".", 1)[-1]: c for c in dump["configs"] if isinstance(c, dict)}
    out: dict[str, list[dict[str, Any]]] = {}
    for kind in kinds:
        dump_type, sections = _DUMP[kind]
        cfg = by_type.get(dump_type, {})
        items = []
        for section, source, state in sections:
            for entry in cfg.get(section, []) or []:
                items.append(_entry(entry, source, state))
        out[kind] = sorted(items, key=lambda i: (i["source"], i["name"]))
    return out


def _entry(entry: dict[str, Any], source: str, state: str) -> dict[str, Any]:
    if not state:  # a dynamic listener: active, warming or refused, by which state it carries
        states = (("active_state", "active"), ("warming_state", "warming"), ("error_state", "error"))
        held: tuple[str, dict[str, Any]] = next(((s, entry[k]) for k, s in states if k in entry), ("active", {}))
        state, entry = held[0], {**held[1], "name": entry.get("name", "")}
    kinds = ("listener", "route_config", "cluster", "endpoint_config", "secret")
    resource: dict[str, Any] = next((entry[k] for k in kinds if k in entry), {})
    name = entry.get("name") or resource.get("name") or resource.get("cluster_name") or "?"
    return {"name": str(name), "source": source, "state": state, "version": str(entry.get("version_info", "")),
            "last_updated": str(entry.get("last_updated", "")), "resource": _without_keys(resource)}


def _without_keys(value: Any) -> Any:
    """`value` without any `private_key` field (Envoy redacts them already; nothing here relies on it)."""
    if isinstance(value, dict):
        return {k: _without_keys(v) for k, v in value.items() if k != "private_key"}
    if isinstance(value, list):
        return [_without_keys(v) for v in value]
    return value


def node_config(admin: str, kinds: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """`config_entries` of the node whose admin endpoint is `admin`: a sidecar's Envoy, or a proxyless
    service on the control plane (its admin endpoint answers `/config_dump` in Envoy's shape)."""
    return config_entries(json.loads(_get(f"http://{admin}/config_dump?include_eds", timeout=5)), kinds)


def control_plane_view(admin: str, plane: str = "sidecar") -> tuple[dict[str, str], dict[str, Any]]:
    """(`xds_sync` per node group, a summary of the control plane) from its admin endpoint. `synced`
    counts the groups of the mesh's own plane (on the sidecar plane, a group of gRPC's own clients,
    `<service>/proxyless`, is not one of its nodes)."""
    status = json.loads(_get(f"http://{admin}/xds/status"))
    sync = xds_sync(status, json.loads(_get(f"http://{admin}/xds/config")))
    proxyless = plane == "proxyless"
    return sync, {"admin": admin, "build_seconds": status.get("build_seconds"), "built_at": status.get("built_at"),
                  "nodes": len(status.get("nodes", [])),
                  "synced": sum(1 for g, v in sync.items()
                                if is_proxyless_group(g) == proxyless and v.startswith("synced"))}


async def gather(state: StateDir) -> list[ServiceStatus]:
    from aivo_mesh.client import MeshClient, MeshConfig
    from aivo_mesh.config.loader import load_mesh
    from aivo_mesh.runtime.health import check
    from aivo_mesh.runtime.mesh import mesh_for_clients

    info = RuntimeInfo.read(state)
    if info is None:
        return []
    view = mesh_for_clients(load_mesh(state.mesh_file), info)
    records = {r.name: r for r in state.read_processes()}
    try:
        restarts: dict[str, int] = json.loads(restarts_file(state).read_text())
    except (FileNotFoundError, ValueError):
        restarts = {}
    rows = {name: ServiceStatus(service=name) for name in info.services}
    async with MeshClient(MeshConfig.for_identity("mesh-client", state.certs, view), health_checks=False,
                          reload_interval=None) as client:
        for name, ep in info.services.items():
            row = rows[name]
            rec = records.get(name)
            row.process = "running" if rec and pid_alive(rec.pid) else "down"
            row.restarts = restarts.get(name, 0) + restarts.get(f"{name}-envoy", 0)
            row.health = await check(client, name, timeout=1.0)
            await asyncio.to_thread(_admin_views, row, ep)
    if info.control_plane:
        try:
            sync, _ = await asyncio.to_thread(control_plane_view, info.control_plane["admin"], info.plane)
        except (OSError, ValueError):
            sync = {node_group(name, info.plane): "control plane unreachable" for name in rows}
        for name, row in rows.items():
            row.xds = sync.get(node_group(name, info.plane), "never connected")
    return list(rows.values())


def _admin_views(row: ServiceStatus, ep: ServiceEndpoints) -> None:
    if ep.sidecar_admin:
        try:
            row.sidecar = _get(f"http://{ep.sidecar_admin}/ready").strip() or "?"
            row.upstreams = envoy_upstreams(ep.sidecar_admin)
            row.envoy_breakers = envoy_breakers(ep.sidecar_admin)
        except (OSError, ValueError):
            row.sidecar = "unreachable"
    if ep.admin:
        try:
            breakers, upstreams = mesh_upstreams(ep.admin)
        except (OSError, ValueError, KeyError):
            return
        row.breakers = breakers
        if not ep.sidecar_admin:
            row.upstreams = upstreams
