"""Consul discovery: watch `GET /v1/health/service/<name>?passing=1` with blocking queries.

    consul = ConsulDiscovery("127.0.0.1:8500", token=..., datacenter="dc1")
    index, endpoints = await consul.query("auth-svc")        # one non-blocking read
    await consul.watch("auth-svc", store)                    # publishes until cancelled

The watch loop follows Consul's blocking-query rules (C:features/blocking, notes §6):

1. Read `X-Consul-Index`; ask again with `?index=<it>&wait=<wait>`; Consul holds the request until
   the service's state changes or `wait` (plus up to wait/16 of jitter) passes.
2. A return is not a change: the store compares the content version and ignores repeats.
3. Index going backwards (Consul restored a snapshot, or the agent talks to another cluster) -> reset
   to 0, i.e. the next query is a plain non-blocking read. An index below 1 is sent as 1.
4. The loop is rate-limited by a token bucket (default 1 query/s, burst 2), so a flapping index
   cannot turn it into a busy loop.
5. Errors (agent down, 5xx, 403, malformed answer) never touch the store: the last good snapshot
   stays, and the next attempt waits an equal-jitter back-off (policy's EqualJitter: `backoff_base`
   doubling up to `backoff_max`). The index is kept, so a recovered agent answers the same blocking query.

Only snapshots are published: changing the endpoint set never fails an in-flight call, because the
consumer (MeshClient) swaps its balancer's endpoint list and drains removed channels (EndpointPool).

Transport: py-consul 1.8 has `consul.aio`, but it is built on aiohttp, which is not a dependency of
aivo-mesh. So the synchronous `consul.Consul` (requests) is used, each call in a daemon thread (see
`_util.in_daemon_thread` for why not `asyncio.to_thread`). Each watch gets its own client, i.e. its
own requests session, so N watched services never contend for one connection pool.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from random import Random
from typing import Any

import consul
import requests

from aivo_mesh.discovery._util import TokenBucket, in_daemon_thread
from aivo_mesh.discovery.snapshot import Endpoint, SnapshotStore
from aivo_mesh.errors import MeshError
from aivo_mesh.policy.backoff import EqualJitter

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:8500"


class ConsulError(MeshError):
    """The Consul agent refused or failed a request (registration, deregistration, a query)."""


# What a failed Consul call may raise: py-consul's exceptions (4xx/5xx/bad JSON/missing index),
# requests' (connection refused, timeout), and our own parsing errors.
CONSUL_ERRORS: tuple[type[BaseException], ...] = (
    consul.ConsulException, requests.RequestException, ConsulError, ValueError, OSError,
)


def parse_address(address: str, scheme: str = "http") -> tuple[str, int, str]:
    """`host:port`, `[v6]:port` or `scheme://host:port` -> (host as py-consul needs it, port, scheme).
    ValueError for anything else; its message never repeats credentials written into the address."""
    if "://" in address:
        scheme, _, address = address.partition("://")
        address = address.rstrip("/")
    if "@" in address:  # user:password@host: Consul takes an ACL token, and the password must not be echoed
        raise ValueError(f"Consul address {scheme}://***@{address.rpartition('@')[2]}: credentials in the "
                         "address are not used; give the ACL token with --token or $CONSUL_HTTP_TOKEN")
    ep = Endpoint.parse(address, default_port=8500)
    host = f"[{ep.host}]" if ":" in ep.host else ep.host
    if scheme not in ("http", "https"):
        raise ValueError(f"Consul scheme must be http or https, got {scheme!r}")
    return host, ep.port, scheme


def next_index(previous: int, returned: int) -> int:
    """The index for the next blocking query, per Consul's rules: backwards -> 0 (start over with a
    non-blocking read); otherwise at least 1 (an index of 0 from Consul would make every later query
    return at once)."""
    if returned < previous:
        return 0
    return max(1, returned)


def endpoints_from_health(entries: Sequence[Mapping[str, Any]] | None) -> tuple[Endpoint, ...]:
    """Endpoints from a `/v1/health/service/<name>` answer (pure).

    Host: `Service.Address`, or `Node.Address` when the service has none (Consul's rule). Weight:
    `Weights.Passing` (or `Weights.Warning` if the worst check is warning). Healthy: every check
    passing. Metadata: the service's `Meta`, plus `consul_id` and `consul_node`. Entries without a
    usable address or port are skipped (logged).
    """
    endpoints: list[Endpoint] = []
    for entry in entries or ():
        svc = entry.get("Service") or {}
        node = entry.get("Node") or {}
        host = svc.get("Address") or node.get("Address") or ""
        port = svc.get("Port")
        statuses = {c.get("Status") for c in entry.get("Checks") or ()}
        healthy = statuses <= {"passing"}
        weights = svc.get("Weights") or {}
        warning = "warning" in statuses and "critical" not in statuses
        weight = weights.get("Warning", 1) if warning else weights.get("Passing", 1)
        meta = dict(svc.get("Meta") or {})
        meta["consul_id"] = str(svc.get("ID", ""))
        meta["consul_node"] = str(node.get("Node", ""))
        try:
            endpoints.append(Endpoint(str(host), int(port) if port is not None else 0, weight=int(weight),
                                      healthy=healthy, metadata=meta))
        except (ValueError, TypeError) as e:
            log.warning("discovery: skipping Consul instance %s: %s", svc.get("ID", "?"), e)
    return tuple(endpoints)


class ConsulDiscovery:
    """Endpoints of services from a Consul agent's health API (see module doc for the watch rules).

    `wait` is the blocking-query wait (Go duration string); `passing_only` adds `passing=1` (Consul
    filters out any instance with a warning or critical check). `rate`/`burst` limit the query loop.
    `client_factory` builds a py-consul client (tests, custom TLS); by default a `consul.Consul`.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        scheme: str = "http",
        token: str | None = None,
        datacenter: str | None = None,
        *,
        wait: str = "30s",
        passing_only: bool = True,
        verify: bool | str = True,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        rate: float = 1.0,
        burst: int = 2,
        connect_timeout: float = 10.0,
        client_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.host, self.port, self.scheme = parse_address(address, scheme)
        self.token = token
        self.datacenter = datacenter
        self.wait = wait
        self.passing_only = passing_only
        self.verify = verify
        self.backoff = EqualJitter(backoff_base, backoff_max)
        self._rng = Random()
        self.rate = rate
        self.burst = burst
        self.connect_timeout = connect_timeout
        self._client_factory = client_factory or self._default_client

    def __repr__(self) -> str:
        return f"ConsulDiscovery({self.scheme}://{self.host}:{self.port}, dc={self.datacenter})"

    def _default_client(self) -> Any:
        return consul.Consul(host=self.host, port=self.port, scheme=self.scheme, token=self.token,
                             dc=self.datacenter, verify=self.verify, connections_timeout=self.connect_timeout)

    def new_client(self) -> Any:
        return self._client_factory()

    def _health(self, client: Any, service: str, index: int) -> tuple[int, tuple[Endpoint, ...]]:
        """One (possibly blocking) health query; runs in a thread."""
        kwargs: dict[str, Any] = {"passing": self.passing_only}
        if index >= 1:  # py-consul sends index/wait only when index is truthy; never send < 1
            kwargs.update(index=str(index), wait=self.wait)
        if self.token:  # explicit token beats CONSUL_HTTP_TOKEN, which py-consul would otherwise prefer
            kwargs["token"] = self.token
        raw_index, entries = client.health.service(service, **kwargs)
        try:
            new_index = int(raw_index)
        except (TypeError, ValueError):
            raise ConsulError(f"Consul answered with X-Consul-Index {raw_index!r}") from None
        if entries is not None and not isinstance(entries, list):
            raise ConsulError(f"unexpected health answer for {service}: {type(entries).__name__}")
        return new_index, endpoints_from_health(entries)

    async def query(self, service: str, index: int = 0, client: Any = None) -> tuple[int, tuple[Endpoint, ...]]:
        """(X-Consul-Index, endpoints); blocks up to `wait` when `index` >= 1."""
        return await in_daemon_thread(self._health, client or self.new_client(), service, index)

    async def watch(self, service: str, store: SnapshotStore) -> None:
        client = self.new_client()
        bucket = TokenBucket(self.rate, self.burst)
        index = 0
        failures = 0
        while True:
            await bucket.acquire()
            try:
                returned, endpoints = await self.query(service, index, client)
            except CONSUL_ERRORS as e:
                failures += 1
                delay = self.backoff.delay(failures, 0.0, self._rng)
                kept = store.get(service)
                log.warning("discovery: %s: Consul query failed (%s: %s); %s; retrying in %.2fs",
                            service, type(e).__name__, e,
                            f"keeping version {kept.version}" if kept else "no endpoints yet", delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            store.publish(service, endpoints)
            new = next_index(index, returned)
            if new == 0:
                log.info("discovery: %s: Consul index went backwards (%d -> %d); starting over",
                         service, index, returned)
            index = new
