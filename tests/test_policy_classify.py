"""classify.py: one table decides retryable / failure / ignored for retry, breaker and outlier."""

from __future__ import annotations

import pytest

from aivo_mesh.policy.classify import (
    FAILURE,
    HEALTHY,
    IGNORED,
    RETRYABLE,
    SUCCESS,
    TRANSIENT,
    Classifier,
    retryable_codes,
)
from aivo_mesh.policy.core import LocalReason, Reply
from aivo_mesh.status import DEFAULT_FAILURE_CODES, GRPC_STATUS_NAMES

RETRY_ON = ("UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")


def test_default_table() -> None:
    c = Classifier.for_route(("UNAVAILABLE",), idempotent=False)
    assert set(c.table) == set(GRPC_STATUS_NAMES)
    assert c.of("OK") is SUCCESS
    assert c.of("UNAVAILABLE") is RETRYABLE
    for code in ("DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN", "DATA_LOSS"):
        assert c.of(code) is FAILURE, code
    assert c.of("CANCELLED") is IGNORED
    # Business errors: the upstream answered, so it is healthy.
    for code in ("INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "FAILED_PRECONDITION", "UNAUTHENTICATED"):
        assert c.of(code) is SUCCESS, code


@pytest.mark.parametrize(
    ("idempotent", "expected"),
    [(False, {"UNAVAILABLE"}), (True, set(RETRY_ON))],
)
def test_non_not_processed_codes_only_retryable_when_idempotent(idempotent: bool, expected: set[str]) -> None:
    c = Classifier.for_route(RETRY_ON, idempotent=idempotent)
    assert c.retryable == expected
    assert retryable_codes(RETRY_ON, idempotent=idempotent) == expected
    # Not retryable on a non-idempotent route, INTERNAL still counts as a failure.
    assert c.of("INTERNAL") is (RETRYABLE if idempotent else FAILURE)


def test_failures_are_the_failure_codes_alone_whatever_a_route_retries() -> None:
    # One breaker serves every method of a service: what counts against it cannot depend on the method.
    idem = Classifier.for_route(("UNAVAILABLE", "RESOURCE_EXHAUSTED"), idempotent=True,
                                failure_codes=("INTERNAL", "UNAVAILABLE"))
    plain = Classifier.for_route(("UNAVAILABLE", "RESOURCE_EXHAUSTED"), idempotent=False,
                                 failure_codes=("INTERNAL", "UNAVAILABLE"))
    assert idem.of("RESOURCE_EXHAUSTED") is TRANSIENT  # retried here, but not a failure
    assert "RESOURCE_EXHAUSTED" in idem.retryable
    assert plain.of("RESOURCE_EXHAUSTED") is SUCCESS  # neither retried nor a failure
    assert {idem.of("RESOURCE_EXHAUSTED"), plain.of("RESOURCE_EXHAUSTED")} <= HEALTHY
    assert idem.of("UNAVAILABLE") is plain.of("UNAVAILABLE") is RETRYABLE
    assert idem.of("INTERNAL") is plain.of("INTERNAL") is FAILURE
    assert idem.of("UNKNOWN") is SUCCESS  # not a failure code here
    assert "RESOURCE_EXHAUSTED" not in DEFAULT_FAILURE_CODES


def test_local_replies_and_cancelled_are_ignored_even_if_listed() -> None:
    c = Classifier.for_route(("UNAVAILABLE", "CANCELLED"), idempotent=True)
    assert c.classify(Reply("UNAVAILABLE", local=LocalReason.CIRCUIT_OPEN)) is IGNORED
    assert c.classify(Reply("RESOURCE_EXHAUSTED", local=LocalReason.MAX_PENDING_REQUESTS)) is IGNORED
    assert c.classify(Reply("CANCELLED")) is IGNORED
    assert "CANCELLED" not in c.retryable
    assert c.classify(Reply("UNAVAILABLE")) is RETRYABLE


def test_unknown_code_names_are_treated_as_unknown() -> None:
    c = Classifier.for_route(("UNAVAILABLE",), idempotent=False)
    assert c.classify(Reply("WEIRD")) is c.of("UNKNOWN") is FAILURE


def test_classifiers_compare_by_table() -> None:
    a = Classifier.for_route(("UNAVAILABLE",), idempotent=False)
    assert a == Classifier.for_route(["UNAVAILABLE"], idempotent=True)
    assert a != Classifier.for_route(("UNAVAILABLE", "INTERNAL"), idempotent=True)
    assert hash(a) == hash(Classifier.for_route(("UNAVAILABLE",), idempotent=False))
