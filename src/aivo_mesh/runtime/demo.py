"""`meshctl demo`'s run: the whole mesh on loopback, healthy, driven through the main flow, stopped.

`run_demo` prints nothing: it returns a DemoResult (plain data: flows, per-service stats, errors, a
sample trace) for the CLI to render, and tells a DemoProgress what it is doing while it runs. Every
process it started is stopped before it returns or raises.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from aivo_mesh.client import MeshClient, MeshConfig
from aivo_mesh.errors import MeshError
from aivo_mesh.runtime.collector import SpanLog
from aivo_mesh.runtime.driver import drive
from aivo_mesh.runtime.health import all_serving, wait_serving
from aivo_mesh.runtime.local import CLIENT_IDENTITY, free_port, preflight, prepare
from aivo_mesh.runtime.mesh import HEALTHY_WITHIN, LocalTracing, Plane, mesh_for_clients, plan
from aivo_mesh.runtime.state import StateDir
from aivo_mesh.runtime.supervisor import Supervisor
from aivo_mesh.telemetry.otlp_receiver import Trace


@dataclass(frozen=True)
class DemoOptions:
    plane: Plane = "sidecar"
    duration: float = 10.0  # seconds of traffic
    workers: int = 4  # concurrent flows
    config: str | None = None  # mesh.yaml (None: the usual search, meshfile.find_mesh_file)
    free_ports: bool = False  # free loopback ports instead of mesh.yaml's
    timeout: float | None = None  # seconds to all-healthy (None: HEALTHY_WITHIN of the plane)

    @property
    def healthy_within(self) -> float:
        return self.timeout or HEALTHY_WITHIN[self.plane]


@dataclass(frozen=True)
class ServiceRow:
    """One service's share of the demo traffic (latencies in seconds; None without calls)."""

    name: str
    address: str  # its front door on the plane
    identity: str  # its SPIFFE ID
    calls: int
    errors: int
    p50: float | None
    p99: float | None
    error_codes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DemoResult:
    plane: Plane
    duration: float
    workers: int
    ready_in: float  # seconds from start to all-healthy
    flows: int
    services: tuple[ServiceRow, ...]  # in mesh.yaml order
    trace: Trace | None  # a learner -> auth trace, when one arrived

    @property
    def errors(self) -> dict[str, dict[str, int]]:
        """Error codes and counts of each service that had errors."""
        return {s.name: s.error_codes for s in self.services if s.errors}

    @property
    def ok(self) -> bool:
        return self.flows > 0 and not self.errors


class NotHealthy(MeshError):
    """The mesh was not healthy in time: each service's last status, and the processes that exited
    (name, exit code, log file)."""

    def __init__(self, within: float, health: dict[str, str], exited: list[tuple[str, int | None, Path | None]]):
        self.health = health
        self.exited = exited
        super().__init__(f"services not healthy within {within:.0f}s: "
                         f"{ {k: v for k, v in health.items() if v != 'SERVING'} }")


class DemoProgress(Protocol):
    """What `run_demo` tells while it runs."""

    def status(self, text: str) -> None:
        """What it does now ("starting the sidecar mesh...")."""

    def healthy(self, services: int, seconds: float) -> None:
        """Every service is SERVING, `seconds` after the start; traffic starts now."""

    def stopped(self) -> None:
        """Every process it started is stopped (also when the run failed)."""


class Quiet:
    """A DemoProgress that shows nothing."""

    def status(self, text: str) -> None: ...

    def healthy(self, services: int, seconds: float) -> None: ...

    def stopped(self) -> None: ...


async def run_demo(state: StateDir, options: DemoOptions, progress: DemoProgress | None = None) -> DemoResult:
    if state.running():  # its files are in use: a demo would rewrite them under the running processes
        raise MeshError(f"a mesh is running from {state.root} (meshctl down --state-dir {state.root}); "
                        "give the demo another --state-dir")
    progress = progress or Quiet()
    plane = options.plane
    started = time.monotonic()
    otlp = free_port()
    tracing = LocalTracing(otlp)  # as `meshctl up`: the collector forwards to Jaeger
    mesh = prepare(state, options.config, options.free_ports, transform=tracing)
    (state.root / "traces.jsonl").unlink(missing_ok=True)
    procs, info = plan(state, mesh, plane, otlp, tracing.forward_to)
    preflight(state, mesh, procs, info, other_ports="--free-ports (make demo ARGS=--free-ports)")
    sup = Supervisor(state)
    client = MeshClient(MeshConfig.for_identity(CLIENT_IDENTITY, state.certs, mesh_for_clients(mesh, info)))
    try:
        progress.status(f"starting the {plane} mesh...")
        for m in procs:
            await sup.start(m)
        sidecars = {name: ep.sidecar_admin for name, ep in info.services.items() if ep.sidecar_admin}
        health = await wait_serving(client, mesh.service_names, options.healthy_within, sidecars=sidecars,
                                    progress=progress.status, given_up=lambda: bool(sup.exited()))
        if not all_serving(health) or sup.exited():
            raise NotHealthy(options.healthy_within, health,
                             [(m.name, m.process.returncode if m.process else None, m.log) for m in sup.exited()])
        ready_in = time.monotonic() - started
        progress.healthy(len(health), ready_in)
        progress.status(f"driving the demo flow for {options.duration:.0f}s ({options.workers} workers)...")
        stats = await drive(client, options.duration, workers=options.workers)
        progress.status("waiting for a learner -> auth trace ...")
        trace = await sample_trace(SpanLog(state.root / "traces.jsonl"), sidecars=plane == "sidecar")
        rows = []
        for name in mesh.service_names:
            s = stats.per_service.get(name)
            rows.append(ServiceRow(name, info.services[name].address, mesh.spiffe_id(name),
                                   s.calls if s else 0, s.errors if s else 0, s.percentile(50) if s else None,
                                   s.percentile(99) if s else None, dict(s.error_codes) if s else {}))
        return DemoResult(plane, options.duration, options.workers, ready_in, stats.flows, tuple(rows), trace)
    finally:
        await client.close()
        progress.status("stopping...")
        await sup.stop_all()
        if info.sockets:
            from aivo_mesh.runtime.sockets import remove_socket_dir

            remove_socket_dir(Path(info.sockets))
        progress.stopped()


async def sample_trace(spans: SpanLog, *, sidecars: bool, wait: float | None = None) -> Trace | None:
    """A learner -> auth trace to show, with the spans of both apps and, on the sidecar plane, of both
    sidecars. Every process exports in batches (Envoy and the apps' batch processors every 5 s), so
    the newest traces may still lack spans: wait a bounded while for a complete one (two export
    periods at most), else show the fullest found."""
    want = {"learner-svc", "auth-svc"} | ({"learner-svc-sidecar", "auth-svc-sidecar"} if sidecars else set())

    def has_flow(t: Trace) -> bool:
        return any(sp.name.endswith("/GetProfile") for sp in t.spans) and len(t.spans) > 2

    give_up = time.monotonic() + (wait if wait is not None else 11)
    while True:
        flows = [t for t in spans.traces(200) if has_flow(t)]
        if (found := next((t for t in flows if want <= set(t.services)), None)) is not None:
            return found
        if time.monotonic() >= give_up:
            return max(flows, key=lambda t: len(want & set(t.services)), default=None)
        await asyncio.sleep(0.2)
