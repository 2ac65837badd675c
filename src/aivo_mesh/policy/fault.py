"""Fault injection on the server side: what Envoy's fault filter does on a sidecar's inbound listener.

Per call, after authorization and before the handler, `FaultInjector.decide` picks the first rule whose
pattern covers the method (rules come in match order, the service's own last) and, if the rule covers
the caller, makes two independent draws, as Envoy does: one against `delay_percent`, one against
`abort_percent`. The adapter (server/interceptors.py) waits the fault's delay with `sleep`, then answers
its `abort` status, if drawn, instead of calling the handler: the delay first, then the abort.
Only the service's own methods are faulted, never health checks or reflection: every rule's pattern is
under the service's prefix, and a method outside it gets no rule.

Pure Python: the random source and the sleep are injected (a seeded Random and policy.testing.FakeSleep
make the draws and the waits deterministic in tests).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from random import Random

from aivo_mesh.policy.retry import Sleeper

# What Envoy's fault filter answers an abort with (grpc-message), so both planes read the same.
ABORT_DETAILS = "fault filter abort"


@dataclass(frozen=True, slots=True)
class FaultRule:
    """The fault of the methods `pattern` covers. `callers`: the SPIFFE IDs it applies to (None: every
    caller, an unauthenticated one included). Percentages are 0-100."""

    pattern: str
    abort_code: str | None = None
    abort_percent: float = 0.0
    delay: float = 0.0
    delay_percent: float = 0.0
    callers: frozenset[str] | None = None

    def __post_init__(self) -> None:
        for name in ("abort_percent", "delay_percent"):
            if not 0.0 <= getattr(self, name) <= 100.0:
                raise ValueError(f"{name} must be within 0-100, got {getattr(self, name)!r}")
        if self.delay < 0:
            raise ValueError(f"delay must be >= 0, got {self.delay!r}")

    def applies_to(self, caller: str | None) -> bool:
        return self.callers is None or (caller is not None and caller in self.callers)


@dataclass(frozen=True, slots=True)
class Fault:
    """What to do to one call: wait `delay` seconds (0: not delayed), then answer `abort` (None: go on to
    the handler)."""

    delay: float = 0.0
    abort: str | None = None


class FaultInjector:
    """The fault rules of one server, replaced whole when the configuration changes (MeshServer)."""

    __slots__ = ("rng", "rules", "sleep")

    def __init__(self, rules: Sequence[FaultRule], *, rng: Random | None = None,
                 sleep: Sleeper = asyncio.sleep) -> None:
        self.rules = tuple(rules)
        self.rng = rng or Random()
        self.sleep = sleep

    def rule_for(self, method: str) -> FaultRule | None:
        """The first rule covering `method`; None for a method no rule covers (health, reflection)."""
        # A pattern ending in "/" is a prefix (config.patterns.covers, which this layer may not import).
        return next((r for r in self.rules
                     if method == r.pattern or (r.pattern.endswith("/") and method.startswith(r.pattern))), None)

    def decide(self, method: str, caller: str | None) -> Fault | None:
        """This call's fault (None: untouched). Two draws, even when the first one hits: the abort does
        not depend on the delay."""
        rule = self.rule_for(method)
        if rule is None or not rule.applies_to(caller):
            return None
        delayed = rule.delay > 0 and self._draw(rule.delay_percent)
        aborted = rule.abort_code not in (None, "OK") and self._draw(rule.abort_percent)
        if not (delayed or aborted):
            return None
        return Fault(rule.delay if delayed else 0.0, rule.abort_code if aborted else None)

    def _draw(self, percent: float) -> bool:
        # 0 never draws a number: a rule at 0 % leaves the random sequence of the others unchanged.
        return percent > 0 and self.rng.random() * 100.0 < percent
