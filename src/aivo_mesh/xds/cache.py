"""The snapshot cache of the control plane: what each node group should hold, one immutable snapshot each.

As go-control-plane's `pkg/cache/v3` SnapshotCache: a `Snapshot` holds the resources of every xDS type a
node group receives, is checked for consistency before it is published (`Snapshot.problems`), and is
replaced whole; the ADS server (xds/server.py) streams from the cache and never builds resources.

Versions are content hashes: a type's version is the SHA-256 of its resources' deterministic
serialization, sorted by name. The same inputs give the same versions on every replica and after every
restart, so a proxy that reconnects (to this process or another) is sent nothing it already has. An
`Any` (typed_config) holds bytes serialized when it was packed: the resources are made by
`xds.resources.typed`, which packs every Any deterministically (xds/parse.py), so those bytes, and the
versions, never depend on the process that built them.

A message in a snapshot is never changed once the snapshot is made: the snapshots of one build share
messages (xds/resources.py), and a version is remembered by the identity of the messages it hashed.

Nothing here imports grpc.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from google.protobuf.message import Message

# Type URLs of the resources the control plane serves, in the order a push sends them: clusters before
# their endpoints (Envoy warms a cluster until its assignment arrives), listeners before their routes.
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
PUSH_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)
# Types a client subscribes to by name (state of the world); the others are wildcard.
NAMED_TYPES = frozenset({ENDPOINT, ROUTE, SECRET})
SHORT_NAMES = {CLUSTER: "clusters", ENDPOINT: "endpoints", LISTENER: "listeners", ROUTE: "routes",
               SECRET: "secrets"}


def type_name(type_url: str) -> str:
    """`clusters`, `endpoints`, ... (what operators and metrics say)."""
    return SHORT_NAMES.get(type_url, type_url.rsplit(".", 1)[-1])


# The versions of the last few sets of resources, by the identity of their messages (held here, so no id is
# reused while its entry lasts). The snapshots of one build share messages: every sidecar's `mesh_ca` is one
# message, which with one pinned key per identity is some 45 kB for a mesh of 1000 services, and hashing
# it again for each sidecar cost more than the rest of its versions. A message in a snapshot is never
# changed (module docstring), so the same messages have the same version.
_RECENT_VERSIONS = 8
_recent: OrderedDict[tuple[tuple[str, int], ...], tuple[tuple[Message, ...], str]] = OrderedDict()


def _version(resources: Mapping[str, Message]) -> str:
    names = sorted(resources)
    key = tuple((name, id(resources[name])) for name in names)
    found = _recent.get(key)
    if found is not None:
        _recent.move_to_end(key)
        return found[1]
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        h.update(b"\0")
        h.update(resources[name].SerializeToString(deterministic=True))
        h.update(b"\0")
    version = h.hexdigest()[:16]
    _recent[key] = (tuple(resources[name] for name in names), version)
    if len(_recent) > _RECENT_VERSIONS:
        _recent.popitem(last=False)
    return version


@dataclass(frozen=True)
class Snapshot:
    """Every resource a node group receives, per type URL and name, with a content-hash version per type.

    Build it with `Snapshot.of(...)`; `problems()` says what would make it inconsistent."""

    resources: Mapping[str, Mapping[str, Message]]
    versions: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, resources: Mapping[str, Iterable[Message]]) -> Snapshot:
        """From resources per type URL; each resource is keyed by its `name` (`cluster_name` for an
        assignment). The resources as `xds.resources.typed` makes them (every Any packed deterministically),
        and never changed afterwards (module docstring)."""
        by_type: dict[str, dict[str, Message]] = {}
        for type_url, items in resources.items():
            named: dict[str, Message] = {}
            for r in items:
                name = resource_name(r)
                if name in named:
                    raise ValueError(f"two {type_name(type_url)} named {name!r}")
                named[name] = r
            by_type[type_url] = named
        for t in PUSH_ORDER:
            by_type.setdefault(t, {})
        return cls(by_type, {t: _version(r) for t, r in by_type.items()})

    @property
    def version(self) -> str:
        """One version for the whole snapshot (of the per-type versions)."""
        return hashlib.sha256("|".join(f"{t}={self.versions[t]}" for t in sorted(self.versions)).encode()
                              ).hexdigest()[:16]

    def get(self, type_url: str) -> Mapping[str, Message]:
        return self.resources.get(type_url, {})

    def problems(self) -> list[str]:
        """What makes this snapshot inconsistent (empty: consistent), as go-control-plane's Consistent():
        every cluster that takes its endpoints from EDS has an assignment, every assignment belongs to a
        cluster, every route configuration a listener names exists, and every route names a cluster."""
        return list(self._problems)

    @functools.cached_property
    def _problems(self) -> tuple[str, ...]:
        # Worked out once: the control plane checks every snapshot before publishing any, then `set` checks
        # each again (the snapshot and its messages never change).
        from aivo_mesh.xds.refs import cluster_refs, eds_clusters, rds_names

        problems: list[str] = []
        clusters = self.get(CLUSTER)
        endpoints = self.get(ENDPOINT)
        routes = self.get(ROUTE)
        for name in sorted(eds_clusters(clusters.values())):
            if name not in endpoints:
                problems.append(f"cluster {name} takes its endpoints from EDS but has no assignment")
        for name in sorted(set(endpoints) - set(clusters)):
            problems.append(f"assignment {name} belongs to no cluster")
        for listener, wanted in rds_names(self.get(LISTENER).values()):
            for name in wanted:
                if name not in routes:
                    problems.append(f"listener {listener} uses route configuration {name}, which is missing")
        listener_clusters = {c for _, names in cluster_refs(self.get(LISTENER).values()) for c in names}
        for route_name, names in cluster_refs(routes.values()):
            for c in sorted(names):
                if c not in clusters:
                    problems.append(f"route configuration {route_name} sends to cluster {c}, which is missing")
        for c in sorted(listener_clusters - set(clusters)):
            problems.append(f"a listener sends to cluster {c}, which is missing")
        return tuple(problems)


_name_fields: dict[str, tuple[str, ...]] = {}  # message type -> which of cluster_name, name it has


def resource_name(resource: Message) -> str:
    kind = resource.DESCRIPTOR.full_name
    fields = _name_fields.get(kind)
    if fields is None:  # asking an upb message for a field it lacks costs an exception: ask the descriptor once
        fields = _name_fields[kind] = tuple(f for f in ("cluster_name", "name")
                                            if f in resource.DESCRIPTOR.fields_by_name)
    name = next((value for f in fields if (value := getattr(resource, f))), None)
    if not name:
        raise ValueError(f"a {kind} without a name")
    return str(name)


class InconsistentSnapshot(ValueError):
    def __init__(self, group: str, problems: list[str]) -> None:
        self.group = group
        self.problems = problems
        super().__init__(f"snapshot for {group} is inconsistent: " + "; ".join(problems))


class SnapshotCache:
    """The latest consistent snapshot per node group, and a way to wait for the next one.

    `set` refuses an inconsistent snapshot (nothing is published, the previous one stays); setting a
    snapshot equal to the current one wakes nobody (versions are content hashes)."""

    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._generations: dict[str, int] = {}  # how many times each group's snapshot changed
        self._waiters: dict[str, asyncio.Event] = {}

    def set(self, group: str, snapshot: Snapshot) -> bool:
        """Publish `snapshot` for `group`; False when it equals the current one. Raises
        InconsistentSnapshot."""
        problems = snapshot.problems()
        if problems:
            raise InconsistentSnapshot(group, problems)
        old = self._snapshots.get(group)
        if old is not None and old.versions == snapshot.versions:
            return False
        self._snapshots[group] = snapshot
        self._generations[group] = self._generations.get(group, 0) + 1
        event = self._waiters.pop(group, None)
        if event is not None:
            event.set()
        return True

    def get(self, group: str) -> Snapshot | None:
        return self._snapshots.get(group)

    def groups(self) -> list[str]:
        return sorted(self._snapshots)

    def clear(self, group: str) -> None:
        self._snapshots.pop(group, None)

    def generation(self, group: str) -> int:
        return self._generations.get(group, 0)

    async def newer_than(self, group: str, generation: int) -> int:
        """Until `group`'s snapshot changed after `generation` (at once if it already has); the new one.
        A change made while the caller was busy is never missed: the generation tells."""
        while self._generations.get(group, 0) <= generation:
            event = self._waiters.get(group)
            if event is None:
                event = self._waiters[group] = asyncio.Event()
            await event.wait()
        return self._generations[group]
