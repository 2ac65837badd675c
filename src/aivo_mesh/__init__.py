"""aivo-mesh: the Aivo platform's gRPC service mesh.

The public API is what this module exports; everything else may move. MeshClient, MeshConfig
and MeshServer are imported lazily so that `meshctl config ...` and the renderers never load grpc.
`run(main())` is `asyncio.run` on uvloop where it is installed (aivo_mesh.eventloop).
"""

from typing import TYPE_CHECKING, Any

# Before anything imports grpc: grpc core reads its TLS settings once, at import (see aivo_mesh.tls).
from aivo_mesh import tls as _tls

_tls.configure()

from aivo_mesh.errors import (  # noqa: E402
    CallError,
    CircuitOpen,
    ConfigError,
    DeadlineExceeded,
    MeshError,
    Overloaded,
    PkiError,
    RetriesExhausted,
)

if TYPE_CHECKING:
    from aivo_mesh.client import MeshClient, MeshConfig
    from aivo_mesh.eventloop import run
    from aivo_mesh.server import MeshServer

__all__ = [
    "CallError",
    "CircuitOpen",
    "ConfigError",
    "DeadlineExceeded",
    "MeshClient",
    "MeshConfig",
    "MeshError",
    "MeshServer",
    "Overloaded",
    "PkiError",
    "RetriesExhausted",
    "run",
]


def __getattr__(name: str) -> Any:
    if name in ("MeshClient", "MeshConfig"):
        from aivo_mesh import client

        return getattr(client, name)
    if name == "MeshServer":
        from aivo_mesh.server import MeshServer

        return MeshServer
    if name == "run":
        from aivo_mesh.eventloop import run

        return run
    raise AttributeError(f"module 'aivo_mesh' has no attribute {name!r}")
