"""The local runtime's state directory: certificates, per-service data, logs and pids.

    <state>/certs/           the mesh PKI (same layout as `meshctl certs`)
    <state>/mesh.yaml        the effective mesh the processes were started with
    <state>/data/<svc>/      each service's SQLite files and secrets
    <state>/logs/<name>.log  stdout+stderr of each process
    <state>/processes.json   what is running: name, pid, role, address, start time
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from aivo_mesh.pki import CertLayout

DEFAULT_STATE_DIR = Path(".state/mesh")


@dataclass(frozen=True)
class ProcessRecord:
    name: str
    pid: int
    role: str  # "service" | "sidecar" | "collector"
    address: str
    admin: str | None
    started_at: float
    log: str


class StateDir:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @property
    def certs(self) -> CertLayout:
        return CertLayout(self.root / "certs")

    @property
    def mesh_file(self) -> Path:
        return self.root / "mesh.yaml"

    @property
    def registry(self) -> Path:
        return self.root / "processes.json"

    def data_dir(self, service: str) -> Path:
        d = self.root / "data" / service
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        return d

    def log_file(self, name: str) -> Path:
        d = self.root / "logs"
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{name}.log"

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def write_processes(self, records: list[ProcessRecord]) -> None:
        tmp = self.registry.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(r) for r in records], indent=2) + "\n")
        os.replace(tmp, self.registry)

    def read_processes(self) -> list[ProcessRecord]:
        try:
            data = json.loads(self.registry.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return []
        return [ProcessRecord(**r) for r in data]

    def clear_processes(self) -> None:
        self.registry.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
