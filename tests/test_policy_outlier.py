"""outlier.py + balancer.py: per-endpoint ejection, round robin over eligible endpoints, panic mode."""

from __future__ import annotations

import pytest

from aivo_mesh.config.model import OutlierDetectionSpec
from aivo_mesh.policy import bind
from aivo_mesh.policy.balancer import Balancer, BalancerLayer, HealthRule
from aivo_mesh.policy.classify import FAILURE, IGNORED, SUCCESS
from aivo_mesh.policy.core import Call, LocalReason, Reply
from aivo_mesh.policy.outlier import EndpointState, OutlierRule
from aivo_mesh.policy.testing import FakeClock, RecordingListener

SVC = "learner-svc"
A, B, C, D = "10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1", "10.0.0.4:1"


def balancer(clock: FakeClock, endpoints: list[str], listener: RecordingListener | None = None,
             **rule: float) -> Balancer:
    return Balancer(SVC, endpoints, rule=OutlierRule(**rule), clock=clock,  # type: ignore[arg-type]
                    listener=listener or RecordingListener())


def picks(b: Balancer, n: int) -> list[str]:
    out = []
    for _ in range(n):
        ep = b.pick()
        assert ep is not None
        out.append(ep.address)
    return out


def fail(b: Balancer, address: str, times: int = 5) -> None:
    ep = b.state(address)
    assert ep is not None
    for _ in range(times):
        b.record(ep, FAILURE)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_round_robin(clock: FakeClock) -> None:
    assert picks(balancer(clock, [A, B, C]), 6) == [A, B, C, A, B, C]


def test_ejected_endpoint_gets_no_picks_while_its_peer_serves(clock: FakeClock) -> None:
    listener = RecordingListener()
    b = balancer(clock, [A, B], listener)
    fail(b, A, 4)
    assert picks(b, 2) == [A, B]
    fail(b, A, 1)
    assert listener.named("endpoint_ejected") == [(SVC, A, 1.0)]  # the default rule's first ejection
    assert picks(b, 10) == [B] * 10


def test_success_resets_consecutive_failures_and_ignored_does_not_count(clock: FakeClock) -> None:
    b = balancer(clock, [A, B])
    ep = b.state(A)
    assert ep is not None
    fail(b, A, 4)
    b.record(ep, SUCCESS)
    fail(b, A, 4)
    for _ in range(10):
        b.record(ep, IGNORED)
    assert ep.consecutive_failures == 4
    assert not ep.ejected


@pytest.mark.parametrize(
    ("endpoints", "percent", "max_ejected"),
    [([A, B], 50.0, 1), ([A, B], 10.0, 0), ([A, B, C, D], 50.0, 2), ([A, B, C], 100.0, 3), ([A, B, C], 34.0, 1)],
)
def test_max_ejection_percent(clock: FakeClock, endpoints: list[str], percent: float, max_ejected: int) -> None:
    b = balancer(clock, endpoints, max_ejection_percent=percent)
    assert b.detector.rule is not None
    assert b.detector.rule.max_ejected(len(endpoints)) == max_ejected
    for address in endpoints:
        fail(b, address)
    assert sum(1 for s in b.snapshot() if s["ejected"]) == max_ejected


def test_uneject_after_the_ejection_time(clock: FakeClock) -> None:
    listener = RecordingListener()
    b = balancer(clock, [A, B], listener, base_ejection_time=30.0, max_ejection_time=300.0)
    fail(b, A)
    clock.advance(29.9)
    assert A not in picks(b, 4)
    clock.advance(0.1)
    assert sorted(picks(b, 2)) == [A, B]
    assert listener.named("endpoint_restored") == [(SVC, A)]


def test_ejection_time_grows_and_is_capped_and_forgiven(clock: FakeClock) -> None:
    listener = RecordingListener()
    b = balancer(clock, [A, B, C], listener, base_ejection_time=10.0, max_ejection_time=25.0, interval=10.0)
    for _ in range(3):
        fail(b, A)
        ep = b.state(A)
        assert ep is not None
        assert ep.ejected_until is not None
        clock.advance(ep.ejected_until - clock())
        b.pick()
    assert [e[2] for e in listener.named("endpoint_ejected")] == [10.0, 20.0, 25.0]
    ep = b.state(A)
    assert ep is not None
    assert ep.times_ejected == 3
    clock.advance(25.0)  # two intervals back in rotation forgive two ejections
    fail(b, A)
    assert listener.named("endpoint_ejected")[-1][2] == 20.0


def test_default_rule_starts_at_one_second_and_grows_by_one_per_ejection_in_a_row_to_sixty(
        clock: FakeClock) -> None:
    # mesh.yaml's defaults (1 s / 1 s / 60 s), as Envoy renders them: an endpoint that fails again as
    # soon as it returns is ejected for 1, 2, 3, ... s, then 60 s each time; one second back in
    # rotation per ejection forgives it.
    assert bind.outlier_rule(OutlierDetectionSpec()) == OutlierRule()
    listener = RecordingListener()
    b = balancer(clock, [A, B], listener)
    for _ in range(62):
        fail(b, A)
        ep = b.state(A)
        assert ep is not None and ep.ejected_until is not None
        clock.advance(ep.ejected_until - clock())
        b.pick()
    seconds = [e[2] for e in listener.named("endpoint_ejected")]
    assert seconds == [float(n) for n in range(1, 61)] + [60.0, 60.0]
    ep = b.state(A)
    assert ep is not None and ep.times_ejected == 61  # stops one past the cap, as Envoy's multiplier
    clock.advance(3.0)  # three intervals back in rotation forgive three: 61 - 3 + 1
    fail(b, A)
    assert listener.named("endpoint_ejected")[-1][2] == 59.0
    clock.advance(59.0)
    b.pick()
    clock.advance(58.0)  # forgiven all but one: the next ejection is 2 s
    fail(b, A)
    assert listener.named("endpoint_ejected")[-1][2] == 2.0


def test_rule_from_spec_and_validation() -> None:
    rule = bind.outlier_rule(OutlierDetectionSpec(base_ejection_time=30, max_ejection_time=10))
    assert rule.ejection_time(1) == 30.0  # the cap is never below the base (Envoy)
    assert rule.ejection_time(5) == 30.0
    assert rule.max_times == 2
    # Envoy counts while times * base < max + base: 10 s / 25 s stops at 4, 0.1 s / 0.3 s at 4.
    assert OutlierRule(base_ejection_time=10.0, max_ejection_time=25.0).max_times == 4
    assert OutlierRule(base_ejection_time=0.1, max_ejection_time=0.3).max_times == 4
    with pytest.raises(ValueError, match="max_ejection_percent"):
        OutlierRule(max_ejection_percent=150)


def test_health_checks_and_panic_mode(clock: FakeClock) -> None:
    b = balancer(clock, [A, B, C])
    assert b.set_health(B, False)
    assert not b.set_health("unknown:1", False)
    assert picks(b, 4) == [A, C, A, C]
    b.set_health(A, False)
    b.set_health(C, False)
    assert sorted(set(picks(b, 6))) == [A, B, C]  # nothing eligible: all endpoints (panic)
    b.set_health(B, True)
    assert picks(b, 3) == [B, B, B]


def test_update_keeps_the_state_of_remaining_endpoints(clock: FakeClock) -> None:
    b = balancer(clock, [A, B, C], max_ejection_percent=50.0)
    fail(b, A)
    b.set_health(C, False)
    ep_b = b.state(B)
    assert ep_b is not None
    fail(b, B, 2)
    b.update([A, B, D, D])
    assert b.endpoints == [A, B, D]
    a, b_state = b.state(A), b.state(B)
    assert a is not None
    assert a.ejected
    assert b_state is ep_b
    assert b_state.consecutive_failures == 2
    assert b.state(C) is None
    assert set(picks(b, 4)) == {B, D}
    b.update([A, B, C])  # C returns as a new endpoint, healthy
    c = b.state(C)
    assert c is not None
    assert c.healthy


def test_outcomes_for_a_removed_endpoint_are_ignored(clock: FakeClock) -> None:
    b = balancer(clock, [A, B])
    ep = b.pick()
    assert ep is not None
    assert ep.address == A
    b.update([B])
    for _ in range(10):
        b.record(ep, FAILURE)
    assert not ep.ejected
    assert b.detector.ejected == 0


def test_snapshot(clock: FakeClock) -> None:
    b = balancer(clock, [A, B])
    fail(b, A)
    snap = b.snapshot()
    assert snap[0] == {"endpoint": A, "healthy": True, "ejected": True, "ejected_until": clock() + 1.0,
                       "consecutive_failures": 0, "times_ejected": 1, "version": ""}
    assert set(snap[1]) == {"endpoint", "healthy", "ejected", "ejected_until", "consecutive_failures",
                            "times_ejected", "version"}


def test_no_endpoints(clock: FakeClock) -> None:
    assert balancer(clock, []).pick() is None


async def test_layer_picks_per_attempt_and_feeds_outlier_detection(clock: FakeClock) -> None:
    b = balancer(clock, [A, B])
    seen: list[str | None] = []

    async def upstream(call: Call) -> Reply:
        seen.append(call.endpoint)
        return Reply("UNAVAILABLE" if call.endpoint == A else "OK")

    handler = BalancerLayer(b).wrap(upstream)
    for _ in range(10):
        await handler(Call(SVC, "/m", None))
    assert seen == [A, B] * 5
    a = b.state(A)
    assert a is not None
    assert a.ejected
    for _ in range(4):
        await handler(Call(SVC, "/m", None))
    assert seen[10:] == [B] * 4


async def test_layer_without_endpoints_replies_locally(clock: FakeClock) -> None:
    async def upstream(call: Call) -> Reply:
        raise AssertionError("not called")

    reply = await BalancerLayer(balancer(clock, [])).wrap(upstream)(Call(SVC, "/m", None))
    assert (reply.code, reply.local) == ("UNAVAILABLE", LocalReason.NO_ENDPOINTS)


def test_endpoint_state_dict() -> None:
    ep = EndpointState(A)
    assert ep.eligible
    ep.healthy = False
    assert not ep.eligible


def test_health_checks_count_against_envoys_thresholds(clock: FakeClock) -> None:
    b = Balancer(SVC, [A, B], health=HealthRule(unhealthy_threshold=3, healthy_threshold=2), clock=clock)
    ep = b.state(B)
    assert ep is not None
    assert not b.report_check(B, False) and not b.report_check(B, False)
    assert not b.report_check(B, True)  # a pass breaks the streak of failures
    assert [b.report_check(B, False) for _ in range(3)] == [False, False, True]  # the change is reported once
    assert not ep.healthy and {b.pick().address for _ in range(4)} == {A}  # type: ignore[union-attr]
    assert not b.report_check(B, False)
    assert [b.report_check(B, True) for _ in range(3)] == [False, True, False]
    assert ep.healthy
    assert not b.report_check("unknown:1", False)
    with pytest.raises(ValueError, match="thresholds"):
        HealthRule(unhealthy_threshold=0)


def test_a_new_rule_keeps_ejections_and_failure_runs() -> None:
    """A live policy change (Balancer.set_rules): the endpoints keep their state; the new rule
    judges the next failure and, where an ejection outlasts the new longest one, ends it sooner."""
    clock = FakeClock()
    b = balancer(clock, [A, B, C, D], consecutive_failures=2, base_ejection_time=30.0, max_ejection_time=300.0)
    fail(b, A, 2)
    fail(b, B, 1)
    a, bb = b.state(A), b.state(B)
    assert a is not None and bb is not None and a.ejected_until == clock() + 30.0
    b.set_rules(OutlierRule(consecutive_failures=3, base_ejection_time=30.0, max_ejection_time=300.0,
                            max_ejection_percent=50.0), HealthRule(unhealthy_threshold=1))
    assert (a.ejected_until, a.times_ejected, bb.consecutive_failures) == (clock() + 30.0, 1, 1)
    fail(b, B, 1)
    assert not bb.ejected  # 2 in a row: enough before, not under the new rule
    fail(b, B, 1)
    assert bb.ejected
    assert b.health == HealthRule(unhealthy_threshold=1)
    # A lower max_ejection_time: an ejection longer than the new longest ends that far from now.
    clock.advance(5.0)
    b.set_rules(OutlierRule(consecutive_failures=3, base_ejection_time=5.0, max_ejection_time=10.0), HealthRule())
    assert (a.ejected_until, bb.ejected_until) == (clock() + 10.0, clock() + 10.0)
    assert b.detector.next_expiry == clock() + 10.0


def test_a_lower_max_ejection_percent_returns_no_one_and_ejects_no_one_more() -> None:
    clock = FakeClock()
    b = balancer(clock, [A, B, C, D], consecutive_failures=1, base_ejection_time=30.0)
    fail(b, A, 1)
    fail(b, B, 1)
    b.set_rules(OutlierRule(consecutive_failures=1, base_ejection_time=30.0, max_ejection_percent=25.0),
                HealthRule())
    assert b.detector.ejected == 2  # over the new 25 % of 4 = 1: they stay until their time
    fail(b, C, 1)
    assert not b.state(C).ejected  # type: ignore[union-attr]
    clock.advance(30.0)
    assert [e["ejected"] for e in b.snapshot()] == [False] * 4


def test_turning_outlier_detection_off_returns_the_ejected_endpoints() -> None:
    clock = FakeClock()
    listener = RecordingListener()
    b = balancer(clock, [A, B], listener, consecutive_failures=1, base_ejection_time=30.0)
    fail(b, A, 1)
    assert b.detector.ejected == 1
    b.set_rules(None, HealthRule())
    a = b.state(A)
    assert a is not None and a.ejected_until is None and b.detector.ejected == 0
    assert listener.named("endpoint_restored") == [(SVC, A)]
    fail(b, A, 7)
    assert not a.ejected  # nothing judges it any more

