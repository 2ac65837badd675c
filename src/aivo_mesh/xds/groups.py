"""Node groups: which snapshot a node gets. Kept free of protobuf imports, so that `meshctl status` can
name a node's group without loading Envoy's messages."""

from __future__ import annotations

PLANE_KEY = "aivo.plane"  # node.metadata: which plane a node is on ("sidecar" is the default)
PROXYLESS = "proxyless"


def group_name(service: str) -> str:
    """The node group of `service`'s gRPC processes (the sidecar's group is the service's name)."""
    return f"{service}/{PROXYLESS}"


def node_group(service: str, plane: str) -> str:
    """The node group a service's node on `plane` belongs to (its sidecar's, or its proxyless processes')."""
    return group_name(service) if plane == PROXYLESS else service


def is_proxyless_group(group: str) -> bool:
    return group.endswith(f"/{PROXYLESS}")
