"""The local runtime's state directory: certificates, per-service data, logs and pids.

    <state>/certs/           the mesh PKI (same layout as `meshctl certs`)
    <state>/mesh.yaml        the effective mesh the processes were started with (rewritten at every start)
    <state>/data/<svc>/      each service's SQLite files and secrets
    <state>/logs/<name>.log  stdout+stderr of each process
    <state>/processes.json   what is running: {"version": 1, "processes": [{name, pid, role, address, admin,
                             started_at, log}, ...]}
    <state>/supervisor.pid   the pid of `meshctl up`'s supervisor, while it runs
    <state>/runtime.json     where `meshctl up`'s processes are reached (RuntimeInfo): each service's
                             addresses, the collector, the control plane's ADS and admin addresses

Which state directory a command uses is one rule, `resolve_state_dir`:

    1. --state-dir DIR
    2. $AIVO_MESH_STATE_DIR
    3. `up` and `demo`, which start a mesh: their own default, .state/mesh and .state/demo (a demo must not
       rewrite the certificates and mesh.yaml of the mesh `up` keeps running)
    4. every other command (`status`, `traces`, `down`): of .state/mesh and .state/demo, the one a mesh runs
       from now (.state/mesh first), else the one started last (the newer mesh.yaml), else .state/mesh
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from aivo_mesh.errors import StateError
from aivo_mesh.fsutil import write_atomic
from aivo_mesh.pki import CertLayout

STATE_DIR_ENV = "AIVO_MESH_STATE_DIR"
DEFAULT_STATE_DIR = Path(".state/mesh")  # `meshctl up`'s
DEMO_STATE_DIR = Path(".state/demo")  # `meshctl demo`'s (`make demo`)
# processes.json's format: a reader refuses any other, since guessing wrong orphans processes.
PROCESSES_VERSION = 1

Plane = Literal["sidecar", "proxyless"]
# Seconds a local mesh (`meshctl up`, `demo`) gets to be all-healthy by default, its promise on 2 cores:
# the sidecar plane also waits for every Envoy's first health checks of its peers.
HEALTHY_WITHIN: dict[Plane, float] = {"sidecar": 20.0, "proxyless": 15.0}


@dataclass(frozen=True)
class ProcessRecord:
    name: str
    pid: int
    role: str  # "service" | "sidecar" | "collector"
    address: str
    admin: str | None
    started_at: float
    log: str


# Each field of a process record: the JSON types accepted and what is expected, for the error message.
_RECORD_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "name": ((str,), "a process name"),
    "pid": ((int,), "a process id (an integer)"),
    "role": ((str,), '"service", "sidecar" or "collector"'),
    "address": ((str,), "HOST:PORT or unix:PATH"),
    "admin": ((str, type(None)), "HOST:PORT or null"),
    "started_at": ((int, float), "a Unix time in seconds"),
    "log": ((str,), "a log file path"),
}


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

    @property
    def supervisor_pid_file(self) -> Path:
        return self.root / "supervisor.pid"

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
        data = {"version": PROCESSES_VERSION, "processes": [asdict(r) for r in records]}
        write_atomic(self.registry, json.dumps(data, indent=2) + "\n")

    def read_processes(self) -> list[ProcessRecord]:
        """The recorded processes; none without a file. A file that is cut short, of another version or
        missing a field raises StateError: read as empty, it made `down` report "nothing was running"
        and leave every process behind."""
        try:
            text = self.registry.read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._unreadable(f"cannot be read ({exc.strerror})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            what = "is empty" if not text.strip() else (
                f"is not complete JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})")
            raise self._unreadable(f"{what}; it was cut short, by a crash or a full disk") from None
        expected = f'expected {{"version": {PROCESSES_VERSION}, "processes": [...]}}'
        if not isinstance(data, dict) or "version" not in data:
            raise self._unreadable(f"version: missing ({expected}); an older meshctl wrote it, or not meshctl")
        if data["version"] != PROCESSES_VERSION:
            raise self._unreadable(f"version: {json.dumps(data['version'])}, but this meshctl reads version "
                                   f"{PROCESSES_VERSION}; another meshctl version wrote it")
        entries = data.get("processes")
        if not isinstance(entries, list):
            raise self._unreadable(f"processes: expected a list of process records ({expected})")
        return [self._record(i, entry) for i, entry in enumerate(entries)]

    def _record(self, i: int, entry: object) -> ProcessRecord:
        where = f"processes[{i}]"
        if not isinstance(entry, dict):
            raise self._unreadable(f"{where}: expected an object with {', '.join(_RECORD_FIELDS)}")
        if isinstance(entry.get("name"), str):
            where += f" ({entry['name']})"
        missing = [k for k in _RECORD_FIELDS if k not in entry]
        if missing:
            raise self._unreadable(f"{where}: missing {', '.join(missing)} "
                                   f"(a record has {', '.join(_RECORD_FIELDS)})")
        for key, (types, what) in _RECORD_FIELDS.items():
            value = entry[key]
            if isinstance(value, bool) or not isinstance(value, types):  # a bool is an int to isinstance
                raise self._unreadable(f"{where}.{key}: expected {what}, got {json.dumps(value)}")
        return ProcessRecord(**{k: entry[k] for k in _RECORD_FIELDS})

    def _unreadable(self, what: str) -> StateError:
        root = shlex.quote(str(self.root))
        return StateError(str(self.registry), f"{what}.\nmeshctl will not guess what runs from {self.root} "
                          f"(`meshctl down` stops nothing). Processes may still run: `pgrep -af {root}` lists "
                          f"those whose command line names this state dir; stop them with `kill PID...`, then "
                          f"delete {self.registry}.")

    def supervisor_pid(self) -> int | None:
        """The pid of this dir's `meshctl up` supervisor, if it runs."""
        try:
            pid = int(self.supervisor_pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def running(self) -> bool:
        """A mesh runs from here: a supervisor (`meshctl up`) or a recorded process (`meshctl demo`) lives."""
        return self.supervisor_pid() is not None or any(pid_alive(r.pid) for r in self.read_processes())

    def tcp_ports(self) -> set[int]:
        """The loopback TCP ports the recorded processes listen on (their addresses and admin endpoints)."""
        ports = set()
        for r in self.read_processes():
            for address in (r.address, r.admin):
                if address and not address.startswith("unix:") and address.rpartition(":")[2].isdigit():
                    ports.add(int(address.rpartition(":")[2]))
        return ports

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


def resolve_state_dir(flag: str | Path | None, starts: Path | None = None,
                      environ: Mapping[str, str] | None = None) -> StateDir:
    """The state directory of a command, by the one rule in this module's docstring: `flag` (--state-dir),
    else $AIVO_MESH_STATE_DIR, else `starts` (the default of a command that starts a mesh), else the
    local mesh running now, else the one started last."""
    env = os.environ if environ is None else environ
    if flag is not None:
        return StateDir(flag)
    if env.get(STATE_DIR_ENV):
        return StateDir(env[STATE_DIR_ENV])
    if starts is not None:
        return StateDir(starts)
    candidates = [StateDir(DEFAULT_STATE_DIR), StateDir(DEMO_STATE_DIR)]
    for state in candidates:
        if state.running():
            return state
    started = [s for s in candidates if s.mesh_file.exists()]
    # max keeps the first of equal times: .state/mesh.
    return max(started, key=lambda s: s.mesh_file.stat().st_mtime) if started else candidates[0]


def running_meshes(environ: Mapping[str, str] | None = None) -> list[StateDir]:
    """The local meshes running from a state dir meshctl finds without being told ($AIVO_MESH_STATE_DIR's,
    .state/mesh, .state/demo): whose ports a new run may find taken."""
    env = os.environ if environ is None else environ
    roots = [Path(env[STATE_DIR_ENV])] if env.get(STATE_DIR_ENV) else []
    found: list[StateDir] = []
    for root in dict.fromkeys([*roots, DEFAULT_STATE_DIR, DEMO_STATE_DIR]):
        state = StateDir(root)
        if state.running() and all(s.root.resolve() != state.root.resolve() for s in found):
            found.append(state)
    return found


@dataclass
class ServiceEndpoints:
    address: str  # where mTLS callers reach the service (Envoy inbound, or the MeshServer)
    admin: str | None  # aivo-mesh admin endpoint of the app process
    sidecar_admin: str | None = None  # Envoy admin (sidecar plane)
    app: str | None = None  # the app behind its sidecar (plaintext): unix:<path> on the local mesh
    outbound: str | None = None  # the sidecar's outbound listener: unix:<path> on the local mesh


@dataclass
class RuntimeInfo:
    plane: Plane
    collector: str
    services: dict[str, ServiceEndpoints] = field(default_factory=dict)
    sockets: str | None = None  # sidecar plane: the private folder of the app / outbound sockets
    control_plane: dict[str, str] | None = None  # {"address": ADS, "admin": HTTP} when one runs
    observer: str | None = None  # "127.0.0.1:PORT" of the observer's HTTP API (runtime/observer.py) when one runs

    def write(self, state: StateDir) -> None:
        write_atomic(state.root / "runtime.json", json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, state: StateDir) -> RuntimeInfo | None:
        try:
            data = json.loads((state.root / "runtime.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return cls(plane=data["plane"], collector=data["collector"],
                   services={k: ServiceEndpoints(**v) for k, v in data["services"].items()},
                   sockets=data.get("sockets"), control_plane=data.get("control_plane"),
                   observer=data.get("observer"))
