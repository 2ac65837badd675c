"""Endpoint discovery: where the instances of each mesh service are, as versioned snapshots.

Sources (static mesh.yaml, DNS A/AAAA/SRV, Consul health watches) publish into a SnapshotStore;
MeshClient reads or watches the store and swaps its balancer's endpoints. `consul_register` is the
other direction: a service announcing itself to its Consul agent. See docs/discovery.md.

Importing this package loads only its names: each module is imported on first use of one of them, so
that a MeshClient reading a SnapshotStore loads neither the Consul client (requests) nor dnspython.
"""

from typing import TYPE_CHECKING

from aivo_mesh._lazy import lazy_getattr

if TYPE_CHECKING:
    from aivo_mesh.discovery.consul import ConsulDiscovery, ConsulError, endpoints_from_health, next_index
    from aivo_mesh.discovery.consul_register import ConsulRegistration, agent_service_definition, service_id
    from aivo_mesh.discovery.dns import DnsSource, DnsTarget, refresh_delay
    from aivo_mesh.discovery.facade import (
        MODES,
        Discovery,
        DiscoveryMode,
        DiscoveryNotReady,
        DnsOptions,
        Source,
        build_discovery,
    )
    from aivo_mesh.discovery.snapshot import Endpoint, Snapshot, SnapshotStore
    from aivo_mesh.discovery.static import StaticSource, static_endpoints

# name -> the module (of this package) that defines it, imported on first use
_LAZY = {
    **dict.fromkeys(("ConsulDiscovery", "ConsulError", "endpoints_from_health", "next_index"), "consul"),
    **dict.fromkeys(("ConsulRegistration", "agent_service_definition", "service_id"), "consul_register"),
    **dict.fromkeys(("DnsSource", "DnsTarget", "refresh_delay"), "dns"),
    **dict.fromkeys(("MODES", "Discovery", "DiscoveryMode", "DiscoveryNotReady", "DnsOptions", "Source",
                     "build_discovery"), "facade"),
    **dict.fromkeys(("Endpoint", "Snapshot", "SnapshotStore"), "snapshot"),
    **dict.fromkeys(("StaticSource", "static_endpoints"), "static"),
}
__getattr__ = lazy_getattr(__name__, _LAZY, globals())

__all__ = [
    "MODES",
    "ConsulDiscovery",
    "ConsulError",
    "ConsulRegistration",
    "Discovery",
    "DiscoveryMode",
    "DiscoveryNotReady",
    "DnsOptions",
    "DnsSource",
    "DnsTarget",
    "Endpoint",
    "Snapshot",
    "SnapshotStore",
    "Source",
    "StaticSource",
    "agent_service_definition",
    "build_discovery",
    "endpoints_from_health",
    "next_index",
    "refresh_delay",
    "service_id",
    "static_endpoints",
]
