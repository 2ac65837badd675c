"""The exception tree of aivo-mesh, grouped by what the caller can do about it.

    MeshError
    ├── ConfigError(file, yaml_path, expected)   meshctl exits 2, no traceback
    ├── PkiError(file, reason)                   raised before any server binds
    ├── StartupError                             a port in use (or unusable files found by a preflight)
    ├── StateError(file)                         a local run's state file meshctl cannot trust
    └── CallError(service, method)               a mesh call failed; cause chained
        ├── DeadlineExceeded
        ├── CircuitOpen
        ├── Overloaded                           the concurrency limit's queue is full
        └── RetriesExhausted                     retried, and the last attempt failed too (the server's
                                                 error is its cause, and its code and details)
"""

from __future__ import annotations

from dataclasses import dataclass


class MeshError(Exception):
    """Base of every error aivo-mesh raises on purpose."""


def yaml_path(loc: tuple[str | int, ...]) -> str:
    """('services', 1, 'routes', 0, 'timeout') -> 'services[1].routes[0].timeout'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def nearest_line(lines: dict[tuple[str | int, ...], int], loc: tuple[str | int, ...]) -> int | None:
    """The line of `loc`, else of its nearest ancestor in the document (`lines`: YAML path -> line)."""
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a configuration source, located as precisely as we can."""

    yaml_path: str
    message: str
    line: int | None = None

    def render(self, file: str) -> str:
        where = f"{file}:{self.line}" if self.line is not None else file
        path = self.yaml_path or "<root>"
        return f"{where}: {path}: {self.message}"


class ConfigError(MeshError):
    """mesh.yaml (or the environment) does not describe a valid mesh."""

    def __init__(self, file: str, issues: list[ConfigIssue]) -> None:
        self.file = file
        self.issues = issues
        super().__init__("\n".join(i.render(file) for i in issues))

    @classmethod
    def single(cls, file: str, yaml_path: str, message: str, line: int | None = None) -> ConfigError:
        return cls(file, [ConfigIssue(yaml_path, message, line)])


class PkiError(MeshError):
    """A certificate or key file is missing, malformed, weak or inconsistent."""

    def __init__(self, file: str, reason: str) -> None:
        self.file = file
        self.reason = reason
        super().__init__(f"{file}: {reason}")


class StartupError(MeshError):
    """Something on this machine stops a process from starting: a port it must listen on is in use, or
    (`meshctl up`'s preflight) certificate files are unusable. Like a ConfigError, the user must change
    something: meshctl exits 2, and the message names the port or file."""


class StateError(MeshError):
    """A file of a local run's state directory (processes.json) is unreadable, cut short, of another
    format version or missing fields: meshctl refuses (exit 2) rather than guess what is running, and
    the message names the file, what is wrong and how to find and stop the processes by hand."""

    def __init__(self, file: str, message: str) -> None:
        self.file = file
        super().__init__(f"{file}: {message}")


class CallError(MeshError):
    """A call through the mesh failed locally (before or instead of reaching the server)."""

    # Defaults let grpc.aio.AioRpcError's cooperative super().__init__() pass through (client/errors.py).
    def __init__(self, service: str = "", method: str = "", message: str = "") -> None:
        self.service = service
        self.method = method
        super().__init__(f"{service} {method}: {message}")


class DeadlineExceeded(CallError):
    """The call's overall deadline passed (including retries and back-off)."""


class CircuitOpen(CallError):
    """The target's circuit breaker is OPEN: the call failed fast without touching the network."""


class Overloaded(CallError):
    """The concurrency limit refused the call: its slots and its queue are full."""


class RetriesExhausted(CallError):
    """The call was retried and its last attempt failed too. Raised as a grpc.aio.AioRpcError with the
    last attempt's code, details and metadata (code written for plain grpc sees the server's error), the
    server's error as `__cause__`, and `attempts`."""

    attempts: int = 0
