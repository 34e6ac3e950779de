"""Concurrency counted in sequences, and the monthly quota reserved like the token limit."""

from __future__ import annotations

import pytest

from loramux.errors import QuotaExceeded, RateLimited
from loramux.limits.base import Limits
from tests.platform.limits.conftest import Factory, rid


async def test_each_sequence_takes_a_concurrency_unit(make_limiter: Factory) -> None:
    limiter, limits = make_limiter(), Limits(max_concurrent_requests=4)
    three = await limiter.admit("t1", rid(), limits, tokens=1, sequences=3)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("t1", rid(), limits, tokens=1, sequences=2)
    assert "concurrent" in refused.value.message and "retry-after" in refused.value.headers
    one = await limiter.admit("t1", rid(), limits, tokens=1)
    await limiter.finish(three, 1)
    await limiter.finish(one, 1)
    # every unit is back: the whole limit fits again
    await limiter.admit("t1", rid(), limits, tokens=1, sequences=4)


async def test_more_sequences_than_the_limit_never_fit(make_limiter: Factory) -> None:
    limiter, limits = make_limiter(), Limits(max_concurrent_requests=4)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("t1", rid(), limits, tokens=1, sequences=5)
    assert refused.value.code == "concurrency_exceeds_limit"
    assert "retry-after" not in refused.value.headers
    await limiter.admit("t1", rid(), limits, tokens=1, sequences=4)


async def test_monthly_quota_is_reserved_then_released(make_limiter: Factory) -> None:
    limiter, limits = make_limiter(), Limits(monthly_tokens_left=100)
    first = await limiter.admit("t1", rid(), limits, tokens=60)
    with pytest.raises(QuotaExceeded) as in_flight:
        await limiter.admit("t1", rid(), limits, tokens=50)
    assert in_flight.value.type == in_flight.value.code == "insufficient_quota"
    assert in_flight.value.status_code == 429 and "retry-after" in in_flight.value.headers
    second = await limiter.admit("t1", rid(), limits, tokens=40)
    # Finished, a request's tokens are in the usage records, which the caller subtracts
    # from the quota: the limiter lets its reservation go.
    await limiter.finish(first, 30)
    await limiter.finish(second, 10)
    await limiter.admit("t1", rid(), limits, tokens=100)


async def test_a_reservation_over_what_is_left_never_fits(make_limiter: Factory) -> None:
    limiter = make_limiter()
    with pytest.raises(QuotaExceeded) as over:
        await limiter.admit("t1", rid(), Limits(monthly_tokens_left=32), tokens=520)
    assert "32 are left" in over.value.message and "retry-after" not in over.value.headers
    with pytest.raises(QuotaExceeded) as spent:
        await limiter.admit("t1", rid(), Limits(monthly_tokens_left=-5), tokens=1)
    assert "exceeded your monthly token quota" in spent.value.message
    await limiter.admit("t1", rid(), Limits(monthly_tokens_left=32), tokens=32)


async def test_quota_reservations_are_per_tenant(make_limiter: Factory) -> None:
    limiter, limits = make_limiter(), Limits(monthly_tokens_left=10, max_concurrent_requests=2)
    await limiter.admit("t1", rid(), limits, tokens=10, sequences=2)
    await limiter.admit("t2", rid(), limits, tokens=10, sequences=2)
