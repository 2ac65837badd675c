"""Endpoint snapshots: immutable, versioned sets of endpoints per service, and the store that holds them.

Modelled on go-control-plane's snapshot cache (style note §6): producers (the static, DNS and Consul
sources) only ever call `SnapshotStore.publish(service, endpoints)`; consumers (MeshClient's balancer)
only read, either with `get` or by watching with `newer_than`. Neither side knows the other.

    store.publish("auth-svc", [Endpoint("10.0.0.5", 50051), Endpoint("10.0.0.6", 50051)])
    snap = store.get("auth-svc")                      # Snapshot(version="3f2a...", endpoints=(...))
    snap = await store.newer_than("auth-svc", snap.version)   # wakes on the next real change

A snapshot's version is a hash of its canonical content (endpoints sorted, metadata sorted), so
publishing the same set twice, in any order, is a no-op and wakes nobody: a watcher never sees a
"change" that is not one. That is what lets Consul's blocking queries (which may return without a
change) and DNS re-resolution (which returns the same answer most of the time) publish blindly.

Waiting is condition-based, not polling: each waiter parks on a future that `publish` resolves.
`publish` may be called from any thread (the Consul watch's HTTP calls run in threads); waiters are
woken on their own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

log = logging.getLogger(__name__)

SnapshotCallback = Callable[[str, "Snapshot"], None]


# The metadata key of an endpoint's version (Consul's Meta `version`, mesh.yaml's `{address, version}`):
# what a canary split picks by. An endpoint without it is of its service's own version.
VERSION = "version"


def _empty_metadata() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address of a service. `weight` is relative, as the source reports it (MeshClient's balancer
    is round robin and does not use it); `healthy` is what the source
    knows (Consul with `passing` filtering and DNS only ever report healthy endpoints).

    `host` is a name or an IP literal without brackets (`::1`, not `[::1]`); `address` gives the
    dialable `host:port` with IPv6 bracketed, which is what grpc targets and EndpointPool keys use.
    """

    host: str
    port: int
    weight: int = 1
    healthy: bool = True
    metadata: Mapping[str, str] = field(default_factory=_empty_metadata, hash=False)

    def __post_init__(self) -> None:
        host = self.host.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host:
            raise ValueError("endpoint host must not be empty")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValueError(f"endpoint {host!r}: port must be an integer 1-65535, got {self.port!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, int) or self.weight < 0:
            raise ValueError(f"endpoint {host}:{self.port}: weight must be a non-negative integer")
        object.__setattr__(self, "host", host)
        # Sorted and read-only: equality, hashing of the snapshot and JSON output are all stable.
        meta = {str(k): str(v) for k, v in sorted(self.metadata.items())}
        object.__setattr__(self, "metadata", MappingProxyType(meta))

    @property
    def address(self) -> str:
        """`host:port`, IPv6 literals in brackets (`[::1]:50051`)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, default_port: int | None = None, **kwargs: object) -> Endpoint:
        """`host:port`, `[v6]:port`, or (with `default_port`) `host`, `v6` or `[v6]`."""
        text = text.strip()
        host, port_text = text, ""
        if text.startswith("["):
            close = text.find("]")
            if close < 0:
                raise ValueError(f"endpoint {text!r}: unbalanced '['")
            host, rest = text[1:close], text[close + 1:]
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"endpoint {text!r}: expected [host]:port")
                port_text = rest[1:]
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
        # More than one colon and no brackets: a bare IPv6 literal (needs default_port).
        if port_text:
            if not (port_text.isascii() and port_text.isdigit()):
                raise ValueError(f"endpoint {text!r}: port {port_text!r} is not a number")
            port = int(port_text)
        elif default_port is not None:
            port = default_port
        else:
            raise ValueError(f"endpoint {text!r}: expected host:port")
        return cls(host, port, **kwargs)  # type: ignore[arg-type]

    def version_or(self, default: str) -> str:
        """This instance's version (`metadata["version"]`), else `default` (the service's version)."""
        return self.metadata.get(VERSION) or default

    def canonical(self) -> list[object]:
        return [self.host, self.port, self.weight, self.healthy, dict(self.metadata)]

    def _sort_key(self) -> tuple[str, int, int, bool, str]:
        return (self.host, self.port, -self.weight, not self.healthy,
                json.dumps(dict(self.metadata), sort_keys=True))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An immutable endpoint set with `version` = hash of its canonical content.

    Build with `Snapshot.of(endpoints)`: it sorts, removes duplicate addresses (first in canonical
    order wins) and computes the version. `Snapshot(version, endpoints)` is accepted as given.
    """

    version: str
    endpoints: tuple[Endpoint, ...]

    @classmethod
    def of(cls, endpoints: Iterable[Endpoint]) -> Snapshot:
        unique: dict[str, Endpoint] = {}
        for ep in sorted(endpoints, key=Endpoint._sort_key):
            unique.setdefault(ep.address, ep)
        eps = tuple(unique.values())
        return cls(version=content_version(eps), endpoints=eps)

    @property
    def addresses(self) -> tuple[str, ...]:
        """Dialable addresses of the healthy endpoints (what a balancer should pick from)."""
        return tuple(e.address for e in self.endpoints if e.healthy)

    @property
    def versions(self) -> dict[str, str]:
        """address -> version of the healthy endpoints that carry one (the rest are of their service's)."""
        return {e.address: e.metadata[VERSION] for e in self.endpoints if e.healthy and VERSION in e.metadata}

    @property
    def healthy(self) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.endpoints if e.healthy)

    def __len__(self) -> int:
        return len(self.endpoints)


def content_version(endpoints: Iterable[Endpoint]) -> str:
    """sha256 (first 16 hex digits) of the canonical JSON of the endpoints, in the given order."""
    doc = json.dumps([e.canonical() for e in endpoints], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


class SnapshotStore:
    """The latest Snapshot per service, and watches on them.

    - `publish(service, endpoints)` stores a new snapshot and wakes watchers; a no-op (returns False)
      when the content is unchanged. Thread-safe.
    - `get(service)` -> the current Snapshot, or None if nothing was ever published.
    - `await newer_than(service, seen_version, timeout=None)` -> the current snapshot as soon as its
      version differs from `seen_version` (immediately if it already does; `None` means "any").
      Raises TimeoutError if nothing newer arrives within `timeout` seconds.
    - `subscribe(callback)` -> unsubscribe function; `callback(service, snapshot)` runs synchronously
      in the publisher's thread after each real change. Exceptions in callbacks are logged.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshots: dict[str, Snapshot] = {}
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._callbacks: list[SnapshotCallback] = []

    # -- producers ---------------------------------------------------------------------------------
    def publish(self, service: str, endpoints: Iterable[Endpoint] | Snapshot) -> bool:
        snap = endpoints if isinstance(endpoints, Snapshot) else Snapshot.of(endpoints)
        with self._lock:
            current = self._snapshots.get(service)
            if current is not None and current.version == snap.version:
                return False
            self._snapshots[service] = snap
            waiters = self._waiters.pop(service, set())
            callbacks = list(self._callbacks)
        log.info("discovery: %s -> version %s, %d endpoint(s): %s", service, snap.version,
                 len(snap.endpoints), ", ".join(e.address for e in snap.endpoints) or "-")
        for fut in waiters:
            _wake(fut)
        for cb in callbacks:
            try:
                cb(service, snap)
            except Exception:
                log.exception("discovery: snapshot callback %r failed for %s", cb, service)
        return True

    # -- consumers ---------------------------------------------------------------------------------
    def get(self, service: str) -> Snapshot | None:
        with self._lock:
            return self._snapshots.get(service)

    def services(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(sorted(self._snapshots))

    async def newer_than(self, service: str, seen_version: str | None, timeout: float | None = None) -> Snapshot:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                with self._lock:
                    snap = self._snapshots.get(service)
                    if snap is not None and snap.version != seen_version:
                        return snap
                    fut: asyncio.Future[None] = loop.create_future()
                    self._waiters.setdefault(service, set()).add(fut)
                try:
                    await fut
                finally:
                    with self._lock:
                        waiting = self._waiters.get(service)
                        if waiting is not None:
                            waiting.discard(fut)
                            if not waiting:
                                del self._waiters[service]

    def subscribe(self, callback: SnapshotCallback) -> Callable[[], None]:
        with self._lock:
            self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return unsubscribe


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _wake(fut: asyncio.Future[None]) -> None:
    loop = fut.get_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        _resolve(fut)
        return
    with contextlib.suppress(RuntimeError):  # the waiter's loop is closed: nobody is waiting any more
        loop.call_soon_threadsafe(_resolve, fut)
