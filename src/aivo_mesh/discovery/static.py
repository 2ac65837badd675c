"""Static discovery: the endpoints mesh.yaml writes down.

A service's endpoints are `services[].endpoints` (`host:port` strings, or `{address, version}`) when
given, else its one `host:port`. One written with a version carries it in `metadata["version"]`, as
Consul's instances carry their Meta; the others are of the service's own version (`Endpoint.version_or`).
They never change while the process runs, so the source publishes once and returns.
"""

from __future__ import annotations

from collections.abc import Iterable

from aivo_mesh.config.model import ServiceSpec
from aivo_mesh.discovery.snapshot import VERSION, Endpoint, SnapshotStore


def static_endpoints(spec: ServiceSpec) -> tuple[Endpoint, ...]:
    """The endpoints of `spec` as mesh.yaml states them (pure)."""
    if spec.endpoints:
        return tuple(Endpoint.parse(e) if isinstance(e, str) else
                     Endpoint.parse(e.address, metadata={VERSION: e.version} if e.version else {})
                     for e in spec.endpoints)
    return (Endpoint(spec.host, spec.port),)


class StaticSource:
    """A fixed endpoint list. `StaticSource.from_spec(spec)` reads it from mesh.yaml."""

    def __init__(self, endpoints: Iterable[Endpoint | str]) -> None:
        self.endpoints = tuple(e if isinstance(e, Endpoint) else Endpoint.parse(e) for e in endpoints)

    @classmethod
    def from_spec(cls, spec: ServiceSpec) -> StaticSource:
        return cls(static_endpoints(spec))

    async def watch(self, service: str, store: SnapshotStore) -> None:
        store.publish(service, self.endpoints)

    def __repr__(self) -> str:
        return f"StaticSource({[e.address for e in self.endpoints]})"
