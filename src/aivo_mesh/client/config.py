"""MeshConfig: what a MeshClient needs, in the platform's documented shape."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from aivo_mesh.errors import ConfigError, MeshError

if TYPE_CHECKING:  # mesh.yaml's model (pydantic) is loaded with the mesh, not with this module
    from aivo_mesh.config.model import MeshSpec
    from aivo_mesh.pki import CertLayout


@dataclass
class MeshConfig:
    """Settings of one mesh client.

    `service_name` is who we are (our certificate's identity); `mesh` (or `mesh_file`) supplies
    the routes, deadlines and endpoints of the services we call. `request_timeout` is the deadline
    for services mesh.yaml does not describe; routes in mesh.yaml carry their own.
    """

    service_name: str
    ca_cert_path: str | Path
    client_cert_path: str | Path
    client_key_path: str | Path
    connection_timeout: float = 5.0
    request_timeout: float = 30.0
    max_retries: int = 3
    mesh: MeshSpec | None = None
    mesh_file: str | Path | None = None
    # Explicit endpoints per service ("host:port"), overriding mesh.yaml (tests, ad-hoc tools).
    endpoints: Mapping[str, Sequence[str]] = field(default_factory=dict)
    # Sidecar plane: every call goes in plaintext to the local Envoy's outbound listener, which
    # does mTLS, retries and outlier ejection. The client keeps deadlines and its breaker but sends
    # no retries of its own, so attempts are never multiplied across the two layers.
    sidecar_outbound: str | None = None
    # Transparent-proxy plane (Linkerd): peers are dialled at their own addresses in plaintext h2 and
    # the pod's proxy adds mTLS and retries on the way out; the client keeps deadlines and its breaker.
    plaintext_peers: bool = False

    def __post_init__(self) -> None:
        if self.connection_timeout <= 0 or self.request_timeout <= 0:
            raise ConfigError.single("MeshConfig", "connection_timeout/request_timeout",
                                     "expected a positive number of seconds")
        if self.max_retries < 0:
            raise ConfigError.single("MeshConfig", "max_retries", "expected a non-negative integer")

    def mesh_spec(self) -> MeshSpec:
        if self.mesh is None:
            from aivo_mesh.config.loader import load_mesh

            self.mesh = load_mesh(self.mesh_file)
        return self.mesh

    @classmethod
    def for_identity(cls, name: str, certs: CertLayout, mesh: MeshSpec | None = None,
                     **kwargs: object) -> MeshConfig:
        """Config for a service (or `mesh-client`) whose certificates live in a standard layout."""
        cert, key = certs.identity_paths(name)
        return cls(service_name=name, ca_cert_path=certs.ca_cert, client_cert_path=cert,
                   client_key_path=key, mesh=mesh, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def for_local_mesh(cls, service_name: str, state_dir: str | Path | None = None,
                       **kwargs: object) -> MeshConfig:
        """Config for calling the mesh `meshctl up` runs on this machine, as `service_name` (a service
        of mesh.yaml, or `mesh-client`).

        `state_dir` is the `--state-dir` the mesh was started with; by default, the state directory
        `meshctl status` would use (`$AIVO_MESH_STATE_DIR`, else the local mesh running now). The
        certificates are the ones `up` keeps under `<state_dir>/certs`, the mesh is the effective one it
        started (`<state_dir>/mesh.yaml`), and every service is dialled at its
        front door on the running plane (`<state_dir>/runtime.json`: the Envoy inbound port on the
        sidecar plane, the MeshServer's port on the proxyless plane; also with `--free-ports`).
        Other keyword arguments are MeshConfig's (`request_timeout`, ...).
        """
        # Imported here: the runtime package is not needed by a client of a deployed mesh.
        from aivo_mesh.config.loader import load_mesh
        from aivo_mesh.runtime.mesh import RuntimeInfo, mesh_for_clients, running_supervisor
        from aivo_mesh.runtime.state import resolve_state_dir

        state = resolve_state_dir(state_dir)
        info = RuntimeInfo.read(state)
        if info is None or running_supervisor(state) is None:
            raise MeshError(f"no mesh is running from {state.root}: start one with "
                            f"`meshctl up --state-dir {state.root}`")
        mesh = mesh_for_clients(load_mesh(state.mesh_file), info)
        return cls.for_identity(service_name, state.certs, mesh, **kwargs)
