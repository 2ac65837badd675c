"""Where each service's sidecar listens: the per-pod convention and the one-machine plan.

Planned here and checked when mesh.yaml is loaded (MeshSpec calls `port_problems`), so the
renderers, `meshctl up` and `meshctl check` read ports that are known to exist and never check
them themselves.

    pod      every service in its own pod/container: the sidecar owns the mesh port 50051, its
             outbound listener is 15001, its admin 9901 and its Prometheus listener 15090; the app's
             `local_port` must be none of them.
    local    every sidecar on one machine: ports from the service's `sidecar` block, gaps filled
             deterministically (`local_ports`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple

from aivo_mesh.config.memo import per_mesh

if TYPE_CHECKING:  # the model calls this module from its validator
    from aivo_mesh.config.model import MeshSpec, ServiceSpec

Kind = Literal["pod", "local"]

POD_INBOUND_PORT = 50051  # every pod: the sidecar owns the mesh port; the app sits on local_port
POD_OUTBOUND_PORT = 15001
POD_ADMIN_PORT = 9901
POD_STATS_PORT = 15090  # GET /stats/prometheus only, on 0.0.0.0 (the admin API stays on loopback)


class EnvoyPorts(NamedTuple):
    inbound: int
    outbound: int
    admin: int


POD_PORTS = EnvoyPorts(POD_INBOUND_PORT, POD_OUTBOUND_PORT, POD_ADMIN_PORT)
POD_RESERVED: frozenset[int] = frozenset({*POD_PORTS, POD_STATS_PORT})  # taken by the sidecar in every pod

Problem = tuple[tuple[str | int, ...], str]  # (YAML path, message)


def _plan(services: Sequence[ServiceSpec]) -> tuple[dict[str, EnvoyPorts], list[Problem]]:
    """The local plan, and where it could not find a port."""
    used = {p for s in services for p in (s.port, s.local_port, s.admin_port, s.sidecar.inbound_port,
                                         s.sidecar.outbound_port, s.sidecar.admin_port) if p is not None}
    cursor = list(POD_PORTS)
    plan: dict[str, EnvoyPorts] = {}
    problems: list[Problem] = []
    for n, svc in enumerate(services):
        chosen: list[int] = []
        for i, explicit in enumerate((svc.sidecar.inbound_port, svc.sidecar.outbound_port, svc.sidecar.admin_port)):
            if explicit is not None:
                chosen.append(explicit)
                continue
            port = cursor[i]
            while port in used:
                port += 1
            if port > 65535:
                problems.append((("services", n, "sidecar"),
                                 "no free port left for the sidecar; set the sidecar ports"))
            used.add(port)
            cursor[i] = port + 1
            chosen.append(port)
        plan[svc.name] = EnvoyPorts(*chosen)
    return plan, problems


def local_ports(mesh: MeshSpec) -> dict[str, EnvoyPorts]:
    """Local-profile ports of every service, in mesh.yaml order.

    A port written in the service's `sidecar` block is used as is. A gap takes, per kind, the
    conventional port (50051 / 15001 / 9901) for the first service that needs one and the next free
    number after the last one taken for the following ones, skipping every port mesh.yaml names and
    every port already handed out. Deterministic: no socket is probed.
    """
    return dict(_local_plan(mesh))


@per_mesh
def _local_plan(mesh: MeshSpec) -> dict[str, EnvoyPorts]:
    # Planned once per mesh (config/memo.py): a walk over every service, which every sidecar asks for.
    return _plan(mesh.services)[0]


def sidecar_ports(mesh: MeshSpec, service: str, kind: Kind) -> EnvoyPorts:
    """(inbound, outbound, admin) of `service`'s sidecar: the per-pod convention or `local_ports`."""
    mesh.service(service)  # KeyError for an unknown service
    if kind == "pod":
        return POD_PORTS
    return _local_plan(mesh)[service]


def port_problems(services: Sequence[ServiceSpec], scope: str | None = None) -> list[Problem]:
    """What keeps a sidecar from listening: no free port in the local plan, or an app `local_port` on
    a port the sidecar takes in its pod. With `scope` (one deployed service, config.model.POD_SCOPE)
    only that service's own app is checked."""
    problems = _plan(services)[1]
    taken = ", ".join(map(str, sorted(POD_RESERVED)))
    for i, svc in enumerate(services):
        if svc.local_port in POD_RESERVED and (scope is None or svc.name == scope):
            problems.append((("services", i, "local_port"),
                             f"port {svc.local_port} is a sidecar port in the pod ({taken}); pick another local_port"))
    return problems
