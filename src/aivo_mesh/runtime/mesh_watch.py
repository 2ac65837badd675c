"""Follow mesh.yaml's `certificates` block while a process runs (revocations and pins apply live).

Only that block is applied without a restart: the rest of mesh.yaml (routes, ports, allow rules) still
needs one (the control plane will push those). A file that does not load is logged and ignored: the
process keeps the policy it has, as it keeps its certificate when a rotated one is bad.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from aivo_mesh.config.loader import load_mesh
from aivo_mesh.config.model import CertificatesSpec, MeshSpec
from aivo_mesh.errors import ConfigError
from aivo_mesh.pki.load import file_signature

log = logging.getLogger(__name__)


async def follow_certificates(path: Path, mesh: MeshSpec, apply: Callable[[MeshSpec], None],
                              interval: float = 2.0) -> None:
    """Call `apply(new_mesh)` whenever `path`'s certificates block changes; runs until cancelled."""
    signature = file_signature(path)
    current: CertificatesSpec = mesh.certificates
    while True:
        await asyncio.sleep(interval)
        now = file_signature(path)
        if now == signature:
            continue
        signature = now
        try:
            new = load_mesh(path)
        except ConfigError as exc:
            log.warning("mesh.yaml changed but does not load; keeping the certificate policy in force: %s", exc)
            continue
        if new.certificates == current:
            continue
        current = new.certificates
        log.info("certificate policy changed", extra={"revoked": len(current.revoked), "pinned": len(current.pins)})
        apply(new)
