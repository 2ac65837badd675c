"""Prometheus metrics of the control plane: what its ADS server did, on the registry its admin serves.

    xds_pushes_total{group,type}              counter: responses sent (a snapshot change, or a new subscription)
    xds_acks_total{group,type}                counter: responses a node accepted
    xds_nacks_total{group,type}               counter: responses a node refused (error_detail)
    xds_connected_streams{group}              gauge: open ADS streams per node group
    xds_refused_streams_total{reason}         counter: streams refused before any resource was sent
                                              (a certificate rule, no_client_certificate, node_id)
    xds_snapshot_build_seconds                histogram: one build of every node group's snapshot
    xds_snapshot_builds_total{outcome}        counter: builds published ("ok") or refused ("invalid")

`group` is the node group (a service name), never a node id or a peer address: bounded by mesh.yaml.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from aivo_mesh.telemetry.metrics import MeshMetrics
from aivo_mesh.xds.cache import type_name
from aivo_mesh.xds.server import XdsEvents

# Builds take milliseconds for a few services and about a second for a thousand.
BUILD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class XdsMetrics(XdsEvents):
    def __init__(self, metrics: MeshMetrics) -> None:
        r = metrics.registry
        self.pushes = Counter("xds_pushes_total", "xDS responses sent, per node group and resource type",
                              ["group", "type"], registry=r)
        self.acks = Counter("xds_acks_total", "xDS responses a node accepted", ["group", "type"], registry=r)
        self.nacks = Counter("xds_nacks_total", "xDS responses a node refused", ["group", "type"], registry=r)
        self.streams = Gauge("xds_connected_streams", "Open ADS streams per node group", ["group"], registry=r)
        self.refusals = Counter("xds_refused_streams_total", "ADS streams refused before any resource was sent",
                                ["reason"], registry=r)
        self.build_seconds = Histogram("xds_snapshot_build_seconds", "One build of every node group's snapshot",
                                       buckets=BUILD_BUCKETS, registry=r)
        self.builds = Counter("xds_snapshot_builds_total", "Snapshot builds, published or refused", ["outcome"],
                              registry=r)
        self._streams: dict[str, tuple[str, int]] = {}  # node id -> (group, open streams)

    def pushed(self, group: str, type_url: str, resources: int) -> None:
        self.pushes.labels(group, type_name(type_url)).inc()

    def acked(self, node: str, group: str, type_url: str, version: str) -> None:
        self.acks.labels(group, type_name(type_url)).inc()

    def nacked(self, node: str, group: str, type_url: str, version: str, error: str) -> None:
        self.nacks.labels(group, type_name(type_url)).inc()

    def connected(self, node: str, group: str, streams: int) -> None:
        self._streams[node] = (group, streams)
        self.streams.labels(group).set(sum(n for g, n in self._streams.values() if g == group))

    def refused(self, peer: str, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def built(self, seconds: float, ok: bool) -> None:
        """Not an ADS event: the control plane reports each build of its snapshots."""
        if ok:
            self.build_seconds.observe(seconds)
        self.builds.labels("ok" if ok else "invalid").inc()
