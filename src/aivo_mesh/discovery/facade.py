"""The Discovery facade: one source per service, all publishing into one SnapshotStore.

    discovery = build_discovery(mesh, "consul", consul=ConsulDiscovery("127.0.0.1:8500"))
    await discovery.start()
    await discovery.wait_ready(timeout=5)           # every service has a first snapshot
    snap = discovery.store.get("auth-svc")
    ...
    await discovery.stop()

A source is anything with `async watch(service, store)`: it publishes snapshots of `service` until
cancelled (DNS, Consul) or publishes once and returns (static). The facade runs one task per service
and supervises it: a watch that raises (a bug, not a lookup failure: sources handle those
themselves) is logged and restarted after a jittered back-off, never taking the others down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from random import Random
from typing import Literal, Protocol, runtime_checkable

from aivo_mesh.config.model import MeshSpec, ServiceSpec
from aivo_mesh.discovery.consul import ConsulDiscovery
from aivo_mesh.discovery.dns import DnsSource
from aivo_mesh.discovery.snapshot import Snapshot, SnapshotStore
from aivo_mesh.discovery.static import StaticSource
from aivo_mesh.errors import MeshError
from aivo_mesh.policy.backoff import EqualJitter

log = logging.getLogger(__name__)

DiscoveryMode = Literal["static", "dns", "consul"]
MODES: tuple[str, ...] = ("static", "dns", "consul")


@runtime_checkable
class Source(Protocol):
    async def watch(self, service: str, store: SnapshotStore) -> None:
        """Publish snapshots of `service` into `store` (until cancelled, or once and return)."""


class DiscoveryNotReady(MeshError):
    """`wait_ready` timed out before every service had a snapshot."""

    def __init__(self, missing: Sequence[str], timeout: float) -> None:
        self.missing = tuple(missing)
        super().__init__(f"no endpoints discovered within {timeout:g}s for: {', '.join(missing)}")


class Discovery:
    def __init__(self, store: SnapshotStore, sources: Mapping[str, Source], *,
                 restart_base: float = 1.0, restart_max: float = 30.0) -> None:
        self.store = store
        self.sources = dict(sources)
        self.restart_backoff = EqualJitter(restart_base, restart_max)
        self._rng = Random()
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def __repr__(self) -> str:
        return f"Discovery({self.sources!r})"

    @property
    def running(self) -> bool:
        return any(not t.done() for t in self._tasks.values())

    async def start(self) -> None:
        """Start every source's watch (idempotent). Returns at once; see `wait_ready`."""
        for service, source in self.sources.items():
            task = self._tasks.get(service)
            if task is None or task.done():
                self._tasks[service] = asyncio.create_task(
                    self._supervise(service, source), name=f"discovery:{service}")

    async def stop(self) -> None:
        """Cancel every watch and wait for them. The store keeps the last snapshots."""
        tasks, self._tasks = list(self._tasks.values()), {}
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_ready(self, timeout: float, services: Iterable[str] | None = None) -> None:
        """Wait (condition-based) until each service has a snapshot; DiscoveryNotReady names those
        still missing after `timeout` seconds."""
        wanted = list(services) if services is not None else list(self.sources)
        try:
            async with asyncio.timeout(timeout):
                for s in wanted:
                    await self.store.newer_than(s, None)
        except TimeoutError:
            missing = [s for s in wanted if self.store.get(s) is None]
            raise DiscoveryNotReady(missing, timeout) from None

    def snapshot(self, service: str) -> Snapshot | None:
        return self.store.get(service)

    async def __aenter__(self) -> Discovery:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _supervise(self, service: str, source: Source) -> None:
        failures = 0
        while True:
            try:
                await source.watch(service, self.store)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                failures += 1
                delay = self.restart_backoff.delay(failures, 0.0, self._rng)
                log.exception("discovery: %s: %r crashed; restarting in %.2fs", service, source, delay)
                await asyncio.sleep(delay)


@dataclass(frozen=True)
class DnsOptions:
    """How `build_discovery(mode="dns")` names and resolves each service.

    The target of a service is `targets[name]` if given, else `template` formatted with `name`, `host`,
    `port` and `namespace` from mesh.yaml: `"{host}:{port}"` (A/AAAA of the service's host) by default,
    `"_grpc._tcp.{name}.example.internal"` for SRV, `"{name}.service.consul:{port}"` for Consul DNS.
    """

    nameservers: tuple[str, ...] | None = None
    port: int = 53
    template: str = "{host}:{port}"
    targets: Mapping[str, str] = field(default_factory=dict)
    min_ttl: float = 5.0
    max_ttl: float = 300.0
    timeout: float = 2.0

    def target_for(self, mesh: MeshSpec, spec: ServiceSpec) -> str:
        if spec.name in self.targets:
            return self.targets[spec.name]
        return self.template.format(name=spec.name, host=spec.host, port=spec.port,
                                    namespace=mesh.mesh.namespace)


def build_discovery(
    mesh: MeshSpec,
    mode: str = "static",
    *,
    services: Iterable[str] | None = None,
    store: SnapshotStore | None = None,
    dns: DnsOptions | None = None,
    consul: ConsulDiscovery | None = None,
) -> Discovery:
    """A Discovery for `services` (default: all of mesh.yaml) in one mode.

    static: endpoints from mesh.yaml. dns: a DnsSource per service (see DnsOptions). consul: one
    ConsulDiscovery (default: the local agent at 127.0.0.1:8500) watching each service by its name.
    """
    if mode not in MODES:
        raise ValueError(f"unknown discovery mode {mode!r}: expected one of {', '.join(MODES)}")
    specs = [mesh.service(s) for s in services] if services is not None else list(mesh.services)
    sources: dict[str, Source] = {}
    if mode == "static":
        sources = {s.name: StaticSource.from_spec(s) for s in specs}
    elif mode == "dns":
        opts = dns or DnsOptions()
        sources = {
            s.name: DnsSource(opts.target_for(mesh, s), default_port=s.port, nameservers=opts.nameservers,
                              port=opts.port, timeout=opts.timeout, min_ttl=opts.min_ttl, max_ttl=opts.max_ttl)
            for s in specs
        }
    else:
        shared = consul or ConsulDiscovery()
        sources = {s.name: shared for s in specs}
    return Discovery(store or SnapshotStore(), sources)

