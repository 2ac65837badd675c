"""DNS discovery: A/AAAA for `host[:port]`, SRV for `_grpc._tcp.name` (RFC 2782), re-resolved on TTL.

    DnsSource("auth.internal:50051")                       # A + AAAA, port from the target
    DnsSource("auth.internal", default_port=50051)          # port from mesh.yaml
    DnsSource("_grpc._tcp.auth.service.consul", nameservers=["127.0.0.1"], port=8600)   # SRV

A target whose first label starts with `_` is an SRV name; anything else is an address lookup.
SRV answers carry the port and weight of each instance; targets are taken from the answer's
additional section when present (Consul's DNS sends them) and looked up otherwise. The lowest
priority with a target that resolves is used (RFC 2782: higher priorities are fallbacks). Weights
are kept on the endpoints (0 counts as 1, since 0 would mean "never"); MeshClient's balancer is
round robin and does not use them (docs/discovery.md).

Timing: the next resolution is due after the answer's TTL, clamped to [min_ttl, max_ttl] so a TTL
of 0 cannot turn into a busy loop and a TTL of a day cannot hide a move for a day.

Failures keep the last good snapshot: a timeout, SERVFAIL, REFUSED, NXDOMAIN or an empty answer is
logged and retried with equal-jitter back-off (policy's EqualJitter: min_ttl doubling to max_ttl); the
store is not touched. An empty answer counts as a failure on purpose: a resolver hiccup must not
blank out a service; endpoints that really went away fail their calls and are ejected by the
balancer until DNS names a new set.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from random import Random

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from aivo_mesh.discovery.snapshot import Endpoint, SnapshotStore
from aivo_mesh.policy.backoff import EqualJitter

log = logging.getLogger(__name__)

ADDRESS_TYPES: tuple[str, ...] = ("A", "AAAA")


class DnsEmpty(Exception):
    """The name exists nowhere or has no usable records (treated as an error: keep the last good)."""


@dataclass(frozen=True)
class DnsTarget:
    """A parsed target: `name` to query, `port` (None for SRV or if left to a default), `srv`."""

    name: str
    port: int | None
    srv: bool

    @classmethod
    def parse(cls, target: str, default_port: int | None = None) -> DnsTarget:
        target = target.strip()
        if not target:
            raise ValueError("empty DNS target")
        if target.startswith("_"):
            return cls(target, None, True)
        host, port = target, default_port
        if target.startswith("[") or target.count(":") == 1:
            ep = Endpoint.parse(target, default_port)
            host, port = ep.host, ep.port
        if port is None:
            raise ValueError(f"DNS target {target!r}: expected host:port (or give a default port)")
        return cls(host, port, False)

    @property
    def literal(self) -> bool:
        """True if `name` is an IP address: nothing to resolve."""
        try:
            ipaddress.ip_address(self.name)
        except ValueError:
            return False
        return True


def refresh_delay(ttl: float, min_ttl: float, max_ttl: float) -> float:
    """Seconds until the next resolution: the TTL clamped to [min_ttl, max_ttl]."""
    return max(min_ttl, min(max_ttl, ttl))


def make_resolver(nameservers: Sequence[str] | None = None, port: int = 53,
                  timeout: float = 2.0) -> dns.asyncresolver.Resolver:
    """An async resolver: the system's (/etc/resolv.conf) unless `nameservers` is given.

    `timeout` bounds one whole resolution (dnspython's `lifetime`); no cache, so every re-resolution
    really asks the server and sees the current TTL.
    """
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = list(nameservers)
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.port = port
    resolver.lifetime = timeout
    resolver.timeout = timeout
    resolver.cache = None
    return resolver


class DnsSource:
    """Resolve one DNS target and publish its endpoints under a service name, re-resolving on TTL."""

    def __init__(
        self,
        target: str,
        *,
        default_port: int | None = None,
        nameservers: Sequence[str] | None = None,
        port: int = 53,
        timeout: float = 2.0,
        min_ttl: float = 5.0,
        max_ttl: float = 300.0,
        record_types: Sequence[str] = ADDRESS_TYPES,
        resolver: dns.asyncresolver.Resolver | None = None,
    ) -> None:
        if not 0 < min_ttl <= max_ttl:
            raise ValueError(f"need 0 < min_ttl <= max_ttl, got {min_ttl} and {max_ttl}")
        self.target = DnsTarget.parse(target, default_port)
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.backoff = EqualJitter(min_ttl, max_ttl)
        self._rng = Random()
        self.record_types = tuple(record_types)
        self.resolver = resolver or make_resolver(nameservers, port, timeout)

    def __repr__(self) -> str:
        kind = "SRV" if self.target.srv else "/".join(self.record_types)
        where = f":{self.target.port}" if self.target.port else ""
        return f"DnsSource({self.target.name}{where} {kind})"

    # -- one resolution ----------------------------------------------------------------------------
    async def resolve(self) -> tuple[tuple[Endpoint, ...], float]:
        """(endpoints, ttl seconds). Raises a DNSException, or DnsEmpty if there is nothing usable."""
        if self.target.literal:
            assert self.target.port is not None
            return (Endpoint(self.target.name, self.target.port),), float("inf")
        if self.target.srv:
            return await self._resolve_srv()
        assert self.target.port is not None
        addresses, ttl = await self._addresses(self.target.name)
        if not addresses:
            raise DnsEmpty(f"{self.target.name}: no {'/'.join(self.record_types)} records")
        return tuple(Endpoint(a, self.target.port) for a in addresses), ttl

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """The answer, or None when the name or the type has no data (NXDOMAIN / NODATA)."""
        try:
            return await self.resolver.resolve(name, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            return None

    async def _addresses(self, name: str) -> tuple[list[str], float]:
        """A and AAAA of `name`. One type failing (a resolver or middlebox that drops AAAA queries
        times out) does not discard the other's answer; only when no type gave an address is the
        failure raised."""
        answers = await asyncio.gather(*(self._query(name, t) for t in self.record_types), return_exceptions=True)
        addresses: list[str] = []
        ttl = float("inf")
        failures: list[BaseException] = []
        for answer in answers:
            if isinstance(answer, BaseException):
                failures.append(answer)
                continue
            if answer is None or answer.rrset is None:
                continue
            ttl = min(ttl, float(answer.rrset.ttl))
            addresses.extend(rd.address for rd in answer.rrset)
        if failures and not addresses:
            raise failures[0]
        if failures:
            log.warning("%s: %d of %d DNS queries failed (%s); using the %d addresses the others gave",
                        name, len(failures), len(answers), failures[0], len(addresses))
        return addresses, ttl

    async def _resolve_srv(self) -> tuple[tuple[Endpoint, ...], float]:
        answer = await self._query(self.target.name, "SRV")
        if answer is None or answer.rrset is None or not len(answer.rrset):
            raise DnsEmpty(f"{self.target.name}: no SRV records")
        ttl = float(answer.rrset.ttl)
        records = [rd for rd in answer.rrset if rd.target != dns.name.root]  # "." = not offered here
        if not records:
            raise DnsEmpty(f"{self.target.name}: every SRV record says the service is unavailable (\".\")")
        # Glue from the additional section: target name -> (addresses, ttl).
        glue: dict[dns.name.Name, tuple[list[str], float]] = {}
        wanted = {dns.rdatatype.from_text(t) for t in self.record_types}
        for rrset in answer.response.additional:
            if rrset.rdtype in wanted:
                addrs, t = glue.get(rrset.name, ([], float("inf")))
                glue[rrset.name] = ([*addrs, *(rd.address for rd in rrset)], min(t, float(rrset.ttl)))

        # RFC 2782: the lowest priority that has a reachable target wins; the next one is the
        # fallback when none of its targets resolves (targets are looked up only when needed).
        for priority in sorted({rd.priority for rd in records}):
            group = [rd for rd in records if rd.priority == priority]
            missing = sorted({rd.target for rd in group if rd.target not in glue})
            looked_up = await asyncio.gather(*(self._addresses(n.to_text()) for n in missing),
                                             return_exceptions=True)
            for target, found in zip(missing, looked_up, strict=True):
                if isinstance(found, BaseException):
                    log.warning("%s: SRV target %s did not resolve: %s", self.target.name, target, found)
                    found = ([], float("inf"))
                glue[target] = found
            endpoints: list[Endpoint] = []
            group_ttl = ttl
            for rd in group:
                addrs, t = glue[rd.target]
                group_ttl = min(group_ttl, t) if addrs else group_ttl
                meta = {"srv_target": rd.target.to_text(), "srv_priority": str(rd.priority)}
                endpoints.extend(Endpoint(a, rd.port, weight=max(1, rd.weight), metadata=meta) for a in addrs)
            if endpoints:
                return tuple(endpoints), group_ttl
        raise DnsEmpty(f"{self.target.name}: no address for any SRV target")

    # -- the watch ---------------------------------------------------------------------------------
    async def watch(self, service: str, store: SnapshotStore) -> None:
        failures = 0
        while True:
            try:
                endpoints, ttl = await self.resolve()
            except (dns.exception.DNSException, DnsEmpty, OSError) as e:
                failures += 1
                delay = self.backoff.delay(failures, 0.0, self._rng)
                kept = store.get(service)
                log.warning("discovery: %s: DNS %s failed (%s: %s); %s; retrying in %.2fs", service,
                            self.target.name, type(e).__name__, e,
                            f"keeping version {kept.version}" if kept else "no endpoints yet", delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            store.publish(service, endpoints)
            if ttl == float("inf") and self.target.literal:
                return  # an IP literal never changes
            await asyncio.sleep(refresh_delay(ttl, self.min_ttl, self.max_ttl))
