"""Follow mesh.yaml while a process runs.

`follow_certificates`: the `certificates` block (revocations and pins) applies live in every process.
`file_changes`: each change of a file, for the control plane's `--watch` (the whole mesh.yaml, pushed
over xDS). A file that does not load is logged and ignored: the process keeps what it has, as it keeps
its certificate when a rotated one is bad.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aivo_mesh.config.loader import load_mesh
from aivo_mesh.config.model import CertificatesSpec, MeshSpec
from aivo_mesh.errors import ConfigError
from aivo_mesh.pki.load import file_signature

log = logging.getLogger(__name__)


async def file_changes(path: Path, interval: float = 1.0) -> AsyncIterator[None]:
    """Yields once each time `path` changes (its size, mtime, inode or mode: an editor's atomic
    rename counts), polling every `interval` seconds; runs until the consumer stops."""
    signature = file_signature(path)
    while True:
        await asyncio.sleep(interval)
        now = file_signature(path)
        if now != signature:
            signature = now
            yield


async def follow_certificates(path: Path, mesh: MeshSpec, apply: Callable[[MeshSpec], None],
                              interval: float = 2.0) -> None:
    """Call `apply(new_mesh)` whenever `path`'s certificates block changes; runs until cancelled."""
    current: CertificatesSpec = mesh.certificates
    async for _ in file_changes(path, interval):
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
