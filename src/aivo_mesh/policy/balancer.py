"""Balancer: round robin over the endpoints of one target that are fit to serve.

Why here and not in grpc: grpc's own round_robin knows nothing of our outlier detection or health
checks, and picking per attempt in the core lets a retry land on another endpoint.

Eligible = not ejected by outlier detection (outlier.py) and not marked unhealthy by health checks
(`report_check`, counted with Envoy's thresholds: HealthRule). If no endpoint is eligible the
balancer picks among all of them (panic mode, only when none is eligible), because sending to a
maybe-bad endpoint beats failing every call locally; failing fast is the circuit breaker's job,
which a target whose every endpoint keeps failing has opened by then.

Discovery replaces the endpoint list at runtime (`update`); endpoints that stay keep their state
(failures, ejection, health), so a DNS refresh does not forgive a bad replica. A policy change
replaces the outlier and health rules in place (`set_rules`), and the endpoints keep their state
then too. The pick is O(1) while every endpoint is eligible, O(n) otherwise.

Canary (mesh.yaml `canary`, a `Split`): each endpoint has a version (`update(..., versions)`; the
target's own version when not given). A call first draws a version by weight (`choose_version`, once
per logical call: its retries stay in that version, as Envoy's weighted_clusters picks a cluster once
per request), then each attempt picks an endpoint of that version by the rule above, panic mode
included, within the version. A version with no endpoint at all gets its share of the calls anyway,
which fail UNAVAILABLE (NO_ENDPOINTS): Envoy, Istio and Linkerd do the same (the weighted cluster is
chosen regardless, then "no healthy upstream"), and moving its traffic to the other versions would
silently turn a 10 % canary into 0 % or 100 %.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from random import Random

from aivo_mesh.policy.classify import DEFAULT_CLASSIFIER, HEALTHY, IGNORED, SUCCESS, TRANSIENT, Classifier, Outcome
from aivo_mesh.policy.core import Call, Clock, Handler, LocalReason, Reply, monotonic, when_ended
from aivo_mesh.policy.events import NOOP, PolicyListener
from aivo_mesh.policy.outlier import DEFAULT_RULE, EndpointState, OutlierDetector, OutlierRule


@dataclass(frozen=True, slots=True)
class HealthRule:
    """Active health checks as Envoy counts them: an endpoint turns unhealthy after
    `unhealthy_threshold` failed checks in a row and healthy again after `healthy_threshold` passed
    ones (mesh.yaml `health_check`, the same numbers the Envoy sidecars are rendered with)."""

    unhealthy_threshold: int = 3
    healthy_threshold: int = 1

    def __post_init__(self) -> None:
        if self.unhealthy_threshold < 1 or self.healthy_threshold < 1:
            raise ValueError(f"health check thresholds must be >= 1, got {self}")


@dataclass(frozen=True, slots=True)
class Split:
    """Canary weights, (version, weight) pairs (mesh.yaml `canary`; weights are relative, mesh.yaml's add
    up to 100). `pick` draws a version as Envoy's weighted_clusters does: a uniform integer below the
    total, then the first version whose running sum exceeds it, so a version gets weight/total of the
    calls and a weight of 0 none."""

    weights: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        if not self.weights or any(w < 0 for _, w in self.weights) or sum(w for _, w in self.weights) <= 0:
            raise ValueError(f"a canary split needs non-negative weights with a positive sum, got {self.weights}")

    def pick(self, rng: Random) -> str:
        n = rng.randrange(sum(w for _, w in self.weights))
        for version, weight in self.weights:
            if n < weight:
                return version
            n -= weight
        raise AssertionError("unreachable: n < total")


class Balancer:
    """The endpoints of one target service, their health and ejections, and the round-robin cursor
    (one per canary version too)."""

    __slots__ = ("_by_address", "_by_version", "_clock", "_endpoints", "_rng", "_rr", "_rr_version",
                 "_unhealthy", "default_version", "detector", "health", "service", "split", "versions")

    def __init__(self, service: str, endpoints: Iterable[str] = (), *, rule: OutlierRule | None = DEFAULT_RULE,
                 health: HealthRule = HealthRule(), clock: Clock = monotonic,
                 listener: PolicyListener = NOOP, split: Split | None = None, versions: Mapping[str, str] = {},
                 default_version: str = "", rng: Random | None = None) -> None:
        self.service = service
        self.health = health
        self.detector = OutlierDetector(service, rule, clock=clock, listener=listener)
        self.split = split
        self.default_version = default_version  # of an endpoint `versions` does not name
        self._rng = rng if rng is not None else Random()
        self._clock = clock
        self._endpoints: list[EndpointState] = []
        self._by_address: dict[str, EndpointState] = {}
        self._by_version: dict[str, list[EndpointState]] = {}
        self.versions: dict[str, str] = {}
        self._rr = 0
        self._rr_version: dict[str, int] = {}
        self._unhealthy = 0
        self.update(endpoints, versions)

    # -- picking ------------------------------------------------------------------------------
    def choose_version(self) -> str | None:
        """The version a new call goes to (`Split.pick`), None without a canary split."""
        return None if self.split is None else self.split.pick(self._rng)

    def pick(self, version: str | None = None) -> EndpointState | None:
        """The next eligible endpoint (round robin; of `version` only, if given), any endpoint (of it) in
        panic mode, None if there are none."""
        if version is not None:
            return self._pick_version(version)
        eps = self._endpoints
        n = len(eps)
        if self.detector.ejected == 0 and self._unhealthy == 0:
            if n == 0:
                return None
            i = self._rr
            self._rr = i + 1 if i + 1 < n else 0
            return eps[i]
        return self._pick_slow(eps, n)

    def _pick_slow(self, eps: list[EndpointState], n: int) -> EndpointState | None:
        if self.detector.ejected:
            self.detector.sweep(eps, self._clock())
        start = self._rr
        for k in range(n):
            j = start + k
            if j >= n:
                j -= n
            ep = eps[j]
            if ep.healthy and ep.ejected_until is None:
                self._rr = j + 1 if j + 1 < n else 0
                return ep
        if n == 0:
            return None
        self._rr = start + 1 if start + 1 < n else 0  # panic: nothing eligible, use every endpoint
        return eps[start]

    def _pick_version(self, version: str) -> EndpointState | None:
        eps = self._by_version.get(version)
        if not eps:
            return None
        if self.detector.ejected:
            self.detector.sweep(self._endpoints, self._clock())
        n = len(eps)
        start = self._rr_version.get(version, 0) % n
        for k in range(n):
            j = (start + k) % n
            ep = eps[j]
            if ep.healthy and ep.ejected_until is None:
                self._rr_version[version] = j + 1
                return ep
        self._rr_version[version] = start + 1  # panic within the version: nothing of it is eligible
        return eps[start]

    # -- outcomes -----------------------------------------------------------------------------
    def record(self, ep: EndpointState, outcome: Outcome) -> None:
        if outcome in HEALTHY:
            ep.consecutive_failures = 0
        elif outcome is not IGNORED:
            self.detector.on_failure(ep, self._endpoints)

    # -- discovery and health checks ----------------------------------------------------------
    def update(self, addresses: Iterable[str], versions: Mapping[str, str] = {}) -> None:
        """Replace the endpoint list, with each endpoint's version (`default_version` for one `versions`
        does not name); endpoints that remain keep their state."""
        old = self._by_address
        by_address: dict[str, EndpointState] = {}
        for address in addresses:
            if address not in by_address:
                ep = old.get(address)
                by_address[address] = ep if ep is not None else EndpointState(address)
        for address, ep in old.items():
            if address not in by_address:
                ep.removed = True
        endpoints = list(by_address.values())
        self._by_address = by_address
        self._endpoints = endpoints
        self._rr = self._rr % len(endpoints) if endpoints else 0
        self._unhealthy = sum(1 for ep in endpoints if not ep.healthy)
        self.versions = {ep.address: versions.get(ep.address, self.default_version) for ep in endpoints}
        by_version: dict[str, list[EndpointState]] = {}
        for ep in endpoints:
            by_version.setdefault(self.versions[ep.address], []).append(ep)
        self._by_version = by_version
        self.detector.recount(endpoints)

    def set_rules(self, rule: OutlierRule | None, health: HealthRule) -> None:
        """New outlier-detection and health-check rules (a live policy change), in place: the endpoints
        keep their failure runs, ejections (OutlierDetector.set_rule) and health. A health rule's
        thresholds apply from the next check: an endpoint's health turns only on a check."""
        self.health = health
        self.detector.set_rule(rule, self._endpoints)

    def report_check(self, endpoint: str, passed: bool) -> bool:
        """One active health check's result, counted against the HealthRule's thresholds.
        True when it changed the endpoint's health."""
        ep = self._by_address.get(endpoint)
        if ep is None:
            return False
        if passed:
            ep.check_streak = ep.check_streak + 1 if ep.check_streak > 0 else 1
            turn = not ep.healthy and ep.check_streak >= self.health.healthy_threshold
        else:
            ep.check_streak = ep.check_streak - 1 if ep.check_streak < 0 else -1
            turn = ep.healthy and -ep.check_streak >= self.health.unhealthy_threshold
        if turn:
            self.set_health(endpoint, passed)
        return turn

    def set_health(self, endpoint: str, healthy: bool) -> bool:
        """Mark an endpoint healthy or not at once (operators, tests); False if it is unknown."""
        ep = self._by_address.get(endpoint)
        if ep is None:
            return False
        if ep.healthy != healthy:
            ep.healthy = healthy
            self._unhealthy += -1 if healthy else 1
        return True

    # -- introspection ------------------------------------------------------------------------
    @property
    def endpoints(self) -> list[str]:
        return [ep.address for ep in self._endpoints]

    def state(self, endpoint: str) -> EndpointState | None:
        return self._by_address.get(endpoint)

    def snapshot(self) -> list[dict[str, object]]:
        """One dict per endpoint (endpoint, healthy, ejected, ejected_until, consecutive_failures,
        times_ejected, version: its canary version), for the admin /clusters endpoint."""
        eps = self._endpoints
        if self.detector.ejected:
            self.detector.sweep(eps, self._clock())
        return [{**ep.as_dict(), "version": self.versions.get(ep.address, self.default_version)} for ep in eps]


class BalancerLayer:
    """Per attempt: pick an endpoint into `call.endpoint`, call, report the outcome for outlier detection."""

    name = "balancer"

    def __init__(self, balancer: Balancer, classifier: Classifier = DEFAULT_CLASSIFIER) -> None:
        self.balancer = balancer
        self.classifier = classifier

    def wrap(self, inner: Handler) -> Handler:
        balancer, classify = self.balancer, self.classifier.classify
        no_endpoints = Reply("UNAVAILABLE", details=f"no endpoints for {balancer.service}",
                             local=LocalReason.NO_ENDPOINTS)

        async def handle(call: Call) -> Reply:
            if call.version is None and balancer.split is not None:
                call.version = balancer.choose_version()  # once per call: every attempt stays in it
            ep = balancer.pick(call.version)
            if ep is None:
                if call.version is not None:
                    return Reply("UNAVAILABLE", details=f"no endpoints of version {call.version} for "
                                 f"{balancer.service}", local=LocalReason.NO_ENDPOINTS)
                return no_endpoints
            call.endpoint = ep.address
            # An exception escaping `inner` is the caller's (see BreakerLayer): the endpoint is not charged.
            reply = await inner(call)
            if reply.ended is None:
                _judge(balancer, ep, classify(reply))
            else:  # a stream is judged by how it ends
                when_ended(reply, lambda final: _judge(balancer, ep, classify(final)))
            return reply

        return handle


def _judge(balancer: Balancer, ep: EndpointState, outcome: Outcome) -> None:
    """One attempt's outcome for outlier detection: a success resets the endpoint's failure run."""
    if outcome is SUCCESS or outcome is TRANSIENT:
        ep.consecutive_failures = 0
    elif outcome is not IGNORED:
        balancer.record(ep, outcome)
