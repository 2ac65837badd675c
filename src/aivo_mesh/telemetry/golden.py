"""Golden metrics (success rate, requests per second, p50/p95/p99 latency) from the processes' own
cumulative metrics: parsing, counter deltas over a window, and histogram quantiles.

Pure: no I/O, no grpc, no clock of its own (every time is given). `runtime/observer.py` samples the
processes and keeps the samples; `meshctl status/routes/edges` read what it computes.

    sample     one process's cumulative counters at one instant: per (side, service, method) the calls,
               the failed calls and the latency histogram's cumulative buckets (MeshServer/MeshClient
               `grpc_requests_total` and `grpc_request_duration_seconds`, telemetry/metrics.py), plus
               the rate-limit refusals (`grpc_rate_limited_total`, the sidecar's
               `http_local_rate_limit.rate_limited`)
    window     the first and the last sample of a process inside [now - window, now]; every figure is
               the difference between them (a counter that went down is a restarted process: its new
               value is the delta, as Prometheus' rate() does)
    success    a call that ended OK; any other status (an application error, a deadline, a breaker's
               CIRCUIT_OPEN, a LOCAL_* answer) is a failure, as gRPC's and Envoy's grpc_stats count it
    quantile   Prometheus' histogram_quantile: linear interpolation inside the bucket holding the rank;
               a rank in the +Inf bucket gives the highest finite bound (a floor, not a measurement)
    no calls   rps 0 and success_rate / percentiles null: never a bucket bound pretending to be a latency

Health probes (`/grpc.health.v1.Health/*`) are left out: the observer itself probes every service.
(golden_terms.py holds both definitions; the Grafana dashboard, render/grafana.py, queries by them too.)
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from aivo_mesh.golden_terms import HEALTH_PREFIX, SUCCESS

SIDES = ("server", "client")
INF = float("inf")
QUANTILES = (("p50_ms", 0.50), ("p95_ms", 0.95), ("p99_ms", 0.99))
# Buckets: cumulative (upper bound in seconds, count), ascending, the last one +Inf.
Buckets = tuple[tuple[float, float], ...]
# (side, service, method). server: the process's own service; client: the target it called.
CallKey = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class Calls:
    """Cumulative (or, after `delta`, windowed) counts of one series of calls."""

    requests: float = 0.0
    failures: float = 0.0
    buckets: Buckets = ()

    def __add__(self, other: Calls) -> Calls:
        return Calls(self.requests + other.requests, self.failures + other.failures,
                     _add_buckets(self.buckets, other.buckets))


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """What one service's processes (its app, and its sidecar where one runs) had counted at one instant."""

    calls: Mapping[CallKey, Calls] = field(default_factory=dict)
    rate_limited: float = 0.0


@dataclass(frozen=True, slots=True)
class MeshSample:
    """Every service's sample taken in one round (`at`: unix seconds). A service missing from
    `services` could not be read in that round."""

    at: float
    services: Mapping[str, ProcessSample]


# -- parsing -----------------------------------------------------------------------------------------

def parse_metrics(text: str) -> ProcessSample:
    """A MeshServer/MeshClient Prometheus text exposition (an admin `/metrics`) as a sample.
    ValueError when it is not one."""
    requests: dict[CallKey, float] = {}
    failures: dict[CallKey, float] = {}
    buckets: dict[CallKey, dict[float, float]] = {}
    rate_limited = 0.0
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = s.labels
                if s.name == "grpc_rate_limited_total":
                    rate_limited += s.value
                    continue
                method = labels.get("method", "")
                if method.startswith(HEALTH_PREFIX) or labels.get("side") not in SIDES:
                    continue
                key = (labels["side"], labels.get("service", "unknown"), method)
                if s.name == "grpc_requests_total":
                    requests[key] = requests.get(key, 0.0) + s.value
                    if labels.get("status") != SUCCESS:
                        failures[key] = failures.get(key, 0.0) + s.value
                elif s.name == "grpc_request_duration_seconds_bucket" and "le" in labels:
                    bound = float(labels["le"])  # "+Inf" parses as inf
                    into = buckets.setdefault(key, {})
                    into[bound] = into.get(bound, 0.0) + s.value
    except (ValueError, KeyError) as exc:
        raise ValueError(f"not a Prometheus text exposition: {exc}") from None
    calls = {key: Calls(requests.get(key, 0.0), failures.get(key, 0.0),
                        tuple(sorted(buckets.get(key, {}).items())))
             for key in requests.keys() | buckets.keys()}
    return ProcessSample(calls=calls, rate_limited=rate_limited)


def envoy_values(stats: Any) -> dict[str, float]:
    """Counters and gauges of Envoy's `/stats?format=json` document (parsed), by stat name.
    ValueError when it is not that document."""
    if not isinstance(stats, dict) or not isinstance(stats.get("stats"), list):
        raise ValueError("expected Envoy's /stats?format=json document")
    return {str(s["name"]): float(s["value"]) for s in stats["stats"]
            if isinstance(s, dict) and "name" in s and isinstance(s.get("value"), int | float)}


def envoy_rate_limited(values: Mapping[str, float]) -> float:
    """Calls a sidecar's local rate limits refused (every `<prefix>.http_local_rate_limit.rate_limited`)."""
    return sum(v for name, v in values.items() if name.endswith(".http_local_rate_limit.rate_limited"))


def envoy_histograms(stats: Any) -> dict[str, Buckets]:
    """Histograms of `/stats?format=json&histogram_buckets=cumulative` (parsed): cumulative buckets in
    Envoy's unit (milliseconds for `*_rq_time`), +Inf added with the last count."""
    out: dict[str, Buckets] = {}
    for entry in stats.get("stats", []) if isinstance(stats, dict) else []:
        hists = entry.get("histograms") if isinstance(entry, dict) else None
        if not isinstance(hists, list):  # without histogram_buckets=cumulative: computed quantiles only
            continue
        for h in hists:
            pairs = [(float(b["upper_bound"]), float(b["cumulative"])) for b in h.get("buckets", [])]
            if pairs:
                out[str(h["name"])] = (*pairs, (INF, pairs[-1][1]))
    return out


# -- window arithmetic -------------------------------------------------------------------------------

def _add_buckets(a: Buckets, b: Buckets) -> Buckets:
    if not a:
        return b
    if not b:
        return a
    merged: dict[float, float] = dict(a)
    for bound, count in b:
        merged[bound] = merged.get(bound, 0.0) + count
    return tuple(sorted(merged.items()))


def delta(first: Calls | None, last: Calls) -> Calls:
    """The calls between two samples of one series. A series absent from `first` started after it
    (prometheus_client creates a series at its first call), so all of `last` is new; a count that went
    down is a process that restarted in between, so its new value is what it counted since."""
    if first is None or last.requests < first.requests:
        return last
    before = dict(first.buckets)
    return Calls(last.requests - first.requests, max(0.0, last.failures - first.failures),
                 tuple((bound, max(0.0, count - before.get(bound, 0.0))) for bound, count in last.buckets))


def quantile(q: float, buckets: Buckets) -> float | None:
    """Prometheus' histogram_quantile over cumulative `buckets` (any unit; the result is in it). None
    without observations."""
    if not 0 < q <= 1:
        raise ValueError(f"quantile must be in (0, 1], not {q}")
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for i, (bound, count) in enumerate(buckets):
        if count >= rank:
            if bound == INF:
                # Beyond the highest finite bound: that bound is all a histogram can say.
                return buckets[i - 1][0] if i > 0 else None
            if i == 0 and bound <= 0:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return None


def golden(calls: Calls, seconds: float) -> dict[str, Any]:
    """GOLDEN: requests, rps, success_rate and p50/p95/p99 in ms of `calls` over `seconds`."""
    requests = round(calls.requests)
    out: dict[str, Any] = {"requests": requests,
                           "rps": round(calls.requests / seconds, 3) if seconds > 0 else 0.0,
                           "success_rate": round((calls.requests - calls.failures) / calls.requests, 4)
                           if requests > 0 else None}
    for name, q in QUANTILES:
        value = quantile(q, calls.buckets) if requests > 0 else None
        out[name] = None if value is None else round(value * 1000, 3)
    return out


EMPTY_GOLDEN: dict[str, Any] = golden(Calls(), 0.0)


@dataclass(frozen=True, slots=True)
class WindowDeltas:
    """Per service: what happened between its first and last sample in a window, and how long that was."""

    calls: Mapping[str, Mapping[CallKey, Calls]]
    rate_limited: Mapping[str, float]
    seconds: Mapping[str, float]


def window_deltas(samples: Sequence[MeshSample], start: float, end: float) -> WindowDeltas:
    """Per service, the deltas between its first and last sample with start <= at <= end (a service read
    in fewer than two of them has none). A service that was not readable in an earlier round and first read
    inside the window came up meanwhile: its counts start from zero at that earlier round, so the calls it
    answered before its first read (right after `meshctl up`) are in the window, not in a baseline."""
    firsts: dict[str, tuple[float, ProcessSample | None]] = {}
    lasts: dict[str, tuple[float, ProcessSample]] = {}
    absent: dict[str, float] = {}  # a service never read yet: the last round it was missing from
    ever: set[str] = set()
    names = {name for s in samples for name in s.services}
    for s in samples:
        for name in names - ever:
            if name not in s.services:
                absent[name] = s.at
        born = {name for name in s.services if name not in ever and name in absent}
        ever |= set(s.services)
        if not start <= s.at <= end:
            continue
        for name, sample in s.services.items():
            if name in born and name not in firsts:
                firsts[name] = (max(start, absent[name]), None)  # from zero
            firsts.setdefault(name, (s.at, sample))
            lasts[name] = (s.at, sample)
    calls: dict[str, dict[CallKey, Calls]] = {}
    limited: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for name, (t1, last) in lasts.items():
        t0, first = firsts[name]
        if t1 <= t0:
            continue
        seconds[name] = t1 - t0
        calls[name] = {k: delta(first.calls.get(k) if first else None, c) for k, c in last.calls.items()}
        before = first.rate_limited if first else 0.0
        limited[name] = last.rate_limited - before if last.rate_limited >= before else last.rate_limited
    return WindowDeltas(calls, limited, seconds)


def _sum(calls: Iterable[Calls]) -> Calls:
    total = Calls()
    for c in calls:
        total = total + c
    return total


def service_golden(deltas: WindowDeltas, service: str, side: str) -> dict[str, Any]:
    """GOLDEN of `service`'s own calls on `side`: as a server (calls it answered), as a client (calls it made)."""
    mine = deltas.calls.get(service, {})
    return golden(_sum(c for (s, _, _), c in mine.items() if s == side), deltas.seconds.get(service, 0.0))


def routes(deltas: WindowDeltas) -> list[dict[str, Any]]:
    """Per service and method: the server side (the service's own count) and the client side (its callers'
    counts of calls to it, summed over the sampled callers)."""
    server: dict[tuple[str, str], list[tuple[Calls, float]]] = {}
    client: dict[tuple[str, str], list[tuple[Calls, float]]] = {}
    for process, series in deltas.calls.items():
        seconds = deltas.seconds[process]
        for (side, service, method), c in series.items():
            if side == "server" and service == process:
                server.setdefault((service, method), []).append((c, seconds))
            elif side == "client":
                client.setdefault((service, method), []).append((c, seconds))
    rows = []
    for side, found in (("server", server), ("client", client)):
        for (service, method), parts in found.items():
            rows.append({"service": service, "route": method, "side": side, "golden": _golden_of(parts)})
    return sorted(rows, key=lambda r: (r["service"], r["route"], r["side"] != "server"))


def edges(deltas: WindowDeltas, identities: Mapping[str, str]) -> list[dict[str, Any]]:
    """Who calls whom: per sampled caller and target, the caller's count of its calls (caller_identity:
    the caller's SPIFFE ID, from `identities`)."""
    found: dict[tuple[str, str], Calls] = {}
    for process, series in deltas.calls.items():
        for (side, target, _), c in series.items():
            if side == "client":
                found[(process, target)] = found.get((process, target), Calls()) + c
    return [{"from": caller, "to": target, "caller_identity": identities.get(caller),
             "golden": golden(c, deltas.seconds[caller])}
            for (caller, target), c in sorted(found.items())]


def _golden_of(parts: Sequence[tuple[Calls, float]]) -> dict[str, Any]:
    """GOLDEN of series summed over processes: rps adds each process's own rate (their windows differ
    by up to one sampling round)."""
    total = _sum(c for c, _ in parts)
    g = golden(total, max(s for _, s in parts))
    g["rps"] = round(sum(c.requests / s for c, s in parts if s > 0), 3)
    return g


def history(samples: Sequence[MeshSample], service: str, start: float, end: float, step: float,
            route: str | None = None, side: str = "server") -> list[dict[str, Any]]:
    """Points every `step` seconds from start to end: the golden figures of `service` over the step before
    each point (only `route` when given; side "client": its callers' calls to it)."""
    points = []
    t = start + step
    while t <= end + 1e-9:
        deltas = window_deltas(samples, t - step, t)
        parts = []
        for process, series in deltas.calls.items():
            picked = [c for (s, svc, m), c in series.items()
                      if s == side and svc == service and (route is None or m == route)
                      and (side == "client" or process == service)]
            if picked:
                parts.append((_sum(picked), deltas.seconds[process]))
        g = _golden_of(parts) if parts else dict(EMPTY_GOLDEN)
        points.append({"t": round(t, 3), **{k: g[k] for k in ("rps", "success_rate", "p50_ms", "p95_ms",
                                                                "p99_ms")}})
        t += step
    return points


# -- the ring of samples -----------------------------------------------------------------------------

class SampleRing:
    """The last `span` seconds of samples taken every `interval` seconds: at most span/interval + 2 of
    them, so memory is bounded whatever runs."""

    def __init__(self, span: float = 900.0, interval: float = 2.0) -> None:
        if span <= 0 or interval <= 0:
            raise ValueError("span and interval must be positive")
        self.span = span
        self.interval = interval
        self._samples: deque[MeshSample] = deque(maxlen=math.ceil(span / interval) + 2)

    def add(self, sample: MeshSample) -> None:
        self._samples.append(sample)
        while self._samples and self._samples[0].at < sample.at - self.span - self.interval:
            self._samples.popleft()

    def __len__(self) -> int:
        return len(self._samples)

    def __iter__(self) -> Iterator[MeshSample]:
        return iter(self._samples)

    def samples(self) -> list[MeshSample]:
        return list(self._samples)


_WINDOW_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {None: 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "ms": 0.001}


def parse_window(text: str | float) -> float:
    """Seconds of a window given as 60, 60s, 1m, 1.5m or 1h. ValueError otherwise."""
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        m = _WINDOW_RE.match(text)
        if m is None:
            raise ValueError(f"window {text!r}: expected seconds or a duration such as 30s, 1m, 15m")
        seconds = float(m.group(1)) * _UNIT[m.group(2)]
    if seconds <= 0:
        raise ValueError(f"window {text!r}: expected a positive duration")
    return seconds
