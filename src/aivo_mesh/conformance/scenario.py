"""Conformance scenarios: one policy, the same observable behaviour on every plane.

A scenario (scenarios.yaml) is data: a mesh.yaml fragment for the called service (auth-svc) and the
mesh-wide defaults, then phases, each a server behaviour (what auth-svc's app does with each attempt), a
traffic plan (how many calls of which method, how many at once) and the expected outcome (status codes,
attempts that reached the app per call, time bounds, which instances answered). learner-svc is the caller.

The same scenario runs on every plane (planes.py); an outcome that differs from the expectation fails
with a table of what each plane did. A plane that cannot express a policy lists it under `divergences`
with the reason and the outcome it gives instead: that outcome is checked too, so a divergence that
closes, or changes, fails until the scenario says so.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCENARIOS = Path(__file__).with_name("scenarios.yaml")
SERVICE = "aivo.auth.v1.AuthService"

# plane -> (caller side, called side, on the control plane): planes.py runs each.
PLANES: dict[str, tuple[str, str, bool]] = {
    "proxyless": ("proxyless", "proxyless", False),
    "proxyless-xds": ("proxyless", "proxyless", True),
    "sidecar": ("sidecar", "sidecar", True),
    "proxyless-to-sidecar": ("proxyless", "sidecar", True),
    "sidecar-to-proxyless": ("sidecar", "proxyless", True),
    "grpc-xds": ("grpc-xds", "proxyless", True),
}


@dataclass(frozen=True)
class Behaviour:
    """What the called app does with one attempt: optionally wait `delay` s, then fail with `fail` (a
    status name) or answer. `attempts`: only the first n attempts of each call do so (None: every one);
    later attempts answer at once. `instances`: only these instances misbehave (None: all)."""

    fail: str | None = None
    delay: float = 0.0
    attempts: int | None = None
    instances: tuple[str, ...] | None = None
    pushback_ms: int | None = None

    def applies(self, attempt: int, instance: str) -> bool:
        return ((self.attempts is None or attempt <= self.attempts)
                and (self.instances is None or instance in self.instances))


@dataclass(frozen=True)
class Expect:
    """What a phase's calls must show (only the keys given are checked)."""

    codes: Mapping[str, int] | None = None  # calls ending with each status, exactly
    codes_at_least: Mapping[str, int] | None = None
    attempts: int | None = None  # attempts that reached the app, for every call
    mean_attempts_at_most: float | None = None  # over the phase's calls
    reached_at_most: int | None = None  # attempts that reached the app in all, at most
    reached_between: tuple[int, int] | None = None
    seconds_at_least: float | None = None  # every call's duration
    seconds_at_most: float | None = None
    details_contain: str | None = None  # in every failed call's details
    trailer: str | None = None  # every failed call carries this trailing metadata key
    ok_within: float | None = None  # `recover` phases: a call succeeds within this many seconds
    share: Mapping[str, tuple[float, float]] | None = None  # fraction of answered calls per instance


@dataclass(frozen=True)
class Phase:
    name: str
    server: Behaviour
    expect: Expect
    calls: int = 1
    concurrency: int = 1
    method: str = "ValidateToken"
    recover: bool = False  # call every 50 ms until one succeeds (or `ok_within` passes)
    stop_instance: str | None = None  # this instance stops serving when the phase begins
    # This instance leaves mesh.yaml's endpoints when the phase begins, still serving: `meshctl apply` where
    # a control plane runs, `MeshClient.apply_policies` on the plane that reads mesh.yaml.
    remove_instance: str | None = None
    change: Mapping[str, Any] | None = None  # auth-svc's keys set to these values (applied live as `remove_instance`)
    settle: int = 0  # calls made first and not counted (a change still reaching the caller's balancer)


@dataclass(frozen=True)
class Divergence:
    planes: tuple[str, ...]
    reason: str
    phases: Mapping[str, Expect]  # phase name -> what those planes show instead
    lint: str  # what `meshctl lint` says about the scenario's mesh.yaml (a part of its warning)


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    policy: Mapping[str, Any]  # auth-svc's service-level keys (timeout, retry, limits, fault, ...)
    defaults: Mapping[str, Any]
    routes: tuple[Mapping[str, Any], ...]
    allow: tuple[Mapping[str, Any], ...] | None  # None: learner-svc and mesh-client may call anything
    instances: tuple[str, ...]  # auth-svc instances (endpoints), by name
    versions: Mapping[str, str]  # instance -> version (canary)
    phases: tuple[Phase, ...]
    divergences: tuple[Divergence, ...] = ()
    planes: tuple[str, ...] | None = None  # None: every plane

    def expectation(self, plane: str, phase: Phase) -> tuple[Expect, Divergence | None]:
        for d in self.divergences:
            if plane in d.planes and phase.name in d.phases:
                return d.phases[phase.name], d
        return phase.expect, None


# -- loading ---------------------------------------------------------------------------------------------

def _strict(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{SCENARIOS.name}: {where}: unknown keys {sorted(unknown)} (expected {sorted(known)})")
    return dict(data)


def _expect(data: Mapping[str, Any], where: str) -> Expect:
    d = _strict(Expect, data, where)
    for key in ("reached_between",):
        if key in d:
            d[key] = tuple(d[key])
    if "share" in d:
        d["share"] = {k: (float(v[0]), float(v[1])) for k, v in d["share"].items()}
    return Expect(**d)


def _phase(data: Mapping[str, Any], where: str) -> Phase:
    d = _strict(Phase, data, where)
    server = _strict(Behaviour, d.get("server") or {}, f"{where}.server")
    if "instances" in server:
        server["instances"] = tuple(server["instances"])
    d["server"] = Behaviour(**server)
    d["expect"] = _expect(d.get("expect") or {}, f"{where}.expect")
    return Phase(**d)


def load(path: Path = SCENARIOS) -> list[Scenario]:
    scenarios = []
    for i, raw in enumerate(yaml.safe_load(path.read_text())["scenarios"]):
        where = f"scenarios[{i}]"
        d = _strict(Scenario, raw, where)
        d.setdefault("policy", {})
        d.setdefault("defaults", {})
        d["routes"] = tuple(d.get("routes") or ())
        d["allow"] = tuple(d["allow"]) if d.get("allow") is not None else None
        d["instances"] = tuple(d.get("instances") or ("a",))
        d["versions"] = dict(d.get("versions") or {})
        d["phases"] = tuple(_phase(p, f"{where}.phases[{j}]") for j, p in enumerate(d["phases"]))
        names = {p.name for p in d["phases"]}
        divergences = []
        for j, div in enumerate(d.get("divergences") or ()):
            dd = _strict(Divergence, div, f"{where}.divergences[{j}]")
            unknown = set(dd["phases"]) - names
            if unknown:
                raise ValueError(f"{where}.divergences[{j}]: unknown phases {sorted(unknown)}")
            divergences.append(Divergence(planes=tuple(dd["planes"]), reason=dd["reason"], lint=dd["lint"],
                                          phases={k: _expect(v, f"{where}.divergences[{j}].{k}")
                                                  for k, v in dd["phases"].items()}))
        d["divergences"] = tuple(divergences)
        if d.get("planes") is not None:
            d["planes"] = tuple(d["planes"])
        scenarios.append(Scenario(**d))
    return scenarios


# -- outcomes ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """One call as its caller saw it, and what reached the app for it."""

    code: str
    details: str
    seconds: float
    attempts: int  # attempts that reached an app instance
    answered_by: str | None  # the instance whose answer the caller got
    trailers: tuple[str, ...] = ()  # trailing metadata keys


@dataclass
class PhaseResult:
    outcomes: list[Outcome] = field(default_factory=list)
    reached: int = 0  # attempts that reached the app during the phase
    recovered_after: float | None = None  # `recover` phases: seconds until a call succeeded

    def summary(self) -> str:
        codes = Counter(o.code for o in self.outcomes)
        text = " ".join(f"{c}x{n}" for c, n in sorted(codes.items()))
        if self.outcomes:
            text += (f"; attempts/call {statistics.fmean(o.attempts for o in self.outcomes):.2f}; "
                     f"reached {self.reached}; {min(o.seconds for o in self.outcomes):.2f}-"
                     f"{max(o.seconds for o in self.outcomes):.2f}s")
            answered = Counter(o.answered_by for o in self.outcomes if o.answered_by)
            if len(answered) > 1:
                text += "; " + " ".join(f"{k}:{v}" for k, v in sorted(answered.items()))
        if self.recovered_after is not None:
            text += f"; ok after {self.recovered_after:.2f}s"
        details = sorted({o.details for o in self.outcomes if o.code != "OK"})
        if details:
            text += f"; e.g. {details[0][:100]!r}"
        return text


def check(expect: Expect, result: PhaseResult) -> list[str]:
    """Each expectation `result` misses, said plainly; [] when it meets them all."""
    out = result.outcomes
    problems = []
    codes = Counter(o.code for o in out)
    if expect.codes is not None and dict(codes) != dict(expect.codes):
        problems.append(f"codes {dict(codes)} != {dict(expect.codes)}")
    for code, n in (expect.codes_at_least or {}).items():
        if codes[code] < n:
            problems.append(f"{code} x{codes[code]} < {n}")
    if expect.attempts is not None and any(o.attempts != expect.attempts for o in out):
        problems.append(f"attempts per call {sorted(Counter(o.attempts for o in out).items())} != {expect.attempts}")
    if expect.mean_attempts_at_most is not None and out:
        mean = statistics.fmean(o.attempts for o in out)
        if mean > expect.mean_attempts_at_most:
            problems.append(f"mean attempts per call {mean:.2f} > {expect.mean_attempts_at_most}")
    if expect.reached_at_most is not None and result.reached > expect.reached_at_most:
        problems.append(f"{result.reached} attempts reached the app > {expect.reached_at_most}")
    if expect.reached_between is not None:
        low, high = expect.reached_between
        if not low <= result.reached <= high:
            problems.append(f"{result.reached} attempts reached the app, not in [{low}, {high}]")
    if expect.seconds_at_least is not None and any(o.seconds < expect.seconds_at_least for o in out):
        problems.append(f"a call took {min(o.seconds for o in out):.3f}s < {expect.seconds_at_least}s")
    if expect.seconds_at_most is not None and any(o.seconds > expect.seconds_at_most for o in out):
        problems.append(f"a call took {max(o.seconds for o in out):.3f}s > {expect.seconds_at_most}s")
    failed = [o for o in out if o.code != "OK"]
    if expect.details_contain is not None:
        bad = [o.details for o in failed if expect.details_contain not in o.details]
        if bad:
            problems.append(f"details without {expect.details_contain!r}: {bad[:3]}")
    if expect.trailer is not None and any(expect.trailer not in o.trailers for o in failed):
        problems.append(f"a failed call without the {expect.trailer} trailer")
    if expect.ok_within is not None and (result.recovered_after is None or result.recovered_after > expect.ok_within):
        problems.append(f"no call succeeded within {expect.ok_within}s")
    if expect.share is not None:
        answered = [o.answered_by for o in out if o.answered_by]
        for instance, (least, most) in expect.share.items():
            share = answered.count(instance) / len(answered) if answered else 0.0
            if not least <= share <= most:
                problems.append(f"{instance} answered {share:.3f} of calls, not in [{least}, {most}]")
    return problems


def table(scenario: Scenario, results: Mapping[str, Mapping[str, PhaseResult]],
          problems: Mapping[str, Sequence[str]]) -> str:
    """Plane by phase: what each plane did, and what it missed."""
    lines = [f"scenario {scenario.name}: {scenario.summary}"]
    for plane, phases in results.items():
        for phase in scenario.phases:
            if phase.name in phases:
                lines.append(f"  {plane:<22} {phase.name:<14} {phases[phase.name].summary()}")
        lines += [f"  {plane:<22} !! {p}" for p in problems.get(plane, ())]
    return "\n".join(lines)


# -- the table docs/planes.md carries ---------------------------------------------------------------------

TABLE_BEGIN = "<!-- conformance table: generated by `meshctl conformance --docs docs/planes.md`; do not edit -->"
TABLE_END = "<!-- end of conformance table -->"


def markdown_table(scenarios: Sequence[Scenario], planes: Sequence[str]) -> str:
    """One row per scenario, one column per plane: `same` where the plane shows the scenario's expected
    outcome, else the documented divergence's reason."""
    lines = [TABLE_BEGIN, "", "| scenario | " + " | ".join(f"`{p}`" for p in planes) + " |",
             "|---|" + "---|" * len(planes)]
    for s in scenarios:
        cells = []
        for plane in planes:
            if s.planes is not None and plane not in s.planes:
                cells.append("not run")
                continue
            reasons = [d.reason for d in s.divergences if plane in d.planes]
            cells.append("differs: " + "; ".join(reasons) if reasons else "same")
        lines.append(f"| **{s.name}**: {s.summary} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", TABLE_END])


def docs_with_table(text: str, table_text: str) -> str:
    """`text` (docs/planes.md) with its conformance table replaced by `table_text`."""
    head, sep, rest = text.partition(TABLE_BEGIN)
    _, sep2, tail = rest.partition(TABLE_END)
    if not (sep and sep2):
        raise ValueError(f"the document has no conformance table between {TABLE_BEGIN!r} and {TABLE_END!r}")
    return head + table_text + tail
