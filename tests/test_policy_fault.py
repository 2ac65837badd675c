"""policy/fault.py: which rule a call gets, the two independent draws (seeded, so deterministic), the callers
a rule is limited to, and what mesh.yaml resolves into rules (config.resolve.fault_policies, policy.bind)."""

from __future__ import annotations

import dataclasses
from random import Random

import pytest

from aivo_mesh.config import parse_mesh
from aivo_mesh.config.resolve import fault_policies
from aivo_mesh.policy.bind import fault_rules
from aivo_mesh.policy.fault import Fault, FaultInjector, FaultRule
from aivo_mesh.policy.testing import FakeClock, FakeSleep

SVC = "/demo.Front/"
GET, PUT = "/demo.Front/Get", "/demo.Front/Put"
BACK = "spiffe://aivo.local/ns/default/sa/back"
OTHER = "spiffe://aivo.local/ns/default/sa/other"


class Draws(Random):
    """A random source that returns the given numbers in turn, and records how many were drawn."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self.values = list(values)
        self.drawn = 0

    def random(self) -> float:
        self.drawn += 1
        return self.values.pop(0)


def test_delay_and_abort_are_independent_draws_against_their_percentages() -> None:
    rule = FaultRule(SVC, abort_code="UNAVAILABLE", abort_percent=30, delay=0.2, delay_percent=50)
    # delay draw first, then the abort draw, for every call: the abort does not depend on the delay.
    cases = [((0.10, 0.10), Fault(0.2, "UNAVAILABLE")), ((0.60, 0.10), Fault(0.0, "UNAVAILABLE")),
             ((0.10, 0.31), Fault(0.2, None)), ((0.50, 0.30), None)]
    for draws, expected in cases:
        rng = Draws(*draws)
        assert FaultInjector([rule], rng=rng).decide(GET, None) == expected, draws
        assert rng.drawn == 2


def test_zero_and_hundred_percent_and_ok_never_or_always_fault() -> None:
    always = FaultInjector([FaultRule(SVC, abort_code="INTERNAL", abort_percent=100, delay=1, delay_percent=100)],
                           rng=Draws(0.999999, 0.999999))
    assert always.decide(GET, None) == Fault(1.0, "INTERNAL")
    for rule in (FaultRule(SVC, abort_code="INTERNAL", abort_percent=0, delay=1, delay_percent=0),
                 FaultRule(SVC, abort_code="OK", abort_percent=100),  # OK is no abort
                 FaultRule(SVC, delay=0.0, delay_percent=100)):
        rng = Draws()
        assert FaultInjector([rule], rng=rng).decide(GET, None) is None
        assert rng.drawn == 0  # nothing to draw: the random sequence of other calls is unchanged


def test_a_seeded_source_gives_the_same_faults_and_about_the_percentage() -> None:
    rule = FaultRule(SVC, abort_code="UNAVAILABLE", abort_percent=25, delay=0.1, delay_percent=10)

    def run(seed: int) -> list[Fault | None]:
        injector = FaultInjector([rule], rng=Random(seed))
        return [injector.decide(GET, None) for _ in range(4000)]

    first = run(7)
    assert first == run(7)
    aborts = sum(1 for f in first if f is not None and f.abort)
    delays = sum(1 for f in first if f is not None and f.delay)
    both = sum(1 for f in first if f is not None and f.abort and f.delay)
    # Generous bounds around 25 %, 10 % and their product (independent draws): 4000 calls, seed fixed.
    assert 850 <= aborts <= 1150 and 300 <= delays <= 500 and 60 <= both <= 150


def test_the_first_covering_rule_decides_and_other_services_methods_are_never_faulted() -> None:
    rules = [FaultRule(GET, abort_code="NOT_FOUND", abort_percent=100), FaultRule(PUT),
             FaultRule(SVC, abort_code="UNAVAILABLE", abort_percent=100)]
    injector = FaultInjector(rules, rng=Random(1))
    assert injector.decide(GET, None) == Fault(0.0, "NOT_FOUND")
    assert injector.decide(PUT, None) is None  # its route draws nothing: the service's fault is shadowed
    assert injector.decide("/demo.Front/List", None) == Fault(0.0, "UNAVAILABLE")
    for method in ("/grpc.health.v1.Health/Check", "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                   "/demo.Frontier/Get"):
        assert injector.rule_for(method) is None, method


def test_callers_limit_a_rule() -> None:
    rule = FaultRule(SVC, abort_code="UNAVAILABLE", abort_percent=100, callers=frozenset({BACK}))
    injector = FaultInjector([rule], rng=Random(1))
    assert injector.decide(GET, BACK) == Fault(0.0, "UNAVAILABLE")
    assert injector.decide(GET, OTHER) is None
    assert injector.decide(GET, None) is None  # no verified caller: not one of those named


async def test_the_delay_is_waited_with_the_injected_sleep() -> None:
    clock = FakeClock()
    sleep = FakeSleep(clock)
    injector = FaultInjector([FaultRule(SVC, delay=2.5, delay_percent=100)], rng=Random(1), sleep=sleep)
    fault = injector.decide(GET, None)
    assert fault == Fault(2.5, None)
    await injector.sleep(fault.delay)
    assert sleep.calls == [2.5] and clock() == 1002.5


def test_a_rule_refuses_impossible_values() -> None:
    with pytest.raises(ValueError, match="abort_percent"):
        FaultRule(SVC, abort_percent=101)
    with pytest.raises(ValueError, match="delay"):
        FaultRule(SVC, delay=-1)


MESH = """
services:
  - name: front
    grpc_service: demo.Front
    port: 7001
    local_port: 7101
    fault: {delay: 200ms, delay_percent: 50, callers: [back]}
    routes:
      - {match: /demo.Front/Get, fault: {abort_status: UNAVAILABLE, abort_percent: 100, callers: ["*"]}}
      - {match: /demo.Front/Put, fault: {delay_percent: 0}}
      - {match: /demo.Front/List}
  - name: back
    grpc_service: demo.Back
    port: 7002
    local_port: 7102
"""


def test_mesh_yaml_resolves_into_rules_in_match_order() -> None:
    mesh = parse_mesh(MESH, "mesh.yaml")
    policies = fault_policies(mesh, "front")
    assert [(p.pattern, p.match) for p in policies] == [
        (GET, GET), (PUT, PUT), ("/demo.Front/List", "/demo.Front/List"), (SVC, None)]
    rules = fault_rules(policies)
    # Get: the route's abort over the service's delay, key by key; `*`: every caller.
    assert rules[0] == FaultRule(GET, abort_code="UNAVAILABLE", abort_percent=100, delay=0.2, delay_percent=50)
    assert rules[1] == FaultRule(PUT, delay=0.2, delay_percent=0, callers=frozenset({BACK}))
    assert rules[2] == dataclasses.replace(rules[3], pattern="/demo.Front/List")  # no fault: the service's
    assert rules[3] == FaultRule(SVC, delay=0.2, delay_percent=50, callers=frozenset({BACK}))
    assert [p.active for p in policies] == [True, False, True, True]
    assert fault_policies(mesh, "back") == ()
