"""One demo service in its own process: MeshServer + the service's servicer + a MeshClient for peers."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from aivo_mesh.client import MeshClient, MeshConfig
from aivo_mesh.config.model import MeshSpec
from aivo_mesh.pki import CertLayout
from aivo_mesh.server import MeshServer
from aivo_mesh.services import APPS
from aivo_mesh.services.base import ServiceContext
from aivo_mesh.services.protos import SERVICE_DESCRIPTORS

log = logging.getLogger(__name__)


async def serve_service(
    mesh: MeshSpec,
    name: str,
    certs: CertLayout,
    data_dir: Path,
    *,
    insecure: bool = False,
    port: int | None = None,
    grace: float = 5.0,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then drain in-flight calls within `grace`."""
    if name not in APPS:
        raise KeyError(f"no demo application for {name!r}; known: {sorted(APPS)}")
    if insecure:
        server = MeshServer(mesh, name, insecure=True, port=port)
    else:
        server = MeshServer.for_service(mesh, name, certs, port=port)
    client = MeshClient(MeshConfig.for_identity(name, certs, mesh))
    app = APPS[name](server.grpc_server, ServiceContext(name=name, state_dir=data_dir, peers=client))
    server.add_service_name(SERVICE_DESCRIPTORS[name])
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        await stop.wait()
        log.info("%s: draining (grace %.1fs)", name, grace)
    finally:
        await server.stop(grace)
        await app.close()
        await client.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
