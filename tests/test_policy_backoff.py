"""backoff.py: full jitter bounds, decorrelated and equal jitter, gRFC A6 pushback."""

from __future__ import annotations

from random import Random

import pytest

from aivo_mesh.config.model import BackoffSpec
from aivo_mesh.policy import bind
from aivo_mesh.policy.backoff import STOP, DecorrelatedJitter, EqualJitter, FullJitter, parse_pushback


def test_full_jitter_ceiling_doubles_up_to_the_cap() -> None:
    b = FullJitter(base=0.1, cap=1.0)
    assert [b.ceiling(n) for n in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert b.ceiling(10_000) == 1.0  # no overflow


def test_full_jitter_spans_zero_to_ceiling() -> None:
    b, rng = FullJitter(base=0.1, cap=1.0), Random(42)
    for n in (1, 2, 3, 8):
        samples = [b.delay(n, 0.0, rng) for _ in range(2000)]
        ceiling = b.ceiling(n)
        assert all(0.0 <= s <= ceiling for s in samples)
        # Full jitter: the whole interval is used, not just its top.
        assert min(samples) < 0.02 * ceiling
        assert max(samples) > 0.98 * ceiling
        assert sum(samples) / len(samples) == pytest.approx(ceiling / 2, rel=0.05)


def test_full_jitter_is_deterministic_with_a_seeded_rng() -> None:
    b = FullJitter(base=0.1, cap=1.0)
    assert [b.delay(2, 0, Random(7)) for _ in range(3)] == [b.delay(2, 0, Random(7))] * 3


def test_decorrelated_jitter_bounds() -> None:
    b, rng = DecorrelatedJitter(base=0.1, cap=2.0), Random(1)
    previous = 0.0
    for n in range(1, 50):
        d = b.delay(n, previous, rng)
        assert 0.1 <= d <= min(2.0, max(0.1, previous * 3))
        previous = d


def test_equal_jitter_spans_half_to_full_ceiling() -> None:
    # The breaker's probe wait: the ceiling doubles as full jitter's does, the wait never drops below half.
    b, rng = EqualJitter(base=1.0, cap=60.0), Random(5)
    assert [b.ceiling(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert b.ceiling(10_000) == 60.0
    for n in (1, 3, 7, 50):
        c = b.ceiling(n)
        samples = [b.delay(n, 0.0, rng) for _ in range(2000)]
        assert all(c / 2 <= s <= c for s in samples)
        assert min(samples) < 0.52 * c and max(samples) > 0.98 * c
    with pytest.raises(ValueError, match="cap must be >= base"):
        EqualJitter(base=2.0, cap=1.0)


def test_from_spec_and_validation() -> None:
    b = bind.backoff(BackoffSpec(base=0.05, max=0.5))
    assert isinstance(b, FullJitter) and (b.base, b.cap) == (0.05, 0.5)
    with pytest.raises(ValueError, match="base must be > 0"):
        FullJitter(base=0.0, cap=1.0)
    with pytest.raises(ValueError, match="cap must be >= base"):
        DecorrelatedJitter(base=1.0, cap=0.5)


@pytest.mark.parametrize(
    ("trailers", "expected"),
    [
        ((), None),
        ((("other", "1"),), None),
        ((("grpc-retry-pushback-ms", "250"),), 0.25),
        ((("grpc-retry-pushback-ms", "0"),), 0.0),
        ((("Grpc-Retry-Pushback-Ms", b"1500"),), 1.5),
        ((("grpc-retry-pushback-ms", "-1"),), STOP),
        ((("grpc-retry-pushback-ms", "1.5"),), STOP),
        ((("grpc-retry-pushback-ms", "soon"),), STOP),
        ((("grpc-retry-pushback-ms", ""),), STOP),
        ((("grpc-retry-pushback-ms", "100"), ("grpc-retry-pushback-ms", "-1")), 0.1),
    ],
)
def test_pushback(trailers: tuple[tuple[str, str | bytes], ...], expected: object) -> None:
    assert parse_pushback(trailers) == expected
